"""The dispatcher as a process builds it: the one place its parts are built and wired.

Handlers, routes and experts, the workspace's catalogs (``service.Catalogs``)
and the run pipeline's stages (``service.Stages``) are built here, once, and
handed to ``Dispatcher``, which only composes them.

What the dispatcher uses of the process's other services it declares as its
``Neighbours``: the context domain (runs reach the context service through a
port: that domain when no ``SWITCHBOARD_CONTEXT_ADDRESS`` names another
process, else its stub), the integration hub (tools, and the breakers experts
share with them; built here too where the integration service is not served),
the experts' directory, the search filter's grammar and the token counter. No
service imports another: the composition root plugs them in (``NEIGHBOURS``,
``mesh.connect``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from opentelemetry.trace import Tracer

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher import mapping, servicer
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.assistants.holders import HolderStore
from switchboard.dispatcher.assistants.store import AssistantStore
from switchboard.dispatcher.assistants.validation import AssistantLimits
from switchboard.dispatcher.budgets.ledger import Ledger
from switchboard.dispatcher.budgets.quotas import QuotaDefaults, Quotas
from switchboard.dispatcher.budgets.quotastore import QuotaStore
from switchboard.dispatcher.budgets.resources.catalog import Budgets
from switchboard.dispatcher.budgets.resources.store import BudgetStore, UsageStore
from switchboard.dispatcher.budgets.spending import Spending
from switchboard.dispatcher.budgets.usage import Usage
from switchboard.dispatcher.handlers.echo import EchoHandler
from switchboard.dispatcher.handlers.experts import CircuitBreakers, WorkspaceExperts
from switchboard.dispatcher.handlers.remote import RemoteHandler
from switchboard.dispatcher.handlers.router import HANDLER_ID, Registry, Router, Routes
from switchboard.dispatcher.llm.build import llm_config
from switchboard.dispatcher.llm.handler import LlmHandler
from switchboard.dispatcher.llm.settings import LlmSettings
from switchboard.dispatcher.memory.build import memory_forming
from switchboard.dispatcher.memory.worker import MemoryForming
from switchboard.dispatcher.ports.context import (
    ContextDomain,
    ContextPort,
    LocalContext,
    RemoteContext,
)
from switchboard.dispatcher.ports.experts import ExpertDirectory, ExpertEntry
from switchboard.dispatcher.ports.peers import GrpcPeers
from switchboard.dispatcher.privacy import DispatcherEraser
from switchboard.dispatcher.runs.control import Control
from switchboard.dispatcher.runs.core.active.feed import Feeds
from switchboard.dispatcher.runs.core.active.live import Common, Live
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.scheduler import CapacityLimits, Scheduler
from switchboard.dispatcher.runs.core.steers import SteerBook
from switchboard.dispatcher.runs.core.store import RunStore
from switchboard.dispatcher.runs.core.waiting import QueueNotes
from switchboard.dispatcher.runs.delegation.delegation import Delegation
from switchboard.dispatcher.runs.delegation.limits import DelegationLimits, FindHandler
from switchboard.dispatcher.runs.execution.execution import Execution
from switchboard.dispatcher.runs.intake.admission import Admission
from switchboard.dispatcher.runs.intake.content import (
    BuiltinContentPolicy,
    ContentPolicy,
    load_content_policy,
)
from switchboard.dispatcher.runs.reading.queries import Queries
from switchboard.dispatcher.runs.reading.streams import Streams
from switchboard.dispatcher.runs.recovery import Recovery
from switchboard.dispatcher.runs.steering import Steering
from switchboard.dispatcher.schedules.build import schedule_firing, schedules_catalog
from switchboard.dispatcher.service import Catalogs, Dispatcher, Readmission, RunLimits, Stages
from switchboard.dispatcher.settings import DispatcherSettings
from switchboard.dispatcher.talk.build import peers_of, smart_turn, talk_limits
from switchboard.dispatcher.talk.phone.book import CallBook
from switchboard.dispatcher.talk.phone.store import CallQuota
from switchboard.dispatcher.talk.session import Talks
from switchboard.dispatcher.talk.sip.build import start_sip
from switchboard.dispatcher.talk.sip.calls import Calls
from switchboard.dispatcher.talk.store import VoiceStore
from switchboard.dispatcher.talk.streams.build import start_streams
from switchboard.dispatcher.talk.streams.calls import MediaStreams
from switchboard.dispatcher.talk.webrtc.settings import WebRtcSettings
from switchboard.dispatcher.tools.port import LocalTools, ToolHub
from switchboard.dispatcher.tools.runner import ToolLimits
from switchboard.dispatcher.voice.build import speech
from switchboard.dispatcher.voice.settings import VoiceSettings
from switchboard.dispatcher.voice.speaker import Speech
from switchboard.platform.config import ConfigError, Sections
from switchboard.platform.errors import NotFound
from switchboard.platform.events.erasure.store import DISPATCHER, ErasureStore
from switchboard.platform.events.erasure.worker import serve_part
from switchboard.platform.observe.metrics import Metrics, run_state_label
from switchboard.platform.observe.telemetry import tracer
from switchboard.platform.process import Port, Shared, setting
from switchboard.platform.rpc.outbound.channels import RemoteHandlerSettings, parse_remotes
from switchboard.platform.rpc.outbound.peers import PeerSettings
from switchboard.platform.rpc.server import ServiceRegistration, advertise_address
from switchboard.platform.security.egress import EgressPolicy, EgressSettings
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import names
from switchboard.platform.values.resources import QuotaName


class HubLimits(Protocol):
    @property
    def max_per_workspace(self) -> int:
        """Most integrations of one workspace: its experts are read within it."""
        ...


class IntegrationHub(ToolHub, Protocol):
    """What the dispatcher uses of the process's integration hub: its tools, and the
    breakers an expert's calls share with them (an expert's circuit is one for runs
    and tools)."""

    @property
    def breakers(self) -> CircuitBreakers: ...

    @property
    def limits(self) -> HubLimits: ...


class FilterGrammar(Protocol):
    """The search filter's grammar: ``text`` parsed as GetContextWindow parses a
    filter, or InvalidArgument naming ``field``."""

    def __call__(self, text: str, *, workspace_id: str, field: str) -> object: ...


@dataclass(frozen=True)
class Neighbours:
    """What the dispatcher uses of the other services in its process."""

    #: The process's context domain, built the first time it is asked for.
    context: Callable[[], Awaitable[ContextDomain]]
    #: The process's integration hub, built the first time it is asked for.
    integrations: Callable[[], Awaitable[IntegrationHub]]
    #: A workspace's experts as the hub stores them.
    experts: ExpertDirectory
    #: An assistant's retrieval filter is refused when saved, in GetContextWindow's words.
    filters: FilterGrammar
    #: The context service's token count: a prompt counts as its window did.
    count_tokens: Callable[[str], int]


NEIGHBOURS: Final = Port[Neighbours]("the dispatcher's neighbours")


def checks(
    settings: DispatcherSettings, remotes: RemoteHandlerSettings, llm: LlmSettings
) -> tuple[tuple[str, Callable[[], object]], ...]:
    """The dispatcher's text settings to parse before anything opens (``mesh.check_settings``)."""
    return (
        ("SWITCHBOARD_DISPATCHER_ROUTES", lambda: Routes.parse(settings.dispatcher_routes)),
        (
            "SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS",
            lambda: _remote_ids(remotes.dispatcher_remote_handlers),
        ),
        (
            "SWITCHBOARD_DISPATCHER_BLOCKLIST",
            lambda: BuiltinContentPolicy(settings.dispatcher_blocklist),
        ),
        # Names its own variables; without a base URL the settings refuse the rest.
        ("SWITCHBOARD_LLM_BASE_URL", lambda: llm.llm_base_url and llm_config(llm)),
    )


def _remote_ids(text: str) -> None:
    ids = [handler_id for handler_id, _ in parse_remotes(text)]
    for handler_id in ids:
        if not HANDLER_ID.fullmatch(handler_id):
            raise ValueError(f"handler id {handler_id!r} {names.CLIENT_ID_RULE.must}")
    if len(set(ids)) != len(ids):
        raise ValueError("each handler id may appear once")


def handler_registry(sections: Sections, count: Callable[[str], int]) -> Registry:
    """Built-in handlers, entry-point plugins and the static remote experts; ``count``:
    the model handler's token estimate (the context service's counter)."""
    settings, llm = sections.section(DispatcherSettings), sections.section(LlmSettings)
    remotes = sections.section(RemoteHandlerSettings)
    registry = Registry()
    llm_ready = bool(llm.llm_base_url and llm.llm_model)
    note = (
        ""
        if llm_ready
        else "no language model is configured here; set SWITCHBOARD_LLM_BASE_URL and "
        "SWITCHBOARD_LLM_MODEL for model answers"
    )
    registry.add(EchoHandler(note=note))
    if llm_ready:
        registry.add(LlmHandler(llm_config(llm), count=count))
    with setting("SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS"):
        for handler_id, address in parse_remotes(remotes.dispatcher_remote_handlers):
            registry.add(
                RemoteHandler(handler_id, address, timeout_s=settings.dispatcher_remote_timeout_s)
            )
    if settings.dispatcher_handler_plugins:
        with setting("SWITCHBOARD_DISPATCHER_HANDLER_PLUGINS"):
            # ``settings``: the dispatcher's own section; ``sections``: any other by its
            # class (``sections.section(LlmSettings)``).
            registry.load_entry_points({"settings": settings, "sections": sections})
    return registry


async def context_port(
    shared: Shared, domain: Callable[[], Awaitable[ContextDomain]]
) -> ContextPort:
    """The context service's own process when configured, else this process's ``domain``."""
    address = shared.section(PeerSettings).context_address
    if not address:
        return LocalContext(await domain())
    remote = RemoteContext(address, shared.tokens)
    shared.resources.push_async_callback(remote.close)
    return remote


async def dispatcher_service(
    shared: Shared, context: ContextPort, integration: IntegrationHub, neighbours: Neighbours
) -> Dispatcher:
    """``integration``: the hub, for tools and for its breakers (an expert's circuit
    is one for runs and tools)."""
    resources = shared.resources
    registry = await _handlers(shared, neighbours.count_tokens)
    content = _content_policy(shared.section(DispatcherSettings))
    router = _router(shared, registry, integration, neighbours.experts)
    assistants = await _assistants(shared, registry, router, integration, neighbours.filters)
    schedules = schedules_catalog(shared, context, assistants, router)
    # Closed after the dispatcher: a call forwarded while runs stop still gets its answer.
    peers = GrpcPeers()
    resources.push_async_callback(peers.close)
    # Budgets: the catalog's changes wake runs paused at a cap (``spending.on_change``).
    spending = Spending(
        Ledger(shared.database),
        shared.bus,
        approval_timeout_s=shared.section(DispatcherSettings).dispatcher_approval_timeout_s,
        metrics=shared.metrics,
    )
    quotas = _quotas(shared)

    async def call_quota(workspace_id: str) -> CallQuota:
        limits = await quotas.limits(workspace_id)
        return CallQuota(
            max_concurrent_calls=limits.max_concurrent_calls,
            call_minutes_per_day=limits.call_minutes_per_day,
            subject=str(QuotaName(workspace_id)),
        )

    catalogs = Catalogs(
        assistants=assistants,
        schedules=schedules,
        budgets=_budgets(shared, assistants, spending),
        usage=Usage(UsageStore(shared.database), shared.page_tokens),
        quotas=quotas,
        calls=CallBook(
            shared.database,
            shared.bus,
            shared.page_tokens,
            instance_id=shared.instance_id,
            peers=peers,
            quota=call_quota,
        ),
    )
    run = _Run(
        shared,
        context,
        content,
        router,
        catalogs,
        LocalTools(integration, shared.policy),
        spending,
        speech(shared),
        # None when tracing is off: runs then get no span (decided once, here).
        tracer("switchboard.dispatcher"),
    )
    dispatcher = Dispatcher(_stages(run, peers), catalogs)
    await dispatcher.start()
    resources.push_async_callback(dispatcher.close)
    # The calls' quota and take-over: watched once a line (SIP, media streams) is plugged.
    catalogs.calls.start()
    resources.push_async_callback(catalogs.calls.close)
    # After the dispatcher's start (its lease is renewed, its runs recovered), and
    # stopped before it closes (the stack unwinds in reverse).
    firing = schedule_firing(
        shared,
        context,
        functools.partial(_send_scheduled, dispatcher),
        lease_s=shared.section(DispatcherSettings).dispatcher_lease_s,
        place=dispatcher.calls.place_for,
    )
    schedules.on_change = firing.wake
    firing.start()
    resources.push_async_callback(firing.stop)
    # Memory forming reads finished runs from the event log, never on a run's path;
    # closed before the dispatcher (the stack unwinds in reverse).
    forming = memory_forming(
        shared, shared.section(DispatcherSettings), context, registry, assistants
    )
    if forming is not None:
        await shared.part(MemoryForming, functools.partial(_started, forming))
        resources.push_async_callback(forming.close)
    return dispatcher


async def _started(forming: MemoryForming) -> MemoryForming:
    await forming.start()
    return forming


async def _handlers(shared: Shared, count: Callable[[str], int]) -> Registry:
    """The handler registry, each remote expert refreshed; all closed with the process."""
    registry = handler_registry(shared.sections, count)
    for handler in registry.all():
        if isinstance(handler, RemoteHandler):
            shared.resources.push_async_callback(handler.close)
            await handler.refresh()
        elif isinstance(handler, LlmHandler):
            shared.resources.push_async_callback(handler.aclose)
    return registry


@dataclass(frozen=True)
class _Run:
    """What the run pipeline's stages are built from."""

    shared: Shared
    context: ContextPort
    content: ContentPolicy
    router: Router
    catalogs: Catalogs
    tools: LocalTools
    spending: Spending
    speech: Speech | None
    tracer: Tracer | None

    @property
    def settings(self) -> DispatcherSettings:
        return self.shared.section(DispatcherSettings)


def _handler_finder(router: Router) -> FindHandler:
    """A workspace's handler's capabilities by id (a delegate naming a handler)."""

    async def find(workspace_id: str, handler_id: str) -> handler_pb2.HandlerCapabilities | None:
        found = await router.find(workspace_id, handler_id)
        return found.capabilities if found is not None else None

    return find


def _stages(run: _Run, peers: GrpcPeers) -> Stages:
    """The run pipeline, in the order a message travels (``service.py``), each stage
    handed the ones it calls."""
    shared, common = run.shared, _common(run)
    scheduler = _scheduler(run.settings)
    publishing = Publishing(common=common)
    # The scheduler's ``on_change``: each queued run says what it waits behind.
    QueueNotes(common=common, scheduler=scheduler, publishing=publishing)
    steers = SteerBook(common=common, scheduler=scheduler, publishing=publishing)
    delegation = Delegation(
        limits=_delegation_limits(run.settings),
        store=common.store,
        scheduler=scheduler,
        assistants=run.catalogs.assistants,
        context=run.context,
        closing=lambda: common.live.closing,
        find_handler=_handler_finder(run.router),
    )
    execution = _execution(run, common, scheduler, publishing, steers, delegation)
    admission = _admission(run, common, scheduler, publishing, execution)
    control = Control(
        common=common,
        scheduler=scheduler,
        execution=execution,
        publishing=publishing,
        peers=peers,
    )
    return Stages(
        common=common,
        scheduler=scheduler,
        publishing=publishing,
        steers=steers,
        execution=execution,
        admission=admission,
        recovery=Recovery(
            common=common,
            publishing=publishing,
            admit=Readmission(steers, admission),
            metrics=shared.metrics,
            charge_holds=run.spending.ledger.charge_lost,
            retire=execution.retire,
        ),
        queries=Queries(
            common=common,
            context=run.context,
            assistants=run.catalogs.assistants,
            page_tokens=shared.page_tokens,
            tools=run.tools,
            tool_limits=_tool_limits(run.settings),
            delegation=delegation,
        ),
        control=control,
        steering=Steering(common=common, book=steers, admission=admission, control=control),
        streams=lambda actions: Streams(
            actions=actions, access=shared.access, heartbeat_s=common.limits.heartbeat_s
        ),
        talks=lambda actions: Talks(
            actions=actions,
            assistants=run.catalogs.assistants,
            context=run.context,
            store=VoiceStore(shared.database),
            access=shared.access,
            speech=lambda: run.speech,
            limits=talk_limits(shared.section(VoiceSettings), run.settings.dispatcher_heartbeat_s),
            judge=smart_turn(shared),
        ),
        peers=lambda talks: peers_of(talks, shared.section(WebRtcSettings)),
        spending=run.spending,
        delegation=delegation,
    )


def _delegation_limits(settings: DispatcherSettings) -> DelegationLimits:
    return DelegationLimits(
        max_depth=settings.dispatcher_max_delegation_depth,
        max_children_per_run=settings.dispatcher_max_children_per_run,
        max_children_per_tree=settings.dispatcher_max_children_per_tree,
    )


def _common(run: _Run) -> Common:
    """What every stage shares: this process's live runs, the store, the feeds, the
    bus, the router and the run limits."""
    settings = run.settings
    return Common(
        live=Live(),
        store=RunStore(run.shared.database),
        feeds=Feeds(
            retention_s=settings.dispatcher_run_retention_s,
            max_updates=settings.dispatcher_max_updates_per_run,
        ),
        bus=run.shared.bus,
        router=run.router,
        limits=_limits(run.shared),
    )


def _execution(
    run: _Run,
    common: Common,
    scheduler: Scheduler,
    publishing: Publishing,
    steers: SteerBook,
    delegation: Delegation,
) -> Execution:
    return Execution(
        common=common,
        publishing=publishing,
        scheduler=scheduler,
        context=run.context,
        policy=run.shared.policy,
        tools=run.tools,
        tool_limits=_tool_limits(run.settings),
        metrics=run.shared.metrics,
        tracer=run.tracer,
        spending=run.spending,
        speech=run.speech,
        steers=steers,
        delegation=delegation,
    )


def _admission(
    run: _Run, common: Common, scheduler: Scheduler, publishing: Publishing, execution: Execution
) -> Admission:
    return Admission(
        common=common,
        context=run.context,
        counters=run.shared.cache,
        scheduler=scheduler,
        content=run.content,
        assistants=run.catalogs.assistants,
        publishing=publishing,
        start=execution.launch,
        cancel=execution.cancel,
        tracer=run.tracer,
        quotas=run.catalogs.quotas,
        spending=run.spending,
        speech=run.speech,
    )


def _content_policy(settings: DispatcherSettings) -> ContentPolicy:
    with setting("SWITCHBOARD_DISPATCHER_CONTENT_POLICY"):
        return load_content_policy(
            settings.dispatcher_content_policy,
            settings.dispatcher_blocklist,
            settings.dispatcher_flag_injection,
        )


def _scheduler(settings: DispatcherSettings) -> Scheduler:
    return Scheduler(
        limits=CapacityLimits(
            max_running=settings.dispatcher_max_running,
            max_running_per_workspace=settings.dispatcher_max_running_per_workspace,
            max_queued=settings.dispatcher_max_queued,
            max_queued_per_workspace=settings.dispatcher_max_queued_per_workspace,
        )
    )


def _tool_limits(settings: DispatcherSettings) -> ToolLimits:
    return ToolLimits(
        max_steps=settings.dispatcher_max_tool_steps,
        max_calls_per_step=settings.dispatcher_max_tool_calls_per_step,
        approval_timeout_s=settings.dispatcher_approval_timeout_s,
        max_result_chars=settings.dispatcher_max_tool_result_chars,
    )


def _router(
    shared: Shared, registry: Registry, integration: IntegrationHub, directory: ExpertDirectory
) -> Router:
    """Routes over the registry and each workspace's experts; ConfigError for an unknown id.

    A workspace's experts are read as the hub bounds its integrations, and share its
    breakers (an expert's circuit is one for runs and tools)."""
    settings = shared.section(DispatcherSettings)
    with setting("SWITCHBOARD_DISPATCHER_ROUTES"):
        routes = Routes.parse(settings.dispatcher_routes)
    default = settings.dispatcher_default_handler or (
        "llm" if registry.get("llm") is not None else "echo"
    )
    if registry.get(default) is None:
        raise ConfigError(f"SWITCHBOARD_DISPATCHER_DEFAULT_HANDLER: no handler {default!r}")
    routed = (*routes.prefixes.values(), *(h for _, h in routes.content_types))
    for handler_id in (*routed, *routes.workspaces.values()):
        if registry.get(handler_id) is None:
            raise ConfigError(f"SWITCHBOARD_DISPATCHER_ROUTES: no handler {handler_id!r}")
    limit = integration.limits.max_per_workspace

    def read(workspace_id: str) -> Awaitable[Sequence[ExpertEntry]]:
        return directory(workspace_id, limit=limit)

    experts = WorkspaceExperts(
        read,
        EgressPolicy.from_settings(shared.section(EgressSettings)),
        timeout_s=settings.dispatcher_remote_timeout_s,
        reserved=lambda handler_id: registry.get(handler_id) is not None,
        breakers=integration.breakers,
    )
    # Closed after the dispatcher (the stack unwinds in reverse): runs stop first.
    shared.resources.push_async_callback(experts.close)
    shared.resources.callback(shared.bus.listen(experts.on_event))
    return Router(registry, routes, default, experts)


async def _assistants(
    shared: Shared,
    registry: Registry,
    router: Router,
    integration: IntegrationHub,
    filters: FilterGrammar,
) -> Assistants:
    """The workspace's assistants, checked against the handlers and integrations that exist."""
    settings = shared.section(DispatcherSettings)

    async def handler_exists(workspace_id: str, handler_id: str) -> bool:
        return await router.find(workspace_id, handler_id) is not None

    async def integration_exists(name: str) -> bool:
        try:
            await integration.get(name)
        except NotFound:
            return False
        return True

    llm = registry.get("llm")
    assistants = Assistants(
        AssistantStore(shared.database, max_revisions=settings.dispatcher_max_assistant_revisions),
        shared.bus,
        shared.page_tokens,
        AssistantLimits(
            max_per_workspace=settings.dispatcher_max_assistants_per_workspace,
            providers=(
                tuple(p.name for p in llm.config.providers) if isinstance(llm, LlmHandler) else ()
            ),
            max_output_tokens=shared.section(LlmSettings).llm_max_output_tokens,
            max_tool_steps=settings.dispatcher_max_tool_steps,
            max_memory_items=settings.memory_max_items_per_scope,
        ),
        handler_exists=handler_exists,
        integration_exists=integration_exists,
        # Parsed as GetContextWindow will parse it: a bad one is refused when saved
        # rather than on every run.
        check_filter=lambda text, workspace_id: filters(
            text, workspace_id=workspace_id, field="assistant.retrieval.filter"
        ),
        holders=HolderStore(shared.database),
    )
    await assistants.start()
    shared.resources.push_async_callback(assistants.close)
    return assistants


def _budgets(shared: Shared, assistants: Assistants, spending: Spending) -> Budgets:
    """The workspace's budgets; an assistant scope must name one of its assistants, and
    a change wakes the runs paused at a cap in this process (others poll)."""

    async def assistant_exists(workspace_id: str, assistant_id: str) -> bool:
        try:
            await assistants.get(mapping.assistant_name(workspace_id, assistant_id))
        except NotFound:
            return False
        return True

    return Budgets(
        BudgetStore(shared.database),
        shared.bus,
        shared.page_tokens,
        assistant_exists=assistant_exists,
        on_change=spending.on_change,
    )


def _quotas(shared: Shared) -> Quotas:
    """Workspaces' quotas, with the settings' defaults for what a workspace does not set."""
    settings = shared.section(DispatcherSettings)
    quotas = Quotas(
        QuotaStore(shared.database),
        QuotaDefaults(
            messages_per_minute=settings.dispatcher_max_messages_per_minute_per_workspace,
            max_concurrent_runs=settings.dispatcher_max_active_runs_per_workspace,
        ),
    )
    shared.resources.push_async_callback(quotas.close)
    return quotas


def _limits(shared: Shared) -> RunLimits:
    settings = shared.section(DispatcherSettings)
    return RunLimits(
        instance_id=shared.instance_id,
        max_input_chars=settings.dispatcher_max_input_chars,
        messages_per_minute_per_user=settings.dispatcher_max_messages_per_minute_per_user,
        default_timeout_s=settings.dispatcher_default_timeout_s,
        max_timeout_s=settings.dispatcher_max_timeout_s,
        heartbeat_s=settings.dispatcher_heartbeat_s,
        recovery=settings.dispatcher_recovery,
        lease_s=settings.dispatcher_lease_s,
        admitting_per_workspace=settings.dispatcher_max_admitting_per_workspace,
    )


async def _send_scheduled(
    dispatcher: Dispatcher, principal: Principal, request: pb.SendMessageRequest, schedule: str
) -> pb.SendMessageResponse:
    """A schedule's tick through the dispatcher's admission, as its creator."""
    return await dispatcher.send_message(principal, request, schedule=schedule)


def _observe(
    metrics: Metrics, dispatcher: Dispatcher, calls: Calls | None, streams: MediaStreams | None
) -> None:
    """Read the runs' current state at every scrape (docs/metrics.md)."""
    scheduler = dispatcher.scheduler
    metrics.observe(
        "switchboard_runs_active",
        lambda: [
            ((run_state_label("RUN_STATE_QUEUED"),), scheduler.queued),
            ((run_state_label("RUN_STATE_RUNNING"),), scheduler.running),
            ((run_state_label("RUN_STATE_REQUIRES_ACTION"),), scheduler.waiting),
        ],
    )
    metrics.observe("switchboard_subscribers", lambda: [(("runs",), dispatcher.watchers)])
    if calls is not None:
        calls.observe(metrics)
    if streams is not None:
        streams.observe(metrics)


async def build(shared: Shared) -> ServiceRegistration:
    neighbours = shared.plugged(NEIGHBOURS)
    port = await context_port(shared, neighbours.context)
    hub = await neighbours.integrations()

    async def make() -> Dispatcher:
        return await dispatcher_service(shared, port, hub, neighbours)

    dispatcher = await shared.part(Dispatcher, make)
    # Phone calls, when SWITCHBOARD_SIP_LISTEN asks: closed before the dispatcher's runs.
    calls = await start_sip(
        shared, dispatcher.talks, port, dispatcher.conversation_tools, dispatcher.calls
    )
    # The carriers' media streams, when SWITCHBOARD_STREAMS_LISTEN asks: likewise.
    streams = await start_streams(
        shared, dispatcher.talks, port, dispatcher.conversation_tools, dispatcher.calls
    )
    serve_part(
        shared.resources,
        shared.database,
        shared.bus,
        DISPATCHER,
        DispatcherEraser(shared.database, ErasureStore(shared.database)),
        claimer=shared.instance_id,
    )

    async def advertise(bound_port: int) -> None:
        await dispatcher.advertise(advertise_address(shared.settings, bound_port))

    return ServiceRegistration(
        servicer.SERVICE,
        servicer.DispatcherServiceServicer(dispatcher),
        on_bound=advertise,
        observe=lambda metrics: _observe(metrics, dispatcher, calls, streams),
    )
