"""Runs that speak (docs/voice.md, "Runs that speak"), with real engines: the model is the
local model server's echo (tests/fakes/openai_server.py), speech is eSpeak NG behind the
local audio server and is recognized back by its PocketSphinx (tests/fakes/audio_server.py),
through the dispatcher's own engine (platform/audio/openai.py). Nothing is mocked.

A model held after a number of words (``hold``) keeps a run going for as long as a test
needs, released by what the test has seen: the order of updates is decided by the run,
never by a sleep.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import hashlib
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format
from google.rpc import error_details_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.audio import pcm
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S
from tests.fakes.audio_server import FakeAudio
from tests.fakes.openai_server import FakeOpenAI, Reply, echo_reply
from tests.infra.speech import COUNTING, says, speak
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import (
    Caller,
    Stub,
    World,
    all_messages,
    create_conversation,
    ctx_world,
    refused,
    violations,
)
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import limited, read_until, watch_all

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
#: Two sentences of words PocketSphinx hears back from eSpeak reliably.
SENTENCE = COUNTING.capitalize() + "."
ANSWER = f"{SENTENCE} {SENTENCE}"
LEAD_MS = 200


@dataclass(frozen=True)
class Room:
    server: SwitchboardServer
    stub: Stub
    dstub: DStub
    world: World
    conversation: str
    assistant: pb.Assistant
    llm: FakeOpenAI
    audio: FakeAudio

    @property
    def caller(self) -> Caller:
        return self.world.editor


def held(words: int, gate: asyncio.Event) -> Callable[[dict[str, Any]], Reply]:
    """The echo model, stopping after ``words`` words until ``gate`` is set."""

    def reply(body: dict[str, Any]) -> Reply:
        return dataclasses.replace(echo_reply(body), hold_after_chunks=words, hold=gate)

    return reply


@asynccontextmanager
async def room(*, voice: pb.VoiceSettings | None = None, **overrides: Any) -> AsyncIterator[Room]:
    """A mesh whose model is the echo model and whose speech is the local audio server,
    a workspace whose default assistant has ``voice`` (default: the server's voice),
    and a conversation."""
    async with FakeOpenAI(default=echo_reply) as llm, FakeAudio() as audio:
        settings: dict[str, Any] = {
            "llm_base_url": llm.url,
            "llm_model": "echo",
            "voice_url": audio.url,
            "voice_lead_ms": LEAD_MS,
            "voice_max_retries": 0,
            "egress_allow_loopback": True,
        }
        settings.update(overrides)
        async with limited(**settings) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            made = await dstub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=world.name,
                    assistant=pb.Assistant(
                        display_name="Speaker",
                        workspace_default=True,
                        voice=voice if voice is not None else pb.VoiceSettings(language="en"),
                    ),
                ),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
            yield Room(server, stub, dstub, world, conversation, made.assistant, llm, audio)


def asking(
    conversation: str,
    *parts: cpb.ContentPart,
    speak: bool = True,
    transcribe: bool = False,
    rate: int = 0,
    policy: int = 0,
) -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        conversation=conversation,
        message=cpb.Message(parts=list(parts)),
        speech=pb.SpeechOptions(
            speak=speak,
            transcribe=transcribe,
            output_format=pb.AudioFormat(sample_rate_hz=rate),
        ),
        concurrency_policy=policy,  # type: ignore[arg-type]
    )


def text(value: str) -> cpb.ContentPart:
    return cpb.ContentPart(text=value)


def recording(data: bytes) -> cpb.ContentPart:
    return cpb.ContentPart(file=cpb.FileReference(inline_data=data, mime_type="audio/wav"))


async def upload(r: Room, data: bytes, media_type: str, display_name: str) -> cpb.File:
    async def frames() -> AsyncIterator[cpb.UploadFileRequest]:
        yield cpb.UploadFileRequest(
            header=cpb.UploadFileHeader(
                parent=r.world.name,
                file=cpb.File(
                    display_name=display_name, media_type=media_type, size_bytes=len(data)
                ),
            )
        )
        yield cpb.UploadFileRequest(chunk=data)
        yield cpb.UploadFileRequest(sha256=hashlib.sha256(data).hexdigest())

    response = await r.stub.UploadFile(frames(), metadata=r.caller.md, timeout=CALL_DEADLINE_S)
    return response.file


async def send(r: Room, request: pb.SendMessageRequest) -> pb.SendMessageResponse:
    response: pb.SendMessageResponse = await r.dstub.SendMessage(
        request, metadata=r.caller.md, timeout=CALL_DEADLINE_S
    )
    return response


def speech(updates: list[pb.RunUpdate]) -> list[pb.RunUpdate]:
    return [u for u in updates if u.WhichOneof("update") == "speech"]


def deltas(updates: list[pb.RunUpdate]) -> list[pb.RunUpdate]:
    return [u for u in updates if u.WhichOneof("update") == "delta"]


async def heard(audio: FakeAudio, chunks: list[pb.RunUpdate]) -> str:
    """What PocketSphinx hears in the chunks' audio, played one after the other."""
    joined = b"".join(u.speech.audio for u in chunks)
    rate = chunks[0].speech.format.sample_rate_hz
    words, _ = await asyncio.to_thread(audio.recognizer.transcribe, pcm.to_wav(joined, rate))
    return words


def voice_of(message: cpb.Message) -> dict[str, Any]:
    found: dict[str, Any] = json_format.MessageToDict(message.metadata)["voice"]
    return found


async def watching_until(
    r: Room, run: str, done: Callable[[list[pb.RunUpdate]], bool]
) -> tuple[Any, list[pb.RunUpdate]]:
    call = r.dstub.WatchRun(
        pb.WatchRunRequest(name=run), metadata=r.caller.md, timeout=CALL_DEADLINE_S
    )
    seen: list[pb.RunUpdate] = []
    await read_until(call, seen, done)
    return call, seen


# -- a run that speaks --------------------------------------------------------------------


async def test_a_run_speaks_its_answer_while_the_model_is_still_writing() -> None:
    gate = asyncio.Event()
    async with room() as r:
        # Held after the first sentence and the next word: the first sentence is certain.
        r.llm.default = held(6, gate)
        sent = await send(r, asking(r.conversation, text(ANSWER)))
        assert sent.run.speech.speak
        assert sent.run.speech.output_format.sample_rate_hz == 24_000
        call, early = await watching_until(r, sent.run.name, lambda seen: bool(speech(seen)))
        call.cancel()
        # The first audio left while the model had not finished the answer.
        gate.set()
        seen = await watch_all(r.dstub, r.caller, sent.run.name)
        messages = await all_messages(r.stub, r.caller, r.conversation)
        spoken = await heard(r.audio, speech(seen.updates))

    assert seen.final.state == pb.RUN_STATE_SUCCEEDED
    assert seen.text == ANSWER
    chunks = speech(seen.updates)
    # Speech interleaves with the deltas: its first update precedes the answer's last delta.
    assert chunks[0].sequence < deltas(seen.updates)[-1].sequence
    assert speech(early)[0].sequence == chunks[0].sequence
    # Two sentences, each located in the answer, its text on its first chunk.
    first, second = ANSWER.index(SENTENCE), ANSWER.rindex(SENTENCE)
    segments = sorted({c.speech.segment for c in chunks})
    assert segments == [0, 1]
    for segment, start in zip(segments, (first, second), strict=True):
        mine = [c.speech for c in chunks if c.speech.segment == segment]
        assert mine[0].text == SENTENCE
        assert all(not c.text for c in mine[1:])
        assert all((c.text_start, c.text_end) == (start, start + len(SENTENCE)) for c in mine)
        assert [c.segment_end for c in mine] == [False] * (len(mine) - 1) + [True]
    # Offsets follow each other without a gap; about 200 ms a chunk, never over 64 KiB.
    offset = 0
    for chunk in (c.speech for c in chunks):
        assert chunk.offset_ms == offset
        assert chunk.format.sample_rate_hz == 24_000
        assert chunk.format.encoding == pb.AUDIO_ENCODING_PCM16
        assert len(chunk.audio) <= 64 * 1024
        assert abs(chunk.duration_ms - pcm.duration_ms(len(chunk.audio), 24_000)) <= 1
        if not chunk.segment_end:
            assert 199 <= chunk.duration_ms <= 200
        offset += chunk.duration_ms
    total_ms = pcm.duration_ms(sum(len(c.speech.audio) for c in chunks), 24_000)
    assert abs(offset - total_ms) <= len(chunks)
    # Paced at playback speed: the chunks took about as long to leave as they last,
    # less the lead and the last chunk.
    took_ms = (chunks[-1].time.ToNanoseconds() - chunks[0].time.ToNanoseconds()) / 1e6
    assert took_ms >= total_ms - LEAD_MS - chunks[-1].speech.duration_ms - 60
    # The audio says the answer.
    assert says(spoken), spoken
    # The answer is stored once spoken, with what was spoken.
    answer = messages[-1]
    assert answer.name == seen.final.output_message
    assert answer.parts[0].text == ANSWER
    assert voice_of(answer) == {"spoken_chars": len(ANSWER), "audio_ms": total_ms}


async def test_speech_at_another_rate_and_the_assistants_voice() -> None:
    async with room(voice=pb.VoiceSettings(voice="alloy", language="en")) as r:
        sent = await send(r, asking(r.conversation, text(SENTENCE), rate=16_000))
        seen = await watch_all(r.dstub, r.caller, sent.run.name)
        spoken = await heard(r.audio, speech(seen.updates))
    chunks = speech(seen.updates)
    assert {c.speech.format.sample_rate_hz for c in chunks} == {16_000}
    assert all(c.speech.duration_ms <= 200 for c in chunks)
    assert says(spoken), spoken
    asked = [q for q in r.audio.requests if q.path.endswith("/audio/speech")]
    assert asked
    assert all(q.body["voice"] == "alloy" for q in asked)


# -- barge-in and the stored answer ----------------------------------------------------------


async def test_cancel_with_heard_through_stores_what_was_heard() -> None:
    gate = asyncio.Event()
    async with room() as r:
        # Two sentences and a word of a third: the run is still writing when cancelled.
        r.llm.default = held(11, gate)
        long = f"{ANSWER} {SENTENCE}"
        sent = await send(r, asking(r.conversation, text(long)))

        def first_sentence_sent(seen: list[pb.RunUpdate]) -> bool:
            return any(u.speech.segment_end for u in speech(seen))

        call, early = await watching_until(r, sent.run.name, first_sentence_sent)
        call.cancel()
        last_heard = next(u for u in speech(early) if u.speech.segment_end)
        cancelled = await r.dstub.CancelRun(
            pb.CancelRunRequest(
                name=sent.run.name, reason="barge-in", heard_through_sequence=last_heard.sequence
            ),
            metadata=r.caller.md,
            timeout=CALL_DEADLINE_S,
        )
        gate.set()
        seen = await watch_all(r.dstub, r.caller, sent.run.name)
        messages = await all_messages(r.stub, r.caller, r.conversation)

    run = cancelled.run
    assert run.state == pb.RUN_STATE_CANCELLED
    assert run.output_message
    assert seen.final.output_message == run.output_message
    # Nothing is spoken after the end.
    assert seen.updates[-1].WhichOneof("update") == "state_change"
    answer = next(m for m in messages if m.name == run.output_message)
    assert answer.role == cpb.MESSAGE_ROLE_ASSISTANT
    assert [p.text for p in answer.parts] == [SENTENCE]
    voice = voice_of(answer)
    assert voice["interrupted"] is True
    assert voice["spoken_chars"] == len(SENTENCE)
    # What was written and not heard is marked: all of it, after the heard part.
    assert SENTENCE + voice["unspoken_text"] == seen.text
    assert voice["unspoken_chars"] == len(seen.text) - len(SENTENCE)
    assert voice["audio_ms"] == sum(
        u.speech.duration_ms for u in speech(seen.updates) if u.speech.segment == 0
    )


async def test_a_new_message_with_interrupt_stops_the_speech_and_keeps_what_was_sent() -> None:
    gate = asyncio.Event()
    async with room() as r:
        r.llm.default = held(11, gate)
        first = await send(r, asking(r.conversation, text(f"{ANSWER} {SENTENCE}")))
        call, _ = await watching_until(r, first.run.name, lambda seen: bool(speech(seen)))
        call.cancel()
        r.llm.default = echo_reply
        second = await send(
            r,
            asking(
                r.conversation, text("Stop."), speak=False, policy=pb.CONCURRENCY_POLICY_INTERRUPT
            ),
        )
        gate.set()
        seen = await watch_all(r.dstub, r.caller, first.run.name)
        await watch_all(r.dstub, r.caller, second.run.name)
        messages = await all_messages(r.stub, r.caller, r.conversation)

    run = seen.final
    assert run.state == pb.RUN_STATE_CANCELLED
    assert "newer message" in run.error.message
    answer = next(m for m in messages if m.name == run.output_message)
    voice = voice_of(answer)
    assert voice["interrupted"] is True
    spoken_text = answer.parts[0].text
    # Everything sent counts as heard (no heard_through): whole words, a prefix of the answer.
    assert seen.text.startswith(spoken_text)
    assert voice["spoken_chars"] == len(spoken_text)
    assert spoken_text == "" or seen.text[len(spoken_text) : len(spoken_text) + 1] in ("", " ")
    assert spoken_text + voice["unspoken_text"] == seen.text
    sent_ms = sum(u.speech.duration_ms for u in speech(seen.updates))
    assert voice["audio_ms"] == sent_ms


async def test_a_synthesis_failure_leaves_a_complete_text_answer() -> None:
    async with room() as r:
        # Refused at once (not retried): the first sentence's speech fails.
        r.audio.fail_next(400)
        sent = await send(r, asking(r.conversation, text(ANSWER)))
        seen = await watch_all(r.dstub, r.caller, sent.run.name)
        messages = await all_messages(r.stub, r.caller, r.conversation)

    assert seen.final.state == pb.RUN_STATE_SUCCEEDED
    assert seen.text == ANSWER
    assert speech(seen.updates) == []
    stopped = [u.progress.stage for u in seen.updates if u.WhichOneof("update") == "progress"]
    assert len(stopped) == 1
    assert stopped[0].startswith("speech stopped: ")
    answer = messages[-1]
    assert answer.parts[0].text == ANSWER
    voice = voice_of(answer)
    assert voice["spoken_chars"] == 0
    assert voice["unspoken_text"] == ANSWER
    assert voice["speech_error"]
    assert "interrupted" not in voice


# -- transcribe ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counting() -> bytes:
    return speak(COUNTING)


async def test_a_recording_becomes_the_transcript_and_the_file(counting: bytes) -> None:
    async with room() as r:
        sent = await send(
            r, asking(r.conversation, recording(counting), speak=False, transcribe=True)
        )
        seen = await watch_all(r.dstub, r.caller, sent.run.name)
        stored = sent.message
        uploaded = await upload(r, counting, "audio/wav", "question.wav")
        named = await send(
            r,
            asking(
                r.conversation,
                cpb.ContentPart(file=cpb.FileReference(file=uploaded.name)),
                speak=False,
                transcribe=True,
            ),
        )
        await watch_all(r.dstub, r.caller, named.run.name)

    assert seen.final.state == pb.RUN_STATE_SUCCEEDED
    assert sent.run.speech.transcribe
    for message in (stored, named.message):
        assert [p.WhichOneof("part") for p in message.parts] == ["text", "file"]
        assert says(message.parts[0].text), message.parts[0].text
        assert message.parts[1].file.file.startswith(r.world.name + "/files/")
        assert message.parts[1].file.mime_type.startswith("audio/")
    assert named.message.parts[1].file.file == uploaded.name
    # The model read the transcript.
    assert says(seen.text), seen.text


async def count(r: Room) -> int:
    return len(await all_messages(r.stub, r.caller, r.conversation))


async def test_transcription_errors_are_precise_and_store_nothing(counting: bytes) -> None:
    # A second of faint noise: no words (PocketSphinx hears a word in digital silence).
    noise = random.Random(7)  # noqa: S311 - test data, not a secret
    faint = array.array("h", [noise.randint(-30, 30) for _ in range(16_000)])
    silence = pcm.to_wav(faint.tobytes(), 16_000)
    async with room() as r:
        before = await count(r)

        async def refuses(request: pb.SendMessageRequest, code: grpc.StatusCode) -> Any:
            return await refused(
                r.dstub.SendMessage(request, metadata=r.caller.md, timeout=CALL_DEADLINE_S), code
            )

        def transcribing(*parts: cpb.ContentPart) -> pb.SendMessageRequest:
            return asking(r.conversation, *parts, speak=False, transcribe=True)

        error = await refuses(transcribing(recording(b"RIFF not really")), CODE.INVALID_ARGUMENT)
        assert violations(error) == ["message.parts[0].file"]
        error = await refuses(
            transcribing(recording(counting), text("and this")), CODE.INVALID_ARGUMENT
        )
        assert violations(error) == ["message.parts"]
        error = await refuses(transcribing(text("no recording")), CODE.INVALID_ARGUMENT)
        assert violations(error) == ["message.parts"]
        other = cpb.ContentPart(file=cpb.FileReference(inline_data=counting, mime_type="image/png"))
        error = await refuses(transcribing(other), CODE.INVALID_ARGUMENT)
        assert violations(error) == ["message.parts[0].file.mime_type"]
        elsewhere = cpb.ContentPart(file=cpb.FileReference(file="workspaces/nope/files/f1"))
        error = await refuses(transcribing(elsewhere), CODE.INVALID_ARGUMENT)
        assert violations(error) == ["message.parts[0].file.file"]
        missing = cpb.ContentPart(file=cpb.FileReference(file=f"{r.world.name}/files/gone"))
        error = await refuses(transcribing(missing), CODE.NOT_FOUND)
        assert "message.parts[0].file" in str(error.details())
        error = await refuses(transcribing(recording(silence)), CODE.INVALID_ARGUMENT)
        assert violations(error) == ["message.parts"]
        assert "no words" in str(error.details())
        r.audio.fail_next(503)
        error = await refuses(transcribing(recording(counting)), CODE.UNAVAILABLE)
        assert reason(error) == "ERROR_REASON_SPEECH_UNAVAILABLE"
        r.audio.fail_next(400)
        error = await refuses(transcribing(recording(counting)), CODE.FAILED_PRECONDITION)
        assert reason(error) == "ERROR_REASON_SPEECH_REFUSED"
        error = await refuses(
            asking(r.conversation, text("hi"), rate=44_100), CODE.INVALID_ARGUMENT
        )
        assert violations(error) == ["speech.output_format.sample_rate_hz"]
        bad = asking(r.conversation, text("hi"))
        bad.speech.output_format.encoding = 7  # type: ignore[assignment]
        error = await refuses(bad, CODE.INVALID_ARGUMENT)
        assert violations(error) == ["speech.output_format.encoding"]
        # Nothing of any of them was stored.
        assert await count(r) == before


# -- speech not configured ----------------------------------------------------------------------


async def test_speech_needs_an_engine_and_an_assistant_with_a_voice() -> None:
    async with room() as r:
        plain = await r.dstub.CreateAssistant(
            pb.CreateAssistantRequest(
                parent=r.world.name, assistant=pb.Assistant(display_name="Mute")
            ),
            metadata=r.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        request = asking(r.conversation, text("hello there"))
        request.assistant = plain.assistant.name
        error = await refused(
            r.dstub.SendMessage(request, metadata=r.caller.md, timeout=CALL_DEADLINE_S),
            CODE.FAILED_PRECONDITION,
        )
        assert reason(error) == "ERROR_REASON_SPEECH_NOT_CONFIGURED"
        assert ("assistant", plain.assistant.name) in _metadata(error)
        # Forced to a handler, the message has no assistant to speak with.
        forced = asking(r.conversation, text("hello there"))
        forced.handler = "handlers/echo"
        error = await refused(
            r.dstub.SendMessage(forced, metadata=r.caller.md, timeout=CALL_DEADLINE_S),
            CODE.FAILED_PRECONDITION,
        )
        assert reason(error) == "ERROR_REASON_SPEECH_NOT_CONFIGURED"
        # A text-only message is answered as ever.
        sent = await r.dstub.SendMessage(
            pb.SendMessageRequest(
                conversation=r.conversation, message=cpb.Message(parts=[text("hi")])
            ),
            metadata=r.caller.md,
            timeout=CALL_DEADLINE_S,
        )
        assert not sent.run.HasField("speech")
    async with (
        FakeOpenAI(default=echo_reply) as llm,
        limited(llm_base_url=llm.url, llm_model="echo") as (server, stub, dstub),
    ):
        world = await ctx_world(server, stub)
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        error = await refused(
            dstub.SendMessage(
                asking(conversation, text("hello")),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.FAILED_PRECONDITION,
        )
        assert reason(error) == "ERROR_REASON_SPEECH_NOT_CONFIGURED"
        assert "SWITCHBOARD_VOICE_URL" in str(error.details())
        assert await all_messages(stub, world.editor, conversation) == []


def _metadata(error: Any) -> list[tuple[str, str]]:
    info: error_details_pb2.ErrorInfo = detail(error, error_details_pb2.ErrorInfo)
    return list(info.metadata.items())


# -- the assistant's voice ------------------------------------------------------------------------


async def test_assistant_voice_settings_are_validated_and_stored() -> None:
    async with room() as r:
        owner = r.world.owner.md
        bad = pb.VoiceSettings(
            transcription_model="m" * 257, speech_model="s" * 257, voice="v" * 65, language="EN"
        )
        error = await refused(
            r.dstub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=r.world.name, assistant=pb.Assistant(display_name="Bad", voice=bad)
                ),
                metadata=owner,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.INVALID_ARGUMENT,
        )
        assert violations(error) == [
            "assistant.voice.transcription_model",
            "assistant.voice.speech_model",
            "assistant.voice.voice",
            "assistant.voice.language",
        ]
        good = pb.VoiceSettings(
            transcription_model="m" * 256, speech_model="tts-1", voice="v" * 64, language="de"
        )
        made = (
            await r.dstub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=r.world.name, assistant=pb.Assistant(display_name="Good", voice=good)
                ),
                metadata=owner,
                timeout=CALL_DEADLINE_S,
            )
        ).assistant
        assert made.voice == good
        changed = pb.Assistant(name=made.name, voice=pb.VoiceSettings(voice="nova", language="fr"))
        updated = (
            await r.dstub.UpdateAssistant(
                pb.UpdateAssistantRequest(
                    assistant=changed, update_mask=field_mask_pb2.FieldMask(paths=["voice"])
                ),
                metadata=owner,
                timeout=CALL_DEADLINE_S,
            )
        ).assistant
        assert updated.voice == pb.VoiceSettings(voice="nova", language="fr")
        assert updated.display_name == "Good"
        got = await r.dstub.GetAssistant(
            pb.GetAssistantRequest(name=made.name), metadata=owner, timeout=CALL_DEADLINE_S
        )
        assert got.assistant.voice == updated.voice
        # Cleared with the mask and no value.
        cleared = (
            await r.dstub.UpdateAssistant(
                pb.UpdateAssistantRequest(
                    assistant=pb.Assistant(name=made.name),
                    update_mask=field_mask_pb2.FieldMask(paths=["voice"]),
                ),
                metadata=owner,
                timeout=CALL_DEADLINE_S,
            )
        ).assistant
        assert not cleared.HasField("voice")
