"""A stream's audio (``talk/streams/audio.py``): G.711 mu-law as its tables define it,
the caller's audio cut into 20 ms frames whatever sizes it comes in, and the pacer
sending one frame each 20 ms on its schedule."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from switchboard.dispatcher.talk.streams import audio

pytestmark = pytest.mark.unit


def test_mu_law_decodes_and_encodes_as_g711_defines_it() -> None:
    codes = np.frombuffer(audio.decode(bytes([0xFF, 0x7F, 0x00, 0x80, 0xEF, 0x6F])), "<i2")
    # Silence both signs; the loudest codes; the ends of segment 1.
    assert codes.tolist() == [0, 0, -32124, 32124, 132, -132]
    samples = np.array([0, 1, -1, 32767, -32768, 100, -100], dtype="<i2").tobytes()
    # -1 is on the negative side of zero (G.711's reference encoder keeps the sign).
    assert audio.encode(samples) == bytes([0xFF, 0xFF, 0x7E, 0x80, 0x00, 0xF2, 0x72])
    # Every code decodes to a value that encodes back to it (but 0x7F: -0 is 0, 0xFF).
    every = bytes(range(256))
    back = audio.encode(audio.decode(every))
    assert [a for a, b in zip(every, back, strict=True) if a != b] == [0x7F]
    # A round trip's error is a few percent of the sample (logarithmic steps), and a few
    # units near zero.
    ramp = np.arange(-32768, 32768, 7, dtype=np.int64)
    again = np.frombuffer(audio.decode(audio.encode(ramp.astype("<i2").tobytes())), "<i2")
    error = np.abs(again - ramp)
    small = np.abs(ramp) < 256
    assert np.max(error[small]) <= 16
    assert np.max(error[~small] / np.abs(ramp[~small])) < 0.07


def test_the_callers_audio_is_cut_into_20_ms_frames() -> None:
    frames = audio.Frames()
    assert frames.add(b"\xff" * 100) == []
    out = frames.add(b"\xff" * 300)
    assert [len(f) for f in out] == [audio.PCM_FRAME_BYTES, audio.PCM_FRAME_BYTES]
    assert [len(f) for f in frames.add(b"\xff" * 80)] == [audio.PCM_FRAME_BYTES]


async def test_the_pacer_sends_a_frame_each_20_ms_and_clear_empties_it() -> None:
    cleared: list[int] = []
    playout = audio.StreamPlayout(on_clear=lambda: cleared.append(1))
    sent: list[tuple[float, bytes]] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def send(mulaw: bytes) -> None:
        sent.append((loop.time(), mulaw))
        if len(sent) == 25:
            done.set()

    tone = (np.sin(np.arange(8000) / 5) * 8000).astype("<i2").tobytes()  # 1 s
    assert playout.push(tone)
    pacer = loop.create_task(audio.Pacer(playout, send).run())
    async with asyncio.timeout(30):
        await done.wait()
    playout.clear()
    left = playout.queued_bytes
    pacer.cancel()
    await asyncio.gather(pacer, return_exceptions=True)
    assert cleared == [1]
    assert left == 0
    assert all(len(m) == audio.FRAME_SAMPLES for _, m in sent)
    assert sent[0][1] == audio.encode(tone[: audio.PCM_FRAME_BYTES])
    # Paced in real time: 24 intervals of 20 ms, neither bursting nor drifting far.
    span = sent[24][0] - sent[0][0]
    assert 0.4 <= span < 0.48 + 0.2
