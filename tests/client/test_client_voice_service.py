"""switchboard.client's voice sessions against a real in-process server and the local
audio server: real speech (eSpeak NG), real recognition (PocketSphinx), real synthesis
(eSpeak NG), on SQLite and PostgreSQL.

Connections are really dropped: the client talks to the server through a TCP relay
(tests/infra/tcprelay.py) that the test resets mid-answer or mid-turn; the session
resumes by itself. What the client received is compared with what the server stored:
the run's own updates, watched again from the start.

One server per backend and one audio server serve the whole module (starting them,
and loading the recognizer's model, per test was a good part of its time): each test
signs up a user of its own, with its own workspace, assistants and conversation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.client import (
    Client,
    Resumed,
    SpeechNotConfigured,
    StreamPolicy,
    pcm_from_wav,
    pcm_to_wav,
)
from switchboard.client.backoff import Backoff
from switchboard.client.voice import TURN_BITS, ReplyBuilder, TalkSession, turn_of
from switchboard.platform.rpc.server import SwitchboardServer
from tests.client.test_clientkit import PASSWORD, new_conversation, new_workspace, unique_email
from tests.conftest import make_settings, started
from tests.fakes.audio_server import FakeAudio
from tests.infra.speech import COUNTING, says, speak
from tests.infra.tcprelay import TcpRelay
from tests.kits.modulekit import module_database_url_fixture

pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

#: A turn's transcription, the echo's answer and its paced speech, on two busy cores.
DEADLINE_S = 90.0
FAST = StreamPolicy(backoff=Backoff(initial_s=0.05, max_s=0.5), idle_timeout_s=30.0)


@pytest.fixture(scope="module")
def counting() -> bytes:
    """COUNTING spoken, as PCM16 at 16 kHz (what a microphone would give the client)."""
    pcm, _ = pcm_from_wav(speak(COUNTING), 16_000)
    return pcm


module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def audio_server() -> AsyncIterator[FakeAudio]:
    async with FakeAudio() as fake:
        yield fake


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(
    module_database_url: str, audio_server: FakeAudio
) -> AsyncIterator[SwitchboardServer]:
    # Speech sent up to ten seconds ahead of playback: the echo assistant's answers end
    # with a long note, which the tests need not wait out at the speed of speech.
    settings = make_settings(
        database_url=module_database_url,
        voice_url=audio_server.url,
        egress_allow_loopback=True,
        voice_lead_ms=10_000,
    )
    async with started(settings) as server:
        yield server


class Place:
    def __init__(self, conversation: str, assistant: str, silent: str) -> None:
        self.conversation = conversation
        self.assistant = assistant
        self.silent = silent


async def _place(client: Client) -> Place:
    """A workspace with an assistant that speaks (echo), one that does not, and a
    conversation: made with the client, as an application does."""
    await client.register(unique_email("voice"), PASSWORD)
    workspace = await new_workspace(client, "Voice")
    made = []
    for voice in (pb.VoiceSettings(language="en"), None):
        assistant = pb.Assistant(display_name="Voice", handler="handlers/echo", voice=voice)
        created = await client.dispatcher.CreateAssistant(
            pb.CreateAssistantRequest(parent=workspace, assistant=assistant)
        )
        made.append(created.assistant.name)
    return Place(await new_conversation(client, workspace), made[0], made[1])


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


async def _turn(talk: TalkSession, pcm: bytes) -> None:
    await talk.start_turn()
    await talk.send_audio(pcm)
    await talk.end_turn()


async def _watched(client: Client, run: str) -> list[pb.RunUpdate]:
    """The run's updates as the server keeps them, from the start."""
    async with client.watch(run) as watch:
        return [update async for update in watch]


async def test_a_spoken_wav_comes_back_as_a_transcript_and_speech(
    mesh: SwitchboardServer, counting: bytes, audio_server: FakeAudio
) -> None:
    async with Client(mesh.address, streams=FAST) as client:
        place = await _place(client)
        frames: list[pb.TalkResponse] = []
        async with client.talk(
            place.conversation, assistant=place.assistant, turn_detection="client"
        ) as talk:
            assert talk.session.output_format.sample_rate_hz == 24_000
            await _turn(talk, counting)
            reply = await asyncio.wait_for(talk.reply(on_frame=frames.append), DEADLINE_S)
        assert reply.run is not None
        watched = await _watched(client, reply.run.name)

    assert says(reply.transcript), reply.transcript
    assert reply.turn == 1
    assert reply.succeeded
    assert reply.text.startswith(reply.transcript)
    assert reply.recording.startswith("workspaces/")
    # Every update of the run came, numbered from the turn, and nothing else of it.
    updates = [f for f in frames if f.WhichOneof("frame") == "update"]
    assert [f.sequence for f in updates] == [(1 << TURN_BITS) + u.sequence for u in watched]
    spoken = b"".join(u.speech.audio for u in watched if u.WhichOneof("update") == "speech")
    assert reply.speech == spoken
    assert reply.rate_hz == 24_000
    assert reply.speech_ms > 1_000
    # The answer's first sentence (the echo says the words again) is recognized back.
    first = b"".join(
        u.speech.audio
        for u in watched
        if u.WhichOneof("update") == "speech" and u.speech.segment == 0
    )
    assert first
    heard, _ = await asyncio.to_thread(
        audio_server.recognizer.transcribe, pcm_to_wav(first, reply.rate_hz)
    )
    assert says(heard), heard


async def test_a_connection_dropped_mid_answer_resumes_with_no_frame_repeated_or_lost(
    mesh: SwitchboardServer,
) -> None:
    resumes: list[Resumed] = []
    with TcpRelay(_port(mesh.address)) as relay:
        async with Client(f"127.0.0.1:{relay.port}", streams=FAST) as client:
            place = await _place(client)
            async with client.talk(
                place.conversation, assistant=place.assistant, on_resume=resumes.append
            ) as talk:
                await talk.say("one two three. four five six. seven eight nine.")
                builder = ReplyBuilder()
                frames: list[pb.TalkResponse] = []
                cut = 0
                async with asyncio.timeout(DEADLINE_S):
                    async for frame in talk:
                        frames.append(frame)
                        is_speech = (
                            frame.WhichOneof("frame") == "update"
                            and frame.update.WhichOneof("update") == "speech"
                        )
                        if is_speech and not cut:
                            # The network goes, with the answer half spoken.
                            cut = await asyncio.to_thread(relay.cut)
                        if builder.add(frame) is not None:
                            break
            reply = builder.reply
            assert reply is not None
            assert reply.run is not None
            watched = await _watched(client, reply.run.name)

    assert cut >= 1
    assert talk.resumes >= 1
    assert resumes
    assert resumes[0].lost == ()
    numbered = [f.sequence for f in frames if f.sequence]
    assert numbered == sorted(set(numbered)), "a frame came twice, or out of order"
    turn = turn_of(numbered[0])
    assert numbered == [turn << TURN_BITS] + [(turn << TURN_BITS) + u.sequence for u in watched]
    spoken = b"".join(u.speech.audio for u in watched if u.WhichOneof("update") == "speech")
    assert reply.speech == spoken
    assert reply.succeeded
    # The resume shows where it happened, as a session frame.
    assert [f.WhichOneof("frame") for f in frames].count("session") == len(resumes)


async def test_a_turn_being_spoken_when_the_connection_drops_is_sent_again(
    mesh: SwitchboardServer, counting: bytes
) -> None:
    half = len(counting) // 4 * 2
    with TcpRelay(_port(mesh.address)) as relay:
        async with Client(f"127.0.0.1:{relay.port}", streams=FAST) as client:
            place = await _place(client)
            async with client.talk(
                place.conversation,
                assistant=place.assistant,
                turn_detection="client",
                max_frame_bytes=6_400,  # 200 ms frames, as a microphone sends them
            ) as talk:
                await talk.start_turn()
                await talk.send_audio(counting[:half])
                assert await asyncio.to_thread(relay.cut) >= 1
                await talk.send_audio(counting[half:])
                await talk.end_turn()
                reply = await asyncio.wait_for(talk.reply(), DEADLINE_S)

    # The whole utterance reached the turn that was answered: its first words too.
    assert says(reply.transcript), reply.transcript
    assert reply.turn == 1
    assert reply.succeeded
    assert talk.resumes >= 1
    assert talk.lost_turns
    assert all(lost.resent for lost in talk.lost_turns)
    assert talk.lost_turns[0].audio == counting[: len(talk.lost_turns[0].audio)]


async def test_an_assistant_without_voice_is_refused_when_the_session_opens(
    mesh: SwitchboardServer,
) -> None:
    async with Client(mesh.address, streams=FAST) as client:
        place = await _place(client)
        with pytest.raises(SpeechNotConfigured) as refused:
            async with client.talk(place.conversation, assistant=place.silent):
                pass
    assert refused.value.metadata["assistant"] == place.silent
