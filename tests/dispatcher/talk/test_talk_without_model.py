"""Talk on a server without the end-of-turn model (a checkout without scripts/install-tools.sh):
SMART_TURN asked, SILENCE run and said in the session's settings, the turn ended by the
silence alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.audio import pcm
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.dispatcher.talk.test_talk import Place, session_of, voice_place, voice_settings
from tests.fakes.audio_server import FakeAudio
from tests.infra.speech import COUNTING, speak
from tests.kits.dispatchkit import Stub, dispatcher_stub
from tests.kits.talkkit import open_talk, silence, start

pytestmark = pytest.mark.service


@pytest.fixture
async def audio_server() -> AsyncIterator[FakeAudio]:
    async with FakeAudio() as fake:
        yield fake


@pytest.fixture
def settings(database_url: str, audio_server: FakeAudio, tmp_path: Path) -> Settings:
    return voice_settings(database_url, audio_server.url, voice_turn_models=str(tmp_path))


@pytest.fixture
async def place(mesh: SwitchboardServer, channel: aio.Channel) -> Place:
    return await voice_place(mesh, channel)


async def test_smart_turn_asked_without_the_model_runs_silence_and_says_so(
    channel: aio.Channel, place: Place
) -> None:
    stub: Stub = dispatcher_stub(channel)
    talk = open_talk(
        stub,
        place.world.editor,
        start(place.conversation, place.assistant, turn_detector=pb.TURN_DETECTOR_SMART_TURN),
    )
    session = await session_of(talk)
    assert session.turn_detector == pb.TURN_DETECTOR_SILENCE
    assert session.turn_eagerness == pb.TURN_EAGERNESS_UNSPECIFIED
    samples, rate = pcm.from_wav(speak(COUNTING))
    await talk.send_audio(pcm.resample(samples, rate, 16_000) + silence(1_200))
    stopped = await talk.until(
        lambda f: (
            f.WhichOneof("frame") == "event" and f.event.kind == pb.TALK_EVENT_KIND_SPEECH_STOPPED
        )
    )
    assert stopped.event.end_reason == pb.TURN_END_REASON_SILENCE
    assert stopped.event.end_confidence == 0.0
    talk.cancel()
