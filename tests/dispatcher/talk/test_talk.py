"""Talk, the voice session, in one process against the local audio server: real speech
(eSpeak NG), real recognition (PocketSphinx), real synthesis (eSpeak NG), real turn
detection (webrtcvad).

A typed turn and a spoken turn each become a stored user message (the spoken one with its
recording as a file) and a run whose updates, speech included, come back numbered from the
turn; the spoken answer is recognized as the words asked; the detector ends a spoken turn on
silence; an interrupt, or speech with barge-in, stops the assistant's speech at once and
cancels its run; a failed transcription or a refused message drops the turn and the session
goes on; every bad frame and bad start ends the stream with its precise status and leaves
nothing half-stored; lost access ends the session; an idle session ends DEADLINE_EXCEEDED and
can be resumed, by its creator only, exactly after the last frame seen; the process's session
limits and the longest turn hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc import aio
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.audio import pcm
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import VoiceSessionRow, VoiceTurnRow
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, make_settings, started
from tests.fakes.audio_server import FakeAudio
from tests.infra.speech import COUNTING, says, speak
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import (
    World,
    context_stub,
    create_conversation,
    ctx_world,
    member_name,
    violations,
)
from tests.kits.dispatchkit import Stub, dispatcher_stub, limited
from tests.kits.modulekit import module_channel_fixture, module_database_url_fixture
from tests.kits.talkkit import (
    audio,
    ended,
    frames_of,
    open_talk,
    refused_talk,
    silence,
    start,
    updates_of,
)
from tests.kits.talkkit import control as control_frame

# One server per backend and one audio server for the module (a server per test was
# most of the module's time): each test works in a workspace, users and a conversation of
# its own, and counts only its own workspace's sessions. A test whose subject is a
# setting of the server starts a server of its own (``limited``), on the module's audio
# server.
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

SHIFT = 40


@pytest.fixture(scope="module")
def counting() -> bytes:
    """COUNTING spoken, as PCM16 at 16 kHz."""
    samples, rate = pcm.from_wav(speak(COUNTING))
    return pcm.resample(samples, rate, 16_000)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_audio() -> AsyncIterator[FakeAudio]:
    # One recognizer for the module: PocketSphinx loads its model once.
    async with FakeAudio() as fake:
        yield fake


@pytest.fixture
def audio_server(module_audio: FakeAudio) -> Iterator[FakeAudio]:
    """The module's audio server, left as the next test expects it: nothing held, no
    failure still owed (a test fails more requests than the retries take, and may
    stop with a transcription still held)."""
    yield module_audio
    module_audio.reset()


def voice_settings(database_url: str, url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "voice_url": url,
        "egress_allow_loopback": True,
        "voice_max_sessions_per_user": 2,
        # Sent up to ten seconds ahead of playback, a run is not held for most of its
        # speech, and a long one still is for a while (the tests of a busy conversation):
        # the echo's answers end with a long note where no model is configured (see
        # ``SHORT_ANSWERS``).
        "voice_lead_ms": 10_000,
    }
    values.update(overrides)
    return make_settings(**values)


#: Without a model configured, the echo ends every answer with a note on configuring one:
#: about ten seconds more of speech, which a test that waits for its run's end heard out
#: (past the ten seconds the speech is sent ahead). With one configured (never called:
#: every assistant here is the echo), an answer is its words, spoken in a few seconds.
SHORT_ANSWERS: dict[str, object] = {
    "llm_base_url": "https://llm.invalid/v1",
    "llm_model": "unused",
    "dispatcher_default_handler": "echo",
}

module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(
    module_database_url: str, module_audio: FakeAudio
) -> AsyncIterator[SwitchboardServer]:
    # On SQLite and on a real PostgreSQL server.
    settings = voice_settings(module_database_url, module_audio.url, **SHORT_ANSWERS)
    async with started(settings) as server:
        yield server


channel = module_channel_fixture


class Place:
    """A workspace with a voice assistant (echo) and a conversation."""

    def __init__(self, world: World, assistant: str, conversation: str) -> None:
        self.world = world
        self.assistant = assistant
        self.conversation = conversation


async def voice_place(
    mesh: SwitchboardServer, channel: aio.Channel, *, voice: bool = True
) -> Place:
    cstub = context_stub(channel)
    world = await ctx_world(mesh, cstub)
    assistant = pb.Assistant(display_name="Voice", handler="handlers/echo")
    if voice:
        assistant.voice.CopyFrom(pb.VoiceSettings(language="en"))
    created = await dispatcher_stub(channel).CreateAssistant(
        pb.CreateAssistantRequest(parent=world.name, assistant=assistant),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    conversation = (await create_conversation(cstub, world.owner, world.name)).name
    return Place(world, created.assistant.name, conversation)


@pytest.fixture
def stub(channel: aio.Channel) -> Stub:
    return dispatcher_stub(channel)


@pytest_asyncio.fixture(loop_scope="module")
async def place(mesh: SwitchboardServer, channel: aio.Channel) -> Place:
    return await voice_place(mesh, channel)


async def stored_sessions(server: SwitchboardServer, workspace: str) -> int:
    """Voice sessions and turns stored in ``workspace``: a refused start leaves neither."""
    workspace_id = workspace.removeprefix("workspaces/")

    def count(db: Session) -> int:
        sessions = db.execute(
            select(func.count())
            .select_from(VoiceSessionRow)
            .where(VoiceSessionRow.workspace_id == workspace_id)
        ).scalar_one()
        turns = db.execute(
            select(func.count())
            .select_from(VoiceTurnRow)
            .join(VoiceSessionRow, VoiceTurnRow.session_id == VoiceSessionRow.id)
            .where(VoiceSessionRow.workspace_id == workspace_id)
        ).scalar_one()
        return int(sessions) + int(turns)

    return await server.shared.database.run(count, write=False)


async def session_of(talk: Any) -> pb.VoiceSession:
    frame = await talk.next()
    assert frame is not None
    assert frame.WhichOneof("frame") == "session", talk.kinds()
    return frame.session  # type: ignore[no-any-return]


# -- a typed turn ---------------------------------------------------------------------------


async def test_a_typed_turn_is_a_message_and_a_run_numbered_from_its_turn(
    stub: Stub, place: Place, channel: aio.Channel
) -> None:
    editor = place.world.editor
    talk = open_talk(stub, editor, start(place.conversation, place.assistant))
    session = await session_of(talk)
    assert session.name.startswith(place.conversation + "/voiceSessions/")
    assert session.assistant == place.assistant
    assert session.input_format.sample_rate_hz == 16_000
    assert session.output_format.sample_rate_hz == 24_000
    assert session.turn_detection == pb.TURN_DETECTION_SERVER_VAD
    assert session.silence.ToMilliseconds() == 700
    assert session.concurrency_policy == pb.CONCURRENCY_POLICY_INTERRUPT

    await talk.send(pb.TalkRequest(text="hello there"))
    transcript = await talk.until(lambda f: f.WhichOneof("frame") == "transcript")
    assert transcript.sequence == 1 << SHIFT
    assert transcript.transcript.final
    assert transcript.transcript.turn == 1
    assert transcript.transcript.text == "hello there"
    assert transcript.transcript.recording == ""
    run = transcript.transcript.run
    last = await talk.until(ended)
    assert last.update.state_change.run.state == pb.RUN_STATE_SUCCEEDED
    relayed = updates_of(talk.frames, run)
    assert [f.sequence for f in relayed] == [(1 << SHIFT) + f.update.sequence for f in relayed]
    answer = "".join(
        f.update.delta.text for f in relayed if f.update.WhichOneof("update") == "delta"
    )
    assert "hello there" in answer

    message = await context_stub(channel).GetMessage(
        cpb.GetMessageRequest(name=transcript.transcript.message),
        metadata=editor.md,
        timeout=CALL_DEADLINE_S,
    )
    assert message.message.parts[0].text == "hello there"
    voice = message.message.metadata.fields["voice"].struct_value.fields
    assert voice["session"].string_value == session.name
    assert voice["turn"].number_value == 1

    # END_SESSION: what is owed goes out, the stream ends OK, the session is over.
    await talk.send(control_frame(pb.TALK_ACTION_END_SESSION))
    assert await talk.rest() == []
    error = await refused_talk(
        stub,
        editor,
        grpc.StatusCode.FAILED_PRECONDITION,
        pb.TalkRequest(resume=pb.TalkResume(session=session.name)),
    )
    assert reason(error) == "ERROR_REASON_SESSION_ENDED"


# -- a spoken turn, spoken back -------------------------------------------------------------


async def test_a_spoken_question_becomes_a_message_and_a_spoken_answer(
    stub: Stub, place: Place, channel: aio.Channel, counting: bytes, audio_server: FakeAudio
) -> None:
    editor = place.world.editor
    talk = open_talk(
        stub, editor, start(place.conversation, place.assistant, partial_transcripts=True)
    )
    session = await session_of(talk)
    # As a microphone sends it: 20 ms at a time, in real time, then silence.
    for frame in frames_of(silence(300) + counting + silence(1_200), 16_000):
        await talk.send(audio(frame))
        await asyncio.sleep(0.02)  # the pace of speech, not a wait for the server
    final = await talk.until(lambda f: f.WhichOneof("frame") == "transcript" and f.transcript.final)
    heard = final.transcript
    assert says(heard.text), heard.text
    assert heard.turn == 1
    assert final.sequence == 1 << SHIFT
    assert heard.recording.startswith(place.world.name + "/files/")
    assert 2_500 <= heard.audio_ms <= 6_000
    kinds = talk.kinds()
    assert kinds.index("event:TALK_EVENT_KIND_SPEECH_STARTED") < kinds.index(
        "event:TALK_EVENT_KIND_SPEECH_STOPPED"
    )
    assert "transcript:partial" in kinds
    partial = next(f for f in talk.frames if f.WhichOneof("frame") == "transcript")
    assert partial.sequence == 0
    assert not partial.transcript.final

    # The stored user message: the words, and the recording as a file.
    message = (
        await context_stub(channel).GetMessage(
            cpb.GetMessageRequest(name=heard.message), metadata=editor.md, timeout=CALL_DEADLINE_S
        )
    ).message
    assert message.parts[0].text == heard.text
    assert message.parts[1].file.file == heard.recording
    assert message.parts[1].file.mime_type in ("audio/wav", "audio/x-wav")
    assert message.parts[1].file.display_name == "turn-1.wav"
    voice = message.metadata.fields["voice"].struct_value.fields
    assert voice["session"].string_value == session.name
    assert voice["audio_ms"].number_value == heard.audio_ms

    # The echo's answer comes back spoken, and its first sentence says the words again.
    last = await talk.until(ended)
    assert last.update.state_change.run.state == pb.RUN_STATE_SUCCEEDED
    relayed = updates_of(talk.frames, heard.run)
    assert [f.sequence for f in relayed] == [(1 << SHIFT) + f.update.sequence for f in relayed]
    first = b"".join(
        f.update.speech.audio
        for f in relayed
        if f.update.WhichOneof("update") == "speech" and f.update.speech.segment == 0
    )
    rate = next(
        f.update.speech.format.sample_rate_hz
        for f in relayed
        if f.update.WhichOneof("update") == "speech"
    )
    assert rate == 24_000
    spoken, _ = await asyncio.to_thread(audio_server.recognizer.transcribe, pcm.to_wav(first, rate))
    assert says(spoken), spoken
    talk.cancel()


def _transcript(final: bool) -> Any:
    return lambda f: f.WhichOneof("frame") == "transcript" and f.transcript.final is final


async def _a_turn_with_both_transcriptions_held(
    stub: Stub, place: Place, counting: bytes, audio_server: FakeAudio
) -> Any:
    """A spoken turn whose partial (asked at its first second) and final
    transcriptions the recognizer holds, both asked: a recognizer slower than speech."""
    audio_server.hold()
    talk = open_talk(
        stub,
        place.world.editor,
        start(place.conversation, place.assistant, partial_transcripts=True),
    )
    await session_of(talk)
    # Sent as fast as it goes: partials count the turn's audio, not the clock.
    for frame in frames_of(silence(300) + counting + silence(1_200), 16_000):
        await talk.send(audio(frame))
    await talk.until(
        lambda f: (
            f.WhichOneof("frame") == "event" and f.event.kind == pb.TALK_EVENT_KIND_SPEECH_STOPPED
        )
    )
    await asyncio.wait_for(audio_server.held(2), CALL_DEADLINE_S)
    assert "transcript:partial" not in talk.kinds()
    return talk


async def test_a_partial_still_transcribing_when_its_turn_ends_comes_before_its_final(
    stub: Stub, place: Place, counting: bytes, audio_server: FakeAudio
) -> None:
    talk = await _a_turn_with_both_transcriptions_held(stub, place, counting, audio_server)
    # The partial answers after its turn ended, but before the final: it is said.
    audio_server.release(0)
    partial = await talk.until(_transcript(final=False))
    assert partial.transcript.turn == 1
    assert partial.transcript.text
    assert 1_000 <= partial.transcript.audio_ms < 2_000
    audio_server.release(0)
    final = await talk.until(_transcript(final=True))
    assert final.transcript.turn == 1
    assert says(final.transcript.text), final.transcript.text
    kinds = talk.kinds()
    assert kinds.count("transcript:partial") == 1
    assert kinds.index("transcript:partial") < kinds.index("transcript:final")
    assert (await talk.until(ended)).update.state_change.run.state == pb.RUN_STATE_SUCCEEDED
    await talk.send(control_frame(pb.TALK_ACTION_END_SESSION))
    await talk.rest()


async def test_a_partial_slower_than_its_turns_final_transcript_is_never_said(
    stub: Stub, place: Place, counting: bytes, audio_server: FakeAudio
) -> None:
    talk = await _a_turn_with_both_transcriptions_held(stub, place, counting, audio_server)
    # The final answers first; the partial, let through after it, would only mislead.
    audio_server.release(1)
    final = await talk.until(_transcript(final=True))
    assert says(final.transcript.text), final.transcript.text
    audio_server.release(0)
    assert (await talk.until(ended)).update.state_change.run.state == pb.RUN_STATE_SUCCEEDED
    await talk.send(control_frame(pb.TALK_ACTION_END_SESSION))
    await talk.rest()
    assert "transcript:partial" not in talk.kinds(), talk.kinds()


async def test_silence_alone_is_no_turn_and_end_turn_without_one_is_empty(
    stub: Stub, place: Place, mesh: SwitchboardServer
) -> None:
    talk = open_talk(stub, place.world.editor, start(place.conversation, place.assistant))
    await session_of(talk)
    await talk.send_audio(silence(2_000))
    await talk.send(control_frame(pb.TALK_ACTION_END_TURN))
    empty = await talk.until(lambda f: f.WhichOneof("frame") == "event")
    assert empty.event.kind == pb.TALK_EVENT_KIND_TURN_EMPTY
    assert empty.event.turn == 1
    assert empty.sequence == 0
    talk.half_close()
    assert await talk.rest() == []
    assert not [f for f in talk.frames if f.WhichOneof("frame") == "transcript"]
    assert await stored_sessions(mesh, place.world.name) == 1  # the session, and no turn


async def test_client_detection_ignores_audio_outside_a_turn(stub: Stub, place: Place) -> None:
    talk = open_talk(
        stub,
        place.world.editor,
        start(place.conversation, place.assistant, turn_detection=pb.TURN_DETECTION_CLIENT),
    )
    await session_of(talk)
    await talk.send_audio(silence(1_000))  # outside a turn: not taken
    await talk.send(control_frame(pb.TALK_ACTION_END_TURN))
    await talk.send(control_frame(pb.TALK_ACTION_START_TURN))
    await talk.send(control_frame(pb.TALK_ACTION_END_TURN))  # a turn without audio
    for _ in range(2):
        empty = await talk.until(lambda f: f.WhichOneof("frame") in ("event", "error"))
        assert empty.event.kind == pb.TALK_EVENT_KIND_TURN_EMPTY, empty
    talk.half_close()
    assert await talk.rest() == []
    assert talk.kinds() == ["session", *["event:TALK_EVENT_KIND_TURN_EMPTY"] * 2]


# -- barge-in ------------------------------------------------------------------------------

#: An answer spoken for about half a minute: its run is still sending speech, at least
#: fifteen seconds ahead of its end, when the test stops or speaks over it.
LONG = "one two three four five six seven eight nine ten. " * 6


def first_speech(frame: pb.TalkResponse) -> bool:
    return frame.WhichOneof("frame") == "update" and frame.update.WhichOneof("update") == "speech"


def after_interrupt(frames: list[pb.TalkResponse], run: str) -> list[str]:
    """What went out for ``run`` after its SPEECH_INTERRUPTED event."""
    index = next(
        i
        for i, f in enumerate(frames)
        if f.WhichOneof("frame") == "event"
        and f.event.kind == pb.TALK_EVENT_KIND_SPEECH_INTERRUPTED
        and f.event.run == run
    )
    return [
        f.update.WhichOneof("update") or ""
        for f in frames[index + 1 :]
        if f.WhichOneof("frame") == "update" and f.update.run == run
    ]


async def test_an_interrupt_stops_the_speech_at_once_and_cancels_the_run(
    stub: Stub, place: Place
) -> None:
    talk = open_talk(stub, place.world.editor, start(place.conversation, place.assistant))
    await session_of(talk)
    await talk.send(pb.TalkRequest(text=LONG))
    transcript = await talk.until(lambda f: f.WhichOneof("frame") == "transcript")
    run = transcript.transcript.run
    heard = await talk.until(first_speech)
    await talk.send(control_frame(pb.TALK_ACTION_INTERRUPT, heard.sequence))
    last = await talk.until(ended)
    assert last.update.state_change.run.state == pb.RUN_STATE_CANCELLED
    after = after_interrupt(talk.frames, run)
    assert "speech" not in after, after
    assert after[-1] == "state_change"
    talk.cancel()


async def test_speech_interrupts_the_assistant_with_barge_in(
    stub: Stub, place: Place, counting: bytes
) -> None:
    talk = open_talk(
        stub, place.world.editor, start(place.conversation, place.assistant, barge_in=True)
    )
    await session_of(talk)
    await talk.send(pb.TalkRequest(text=LONG))
    transcript = await talk.until(lambda f: f.WhichOneof("frame") == "transcript")
    run = transcript.transcript.run
    await talk.until(first_speech)
    await talk.send_audio(counting + silence(1_200))
    interrupted = await talk.until(
        lambda f: (
            f.WhichOneof("frame") == "event"
            and f.event.kind == pb.TALK_EVENT_KIND_SPEECH_INTERRUPTED
        )
    )
    assert interrupted.event.run == run
    # The user's words are the next turn; the interrupted run ended without more speech.
    second = await talk.until(
        lambda f: f.WhichOneof("frame") == "transcript" and f.transcript.final
    )
    assert second.transcript.turn == 2
    assert says(second.transcript.text)
    assert "speech" not in after_interrupt(talk.frames, run)
    ends = [f for f in updates_of(talk.frames, run) if ended(f)]
    assert ends[-1].update.state_change.run.state == pb.RUN_STATE_CANCELLED
    talk.cancel()


async def test_a_frame_after_end_session_is_session_ended(stub: Stub, place: Place) -> None:
    talk = open_talk(stub, place.world.editor, start(place.conversation, place.assistant))
    await session_of(talk)
    await talk.send(pb.TalkRequest(text=LONG))
    await talk.until(first_speech)  # the answer is still being spoken: a run is owed
    await talk.send(control_frame(pb.TALK_ACTION_END_SESSION), audio(silence(20)))
    error = await talk.failure()
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(error) == "ERROR_REASON_SESSION_ENDED"


async def test_a_failed_transcription_drops_the_turn_and_the_session_goes_on(
    stub: Stub, place: Place, audio_server: FakeAudio, counting: bytes, mesh: SwitchboardServer
) -> None:
    talk = open_talk(stub, place.world.editor, start(place.conversation, place.assistant))
    await session_of(talk)
    audio_server.fail_next(503, count=10)  # past every retry
    await talk.send_audio(counting + silence(1_200))
    failed = await talk.until(lambda f: f.WhichOneof("frame") == "error")
    assert failed.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in failed.error.details)
    assert info.reason == "ERROR_REASON_SPEECH_UNAVAILABLE"
    assert await stored_sessions(mesh, place.world.name) == 1  # the session, no turn
    # The next turn is taken as the first.
    await talk.send(pb.TalkRequest(text="and now in writing"))
    transcript = await talk.until(lambda f: f.WhichOneof("frame") == "transcript")
    assert transcript.transcript.turn == 1
    talk.cancel()


async def test_a_refused_message_drops_the_turn_with_its_status(
    stub: Stub, place: Place, mesh: SwitchboardServer
) -> None:
    talk = open_talk(
        stub,
        place.world.editor,
        start(
            place.conversation,
            place.assistant,
            concurrency_policy=pb.CONCURRENCY_POLICY_REJECT,
        ),
    )
    await session_of(talk)
    await talk.send(pb.TalkRequest(text=LONG))
    heard = await talk.until(first_speech)  # the first answer is still being spoken
    await talk.send(pb.TalkRequest(text="a second question"))
    refused = await talk.until(lambda f: f.WhichOneof("frame") == "error")
    assert refused.error.code == grpc.StatusCode.ABORTED.value[0]
    assert refused.sequence == 0
    # Stopped rather than heard out: its speech plays in real time (a quarter minute more).
    await talk.send(control_frame(pb.TALK_ACTION_INTERRUPT, heard.sequence))
    await talk.until(ended)
    talk.half_close()
    await talk.rest()
    assert [f.transcript.turn for f in talk.frames if f.WhichOneof("frame") == "transcript"] == [1]
    assert await stored_sessions(mesh, place.world.name) == 2  # the session and its one turn


# -- bad starts: precise errors, nothing stored ------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (
            {"input_format": pb.AudioFormat(sample_rate_hz=44_100)},
            "start.input_format.sample_rate_hz",
        ),
        (
            {"output_format": pb.AudioFormat(sample_rate_hz=11_025)},
            "start.output_format.sample_rate_hz",
        ),
        ({"input_format": pb.AudioFormat(encoding=7)}, "start.input_format.encoding"),  # type: ignore[arg-type]
        ({"turn_detection": 9}, "start.turn_detection"),
        ({"concurrency_policy": 9}, "start.concurrency_policy"),
    ],
)
async def test_a_bad_start_is_invalid_argument_naming_the_field(
    stub: Stub, place: Place, mesh: SwitchboardServer, fields: dict[str, Any], field: str
) -> None:
    error = await refused_talk(
        stub,
        place.world.editor,
        grpc.StatusCode.INVALID_ARGUMENT,
        start(place.conversation, place.assistant, **fields),
    )
    assert violations(error) == [field]
    assert await stored_sessions(mesh, place.world.name) == 0


@pytest.mark.parametrize("ms", [100, 6_000])
async def test_silence_must_be_200_ms_to_5_s(stub: Stub, place: Place, ms: int) -> None:
    request = start(place.conversation, place.assistant)
    request.start.silence.FromMilliseconds(ms)
    error = await refused_talk(stub, place.world.editor, grpc.StatusCode.INVALID_ARGUMENT, request)
    assert violations(error) == ["start.silence"]


async def test_the_first_frame_must_be_start_or_resume(stub: Stub, place: Place) -> None:
    error = await refused_talk(
        stub, place.world.editor, grpc.StatusCode.INVALID_ARGUMENT, pb.TalkRequest(text="hi")
    )
    assert violations(error) == ["frame"]


async def test_access_to_the_conversation_is_checked_at_start(
    stub: Stub, place: Place, mesh: SwitchboardServer
) -> None:
    await refused_talk(
        stub,
        place.world.viewer,
        grpc.StatusCode.PERMISSION_DENIED,
        start(place.conversation, place.assistant),
    )
    await refused_talk(
        stub,
        place.world.outsider,
        grpc.StatusCode.NOT_FOUND,
        start(place.conversation, place.assistant),
    )
    await refused_talk(
        stub,
        place.world.editor,
        grpc.StatusCode.NOT_FOUND,
        start(place.world.name + "/conversations/nosuchconversation", place.assistant),
    )
    assert await stored_sessions(mesh, place.world.name) == 0


async def test_an_assistant_without_voice_is_speech_not_configured(
    mesh: SwitchboardServer, channel: aio.Channel, stub: Stub
) -> None:
    mute = await voice_place(mesh, channel, voice=False)
    error = await refused_talk(
        stub,
        mute.world.editor,
        grpc.StatusCode.FAILED_PRECONDITION,
        start(mute.conversation, mute.assistant),
    )
    assert reason(error) == "ERROR_REASON_SPEECH_NOT_CONFIGURED"
    info = detail(error, error_details_pb2.ErrorInfo)
    assert info.metadata["assistant"] == mute.assistant
    # No assistant named and no default one: the same.
    error = await refused_talk(
        stub, mute.world.editor, grpc.StatusCode.FAILED_PRECONDITION, start(mute.conversation)
    )
    assert reason(error) == "ERROR_REASON_SPEECH_NOT_CONFIGURED"
    assert await stored_sessions(mesh, mute.world.name) == 0


async def test_a_server_without_a_speech_endpoint_is_speech_not_configured(
    database_url: str,
) -> None:
    async with limited(database_url=database_url) as (server, _context, dstub):
        async with aio.insecure_channel(server.address) as channel:
            place = await voice_place(server, channel)
        error = await refused_talk(
            dstub,
            place.world.editor,
            grpc.StatusCode.FAILED_PRECONDITION,
            start(place.conversation, place.assistant),
        )
        assert reason(error) == "ERROR_REASON_SPEECH_NOT_CONFIGURED"
        assert "SWITCHBOARD_VOICE_URL" in (error.details() or "")


async def test_a_session_ends_when_its_user_loses_the_conversation(
    stub: Stub, place: Place, channel: aio.Channel
) -> None:
    editor = place.world.editor
    talk = open_talk(stub, editor, start(place.conversation, place.assistant))
    await session_of(talk)
    await context_stub(channel).RemoveWorkspaceMember(
        cpb.RemoveWorkspaceMemberRequest(name=member_name(place.world.name, editor)),
        metadata=place.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    error = await talk.failure()
    assert error.code() == grpc.StatusCode.NOT_FOUND


# -- bad frames end the session --------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code", "field"),
    [
        (
            pb.TalkRequest(audio=pb.AudioChunk(data=bytes(65_538))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio.data",
        ),
        (
            pb.TalkRequest(audio=pb.AudioChunk(data=bytes(641))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio.data",
        ),
        (pb.TalkRequest(start=pb.TalkStart()), grpc.StatusCode.INVALID_ARGUMENT, "start"),
        (
            pb.TalkRequest(control=pb.TalkControl()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "control.action",
        ),
        (pb.TalkRequest(), grpc.StatusCode.INVALID_ARGUMENT, "frame"),
    ],
)
async def test_a_bad_frame_ends_the_session_for_good(
    stub: Stub, place: Place, frame: pb.TalkRequest, code: grpc.StatusCode, field: str
) -> None:
    editor = place.world.editor
    talk = open_talk(stub, editor, start(place.conversation, place.assistant))
    session = await session_of(talk)
    await talk.send(pb.TalkRequest(audio=pb.AudioChunk(data=silence(20))), frame)
    error = await talk.failure()
    assert error.code() == code
    assert violations(error) == [field]
    assert not [f for f in talk.frames if f.WhichOneof("frame") == "transcript"]
    error = await refused_talk(
        stub,
        editor,
        grpc.StatusCode.FAILED_PRECONDITION,
        pb.TalkRequest(resume=pb.TalkResume(session=session.name)),
    )
    assert reason(error) == "ERROR_REASON_SESSION_ENDED"


# -- idleness and resume ---------------------------------------------------------------------


async def test_an_idle_session_ends_deadline_exceeded_and_resumes(
    database_url: str, audio_server: FakeAudio
) -> None:
    async with limited(
        database_url=database_url,
        voice_url=audio_server.url,
        egress_allow_loopback=True,
        voice_idle_timeout_s=1.0,
        # The answer is sent ahead of playback, not at its pace.
        voice_lead_ms=10_000,
        **SHORT_ANSWERS,
    ) as (server, _context, dstub):
        async with aio.insecure_channel(server.address) as channel:
            place = await voice_place(server, channel)
        editor = place.world.editor
        talk = open_talk(dstub, editor, start(place.conversation, place.assistant))
        session = await session_of(talk)
        error = await talk.failure()
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert reason(error) == "ERROR_REASON_SESSION_IDLE"
        info = detail(error, error_details_pb2.ErrorInfo)
        assert info.metadata["idle_seconds"] == "1"

        again = open_talk(dstub, editor, pb.TalkRequest(resume=pb.TalkResume(session=session.name)))
        resumed = await session_of(again)
        assert resumed.name == session.name
        await again.send(pb.TalkRequest(text="still here"))
        transcript = await again.until(lambda f: f.WhichOneof("frame") == "transcript")
        assert transcript.transcript.turn == 1
        await again.until(ended)
        again.cancel()

        # Only its creator may resume it; to anyone else it does not exist.
        await refused_talk(
            dstub,
            place.world.owner,
            grpc.StatusCode.NOT_FOUND,
            pb.TalkRequest(resume=pb.TalkResume(session=session.name)),
        )


async def test_someone_elses_session_is_not_found_whatever_state_it_is_in(
    stub: Stub, place: Place
) -> None:
    """Whose session a resume names is the first thing checked: for anyone but its
    creator (an owner, a viewer, a stranger to the workspace) it is NOT_FOUND as a
    session that never was, open or ended, and whatever the resume asks of it."""
    editor = place.world.editor
    talk = open_talk(stub, editor, start(place.conversation, place.assistant))
    session = (await session_of(talk)).name
    never = session[:-1] + ("0" if session[-1] != "0" else "1")

    async def as_absent(**resume: Any) -> None:
        for caller in (place.world.owner, place.world.viewer, place.world.outsider):
            answers = []
            for name in (session, never):
                error = await refused_talk(
                    stub,
                    caller,
                    grpc.StatusCode.NOT_FOUND,
                    pb.TalkRequest(resume=pb.TalkResume(session=name, **resume)),
                )
                answers.append((error.details() or "").replace(name, "<session>"))
            assert answers[0] == answers[1], answers

    await as_absent()  # open on its stream
    await as_absent(after_sequence=99 << SHIFT)  # past its last turn
    await talk.send(control_frame(pb.TALK_ACTION_END_SESSION))
    assert await talk.rest() == []
    await as_absent()  # ended
    error = await refused_talk(
        stub,
        editor,
        grpc.StatusCode.FAILED_PRECONDITION,
        pb.TalkRequest(resume=pb.TalkResume(session=session)),
    )
    assert reason(error) == "ERROR_REASON_SESSION_ENDED"


async def test_a_resume_continues_after_the_last_frame_seen(stub: Stub, place: Place) -> None:
    editor = place.world.editor
    talk = open_talk(stub, editor, start(place.conversation, place.assistant))
    session = await session_of(talk)
    await talk.send(pb.TalkRequest(text="first turn words"))
    await talk.until(ended)
    await talk.send(pb.TalkRequest(text="second turn words"))
    await talk.until(ended)
    talk.cancel()
    numbered = [f for f in talk.frames if f.sequence]
    assert [f.sequence for f in numbered] == sorted({f.sequence for f in numbered})

    # Resumed after a frame in the middle of the first run: the rest, once each.
    cut = next(i for i, f in enumerate(numbered) if f.WhichOneof("frame") == "update") + 1
    again = open_talk(
        stub,
        editor,
        pb.TalkRequest(
            resume=pb.TalkResume(session=session.name, after_sequence=numbered[cut - 1].sequence)
        ),
    )
    resumed = await session_of(again)
    assert resumed.turn_count == 2
    replayed: list[pb.TalkResponse] = []
    while len(replayed) < len(numbered) - cut:
        frame = await again.next()
        assert frame is not None
        if frame.sequence:
            replayed.append(frame)
    assert [f.SerializeToString() for f in replayed] == [
        f.SerializeToString() for f in numbered[cut:]
    ]
    again.cancel()


# -- limits ----------------------------------------------------------------------------------


async def test_sessions_per_user_are_limited(stub: Stub, place: Place) -> None:
    editor = place.world.editor
    held = [open_talk(stub, editor, start(place.conversation, place.assistant)) for _ in range(2)]
    for talk in held:
        await session_of(talk)
    error = await refused_talk(
        stub, editor, grpc.StatusCode.RESOURCE_EXHAUSTED, start(place.conversation, place.assistant)
    )
    assert "2 voice sessions" in (error.details() or "")
    # Another user is not bound by this one's sessions.
    other = open_talk(stub, place.world.owner, start(place.conversation, place.assistant))
    await session_of(other)
    for talk in (*held, other):
        talk.cancel()


async def test_sessions_in_the_process_are_limited_and_a_turn_at_its_limit_ends_there(
    database_url: str, audio_server: FakeAudio, counting: bytes
) -> None:
    async with limited(
        database_url=database_url,
        voice_url=audio_server.url,
        egress_allow_loopback=True,
        voice_max_sessions=1,
        voice_max_turn_s=1.0,
    ) as (server, _context, dstub):
        async with aio.insecure_channel(server.address) as channel:
            place = await voice_place(server, channel)
        talk = open_talk(
            dstub,
            place.world.editor,
            start(place.conversation, place.assistant, turn_detection=pb.TURN_DETECTION_CLIENT),
        )
        await session_of(talk)
        error = await refused_talk(
            dstub,
            place.world.owner,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            start(place.conversation, place.assistant),
        )
        assert "at most 1 voice sessions" in (error.details() or "")

        # Three seconds of speech in a turn the client never ends: it ends at one.
        await talk.send(control_frame(pb.TALK_ACTION_START_TURN))
        await talk.send_audio(counting)
        final = await talk.until(
            lambda f: f.WhichOneof("frame") == "transcript" and f.transcript.final
        )
        assert final.transcript.audio_ms == 1_000
        talk.cancel()


async def test_a_detected_turn_at_the_longest_says_it_stopped_there(
    database_url: str, audio_server: FakeAudio, counting: bytes
) -> None:
    """With the server's detection, a turn that reaches the longest turn ends with
    SPEECH_STOPPED saying MAX_LENGTH, as one the silence ends says SILENCE: a client
    that shows "listening" from SPEECH_STARTED learns the turn was cut."""
    async with limited(
        database_url=database_url,
        voice_url=audio_server.url,
        egress_allow_loopback=True,
        voice_max_turn_s=1.0,
    ) as (server, _context, dstub):
        async with aio.insecure_channel(server.address) as channel:
            place = await voice_place(server, channel)
        talk = open_talk(dstub, place.world.editor, start(place.conversation, place.assistant))
        await session_of(talk)
        await talk.send_audio(counting)
        stopped = await talk.until(
            lambda f: (
                f.WhichOneof("frame") == "event"
                and f.event.kind == pb.TALK_EVENT_KIND_SPEECH_STOPPED
            )
        )
        assert stopped.event.end_reason == pb.TURN_END_REASON_MAX_LENGTH
        final = await talk.until(
            lambda f: f.WhichOneof("frame") == "transcript" and f.transcript.final
        )
        assert final.transcript.audio_ms <= 1_000 + 300  # with the speech just before it
        talk.cancel()


# -- an assistant's revision ----------------------------------------------------------------


async def test_a_session_pinned_at_a_revision_answers_with_it_and_keeps_it(
    stub: Stub, place: Place
) -> None:
    owner, editor = place.world.owner, place.world.editor
    made = (
        await stub.CreateAssistant(
            pb.CreateAssistantRequest(
                parent=place.world.name,
                assistant=pb.Assistant(
                    display_name="Pinned voice",
                    handler="handlers/echo",
                    voice=pb.VoiceSettings(language="en"),
                ),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
    ).assistant
    changed = (
        await stub.UpdateAssistant(
            pb.UpdateAssistantRequest(
                assistant=pb.Assistant(name=made.name, display_name="Pinned voice, again"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
    ).assistant
    assert changed.revision == 2
    talk = open_talk(stub, editor, start(place.conversation, made.name, assistant_revision=1))
    session = await session_of(talk)
    assert (session.assistant, session.assistant_revision) == (made.name, 1)
    await talk.send(pb.TalkRequest(text="which one answers"))
    transcript = await talk.until(lambda f: f.WhichOneof("frame") == "transcript")
    run = await stub.GetRun(
        pb.GetRunRequest(name=transcript.transcript.run),
        metadata=editor.md,
        timeout=CALL_DEADLINE_S,
    )
    assert (run.run.assistant, run.run.assistant_revision) == (made.name, 1)
    await talk.until(ended)
    talk.cancel()
    # Resumed, the session keeps its pin: its next turn answers with revision 1 too.
    again = open_talk(stub, editor, pb.TalkRequest(resume=pb.TalkResume(session=session.name)))
    resumed = await session_of(again)
    assert resumed.assistant_revision == 1
    await again.send(pb.TalkRequest(text="and after a resume"))
    second = await again.until(
        lambda f: f.WhichOneof("frame") == "transcript" and f.transcript.turn == 2
    )
    later = await stub.GetRun(
        pb.GetRunRequest(name=second.transcript.run), metadata=editor.md, timeout=CALL_DEADLINE_S
    )
    assert later.run.assistant_revision == 1
    await again.send(control_frame(pb.TALK_ACTION_END_SESSION))
    await again.rest()

    # A pin needs its assistant, and a revision the assistant keeps.
    error = await refused_talk(
        stub,
        editor,
        grpc.StatusCode.INVALID_ARGUMENT,
        start(place.conversation, assistant_revision=1),
    )
    assert violations(error) == ["start.assistant_revision"]
    await refused_talk(
        stub,
        editor,
        grpc.StatusCode.NOT_FOUND,
        start(place.conversation, made.name, assistant_revision=9),
    )
