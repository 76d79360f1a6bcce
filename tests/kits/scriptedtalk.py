"""A scripted ``Talk`` server for the voice client's resume tests (no tests here).

It keeps the contract's numbering (a turn's final transcript is ``turn << 40``, its
run's updates follow it) and its resume rule (numbered frames after
``after_sequence`` are replayed; a turn being spoken when the connection dropped is
discarded), over a real gRPC server on loopback, and drops the call exactly where a
test says: after so many numbered frames written, or so many audio frames read. The
real Talk server cannot be made to drop at such points; the client tests against it
(tests/client/test_client_voice_service.py) check the same rules end to end.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.api.handler.v1 import handler_pb2
from switchboard.client.transport.streams import EOF
from switchboard.platform import errors
from switchboard.platform.rpc.status import RpcStatus, to_grpc_status

TURN: Final = 1 << 40
CONVERSATION: Final = "workspaces/w/conversations/c"
#: Bytes of speech each answer carries, in three chunks.
SPEECH_CHUNK: Final = b"\x01\x00" * 50


@dataclass
class Plan:
    """Where the next call of a session breaks (each is used once, then cleared)."""

    #: Abort with UNAVAILABLE after writing this many numbered frames on the call.
    after_numbered: int | None = None
    #: Abort with UNAVAILABLE after reading this many audio frames on the call.
    after_audio: int | None = None
    #: After that many numbered frames, go silent with the call open (a proxy that
    #: dropped the connection without a word; no heartbeat either).
    stall_after_numbered: int | None = None
    #: Replay this many frames at or before ``after_sequence`` too (a careless server;
    #: the client must drop them).
    overlap: int = 0
    #: Forget the session on the drop: its resume is refused with SESSION_ENDED.
    forget: bool = False


@dataclass
class Session:
    name: str
    detection: int
    turn_count: int = 0
    #: The open turn's audio (None: no turn open).
    speaking: bytearray | None = None
    log: list[pb.TalkResponse] = field(default_factory=list)
    audio_frames: list[int] = field(default_factory=list)
    controls: list[tuple[int, int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    #: The first frame of every call: "start" or "resume:<after_sequence>".
    calls: list[str] = field(default_factory=list)


class _Drop(Exception):
    pass


@dataclass
class _Call:
    session: Session
    context: Any
    #: Numbered frames written, audio frames read, on this call.
    written: int = 0
    read_audio: int = 0


class ScriptedTalk(dispatcher_pb2_grpc.DispatcherServiceServicer):
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.plan = Plan()
        self.refuse_start: RpcStatus | None = None
        self.address = ""
        self._serial = itertools.count(1)

    @property
    def only(self) -> Session:
        (session,) = self.sessions.values()
        return session

    # Written with context.read/write (the servicer base class declares an iterator).
    async def Talk(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        session = await self._open(await context.read(), context)
        call = _Call(session, context)
        try:
            while True:
                request = await context.read()
                if request is EOF or not await self._handle(call, request):
                    return
        except _Drop:
            plan, self.plan = self.plan, Plan(overlap=self.plan.overlap)
            if plan.forget:
                del self.sessions[session.name]
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted drop")

    async def _open(self, first: pb.TalkRequest, context: Any) -> Session:
        if first.HasField("start"):
            if self.refuse_start is not None:
                status = self.refuse_start
                await context.abort(status.code, status.details, status.trailing_metadata)
            session = Session(
                f"{CONVERSATION}/voiceSessions/s{next(self._serial)}",
                first.start.turn_detection or pb.TURN_DETECTION_SERVER_VAD,
            )
            self.sessions[session.name] = session
            session.calls.append("start")
            await context.write(self._described(session))
            return session
        found = self.sessions.get(first.resume.session)
        if found is None:
            status = to_grpc_status(errors.SessionEnded("the session has ended"), "")
            await context.abort(status.code, status.details, status.trailing_metadata)
        assert found is not None
        session = found
        session.calls.append(f"resume:{first.resume.after_sequence}")
        session.speaking = None  # the turn being spoken is discarded
        await context.write(self._described(session))
        after = first.resume.after_sequence
        start = next((i for i, f in enumerate(session.log) if f.sequence > after), len(session.log))
        for frame in session.log[max(start - self.plan.overlap, 0) :]:
            await context.write(frame)
        self.plan.overlap = 0
        return session

    async def _handle(self, call: _Call, request: pb.TalkRequest) -> bool:
        """Act on one request; False once the session was ended."""
        session = call.session
        kind = request.WhichOneof("frame")
        if kind == "audio":
            call.read_audio += 1
            session.audio_frames.append(len(request.audio.data))
            if session.speaking is None and session.detection != pb.TURN_DETECTION_CLIENT:
                session.speaking = bytearray()
            if session.speaking is not None:
                session.speaking += request.audio.data
            if self.plan.after_audio is not None and call.read_audio >= self.plan.after_audio:
                raise _Drop
        elif kind == "text":
            session.texts.append(request.text)
            await self._answer(call, f"typed {request.text}")
        else:
            action = request.control.action
            session.controls.append((action, request.control.heard_through_sequence))
            if action == pb.TALK_ACTION_START_TURN:
                session.speaking = bytearray()
            elif action == pb.TALK_ACTION_END_TURN and session.speaking is not None:
                heard, session.speaking = len(session.speaking), None
                await self._answer(call, f"heard {heard} bytes")
            elif action == pb.TALK_ACTION_INTERRUPT:
                event = pb.TalkEvent(
                    kind=pb.TALK_EVENT_KIND_SPEECH_INTERRUPTED, turn=session.turn_count
                )
                await call.context.write(pb.TalkResponse(event=event))
            elif action == pb.TALK_ACTION_END_SESSION:
                return False
        return True

    def _described(self, session: Session) -> pb.TalkResponse:
        return pb.TalkResponse(
            session=pb.VoiceSession(
                name=session.name,
                turn_count=session.turn_count,
                turn_detection=session.detection,  # type: ignore[arg-type]
                output_format=pb.AudioFormat(sample_rate_hz=24_000),
            )
        )

    async def _answer(self, call: _Call, said: str) -> None:
        """The turn's final transcript and its run, numbered, logged and written."""
        session = call.session
        session.turn_count += 1
        turn = session.turn_count
        run = f"{CONVERSATION}/runs/r{turn}"
        base = turn * TURN
        frames = [
            pb.TalkResponse(
                sequence=base,
                transcript=pb.Transcript(
                    turn=turn,
                    text=said,
                    final=True,
                    message=f"{CONVERSATION}/messages/m{turn}",
                    run=run,
                ),
            )
        ]
        updates: list[pb.RunUpdate] = [
            pb.RunUpdate(
                state_change=pb.RunStateChange(run=pb.Run(name=run, state=pb.RUN_STATE_QUEUED))
            ),
            pb.RunUpdate(delta=handler_pb2.TextDelta(text="you said: ")),
            pb.RunUpdate(delta=handler_pb2.TextDelta(text=said)),
            *(
                pb.RunUpdate(
                    speech=pb.SpeechChunk(
                        audio=SPEECH_CHUNK,
                        format=pb.AudioFormat(sample_rate_hz=24_000),
                        segment=0,
                    )
                )
                for _ in range(3)
            ),
            pb.RunUpdate(
                state_change=pb.RunStateChange(run=pb.Run(name=run, state=pb.RUN_STATE_SUCCEEDED))
            ),
        ]
        for number, update in enumerate(updates, start=1):
            update.run = run
            update.sequence = number
            frames.append(pb.TalkResponse(sequence=base + number, update=update))
        session.log += frames
        for frame in frames:
            await call.context.write(frame)
            call.written += 1
            if self.plan.after_numbered is not None and call.written >= self.plan.after_numbered:
                raise _Drop
            stall = self.plan.stall_after_numbered
            if stall is not None and call.written >= stall:
                self.plan.stall_after_numbered = None
                await asyncio.Event().wait()  # until the client gives up on the call


@asynccontextmanager
async def scripted() -> AsyncIterator[tuple[ScriptedTalk, str]]:
    """The scripted server on loopback: it and its address."""
    servicer = ScriptedTalk()  # type: ignore[abstract]
    server = aio.server()
    dispatcher_pb2_grpc.add_DispatcherServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        servicer.address = f"127.0.0.1:{port}"
        yield servicer, servicer.address
    finally:
        await server.stop(0)
