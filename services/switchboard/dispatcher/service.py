"""The dispatcher: the composition of its stages, in the order a message travels.

    intake/admission.py ─► core/scheduler.py ─► execution/     ─► core/publishing.py
    (a request             (limits,             (one run's         (its updates to
     becomes a              fairness,            life through       watchers and to
     queued run)            one per conv.)       its states)        the event log)
    recovery.py          leases, takeover, reaping: runs back into the scheduler
    reading/queries.py   get, list, watch, describe (read only)
    control.py           cancel and tool approvals, here or forwarded to the owner
    steering.py          steers of a live run (SteerRun, policy STEER), taken at its
                         step boundaries (``core/steers.py``), here or on the owner
    core/active/         a live run and its states (``lifecycle.py``); what they share
                         (``Common``, ``live.py``): this process's live runs, the store,
                         the feeds, the bus, the router and the run limits
    reading/streams.py   WatchRun and Converse, held to the caller's access
    talk/                voice sessions (Talk): turns in, transcripts and runs' updates out
    schedules/           schedules (the catalog) and their firing loop, which sends each
                         tick through ``send_message`` (built in ``build.py``)

(the run pipeline's modules are under ``runs/``.)

``build.py`` builds and wires them once (``Stages``, beside the workspace's
``Catalogs``); ``Dispatcher`` is what the servicer, the A2A front door
(``a2a/ports.py``) and ``build.py`` call, and holds no logic of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.budgets.quotas import Quotas
from switchboard.dispatcher.budgets.resources.catalog import Budgets
from switchboard.dispatcher.budgets.spending import Spending
from switchboard.dispatcher.budgets.usage import Usage
from switchboard.dispatcher.handlers.handed import Handed
from switchboard.dispatcher.ports.peers import Via
from switchboard.dispatcher.runs.control import IN_PROCESS, Control
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import (
    FINISH_TIMEOUT_S,
    SEQUENCE_BLOCK,
    Common,
    RunLimits,
)
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.scheduler import Scheduler
from switchboard.dispatcher.runs.core.steers import SteerBook
from switchboard.dispatcher.runs.delegation.delegation import Delegation
from switchboard.dispatcher.runs.delegation.limits import Parent
from switchboard.dispatcher.runs.execution.execution import Execution
from switchboard.dispatcher.runs.intake.admission import Admission
from switchboard.dispatcher.runs.reading.queries import Queries
from switchboard.dispatcher.runs.reading.streams import Streams
from switchboard.dispatcher.runs.recovery import Recovery
from switchboard.dispatcher.runs.steering import Steering
from switchboard.dispatcher.schedules.catalog import Schedules
from switchboard.dispatcher.talk.phone.book import CallBook
from switchboard.dispatcher.talk.session import Talks
from switchboard.dispatcher.talk.webrtc.peers import Peers
from switchboard.platform import background
from switchboard.platform.security.policy import Principal

__all__ = ["SEQUENCE_BLOCK", "Dispatcher", "RunLimits"]

log = logging.getLogger("switchboard.dispatcher")


@dataclass(frozen=True)
class Stages:
    """The run pipeline's stages, built and wired once by ``build.py``, and what they share."""

    #: This process's live runs, the store, the feeds, the bus, the router and the limits.
    common: Common
    scheduler: Scheduler
    publishing: Publishing
    steers: SteerBook
    execution: Execution
    admission: Admission
    recovery: Recovery
    queries: Queries
    control: Control
    steering: Steering
    #: WatchRun's and Converse's streams, given the calls they act through: the dispatcher's.
    streams: Callable[[Dispatcher], Streams]
    #: Talk's voice sessions, likewise.
    talks: Callable[[Dispatcher], Talks]
    #: ConnectTalk's WebRTC peers, each carrying one of those sessions.
    peers: Callable[[Talks], Peers]
    #: Budgets (None: none are enforced); its ``on_change`` is the budget catalog's hook.
    spending: Spending | None = None
    #: Delegate runs (``runs/delegation/``), which call back into the dispatcher.
    delegation: Delegation | None = None


@dataclass(frozen=True)
class Catalogs:
    """What a workspace configures, which the servicer reaches through the dispatcher."""

    assistants: Assistants
    schedules: Schedules
    budgets: Budgets
    usage: Usage
    quotas: Quotas
    #: Phone calls' records (``talk/phone/``); SIP places and carries them.
    calls: CallBook


class Readmission:
    """How a recovered run goes back into admission (``Recovery``'s ``admit``)."""

    def __init__(self, steers: SteerBook, admission: Admission) -> None:
        self._steers = steers
        self._admission = admission
        #: Recovered steers being stored as consumed.
        self._completing: set[asyncio.Task[None]] = set()

    def __call__(self, active: Active) -> None:
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


class Dispatcher:
    """The dispatcher's calls, each handed to the stage that answers it."""

    def __init__(self, stages: Stages, catalogs: Catalogs) -> None:
        self._stages = stages
        self.assistants = catalogs.assistants
        self.schedules = catalogs.schedules
        self.budgets = catalogs.budgets
        self.usage = catalogs.usage
        self.quotas = catalogs.quotas
        self.calls = catalogs.calls
        self.spending = stages.spending
        self.router = stages.common.router
        self.scheduler = stages.scheduler
        self._store = stages.common.store
        self._feeds = stages.common.feeds
        self._live = stages.common.live
        self._streams = stages.streams(self)
        #: Tools a conversation's holder adds to its runs (a phone call's: ``talk/sip``).
        self.conversation_tools = stages.execution.conversation_tools
        self.talks = stages.talks(self)
        self.peers = stages.peers(self.talks)
        if stages.delegation is not None:
            # A delegate's child run is a message like any other: sent, watched and
            # cancelled through these calls.
            stages.delegation.calls = self

    # -- what tests and the build look at ------------------------------------------------

    @property
    def watchers(self) -> int:
        """Open WatchRun and Converse watches of this process's runs."""
        return self._stages.queries.watchers

    def holds(self, name: str) -> bool:
        """Whether this process holds the run live (admitted, running or paused)."""
        return name in self._live.runs

    async def published(self) -> None:
        """Wait until every run's publisher has handed its events to the log."""
        await self._stages.publishing.drain()

    # -- the process ------------------------------------------------------------------

    async def start(self) -> None:
        await self._stages.recovery.start()

    async def close(self) -> None:
        """Stop every run this process owns; each ends by the recovery policy."""
        self._live.closing = True
        # Peers first: their sessions end as dropped streams do, resumable elsewhere.
        await self.peers.close()
        await self._stages.recovery.stop()
        await self._stages.execution.stop()
        await self._stages.publishing.drain(timeout_s=FINISH_TIMEOUT_S)

    async def advertise(self, address: str) -> None:
        await self._stages.recovery.advertise(address)

    async def recover(self) -> None:
        await self._stages.recovery.recover()

    # -- the calls ----------------------------------------------------------------------

    async def send_message(
        self,
        principal: Principal,
        request: pb.SendMessageRequest,
        handed: Handed | None = None,
        *,
        via: Via = IN_PROCESS,
        schedule: str = "",
        parent: Parent | None = None,
    ) -> pb.SendMessageResponse:
        """``handed``: a budget the caller handed over across a hop (``handlers/handed.py``);
        ``via``: how the call came (CONCURRENCY_POLICY_STEER may go to the target's owner);
        ``schedule``: the schedule whose tick sends it (``schedules/firing.py``);
        ``parent``: the run whose delegate call sends it (``runs/delegation/``)."""
        if request.concurrency_policy == pb.CONCURRENCY_POLICY_STEER:
            return await self._stages.steering.send_message(
                principal,
                request,
                handed,
                via,
                self.scheduler.active_in(request.conversation),
                schedule=schedule,
            )
        return await self._stages.admission.send_message(
            principal, request, handed, schedule=schedule, parent=parent
        )

    async def regenerate(
        self, principal: Principal, request: pb.RegenerateMessageRequest
    ) -> pb.RegenerateMessageResponse:
        """A new run answering again on a new branch (``runs/intake/admission.py``)."""
        return await self._stages.admission.regenerate(principal, request)

    async def steer_run(
        self,
        principal: Principal,
        request: pb.SteerRunRequest,
        via: Via = IN_PROCESS,
        *,
        handed: Handed | None = None,
    ) -> pb.SteerRunResponse:
        """Steer a live run (``runs/steering.py``), here or on its owner."""
        return await self._stages.steering.steer_run(principal, request, via, handed=handed)

    async def get_run(self, name: str, *, children: bool = False) -> pb.Run:
        """``children``: with ``Run.children`` (GetRun's view; one more read)."""
        return await self._stages.queries.get_run(name, children=children)

    async def list_runs(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
        return await self._stages.queries.list_runs(request)

    async def list_handlers(self, request: pb.ListHandlersRequest) -> pb.ListHandlersResponse:
        return await self._stages.queries.list_handlers(request)

    def watch(
        self, name: str, after_sequence: int, *, merge: bool = False
    ) -> AsyncIterator[pb.RunUpdate | None]:
        """The run's updates after ``after_sequence``; ``None`` for a heartbeat
        (``merge``: the deltas ready together as one, ``WatchRunRequest.merge_deltas``)."""
        return self._stages.queries.watch(name, after_sequence, merge=merge)

    async def describe_conversation(
        self, principal: Principal, request: pb.DescribeConversationRequest
    ) -> pb.DescribeConversationResponse:
        return await self._stages.queries.describe_conversation(principal, request)

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

    async def connect_talk(
        self, principal: Principal, request: pb.ConnectTalkRequest, via: Via
    ) -> pb.ConnectTalkResponse:
        """ConnectTalk: a browser's WebRTC peer for a Talk session (``talk/webrtc/``)."""
        return await self.peers.connect(principal, request, via)

    def get_ice_servers(self, principal: Principal) -> pb.GetIceServersResponse:
        """GetIceServers: the STUN and TURN servers for the caller's page (``webrtc/ice.py``)."""
        return self.peers.ice_servers(principal)

    async def submit_tool_approvals(
        self, principal: Principal, request: pb.SubmitToolApprovalsRequest, via: Via = IN_PROCESS
    ) -> pb.Run:
        return await self._stages.control.submit_tool_approvals(principal, request, via)

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
        return await self._stages.control.cancel_run(
            principal, name, reason, via, heard_through_sequence=heard_through_sequence
        )

    async def resolve_budget_action(
        self, principal: Principal, request: pb.ResolveBudgetActionRequest, via: Via = IN_PROCESS
    ) -> pb.Run:
        return await self._stages.control.resolve_budget_action(principal, request, via)

    def budgets_changed(self, workspace_id: str) -> None:
        """A budget of ``workspace_id`` changed: runs paused at a cap look again
        (the budget catalog's ``on_change``)."""
        if self.spending is not None:
            self.spending.on_change(workspace_id)
