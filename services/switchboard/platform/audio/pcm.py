"""16-bit PCM: WAV wrapping and unwrapping, durations, and rate conversion.

Every voice stream in Switchboard is signed 16-bit little-endian PCM, one
channel (``AUDIO_ENCODING_PCM16``); a rate is one of ``RATES``.
"""

from __future__ import annotations

import array
import io
import sys
import wave
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
    recognition and for playback)."""
    if rate == target or not pcm:
        return pcm
    samples = _samples(pcm)
    count = len(samples) * target // rate
    step = rate / target
    last = len(samples) - 1
    out = array.array("h", bytes(SAMPLE_BYTES * count))
    for index in range(count):
        position = index * step
        left = int(position)
        right = left + 1 if left < last else last
        fraction = position - left
        out[index] = int(samples[left] + (samples[right] - samples[left]) * fraction)
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
