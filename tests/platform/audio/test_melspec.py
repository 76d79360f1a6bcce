"""Whisper's log-mel features (platform/audio/melspec.py): the shape Smart Turn reads, the
mel filters' layout, and what the features say of silence and of a tone."""

from __future__ import annotations

import numpy as np
import pytest

from switchboard.platform.audio import melspec

pytestmark = pytest.mark.unit

EIGHT_S = 8 * melspec.RATE


def tone(hz: float, seconds: float = 8.0) -> np.ndarray:
    t = np.arange(int(seconds * melspec.RATE)) / melspec.RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_eight_seconds_are_80_mels_by_800_frames() -> None:
    features = melspec.log_mel(tone(440))
    assert features.shape == (80, 800)
    assert features.dtype == np.float32


def test_each_filter_is_a_triangle_peaking_in_order_up_to_the_nyquist() -> None:
    filters = melspec.mel_filters()
    assert filters.shape == (80, 201)
    assert (filters >= 0).all()
    peaks = filters.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all()
    # Linear below 1 kHz (narrow, tall filters), logarithmic above (wide, low ones), each
    # of unit area: the low ones are the taller.
    assert filters[5].max() > filters[70].max()
    assert peaks[-1] > 190


def test_a_tone_lights_the_filter_at_its_frequency() -> None:
    bins = np.linspace(0, melspec.RATE / 2, 201)
    filters = melspec.mel_filters()
    for hz in (300.0, 1_000.0, 3_000.0):
        features = melspec.log_mel(tone(hz))
        loudest = int(features[:, 400].argmax())
        # The filter that covers the tone's FFT bin the most.
        expected = int(filters[:, int(np.abs(bins - hz).argmin())].argmax())
        assert abs(loudest - expected) <= 1, hz


def test_the_range_is_clamped_to_80_db_below_the_loudest() -> None:
    features = melspec.log_mel(tone(1_000))
    # log10 clamped to max - 8, then (x + 4) / 4: a spread of at most 2.
    assert features.max() - features.min() == pytest.approx(2.0, abs=1e-5)


def test_silence_is_flat_and_silence_before_speech_is_the_floor() -> None:
    flat = melspec.log_mel(np.zeros(EIGHT_S, np.float32))
    assert np.ptp(flat) == 0
    padded = np.concatenate([np.zeros(EIGHT_S // 2, np.float32), tone(1_000, 4.0)])
    features = melspec.log_mel(padded)
    # The zeros before the tone sit at the clamp's floor; the tone's frames above it.
    assert features[:, 100].max() == pytest.approx(features.min())
    assert features[:, 700].max() > features[:, 100].max() + 1


def test_pcm16_becomes_floats_in_the_unit_range() -> None:
    samples = np.array([0, 16_384, -32_768, 32_767], dtype="<i2").tobytes()
    assert melspec.from_pcm16(samples).tolist() == pytest.approx([0, 0.5, -1, 32_767 / 32_768])


def test_too_little_audio_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 400 samples"):
        melspec.log_mel(np.zeros(100, np.float32))
