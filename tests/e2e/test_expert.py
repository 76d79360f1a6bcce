"""The example domain expert as a real process: its contract, its deadline and
cancellation reports, and that a cancelled call really stops its work."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.api.context.v1 import context_pb2
from switchboard.api.handler.v1 import handler_pb2, handler_pb2_grpc
from tests.e2e.expertproc import ExpertProcess

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0
DEADLINE_ROUNDING_S = 0.05


@pytest.fixture
def expert(tmp_path: Path) -> Iterator[ExpertProcess]:
    with ExpertProcess(id="weather", side_effects=tmp_path / "side-effects.log") as process:
        yield process


@pytest.fixture
async def stub(expert: ExpertProcess) -> AsyncIterator[handler_pb2_grpc.HandlerServiceAsyncStub]:
    async with aio.insecure_channel(expert.address) as channel:
        yield handler_pb2_grpc.HandlerServiceStub(channel)


def request(
    run: str, text: str, context_items: int = 0, **params: Any
) -> handler_pb2.HandleRequest:
    parameters = struct_pb2.Struct()
    parameters.update(params)
    item = context_pb2.ContextItem(
        message=context_pb2.Message(parts=[context_pb2.ContentPart(text="earlier")])
    )
    return handler_pb2.HandleRequest(
        run=run,
        message=context_pb2.Message(parts=[context_pb2.ContentPart(text=text)]),
        context=context_pb2.ContextWindow(included=[item] * context_items),
        parameters=parameters,
    )


def frame_kinds(frames: list[handler_pb2.HandleResponse]) -> list[str]:
    return [str(frame.WhichOneof("frame")) for frame in frames]


async def test_capabilities_and_health(
    expert: ExpertProcess, stub: handler_pb2_grpc.HandlerServiceAsyncStub
) -> None:
    response = await stub.GetCapabilities(
        handler_pb2.GetCapabilitiesRequest(), timeout=RPC_TIMEOUT_S
    )
    capabilities = response.capabilities
    assert capabilities.id == "weather"
    assert capabilities.display_name
    assert capabilities.description
    assert list(capabilities.topics) == ["weather"]
    assert capabilities.streaming
    assert capabilities.max_context_tokens == 2000
    schema = json_format.MessageToDict(capabilities.parameters_schema)
    assert set(schema["properties"]) == {"interval_ms", "ticks", "fail"}
    async with aio.insecure_channel(expert.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "switchboard.api.handler.v1.HandlerService"):
            check = await health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING


async def test_handle_streams_progress_then_words_then_one_result(
    expert: ExpertProcess, stub: handler_pb2_grpc.HandlerServiceAsyncStub
) -> None:
    call = stub.Handle(
        request("runs/r1", "Will it rain  in Oslo?", context_items=2), timeout=RPC_TIMEOUT_S
    )
    frames = [frame async for frame in call]
    answer = "expert weather heard: Will it rain  in Oslo? (context items: 2)"
    assert frame_kinds(frames) == ["progress"] + ["delta"] * len(answer.split(" ")) + ["result"]
    assert "".join(frame.delta.text for frame in frames[1:-1]) == answer
    result = frames[-1].result
    assert [part.text for part in result.parts] == [answer]
    assert result.finish_reason == "stop"
    assert result.usage.input_tokens == 5
    assert result.usage.output_tokens == len(frames) - 2
    assert result.usage.model == "expert/weather"
    deadline, done = expert.lines()
    assert deadline.startswith("deadline runs/r1 ")
    assert done == "done runs/r1"


async def test_ticks_report_progress_and_side_effects(
    expert: ExpertProcess, stub: handler_pb2_grpc.HandlerServiceAsyncStub
) -> None:
    call = stub.Handle(request("r2", "hi", ticks=4, interval_ms=1), timeout=RPC_TIMEOUT_S)
    frames = [frame async for frame in call]
    fractions = [frame.progress.fraction for frame in frames if frame.HasField("progress")]
    assert fractions == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert frame_kinds(frames)[-1] == "result"
    assert expert.lines()[1:] == ["tick r2 1", "tick r2 2", "tick r2 3", "tick r2 4", "done r2"]


async def test_a_cancelled_call_stops_its_work(
    expert: ExpertProcess, stub: handler_pb2_grpc.HandlerServiceAsyncStub
) -> None:
    call = stub.Handle(request("doomed", "hi", ticks=100_000, interval_ms=5), timeout=RPC_TIMEOUT_S)
    ticks_seen = 0
    async for frame in call:
        if frame.progress.stage == "working":
            ticks_seen += 1
            if ticks_seen == 3:
                break
    assert call.cancel()
    await expert.wait_for_line(lambda line: line == "cancelled doomed")

    # Let the expert do more work that spans several tick intervals. Had the
    # cancelled call kept going, it would have written ticks meanwhile.
    await stub.GetCapabilities(handler_pb2.GetCapabilitiesRequest(), timeout=RPC_TIMEOUT_S)
    barrier = stub.Handle(request("barrier", "hi", ticks=5, interval_ms=5), timeout=RPC_TIMEOUT_S)
    assert frame_kinds([frame async for frame in barrier])[-1] == "result"

    lines = expert.lines()
    doomed = [line for line in lines if line.split()[1] == "doomed"]
    assert doomed[-1] == "cancelled doomed"
    ticks = [line for line in doomed if line.startswith("tick ")]
    assert len(ticks) >= 3
    assert ticks == [f"tick doomed {i}" for i in range(1, len(ticks) + 1)]
    assert "done doomed" not in lines
    assert lines[-1] == "done barrier"


async def test_the_deadline_is_reported(
    expert: ExpertProcess, stub: handler_pb2_grpc.HandlerServiceAsyncStub
) -> None:
    frames = [frame async for frame in stub.Handle(request("timed", "hi"), timeout=2.0)]
    assert frame_kinds(frames)[-1] == "result"
    line = await expert.wait_for_line(lambda line: line.startswith("deadline timed "))
    # gRPC rounds the timeout it sends up, never down, so the server can see
    # a few milliseconds more than the client's 2 s (observed: up to 10 ms).
    assert 0.0 < float(line.split()[2]) <= 2.0 + DEADLINE_ROUNDING_S

    frames = [frame async for frame in stub.Handle(request("untimed", "hi"))]
    assert frame_kinds(frames)[-1] == "result"
    assert "deadline untimed inf" in expert.lines()


async def test_an_expired_deadline_cancels_the_work(
    expert: ExpertProcess, stub: handler_pb2_grpc.HandlerServiceAsyncStub
) -> None:
    call = stub.Handle(request("late", "hi", ticks=100_000, interval_ms=5), timeout=0.5)
    with pytest.raises(aio.AioRpcError) as raised:
        async for _frame in call:
            pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await expert.wait_for_line(lambda line: line == "cancelled late")


async def test_fail_aborts_after_the_first_word(
    expert: ExpertProcess, stub: handler_pb2_grpc.HandlerServiceAsyncStub
) -> None:
    call = stub.Handle(
        request("f", "Mars weather?", fail="no forecast for Mars"), timeout=RPC_TIMEOUT_S
    )
    frames: list[handler_pb2.HandleResponse] = []
    with pytest.raises(aio.AioRpcError) as raised:  # noqa: PT012 - the frames before the error count
        async for frame in call:
            frames.append(frame)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert raised.value.details() == "no forecast for Mars"
    assert frame_kinds(frames) == ["progress", "delta"]
    assert frames[1].delta.text == "expert"
    assert expert.lines()[1:] == ["failed f"]


async def test_a_bad_parameter_is_invalid_argument(
    stub: handler_pb2_grpc.HandlerServiceAsyncStub,
) -> None:
    call = stub.Handle(request("bad", "hi", ticks="many"), timeout=RPC_TIMEOUT_S)
    with pytest.raises(aio.AioRpcError) as raised:
        async for _frame in call:
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ticks" in str(raised.value.details())


async def test_sigterm_stops_gracefully_and_cancels_what_is_left(tmp_path: Path) -> None:
    side_effects = tmp_path / "side-effects.log"
    with ExpertProcess(side_effects=side_effects, args=["--grace", "0"]) as expert:
        async with aio.insecure_channel(expert.address) as channel:
            stub = handler_pb2_grpc.HandlerServiceStub(channel)
            call = stub.Handle(request("long", "hi", ticks=100_000, interval_ms=5))
            async for frame in call:
                if frame.progress.stage == "working":
                    break
            assert expert.terminate() == 0
            with pytest.raises(aio.AioRpcError):
                async for _frame in call:
                    pass
        assert expert.lines()[-1] == "cancelled long"
