"""The answer's track (``webrtc/media.SpeechTrack``) and the server's receiving side: speech
goes out paced, nothing goes out between answers (a page plays silence, as with Opus DTX)
while the timestamps keep the pause's length, and the server's audio jitter buffer hands a
frame on after one later packet, not aiortc's four (80 ms at the end of every turn)."""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.talk.webrtc.media import FRAME_SAMPLES, RATE, SpeechTrack
from switchboard.dispatcher.talk.webrtc.peer import (
    CHANNEL,
    PREFETCH_FRAMES,
    PeerSettings,
    TalkPeer,
)
from switchboard.platform.audio import pcm

pytestmark = pytest.mark.unit

#: Longer than a frame's 20 ms many times over: a track that sends silence would have.
QUIET_S = 0.15


async def test_the_answer_track_sends_speech_and_nothing_between() -> None:
    track = SpeechTrack()
    waiting = asyncio.ensure_future(track.recv())
    await asyncio.sleep(QUIET_S)  # nothing queued: nothing may come in this time
    assert not waiting.done()
    track.push(1, bytes(pcm.byte_count(40, RATE)), RATE)  # two frames of speech
    first = await asyncio.wait_for(waiting, 5)
    second = await asyncio.wait_for(track.recv(), 5)
    assert (first.pts, second.pts) == (0, FRAME_SAMPLES)
    assert track.heard_through == 1
    assert track.drained.is_set()
    waiting = asyncio.ensure_future(track.recv())
    await asyncio.sleep(QUIET_S)
    assert not waiting.done()
    track.push(2, bytes(pcm.byte_count(20, RATE)), RATE)
    after = await asyncio.wait_for(waiting, 5)
    # The pause is in the timestamps: at least the time waited, in whole frames.
    assert after.pts is not None
    assert second.pts is not None
    assert after.pts - second.pts >= int(QUIET_S * 1000) // 20 * FRAME_SAMPLES
    assert after.pts % FRAME_SAMPLES == 0
    # Stopped while waiting for speech: the waiting recv ends.
    waiting = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0)
    track.stop()
    with pytest.raises(MediaStreamError):
        await asyncio.wait_for(waiting, 5)


async def test_a_microphone_track_sends_its_silence() -> None:
    microphone = SpeechTrack(send_silence=True)
    frames = [await asyncio.wait_for(microphone.recv(), 5) for _ in range(3)]
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

    peer = TalkPeer(talk, pb.TalkRequest(start=pb.TalkStart()), PeerSettings())  # type: ignore[arg-type]
    try:
        await peer.answer(page.localDescription.sdp)
        [receiver] = [t.receiver for t in peer._pc.getTransceivers() if t.kind == "audio"]
        buffer = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
        assert buffer._prefetch == PREFETCH_FRAMES == 1
        assert buffer.capacity == 16
    finally:
        await peer.close()
        await page.close()
