"""Tool calling in the ``llm`` handler, against the local server of the Chat
Completions protocol (tests/fakes/openai_server.py) over real HTTP.

The ToolRunner here is a small stand-in for the dispatcher's: it records each
batch of calls and answers each call with a scripted ToolResult; the fake
checks every request as the API does (tool messages must answer the calls of
the assistant message right before them), so a conversation it accepts is one
the API would accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from switchboard.api.context.v1 import context_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import HandleCall, ToolRunner
from switchboard.dispatcher.llm.handler import (
    LlmConfig,
    LlmHandler,
    Price,
    Provider,
    build_messages,
)
from tests.conftest import CALL_DEADLINE_S
from tests.fakes.openai_server import FakeOpenAI, FakeToolCall, Reply
from tests.infra.clock import FakeClock
from tests.kits.llmkit import Sleeps, fail, run

pytestmark = pytest.mark.unit

MODEL = "gpt-fake"
BACKUP_MODEL = "gpt-backup"
RUN = "workspaces/w/conversations/c/runs/r"

SUCCEEDED = handler_pb2.TOOL_OUTCOME_SUCCEEDED
FAILED = handler_pb2.TOOL_OUTCOME_FAILED


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(data)
    return value


ADD = handler_pb2.ToolDefinition(
    tool="workspaces/w/integrations/calc/tools/add",
    function_name="calc__add",
    description="Adds two numbers.",
    input_schema=struct(
        {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        }
    ),
)
NOW = handler_pb2.ToolDefinition(
    tool="workspaces/w/integrations/clock/tools/now",
    function_name="clock__now",
    description="The time.",
)


def answer(call: handler_pb2.ToolCall) -> handler_pb2.ToolResult:
    """What the stand-in runner answers, like the dispatcher's would."""
    if not call.integration:
        return handler_pb2.ToolResult(
            id=call.id, outcome=FAILED, text=f"There is no tool named {call.tool}."
        )
    if call.invalid_arguments:
        return handler_pb2.ToolResult(
            id=call.id, tool=call.tool, outcome=FAILED, text="The arguments are not an object."
        )
    args = json_format.MessageToDict(call.arguments)
    if call.tool == "add":
        total = args["a"] + args["b"]
        return handler_pb2.ToolResult(
            id=call.id, tool=call.tool, outcome=SUCCEEDED, text=f"{total:g}"
        )
    return handler_pb2.ToolResult(id=call.id, tool=call.tool, outcome=SUCCEEDED, text="12:00")


class Runner:
    """Records each batch of calls; answers with ``answer``; can be held."""

    def __init__(
        self, reply: Callable[[handler_pb2.ToolCall], handler_pb2.ToolResult] = answer
    ) -> None:
        self.batches: list[list[handler_pb2.ToolCall]] = []
        self.reply = reply
        self.entered = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.cancelled = False

    async def run(self, calls: Sequence[handler_pb2.ToolCall]) -> list[handler_pb2.ToolResult]:
        self.batches.append([handler_pb2.ToolCall.FromString(c.SerializeToString()) for c in calls])
        self.entered.set()
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return [self.reply(call) for call in calls]


Make = Callable[..., LlmHandler]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    built: list[LlmHandler] = []

    def build(*fakes: FakeOpenAI, **config: Any) -> LlmHandler:
        chain = tuple(
            Provider(name, fake.url, "", model)
            for (name, model), fake in zip(
                (("primary", MODEL), ("backup", BACKUP_MODEL)), fakes, strict=False
            )
        )
        config.setdefault("backoff_base_s", 0.05)
        handler = LlmHandler(
            LlmConfig(providers=chain, **config), clock=FakeClock(), sleep=Sleeps()
        )
        built.append(handler)
        return handler

    yield build
    for handler in built:
        await handler.aclose()


def user(text: str) -> context_pb2.Message:
    return context_pb2.Message(
        role=context_pb2.MESSAGE_ROLE_USER, parts=[context_pb2.ContentPart(text=text)]
    )


def make_call(
    text: str = "What is 2 + 3?",
    *,
    runner: ToolRunner | None,
    tools: Sequence[handler_pb2.ToolDefinition] = (ADD, NOW),
    max_tool_steps: int = 4,
    steps: Sequence[handler_pb2.ToolStep] = (),
    instructions: str = "",
    model: handler_pb2.ModelSettings | None = None,
    parameters: dict[str, Any] | None = None,
    context: context_pb2.ContextWindow | None = None,
) -> HandleCall:
    request = handler_pb2.HandleRequest(
        run=RUN,
        message=user(text),
        tools=list(tools),
        max_tool_steps=max_tool_steps,
        steps=list(steps),
        instructions=instructions,
        model=model,
        parameters=struct(parameters or {}),
        context=context,
    )
    return HandleCall(request=request, deadline=time.monotonic() + CALL_DEADLINE_S, tools=runner)


def body(fake: FakeOpenAI, index: int) -> dict[str, Any]:
    data: dict[str, Any] = fake.requests[index].body
    return data


def args_of(call: handler_pb2.ToolCall) -> dict[str, Any]:
    return json_format.MessageToDict(call.arguments)


# -- one step ----------------------------------------------------------------------


async def test_chunked_arguments_become_a_call_whose_result_goes_back(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(
        Reply.tool_calls(
            [FakeToolCall("calc__add", '{"a": 2, "b": 3}', id="call_x1")],
            content="Let me add.",
            chunk_chars=3,
        ),
        Reply.text("It is 5."),
    )
    runner = Runner()
    handler = make(primary)

    deltas, result = await run(handler, make_call(runner=runner))

    # Both passes stream; the result holds the final pass's text only.
    assert deltas == ["Let", " me", " add.", "It", " is", " 5."]
    assert result.parts == [context_pb2.ContentPart(text="It is 5.")]
    assert result.finish_reason == "stop"
    [[call]] = runner.batches
    assert call.id == "call_x1"
    assert call.function_name == "calc__add"
    assert call.integration == "workspaces/w/integrations/calc"
    assert call.tool == "add"
    assert args_of(call) == {"a": 2, "b": 3}
    assert not call.invalid_arguments

    first = body(primary, 0)
    assert first["tool_choice"] == "auto"
    assert first["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "calc__add",
                "description": "Adds two numbers.",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                    "required": ["a", "b"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "clock__now",
                "description": "The time.",
                # An empty schema is sent as the empty object schema the API requires.
                "parameters": {"type": "object", "properties": {}},
            },
        },
    ]
    second = body(primary, 1)
    assert second["messages"][:1] == first["messages"]
    assert second["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Let me add.",
            "tool_calls": [
                {
                    "id": "call_x1",
                    "type": "function",
                    "function": {"name": "calc__add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_x1", "content": "5"},
    ]
    assert second["tool_choice"] == "auto"


async def test_parallel_calls_run_as_one_batch_and_answer_by_id(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(
        Reply.tool_calls(
            [
                ("calc__add", {"a": 1, "b": 2}, "call_a"),
                ("clock__now", {}, "call_b"),
                ("calc__add", {"a": 10, "b": 20}, "call_c"),
            ],
            chunk_chars=2,
        ),
        Reply.text("3, noon and 30."),
    )

    def reply(call: handler_pb2.ToolCall) -> handler_pb2.ToolResult:
        if call.tool == "now":
            # Nothing but structured output: the model reads it as JSON.
            return handler_pb2.ToolResult(
                id=call.id, outcome=SUCCEEDED, result=struct({"time": "12:00"})
            )
        return answer(call)

    runner = Runner(reply)
    handler = make(primary)

    deltas, result = await run(handler, make_call(runner=runner))

    assert deltas == ["3,", " noon", " and", " 30."]
    assert len(runner.batches) == 1
    assert [(c.id, c.tool, args_of(c)) for c in runner.batches[0]] == [
        ("call_a", "add", {"a": 1, "b": 2}),
        ("call_b", "now", {}),
        ("call_c", "add", {"a": 10, "b": 20}),
    ]
    messages = body(primary, 1)["messages"]
    assert messages[1]["content"] is None
    assert [call["id"] for call in messages[1]["tool_calls"]] == ["call_a", "call_b", "call_c"]
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "call_a", "content": "3"},
        {"role": "tool", "tool_call_id": "call_b", "content": '{"time":"12:00"}'},
        {"role": "tool", "tool_call_id": "call_c", "content": "30"},
    ]
    assert result.parts[0].text == "3, noon and 30."


async def test_usage_is_the_sum_over_every_model_call(primary: FakeOpenAI, make: Make) -> None:
    primary.script(
        Reply.tool_calls([("calc__add", {"a": 1, "b": 1})], usage=(100, 10)),
        Reply.tool_calls([("calc__add", {"a": 2, "b": 2})], usage=(150, 20)),
        Reply.text("Done.", usage=(200, 5)),
    )
    handler = make(primary, prices={MODEL: Price(1.0, 2.0)})

    _, result = await run(handler, make_call(runner=Runner()))

    assert result.usage.input_tokens == 450
    assert result.usage.output_tokens == 35
    assert result.usage.estimated_cost_usd == pytest.approx((450 * 1.0 + 35 * 2.0) / 1e6)
    assert result.usage.model == f"primary/{MODEL}"
    assert not result.usage.estimated
    assert len(primary.requests) == 3


async def test_usage_is_estimated_if_any_pass_reports_none(primary: FakeOpenAI, make: Make) -> None:
    primary.script(
        Reply.tool_calls([("calc__add", {"a": 1, "b": 1})], usage=False),
        Reply.text("Two.", usage=(200, 5)),
    )
    handler = make(primary)

    _, result = await run(handler, make_call(runner=Runner()))

    assert result.usage.estimated
    # The estimated pass counts something for its prompt and its call.
    assert result.usage.input_tokens > 200
    assert result.usage.output_tokens > 5


async def test_a_server_that_ignores_stream_can_call_tools(primary: FakeOpenAI, make: Make) -> None:
    primary.script(
        Reply.tool_calls([("calc__add", {"a": 4, "b": 4}, "call_w")], ignore_stream=True),
        Reply.text("Eight.", ignore_stream=True),
    )
    runner = Runner()
    handler = make(primary)

    deltas, result = await run(handler, make_call(runner=runner))

    assert [c.id for c in runner.batches[0]] == ["call_w"]
    assert deltas == ["Eight."]
    assert body(primary, 1)["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_w",
        "content": "8",
    }
    assert result.parts[0].text == "Eight."


# -- what the model may get wrong --------------------------------------------------------


async def test_an_unknown_function_is_a_call_the_runner_fails(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(
        Reply.tool_calls([("weather__today", {"city": "Lisbon"}, "call_u")]),
        Reply.text("I cannot check the weather."),
    )
    runner = Runner()
    handler = make(primary)

    _, result = await run(handler, make_call(runner=runner))

    [[call]] = runner.batches
    assert call.integration == ""
    assert call.tool == "weather__today"
    assert call.function_name == "weather__today"
    assert body(primary, 1)["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_u",
        "content": "There is no tool named weather__today.",
    }
    assert result.parts[0].text == "I cannot check the weather."


@pytest.mark.parametrize("raw", ['{"a": 2, "b"', "[1, 2]", '"text"'])
async def test_arguments_that_are_not_an_object_are_kept_as_invalid(
    primary: FakeOpenAI, make: Make, raw: str
) -> None:
    primary.script(
        Reply.tool_calls([FakeToolCall("calc__add", raw, id="call_i")], chunk_chars=2),
        Reply.text("Sorry."),
    )
    runner = Runner()
    handler = make(primary)

    await run(handler, make_call(runner=runner))

    [[call]] = runner.batches
    assert call.invalid_arguments == raw
    assert not call.arguments.fields
    assert call.tool == "add"
    # The model sees its own text again, as it wrote it.
    assert body(primary, 1)["messages"][-2]["tool_calls"][0]["function"]["arguments"] == raw


async def test_invalid_arguments_are_cut_to_2000_characters(
    primary: FakeOpenAI, make: Make
) -> None:
    raw = "x" * 5000
    primary.script(
        Reply.tool_calls([FakeToolCall("calc__add", raw)], chunk_chars=700),
        Reply.text("Sorry."),
    )
    runner = Runner()

    await run(make(primary), make_call(runner=runner))

    assert runner.batches[0][0].invalid_arguments == "x" * 2000


async def test_missing_or_reused_ids_are_replaced(primary: FakeOpenAI, make: Make) -> None:
    primary.script(
        Reply.tool_calls([FakeToolCall("calc__add", '{"a":1,"b":1}', id="")]),
        # A server that numbers calls per answer reuses ids across steps.
        Reply.tool_calls([FakeToolCall("calc__add", '{"a":2,"b":2}', id="call_1")]),
        Reply.text("Done."),
    )
    runner = Runner()

    await run(make(primary), make_call(runner=runner))

    assert [[call.id for call in batch] for batch in runner.batches] == [["call_1"], ["call_2"]]
    messages = body(primary, 2)["messages"]
    assert [m.get("tool_call_id") for m in messages if m["role"] == "tool"] == [
        "call_1",
        "call_2",
    ]


async def test_blank_arguments_are_an_empty_object(primary: FakeOpenAI, make: Make) -> None:
    primary.script(
        Reply.tool_calls([FakeToolCall("clock__now", "", id="call_n")]), Reply.text("Noon.")
    )
    runner = Runner()

    await run(make(primary), make_call(runner=runner))

    [[call]] = runner.batches
    assert not call.invalid_arguments
    assert not call.arguments.fields
    sent = body(primary, 1)["messages"][-2]["tool_calls"][0]["function"]["arguments"]
    assert sent == "{}"


async def test_more_than_128_calls_in_one_answer_is_malformed(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.tool_calls([("clock__now", {})] * 129))
    runner = Runner()

    _, failure = await fail(make(primary, max_retries=0), make_call(runner=runner))

    assert "more than 128 tool calls" in failure.message
    assert runner.batches == []


async def test_arguments_beyond_the_response_limit_are_refused(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.tool_calls([FakeToolCall("calc__add", "1" * 3000)], chunk_chars=100))
    runner = Runner()

    _, failure = await fail(
        make(primary, max_retries=0, max_response_bytes=2500), make_call(runner=runner)
    )

    assert "larger than 2500 bytes" in failure.message
    assert runner.batches == []


# -- the step limit ----------------------------------------------------------------


async def test_the_last_request_forbids_tools_once_the_steps_are_spent(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(
        Reply.tool_calls([("calc__add", {"a": 1, "b": 1})]),
        Reply.tool_calls([("calc__add", {"a": 2, "b": 2})]),
        Reply.text("Two and four."),
    )
    runner = Runner()

    _, result = await run(make(primary), make_call(runner=runner, max_tool_steps=2))

    assert len(runner.batches) == 2
    assert [body(primary, i)["tool_choice"] for i in range(3)] == ["auto", "auto", "none"]
    # Still described: the conversation shows calls to them.
    assert len(body(primary, 2)["tools"]) == 2
    assert result.parts[0].text == "Two and four."


async def test_tool_calls_past_the_limit_fail_the_run(primary: FakeOpenAI, make: Make) -> None:
    primary.script(
        Reply.tool_calls([("calc__add", {"a": 1, "b": 1})]),
        # A server that ignores tool_choice "none".
        Reply.tool_calls([("calc__add", {"a": 2, "b": 2})]),
    )
    runner = Runner()

    _, failure = await fail(make(primary), make_call(runner=runner, max_tool_steps=1))

    assert failure.message == "the model asked for tools after the run's limit of 1 tool steps"
    assert len(runner.batches) == 1


async def test_no_tools_are_offered_without_a_runner_or_steps(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.text("Plain."), Reply.text("Plain again."))
    handler = make(primary)

    await run(handler, make_call(runner=None))
    await run(handler, make_call(runner=Runner(), max_tool_steps=0))

    for index in (0, 1):
        assert "tools" not in body(primary, index)
        assert "tool_choice" not in body(primary, index)


async def test_tool_calls_when_none_were_offered_fail(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.tool_calls([("calc__add", {"a": 1, "b": 1})]))

    _, failure = await fail(make(primary), make_call(runner=None))

    assert failure.message == "the model asked for a tool, but this run may call none"


async def test_a_call_made_when_no_tool_could_be_offered_is_answered_not_fatal(
    primary: FakeOpenAI, make: Make
) -> None:
    """The run has a runner (its assistant enables tools) but none could be offered now
    (an integration unreachable): the request describes no tools, and a call the model
    makes anyway is answered by the runner, and the run goes on to its answer."""
    primary.script(
        Reply.tool_calls([("calc__add", {"a": 1, "b": 1})]),
        Reply.text("I could not add them."),
    )
    runner = Runner()

    _, result = await run(make(primary), make_call(runner=runner, tools=()))

    assert "tools" not in body(primary, 0)
    assert "tool_choice" not in body(primary, 0)
    assert [[call.function_name for call in batch] for batch in runner.batches] == [["calc__add"]]
    assert [part.text for part in result.parts] == ["I could not add them."]
    tool_message = body(primary, 1)["messages"][-1]
    assert tool_message["role"] == "tool"
    assert "There is no tool named" in tool_message["content"]


# -- failures across passes --------------------------------------------------------------


async def test_a_failure_after_text_was_shown_ends_the_run(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make
) -> None:
    primary.script(
        Reply.tool_calls([("calc__add", {"a": 1, "b": 1})], content="Adding."),
        Reply.error(500),
    )
    backup.script(Reply.text("never"))
    handler = make(primary, backup)

    deltas, failure = await fail(handler, make_call(runner=Runner()))

    assert deltas == ["Adding."]
    assert failure.message.startswith("the LLM answer was cut off (primary: HTTP 500")
    assert len(primary.requests) == 2
    assert backup.requests == []


async def test_a_failure_before_anything_was_shown_retries_and_falls_back(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make
) -> None:
    primary.script(
        # Dropped in the middle of the arguments: nothing was shown, so it is retried.
        Reply.tool_calls([FakeToolCall("calc__add", '{"a": 1, "b": 1}')], drop_after_chunks=2),
        Reply.tool_calls([("calc__add", {"a": 1, "b": 1})]),
        Reply.error(500),
    )
    backup.script(Reply.text("Two."))
    runner = Runner()
    handler = make(primary, backup, max_retries=1)
    primary.default = Reply.error(503)

    deltas, result = await run(handler, make_call(runner=runner))

    # The dropped answer's call never ran; the retried one ran once.
    assert len(runner.batches) == 1
    assert deltas == ["Two."]
    assert result.usage.model == f"backup/{BACKUP_MODEL}"
    assert len(primary.requests) == 4
    # The backup got the whole conversation, tool exchange included.
    assert [m["role"] for m in body(backup, 0)["messages"]] == ["user", "assistant", "tool"]


async def test_cancelling_while_tools_run_propagates(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.tool_calls([("calc__add", {"a": 1, "b": 1})]))
    runner = Runner()
    runner.gate = asyncio.Event()
    handler = make(primary)

    async def consume() -> None:
        async with contextlib.aclosing(handler.handle(make_call(runner=runner))) as stream:
            async for _ in stream:
                pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(runner.entered.wait(), CALL_DEADLINE_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert runner.cancelled
    assert len(primary.requests) == 1
    assert handler.breaker_state("primary") == "closed"


# -- resuming ------------------------------------------------------------------------


def step_call(call_id: str, a: float, b: float) -> handler_pb2.ToolCall:
    return handler_pb2.ToolCall(
        id=call_id,
        integration="workspaces/w/integrations/calc",
        tool="add",
        function_name="calc__add",
        arguments=struct({"a": a, "b": b}),
    )


def result_of(call_id: str, text: str) -> handler_pb2.ToolResult:
    return handler_pb2.ToolResult(id=call_id, tool="add", outcome=SUCCEEDED, text=text)


async def test_resumes_from_steps_and_finishes_an_incomplete_last_step(
    primary: FakeOpenAI, make: Make
) -> None:
    steps = [
        handler_pb2.ToolStep(
            calls=[step_call("call_1", 1, 1)], results=[result_of("call_1", "2")], text="First."
        ),
        handler_pb2.ToolStep(
            calls=[step_call("call_2", 2, 2), step_call("call_3", 3, 3)],
            results=[result_of("call_2", "4")],
        ),
    ]
    primary.script(
        Reply.tool_calls([FakeToolCall("calc__add", '{"a":4,"b":4}', id="")]),
        Reply.text("All added."),
    )
    runner = Runner()

    deltas, result = await run(
        make(primary), make_call(runner=runner, steps=steps, max_tool_steps=3)
    )

    # Only the call without a result runs; then the model is asked.
    assert [[c.id for c in batch] for batch in runner.batches] == [["call_3"], ["call_4"]]
    messages = body(primary, 0)["messages"]
    assert messages[1:] == [
        {
            "role": "assistant",
            "content": "First.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "calc__add", "arguments": '{"a":1,"b":1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "calc__add", "arguments": '{"a":2,"b":2}'},
                },
                {
                    "id": "call_3",
                    "type": "function",
                    "function": {"name": "calc__add", "arguments": '{"a":3,"b":3}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_2", "content": "4"},
        {"role": "tool", "tool_call_id": "call_3", "content": "6"},
    ]
    # Two steps were taken before: the third is the last that may call tools.
    assert body(primary, 0)["tool_choice"] == "auto"
    assert body(primary, 1)["tool_choice"] == "none"
    assert deltas == ["All", " added."]
    assert result.parts[0].text == "All added."


async def test_after_a_restart_text_shown_before_forbids_fallback(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make
) -> None:
    steps = [
        handler_pb2.ToolStep(
            calls=[step_call("call_1", 1, 1)], results=[result_of("call_1", "2")], text="Adding."
        )
    ]
    primary.script(Reply.error(500))
    handler = make(primary, backup)

    _, failure = await fail(handler, make_call(runner=Runner(), steps=steps))

    assert "cut off" in failure.message
    assert backup.requests == []


async def test_resumed_invalid_arguments_go_back_as_written(
    primary: FakeOpenAI, make: Make
) -> None:
    call = handler_pb2.ToolCall(
        id="call_1", tool="add", function_name="calc__add", invalid_arguments="{oops"
    )
    failed = handler_pb2.ToolResult(id="call_1", outcome=FAILED, text="Not an object.")
    steps = [handler_pb2.ToolStep(calls=[call], results=[failed])]
    primary.script(Reply.text("Sorry."))
    runner = Runner()

    await run(make(primary), make_call(runner=runner, steps=steps))

    assert runner.batches == []
    sent = body(primary, 0)["messages"][1]["tool_calls"][0]["function"]
    assert sent == {"name": "calc__add", "arguments": "{oops"}


# -- instructions and model settings -----------------------------------------------------


async def test_instructions_are_the_first_system_message(primary: FakeOpenAI, make: Make) -> None:
    window = context_pb2.ContextWindow(
        included=[
            context_pb2.ContextItem(
                memory_item=context_pb2.MemoryItem(
                    kind=context_pb2.MEMORY_KIND_PREFERENCE, content="Likes maths."
                )
            )
        ]
    )
    primary.script(Reply.text("Sure."))

    await run(
        make(primary),
        make_call(runner=Runner(), instructions="You are a calculator.", context=window),
    )

    messages = body(primary, 0)["messages"]
    assert messages[0] == {"role": "system", "content": "You are a calculator."}
    assert messages[1]["role"] == "system"
    assert "Likes maths." in messages[1]["content"]
    assert messages[-1] == {"role": "user", "content": "What is 2 + 3?"}


async def test_model_settings_pick_the_provider_model_and_sampling(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make
) -> None:
    backup.script(Reply.text("From the backup.", usage=(1000, 100)))
    handler = make(
        primary,
        backup,
        max_output_tokens=500,
        prices={"backup/special": Price(3.0, 4.0), BACKUP_MODEL: Price(100.0, 100.0)},
    )
    settings = handler_pb2.ModelSettings(
        provider="backup", model="special", temperature=0.3, top_p=0.5, max_output_tokens=9999
    )

    _, result = await run(handler, make_call(runner=None, model=settings))

    assert primary.requests == []
    sent = body(backup, 0)
    assert sent["model"] == "special"
    assert sent["temperature"] == 0.3
    assert sent["top_p"] == 0.5
    assert sent["max_tokens"] == 500
    assert result.usage.model == "backup/special"
    assert result.usage.estimated_cost_usd == pytest.approx((1000 * 3.0 + 100 * 4.0) / 1e6)


async def test_the_rest_of_the_chain_stays_the_fallback(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make
) -> None:
    backup.script(Reply.error(400, message="no such model"))
    primary.script(Reply.text("From the primary."))
    handler = make(primary, backup, max_retries=0)
    settings = handler_pb2.ModelSettings(provider="backup", model="special", max_output_tokens=7)

    _, result = await run(handler, make_call(runner=None, model=settings))

    # The fallback asks for its own model; the override was the chosen provider's.
    assert body(primary, 0)["model"] == MODEL
    assert body(primary, 0)["max_tokens"] == 7
    assert result.usage.model == f"primary/{MODEL}"


async def test_run_parameters_win_over_the_assistants_settings(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.text("ok"))
    settings = handler_pb2.ModelSettings(model="other", temperature=0.1, max_output_tokens=40)

    await run(
        make(primary),
        make_call(runner=None, model=settings, parameters={"temperature": 1.5, "max_tokens": 30}),
    )

    sent = body(primary, 0)
    assert sent["model"] == "other"
    assert sent["temperature"] == 1.5
    assert sent["max_tokens"] == 30
    assert "top_p" not in sent


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        (handler_pb2.ModelSettings(provider="nope"), "'nope' is not configured"),
        (handler_pb2.ModelSettings(temperature=3), "temperature"),
        (handler_pb2.ModelSettings(top_p=1.5), "top_p"),
        (handler_pb2.ModelSettings(model=" "), "model name"),
    ],
)
async def test_bad_model_settings_fail_before_any_request(
    primary: FakeOpenAI, make: Make, settings: handler_pb2.ModelSettings, complaint: str
) -> None:
    _, failure = await fail(make(primary), make_call(runner=None, model=settings))

    assert complaint in failure.message
    assert primary.requests == []


# -- history -----------------------------------------------------------------------


def assistant(text: str, *calls: tuple[str, str, dict[str, Any]]) -> context_pb2.Message:
    parts = [context_pb2.ContentPart(text=text)] if text else []
    parts += [
        context_pb2.ContentPart(
            tool_call=context_pb2.ToolCallContent(
                id=call_id,
                tool=f"workspaces/w/integrations/calc/tools/{name.split('__')[-1]}",
                function_name=name,
                arguments=struct(args),
            )
        )
        for call_id, name, args in calls
    ]
    return context_pb2.Message(role=context_pb2.MESSAGE_ROLE_ASSISTANT, parts=parts)


def tool(*results: tuple[str, str]) -> context_pb2.Message:
    return context_pb2.Message(
        role=context_pb2.MESSAGE_ROLE_TOOL,
        parts=[
            context_pb2.ContentPart(
                tool_result=context_pb2.ToolResultContent(
                    id=call_id,
                    tool="workspaces/w/integrations/calc/tools/add",
                    outcome="succeeded",
                    text=text,
                )
            )
            for call_id, text in results
        ],
    )


def window(*messages: context_pb2.Message) -> context_pb2.ContextWindow:
    return context_pb2.ContextWindow(
        included=[context_pb2.ContextItem(message=message) for message in messages]
    )


HISTORY = window(
    user("Add things."),
    # c1 is answered; c2's result left the window.
    assistant("Adding.", ("c1", "calc__add", {"a": 1, "b": 2}), ("c2", "calc__add", {"a": 3})),
    # c9 answers no call shown here.
    tool(("c1", "3"), ("c9", "lost")),
    assistant("", ("c1", "calc__add", {"a": 1, "b": 2})),
    user("Thanks."),
    # Its call's message was left out of the window.
    tool(("c4", "old result")),
    # Answered, but not right after: the API would refuse it as a call.
    assistant("Again.", ("c5", "calc__add", {"a": 0, "b": 0})),
    user("Interrupting."),
    tool(("c5", "0")),
    assistant("Three."),
)


def test_stored_tool_parts_become_paired_tool_messages() -> None:
    request = handler_pb2.HandleRequest(message=user("And now?"), context=HISTORY)

    assert build_messages(request) == [
        {"role": "user", "content": "Add things."},
        {
            "role": "assistant",
            "content": "Adding.\n[called tool calc__add]",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "calc__add", "arguments": '{"a":1,"b":2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "user", "content": "Tool output (add):\nlost"},
        # A repeated call with no result after it is mentioned, not made.
        {"role": "assistant", "content": "[called tool calc__add]"},
        {"role": "user", "content": "Thanks."},
        {"role": "user", "content": "Tool output (add):\nold result"},
        {"role": "assistant", "content": "Again.\n[called tool calc__add]"},
        {"role": "user", "content": "Interrupting."},
        {"role": "user", "content": "Tool output (add):\n0"},
        {"role": "assistant", "content": "Three."},
        {"role": "user", "content": "And now?"},
    ]


async def test_the_api_accepts_the_rendered_history(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.text("Fine."))

    await run(make(primary), make_call("And now?", runner=Runner(), context=HISTORY))

    assert len(primary.requests) == 1
    assert body(primary, 0)["messages"][-1] == {"role": "user", "content": "And now?"}


def test_results_split_over_tool_messages_pair_with_one_call_message() -> None:
    history = window(
        assistant("", ("c1", "calc__add", {"a": 1, "b": 1}), ("c2", "calc__add", {"a": 2, "b": 2})),
        tool(("c2", "4")),
        tool(("c1", "2"), ("c1", "duplicate")),
    )
    request = handler_pb2.HandleRequest(message=user("Next."), context=history)

    messages = build_messages(request)

    assert [m.get("tool_call_id") for m in messages[1:3]] == ["c1", "c2"]
    assert messages[1]["content"] == "2"
    assert messages[3] == {"role": "user", "content": "Tool output (add):\nduplicate"}
    assert messages[0]["content"] is None
