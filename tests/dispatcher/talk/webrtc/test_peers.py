"""Talk over WebRTC (``ConnectTalk``, ``talk/webrtc/``): a Python peer (``aiortc``, the stack
the server uses) plays the browser. It sends eSpeak NG speech as its microphone track and
reads the session's frames on the ``talk`` data channel and the answer's speech on its
inbound track, against the real server (the local audio server recognizes and speaks,
webrtcvad ends the turn). Bad offers and starts are refused by the call before any peer; a
peer that never connects, or never opens its channel, is closed and stores nothing; peers
are limited per user; a dropped peer resumes on a new one with nothing repeated or lost,
and a second one for a carried session is refused; speaking over the answer interrupts it;
a page that stops reading ends its peer without losing a frame."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import pytest_asyncio
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from google.protobuf import duration_pb2
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.service import Dispatcher
from switchboard.dispatcher.talk.webrtc import peer as peer_module
from switchboard.dispatcher.talk.webrtc.media import SpeechTrack, pcm_of
from switchboard.dispatcher.talk.webrtc.peer import CHANNEL
from switchboard.dispatcher.talk.webrtc.peers import Peers
from switchboard.platform.audio import pcm
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, built, started
from tests.dispatcher.talk.test_talk import (
    SHORT_ANSWERS,
    Place,
    stored_sessions,
    voice_place,
    voice_settings,
)
from tests.fakes.audio_server import FakeAudio
from tests.infra.speech import COUNTING, says, speak
from tests.kits.contextkit import Caller, refused, violations
from tests.kits.dispatchkit import Stub, dispatcher_stub, eventually
from tests.kits.modulekit import database_beside, module_database_url_fixture

# The module's servers, per backend, are three: one of the default settings whose echo's
# answers are short (``SHORT_ANSWERS``), one whose answers are long (a test that speaks
# over one), one of the peers' limits (``LIMITS``); a server per test was a third of the
# module's time. Each test works in a workspace, users and a conversation of its own, and
# its peers are let go before the next test counts its own. The timeout is a hang guard:
# beside the suite's load one peer's course took past the default 120 s.
pytestmark = [
    pytest.mark.service,
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="module"),
]

#: How long one wait may take (a hang guard). An answer is spoken at the track's pace (the
#: echo's with its note, about 13 s) and a resumed peer is sent it again at that pace: beside the
#: suite's load on two cores a resumed peer's replay ran past 20 s before its run's end.
WAIT_S = 45.0
SUCCEEDED = "RUN_STATE_SUCCEEDED"


#: The settings of the tests of the peers' limits and connect timeout: one peer per user
#: (the page's first peer is the limit), and a page that never connects or never opens
#: its channel let go in ten seconds. The pages that do connect share that deadline: in CI,
#: beside the suite's load on two cores, one took more than two seconds to connect and open
#: its channel (ICE, DTLS and SCTP in Python), and was let go as if it never had.
LIMITS: dict[str, Any] = {"webrtc_max_peers_per_user": 1, "webrtc_connect_timeout_s": 10.0}


@pytest.fixture(scope="module")
def counting() -> bytes:
    samples, rate = pcm.from_wav(speak(COUNTING))
    return pcm.resample(samples, rate, 16_000)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def audio_server() -> AsyncIterator[FakeAudio]:
    async with FakeAudio() as fake:
        yield fake


module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def default_mesh(
    module_database_url: str, audio_server: FakeAudio
) -> AsyncIterator[SwitchboardServer]:
    settings = voice_settings(module_database_url, audio_server.url, **SHORT_ANSWERS)
    async with started(settings) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def limits_mesh(
    request: pytest.FixtureRequest, module_database_url: str, audio_server: FakeAudio
) -> AsyncIterator[SwitchboardServer]:
    async with (
        database_beside(request, module_database_url) as url,
        started(voice_settings(url, audio_server.url, **LIMITS)) as server,
    ):
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def long_mesh(
    request: pytest.FixtureRequest, module_database_url: str, audio_server: FakeAudio
) -> AsyncIterator[SwitchboardServer]:
    async with (
        database_beside(request, module_database_url) as url,
        started(voice_settings(url, audio_server.url)) as server,
    ):
        yield server


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
def long_answers() -> None:
    """Taken by a test that speaks over an answer: its server's echo ends each answer
    with its note on configuring a model, so that the answer to a short question is
    still being spoken when the page speaks again (``SHORT_ANSWERS``)."""


@pytest.fixture
def mesh(
    request: pytest.FixtureRequest, module_database_url: str, settings_overrides: dict[str, Any]
) -> SwitchboardServer:
    """The module's server for the test (three per backend: answers without the echo's
    note, answers with it, and ``LIMITS``)."""
    assert settings_overrides in ({}, LIMITS), settings_overrides
    if settings_overrides:
        name = "limits_mesh"
    elif "long_answers" in request.fixturenames:
        name = "long_mesh"
    else:
        name = "default_mesh"
    server: SwitchboardServer = request.getfixturevalue(name)
    return server


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def peers_let_go(mesh: SwitchboardServer) -> AsyncIterator[None]:
    """After each test, its peers are let go: the next one counts its own."""
    yield
    await eventually(_no_peers(mesh), "the test's peers let go", timeout_s=CALL_DEADLINE_S)


@pytest_asyncio.fixture(loop_scope="module")
async def channel(mesh: SwitchboardServer) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(mesh.address) as chan:
        yield chan


@pytest_asyncio.fixture(loop_scope="module")
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


def page(ice_servers: Sequence[RTCIceServer] = ()) -> Page:
    """A browser's side: its microphone, its ``talk`` channel, its ear on the answer."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers)))
    microphone = SpeechTrack(send_silence=True)  # a microphone sends its silence too
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


async def offer_of(opened: Page) -> str:
    await opened.pc.setLocalDescription(await opened.pc.createOffer())
    return str(opened.pc.localDescription.sdp)


def peers_of(mesh: SwitchboardServer) -> Peers:
    return built(mesh, Dispatcher).peers


async def connect(
    stub: Stub, caller: Caller, opened: Page, **session: Any
) -> pb.ConnectTalkResponse:
    """ConnectTalk with the page's offer; the page takes the answer."""
    connected = await stub.ConnectTalk(
        pb.ConnectTalkRequest(offer=await offer_of(opened), **session),
        metadata=caller.md,
        timeout=WAIT_S,
    )
    await opened.pc.setRemoteDescription(RTCSessionDescription(sdp=connected.answer, type="answer"))
    return connected


def starting(place: Place, **settings: Any) -> dict[str, Any]:
    return {
        "start": pb.TalkStart(
            conversation=place.conversation, assistant=place.assistant, **settings
        )
    }


def numbered(opened: Page) -> list[int]:
    return [int(f["sequence"]) for f in opened.frames if "sequence" in f]


def ended_well(run: str) -> Callable[[dict[str, Any]], bool]:
    def done(frame: dict[str, Any]) -> bool:
        change = frame.get("update", {}).get("stateChange", {}).get("run", {})
        return bool(frame.get("update", {}).get("run") == run and change.get("state") == SUCCEEDED)

    return done


async def closed(opened: Page) -> None:
    await opened.pc.close()
    for task in opened.tasks:
        task.cancel()


async def test_a_spoken_turn_is_answered_with_speech_on_the_track(
    channel: aio.Channel, place: Place, counting: bytes, mesh: SwitchboardServer
) -> None:
    stub = dispatcher_stub(channel)
    opened = page()
    try:
        connected = await connect(stub, place.world.editor, opened, **starting(place))
        assert connected.session == ""  # a new session is named on the channel
        session = await opened.until(lambda f: "session" in f)
        assert session["session"]["name"].startswith(place.conversation + "/voiceSessions/")
        peer = next(iter(peers_of(mesh)))
        # The microphone: the words, then a second of silence to end the turn.
        opened.microphone.push(1, counting + bytes(pcm.byte_count(1500, 16_000)), 16_000)
        heard = await opened.until(lambda f: f.get("transcript", {}).get("final", False))
        assert says(heard["transcript"]["text"]), heard
        run = heard["transcript"]["run"]
        await opened.until(ended_well(run))
        spoken = [f for f in opened.frames if "speech" in f.get("update", {})]
        assert spoken, opened.kinds()
        # The speech went on the track, not the channel.
        assert all("audio" not in f["update"]["speech"] for f in spoken)
        async with asyncio.timeout(WAIT_S):
            await peer.speech.drained.wait()
        # All of it went out on the track, and the page heard speech, not silence.
        assert peer.speech.heard_through == int(spoken[-1]["sequence"])
        assert opened.voiced_frames >= 10, (opened.heard_frames, opened.voiced_frames)
        # The page ends the session: the stream ends well, the peer closes and is let go.
        # What the page sends after that (a frame of its own, and the microphone, which
        # goes on) is not taken for the session: Talk would refuse it, failing the end.
        opened.channel.send(  # type: ignore[attr-defined]
            json.dumps({"control": {"action": "TALK_ACTION_END_SESSION"}})
        )
        opened.channel.send(json.dumps({"text": "and one more thing"}))  # type: ignore[attr-defined]
        async with asyncio.timeout(WAIT_S):
            await peer.ended.wait()
        assert peer.outcome == ""
        await eventually(_no_peers(mesh), "the ended peer let go")
        # Media after the session ended goes nowhere: no turn is stored from it.
        turns = await stored_sessions(mesh, place.world.name)
        opened.microphone.push(2, counting + bytes(pcm.byte_count(1500, 16_000)), 16_000)
        async with asyncio.timeout(WAIT_S):
            while opened.pc.connectionState not in ("closed", "failed"):
                opened.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):  # the page's own state, polled
                        await opened.arrived.wait()
        assert await stored_sessions(mesh, place.world.name) == turns
    finally:
        await closed(opened)


def _peers(mesh: SwitchboardServer, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return peers_of(mesh).open_peers == count

    return check


def _no_peers(mesh: SwitchboardServer) -> Callable[[], Awaitable[bool]]:
    return _peers(mesh, 0)


async def test_offers_and_sessions_that_cannot_start_are_refused_by_the_call(
    channel: aio.Channel, place: Place, mesh: SwitchboardServer
) -> None:
    stub = dispatcher_stub(channel)
    editor = place.world.editor
    silent = RTCPeerConnection()
    silent.createDataChannel(CHANNEL)
    await silent.setLocalDescription(await silent.createOffer())
    no_audio = str(silent.localDescription.sdp)
    await silent.close()
    opened = page()
    with_audio = await offer_of(opened)
    await closed(opened)
    no_opus = "\n".join(line for line in with_audio.splitlines() if "opus" not in line.lower())
    # A microphone and no data channel: its session could never start.
    mute = RTCPeerConnection()
    mute.addTrack(SpeechTrack(send_silence=True))
    await mute.setLocalDescription(await mute.createOffer())
    no_channel = str(mute.localDescription.sdp)
    await mute.close()
    cases = {
        no_audio: "offers no audio",
        no_opus: "offers no Opus audio",
        no_channel: "offers no data channel",
        "hello": "is not an SDP offer",
        "": "is not an SDP offer",
        "v=0\n" + "a=x\n" * 20_000: "is longer than 64 KiB",
    }
    for offer, expected in cases.items():
        error = await refused(
            stub.ConnectTalk(
                pb.ConnectTalkRequest(offer=offer, **starting(place)),
                metadata=editor.md,
                timeout=WAIT_S,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violations(error) == ["offer"]
        assert expected in (error.details() or "")
    # No session named, a malformed session name, and both at once: every field named.
    error = await refused(
        stub.ConnectTalk(pb.ConnectTalkRequest(offer="hello"), metadata=editor.md),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations(error) == ["offer", "session"]
    error = await refused(
        stub.ConnectTalk(
            pb.ConnectTalkRequest(offer=with_audio, resume=pb.TalkResume(session="nope")),
            metadata=editor.md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations(error) == ["resume.session"]
    # Talk's own checks, before any peer: the start's fields, access, the conversation.
    bad_start = pb.TalkStart(
        conversation=place.conversation, silence=duration_pb2.Duration(seconds=60)
    )
    error = await refused(
        stub.ConnectTalk(
            pb.ConnectTalkRequest(offer=with_audio, start=bad_start), metadata=editor.md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations(error) == ["start.silence"]
    for caller, code in (
        (place.world.viewer, grpc.StatusCode.PERMISSION_DENIED),
        (place.world.outsider, grpc.StatusCode.NOT_FOUND),
    ):
        await refused(
            stub.ConnectTalk(
                pb.ConnectTalkRequest(offer=with_audio, **starting(place)), metadata=caller.md
            ),
            code,
        )
    await refused(
        stub.ConnectTalk(pb.ConnectTalkRequest(offer=with_audio, **starting(place))),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    gone = place.conversation + "x"
    await refused(
        stub.ConnectTalk(
            pb.ConnectTalkRequest(
                offer=with_audio, start=pb.TalkStart(conversation=gone, assistant=place.assistant)
            ),
            metadata=editor.md,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert peers_of(mesh).open_peers == 0
    assert await stored_sessions(mesh, place.world.name) == 0


@pytest.mark.parametrize("settings_overrides", [LIMITS])
async def test_a_peer_that_never_connects_is_closed_and_stores_nothing(
    channel: aio.Channel, place: Place, mesh: SwitchboardServer
) -> None:
    stub = dispatcher_stub(channel)
    opened = page()
    try:
        # The page never takes the answer.
        await stub.ConnectTalk(
            pb.ConnectTalkRequest(offer=await offer_of(opened), **starting(place)),
            metadata=place.world.editor.md,
            timeout=WAIT_S,
        )
        peer = next(iter(peers_of(mesh)))
        async with asyncio.timeout(WAIT_S):
            await peer.ended.wait()
        assert peer.outcome == "the peer did not connect in time"
        assert peer.session == ""
        await eventually(_no_peers(mesh), "the peer that never connected let go")
        assert await stored_sessions(mesh, place.world.name) == 0
    finally:
        await closed(opened)


@pytest.mark.parametrize("settings_overrides", [LIMITS])
async def test_peers_are_limited_per_user_and_the_room_comes_back(
    channel: aio.Channel, place: Place, mesh: SwitchboardServer
) -> None:
    stub = dispatcher_stub(channel)
    first, second = page(), page()
    try:
        await stub.ConnectTalk(
            pb.ConnectTalkRequest(offer=await offer_of(first), **starting(place)),
            metadata=place.world.editor.md,
            timeout=WAIT_S,
        )
        offer = await offer_of(second)
        error = await refused(
            stub.ConnectTalk(
                pb.ConnectTalkRequest(offer=offer, **starting(place)),
                metadata=place.world.editor.md,
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert "at most 1 WebRTC peers" in (error.details() or "")
        # Another user is not held back by the editor's peers.
        await connect(stub, place.world.owner, second, **starting(place))
        await second.until(lambda f: "session" in f)
        # The first never connects; once it is closed, the editor has room again.
        await eventually(_peers(mesh, 1), "the unconnected peer let go")
        third = page()
        second.tasks.extend(third.tasks)
        await connect(stub, place.world.editor, third, **starting(place))
        await third.until(lambda f: "session" in f)
        await closed(third)
    finally:
        await closed(first)
        await closed(second)


async def test_a_dropped_peer_resumes_on_a_new_one_with_nothing_repeated_or_lost(
    channel: aio.Channel, place: Place, counting: bytes, mesh: SwitchboardServer
) -> None:
    stub = dispatcher_stub(channel)
    editor = place.world.editor
    first = page()
    try:
        await connect(stub, editor, first, **starting(place))
        session = (await first.until(lambda f: "session" in f))["session"]["name"]
        first.microphone.push(1, counting + bytes(pcm.byte_count(1500, 16_000)), 16_000)
        heard = await first.until(lambda f: f.get("transcript", {}).get("final", False))
        run = heard["transcript"]["run"]
        await first.until(ended_well(run))
        seen = numbered(first)
        # A second peer for a session still carried is refused, naming the session.
        other = page()
        error = await refused(
            stub.ConnectTalk(
                pb.ConnectTalkRequest(
                    offer=await offer_of(other), resume=pb.TalkResume(session=session)
                ),
                metadata=editor.md,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert "carried by another peer" in (error.details() or "")
        await closed(other)
        # The connection drops. Resumed from the transcript's frame, the new peer gets
        # every frame after it again, the same ones, and then carries on.
        await closed(first)
        await eventually(_no_peers(mesh), "the dropped peer let go")
        after = int(heard["sequence"])
        second = page()
        try:
            connected = await connect(
                stub, editor, second, resume=pb.TalkResume(session=session, after_sequence=after)
            )
            assert connected.session == session
            await second.until(ended_well(run))
            again = [s for s in numbered(second) if s <= seen[-1]]
            assert again == [s for s in seen if s > after]
            replayed = {int(f["sequence"]): f for f in second.frames if "sequence" in f}
            for frame in first.frames:
                if "sequence" in frame and int(frame["sequence"]) > after:
                    assert replayed[int(frame["sequence"])] == frame
            # A second turn on the new peer: numbered after everything before.
            second.microphone.push(2, counting + bytes(pcm.byte_count(1500, 16_000)), 16_000)
            turn = await second.until(
                lambda f: (
                    f.get("transcript", {}).get("final", False) and f["transcript"]["run"] != run
                )
            )
            assert int(turn["sequence"]) > seen[-1]
            await second.until(ended_well(turn["transcript"]["run"]))
        finally:
            await closed(second)
    finally:
        await closed(first)


async def test_someone_elses_session_is_not_found_whatever_state_it_is_in(
    channel: aio.Channel, place: Place, mesh: SwitchboardServer
) -> None:
    """A resume of another user's session is NOT_FOUND, the same answer as for a session
    that never was, while a peer carries it and once it has ended: no refusal tells a
    stranger that it exists, is live or is over (the caller's own gets those)."""
    stub = dispatcher_stub(channel)
    editor = place.world.editor
    strangers = (place.world.owner, place.world.viewer, place.world.outsider)
    opened = page()
    try:
        await connect(stub, editor, opened, **starting(place))
        session = (await opened.until(lambda f: "session" in f))["session"]["name"]
        never = session[:-1] + ("0" if session[-1] != "0" else "1")
        peer = next(iter(peers_of(mesh)))

        async def as_absent() -> None:
            for caller in strangers:
                answers = []
                for name in (session, never):
                    other = page()
                    try:
                        error = await refused(
                            stub.ConnectTalk(
                                pb.ConnectTalkRequest(
                                    offer=await offer_of(other),
                                    resume=pb.TalkResume(session=name),
                                ),
                                metadata=caller.md,
                            ),
                            grpc.StatusCode.NOT_FOUND,
                        )
                    finally:
                        await closed(other)
                    answers.append((error.details() or "").replace(name, "<session>"))
                assert answers[0] == answers[1], (caller, answers)

        await as_absent()  # carried by a peer of this process
        opened.channel.send(  # type: ignore[attr-defined]
            json.dumps({"control": {"action": "TALK_ACTION_END_SESSION"}})
        )
        async with asyncio.timeout(WAIT_S):
            await peer.ended.wait()
        await eventually(_no_peers(mesh), "the ended peer let go")
        await as_absent()  # ended
        # Its creator is told.
        again = page()
        try:
            error = await refused(
                stub.ConnectTalk(
                    pb.ConnectTalkRequest(
                        offer=await offer_of(again), resume=pb.TalkResume(session=session)
                    ),
                    metadata=editor.md,
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        finally:
            await closed(again)
        assert "has ended" in (error.details() or "")
        assert peers_of(mesh).open_peers == 0
    finally:
        await closed(opened)


async def test_speaking_over_the_answer_interrupts_it_and_clears_the_track(
    channel: aio.Channel,
    place: Place,
    counting: bytes,
    mesh: SwitchboardServer,
    long_answers: None,
) -> None:
    stub = dispatcher_stub(channel)
    opened = page()
    try:
        await connect(stub, place.world.editor, opened, **starting(place, barge_in=True))
        await opened.until(lambda f: "session" in f)
        peer = next(iter(peers_of(mesh)))
        opened.microphone.push(1, counting + bytes(pcm.byte_count(1500, 16_000)), 16_000)
        heard = await opened.until(lambda f: f.get("transcript", {}).get("final", False))
        run = heard["transcript"]["run"]
        # The answer is being spoken on the track: the person speaks over it.
        await opened.until(lambda f: "speech" in f.get("update", {}))
        opened.microphone.push(2, counting, 16_000)
        interrupted = await opened.until(
            lambda f: f.get("event", {}).get("kind") == "TALK_EVENT_KIND_SPEECH_INTERRUPTED"
        )
        assert interrupted["event"].get("run") == run, interrupted
        # What was queued for the track is dropped: it stops short of the answer's speech.
        spoken = [int(f["sequence"]) for f in opened.frames if "speech" in f.get("update", {})]
        assert peer.speech.heard_through < spoken[-1] or len(spoken) == 1
        cancelled = await opened.until(
            lambda f: (
                f.get("update", {}).get("run") == run
                and f["update"].get("stateChange", {}).get("run", {}).get("state")
                == "RUN_STATE_CANCELLED"
            )
        )
        assert cancelled
    finally:
        await closed(opened)


def page_with_channel(label: str) -> Page:
    """A page whose data channel is not the session's (it offers audio all the same)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    microphone = SpeechTrack(send_silence=True)  # a microphone sends its silence too
    pc.addTrack(microphone)
    pc.createDataChannel(label)
    return Page(pc, microphone)


@pytest.mark.parametrize("settings_overrides", [LIMITS])
async def test_a_page_without_the_talk_channel_is_closed_and_stores_nothing(
    channel: aio.Channel, place: Place, mesh: SwitchboardServer
) -> None:
    stub = dispatcher_stub(channel)
    opened = page_with_channel("chat")
    try:
        await connect(stub, place.world.editor, opened, **starting(place))
        peer = next(iter(peers_of(mesh)))
        async with asyncio.timeout(WAIT_S):
            await peer.ended.wait()
        assert peer.outcome == "the page opened no 'talk' data channel in time"
        await eventually(_no_peers(mesh), "the peer without its channel let go")
        assert await stored_sessions(mesh, place.world.name) == 0
    finally:
        await closed(opened)


async def test_a_page_that_does_not_read_its_channel_ends_the_peer_and_loses_nothing(
    channel: aio.Channel, place: Place, mesh: SwitchboardServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = dispatcher_stub(channel)
    opened = page()
    try:
        await connect(stub, place.world.editor, opened, **starting(place))
        await opened.until(lambda f: "session" in f)
        peer = next(iter(peers_of(mesh)))
        # From now on the channel counts as full: the next frame ends the peer instead.
        monkeypatch.setattr(peer_module, "MAX_BUFFERED_BYTES", -1)
        opened.channel.send(json.dumps({"text": "hello"}))  # type: ignore[attr-defined]
        async with asyncio.timeout(WAIT_S):
            await peer.ended.wait()
        assert peer.outcome == "the page is not reading its data channel"
        await eventually(_no_peers(mesh), "the peer let go")
        session = opened.frames[0]["session"]["name"]
        monkeypatch.undo()
        # The turn's frames were not lost: a new peer resuming from the start gets them.
        again = page()
        try:
            await connect(stub, place.world.editor, again, resume=pb.TalkResume(session=session))
            heard = await again.until(lambda f: f.get("transcript", {}).get("text") == "hello")
            await again.until(ended_well(heard["transcript"]["run"]))
        finally:
            await closed(again)
    finally:
        await closed(opened)


@pytest.mark.parametrize("settings_overrides", [LIMITS])
async def test_calls_made_at_once_each_get_their_own_precise_answer(
    channel: aio.Channel, place: Place, mesh: SwitchboardServer
) -> None:
    """Three of one user's calls at once, under a limit of one: one peer, two refusals
    (each checked before it waited, and again when it came to hold its place); another
    user's call at the same time is answered as if alone."""
    stub = dispatcher_stub(channel)
    pages = [page() for _ in range(4)]
    try:
        offers = [await offer_of(p) for p in pages]
        callers = [place.world.editor] * 3 + [place.world.owner]
        results = await asyncio.gather(
            *(
                stub.ConnectTalk(
                    pb.ConnectTalkRequest(offer=offer, **starting(place)),
                    metadata=caller.md,
                    timeout=WAIT_S,
                )
                for offer, caller in zip(offers, callers, strict=True)
            ),
            return_exceptions=True,
        )
        editors, owners = results[:3], results[3:]
        answered = [r for r in editors if isinstance(r, pb.ConnectTalkResponse)]
        refused_ = [r for r in editors if isinstance(r, aio.AioRpcError)]
        assert len(answered) == 1, results
        assert [r.code() for r in refused_] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        assert all("at most 1 WebRTC peers" in (r.details() or "") for r in refused_)
        assert isinstance(owners[0], pb.ConnectTalkResponse), owners
        assert peers_of(mesh).open_peers == 2
    finally:
        for opened in pages:
            await closed(opened)
    # Neither page took its answer: both peers time out and are let go.
    await eventually(_no_peers(mesh), "the unconnected peers let go")
