"""Admission: a SendMessageRequest becomes a stored message and a queued run,
or a precise error.

In order: the checks (``screening.py``: the fields, the call's idempotency key,
the rate limits and the pre-dispatch filters, the assistant and the handler;
a message with ``speech`` passes them through the stage that wraps them,
``speech.py``), a retry answered from the first attempt (the request id),
the room in the queue and in the budgets, the message stored through the
context service's contract with the QUEUED run and its job in the same
transaction (``ContextPort.append_message_with``: one commit, and a run refused
there, a busy conversation under REJECT, leaves no message either), and last the
run handed to the scheduler, whose start is the execution stage's
(``execution.py``). Nothing is stored before every check has passed, and the
run is handed over before anything else is awaited.

A process admits a few of a workspace's messages at a time (``Turns``,
``SWITCHBOARD_DISPATCHER_MAX_ADMITTING_PER_WORKSPACE``); the workspace's quotas
(``budgets/quotas.py``) are among the filters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Final

from google.protobuf import struct_pb2
from opentelemetry.trace import Tracer
from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher import mapping
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.budgets.quotas import Quotas
from switchboard.dispatcher.budgets.spending import Read, Spending
from switchboard.dispatcher.handlers.handed import HEADER, Handed
from switchboard.dispatcher.llm.handler import LlmHandler
from switchboard.dispatcher.ports.context import ContextPort, Started
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import FINISH_TIMEOUT_S, Common
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.records import NewRun, Stored, raise_busy
from switchboard.dispatcher.runs.core.scheduler import Scheduler, Ticket
from switchboard.dispatcher.runs.delegation.limits import Parent
from switchboard.dispatcher.runs.intake.content import ContentPolicy
from switchboard.dispatcher.runs.intake.screening import Screened, Screening, Steered
from switchboard.dispatcher.runs.intake.speech import Listening
from switchboard.dispatcher.voice.speaker import Speech
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.cache import Cache
from switchboard.platform.errors import (
    BudgetExhausted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    RunSuperseded,
    SwitchboardError,
)
from switchboard.platform.observe.telemetry import current_ids, traceparent
from switchboard.platform.security.policy import Principal
from switchboard.platform.store.storage import idempotency
from switchboard.platform.values import names
from switchboard.platform.values.resources import (
    ConversationName,
    HandlerName,
    MessageName,
    RunName,
)

#: A child admitted as its parent's deadline passes still gets this long: its parent's
#: own deadline ends the tree (and cancels the child) anyway.
_LEAST_CHILD_S: Final = 0.001

#: The run admission built and stored with its message, and the stored run (or, with
#: True, the earlier request's run, when the request id was seen before).
_Created = tuple[pb.Run, job_pb2.RunJob, Stored, bool]

log = logging.getLogger("switchboard.dispatcher")


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
        self._screening = Screening(
            limits=common.limits,
            counters=counters,
            content=content,
            assistants=assistants,
            router=common.router,
            quotas=quotas,
            bus=common.bus,
            speech=Listening(speech, context),
        )
        #: Budgets: a message they have no room for is refused (None: no budgets).
        self._spending = spending
        self._store = common.store
        self._context = context
        self._scheduler = scheduler
        self._feeds = common.feeds
        self._limits = common.limits
        self._publishing = publishing
        #: The execution stage's start, called by the scheduler when the run's turn comes.
        self._start = start
        #: The execution stage's cancel (an INTERRUPT message supersedes the active runs).
        self._cancel = cancel
        self._tracer = tracer
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
        parent: Parent | None = None,
    ) -> pb.SendMessageResponse:
        """``handed``: the budget a caller handed over (``x-switchboard-budget``), one
        more cap on the run; nothing left of it refuses the message. ``schedule``: the
        schedule whose tick sends it (``Run.schedule``; ``schedules/firing.py``).
        ``steer``: the message steers a live run (``steering.py``), through the same
        checks. ``parent``: the run whose delegate call sends it (``delegation/``)."""
        conversation = ConversationName.parse(request.conversation, "conversation")
        # A few of a workspace's messages at a time: admissions share the database's
        # writers with every other workspace's, and a flood queued there would hold up
        # the others' first tokens (bench/fairness.py).
        async with self._turns.held(conversation.workspace):
            return await self._send_message(
                principal, request, conversation, handed, schedule, steer, parent
            )

    async def _send_message(
        self,
        principal: Principal,
        request: pb.SendMessageRequest,
        conversation: ConversationName,
        handed: Handed | None,
        schedule: str = "",
        steer: Steered | None = None,
        parent: Parent | None = None,
    ) -> pb.SendMessageResponse:
        screened = await self._screening.screen(principal, request, conversation.workspace, steer)
        request = screened.request
        if screened.key is not None:
            earlier = await self._store.replayed(screened.key)
            if earlier is not None:
                return await self.replay(principal, request, earlier)
        budgets = await self._room(principal, conversation.workspace, screened, handed, parent)
        name = RunName(conversation.workspace, conversation.conversation, names.new_id())
        # Read here, not in the transaction's work (on PostgreSQL its span is current there).
        trace = _trace(self._tracer)

        def new_run(stored_message: cpb.Message) -> tuple[pb.Run, job_pb2.RunJob, NewRun]:
            run, job = _new_run(principal, stored_message, name, screened)
            if trace is not None:
                run.trace_id, job.traceparent = trace
            _mark_sender(run, job, schedule, steer, handed)
            _mark_parent(run, job, parent)
            return run, job, self._row(principal, name, run, job, screened, parent)

        def within(db: Session, stored_message: cpb.Message) -> _Created:
            run, job, new = new_run(stored_message)
            return run, job, *self._store.creating(new)(db)

        async def alone(stored_message: cpb.Message) -> _Created:
            run, job, new = new_run(stored_message)
            return run, job, *await self._store.create(new)

        appended = _append_request(principal, request)
        if steer is not None:
            # A steer joins its target's history, whichever branch is active now.
            appended.branch = steer.target.run.branch
        # The message and its run in one transaction: neither is stored without the other.
        stored_message, (run, job, created, replayed) = await self._context.append_message_with(
            principal,
            appended,
            Started(within, alone),
            timeout_s=FINISH_TIMEOUT_S,
        )
        if replayed:
            # A twin request's run (it won the request id meanwhile); the message is its.
            response = pb.SendMessageResponse(run=self._live.current(created.run))
            response.message.CopyFrom(stored_message)
            return response
        active, response = await self._started(
            principal, name, run, job, screened, budgets, stored_message
        )
        _accepted(steer, active)
        if screened.flags:
            await self._screening.filtered(
                principal, request.conversation, "content", "", flags=screened.flags, run=run.name
            )
        return response

    async def regenerate(
        self, principal: Principal, request: pb.RegenerateMessageRequest
    ) -> pb.RegenerateMessageResponse:
        """A new run answering what an earlier one answered, on a new branch beside
        its answer (docs/conversations.md, "Branches"): the same user message, the same
        assistant (at its current revision) or forced handler, every check of a sent
        message. The branch is made once every check has passed; the run is stored
        and handed over as a sent message's is."""
        answer_name = MessageName.parse(request.message, "message")
        conversation = answer_name.parent
        if request.concurrency_policy == pb.CONCURRENCY_POLICY_STEER:
            raise InvalidArgument(
                "a regenerated answer starts its own run",
                [FieldViolation("concurrency_policy", "cannot be STEER to regenerate")],
            )
        async with self._turns.held(conversation.workspace):
            answer = await self._context.message(
                principal, request.message, timeout_s=FINISH_TIMEOUT_S
            )
            earlier_name = RunName.parse_or_none(answer.run)
            if answer.role != cpb.MESSAGE_ROLE_ASSISTANT or earlier_name is None:
                raise FailedPrecondition("message: only an answer a run wrote can be regenerated")
            earlier = (
                await self._store.get(
                    earlier_name.workspace, earlier_name.conversation, earlier_name.run
                )
            ).run
            question = await self._context.message(
                principal, earlier.input_message, timeout_s=FINISH_TIMEOUT_S
            )
            send = pb.SendMessageRequest(
                conversation=str(conversation),
                message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=question.parts),
                assistant=earlier.assistant,
                handler="" if earlier.assistant else earlier.handler,
                request_id=request.request_id,
                concurrency_policy=request.concurrency_policy,
            )
            screened = await self._screening.screen(principal, send, conversation.workspace, None)
            # Keyed by this call, not by the message it stands for: a SendMessage's id
            # never answers a regeneration, nor the other way round.
            screened = dataclasses.replace(
                screened, key=idempotency(principal.user_id, "RegenerateMessage", request)
            )
            if screened.key is not None:
                replayed = await self._store.replayed(screened.key)
                if replayed is not None:
                    return pb.RegenerateMessageResponse(
                        run=self._live.current(replayed.run), message=question
                    )
            budgets = await self._room(principal, conversation.workspace, screened, None)
            forked = await self._context.create_branch(
                principal,
                cpb.CreateBranchRequest(conversation=str(conversation), after=question.name),
                timeout_s=FINISH_TIMEOUT_S,
            )
            name = RunName(conversation.workspace, conversation.conversation, names.new_id())
            run, job = _new_run(principal, question, name, screened)
            run.branch = forked.branch
            trace = _trace(self._tracer)
            if trace is not None:
                run.trace_id, job.traceparent = trace
            stored, replay = await self._store.create(
                self._row(principal, name, run, job, screened)
            )
            if replay:
                return pb.RegenerateMessageResponse(
                    run=self._live.current(stored.run), message=question
                )
            _, sent = await self._started(principal, name, run, job, screened, budgets, question)
            return pb.RegenerateMessageResponse(run=sent.run, message=question)

    def _row(
        self,
        principal: Principal,
        name: RunName,
        run: pb.Run,
        job: job_pb2.RunJob,
        screened: Screened,
        parent: Parent | None = None,
    ) -> NewRun:
        """The stored form of a new run, with its idempotency key."""
        return NewRun(
            run_id=name.run,
            workspace_id=name.workspace,
            conversation_id=name.conversation,
            creator=principal.user_id,
            api_key_id=principal.api_key_id,
            worker=self._limits.instance_id,
            run=run,
            job=job.SerializeToString(),
            idempotency=screened.key,
            reject_if_active=_policy(screened.request) == pb.CONCURRENCY_POLICY_REJECT,
            parent_id=parent.run.run if parent is not None else "",
            root_id=parent.root if parent is not None else "",
        )

    async def _started(
        self,
        principal: Principal,
        name: RunName,
        run: pb.Run,
        job: job_pb2.RunJob,
        screened: Screened,
        budgets: Read | None,
        message: cpb.Message,
    ) -> tuple[Active, pb.SendMessageResponse]:
        """A stored run made live: the runs it supersedes (INTERRUPT) cancelled, then
        handed over (``_hand_over``)."""
        if _policy(screened.request) == pb.CONCURRENCY_POLICY_INTERRUPT:
            await self._supersede(str(name.parent), run.name)
        active = Active(
            run=run,
            run_id=name.run,
            workspace_id=name.workspace,
            conversation_id=name.conversation,
            principal=principal,
            handler=screened.choice.handler,
            job=job,
            feed=self._feeds.open(run.name),
            budgets=budgets,
        )
        return active, self._hand_over(active, message)

    async def _room(
        self,
        principal: Principal,
        workspace_id: str,
        screened: Screened,
        handed: Handed | None,
        parent: Parent | None = None,
    ) -> Read | None:
        """The run's room, refused before anything is stored (admission itself then
        cannot fail): its conversation free under REJECT, the queue's room, the budgets
        (their read is the run's), what its caller handed over."""
        request = screened.request
        if _policy(request) == pb.CONCURRENCY_POLICY_REJECT and self._scheduler.active_in(
            request.conversation
        ):
            raise_busy()
        self._scheduler.check_room(workspace_id)
        budgets = await self._budgets(
            principal, workspace_id, screened, parent.lineage if parent is not None else ()
        )
        if handed is not None and handed.empty():
            raise BudgetExhausted(
                "the message was refused: the budget its caller handed over has nothing left",
                subject=HEADER,
            )
        return budgets

    async def _budgets(
        self,
        principal: Principal,
        workspace_id: str,
        screened: Screened,
        ancestors: Sequence[str] = (),
    ) -> Read | None:
        """The budgets the run will have (a delegate's run: its ancestors' assistants'
        too); refuses the message when one has no room left, or a cost cap applies and
        its model has no price (nothing stored)."""
        if self._spending is None:
            return None
        assistant = screened.assistant
        read = await self._spending.read(
            workspace_id,
            assistant.name if assistant is not None else "",
            principal.api_key_id,
            ancestors,
        )
        if read.budgets:
            handler = screened.choice.handler
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

    def _hand_over(self, active: Active, stored_message: cpb.Message) -> pb.SendMessageResponse:
        """The stored run becomes this process's and the scheduler's, before anything
        else is awaited: a caller that goes away never leaves it unscheduled. Returns
        the call's answer, with the run as it was when handed over."""
        self._live.runs[active.run.name] = active
        # QUEUED goes out with RUNNING if the run starts now (see ``Execution._begin``).
        active.held = True
        self._publishing.state_changed(active)
        response = pb.SendMessageResponse(message=stored_message)
        response.run.CopyFrom(active.run)
        self.admit(active, force=True)
        if active.task is None:  # it waits its turn: say so now
            self._publishing.release(active)
            if active.run.HasField("queued_behind"):
                # What it waits behind, as the scheduler said on taking it.
                response.run.queued_behind.CopyFrom(active.run.queued_behind)
        return response

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

    async def replay(
        self, principal: Principal, request: pb.SendMessageRequest, earlier: Stored
    ) -> pb.SendMessageResponse:
        """The answer to a retry: the first run, and the first message (the context
        service's own idempotency returns it for the same request)."""
        response = pb.SendMessageResponse(run=self._live.current(earlier.run))
        appended = _append_request(principal, request)
        if earlier.run.steer.target:
            # As the first attempt sent it: a steer joins its target's branch.
            appended.branch = earlier.run.branch
        response.message.CopyFrom(
            await self._context.append_message(principal, appended, timeout_s=FINISH_TIMEOUT_S)
        )
        return response


def _policy(request: pb.SendMessageRequest) -> pb.ConcurrencyPolicy.ValueType:
    return request.concurrency_policy or pb.CONCURRENCY_POLICY_ENQUEUE


def _mark_sender(
    run: pb.Run,
    job: job_pb2.RunJob,
    schedule: str,
    steer: Steered | None,
    handed: Handed | None,
) -> None:
    """What sent the message, as the run and its job keep it: the schedule whose tick
    sent it, the run it steers (``Run.steer``, ``RunJob.steer_target``), the budget
    its caller handed over."""
    run.schedule = schedule
    if steer is not None:
        run.concurrency_policy = pb.CONCURRENCY_POLICY_STEER
        run.steer.target = steer.target.run.name
        run.steer.state = pb.STEER_STATE_ACCEPTED
        job.steer_target = steer.target.run.name
    if handed:
        job.handed_budget.CopyFrom(job_pb2.HandedBudget(**handed.capped()))


def _mark_parent(run: pb.Run, job: job_pb2.RunJob, parent: Parent | None) -> None:
    """A delegate's run: linked to the run that asked it, with its place in the tree."""
    if parent is None:
        return
    run.parent = str(parent.run)
    run.parent_tool_call = parent.tool_call
    run.depth = parent.depth
    job.tree_root = parent.root
    job.lineage.extend(parent.lineage)
    if parent.deadline is not None:
        # What is left of the parent's deadline now: a child never outlives it. (The
        # request carries no duration: sent again after a crash, it is the same request
        # and admission answers with the child it started.)
        left = (parent.deadline - names.now()).total_seconds()
        job.timeout_seconds = max(_LEAST_CHILD_S, min(job.timeout_seconds, left))


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
        replaces=request.replaces,
    )


def _new_run(
    principal: Principal, stored_message: cpb.Message, name: RunName, screened: Screened
) -> tuple[pb.Run, job_pb2.RunJob]:
    """The QUEUED run a stored message starts, and the job its execution reads."""
    request, choice, assistant = screened.request, screened.choice, screened.assistant
    run = pb.Run(
        name=str(name),
        state=pb.RUN_STATE_QUEUED,
        handler=str(HandlerName(choice.handler.capabilities.id)),
        input_message=stored_message.name,
        creator=principal.user_name,
        routing_reason=choice.reason,
        concurrency_policy=_policy(request),
        flags=screened.flags,
        last_sequence=1,
        assistant=assistant.name if assistant is not None else "",
        assistant_revision=assistant.revision if assistant is not None else 0,
        steer_mode=request.steer_mode,
        # Its answers go where its message is, whichever branch is active by then.
        branch=stored_message.branch,
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
    job = _new_job(principal, stored_for_handler, params, screened.timeout, assistant)
    job.steer_mode = request.steer_mode
    if screened.speech is not None:
        # Kept with the job: a run taken over by another replica still speaks.
        run.speech.CopyFrom(screened.speech)
        job.speech.CopyFrom(run.speech)
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


def _trace(tracer: Tracer | None) -> tuple[str, str] | None:
    """The current call's trace id and ``traceparent``, which the run and its job carry:
    its execution continues the trace from the job, in whichever process runs it
    (``Execution._execute_traced``). None when tracing is off or outside a trace."""
    if tracer is None:
        return None
    ids = current_ids()
    return None if ids is None else (ids[0], traceparent())


def _strip_prefix(message: cpb.Message, prefix: str) -> None:
    for part in message.parts:
        if part.WhichOneof("part") == "text":
            if part.text.startswith(prefix):
                part.text = part.text[len(prefix) :].lstrip()
            return
