"""Whisper's log-mel features, in numpy: what Smart Turn v3 reads (``endpoint.py``).

Written from Whisper's published front end (OpenAI Whisper's ``log_mel_spectrogram``
and the ``WhisperFeatureExtractor`` that Smart Turn was trained with), step by step:

1. 16 kHz mono samples as floats in [-1, 1], normalized to zero mean and unit
   variance over the whole window (the extractor's ``do_normalize``);
2. a short-time Fourier transform: frames of ``N_FFT`` (25 ms) every ``HOP``
   (10 ms), centred (the signal mirrored by half a frame at each end), each
   under a periodic Hann window; the power of each bin;
3. ``N_MELS`` triangular filters spaced on Slaney's mel scale (linear below
   1 kHz, logarithmic above), each scaled to unit area;
4. ``log10`` (floored at 1e-10), clamped to 8 below the window's loudest value
   (80 dB of range), then ``(x + 4) / 4`` (about [-1, 1]).

The centred transform makes one frame more than the hops; the last is dropped,
so 8 s give exactly 800 frames.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

RATE: Final = 16_000
N_FFT: Final = 400
HOP: Final = 160
N_MELS: Final = 80
_FLOOR: Final = 1e-10
_VARIANCE_EPS: Final = 1e-7
#: Slaney's scale: 3 mels per 200 Hz up to 1 kHz (15 mels), then 27 mels per factor 6.4.
_LINEAR_TOP_HZ: Final = 1_000.0
_LINEAR_TOP_MEL: Final = 15.0
_HZ_PER_MEL: Final = 200.0 / 3.0
_MELS_PER_LOG: Final = 27.0 / np.log(6.4)

Floats = npt.NDArray[np.float32]


def _mel(hz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    linear = hz / _HZ_PER_MEL
    above = _LINEAR_TOP_MEL + np.log(np.maximum(hz, _LINEAR_TOP_HZ) / _LINEAR_TOP_HZ) * (
        _MELS_PER_LOG
    )
    return np.where(hz < _LINEAR_TOP_HZ, linear, above)


def _hz(mel: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    linear = mel * _HZ_PER_MEL
    above = _LINEAR_TOP_HZ * np.exp(
        (np.maximum(mel, _LINEAR_TOP_MEL) - _LINEAR_TOP_MEL) / (_MELS_PER_LOG)
    )
    return np.where(mel < _LINEAR_TOP_MEL, linear, above)


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = RATE) -> Floats:
    """``(n_mels, n_fft // 2 + 1)``: each row a triangle over the FFT's bins, unit area."""
    bins = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    edges = _hz(np.linspace(_mel(np.array(0.0)), _mel(np.array(rate / 2.0)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    triangles = np.clip(np.minimum(rising, falling), 0.0, None)
    # Each filter's area made one, so a wide high filter weighs no more than a narrow low one.
    return (triangles * (2.0 / (upper - lower))).astype(np.float32)


_FILTERS: Final = mel_filters()
#: Where each filter is not zero (its triangle's bins): a product over those alone, in
#: numpy's own loops. A matrix product would go to the BLAS library, whose threads then
#: spin on the other cores for a while after it returns: that doubled a reading's CPU.
_SPANS: Final = tuple((int(row.nonzero()[0][0]), int(row.nonzero()[0][-1]) + 1) for row in _FILTERS)
# Periodic, as torch.hann_window and Whisper use: one sample of a window one longer.
_WINDOW: Final = np.hanning(N_FFT + 1)[:-1].astype(np.float32)


def log_mel(samples: Floats) -> Floats:
    """The ``(N_MELS, len(samples) // HOP)`` features of 16 kHz ``samples`` (floats)."""
    if samples.ndim != 1 or len(samples) < N_FFT:
        raise ValueError(f"need one channel of at least {N_FFT} samples, not {samples.shape}")
    x = samples.astype(np.float32)
    x = (x - x.mean()) / np.sqrt(x.var() + _VARIANCE_EPS)
    half = N_FFT // 2
    padded = np.pad(x, half, mode="reflect")
    count = 1 + (len(padded) - N_FFT) // HOP
    # Every frame as a view (no copy): frame i starts at sample i * HOP.
    frames = np.lib.stride_tricks.as_strided(
        padded,
        shape=(count, N_FFT),
        strides=(padded.strides[0] * HOP, padded.strides[0]),
        writeable=False,
    )
    power = (np.abs(np.fft.rfft(frames * _WINDOW, axis=1)) ** 2).astype(np.float32)
    energies = np.empty((N_MELS, count), np.float32)
    for mel, (low, high) in enumerate(_SPANS):
        energies[mel] = (power[:, low:high] * _FILTERS[mel, low:high]).sum(axis=1)
    mels = np.log10(np.maximum(energies, _FLOOR))
    mels = mels[:, :-1]
    mels = np.maximum(mels, mels.max() - 8.0)
    features: Floats = ((mels + 4.0) / 4.0).astype(np.float32)
    return features


def from_pcm16(pcm: bytes) -> Floats:
    """Little-endian PCM16 bytes as floats in [-1, 1)."""
    samples: Floats = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2").astype(np.float32)
    samples *= np.float32(1 / 32768)
    return samples
