"""The ``llm`` handler: answers with an OpenAI-compatible Chat Completions provider.

One request is one streamed ``POST {base_url}/chat/completions``. Deltas are
relayed as they arrive and the stream ends with one ``result`` that carries the
whole answer, the token usage (the provider's own count when it sends one, the
offline estimate otherwise) and its price from the configured table.

Failures are absorbed only while they are invisible: until the first delta has
reached the caller, a 429, a 5xx, a dropped connection or a garbled stream is
retried with backoff on the same provider and then handed to the next provider
in the chain. Once text has been shown, a failure ends the run with a
``HandlerFailure``: silently starting the answer again would show the user a
different answer spliced onto the first. A circuit breaker per provider keeps a
provider that keeps failing from costing every run its retries.

Every wait is bounded by the run's deadline, every message and log line is
free of API keys, and cancelling the run closes the provider's connection, so
the provider stops generating (and billing for) an answer nobody reads.

Tools: when the run may call tools, they are offered to the model as
functions. An answer with tool calls is not the end of the run: its calls go to
the run's ``ToolRunner`` as one batch, their results go back to the model as
``tool`` messages, and the model is asked again, until it answers without
calls or the run's tool steps are spent (the last request then forbids calls).
A run continued after a restart rebuilds its conversation from the steps it
already took. The text of every pass streams to the caller, the result holds
the last pass's text, and the usage is the sum over every model call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from dataclasses import dataclass, field, replace
from typing import Any, Final

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers import Frame, HandleCall, HandlerFailure, capabilities
from switchboard.dispatcher.llmclient import Answer, ProviderClient
from switchboard.dispatcher.llmconfig import LlmConfig, Provider, parse_prices, parse_providers
from switchboard.dispatcher.llmstream import ModelCall, Outcome
from switchboard.dispatcher.llmusage import Price, Tally, estimate_tokens
from switchboard.platform.rendering import plain, render_parts

# The settings and the prices are defined with the parts that use them; they
# are importable from here too, the handler's one public module.
__all__ = [
    "LlmConfig",
    "LlmHandler",
    "Price",
    "Provider",
    "build_messages",
    "estimate_tokens",
    "parse_prices",
    "parse_providers",
]

log = logging.getLogger("switchboard.dispatcher.llm")

# The Chat Completions API accepts at most this many tools in one request.
MAX_TOOLS: Final = 128
# Arguments that are not a JSON object are kept for the record, this much of them.
MAX_INVALID_ARGUMENTS_CHARS: Final = 2000
# A provider's call id longer than this is replaced by one of ours.
MAX_CALL_ID_CHARS: Final = 128
# A function name as stored on a ToolCall (a model may invent any name).
MAX_FUNCTION_NAME_CHARS: Final = 256
# What the API accepts as a function name; other names are refused with a 400.
FUNCTION_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_NOT_A_NAME: Final = re.compile(r"[^a-zA-Z0-9_-]")
_TOOL_PARTS: Final = frozenset({"tool_call", "tool_result"})

_ROLES: Final = {
    context_pb2.MESSAGE_ROLE_USER: "user",
    context_pb2.MESSAGE_ROLE_ASSISTANT: "assistant",
    context_pb2.MESSAGE_ROLE_SYSTEM: "system",
}


# ---------------------------------------------------------------------------
# Building the request


def _text_of(parts: Iterable[context_pb2.ContentPart]) -> str:
    """The context service's rendering of the parts that are not tool parts, so
    the model reads what was counted; tool parts become structured messages."""
    return render_parts(part for part in parts if part.WhichOneof("part") not in _TOOL_PARTS)


def _json_text(struct: struct_pb2.Struct) -> str:
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


def _assistant_calls(text: str, calls: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
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


def _tool_message(call_id: str, text: str) -> dict[str, Any]:
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
            (call.id, call.function_name or _short_tool(call.tool), _json_text(call.arguments))
            for call in paired
        ]
        rendered.append(_assistant_calls(text, exchange))
        rendered.extend(_tool_message(call.id, answers[call.id][2]) for call in paired)
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
class _Sampling:
    temperature: float | None
    top_p: float | None
    max_tokens: int


def _sampling(request: handler_pb2.HandleRequest, ceiling: int) -> _Sampling:
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
    return _Sampling(
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


class _Toolbox:
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
            segments = definition.tool.split("/")
            if len(segments) == 6 and segments[0] == "workspaces" and segments[2] == "integrations":
                call.integration = "/".join(segments[:4])
            call.tool = segments[-1]
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
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    struct = struct_pb2.Struct()
    try:
        struct.update(data)
    except (ValueError, TypeError, RecursionError):
        return None
    return struct


def _result_text(result: handler_pb2.ToolResult) -> str:
    """What the model reads of a result: its text, else its structured output."""
    if result.text:
        return result.text
    if result.result.fields:
        return _json_text(result.result)
    return ""


def _step_arguments(call: handler_pb2.ToolCall) -> str:
    return call.invalid_arguments or _json_text(call.arguments)


def _parameters_schema(ceiling: int) -> struct_pb2.Struct:
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
    messages: list[dict[str, Any]], sampling: _Sampling, extra: dict[str, Any]
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


# ---------------------------------------------------------------------------
# The handler


@dataclass
class _Run:
    """What one run of the handler has done so far, over all its model calls."""

    #: Whether any text of the run reached the caller.
    shown: bool
    usage: Tally
    #: Tool call ids of the run so far (they must be unique within it).
    used_ids: set[str] = field(default_factory=set)
    serial: int = 0

    def call_id(self, proposed: str) -> str:
        """The provider's id for a call, or ``call_<n>`` when it sent none (or
        one the run already used, or an absurd one)."""
        if not proposed or len(proposed) > MAX_CALL_ID_CHARS or proposed in self.used_ids:
            while True:
                self.serial += 1
                proposed = f"call_{self.serial}"
                if proposed not in self.used_ids:
                    break
        self.used_ids.add(proposed)
        return proposed


class LlmHandler:
    """Answers with the first provider of the chain that can.

    ``count`` is the offline token estimator used when a provider reports no
    usage (pass the context service's counter so estimates match budgets);
    ``clock``, ``sleep`` and ``rng`` exist so tests can drive time and jitter.
    """

    kind = dispatcher_pb2.HANDLER_KIND_LLM

    def __init__(
        self,
        config: LlmConfig,
        *,
        count: Callable[[str], int] = estimate_tokens,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        max_context_tokens: int = 8000,
    ) -> None:
        self._config = config
        self._count = count
        self._client = ProviderClient(config, clock=clock, sleep=sleep, rng=rng)
        caps = capabilities(
            "llm",
            "Language model",
            "Answers in natural language with a hosted language model "
            f"({config.providers[0].label}).",
            topics=("general", "chat"),
            max_context_tokens=max_context_tokens,
        )
        caps.parameters_schema.CopyFrom(_parameters_schema(config.max_output_tokens))
        self._capabilities = caps

    @property
    def capabilities(self) -> handler_pb2.HandlerCapabilities:
        return self._capabilities

    @property
    def config(self) -> LlmConfig:
        return self._config

    def available(self) -> bool:
        return self._client.available()

    def breaker_state(self, provider_name: str) -> str:
        """``closed``, ``open`` or ``half-open``; ``KeyError`` for an unknown provider."""
        return self._client.breaker_state(provider_name)

    async def aclose(self) -> None:
        """Close the connection pool; later calls fail."""
        await self._client.aclose()

    async def handle(self, call: HandleCall) -> AsyncGenerator[Frame, None]:
        request = call.request
        sampling = _sampling(request, self._config.max_output_tokens)
        chain = self._chain(request.model)
        toolbox: _Toolbox | None = None
        if call.tools is not None and request.tools and request.max_tool_steps > 0:
            toolbox = _Toolbox(request.tools)
            if not toolbox.specs:
                toolbox = None
        messages = build_messages(request)
        # Text shown before a restart counts as shown: the run's answer has begun.
        run = _Run(shown=any(step.text for step in request.steps), usage=Tally(self._count))
        steps = await self._resume(call, messages, run)
        while True:
            offer = toolbox is not None and steps < request.max_tool_steps
            extra: dict[str, Any] = {}
            if toolbox is not None:
                # Past the limit the tools stay described (the conversation
                # shows calls to them) but may not be called.
                extra = {"tools": toolbox.specs, "tool_choice": "auto" if offer else "none"}
            answer = Answer(shown=run.shown)
            async with contextlib.aclosing(
                self._client.ask(
                    chain, request_body(messages, sampling, extra), call.remaining, answer
                )
            ) as texts:
                async for text in texts:
                    yield Frame(delta=handler_pb2.TextDelta(text=text))
            run.shown = answer.shown
            outcome, provider = answer.outcome, answer.provider
            if provider is None:
                raise RuntimeError("a model call ended without an answer or a failure")
            self._account(run, provider, messages, extra, outcome)
            made = outcome.tool_calls()
            if not made:
                yield Frame(result=self._result(run, provider, outcome))
                return
            if toolbox is None:
                raise HandlerFailure("the model asked for a tool, but this run may call none")
            if not offer:
                raise HandlerFailure(
                    "the model asked for tools after the run's limit of "
                    f"{request.max_tool_steps} tool steps"
                )
            calls = [toolbox.call(call_made, run.call_id(call_made.id)) for call_made in made]
            results = await self._run_tools(call, calls)
            # The model gets its own arguments back as it wrote them.
            exchange = [
                (tool_call.id, tool_call.function_name, call_made.arguments or "{}")
                for tool_call, call_made in zip(calls, made, strict=True)
            ]
            messages.append(_assistant_calls("".join(outcome.pieces), exchange))
            messages.extend(
                _tool_message(tool_call.id, _result_text(result))
                for tool_call, result in zip(calls, results, strict=True)
            )
            steps += 1

    def model_label(self, settings: handler_pb2.ModelSettings | None) -> str:
        """``provider/model`` a run with these settings asks first (DescribeConversation)."""
        try:
            return self._chain(settings or handler_pb2.ModelSettings())[0].label
        except HandlerFailure:
            return ""

    def _chain(self, settings: handler_pb2.ModelSettings) -> tuple[Provider, ...]:
        """The providers in the order to try: the assistant's choice first, with
        its model, then the rest of the configured chain as fallback."""
        providers = list(self._config.providers)
        if settings.provider:
            names = [provider.name for provider in providers]
            if settings.provider not in names:
                raise HandlerFailure(
                    f"the model provider {settings.provider[:100]!r} is not configured "
                    f"(configured: {', '.join(names)})"
                )
            providers.insert(0, providers.pop(names.index(settings.provider)))
        if settings.model:
            if len(settings.model) > 256 or not settings.model.strip():
                raise HandlerFailure("the assistant's model name must be 1 to 256 characters")
            providers[0] = replace(providers[0], model=settings.model)
        return tuple(providers)

    async def _resume(self, call: HandleCall, messages: list[dict[str, Any]], run: _Run) -> int:
        """Append the steps the run already took to ``messages``, first running
        the calls of an unfinished last step; the number of steps."""
        steps = call.request.steps
        for position, step in enumerate(steps):
            results = {result.id: result for result in reversed(step.results)}
            pending = [tool_call for tool_call in step.calls if tool_call.id not in results]
            if pending:
                if position != len(steps) - 1:
                    raise HandlerFailure(
                        f"tool step {position + 1} of {len(steps)} lacks results, "
                        "but only the last step can be unfinished"
                    )
                ran = await self._run_tools(call, pending)
                results.update(
                    (tool_call.id, result) for tool_call, result in zip(pending, ran, strict=True)
                )
            run.used_ids.update(tool_call.id for tool_call in step.calls)
            messages.append(
                _assistant_calls(
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
                _tool_message(tool_call.id, _result_text(results[tool_call.id]))
                for tool_call in step.calls
            )
        return len(steps)

    async def _run_tools(
        self, call: HandleCall, calls: Sequence[handler_pb2.ToolCall]
    ) -> list[handler_pb2.ToolResult]:
        # The runner bounds its own waits by the run's deadline (approvals
        # included) and raises when it passes; cancellation propagates.
        if call.tools is None:
            raise HandlerFailure("the run has tool calls to finish, but may call no tools")
        results = list(await call.tools.run(calls))
        if len(results) != len(calls):
            raise RuntimeError(
                f"the tool runner returned {len(results)} results for {len(calls)} calls"
            )
        return results

    def _account(
        self,
        run: _Run,
        provider: Provider,
        messages: list[dict[str, Any]],
        extra: dict[str, Any],
        outcome: Outcome,
    ) -> None:
        """Add one model call's usage and cost to the run's."""
        run.usage.add(
            reported=outcome.usage,
            price=self._config.price_of(provider),
            messages=messages,
            tools=extra.get("tools"),
            text="".join(outcome.pieces),
            calls=((made.name, made.arguments) for made in outcome.tool_calls()),
        )

    def _result(self, run: _Run, provider: Provider, outcome: Outcome) -> handler_pb2.HandleResult:
        return handler_pb2.HandleResult(
            parts=[context_pb2.ContentPart(text="".join(outcome.pieces))],
            usage=run.usage.usage(provider.label),
            finish_reason=outcome.finish_reason or "stop",
        )
