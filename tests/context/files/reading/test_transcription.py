"""The transcription client against the local audio server: real speech, real recognition.

Speech comes from eSpeak NG (tests/infra/speech.py), the words back from
PocketSphinx behind tests/fakes/audio_server.py, over HTTP through the egress
policy; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import subprocess
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.files.reading.transcriber import Transcriber
from switchboard.context.files.reading.transcription import (
    OpenAITranscriber,
    TranscriptionFailed,
    upload_name,
)
from switchboard.mesh import create_server
from switchboard.platform.security.egress import EgressPolicy
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.fakes.audio_server import FakeAudio
from tests.infra.speech import COUNTING, says, speak
from tests.kits.contextkit import awaiting_event, context_stub, ctx_world

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[4]
LOOPBACK = EgressPolicy(allow_loopback=True)
KEY = "sk-test-transcription-secret-0123456789"


@pytest.fixture(scope="module")
def counting() -> bytes:
    return speak(COUNTING)


@pytest.fixture
async def audio() -> AsyncIterator[FakeAudio]:
    async with FakeAudio(api_key=KEY) as fake:
        yield fake


def transcriber(url: str, **kwargs: object) -> OpenAITranscriber:
    options: dict[str, object] = {
        "model": "whisper-1",
        "api_key": KEY,
        "policy": LOOPBACK,
        "max_bytes": 1_000_000,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    options.update(kwargs)
    return OpenAITranscriber(url, **options)  # type: ignore[arg-type]


def resampled(data: bytes, rate: int, channels: int = 1) -> bytes:
    """``data`` (16-bit mono WAV) written again at ``rate`` Hz with ``channels``,
    by nearest sample: another rate and layout the server must read."""
    with wave.open(io.BytesIO(data)) as source:
        frames = source.readframes(source.getnframes())
        old = source.getframerate()
    samples = [frames[i : i + 2] for i in range(0, len(frames), 2)]
    count = len(samples) * rate // old
    picked = [samples[min(i * old // rate, len(samples) - 1)] for i in range(count)]
    out = io.BytesIO()
    with wave.open(out, "wb") as target:
        target.setnchannels(channels)
        target.setsampwidth(2)
        target.setframerate(rate)
        target.writeframes(b"".join(sample * channels for sample in picked))
    return out.getvalue()


async def test_speech_comes_back_as_its_words(audio: FakeAudio, counting: bytes) -> None:
    client = transcriber(audio.url)
    port: Transcriber = client  # the port the files domain calls (mypy checks the shape)
    try:
        text = await port.transcribe(counting, media_type="audio/wav", filename="memo.wav")
    finally:
        await client.close()
    assert says(text), text
    (request,) = audio.requests
    assert request.fields == {"model": "whisper-1", "response_format": "json"}
    assert (request.filename, request.file_type, request.file_size) == (
        "memo.wav",
        "audio/wav",
        len(counting),
    )
    assert request.headers["authorization"] == f"Bearer {KEY}"


async def test_other_speech_is_not_those_words(audio: FakeAudio) -> None:
    """The check can fail: different speech does not come back as the counting."""
    client = transcriber(audio.url)
    try:
        text = await client.transcribe(
            speak("open the door please"), media_type="audio/wav", filename="x.wav"
        )
    finally:
        await client.close()
    assert not says(text), text


@pytest.mark.parametrize(("rate", "channels"), [(16_000, 1), (44_100, 2), (8_000, 1)])
async def test_other_rates_and_stereo_are_resampled(
    audio: FakeAudio, counting: bytes, rate: int, channels: int
) -> None:
    client = transcriber(audio.url)
    try:
        text = await client.transcribe(
            resampled(counting, rate, channels), media_type="audio/wav", filename="r.wav"
        )
    finally:
        await client.close()
    assert says(text, ("three", "four")), text


async def test_audio_it_cannot_decode_is_the_apis_400_not_retried(audio: FakeAudio) -> None:
    client = transcriber(audio.url)
    try:
        with pytest.raises(TranscriptionFailed) as failed:
            await client.transcribe(b"ID3\x04" + bytes(2000), media_type="audio/mpeg", filename="a")
    finally:
        await client.close()
    assert str(failed.value) == (
        "the transcription endpoint refused the audio (HTTP 400): "
        "Audio file might be corrupted or unsupported"
    )
    assert len(audio.requests) == 1
    # The API reads the format from the name's extension: one is given.
    assert audio.requests[0].filename == "a.mp3"


async def test_overload_and_errors_are_retried_within_a_bound(
    audio: FakeAudio, counting: bytes
) -> None:
    client = transcriber(audio.url, max_retries=2)
    try:
        audio.fail_next(503)
        audio.fail_next(429)
        text = await client.transcribe(counting, media_type="audio/wav", filename="m.wav")
        assert says(text), text
        assert len(audio.requests) == 3
        audio.fail_next(500, count=3)
        with pytest.raises(TranscriptionFailed) as failed:
            await client.transcribe(counting, media_type="audio/wav", filename="m.wav")
    finally:
        await client.close()
    assert str(failed.value) == (
        "the transcription endpoint answered HTTP 500: The server had an error after 3 attempts"
    )
    assert len(audio.requests) == 6


async def test_a_refused_key_is_never_shown_or_logged(
    audio: FakeAudio, counting: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    client = transcriber(audio.url, api_key="sk-wrong-key-which-must-stay-secret")
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(TranscriptionFailed) as failed:
            await client.transcribe(counting, media_type="audio/wav", filename="m.wav")
    finally:
        await client.close()
    assert str(failed.value) == (
        "the transcription endpoint refused the API key (HTTP 401); "
        "check SWITCHBOARD_CONTEXT_TRANSCRIPTION_API_KEY"
    )
    assert "stay-secret" not in caplog.text
    assert "secret" not in str(failed.value)


async def test_the_endpoint_goes_through_the_egress_policy(
    audio: FakeAudio, counting: bytes
) -> None:
    client = transcriber(audio.url, policy=EgressPolicy())
    try:
        with pytest.raises(TranscriptionFailed) as failed:
            await client.transcribe(counting, media_type="audio/wav", filename="m.wav")
    finally:
        await client.close()
    assert "refused by the egress policy" in str(failed.value)
    assert audio.requests == []


async def test_limits_refuse_before_sending(audio: FakeAudio, counting: bytes) -> None:
    client = transcriber(audio.url, max_bytes=len(counting) - 1)
    try:
        with pytest.raises(TranscriptionFailed, match="more than the"):
            await client.transcribe(counting, media_type="audio/wav", filename="m.wav")
        with pytest.raises(TranscriptionFailed, match="empty"):
            await client.transcribe(b"", media_type="audio/wav", filename="m.wav")
    finally:
        await client.close()
    assert audio.requests == []


async def test_an_endpoint_that_is_down_fails_after_its_retries() -> None:
    async with FakeAudio() as gone:
        url = gone.url
    client = transcriber(url, max_retries=1)
    try:
        with pytest.raises(TranscriptionFailed, match=r"could not be reached .* after 2 attempts"):
            await client.transcribe(b"RIFF" + bytes(100), media_type="audio/wav", filename="m")
    finally:
        await client.close()


def test_upload_names_carry_an_extension_the_api_reads() -> None:
    assert upload_name("memo.wav", "audio/wav") == "memo.wav"
    assert upload_name("memo", "audio/ogg") == "memo.ogg"
    assert upload_name('../we"ird\nname.MP3', "audio/mpeg") == "we_ird_name.MP3"
    assert upload_name("", "application/octet-stream") == "audio.wav"


async def test_the_server_runs_on_its_own() -> None:
    """``python -m tests.fakes.audio_server --port 0``: the base URL on the first line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.audio_server",
        "--port",
        "0",
        "--quiet",
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        url = line.decode().strip()
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/v1")
        client = transcriber(url, api_key="")
        try:
            with pytest.raises(TranscriptionFailed, match="HTTP 400"):
                await client.transcribe(b"not audio", media_type="audio/wav", filename="x.wav")
        finally:
            await client.close()
    finally:
        process.terminate()
        await process.wait()


# -- end to end: an uploaded recording gets its transcript ------------------------------------


def _upload_frames(parent: str, data: bytes) -> list[cpb.UploadFileRequest]:
    frames = [
        cpb.UploadFileRequest(
            header=cpb.UploadFileHeader(
                parent=parent,
                file=cpb.File(
                    display_name="memo.wav", media_type="audio/wav", size_bytes=len(data)
                ),
            )
        )
    ]
    frames += [
        cpb.UploadFileRequest(chunk=data[i : i + 65_536]) for i in range(0, len(data), 65_536)
    ]
    frames.append(cpb.UploadFileRequest(sha256=hashlib.sha256(data).hexdigest()))
    return frames


async def test_an_uploaded_recording_gets_its_transcript_and_an_updated_event(
    database_url: str, counting: bytes
) -> None:
    """Through the real server: UploadFile, then the background transcription against
    the local audio server, then GetFile's FULL view and the FILE_CHANGED UPDATED event."""
    async with FakeAudio(api_key=KEY) as audio:
        server, _ = await create_server(
            make_settings(
                database_url=database_url,
                context_transcription_url=audio.url,
                context_transcription_api_key=KEY,
                egress_allow_loopback=True,
            )
        )
        await server.start()
        try:
            async with aio.insecure_channel(server.address) as channel:
                stub = context_stub(channel)
                world = await ctx_world(server, stub)

                def settled(event: events_pb2.Event) -> bool:
                    return (
                        event.type == events_pb2.EVENT_TYPE_FILE_CHANGED
                        and event.file_changed.change == events_pb2.CHANGE_KIND_UPDATED
                    )

                async with awaiting_event(server, settled) as updated:

                    async def frames() -> AsyncIterator[cpb.UploadFileRequest]:
                        for frame in _upload_frames(world.name, counting):
                            yield frame

                    uploaded = await stub.UploadFile(
                        frames(), metadata=world.editor.md, timeout=CALL_DEADLINE_S
                    )
                    stored = uploaded.file
                    assert stored.kind == cpb.FILE_KIND_AUDIO
                    assert stored.text_state == cpb.FILE_TEXT_STATE_PENDING
                    event = await asyncio.wait_for(updated, CALL_DEADLINE_S)
                assert event.file_changed.file.name == stored.name
                assert event.file_changed.file.text_state == cpb.FILE_TEXT_STATE_READY
                assert not event.file_changed.file.text  # the BASIC view
                got = await stub.GetFile(
                    cpb.GetFileRequest(name=stored.name, view=cpb.FILE_VIEW_FULL),
                    metadata=world.viewer.md,
                    timeout=CALL_DEADLINE_S,
                )
                assert got.file.text_state == cpb.FILE_TEXT_STATE_READY
                assert says(got.file.text), got.file.text
                assert got.file.text_token_count > 0
                (request,) = audio.requests
                assert request.file_size == len(counting)
                assert request.filename == "memo.wav"
        finally:
            await server.shutdown(grace=0)


async def test_a_refused_endpoint_leaves_the_recording_failed_with_why(
    database_url: str, counting: bytes
) -> None:
    """The default egress policy refuses loopback: the file is stored, its text FAILED."""
    async with FakeAudio() as audio:
        server, _ = await create_server(
            make_settings(database_url=database_url, context_transcription_url=audio.url)
        )
        await server.start()
        try:
            async with aio.insecure_channel(server.address) as channel:
                stub = context_stub(channel)
                world = await ctx_world(server, stub)

                def settled(event: events_pb2.Event) -> bool:
                    return (
                        event.type == events_pb2.EVENT_TYPE_FILE_CHANGED
                        and event.file_changed.change == events_pb2.CHANGE_KIND_UPDATED
                    )

                async with awaiting_event(server, settled) as updated:

                    async def frames() -> AsyncIterator[cpb.UploadFileRequest]:
                        for frame in _upload_frames(world.name, counting):
                            yield frame

                    await stub.UploadFile(
                        frames(), metadata=world.editor.md, timeout=CALL_DEADLINE_S
                    )
                    event = await asyncio.wait_for(updated, CALL_DEADLINE_S)
            failed = event.file_changed.file
            assert failed.text_state == cpb.FILE_TEXT_STATE_FAILED
            assert "refused by the egress policy" in failed.text_error
            assert audio.requests == []
        finally:
            await server.shutdown(grace=0)
