"""An interactive remote expert's tool calls: RemoteHandler against a real
HandlerService (tests/e2e/toolexpert.py, and the example expert as a process)
over real gRPC, with a tool runner that records the calls it gets and
answers, holds or fails them as told."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import HandleCall, HandlerFailure, ToolRunner
from switchboard.dispatcher.handlers.remote import MAX_TOOL_CALLS_IN_FLIGHT, RemoteHandler
from switchboard.platform.values.idempotency import METADATA, handler_key
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.expertproc import ExpertProcess
from tests.e2e.toolexpert import ToolExpert

pytestmark = pytest.mark.service

#: What a run's deadline may lose on its way to the expert (asserted, not a hang guard).
TRANSIT_S = 10.0
RUN_S = 30.0
DEADLINE_ROUNDING_S = 0.5
ADD = handler_pb2.ToolDefinition(
    tool="workspaces/w1/integrations/math/tools/add",
    function_name="add",
    description="Adds a and b.",
)


class ScriptedTools:
    """A ToolRunner: answers ``add`` with a + b and anything else with "ok".

    ``hold`` keeps every call waiting until ``release(id)``; ``raises`` is
    raised by ``run`` instead of answering.
    """

    def __init__(self, *, hold: bool = False, raises: BaseException | None = None) -> None:
        self.hold = hold
        self.raises = raises
        #: The ids of each ``run``'s calls, one list per run.
        self.batches: list[list[str]] = []
        self.calls: list[handler_pb2.ToolCall] = []
        #: Ids of calls whose ``run`` was cancelled.
        self.cancelled: list[str] = []
        self._started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._released: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def run(self, calls: Sequence[handler_pb2.ToolCall]) -> list[handler_pb2.ToolResult]:
        ids = [call.id for call in calls]
        self.batches.append(ids)
        self.calls.extend(calls)
        for call_id in ids:
            self._started[call_id].set()
        try:
            if self.raises is not None:
                raise self.raises
            if self.hold:
                for call_id in ids:
                    await self._released[call_id].wait()
        except asyncio.CancelledError:
            self.cancelled.extend(ids)
            raise
        return [answer(call) for call in calls]

    async def started(self, call_id: str) -> None:
        async with asyncio.timeout(CALL_DEADLINE_S):
            await self._started[call_id].wait()

    def release(self, call_id: str) -> None:
        self._released[call_id].set()


def answer(call: handler_pb2.ToolCall) -> handler_pb2.ToolResult:
    text = "ok"
    if call.tool == "add":
        args = call.arguments.fields
        text = f"{args['a'].number_value + args['b'].number_value:g}"
    return handler_pb2.ToolResult(
        id=call.id,
        tool=f"{call.integration}/tools/{call.tool}",
        outcome=handler_pb2.TOOL_OUTCOME_SUCCEEDED,
        text=text,
    )


def handle_call(
    run: str,
    text: str,
    tools: ToolRunner | None,
    *,
    steps: Sequence[handler_pb2.ToolStep] = (),
    seconds: float = RUN_S,
) -> HandleCall:
    request = handler_pb2.HandleRequest(
        run=run,
        message=context_pb2.Message(parts=[context_pb2.ContentPart(text=text)]),
        tools=[ADD],
        steps=steps,
        max_tool_steps=4,
    )
    return HandleCall(request=request, deadline=time.monotonic() + seconds, tools=tools)


async def collect(remote: RemoteHandler, call: HandleCall) -> list[handler_pb2.HandleResponse]:
    async with asyncio.timeout(RUN_S + CALL_DEADLINE_S):
        return [frame async for frame in remote.handle(call)]


def kinds(frames: list[handler_pb2.HandleResponse]) -> list[str]:
    return [str(frame.WhichOneof("frame")) for frame in frames]


def answer_text(frames: list[handler_pb2.HandleResponse]) -> str:
    assert kinds(frames)[-1] == "result"
    return "".join(part.text for part in frames[-1].result.parts)


@pytest.fixture
async def expert() -> AsyncIterator[ToolExpert]:
    async with ToolExpert("calc") as server:
        yield server


@pytest.fixture
async def remote(expert: ToolExpert) -> AsyncIterator[RemoteHandler]:
    handler = RemoteHandler(
        "calc",
        expert.address,
        timeout_s=CALL_DEADLINE_S,
        metadata=[("authorization", "Bearer s3cret")],
    )
    assert await handler.refresh()
    try:
        yield handler
    finally:
        await handler.close()


async def test_a_tool_result_goes_back_to_the_expert_and_into_its_answer(
    expert: ToolExpert, remote: RemoteHandler
) -> None:
    assert remote.capabilities.interactive
    tools = ScriptedTools()

    frames = await collect(remote, handle_call("runs/r1", "add 2 3", tools))

    # The runner shows tool calls as run updates itself: none are relayed.
    assert kinds(frames) == ["delta", "result"]
    assert answer_text(frames) == "add SUCCEEDED: 5"
    (called,) = tools.calls
    assert (called.id, called.integration, called.tool) == (
        "add-1",
        "workspaces/w1/integrations/math",
        "add",
    )
    seen = await expert.call("runs/r1")
    assert seen.method == "HandleInteractive"
    assert seen.metadata["authorization"] == "Bearer s3cret"
    # The run's key, beside the expert's own metadata (docs/integration.md).
    assert seen.metadata[METADATA] == handler_key("runs/r1")
    assert seen.time_remaining is not None
    # The run's deadline, as gRPC carries it (its timeout header is rounded up).
    assert RUN_S - TRANSIT_S < seen.time_remaining <= RUN_S + DEADLINE_ROUNDING_S
    assert list(seen.request.tools) == [ADD]
    assert seen.request.max_tool_steps == 4
    (result,) = seen.results
    assert (result.id, result.outcome, result.text) == (
        "add-1",
        handler_pb2.TOOL_OUTCOME_SUCCEEDED,
        "5",
    )


async def test_calls_run_concurrently_and_each_is_answered_when_done(
    expert: ToolExpert, remote: RemoteHandler
) -> None:
    tools = ScriptedTools(hold=True)
    running = asyncio.create_task(collect(remote, handle_call("runs/r2", "both 1 2 30 40", tools)))
    # Both calls are running before either finished.
    await tools.started("add-1")
    await tools.started("add-2")
    assert tools.batches == [["add-1"], ["add-2"]]

    tools.release("add-2")
    seen = await expert.call("runs/r2")
    await seen.result("add-2")
    assert [result.id for result in seen.results] == ["add-2"]  # add-1 is still running
    tools.release("add-1")
    frames = await running

    assert [result.id for result in seen.results] == ["add-2", "add-1"]
    assert answer_text(frames) == "add SUCCEEDED: 3\nadd SUCCEEDED: 70"


async def test_a_run_without_tools_answers_each_call_failed(
    expert: ToolExpert, remote: RemoteHandler
) -> None:
    frames = await collect(remote, handle_call("runs/r3", "add 2 3", None))

    assert answer_text(frames) == "add FAILED: this run may not call tools"
    result = await (await expert.call("runs/r3")).result("add-1")
    assert result.outcome == handler_pb2.TOOL_OUTCOME_FAILED
    assert result.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert result.error.message == "this run may not call tools"


async def test_calls_beyond_the_in_flight_limit_are_answered_failed(
    expert: ToolExpert, remote: RemoteHandler
) -> None:
    limit = MAX_TOOL_CALLS_IN_FLIGHT
    tools = ScriptedTools(hold=True)
    running = asyncio.create_task(
        collect(remote, handle_call("runs/r4", f"many {limit + 1}", tools))
    )
    seen = await expert.call("runs/r4")
    refused = await seen.result(f"add-{limit + 1}")
    assert refused.outcome == handler_pb2.TOOL_OUTCOME_FAILED
    assert refused.text == "too many tool calls in flight"
    assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    for index in range(1, limit + 1):
        await tools.started(f"add-{index}")
        tools.release(f"add-{index}")
    frames = await running

    assert len(tools.calls) == limit
    lines = answer_text(frames).split("\n")
    assert lines[:limit] == [f"add SUCCEEDED: {2 * index}" for index in range(1, limit + 1)]
    assert lines[limit] == "add FAILED: too many tool calls in flight"


async def test_cancelling_the_run_cancels_the_expert_call_and_its_tool_calls(
    expert: ToolExpert, remote: RemoteHandler
) -> None:
    tools = ScriptedTools(hold=True)
    running = asyncio.create_task(collect(remote, handle_call("runs/r5", "wait", tools)))
    await tools.started("wait-1")
    seen = await expert.call("runs/r5")

    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running

    # handle() waited for its tool calls to end before it ended.
    assert tools.cancelled == ["wait-1"]
    await seen.was_cancelled()
    assert not seen.answered.is_set()
    assert seen.results == []


@pytest.mark.parametrize("error", [TimeoutError(), asyncio.CancelledError()])
async def test_a_runner_that_raises_ends_the_run_with_its_exception(
    expert: ToolExpert, remote: RemoteHandler, error: BaseException
) -> None:
    tools = ScriptedTools(raises=error)

    with pytest.raises(type(error)):
        await collect(remote, handle_call("runs/r6", "add 2 3", tools))

    seen = await expert.call("runs/r6")
    await seen.was_cancelled()
    assert seen.results == []


async def test_the_run_deadline_ends_a_call_waiting_for_a_tool(
    expert: ToolExpert, remote: RemoteHandler
) -> None:
    tools = ScriptedTools(hold=True)

    with pytest.raises(TimeoutError):
        await collect(remote, handle_call("runs/r7", "wait", tools, seconds=0.5))

    assert tools.cancelled == ["wait-1"]
    await (await expert.call("runs/r7")).was_cancelled()


async def test_an_expert_ending_without_a_result_fails_and_stops_its_tool_calls(
    expert: ToolExpert, remote: RemoteHandler
) -> None:
    tools = ScriptedTools(hold=True)

    with pytest.raises(HandlerFailure, match="ended its stream without a result"):
        await collect(remote, handle_call("runs/r8", "drop", tools))

    # Whether or not the call got to start, none is left running.
    assert tools.cancelled == [call.id for call in tools.calls]


async def test_a_resumed_run_resolves_the_unanswered_calls_of_its_last_step(
    expert: ToolExpert, remote: RemoteHandler
) -> None:
    tools = ScriptedTools()
    first, second = (
        handler_pb2.ToolCall(
            id=f"add-{n}", integration="workspaces/w1/integrations/math", tool="add"
        )
        for n in (1, 2)
    )
    first.arguments.update({"a": 1, "b": 1})
    second.arguments.update({"a": 2, "b": 2})
    step = handler_pb2.ToolStep(calls=[first, second], results=[answer(first)])

    frames = await collect(remote, handle_call("runs/r9", "go on", tools, steps=[step]))

    assert tools.batches == [["add-2"]]
    assert answer_text(frames) == "add SUCCEEDED: 4"
    seen = await expert.call("runs/r9")
    assert [result.id for result in seen.results] == ["add-2"]


async def test_a_non_interactive_expert_is_still_called_on_handle() -> None:
    tools = ScriptedTools()
    async with ToolExpert("reporter", interactive=False) as expert:
        remote = RemoteHandler("reporter", expert.address, timeout_s=CALL_DEADLINE_S)
        try:
            assert await remote.refresh()
            assert not remote.capabilities.interactive
            frames = await collect(remote, handle_call("runs/r10", "add 2 3", tools))
        finally:
            await remote.close()
        seen = await expert.call("runs/r10")

    assert seen.method == "Handle"
    assert seen.metadata[METADATA] == handler_key("runs/r10")
    # Its tool calls are reports of what it did, relayed as before, never run.
    assert kinds(frames) == ["tool_call", "delta", "result"]
    assert frames[0].tool_call.id == "add-1"
    assert answer_text(frames) == "reported 1 tool calls"
    assert tools.calls == []


@pytest.mark.parametrize("interactive", [True, False])
async def test_the_retry_of_a_call_not_processed_carries_the_same_key(interactive: bool) -> None:
    """A call the expert failed UNAVAILABLE before answering is sent once more: both
    attempts carry the run's key, so an expert that saw the first knows the second."""
    async with ToolExpert("flaky", interactive=interactive) as expert:
        remote = RemoteHandler("flaky", expert.address, timeout_s=CALL_DEADLINE_S)
        try:
            assert await remote.refresh()
            frames = await collect(remote, handle_call("runs/r11", "flaky", ScriptedTools()))
        finally:
            await remote.close()
    assert answer_text(frames) == ("heard: flaky" if interactive else "reported 0 tool calls")
    attempts = [call for call in expert.calls if call.request.run == "runs/r11"]
    assert [call.metadata[METADATA] for call in attempts] == [handler_key("runs/r11")] * 2


async def test_a_call_without_a_run_carries_no_key(
    expert: ToolExpert, remote: RemoteHandler
) -> None:
    await collect(remote, handle_call("", "hello", ScriptedTools()))
    seen = await expert.call("")
    assert METADATA not in seen.metadata


def example_call(run: str, tools: ToolRunner | None, **params: Any) -> HandleCall:
    call = handle_call(run, "what is 2 + 3?", tools)
    call.request.parameters.update(params)
    return call


@pytest.mark.e2e
async def test_the_example_expert_asks_for_a_tool_when_interactive(tmp_path: Path) -> None:
    tools = ScriptedTools()
    with ExpertProcess("calc", tmp_path / "effects.log", args=["--interactive"]) as expert:
        remote = RemoteHandler("calc", expert.address, timeout_s=CALL_DEADLINE_S)
        try:
            assert await remote.refresh()
            assert remote.capabilities.interactive
            frames = await collect(
                remote, example_call("runs/x1", tools, tool="add", arguments={"a": 2, "b": 3})
            )
        finally:
            await remote.close()

        assert "tool_call" not in kinds(frames)
        assert answer_text(frames) == (
            "expert calc heard: what is 2 + 3? (context items: 0); add SUCCEEDED: 5"
        )
        (called,) = tools.calls
        assert (called.integration, called.tool) == ("workspaces/w1/integrations/math", "add")
        assert dict(called.arguments) == {"a": 2, "b": 3}
        assert expert.lines()[1:] == [
            "tool_call runs/x1 add",
            "tool_result runs/x1 SUCCEEDED",
            "done runs/x1",
        ]


@pytest.mark.e2e
async def test_the_example_expert_stops_when_its_interactive_call_is_cancelled(
    tmp_path: Path,
) -> None:
    tools = ScriptedTools(hold=True)
    with ExpertProcess("calc", tmp_path / "effects.log", args=["--interactive"]) as expert:
        remote = RemoteHandler("calc", expert.address, timeout_s=CALL_DEADLINE_S)
        try:
            assert await remote.refresh()
            running = asyncio.create_task(
                collect(remote, example_call("runs/x2", tools, tool="add", arguments={}))
            )
            await tools.started("call-1")
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
        finally:
            await remote.close()

        assert tools.cancelled == ["call-1"]
        await expert.wait_for_line(lambda line: line == "cancelled runs/x2")
        assert "done runs/x2" not in expert.lines()
