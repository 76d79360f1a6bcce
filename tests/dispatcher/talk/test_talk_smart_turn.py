"""Talk's end-of-turn model, in one process against the local audio server: eSpeak NG's
speech, PocketSphinx's recognition, the Smart Turn model installed by
scripts/install-tools.sh.

A phrase with a pause in it (longer than the model's 200 ms, shorter than the silence) is
one turn with SMART_TURN, its transcript whole, where the silence detector with a short
window cuts it in two; an ended sentence ends at the model's word, before the silence
would, and the client sees why (SPEECH_STOPPED's end_reason and end_confidence, the stored
message's metadata); the settings come from the start, else the assistant, else SILENCE
(SMART_TURN at MEDIUM when asked), and a server without the model says it runs SILENCE;
unknown values are refused with the field named. The audio goes in as fast as the stream
takes it: the intake waits for the model's answer at each pause, so what ends a turn is its
audio, not the timing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.audio import pcm
from switchboard.platform.audio.endpoint import SMART_TURN_FILE
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, started
from tests.dispatcher.talk.test_talk import Place, session_of, voice_place, voice_settings
from tests.fakes.audio_server import FakeAudio
from tests.infra.speech import COUNTING, says, speak
from tests.kits.contextkit import context_stub, violations
from tests.kits.dispatchkit import Stub, dispatcher_stub
from tests.kits.modulekit import module_channel_fixture, module_database_url_fixture
from tests.kits.talkkit import Talk, open_talk, refused_talk, silence, start

# One server per backend and one audio server for the module (a server and a model per
# test were a third of its time): each test works in a workspace, users and a
# conversation of its own.
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

MODELS = Path(__file__).resolve().parents[3] / ".tools" / "models"


def spoken(text: str) -> bytes:
    """``text`` spoken by eSpeak NG as PCM16 at 16 kHz, without the quiet around it."""
    samples, rate = pcm.from_wav(speak(text))
    audio = pcm.resample(samples, rate, 16_000)
    values = memoryview(audio).cast("h")
    loud = [i for i, value in enumerate(values) if abs(value) > 300]
    return audio[loud[0] * 2 : (loud[-1] + 1) * 2]


@pytest.fixture(scope="module")
def paused() -> bytes:
    """COUNTING with a 400 ms pause after "two": a phrase the speaker has not finished."""
    return silence(300) + spoken("one two") + silence(400) + spoken("three four five")


@pytest.fixture(scope="module")
def ended() -> bytes:
    return silence(300) + spoken(COUNTING)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def audio_server() -> AsyncIterator[FakeAudio]:
    async with FakeAudio() as fake:
        yield fake


module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(
    module_database_url: str, audio_server: FakeAudio
) -> AsyncIterator[SwitchboardServer]:
    if not (MODELS / SMART_TURN_FILE).is_file():
        pytest.fail(f"no {SMART_TURN_FILE} in {MODELS}: run scripts/install-tools.sh")
    settings = voice_settings(module_database_url, audio_server.url, voice_turn_models=str(MODELS))
    async with started(settings) as server:
        yield server


channel = module_channel_fixture


@pytest.fixture
def stub(channel: aio.Channel) -> Stub:
    return dispatcher_stub(channel)


@pytest_asyncio.fixture(loop_scope="module")
async def place(mesh: SwitchboardServer, channel: aio.Channel) -> Place:
    return await voice_place(mesh, channel)


def smart(place: Place) -> pb.TalkRequest:
    return start(place.conversation, place.assistant, turn_detector=pb.TURN_DETECTOR_SMART_TURN)


def stops(talk: Talk) -> list[pb.TalkEvent]:
    return [
        f.event
        for f in talk.frames
        if f.WhichOneof("frame") == "event" and f.event.kind == pb.TALK_EVENT_KIND_SPEECH_STOPPED
    ]


def finals(talk: Talk) -> list[pb.Transcript]:
    return [
        f.transcript
        for f in talk.frames
        if f.WhichOneof("frame") == "transcript" and f.transcript.final
    ]


async def turns_of(talk: Talk, count: int) -> list[pb.Transcript]:
    """Wait for ``count`` final transcripts (a turn after them would be a third)."""
    await talk.until(lambda _: len(finals(talk)) >= count)
    return finals(talk)


async def test_a_pause_mid_phrase_is_not_the_end_with_smart_turn(
    stub: Stub, place: Place, paused: bytes
) -> None:
    talk = open_talk(stub, place.world.editor, smart(place))
    session = await session_of(talk)
    assert session.turn_detector == pb.TURN_DETECTOR_SMART_TURN
    assert session.turn_eagerness == pb.TURN_EAGERNESS_MEDIUM
    await talk.send_audio(paused + silence(1_500))
    (heard,) = await turns_of(talk, 1)
    assert says(heard.text), heard.text
    assert heard.audio_ms >= pcm.duration_ms(len(paused), 16_000) - 300
    (stopped,) = stops(talk)
    # The model heard the pause and did not end the turn there, nor at its end (the words
    # after the pause do not sound finished to it): the silence did, its last reading kept.
    assert stopped.end_reason == pb.TURN_END_REASON_SILENCE
    assert 0 < stopped.end_confidence < 0.5
    talk.cancel()


async def test_the_silence_detector_with_a_short_window_cuts_the_same_phrase(
    stub: Stub, place: Place, paused: bytes
) -> None:
    request = start(place.conversation, place.assistant)
    request.start.silence.FromMilliseconds(300)
    talk = open_talk(stub, place.world.editor, request)
    session = await session_of(talk)
    # The default detector.
    assert session.turn_detector == pb.TURN_DETECTOR_SILENCE
    assert session.turn_eagerness == pb.TURN_EAGERNESS_UNSPECIFIED
    await talk.send_audio(paused + silence(1_500))
    first, second = await turns_of(talk, 2)
    assert "three" not in first.text.lower()
    assert "one" not in second.text.lower()
    assert [(s.end_reason, s.end_confidence) for s in stops(talk)] == [
        (pb.TURN_END_REASON_SILENCE, 0.0),
        (pb.TURN_END_REASON_SILENCE, 0.0),
    ]
    talk.cancel()


async def test_an_ended_sentence_ends_at_the_models_word_before_the_silence(
    stub: Stub, place: Place, channel: aio.Channel, ended: bytes
) -> None:
    editor = place.world.editor
    talk = open_talk(stub, editor, smart(place))
    await session_of(talk)
    # Only the model can end this turn: 400 ms of silence is less than the window (700 ms).
    await talk.send_audio(ended + silence(400))
    (heard,) = await turns_of(talk, 1)
    assert says(heard.text), heard.text
    (stopped,) = stops(talk)
    assert stopped.end_reason == pb.TURN_END_REASON_MODEL
    assert stopped.end_confidence >= 0.5
    assert heard.audio_ms < pcm.duration_ms(len(ended), 16_000) + 400
    message = (
        await context_stub(channel).GetMessage(
            cpb.GetMessageRequest(name=heard.message), metadata=editor.md, timeout=CALL_DEADLINE_S
        )
    ).message
    voice = message.metadata.fields["voice"].struct_value.fields
    assert voice["end_reason"].string_value == "MODEL"
    assert voice["end_confidence"].number_value == pytest.approx(stopped.end_confidence, abs=1e-3)
    talk.cancel()


async def test_the_assistants_settings_apply_and_the_start_overrides_them(
    stub: Stub, place: Place, channel: aio.Channel
) -> None:
    owner = place.world.owner
    await dispatcher_stub(channel).UpdateAssistant(
        pb.UpdateAssistantRequest(
            assistant=pb.Assistant(
                name=place.assistant,
                voice=pb.VoiceSettings(
                    language="en",
                    turn_detector=pb.TURN_DETECTOR_SMART_TURN,
                    turn_eagerness=pb.TURN_EAGERNESS_LOW,
                ),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["voice"]),
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )
    talk = open_talk(stub, place.world.editor, start(place.conversation, place.assistant))
    session = await session_of(talk)
    assert (session.turn_detector, session.turn_eagerness) == (
        pb.TURN_DETECTOR_SMART_TURN,
        pb.TURN_EAGERNESS_LOW,
    )
    talk.cancel()
    talk = open_talk(
        stub,
        place.world.editor,
        start(place.conversation, place.assistant, turn_eagerness=pb.TURN_EAGERNESS_HIGH),
    )
    assert (await session_of(talk)).turn_eagerness == pb.TURN_EAGERNESS_HIGH
    talk.cancel()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"turn_detector": 9}, "start.turn_detector"),
        ({"turn_eagerness": 9}, "start.turn_eagerness"),
    ],
)
async def test_an_unknown_detector_or_eagerness_is_refused(
    stub: Stub, place: Place, fields: dict[str, int], field: str
) -> None:
    error = await refused_talk(
        stub,
        place.world.editor,
        grpc.StatusCode.INVALID_ARGUMENT,
        start(place.conversation, place.assistant, **fields),
    )
    assert violations(error) == [field]


async def test_an_assistant_with_an_unknown_detector_is_refused(
    place: Place, channel: aio.Channel
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await dispatcher_stub(channel).UpdateAssistant(
            pb.UpdateAssistantRequest(
                assistant=pb.Assistant(
                    name=place.assistant,
                    voice=pb.VoiceSettings(turn_detector=9, turn_eagerness=9),  # type: ignore[arg-type]
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["voice"]),
            ),
            metadata=place.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == [
        "assistant.voice.turn_detector",
        "assistant.voice.turn_eagerness",
    ]
