"""A run's tool calls: which tools it is offered, approvals, concurrent calls.

The handler decides *what* to call (the llm handler's model, an interactive
expert); this module decides *whether* and *how*, the same way for every
handler (``handlers.ToolRunner``):

* **Offered tools** come from the run's assistant: each enabled integration's
  tools as the hub lists them, named for the model (``function_name``),
  flagged where a person must approve. A run without an assistant offers none;
  an interactive expert may still name any tool of the run's workspace (no
  approval: nobody asked for one), within its user's rights.
* **One step** is the calls a handler makes together. Each call is shown as a
  ``tool_call`` run update. If any needs approval, the run pauses
  (REQUIRES_ACTION, stored with its steps so a restart resumes it) until every
  one is decided, the approval timeout passes (APPROVAL_EXPIRED) or the run
  is cancelled; its deadline stops meanwhile (execution's ``_RunClock``).
  Then the approved calls run concurrently through the integration hub, each
  ``tool_result`` shown as it finishes.
* **Failures are results.** An unknown or disabled tool, invalid arguments, an
  open circuit, a timeout, a denial: the handler gets a FAILED or DENIED
  result that explains it, and its model decides what to do. Only the run's
  own end (cancel, deadline, expired approval) raises.
* **Journaled** (``journal.py``): a step's calls, and which of them are sent,
  before any is sent; each result as it comes in. Resumed after a crash, a
  call with a journaled result is not sent again, and one sent with none is
  sent again (same idempotency key) only to a retry-safe tool; otherwise the
  run pauses with the call ``outcome_unknown`` for a person to RETRY,
  COMPLETE or FAIL_RUN. Every call carries ``idempotency.call_key``.
* **Stored as messages.** Each step becomes an ASSISTANT message (its text and
  calls) and one TOOL message per result, written in the background in order
  (the next model request does not wait for them) and awaited before the final
  answer is stored, so the next run's context window holds them.
* **Files** a tool returns (``InvokeToolResponse.files``: an MCP image, audio,
  embedded resource) reach the handler in ``ToolResult.files`` with their bytes
  and are stored with the TOOL message (``ToolResultContent.files``; the context
  service stores inline bytes as the workspace's files on append). Watchers'
  ``tool_result`` updates and the stored job carry only their names, types and
  sizes, never the bytes. A file the context service refuses (its type or size)
  does not lose the result: the message is stored again without it, with a note.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.dispatcher.tools.journal import Journal
from switchboard.dispatcher.tools.port import ToolPort
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.errors import (
    ApprovalExpired,
    CircuitOpen,
    NotFound,
    RunNotResumable,
    SwitchboardError,
    ToolOutcomeUnknown,
)
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import idempotency, names, structs
from switchboard.platform.values.resources import IntegrationName, RunName
from switchboard.platform.values.wording import counted

log = logging.getLogger("switchboard.dispatcher.tools")

#: What OpenAI-style APIs accept as a function name.
FUNCTION_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_-]")
#: Bound on listing one integration's tools when a run starts.
_LIST_TIMEOUT_S: Final = 10.0
_MAX_ERROR_CHARS: Final = 300
#: Arguments of one call, serialized (the context service stores no more with a message).
MAX_ARGUMENT_BYTES: Final = 16 * 1024
#: Outcome names stored in ToolResultContent (the context service checks them).
OUTCOMES: Final = {
    hpb.TOOL_OUTCOME_SUCCEEDED: "succeeded",
    hpb.TOOL_OUTCOME_ERROR: "error",
    hpb.TOOL_OUTCOME_FAILED: "failed",
    hpb.TOOL_OUTCOME_DENIED: "denied",
}


@dataclass(frozen=True)
class ToolLimits:
    #: Tool steps per run, unless its assistant says fewer.
    max_steps: int = 8
    #: Calls one handler step may make; the rest are answered FAILED.
    max_calls_per_step: int = 16
    #: How long a run waits in REQUIRES_ACTION (its own deadline stops meanwhile).
    approval_timeout_s: float = 600.0
    #: Tool output given to the model and stored, at most.
    max_result_chars: int = 16_000


# ---------------------------------------------------------------------------
# Offered tools


def fitted_name(name: str, key: str, *, clash: bool = False) -> str:
    """``name`` made model-safe, shortened with a hash of ``key`` when it would not fit
    (models see 64 characters at most) or ``clash``es with another name."""
    base = _UNSAFE.sub("_", name)
    if len(base) <= 64 and not clash:
        return base
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{base[:55]}_{digest}"


def function_name(integration_id: str, tool: str, taken: set[str]) -> str:
    """A model-safe, run-unique name: ``{integration}__{tool}``, shortened with a
    hash when it would not fit."""
    plain = _UNSAFE.sub("_", f"{integration_id}__{tool}")
    candidate = fitted_name(plain, f"{integration_id}/{tool}", clash=plain in taken)
    taken.add(candidate)
    return candidate


def string_tool(
    name: str, description: str, field: str, about: str, *more: tuple[str, str]
) -> hpb.ToolDefinition:
    """A built-in tool named ``name`` whose argument ``field`` is a required string
    (``about`` says what it holds), and so is each of ``more`` (field, about): a
    delegate's ``ask_...``, a handoff's ``transfer_to_...``."""
    fields = ((field, about), *more)
    schema = struct_pb2.Struct()
    schema.update(
        {
            "type": "object",
            "properties": {key: {"type": "string", "description": text} for key, text in fields},
            "required": [key for key, _ in fields],
        }
    )
    return hpb.ToolDefinition(
        tool=name, function_name=name, description=description, input_schema=schema
    )


async def offered_tools(
    port: ToolPort, principal: Principal, assistant: pb.Assistant | None
) -> tuple[list[hpb.ToolDefinition], list[str]]:
    """The tools ``assistant`` enables that can be offered now, and why the others cannot."""
    if assistant is None or not assistant.tools:
        return [], []
    listed = await asyncio.gather(
        *(_listed(port, principal, binding) for binding in assistant.tools)
    )
    definitions: list[hpb.ToolDefinition] = []
    unavailable: list[str] = []
    taken: set[str] = set()
    for binding, (tools, problem) in zip(assistant.tools, listed, strict=True):
        if problem:
            unavailable.append(f"{binding.integration}: {problem}")
            continue
        integration_id = binding.integration.rsplit("/", 1)[-1]
        by_name = {tool.name.rsplit("/", 1)[-1]: tool for tool in tools}
        wanted = list(binding.tools) or sorted(by_name)
        approval = set(binding.approval_required_tools)
        for short in wanted:
            tool = by_name.get(short)
            if tool is None:
                unavailable.append(f"{binding.integration}/tools/{short}: not offered by it now")
                continue
            definition = hpb.ToolDefinition(
                tool=tool.name,
                function_name=function_name(integration_id, short, taken),
                description=tool.description or tool.title,
                requires_approval=binding.requires_approval or short in approval,
            )
            definition.input_schema.CopyFrom(tool.input_schema)
            definitions.append(definition)
    return definitions, unavailable


async def _listed(
    port: ToolPort, principal: Principal, binding: pb.AssistantTools
) -> tuple[list[ipb.Tool], str]:
    try:
        async with asyncio.timeout(_LIST_TIMEOUT_S):
            integration = await port.integration(principal, binding.integration)
            if integration.disabled:
                return [], "the integration is disabled"
            return await port.tools(principal, binding.integration), ""
    except TimeoutError:
        return [], "listing its tools timed out"
    except SwitchboardError as exc:
        return [], exc.message[:_MAX_ERROR_CHARS]


# ---------------------------------------------------------------------------
# Running one run's calls


class RunHost(Protocol):
    """What the runner needs of the dispatcher for one run."""

    def emit(self, update: pb.RunUpdate) -> None:
        """Show an update (text not yet shown goes first)."""
        ...

    async def pause(self) -> None:
        """REQUIRES_ACTION, stored (with the job) and announced."""
        ...

    async def resume(self) -> None:
        """RUNNING again, stored and announced."""
        ...

    def append(self, request: cpb.AppendMessageRequest) -> Awaitable[cpb.Message]:
        """Store a message in the run's conversation as the run's user."""
        ...


@dataclass(frozen=True)
class BuiltinAnswer:
    """A built-in's answer with more than text (a delegate's child answered with data or
    files): ``result`` is the structured output, ``files`` the files, both kept on the
    call's result (``ToolResult.result``, ``.files``) beside the text the model reads."""

    succeeded: bool
    text: str
    result: struct_pb2.Struct | None = None
    files: tuple[cpb.FileReference, ...] = ()


class BuiltinTool(Protocol):
    """A tool the dispatcher runs itself (``search_memory``, a delegate's ``ask_...``):
    offered by the run's assistant, named by its bare name (no integration), sent
    again after a crash like a retry-safe tool (read-only, or idempotent on the call's
    id), free, and never sent to the hub."""

    @property
    def definition(self) -> hpb.ToolDefinition: ...

    async def run(
        self,
        principal: Principal,
        arguments: struct_pb2.Struct,
        *,
        timeout_s: float,
        call_id: str = "",
    ) -> tuple[bool, str] | BuiltinAnswer:
        """Whether it succeeded, and the text for the model (or a ``BuiltinAnswer``,
        with data and files too); bad arguments and a refused search are
        ``(False, why)``, never an exception. ``call_id``: the call's id, the same when
        a call is sent again after a crash."""
        ...


class CallBudget(Protocol):
    """The run's budgets, as a priced call reserves its price in them
    (``budgets/spending.py``; the handlers' ``StepBudget``, seen from here)."""

    async def reserve(self, cost_micros: int, input_tokens: int, output_tokens: int) -> str: ...

    async def settle(
        self, hold: str, cost_micros: int, input_tokens: int, output_tokens: int
    ) -> None: ...

    async def release(self, hold: str) -> None: ...


class RunTools:
    """The ``ToolRunner`` of one run."""

    def __init__(
        self,
        host: RunHost,
        port: ToolPort,
        limits: ToolLimits,
        *,
        principal: Principal,
        run: pb.Run,
        job: job_pb2.RunJob,
        definitions: Sequence[hpb.ToolDefinition],
        workspace_id: str,
        open_workspace: bool,
        max_steps: int,
        deadline: Callable[[], float],
        journal: Journal,
        budget: CallBudget | None = None,
        builtins: Mapping[str, BuiltinTool] | None = None,
    ) -> None:
        self._host = host
        self._builtins: Mapping[str, BuiltinTool] = builtins or {}
        self._budget = budget
        self._journal = journal
        #: The integrations this run called, by name (read once per run: prices, retry safety).
        self._integrations: dict[str, ipb.Integration | None] = {}
        #: What the run's priced tool calls cost (added to its usage at its end).
        self.spent_micros = 0
        self._port = port
        self._limits = limits
        self._principal = principal
        self._run = run
        self._job = job
        self._by_tool = {definition.tool: definition for definition in definitions}
        self._workspace_id = workspace_id
        self._open = open_workspace
        self._max_steps = max_steps
        self._remaining = deadline
        self._text: list[str] = []
        self._writes: asyncio.Future[None] | None = None
        #: The run's name read once (a name it was given by its own dispatcher).
        self._run_name = RunName.parse(run.name, "run")
        #: Set (and replaced) when a decision is stored: waiting steps look again.
        self._decided = asyncio.Event()
        #: Shows the answer text not yet shown (set by the relay), so each tool
        #: update comes after the text the handler streamed before it.
        self.flush: Callable[[], None] = lambda: None

    # -- what the relay tells it --------------------------------------------------------

    def saw_text(self, text: str) -> None:
        """Answer text the handler streamed (the next step's text, if it calls tools)."""
        self._text.append(text)

    def unsay(self) -> None:
        """The text streamed since the last step is void (a model call cut for a steer)."""
        self._text.clear()

    async def drain(self) -> None:
        """Wait for the steps' messages to be stored (before the final answer is)."""
        if self._writes is not None:
            await self._writes

    # -- ToolRunner ---------------------------------------------------------------------

    async def run(self, calls: Sequence[hpb.ToolCall]) -> list[hpb.ToolResult]:
        steps = self._job.steps
        last = steps[-1] if steps else None
        resumed = (
            last is not None
            and len(last.results) < len(last.calls)
            and [c.id for c in calls] == [c.id for c in last.calls[len(last.results) :]]
        )
        errors: dict[str, status_pb2.Status] = {}
        done: dict[str, hpb.ToolResult] = {}
        unknown: list[hpb.ToolCall] = []
        if resumed and last is not None:
            # The step a restart interrupted: its calls were shown and journaled
            # already; what has a result is not sent again, what was in flight is
            # sent again only where that is safe (``_in_flight``).
            step, index = last, len(steps) - 1
            record = self._journal.record(index)
            pending = list(step.calls[len(step.results) :])
            done = {result.id: result for result in record.results}
            sent = set(record.sent) if self._journal.resuming else set()
            in_flight = [c for c in pending if c.id in sent and c.id not in done]
            for call in pending:
                if call.id in done:
                    continue
                if call.id in sent:
                    call.requires_approval = False  # asked before it was sent
                    continue
                problem = self._problem(call, set())
                if problem is not None:
                    errors[call.id] = problem
            unknown = await self._in_flight(in_flight)
        else:
            step, index, errors = self._open_step(calls)
            record = self._journal.open_step(index)
            pending = list(step.calls)
        decisions = await self._approve(
            [c for c in pending if c.requires_approval and c.id not in done],
            unknown=unknown,
        )
        # Journaled before anything is sent: the model's output (a fresh step) and
        # which calls go out, so a crash from here on neither asks the model again
        # nor loses that a call may have taken effect.
        record.sent.extend(
            call.id
            for call in pending
            if call.id not in done
            and call.id not in errors
            and call.id not in record.sent
            and _sends(decisions.get(call.id))
        )
        await self._journal.checkpoint()
        results = await asyncio.gather(
            *(
                self._one(call, errors.get(call.id), decisions.get(call.id), done.get(call.id))
                for call in pending
            )
        )
        step.results.extend(results)
        del record.results[:]
        self._stored(index, step)
        return list(results)

    async def _in_flight(self, calls: list[hpb.ToolCall]) -> list[hpb.ToolCall]:
        """Of ``calls`` (sent before a crash, no result journaled), those a person
        must decide; the others are sent again, with the same key. A call whose
        tool is gone ends the run: it cannot be retried, and the model cannot be
        told what happened."""
        unknown: list[hpb.ToolCall] = []
        for call in calls:
            if self._builtin(call) is not None:
                continue  # read-only: sent again
            tool = _tool_name(call)
            # Only what is gone ends the run; an outage of the hub fails it as one.
            try:
                integration = await self._port.integration(self._principal, call.integration)
            except NotFound:
                raise RunNotResumable(
                    f"the integration {call.integration} of call {call.id}, in flight when "
                    "the run was interrupted, is gone"
                ) from None
            self._integrations[call.integration] = integration
            try:
                offered = await self._port.tools(self._principal, call.integration)
            except NotFound:
                offered = []
            if tool not in {found.name for found in offered}:
                raise RunNotResumable(
                    f"the tool {tool} of call {call.id}, in flight when the run was "
                    "interrupted, is no longer offered by its integration"
                )
            safe = integration.retry_safe or call.tool in integration.retry_safe_tools
            if not (safe or self._journal.retry_all):
                unknown.append(call)
            else:
                log.info(
                    "a call in flight at a crash is sent again (retry-safe)",
                    extra={"run": self._run.name, "tool": tool},
                )
        return unknown

    def _open_step(
        self, calls: Sequence[hpb.ToolCall]
    ) -> tuple[hpb.ToolStep, int, dict[str, status_pb2.Status]]:
        step = self._job.steps.add(text="".join(self._text))
        self._text.clear()
        seen = {c.id for s in self._job.steps[:-1] for c in s.calls}
        errors: dict[str, status_pb2.Status] = {}
        over_steps = len(self._job.steps) > self._max_steps
        for index, given in enumerate(calls):
            call = step.calls.add()
            call.CopyFrom(given)
            call.requires_approval = False
            if not call.id:
                call.id = f"call_{len(self._job.steps)}_{index}"
            if over_steps:
                problem: status_pb2.Status | None = _status(
                    code_pb2.RESOURCE_EXHAUSTED,
                    f"the run reached its limit of {self._max_steps} tool steps",
                )
            elif index >= self._limits.max_calls_per_step:
                problem = _status(
                    code_pb2.RESOURCE_EXHAUSTED,
                    f"at most {self._limits.max_calls_per_step} tool calls per step",
                )
            else:
                problem = self._problem(call, seen)
            if problem is not None:
                errors[call.id] = problem
            seen.add(call.id)
            self._run.tool_call_count += 1
            update = pb.RunUpdate()
            update.tool_call.CopyFrom(call)
            self._emit(update)
        return step, len(self._job.steps) - 1, errors

    def _problem(self, call: hpb.ToolCall, seen: set[str]) -> status_pb2.Status | None:
        """Why ``call`` cannot run (None if it can); sets ``requires_approval``."""
        if call.id in seen:
            return _status(code_pb2.INVALID_ARGUMENT, f"the call id {call.id!r} was used before")
        tool = self._name(call)
        definition = self._by_tool.get(tool)
        if definition is not None:
            call.requires_approval = definition.requires_approval
        elif not (
            self._open
            and (named := IntegrationName.parse_or_none(call.integration)) is not None
            and named.workspace == self._workspace_id
            and call.tool
        ):
            what = tool or call.function_name or call.tool or "(none)"
            return _status(code_pb2.NOT_FOUND, f"no tool {what} is enabled for this run")
        if call.invalid_arguments:
            return _status(code_pb2.INVALID_ARGUMENT, "the arguments are not a JSON object")
        if call.arguments.ByteSize() > MAX_ARGUMENT_BYTES:
            return _status(
                code_pb2.INVALID_ARGUMENT,
                f"the arguments are larger than {MAX_ARGUMENT_BYTES} bytes",
            )
        return None

    # -- approvals ----------------------------------------------------------------------

    async def _approve(
        self, needs: list[hpb.ToolCall], *, unknown: Sequence[hpb.ToolCall] = ()
    ) -> dict[str, pb.PendingToolCall]:
        """Wait until every call of ``needs`` and ``unknown`` (calls whose outcome a
        crash left unknown) is decided; their decisions by call id.

        Several steps may wait at once (an interactive expert's concurrent
        calls): the run pauses when the first starts waiting and resumes when
        nothing is left undecided.
        """
        action = self._run.required_action
        if unknown:
            # An approval given before they were sent, or a RETRY that may have been
            # sent again, no longer answers the question: did they take effect? A
            # person's COMPLETE or FAIL_RUN still does (a crash came before it acted).
            ids = {call.id for call in unknown}
            kept = [
                p
                for p in action.tool_calls
                if p.call.id not in ids or (p.outcome_unknown and not _sends(p))
            ]
            del action.tool_calls[:]
            action.tool_calls.extend(kept)
            needs = [c for c in needs if c.id not in ids] + list(unknown)
        if not needs:
            return {}
        known = {pending.call.id for pending in action.tool_calls}
        fresh = [call for call in needs if call.id not in known]
        unknown_ids = {call.id for call in unknown}
        if fresh:
            if not self._undecided():
                # A new pause; one resumed after a restart keeps its calls and decisions.
                action.Clear()
                # The run's deadline stops while it waits (execution's _RunClock):
                # only the approval timeout bounds the pause.
                wait_s = self._limits.approval_timeout_s
                action.expire_time.FromDatetime(names.now() + dt.timedelta(seconds=wait_s))
            for call in fresh:
                pending = action.tool_calls.add(outcome_unknown=call.id in unknown_ids)
                pending.call.CopyFrom(call)
        ids = {call.id for call in needs}
        if self._undecided(ids):
            if self._run.state == pb.RUN_STATE_RUNNING:
                await self._host.pause()
            try:
                # Its own timeout: the run's deadline (the asyncio.timeout
                # around the whole run) is stopped while the run is paused.
                async with asyncio.timeout(self._limits.approval_timeout_s):
                    while self._undecided(ids):
                        await self._decided.wait()
            except TimeoutError:
                raise ApprovalExpired(
                    f"{counted(self._undecided(ids), 'tool call')} waited for approval longer than "
                    f"{self._limits.approval_timeout_s:g} s"
                ) from None
            if not self._undecided() and self._run.state == pb.RUN_STATE_REQUIRES_ACTION:
                await self._host.resume()
        return {p.call.id: p for p in action.tool_calls if p.call.id in ids}

    def decided(self) -> None:
        """A decision was stored: every waiting step looks again."""
        event, self._decided = self._decided, asyncio.Event()
        event.set()

    def _undecided(self, ids: set[str] | None = None) -> int:
        return sum(
            1
            for pending in self._run.required_action.tool_calls
            if pending.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED
            and (ids is None or pending.call.id in ids)
        )

    # -- one call -----------------------------------------------------------------------

    async def _one(
        self,
        call: hpb.ToolCall,
        problem: status_pb2.Status | None,
        decision: pb.PendingToolCall | None,
        journaled: hpb.ToolResult | None = None,
    ) -> hpb.ToolResult:
        if journaled is not None:
            return journaled  # it ran before a crash: shown then, not sent again
        tool = self._name(call)
        result = hpb.ToolResult(id=call.id, tool=tool if problem is None else "")
        verdict = decision.decision if decision is not None else None
        if verdict == pb.TOOL_APPROVAL_DECISION_FAIL_RUN and decision is not None:
            raise ToolOutcomeUnknown(
                f"{decision.decided_by} failed the run: the outcome of call {call.id} "
                f"({tool}) was unknown after a crash"
            )
        if problem is not None:
            result.outcome = hpb.TOOL_OUTCOME_FAILED
            result.error.CopyFrom(problem)
            result.text = f"The tool call failed: {problem.message}"
        elif decision is not None and decision.decision == pb.TOOL_APPROVAL_DECISION_DENY:
            result.outcome = hpb.TOOL_OUTCOME_DENIED
            why = decision.reason or "no reason given"
            result.error.CopyFrom(
                _status(code_pb2.PERMISSION_DENIED, f"denied by {decision.decided_by}: {why}")
            )
            result.text = f"The call was denied by a person ({why}). Do not retry it."
        elif verdict == pb.TOOL_APPROVAL_DECISION_COMPLETE and decision is not None:
            # A person says it took effect (it was in flight at a crash): its result
            # is theirs, and it is not sent again.
            result.outcome = hpb.TOOL_OUTCOME_SUCCEEDED
            result.text = self._cut(decision.result_text)
            await self._journaled(call, result)
        else:
            builtin = self._builtin(call)
            if builtin is not None:
                await self._run_builtin(builtin, call, result)
            else:
                await self._invoke(call, tool, result)
            # Journaled as it comes in: a crash from here on does not send it again.
            await self._journaled(call, result)
        update = pb.RunUpdate()
        update.tool_result.CopyFrom(result)
        _without_bytes(update.tool_result.files)
        self._emit(update)
        return result

    def _builtin(self, call: hpb.ToolCall) -> BuiltinTool | None:
        return None if call.integration else self._builtins.get(call.tool)

    def _name(self, call: hpb.ToolCall) -> str:
        """The call's tool: a built-in's bare name, else its resource name."""
        return call.tool if self._builtin(call) is not None else _tool_name(call)

    async def _run_builtin(
        self, builtin: BuiltinTool, call: hpb.ToolCall, result: hpb.ToolResult
    ) -> None:
        started = time.monotonic()
        try:
            answer = await builtin.run(
                self._principal, call.arguments, timeout_s=self._remaining(), call_id=call.id
            )
        except SwitchboardError as exc:  # an outage of the context service
            answer = False, f"The tool call failed: {exc.message[:_MAX_ERROR_CHARS]}"
            result.error.CopyFrom(_status(int(exc.code), exc.message))
        if isinstance(answer, BuiltinAnswer):
            succeeded, text = answer.succeeded, answer.text
            if answer.result is not None:
                result.result.CopyFrom(answer.result)
            result.files.extend(answer.files)
        else:
            succeeded, text = answer
        result.outcome = hpb.TOOL_OUTCOME_SUCCEEDED if succeeded else hpb.TOOL_OUTCOME_ERROR
        result.text = self._cut(text)
        result.duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))

    def _emit(self, update: pb.RunUpdate) -> None:
        self.flush()
        self._host.emit(update)

    async def _journaled(self, call: hpb.ToolCall, result: hpb.ToolResult) -> None:
        """Return once ``result`` of ``call`` is in the stored journal."""
        journaled = self._journal.record(self._step_of(call.id)).results.add()
        journaled.CopyFrom(result)
        _without_bytes(journaled.files)
        await self._journal.checkpoint()

    def _step_of(self, call_id: str) -> int:
        """The index of the (last) step holding the call ``call_id``."""
        for index in range(len(self._job.steps) - 1, -1, -1):
            if any(c.id == call_id for c in self._job.steps[index].calls):
                return index
        raise LookupError(call_id)

    async def _integration(self, call: hpb.ToolCall) -> ipb.Integration | None:
        """``call``'s integration as the hub describes it (None: it cannot be read)."""
        integration = call.integration
        if integration not in self._integrations:
            try:
                self._integrations[integration] = await self._port.integration(
                    self._principal, integration
                )
            except SwitchboardError:
                # The call itself fails the same way, and a failed call costs nothing.
                self._integrations[integration] = None
        return self._integrations[integration]

    async def _price(self, call: hpb.ToolCall) -> int:
        """The price of one call of ``call``'s tool: its integration's
        ``tool_call_price_micros`` for it, else its ``call_price_micros``."""
        found = await self._integration(call)
        if found is None:
            return 0
        return found.tool_call_price_micros.get(call.tool, found.call_price_micros)

    async def _invoke(self, call: hpb.ToolCall, tool: str, result: hpb.ToolResult) -> None:
        price = await self._price(call)
        hold = ""
        if price and self._budget is not None:
            # May pause the run at a cap, or end it (BudgetExhausted).
            hold = await self._budget.reserve(price, 0, 0)
        answered = False
        try:
            answered = await self._call(call, tool, result)
        finally:
            # A call the tool answered (even with an error result) owes its
            # price; one that never reached it (refused, unreachable, timed
            # out, cancelled) costs nothing.
            if answered:
                self.spent_micros += price
                if price:
                    # The step's share of the run's usage, kept for a later attempt.
                    usage = self._journal.record(self._step_of(call.id)).usage
                    usage.cost_micros += price
                    usage.estimated_cost_usd = usage.cost_micros / 1e6
            if hold and self._budget is not None:
                if answered:
                    await self._budget.settle(hold, price, 0, 0)
                else:
                    await asyncio.shield(self._budget.release(hold))

    async def _call(self, call: hpb.ToolCall, tool: str, result: hpb.ToolResult) -> bool:
        """Invoke the tool; whether it answered."""
        started = time.monotonic()
        # The same key on every attempt at this call (docs/integration.md).
        request = ipb.InvokeToolRequest(
            name=tool, idempotency_key=idempotency.call_key(self._run.name, call.id)
        )
        request.arguments.CopyFrom(call.arguments)
        answered = False
        try:
            response = await self._port.invoke(
                self._principal, request, deadline_s=self._remaining(), run=self._run.name
            )
        except CircuitOpen as exc:
            result.outcome = hpb.TOOL_OUTCOME_FAILED
            result.error.CopyFrom(_status(int(exc.code), exc.message))
            result.text = (
                "The tool is unavailable now (its integration keeps failing); "
                f"retry in about {exc.retry_after_s or 30:.0f} s or answer without it."
            )
        except SwitchboardError as exc:
            result.outcome = hpb.TOOL_OUTCOME_FAILED
            result.error.CopyFrom(_status(int(exc.code), exc.message))
            result.text = f"The tool call failed: {exc.message[:_MAX_ERROR_CHARS]}"
        except Exception:  # the run goes on; the model hears of a failure, the log of why
            log.exception("tool call failed unexpectedly", extra={"tool": tool})
            result.outcome = hpb.TOOL_OUTCOME_FAILED
            result.error.CopyFrom(_status(code_pb2.INTERNAL, "the tool call failed"))
            result.text = "The tool call failed."
        else:
            answered = True
            result.outcome = (
                hpb.TOOL_OUTCOME_ERROR if response.is_error else hpb.TOOL_OUTCOME_SUCCEEDED
            )
            if response.HasField("result"):
                result.result.CopyFrom(response.result)
            result.files.extend(response.files)
            text = response.text
            if not text and response.HasField("result"):
                text = json.dumps(structs.message_dict(response.result), sort_keys=True)
            result.text = self._cut(text)
        result.duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))
        return answered

    def _cut(self, text: str) -> str:
        limit = self._limits.max_result_chars
        if len(text) <= limit:
            return text
        return text[:limit] + f"\n[cut: the output had {len(text)} characters]"

    # -- messages -----------------------------------------------------------------------

    def restore(self) -> None:
        """Store the messages of journaled steps a crash left unstored (their
        request ids are the first attempt's: what was stored is not stored twice)."""
        for index, step in enumerate(self._job.steps):
            complete = len(step.results) == len(step.calls)
            if complete and not self._journal.record(index).stored:
                self._stored(index, step)

    def _stored(self, index: int, step: hpb.ToolStep) -> None:
        """Store the step's messages, then the job, after the steps before (in the background)."""
        previous = self._writes
        self._writes = asyncio.ensure_future(self._write(previous, index, step))

    async def _write(
        self, previous: asyncio.Future[None] | None, index: int, step: hpb.ToolStep
    ) -> None:
        if previous is not None:
            await previous
        try:
            await self._host.append(self._call_message(index, step))
            for position, result in enumerate(step.results):
                stored = await self._store_result(index, position, result)
                # The job keeps what the message names (stored files), not the bytes.
                _named(result.files, stored)
            # Rides on the journal's next write (the next step's, or the answer's): a
            # crash before that stores these messages again, under the same request ids.
            self._journal.record(index).stored = True
        except SwitchboardError as exc:
            # The run goes on; its messages are incomplete, which the final
            # answer's own store (the same database) will report if it persists.
            log.warning("tool step not stored", extra={"run": self._run.name, "reason": exc.reason})
        except Exception:
            # Not awaited if the run ends first (only drain() awaits the chain):
            # logged here, never left unread in the future, and the chain goes on.
            log.exception("tool step not stored", extra={"run": self._run.name})

    def _call_message(self, index: int, step: hpb.ToolStep) -> cpb.AppendMessageRequest:
        parts: list[cpb.ContentPart] = []
        if step.text:
            parts.append(cpb.ContentPart(text=step.text))
        for call in step.calls:
            content = cpb.ToolCallContent(
                id=call.id,
                tool=_tool_name(call),
                # Stored calls are named like the model names them (the context
                # service requires a name when the tool is unknown).
                function_name=(call.function_name or _UNSAFE.sub("_", call.tool))[:64] or "unknown",
            )
            if call.arguments.ByteSize() <= MAX_ARGUMENT_BYTES:
                content.arguments.CopyFrom(call.arguments)
            parts.append(cpb.ContentPart(tool_call=content))
        return self._append_request(cpb.MESSAGE_ROLE_ASSISTANT, parts, f"s{index}-calls")

    async def _store_result(
        self, index: int, position: int, result: hpb.ToolResult
    ) -> cpb.Message | None:
        """Store the TOOL message of ``result``; with its files refused, once more
        without them (the result's text says which were left out, and why)."""
        request = self._result_message(index, position, result)
        if not result.files:
            await self._host.append(request)
            return None
        try:
            return await self._host.append(request)
        except SwitchboardError as exc:
            if exc.code not in _FILE_REFUSALS:
                raise
            log.warning(
                "a tool's files were not stored",
                extra={"run": self._run.name, "reason": exc.reason},
            )
            content = request.message.parts[0].tool_result
            names_ = ", ".join(f.display_name or f.mime_type or "file" for f in content.files)
            note = f"[files not stored ({names_}): {exc.message[:_MAX_ERROR_CHARS]}]"
            content.text = f"{content.text}\n{note}" if content.text else note
            del content.files[:]
            request.request_id = request.request_id[:60] + "-nf"
            await self._host.append(request)
            return None

    def _result_message(
        self, index: int, position: int, result: hpb.ToolResult
    ) -> cpb.AppendMessageRequest:
        content = cpb.ToolResultContent(
            id=result.id,
            # A built-in's bare name is no tool resource: stored by its call's id only.
            tool=result.tool if "/" in result.tool else "",
            outcome=OUTCOMES.get(result.outcome, "failed"),
            text=result.text,
            files=result.files,
        )
        return self._append_request(
            cpb.MESSAGE_ROLE_TOOL, [cpb.ContentPart(tool_result=content)], f"s{index}-r{position}"
        )

    def _append_request(
        self, role: cpb.MessageRole.ValueType, parts: list[cpb.ContentPart], suffix: str
    ) -> cpb.AppendMessageRequest:
        return cpb.AppendMessageRequest(
            parent=str(self._run_name.parent),
            message=cpb.Message(
                role=role, author=self._run.handler, parts=parts, run=self._run.name
            ),
            request_id=f"run-{self._run_name.run}-{suffix}"[:64],
        )


def _sends(decision: pb.PendingToolCall | None) -> bool:
    """Whether a call so decided (None: no decision needed) is sent to its tool."""
    return decision is None or decision.decision in (
        pb.TOOL_APPROVAL_DECISION_APPROVE,
        pb.TOOL_APPROVAL_DECISION_RETRY,
    )


def _status(code: int, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message[:_MAX_ERROR_CHARS])


def _tool_name(call: hpb.ToolCall) -> str:
    """The call's tool resource name; empty when it names no integration or tool."""
    return f"{call.integration}/tools/{call.tool}" if call.integration and call.tool else ""


#: What the context service answers for a file it will not store (a lying media
#: type, too large, over the quota, a URL it may not fetch): the message is stored
#: without the files rather than lost.
_FILE_REFUSALS: Final = frozenset(
    {code_pb2.INVALID_ARGUMENT, code_pb2.RESOURCE_EXHAUSTED, code_pb2.FAILED_PRECONDITION}
)


def _without_bytes(files: Sequence[cpb.FileReference]) -> None:
    """Names, types and sizes only: what watchers and the stored job may hold."""
    for found in files:
        if found.inline_data:
            found.size_bytes = found.size_bytes or len(found.inline_data)
            found.ClearField("inline_data")


def _named(files: Sequence[cpb.FileReference], stored: cpb.Message | None) -> None:
    """``files`` as the stored message names them (``file`` set by the context
    service), else without their bytes."""
    kept = stored.parts[0].tool_result.files if stored is not None and stored.parts else []
    if len(kept) == len(files):
        for found, named in zip(files, kept, strict=True):
            found.CopyFrom(named)
    _without_bytes(files)
