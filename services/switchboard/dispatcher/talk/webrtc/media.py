"""Audio between a peer connection and a Talk session: PCM16 in, paced frames out.

WebRTC's media path is Opus at 48 kHz, which ``aiortc`` decodes to (and encodes
from) ``av.AudioFrame``s; a Talk session speaks mono PCM16 at its own rates. These
convert without numpy: a frame's bytes are read as they are (``planes[0]``), and a
stereo frame (Opus decoders give two channels even for a mono microphone, the same
samples twice) keeps its left channel by one strided slice.

``SpeechTrack`` is the answer's audio as the browser hears it: a track that sends a
20 ms frame every 20 ms while speech is queued for it, and nothing between answers
(the page plays silence, as with Opus DTX; the timestamps say how long the pause
was); ``clear`` drops what is queued at once (the person spoke over it, or the run
was cancelled), and ``heard_through`` says which speech update was sent whole, for an
interrupt's ``heard_through_sequence``.

Two things make the timestamps and the pace exact:

- **The track encodes its own Opus packets**, each stamped with its frame's time.
  aiortc's encoder stamps a packet from FFmpeg's queue of input samples, which assumes
  the samples are continuous: after a pause its first packet came 20 ms after the last
  one and the pause's jump only on the second. Here the packet's timestamp is its
  frame's, and after each answer one frame of silence flushes the encoder's lookahead
  (6.5 ms), so an answer's tail is not heard at the start of the next one.
- **Each frame is due at a time on the clock** (the talkspurt's start plus its
  timestamp), not after a sleep from the previous one: a frame that is late (a busy
  event loop) goes at once, so the track catches up rather than fall behind, and the
  answer's audio later than ``MAX_LATE_S`` is dropped (counted in ``late_frames``)
  rather than sent: the page would play it behind real time, after the run's end
  reached it. (A microphone's track, ``send_silence``, sends every word, late or not.)
"""

from __future__ import annotations

import array
import asyncio
import fractions
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, CodecContext, Packet
from av.audio.codeccontext import AudioCodecContext

from switchboard.platform.audio import pcm

#: WebRTC's audio clock, and the frames sent.
RATE: Final = 48_000
FRAME_MS: Final = 20
FRAME_SAMPLES: Final = RATE * FRAME_MS // 1000
_FRAME_BYTES: Final = FRAME_SAMPLES * pcm.SAMPLE_BYTES
_TIME_BASE: Final = fractions.Fraction(1, RATE)
#: The most speech queued for one track (the rest of a long answer waits in Talk).
MAX_QUEUED_S: Final = 120
#: How late a frame may still go (at once); audio later than this is dropped: a page's
#: jitter buffer takes a burst this long, and anything later would play behind real time.
MAX_LATE_S: Final = 0.2
#: The Opus encoder's settings: aiortc's own (speech, 96 kb/s), in mono (what Talk speaks).
OPUS_BIT_RATE: Final = 96_000


def pcm_of(frame: AudioFrame) -> bytes:
    """``frame`` as mono PCM16 at its own rate (``frame.sample_rate``)."""
    data = bytes(frame.planes[0])
    if frame.format.name != "s16":
        # aiortc's Opus decoder gives packed s16; anything else is not ours to guess.
        raise ValueError(f"audio frames of {frame.format.name} are not taken")
    channels = len(frame.layout.channels)
    if channels == 1:
        return data[: frame.samples * pcm.SAMPLE_BYTES]
    samples = array.array("h")
    samples.frombytes(data[: frame.samples * channels * pcm.SAMPLE_BYTES])
    return samples[::channels].tobytes()


class Inbound:
    """A peer's audio as a Talk session takes it: mono PCM16 at ``rate``."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._converter: pcm.Resampler | None = None
        self._from = 0

    def feed(self, frame: AudioFrame) -> bytes:
        data = pcm_of(frame)
        if frame.sample_rate != self._from or self._converter is None:
            self._from = frame.sample_rate
            self._converter = pcm.Resampler(frame.sample_rate, self._rate)
        return self._converter.feed(data)


@dataclass
class _Queued:
    """Speech waiting to be sent: its update's sequence, its run, its PCM at RATE."""

    sequence: int
    run: str
    data: bytearray


class SpeechTrack(MediaStreamTrack):
    """The session's speech as one outbound audio track (see the module doc)."""

    kind = "audio"

    def __init__(
        self,
        *,
        send_silence: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``send_silence``: a frame every 20 ms even with nothing queued, as a
        microphone sends (a page's, in tests and benchmarks); the answer's track sends
        only speech. ``clock`` and ``sleep``: the media clock (monotonic seconds)."""
        super().__init__()
        self._send_silence = send_silence
        self._clock = clock
        self._sleep = sleep
        self._queue: deque[_Queued] = deque()
        self._queued = 0
        self._pts = 0
        #: When the frame stamped 0 was due (None: no frame yet).
        self._start: float | None = None
        #: The last frame held speech: one frame of silence follows, to flush the encoder.
        self._closing = False
        #: Nothing of an answer is being sent (the answer's track between answers).
        self._idle = not send_silence
        self._converters: dict[int, pcm.Resampler] = {}
        self._encoder = opus_encoder()
        #: The last speech update sent whole (0: none yet).
        self.heard_through = 0
        #: Frames sent, how many of them held speech, and frames of audio dropped late.
        self.frames = 0
        self.speech_frames = 0
        self.late_frames = 0
        #: Set while no speech is queued (cleared by ``push``, set when it is all sent,
        #: the answer's closing frame too).
        self.drained = asyncio.Event()
        self.drained.set()
        #: Set while speech is queued: ``recv`` waits on it rather than send silence.
        self._speech = asyncio.Event()

    def push(self, sequence: int, audio: bytes, rate: int, run: str = "") -> bool:
        """Queue ``audio`` (mono PCM16 at ``rate``), the speech update ``sequence`` of
        ``run``; False when the queue is full (the audio is dropped, the caller says so)."""
        converter = self._converters.get(rate)
        if converter is None:
            converter = self._converters[rate] = pcm.Resampler(rate, RATE)
        data = converter.feed(audio)
        if self._queued + len(data) > MAX_QUEUED_S * RATE * pcm.SAMPLE_BYTES:
            return False
        self._queue.append(_Queued(sequence, run, bytearray(data)))
        self._queued += len(data)
        self.drained.clear()
        self._speech.set()
        return True

    def stop(self) -> None:
        super().stop()
        self._speech.set()  # a recv waiting for speech ends (MediaStreamError)

    def clear(self, run: str | None = None) -> int:
        """Drop the speech queued (``run``'s only, when named): bytes dropped; what was
        sent stays sent."""
        kept = deque(q for q in self._queue if run is not None and q.run != run)
        dropped = self._queued - sum(len(q.data) for q in kept)
        self._queue = kept
        self._queued -= dropped
        if dropped:
            self._converters.clear()
        if not self._queue:
            self.drained.set()
            self._speech.clear()
        return dropped

    @property
    def queued_ms(self) -> int:
        return pcm.duration_ms(self._queued, RATE)

    async def recv(self) -> Packet[Any]:
        """The next frame, Opus-encoded, stamped with its own time (see the module doc)."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._idle:
            # Silence is not sent: each frame of it would be encoded, encrypted and sent
            # (a fifth of a peer's CPU while no one speaks), and a page plays silence
            # when no packet comes, as with Opus's own DTX. The media clock runs on, so
            # the next speech's timestamps say how long the pause was, and its first
            # frame is due when it came (never late for the time nothing was sent).
            if not self._queue:
                await self._speech.wait()
                if self.readyState != "live":
                    raise MediaStreamError
            if self._start is not None:
                self._pts += self._frames_past(self._clock()) * FRAME_SAMPLES
            self._idle = False
        now = self._clock()
        if self._start is None:
            self._start = now
        wait = self._start + self._pts / RATE - now
        if wait > 0:
            await self._sleep(wait)  # the media clock: each frame at its time
            if self.readyState != "live":
                raise MediaStreamError
        elif -wait > MAX_LATE_S and not self._send_silence:
            # (A microphone's words are all sent, late or not: the page of the tests and
            # benchmarks must be heard whole.)
            self._drop_late(now)
        chunk = self._take()
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(chunk)
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = _TIME_BASE
        packet = await asyncio.get_running_loop().run_in_executor(None, self._encode, frame)
        self._pts += FRAME_SAMPLES
        self.frames += 1
        return packet

    def _frames_past(self, now: float) -> int:
        """Whole frames between the next frame's time and ``now`` (0 if it is not due)."""
        behind = now - ((self._start or now) + self._pts / RATE)
        return max(0, int(behind * RATE) // FRAME_SAMPLES)

    def _drop_late(self, now: float) -> None:
        """Skip the frames whose time passed more than ``MAX_LATE_S`` ago: their audio
        is dropped (an update whose time passed counts as heard through), and the
        timestamps jump as the clock did."""
        late = self._frames_past(now - MAX_LATE_S)
        self._pts += late * FRAME_SAMPLES
        self.late_frames += late
        drop = late * _FRAME_BYTES
        while self._queue and drop > 0:
            head = self._queue[0]
            cut = min(drop, len(head.data))
            del head.data[:cut]
            drop -= cut
            self._queued -= cut
            if not head.data:
                self._queue.popleft()
                self.heard_through = max(self.heard_through, head.sequence)

    def _encode(self, frame: AudioFrame) -> Packet[Any]:
        packets = self._encoder.encode(frame)
        # libopus takes a whole 20 ms frame and gives its packet at once; FFmpeg's stamp
        # counts samples as if no pause ever came, so the frame's own time replaces it.
        packet = packets[0] if packets else Packet(b"")
        packet.pts = frame.pts
        packet.time_base = _TIME_BASE
        return packet

    def _take(self) -> bytes:
        """The next frame's PCM: queued speech, padded with silence."""
        out = bytearray()
        while self._queue and len(out) < _FRAME_BYTES:
            head = self._queue[0]
            need = _FRAME_BYTES - len(out)
            out += head.data[:need]
            del head.data[:need]
            if not head.data:
                self._queue.popleft()
                self.heard_through = max(self.heard_through, head.sequence)
        self._queued -= len(out)
        self._closing = bool(out) and not self._send_silence
        if out:
            self.speech_frames += 1
        elif not self._send_silence:
            self._idle = True  # the answer's closing frame
        if not self._queue:
            self._speech.clear()
            if not self._closing:
                self.drained.set()  # the speech is out, its closing frame too
        return bytes(out + bytes(_FRAME_BYTES - len(out)))


def opus_encoder() -> AudioCodecContext:
    """The encoder a track sends with: one per track (it keeps state from frame to frame)."""
    encoder = CodecContext.create("libopus", "w")
    encoder.bit_rate = OPUS_BIT_RATE
    encoder.format = "s16"
    encoder.layout = "mono"
    encoder.sample_rate = RATE
    encoder.time_base = _TIME_BASE
    encoder.options = {"application": "voip"}
    return encoder
