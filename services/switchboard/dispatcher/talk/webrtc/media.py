"""Audio between a peer connection and a Talk session: PCM16 in, paced frames out.

WebRTC's media path is Opus at 48 kHz, which ``aiortc`` decodes to (and encodes
from) ``av.AudioFrame``s; a Talk session speaks mono PCM16 at its own rates. These
convert without numpy: a frame's bytes are read as they are (``planes[0]``), and a
stereo frame (Opus decoders give two channels even for a mono microphone, the same
samples twice) keeps its left channel by one strided slice.

``SpeechTrack`` is the answer's audio as the browser hears it: a track that sends a
20 ms frame every 20 ms while speech is queued for it, and nothing between answers
(the page plays silence, as with Opus DTX; the timestamps say how long the pause
was); ``clear`` drops what is queued at once (the person spoke over it), and
``heard_through`` says which speech update was sent whole, for an interrupt's
``heard_through_sequence``.
"""

from __future__ import annotations

import array
import asyncio
import fractions
import time
from collections import deque
from typing import Final

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from switchboard.platform.audio import pcm

#: WebRTC's audio clock, and the frames sent.
RATE: Final = 48_000
FRAME_MS: Final = 20
FRAME_SAMPLES: Final = RATE * FRAME_MS // 1000
_FRAME_BYTES: Final = FRAME_SAMPLES * pcm.SAMPLE_BYTES
_TIME_BASE: Final = fractions.Fraction(1, RATE)
#: The most speech queued for one track (the rest of a long answer waits in Talk).
MAX_QUEUED_S: Final = 120


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


class SpeechTrack(MediaStreamTrack):
    """The session's speech as one outbound audio track (see the module doc)."""

    kind = "audio"

    def __init__(self, *, send_silence: bool = False) -> None:
        """``send_silence``: a frame every 20 ms even with nothing queued, as a
        microphone sends (a page's, in tests and benchmarks); the answer's track sends
        only speech."""
        super().__init__()
        self._send_silence = send_silence
        #: Speech waiting to be sent: (the speech update's sequence, its PCM at RATE).
        self._queue: deque[tuple[int, bytearray]] = deque()
        self._queued = 0
        self._pts = 0
        self._start: float | None = None
        self._converters: dict[int, pcm.Resampler] = {}
        #: The last speech update sent whole (0: none yet).
        self.heard_through = 0
        #: Frames sent, and how many of them held speech.
        self.frames = 0
        self.speech_frames = 0
        #: Set while no speech is queued (cleared by ``push``, set when it is all sent).
        self.drained = asyncio.Event()
        self.drained.set()
        #: Set while speech is queued: ``recv`` waits on it rather than send silence.
        self._speech = asyncio.Event()

    def push(self, sequence: int, audio: bytes, rate: int) -> bool:
        """Queue ``audio`` (mono PCM16 at ``rate``), the speech update ``sequence``;
        False when the queue is full (the audio is dropped, the caller says so)."""
        converter = self._converters.get(rate)
        if converter is None:
            converter = self._converters[rate] = pcm.Resampler(rate, RATE)
        data = converter.feed(audio)
        if self._queued + len(data) > MAX_QUEUED_S * RATE * pcm.SAMPLE_BYTES:
            return False
        self._queue.append((sequence, bytearray(data)))
        self._queued += len(data)
        self.drained.clear()
        self._speech.set()
        return True

    def stop(self) -> None:
        super().stop()
        self._speech.set()  # a recv waiting for speech ends (MediaStreamError)

    def clear(self) -> int:
        """Drop the speech queued (bytes dropped); what was sent stays sent."""
        dropped = self._queued
        self._queue.clear()
        self._queued = 0
        self._converters.clear()
        self.drained.set()
        self._speech.clear()
        return dropped

    @property
    def queued_ms(self) -> int:
        return pcm.duration_ms(self._queued, RATE)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if not self._queue and not self._send_silence:
            # Silence is not sent: each frame of it would be encoded, encrypted and sent
            # (a fifth of a peer's CPU while no one speaks), and a page plays silence
            # when no packet comes, as with Opus's own DTX. The media clock runs on, so
            # the next speech's timestamps say how long the pause was.
            await self._speech.wait()
            if self.readyState != "live":
                raise MediaStreamError
            if self._start is not None:
                behind = time.monotonic() - (self._start + self._pts / RATE)
                if behind > 0:
                    self._pts += int(behind * 1000) // FRAME_MS * FRAME_SAMPLES
        now = time.monotonic()
        if self._start is None:
            self._start = now
        wait = self._start + self._pts / RATE - now
        if wait > 0:
            await asyncio.sleep(wait)  # the media clock: one frame each 20 ms
        elif wait < -0.2:
            # Fell behind (a busy loop): start the clock again rather than burst.
            self._start = now - self._pts / RATE
        chunk = self._take()
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(chunk)
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = _TIME_BASE
        self._pts += FRAME_SAMPLES
        self.frames += 1
        return frame

    def _take(self) -> bytes:
        """The next frame's PCM: queued speech, padded with silence."""
        out = bytearray()
        while self._queue and len(out) < _FRAME_BYTES:
            sequence, data = self._queue[0]
            need = _FRAME_BYTES - len(out)
            out += data[:need]
            del data[:need]
            if not data:
                self._queue.popleft()
                self.heard_through = max(self.heard_through, sequence)
        self._queued -= len(out)
        if out:
            self.speech_frames += 1
        if not self._queue:
            self.drained.set()
            self._speech.clear()
        return bytes(out + bytes(_FRAME_BYTES - len(out)))
