"""A stream's audio: G.711 mu-law both ways, and the answer paced out in 20 ms frames.

The carriers send and take 8 kHz mu-law (PCMU). Decoding and encoding are table lookups
in numpy (G.711's own tables, built once at import: 256 samples one way, 65,536 codes the
other), not ``audioop``, which Python deprecated and 3.13 removed.

The answer's speech waits in a ``StreamPlayout`` (SIP's ``Playout``, so the call's bridge
is SIP's unchanged) and a ``Pacer`` task takes one 20 ms frame from it on a fixed schedule
(each tick's deadline counted from the start, so a late wake-up is made up, never added
up), encodes it and sends it as the carrier's ``media`` frame. The carrier plays what it
receives as it arrives, so pacing in real time keeps what a barge-in must drop here, where
``clear`` drops it, and tells the carrier to drop its own few frames too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import numpy as np
import numpy.typing as npt

from switchboard.dispatcher.talk.sip.pjsip import Playout

log = logging.getLogger("switchboard.dispatcher.talk.streams")

RATE: Final = 8_000
#: 20 ms: the frame the carriers send, Talk takes, and the pacer sends.
FRAME_S: Final = 0.02
FRAME_SAMPLES: Final = 160
PCM_FRAME_BYTES: Final = FRAME_SAMPLES * 2
#: How far behind its schedule the pacer may fall before it starts the schedule again
#: (a stalled loop): past it, what was missed is not sent in a burst.
MAX_BEHIND_FRAMES: Final = 10

_BIAS: Final = 0x84
_CLIP_14: Final = 8_159
#: The top of each of mu-law's eight segments, on 14 bits with the bias.
_SEGMENT_ENDS: Final = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])


def _decode_table() -> npt.NDArray[np.int16]:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.int16)


def _encode_table() -> npt.NDArray[np.uint8]:
    # G.711's reference encoder (Sun's g711.c, as ITU-T G.191 and CPython's audioop have
    # it): on the top 14 bits, negative samples mirrored, so both signs round alike.
    samples = np.arange(-32_768, 32_768, dtype=np.int32) >> 2
    negative = samples < 0
    magnitude = np.minimum(np.where(negative, -samples, samples), _CLIP_14) + (_BIAS >> 2)
    segment = np.searchsorted(_SEGMENT_ENDS, magnitude)
    mantissa = (magnitude >> np.minimum(segment + 1, 8)) & 0x0F
    code = np.where(segment >= 8, 0x7F, (segment << 4) | mantissa)
    mask = np.where(negative, 0x7F, 0xFF)
    codes: npt.NDArray[np.uint8] = (code ^ mask).astype(np.uint8)
    return codes


_DECODE: Final = _decode_table()
#: Indexed by a sample plus 32,768.
_ENCODE: Final = _encode_table()


def decode(mulaw: bytes) -> bytes:
    """mu-law bytes to PCM16 (little-endian), a sample each."""
    return _DECODE[np.frombuffer(mulaw, dtype=np.uint8)].astype("<i2").tobytes()


def encode(pcm: bytes) -> bytes:
    """PCM16 (little-endian; an odd last byte dropped) to mu-law bytes."""
    samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2").astype(np.int32)
    return _ENCODE[samples + 32_768].tobytes()


class Frames:
    """The caller's audio cut into 20 ms PCM frames, whatever sizes it comes in."""

    def __init__(self) -> None:
        self._held = bytearray()

    def add(self, mulaw: bytes) -> list[bytes]:
        self._held += decode(mulaw)
        whole = len(self._held) - len(self._held) % PCM_FRAME_BYTES
        out = [bytes(self._held[i : i + PCM_FRAME_BYTES]) for i in range(0, whole, PCM_FRAME_BYTES)]
        del self._held[:whole]
        return out


class StreamPlayout(Playout):
    """SIP's playout at 8 kHz whose ``clear`` (a barge-in, a cancelled run) also tells
    the carrier to drop what it holds of the answer, once: a barge-in clears the playout
    twice (the interruption, then the run cancelled), and the carrier holds nothing
    new of the answer the second time."""

    def __init__(self, on_clear: Callable[[], None]) -> None:
        super().__init__(RATE)
        self._on_clear = on_clear
        #: Answer audio went out since the last ``clear`` (the loop's alone: no lock).
        self._since_clear = False

    def push(self, pcm: bytes) -> bool:
        pushed = super().push(pcm)
        self._since_clear = self._since_clear or pushed
        return pushed

    def clear(self) -> None:
        super().clear()
        if self._since_clear:
            self._since_clear = False
            self._on_clear()


class Pacer:
    """Sends what the playout holds, a 20 ms frame each tick (see the module doc)."""

    def __init__(self, playout: Playout, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._playout = playout
        self._send = send
        self.frames_sent = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        while True:
            tick += 1
            due = start + tick * FRAME_S
            late = loop.time() - due
            if late > MAX_BEHIND_FRAMES * FRAME_S:
                log.info("a stream's pacer fell %.0f ms behind; starting again", late * 1000)
                start, tick = loop.time(), 0
                continue
            if late < 0:
                await asyncio.sleep(-late)
            if self._playout.queued_bytes:
                await self._send(encode(self._playout.take()))
                self.frames_sent += 1
