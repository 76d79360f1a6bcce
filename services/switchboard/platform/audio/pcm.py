"""16-bit PCM: WAV wrapping and unwrapping, durations, and rate conversion.

Every voice stream in Switchboard is signed 16-bit little-endian PCM, one
channel (``AUDIO_ENCODING_PCM16``); a rate is one of ``RATES``.
"""

from __future__ import annotations

import array
import io
import math
import operator
import sys
import wave
from itertools import repeat
from typing import Final

#: The sample rates a voice stream may have.
RATES: Final = frozenset({8_000, 16_000, 24_000, 48_000})
SAMPLE_BYTES: Final = 2


class NotPcm(ValueError):
    """The bytes are not a 16-bit PCM WAV (mono or stereo)."""


def duration_ms(pcm_bytes: int, rate: int) -> int:
    """Milliseconds of ``pcm_bytes`` bytes of mono PCM16 at ``rate``."""
    return pcm_bytes * 1000 // (SAMPLE_BYTES * rate)


def byte_count(ms: int, rate: int) -> int:
    """Bytes of ``ms`` milliseconds of mono PCM16 at ``rate`` (whole samples)."""
    return ms * rate // 1000 * SAMPLE_BYTES


def to_wav(pcm: bytes, rate: int) -> bytes:
    """``pcm`` (mono PCM16 at ``rate``) as a WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(SAMPLE_BYTES)
        audio.setframerate(rate)
        audio.writeframes(pcm[: len(pcm) - len(pcm) % SAMPLE_BYTES])
    return out.getvalue()


def from_wav(data: bytes) -> tuple[bytes, int]:
    """The mono PCM16 samples of a WAV of 16-bit PCM (stereo is mixed down) and
    their rate; raises ``NotPcm`` for anything else."""
    try:
        with wave.open(io.BytesIO(data), "rb") as audio:
            channels, width, rate = (
                audio.getnchannels(),
                audio.getsampwidth(),
                audio.getframerate(),
            )
            frames = audio.readframes(audio.getnframes())
    except (wave.Error, EOFError) as exc:
        raise NotPcm(str(exc)) from None
    if width != SAMPLE_BYTES or channels not in (1, 2):
        raise NotPcm(f"{width * 8}-bit audio with {channels} channels")
    if channels == 1:
        return frames[: len(frames) - len(frames) % 2], rate
    samples = _samples(frames)
    mixed = array.array(
        "h", ((a + b) // 2 for a, b in zip(samples[::2], samples[1::2], strict=False))
    )
    return _bytes(mixed), rate


def resample(pcm: bytes, rate: int, target: int) -> bytes:
    """Mono PCM16 at ``rate`` converted to ``target`` Hz by linear interpolation
    (speech carries little near either Nyquist frequency, so this is enough for
    recognition and for playback): ``len(pcm) // 2 * target // rate`` samples."""
    if rate == target or not pcm:
        return pcm[: len(pcm) - len(pcm) % SAMPLE_BYTES]
    converter = Resampler(rate, target)
    return converter.feed(pcm) + converter.flush()


class Resampler:
    """A stream's rate conversion, piece by piece: ``feed`` each piece as it comes,
    ``flush`` at the end. The pieces together come out as ``resample`` of the
    whole (no clicks or lost samples where they join); an odd trailing byte is
    kept for the next piece.

    Fast enough to stream in pure Python: the rates' ratio reduced to ``up /
    down`` (24 kHz to 16 kHz is 2/3), output sample ``j`` sits at input
    position ``j * down / up``, so its interpolation weights repeat every
    ``up`` outputs. Each of those ``up`` phases is one strided slice of the
    input (``array`` slicing, in C) and one chain of ``map`` over C-level
    operators; there is no per-sample Python bytecode. A phase that lands on an
    input sample (every phase when ``up`` is 1: 48 kHz to 16 kHz) is a slice
    alone.
    """

    def __init__(self, rate: int, target: int) -> None:
        if rate <= 0 or target <= 0:
            raise ValueError(f"rates must be positive, not {rate} and {target}")
        common = math.gcd(rate, target)
        self._up = target // common
        self._down = rate // common
        #: Input samples not needed any more (dropped from ``_held``) ...
        self._dropped = 0
        #: ... and output samples made so far.
        self._made = 0
        self._held = array.array("h")
        self._odd = b""

    def feed(self, pcm: bytes) -> bytes:
        """The converted samples ``pcm`` completes (possibly none yet)."""
        data = self._odd + pcm if self._odd else pcm
        whole = len(data) - len(data) % SAMPLE_BYTES
        self._odd = data[whole:]
        if self._up == self._down:
            return data[:whole]
        if whole:
            self._held.extend(_samples(data[:whole]))
        total = self._dropped + len(self._held)
        # Output j needs inputs floor(j * down / up) and the one after it, and the
        # whole stream makes ``total * up // down`` (which ``total`` only grows).
        ready = min(-(-(total - 1) * self._up // self._down), total * self._up // self._down)
        return self._make(ready, total)

    def flush(self) -> bytes:
        """The last samples (the final one interpolated towards itself)."""
        total = self._dropped + len(self._held)
        return self._make(total * self._up // self._down, total)

    def _make(self, until: int, total: int) -> bytes:
        count = until - self._made
        if count <= 0:
            return b""
        up, down, held, first = self._up, self._down, self._held, self._made
        if total and held:
            # The sample after the last one is the last one (only ``flush`` reaches it).
            held.append(held[-1])
        out = array.array("h", bytes(SAMPLE_BYTES * count))
        for phase in range(min(up, count)):
            j = first + phase
            numerator = j * down % up
            left = j * down // up - self._dropped
            n = (count - phase + up - 1) // up
            lefts = held[left : left + (n - 1) * down + 1 : down]
            if numerator == 0:
                out[phase::up] = lefts
                continue
            rights = held[left + 1 : left + (n - 1) * down + 2 : down]
            if 2 * numerator == up:  # halfway (every other sample when doubling): cheaper
                out[phase::up] = array.array(
                    "h", map(operator.rshift, map(operator.add, lefts, rights), repeat(1))
                )
                continue
            out[phase::up] = array.array(
                "h",
                map(
                    operator.floordiv,
                    map(
                        operator.add,
                        map(operator.mul, lefts, repeat(up - numerator)),
                        map(operator.mul, rights, repeat(numerator)),
                    ),
                    repeat(up),
                ),
            )
        if total and held:
            held.pop()
        self._made = until
        keep_from = until * down // up - self._dropped
        if keep_from > 0:
            del held[:keep_from]
            self._dropped += keep_from
        return _bytes(out)


def _samples(pcm: bytes) -> array.array[int]:
    samples = array.array("h")
    samples.frombytes(pcm[: len(pcm) - len(pcm) % SAMPLE_BYTES])
    if sys.byteorder == "big":  # pragma: no cover - PCM16 here is little-endian
        samples.byteswap()
    return samples


def _bytes(samples: array.array[int]) -> bytes:
    if sys.byteorder == "big":  # pragma: no cover
        samples.byteswap()
    return samples.tobytes()
