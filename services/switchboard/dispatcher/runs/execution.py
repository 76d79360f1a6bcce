"""Execution: one run's life through the ``core/lifecycle.py`` table.

When the scheduler starts a run (``launch``), one asyncio task checks the
caller may still write, reads the context window (and the assistant's tools),
drives the handler, turns its frames into the run's updates (``core/publishing.py``
shows and publishes them), runs its tool steps (pausing for approvals), stores
the answer as an assistant message and ends the run. A handler that acts
outside the process is called inside the run's journal (``durable.py``, one
wrapper around the handler's step), so a run taken over after a crash
continues where it was.

Cancellation is the task's: ``cancel`` cancels the task, which raises
``CancelledError`` inside the handler (a remote handler's gRPC call or the
LLM's HTTP response is closed by that), and the run ends CANCELLED. The
deadline is an ``asyncio.timeout`` around the same task, stopped while the run
waits for approvals (``core/clock.py``), and remote handlers get the remaining
time as their gRPC deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from opentelemetry.trace import StatusCode, Tracer

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher import mapping
from switchboard.dispatcher.budgets.ledger import Record
from switchboard.dispatcher.budgets.spending import Read, Spending
from switchboard.dispatcher.handlers.base import FileReader, HandleCall, HandlerFailure
from switchboard.dispatcher.handlers.handed import Handed
from switchboard.dispatcher.llm.retrieval import (
    TOOL_NAME,
    SearchMemory,
    retrieval_options,
    search_memory_definition,
)
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.runs.core.answers import Renamed, answering
from switchboard.dispatcher.runs.core.clock import RunClock
from switchboard.dispatcher.runs.core.lifecycle import Active
from switchboard.dispatcher.runs.core.live import (
    FINISH_TIMEOUT_S,
    MAX_REASON_CHARS,
    MAX_UPDATES,
    SEQUENCE_BLOCK,
    Common,
    handler_label,
    queued_again,
)
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.scheduler import Scheduler, Ticket
from switchboard.dispatcher.runs.core.steers import SteerBook
from switchboard.dispatcher.runs.core.store import TERMINAL, Charged
from switchboard.dispatcher.runs.delegation.delegation import NO_OFFER, Delegation, Offer
from switchboard.dispatcher.runs.durable import Durable
from switchboard.dispatcher.tools.journal import Journal, cover
from switchboard.dispatcher.tools.port import ToolPort
from switchboard.dispatcher.tools.runner import BuiltinTool, RunTools, ToolLimits, offered_tools
from switchboard.dispatcher.voice.speaker import Speaker, Speech
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform import background
from switchboard.platform.errors import (
    DeadlineExceeded,
    HandlerFailed,
    InternalError,
    RunInterrupted,
    SwitchboardError,
)
from switchboard.platform.observe.metrics import Metrics, run_state_label
from switchboard.platform.observe.telemetry import parent_from
from switchboard.platform.security.policy import Permission, Policy
from switchboard.platform.store.db import DatabaseUnavailable, is_outage
from switchboard.platform.values import names
from switchboard.platform.values.resources import MessageName

log = logging.getLogger("switchboard.dispatcher")

#: Largest delta made of merged ones (a bigger one goes out as it is).
_MAX_MERGED_DELTA_CHARS: Final = 16 * 1024
#: How long a cancelled run may go on in its handler before it is cancelled again
#: (a wait inside it dropped the cancel: see ``Execution._cancel``).
_RECANCEL_S: Final = 1.0


@dataclass(frozen=True)
class _Read:
    """What a run read before its handler (``Execution._read``)."""

    window: cpb.ContextWindow
    #: The tools its assistant offers (and the memory search, if it offers that).
    definitions: list[handler_pb2.ToolDefinition]
    #: The budgets that apply (None: no budgets here).
    budgets: Read | None


def step_limit(limits: ToolLimits, assistant: pb.Assistant | None) -> int:
    """Tool steps a run may take: the server's limit, or its assistant's lower one."""
    limit = limits.max_steps
    if assistant is not None and assistant.max_tool_steps:
        limit = min(limit, assistant.max_tool_steps)
    return limit


class Execution:
    def __init__(
        self,
        *,
        common: Common,
        publishing: Publishing,
        scheduler: Scheduler,
        context: ContextPort,
        policy: Policy,
        tools: ToolPort,
        tool_limits: ToolLimits,
        metrics: Metrics | None,
        tracer: Tracer | None,
        spending: Spending | None = None,
        speech: Speech | None = None,
        steers: SteerBook | None = None,
        delegation: Delegation | None = None,
    ) -> None:
        self._live = common.live
        #: Delegates offered as tools, and the child runs they start (``delegation/``).
        self._delegation = delegation
        #: The replica's steers (None: runs take none; their steers run as queued runs).
        self._steers = steers
        #: The server's speech (None: no engine; a run asked to speak answers in text).
        self._speech = speech
        self._spending = spending
        self._publishing = publishing
        self._scheduler = scheduler
        self._store = common.store
        self._feeds = common.feeds
        self._context = context
        self._policy = policy
        self._router = common.router
        self._limits = common.limits
        self._tools = tools
        self._tool_limits = tool_limits
        self._metrics = metrics
        # None when tracing is off: runs then get no span (decided once, at the build).
        self._tracer = tracer
        #: The journal around each run's handler step (``durable.py``).
        self._durable = Durable(live=common.live, store=common.store, limits=common.limits)
        # Each cancelled run's task, and the loop that cancels it again until it ends
        # (``_cancel``).
        self._cancelling: dict[asyncio.Task[None], asyncio.Task[None]] = {}

    def launch(self, active: Active, _ticket: Ticket) -> asyncio.Task[None] | None:
        """The scheduler's start (``Ticket.start``): the run's task begins; its end
        gives the scheduler its slot back."""
        if self._live.closing:
            # Stopping: it stays QUEUED in the database and runs after the restart.
            self._publishing.release(active)
            return None
        # Spawned: _execute maps every failure of the run, but one of its end
        # (storing it) must still be logged, never left unread in the task.
        active.task = background.spawn(
            self._execute(active)
            if self._tracer is None
            else self._execute_traced(self._tracer, active),
            name=f"run-{active.run_id}",
            logger=log,
        )
        active.task.add_done_callback(lambda _task: self._task_ended(active))
        return active.task

    def _task_ended(self, active: Active) -> None:
        """A run's task ended: an attempt given up to another instance leaves this
        process however its task ended (one cut short never reached ``finish``)."""
        if active.retired and self._live.runs.get(active.run.name) is active:
            self._let_go(active)

    async def stop(self) -> None:
        """Stop every run this process holds; each ends by the recovery policy."""
        tasks: list[asyncio.Task[None]] = list(self._cancelling.values())
        for loop in tasks:
            loop.cancel()
        for active in list(self._live.runs.values()):
            if active.task is not None:
                active.task.cancel()
                tasks.append(active.task)
        if tasks:
            await asyncio.wait(tasks, timeout=FINISH_TIMEOUT_S)

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
            await self.finish(active, active.cancel_error)
            return
        error: SwitchboardError | None = None
        try:
            active.to(pb.RUN_STATE_RUNNING)
            self._started(active)
            allowed = active.begin_deadline(names.now())
            # Watchers see RUNNING now (the feed); storing it and publishing
            # its events wait until the run has read its context (``_begin``).
            active.held = True
            self._publishing.state_changed(active)
            output, result = await self._drive(active, allowed)
            run.output_message = output.name
            # What its budgets were charged, every attempt's, is the run's usage at
            # least: a model call charged before a crash, whose step the journal
            # never got, was asked again and charged again.
            run.usage.CopyFrom(_covered(result.usage, self._charged(active)))
            final = pb.RunUpdate()
            _show(final.result, result, output)
            self._publishing.emit(active, final, with_end=True)
            active.to(pb.RUN_STATE_SUCCEEDED)
        except asyncio.CancelledError:
            error = active.cancel_error
            if error is None:  # this process is stopping
                if run.state == pb.RUN_STATE_REQUIRES_ACTION:
                    # Stored paused with its steps: the restart resumes it.
                    await self._leave_paused(active)
                    return
                if self._limits.recovery != "fail" and run.state == pb.RUN_STATE_RUNNING:
                    await self._requeue_at_shutdown(active)
                    return
                error = RunInterrupted("the dispatcher stopped while the run was running")
            interrupted = isinstance(error, RunInterrupted)
            active.to(pb.RUN_STATE_FAILED if interrupted else pb.RUN_STATE_CANCELLED)
        except TimeoutError:
            error = DeadlineExceeded(f"the run did not finish within {active.timeout_s:g} s")
            active.to(pb.RUN_STATE_DEADLINE_EXCEEDED)
        except HandlerFailure as failure:
            error = HandlerFailed(failure.message[:MAX_REASON_CHARS])
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
            await self._unwind(active)
        await self.finish(active, error)

    async def _unwind(self, active: Active) -> None:
        """The run's task is done with its runner, speech and budget: holds of steps
        that did not settle (cancelled, failed) go back."""
        active.tools = None
        if active.speaker is not None:
            if active.run.state == pb.RUN_STATE_CANCELLED:
                await self._store_heard(active)
            await active.speaker.stop()
            active.speaker = None
        budget = active.budget
        if budget is not None:
            await asyncio.shield(budget.close())
            active.charged = self._charged(active)
            active.budget = None
        assistant = active.assistant
        if (
            active.recovered
            and self._delegation is not None
            and assistant is not None
            and assistant.delegates
            and active.run.state in TERMINAL
        ):
            # Children an earlier attempt started and this one never followed end too.
            emit = functools.partial(self._publishing.emit, active)
            with contextlib.suppress(SwitchboardError):
                await asyncio.shield(self._delegation.end_orphans(active, emit))

    async def _drive(
        self, active: Active, allowed_s: float
    ) -> tuple[cpb.Message, handler_pb2.HandleResult]:
        """Context, handler, answer: everything a run does under its deadline
        (``allowed_s`` from now)."""
        clock = RunClock(allowed_s)
        async with asyncio.timeout(allowed_s) as scope:
            clock.scope = scope
            read = await self._read(active, clock.left)
            self._begin(active)
            if active.handler.kind != pb.HANDLER_KIND_BUILTIN:
                await self._start_stored(active)
            result = await self._durable.around(
                active,
                functools.partial(self._handle, active, clock, read),
                functools.partial(self._replayed, active),
            )
            return await self._answer(active, result, clock.left)

    async def _read(self, active: Active, left: Callable[[], float]) -> _Read:
        """What the run reads before its handler: its context window, the tools its
        assistant offers, the budgets that apply."""
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
                    conversation=active.conversation,
                    token_budget=budget,
                    retrieval=retrieval_options(assistant.retrieval, budget)
                    if assistant is not None and assistant.retrieval.enabled
                    else None,
                ),
                timeout_s=left(),
            ),
        )
        definitions: list[handler_pb2.ToolDefinition] = []
        # Admission's read of the budgets, when nothing changed here since: the
        # common case waits for nothing more than the window (each coroutine
        # gathered is one more task on the path to the first delta).
        budgets = self._admitted_budgets(active)
        reread = self._spending is not None and budgets is None
        delegates = (
            self._delegation is not None
            and assistant is not None
            and (assistant.delegates or assistant.handoffs)
        )
        if assistant is not None and (
            assistant.tools or assistant.retrieval.search_tool or delegates
        ):
            (_, window), (definitions, _), read, offer = await asyncio.gather(
                reads,
                offered_tools(self._tools, active.principal, assistant),
                self._budgets(active) if reread else _nothing(),
                self._offer(active),
            )
            budgets = read if reread else budgets
            if assistant.retrieval.search_tool:
                definitions.append(search_memory_definition())
            definitions.extend(offer.definitions)
        else:
            if reread:
                (_, window), budgets = await asyncio.gather(reads, self._budgets(active))
            else:
                _, window = await reads
            offer = await self._offer(active)
        if offer.since is not None:
            _since(window, offer.since)
        return _Read(window, definitions, budgets)

    async def _offer(self, active: Active) -> Offer:
        """What delegation adds to the run's read (one hook: its tools, and where the
        history its model sees begins); nothing without delegation."""
        if self._delegation is None:
            return NO_OFFER
        return await self._delegation.offer(active)

    async def _handle(
        self, active: Active, clock: RunClock, read: _Read, journal: Journal | None
    ) -> handler_pb2.HandleResult:
        """The handler's step: its call (with the run's budget, speech and tool
        runner) relayed into the run's updates; returns its result, with the run's
        tool steps stored and their cost on its usage."""
        request = self._request(active, read)
        if read.budgets is not None and self._spending is not None:
            active.budget = self._spending.run_budget(
                read.budgets,
                active.run,
                active.workspace_id,
                active.principal.api_key_id,
                _RunHost(self, active, clock),
                _handed(active.job),
                record=self._charge(active),
                ancestors=active.job.lineage,
            )
        if active.job.speech.speak:
            self._speak(active)
        runner = self._runner(active, read.definitions, clock, journal)
        if runner is not None:
            request.max_tool_steps = step_limit(self._tool_limits, active.assistant)
        clock.call = HandleCall(
            request,
            clock.deadline,
            tools=runner,
            budget=active.budget,
            files=self._file_reader(active, clock.left),
            model_call=journal.model_call if journal is not None else None,
            steers=self._steers.source(active) if self._steers is not None else None,
        )
        result = await self._relay(active, clock.call)
        if runner is not None:
            await runner.drain()
            if runner.spent_micros:
                # Priced tool calls are the run's cost too.
                result.usage.cost_micros += runner.spent_micros
                result.usage.estimated_cost_usd = result.usage.cost_micros / 1e6
        return result

    @staticmethod
    def _request(active: Active, read: _Read) -> handler_pb2.HandleRequest:
        """What the handler is asked: the message in its context, with the assistant's
        instructions and model."""
        run = active.run
        request = handler_pb2.HandleRequest(
            run=run.name,
            message=active.message,
            context=read.window,
            parameters=active.parameters,
            user=active.principal.user_name,
            flags=run.flags,
            tools=read.definitions,
            steps=active.job.steps,
        )
        assistant = active.assistant
        if assistant is not None:
            request.instructions = assistant.instructions
            if assistant.HasField("model"):
                request.model.CopyFrom(assistant.model)
        return request

    async def _answer(
        self, active: Active, result: handler_pb2.HandleResult, left: Callable[[], float]
    ) -> tuple[cpb.Message, handler_pb2.HandleResult]:
        """Store ``result`` as the run's answer (spoken first, if the run speaks)."""
        run = active.run
        answer = cpb.Message(
            role=cpb.MESSAGE_ROLE_ASSISTANT,
            author=run.handler,
            parts=result.parts,
            run=run.name,
        )
        if active.speaker is not None:
            # The answer is stored once it has been spoken (under the deadline).
            await _spoken(active.speaker, result, answer)
        request = cpb.AppendMessageRequest(
            parent=active.conversation, message=answer, request_id=f"run-{active.run_id}"
        )
        if self._context.shares_transactions and not any(
            part.HasField("file") for part in answer.parts
        ):
            # Stored with the run's end, in its transaction (``finish``): one write fewer
            # a run, and never an answer without its end or an end without its answer.
            # (An answer's files are stored first: the result shows their names.)
            message_id = names.new_id()
            active.answer = (request, message_id)
            name = MessageName(active.workspace_id, active.conversation_id, message_id)
            return cpb.Message(name=str(name), parts=answer.parts), result
        output = await self._context.append_message(active.principal, request, timeout_s=left())
        return output, result

    def _replayed(self, active: Active, result: handler_pb2.HandleResult) -> None:
        """An answer journaled before a crash, shown again (this attempt's watchers
        start over) and spoken if the run speaks; it is stored as the run's message
        with the first attempt's request id."""
        text = "".join(part.text for part in result.parts if part.HasField("text"))
        if active.job.speech.speak:
            self._speak(active)
        if text:
            update = pb.RunUpdate()
            update.delta.text = text
            self._publishing.emit(active, update)
            if active.speaker is not None:
                active.speaker.feed(text)

    def _speak(self, active: Active) -> None:
        """The run speaks its answer as it is written (``voice/speaker.py``)."""
        speech = self._speech
        if speech is None:
            # Admitted where an engine is set up, run where none is (a takeover).
            log.warning(
                "a run asked to speak on a replica without a speech engine; it answers in text",
                extra={"run": active.run.name},
            )
            return
        assistant = active.assistant
        voiced = assistant is not None and assistant.HasField("voice")
        settings = assistant.voice if voiced and assistant is not None else None
        voice = speech.speaking(settings, active.job.speech.output_format.sample_rate_hz)
        emit = self._publishing.emit

        def spoken(update: pb.RunUpdate) -> int:
            emit(active, update)
            return update.sequence

        def failed(why: str) -> None:
            update = pb.RunUpdate()
            update.progress.stage = f"speech stopped: {why}"[:MAX_REASON_CHARS]
            update.progress.fraction = -1
            emit(active, update)

        active.speaker = Speaker(voice, spoken, failed)

    async def _store_heard(self, active: Active) -> None:
        """A speaking run cancelled (or superseded): its speech stopped at once
        (``cancel``), and the text its listener heard is stored as its answer, the
        rest marked unspoken."""
        speaker = active.speaker
        if speaker is None:
            return
        await speaker.stop()
        if not speaker.text.strip():
            return
        text, metadata = speaker.record(interrupted=True, through=active.heard_through)
        answer = cpb.Message(
            role=cpb.MESSAGE_ROLE_ASSISTANT,
            author=active.run.handler,
            parts=[cpb.ContentPart(text=text)],
            run=active.run.name,
        )
        answer.metadata.CopyFrom(metadata)
        try:
            output = await self._context.append_message(
                active.principal,
                cpb.AppendMessageRequest(
                    parent=active.conversation, message=answer, request_id=f"run-{active.run_id}"
                ),
                timeout_s=FINISH_TIMEOUT_S,
            )
        except SwitchboardError as exc:
            log.warning(
                "the heard part of a cancelled run's answer was not stored",
                extra={"run": active.run.name, "error": type(exc).__name__},
            )
            return
        active.run.output_message = output.name

    def _file_reader(self, active: Active, left: Callable[[], float]) -> FileReader:
        """Reads a file of the run's window as the run's user, within its deadline."""
        context, principal = self._context, active.principal

        async def read(name: str, limit: int) -> bytes:
            return await context.download(principal, name, limit=limit, timeout_s=left())

        return read

    def _admitted_budgets(self, active: Active) -> Read | None:
        """Admission's read of the run's budgets if no budget of its workspace changed
        here since (None: there is none, or it must be read again)."""
        admitted = active.budgets
        if (
            self._spending is not None
            and admitted is not None
            and self._spending.fresh(admitted, active.workspace_id)
        ):
            return admitted
        return None

    async def _budgets(self, active: Active) -> Read | None:
        """The budgets that apply to the run, read at its start (a recovered run, or
        one whose workspace's budgets changed since admission)."""
        if self._spending is None:
            return None
        return await self._spending.read(
            active.workspace_id,
            active.run.assistant,
            active.principal.api_key_id,
            active.job.lineage,
        )

    def _runner(
        self,
        active: Active,
        definitions: Sequence[handler_pb2.ToolDefinition],
        clock: RunClock,
        journal: Journal | None,
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
        if journal is None:
            journal = self._durable.unresumed(active)
        runner = RunTools(
            _RunHost(self, active, clock),
            self._tools,
            self._tool_limits,
            principal=active.principal,
            run=active.run,
            job=active.job,
            definitions=definitions,
            workspace_id=active.workspace_id,
            open_workspace=interactive and assistant is None,
            max_steps=step_limit(self._tool_limits, assistant),
            deadline=clock.left,
            journal=journal,
            budget=active.budget,
            builtins=self._builtins(active, definitions),
        )
        if journal.resuming:
            runner.restore()
        active.tools = runner
        return runner

    def _builtins(
        self, active: Active, definitions: Sequence[handler_pb2.ToolDefinition]
    ) -> dict[str, BuiltinTool]:
        """The tools the dispatcher runs itself for ``active``: ``search_memory``, its
        assistant's delegates."""
        assistant = active.assistant
        found: dict[str, BuiltinTool] = {}
        if assistant is None:
            return found
        if assistant.retrieval.search_tool:
            found[TOOL_NAME] = SearchMemory(self._context, active.conversation)
        if self._delegation is not None and (assistant.delegates or assistant.handoffs):
            emit = functools.partial(self._publishing.emit, active)
            found.update(self._delegation.builtins(active, emit, definitions))
        return found

    async def _relay(self, active: Active, call: HandleCall) -> handler_pb2.HandleResult:
        """The handler's frames into the run's updates; returns its result."""
        frames = active.handler.handle(call)
        emit = self._publishing.emit
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
                emit(active, update)

        runner = active.tools
        saw_text = _text_sink(runner, active.speaker)
        if runner is not None:
            runner.flush = flush  # a tool update goes after the text before it
        try:
            async for frame in frames:
                if active.feed.last % SEQUENCE_BLOCK >= MAX_UPDATES:
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
                emit(active, update)
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
        those reads wait for the interpreter (decisions 39 has the measurement).
        Not awaited here: a built-in handler starts
        while RUNNING is being stored (writes are committed in order, so it
        lands before the final state), and a crash before it lands leaves the
        run QUEUED, run again as one that never started. Handlers that act
        outside the process wait for it (``_start_stored``).
        """
        if not active.held or active.retired:
            return
        started = pb.Run()
        started.CopyFrom(active.run)
        active.saving = asyncio.ensure_future(
            self._store.save(active.run_id, started, owner=self._limits.instance_id)
        )
        self._publishing.release(active)

    async def finish(self, active: Active, error: SwitchboardError | None) -> None:
        """The run's end: stored, announced, and its place given back."""
        run = active.run
        self._publishing.release(active)
        if self._steers is not None:
            # Steers it did not take run as queued runs; its watchers hear so first.
            self._steers.target_ended(active)
        await self._started_saved(active)
        if active.retired:
            # Its new owner runs or ends it: nothing of this attempt is stored or shown.
            self._let_go(active)
            return
        if error is not None:
            run.error.CopyFrom(mapping.error_status(error))
        run.end_time.FromDatetime(names.now())
        # No result carries what a failed or cancelled run spent: its charges do, so
        # the run (and QueryUsage) says what its budgets were charged.
        _covered(run.usage, self._charged(active))
        if active.journal is not None:
            # Charges say nothing of prices: the journal counts the unpriced calls.
            run.usage.unpriced_calls = max(run.usage.unpriced_calls, active.journal.unpriced_calls)
        if await self._persist_end(active) is False:
            active.retired = True  # another instance's: a call on it goes there
        self._feeds.close(active.feed)
        self._forget(active)
        self._ended(active, error)

    async def _persist_end(self, active: Active) -> bool | None:
        """The end stored (with the answer, where it waits), then announced."""
        around = answering(active, self._context, self._store)
        try:
            return await self._publishing.persist(active, "end", around=around)
        except Renamed as renamed:
            active.run.output_message = renamed.name
            return await self._publishing.persist(active, "end")
        except SwitchboardError as refused:
            if around is None:
                raise
            return await self._answer_refused(active, refused)
        finally:
            active.answer = None

    async def _answer_refused(self, active: Active, refused: SwitchboardError) -> bool | None:
        """The context service refused the answer (its conversation went away, a limit
        of its own): the run fails saying why, as it did when the answer was stored
        before the end. Its watchers saw the result; its end says it was not kept."""
        log.warning(
            "a run's answer was refused; the run fails",
            extra={"run": active.run.name, "error": type(refused).__name__},
        )
        run = active.run
        # Set, not moved (``Active.to``): its end was not stored, so SUCCEEDED never was.
        run.state = pb.RUN_STATE_FAILED
        run.ClearField("output_message")
        run.error.CopyFrom(mapping.error_status(refused))
        active.ending.clear()  # the result's event: the log never says it
        return await self._publishing.persist(active, "end")

    def _forget(self, active: Active) -> None:
        """``active`` leaves this process's live runs (if it still stands for its run)."""
        if self._live.runs.get(active.run.name) is active:
            del self._live.runs[active.run.name]

    def _let_go(self, active: Active) -> None:
        self._feeds.close(active.feed)
        self._forget(active)
        log.info("run given up to its new owner", extra={"run": active.run.name})

    def _charged(self, active: Active) -> Charged:
        """What the run's budgets were charged so far, every attempt's."""
        budget = active.budget
        if budget is None:
            return active.charged
        spent = budget.charged
        return active.charged + Charged(spent.cost_micros, spent.input_tokens, spent.output_tokens)

    def _charge(self, active: Active) -> Record:
        """The run's record of each settlement of its budgets, in the settlement's
        transaction (``RunStore.charging``): refused once another instance owns it."""
        return self._store.charging(
            active.run_id, self._limits.instance_id, given_up=lambda: active.retired
        )

    def retire(self, actives: Sequence[Active]) -> list[asyncio.Task[None]]:
        """Let go of runs another instance took over while this one held them (its
        lease lapsed): none starts a write again (journal, charge, state), a queued
        one leaves the queue and a running or paused one's task is cancelled, so
        its slot and its conversation are free for this process's own runs.
        Returns the tasks still ending (a write of theirs may be in flight)."""
        tasks = []
        for active in actives:
            active.retired = True
            if active.ticket is not None and self._scheduler.withdraw(active.ticket):
                active.ticket = None
                self._publishing.release(active)
                self._let_go(active)
                continue
            task = active.task
            if task is None:
                continue
            if task.done():
                # Its task ended without letting go of it (cut short as it ended):
                # nothing else will, and it would keep its run from coming back here.
                self._let_go(active)
                continue
            if active.run.state not in TERMINAL:
                if active.cancel_error is None:
                    active.cancel_error = RunInterrupted(
                        "another dispatcher instance took the run over"
                    )
                self._cancel(active, task)
            # else it is ending already: its end finds it retired (or its write
            # refused) and lets go. A cancel would cut that end short, and the
            # attempt would stay here for good, its run never recovered here again.
            tasks.append(task)
        return tasks

    def _started(self, active: Active) -> None:
        """Log and measure a run's start (its queue wait)."""
        if self._steers is not None:
            # A steer's run that starts was not taken by its target: it answers itself.
            self._steers.starting(active)
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
            label = handler_label(self._router, active.handler.capabilities.id, active.handler)
            self._metrics.run_ended(label, run_state_label(state), duration)
        usage = run.usage
        if self._metrics is not None:
            self._metrics.spend(usage.model, usage.cost_micros)
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
                # Shielded: a cancel of the run leaves the save for ``finish`` to await.
                stored = await asyncio.shield(saving)
            except SwitchboardError:
                log.warning(
                    "could not store the start of a run; retrying", extra={"run": active.run.name}
                )
            active.saving = None
        if stored is None:
            stored = await self._publishing.save_until_stored(active, "start", None)
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
        self._publishing.release(active)
        await self._started_saved(active)
        run = active.run
        active.to(pb.RUN_STATE_QUEUED)
        queued_again(run)
        await self._publishing.persist(active, "requeue")
        log.info("run requeued at shutdown", extra={"run": run.name, "handler": run.handler})

    async def _leave_paused(self, active: Active) -> None:
        """Stopping while it waits for approvals: it stays stored as it is."""
        self._publishing.release(active)
        await self._started_saved(active)
        self._feeds.close(active.feed)
        self._forget(active)

    # -- pausing for approvals (the runner's host) ---------------------------------------

    async def pause(self, active: Active) -> None:
        if active.retired:
            raise RunInterrupted("another dispatcher instance took the run over")
        await self._started_saved(active)
        active.to(pb.RUN_STATE_REQUIRES_ACTION)
        if active.ticket is not None:
            self._scheduler.paused(active.ticket)
        await self._publishing.persist(active, "pause", job=True)

    async def resume(self, active: Active) -> None:
        if active.retired:
            raise RunInterrupted("another dispatcher instance took the run over")
        active.to(pb.RUN_STATE_RUNNING)
        if active.ticket is not None:
            self._scheduler.resumed(active.ticket)
        await self._publishing.persist(active, "resume")

    def append(self, active: Active, request: cpb.AppendMessageRequest) -> Awaitable[cpb.Message]:
        return self._context.append_message(active.principal, request, timeout_s=FINISH_TIMEOUT_S)

    # -- cancelling -------------------------------------------------------------------

    async def cancel(
        self, active: Active, error: SwitchboardError, *, heard_through: int = 0
    ) -> None:
        """End ``active`` with ``error``: withdrawn if still queued, else its task
        is cancelled; returns once the run is recorded (not longer).
        ``heard_through``: the last speech update its listener heard (0: all sent)."""
        if active.run.state in TERMINAL:
            return
        if active.speaker is not None and active.cancel_error is None:
            # Before anything is awaited: not one more chunk of speech goes out.
            active.heard_through = heard_through
            active.speaker.halt()
        if active.ticket is not None and self._scheduler.withdraw(active.ticket):
            active.to(pb.RUN_STATE_CANCELLED)
            active.ticket = None
            await self.finish(active, error)
            return
        task = active.task
        if task is None or task.done():
            return
        if active.cancel_error is None:
            active.cancel_error = error
        self._cancel(active, task)
        # Wait for the handler to stop and the run to be recorded, not longer:
        # CancelRun answers with the terminal run.
        await asyncio.wait([task], timeout=FINISH_TIMEOUT_S)

    def _cancel(self, active: Active, task: asyncio.Task[None]) -> None:
        """Cancel the run's task now, and again each ``_RECANCEL_S`` while its run is
        still in its handler. A wait can drop a cancel: on Python 3.11
        ``asyncio.wait_for`` returns what it waited for when that finishes as the
        cancel arrives (a database driver's, say), and a run at a budget's cap or
        waiting for approvals then waits on, its CancelRun answered with the run
        still paused and its conversation's next runs queued behind it for good.
        Once the run's state is final the task is ending (storing its end), and a
        cancel would cut that short. One not started yet sees its ``cancel_error``
        as it starts."""
        if not active.started or active.run.state in TERMINAL:
            return
        task.cancel()
        if task not in self._cancelling:  # else already cancelled again as long as it takes
            self._cancelling[task] = background.spawn(
                self._cancel_again(active, task), name=f"{task.get_name()}-cancel", logger=log
            )

    async def _cancel_again(self, active: Active, task: asyncio.Task[None]) -> None:
        try:
            while not task.done():
                await asyncio.wait([task], timeout=_RECANCEL_S)
                if not task.done() and active.run.state not in TERMINAL:
                    task.cancel()
        finally:
            self._cancelling.pop(task, None)


def _since(window: cpb.ContextWindow, since: dt.datetime) -> None:
    """Leave out of ``window`` the messages from before ``since`` (a handoff whose target
    sees only what came from it on); memory and retrieved passages stay."""
    kept = [
        item
        for item in window.included
        if not item.HasField("message") or item.message.create_time.ToDatetime(dt.UTC) >= since
    ]
    if len(kept) < len(window.included):
        del window.included[:]
        window.included.extend(kept)
        window.total_tokens = sum(item.token_count for item in kept)


async def _nothing() -> None:
    return None


def _covered(usage: handler_pb2.Usage, charged: Charged) -> handler_pb2.Usage:
    """``usage``, raised to at least what the run's budgets were ``charged``."""
    return cover(usage, charged.cost_micros, charged.input_tokens, charged.output_tokens)


def _ignore(_text: str) -> None:
    pass


async def _spoken(speaker: Speaker, result: handler_pb2.HandleResult, answer: cpb.Message) -> None:
    """Wait until the answer is all spoken; its metadata then says what was."""
    if not speaker.text:
        # A handler that sent its answer whole, with no deltas: spoken whole.
        speaker.feed("".join(p.text for p in result.parts if p.HasField("text")))
    speaker.finish()
    await speaker.wait()
    answer.metadata.CopyFrom(speaker.record(interrupted=False)[1])


def _text_sink(runner: RunTools | None, speaker: Speaker | None) -> Callable[[str], None]:
    """What sees each piece of the answer's text as the handler yields it: the tool
    runner (the text said before a step's calls) and the speaker."""
    if speaker is None:
        return runner.saw_text if runner is not None else _ignore
    if runner is None:
        return speaker.feed
    saw, feed = runner.saw_text, speaker.feed

    def both(text: str) -> None:
        saw(text)
        feed(text)

    return both


class _RunHost:
    """The execution stage, as one run's tool runner sees it."""

    def __init__(self, execution: Execution, active: Active, clock: RunClock) -> None:
        self._execution = execution
        self._active = active
        self._clock = clock

    def emit(self, update: pb.RunUpdate) -> None:
        self._execution._publishing.emit(self._active, update)

    async def pause(self) -> None:
        self._clock.pause()
        # Not running, so nothing stops it: the approval's expire_time says when it fails.
        self._active.run.ClearField("deadline")
        await self._execution.pause(self._active)

    async def resume(self) -> None:
        self._clock.resume()
        self._active.run.deadline.FromDatetime(
            names.now() + dt.timedelta(seconds=self._clock.left())
        )
        await self._execution.resume(self._active)

    def append(self, request: cpb.AppendMessageRequest) -> Awaitable[cpb.Message]:
        return self._execution.append(self._active, request)


def _handed(job: job_pb2.RunJob) -> Handed | None:
    """The budget the run's caller handed over, as its job keeps it (None: none)."""
    if not job.HasField("handed_budget"):
        return None
    stored = job.handed_budget
    return (
        Handed(
            **{
                name: getattr(stored, name)
                for name in ("cost_micros", "input_tokens", "output_tokens", "total_tokens")
                if stored.HasField(name)
            }
        )
        or None
    )


def _show(
    shown: handler_pb2.HandleResult, result: handler_pb2.HandleResult, output: cpb.Message
) -> None:
    """Copy ``result`` into ``shown`` with its file parts as the stored message names
    them (the context service stored their bytes as files), and never with bytes:
    watchers and the run's feed get names, types and sizes (a handler may answer with
    megabytes of files). One copy, as before files: this is every run's last update."""
    shown.CopyFrom(result)
    given = [p.file for p in shown.parts if p.WhichOneof("part") == "file"]
    if not given:
        return
    stored = [p.file for p in output.parts if p.WhichOneof("part") == "file"]
    if len(stored) == len(given):
        for found, named in zip(given, stored, strict=True):
            found.CopyFrom(named)
    for found in given:
        if found.inline_data:
            found.size_bytes = found.size_bytes or len(found.inline_data)
            found.ClearField("inline_data")
