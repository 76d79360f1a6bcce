"""The ``llm`` handler's tool calling: the tools offered, each tool step, and
the messages a step adds to the conversation.

When the run may call tools, they are offered to the model as functions. An
answer with tool calls is not the end of the run: its calls go to the run's
``ToolRunner`` as one batch, their results go back to the model as ``tool``
messages, and the model is asked again, until it answers without calls or the
run's tool steps are spent (the last request then forbids calls). A run
continued after a restart rebuilds its conversation from the steps it already
took, without asking the model again.

The handler (``handler.py``) drives the loop: it asks the model, and hands each
answer's calls to ``ToolLoop.step``; this module decides what is offered, what
a call the model made becomes, and what the model reads back (the assistant
message with its calls and one ``tool`` message per result, also what
``messages.py`` renders for stored tool calls).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from google.protobuf import struct_pb2

from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import HandleCall, HandlerFailure
from switchboard.dispatcher.llm.stream import ModelCall
from switchboard.platform.values import jsonbounds
from switchboard.platform.values.jsonbounds import JsonRejected
from switchboard.platform.values.resources import ToolName
from switchboard.platform.values.structs import plain
from switchboard.platform.values.wording import counted
from switchboard.shared.parttext import compact_json

# The handler's logger: one name for every part of it, as before it was split.
log = logging.getLogger("switchboard.dispatcher.llm")

# The Chat Completions API accepts at most this many tools in one request.
MAX_TOOLS: Final = 128
# Arguments that are not a JSON object are kept for the record, this much of them.
MAX_INVALID_ARGUMENTS_CHARS: Final = 2000
# A provider's call id longer than this is replaced by one of ours.
MAX_CALL_ID_CHARS: Final = 128
# A backstop only: the response's own bound (max_response_bytes) cuts them off first.
_MAX_ARGUMENTS_BYTES: Final = 64 * 1_048_576
# A function name as stored on a ToolCall (a model may invent any name).
MAX_FUNCTION_NAME_CHARS: Final = 256
# What the API accepts as a function name; other names are refused with a 400.
FUNCTION_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_NOT_A_NAME: Final = re.compile(r"[^a-zA-Z0-9_-]")


class Toolbox:
    """The tools offered to the model, by the function name it calls them by."""

    def __init__(self, definitions: Sequence[handler_pb2.ToolDefinition]) -> None:
        self.by_name: dict[str, handler_pb2.ToolDefinition] = {}
        for definition in definitions:
            name = definition.function_name
            if not FUNCTION_NAME.fullmatch(name):
                # The API would refuse the whole request over it.
                log.warning("tool %s has an invalid function name; not offered", definition.tool)
                continue
            self.by_name.setdefault(name, definition)
        if len(self.by_name) > MAX_TOOLS:
            raise HandlerFailure(
                f"the run offers {len(self.by_name)} tools; a model accepts at most {MAX_TOOLS}"
            )
        self.specs: list[dict[str, Any]] = [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": definition.description,
                    "parameters": _schema(definition.input_schema),
                },
            }
            for name, definition in self.by_name.items()
        ]

    def call(self, made: ModelCall, call_id: str) -> handler_pb2.ToolCall:
        """The ToolCall for a call the model made (the runner answers unknown
        functions and invalid arguments with a FAILED result)."""
        call = handler_pb2.ToolCall(id=call_id, function_name=made.name[:MAX_FUNCTION_NAME_CHARS])
        definition = self.by_name.get(made.name)
        if definition is None:
            call.tool = call.function_name
        else:
            named = ToolName.parse_or_none(definition.tool)
            if named is not None:
                call.integration = str(named.parent)
                call.tool = named.segment
            else:
                call.tool = definition.tool.rsplit("/", 1)[-1]
        arguments = _arguments(made.arguments)
        if arguments is None:
            call.invalid_arguments = made.arguments[:MAX_INVALID_ARGUMENTS_CHARS]
        else:
            call.arguments.CopyFrom(arguments)
        return call


def _schema(schema: struct_pb2.Struct) -> dict[str, Any]:
    if not schema.fields:
        return {"type": "object", "properties": {}}
    return {key: plain(value) for key, value in schema.fields.items()}


def _arguments(text: str) -> struct_pb2.Struct | None:
    """The arguments as a Struct, or ``None`` if they are not a JSON object.

    Blank arguments are an empty object: models send them for functions
    without parameters.
    """
    if not text.strip():
        return struct_pb2.Struct()
    try:
        # Bounded: a Struct deeper than jsonbounds.MAX_DEPTH could not be read back
        # from the run's updates, and building it recurses.
        data = jsonbounds.loads(text, max_bytes=_MAX_ARGUMENTS_BYTES)
    except JsonRejected:
        return None
    if not isinstance(data, dict):
        return None
    struct = struct_pb2.Struct()
    try:
        struct.update(data)
    except (ValueError, TypeError):
        return None
    return struct


def _result_text(result: handler_pb2.ToolResult) -> str:
    """What the model reads of a result: its text, else its structured output; and
    which files it returned (stored in the conversation with the result)."""
    text = result.text or (json_text(result.result) if result.result.fields else "")
    if not result.files:
        return text
    files = ", ".join(
        f"{found.display_name or 'file'} ({found.mime_type or 'unknown type'}, "
        f"{len(found.inline_data) or found.size_bytes} bytes)"
        for found in result.files
    )
    note = f"[the tool returned {counted(len(result.files), 'file')}: {files}]"
    return f"{text}\n{note}" if text else note


def _step_arguments(call: handler_pb2.ToolCall) -> str:
    return call.invalid_arguments or json_text(call.arguments)


class ToolLoop:
    """One run's tool steps: the tools it offers, the call ids it used, the
    steps taken so far, and the next step."""

    def __init__(self, call: HandleCall) -> None:
        request = call.request
        self._call = call
        self._limit = request.max_tool_steps
        self._toolbox: Toolbox | None = None
        # A run with a runner answers the calls its model makes, even when none of its
        # tools can be offered now (an integration unreachable): a call made anyway gets
        # the runner's "no tool named ..." result, and the run goes on.
        if call.tools is not None and request.max_tool_steps > 0:
            self._toolbox = Toolbox(request.tools)
        self._steps = 0
        #: Tool call ids of the run so far (they must be unique within it).
        self._used_ids: set[str] = set()
        self._serial = 0

    def offer(self) -> dict[str, Any]:
        """What the next model request says about tools (nothing when the run offers none)."""
        if self._toolbox is None or not self._toolbox.specs:
            return {}
        # Past the limit the tools stay described (the conversation shows
        # calls to them) but may not be called.
        choice = "auto" if self._steps < self._limit else "none"
        return {"tools": self._toolbox.specs, "tool_choice": choice}

    @property
    def steps(self) -> int:
        """Tool steps taken so far (the next model call is step ``steps + 1``)."""
        return self._steps

    async def resume(
        self,
        messages: list[dict[str, Any]],
        before: Callable[[int], None] | None = None,
    ) -> None:
        """Append the steps the run already took to ``messages``, first running
        the calls of an unfinished last step. ``before(n)`` is called before the
        exchange of model call ``n`` is appended (the steers it took go there)."""
        steps = self._call.request.steps
        for position, step in enumerate(steps):
            if before is not None:
                before(position + 1)
            results = {result.id: result for result in reversed(step.results)}
            pending = [tool_call for tool_call in step.calls if tool_call.id not in results]
            if pending:
                if position != len(steps) - 1:
                    raise HandlerFailure(
                        f"tool step {position + 1} of {len(steps)} lacks results, "
                        "but only the last step can be unfinished"
                    )
                ran = await self._run_tools(pending)
                results.update(
                    (tool_call.id, result) for tool_call, result in zip(pending, ran, strict=True)
                )
            self._used_ids.update(tool_call.id for tool_call in step.calls)
            messages.append(
                assistant_calls(
                    step.text,
                    (
                        (
                            tool_call.id,
                            tool_call.function_name or tool_call.tool,
                            _step_arguments(tool_call),
                        )
                        for tool_call in step.calls
                    ),
                )
            )
            messages.extend(
                tool_message(tool_call.id, _result_text(results[tool_call.id]))
                for tool_call in step.calls
            )
        self._steps = len(steps)

    async def step(
        self, messages: list[dict[str, Any]], text: str, made: Sequence[ModelCall]
    ) -> None:
        """Run the calls of an answer (its ``text`` and the calls ``made``) and
        append the exchange to ``messages``; raises when the run may not call them."""
        if self._toolbox is None:
            raise HandlerFailure("the model asked for a tool, but this run may call none")
        if self._steps >= self._limit:
            raise HandlerFailure(
                f"the model asked for tools after the run's limit of {self._limit} tool steps"
            )
        toolbox = self._toolbox
        calls = [toolbox.call(call_made, self._call_id(call_made.id)) for call_made in made]
        results = await self._run_tools(calls)
        # The model gets its own arguments back as it wrote them.
        exchange = [
            (tool_call.id, tool_call.function_name, call_made.arguments or "{}")
            for tool_call, call_made in zip(calls, made, strict=True)
        ]
        messages.append(assistant_calls(text, exchange))
        messages.extend(
            tool_message(tool_call.id, _result_text(result))
            for tool_call, result in zip(calls, results, strict=True)
        )
        self._steps += 1

    def _call_id(self, proposed: str) -> str:
        """The provider's id for a call, or ``call_<n>`` when it sent none (or
        one the run already used, or an absurd one)."""
        if not proposed or len(proposed) > MAX_CALL_ID_CHARS or proposed in self._used_ids:
            while True:
                self._serial += 1
                proposed = f"call_{self._serial}"
                if proposed not in self._used_ids:
                    break
        self._used_ids.add(proposed)
        return proposed

    async def _run_tools(
        self, calls: Sequence[handler_pb2.ToolCall]
    ) -> list[handler_pb2.ToolResult]:
        # The runner bounds its own waits by the run's deadline (approvals
        # included) and raises when it passes; cancellation propagates.
        tools = self._call.tools
        if tools is None:
            raise HandlerFailure("the run has tool calls to finish, but may call no tools")
        results = list(await tools.run(calls))
        if len(results) != len(calls):
            raise RuntimeError(
                f"the tool runner returned {len(results)} results for {len(calls)} calls"
            )
        return results


# -- what the model reads of a step ----------------------------------------------


def json_text(struct: struct_pb2.Struct) -> str:
    # Sorted: a Struct's map has no order of its own (it differs between
    # processes), and the same call must read the same to the model every time.
    return compact_json(struct)


def _wire_name(name: str) -> str:
    """A function name the API accepts: a model's invented name (``foo.bar``)
    would make it refuse the whole conversation, so it is sent cleaned."""
    cleaned = _NOT_A_NAME.sub("_", name)[:64]
    return cleaned or "unknown_tool"


def assistant_calls(text: str, calls: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """An assistant message with ``(id, function name, arguments JSON)`` calls."""
    return {
        "role": "assistant",
        "content": text or None,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": _wire_name(name), "arguments": arguments},
            }
            for call_id, name, arguments in calls
        ],
    }


def tool_message(call_id: str, text: str) -> dict[str, Any]:
    # Some compatible servers refuse an empty tool message; the model should
    # know the call returned nothing rather than see a gap.
    return {"role": "tool", "tool_call_id": call_id, "content": text or "(no output)"}
