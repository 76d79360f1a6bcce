"""The answer's track (``webrtc/media.SpeechTrack``) and the server's receiving side: speech
goes out paced, nothing goes out between answers (a page plays silence, as with Opus DTX)
while the timestamps keep the pause's length (a real page gets the whole jump on the first
packet after a pause), frames keep to the clock after a stall (caught up, or the answer's
audio dropped when too late; a microphone's never), and the server's audio jitter buffer
hands a frame on after one later packet, not aiortc's four (80 ms at the end of every
turn)."""

from __future__ import annotations

import array
import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.talk.webrtc.media import (
    FRAME_MS,
    FRAME_SAMPLES,
    MAX_LATE_S,
    RATE,
    SpeechTrack,
    pcm_of,
)
from switchboard.dispatcher.talk.webrtc.peer import (
    CHANNEL,
    PREFETCH_FRAMES,
    PeerOptions,
    TalkPeer,
)
from switchboard.platform.audio import pcm
from tests.conftest import CALL_DEADLINE_S

pytestmark = pytest.mark.unit

#: Longer than a frame's 20 ms many times over: a track that sends silence would have.
QUIET_S = 0.15


async def test_the_answer_track_sends_speech_and_nothing_between() -> None:
    track = SpeechTrack()
    waiting = asyncio.ensure_future(track.recv())
    await asyncio.sleep(QUIET_S)  # nothing queued: nothing may come in this time
    assert not waiting.done()
    track.push(1, bytes(pcm.byte_count(40, RATE)), RATE)  # two frames of speech
    first = await asyncio.wait_for(waiting, CALL_DEADLINE_S)
    second = await asyncio.wait_for(track.recv(), CALL_DEADLINE_S)
    assert (first.pts, second.pts) == (0, FRAME_SAMPLES)
    assert track.heard_through == 1
    assert not track.drained.is_set()
    # One frame of silence closes the answer (it flushes the encoder's lookahead), then
    # nothing.
    closing = await asyncio.wait_for(track.recv(), CALL_DEADLINE_S)
    assert closing.pts == 2 * FRAME_SAMPLES
    assert track.drained.is_set()
    assert (track.frames, track.speech_frames) == (3, 2)
    second = closing
    waiting = asyncio.ensure_future(track.recv())
    await asyncio.sleep(QUIET_S)
    assert not waiting.done()
    track.push(2, bytes(pcm.byte_count(20, RATE)), RATE)
    after = await asyncio.wait_for(waiting, CALL_DEADLINE_S)
    # The pause is in the timestamps: at least the time waited, in whole frames.
    assert after.pts is not None
    assert second.pts is not None
    assert after.pts - second.pts >= int(QUIET_S * 1000) // 20 * FRAME_SAMPLES
    assert after.pts % FRAME_SAMPLES == 0
    # Its closing frame of silence, then nothing more: the next recv waits for speech.
    ending = await asyncio.wait_for(track.recv(), CALL_DEADLINE_S)
    assert ending.pts == after.pts + FRAME_SAMPLES
    assert track.drained.is_set()
    # Stopped while waiting for speech: the waiting recv ends (a recv begun before the
    # closing frame went could have been answered with it, paced a frame later).
    waiting = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0)
    track.stop()
    with pytest.raises(MediaStreamError):
        await asyncio.wait_for(waiting, CALL_DEADLINE_S)


async def test_a_microphone_track_sends_its_silence() -> None:
    microphone = SpeechTrack(send_silence=True)
    frames = [await asyncio.wait_for(microphone.recv(), CALL_DEADLINE_S) for _ in range(3)]
    assert [f.pts for f in frames] == [0, FRAME_SAMPLES, 2 * FRAME_SAMPLES]
    assert microphone.speech_frames == 0
    microphone.stop()


async def test_the_servers_audio_jitter_buffer_waits_for_one_later_packet() -> None:
    page = RTCPeerConnection()
    page.addTrack(SpeechTrack(send_silence=True))
    page.createDataChannel(CHANNEL)
    await page.setLocalDescription(await page.createOffer())

    def talk(requests: object) -> object:
        raise AssertionError("the peer never connects here")

    peer = TalkPeer(talk, pb.TalkRequest(start=pb.TalkStart()), PeerOptions())  # type: ignore[arg-type]
    try:
        await peer.answer(page.localDescription.sdp)
        [receiver] = [t.receiver for t in peer._pc.getTransceivers() if t.kind == "audio"]
        buffer = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
        assert buffer._prefetch == PREFETCH_FRAMES == 1
        assert buffer.capacity == 16
    finally:
        await peer.close()
        await page.close()


def tone(ms: int, amplitude: int) -> bytes:
    """A 440 Hz tone at RATE: ``amplitude`` 8000 is speech to a level meter, 40 is not."""
    count = RATE * ms // 1000
    samples = array.array("h", (round(amplitude * math.sin(i * 0.0576)) for i in range(count)))
    return samples.tobytes()


def level(frame: object) -> float:
    samples = array.array("h")
    samples.frombytes(pcm_of(frame))  # type: ignore[arg-type]
    return sum(abs(s) for s in samples) / max(1, len(samples))


@dataclass
class Heard:
    """What a page's ear got from the answer's track: each frame's timestamp and level."""

    frames: list[tuple[int, float]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def until(self, count: int) -> None:
        async with asyncio.timeout(CALL_DEADLINE_S):
            while len(self.frames) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def ear() -> AsyncIterator[tuple[SpeechTrack, Heard, list[float]]]:
    """The answer's track on a real peer connection, a page's ear on the other end, and
    the track's clock's offset from the real one (a pause without waiting for it)."""
    skew = [0.0]
    track = SpeechTrack(clock=lambda: time.monotonic() + skew[0])
    server, page = RTCPeerConnection(), RTCPeerConnection()
    heard = Heard()
    tasks: list[asyncio.Task[None]] = []

    @page.on("track")
    def on_track(inbound: MediaStreamTrack) -> None:
        async def listen() -> None:
            while True:
                try:
                    frame = await inbound.recv()
                except MediaStreamError:
                    return
                assert frame.pts is not None
                heard.frames.append((frame.pts, level(frame)))
                heard.arrived.set()

        tasks.append(asyncio.ensure_future(listen()))

    page.addTransceiver("audio", direction="recvonly")
    await page.setLocalDescription(await page.createOffer())
    await server.setRemoteDescription(page.localDescription)
    server.addTrack(track)
    await server.setLocalDescription(await server.createAnswer())
    await page.setRemoteDescription(server.localDescription)
    try:
        yield track, heard, skew
    finally:
        await server.close()
        await page.close()
        for task in tasks:
            task.cancel()


async def test_the_first_packet_after_a_pause_carries_the_pause(
    ear: tuple[SpeechTrack, Heard, list[float]],
) -> None:
    """The page gets the pause's whole jump on the first packet of the next answer, not
    one packet later (where FFmpeg's sample count put it), and no sound of the answer
    before is stamped after the pause."""
    track, heard, skew = ear
    track.push(1, tone(200, 40), RATE)  # a quiet answer, 10 frames
    async with asyncio.timeout(CALL_DEADLINE_S):
        while not track.drained.is_set():
            await track.drained.wait()
    pause_s = 1.5
    skew[0] += pause_s  # the track's clock says 1.5 s passed in silence
    track.push(2, tone(200, 8000), RATE)  # a loud one
    # The page's jitter buffer holds the last few frames back: the quiet answer, its
    # closing frame and the loud answer's first frames come through.
    await heard.until(14)
    stamps = [pts for pts, _ in heard.frames]
    steps = [(b - a) % 2**32 for a, b in itertools.pairwise(stamps)]
    jumps = [i + 1 for i, step in enumerate(steps) if step != FRAME_SAMPLES]
    assert len(jumps) == 1, steps
    [first_after] = jumps
    assert steps[first_after - 1] >= int(pause_s * 1000) // FRAME_MS * FRAME_SAMPLES, steps
    levels = [round(lv) for _, lv in heard.frames]
    assert max(levels[:first_after]) < 200, (first_after, levels)  # all of the quiet answer
    assert min(levels[first_after : first_after + 3]) > 1000, (first_after, levels)


async def test_the_track_keeps_to_the_clock_when_the_loop_falls_behind() -> None:
    """Each frame is due at its time on the clock: after a short stall the late frames go
    at once (the track catches up, nothing lost); after a long one the audio whose time
    passed more than MAX_LATE_S ago is dropped, never sent behind real time."""
    now = [100.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds  # the clock moves exactly as the track asked

    track = SpeechTrack(clock=lambda: now[0], sleep=sleep)
    track.push(1, tone(2000, 8000), RATE)  # 100 frames of speech
    sent: list[tuple[float, int]] = []

    async def send(count: int) -> None:
        for _ in range(count):
            packet = await track.recv()
            assert packet.pts is not None
            sent.append((now[0], packet.pts))

    await send(10)
    start = sent[0][0]
    now[0] += 0.1  # a short stall of the event loop
    await send(10)
    assert track.late_frames == 0
    assert sent[-1][0] == pytest.approx(start + sent[-1][1] / RATE)  # caught up
    now[0] += 0.7  # a long one
    while not track.drained.is_set():
        await send(1)
    behind = [at - (start + pts / RATE) for at, pts in sent]
    assert max(behind) <= MAX_LATE_S + FRAME_MS / 1000, behind
    assert track.late_frames > 0
    assert track.speech_frames + track.late_frames == 100
    assert track.heard_through == 1
    # The speech's two seconds (and the closing frame) were over by their time on the clock.
    assert now[0] <= start + 2.02 + MAX_LATE_S + FRAME_MS / 1000


async def test_a_microphone_sends_all_its_words_however_late() -> None:
    """The page's microphone (tests, benchmarks) catches up after a stall rather than
    drop: what it says must be heard whole."""
    now = [100.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    microphone = SpeechTrack(send_silence=True, clock=lambda: now[0], sleep=sleep)
    microphone.push(1, tone(200, 8000), RATE)
    first = await microphone.recv()
    now[0] += 1.0
    rest = [await microphone.recv() for _ in range(9)]
    assert [p.pts for p in [first, *rest]] == [i * FRAME_SAMPLES for i in range(10)]
    assert (microphone.speech_frames, microphone.late_frames) == (10, 0)
    assert microphone.heard_through == 1
