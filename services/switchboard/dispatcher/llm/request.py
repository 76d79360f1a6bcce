"""The ``llm`` handler's requests: a run's context as Chat Completions messages,
its sampling, and the body sent to a provider.

The context window comes from the context service: memory and summaries become
one system message after the assistant's instructions, stored tool calls are
paired with their results as the API requires, and the new message goes last.
Rendering matches the context service's own, so the model reads what the
window's budget counted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.context.parttext import render_parts
from switchboard.dispatcher.handlers.base import HandlerFailure
from switchboard.platform.structs import plain

_NOT_A_NAME: Final = re.compile(r"[^a-zA-Z0-9_-]")
_TOOL_PARTS: Final = frozenset({"tool_call", "tool_result"})

_ROLES: Final = {
    context_pb2.MESSAGE_ROLE_USER: "user",
    context_pb2.MESSAGE_ROLE_ASSISTANT: "assistant",
    context_pb2.MESSAGE_ROLE_SYSTEM: "system",
}


def _text_of(parts: Iterable[context_pb2.ContentPart]) -> str:
    """The context service's rendering of the parts that are not tool parts, so
    the model reads what was counted; tool parts become structured messages."""
    return render_parts(part for part in parts if part.WhichOneof("part") not in _TOOL_PARTS)


def json_text(struct: struct_pb2.Struct) -> str:
    # Sorted: a Struct's map has no order of its own (it differs between
    # processes), and the same call must read the same to the model every time.
    return json.dumps(
        {key: plain(value) for key, value in struct.fields.items()},
        separators=(",", ":"),
        ensure_ascii=False,
        sort_keys=True,
    )


def _wire_name(name: str) -> str:
    """A function name the API accepts: a model's invented name (``foo.bar``)
    would make it refuse the whole conversation, so it is sent cleaned."""
    cleaned = _NOT_A_NAME.sub("_", name)[:64]
    return cleaned or "unknown_tool"


def _short_tool(resource: str) -> str:
    """``add`` for ``workspaces/w/integrations/i/tools/add``."""
    return resource.rsplit("/", 1)[-1]


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


def _chat_message(message: context_pb2.Message) -> dict[str, Any] | None:
    if message.role == context_pb2.MESSAGE_ROLE_TOOL:
        return _orphan_tool_output(message.parts)
    text = _text_of(message.parts)
    role = _ROLES.get(message.role, "user")
    return {"role": role, "content": text} if text else None


def _orphan_tool_output(parts: Sequence[context_pb2.ContentPart]) -> dict[str, Any] | None:
    """Tool output whose call is not in the messages sent: the ``tool`` role
    needs the id of a call the request shows, so it is quoted as user input."""
    blocks: list[str] = []
    for part in parts:
        if part.WhichOneof("part") == "tool_result":
            name = _short_tool(part.tool_result.tool)
            label = f"Tool output ({name})" if name else "Tool output"
            blocks.append(f"{label}:\n{part.tool_result.text}")
    rest = _text_of(parts)
    if rest:
        blocks.append(f"Tool output:\n{rest}")
    return {"role": "user", "content": "\n\n".join(blocks)} if blocks else None


def _call_note(call: context_pb2.ToolCallContent) -> str:
    return f"[called tool {call.function_name or _short_tool(call.tool) or 'unknown'}]"


def _tool_exchange(
    assistant: context_pb2.Message, followers: Sequence[context_pb2.Message]
) -> list[dict[str, Any]]:
    """An assistant message with tool calls and the TOOL messages right after it.

    The API requires an assistant message's calls to be answered by the
    ``tool`` messages that immediately follow it, each call exactly once. So
    only calls answered in ``followers`` stay calls; one whose result left the
    window is mentioned in the text instead, and results whose call is not
    here are quoted as user input after the exchange.
    """
    calls: list[context_pb2.ToolCallContent] = []
    for part in assistant.parts:
        if part.WhichOneof("part") == "tool_call":
            calls.append(part.tool_call)
    wanted = {call.id for call in calls if call.id}
    # The first result for each call, and where it is (follower, part).
    answers: dict[str, tuple[int, int, str]] = {}
    for position, message in enumerate(followers):
        for number, part in enumerate(message.parts):
            if part.WhichOneof("part") == "tool_result" and part.tool_result.id in wanted:
                answers.setdefault(part.tool_result.id, (position, number, part.tool_result.text))
    paired: list[context_pb2.ToolCallContent] = []
    notes: list[str] = []
    for call in calls:
        if call.id in answers and all(call.id != done.id for done in paired):
            paired.append(call)
        elif call.id not in answers:
            notes.append(_call_note(call))
    text = "\n".join(piece for piece in (_text_of(assistant.parts), *notes) if piece)
    rendered: list[dict[str, Any]] = []
    if paired:
        exchange = [
            (call.id, call.function_name or _short_tool(call.tool), json_text(call.arguments))
            for call in paired
        ]
        rendered.append(assistant_calls(text, exchange))
        rendered.extend(tool_message(call.id, answers[call.id][2]) for call in paired)
    elif text:
        rendered.append({"role": "assistant", "content": text})
    used = {(position, number) for position, number, _ in answers.values()}
    for position, message in enumerate(followers):
        leftover = [
            part for number, part in enumerate(message.parts) if (position, number) not in used
        ]
        orphan = _orphan_tool_output(leftover)
        if orphan is not None:
            rendered.append(orphan)
    return rendered


def _history(messages: Sequence[context_pb2.Message]) -> list[dict[str, Any]]:
    rendered: list[dict[str, Any]] = []
    index = 0
    while index < len(messages):
        message = messages[index]
        index += 1
        has_calls = any(part.WhichOneof("part") == "tool_call" for part in message.parts)
        if message.role == context_pb2.MESSAGE_ROLE_ASSISTANT and has_calls:
            followers: list[context_pb2.Message] = []
            while index < len(messages) and messages[index].role == context_pb2.MESSAGE_ROLE_TOOL:
                followers.append(messages[index])
                index += 1
            rendered.extend(_tool_exchange(message, followers))
            continue
        chat = _chat_message(message)
        if chat is not None:
            rendered.append(chat)
    return rendered


def build_messages(request: handler_pb2.HandleRequest) -> list[dict[str, Any]]:
    """The Chat Completions ``messages`` for a request: the assistant's
    instructions, what is remembered (one system message), the window's
    messages (stored tool calls paired with their results), then the new message."""
    remembered: list[str] = []
    summaries: list[str] = []
    window: list[context_pb2.Message] = []
    for item in request.context.included:
        kind = item.WhichOneof("item")
        if kind == "memory_item":
            memory = item.memory_item
            if not memory.content.strip():
                continue
            if memory.kind == context_pb2.MEMORY_KIND_SUMMARY:
                summaries.append(memory.content.strip())
            else:
                remembered.append(f"- {memory.content.strip()}")
        elif kind == "message":
            # The dispatcher stores the message before the window is built, so
            # the window may already hold it; it is sent once, last.
            if request.message.name and item.message.name == request.message.name:
                continue
            window.append(item.message)
    blocks: list[str] = []
    if summaries:
        blocks.append("Summary of the earlier conversation:\n" + "\n\n".join(summaries))
    if remembered:
        blocks.append("Remembered about this user and conversation:\n" + "\n".join(remembered))
    messages: list[dict[str, Any]] = []
    if request.instructions.strip():
        messages.append({"role": "system", "content": request.instructions})
    if blocks:
        messages.append({"role": "system", "content": "\n\n".join(blocks)})
    messages.extend(_history(window))
    current = _chat_message(request.message)
    messages.append(current or {"role": "user", "content": ""})
    return messages


@dataclass(frozen=True)
class Sampling:
    temperature: float | None
    top_p: float | None
    max_tokens: int


def sampling_of(request: handler_pb2.HandleRequest, ceiling: int) -> Sampling:
    """The run's sampling: its parameters, else its assistant's settings, else
    the defaults; ``max_tokens`` never above the ceiling. Bad values fail the run."""
    settings = request.model
    temperature: float | None = None
    if settings.HasField("temperature"):
        temperature = settings.temperature
        if not 0 <= temperature <= 2:
            raise HandlerFailure("the assistant's temperature must be a number from 0 to 2")
    top_p: float | None = None
    if settings.HasField("top_p"):
        top_p = settings.top_p
        if not 0 <= top_p <= 1:
            raise HandlerFailure("the assistant's top_p must be a number from 0 to 1")
    max_tokens = ceiling
    if settings.max_output_tokens > 0:
        max_tokens = min(settings.max_output_tokens, ceiling)
    given_temperature, given_max = _parameters(request.parameters, ceiling)
    return Sampling(
        temperature=given_temperature if given_temperature is not None else temperature,
        top_p=top_p,
        max_tokens=given_max if given_max is not None else max_tokens,
    )


def _parameters(parameters: struct_pb2.Struct, ceiling: int) -> tuple[float | None, int | None]:
    """``(temperature, max_tokens)`` given in the run's parameters (``None``
    where not given); bad values fail the run."""
    fields = parameters.fields
    temperature: float | None = None
    if "temperature" in fields:
        value = fields["temperature"]
        if value.WhichOneof("kind") != "number_value" or not 0 <= value.number_value <= 2:
            raise HandlerFailure("parameter 'temperature' must be a number from 0 to 2")
        temperature = value.number_value
    max_tokens: int | None = None
    if "max_tokens" in fields:
        value = fields["max_tokens"]
        number = value.number_value
        if (
            value.WhichOneof("kind") != "number_value"
            or not math.isfinite(number)
            or not number.is_integer()
            or number < 1
        ):
            raise HandlerFailure("parameter 'max_tokens' must be a whole number of at least 1")
        max_tokens = min(int(number), ceiling)
    return temperature, max_tokens


def parameters_schema(ceiling: int) -> struct_pb2.Struct:
    schema = struct_pb2.Struct()
    schema.update(
        {
            "type": "object",
            "properties": {
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "max_tokens": {"type": "integer", "minimum": 1, "maximum": ceiling},
            },
        }
    )
    return schema


def request_body(
    messages: list[dict[str, Any]], sampling: Sampling, extra: dict[str, Any]
) -> dict[str, Any]:
    """A streamed Chat Completions request's body, without ``model`` (the
    client names each provider's own)."""
    body: dict[str, Any] = {
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": sampling.max_tokens,
        **extra,
    }
    if sampling.temperature is not None:
        body["temperature"] = sampling.temperature
    if sampling.top_p is not None:
        body["top_p"] = sampling.top_p
    return body
