"""The speech engine adapter (platform/audio/openai.py) against the local audio server:
eSpeak NG speaks, PocketSphinx listens, over HTTP through the egress policy; nothing
is mocked. Also the local server's speech endpoint itself, as the API answers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from switchboard.platform.audio import pcm
from switchboard.platform.audio.openai import OpenAIAudio
from switchboard.platform.errors import SpeechRefused, SpeechUnavailable
from switchboard.platform.security.egress import EgressPolicy
from tests.fakes.audio_server import TONE_TRANSCRIPT, FakeAudio
from tests.infra.speech import COUNTING, says

pytestmark = pytest.mark.service

if TYPE_CHECKING:
    from switchboard.dispatcher.voice.ports import SpeechEngine

ROOT = Path(__file__).resolve().parents[3]
LOOPBACK = EgressPolicy(allow_loopback=True)
KEY = "sk-test-speech-secret-0123456789"


@pytest.fixture
async def audio() -> AsyncIterator[FakeAudio]:
    async with FakeAudio(api_key=KEY) as fake:
        yield fake


def engine(url: str, **kwargs: Any) -> OpenAIAudio:
    options: dict[str, Any] = {
        "api_key": KEY,
        "policy": LOOPBACK,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    options.update(kwargs)
    return OpenAIAudio(url, **options)


async def spoken(client: OpenAIAudio, text: str, rate: int) -> list[tuple[float, bytes]]:
    """The pieces ``speak`` yields, each with when it arrived."""
    return [
        (time.monotonic(), piece)
        async for piece in client.speak(text, model="tts-1", voice="alloy", sample_rate_hz=rate)
    ]


async def test_spoken_words_come_back_as_the_words(audio: FakeAudio) -> None:
    """Speech synthesized at 16 kHz (resampled from the API's 24 kHz) and sent back for
    recognition is the sentence it was made from."""
    client = engine(audio.url)
    port: SpeechEngine = client  # the dispatcher's port (mypy checks the shape)
    try:
        pieces = await spoken(client, COUNTING, 16_000)
        speech = b"".join(piece for _, piece in pieces)
        assert all(len(piece) % 2 == 0 for _, piece in pieces)
        text = await port.transcribe(
            pcm.to_wav(speech, 16_000),
            media_type="audio/wav",
            filename="turn.wav",
            model="whisper-1",
            language="en",
        )
    finally:
        await port.close()
    assert says(text), text
    said, heard = audio.requests
    assert json.loads(json.dumps(said.fields)) == {
        "model": "tts-1",
        "input": COUNTING,
        "voice": "alloy",
        "response_format": "pcm",
    }
    assert said.headers["authorization"] == f"Bearer {KEY}"
    assert heard.fields == {"model": "whisper-1", "response_format": "json", "language": "en"}
    assert (heard.filename, heard.file_type) == ("turn.wav", "audio/wav")


async def test_speech_streams_as_it_is_synthesized(audio: FakeAudio) -> None:
    """The answer comes in pieces the server sent over time, its first long before its
    last (the server's own clock), and the client's first before the server's last."""
    client = engine(audio.url)
    try:
        pieces = await spoken(client, "one two three four five six seven eight nine ten", 24_000)
    finally:
        await client.close()
    (timing,) = audio.timings
    assert timing.first_byte is not None
    assert timing.last_byte is not None
    assert len(pieces) > 3
    assert timing.arrived < timing.first_byte < timing.last_byte
    # Several seconds of speech, in the API's format: 24 kHz, 16-bit.
    assert pcm.duration_ms(sum(len(p) for _, p in pieces), 24_000) > 3000


async def test_rates_are_converted(audio: FakeAudio) -> None:
    client = engine(audio.url)
    try:
        native = b"".join(p for _, p in await spoken(client, "one two", 24_000))
        narrow = b"".join(p for _, p in await spoken(client, "one two", 8_000))
    finally:
        await client.close()
    assert len(narrow) == 2 * (len(native) // 2 // 3)
    assert narrow == pcm.resample(native, 24_000, 8_000)


async def test_failures_before_the_first_audio_are_retried(audio: FakeAudio) -> None:
    client = engine(audio.url, max_retries=2)
    try:
        audio.fail_next(503)
        audio.fail_next(429)
        assert await spoken(client, "one", 16_000)
        assert len(audio.requests) == 3
        audio.fail_next(503, count=3)
        with pytest.raises(SpeechUnavailable) as failed:
            await spoken(client, "one", 16_000)
    finally:
        await client.close()
    assert failed.value.message == (
        "the speech endpoint answered HTTP 503: The server had an error after 3 attempts"
    )
    assert failed.value.metadata == {"http_status": "503"}
    assert len(audio.requests) == 6


async def test_refusals_say_what_was_refused(audio: FakeAudio) -> None:
    client = engine(audio.url)
    try:
        with pytest.raises(SpeechRefused) as refused:
            async for _ in client.speak("one", model="tts-1", voice="", sample_rate_hz=16_000):
                pass
        assert refused.value.message == (
            "the speech endpoint refused the text, model or voice (HTTP 400): "
            "Missing required parameter: 'voice'."
        )
        assert refused.value.metadata == {"http_status": "400"}
        assert len(audio.requests) == 1  # a refusal is not retried
        with pytest.raises(SpeechRefused) as refused:
            await client.transcribe(
                b"ID3\x04" + bytes(100),
                media_type="audio/mpeg",
                filename="a",
                model="whisper-1",
                language="",
            )
        assert refused.value.message == (
            "the transcription endpoint refused the audio (HTTP 400): "
            "Audio file might be corrupted or unsupported"
        )
        # Refused before sending: the API's limits.
        with pytest.raises(SpeechRefused, match="4097 characters, more than the 4096"):
            await spoken(client, "a" * 4097, 16_000)
        with pytest.raises(SpeechRefused, match="empty"):
            await client.transcribe(
                b"", media_type="audio/wav", filename="a.wav", model="m", language=""
            )
        assert len(audio.requests) == 2
        assert await spoken(client, "  \n", 16_000) == []  # nothing to say, nothing asked
    finally:
        await client.close()


async def test_a_refused_key_says_only_that(
    audio: FakeAudio, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = engine(audio.url, api_key="sk-wrong-key-which-must-stay-secret")
    try:
        with pytest.raises(SpeechRefused) as refused:
            await spoken(client, "one", 16_000)
    finally:
        await client.close()
    assert refused.value.message == "the speech endpoint refused the API key (HTTP 401)"
    assert "secret" not in caplog.text
    assert len(audio.requests) == 0  # the fake records what it accepted


async def test_the_egress_policy_refuses_loopback_unless_allowed(audio: FakeAudio) -> None:
    client = engine(audio.url, policy=EgressPolicy())
    try:
        with pytest.raises(SpeechRefused, match="refused by the egress policy"):
            await spoken(client, "one", 16_000)
        with pytest.raises(SpeechRefused, match="refused by the egress policy"):
            await client.transcribe(
                b"RIFF", media_type="audio/wav", filename="a.wav", model="m", language=""
            )
    finally:
        await client.close()
    assert audio.requests == []


async def test_an_endpoint_that_is_down_is_unavailable() -> None:
    async with FakeAudio() as gone:
        url = gone.url
    client = engine(url, max_retries=1)
    try:
        with pytest.raises(SpeechUnavailable, match=r"could not be reached .* after 2 attempts"):
            await spoken(client, "one", 16_000)
    finally:
        await client.close()


async def test_a_listener_that_stops_ends_the_request(audio: FakeAudio) -> None:
    """Closing the iterator after the first piece (a barge-in) closes the connection;
    the server stops synthesizing."""
    client = engine(audio.url)
    try:
        pieces = client.speak(
            "one two three four five six seven eight nine ten " * 20,
            model="tts-1",
            voice="alloy",
            sample_rate_hz=16_000,
        )
        assert await anext(pieces)
        await pieces.aclose()  # type: ignore[attr-defined]
        # The same client goes on working.
        assert await spoken(client, "one", 16_000)
    finally:
        await client.close()


# -- the local server's speech endpoint, as the API answers ----------------------------------


async def post_speech(fake: FakeAudio, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{fake.url}/audio/speech", json=body, headers={"authorization": f"Bearer {KEY}"}
        )


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": "hi", "voice": "alloy"}, "model", "you must provide a model parameter"),
        ({"model": "tts-1", "voice": "alloy"}, "input", "Missing required parameter: 'input'."),
        ({"model": "tts-1", "input": "hi"}, "voice", "Missing required parameter: 'voice'."),
        (
            {"model": "tts-1", "input": "a" * 4097, "voice": "alloy", "response_format": "pcm"},
            "input",
            "String should have at most 4096 characters",
        ),
        (
            {"model": "tts-1", "input": "hi", "voice": "alloy"},
            "response_format",
            "response_format 'mp3' is not supported by the local audio server; "
            "use one of ['pcm', 'wav']",
        ),
        (
            {"model": "tts-1", "input": "hi", "voice": "x", "response_format": "pcm", "speed": 9},
            "speed",
            "Expected a number between 0.25 and 4.0",
        ),
    ],
)
async def test_the_server_refuses_as_the_api_does(
    audio: FakeAudio, body: dict[str, Any], param: str, message: str
) -> None:
    answer = await post_speech(audio, body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param
    assert message in error["message"]


async def test_the_server_speaks_wav_with_a_header_first(audio: FakeAudio) -> None:
    answer = await post_speech(
        audio, {"model": "tts-1", "input": COUNTING, "voice": "nova", "response_format": "wav"}
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "audio/wav"
    assert answer.headers["transfer-encoding"] == "chunked"
    with wave.open(io.BytesIO(answer.content)) as heard:
        assert (heard.getnchannels(), heard.getsampwidth(), heard.getframerate()) == (1, 2, 24_000)
        assert heard.readframes(24_000)  # the sizes are unknown, the samples are there


async def test_the_fast_engine_answers_at_once_and_speaks_a_tone() -> None:
    async with FakeAudio(engine="tone") as fake:
        client = engine(fake.url, api_key="")
        try:
            short = b"".join(p for _, p in await spoken(client, "one", 24_000))
            long = b"".join(p for _, p in await spoken(client, "one two three four", 24_000))
            text = await client.transcribe(
                pcm.to_wav(long, 24_000),
                media_type="audio/wav",
                filename="t.wav",
                model="m",
                language="",
            )
        finally:
            await client.close()
    assert text == TONE_TRANSCRIPT
    assert pcm.duration_ms(len(short), 24_000) == 3 * 60  # 60 ms a character
    assert pcm.duration_ms(len(long), 24_000) == 18 * 60


async def test_the_server_runs_on_its_own_with_an_engine() -> None:
    """``python -m tests.fakes.audio_server --port 0 --engine tone``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.audio_server",
        "--port",
        "0",
        "--quiet",
        "--engine",
        "tone",
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        client = engine(url, api_key="")
        try:
            assert b"".join(p for _, p in await spoken(client, "hello", 16_000))
        finally:
            await client.close()
    finally:
        process.terminate()
        await process.wait()


async def test_silence_is_no_words(audio: FakeAudio) -> None:
    """The recognizer's voice activity detector hears no speech: empty text, not a guess."""
    client = engine(audio.url)
    try:
        text = await client.transcribe(
            pcm.to_wav(bytes(pcm.byte_count(1000, 16_000)), 16_000),
            media_type="audio/wav",
            filename="quiet.wav",
            model="whisper-1",
            language="",
        )
    finally:
        await client.close()
    assert text == ""
