"""What the ``llm`` handler's tests share: the recorded backoff sleeps and the two ways
to drain a handler's stream (to its one result, or to its failure). The two fake
providers, ``primary`` and ``backup``, are fixtures in ``tests/dispatcher/llm/conftest.py``."""

from __future__ import annotations

import contextlib

import pytest

from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import Frame, HandleCall, HandlerFailure
from switchboard.dispatcher.llm.handler import LlmHandler


class Sleeps:
    """Records the backoff delays the handler asks for, without sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def run(handler: LlmHandler, call: HandleCall) -> tuple[list[str], handler_pb2.HandleResult]:
    """The deltas and the one result; fails if the stream breaks the frame contract."""
    deltas: list[str] = []
    frames: list[Frame] = []
    async with contextlib.aclosing(handler.handle(call)) as stream:
        async for frame in stream:
            frames.append(frame)
            if frame.WhichOneof("frame") == "delta":
                deltas.append(frame.delta.text)
    kinds = [frame.WhichOneof("frame") for frame in frames]
    assert kinds.count("result") == 1
    assert kinds[-1] == "result"
    return deltas, frames[-1].result


async def fail(handler: LlmHandler, call: HandleCall) -> tuple[list[str], HandlerFailure]:
    """The deltas streamed before the handler failed, and its failure."""
    deltas: list[str] = []

    async def consume() -> None:
        async with contextlib.aclosing(handler.handle(call)) as stream:
            async for frame in stream:
                assert frame.WhichOneof("frame") == "delta"
                deltas.append(frame.delta.text)

    with pytest.raises(HandlerFailure) as caught:
        await consume()
    return deltas, caught.value
