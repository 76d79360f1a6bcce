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
  ``tool_call`` run update. If any needs approval, the run pauses until every
  one is decided (``approvals.py``). Then the approved calls run concurrently,
  through the integration hub (``hub.py``: priced against the run's budgets)
  or, for a built-in, here, each ``tool_result`` shown as it finishes.
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
* **Stored as messages** (``messages.py``): each step an ASSISTANT message and
  one TOOL message per result, written in the background in order and awaited
  before the final answer is stored.
* **Files** a tool returns (``InvokeToolResponse.files``: an MCP image, audio,
  embedded resource) reach the handler in ``ToolResult.files`` with their bytes
  and are stored with the TOOL message. Watchers' ``tool_result`` updates and
  the stored job carry only their names, types and sizes, never the bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.dispatcher.tools.approvals import Approvals, PauseHost, sends
from switchboard.dispatcher.tools.hub import CallBudget, HubCalls
from switchboard.dispatcher.tools.journal import Journal
from switchboard.dispatcher.tools.messages import MessageHost, StepMessages
from switchboard.dispatcher.tools.port import ToolPort
from switchboard.dispatcher.tools.results import (
    MAX_ARGUMENT_BYTES,
    MAX_ERROR_CHARS,
    UNSAFE,
    cut,
    status,
    tool_name,
    without_bytes,
)
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.errors import (
    NotFound,
    RunNotResumable,
    SwitchboardError,
    ToolOutcomeUnknown,
)
from switchboard.platform.security.policy import Principal
from switchboard.platform.values.resources import IntegrationName

log = logging.getLogger("switchboard.dispatcher.tools")

#: Bound on listing one integration's tools when a run starts.
_LIST_TIMEOUT_S: Final = 10.0


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
    base = UNSAFE.sub("_", name)
    if len(base) <= 64 and not clash:
        return base
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{base[:55]}_{digest}"


def function_name(integration_id: str, tool: str, taken: set[str]) -> str:
    """A model-safe, run-unique name: ``{integration}__{tool}``, shortened with a
    hash when it would not fit."""
    plain = UNSAFE.sub("_", f"{integration_id}__{tool}")
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
        return [], exc.message[:MAX_ERROR_CHARS]


# ---------------------------------------------------------------------------
# Running one run's calls


class RunHost(PauseHost, MessageHost, Protocol):
    """What the runner needs of the dispatcher for one run."""

    def emit(self, update: pb.RunUpdate) -> None:
        """Show an update (text not yet shown goes first)."""
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


class ConversationTools(Protocol):
    """Built-in tools that exist while something outside the run holds its conversation:
    a phone call's ``end_call``, ``transfer_call`` and ``send_keys`` (``talk/sip``)."""

    def tools(self, conversation: str) -> dict[str, BuiltinTool]:
        """The conversation's run's tools now, by name (none: nothing holds it here); each
        one's ``definition`` is what its model is offered."""
        ...


class LateTools:
    """The process's ``ConversationTools``, plugged in after the run pipeline is built (the
    phone calls, SIP's and the carriers' media streams, start once the dispatcher has);
    none until then. A conversation is one call's at most, so the first source with
    tools for it answers."""

    def __init__(self) -> None:
        self.sources: list[ConversationTools] = []

    def tools(self, conversation: str) -> dict[str, BuiltinTool]:
        for source in self.sources:
            found = source.tools(conversation)
            if found:
                return found
        return {}


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
        self._journal = journal
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
        self._hub = HubCalls(
            port,
            principal=principal,
            run=run.name,
            deadline=deadline,
            max_result_chars=limits.max_result_chars,
            record=self._record,
            budget=budget,
        )
        self._messages = StepMessages(host, run, journal)
        self._approvals = Approvals(host, run, timeout_s=limits.approval_timeout_s)
        #: Shows the answer text not yet shown (set by the relay), so each tool
        #: update comes after the text the handler streamed before it.
        self.flush: Callable[[], None] = lambda: None

    @property
    def spent_micros(self) -> int:
        """What the run's priced tool calls cost (added to its usage at its end)."""
        return self._hub.spent_micros

    # -- what the relay tells it --------------------------------------------------------

    def saw_text(self, text: str) -> None:
        """Answer text the handler streamed (the next step's text, if it calls tools)."""
        self._text.append(text)

    def unsay(self) -> None:
        """The text streamed since the last step is void (a model call cut for a steer)."""
        self._text.clear()

    async def drain(self) -> None:
        """Wait for the steps' messages to be stored (before the final answer is)."""
        await self._messages.drain()

    def restore(self) -> None:
        """Store the messages of journaled steps a crash left unstored."""
        self._messages.restore(self._job.steps)

    def decided(self) -> None:
        """A decision was stored: every waiting step looks again."""
        self._approvals.decided()

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
        decisions = await self._approvals.wait(
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
            and sends(decisions.get(call.id))
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
        self._messages.store(index, step)
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
            tool = tool_name(call)
            # Only what is gone ends the run; an outage of the hub fails it as one.
            try:
                integration = await self._port.integration(self._principal, call.integration)
            except NotFound:
                raise RunNotResumable(
                    f"the integration {call.integration} of call {call.id}, in flight when "
                    "the run was interrupted, is gone"
                ) from None
            self._hub.integrations[call.integration] = integration
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
                problem: status_pb2.Status | None = status(
                    code_pb2.RESOURCE_EXHAUSTED,
                    f"the run reached its limit of {self._max_steps} tool steps",
                )
            elif index >= self._limits.max_calls_per_step:
                problem = status(
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
            return status(code_pb2.INVALID_ARGUMENT, f"the call id {call.id!r} was used before")
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
            return status(code_pb2.NOT_FOUND, f"no tool {what} is enabled for this run")
        if call.invalid_arguments:
            return status(code_pb2.INVALID_ARGUMENT, "the arguments are not a JSON object")
        if call.arguments.ByteSize() > MAX_ARGUMENT_BYTES:
            return status(
                code_pb2.INVALID_ARGUMENT,
                f"the arguments are larger than {MAX_ARGUMENT_BYTES} bytes",
            )
        return None

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
                status(code_pb2.PERMISSION_DENIED, f"denied by {decision.decided_by}: {why}")
            )
            result.text = f"The call was denied by a person ({why}). Do not retry it."
        elif verdict == pb.TOOL_APPROVAL_DECISION_COMPLETE and decision is not None:
            # A person says it took effect (it was in flight at a crash): its result
            # is theirs, and it is not sent again.
            result.outcome = hpb.TOOL_OUTCOME_SUCCEEDED
            result.text = cut(decision.result_text, self._limits.max_result_chars)
            await self._journaled(call, result)
        else:
            builtin = self._builtin(call)
            if builtin is not None:
                await self._run_builtin(builtin, call, result)
            else:
                await self._hub.invoke(call, tool, result)
            # Journaled as it comes in: a crash from here on does not send it again.
            await self._journaled(call, result)
        update = pb.RunUpdate()
        update.tool_result.CopyFrom(result)
        without_bytes(update.tool_result.files)
        self._emit(update)
        return result

    def _builtin(self, call: hpb.ToolCall) -> BuiltinTool | None:
        return None if call.integration else self._builtins.get(call.tool)

    def _name(self, call: hpb.ToolCall) -> str:
        """The call's tool: a built-in's bare name, else its resource name."""
        return call.tool if self._builtin(call) is not None else tool_name(call)

    async def _run_builtin(
        self, builtin: BuiltinTool, call: hpb.ToolCall, result: hpb.ToolResult
    ) -> None:
        started = time.monotonic()
        try:
            answer = await builtin.run(
                self._principal, call.arguments, timeout_s=self._remaining(), call_id=call.id
            )
        except SwitchboardError as exc:  # an outage of the context service
            answer = False, f"The tool call failed: {exc.message[:MAX_ERROR_CHARS]}"
            result.error.CopyFrom(status(int(exc.code), exc.message))
        if isinstance(answer, BuiltinAnswer):
            succeeded, text = answer.succeeded, answer.text
            if answer.result is not None:
                result.result.CopyFrom(answer.result)
            result.files.extend(answer.files)
        else:
            succeeded, text = answer
        result.outcome = hpb.TOOL_OUTCOME_SUCCEEDED if succeeded else hpb.TOOL_OUTCOME_ERROR
        result.text = cut(text, self._limits.max_result_chars)
        result.duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))

    def _emit(self, update: pb.RunUpdate) -> None:
        self.flush()
        self._host.emit(update)

    async def _journaled(self, call: hpb.ToolCall, result: hpb.ToolResult) -> None:
        """Return once ``result`` of ``call`` is in the stored journal."""
        journaled = self._record(call.id).results.add()
        journaled.CopyFrom(result)
        without_bytes(journaled.files)
        await self._journal.checkpoint()

    def _record(self, call_id: str) -> job_pb2.StepRecord:
        """The journal's record of the (last) step holding the call ``call_id``."""
        for index in range(len(self._job.steps) - 1, -1, -1):
            if any(c.id == call_id for c in self._job.steps[index].calls):
                return self._journal.record(index)
        raise LookupError(call_id)
