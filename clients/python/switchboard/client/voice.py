"""Voice sessions: ``DispatcherService.Talk`` held open across dropped connections.

``Client.talk`` opens a session on a conversation; the application sends audio
(16-bit PCM at the session's input rate) and controls, and iterates over what
the server sends: transcripts, the runs' updates (text deltas, synthesized
``speech``), events and per-turn errors (docs/voice.md, "Clients and browsers")::

    async with client.talk(conversation, assistant=assistant) as talk:
        await talk.send_audio(pcm)        # split into frames under the server's limit
        await talk.end_turn()
        reply = await talk.reply()        # the turn's transcript, the answer's text and speech

The server numbers the frames a resume replays: a turn's final transcript is
``turn << 40``, its run's updates ``turn << 40`` plus the run's own update
sequence; the others are 0. The session remembers the last numbered frame it
received; when the stream drops (UNAVAILABLE, a reset, a proxy's idle timeout,
silence longer than the policy's idle timeout) it reopens the call with
``TalkResume(session, after_sequence)`` after a capped exponential backoff, and
drops any replayed frame at or before that position: the application sees no
numbered frame twice and none lost. Frames the server does not number (partial
transcripts, events, heartbeats) are not replayed.

The server discards a turn the user was still speaking when the connection
dropped, and never sees one whose frames were still in flight. The session
keeps the audio (or text) of every turn until the server has answered it (its
final transcript, ``TURN_EMPTY``, or an ``error`` frame), so after a resume it
knows which turns the server lacks (``VoiceSession.turn_count``): it sends them
again on the resumed call before anything else (``resend_lost``, the default)
and reports them (``lost_turns``, ``on_resume``, and a ``session`` frame
delivered after each resume); without ``resend_lost``, ``resend`` sends one.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import io
import logging
import sys
import time
import wave
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NoReturn, Self, TypeAlias

import grpc

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.client.errors import (
    ResourceExhausted,
    SessionEnded,
    SignedOut,
    SwitchboardError,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
    from_status,
)
from switchboard.client.runs import TERMINAL, AnswerBuilder
from switchboard.client.session import TokenKeeper
from switchboard.client.transport.affinity import AFFINITY_HEADER, affinity
from switchboard.client.transport.streams import EOF, StreamPolicy, resumable

if TYPE_CHECKING:
    from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc

log = logging.getLogger("switchboard.client")

#: The largest audio frame the server takes by default (SWITCHBOARD_VOICE_MAX_FRAME_BYTES).
MAX_FRAME_BYTES: Final = 64 * 1024
#: The sample rates a voice stream may have.
RATES: Final = frozenset({8_000, 16_000, 24_000, 48_000})
SAMPLE_BYTES: Final = 2
#: A turn's frames are numbered from ``turn << TURN_BITS`` (TalkResponse.sequence).
TURN_BITS: Final = 40
#: Frames received and not yet taken by the application; beyond it the
#: application is not reading and the session fails rather than grow.
MAX_BUFFERED_FRAMES: Final = 10_000
#: Audio kept per unanswered turn, to report (and resend) it after a drop: ten
#: minutes at 48 kHz, past the server's longest turn (SWITCHBOARD_VOICE_MAX_TURN_S
#: is at most 600 s).
MAX_TURN_BYTES: Final = 600 * 48_000 * SAMPLE_BYTES
#: How long leaving a session waits for the server to close it after END_SESSION.
CLOSE_GRACE_S: Final = 2.0
#: Unanswered turns kept; the oldest are forgotten beyond it.
MAX_PENDING_TURNS: Final = 64

Detection: TypeAlias = dispatcher_pb2.TurnDetection.ValueType
#: A turn detection: the enum, or its name (``"client"``, ``"SERVER_VAD"``).
TurnDetectionLike: TypeAlias = dispatcher_pb2.TurnDetection.ValueType | str
#: The end-of-turn detector and its eagerness (docs/voice.md), as the enum or its name.
TurnDetectorLike: TypeAlias = dispatcher_pb2.TurnDetector.ValueType | str
TurnEagernessLike: TypeAlias = dispatcher_pb2.TurnEagerness.ValueType | str

_Frame = dispatcher_pb2.TalkResponse


def turn_of(sequence: int) -> int:
    """The turn a numbered frame belongs to (0 for an unnumbered frame)."""
    return sequence >> TURN_BITS


# -- PCM and WAV ---------------------------------------------------------------------------


def _samples(pcm: bytes) -> array.array[int]:
    samples = array.array("h")
    samples.frombytes(pcm[: len(pcm) - len(pcm) % SAMPLE_BYTES])
    if sys.byteorder == "big":  # pragma: no cover - PCM16 on the wire is little-endian
        samples.byteswap()
    return samples


def _pcm(samples: array.array[int]) -> bytes:
    if sys.byteorder == "big":  # pragma: no cover
        samples.byteswap()
    return samples.tobytes()


def resample(pcm: bytes, rate: int, target: int) -> bytes:
    """Mono PCM16 at ``rate`` converted to ``target`` Hz by linear interpolation
    (enough for speech, for recognition and playback alike)."""
    if rate <= 0 or target <= 0:
        raise ValueError("sample rates must be positive")
    if rate == target or not pcm:
        return pcm[: len(pcm) - len(pcm) % SAMPLE_BYTES]
    samples = _samples(pcm)
    count = len(samples) * target // rate
    step = rate / target
    last = len(samples) - 1
    out = array.array("h", bytes(SAMPLE_BYTES * count))
    for index in range(count):
        position = index * step
        left = int(position)
        right = left + 1 if left < last else last
        out[index] = int(samples[left] + (samples[right] - samples[left]) * (position - left))
    return _pcm(out)


def pcm_from_wav(data: bytes, rate: int | None = None) -> tuple[bytes, int]:
    """The mono PCM16 samples of a 16-bit PCM WAV (stereo mixed down) and their
    rate; converted to ``rate`` first if given (a session takes only ``RATES``).
    Raises ``ValueError`` for anything that is not a 16-bit PCM WAV."""
    try:
        with wave.open(io.BytesIO(data), "rb") as audio:
            channels, width, found = (
                audio.getnchannels(),
                audio.getsampwidth(),
                audio.getframerate(),
            )
            frames = audio.readframes(audio.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"not a PCM WAV: {exc}") from None
    if width != SAMPLE_BYTES or channels not in (1, 2):
        raise ValueError(f"not 16-bit mono or stereo PCM: {width * 8}-bit, {channels} channels")
    pcm = frames[: len(frames) - len(frames) % (SAMPLE_BYTES * channels)]
    if channels == 2:
        both = _samples(pcm)
        pcm = _pcm(
            array.array("h", ((a + b) // 2 for a, b in zip(both[::2], both[1::2], strict=False)))
        )
    if rate is not None and rate != found:
        return resample(pcm, found, rate), rate
    return pcm, found


def pcm_to_wav(pcm: bytes, rate: int) -> bytes:
    """``pcm`` (mono PCM16 at ``rate``) as a WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(SAMPLE_BYTES)
        audio.setframerate(rate)
        audio.writeframes(pcm[: len(pcm) - len(pcm) % SAMPLE_BYTES])
    return out.getvalue()


def frames_of(pcm: bytes, limit: int = MAX_FRAME_BYTES) -> list[bytes]:
    """``pcm`` cut into audio frames of at most ``limit`` bytes, each of whole samples."""
    size = limit - limit % SAMPLE_BYTES
    if size <= 0:
        raise ValueError(f"a frame limit of {limit} bytes holds no sample")
    return [pcm[at : at + size] for at in range(0, len(pcm), size)]


# -- what a turn came to ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One turn and its answer: what the user said, what the assistant wrote and spoke.

    ``run`` is the run as it ended (None for an empty turn: no words, nothing
    stored); it may have ended CANCELLED or SUPERSEDED (barge-in, an interrupt),
    then ``interrupted`` is set and ``speech`` holds what was sent before it.
    """

    turn: int
    transcript: str
    message: str
    recording: str
    run: dispatcher_pb2.Run | None
    text: str
    speech: bytes
    rate_hz: int
    interrupted: bool = False

    @property
    def empty(self) -> bool:
        """The turn had no words and was dropped (``TURN_EMPTY``)."""
        return self.run is None

    @property
    def succeeded(self) -> bool:
        return self.run is not None and self.run.state == dispatcher_pb2.RUN_STATE_SUCCEEDED

    @property
    def speech_ms(self) -> int:
        return len(self.speech) * 1000 // (SAMPLE_BYTES * self.rate_hz) if self.rate_hz else 0

    def wav(self) -> bytes:
        """The answer's speech as a WAV file."""
        return pcm_to_wav(self.speech, self.rate_hz)


class ReplyBuilder:
    """Assembles one turn's ``Reply`` from the session's frames (pure, no I/O).

    The turn is the first whose final transcript (or ``TURN_EMPTY``) it is given,
    unless constructed with one. Updates belong to it by their frame number
    (``turn << 40`` + the run's sequence); speech is joined in order.
    """

    def __init__(self, turn: int = 0, *, rate_hz: int = 24_000) -> None:
        self.turn = turn
        self._rate_hz = rate_hz
        self._transcript: dispatcher_pb2.Transcript | None = None
        self._answer = AnswerBuilder()
        self._speech = bytearray()
        self._interrupted = False
        self.reply: Reply | None = None

    def add(self, frame: _Frame) -> Reply | None:
        """Take a frame; the reply once the turn's answer is over."""
        if self.reply is not None:
            return self.reply
        kind = frame.WhichOneof("frame")
        if kind == "transcript" and frame.transcript.final:
            if self._transcript is None and self.turn in (0, frame.transcript.turn):
                self.turn = frame.transcript.turn
                self._transcript = frame.transcript
        elif kind == "event":
            event = frame.event
            if event.turn == self.turn or (self.turn == 0 and self._transcript is None):
                if event.kind == dispatcher_pb2.TALK_EVENT_KIND_TURN_EMPTY:
                    self.turn = event.turn
                    self.reply = self._build(None)
                elif event.kind == dispatcher_pb2.TALK_EVENT_KIND_SPEECH_INTERRUPTED:
                    self._interrupted = self._transcript is not None
        elif kind == "update" and self._transcript is not None:
            if turn_of(frame.sequence) != self.turn:
                return None
            update = frame.update
            self._answer.add(update)
            if update.WhichOneof("update") == "speech":
                self._speech += update.speech.audio
                if update.speech.format.sample_rate_hz:
                    self._rate_hz = update.speech.format.sample_rate_hz
            elif (
                update.WhichOneof("update") == "state_change"
                and update.state_change.run.state in TERMINAL
            ):
                self.reply = self._build(update.state_change.run)
        return self.reply

    def _build(self, run: dispatcher_pb2.Run | None) -> Reply:
        transcript = self._transcript or dispatcher_pb2.Transcript(turn=self.turn)
        cancelled = run is not None and run.state == dispatcher_pb2.RUN_STATE_CANCELLED
        return Reply(
            turn=self.turn,
            transcript=transcript.text,
            message=transcript.message,
            recording=transcript.recording,
            run=run,
            text=self._answer.text,
            speech=bytes(self._speech),
            rate_hz=self._rate_hz,
            interrupted=self._interrupted or cancelled,
        )


# -- what a session owes the user after a drop ----------------------------------------------


@dataclass(frozen=True)
class LostTurn:
    """A turn the server did not have when the session resumed.

    ``audio`` is what was sent of it (``truncated`` if longer than the session
    keeps), ``text`` a typed turn's text; ``ended`` whether its end had been sent
    (else the user was still speaking when the connection dropped). ``resent``:
    the session sent it again on the resumed call by itself (``resend_lost``);
    otherwise ``TalkSession.resend`` does.
    """

    audio: bytes
    text: str
    ended: bool
    truncated: bool = False
    resent: bool = False


@dataclass(frozen=True)
class Resumed:
    """A resume that happened: the session as the server resumed it, the position
    it continued after, and the turns the server did not have."""

    session: dispatcher_pb2.VoiceSession
    after_sequence: int
    lost: tuple[LostTurn, ...]


@dataclass
class _Turn:
    audio: bytearray = field(default_factory=bytearray)
    text: str = ""
    ended: bool = False
    #: Server turn detection heard speech in it (else it is silence, not a turn).
    heard: bool = False
    truncated: bool = False

    def lost(self, *, resent: bool) -> LostTurn:
        return LostTurn(bytes(self.audio), self.text, self.ended, self.truncated, resent)


class Ledger:
    """A session's position and its user's unanswered turns (pure, no I/O).

    ``received`` is the last numbered frame taken in; a frame numbered at or
    before it is a replay and is dropped. A turn is kept from the moment it is
    sent until the server answers it: its final transcript, a ``TURN_EMPTY``
    event, or an ``error`` frame (the server answers the turns it takes in the
    order they ended, one answer each). ``resumed`` then tells, from the session
    the server resumed, which of them it does not have: it has taken
    ``turn_count`` turns, of which ``answered`` had their final transcript, so
    the oldest ``turn_count - answered`` unanswered turns are still coming and
    the rest are lost. (Counts, not the events' turn numbers: those are the
    number a turn would get, which an empty turn gives up to the next one.)

    With server turn detection the client does not end turns itself: a turn is
    the audio since the previous one ended, heard as speech once the detector
    reports ``SPEECH_STARTED``, and ended at ``SPEECH_STOPPED``; audio in which
    no speech was heard is not a turn and is never reported lost.
    """

    def __init__(
        self,
        detection: Detection,
        *,
        after_sequence: int = 0,
        turn_count: int = 0,
        max_turn_bytes: int = MAX_TURN_BYTES,
    ) -> None:
        self.detection = detection
        self.received = after_sequence
        #: The highest turn whose final transcript came (or taken, at the start).
        self.answered = turn_count
        self._max_turn_bytes = max_turn_bytes
        self.open: _Turn | None = None
        self.pending: deque[_Turn] = deque()

    @property
    def client_turns(self) -> bool:
        return self.detection == dispatcher_pb2.TURN_DETECTION_CLIENT

    @property
    def unanswered(self) -> int:
        """Turns sent and not answered yet (the open one included)."""
        return len(self.pending) + (1 if self.open is not None else 0)

    # -- what the application sends --

    def audio(self, pcm: bytes) -> None:
        if self.open is None:
            if self.client_turns:
                return  # outside a turn the server ignores audio: nothing to lose
            self.open = _Turn()
        turn = self.open
        room = self._max_turn_bytes - len(turn.audio)
        if len(pcm) > room:
            turn.truncated = True
        turn.audio += pcm[: max(room, 0)]

    def start_turn(self) -> None:
        if self.open is None:
            self.open = _Turn()
        self.open.heard = True

    def end_turn(self) -> None:
        # Every end is answered once (a turn, or TURN_EMPTY when nothing was open):
        # an end with no turn open is kept too, as an empty turn, to keep the count.
        turn, self.open = self.open, None
        if turn is None or not (turn.heard or self.client_turns):
            turn = _Turn()
        turn.ended = True
        self._remember(turn)

    def text(self, text: str) -> None:
        self._remember(_Turn(text=text, ended=True))

    def _remember(self, turn: _Turn) -> None:
        self.pending.append(turn)
        while len(self.pending) > MAX_PENDING_TURNS:
            self.pending.popleft()

    # -- what the server sends --

    def take(self, frame: _Frame) -> bool:
        """Note ``frame``; whether it is new (False: a replay of a numbered frame)."""
        if frame.sequence:
            if frame.sequence <= self.received:
                return False
            self.received = frame.sequence
        kind = frame.WhichOneof("frame")
        if kind == "transcript" and frame.transcript.final:
            self.answered = max(self.answered, frame.transcript.turn)
            self._answer_one()
        elif kind == "error":
            self._answer_one()
        elif kind == "event":
            event = frame.event.kind
            if event == dispatcher_pb2.TALK_EVENT_KIND_TURN_EMPTY:
                self._answer_one()
            elif event == dispatcher_pb2.TALK_EVENT_KIND_SPEECH_STARTED:
                if self.open is None:
                    self.open = _Turn()
                self.open.heard = True
            elif event == dispatcher_pb2.TALK_EVENT_KIND_SPEECH_STOPPED:
                # The detector ended the turn: the server's now, awaiting its answer.
                self.end_turn()
        return True

    def _answer_one(self) -> None:
        if self.pending:
            self.pending.popleft()

    def resumed(self, session: dispatcher_pb2.VoiceSession) -> list[_Turn]:
        """The session continues as ``session``: the turns it does not have, in the
        order they were sent, taken out of the ledger (``restore`` puts back those
        sent again). The open turn, if any, is always among them: the server
        discards the turn being spoken when the connection drops."""
        coming = max(session.turn_count - self.answered, 0)
        turns = list(self.pending)
        self.pending = deque(turns[:coming])
        # An end with nothing before it is no turn to resend.
        lost = [turn for turn in turns[coming:] if turn.audio or turn.text]
        speaking, self.open = self.open, None
        if speaking is not None and (speaking.heard or self.client_turns):
            lost.append(speaking)
        return lost

    def restore(self, turns: list[_Turn]) -> None:
        """``turns`` (from ``resumed``) were sent again, in order: unanswered again."""
        for turn in turns:
            if turn.ended:
                self._remember(turn)
            else:
                self.open = turn


def turn_requests(turn: _Turn, frame_bytes: int) -> list[dispatcher_pb2.TalkRequest]:
    """The frames that send ``turn`` again: its text, or start, audio and (if it had
    ended) end."""
    if turn.text:
        return [dispatcher_pb2.TalkRequest(text=turn.text)]
    requests = [_control_request(dispatcher_pb2.TALK_ACTION_START_TURN)]
    requests += [
        dispatcher_pb2.TalkRequest(audio=dispatcher_pb2.AudioChunk(data=chunk))
        for chunk in frames_of(bytes(turn.audio), frame_bytes)
    ]
    if turn.ended:
        requests.append(_control_request(dispatcher_pb2.TALK_ACTION_END_TURN))
    return requests


def _control_request(
    action: dispatcher_pb2.TalkAction.ValueType, heard_through: int = 0
) -> dispatcher_pb2.TalkRequest:
    return dispatcher_pb2.TalkRequest(
        control=dispatcher_pb2.TalkControl(action=action, heard_through_sequence=heard_through)
    )


# -- the session ---------------------------------------------------------------------------


class _Closed:
    """The end of the frames: ``error`` raised to the reader, or a clean end."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class _EndedMeanwhile(Exception):
    """The session ended as the application asked while the connection was down."""


#: Hears of each resume, on the session's reader once writers may go on again: it may
#: send (``resend``), and should not wait long (nothing is read meanwhile).
OnResume = Callable[[Resumed], Awaitable[None] | None]


class TalkSession:
    """A voice session: send audio and controls, iterate over the server's frames.

    Use it as an async context manager (``Client.talk``): it is open inside, and
    leaving it sends ``END_SESSION`` and cancels the call (``end`` instead lets
    the server finish what it owes). Iterating yields ``TalkResponse`` frames:
    transcripts, run updates, events, per-turn ``error`` statuses, and a
    ``session`` frame after each resume (``lost_turns`` then says what the server
    did not have). Heartbeats are not yielded, nor the first ``session`` frame
    (it is ``session``). An error that ends the session (the server's status, a
    resume refused: ``SessionEnded`` past the window) is raised by the
    iteration, and by the sending methods after it.
    """

    def __init__(
        self,
        stub: dispatcher_pb2_grpc.DispatcherServiceAsyncStub,
        keeper: TokenKeeper,
        *,
        start: dispatcher_pb2.TalkStart | None = None,
        resume: dispatcher_pb2.TalkResume | None = None,
        turn_detection: TurnDetectionLike = dispatcher_pb2.TURN_DETECTION_UNSPECIFIED,
        policy: StreamPolicy | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        resend_lost: bool = True,
        on_resume: OnResume | None = None,
        max_buffered_frames: int = MAX_BUFFERED_FRAMES,
    ) -> None:
        if (start is None) == (resume is None):
            raise ValueError("a session is either started or resumed")
        if max_frame_bytes < SAMPLE_BYTES:
            raise ValueError("max_frame_bytes must hold a sample")
        self._stub = stub
        self._keeper = keeper
        self._start = start or dispatcher_pb2.TalkStart()
        self._policy = policy or StreamPolicy()
        self._max_frame_bytes = max_frame_bytes
        self._resend_lost = resend_lost
        self._on_resume = on_resume
        self._max_buffered = max_buffered_frames
        detection = start.turn_detection if start is not None else detection_of(turn_detection)
        self.ledger = Ledger(
            detection or dispatcher_pb2.TURN_DETECTION_SERVER_VAD,
            after_sequence=resume.after_sequence if resume is not None else 0,
        )
        #: The session's resource name (``.../voiceSessions/{s}``), once open.
        self.name = resume.session if resume is not None else ""
        #: The session as the server last described it (at the start or a resume).
        self.session = dispatcher_pb2.VoiceSession()
        #: The last numbered frame handed to the application.
        self.last_sequence = self.ledger.received
        #: Calls opened after the first one (each drop resumed).
        self.resumes = 0
        #: The turns resumes found the server without, oldest first.
        self.lost_turns: list[LostTurn] = []
        #: The error that broke the stream last (resumed from, or raised).
        self.last_error: SwitchboardError | None = None
        self._call: Any = None
        self._generation = 0
        self._connected = asyncio.Event()
        self._frames: asyncio.Queue[_Frame | _Closed] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._ending = False  # END_SESSION sent: the server is finishing
        self._failure: BaseException | None = None
        self._finished = False  # the application has seen the end
        self._failures = 0
        self._failing_since: float | None = None
        self._used = ""
        self._reauthenticated = False

    # -- opening and closing --

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Start (or resume) the session; returns once the server sent the session."""
        if self._pump is not None:
            return
        while True:
            try:
                await self._connect()
                break
            except SwitchboardError as error:
                await self._recover_from(error)
        self._pump = asyncio.create_task(self._run(), name=f"talk {self.name}")

    async def aclose(self) -> None:
        """End the session: ``END_SESSION`` if it is still open, a moment
        (``CLOSE_GRACE_S``) for the server to close, then the call is cancelled and
        what the server still sends is dropped."""
        pump = self._pump
        if pump is not None and not pump.done():
            with contextlib.suppress(SwitchboardError, grpc.RpcError, TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE_S):
                    if self._failure is None and not self._ending:
                        await self.end()
                    await asyncio.wait({pump})
        if self._failure is None:
            self._failure = SessionEnded("the voice session was closed by the application")
        self._pump = None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        self._drop()
        self._frames.put_nowait(_Closed(None))

    # -- sending --

    async def send_audio(self, pcm: bytes) -> None:
        """Send audio of the user's turn, in frames of at most the server's limit.

        With client turn detection, audio outside ``start_turn`` ... ``end_turn``
        is ignored by the server. While the stream is resuming this waits.
        """
        if len(pcm) % SAMPLE_BYTES:
            raise ValueError("PCM16 audio is whole 2-byte samples")
        for chunk in frames_of(pcm, self._max_frame_bytes):
            request = dispatcher_pb2.TalkRequest(audio=dispatcher_pb2.AudioChunk(data=chunk))
            await self._write(request, partial(self.ledger.audio, chunk))

    async def start_turn(self) -> None:
        """The user starts speaking (needed with client turn detection)."""
        await self._write(
            _control_request(dispatcher_pb2.TALK_ACTION_START_TURN), self.ledger.start_turn
        )

    async def end_turn(self) -> None:
        """The user's turn is over: the server transcribes, stores and answers it."""
        await self._write(
            _control_request(dispatcher_pb2.TALK_ACTION_END_TURN), self.ledger.end_turn
        )

    async def interrupt(self, heard_through_sequence: int = 0) -> None:
        """Stop the assistant's speech now and cancel its run. ``heard_through_sequence``:
        the sequence of the last ``speech`` frame the user heard (0: the last one
        sent); the stored answer marks the text after it unspoken."""
        request = _control_request(dispatcher_pb2.TALK_ACTION_INTERRUPT, heard_through_sequence)
        await self._write(request, None)

    async def say(self, text: str) -> None:
        """A typed turn: stored and answered like a spoken one."""
        if not text:
            raise ValueError("say() needs text")
        await self._write(dispatcher_pb2.TalkRequest(text=text), partial(self.ledger.text, text))

    async def resend(self, lost: LostTurn) -> None:
        """Send a turn a resume found lost again (one of ``lost_turns`` not ``resent``)."""
        if lost.text:
            await self.say(lost.text)
            return
        await self.start_turn()
        await self.send_audio(lost.audio)
        if lost.ended:
            await self.end_turn()

    async def end(self) -> None:
        """End the session: the server finishes sending what it owes and closes;
        iteration ends after it (keep iterating, or call ``reply``, to receive it)."""
        if self._ending:
            return
        await self._write(_control_request(dispatcher_pb2.TALK_ACTION_END_SESSION), None)
        self._ending = True
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError, AttributeError):
            await self._call.done_writing()

    async def _write(
        self, request: dispatcher_pb2.TalkRequest, note: Callable[[], None] | None
    ) -> None:
        """Write on the current call, one writer at a time (frames stay in order).

        What a turn is made of is noted in the ledger before it is written: if the
        call breaks under the write, the resume finds the turn missing and resends
        (or reports) it, so it is not written again here. A control that is not
        part of a turn (interrupt, end) is written again on the resumed call.
        """
        async with self._write_lock:
            while True:
                if self._ending:
                    raise SessionEnded("the voice session was ended (end() was called)")
                await self._wait_connected()
                call, generation = self._call, self._generation
                if note is not None:
                    note()
                try:
                    await call.write(request)
                    return
                except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                    log.debug("voice session %s: a write failed (%s)", self.name, exc)
                await self._wait_past(generation)
                if note is not None:
                    return

    async def _wait_connected(self) -> None:
        while True:
            if self._failure is not None:
                raise self._failure
            if self._connected.is_set():
                return
            waiter = asyncio.ensure_future(self._connected.wait())
            waits: set[asyncio.Future[Any]] = {waiter}
            if self._pump is not None:
                waits.add(self._pump)
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    async def _wait_past(self, generation: int) -> None:
        """Until a call newer than ``generation`` is open (or the session is over).
        The reader finds the broken call by itself: a call a write fails on has ended."""
        if self._generation == generation:
            self._connected.clear()
        while self._generation == generation:
            await self._wait_connected()

    # -- receiving --

    def __aiter__(self) -> AsyncIterator[_Frame]:
        return self

    async def __anext__(self) -> _Frame:
        if self._finished:
            raise StopAsyncIteration
        if self._pump is None and self._frames.empty():
            raise RuntimeError("open the session first (async with client.talk(...))")
        item = await self._frames.get()
        if isinstance(item, _Closed):
            self._finished = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        if item.sequence:
            self.last_sequence = item.sequence
        return item

    async def reply(self, *, on_frame: Callable[[_Frame], None] | None = None) -> Reply:
        """Read frames until the next turn's answer is over: the transcript, the
        answer's text and speech (``on_frame`` sees every frame on the way). An
        ``error`` frame (the turn failed: the speech endpoint refused it, ...) is
        raised as its typed error; the session stays open."""
        builder = ReplyBuilder(rate_hz=self.session.output_format.sample_rate_hz or 24_000)
        async for frame in self:
            if on_frame is not None:
                on_frame(frame)
            if frame.WhichOneof("frame") == "error":
                raise from_status(frame.error)
            done = builder.add(frame)
            if done is not None:
                return done
        raise SessionEnded("the voice session ended before the turn's answer did")

    # -- the reader: one call after another --

    async def _connect(self) -> None:
        """Open a call, send start or resume, read the session frame; after a resume,
        send the turns the server lacks again (before any other writer goes on)."""
        self._used = await self._keeper.bearer()
        metadata = (("authorization", f"Bearer {self._used}"),) if self._used else ()
        # Its requests come after it opens: the routing header is ours to add.
        if key := affinity(self.name or self._start.conversation):
            metadata = (*metadata, (AFFINITY_HEADER, key))
        resuming = bool(self.name)
        call = self._stub.Talk(None, metadata=metadata)
        lost: list[_Turn] = []
        try:
            session = await self._handshake(call)
            if resuming:
                lost = self.ledger.resumed(session)
                await self._catch_up(call, lost)
        except TimeoutError:
            call.cancel()
            raise Unavailable("no session frame from the server") from None
        except grpc.RpcError as raw:
            call.cancel()
            raise from_rpc_error(raw) from None
        except asyncio.InvalidStateError:
            call.cancel()
            raise Unavailable("the voice session's call ended while it began") from None
        except BaseException:
            call.cancel()
            raise
        self.session = session
        self.name = session.name
        self._call = call
        self._generation += 1
        self._failures = 0
        self._failing_since = None
        self._reauthenticated = False
        if not resuming:
            self.ledger.answered = session.turn_count
            self._connected.set()
            return
        self.resumes += 1
        reported = tuple(turn.lost(resent=self._resend_lost) for turn in lost)
        self.lost_turns += reported
        self._deliver(dispatcher_pb2.TalkResponse(session=session))
        self._connected.set()
        if self._on_resume is not None:
            # On the reader, once writers may go on: it may send (resend), not wait long.
            outcome = self._on_resume(Resumed(session, self.ledger.received, reported))
            if outcome is not None:
                await outcome

    async def _handshake(self, call: Any) -> dispatcher_pb2.VoiceSession:
        """Send the first frame (start, or resume after the last numbered frame) and
        read the session the server answers with."""
        if self.name:
            resume = dispatcher_pb2.TalkResume(
                session=self.name, after_sequence=self.ledger.received
            )
            first = dispatcher_pb2.TalkRequest(resume=resume)
        else:
            first = dispatcher_pb2.TalkRequest(start=self._start)
        await call.write(first)
        async with asyncio.timeout(self._policy.idle_timeout_s):
            frame = await call.read()
        if frame is EOF:
            _no_session("the voice session's stream ended before it began")
        if frame.WhichOneof("frame") != "session":
            _no_session(f"the session began with a {frame.WhichOneof('frame')} frame")
        session: dispatcher_pb2.VoiceSession = frame.session
        return session

    async def _catch_up(self, call: Any, lost: list[_Turn]) -> None:
        """On a resumed call: the lost turns again (``resend_lost``), and END_SESSION
        again if it was sent (it may not have reached the broken call)."""
        if self._resend_lost:
            for turn in lost:
                for request in turn_requests(turn, self._max_frame_bytes):
                    await call.write(request)
            self.ledger.restore(lost)
        if self._ending:
            await call.write(_control_request(dispatcher_pb2.TALK_ACTION_END_SESSION))
            await call.done_writing()

    async def _run(self) -> None:
        outcome: BaseException | None = None
        try:
            while True:
                error = await self._read_call()
                if error is None:
                    break
                self._drop()
                while True:
                    await self._recover_from(error)
                    try:
                        await self._connect()
                        break
                    except SwitchboardError as again:
                        error = again
        except asyncio.CancelledError:
            raise
        except _EndedMeanwhile:
            outcome = None
        except Exception as exc:  # noqa: BLE001 - handed to the application, not lost
            outcome = exc
        self._connected.clear()
        if self._failure is None:
            self._failure = outcome or SessionEnded("the voice session has ended")
        self._frames.put_nowait(_Closed(outcome))

    async def _read_call(self) -> SwitchboardError | None:
        """Read the current call to its end: None when it ended as asked (after
        ``end``), else why it broke."""
        call = self._call
        while True:
            try:
                async with asyncio.timeout(self._policy.idle_timeout_s):
                    frame = await call.read()
            except TimeoutError:
                return Unavailable(
                    f"no frame on the voice session for {self._policy.idle_timeout_s:g} s "
                    "(not even a heartbeat)"
                )
            except grpc.RpcError as raw:
                return from_rpc_error(raw)
            if frame is EOF:
                # Status OK (grpc.aio raises on any other): ended as asked, or early
                # (a replica draining for shutdown, a proxy's limit): resumed then.
                if self._ending:
                    return None
                return Unavailable("the voice session's stream ended early")
            self._failures = 0
            self._failing_since = None
            if self.ledger.take(frame) and frame.WhichOneof("frame") not in (
                "heartbeat",
                "session",
            ):
                self._deliver(frame)

    def _deliver(self, frame: _Frame) -> None:
        if self._frames.qsize() >= self._max_buffered:
            raise ResourceExhausted(
                f"{self._max_buffered} frames of the voice session wait to be read: "
                "iterate over the session (or call reply()) while it is open"
            )
        self._frames.put_nowait(frame)

    async def _recover_from(self, error: SwitchboardError) -> None:
        """Wait before trying again after ``error``, or raise it if it ends the session."""
        self.last_error = error
        if isinstance(error, SessionEnded) and self._ending:
            raise _EndedMeanwhile from None
        if isinstance(error, SignedOut):
            raise error
        if isinstance(error, Unauthenticated) and self._used and self._keeper.kind == "session":
            if self._reauthenticated:
                raise await self._keeper.refused_again(self._used, error)
            # A stream ends when its access token expires: renew it and resume at once.
            self._reauthenticated = True
            await self._keeper.rejected(self._used, error)
            return
        if not resumable(error):
            raise error
        if not self.name and error.domain:
            # Not started, and the server said why: starting again would not help.
            raise error
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        give_up = self._policy.give_up_after_s
        if give_up is not None and now - self._failing_since >= give_up:
            raise error
        delay = self._policy.backoff.delay(self._failures, at_least_s=error.retry_delay_s)
        self._failures += 1
        log.info("voice session %s broke (%s); resuming in %.2f s", self.name, error, delay)
        await asyncio.sleep(delay)

    def _drop(self) -> None:
        self._connected.clear()
        call, self._call = self._call, None
        if call is not None:
            call.cancel()


def _no_session(why: str) -> NoReturn:
    raise Unavailable(why)


def _named(enum: Any, prefix: str, value: int | str) -> int:
    """An enum's value from itself (as given: the server says if it knows it) or its
    name, with or without ``prefix``, in any case."""
    if isinstance(value, int):
        return value
    name = value.upper()
    return int(enum.Value(name if name.startswith(prefix) else prefix + name))


def detection_of(value: TurnDetectionLike) -> Detection:
    """A ``TurnDetection`` from the enum or its name (``"client"``, ``"SERVER_VAD"``,
    ``"TURN_DETECTION_CLIENT"``)."""
    return Detection(_named(dispatcher_pb2.TurnDetection, "TURN_DETECTION_", value))


def detector_of(value: TurnDetectorLike) -> dispatcher_pb2.TurnDetector.ValueType:
    """A ``TurnDetector`` from the enum or its name (``"smart_turn"``, ``"SILENCE"``,
    ``"TURN_DETECTOR_SMART_TURN"``; ``""``: unset)."""
    found = _named(dispatcher_pb2.TurnDetector, "TURN_DETECTOR_", value or 0)
    return dispatcher_pb2.TurnDetector.ValueType(found)


def eagerness_of(value: TurnEagernessLike) -> dispatcher_pb2.TurnEagerness.ValueType:
    """A ``TurnEagerness`` from the enum or its name (``"high"``, ``"TURN_EAGERNESS_LOW"``;
    ``""``: unset)."""
    found = _named(dispatcher_pb2.TurnEagerness, "TURN_EAGERNESS_", value or 0)
    return dispatcher_pb2.TurnEagerness.ValueType(found)


def talk_start(
    conversation: str,
    *,
    assistant: str = "",
    input_rate_hz: int = 16_000,
    output_rate_hz: int = 24_000,
    turn_detection: TurnDetectionLike = dispatcher_pb2.TURN_DETECTION_SERVER_VAD,
    silence_s: float | None = None,
    barge_in: bool = False,
    partial_transcripts: bool = False,
    concurrency_policy: dispatcher_pb2.ConcurrencyPolicy.ValueType = (
        dispatcher_pb2.CONCURRENCY_POLICY_UNSPECIFIED
    ),
    turn_detector: TurnDetectorLike = dispatcher_pb2.TURN_DETECTOR_UNSPECIFIED,
    turn_eagerness: TurnEagernessLike = dispatcher_pb2.TURN_EAGERNESS_UNSPECIFIED,
    assistant_revision: int = 0,
) -> dispatcher_pb2.TalkStart:
    """The ``TalkStart`` frame of ``Client.talk``'s arguments."""
    for name, rate in (("input_rate_hz", input_rate_hz), ("output_rate_hz", output_rate_hz)):
        if rate not in RATES:
            raise ValueError(f"{name} must be one of {sorted(RATES)}, not {rate}")
    start = dispatcher_pb2.TalkStart(
        conversation=conversation,
        assistant=assistant,
        input_format=dispatcher_pb2.AudioFormat(
            encoding=dispatcher_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=input_rate_hz
        ),
        output_format=dispatcher_pb2.AudioFormat(
            encoding=dispatcher_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=output_rate_hz
        ),
        turn_detection=detection_of(turn_detection),
        barge_in=barge_in,
        partial_transcripts=partial_transcripts,
        concurrency_policy=concurrency_policy,
        turn_detector=detector_of(turn_detector),
        turn_eagerness=eagerness_of(turn_eagerness),
        assistant_revision=assistant_revision,
    )
    if silence_s is not None:
        start.silence.FromNanoseconds(round(silence_s * 1e9))
    return start
