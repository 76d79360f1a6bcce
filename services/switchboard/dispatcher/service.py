"""The dispatcher: the composition of its stages, in the order a message travels.

    admission.py  ─► scheduler.py ─► execution.py ─► publishing.py
    (a request       (limits,        (one run's       (its updates to
     becomes a        fairness,       life through     watchers and to
     queued run)      one per conv.)  lifecycle.py)    the event log)
    recovery.py   leases, takeover, reaping: runs back into the scheduler
    queries.py    get, list, watch, describe (read only)
    control.py    cancel and tool approvals, here or forwarded to the owner
    steering.py   steers of a live run (SteerRun, policy STEER), taken at its
                  step boundaries (``steerbook.py``), here or on the owner
    live.py       what they share (``Common``): this process's live runs, the
                  store, the feeds, the bus, the router and the run limits
    streams.py    WatchRun and Converse, held to the caller's access
    talk/         voice sessions (Talk): turns in, transcripts and runs' updates out
    schedules/    schedules (the catalog) and their firing loop, which sends each
                  tick through ``send_message`` (built in ``build.py``)

``Dispatcher`` builds them once and is what the servicer, the A2A front door
(``a2a/ports.py``) and ``build.py`` call; it holds no logic of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.budgets.catalog import Budgets
from switchboard.dispatcher.budgets.quotas import Quotas
from switchboard.dispatcher.budgets.spending import Spending
from switchboard.dispatcher.budgets.usage import Usage
from switchboard.dispatcher.handlers.handed import Handed
from switchboard.dispatcher.handlers.router import Router
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.ports.peers import PeerPort, Via
from switchboard.dispatcher.runs.control import IN_PROCESS, Control
from switchboard.dispatcher.runs.execution import Execution
from switchboard.dispatcher.runs.intake.admission import Admission
from switchboard.dispatcher.runs.intake.content import ContentPolicy
from switchboard.dispatcher.runs.lifecycle import Active
from switchboard.dispatcher.runs.live import (
    FINISH_TIMEOUT_S,
    SEQUENCE_BLOCK,
    Common,
    Live,
    RunLimits,
)
from switchboard.dispatcher.runs.reading.feed import Feeds
from switchboard.dispatcher.runs.reading.publishing import Publishing
from switchboard.dispatcher.runs.reading.queries import Queries
from switchboard.dispatcher.runs.reading.streams import Streams
from switchboard.dispatcher.runs.recovery import Recovery
from switchboard.dispatcher.runs.scheduler import Scheduler
from switchboard.dispatcher.runs.steering.book import SteerBook
from switchboard.dispatcher.runs.steering.steer import Steering
from switchboard.dispatcher.runs.store import RunStore
from switchboard.dispatcher.schedules.catalog import Schedules
from switchboard.dispatcher.talk.session import TalkLimits, Talks
from switchboard.dispatcher.talk.store import VoiceStore
from switchboard.dispatcher.tools.port import ToolPort
from switchboard.dispatcher.tools.runner import ToolLimits
from switchboard.dispatcher.voice.speaker import Speech
from switchboard.platform.cache import Cache
from switchboard.platform.events.bus import EventBus
from switchboard.platform.observe.metrics import Metrics
from switchboard.platform.observe.telemetry import tracer
from switchboard.platform.resilience import background
from switchboard.platform.security.accesswatch import AccessWatch
from switchboard.platform.security.policy import Policy, Principal
from switchboard.platform.store import pagination

__all__ = ["SEQUENCE_BLOCK", "Dispatcher", "RunLimits"]

log = logging.getLogger("switchboard.dispatcher")


class Dispatcher:
    """Every part by keyword: the stages share ``Common``, built here once."""

    def __init__(
        self,
        *,
        store: RunStore,
        context: ContextPort,
        bus: EventBus,
        counters: Cache,
        router: Router,
        scheduler: Scheduler,
        feeds: Feeds,
        policy: Policy,
        access: AccessWatch,
        content: ContentPolicy,
        limits: RunLimits,
        page_tokens: pagination.PageTokens,
        assistants: Assistants,
        budgets: Budgets,
        usage: Usage,
        tools: ToolPort,
        tool_limits: ToolLimits,
        quotas: Quotas,
        peers: PeerPort | None = None,
        metrics: Metrics | None = None,
        spending: Spending | None = None,
        speech: Speech | None = None,
        voice_store: VoiceStore,
        talk_limits: TalkLimits | None = None,
        schedules: Schedules,
    ) -> None:
        self.assistants = assistants
        self.schedules = schedules
        #: The server's speech engine and its defaults (None: no speech configured).
        self.speech = speech
        self.budgets = budgets
        self.usage = usage
        self.quotas = quotas
        #: Budgets (None: none are enforced); its ``on_change`` is the budget catalog's hook.
        self.spending = spending
        self.tool_limits = tool_limits
        self.router = router
        self.scheduler = scheduler
        self.limits = limits
        self._store = store
        self._feeds = feeds
        self._live = Live()
        common = Common(
            live=self._live, store=store, feeds=feeds, bus=bus, router=router, limits=limits
        )
        # None when tracing is off: runs then get no span (decided once, here).
        run_tracer = tracer("switchboard.dispatcher")
        self._publishing = Publishing(common=common)
        self._steers = SteerBook(common=common, scheduler=scheduler, publishing=self._publishing)
        #: Recovered steers being stored as consumed (``_readmit``).
        self._completing: set[asyncio.Task[None]] = set()
        self._execution = Execution(
            common=common,
            publishing=self._publishing,
            scheduler=scheduler,
            context=context,
            policy=policy,
            tools=tools,
            tool_limits=tool_limits,
            metrics=metrics,
            tracer=run_tracer,
            spending=spending,
            speech=speech,
            steers=self._steers,
        )
        self._admission = Admission(
            common=common,
            context=context,
            counters=counters,
            scheduler=scheduler,
            content=content,
            assistants=assistants,
            publishing=self._publishing,
            start=self._execution.launch,
            cancel=self._execution.cancel,
            tracer=run_tracer,
            quotas=quotas,
            spending=spending,
            speech=speech,
        )
        self._recovery = Recovery(
            common=common,
            publishing=self._publishing,
            admit=self._readmit,
            metrics=metrics,
            release_holds=spending.ledger.release_runs if spending is not None else None,
            retire=self._execution.retire,
        )
        self._queries = Queries(
            common=common,
            context=context,
            assistants=assistants,
            page_tokens=page_tokens,
            tools=tools,
            tool_limits=tool_limits,
        )
        self._control = Control(
            common=common,
            scheduler=scheduler,
            execution=self._execution,
            publishing=self._publishing,
            peers=peers,
        )
        self._steering = Steering(
            common=common, book=self._steers, admission=self._admission, control=self._control
        )
        self._streams = Streams(actions=self, access=access, heartbeat_s=limits.heartbeat_s)
        self.talks = Talks(
            actions=self,
            assistants=assistants,
            context=context,
            store=voice_store,
            access=access,
            speech=lambda: self.speech,
            limits=talk_limits or TalkLimits(heartbeat_s=limits.heartbeat_s),
        )

    def _readmit(self, active: Active) -> None:
        if self._steers.relink(active):
            # Its target's journal already holds it (a crash came between): consumed.
            background.spawn(
                self._steers.complete(active),
                name="steer-complete",
                logger=log,
                keep=self._completing,
            )
            return
        self._admission.admit(active, force=True)

    # -- what tests and the build look at ------------------------------------------------

    @property
    def watchers(self) -> int:
        """Open WatchRun and Converse watches of this process's runs."""
        return self._queries.watchers

    def holds(self, name: str) -> bool:
        """Whether this process holds the run live (admitted, running or paused)."""
        return name in self._live.runs

    async def published(self) -> None:
        """Wait until every run's publisher has handed its events to the log."""
        await self._publishing.drain()

    # -- the process ------------------------------------------------------------------

    async def start(self) -> None:
        await self._recovery.start()

    async def close(self) -> None:
        """Stop every run this process owns; each ends by the recovery policy."""
        self._live.closing = True
        await self._recovery.stop()
        await self._execution.stop()
        await self._publishing.drain(timeout_s=FINISH_TIMEOUT_S)

    async def advertise(self, address: str) -> None:
        await self._recovery.advertise(address)

    async def recover(self) -> None:
        await self._recovery.recover()

    # -- the calls ----------------------------------------------------------------------

    async def send_message(
        self,
        principal: Principal,
        request: pb.SendMessageRequest,
        handed: Handed | None = None,
        *,
        via: Via = IN_PROCESS,
        schedule: str = "",
    ) -> pb.SendMessageResponse:
        """``handed``: a budget the caller handed over across a hop (``handlers/handed.py``);
        ``via``: how the call came (CONCURRENCY_POLICY_STEER may go to the target's owner);
        ``schedule``: the schedule whose tick sends it (``schedules/firing.py``)."""
        if request.concurrency_policy == pb.CONCURRENCY_POLICY_STEER:
            return await self._steering.send_message(
                principal,
                request,
                handed,
                via,
                self.scheduler.active_in(request.conversation),
                schedule=schedule,
            )
        return await self._admission.send_message(principal, request, handed, schedule=schedule)

    async def steer_run(
        self,
        principal: Principal,
        request: pb.SteerRunRequest,
        via: Via = IN_PROCESS,
        *,
        handed: Handed | None = None,
    ) -> pb.SteerRunResponse:
        """Steer a live run (``runs/steering.py``), here or on its owner."""
        return await self._steering.steer_run(principal, request, via, handed=handed)

    async def get_run(self, name: str) -> pb.Run:
        return await self._queries.get_run(name)

    async def list_runs(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
        return await self._queries.list_runs(request)

    async def list_handlers(self, request: pb.ListHandlersRequest) -> pb.ListHandlersResponse:
        return await self._queries.list_handlers(request)

    def watch(
        self, name: str, after_sequence: int, *, merge: bool = False
    ) -> AsyncIterator[pb.RunUpdate | None]:
        """The run's updates after ``after_sequence``; ``None`` for a heartbeat
        (``merge``: the deltas ready together as one, ``WatchRunRequest.merge_deltas``)."""
        return self._queries.watch(name, after_sequence, merge=merge)

    async def describe_conversation(
        self, principal: Principal, request: pb.DescribeConversationRequest
    ) -> pb.DescribeConversationResponse:
        return await self._queries.describe_conversation(principal, request)

    def watch_run(
        self, principal: Principal, name: str, after_sequence: int, *, merge: bool = False
    ) -> AsyncGenerator[pb.WatchRunResponse, None]:
        """WatchRun's frames, for as long as ``principal`` may read the run."""
        return self._streams.watch_run(principal, name, after_sequence, merge=merge)

    def converse(
        self, principal: Principal, requests: AsyncIterator[pb.ConverseRequest], via: Via
    ) -> AsyncGenerator[pb.ConverseResponse, None]:
        """Converse's frames for ``requests``, each action authorized as it arrives."""
        return self._streams.converse(principal, requests, via)

    def talk(
        self, principal: Principal, requests: AsyncIterator[pb.TalkRequest], via: Via
    ) -> AsyncGenerator[pb.TalkResponse, None]:
        """Talk's frames: a voice session on a conversation (``talk/session.py``)."""
        return self.talks.talk(principal, requests, via)

    async def submit_tool_approvals(
        self, principal: Principal, request: pb.SubmitToolApprovalsRequest, via: Via = IN_PROCESS
    ) -> pb.Run:
        return await self._control.submit_tool_approvals(principal, request, via)

    async def cancel_run(
        self,
        principal: Principal,
        name: str,
        reason: str,
        via: Via = IN_PROCESS,
        *,
        heard_through_sequence: int = 0,
    ) -> pb.Run:
        """``heard_through_sequence``: a speaking run's last speech update heard (0: all)."""
        return await self._control.cancel_run(
            principal, name, reason, via, heard_through_sequence=heard_through_sequence
        )

    async def resolve_budget_action(
        self, principal: Principal, request: pb.ResolveBudgetActionRequest, via: Via = IN_PROCESS
    ) -> pb.Run:
        return await self._control.resolve_budget_action(principal, request, via)

    def budgets_changed(self, workspace_id: str) -> None:
        """A budget of ``workspace_id`` changed: runs paused at a cap look again
        (the budget catalog's ``on_change``)."""
        if self.spending is not None:
            self.spending.on_change(workspace_id)
