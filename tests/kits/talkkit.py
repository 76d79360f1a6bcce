"""Helpers for Talk tests: a voice session driven frame by frame, speech to send, and
what came back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.audio import pcm
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, started
from tests.kits.contextkit import Caller, World, context_stub, ctx_world
from tests.kits.dispatchkit import Stub, dispatcher_stub

#: What a Talk test's session and run may take at most (a hang guard).
TALK_TIMEOUT_S = CALL_DEADLINE_S
#: 20 ms of PCM16 at 16 kHz.
FRAME_BYTES_16K = pcm.byte_count(20, 16_000)
POSITION_MASK = (1 << 40) - 1
_EOF: Any = getattr(aio, "EOF")  # noqa: B009 - not in grpc's stubs


def frames_of(audio: bytes, rate: int, ms: int = 20) -> Iterator[bytes]:
    """``audio`` (PCM16 at ``rate``) cut in frames of ``ms`` milliseconds."""
    size = pcm.byte_count(ms, rate)
    for start in range(0, len(audio), size):
        yield audio[start : start + size]


def silence(ms: int, rate: int = 16_000) -> bytes:
    return bytes(pcm.byte_count(ms, rate))


def start(conversation: str, assistant: str = "", **fields: Any) -> pb.TalkRequest:
    return pb.TalkRequest(
        start=pb.TalkStart(conversation=conversation, assistant=assistant, **fields)
    )


def audio(data: bytes) -> pb.TalkRequest:
    return pb.TalkRequest(audio=pb.AudioChunk(data=data))


def control(action: int, heard_through: int = 0) -> pb.TalkRequest:
    return pb.TalkRequest(
        control=pb.TalkControl(action=action, heard_through_sequence=heard_through)  # type: ignore[arg-type]
    )


@dataclass
class Talk:
    """One Talk call: ``send`` frames, read ``frames`` (heartbeats kept apart)."""

    call: aio.StreamStreamCall[pb.TalkRequest, pb.TalkResponse]
    _requests: asyncio.Queue[pb.TalkRequest | None]
    frames: list[pb.TalkResponse] = field(default_factory=list)
    heartbeats: int = 0

    async def send(self, *requests: pb.TalkRequest) -> None:
        for request in requests:
            await self._requests.put(request)

    async def send_audio(self, data: bytes, rate: int = 16_000) -> None:
        for frame in frames_of(data, rate):
            await self._requests.put(audio(frame))

    def half_close(self) -> None:
        self._requests.put_nowait(None)

    async def next(self) -> pb.TalkResponse | None:
        """The next frame other than a heartbeat; None when the stream ended OK."""
        while True:
            frame = await asyncio.wait_for(self.call.read(), TALK_TIMEOUT_S)
            if frame is _EOF:
                return None
            assert isinstance(frame, pb.TalkResponse)
            if frame.WhichOneof("frame") == "heartbeat":
                self.heartbeats += 1
                continue
            self.frames.append(frame)
            return frame

    async def until(self, done: Callable[[pb.TalkResponse], bool]) -> pb.TalkResponse:
        """Read until a frame for which ``done`` is true; returns it."""
        while True:
            frame = await self.next()
            assert frame is not None, f"the stream ended first: {self.kinds()}"
            if done(frame):
                return frame

    async def rest(self) -> list[pb.TalkResponse]:
        """Every frame until the stream ends OK."""
        seen: list[pb.TalkResponse] = []
        while (frame := await self.next()) is not None:
            seen.append(frame)
        return seen

    async def failure(self) -> aio.AioRpcError:
        """Read until the stream fails; its error."""
        try:
            while await self.next() is not None:
                pass
        except aio.AioRpcError as exc:
            return exc
        raise AssertionError(f"the stream ended OK: {self.kinds()}")

    def kinds(self) -> list[str]:
        return [describe(frame) for frame in self.frames]

    def cancel(self) -> None:
        self.call.cancel()


def describe(frame: pb.TalkResponse) -> str:
    kind = frame.WhichOneof("frame") or ""
    if kind == "update":
        return f"update:{frame.update.WhichOneof('update')}"
    if kind == "event":
        return f"event:{pb.TalkEventKind.Name(frame.event.kind)}"
    if kind == "transcript":
        return "transcript:final" if frame.transcript.final else "transcript:partial"
    return kind


def open_talk(stub: Stub, caller: Caller, *first: pb.TalkRequest) -> Talk:
    queue: asyncio.Queue[pb.TalkRequest | None] = asyncio.Queue()
    for request in first:
        queue.put_nowait(request)

    async def requests() -> AsyncIterator[pb.TalkRequest]:
        while (request := await queue.get()) is not None:
            yield request

    call = stub.Talk(requests(), metadata=caller.md, timeout=TALK_TIMEOUT_S * 2)
    return Talk(call, queue)


async def refused_talk(
    stub: Stub, caller: Caller, code: grpc.StatusCode, *requests: pb.TalkRequest
) -> aio.AioRpcError:
    """A session that fails with ``code`` after ``requests`` (no frame but the session
    may come first)."""
    talk = open_talk(stub, caller, *requests)
    error = await talk.failure()
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    return error


def updates_of(frames: list[pb.TalkResponse], run: str) -> list[pb.TalkResponse]:
    return [f for f in frames if f.WhichOneof("frame") == "update" and f.update.run == run]


def speech_of(frames: list[pb.TalkResponse]) -> bytes:
    """The speech the frames carried, joined."""
    return b"".join(
        f.update.speech.audio
        for f in frames
        if f.WhichOneof("frame") == "update" and f.update.WhichOneof("update") == "speech"
    )


def ended(frame: pb.TalkResponse) -> bool:
    """A run's last update: its terminal state change."""
    return (
        frame.WhichOneof("frame") == "update"
        and frame.update.WhichOneof("update") == "state_change"
        and frame.update.state_change.run.state
        in (
            pb.RUN_STATE_SUCCEEDED,
            pb.RUN_STATE_FAILED,
            pb.RUN_STATE_CANCELLED,
            pb.RUN_STATE_DEADLINE_EXCEEDED,
        )
    )


async def voice_world(settings: Settings, display_name: str) -> tuple[World, str]:
    """A world and a voice assistant of the model handler (``display_name``), made on a
    server of ``settings`` that then stops: a phone test's trunks and rules name them, so
    they are made before the server that reads those is started, on the same database."""
    async with started(settings) as first, aio.insecure_channel(first.address) as channel:
        world = await ctx_world(first, context_stub(channel))
        made = await dispatcher_stub(channel).CreateAssistant(
            pb.CreateAssistantRequest(
                parent=world.workspace.name,
                assistant=pb.Assistant(
                    display_name=display_name,
                    handler="handlers/llm",
                    voice=pb.VoiceSettings(language="en"),
                ),
            ),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    return world, made.assistant.name
