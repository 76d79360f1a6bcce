"""Execution: one run's life through the ``core/active/lifecycle.py`` table.

When the scheduler starts a run (``launch``), one asyncio task checks the
caller may still write, reads the context window (and the assistant's tools;
``inputs.py``), drives the handler, turns its frames into the run's updates
(``relay.py``; ``core/publishing.py`` shows and publishes them), runs its tool
steps (pausing for approvals through ``hosting.py``), stores the answer as an
assistant message and ends the run (``finishing.py``). A handler that acts
outside the process is called inside the run's journal (``durable.py``, one
wrapper around the handler's step), so a run taken over after a crash
continues where it was; a run that speaks does so around the relay
(``voice/speaking.py``), and its budgets are opened, charged and closed by
``charges.py``.

Cancellation is the task's (``cancelling.py``): a cancel raises
``CancelledError`` inside the handler, and the run ends CANCELLED. The
deadline is an ``asyncio.timeout`` around the same task, stopped while the run
waits for approvals (``core/clock.py``), and remote handlers get the remaining
time as their gRPC deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence

from opentelemetry.trace import StatusCode, Tracer

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.budgets.spending import Spending
from switchboard.dispatcher.handlers.base import FileReader, HandleCall, HandlerFailure
from switchboard.dispatcher.llm.retrieval import TOOL_NAME, SearchMemory
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import MAX_REASON_CHARS, Common
from switchboard.dispatcher.runs.core.clock import RunClock
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.scheduler import Scheduler, Ticket
from switchboard.dispatcher.runs.core.steers import SteerBook
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.dispatcher.runs.delegation.delegation import Delegation
from switchboard.dispatcher.runs.durable import Durable
from switchboard.dispatcher.runs.execution.cancelling import Cancelling
from switchboard.dispatcher.runs.execution.charges import Charges
from switchboard.dispatcher.runs.execution.finishing import Finishing
from switchboard.dispatcher.runs.execution.hosting import Hosting
from switchboard.dispatcher.runs.execution.inputs import InputReader, Inputs
from switchboard.dispatcher.runs.execution.relay import relay
from switchboard.dispatcher.tools.journal import Journal
from switchboard.dispatcher.tools.port import ToolPort
from switchboard.dispatcher.tools.runner import BuiltinTool, LateTools, RunTools, ToolLimits
from switchboard.dispatcher.voice.speaker import Speech
from switchboard.dispatcher.voice.speaking import Speaking
from switchboard.platform import background
from switchboard.platform.errors import (
    DeadlineExceeded,
    HandlerFailed,
    InternalError,
    RunInterrupted,
    SwitchboardError,
)
from switchboard.platform.observe.metrics import Metrics
from switchboard.platform.observe.telemetry import parent_from
from switchboard.platform.security.policy import Policy
from switchboard.platform.store.db import DatabaseUnavailable, is_outage
from switchboard.platform.values import names
from switchboard.platform.values.resources import MessageName

log = logging.getLogger("switchboard.dispatcher")


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
        self._publishing = publishing
        self._store = common.store
        self._context = context
        self._limits = common.limits
        self._tools = tools
        self._tool_limits = tool_limits
        self._metrics = metrics
        # None when tracing is off: runs then get no span (decided once, at the build).
        self._tracer = tracer
        #: The journal around each run's handler step (``durable.py``).
        self._durable = Durable(live=common.live, store=common.store, limits=common.limits)
        #: The server's speech around each run's relay (None: no engine; a run asked
        #: to speak answers in text).
        self._speaking = Speaking(speech, max_reason_chars=MAX_REASON_CHARS)
        self._charges = Charges(spending=spending, store=common.store, limits=common.limits)
        self._hosting = Hosting(publishing=publishing, scheduler=scheduler, context=context)
        #: Tools a conversation's holder adds (a phone call's), plugged in later.
        self.conversation_tools = LateTools()
        self._inputs = InputReader(
            policy=policy,
            context=context,
            tools=tools,
            charges=self._charges,
            delegation=delegation,
            conversation_tools=self.conversation_tools,
        )
        self._finishing = Finishing(
            common=common,
            publishing=publishing,
            context=context,
            charges=self._charges,
            metrics=metrics,
            steers=steers,
        )
        self._cancelling = Cancelling(
            live=common.live,
            scheduler=scheduler,
            publishing=publishing,
            finishing=self._finishing,
            speaking=self._speaking,
        )

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
            self._finishing.let_go(active)

    async def stop(self) -> None:
        """Stop every run this process holds; each ends by the recovery policy."""
        await self._cancelling.stop()

    async def cancel(
        self, active: Active, error: SwitchboardError, *, heard_through: int = 0
    ) -> None:
        """End ``active`` with ``error`` (``Cancelling.cancel``); returns once the run
        is recorded. ``heard_through``: the last speech update its listener heard."""
        await self._cancelling.cancel(active, error, heard_through=heard_through)

    def retire(self, actives: Sequence[Active]) -> list[asyncio.Task[None]]:
        """Let go of runs another instance took over (``Cancelling.retire``); returns
        the tasks still ending."""
        return self._cancelling.retire(actives)

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
            await self._finishing.finish(active, active.cancel_error)
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
            run.usage.CopyFrom(self._charges.cover(result.usage, active))
            final = pb.RunUpdate()
            _show(final.result, result, output)
            self._publishing.emit(active, final, with_end=True)
            active.to(pb.RUN_STATE_SUCCEEDED)
        except asyncio.CancelledError:
            error = active.cancel_error
            if error is None:  # this process is stopping
                if run.state == pb.RUN_STATE_REQUIRES_ACTION:
                    # Stored paused with its steps: the restart resumes it.
                    await self._finishing.leave_paused(active)
                    return
                if self._limits.recovery != "fail" and run.state == pb.RUN_STATE_RUNNING:
                    await self._finishing.requeue_at_shutdown(active)
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
        await self._finishing.finish(active, error)

    async def _unwind(self, active: Active) -> None:
        """The run's task is done with its runner, speech and budget: holds of steps
        that did not settle (cancelled, failed) go back."""
        active.tools = None
        await self._speaking.unwind(active, functools.partial(self._hosting.append, active))
        await self._charges.close(active)
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
            inputs = await self._inputs.read(active, clock.left)
            self._begin(active)
            if active.handler.kind != pb.HANDLER_KIND_BUILTIN:
                await self._start_stored(active)
            emit = functools.partial(self._publishing.emit, active)
            result = await self._durable.around(
                active,
                functools.partial(self._handle, active, clock, inputs, emit),
                functools.partial(self._speaking.replayed, active, emit),
            )
            return await self._answer(active, result, clock.left)

    async def _handle(
        self,
        active: Active,
        clock: RunClock,
        inputs: Inputs,
        emit: Callable[[pb.RunUpdate], None],
        journal: Journal | None,
    ) -> handler_pb2.HandleResult:
        """The handler's step: its call (with the run's budget, speech and tool
        runner) relayed into the run's updates; returns its result, with the run's
        tool steps stored and their cost on its usage."""
        request = self._request(active, inputs)
        self._charges.open(active, inputs.budgets, self._hosting.host(active, clock))
        return await self._speaking.around(
            active,
            emit,
            functools.partial(self._call, active, clock, inputs, emit, journal, request),
        )

    async def _call(
        self,
        active: Active,
        clock: RunClock,
        inputs: Inputs,
        emit: Callable[[pb.RunUpdate], None],
        journal: Journal | None,
        request: handler_pb2.HandleRequest,
        feed: Callable[[str], None] | None,
    ) -> handler_pb2.HandleResult:
        """The handler called with the run's tool runner, and relayed (each piece of
        its text to ``feed`` too: the speaker's, when the run speaks)."""
        runner = self._runner(active, inputs.definitions, clock, journal)
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
        result = await relay(active, clock.call, emit, feed)
        if runner is not None:
            await runner.drain()
            if runner.spent_micros:
                # Priced tool calls are the run's cost too.
                result.usage.cost_micros += runner.spent_micros
                result.usage.estimated_cost_usd = result.usage.cost_micros / 1e6
        return result

    @staticmethod
    def _request(active: Active, inputs: Inputs) -> handler_pb2.HandleRequest:
        """What the handler is asked: the message in its context, with the assistant's
        instructions and model."""
        run = active.run
        request = handler_pb2.HandleRequest(
            run=run.name,
            message=active.message,
            context=inputs.window,
            parameters=active.parameters,
            user=active.principal.user_name,
            flags=run.flags,
            tools=inputs.definitions,
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
        # The answer is stored once it has been spoken (under the deadline).
        await self._speaking.spoken(active, result, answer)
        request = cpb.AppendMessageRequest(
            parent=active.conversation,
            message=answer,
            request_id=f"run-{active.run_id}",
            branch=run.branch,
        )
        if self._context.shares_transactions and not any(
            part.HasField("file") for part in answer.parts
        ):
            # Stored with the run's end, in its transaction (``finishing.py``): one write fewer
            # a run, and never an answer without its end or an end without its answer.
            # (An answer's files are stored first: the result shows their names.)
            message_id = names.new_id()
            active.answer = (request, message_id)
            name = MessageName(active.workspace_id, active.conversation_id, message_id)
            return cpb.Message(name=str(name), parts=answer.parts), result
        output = await self._context.append_message(active.principal, request, timeout_s=left())
        return output, result

    def _file_reader(self, active: Active, left: Callable[[], float]) -> FileReader:
        """Reads a file of the run's window as the run's user, within its deadline."""
        context, principal = self._context, active.principal

        async def read(name: str, limit: int) -> bytes:
            return await context.download(principal, name, limit=limit, timeout_s=left())

        return read

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
            self._hosting.host(active, clock),
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
        assistant's delegates, and its conversation's holder's (a phone call's) that its
        inputs offered."""
        assistant = active.assistant
        found: dict[str, BuiltinTool] = {}
        if assistant is None:
            return found
        if assistant.retrieval.search_tool:
            found[TOOL_NAME] = SearchMemory(self._context, active.conversation)
        if self._delegation is not None and (assistant.delegates or assistant.handoffs):
            emit = functools.partial(self._publishing.emit, active)
            found.update(self._delegation.builtins(active, emit, definitions))
        offered = {d.tool for d in definitions}
        held = self.conversation_tools.tools(active.conversation)
        found.update({name: tool for name, tool in held.items() if name in offered})
        return found

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
                # Shielded: a cancel of the run leaves the save for ``Finishing.finish`` to await.
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
