"""A voice session: ``DispatcherService.Talk``'s frames in, transcripts and run updates out.

One stream, three tasks and the writer:

- the **reader** takes the client's frames: audio goes through the detector
  (``turns.py``) into the turn being spoken; controls start, end and interrupt;
  a typed ``text`` is a turn of its own. A turn that ends is queued for the
  worker, so reading (and hearing a barge-in) never waits on a transcription;
- the **worker** takes ended turns in order: transcribes the turn's audio
  (``voice/ports.SpeechEngine``), then sends the user message through the
  dispatcher's own SendMessage (the transcript, the recording as a file, asked
  to speak its answer), stores the turn (``store.py``) and hands its run to
- the **relay**, which sends each turn's final transcript and then its run's
  updates (``watch``), one turn after the other, so the numbered frames go out
  in order: ``turn << 40`` for the transcript, plus the run's update sequence
  for each update (``mapping.sequence``);
- the **writer** (the generator the servicer reads) takes frames from one
  bounded queue: a slow reader makes the relay wait, never memory grow. Before
  each frame it looks again: a run interrupted since that frame was queued has
  its ``speech`` dropped there, so barge-in stops the audio at once whatever was
  queued. It sends heartbeats when nothing else goes out and ends the session
  when the client has been idle too long.

Resume (``TalkResume``) rebuilds the numbered frames after the client's last one
from the stored turns and the runs' updates, which any replica can read (the
shared event log), and continues live.

The session holds its conversation for WRITE through an access grant
(``platform/security/accesswatch.py``): a lost credential or lost access ends
the stream with the unary call's status, and nothing produced after the change
goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.ports.peers import Via
from switchboard.dispatcher.runs.intake.speech import configured
from switchboard.dispatcher.talk import mapping
from switchboard.dispatcher.talk.store import SessionRecord, TurnRecord, VoiceStore
from switchboard.dispatcher.talk.turns import Detector, TurnAudio
from switchboard.dispatcher.voice.speaker import Speech
from switchboard.platform.audio import pcm
from switchboard.platform.errors import (
    FailedPrecondition,
    FieldViolation,
    InternalError,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    SessionEnded,
    SessionIdle,
    SpeechNotConfigured,
    SwitchboardError,
    Violations,
)
from switchboard.platform.resilience import background
from switchboard.platform.security.accesswatch import AccessWatch, Grant, Hold
from switchboard.platform.security.policy import Permission, Principal
from switchboard.platform.values import names, timefields

log = logging.getLogger("switchboard.dispatcher.talk")

#: Frames a session may hold for a slow reader before its relay waits.
TALK_BUFFER: Final = 256
#: Ended turns waiting for the worker; one more is an error frame (the user talks
#: faster than the engines answer).
MAX_PENDING_TURNS: Final = 4
DEFAULT_INPUT_RATE: Final = 16_000
DEFAULT_OUTPUT_RATE: Final = 24_000
DEFAULT_SILENCE_MS: Final = 700
MIN_SILENCE_MS: Final = 200
MAX_SILENCE_MS: Final = 5_000
#: New speech in a turn between two partial transcripts.
PARTIAL_EVERY_MS: Final = 1_000
#: Recordings are stored at most at the recognizer's rate: a minute of speech
#: stays under the context service's inline file limit.
RECORDING_MAX_RATE: Final = 16_000
_POLICIES: Final = frozenset(
    {
        pb.CONCURRENCY_POLICY_UNSPECIFIED,
        pb.CONCURRENCY_POLICY_ENQUEUE,
        pb.CONCURRENCY_POLICY_REJECT,
        pb.CONCURRENCY_POLICY_INTERRUPT,
    }
)
_DETECTIONS: Final = frozenset(
    {pb.TURN_DETECTION_UNSPECIFIED, pb.TURN_DETECTION_CLIENT, pb.TURN_DETECTION_SERVER_VAD}
)
_ENCODINGS: Final = frozenset({pb.AUDIO_ENCODING_UNSPECIFIED, pb.AUDIO_ENCODING_PCM16})
_CONTEXT_TIMEOUT_S: Final = 10.0


class Actions(Protocol):
    """What a session calls: the dispatcher's own calls (``service.Dispatcher``)."""

    async def send_message(
        self, principal: Principal, request: pb.SendMessageRequest
    ) -> pb.SendMessageResponse: ...

    def watch(self, name: str, after_sequence: int) -> AsyncIterator[pb.RunUpdate | None]: ...

    async def cancel_run(
        self,
        principal: Principal,
        name: str,
        reason: str,
        via: Via,
        *,
        heard_through_sequence: int = 0,
    ) -> pb.Run: ...


@dataclass(frozen=True)
class TalkLimits:
    """The voice settings a session reads (``SWITCHBOARD_VOICE_*``)."""

    max_turn_s: float = 60.0
    max_frame_bytes: int = 64 * 1024
    idle_timeout_s: float = 30.0
    resume_window_s: float = 120.0
    max_sessions: int = 200
    max_sessions_per_user: int = 4
    heartbeat_s: float = 15.0


class Talks:
    """Opens voice sessions, each under its own access grant, within the process's limits."""

    def __init__(
        self,
        *,
        actions: Actions,
        assistants: Assistants,
        context: ContextPort,
        store: VoiceStore,
        access: AccessWatch,
        speech: Callable[[], Speech | None],
        limits: TalkLimits,
    ) -> None:
        self._actions = actions
        self._assistants = assistants
        self._context = context
        self._store = store
        self._access = access
        self._speech = speech
        self.limits = limits
        self._open = 0
        self._by_user: dict[str, int] = {}

    @property
    def open_sessions(self) -> int:
        return self._open

    async def talk(
        self, principal: Principal, requests: AsyncIterator[pb.TalkRequest], via: Via
    ) -> AsyncGenerator[pb.TalkResponse, None]:
        grant = self._access.open(principal)
        try:
            # A stream whose credential is already gone does not start.
            await grant.verify()
            frames = aiter(requests)
            first = await self._first(frames)
            kind = first.WhichOneof("frame")
            if kind == "start":
                session, hello = await self._start(grant, first.start, via)
            elif kind == "resume":
                session, hello = await self._resume(grant, first.resume, via)
            else:
                raise InvalidArgument(
                    "the first frame must be start or resume",
                    [FieldViolation("frame", "the first frame must be start or resume")],
                )
            try:
                yield hello
                async for frame in session.run(frames):
                    yield frame
            finally:
                self._release(principal)
        finally:
            grant.close()

    async def _first(self, frames: AsyncIterator[pb.TalkRequest]) -> pb.TalkRequest:
        idle = self.limits.idle_timeout_s
        try:
            async with asyncio.timeout(idle):
                return await anext(frames)
        except StopAsyncIteration:
            raise InvalidArgument(
                "the stream ended before its first frame",
                [FieldViolation("frame", "the first frame must be start or resume")],
            ) from None
        except TimeoutError:
            raise _idle(idle) from None

    # -- limits --------------------------------------------------------------------------

    def _claim(self, principal: Principal) -> None:
        if self._open >= self.limits.max_sessions:
            raise QuotaExceeded(
                f"this server holds at most {self.limits.max_sessions} voice sessions at once",
                subject="voice/sessions",
            )
        held = self._by_user.get(principal.user_id, 0)
        if held >= self.limits.max_sessions_per_user:
            raise QuotaExceeded(
                f"a user may hold at most {self.limits.max_sessions_per_user} voice sessions "
                "at once",
                subject=f"voice/sessions/{principal.user_name}",
            )
        self._open += 1
        self._by_user[principal.user_id] = held + 1

    def _release(self, principal: Principal) -> None:
        self._open -= 1
        left = self._by_user.get(principal.user_id, 1) - 1
        if left > 0:
            self._by_user[principal.user_id] = left
        else:
            self._by_user.pop(principal.user_id, None)

    # -- start and resume ------------------------------------------------------------------

    async def _start(
        self, grant: Grant, start: pb.TalkStart, via: Via
    ) -> tuple[_Session, pb.TalkResponse]:
        principal = grant.principal
        found = names.match(names.CONVERSATION, start.conversation, "start.conversation")
        workspace_id, conversation_id = found[1], found[2]
        waker = _Waker()
        hold = await grant.hold(
            ((start.conversation, "start.conversation"),), Permission.WRITE, waker
        )
        settings = _settings(start)
        # NOT_FOUND for a conversation that does not exist (or was deleted).
        await self._context.conversation(
            principal, start.conversation, timeout_s=_CONTEXT_TIMEOUT_S
        )
        assistant = await self._assistants.resolve(workspace_id, start.assistant, "start.assistant")
        if assistant is None:
            raise SpeechNotConfigured(
                "the workspace has no default assistant; name an assistant with voice settings "
                "(start.assistant)"
            )
        if not assistant.HasField("voice"):
            raise SpeechNotConfigured(
                f"{assistant.name} has no voice settings",
                metadata={"assistant": assistant.name},
            )
        speech = configured(self._speech())
        self._claim(principal)
        try:
            session_id = names.new_id()
            created = names.now()
            expire_at = created + dt.timedelta(seconds=self.limits.resume_window_s)
            settings.name = mapping.session_name(workspace_id, conversation_id, session_id)
            settings.assistant = assistant.name
            settings.create_time.FromDatetime(created)
            record = SessionRecord(
                id=session_id,
                workspace_id=workspace_id,
                conversation_id=conversation_id,
                creator=principal.user_name,
                data=settings.SerializeToString(deterministic=True),
                turn_count=0,
                created_at=created,
                expire_at=expire_at,
                ended_at=None,
            )
            await self._store.create(record)
        except BaseException:
            self._release(principal)
            raise
        session = _Session(
            talks=self,
            grant=grant,
            hold=hold,
            waker=waker,
            via=via,
            record=record,
            settings=settings,
            speech=speech,
            voice=assistant.voice,
            turn_count=0,
            owed=[],
        )
        return session, pb.TalkResponse(session=mapping.session(record, 0, expire_at))

    async def _resume(
        self, grant: Grant, resume: pb.TalkResume, via: Via
    ) -> tuple[_Session, pb.TalkResponse]:
        principal = grant.principal
        found = names.match(names.VOICE_SESSION, resume.session, "resume.session")
        workspace_id, conversation_id, session_id = found[1], found[2], found[3]
        if resume.after_sequence < 0:
            raise InvalidArgument(
                "resume.after_sequence must not be negative",
                [FieldViolation("resume.after_sequence", "must not be negative")],
            )
        conversation = f"workspaces/{workspace_id}/conversations/{conversation_id}"
        waker = _Waker()
        hold = await grant.hold(((conversation, "resume.session"),), Permission.WRITE, waker)
        record = await self._store.get(workspace_id, conversation_id, session_id)
        # Someone else's session is as good as absent: its name tells nothing.
        if record is None or record.creator != principal.user_name:
            raise NotFound(f"{resume.session} not found")
        if record.ended_at is not None or record.expire_at <= names.now():
            raise SessionEnded(f"{resume.session} has ended; start a new session")
        after_turn, after_position = mapping.position(resume.after_sequence)
        if after_turn > record.turn_count:
            raise InvalidArgument(
                "resume.after_sequence is past the session's last turn",
                [
                    FieldViolation(
                        "resume.after_sequence",
                        f"must be at most the last frame's (turn {record.turn_count})",
                    )
                ],
            )
        settings = pb.VoiceSession.FromString(record.data)
        assistant = await self._assistants.resolve(workspace_id, settings.assistant, "assistant")
        if assistant is None or not assistant.HasField("voice"):
            raise SpeechNotConfigured(
                f"{settings.assistant} has no voice settings any more",
                metadata={"assistant": settings.assistant},
            )
        speech = configured(self._speech())
        owed: list[_Owed] = []
        for turn in await self._store.turns(session_id, max(after_turn, 1)):
            if turn.turn == after_turn:
                # Its transcript was seen (position 0 is the transcript): the run after it.
                owed.append(_Owed(turn.turn, None, turn.run, after_position))
            else:
                owed.append(_Owed(turn.turn, mapping.transcript(turn), turn.run, 0))
        self._claim(principal)
        expire_at = names.now() + dt.timedelta(seconds=self.limits.resume_window_s)
        session = _Session(
            talks=self,
            grant=grant,
            hold=hold,
            waker=waker,
            via=via,
            record=record,
            settings=settings,
            speech=speech,
            voice=assistant.voice,
            turn_count=record.turn_count,
            owed=owed,
        )
        return session, pb.TalkResponse(
            session=mapping.session(record, record.turn_count, expire_at)
        )

    # -- what sessions call ----------------------------------------------------------------

    @property
    def actions(self) -> Actions:
        return self._actions

    @property
    def store(self) -> VoiceStore:
        return self._store

    def expiry(self) -> dt.datetime:
        return names.now() + dt.timedelta(seconds=self.limits.resume_window_s)


def _idle(seconds: float) -> SessionIdle:
    return SessionIdle(
        f"the voice session sent nothing for {seconds:g} s; resume it within its window",
        metadata={"idle_seconds": f"{seconds:g}"},
    )


def _format(
    given: pb.AudioFormat, has: bool, field: str, default_rate: int, violations: Violations
) -> pb.AudioFormat:
    rate = given.sample_rate_hz if has and given.sample_rate_hz else default_rate
    if has and given.encoding not in _ENCODINGS:
        violations.add(f"{field}.encoding", "must be PCM16 or unset")
    if rate not in pcm.RATES:
        rates = ", ".join(str(r) for r in sorted(pcm.RATES))
        violations.add(f"{field}.sample_rate_hz", f"must be one of {rates}, or 0 for the default")
    return pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16, sample_rate_hz=rate)


def _settings(start: pb.TalkStart) -> pb.VoiceSession:
    """The session's settings with their defaults, or INVALID_ARGUMENT naming each bad field."""
    violations = Violations()
    input_format = _format(
        start.input_format,
        start.HasField("input_format"),
        "start.input_format",
        DEFAULT_INPUT_RATE,
        violations,
    )
    output_format = _format(
        start.output_format,
        start.HasField("output_format"),
        "start.output_format",
        DEFAULT_OUTPUT_RATE,
        violations,
    )
    silence_ms = DEFAULT_SILENCE_MS
    if start.HasField("silence"):
        silence_ms = round(timefields.seconds(start.silence, "start.silence") * 1000)
        if not MIN_SILENCE_MS <= silence_ms <= MAX_SILENCE_MS:
            violations.add("start.silence", "must be 200 ms to 5 s")
    if start.turn_detection not in _DETECTIONS:
        violations.add("start.turn_detection", "is not a known detection")
    if start.concurrency_policy not in _POLICIES:
        violations.add("start.concurrency_policy", "is not a known policy")
    violations.check()
    settings = pb.VoiceSession(
        input_format=input_format,
        output_format=output_format,
        turn_detection=start.turn_detection or pb.TURN_DETECTION_SERVER_VAD,
        concurrency_policy=start.concurrency_policy or pb.CONCURRENCY_POLICY_INTERRUPT,
        partial_transcripts=start.partial_transcripts,
        barge_in=start.barge_in,
    )
    settings.silence.FromMilliseconds(silence_ms)
    return settings


class _Waker:
    """The hold's listener, made before the session it wakes: a lost conversation
    ends the session at once, not at its next frame."""

    def __init__(self) -> None:
        self.wake: Callable[[], None] | None = None

    def __call__(self) -> None:
        if self.wake is not None:
            self.wake()


@dataclass(frozen=True)
class _Owed:
    """A turn's frames to relay: its final transcript (None when the client saw it),
    then its run's updates after ``after``."""

    turn: int
    transcript: pb.Transcript | None
    run: str
    after: int


@dataclass(frozen=True)
class _Ended:
    """A turn the user finished: spoken (``audio``) or typed (``text``)."""

    audio: bytes | None = None
    text: str = ""


class _Session:
    def __init__(
        self,
        *,
        talks: Talks,
        grant: Grant,
        hold: Hold,
        waker: _Waker,
        via: Via,
        record: SessionRecord,
        settings: pb.VoiceSession,
        speech: Speech,
        voice: pb.VoiceSettings,
        turn_count: int,
        owed: list[_Owed],
    ) -> None:
        self._talks = talks
        self._actions = talks.actions
        self._store = talks.store
        self._limits = talks.limits
        self._grant = grant
        self._hold = hold
        self._principal = grant.principal
        self._via = via
        self._record = record
        self._settings = settings
        self._name = settings.name
        self._conversation = mapping.conversation_name(record)
        self._speech = speech
        self._voice = voice
        self._turn_count = turn_count
        rate = settings.input_format.sample_rate_hz
        self._rate = rate
        self._vad = settings.turn_detection == pb.TURN_DETECTION_SERVER_VAD
        silence_ms = settings.silence.ToMilliseconds()
        needs_detector = self._vad or settings.barge_in
        self._detector = Detector(rate, silence_ms) if needs_detector else None
        self._audio = TurnAudio(rate, round(self._limits.max_turn_s * 1000))
        self._out: asyncio.Queue[pb.TalkResponse | None] = asyncio.Queue(TALK_BUFFER)
        self._ended: asyncio.Queue[_Ended | None] = asyncio.Queue()
        self._relays: asyncio.Queue[_Owed | None] = asyncio.Queue()
        for item in owed:
            self._relays.put_nowait(item)
        self._fatal: SwitchboardError | None = None
        #: Runs whose speech stopped (barge-in or interrupt): their ``speech`` is dropped.
        self._interrupted: set[str] = set()
        #: The run being relayed, its turn, and the last speech update written of it.
        self._current: tuple[int, str] | None = None
        self._speech_sent: dict[str, int] = {}
        self._busy = len(owed)  # turns ended or owed, not yet fully relayed
        self._last_frame = time.monotonic()
        self._reading = True
        self._ending = False
        self._partial: asyncio.Task[None] | None = None
        self._partial_at_ms = 0
        self._tasks: set[asyncio.Task[None]] = set()
        grant.on_change(self._wake)
        waker.wake = self._wake

    # -- the writer ------------------------------------------------------------------------

    async def run(
        self, frames: AsyncIterator[pb.TalkRequest]
    ) -> AsyncGenerator[pb.TalkResponse, None]:
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(frames), name="talk-reader")
        worker = loop.create_task(self._work(), name="talk-worker")
        relay = loop.create_task(self._relay(), name="talk-relay")
        finished = False
        try:
            while True:
                frame = await self._next()
                if frame is None:
                    finished = True
                    return
                yield frame
        finally:
            for task in (reader, worker, relay, *self._tasks):
                task.cancel()
            if self._partial is not None:
                self._partial.cancel()
            await asyncio.wait([reader, worker, relay, *self._tasks])
            await self._close(ended=finished and self._ending)

    async def _close(self, *, ended: bool) -> None:
        """Store how the stream ended: over for good, or resumable for the window."""
        with contextlib.suppress(SwitchboardError):
            if ended or self._fatal_ends:
                await self._store.end(self._record.id, names.now())
            else:
                await self._store.touch(self._record.id, self._talks.expiry())

    @property
    def _fatal_ends(self) -> bool:
        # A client's bad frame ends the session for good; idleness and lost access do not.
        return isinstance(self._fatal, InvalidArgument | FailedPrecondition)

    def _wake(self) -> None:
        # A full queue means the writer is not waiting; it looks before its next read.
        with contextlib.suppress(asyncio.QueueFull):
            self._out.put_nowait(None)

    def _check(self) -> None:
        error = self._grant.error or self._hold.error
        if error is not None:
            raise error
        if self._fatal is not None:
            raise self._fatal

    def _idle_for(self) -> float | None:
        """Seconds until the session is idle (None while something is going on)."""
        if self._busy or not self._reading:
            return None
        return self._last_frame + self._limits.idle_timeout_s - time.monotonic()

    async def _next(self) -> pb.TalkResponse | None:
        last_out = time.monotonic()
        while True:
            self._check()
            if self._done():
                return None
            wait = self._limits.heartbeat_s - (time.monotonic() - last_out)
            idle = self._idle_for()
            if idle is not None:
                if idle <= 0:
                    self._fatal = _idle(self._limits.idle_timeout_s)
                    raise self._fatal
                wait = min(wait, idle)
            if wait <= 0:
                return mapping.heartbeat()
            try:
                async with asyncio.timeout(wait):
                    frame = await self._out.get()
            except TimeoutError:
                continue
            self._check()
            if frame is None:
                continue
            if frame.WhichOneof("frame") == "update":
                update = frame.update
                if update.WhichOneof("update") == "speech":
                    # The last look before the wire: speech of a run stopped since
                    # this frame was queued never goes out.
                    if update.run in self._interrupted:
                        continue
                    self._speech_sent[update.run] = update.sequence
            return frame

    def _done(self) -> bool:
        """Everything owed went out, and the client will send nothing more."""
        return (
            (not self._reading or self._ending)
            and not self._busy
            and self._ended.empty()
            and self._out.empty()
        )

    async def _put(self, frame: pb.TalkResponse) -> None:
        await self._out.put(frame)

    def _fail(self, error: SwitchboardError) -> None:
        if self._fatal is None:
            self._fatal = error
        self._wake()

    # -- the reader ------------------------------------------------------------------------

    async def _read(self, frames: AsyncIterator[pb.TalkRequest]) -> None:
        try:
            async for request in frames:
                self._last_frame = time.monotonic()
                if self._grant.error is not None or self._fatal is not None:
                    break
                try:
                    await self._frame(request)
                except SwitchboardError as exc:
                    self._fail(exc)
                    break
        finally:
            self._reading = False
            if self._audio.open:
                # A turn the client was still speaking is discarded: nothing half-stored.
                self._audio.end()
            self._ended.put_nowait(None)
            self._wake()

    async def _frame(self, request: pb.TalkRequest) -> None:
        kind = request.WhichOneof("frame")
        if self._ending:
            raise SessionEnded("the session has ended (END_SESSION); start a new session")
        if kind == "audio":
            await self._audio_frame(request.audio.data)
        elif kind == "control":
            await self._control(request.control)
        elif kind == "text":
            if not request.text.strip():
                raise InvalidArgument(
                    "a text frame needs text", [FieldViolation("text", "must not be empty")]
                )
            self._queue_turn(_Ended(text=request.text))
        elif kind in ("start", "resume"):
            raise InvalidArgument(
                f"{kind} is the first frame only",
                [FieldViolation(kind, "is allowed as the first frame only")],
            )
        else:
            raise InvalidArgument("the frame is empty", [FieldViolation("frame", "is required")])

    async def _audio_frame(self, data: bytes) -> None:
        if len(data) > self._limits.max_frame_bytes:
            raise InvalidArgument(
                f"an audio frame is {len(data)} bytes; the limit is {self._limits.max_frame_bytes}",
                [
                    FieldViolation(
                        "audio.data", f"must be at most {self._limits.max_frame_bytes} bytes"
                    )
                ],
            )
        if len(data) % pcm.SAMPLE_BYTES:
            raise InvalidArgument(
                "PCM16 audio has an even number of bytes",
                [FieldViolation("audio.data", "must be whole 16-bit samples (an even length)")],
            )
        changes = self._detector.feed(data) if self._detector is not None else []
        for speaking in changes:
            if speaking:
                await self._speech_began()
        self._audio.add(data)
        detector = self._detector
        if (
            self._vad
            and self._audio.open
            and False in changes
            and detector is not None
            and not detector.speaking
        ):
            await self._put(mapping.event(pb.TALK_EVENT_KIND_SPEECH_STOPPED, self._next_turn))
            self._end_turn()
        elif self._audio.full:
            self._end_turn()
            if self._vad and detector is not None and detector.speaking:
                # Still speaking at the limit: the rest is the next turn, not lost.
                self._audio.begin(pre_roll=False)
        else:
            self._maybe_partial()

    @property
    def _next_turn(self) -> int:
        return self._turn_count + self._ended.qsize() + 1

    async def _speech_began(self) -> None:
        current = self._current
        if self._settings.barge_in and current is not None and self._speaking(current[1]):
            await self._interrupt(current[0], current[1], 0)
        if self._vad:
            await self._put(mapping.event(pb.TALK_EVENT_KIND_SPEECH_STARTED, self._next_turn))
            self._audio.begin(pre_roll=True)

    def _speaking(self, run: str) -> bool:
        return run in self._speech_sent and run not in self._interrupted

    async def _control(self, control: pb.TalkControl) -> None:
        action = control.action
        if action == pb.TALK_ACTION_START_TURN:
            self._audio.begin(pre_roll=False)
        elif action == pb.TALK_ACTION_END_TURN:
            if self._audio.open:
                self._end_turn()
            else:
                await self._put(mapping.event(pb.TALK_EVENT_KIND_TURN_EMPTY, self._next_turn))
        elif action == pb.TALK_ACTION_INTERRUPT:
            current = self._current
            if current is not None and current[1] not in self._interrupted:
                await self._interrupt(current[0], current[1], control.heard_through_sequence)
        elif action == pb.TALK_ACTION_END_SESSION:
            if self._audio.open:
                self._audio.end()  # a turn not ended is not taken
            self._ending = True
            self._wake()
        else:
            raise InvalidArgument(
                "the control has no action",
                [FieldViolation("control.action", "must be a TalkAction")],
            )

    def _queue_turn(self, ended: _Ended) -> None:
        if self._ended.qsize() >= MAX_PENDING_TURNS:
            # Said on the stream, not fatal: the user may go on once the engines catch up.
            self._spawn(
                self._put(
                    mapping.error(
                        QuotaExceeded(
                            f"at most {MAX_PENDING_TURNS} turns may wait for transcription; "
                            "this one was dropped",
                            subject="voice/turns",
                        )
                    )
                )
            )
            return
        self._busy += 1
        self._ended.put_nowait(ended)

    def _end_turn(self) -> None:
        if self._partial is not None:
            self._partial.cancel()
            self._partial = None
        self._partial_at_ms = 0
        audio = self._audio.end()
        if audio is None:
            return
        if not audio:
            # Nothing to transcribe: said at once, without asking the engine.
            self._spawn(self._put(mapping.event(pb.TALK_EVENT_KIND_TURN_EMPTY, self._next_turn)))
            return
        self._queue_turn(_Ended(audio=audio))

    def _maybe_partial(self) -> None:
        if (
            not self._settings.partial_transcripts
            or not self._audio.open
            or (self._partial is not None and not self._partial.done())
            or self._audio.ms - self._partial_at_ms < PARTIAL_EVERY_MS
        ):
            return
        self._partial_at_ms = self._audio.ms
        self._partial = self._spawn(self._send_partial(self._audio.audio(), self._next_turn))

    async def _send_partial(self, audio: bytes, turn: int) -> None:
        try:
            text = await self._transcribe(audio, turn)
        except SwitchboardError:
            return  # the final transcript says what went wrong, if anything does
        if text and self._audio.open:
            await self._put(
                pb.TalkResponse(
                    transcript=pb.Transcript(
                        turn=turn,
                        text=text,
                        final=False,
                        audio_ms=pcm.duration_ms(len(audio), self._rate),
                    )
                )
            )

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        async def run() -> None:
            await work

        task = background.spawn(run(), name="talk-task", logger=log)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- barge-in --------------------------------------------------------------------------

    async def _interrupt(self, turn: int, run: str, heard_through: int) -> None:
        """Stop the run's speech now, then cancel it (heard through what the client says
        it heard, else the last speech written)."""
        self._interrupted.add(run)
        await self._put(mapping.event(pb.TALK_EVENT_KIND_SPEECH_INTERRUPTED, turn, run))
        heard_turn, heard_position = mapping.position(heard_through)
        if heard_through <= 0 or heard_turn != turn:
            heard_position = self._speech_sent.get(run, 0)
        self._spawn(self._cancel(run, heard_position))

    async def _cancel(self, run: str, heard_through: int) -> None:
        try:
            await self._actions.cancel_run(
                self._principal,
                run,
                "interrupted in a voice session",
                self._via,
                heard_through_sequence=heard_through,
            )
        except SwitchboardError as exc:
            await self._put(mapping.error(exc))

    # -- the worker ------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            ended = await self._ended.get()
            if ended is None:
                return
            relayed = False
            try:
                relayed = await self._take(ended)
            except SwitchboardError as exc:
                # The turn is dropped; the session goes on.
                await self._put(mapping.error(exc))
            except Exception:
                # A fault of ours: said as INTERNAL, and the session ends (never hangs).
                log.exception("a voice session's turn failed")
                self._fail(InternalError("the turn failed on the server"))
                return
            finally:
                if not relayed:
                    self._turn_done()

    def _turn_done(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._last_frame = max(self._last_frame, time.monotonic())
        self._wake()

    async def _take(self, ended: _Ended) -> bool:
        """Store one turn and start its run; whether it was handed to the relay."""
        turn = self._turn_count + 1
        parts: list[cpb.ContentPart] = []
        audio_ms = 0
        if ended.audio is not None:
            audio_ms = pcm.duration_ms(len(ended.audio), self._rate)
            recording_rate = min(self._rate, RECORDING_MAX_RATE)
            wav = pcm.to_wav(pcm.resample(ended.audio, self._rate, recording_rate), recording_rate)
            text = await self._transcribe(wav, turn, wrapped=True)
            if not text:
                await self._put(mapping.event(pb.TALK_EVENT_KIND_TURN_EMPTY, turn))
                return False
            parts = [
                cpb.ContentPart(text=text),
                cpb.ContentPart(
                    file=cpb.FileReference(
                        inline_data=wav, mime_type="audio/wav", display_name=f"turn-{turn}.wav"
                    )
                ),
            ]
        else:
            text = ended.text
            parts = [cpb.ContentPart(text=text)]
        metadata = struct_pb2.Struct()
        metadata.update({"voice": {"session": self._name, "turn": turn, "audio_ms": audio_ms}})
        request = pb.SendMessageRequest(
            conversation=self._conversation,
            message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=parts, metadata=metadata),
            assistant=self._settings.assistant,
            concurrency_policy=self._settings.concurrency_policy,
            speech=pb.SpeechOptions(speak=True, output_format=self._settings.output_format),
        )
        await self._hold.confirm()
        # The message and its turn row are stored together as far as this stream goes: a
        # drop that cancelled the worker between the two would leave a message the
        # session does not count, and the client's resend would store it twice. So the
        # pair finishes even when the stream is gone, and a replay of the same turn of
        # the same session (two streams at once) is the same request.
        request.request_id = f"talk-{self._record.id}-{turn}"
        work = asyncio.ensure_future(self._store_turn(request, turn, text, audio_ms))
        work.add_done_callback(_observed)
        stored = await asyncio.shield(work)
        self._turn_count = turn
        self._relays.put_nowait(_Owed(turn, mapping.transcript(stored), stored.run, 0))
        return True

    async def _store_turn(
        self, request: pb.SendMessageRequest, turn: int, text: str, audio_ms: int
    ) -> TurnRecord:
        sent = await self._actions.send_message(self._principal, request)
        recording = next(
            (part.file.file for part in sent.message.parts if part.WhichOneof("part") == "file"),
            "",
        )
        stored = TurnRecord(
            session_id=self._record.id,
            turn=turn,
            message=sent.message.name,
            run=sent.run.name,
            recording=recording,
            transcript=text,
            audio_ms=audio_ms,
            created_at=names.now(),
        )
        await self._store.add_turn(stored, self._talks.expiry())
        return stored

    async def _transcribe(self, audio: bytes, turn: int, *, wrapped: bool = False) -> str:
        wav = audio if wrapped else pcm.to_wav(audio, self._rate)
        model, language = self._speech.transcribing(self._voice)
        text = await self._speech.engine.transcribe(
            wav, media_type="audio/wav", filename=f"turn-{turn}.wav", model=model, language=language
        )
        return text.strip()

    # -- the relay -------------------------------------------------------------------------

    async def _relay(self) -> None:
        while True:
            owed = await self._relays.get()
            if owed is None:
                return
            try:
                await self._follow(owed)
            except SwitchboardError as exc:
                if self._grant.error is None and self._hold.error is None:
                    await self._put(mapping.error(exc))
            except Exception:
                log.exception("a voice session's relay failed")
                self._fail(InternalError("relaying the run failed on the server"))
                return
            finally:
                self._current = None
                self._turn_done()

    async def _follow(self, owed: _Owed) -> None:
        if owed.transcript is not None:
            await self._put(
                pb.TalkResponse(sequence=mapping.sequence(owed.turn), transcript=owed.transcript)
            )
        self._current = (owed.turn, owed.run)
        async for update in self._hold.guard(self._actions.watch(owed.run, owed.after)):
            if update is None:
                continue  # the session has its own heartbeat
            if update.WhichOneof("update") == "speech" and owed.run in self._interrupted:
                continue
            await self._put(
                pb.TalkResponse(
                    sequence=mapping.sequence(owed.turn, update.sequence), update=update
                )
            )


def _observed(task: asyncio.Future[TurnRecord]) -> None:
    """Reads the outcome of a turn's storing whose stream went away meanwhile, so a
    failure nobody waits for any more is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()
