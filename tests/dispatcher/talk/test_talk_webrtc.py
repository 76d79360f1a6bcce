"""Talk over WebRTC (``talk/webrtc/``): a Python peer (``aiortc``, the stack the server
uses) sends eSpeak NG speech as its microphone track and reads the session's frames on
the ``talk`` data channel and the answer's speech on its inbound track, against a real
Talk session in one process (the local audio server recognizes and speaks, webrtcvad
ends the turn). Bad offers are refused naming the field, and a peer that never connects
is closed and stores nothing."""

from __future__ import annotations

import array
import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.talk.webrtc.media import SpeechTrack, pcm_of
from switchboard.dispatcher.talk.webrtc.peer import CHANNEL, PeerSettings, TalkPeer
from switchboard.platform.audio import pcm
from switchboard.platform.errors import InvalidArgument
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.dispatcher.talk.test_talk import Place, stored_sessions, voice_place, voice_settings
from tests.fakes.audio_server import FakeAudio
from tests.infra.speech import COUNTING, says, speak
from tests.kits.dispatchkit import Stub, dispatcher_stub

pytestmark = pytest.mark.service

WAIT_S = 20.0


@pytest.fixture(scope="module")
def counting() -> bytes:
    samples, rate = pcm.from_wav(speak(COUNTING))
    return pcm.resample(samples, rate, 16_000)


@pytest.fixture
async def audio_server() -> AsyncIterator[FakeAudio]:
    async with FakeAudio() as fake:
        yield fake


@pytest.fixture
def settings(database_url: str, audio_server: FakeAudio) -> Settings:
    return voice_settings(database_url, audio_server.url)


@pytest.fixture
async def place(mesh: SwitchboardServer, channel: aio.Channel) -> Place:
    return await voice_place(mesh, channel)


@dataclass
class Page:
    """The browser's side: its microphone, the frames on the channel, what it heard."""

    pc: RTCPeerConnection
    microphone: SpeechTrack
    frames: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    heard_frames: int = 0
    #: Frames heard whose mean level is that of speech, not of silence.
    voiced_frames: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def until(self, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(WAIT_S):
                while True:
                    for frame in self.frames:
                        if done(frame):
                            return frame
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            raise AssertionError(f"not seen in {WAIT_S:g} s; the frames: {self.frames}") from None

    def kinds(self) -> list[str]:
        return [next(iter(k for k in f if k != "sequence"), "") for f in self.frames]


def page() -> Page:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    microphone = SpeechTrack()
    pc.addTrack(microphone)
    opened = Page(pc, microphone)
    channel = pc.createDataChannel(CHANNEL)

    @channel.on("message")
    def on_message(message: str) -> None:
        opened.frames.append(json.loads(message))
        opened.arrived.set()

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        async def listen() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                samples = array.array("h")
                samples.frombytes(pcm_of(frame))  # type: ignore[arg-type]
                opened.heard_frames += 1
                level = sum(abs(s) for s in samples[::8]) / max(1, len(samples[::8]))
                opened.voiced_frames += level > 200

        opened.tasks.append(asyncio.ensure_future(listen()))

    opened.channel = channel  # type: ignore[attr-defined]
    return opened


def bridged(stub: Stub, place: Place, **settings: Any) -> TalkPeer:
    editor = place.world.editor
    return TalkPeer(
        lambda requests: stub.Talk(requests, metadata=editor.md, timeout=WAIT_S * 2),
        pb.TalkStart(conversation=place.conversation, assistant=place.assistant),
        PeerSettings(**settings),
    )


async def offer_of(opened: Page) -> str:
    await opened.pc.setLocalDescription(await opened.pc.createOffer())
    return str(opened.pc.localDescription.sdp)


async def test_a_spoken_turn_is_answered_with_speech_on_the_track(
    channel: aio.Channel, place: Place, counting: bytes
) -> None:
    stub = dispatcher_stub(channel)
    peer = bridged(stub, place)
    opened = page()
    try:
        answer = await peer.answer(await offer_of(opened))
        await opened.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        session = await opened.until(lambda f: "session" in f)
        assert session["session"]["name"].startswith(place.conversation + "/voiceSessions/")
        # The microphone: the words, then a second of silence to end the turn.
        opened.microphone.push(1, counting + bytes(pcm.byte_count(1500, 16_000)), 16_000)
        heard = await opened.until(lambda f: f.get("transcript", {}).get("final", False))
        assert says(heard["transcript"]["text"]), heard
        run = heard["transcript"]["run"]
        await opened.until(
            lambda f: (
                f.get("update", {}).get("run") == run
                and f["update"].get("stateChange", {}).get("run", {}).get("state")
                == "RUN_STATE_SUCCEEDED"
            )
        )
        spoken = [f for f in opened.frames if "speech" in f.get("update", {})]
        assert spoken, opened.kinds()
        # The speech went on the track, not the channel.
        assert all("audio" not in f["update"]["speech"] for f in spoken)
        async with asyncio.timeout(WAIT_S):
            await peer.speech.drained.wait()
        # All of it went out on the track, and the page heard speech, not silence.
        assert peer.speech.heard_through == int(spoken[-1]["sequence"])
        assert opened.voiced_frames >= 10, (opened.heard_frames, opened.voiced_frames)
        # The page ends the session: the stream ends well and the peer closes.
        opened.channel.send(  # type: ignore[attr-defined]
            json.dumps({"control": {"action": "TALK_ACTION_END_SESSION"}})
        )
        async with asyncio.timeout(WAIT_S):
            await peer.ended.wait()
        assert peer.outcome == ""
    finally:
        await peer.close()
        await opened.pc.close()
        for task in opened.tasks:
            task.cancel()


async def test_offers_that_cannot_start_a_session_are_refused_naming_the_offer(
    channel: aio.Channel, place: Place, mesh: SwitchboardServer
) -> None:
    stub = dispatcher_stub(channel)
    silent = RTCPeerConnection()
    silent.createDataChannel(CHANNEL)
    await silent.setLocalDescription(await silent.createOffer())
    no_audio = str(silent.localDescription.sdp)
    await silent.close()
    opened = page()
    with_audio = await offer_of(opened)
    await opened.pc.close()
    no_opus = "\n".join(line for line in with_audio.splitlines() if "opus" not in line.lower())
    cases = {
        no_audio: "offers no audio",
        no_opus: "offers no Opus audio",
        "hello": "is not an SDP offer",
        "v=0\n" + "a=x\n" * 20_000: "is longer than 64 KiB",
    }
    for offer, expected in cases.items():
        peer = bridged(stub, place)
        with pytest.raises(InvalidArgument) as refused:
            await peer.answer(offer)
        assert [v.field for v in refused.value.violations] == ["offer"]
        assert expected in refused.value.violations[0].description
        await peer.close()
    assert await stored_sessions(mesh) == 0


async def test_a_peer_that_never_connects_is_closed_and_stores_nothing(
    channel: aio.Channel, place: Place, mesh: SwitchboardServer
) -> None:
    stub = dispatcher_stub(channel)
    peer = bridged(stub, place, connect_timeout_s=1.0)
    opened = page()
    try:
        await peer.answer(await offer_of(opened))  # and the page never takes the answer
        async with asyncio.timeout(WAIT_S):
            await peer.ended.wait()
        assert peer.outcome == "the peer did not connect in time"
        assert peer.session == ""
        assert await stored_sessions(mesh) == 0
    finally:
        await peer.close()
        await opened.pc.close()
