"""What a session hears: the client's frames, into turns.

The **intake** reads the client's frames: audio goes through the detector
(``turns.py``) into the turn being spoken; controls start, end and interrupt;
a typed ``text`` is a turn of its own. With ``SMART_TURN``, a pause in speech
asks the end-of-turn model whether the speaker has finished: the intake waits
for its answer (tens of milliseconds, on the model's own thread; the client's
frames wait in the stream meanwhile), so a turn's end depends on its audio
alone, never on how fast the frames came; a turn it does not end ends at the
session's silence. A turn that ends is queued for the
worker (the backlog, ``flow.py``), so reading (and hearing a barge-in) never
waits on a transcription. While a turn is spoken, **partials** transcribe it
so far, about once a second of new speech, in the background; one still
transcribing when its turn ends is said before the turn's final transcript, or
not at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.talk import mapping
from switchboard.dispatcher.talk.flow import (
    MAX_PENDING_TURNS,
    Backlog,
    Client,
    Errands,
    Outcome,
    Said,
)
from switchboard.dispatcher.talk.outbound import Floor, Outbox
from switchboard.dispatcher.talk.turns import THRESHOLDS, Detector, Heard, Judge, TurnAudio
from switchboard.dispatcher.talk.worker import Transcriber
from switchboard.platform.audio import pcm
from switchboard.platform.errors import (
    FieldViolation,
    InvalidArgument,
    QuotaExceeded,
    SessionEnded,
    SwitchboardError,
)

#: New speech in a turn between two partial transcripts.
PARTIAL_EVERY_MS: Final = 1_000


class Partials:
    """Partial transcripts of the turn being spoken, one at a time.

    A partial still transcribing when its turn ends is not cancelled: it goes with
    the turn (``hand_over``) to the worker, which cancels it once the turn's final
    transcript is known. So a slow recogniser (one busy with the previous turn, or
    a loaded host's) still shows the words before the final transcript replaces them,
    and no partial ever follows its turn's final transcript.
    """

    def __init__(
        self, *, audio: TurnAudio, transcriber: Transcriber, outbox: Outbox, errands: Errands
    ) -> None:
        self._audio = audio
        self._transcriber = transcriber
        self._outbox = outbox
        self._errands = errands
        self._task: asyncio.Task[None] | None = None
        #: The open turn's length at the last partial.
        self._at_ms = 0

    def maybe(self, turn: int) -> None:
        """Start one if the turn grew enough since the last, and none is going."""
        if (
            not self._audio.open
            or (self._task is not None and not self._task.done())
            or self._audio.ms - self._at_ms < PARTIAL_EVERY_MS
        ):
            return
        self._at_ms = self._audio.ms
        self._task = self._errands.spawn(self._send(self._audio.audio(), turn))

    def hand_over(self) -> asyncio.Task[None] | None:
        """The turn ended and goes to the worker: the partial still going, if any, goes
        with it (the worker cancels it when the final transcript is known)."""
        task, self._task = self._task, None
        self._at_ms = 0
        return task if task is not None and not task.done() else None

    def stop(self) -> None:
        """The turn was discarded: no transcript of it is said, partial or final."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._at_ms = 0

    async def _send(self, audio: bytes, turn: int) -> None:
        try:
            text = await self._transcriber.transcribe(audio, turn)
        except SwitchboardError:
            return  # the final transcript says what went wrong, if anything does
        if text:
            await self._outbox.put(
                pb.TalkResponse(
                    transcript=pb.Transcript(
                        turn=turn,
                        text=text,
                        final=False,
                        audio_ms=pcm.duration_ms(len(audio), self._transcriber.rate),
                    )
                )
            )


class Intake:
    """The client's frames: turns for the worker, barge-in for the floor."""

    def __init__(
        self,
        *,
        settings: pb.VoiceSession,
        max_turn_s: float,
        max_frame_bytes: int,
        transcriber: Transcriber,
        client: Client,
        backlog: Backlog,
        floor: Floor,
        outbox: Outbox,
        outcome: Outcome,
        errands: Errands,
        judge: Judge | None = None,
    ) -> None:
        self._client = client
        self._backlog = backlog
        self._floor = floor
        self._outbox = outbox
        self._outcome = outcome
        self._errands = errands
        self._max_frame_bytes = max_frame_bytes
        self._vad = settings.turn_detection == pb.TURN_DETECTION_SERVER_VAD
        self._barge_in = settings.barge_in
        rate = settings.input_format.sample_rate_hz
        needs_detector = self._vad or settings.barge_in
        self._detector = (
            Detector(rate, settings.silence.ToMilliseconds()) if needs_detector else None
        )
        self._audio = TurnAudio(rate, round(max_turn_s * 1000))
        self._rate = rate
        self._judge = (
            judge if self._vad and settings.turn_detector == pb.TURN_DETECTOR_SMART_TURN else None
        )
        self._threshold = THRESHOLDS.get(
            settings.turn_eagerness, THRESHOLDS[pb.TURN_EAGERNESS_MEDIUM]
        )
        #: The model's last probability for the open turn (0: not asked yet).
        self._confidence = 0.0
        self._partials = (
            Partials(audio=self._audio, transcriber=transcriber, outbox=outbox, errands=errands)
            if settings.partial_transcripts
            else None
        )

    async def run(self, frames: AsyncIterator[pb.TalkRequest]) -> None:
        try:
            async for request in frames:
                self._client.last_frame = time.monotonic()
                if self._outcome.stops_intake:
                    break
                try:
                    await self._frame(request)
                except SwitchboardError as exc:
                    self._outcome.fail(exc)
                    break
        finally:
            self._client.reading = False
            if self._audio.open:
                # A turn the client was still speaking is discarded: nothing half-stored.
                self._discard()
            self._backlog.close()
            self._outbox.wake()

    async def _frame(self, request: pb.TalkRequest) -> None:
        kind = request.WhichOneof("frame")
        if self._client.ending:
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
            self._queue(Said(text=request.text))
        elif kind in ("start", "resume"):
            raise InvalidArgument(
                f"{kind} is the first frame only",
                [FieldViolation(kind, "is allowed as the first frame only")],
            )
        else:
            raise InvalidArgument("the frame is empty", [FieldViolation("frame", "is required")])

    async def _audio_frame(self, data: bytes) -> None:
        if len(data) > self._max_frame_bytes:
            raise InvalidArgument(
                f"an audio frame is {len(data)} bytes; the limit is {self._max_frame_bytes}",
                [FieldViolation("audio.data", f"must be at most {self._max_frame_bytes} bytes")],
            )
        if len(data) % pcm.SAMPLE_BYTES:
            raise InvalidArgument(
                "PCM16 audio has an even number of bytes",
                [FieldViolation("audio.data", "must be whole 16-bit samples (an even length)")],
            )
        detector = self._detector
        heard = detector.hear(data) if detector is not None else []
        for change in heard:
            if change is Heard.START:
                await self._speech_began()
        self._audio.add(data)
        if (
            self._vad
            and self._audio.open
            and Heard.STOP in heard
            and detector is not None
            and not detector.speaking
        ):
            await self._speech_stopped(pb.TURN_END_REASON_SILENCE)
        elif (
            heard
            and heard[-1] is Heard.PAUSE
            and self._judge is not None
            and self._audio.open
            and detector is not None
            and await self._finished(self._judge)
        ):
            detector.cut()
            await self._speech_stopped(pb.TURN_END_REASON_MODEL)
        elif self._audio.full:
            if self._vad:
                # Said as the silence's end is: whoever heard SPEECH_STARTED hears why it ended.
                await self._speech_stopped(pb.TURN_END_REASON_MAX_LENGTH)
            else:
                self._end_turn(pb.TURN_END_REASON_MAX_LENGTH)
            if self._vad and detector is not None and detector.speaking:
                # Still speaking at the limit: the rest is the next turn, not lost.
                self._audio.begin(pre_roll=False)
        elif self._partials is not None:
            self._partials.maybe(self._backlog.next_turn)

    async def _finished(self, judge: Judge) -> bool:
        """Whether the model judges the open turn's speaker finished (its probability
        kept for the turn's end, whoever ends it)."""
        probability = await judge.probability(self._audio.audio(), self._rate)
        if probability is None:
            return False  # no model after all: the silence decides
        self._confidence = probability
        return probability >= self._threshold

    async def _speech_stopped(self, reason: pb.TurnEndReason.ValueType) -> None:
        stopped = mapping.event(pb.TALK_EVENT_KIND_SPEECH_STOPPED, self._backlog.next_turn)
        stopped.event.end_reason = reason
        stopped.event.end_confidence = self._confidence
        await self._outbox.put(stopped)
        self._end_turn(reason)

    async def _speech_began(self) -> None:
        if self._barge_in:
            await self._floor.barge_in()
        if self._vad:
            await self._outbox.put(
                mapping.event(pb.TALK_EVENT_KIND_SPEECH_STARTED, self._backlog.next_turn)
            )
            self._audio.begin(pre_roll=True)

    async def _control(self, control: pb.TalkControl) -> None:
        action = control.action
        if action == pb.TALK_ACTION_START_TURN:
            self._audio.begin(pre_roll=False)
        elif action == pb.TALK_ACTION_END_TURN:
            if self._audio.open:
                self._end_turn(pb.TURN_END_REASON_CLIENT)
            else:
                await self._outbox.put(
                    mapping.event(pb.TALK_EVENT_KIND_TURN_EMPTY, self._backlog.next_turn)
                )
        elif action == pb.TALK_ACTION_INTERRUPT:
            await self._floor.interrupt(control.heard_through_sequence)
        elif action == pb.TALK_ACTION_END_SESSION:
            if self._audio.open:
                self._discard()  # a turn not ended is not taken
            self._client.ending = True
            self._outbox.wake()
        else:
            raise InvalidArgument(
                "the control has no action",
                [FieldViolation("control.action", "must be a TalkAction")],
            )

    def _queue(self, said: Said) -> None:
        if not self._backlog.queue(said):
            if said.partial is not None:
                said.partial.cancel()
            # Said on the stream, not fatal: the user may go on once the engines catch up.
            self._errands.spawn(
                self._outbox.put(
                    mapping.error(
                        QuotaExceeded(
                            f"at most {MAX_PENDING_TURNS} turns may wait for transcription; "
                            "this one was dropped",
                            subject="voice/turns",
                        )
                    )
                )
            )

    def _discard(self) -> None:
        """The open turn is dropped, not taken: neither transcript of it is said."""
        if self._partials is not None:
            self._partials.stop()
        self._audio.end()
        self._confidence = 0.0

    def _end_turn(self, reason: pb.TurnEndReason.ValueType) -> None:
        partial = self._partials.hand_over() if self._partials is not None else None
        audio = self._audio.end()
        confidence, self._confidence = self._confidence, 0.0
        if not audio:
            if partial is not None:
                partial.cancel()
            if audio is not None:
                # Nothing to transcribe: said at once, without asking the engine.
                self._errands.spawn(
                    self._outbox.put(
                        mapping.event(pb.TALK_EVENT_KIND_TURN_EMPTY, self._backlog.next_turn)
                    )
                )
            return
        self._queue(
            Said(audio=audio, end_reason=reason, end_confidence=confidence, partial=partial)
        )
