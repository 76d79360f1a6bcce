"""A run that speaks: its answer's sentences synthesized and sent as it is written.

The execution stage feeds the speaker the answer's text deltas as they leave
(``feed``); the speaker cuts sentences (``sentences.py``) and two tasks take
them from there:

* the **synthesizer** asks the engine for one sentence at a time
  (``SpeechEngine.speak``, streamed) and runs one sentence ahead of playback:
  the next sentence is synthesized while the previous one plays, never more,
  so a long answer holds at most two sentences of audio;
* the **player** cuts the audio into chunks of about ``CHUNK_MS`` and hands
  each to ``emit`` (the run's publishing path) when the audio before it has
  (nearly) played: ``lead_ms`` ahead of a listener who plays each chunk as it
  comes. Sent faster, a barge-in would have to discard seconds of audio the
  listener already holds; sent slower, the listener hears gaps.

A synthesis failure stops the speech (``failure`` says why); the text answer
goes on. ``stop`` stops both tasks at once (a cancel, a barge-in). What was
sent is recorded per segment (``Segment``), so the run can store what the
listener heard and mark the rest (``heard``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf import struct_pb2

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.voice.ports import SpeechEngine
from switchboard.dispatcher.voice.sentences import Piece, SentenceCutter
from switchboard.platform import background
from switchboard.platform.audio import pcm
from switchboard.platform.errors import SwitchboardError

log = logging.getLogger("switchboard.dispatcher.voice")

#: The audio of one speech update, about.
CHUNK_MS: Final = 200
#: The contract's bound on one chunk's audio.
MAX_CHUNK_BYTES: Final = 64 * 1024
DEFAULT_RATE: Final = 24_000
#: About how long a character takes to say (15 a second), to place a cut in a sentence
#: whose audio is not all synthesized.
_MS_PER_CHAR: Final = 65
#: The unspoken text kept in a stored answer's metadata (the context service bounds
#: a message's metadata, 16 KiB by default); ``unspoken_chars`` counts all of it.
MAX_UNSPOKEN_CHARS: Final = 3_000


@dataclass(frozen=True)
class Speech:
    """The server's speech: its engine (``SWITCHBOARD_VOICE_URL``), the defaults of
    assistants whose ``voice`` leaves a field empty, and how far ahead of playback
    runs send their speech (``SWITCHBOARD_VOICE_LEAD_MS``)."""

    engine: SpeechEngine
    transcription_model: str
    speech_model: str
    voice: str
    lead_ms: int = 400

    def speaking(self, settings: pb.VoiceSettings | None, sample_rate_hz: int) -> Voice:
        """How a run whose assistant has ``settings`` speaks, at ``sample_rate_hz`` (0: 24 kHz)."""
        return Voice(
            engine=self.engine,
            model=(settings.speech_model if settings is not None else "") or self.speech_model,
            voice=(settings.voice if settings is not None else "") or self.voice,
            sample_rate_hz=sample_rate_hz or DEFAULT_RATE,
            lead_ms=self.lead_ms,
        )

    def transcribing(self, settings: pb.VoiceSettings | None) -> tuple[str, str]:
        """The transcription model and language of an assistant with ``settings``."""
        if settings is None:
            return self.transcription_model, ""
        return settings.transcription_model or self.transcription_model, settings.language


@dataclass(frozen=True)
class Voice:
    """How a run speaks: the engine, the model and voice (the assistant's, else the
    server's), the output rate, and how far ahead of playback audio is sent."""

    engine: SpeechEngine
    model: str
    voice: str
    sample_rate_hz: int = DEFAULT_RATE
    lead_ms: int = 400


class _Audio:
    """One sentence's audio as the synthesizer streams it to the player."""

    def __init__(self, piece: Piece) -> None:
        self.piece = piece
        self.buffer = bytearray()
        #: Bytes synthesized in all (the buffer is dropped once sent).
        self.size = 0
        self.done = False
        self.changed = asyncio.Event()

    def add(self, data: bytes) -> None:
        self.buffer += data
        self.size += len(data)
        self.changed.set()

    def close(self) -> None:
        self.done = True
        self.changed.set()


@dataclass
class Segment:
    """One sentence as it was sent."""

    index: int
    piece: Piece
    #: Its audio as synthesized so far (all of it once ``done``).
    audio: _Audio
    #: (sequence, offset_ms, duration_ms) of each chunk sent, in order.
    chunks: list[tuple[int, int, int]] = field(default_factory=list)
    #: Whether its last chunk was sent.
    ended: bool = False

    def length_ms(self, rate: int) -> int:
        """How long it is, or is expected to be while it is being synthesized."""
        synthesized = pcm.duration_ms(self.audio.size, rate)
        if self.audio.done:
            return synthesized
        return max(synthesized, len(self.piece.text) * _MS_PER_CHAR)


@dataclass(frozen=True)
class Heard:
    """What a listener heard of the answer: the first ``chars`` characters."""

    chars: int
    audio_ms: int


class Speaker:
    """One run's speech; ``emit`` publishes a ``speech`` update and returns its sequence."""

    def __init__(
        self,
        voice: Voice,
        emit: Callable[[pb.RunUpdate], int],
        on_failure: Callable[[str], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._voice = voice
        self._emit = emit
        self._on_failure = on_failure
        self._clock = clock
        self._cutter = SentenceCutter()
        #: Sentences cut, waiting for the synthesizer (None: the answer is complete).
        self._pieces: asyncio.Queue[Piece | None] = asyncio.Queue()
        #: The synthesizer's sentence for the player: one ahead, never more.
        self._ready: asyncio.Queue[_Audio | None] = asyncio.Queue(maxsize=1)
        self.segments: list[Segment] = []
        #: Why speech stopped early ("" while it goes on, or after it ended well).
        self.failure = ""
        self.stopped = False
        self._finished = False
        self._format = pb.AudioFormat(
            encoding=pb.AUDIO_ENCODING_PCM16, sample_rate_hz=voice.sample_rate_hz
        )
        self._samples = 0  # of the answer's audio sent so far
        self._tasks: set[asyncio.Task[None]] = set()
        self._player = background.spawn(
            self._play(), name="speaker-player", logger=log, keep=self._tasks
        )
        self._synthesizer = background.spawn(
            self._synthesize(), name="speaker-synthesizer", logger=log, keep=self._tasks
        )

    @property
    def text(self) -> str:
        """The answer's text so far."""
        return self._cutter.text

    @property
    def audio_ms(self) -> int:
        return self._samples * 1000 // self._voice.sample_rate_hz

    def feed(self, text: str) -> None:
        """More of the answer (a delta as it left); never waits."""
        if self._finished:
            return
        pieces = self._cutter.feed(text)
        if not (self.stopped or self.failure):
            for piece in pieces:
                self._pieces.put_nowait(piece)

    def finish(self) -> None:
        """The answer is complete: the rest is spoken too."""
        if self._finished:
            return
        self._finished = True
        pieces = self._cutter.finish()
        if not (self.stopped or self.failure):
            for piece in pieces:
                self._pieces.put_nowait(piece)
            self._pieces.put_nowait(None)

    async def wait(self) -> None:
        """Until its speech is all sent (or stopped, or failed)."""
        await asyncio.wait({self._player, self._synthesizer})

    def halt(self) -> None:
        """Stop at once: nothing more is sent from now on (its tasks end soon after)."""
        self.stopped = True
        self._player.cancel()
        self._synthesizer.cancel()

    async def stop(self) -> None:
        """``halt``, and wait for its tasks to end (an engine's stream closed)."""
        self.halt()
        await asyncio.wait({self._player, self._synthesizer})

    def heard(self, through: int) -> Heard:
        """What a listener heard who heard the speech updates up to sequence ``through``
        (0: every one sent): whole segments, and a segment heard in part cut at a word
        in proportion to its audio heard."""
        chars = 0
        audio = 0
        for segment in self.segments:
            heard = [c for c in segment.chunks if not through or c[0] <= through]
            if not heard:
                break
            audio += sum(duration for _, _, duration in heard)
            piece = segment.piece
            if len(heard) == len(segment.chunks) and segment.ended:
                chars = piece.end
                continue
            total = segment.length_ms(self._voice.sample_rate_hz)
            share = min(1.0, sum(duration for _, _, duration in heard) / total) if total else 0.0
            cut = int(len(piece.text) * share)
            words = piece.text[:cut]
            # Back to the last whole word heard.
            if cut < len(piece.text) and not piece.text[cut].isspace():
                space = words.rfind(" ")
                words = words[:space] if space >= 0 else ""
            words = words.rstrip()
            chars = piece.start + len(words) if words else chars
            break
        return Heard(chars, audio)

    def record(self, *, interrupted: bool, through: int = 0) -> tuple[str, struct_pb2.Struct]:
        """What a run stores of its spoken answer: the text heard (all of it unless
        ``interrupted``) and the message's ``voice`` metadata (docs/voice.md)."""
        heard = self.heard(through)
        text = self.text
        voice: dict[str, Any] = {"spoken_chars": heard.chars, "audio_ms": heard.audio_ms}
        if interrupted:
            voice["interrupted"] = True
        unspoken = text[heard.chars :]
        if unspoken.strip():
            voice["unspoken_text"] = unspoken[:MAX_UNSPOKEN_CHARS]
            voice["unspoken_chars"] = len(unspoken)
        if self.failure:
            voice["speech_error"] = self.failure
        metadata = struct_pb2.Struct()
        metadata.update({"voice": voice})
        return (text[: heard.chars] if interrupted else text), metadata

    # -- the tasks ----------------------------------------------------------------------

    async def _synthesize(self) -> None:
        voice = self._voice
        while (piece := await self._pieces.get()) is not None:
            audio = _Audio(piece)
            await self._ready.put(audio)
            stream = voice.engine.speak(
                piece.text,
                model=voice.model,
                voice=voice.voice,
                sample_rate_hz=voice.sample_rate_hz,
            )
            try:
                async for data in stream:
                    audio.add(data)
            except SwitchboardError as exc:
                self._fail(exc.message)
                return
            except Exception:
                log.exception("speech synthesis failed unexpectedly")
                self._fail("the speech engine failed unexpectedly")
                return
            finally:
                audio.close()
                # An unfinished stream is closed now: its HTTP response ends with it.
                close = getattr(stream, "aclose", None)
                if close is not None:
                    await close()
        await self._ready.put(None)

    def _fail(self, why: str) -> None:
        if not self.failure:
            self.failure = why
            self._on_failure(why)
        self._player.cancel()

    async def _play(self) -> None:
        rate = self._voice.sample_rate_hz
        chunk_bytes = min(pcm.byte_count(CHUNK_MS, rate), MAX_CHUNK_BYTES)
        lead_s = self._voice.lead_ms / 1000
        # When the audio sent so far ends, for a listener who plays it as it comes.
        played_until = 0.0
        while (audio := await self._ready.get()) is not None:
            segment = Segment(len(self.segments), audio.piece, audio)
            sent = 0
            while True:
                waiting = len(audio.buffer) - sent
                # A full chunk goes when more follows it (so the last one can say it
                # is last); the rest goes once the sentence's audio is complete.
                if waiting <= chunk_bytes and not audio.done:
                    audio.changed.clear()
                    await audio.changed.wait()
                    continue
                if waiting <= 0:
                    break
                size = min(chunk_bytes, waiting)
                size -= size % pcm.SAMPLE_BYTES
                if size <= 0:
                    break
                delay = played_until - lead_s - self._clock()
                if delay > 0:
                    # Pacing at playback speed, not a wait for another task.
                    await asyncio.sleep(delay)
                data = bytes(audio.buffer[sent : sent + size])
                sent += size
                last = audio.done and len(audio.buffer) - sent < pcm.SAMPLE_BYTES
                self._send(segment, data, last)
                played_until = max(played_until, self._clock()) + len(data) / (
                    pcm.SAMPLE_BYTES * rate
                )
                if last:
                    break
            # Its audio is sent: the memory goes.
            audio.buffer.clear()

    def _send(self, segment: Segment, data: bytes, last: bool) -> None:
        rate = self._voice.sample_rate_hz
        samples = len(data) // pcm.SAMPLE_BYTES
        offset_ms = self._samples * 1000 // rate
        self._samples += samples
        duration_ms = self._samples * 1000 // rate - offset_ms
        update = pb.RunUpdate()
        chunk = update.speech  # built in place: the audio is not copied again
        chunk.audio = data
        chunk.format.CopyFrom(self._format)
        chunk.segment = segment.index
        chunk.text_start = segment.piece.start
        chunk.text_end = segment.piece.end
        chunk.offset_ms = offset_ms
        chunk.duration_ms = duration_ms
        chunk.segment_end = last
        if not segment.chunks:
            chunk.text = segment.piece.text
            # Recorded before the first chunk goes: a cancel in between still finds it.
            self.segments.append(segment)
        sequence = self._emit(update)
        segment.chunks.append((sequence, offset_ms, duration_ms))
        segment.ended = last
