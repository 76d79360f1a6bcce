"""The dispatcher's domain: runs from a sent message to a terminal state.

``send_message`` filters the message (size, rate limits, content policy),
routes it, stores it through the context service's contract, persists a
QUEUED run and hands it to the scheduler; it returns without waiting for the
handler. When the scheduler starts the run, one asyncio task fetches the
context window, drives the handler and records every frame as a numbered
``RunUpdate`` in the run's feed (for WatchRun and Converse) and as a
RUN_UPDATED event. The answer is stored as an assistant message.

Cancellation is the task's: ``cancel_run`` cancels the task, which raises
``CancelledError`` inside the handler (a remote handler's gRPC call or the
LLM's HTTP response is closed by that), and the run ends CANCELLED. The
deadline is an ``asyncio.timeout`` around the same task, and remote handlers
get the remaining time as their gRPC deadline.

Runs are persisted when they are queued, start and end (not for each delta:
the feed and the event log carry those). A run's end is announced only once
it is stored (a save that fails is retried until the database answers), so
the store never says RUNNING while the events say it ended. A restarted
dispatcher takes its runs back (``recover``), and so does any other replica
once the owner's lease has expired (it died and did not come back): queued
ones are queued again; running ones fail with RUN_INTERRUPTED or are queued
again, by ``SWITCHBOARD_DISPATCHER_RECOVERY``. Cancels and tool approvals for a
run another replica owns are forwarded to it (``_owner``, ``peerport.py``).

Sequences: each attempt at a run numbers its updates in its own block of
``SEQUENCE_BLOCK``, and a recovered run continues in the block after the one
stored. Its previous owner may have shown or published any number of updates
the store never saw (deltas are not stored), and none of those can be
reached from the stored block: a watcher never sees a sequence twice, and its
closing update is always newer than anything it saw.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from google.protobuf import struct_pb2
from google.rpc import status_pb2
from opentelemetry.trace import StatusCode, Tracer

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.assistants import Assistants
from switchboard.dispatcher.content import ContentPolicy
from switchboard.dispatcher.contextport import ContextPort
from switchboard.dispatcher.feed import Feeds
from switchboard.dispatcher.handlers import HandleCall, Handler, HandlerFailure, text_of
from switchboard.dispatcher.lifecycle import Active
from switchboard.dispatcher.llm import LlmHandler
from switchboard.dispatcher.peerport import PeerPort, Via
from switchboard.dispatcher.router import Choice, Router
from switchboard.dispatcher.scheduler import Scheduler, Ticket
from switchboard.dispatcher.store import TERMINAL, NewRun, RunStore, Stored, raise_busy
from switchboard.dispatcher.toolport import ToolPort
from switchboard.dispatcher.toolrunner import RunTools, ToolLimits, offered_tools
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform import names, pagination, timefields
from switchboard.platform.bus import EventBus
from switchboard.platform.cache import Cache
from switchboard.platform.db import DatabaseUnavailable, is_outage, log_failure
from switchboard.platform.errors import (
    Conflict,
    ContentBlocked,
    DeadlineExceeded,
    DependencyUnavailable,
    FailedPrecondition,
    FieldViolation,
    HandlerFailed,
    InternalError,
    InvalidArgument,
    RateLimited,
    RequestTooLarge,
    RunCancelled,
    RunInterrupted,
    RunSuperseded,
    SwitchboardError,
    Violations,
)
from switchboard.platform.eventlog import Backoff
from switchboard.platform.metrics import WORKSPACE_HANDLER, Metrics, run_state_label
from switchboard.platform.outbox import Staged
from switchboard.platform.policy import AuthMethod, Permission, Policy, Principal, Scope
from switchboard.platform.status import to_status_proto
from switchboard.platform.storage import idempotency
from switchboard.platform.telemetry import current_ids, parent_from, traceparent, tracer

log = logging.getLogger("switchboard.dispatcher")

_CONVERSATION = names.CONVERSATION
_RUN = names.RUN
_WORKSPACE = names.WORKSPACE
_HANDLER = re.compile(rf"(handlers/)?{names.CLIENT_ID.pattern}")
_REQUEST_ID = names.REQUEST_ID
_POLICIES: Final = frozenset(pb.ConcurrencyPolicy.values())
#: Parameters of one run, serialized.
_MAX_PARAMETER_BYTES: Final = 16 * 1024
_MAX_REASON_CHARS: Final = 500
#: Decisions in one SubmitToolApprovals.
_MAX_APPROVALS: Final = 128
_DECISIONS: Final = frozenset({pb.TOOL_APPROVAL_DECISION_APPROVE, pb.TOOL_APPROVAL_DECISION_DENY})
#: Largest delta made of merged ones (a bigger one goes out as it is).
_MAX_MERGED_DELTA_CHARS: Final = 16 * 1024
#: Most run updates stored in one event log call (one pipeline on Redis).
_PUBLISH_BATCH: Final = 256
#: Bound on one bookkeeping call (storing a message, the final save of a run).
_FINISH_TIMEOUT_S: Final = 10.0
#: Sequences of one attempt at a run (see the module docstring).
SEQUENCE_BLOCK: Final = 2**32
#: Updates one attempt may publish; the rest of its block is room for its end.
_MAX_UPDATES: Final = SEQUENCE_BLOCK - 64


#: A call made in this process (no client credential): never forwarded.
_IN_PROCESS: Final = Via()


@dataclass(frozen=True)
class _Peer:
    """The replica that owns a run, and the port that reaches it."""

    peers: PeerPort
    address: str


@dataclass(frozen=True)
class Limits:
    instance_id: str
    max_input_chars: int
    messages_per_minute_per_user: int
    messages_per_minute_per_workspace: int
    default_timeout_s: float
    max_timeout_s: float
    heartbeat_s: float
    recovery: Literal["fail", "requeue"]
    #: How long this instance's runs are left alone after it stops renewing its lease.
    lease_s: float = 30.0


_match = names.match


def _error_status(error: SwitchboardError) -> status_pb2.Status:
    return to_status_proto(error, "")


def _new_job(
    principal: Principal,
    message: cpb.Message,
    params: struct_pb2.Struct,
    timeout: float,
    assistant: pb.Assistant | None,
) -> job_pb2.RunJob:
    job = job_pb2.RunJob(
        user_id=principal.user_id,
        auth_method=principal.auth_method.value,
        scopes=sorted(s.value for s in principal.scopes),
        session_id=principal.session_id,
        api_key_id=principal.api_key_id,
        timeout_seconds=timeout,
    )
    job.message.CopyFrom(message)
    job.parameters.CopyFrom(params)
    if assistant is not None:
        job.assistant.CopyFrom(assistant)
    return job


def _read_job(data: bytes) -> tuple[Principal, job_pb2.RunJob]:
    """The stored job, and the principal the run acts for."""
    job = _legacy_job(data) if data[:1] == b"{" else job_pb2.RunJob.FromString(data)
    principal = Principal(
        user_id=job.user_id,
        auth_method=AuthMethod(job.auth_method),
        scopes=frozenset(Scope(s) for s in job.scopes),
        session_id=job.session_id,
        api_key_id=job.api_key_id,
    )
    return principal, job


def _carry_trace(tracer: Tracer | None, run: pb.Run, job: job_pb2.RunJob) -> None:
    """The run carries the current call's trace; its execution continues it from
    the job, in whichever process runs it (``Dispatcher._execute_traced``)."""
    if tracer is None:  # tracing is off
        return
    ids = current_ids()
    if ids is not None:
        run.trace_id = ids[0]
        job.traceparent = traceparent()


def _legacy_job(data: bytes) -> job_pb2.RunJob:
    """A job stored before runs had tools (JSON with base64 inside): runs queued
    or running across the upgrade still recover."""
    raw = json.loads(data)
    job = job_pb2.RunJob(
        user_id=raw["user"],
        auth_method=raw["method"],
        scopes=raw["scopes"],
        session_id=raw["session"] or "",
        api_key_id=raw["api_key"] or "",
        timeout_seconds=float(raw["timeout_s"]),
    )
    job.message.ParseFromString(base64.b64decode(raw["message"]))
    job.parameters.ParseFromString(base64.b64decode(raw["parameters"]))
    return job


class Dispatcher:
    def __init__(
        self,
        store: RunStore,
        context: ContextPort,
        bus: EventBus,
        counters: Cache,
        router: Router,
        scheduler: Scheduler,
        feeds: Feeds,
        policy: Policy,
        content: ContentPolicy,
        limits: Limits,
        page_tokens: pagination.PageTokens,
        *,
        assistants: Assistants,
        tools: ToolPort,
        tool_limits: ToolLimits,
        peers: PeerPort | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.assistants = assistants
        #: Runs' metrics (platform/metrics.py); None: not recorded.
        self._metrics = metrics
        #: Open WatchRun and Converse watches of this process's runs.
        self.watchers = 0
        # The other replicas, for calls on runs they own (None: this one's runs only).
        self._peers = peers
        # Where other replicas reach this one (its lease says so); "" until known.
        self._address = ""
        self._tools = tools
        self.tool_limits = tool_limits
        self._store = store
        self._pages = page_tokens
        self._context = context
        self._bus = bus
        self._counters = counters
        self.router = router
        self.scheduler = scheduler
        self._feeds = feeds
        self._policy = policy
        self._content = content
        self.limits = limits
        self._active: dict[str, Active] = {}
        self._publishers: set[asyncio.Task[None]] = set()
        self._closing = False
        self._leasing: asyncio.Task[None] | None = None
        # Since when every lease renewal succeeded (None: the last one failed).
        self._leased_since: float | None = None
        # Runs taken over or found at start that the database refused to recover yet.
        self._unrecovered: list[tuple[Stored, str]] = []
        # None when tracing is off: runs then get no span (decided once, here).
        self._tracer = tracer("switchboard.dispatcher")

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        await self._renew_lease()
        await self.recover()
        self._leasing = asyncio.create_task(self._lease_loop(), name="dispatcher-lease")

    async def close(self) -> None:
        """Stop every run this process owns; each ends by the recovery policy."""
        self._closing = True
        if self._leasing is not None:
            self._leasing.cancel()
            await asyncio.wait([self._leasing], timeout=_FINISH_TIMEOUT_S)
        tasks = []
        for active in list(self._active.values()):
            if active.task is not None:
                active.task.cancel()
                tasks.append(active.task)
        if tasks:
            await asyncio.wait(tasks, timeout=_FINISH_TIMEOUT_S)
        if self._publishers:
            await asyncio.wait(set(self._publishers), timeout=_FINISH_TIMEOUT_S)

    async def advertise(self, address: str) -> None:
        """Other replicas reach this one at ``address`` (``host:port``) from now on.

        Known once the server is bound, after ``start``: stored in the lease at
        once, so a run this replica recovered at start is reachable before the
        server takes calls.
        """
        self._address = address
        await self._renew_lease()

    async def _renew_lease(self) -> None:
        until = names.now() + dt.timedelta(seconds=self.limits.lease_s)
        await self._store.renew_lease(self.limits.instance_id, until, self._address)
        if self._leased_since is None:
            self._leased_since = time.monotonic()

    async def _lease_loop(self) -> None:
        """Renew this instance's lease; take over the runs of instances whose lease expired."""
        while True:
            await asyncio.sleep(self.limits.lease_s / 3)  # a periodic job, not synchronization
            try:
                await self._renew_lease()
                if self._unrecovered:
                    retry, self._unrecovered = self._unrecovered, []
                    for item, why in retry:
                        await self._recover([item], why)
                # Only after a whole lease of renewals: when the database comes
                # back from an outage, every live instance gets its turn to
                # renew before anyone is judged dead.
                leased_since = self._leased_since
                if leased_since is not None and (
                    time.monotonic() - leased_since >= self.limits.lease_s
                ):
                    await self._reap()
            except asyncio.CancelledError:
                raise
            except SwitchboardError:
                self._leased_since = None
                log.warning("dispatcher lease not renewed; retrying")
            except Exception as exc:  # noqa: BLE001 - logged by log_failure
                self._leased_since = None
                log_failure(log, "dispatcher lease loop failed; retrying", exc)

    async def _reap(self) -> None:
        for dead in await self._store.expired_owners(self.limits.instance_id):
            taken = await self._store.take_over(dead, self.limits.instance_id)
            if taken:
                log.warning(
                    "runs taken over from an instance whose lease expired",
                    extra={"instance": dead, "count": len(taken)},
                )
                await self._recover(taken, f"dispatcher {dead} stopped")

    async def recover(self) -> None:
        """Take back the active runs this instance owned before it stopped."""
        stored = await self._store.owned_active(self.limits.instance_id)
        await self._recover(stored, "the dispatcher restarted")

    async def _recover(self, stored: Sequence[Stored], why: str) -> None:
        """Apply the recovery policy to ``stored`` (runs this instance now owns);
        a run the database refuses now is tried again by the lease loop."""
        for item in stored:
            try:
                await self._recover_one(item, why)
            except SwitchboardError:
                log.warning("run not recovered yet; retrying", extra={"run": item.run.name})
                self._unrecovered.append((item, why))
        if stored:
            log.info("runs recovered", extra={"count": len(stored)})

    async def _recover_one(self, item: Stored, why: str) -> None:
        if item.run.name in self._active:
            return
        run = pb.Run()
        run.CopyFrom(item.run)  # a refused attempt is retried from what is stored
        # A new attempt, numbered after anything the last one may have shown.
        run.last_sequence = next_block(run.last_sequence)
        item = Stored(run, item.job, item.workspace_id, item.conversation_id)
        if run.state == pb.RUN_STATE_RUNNING and self.limits.recovery == "fail":
            await self._end_unstarted(item, RunInterrupted(f"{why} while the run was running"))
            log.warning(
                "run failed in recovery",
                extra={"run": run.name, "handler": run.handler, "why": why, "policy": "fail"},
            )
            return
        principal, job = _read_job(item.job)
        handler = await self.router.find(item.workspace_id, run.handler.removeprefix("handlers/"))
        if handler is None:
            await self._end_unstarted(
                item, HandlerFailed(f"handler {run.handler} is no longer configured")
            )
            log.warning(
                "run failed in recovery",
                extra={"run": run.name, "handler": run.handler, "why": "handler gone"},
            )
            return
        run_id = run.name.rsplit("/", 1)[-1]
        # A paused run resumes whatever the policy: waiting for a person is a
        # state it was meant to be stored in, and its steps are in its job.
        requeued = run.state in (pb.RUN_STATE_RUNNING, pb.RUN_STATE_REQUIRES_ACTION)
        if requeued:
            _queued_again(run)
            run.last_sequence += 1  # its QUEUED update opens the new block
        # The new block is stored before this attempt shows anything.
        if not await self._store.save(run_id, run, owner=self.limits.instance_id):
            return  # purged, or taken by another instance meanwhile
        feed = self._feeds.open(run.name, first=run.last_sequence + (0 if requeued else 1))
        active = Active(
            run=run,
            run_id=run_id,
            workspace_id=item.workspace_id,
            conversation_id=item.conversation_id,
            principal=principal,
            handler=handler,
            job=job,
            feed=feed,
        )
        if requeued:
            self._state_changed(active)  # the QUEUED update, at run.last_sequence
        self._active[run.name] = active
        log.info(
            "run recovered",
            extra={
                "run": run.name,
                "handler": run.handler,
                "why": why,
                "state": pb.RunState.Name(item.run.state),
                "action": "requeued" if requeued else "queued",
            },
        )
        self._admit(active, force=True)

    async def _end_unstarted(self, item: Stored, error: SwitchboardError) -> None:
        run = item.run
        run.state = pb.RUN_STATE_FAILED
        run.error.CopyFrom(_error_status(error))
        run.end_time.FromDatetime(names.now())
        run.last_sequence += 1
        event = self._event(item.workspace_id, item.conversation_id, _snapshot(run))
        staged: Staged[bool] = Staged(self._bus.outbox, lambda saved: [event] if saved else [])
        run_id = run.name.rsplit("/", 1)[-1]
        await self._store.save(run_id, run, owner=self.limits.instance_id, staged=staged)
        await self._bus.publish_staged(staged.events)
        if self._metrics is not None:
            handler_id = run.handler.removeprefix("handlers/")
            label = handler_id if self.router.registry.get(handler_id) else WORKSPACE_HANDLER
            self._metrics.run_ended(label, run_state_label(pb.RunState.Name(run.state)), None)

    # -- sending --------------------------------------------------------------------

    async def send_message(
        self, principal: Principal, request: pb.SendMessageRequest
    ) -> pb.SendMessageResponse:
        found = _match(_CONVERSATION, request.conversation, "conversation")
        workspace_id, conversation_id = found[1], found[2]
        timeout = self._validate(request)
        flags = await self._screen(principal, request, workspace_id)
        assistant, choice = await self._choose(workspace_id, request)
        policy = request.concurrency_policy or pb.CONCURRENCY_POLICY_ENQUEUE
        key = idempotency(principal.user_id, "SendMessage", request)
        if key is not None:
            earlier = await self._store.replayed(key)
            if earlier is not None:
                return await self._replay(principal, request, earlier)
        if policy == pb.CONCURRENCY_POLICY_REJECT and self.scheduler.active_in(
            request.conversation
        ):
            raise_busy()
        # Refused before anything is stored; admission itself then cannot fail.
        self.scheduler.check_room(workspace_id)

        stored_message = await self._context.append_message(
            principal,
            self._append_request(principal, request),
            timeout_s=_FINISH_TIMEOUT_S,
        )
        run_id = names.new_id()
        name = f"{request.conversation}/runs/{run_id}"
        run = pb.Run(
            name=name,
            state=pb.RUN_STATE_QUEUED,
            handler=f"handlers/{choice.handler.capabilities.id}",
            input_message=stored_message.name,
            creator=principal.user_name,
            routing_reason=choice.reason,
            concurrency_policy=policy,
            flags=flags,
            last_sequence=1,
            assistant=assistant.name if assistant is not None else "",
        )
        run.create_time.FromDatetime(names.now())
        params = struct_pb2.Struct()
        if request.HasField("parameters"):
            params.CopyFrom(request.parameters)
        if choice.strip_prefix:
            stored_for_handler = cpb.Message()
            stored_for_handler.CopyFrom(stored_message)
            _strip_prefix(stored_for_handler, choice.strip_prefix)
        else:
            stored_for_handler = stored_message
        job = _new_job(principal, stored_for_handler, params, timeout, assistant)
        _carry_trace(self._tracer, run, job)
        created, replayed = await self._store.create(
            NewRun(
                run_id=run_id,
                workspace_id=workspace_id,
                conversation_id=conversation_id,
                creator=principal.user_id,
                worker=self.limits.instance_id,
                run=run,
                job=job.SerializeToString(),
                idempotency=key,
                reject_if_active=policy == pb.CONCURRENCY_POLICY_REJECT,
            )
        )
        if replayed:
            return await self._replay(principal, request, created)
        if policy == pb.CONCURRENCY_POLICY_INTERRUPT:
            for earlier_name in self.scheduler.active_in(request.conversation):
                earlier_active = self._active.get(earlier_name)
                if earlier_active is not None:
                    await self._cancel(
                        earlier_active,
                        RunSuperseded(f"a newer message started {name}"),
                    )
        feed = self._feeds.open(name)
        active = Active(
            run=run,
            run_id=run_id,
            workspace_id=workspace_id,
            conversation_id=conversation_id,
            principal=principal,
            handler=choice.handler,
            job=job,
            feed=feed,
        )
        self._active[name] = active
        # QUEUED goes out with RUNNING if the run starts now (see ``_begin``).
        active.held = True
        self._state_changed(active)
        response = pb.SendMessageResponse(message=stored_message)
        response.run.CopyFrom(run)
        # Admitted before anything else is awaited: a stored run is never left
        # unscheduled by a caller that goes away.
        self._admit(active, force=True)
        if active.task is None:  # it waits its turn: say so now
            self._release(active)
        if flags:
            await self._filtered(
                principal, request.conversation, "content", "", flags=flags, run=name
            )
        return response

    async def _choose(
        self, workspace_id: str, request: pb.SendMessageRequest
    ) -> tuple[pb.Assistant | None, Choice]:
        """The message's assistant (if any) and the handler that answers it."""
        assistant = await self._assistant_for(workspace_id, request.assistant, request.handler)
        forced = request.handler
        if assistant is not None:
            forced = assistant.handler or "handlers/llm"
            if request.handler and _handler_id(request.handler) != _handler_id(forced):
                raise InvalidArgument(
                    "the handler is not the assistant's",
                    [FieldViolation("handler", f"must be empty or {forced} (the assistant's)")],
                )
        local = await self.router.local(workspace_id)
        return assistant, self.router.choose(forced, workspace_id, request.message, local)

    async def _assistant_for(
        self, workspace_id: str, named: str, handler: str
    ) -> pb.Assistant | None:
        """The message's assistant: the one it names, else the workspace default
        unless the message forces a handler."""
        if not named and handler:
            return None
        return await self.assistants.resolve(workspace_id, named, "assistant")

    def _validate(self, request: pb.SendMessageRequest) -> float:
        """Field checks; returns the run's timeout in seconds."""
        message = request.message
        violations: list[FieldViolation] = []
        if message.role not in (cpb.MESSAGE_ROLE_UNSPECIFIED, cpb.MESSAGE_ROLE_USER):
            violations.append(FieldViolation("message.role", "must be USER or unset"))
        if not message.parts:
            violations.append(FieldViolation("message.parts", "needs at least one part"))
        if request.handler and not _HANDLER.fullmatch(request.handler):
            violations.append(FieldViolation("handler", "must be handlers/{id}"))
        if request.request_id and not _REQUEST_ID.fullmatch(request.request_id):
            violations.append(FieldViolation("request_id", "must be 1-64 of [A-Za-z0-9_-]"))
        if request.concurrency_policy not in _POLICIES:
            violations.append(FieldViolation("concurrency_policy", "is not a known policy"))
        timeout = self.limits.default_timeout_s
        if request.HasField("timeout"):
            requested = timefields.seconds(request.timeout, "timeout")
            if requested <= 0:
                violations.append(FieldViolation("timeout", "must be positive"))
            timeout = min(requested, self.limits.max_timeout_s)
        if request.HasField("parameters") and request.parameters.ByteSize() > _MAX_PARAMETER_BYTES:
            violations.append(
                FieldViolation("parameters", f"is larger than {_MAX_PARAMETER_BYTES} bytes")
            )
        if violations:
            raise InvalidArgument("the request is invalid", violations)
        return timeout

    async def _screen(
        self, principal: Principal, request: pb.SendMessageRequest, workspace_id: str
    ) -> list[str]:
        """The pre-dispatch filters: size, rate limits, content policy; returns the flags."""
        # The rate limits first: a flood of refused messages is still a flood.
        await self._rate_limit(principal, workspace_id, request.conversation)
        text = text_of(request.message)
        if len(text) > self.limits.max_input_chars:
            await self._filtered(principal, request.conversation, "size", RequestTooLarge.reason)
            raise RequestTooLarge(
                f"the message has {len(text)} characters; the limit is "
                f"{self.limits.max_input_chars}"
            )
        verdict = self._content.check(text)
        if verdict.blocked:
            await self._filtered(
                principal,
                request.conversation,
                "content",
                ContentBlocked.reason,
                flags=verdict.rules,
            )
            raise ContentBlocked(
                "the message was refused by the content policy",
                [FieldViolation("message.parts", "matched a blocked term")],
            )
        return list(verdict.flags)

    async def _replay(
        self, principal: Principal, request: pb.SendMessageRequest, earlier: Stored
    ) -> pb.SendMessageResponse:
        """The answer to a retry: the first run, and the first message (the context
        service's own idempotency returns it for the same request)."""
        response = pb.SendMessageResponse(run=self._current(earlier.run))
        response.message.CopyFrom(
            await self._context.append_message(
                principal, self._append_request(principal, request), timeout_s=_FINISH_TIMEOUT_S
            )
        )
        return response

    @staticmethod
    def _append_request(
        principal: Principal, request: pb.SendMessageRequest
    ) -> cpb.AppendMessageRequest:
        message = request.message
        return cpb.AppendMessageRequest(
            parent=request.conversation,
            message=cpb.Message(
                role=cpb.MESSAGE_ROLE_USER,
                author=principal.user_name,
                parts=message.parts,
                metadata=message.metadata if message.HasField("metadata") else None,
            ),
            request_id=request.request_id,
        )

    def _current(self, run: pb.Run) -> pb.Run:
        active = self._active.get(run.name)
        if active is None:
            return run
        current = pb.Run()
        current.CopyFrom(active.run)
        current.last_sequence = active.feed.last
        return current

    async def _rate_limit(self, principal: Principal, workspace_id: str, conversation: str) -> None:
        for kind, key, limit in (
            (
                "rate-user",
                f"dispatch:user:{principal.user_id}",
                self.limits.messages_per_minute_per_user,
            ),
            (
                "rate-workspace",
                f"dispatch:workspace:{workspace_id}",
                self.limits.messages_per_minute_per_workspace,
            ),
        ):
            count, reset_s = await self._counters.hit(key, 60)
            if count > limit:
                await self._filtered(principal, conversation, kind, RateLimited.reason)
                raise RateLimited(
                    f"more than {limit} messages in a minute "
                    f"({'for you' if kind == 'rate-user' else 'in this workspace'}); slow down",
                    retry_after_s=max(reset_s, 1.0),
                )

    def _handler_label(self, handler: Handler) -> str:
        """The handler's id as a metric label: the operator's handlers are a bounded
        set; every workspace's own experts are one value (``workspace``)."""
        handler_id = handler.capabilities.id
        return handler_id if self.router.registry.get(handler_id) is handler else WORKSPACE_HANDLER

    def _admit(self, active: Active, *, force: bool) -> None:
        active.queued_at = time.monotonic()
        log.info(
            "run queued",
            extra={
                "run": active.run.name,
                "handler": active.run.handler,
                "queued": self.scheduler.queued,
                "running": self.scheduler.running,
            },
        )
        ticket = Ticket(
            run_id=active.run.name,
            workspace=active.workspace_id,
            conversation=active.conversation,
            start=lambda _t: self._launch(active),
        )
        active.ticket = ticket
        self.scheduler.admit(ticket, force=force)

    def _launch(self, active: Active) -> None:
        if self._closing:
            # Stopping: it stays QUEUED in the database and runs after the restart.
            self._release(active)
            return
        active.task = asyncio.get_running_loop().create_task(
            self._execute(active)
            if self._tracer is None
            else self._execute_traced(self._tracer, active),
            name=f"run-{active.run_id}",
        )

    # -- executing ------------------------------------------------------------------

    async def _execute_traced(self, tracer: Tracer, active: Active) -> None:
        """``_execute`` in the run's own span, a child of the SendMessage call that
        started it (the job keeps its ``traceparent``; a recovered or queued run
        continues the same trace). It outlives that call, as a child may: the
        answer, its context and its tool and model calls are one trace."""
        run = active.run
        handler_id = run.handler.removeprefix("handlers/")
        with tracer.start_as_current_span(
            f"run {handler_id}",
            context=parent_from(active.job.traceparent),
            attributes={"switchboard.run": run.name, "switchboard.handler": handler_id},
        ) as span:
            await self._execute(active)
            span.set_attribute("switchboard.run.state", pb.RunState.Name(run.state))
            if run.HasField("error"):
                span.set_status(StatusCode.ERROR, run.error.message)

    async def _execute(self, active: Active) -> None:
        active.started = True
        run = active.run
        if active.cancel_error is not None:  # cancelled between scheduling and starting
            active.to(pb.RUN_STATE_CANCELLED)
            await self._finish(active, active.cancel_error)
            return
        error: SwitchboardError | None = None
        try:
            active.to(pb.RUN_STATE_RUNNING)
            self._started(active)
            run.deadline.FromDatetime(names.now() + dt.timedelta(seconds=active.timeout_s))
            # Watchers see RUNNING now (the feed); storing it and publishing
            # its events wait until the run has read its context (``_begin``).
            active.held = True
            self._state_changed(active)
            output, result = await self._drive(active)
            run.output_message = output.name
            run.usage.CopyFrom(result.usage)
            final = pb.RunUpdate()
            final.result.CopyFrom(result)
            self._emit(active, final, with_end=True)
            active.to(pb.RUN_STATE_SUCCEEDED)
        except asyncio.CancelledError:
            error = active.cancel_error
            if error is None:  # this process is stopping
                if run.state == pb.RUN_STATE_REQUIRES_ACTION:
                    # Stored paused with its steps: the restart resumes it.
                    await self._leave_paused(active)
                    return
                if self.limits.recovery == "requeue" and run.state == pb.RUN_STATE_RUNNING:
                    await self._requeue_at_shutdown(active)
                    return
                error = RunInterrupted("the dispatcher stopped while the run was running")
            interrupted = isinstance(error, RunInterrupted)
            active.to(pb.RUN_STATE_FAILED if interrupted else pb.RUN_STATE_CANCELLED)
        except TimeoutError:
            error = DeadlineExceeded(f"the run did not finish within {active.timeout_s:g} s")
            active.to(pb.RUN_STATE_DEADLINE_EXCEEDED)
        except HandlerFailure as failure:
            error = HandlerFailed(failure.message[:_MAX_REASON_CHARS])
            active.to(pb.RUN_STATE_FAILED)
        except SwitchboardError as failure:
            error = failure
            active.to(pb.RUN_STATE_FAILED)
        except Exception as exc:
            if is_outage(exc):
                # The database, not the handler: a precise UNAVAILABLE.
                error = DatabaseUnavailable()
            else:
                log.exception("run failed unexpectedly", extra={"run": run.name})
                error = InternalError("the handler failed unexpectedly")
            active.to(pb.RUN_STATE_FAILED)
        finally:
            active.tools = None
        await self._finish(active, error)

    async def _drive(self, active: Active) -> tuple[cpb.Message, handler_pb2.HandleResult]:
        """Context, handler, answer: everything a run does under its deadline."""
        run = active.run
        mono_deadline = time.monotonic() + active.timeout_s

        def left() -> float:
            return max(0.001, mono_deadline - time.monotonic())

        async with asyncio.timeout(active.timeout_s):
            assistant = active.assistant
            budget = (
                (assistant.context_token_budget if assistant is not None else 0)
                or active.handler.capabilities.max_context_tokens
                or 4000
            )
            # The member may have left since the message was queued. Checked
            # alongside the window read (and the listing of the assistant's
            # tools: one wait on the path to the first delta); nothing reaches
            # the handler unless all succeed.
            reads = asyncio.gather(
                self._policy.authorize(
                    active.principal, active.conversation, Permission.WRITE, "conversation"
                ),
                self._context.window(
                    active.principal,
                    cpb.GetContextWindowRequest(
                        conversation=active.conversation, token_budget=budget
                    ),
                    timeout_s=left(),
                ),
            )
            definitions: list[handler_pb2.ToolDefinition] = []
            if assistant is not None and assistant.tools:
                (_, window), (definitions, _) = await asyncio.gather(
                    reads, offered_tools(self._tools, active.principal, assistant)
                )
            else:
                _, window = await reads
            self._begin(active)
            if active.handler.kind != pb.HANDLER_KIND_BUILTIN:
                await self._start_stored(active)
            request = handler_pb2.HandleRequest(
                run=run.name,
                message=active.message,
                context=window,
                parameters=active.parameters,
                user=active.principal.user_name,
                flags=run.flags,
                tools=definitions,
                steps=active.job.steps,
            )
            if assistant is not None:
                request.instructions = assistant.instructions
                if assistant.HasField("model"):
                    request.model.CopyFrom(assistant.model)
            runner = self._runner(active, definitions, left)
            if runner is not None:
                request.max_tool_steps = self._step_limit(assistant)
            result = await self._relay(active, HandleCall(request, mono_deadline, tools=runner))
            if runner is not None:
                await runner.drain()
            output = await self._context.append_message(
                active.principal,
                cpb.AppendMessageRequest(
                    parent=active.conversation,
                    message=cpb.Message(
                        role=cpb.MESSAGE_ROLE_ASSISTANT,
                        author=run.handler,
                        parts=result.parts,
                        run=run.name,
                    ),
                    request_id=f"run-{active.run_id}",
                ),
                timeout_s=left(),
            )
        return output, result

    def _step_limit(self, assistant: pb.Assistant | None) -> int:
        """Tool steps a run may take: the server's limit, or its assistant's lower one."""
        limit = self.tool_limits.max_steps
        if assistant is not None and assistant.max_tool_steps:
            limit = min(limit, assistant.max_tool_steps)
        return limit

    def _runner(
        self,
        active: Active,
        definitions: Sequence[handler_pb2.ToolDefinition],
        left: Callable[[], float],
    ) -> RunTools | None:
        """The run's tool runner: when its assistant offers tools, or its handler is
        an interactive expert (which may name any tool of the workspace when the
        run has no assistant to say which)."""
        interactive = active.handler.capabilities.interactive
        assistant = active.assistant
        # An assistant that enables tools gets a runner even when none can be
        # offered now: a call the model makes anyway is answered, not fatal.
        if not definitions and not interactive and not (assistant and assistant.tools):
            return None
        runner = RunTools(
            _RunHost(self, active),
            self._tools,
            self.tool_limits,
            principal=active.principal,
            run=active.run,
            job=active.job,
            definitions=definitions,
            workspace_id=active.workspace_id,
            open_workspace=interactive and assistant is None,
            max_steps=self._step_limit(assistant),
            deadline=left,
        )
        active.tools = runner
        return runner

    async def _relay(self, active: Active, call: HandleCall) -> handler_pb2.HandleResult:
        """The handler's frames into the run's updates; returns its result."""
        frames = active.handler.handle(call)
        # Deltas the handler yields without waiting in between (a fast model,
        # several chunks in one network read, a busy server) go out as one
        # delta, flushed once the handler waits: each update costs a feed
        # entry, a frame per watcher and an event, however little text it holds.
        pending: list[str] = []
        pending_chars = 0
        loop = asyncio.get_running_loop()

        def flush() -> None:
            nonlocal pending_chars
            if pending:
                update = pb.RunUpdate()
                update.delta.text = "".join(pending)
                pending.clear()
                pending_chars = 0
                self._emit(active, update)

        runner = active.tools
        saw_text = runner.saw_text if runner is not None else _ignore
        if runner is not None:
            runner.flush = flush  # a tool update goes after the text before it
        try:
            async for frame in frames:
                if active.feed.last % SEQUENCE_BLOCK >= _MAX_UPDATES:
                    raise HandlerFailure("the handler sent more updates than a run may have")
                kind = frame.WhichOneof("frame")
                if kind == "delta":
                    if not pending:
                        loop.call_soon(flush)
                    pending.append(frame.delta.text)
                    pending_chars += len(frame.delta.text)
                    saw_text(frame.delta.text)
                    if pending_chars >= _MAX_MERGED_DELTA_CHARS:
                        flush()
                    continue
                flush()
                update = pb.RunUpdate()
                if kind == "progress":
                    active.run.progress.CopyFrom(frame.progress)
                    update.progress.CopyFrom(frame.progress)
                elif kind == "tool_call":
                    update.tool_call.CopyFrom(frame.tool_call)
                elif kind == "result":
                    return frame.result
                else:
                    continue
                self._emit(active, update)
            flush()
        finally:
            # Cancelled or failed: text not yet out stays out, after the end.
            pending.clear()
            # An unfinished generator is closed now, not at garbage collection:
            # a remote call or an HTTP response ends with the run.
            close = getattr(frames, "aclose", None)
            if close is not None:
                await close()
        raise HandlerFailure("the handler ended without a result")

    def _begin(self, active: Active) -> None:
        """The run has read its context: store RUNNING, publish its held events.

        Held back until now because the path to the first delta is a chain of
        database reads, and these writes, started alongside, made each of
        those reads wait for the interpreter (measured: the first delta of an
        idle server 22 -> 17 ms). Not awaited here: a built-in handler starts
        while RUNNING is being stored (writes are committed in order, so it
        lands before the final state), and a crash before it lands leaves the
        run QUEUED, run again as one that never started. Handlers that act
        outside the process wait for it (``_start_stored``).
        """
        if not active.held:
            return
        started = pb.Run()
        started.CopyFrom(active.run)
        active.saving = asyncio.ensure_future(
            self._store.save(active.run_id, started, owner=self.limits.instance_id)
        )
        self._release(active)

    def _release(self, active: Active) -> None:
        """Publish the run's held events (it waits in the queue, or it ended
        before reading its context: its end is stored next, RUNNING never)."""
        if active.held:
            active.held = False
            if active.outbox:
                self._start_publisher(active)

    async def _finish(self, active: Active, error: SwitchboardError | None) -> None:
        run = active.run
        self._release(active)
        await self._started_saved(active)
        if error is not None:
            run.error.CopyFrom(_error_status(error))
        run.end_time.FromDatetime(names.now())
        await self._persist(active, "end")
        self._feeds.close(active.feed)
        self._active.pop(run.name, None)
        if active.ticket is not None:
            self.scheduler.finished(active.ticket)
        self._ended(active, error)

    def _started(self, active: Active) -> None:
        """Log and measure a run's start (its queue wait)."""
        now = time.monotonic()
        active.started_at = now
        active.run.start_time.FromDatetime(names.now())
        waited = now - active.queued_at if active.queued_at else 0.0
        if self._metrics is not None:
            self._metrics.run_queue_wait.observe(waited)
        log.info(
            "run started",
            extra={
                "run": active.run.name,
                "handler": active.run.handler,
                "queue_wait_ms": round(waited * 1000, 3),
            },
        )

    def _ended(self, active: Active, error: SwitchboardError | None) -> None:
        """Log and measure a run's end: state, handler, duration, usage."""
        run = active.run
        state = pb.RunState.Name(run.state)
        duration = time.monotonic() - active.started_at if active.started_at else None
        if self._metrics is not None:
            self._metrics.run_ended(
                self._handler_label(active.handler), run_state_label(state), duration
            )
        usage = run.usage
        log.info(
            "run ended",
            extra={
                "run": run.name,
                "handler": run.handler,
                "state": state,
                "reason": error.reason if error is not None else "",
                "duration_ms": None if duration is None else round(duration * 1000, 3),
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cost_usd": usage.estimated_cost_usd,
                "model": usage.model,
            },
        )

    async def _start_stored(self, active: Active) -> None:
        """Return once the database says RUNNING: a handler outside this process
        (a model, a domain expert) and its tool calls act on the world.

        Started before then, a crash before the start landed would leave the
        run QUEUED, and recovery would run it again as one that never started,
        even under the ``fail`` policy that promises a run's side effects are
        never repeated. Built-in handlers do not wait (their first delta is the
        path decision 24 measured); for the others it is one commit, already in
        flight since ``_begin``, against a network call. A start the database
        refused is stored again, retried as an end is.
        """
        saving = active.saving
        stored: bool | None = None
        if saving is not None:
            try:
                # Shielded: a cancel of the run leaves the save for ``_finish`` to await.
                stored = await asyncio.shield(saving)
            except SwitchboardError:
                log.warning(
                    "could not store the start of a run; retrying", extra={"run": active.run.name}
                )
            active.saving = None
        if stored is None:
            stored = await self._save_until_stored(active, "start", None)
        if stored is None:
            raise RunInterrupted("the dispatcher stopped before the run's start was stored")
        if not stored:
            # Taken over meanwhile: its new owner runs or fails it, not this one.
            raise RunInterrupted("another dispatcher instance took the run over")

    async def _started_saved(self, active: Active) -> None:
        if active.saving is not None:
            try:
                await active.saving
            except SwitchboardError:
                # The final save (retried until it lands) supersedes it.
                log.warning("could not persist the start of a run", extra={"run": active.run.name})

    async def _requeue_at_shutdown(self, active: Active) -> None:
        self._release(active)
        await self._started_saved(active)
        run = active.run
        active.to(pb.RUN_STATE_QUEUED)
        _queued_again(run)
        await self._persist(active, "requeue")
        log.info("run requeued at shutdown", extra={"run": run.name, "handler": run.handler})

    async def _leave_paused(self, active: Active) -> None:
        """Stopping while it waits for approvals: it stays stored as it is."""
        self._release(active)
        await self._started_saved(active)
        self._feeds.close(active.feed)
        self._active.pop(active.run.name, None)

    # -- pausing for approvals (the runner's host) ---------------------------------------

    async def _pause(self, active: Active) -> None:
        await self._started_saved(active)
        active.to(pb.RUN_STATE_REQUIRES_ACTION)
        if active.ticket is not None:
            self.scheduler.paused(active.ticket)
        await self._persist(active, "pause", job=True)

    async def _resume(self, active: Active) -> None:
        active.to(pb.RUN_STATE_RUNNING)
        if active.ticket is not None:
            self.scheduler.resumed(active.ticket)
        await self._persist(active, "resume")

    async def _save_job(self, active: Active) -> None:
        await self._store.save_job(
            active.run_id, active.job.SerializeToString(), owner=self.limits.instance_id
        )

    async def _persist(self, active: Active, what: str, *, job: bool = False) -> None:
        """Store the run as it now stands, then announce it as a state change.

        Announced only once stored: the feed and the events never say a run
        ended while the store says it runs (GetRun, ListRuns, the REJECT
        check, recovery). A save that fails is retried until the database
        answers; if this process stops first, nothing was announced and the
        next owner applies the recovery policy to what is stored.
        """
        async with active.persisting:
            await self._persist_now(active, what, job)

    async def _persist_now(self, active: Active, what: str, job: bool) -> None:
        run = active.run
        run.last_sequence = active.feed.last + 1
        # Its event is written with it (the outbox): a crash right after the
        # commit cannot leave a stored end that no watcher ever hears of.
        update = pb.RunUpdate(run=run.name, sequence=run.last_sequence)
        update.time.FromDatetime(names.now())
        update.state_change.run.CopyFrom(run)
        event = self._event(active.workspace_id, active.conversation_id, update)
        # The end carries the result's event: both in the end's transaction
        # (a crash right after it loses neither), then one log batch for both.
        events = [*active.ending, event] if run.state in TERMINAL else [event]
        staged: Staged[bool] = Staged(self._bus.outbox, lambda stored: events if stored else [])
        data = active.job.SerializeToString() if job else None
        saved = await self._save_until_stored(active, what, staged, data)
        if saved:
            planned = update.sequence
            active.feed.append(update)
            if update.sequence != planned:
                # An interactive expert streamed while this was stored: the
                # feed numbered it after those updates; the event says the same.
                event.run_updated.update.sequence = update.sequence
            outbox = self._bus.outbox
            if outbox is not None:
                outbox.publishing(events)
            active.outbox.extend(events)
            active.ending.clear()
            if active.publisher is None or active.publisher.done():
                self._start_publisher(active)
        elif saved is False:
            log.warning(
                "a run was taken over by another instance; its end here is not announced",
                extra={"run": run.name, "what": what},
            )

    async def _save_until_stored(
        self, active: Active, what: str, staged: Staged[bool] | None, job: bytes | None = None
    ) -> bool | None:
        """True once saved, False if another instance owns it now, None if stopping first."""
        backoff = Backoff(0.05, 2.0)
        began = time.monotonic()
        warned = False
        while True:
            try:
                async with asyncio.timeout(_FINISH_TIMEOUT_S):
                    return await self._store.save(
                        active.run_id,
                        active.run,
                        owner=self.limits.instance_id,
                        staged=staged,
                        job=job,
                    )
            except (DependencyUnavailable, Conflict, TimeoutError):
                if self._closing and time.monotonic() - began >= _FINISH_TIMEOUT_S:
                    log.warning(
                        "a run could not be stored before stopping; its next owner recovers it",
                        extra={"run": active.run.name, "what": what},
                    )
                    return None
                if not warned:
                    warned = True
                    log.warning(
                        "could not store a run; retrying until the database answers",
                        extra={"run": active.run.name, "what": what},
                    )
            await backoff.wait()

    # -- updates and events -----------------------------------------------------------

    def _state_changed(self, active: Active) -> None:
        # The snapshot carries its own sequence, so a watcher that reads only
        # the run (GetRun, a late WatchRun) knows where the stream stands.
        active.run.last_sequence = active.feed.last + 1
        update = pb.RunUpdate()
        update.state_change.run.CopyFrom(active.run)
        self._emit(active, update)

    def _emit(self, active: Active, update: pb.RunUpdate, *, with_end: bool = False) -> None:
        """Show ``update`` to the run's watchers now and queue its event; ``with_end``:
        its event waits for the run's end and is stored with it (``_persist_now``):
        one log batch fewer per run, and the result's event as durable as the end."""
        active.feed.append(update)
        event = self._event(active.workspace_id, active.conversation_id, update)
        if with_end:
            active.ending.append(event)
            return
        active.outbox.append(event)
        if not active.held and (active.publisher is None or active.publisher.done()):
            self._start_publisher(active)

    def _start_publisher(self, active: Active) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(active))
        active.publisher = task
        self._publishers.add(task)
        task.add_done_callback(self._publishers.discard)

    @staticmethod
    def _event(workspace_id: str, conversation_id: str, update: pb.RunUpdate) -> events_pb2.Event:
        event = events_pb2.Event(
            type=events_pb2.EVENT_TYPE_RUN_UPDATED,
            actor=events_pb2.Actor(name="system"),
            workspace=f"workspaces/{workspace_id}",
            conversation=f"workspaces/{workspace_id}/conversations/{conversation_id}",
        )
        event.run_updated.update.CopyFrom(update)
        return event

    async def _publish(self, active: Active) -> None:
        # One publisher per run: its events reach the log in update order on
        # every backend, while runs publish independently of each other.
        # Everything emitted while the previous batch was being stored goes
        # in the next one: a fast handler costs a few log writes, not one per update.
        outbox = active.outbox
        while outbox:
            batch = [outbox.popleft() for _ in range(min(len(outbox), _PUBLISH_BATCH))]
            try:
                await self._bus.publish_many(batch)
            except SwitchboardError:
                if self._bus.outbox is not None:
                    self._bus.outbox.failed(batch)  # a stored end: the relay publishes it
                log.warning("run updates not published", extra={"run": active.run.name})

    async def _filtered(
        self,
        principal: Principal,
        conversation: str,
        filter_name: str,
        reason: str,
        *,
        flags: Sequence[str] = (),
        run: str = "",
    ) -> None:
        workspace = conversation.split("/conversations/", maxsplit=1)[0]
        event = events_pb2.Event(
            type=events_pb2.EVENT_TYPE_MESSAGE_FILTERED,
            actor=events_pb2.Actor(
                name=principal.user_name,
                credential=principal.session_name or principal.api_key_name,
            ),
            user=principal.user_name,
            workspace=workspace,
            conversation=conversation,
        )
        payload = event.message_filtered
        payload.conversation = conversation
        payload.filter = filter_name
        payload.rejected = bool(reason)
        if reason:
            payload.reason = reason  # type: ignore[assignment]
        payload.flags.extend(flags)
        payload.run = run
        try:
            await self._bus.publish(event)
        except SwitchboardError:
            log.warning("filter event not published", extra={"filter": filter_name})

    # -- reading --------------------------------------------------------------------

    async def get_run(self, name: str) -> pb.Run:
        found = _match(_RUN, name, "name")
        active = self._active.get(name)
        if active is not None:
            return self._current(active.run)
        stored = await self._store.get(found[1], found[2], found[3])
        return stored.run

    async def list_runs(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
        found = _match(_CONVERSATION, request.parent, "parent")
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        states = sorted(set(request.states))
        token = pagination.fingerprint("runs", request.parent, states)
        after: tuple[dt.datetime, str] | None = None
        if request.page_token:
            stamp, last = self._pages.decode(
                request.page_token, token, (pagination.ISO_TIME, pagination.ID)
            )
            after = (dt.datetime.fromisoformat(str(stamp)), str(last))
        rows = await self._store.page(
            found[1], found[2], states=states, after=after, limit=size + 1
        )
        response = pb.ListRunsResponse()
        for row in rows[:size]:
            response.runs.append(self._current(pb.Run.FromString(row.data)))
        if len(rows) > size:
            last_row = rows[size - 1]
            response.next_page_token = self._pages.encode(
                [last_row.created_at.isoformat(), last_row.id], token
            )
        return response

    async def list_handlers(self, request: pb.ListHandlersRequest) -> pb.ListHandlersResponse:
        workspace_id = _match(_WORKSPACE, request.parent, "parent")[1]
        size = pagination.page_size(request.page_size, default=50, maximum=100)
        token = pagination.fingerprint("handlers", request.parent)
        after = ""
        if request.page_token:
            after = str(self._pages.decode(request.page_token, token, (pagination.ID,))[0])
        listed = await self.router.listed(workspace_id)
        handlers = [h for h in listed if h.capabilities.id > after]
        response = pb.ListHandlersResponse()
        for handler in handlers[:size]:
            response.handlers.append(_handler_proto(handler))
        if len(handlers) > size:
            response.next_page_token = self._pages.encode(
                [handlers[size - 1].capabilities.id], token
            )
        return response

    async def watch(self, name: str, after_sequence: int) -> AsyncIterator[pb.RunUpdate | None]:
        """The run's updates after ``after_sequence``; ``None`` for a heartbeat."""
        self.watchers += 1
        try:
            async for update in self._watch(name, after_sequence):
                yield update
        finally:
            self.watchers -= 1

    async def _watch(self, name: str, after_sequence: int) -> AsyncIterator[pb.RunUpdate | None]:
        found = _match(_RUN, name, "name")
        if after_sequence < 0:
            raise InvalidArgument(
                "after_sequence must not be negative",
                [FieldViolation("after_sequence", "must not be negative")],
            )
        feed = self._feeds.get(name)
        if feed is None:
            stored = await self._store.get(found[1], found[2], found[3])
            async for update in self._watch_stored(stored.run, after_sequence):
                yield update
            return
        if after_sequence < feed.first - 1:
            # Older updates are gone (a restart, or an endless stream trimmed):
            # start from a snapshot of the run, then follow without gaps.
            active = self._active.get(name)
            if active is not None:
                current = self._current(active.run)
            else:
                current = (await self._store.get(found[1], found[2], found[3])).run
            current.last_sequence = feed.first - 1
            snapshot = _snapshot(current)
            yield snapshot
            after_sequence = snapshot.sequence
        position, ended = after_sequence, False
        async for update in feed.follow(after_sequence, heartbeat_s=self.limits.heartbeat_s):
            if update is not None:
                position = update.sequence
                ended = update.state_change.run.state in TERMINAL
            yield update
        if not ended:
            # The feed closed without an end: another instance took the run over
            # (this one lost its lease). Its end comes from the new owner's events.
            stored = await self._store.get(found[1], found[2], found[3])
            async for update in self._watch_stored(stored.run, position):
                yield update

    async def _watch_stored(
        self, run: pb.Run, after_sequence: int
    ) -> AsyncIterator[pb.RunUpdate | None]:
        """A run without a feed here: finished long ago, or owned by another replica."""
        found = _match(_RUN, run.name, "name")
        queue: asyncio.Queue[pb.RunUpdate] = asyncio.Queue(maxsize=10_000)

        def listener(event: events_pb2.Event) -> None:
            if (
                event.type == events_pb2.EVENT_TYPE_RUN_UPDATED
                and event.run_updated.update.run == run.name
            ):
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(event.run_updated.update)

        unsubscribe = self._bus.listen(listener)
        try:
            position = after_sequence
            if run.last_sequence > position:
                position = run.last_sequence
                yield _snapshot(run)
            if run.state in TERMINAL:
                return
            while True:
                try:
                    async with asyncio.timeout(self.limits.heartbeat_s):
                        update = await queue.get()
                except TimeoutError:
                    # Idle: did it end without this process hearing of it (its
                    # end published while this one could not read the log)?
                    stored = await self._store.get(found[1], found[2], found[3])
                    if stored.run.state in TERMINAL and stored.run.last_sequence > position:
                        yield _snapshot(stored.run)
                        return
                    yield None
                    continue
                if update.sequence <= position:
                    continue
                position = update.sequence
                yield update
                if (
                    update.WhichOneof("update") == "state_change"
                    and update.state_change.run.state in TERMINAL
                ):
                    return
        finally:
            unsubscribe()

    # -- approvals and setup ------------------------------------------------------------

    async def submit_tool_approvals(
        self, principal: Principal, request: pb.SubmitToolApprovalsRequest, via: Via = _IN_PROCESS
    ) -> pb.Run:
        """Decide pending tool calls; ``via``: how the call came (see ``_owner``)."""
        found = _match(_RUN, request.name, "name")
        _check_approvals(request)
        active = self._active.get(request.name)
        if active is None:
            _, owner = await self._owner(found, via)
            if owner is None:
                raise FailedPrecondition("the run is not waiting for tool approvals")
            # The owner holds the pending calls; it checks the decisions and the caller.
            return await owner.peers.submit_tool_approvals(owner.address, via, request)
        waiting = {
            pending.call.id: pending
            for pending in active.run.required_action.tool_calls
            if active.run.state not in TERMINAL
        }
        if not any(p.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED for p in waiting.values()):
            raise FailedPrecondition("the run is not waiting for tool approvals")
        violations = Violations()
        for index, approval in enumerate(request.approvals):
            pending = waiting.get(approval.tool_call_id)
            if pending is None:
                violations.add(
                    f"approvals[{index}].tool_call_id", "is not a call this run waits on"
                )
            elif pending.decision not in (
                pb.TOOL_APPROVAL_DECISION_UNSPECIFIED,
                approval.decision,
            ):
                raise FailedPrecondition(
                    f"the call {approval.tool_call_id} was already decided the other way"
                )
        violations.check()
        now = names.now()
        changed = False
        for approval in request.approvals:
            pending = waiting[approval.tool_call_id]
            if pending.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED:
                pending.decision = approval.decision
                pending.decided_by = principal.user_name
                pending.reason = approval.reason
                pending.decide_time.FromDatetime(now)
                changed = True
        if changed:
            if active.run.state == pb.RUN_STATE_REQUIRES_ACTION and not any(
                p.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED for p in waiting.values()
            ):
                # The last decision resumes the run in the same write, so the
                # answer says RUNNING (the runner finds it so and goes on).
                active.to(pb.RUN_STATE_RUNNING)
                if active.ticket is not None:
                    self.scheduler.resumed(active.ticket)
            # Stored and shown before the run goes on: a restart keeps the
            # decisions, and watchers see who decided what.
            await self._persist(active, "decisions")
            runner = active.tools
            if runner is not None:
                runner.decided()
        return self._current(active.run)

    async def describe_conversation(
        self, principal: Principal, request: pb.DescribeConversationRequest
    ) -> pb.DescribeConversationResponse:
        found = _match(_CONVERSATION, request.conversation, "conversation")
        workspace_id = found[1]
        if request.handler and not _HANDLER.fullmatch(request.handler):
            raise InvalidArgument(
                "the request is invalid", [FieldViolation("handler", "must be handlers/{id}")]
            )
        # NOT_FOUND for a conversation that is not there (the access rule
        # checked the workspace only).
        await self._context.conversation(
            principal, request.conversation, timeout_s=_FINISH_TIMEOUT_S
        )
        assistant = await self._assistant_for(workspace_id, request.assistant, request.handler)
        forced = request.handler
        if assistant is not None:
            forced = assistant.handler or "handlers/llm"
        local = await self.router.local(workspace_id)
        choice = self.router.choose(forced, workspace_id, cpb.Message(), local)
        handler = choice.handler
        response = pb.DescribeConversationResponse(
            handler=_handler_proto(handler),
            context_token_budget=(
                (assistant.context_token_budget if assistant is not None else 0)
                or handler.capabilities.max_context_tokens
                or 4000
            ),
        )
        if assistant is not None:
            response.assistant.CopyFrom(assistant)
        definitions, unavailable = await offered_tools(self._tools, principal, assistant)
        response.tools.extend(definitions)
        response.unavailable_tools.extend(unavailable)
        if definitions or handler.capabilities.interactive:
            response.max_tool_steps = self._step_limit(assistant)
        if isinstance(handler, LlmHandler):
            response.model = handler.model_label(assistant.model if assistant is not None else None)
        return response

    # -- cancelling -------------------------------------------------------------------

    async def cancel_run(
        self, principal: Principal, name: str, reason: str, via: Via = _IN_PROCESS
    ) -> pb.Run:
        """Cancel the run; ``via``: how the call came (see ``_owner``)."""
        found = _match(_RUN, name, "name")
        if len(reason) > _MAX_REASON_CHARS:
            raise InvalidArgument(
                "reason is too long",
                [FieldViolation("reason", f"has more than {_MAX_REASON_CHARS} characters")],
            )
        active = self._active.get(name)
        if active is None:
            stored, owner = await self._owner(found, via)
            if owner is None:
                return stored.run
            # The owner holds the run's task; it answers with the ended run.
            return await owner.peers.cancel_run(
                owner.address, via, pb.CancelRunRequest(name=name, reason=reason)
            )
        text = reason or "cancelled"
        await self._cancel(active, RunCancelled(f"{text} (by {principal.user_name})"))
        return self._current(active.run)

    async def _owner(self, found: re.Match[str], via: Via) -> tuple[Stored, _Peer | None]:
        """A run that is not active here: the stored run and, unless it has ended
        (None), the replica that owns it, to forward the call to.

        Raises UNAVAILABLE (retry) when the owner cannot be reached now: it
        stopped and its lease has not been taken over yet, it has not stored its
        address yet, or ownership moved while the call was being forwarded (a
        forwarded call is never forwarded again, so a call cannot loop).
        """
        stored, owner = await self._store.get_with_owner(found[1], found[2], found[3])
        if stored.run.state in TERMINAL:
            return stored, None
        if owner.instance == self.limits.instance_id:
            # Ours but not running: recovery (at start, or a takeover) has not
            # been able to store it again yet; the lease loop retries.
            raise _unavailable("the run is being recovered by its dispatcher replica; retry")
        if not owner.live:
            # Another replica takes it over once the lease has expired and its
            # lease loop comes round (a third of a lease).
            raise _unavailable(
                "the dispatcher replica running the run stopped; another replica takes the "
                "run over shortly; retry",
                retry_after_s=min(10.0, max(1.0, self.limits.lease_s / 3)),
            )
        if via.forwarded:
            raise _unavailable("the run moved to another dispatcher replica meanwhile; retry")
        if self._peers is None or not via.credential:
            raise FailedPrecondition("the run is active on another dispatcher replica")
        if not owner.address:
            # Starting (its address is stored before it takes calls), or a
            # version that does not store one (a rolling upgrade).
            raise _unavailable(
                "the dispatcher replica running the run has no address for other replicas "
                "yet; retry"
            )
        return stored, _Peer(self._peers, owner.address)

    async def _cancel(self, active: Active, error: SwitchboardError) -> None:
        if active.run.state in TERMINAL:
            return
        if active.ticket is not None and self.scheduler.withdraw(active.ticket):
            active.to(pb.RUN_STATE_CANCELLED)
            active.ticket = None
            await self._finish(active, error)
            return
        task = active.task
        if task is None or task.done():
            return
        if active.cancel_error is None:
            active.cancel_error = error
        if active.started:
            task.cancel()
        # Wait for the handler to stop and the run to be recorded, not longer:
        # CancelRun answers with the terminal run.
        await asyncio.wait([task], timeout=_FINISH_TIMEOUT_S)


def _unavailable(message: str, *, retry_after_s: float = 1.0) -> DependencyUnavailable:
    error = DependencyUnavailable(message)
    error.retry_after_s = retry_after_s
    return error


def _check_approvals(request: pb.SubmitToolApprovalsRequest) -> None:
    violations = Violations()
    if not request.approvals:
        violations.add("approvals", "needs at least one decision")
    if len(request.approvals) > _MAX_APPROVALS:
        violations.add("approvals", f"at most {_MAX_APPROVALS} decisions")
    seen: set[str] = set()
    for index, approval in enumerate(request.approvals[:_MAX_APPROVALS]):
        where = f"approvals[{index}]"
        if not approval.tool_call_id:
            violations.add(f"{where}.tool_call_id", "is required")
        elif approval.tool_call_id in seen:
            violations.add(f"{where}.tool_call_id", "is decided twice in this request")
        seen.add(approval.tool_call_id)
        if approval.decision not in _DECISIONS:
            violations.add(f"{where}.decision", "must be APPROVE or DENY")
        if len(approval.reason) > _MAX_REASON_CHARS:
            violations.add(f"{where}.reason", f"has more than {_MAX_REASON_CHARS} characters")
    violations.check()


def _handler_proto(handler: Handler) -> pb.Handler:
    return pb.Handler(
        name=f"handlers/{handler.capabilities.id}",
        kind=handler.kind,
        capabilities=handler.capabilities,
        available=handler.available(),
        # Set for a workspace's own experts (operator-level handlers have none).
        integration=getattr(handler, "integration", ""),
    )


def _handler_id(handler: str) -> str:
    return handler.removeprefix("handlers/")


def _ignore(_text: str) -> None:
    pass


def _snapshot(run: pb.Run) -> pb.RunUpdate:
    """A state change carrying the whole run, at the run's own ``last_sequence``."""
    update = pb.RunUpdate(run=run.name, sequence=run.last_sequence)
    update.time.FromDatetime(names.now())
    update.state_change.run.CopyFrom(run)
    return update


def next_block(sequence: int) -> int:
    """The last sequence before the block after ``sequence``'s: a new attempt's start."""
    return (sequence // SEQUENCE_BLOCK + 1) * SEQUENCE_BLOCK


def _queued_again(run: pb.Run) -> None:
    """Back to QUEUED, as a run that never started (it will run again)."""
    run.state = pb.RUN_STATE_QUEUED
    run.ClearField("start_time")
    run.ClearField("deadline")


def _strip_prefix(message: cpb.Message, prefix: str) -> None:
    for part in message.parts:
        if part.WhichOneof("part") == "text":
            if part.text.startswith(prefix):
                part.text = part.text[len(prefix) :].lstrip()
            return


class _RunHost:
    """The dispatcher, as one run's tool runner sees it."""

    def __init__(self, dispatcher: Dispatcher, active: Active) -> None:
        self._dispatcher = dispatcher
        self._active = active

    def emit(self, update: pb.RunUpdate) -> None:
        self._dispatcher._emit(self._active, update)

    async def pause(self) -> None:
        await self._dispatcher._pause(self._active)

    async def resume(self) -> None:
        await self._dispatcher._resume(self._active)

    def save_job(self) -> Awaitable[None]:
        return self._dispatcher._save_job(self._active)

    def append(self, request: cpb.AppendMessageRequest) -> Awaitable[cpb.Message]:
        return self._dispatcher._context.append_message(
            self._active.principal, request, timeout_s=_FINISH_TIMEOUT_S
        )
