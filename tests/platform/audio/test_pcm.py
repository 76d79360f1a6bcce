"""PCM16 helpers (platform/audio/pcm.py): WAV in and out, sizes, and rate conversion,
whole and streamed, checked against linear interpolation written out sample by sample."""

from __future__ import annotations

import array
import math
import random
import time

import pytest

from switchboard.platform.audio import pcm

pytestmark = pytest.mark.unit

PAIRS = [
    (24_000, 16_000),
    (24_000, 48_000),
    (24_000, 8_000),
    (16_000, 24_000),
    (22_050, 24_000),
    (48_000, 16_000),
    (8_000, 48_000),
    (44_100, 16_000),
]


def interpolated(samples: list[int], rate: int, target: int) -> bytes:
    """Linear interpolation the plain way: output ``j`` at input position ``j * rate /
    target``, floored, the last sample interpolated towards itself."""
    common = math.gcd(rate, target)
    up, down = target // common, rate // common
    last = len(samples) - 1
    out = []
    for j in range(len(samples) * target // rate):
        left, numerator = divmod(j * down, up)
        right = min(left + 1, last)
        out.append((samples[left] * (up - numerator) + samples[right] * numerator) // up)
    return array.array("h", out).tobytes()


def noise(count: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)  # noqa: S311 - test signal, not a secret
    return [rng.randint(-32_768, 32_767) for _ in range(count)]


@pytest.mark.parametrize(("rate", "target"), PAIRS)
def test_resample_is_linear_interpolation(rate: int, target: int) -> None:
    samples = noise(3001)
    converted = pcm.resample(array.array("h", samples).tobytes(), rate, target)
    assert converted == interpolated(samples, rate, target)
    assert len(converted) == 2 * (3001 * target // rate)


@pytest.mark.parametrize(("rate", "target"), PAIRS)
def test_a_stream_in_pieces_converts_as_the_whole(rate: int, target: int) -> None:
    """Pieces of any length, odd byte counts included: nothing lost or doubled where they
    join, and every piece out is whole samples."""
    data = array.array("h", noise(4000, seed=rate + target)).tobytes()
    rng = random.Random(target)  # noqa: S311 - piece sizes, not a secret
    converter = pcm.Resampler(rate, target)
    out = []
    at = 0
    while at < len(data):
        size = rng.choice([1, 3, 2, 7, 64, 333, 1000, 4097])
        piece = converter.feed(data[at : at + size])
        assert len(piece) % 2 == 0
        out.append(piece)
        at += size
    out.append(converter.flush())
    assert b"".join(out) == pcm.resample(data, rate, target)


def test_a_stream_yields_as_it_goes() -> None:
    """Output comes with the input that completes it, not only at the end."""
    converter = pcm.Resampler(24_000, 16_000)
    second = array.array("h", noise(24_000)).tobytes()
    first = converter.feed(second)
    assert len(first) >= 2 * 15_990  # all but the samples waiting for a neighbour
    assert len(first) + len(converter.flush()) == 2 * 16_000


def test_same_rate_and_nothing() -> None:
    assert pcm.resample(b"\x01\x02\x03", 16_000, 16_000) == b"\x01\x02"
    assert pcm.resample(b"", 24_000, 16_000) == b""
    converter = pcm.Resampler(24_000, 24_000)
    assert converter.feed(b"\x01\x02\x03") + converter.feed(b"\x04") == b"\x01\x02\x03\x04"
    with pytest.raises(ValueError, match="positive"):
        pcm.Resampler(0, 16_000)


def test_fast_enough_to_stream() -> None:
    """A second of speech at 24 kHz converts to 16 kHz in a small share of a second: the
    pure-Python loop took milliseconds per second of audio, this takes well under one.
    The bound is loose (a busy machine), an order of magnitude under real time."""
    second = array.array("h", noise(24_000)).tobytes()
    started = time.process_time()
    for _ in range(10):
        pcm.resample(second, 24_000, 16_000)
    assert (time.process_time() - started) / 10 < 0.1


def test_wav_round_trip_and_sizes() -> None:
    samples = array.array("h", noise(1600)).tobytes()
    wav = pcm.to_wav(samples + b"\x00", 16_000)  # an odd byte is dropped
    assert pcm.from_wav(wav) == (samples, 16_000)
    assert pcm.duration_ms(len(samples), 16_000) == 100
    assert pcm.byte_count(100, 16_000) == len(samples)
    with pytest.raises(pcm.NotPcm):
        pcm.from_wav(b"not a wav")
