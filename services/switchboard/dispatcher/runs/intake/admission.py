"""Admission: a SendMessageRequest becomes a stored message and a queued run,
or a precise error.

In order: the fields (``validate``), the pre-dispatch filters (rate limits,
size, content policy), the assistant and the handler (``choose``), a retry
answered from the first attempt (the request id), the room in the queue, the
message stored through the context service's contract, the QUEUED run stored
with its job, and last the run handed to the scheduler, whose start is the
execution stage's (``execution.py``). Nothing is stored before every check
has passed, and the run is handed over before anything else is awaited.

A process admits a few of a workspace's messages at a time (``Turns``,
``SWITCHBOARD_DISPATCHER_MAX_ADMITTING_PER_WORKSPACE``); the workspace's quotas
(``budgets/quotas.py``) are among the filters.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from google.protobuf import struct_pb2
from opentelemetry.trace import Tracer

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher import mapping
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.budgets.quotas import Limits, Quotas
from switchboard.dispatcher.budgets.spending import Read, Spending
from switchboard.dispatcher.handlers.base import Handler, text_of
from switchboard.dispatcher.handlers.handed import HEADER, Handed
from switchboard.dispatcher.handlers.router import Choice, Router
from switchboard.dispatcher.llm.handler import LlmHandler
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.runs.intake import speech as spoken
from switchboard.dispatcher.runs.intake.content import ContentPolicy
from switchboard.dispatcher.runs.lifecycle import Active
from switchboard.dispatcher.runs.live import FINISH_TIMEOUT_S, Common
from switchboard.dispatcher.runs.reading.publishing import Publishing
from switchboard.dispatcher.runs.scheduler import Scheduler, Ticket
from switchboard.dispatcher.runs.store import NewRun, Stored, raise_busy
from switchboard.dispatcher.voice.speaker import Speech
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.cache import Cache
from switchboard.platform.errors import (
    BudgetExhausted,
    ContentBlocked,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    RunSuperseded,
    SwitchboardError,
)
from switchboard.platform.observe.telemetry import current_ids, traceparent
from switchboard.platform.security.policy import Principal
from switchboard.platform.store.storage import Idempotency, idempotency
from switchboard.platform.values import names, timefields

log = logging.getLogger("switchboard.dispatcher")

HANDLER: Final = re.compile(rf"(handlers/)?{names.CLIENT_ID.pattern}")
_POLICIES: Final = frozenset(pb.ConcurrencyPolicy.values())
_STEER_MODES: Final = frozenset(pb.SteerMode.values())
#: Parameters of one run, serialized.
_MAX_PARAMETER_BYTES: Final = 16 * 1024


@dataclass(frozen=True)
class Steered:
    """A message admitted as a steer of ``target`` (``steering.py``): the run it makes
    uses the target's assistant and handler, and waits behind it."""

    target: Active
    #: The idempotency key of the call that sent it (SteerRun's, or SendMessage's).
    key: Idempotency | None
    #: Told once the steer's run is admitted (the target takes it from there).
    accepted: Callable[[Active], None]


def steer_mode_violations(mode: int) -> list[FieldViolation]:
    """``SendMessageRequest.steer_mode``: a known mode."""
    if mode not in _STEER_MODES:
        return [FieldViolation("steer_mode", "is not a known mode")]
    return []


class Turns:
    """At most ``limit`` holders per workspace at once; the others wait (FIFO). The map
    keeps only workspaces with a holder or a waiter."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._gates: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    def holders(self, workspace: str) -> int:
        """Holders and waiters of ``workspace``."""
        gate = self._gates.get(workspace)
        return gate[1][0] if gate is not None else 0

    @contextlib.asynccontextmanager
    async def held(self, workspace: str) -> AsyncIterator[None]:
        gate = self._gates.get(workspace)
        if gate is None:
            gate = self._gates[workspace] = (asyncio.Semaphore(self.limit), [0])
        semaphore, users = gate
        users[0] += 1
        try:
            async with semaphore:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._gates[workspace]


async def route(
    assistants: Assistants,
    router: Router,
    workspace_id: str,
    request: pb.SendMessageRequest | pb.DescribeConversationRequest,
    message: cpb.Message,
) -> tuple[pb.Assistant | None, Choice]:
    """The message's assistant, if any, and the handler that answers it (the order
    of the rules: ``router.py``). A named assistant or a forced handler decides;
    otherwise the message's own choice (metadata, content type, a /command) comes
    before the workspace's default assistant, and a run routed by it has none."""
    local = await router.local(workspace_id)
    if request.assistant:
        assistant = await assistants.resolve(workspace_id, request.assistant, "assistant")
        if assistant is None:  # resolve raises NOT_FOUND for a name it does not know
            raise NotFound(f"{request.assistant} not found")
        reason = f"the assistant {assistant.name}, named in the request"
        return assistant, _assistant_choice(router, assistant, reason, local)
    if request.handler:
        return None, router.choose(request.handler, workspace_id, message, local)
    chosen = router.by_message(message, local)
    if chosen is not None:
        return None, chosen
    assistant = await assistants.resolve(workspace_id, "", "assistant")
    if assistant is None:
        return None, router.by_default(workspace_id)
    reason = f"the workspace's default assistant {assistant.name}"
    return assistant, _assistant_choice(router, assistant, reason, local)


def _assistant_choice(
    router: Router, assistant: pb.Assistant, reason: str, local: Mapping[str, Handler]
) -> Choice:
    return router.named(handler_id(assistant.handler or "handlers/llm"), "assistant", reason, local)


def handler_id(handler: str) -> str:
    return handler.removeprefix("handlers/")


class Admission:
    def __init__(
        self,
        *,
        common: Common,
        context: ContextPort,
        counters: Cache,
        scheduler: Scheduler,
        content: ContentPolicy,
        assistants: Assistants,
        publishing: Publishing,
        start: Callable[[Active, Ticket], asyncio.Task[None] | None],
        cancel: Callable[[Active, SwitchboardError], Awaitable[None]],
        tracer: Tracer | None,
        quotas: Quotas,
        spending: Spending | None = None,
        speech: Speech | None = None,
    ) -> None:
        self._live = common.live
        #: The server's speech (None: ``speech`` is SPEECH_NOT_CONFIGURED).
        self._speech = speech
        #: Budgets: a message they have no room for is refused (None: no budgets).
        self._spending = spending
        self._store = common.store
        self._context = context
        self._bus = common.bus
        self._counters = counters
        self._router = common.router
        self._scheduler = scheduler
        self._feeds = common.feeds
        self._content = content
        self._limits = common.limits
        self._assistants = assistants
        self._publishing = publishing
        #: The execution stage's start, called by the scheduler when the run's turn comes.
        self._start = start
        #: The execution stage's cancel (an INTERRUPT message supersedes the active runs).
        self._cancel = cancel
        self._tracer = tracer
        self._quotas = quotas
        # The rest of a workspace's messages wait their turn here, not in the database's
        # queue ahead of other workspaces' messages.
        self._turns = Turns(self._limits.admitting_per_workspace)

    async def send_message(
        self,
        principal: Principal,
        request: pb.SendMessageRequest,
        handed: Handed | None = None,
        *,
        schedule: str = "",
        steer: Steered | None = None,
    ) -> pb.SendMessageResponse:
        """``handed``: the budget a caller handed over (``x-switchboard-budget``), one
        more cap on the run; nothing left of it refuses the message. ``schedule``: the
        schedule whose tick sends it (``Run.schedule``; ``schedules/firing.py``).
        ``steer``: the message steers a live run (``steering.py``), through the same
        checks."""
        found = names.match(names.CONVERSATION, request.conversation, "conversation")
        # A few of a workspace's messages at a time: admissions share the database's
        # writers with every other workspace's, and a flood queued there would hold up
        # the others' first tokens (bench/fairness.py).
        async with self._turns.held(found[1]):
            return await self._send_message(principal, request, handed, schedule, steer)

    async def _send_message(
        self,
        principal: Principal,
        request: pb.SendMessageRequest,
        handed: Handed | None,
        schedule: str = "",
        steer: Steered | None = None,
    ) -> pb.SendMessageResponse:
        found = names.match(names.CONVERSATION, request.conversation, "conversation")
        workspace_id, conversation_id = found[1], found[2]
        timeout = self._validate(request)
        # The key of the request as sent: a retry matches it before its recording
        # is transcribed again.
        key = _key(principal, request, steer)
        speech = request.HasField("speech") and spoken.wanted(request)
        if speech:
            request, flags, assistant, choice = await self._spoken(principal, request, workspace_id)
        else:
            flags = await self._screen(principal, request, workspace_id)
            assistant, choice = await self._choose(workspace_id, request, steer)
        policy = request.concurrency_policy or pb.CONCURRENCY_POLICY_ENQUEUE
        if key is not None:
            earlier = await self._store.replayed(key)
            if earlier is not None:
                return await self.replay(principal, request, earlier)
        if policy == pb.CONCURRENCY_POLICY_REJECT and self._scheduler.active_in(
            request.conversation
        ):
            raise_busy()
        # Refused before anything is stored; admission itself then cannot fail.
        self._scheduler.check_room(workspace_id)
        budgets = await self._budgets(principal, workspace_id, assistant, choice)
        if handed is not None and handed.empty():
            raise BudgetExhausted(
                "the message was refused: the budget its caller handed over has nothing left",
                subject=HEADER,
            )

        stored_message = await self._context.append_message(
            principal,
            _append_request(principal, request),
            timeout_s=FINISH_TIMEOUT_S,
        )
        run_id = names.new_id()
        run, job = _new_run(
            principal, request, stored_message, run_id, choice, assistant, flags, policy, timeout
        )
        _carry_trace(self._tracer, run, job)
        run.schedule = schedule
        _mark_steer(run, job, steer)
        if speech:
            # Kept with the job: a run taken over by another replica still speaks.
            run.speech.CopyFrom(spoken.echoed(request.speech))
            job.speech.CopyFrom(run.speech)
        if handed:
            job.handed_budget.CopyFrom(job_pb2.HandedBudget(**handed.capped()))
        created, replayed = await self._store.create(
            NewRun(
                run_id=run_id,
                workspace_id=workspace_id,
                conversation_id=conversation_id,
                creator=principal.user_id,
                api_key_id=principal.api_key_id,
                worker=self._limits.instance_id,
                run=run,
                job=job.SerializeToString(),
                idempotency=key,
                reject_if_active=policy == pb.CONCURRENCY_POLICY_REJECT,
            )
        )
        if replayed:
            return await self.replay(principal, request, created)
        if policy == pb.CONCURRENCY_POLICY_INTERRUPT:
            await self._supersede(request.conversation, run.name)
        active = Active(
            run=run,
            run_id=run_id,
            workspace_id=workspace_id,
            conversation_id=conversation_id,
            principal=principal,
            handler=choice.handler,
            job=job,
            feed=self._feeds.open(run.name),
            budgets=budgets,
        )
        self._live.runs[run.name] = active
        # QUEUED goes out with RUNNING if the run starts now (see ``Execution._begin``).
        active.held = True
        self._publishing.state_changed(active)
        response = pb.SendMessageResponse(message=stored_message)
        response.run.CopyFrom(run)
        # Admitted before anything else is awaited: a stored run is never left
        # unscheduled by a caller that goes away.
        self.admit(active, force=True)
        if active.task is None:  # it waits its turn: say so now
            self._publishing.release(active)
        _accepted(steer, active)
        if flags:
            await self._filtered(
                principal, request.conversation, "content", "", flags=flags, run=run.name
            )
        return response

    async def _budgets(
        self,
        principal: Principal,
        workspace_id: str,
        assistant: pb.Assistant | None,
        choice: Choice,
    ) -> Read | None:
        """The budgets the run will have; refuses the message when one has no room
        left, or a cost cap applies and its model has no price (nothing stored)."""
        if self._spending is None:
            return None
        read = await self._spending.read(
            workspace_id, assistant.name if assistant is not None else "", principal.api_key_id
        )
        if read.budgets:
            handler = choice.handler
            priced: bool | None = None
            if isinstance(handler, LlmHandler):
                settings = (
                    assistant.model
                    if assistant is not None and assistant.HasField("model")
                    else None
                )
                priced = handler.priced(settings)
            await self._spending.admit(read.budgets, actor=mapping.actor(principal), priced=priced)
        return read

    async def _supersede(self, conversation: str, name: str) -> None:
        """INTERRUPT: the conversation's active runs end RUN_SUPERSEDED, naming ``name``."""
        for earlier_name in self._scheduler.active_in(conversation):
            earlier_active = self._live.runs.get(earlier_name)
            if earlier_active is not None:
                await self._cancel(
                    earlier_active,
                    RunSuperseded(f"a newer message started {name}"),
                )

    def admit(self, active: Active, *, force: bool) -> None:
        """Hand ``active`` to the scheduler; the execution stage starts it in its turn."""
        active.queued_at = time.monotonic()
        log.info(
            "run queued",
            extra={
                "run": active.run.name,
                "handler": active.run.handler,
                "queued": self._scheduler.queued,
                "running": self._scheduler.running,
            },
        )
        ticket = Ticket(
            run_id=active.run.name,
            workspace=active.workspace_id,
            conversation=active.conversation,
            # The execution stage's own function, not a closure defined here: the
            # scheduler starts the run without coming back through admission.
            start=functools.partial(self._start, active),
        )
        active.ticket = ticket
        self._scheduler.admit(ticket, force=force)

    async def _choose(
        self, workspace_id: str, request: pb.SendMessageRequest, steer: Steered | None = None
    ) -> tuple[pb.Assistant | None, Choice]:
        """The message's assistant (if any) and the handler that answers it."""
        if steer is not None:
            # The target's assistant and handler: the steer is its message.
            target = steer.target
            return target.assistant, Choice(target.handler, f"steers {target.run.name}")
        assistant, choice = await route(
            self._assistants, self._router, workspace_id, request, request.message
        )
        if assistant is not None and request.handler:
            forced = assistant.handler or "handlers/llm"
            if handler_id(request.handler) != handler_id(forced):
                raise InvalidArgument(
                    "the handler is not the assistant's",
                    [FieldViolation("handler", f"must be empty or {forced} (the assistant's)")],
                )
        return assistant, choice

    def _validate(self, request: pb.SendMessageRequest) -> float:
        """Field checks; returns the run's timeout in seconds."""
        message = request.message
        violations: list[FieldViolation] = []
        if message.role not in (cpb.MESSAGE_ROLE_UNSPECIFIED, cpb.MESSAGE_ROLE_USER):
            violations.append(FieldViolation("message.role", "must be USER or unset"))
        if not message.parts:
            violations.append(FieldViolation("message.parts", "needs at least one part"))
        if request.handler and not HANDLER.fullmatch(request.handler):
            violations.append(FieldViolation("handler", "must be handlers/{id}"))
        if request.request_id and not names.REQUEST_ID.fullmatch(request.request_id):
            violations.append(FieldViolation("request_id", "must be 1-64 of [A-Za-z0-9_-]"))
        if request.concurrency_policy not in _POLICIES:
            violations.append(FieldViolation("concurrency_policy", "is not a known policy"))
        violations += steer_mode_violations(request.steer_mode)
        timeout = self._limits.default_timeout_s
        if request.HasField("timeout"):
            requested = timefields.seconds(request.timeout, "timeout")
            if requested <= 0:
                violations.append(FieldViolation("timeout", "must be positive"))
            timeout = min(requested, self._limits.max_timeout_s)
        if request.HasField("parameters") and request.parameters.ByteSize() > _MAX_PARAMETER_BYTES:
            violations.append(
                FieldViolation("parameters", f"is larger than {_MAX_PARAMETER_BYTES} bytes")
            )
        if request.HasField("speech"):
            workspace = names.CONVERSATION.fullmatch(request.conversation)
            violations += spoken.violations(request, workspace[1] if workspace else "")
        if violations:
            raise InvalidArgument("the request is invalid", violations)
        return timeout

    async def _spoken(
        self, principal: Principal, request: pb.SendMessageRequest, workspace_id: str
    ) -> tuple[pb.SendMessageRequest, list[str], pb.Assistant | None, Choice]:
        """``_screen`` and ``_choose`` for a message with speech (``runs/speech.py``): the
        rate limits, then the assistant's voice, then the recording transcribed (the
        request returned holds the transcript), then the filters on its text."""
        speech = spoken.configured(self._speech)
        limits = await self._quotas.limits(workspace_id)
        await self._rate_limit(principal, workspace_id, request.conversation, limits)
        # Routed on the message as sent: its transcript picks no handler (no /command).
        assistant, choice = await self._choose(workspace_id, request)
        settings = spoken.voice_of(assistant)
        if request.speech.transcribe:
            request = await spoken.transcribed(
                request,
                principal=principal,
                context=self._context,
                speech=speech,
                settings=settings,
            )
        flags = await self._filters(principal, request, workspace_id, limits)
        return request, flags, assistant, choice

    async def _screen(
        self, principal: Principal, request: pb.SendMessageRequest, workspace_id: str
    ) -> list[str]:
        """The pre-dispatch filters: size, rate limits, content policy, the workspace's
        concurrent runs; returns the flags."""
        limits = await self._quotas.limits(workspace_id)
        # The rate limits first: a flood of refused messages is still a flood.
        await self._rate_limit(principal, workspace_id, request.conversation, limits)
        return await self._filters(principal, request, workspace_id, limits)

    async def _filters(
        self,
        principal: Principal,
        request: pb.SendMessageRequest,
        workspace_id: str,
        limits: Limits,
    ) -> list[str]:
        """The filters after the rate limits: size, content policy, concurrent runs."""
        text = text_of(request.message)
        if len(text) > self._limits.max_input_chars:
            await self._filtered(principal, request.conversation, "size", RequestTooLarge.reason)
            raise RequestTooLarge(
                f"the message has {len(text)} characters; the limit is "
                f"{self._limits.max_input_chars}"
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
        # Last, and counted in the database: the cheap refusals cost no query.
        try:
            await self._quotas.check_active(principal, workspace_id, limits)
        except QuotaExceeded:
            await self._filtered(
                principal, request.conversation, "active-runs", QuotaExceeded.reason
            )
            raise
        return list(verdict.flags)

    async def _rate_limit(
        self, principal: Principal, workspace_id: str, conversation: str, limits: Limits
    ) -> None:
        checks = [
            (
                "rate-user",
                f"dispatch:user:{principal.user_id}",
                self._limits.messages_per_minute_per_user,
                "for you",
            ),
            (
                "rate-workspace",
                f"dispatch:workspace:{workspace_id}",
                limits.messages_per_minute,
                "in this workspace",
            ),
        ]
        own = limits.keys.get(principal.api_key_name) if principal.api_key_id else None
        if own is not None and own.messages_per_minute:
            checks.append(
                (
                    "rate-api-key",
                    f"dispatch:apikey:{workspace_id}:{principal.api_key_id}",
                    own.messages_per_minute,
                    "with this API key in this workspace",
                )
            )
        for kind, key, limit, where in checks:
            count, reset_s = await self._counters.hit(key, 60)
            if count > limit:
                await self._filtered(principal, conversation, kind, RateLimited.reason)
                raise RateLimited(
                    f"more than {limit} messages in a minute ({where}); slow down",
                    retry_after_s=max(reset_s, 1.0),
                )

    async def replay(
        self, principal: Principal, request: pb.SendMessageRequest, earlier: Stored
    ) -> pb.SendMessageResponse:
        """The answer to a retry: the first run, and the first message (the context
        service's own idempotency returns it for the same request)."""
        response = pb.SendMessageResponse(run=self._live.current(earlier.run))
        response.message.CopyFrom(
            await self._context.append_message(
                principal, _append_request(principal, request), timeout_s=FINISH_TIMEOUT_S
            )
        )
        return response

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
        """The MESSAGE_FILTERED event: what a filter refused or flagged."""
        event = mapping.filtered_event(
            principal, conversation, filter_name, reason, list(flags), run
        )
        try:
            await self._bus.publish(event)
        except SwitchboardError:
            log.warning("filter event not published", extra={"filter": filter_name})


def _key(
    principal: Principal, request: pb.SendMessageRequest, steer: Steered | None
) -> Idempotency | None:
    """The call's idempotency key: a steer's is its own call's (SteerRun's)."""
    if steer is not None:
        return steer.key
    return idempotency(principal.user_id, "SendMessage", request)


def _mark_steer(run: pb.Run, job: job_pb2.RunJob, steer: Steered | None) -> None:
    """A steer's run says what it steers (``Run.steer``, ``RunJob.steer_target``)."""
    if steer is None:
        return
    run.concurrency_policy = pb.CONCURRENCY_POLICY_STEER
    run.steer.target = steer.target.run.name
    run.steer.state = pb.STEER_STATE_ACCEPTED
    job.steer_target = steer.target.run.name


def _accepted(steer: Steered | None, active: Active) -> None:
    """A steer's run is admitted: its target takes it from here."""
    if steer is not None:
        steer.accepted(active)


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


def _new_run(
    principal: Principal,
    request: pb.SendMessageRequest,
    stored_message: cpb.Message,
    run_id: str,
    choice: Choice,
    assistant: pb.Assistant | None,
    flags: list[str],
    policy: pb.ConcurrencyPolicy.ValueType,
    timeout: float,
) -> tuple[pb.Run, job_pb2.RunJob]:
    """The QUEUED run a stored message starts, and the job its execution reads."""
    run = pb.Run(
        name=mapping.run_name(request.conversation, run_id),
        state=pb.RUN_STATE_QUEUED,
        handler=mapping.handler_name(choice.handler.capabilities.id),
        input_message=stored_message.name,
        creator=principal.user_name,
        routing_reason=choice.reason,
        concurrency_policy=policy,
        flags=flags,
        last_sequence=1,
        assistant=assistant.name if assistant is not None else "",
        steer_mode=request.steer_mode,
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
    job.steer_mode = request.steer_mode
    return run, job


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


def _carry_trace(tracer: Tracer | None, run: pb.Run, job: job_pb2.RunJob) -> None:
    """The run carries the current call's trace; its execution continues it from
    the job, in whichever process runs it (``Execution._execute_traced``)."""
    if tracer is None:  # tracing is off
        return
    ids = current_ids()
    if ids is not None:
        run.trace_id = ids[0]
        job.traceparent = traceparent()


def _strip_prefix(message: cpb.Message, prefix: str) -> None:
    for part in message.parts:
        if part.WhichOneof("part") == "text":
            if part.text.startswith(prefix):
                part.text = part.text[len(prefix) :].lstrip()
            return
