"""Which services a Switchboard process runs, and ``create_server`` for them.

All-in-one and mesh shapes run this same code: ``Settings.services`` picks the
subset a process serves; services reach each other through their stubs.
Every process, whatever it serves, authenticates and authorizes its callers,
so each opens the database, the cache and the key ring.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from google.protobuf.descriptor import ServiceDescriptor
from sqlalchemy.exc import DBAPIError

from switchboard.auth import servicer as auth_servicer
from switchboard.auth.accounts import AccountLimits, Accounts, LoginLimits
from switchboard.auth.authenticator import CredentialAuthenticator
from switchboard.auth.oidc import OidcVerifier
from switchboard.auth.opaque import OpaqueSecrets
from switchboard.auth.passwords import PasswordHasher
from switchboard.auth.store import AuthStore
from switchboard.auth.tokens import AccessTokens, KeyRing, SigningKey, TokenPolicy, load_key_ring
from switchboard.context import servicer as context_servicer
from switchboard.context.plugins import (
    load_entity_extractor,
    load_summarizer,
    load_token_counter,
)
from switchboard.context.service import ContextService
from switchboard.context.service import Limits as ContextLimits
from switchboard.context.store import ContextStore
from switchboard.context.tokens import ApproxTokenCounter
from switchboard.context.windowcache import WindowCache
from switchboard.dispatcher import servicer as dispatcher_servicer
from switchboard.dispatcher.assistants import AssistantLimits, Assistants
from switchboard.dispatcher.assistantstore import AssistantStore
from switchboard.dispatcher.content import BuiltinContentPolicy, load_content_policy
from switchboard.dispatcher.contextport import ContextPort, LocalContext, RemoteContext
from switchboard.dispatcher.experts import CircuitBreakers, WorkspaceExperts
from switchboard.dispatcher.feed import Feeds
from switchboard.dispatcher.handlers import EchoHandler
from switchboard.dispatcher.llm import (
    LlmConfig,
    LlmHandler,
    Provider,
    parse_prices,
    parse_providers,
)
from switchboard.dispatcher.peerport import GrpcPeers
from switchboard.dispatcher.remote import RemoteHandler, parse_remotes
from switchboard.dispatcher.router import HANDLER_ID, Registry, Router, Routes
from switchboard.dispatcher.scheduler import Limits as SchedulerLimits
from switchboard.dispatcher.scheduler import Scheduler
from switchboard.dispatcher.service import Dispatcher
from switchboard.dispatcher.service import Limits as DispatcherLimits
from switchboard.dispatcher.store import RunStore
from switchboard.dispatcher.toolport import LocalTools
from switchboard.dispatcher.toolrunner import ToolLimits
from switchboard.events import servicer as events_servicer
from switchboard.events.subscriptions import Limits
from switchboard.integration import servicer as integration_servicer
from switchboard.integration.connections import Limits as IntegrationLimits
from switchboard.integration.directory import workspace_experts
from switchboard.integration.kinds import connector_factory, reserved_handler_ids, stdio_servers
from switchboard.integration.service import IntegrationHub
from switchboard.integration.store import IntegrationStore
from switchboard.integration.webhooks import WebhookEngine, WebhookLimits
from switchboard.platform.accesswatch import AccessWatch
from switchboard.platform.authn import Guard
from switchboard.platform.breaker import Breakers
from switchboard.platform.bus import EventBus
from switchboard.platform.cache import Cache
from switchboard.platform.clientaddr import TrustedProxies
from switchboard.platform.config import ConfigError, Settings
from switchboard.platform.db import (
    Database,
    EventLogLock,
    is_outage,
    lock_sqlite_file,
    open_database,
)
from switchboard.platform.egress import EgressPolicy
from switchboard.platform.errors import NotFound
from switchboard.platform.eventlog import LocalLog, LogBackend, RedisLog
from switchboard.platform.membership import MembershipStore
from switchboard.platform.metrics import Metrics, run_state_label
from switchboard.platform.outbox import Outbox
from switchboard.platform.pagination import PageTokens
from switchboard.platform.policy import Policy
from switchboard.platform.secretbox import SecretBox
from switchboard.platform.server import (
    ServiceRegistration,
    SwitchboardServer,
    build_server,
    format_address,
)
from switchboard.platform.telemetry import Tracing, default_service_name, install

log = logging.getLogger("switchboard.mesh")

#: Health entry that is NOT_SERVING while Redis is unreachable (scaled out only).
REDIS_HEALTH = "switchboard.redis"
#: Health entry that is NOT_SERVING while the database does not answer (every process).
DATABASE_HEALTH = "switchboard.database"


@dataclass(frozen=True)
class Deps:
    """Everything a servicer may be constructed with; built once per process."""

    settings: Settings
    database: Database
    cache: Cache
    bus: EventBus
    keys: KeyRing
    accounts: Accounts
    authenticator: CredentialAuthenticator
    memberships: MembershipStore
    policy: Policy
    #: Keeps every open stream's access current (platform/accesswatch.py).
    access: AccessWatch
    context: ContextService
    page_tokens: PageTokens
    #: The integration hub (every process: the dispatcher reaches tools through it).
    integration: IntegrationHub
    #: Only in processes that serve DispatcherService.
    dispatcher: Dispatcher | None = None
    #: The process's metrics; None when SWITCHBOARD_METRICS_PORT is unset (nothing recorded).
    metrics: Metrics | None = None


Factory = Callable[[Deps], object]

# Short name (for SWITCHBOARD_SERVICES / --services) -> descriptor, methods
# answered with pre-serialized bytes, and how to build the servicer from the
# process's dependencies. Registration follows the descriptor
# (platform/registration.py).
SERVICES: dict[str, tuple[ServiceDescriptor, frozenset[str], Factory]] = {
    "auth": (
        auth_servicer.SERVICE,
        frozenset(),
        lambda d: auth_servicer.AuthServiceServicer(
            d.accounts, d.keys, TrustedProxies.parse(d.settings.trusted_proxies)
        ),
    ),
    "context": (
        context_servicer.SERVICE,
        context_servicer.PRESERIALIZED,
        lambda d: context_servicer.ContextServiceServicer(d.context),
    ),
    "dispatcher": (
        dispatcher_servicer.SERVICE,
        frozenset(),
        lambda d: dispatcher_servicer.DispatcherServiceServicer(_required(d.dispatcher), d.access),
    ),
    "integration": (
        integration_servicer.SERVICE,
        frozenset(),
        lambda d: integration_servicer.IntegrationServiceServicer(d.integration, d.access),
    ),
    "events": (
        events_servicer.SERVICE,
        events_servicer.PRESERIALIZED,
        lambda d: events_servicer.EventServiceServicer(
            d.bus, d.access, d.policy, event_limits(d.settings), d.page_tokens
        ),
    ),
}


def _required(dispatcher: Dispatcher | None) -> Dispatcher:
    if dispatcher is None:  # open_deps builds it whenever "dispatcher" is served
        raise ConfigError("the dispatcher was not built for this process")
    return dispatcher


def event_limits(settings: Settings) -> Limits:
    return Limits(
        heartbeat_s=settings.events_heartbeat_s,
        reauthorize_s=settings.events_reauthorize_s,
        buffer=settings.events_subscriber_buffer,
        max_batch=settings.events_max_batch,
        max_scopes=settings.events_max_scopes,
        per_principal=settings.events_max_subscriptions_per_principal,
        per_stream=settings.events_max_subscriptions_per_stream,
    )


def event_log(settings: Settings, database: Database, outbox: Outbox | None = None) -> LogBackend:
    """Redis Streams when Redis is configured, else the embedded database log."""
    memory = min(settings.events_memory, settings.events_retention)
    redis_url = settings.redis_url.get_secret_value()
    if redis_url:
        return RedisLog(
            redis_url,
            key=settings.events_stream_key,
            timeout_s=settings.redis_timeout_s,
            retention=settings.events_retention,
            retention_s=settings.events_retention_s,
            memory=memory,
            outbox_limit=settings.events_outbox_limit,
            dedupe_window_s=settings.events_dedupe_window_s,
            outbox=outbox,
        )
    return LocalLog(
        database,
        retention=settings.events_retention,
        retention_s=settings.events_retention_s,
        memory=memory,
        outbox=outbox,
    )


def context_limits(settings: Settings) -> ContextLimits:
    return ContextLimits(
        max_title_chars=200,
        max_metadata_bytes=settings.context_max_metadata_bytes,
        max_message_bytes=settings.context_max_message_bytes,
        max_parts=settings.context_max_message_parts,
        max_memory_chars=settings.context_max_memory_chars,
        max_members=settings.context_max_members,
        max_owned_workspaces=settings.context_max_owned_workspaces,
        max_conversations=settings.context_max_conversations,
        max_memory_items=settings.context_max_memory_items,
        max_pinned=settings.context_max_pinned,
        max_window_tokens=settings.context_max_window_tokens,
        relevant_limit=settings.context_relevant_limit,
        auto_prune_messages=settings.context_auto_prune_messages,
        auto_prune_tokens=settings.context_auto_prune_tokens,
        summary_tokens=settings.context_summary_tokens,
        purge_after_s=settings.context_purge_after_s,
        writes_per_minute=settings.context_max_writes_per_minute,
    )


@contextlib.contextmanager
def setting(variable: str) -> Iterator[None]:
    """Turn a parser's ValueError/TypeError into a ConfigError that names ``variable``.

    The parsers' messages never quote the value (some settings hold keys).
    """
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{variable}: {exc}") from None


def _remote_ids(text: str) -> None:
    ids = [handler_id for handler_id, _ in parse_remotes(text)]
    for handler_id in ids:
        if not HANDLER_ID.fullmatch(handler_id):
            raise ValueError(f"handler id {handler_id!r} must match {HANDLER_ID.pattern}")
    if len(set(ids)) != len(ids):
        raise ValueError("each handler id may appear once")


@contextlib.contextmanager
def database_setting() -> Iterator[None]:
    """A database that cannot be opened at start is a ConfigError naming SWITCHBOARD_DATABASE_URL.

    Wrong host, password or path, or a server that is down: the operator gets
    one line with the driver's reason instead of a traceback. The reason never
    holds the password (drivers do not echo it; our own messages mask it).
    """
    try:
        yield
    except Exception as exc:
        if not (is_outage(exc) or isinstance(exc, DBAPIError)):
            raise
        # The driver's own error says what is wrong; SQLAlchemy's wrapper adds a URL.
        root: BaseException = exc
        for _ in range(8):  # a cause chain is short; bounded in case it loops
            orig = getattr(root, "orig", None)
            cause = orig if isinstance(orig, BaseException) else root.__cause__
            if cause is None:
                break
            root = cause
        reason = (str(root).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"SWITCHBOARD_DATABASE_URL: cannot open the database: {type(root).__name__}: {reason}"
        ) from None


def check_settings(settings: Settings) -> None:
    """Parse the settings only the services understand, before anything opens.

    Settings validation (platform/config.py) knows types and ranges; the text
    formats of routes, remote experts, LLM providers and prices and the
    blocklist belong to the dispatcher. One ConfigError names every bad
    variable, so a typo stops the start before the database is touched.
    """
    checks: tuple[tuple[str, Callable[[], object]], ...] = (
        ("SWITCHBOARD_DISPATCHER_ROUTES", lambda: Routes.parse(settings.dispatcher_routes)),
        (
            "SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS",
            lambda: _remote_ids(settings.dispatcher_remote_handlers),
        ),
        (
            "SWITCHBOARD_DISPATCHER_BLOCKLIST",
            lambda: BuiltinContentPolicy(settings.dispatcher_blocklist),
        ),
        # Names its own variables; without a base URL the settings refuse the rest.
        ("SWITCHBOARD_LLM_BASE_URL", lambda: settings.llm_base_url and llm_config(settings)),
        # Names its variable and each bad entry.
        ("SWITCHBOARD_TRUSTED_PROXIES", lambda: TrustedProxies.parse(settings.trusted_proxies)),
    )
    problems = []
    for variable, parse in checks:
        try:
            parse()
        except ConfigError as exc:
            problems.append(str(exc))
        except (ValueError, TypeError) as exc:
            problems.append(f"{variable}: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))


def context_service(
    settings: Settings,
    database: Database,
    bus: EventBus,
    counters: Cache,
    page_tokens: PageTokens,
) -> ContextService:
    """The context domain with its configured plugins; raises ConfigError for unknown ones."""
    with setting("SWITCHBOARD_CONTEXT_TOKENIZER"):
        counter = load_token_counter(settings.context_tokenizer)
    with setting("SWITCHBOARD_CONTEXT_SUMMARIZER"):
        summarizer = load_summarizer(settings.context_summarizer)
    with setting("SWITCHBOARD_CONTEXT_ENTITY_EXTRACTOR"):
        extractor = load_entity_extractor(settings.context_entity_extractor)
    cache = WindowCache(
        settings.redis_url.get_secret_value(),
        timeout_s=settings.redis_timeout_s,
        ttl_s=settings.context_window_cache_ttl_s,
        max_entries=settings.context_window_cache_entries,
        max_bytes=settings.context_window_cache_bytes,
    )
    return ContextService(
        ContextStore(database),
        bus,
        cache,
        counters,
        counter=counter,
        summarizer=summarizer,
        extractor=extractor,
        limits=context_limits(settings),
        page_tokens=page_tokens,
    )


def handler_registry(settings: Settings) -> Registry:
    """Built-in handlers, entry-point plugins and the static remote experts."""
    registry = Registry()
    llm_ready = bool(settings.llm_base_url and settings.llm_model)
    note = (
        ""
        if llm_ready
        else "no language model is configured here; set SWITCHBOARD_LLM_BASE_URL and "
        "SWITCHBOARD_LLM_MODEL for model answers"
    )
    registry.add(EchoHandler(note=note))
    if llm_ready:
        registry.add(llm_handler(settings))
    with setting("SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS"):
        for handler_id, address in parse_remotes(settings.dispatcher_remote_handlers):
            registry.add(
                RemoteHandler(handler_id, address, timeout_s=settings.dispatcher_remote_timeout_s)
            )
    if settings.dispatcher_handler_plugins:
        with setting("SWITCHBOARD_DISPATCHER_HANDLER_PLUGINS"):
            registry.load_entry_points({"settings": settings})
    return registry


def llm_config(settings: Settings) -> LlmConfig:
    """The LLM handler's configuration; ConfigError naming the variable at fault."""
    with setting("SWITCHBOARD_LLM_BASE_URL"):
        primary = Provider(
            name="primary",
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key.get_secret_value(),
            model=settings.llm_model,
        )
    with setting("SWITCHBOARD_LLM_FALLBACKS"):
        fallbacks = parse_providers(settings.llm_fallbacks.get_secret_value() or "[]")
        if any(provider.name == primary.name for provider in fallbacks):
            raise ValueError(f"the name {primary.name!r} is the primary provider's")
    with setting("SWITCHBOARD_LLM_PRICES"):
        prices = parse_prices(settings.llm_prices or "{}")
    return LlmConfig(
        providers=(primary, *fallbacks),
        prices=prices,
        max_retries=settings.llm_max_retries,
        breaker_failures=settings.llm_breaker_failures,
        breaker_reset_s=settings.llm_breaker_reset_s,
        max_output_tokens=settings.llm_max_output_tokens,
    )


def llm_handler(settings: Settings) -> LlmHandler:
    return LlmHandler(llm_config(settings), count=ApproxTokenCounter().count)


async def dispatcher_service(
    settings: Settings,
    database: Database,
    bus: EventBus,
    counters: Cache,
    policy: Policy,
    context: ContextPort,
    resources: contextlib.AsyncExitStack,
    page_tokens: PageTokens,
    integration: IntegrationHub,
    metrics: Metrics | None = None,
) -> Dispatcher:
    """``integration``: the hub, for tools and for its breakers (an expert's circuit
    is one for runs and tools)."""
    breakers: CircuitBreakers = integration.breakers
    registry = handler_registry(settings)
    for handler in registry.all():
        if isinstance(handler, RemoteHandler):
            resources.push_async_callback(handler.close)
            await handler.refresh()
        elif isinstance(handler, LlmHandler):
            resources.push_async_callback(handler.aclose)
    with setting("SWITCHBOARD_DISPATCHER_ROUTES"):
        routes = Routes.parse(settings.dispatcher_routes)
    with setting("SWITCHBOARD_DISPATCHER_CONTENT_POLICY"):
        content = load_content_policy(
            settings.dispatcher_content_policy,
            settings.dispatcher_blocklist,
            settings.dispatcher_flag_injection,
        )
    default = settings.dispatcher_default_handler or (
        "llm" if registry.get("llm") is not None else "echo"
    )
    if registry.get(default) is None:
        raise ConfigError(f"SWITCHBOARD_DISPATCHER_DEFAULT_HANDLER: no handler {default!r}")
    routed = (*routes.prefixes.values(), *(h for _, h in routes.content_types))
    for handler_id in (*routed, *routes.workspaces.values()):
        if registry.get(handler_id) is None:
            raise ConfigError(f"SWITCHBOARD_DISPATCHER_ROUTES: no handler {handler_id!r}")
    experts = WorkspaceExperts(
        functools.partial(
            workspace_experts,
            database,
            SecretBox(settings.effective_secret_key()),
            limit=settings.integration_max_per_workspace,
        ),
        EgressPolicy.from_settings(settings),
        timeout_s=settings.dispatcher_remote_timeout_s,
        reserved=lambda handler_id: registry.get(handler_id) is not None,
        breakers=breakers,
    )
    # Closed after the dispatcher (the stack unwinds in reverse): runs stop first.
    resources.push_async_callback(experts.close)
    resources.callback(bus.listen(experts.on_event))
    router = Router(registry, routes, default, experts)

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
        AssistantStore(database),
        bus,
        page_tokens,
        AssistantLimits(
            max_per_workspace=settings.dispatcher_max_assistants_per_workspace,
            providers=(
                tuple(p.name for p in llm.config.providers) if isinstance(llm, LlmHandler) else ()
            ),
            max_output_tokens=settings.llm_max_output_tokens,
            max_tool_steps=settings.dispatcher_max_tool_steps,
        ),
        handler_exists=handler_exists,
        integration_exists=integration_exists,
    )
    await assistants.start()
    resources.push_async_callback(assistants.close)
    # Closed after the dispatcher: a call forwarded while runs stop still gets its answer.
    peers = GrpcPeers()
    resources.push_async_callback(peers.close)
    dispatcher = Dispatcher(
        RunStore(database),
        context,
        bus,
        counters,
        router,
        Scheduler(
            SchedulerLimits(
                max_running=settings.dispatcher_max_running,
                max_running_per_workspace=settings.dispatcher_max_running_per_workspace,
                max_queued=settings.dispatcher_max_queued,
                max_queued_per_workspace=settings.dispatcher_max_queued_per_workspace,
            )
        ),
        Feeds(
            retention_s=settings.dispatcher_run_retention_s,
            max_updates=settings.dispatcher_max_updates_per_run,
        ),
        policy,
        content,
        DispatcherLimits(
            instance_id=instance_id(settings),
            max_input_chars=settings.dispatcher_max_input_chars,
            messages_per_minute_per_user=settings.dispatcher_max_messages_per_minute_per_user,
            messages_per_minute_per_workspace=(
                settings.dispatcher_max_messages_per_minute_per_workspace
            ),
            default_timeout_s=settings.dispatcher_default_timeout_s,
            max_timeout_s=settings.dispatcher_max_timeout_s,
            heartbeat_s=settings.dispatcher_heartbeat_s,
            recovery=settings.dispatcher_recovery,
            lease_s=settings.dispatcher_lease_s,
        ),
        page_tokens,
        assistants=assistants,
        tools=LocalTools(integration, policy),
        tool_limits=ToolLimits(
            max_steps=settings.dispatcher_max_tool_steps,
            max_calls_per_step=settings.dispatcher_max_tool_calls_per_step,
            approval_timeout_s=settings.dispatcher_approval_timeout_s,
            max_result_chars=settings.dispatcher_max_tool_result_chars,
        ),
        peers=peers,
        metrics=metrics,
    )
    await dispatcher.start()
    resources.push_async_callback(dispatcher.close)
    return dispatcher


def integration_limits(settings: Settings, egress: EgressPolicy) -> IntegrationLimits:
    return IntegrationLimits(
        max_per_workspace=settings.integration_max_per_workspace,
        max_config_bytes=settings.integration_max_config_bytes,
        default_call_timeout_s=settings.integration_default_call_timeout_s,
        max_call_timeout_s=settings.integration_max_call_timeout_s,
        max_result_bytes=settings.integration_max_result_bytes,
        tool_calls_per_minute=settings.integration_tool_calls_per_minute,
        probe_interval_s=settings.integration_probe_interval_s,
        allow_plain_http=egress.allow_loopback or egress.allow_private,
        secret_overlap_s=settings.webhook_secret_overlap_s,
    )


async def integration_hub(
    settings: Settings,
    database: Database,
    bus: EventBus,
    counters: Cache,
    page_tokens: PageTokens,
    resources: contextlib.AsyncExitStack,
    metrics: Metrics | None = None,
) -> IntegrationHub:
    """The hub, with its breakers, sealed credentials and egress policy."""
    with setting("SWITCHBOARD_EGRESS_ALLOW_CIDRS"):
        egress = EgressPolicy.from_settings(settings)
    with setting("SWITCHBOARD_INTEGRATION_MCP_STDIO_SERVERS"):
        stdio = stdio_servers(settings)
    breakers = Breakers(
        settings.redis_url.get_secret_value(),
        failures=settings.integration_breaker_failures,
        reset_s=settings.integration_breaker_reset_s,
        timeout_s=settings.redis_timeout_s,
    )
    await breakers.start()
    resources.push_async_callback(breakers.close)
    hub: IntegrationHub | None = None

    def tools_changed(name: str) -> None:
        if hub is not None:
            hub.tools_changed(name)

    secrets = SecretBox(settings.effective_secret_key())
    hub = IntegrationHub(
        IntegrationStore(database),
        bus,
        counters,
        breakers,
        secrets,
        egress,
        page_tokens,
        integration_limits(settings, egress),
        connector_factory(settings, egress, stdio, tools_changed),
        stdio_servers=frozenset(stdio),
        reserved_handler_ids=reserved_handler_ids(settings),
        metrics=metrics,
    )
    await hub.start(probe="integration" in settings.services)
    resources.push_async_callback(hub.close)
    if "integration" in settings.services:
        # Deliveries run where the hub is served; every replica feeds and sends,
        # and the database decides which one does each (integration/webhooks.py).
        webhooks = WebhookEngine(
            database,
            bus,
            secrets,
            egress,
            breakers,
            WebhookLimits.from_settings(settings),
            instance_id=instance_id(settings),
            on_disable=hub.disable,
            page_tokens=page_tokens,
        )
        hub.webhooks = webhooks
        hub.webhook_health = webhooks.health
        await webhooks.start()
        resources.push_async_callback(webhooks.close)
    return hub


#: Longest advertised address (the lease's column).
MAX_ADVERTISE_CHARS = 300
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - compared, not bound


def advertise_address(settings: Settings, port: int) -> str:
    """Where other replicas reach this process: ``SWITCHBOARD_ADVERTISE_ADDRESS``, else
    the bound host and ``port``, or the host name when bound to every address."""
    address = settings.advertise_address
    if not address:
        host = settings.host
        address = format_address(socket.gethostname() if host in _ANY_ADDRESS else host, port)
    if len(address) > MAX_ADVERTISE_CHARS:
        raise ConfigError(
            f"SWITCHBOARD_ADVERTISE_ADDRESS: at most {MAX_ADVERTISE_CHARS} characters"
        )
    return address


def instance_id(settings: Settings) -> str:
    """This dispatcher replica's id: the configured one, else the host name."""
    return settings.instance_id or socket.gethostname()[:64]


def key_ring(settings: Settings) -> KeyRing:
    """The configured signing keys; in dev mode without any, a fresh ephemeral key."""
    if settings.signing_keys:
        try:
            return load_key_ring(settings.signing_keys)
        except ValueError as exc:
            raise ConfigError(f"SWITCHBOARD_SIGNING_KEYS: {exc}") from None
    if not settings.dev_mode:  # the settings validator already refuses this
        raise ConfigError("SWITCHBOARD_SIGNING_KEYS is required outside dev mode")
    log.warning(
        "DEV MODE: generated an ephemeral signing key; its tokens die with this process "
        "and other processes will not accept them. Set SWITCHBOARD_SIGNING_KEYS."
    )
    return KeyRing(SigningKey.generate("dev"))


async def open_deps(
    settings: Settings, resources: contextlib.AsyncExitStack, metrics: Metrics | None = None
) -> Deps:
    """Open every shared resource; each closes with ``resources``."""
    keys = key_ring(settings)
    oidc: OidcVerifier | None = None
    if settings.oidc_issuer:
        try:
            oidc = OidcVerifier.from_jwks_file(
                settings.oidc_issuer, settings.oidc_audience, settings.oidc_jwks_file
            )
        except ValueError as exc:
            raise ConfigError(f"SWITCHBOARD_OIDC_JWKS_FILE: {exc}") from None
    # Before anything touches the file: a second process on it is refused.
    resources.enter_context(lock_sqlite_file(settings.database_url.get_secret_value()))
    # PostgreSQL: processes with the embedded event log are refused beside any other.
    log_lock = EventLogLock(
        settings.database_url.get_secret_value(),
        embedded=not settings.redis_url.get_secret_value(),
        timeout_s=settings.database_timeout_s,
        # Taken by another process while ours was lost: stop as on SIGTERM.
        on_lost=lambda: signal.raise_signal(signal.SIGTERM),
        # A dispatcher replica owns its runs by instance id: one live process per id.
        instance=instance_id(settings) if "dispatcher" in settings.services else "",
    )
    resources.push_async_callback(log_lock.close)
    with database_setting():
        await log_lock.acquire()
        database = await open_database(
            settings.database_url.get_secret_value(),
            timeout_s=settings.database_timeout_s,
            migrate=settings.database_auto_migrate,
        )
    resources.push_async_callback(database.close)
    cache = Cache(
        settings.redis_url.get_secret_value(),
        timeout_s=settings.redis_timeout_s,
        lease_s=settings.redis_lease_s,
    )
    hasher = PasswordHasher(
        threads=settings.password_hash_threads, max_pending=settings.password_hash_max_pending
    )
    resources.callback(hasher.close)
    tokens = AccessTokens(
        keys,
        TokenPolicy(
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
            access_ttl_s=settings.access_token_ttl_s,
        ),
    )
    secrets = OpaqueSecrets(settings.effective_secret_key())
    page_tokens = PageTokens(settings.effective_secret_key())
    store = AuthStore(database)
    # Subscribes to revocations, so it must exist before the cache starts.
    authenticator = CredentialAuthenticator(
        tokens, store, secrets, cache, token_cache_size=settings.token_cache_size
    )
    await cache.start()
    resources.push_async_callback(cache.close)
    # Events written with their change, published whatever crashes (docs/decisions.md).
    outbox = Outbox(database)
    bus = EventBus(
        event_log(settings, database, outbox),
        memory=min(settings.events_memory, settings.events_retention),
        outbox=outbox,
        metrics=metrics,
    )
    # A revocation's event backs up its message (lost if the revoker died in between).
    bus.listen(authenticator.on_event)
    await bus.start()
    resources.push_async_callback(bus.close)
    accounts = Accounts(
        store=store,
        hasher=hasher,
        tokens=tokens,
        secrets=secrets,
        authenticator=authenticator,
        cache=cache,
        bus=bus,
        oidc=oidc,
        login_limits=LoginLimits(
            window_s=settings.login_window_s,
            max_failures_per_account=settings.login_max_failures_per_account,
            max_attempts_per_address=settings.login_max_attempts_per_address,
            max_failures_per_account_address=settings.login_max_failures_per_account_address,
        ),
        limits=AccountLimits(
            refresh_ttl_s=settings.refresh_token_ttl_s,
            max_sessions_per_user=settings.max_sessions_per_user,
            max_api_keys_per_user=settings.max_api_keys_per_user,
        ),
        page_tokens=page_tokens,
    )
    memberships = MembershipStore(database)
    context = context_service(settings, database, bus, cache, page_tokens)
    await context.start(maintain="context" in settings.services)
    resources.push_async_callback(context.close)
    policy = Policy(memberships)
    access = AccessWatch(
        bus.fanout,
        authenticator,
        memberships,
        reauthorize_s=settings.events_reauthorize_s,
        # Redis away: revocation messages and other processes' events may be missed.
        degraded=lambda: not cache.fresh() or bus.state != "ok",
    )
    authenticator.on_revocation(access.revoked)
    resources.push_async_callback(access.close)
    integration = await integration_hub(
        settings, database, bus, cache, page_tokens, resources, metrics
    )
    dispatcher: Dispatcher | None = None
    if "dispatcher" in settings.services:
        port: ContextPort = LocalContext(context)
        if settings.context_address:
            remote = RemoteContext(settings.context_address, tokens)
            resources.push_async_callback(remote.close)
            port = remote
        dispatcher = await dispatcher_service(
            settings,
            database,
            bus,
            cache,
            policy,
            port,
            resources,
            page_tokens,
            integration,
            metrics,
        )
    return Deps(
        settings=settings,
        database=database,
        cache=cache,
        bus=bus,
        keys=keys,
        accounts=accounts,
        authenticator=authenticator,
        memberships=memberships,
        policy=policy,
        access=access,
        context=context,
        page_tokens=page_tokens,
        integration=integration,
        dispatcher=dispatcher,
        metrics=metrics,
    )


def registration(name: str, deps: Deps) -> ServiceRegistration:
    """Build one service by its short name."""
    descriptor, preserialized, factory = SERVICES[name]
    return ServiceRegistration(descriptor, factory(deps), preserialized)


async def create_server(
    settings: Settings, *, tracing: Tracing | None = None
) -> tuple[SwitchboardServer, int]:
    """Open resources and build every configured service into one bound (not started) server.

    Tracing comes from the ``OTEL_*`` variables (``platform/telemetry.py``)
    unless ``tracing`` is given (tests hand in one with an in-memory exporter).
    """
    check_settings(settings)
    if tracing is None:
        tracing = Tracing.from_environ(service_name=default_service_name(settings.services))
    resources = contextlib.AsyncExitStack()
    if tracing is not None:
        # Closed last (the stack unwinds in reverse): what closing the rest
        # traces is still exported.
        resources.callback(tracing.shutdown)
    # Before anything opens: channels, HTTP clients and stores ask for it as they are built.
    resources.callback(install(tracing))
    try:
        # Recorded only where they are served: without the port nothing pays for them.
        metrics = Metrics(process=True) if settings.metrics_port is not None else None
        deps = await open_deps(settings, resources, metrics)
        registrations = [registration(name, deps) for name in settings.services]
        server = await build_server(
            settings,
            registrations,
            guard=Guard(deps.authenticator, deps.policy),
            resources=resources,
            deps=deps,
            tracing=tracing,
            metrics=metrics,
        )
        if deps.dispatcher is not None:
            # Known only now that the port is bound; stored before any call is taken.
            await deps.dispatcher.advertise(advertise_address(settings, server.port))
    except BaseException:
        await resources.aclose()
        raise
    # Requests answer UNAVAILABLE meanwhile; "" stays SERVING (docs/operations.md).
    server.report(DATABASE_HEALTH, deps.database.health.serving)
    deps.database.health.on_state_change(lambda serving: server.report(DATABASE_HEALTH, serving))
    if settings.redis_url.get_secret_value():
        # Redis away means degraded, not down: "" stays SERVING, this entry does not.
        server.report(REDIS_HEALTH, deps.bus.state == "ok")
        deps.bus.on_state_change(lambda state: server.report(REDIS_HEALTH, state == "ok"))
    if metrics is not None:
        observe(metrics, deps, server)
    return server, server.port


def observe(metrics: Metrics, deps: Deps, server: SwitchboardServer) -> None:
    """Read the process's current state at every scrape (docs/metrics.md)."""
    bus = deps.bus
    metrics.observe("switchboard_subscribers", lambda: [(("events",), bus.fanout.count)])
    metrics.observe(
        "switchboard_event_subscriber_backlog_events", lambda: [((), sum(bus.fanout.backlogs()))]
    )
    metrics.observe(
        "switchboard_event_subscriber_backlog_max_events",
        lambda: [((), max(bus.fanout.backlogs(), default=0))],
    )
    metrics.observe(
        "switchboard_event_log_degraded", lambda: [((), 0.0 if bus.state == "ok" else 1.0)]
    )
    metrics.observe(
        "switchboard_event_outbox_events",
        lambda: [
            (("memory",), bus.held),
            (("database",), len(bus.outbox.pending) if bus.outbox is not None else 0),
        ],
    )
    breakers = deps.integration.breakers
    metrics.observe(
        "switchboard_breakers",
        lambda: [((state,), count) for state, count in breakers.counts().items()],
    )
    metrics.observe(
        "switchboard_breaker_transitions_total",
        lambda: [((state,), count) for state, count in breakers.transitions.items()],
    )
    database = deps.database
    metrics.observe(
        "switchboard_db_pool_connections",
        lambda: [
            (("checked_out",), database.pool_status()[0]),
            (("idle",), database.pool_status()[1]),
        ],
    )
    metrics.observe(
        "switchboard_db_pool_max_connections", lambda: [((), database.pool_status()[2])]
    )

    def dependency(entry: str) -> str:
        return entry.removeprefix("switchboard.")

    metrics.observe(
        "switchboard_dependency_up",
        lambda: [
            ((dependency(entry),), 1.0 if serving else 0.0)
            for entry, serving in server.components.items()
        ],
    )
    metrics.observe(
        "switchboard_dependency_outages_total",
        lambda: [
            ((dependency(entry),), server.outages.get(entry, 0)) for entry in server.components
        ],
    )
    dispatcher = deps.dispatcher
    if dispatcher is not None:
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
