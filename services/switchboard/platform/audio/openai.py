"""The speech engines over an OpenAI-compatible audio API (``OpenAIAudio``).

Recognition is ``POST {url}/audio/transcriptions``, ``multipart/form-data``:
``model``, ``file`` (the audio, named with an extension the API reads its
format from), ``response_format=json`` and ``language`` when one is given; the
answer's ``text`` is the transcript.

Synthesis is ``POST {url}/audio/speech`` with JSON ``{model, input, voice,
response_format: "pcm"}``; the API's ``pcm`` is raw 16-bit little-endian mono
at 24 kHz, streamed as it is synthesized. ``speak`` yields it as it arrives,
converted to the rate asked for (``pcm.Resampler``), in whole samples.

This is the one HTTP client of those endpoints: the dispatcher's voice uses it
through its ``SpeechEngine`` port (matched structurally: the platform imports no
service), the context's file transcription (``context/files/reading/transcription.py``)
through its own ``Transcriber`` port.

The URL is the operator's, never a user's, but the calls still go through the
egress policy like every outbound call: a loopback or private endpoint (a local
server in development) needs ``SWITCHBOARD_EGRESS_ALLOW_LOOPBACK`` or
``..._ALLOW_PRIVATE``, and a name is resolved and checked per connection.

**Timeouts.** Each request has a connect timeout, and ``timeout_s`` for all of
its waiting on the endpoint: every read is bounded by what is left of it (for
speech, the time the caller spends between pieces does not count, so a slow
listener does not cut the answer short).

**Retries.** 408, 409, 429, 5xx, connection errors and timeouts are retried a
bounded number of times with jittered doubling delays (never less than a
``Retry-After``, within a cap). Speech is retried only until its first audio
was yielded: audio already played cannot be taken back, so a failure after
that raises.

**Errors.** ``SpeechUnavailable``: the endpoint is down or failing (after its
retries). ``SpeechRefused``: it refused the request (400, 401, 403, 404, 413,
422 and any other status that is not worth retrying), or the egress policy
refused its address. Their messages are safe to show: the HTTP status and the
API's own ``error.message``, cut short, never the key (a 401 or 403 says only
that the key was refused), headers or the request. An error that carries an
HTTP status has it in its metadata (``http_status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import PurePosixPath
from typing import Final, NoReturn

import httpx

from switchboard.platform.audio import pcm
from switchboard.platform.errors import (
    DestinationBlocked,
    ResolutionFailed,
    SpeechRefused,
    SpeechUnavailable,
)
from switchboard.platform.resilience import backoff
from switchboard.platform.security.egress import EgressPolicy, http_client

log = logging.getLogger("switchboard.platform.audio")

#: The rate of the API's ``pcm`` speech.
SPEECH_RATE: Final = 24_000
#: The API's limits: an upload, and the text of one speech request.
MAX_UPLOAD_BYTES: Final = 25 * 1024 * 1024
MAX_SPEECH_CHARS: Final = 4096
#: A transcript longer than this is not a transcript (hours of speech are far less).
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024
#: How much of an error's body is read for its message.
MAX_ERROR_BYTES: Final = 64 * 1024
MAX_DETAIL_CHARS: Final = 200
#: Statuses worth another attempt: the request may succeed later as it is.
_RETRIED: Final = frozenset({408, 409, 429, 500, 502, 503, 504})
_EGRESS_REFUSED: Final = (
    "address is refused by the egress policy "
    "(SWITCHBOARD_EGRESS_ALLOW_LOOPBACK, _ALLOW_PRIVATE or _ALLOW_CIDRS allow it)"
)
#: The extension the API reads a file's format from, by media type.
_EXTENSIONS: Final = {
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/vnd.wave": ".wav",
    "audio/mpeg": ".mp3",
    "audio/mp3": ".mp3",
    "audio/mp4": ".m4a",
    "audio/x-m4a": ".m4a",
    "audio/m4a": ".m4a",
    "audio/aac": ".m4a",
    "audio/ogg": ".ogg",
    "audio/opus": ".ogg",
    "audio/webm": ".webm",
    "audio/flac": ".flac",
    "audio/x-flac": ".flac",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
}
_KNOWN_SUFFIXES: Final = frozenset(
    {".flac", ".m4a", ".mp3", ".mp4", ".mpeg", ".mpga", ".oga", ".ogg", ".wav", ".webm"}
)
_UNSAFE_NAME: Final = re.compile(r"[^A-Za-z0-9._ -]+")


def upload_name(filename: str, media_type: str) -> str:
    """A file name the API reads the format from: ``filename`` made plain ASCII,
    with the media type's extension when it has no audio extension of its own."""
    name = _UNSAFE_NAME.sub("_", PurePosixPath(filename.replace("\\", "/")).name)[:100]
    name = name.strip(" .") or "audio"
    if PurePosixPath(name).suffix.lower() in _KNOWN_SUFFIXES:
        return name
    return name + _EXTENSIONS.get(media_type.split(";", 1)[0].strip().lower(), ".wav")


class _Retry(Exception):
    def __init__(
        self, reason: str, retry_after_s: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.status = status


class _Budget:
    """What is left of one request's ``timeout_s`` of waiting on the endpoint."""

    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.left = seconds

    @contextlib.asynccontextmanager
    async def waiting(self) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(max(self.left, 0.0)):
                yield
        finally:
            self.left -= loop.time() - started


def _api_message(body: bytes) -> str:
    """The API's ``error.message``, cut short; empty when the body has none."""
    try:
        found = json.loads(body)
    except ValueError:
        return ""
    error = found.get("error") if isinstance(found, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return ""
    return " ".join(message.split())[:MAX_DETAIL_CHARS]


def _status(status: int) -> dict[str, str]:
    return {"http_status": str(status)}


class OpenAIAudio:
    """``SpeechEngine`` (dispatcher/voice/ports.py) over an OpenAI-compatible audio API
    at ``url`` (its base, ``.../v1``)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str,
        policy: EgressPolicy,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 2,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
    ) -> None:
        base = url.rstrip("/")
        self._transcriptions = base + "/audio/transcriptions"
        self._speech = base + "/audio/speech"
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._backoff = (backoff_base_s, backoff_max_s)
        self._rng = random.Random()  # noqa: S311 - retry jitter, not a secret
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = http_client(
            policy,
            timeout_s=connect_timeout_s,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        )

    async def close(self) -> None:
        await self._client.aclose()

    # -- recognition ------------------------------------------------------------------------

    async def transcribe(
        self, audio: bytes, *, media_type: str, filename: str, model: str, language: str
    ) -> str:
        """The transcript of ``audio`` (a file the endpoint reads: WAV here), stripped."""
        if not audio:
            raise SpeechRefused("the audio to transcribe is empty")
        if len(audio) > MAX_UPLOAD_BYTES:
            raise SpeechRefused(
                f"the audio is {len(audio)} bytes, more than the {MAX_UPLOAD_BYTES} "
                "a transcription endpoint takes"
            )
        fields = {"model": model, "response_format": "json"}
        if language:
            fields["language"] = language
        upload = (
            upload_name(filename, media_type),
            audio,
            media_type or "application/octet-stream",
        )
        attempt = 0
        while True:
            try:
                return await self._transcribe_once(fields, upload)
            except _Retry as retry:
                await self._after_failure("transcription", retry, attempt)
                attempt += 1

    async def _transcribe_once(self, fields: dict[str, str], upload: tuple[str, bytes, str]) -> str:
        budget = _Budget(self._timeout_s)
        try:
            async with (
                budget.waiting(),
                self._client.stream(
                    "POST", self._transcriptions, data=fields, files={"file": upload}
                ) as response,
            ):
                ok = response.status_code == 200
                body, cut = await _read_capped(
                    response, MAX_ANSWER_BYTES if ok else MAX_ERROR_BYTES
                )
        except Exception as exc:  # noqa: BLE001 - mapped by kind, the rest re-raised
            self._network_failure("transcription", exc, budget)
        if not ok:
            self._refused_or_retry(
                "transcription", "the audio", response.status_code, body, response.headers
            )
        if cut:
            raise SpeechUnavailable(
                f"the transcription endpoint answered with more than {MAX_ANSWER_BYTES} bytes"
            )
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        text = answer.get("text") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise SpeechUnavailable(
                "the transcription endpoint answered without a transcript (no JSON `text`)"
            )
        return text.strip()

    # -- synthesis --------------------------------------------------------------------------

    async def speak(
        self, text: str, *, model: str, voice: str, sample_rate_hz: int
    ) -> AsyncIterator[bytes]:
        """``text`` spoken: mono PCM16 little-endian at ``sample_rate_hz``, yielded as
        the endpoint streams it (each piece whole samples). Close the iterator
        (``aclose``, or cancel the task reading it) to stop: the request ends."""
        if sample_rate_hz <= 0:
            raise ValueError(f"sample_rate_hz must be positive, not {sample_rate_hz}")
        if not text.strip():
            return
        if len(text) > MAX_SPEECH_CHARS:
            raise SpeechRefused(
                f"the text to speak is {len(text)} characters, more than the "
                f"{MAX_SPEECH_CHARS} a speech endpoint takes"
            )
        payload = {"model": model, "input": text, "voice": voice, "response_format": "pcm"}
        attempt = 0
        started = False
        while True:
            try:
                async with contextlib.aclosing(self._speak_once(payload, sample_rate_hz)) as pieces:
                    async for piece in pieces:
                        started = True
                        yield piece
                return
            except _Retry as retry:
                if started:  # what was played cannot be taken back: no second attempt
                    raise SpeechUnavailable(
                        f"the speech endpoint failed in the middle of its answer: "
                        f"it {retry.reason}",
                        metadata=_status(retry.status) if retry.status else None,
                    ) from None
                await self._after_failure("speech", retry, attempt)
                attempt += 1

    async def _speak_once(self, payload: dict[str, str], rate: int) -> AsyncGenerator[bytes, None]:
        """One request's audio; raises ``_Retry`` for what is worth another attempt."""
        converter = pcm.Resampler(SPEECH_RATE, rate)
        budget = _Budget(self._timeout_s)
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with budget.waiting():
                    response = await stack.enter_async_context(
                        self._client.stream("POST", self._speech, json=payload)
                    )
                    ok = response.status_code == 200
                    body = b"" if ok else (await _read_capped(response, MAX_ERROR_BYTES))[0]
            except Exception as exc:  # noqa: BLE001 - mapped by kind, the rest re-raised
                self._network_failure("speech", exc, budget)
            if not ok:
                self._refused_or_retry(
                    "speech",
                    "the text, model or voice",
                    response.status_code,
                    body,
                    response.headers,
                )
            if "json" in response.headers.get("content-type", ""):
                raise SpeechUnavailable("the speech endpoint answered with JSON, not audio")
            chunks = response.aiter_bytes()
            while True:
                try:
                    async with budget.waiting():
                        chunk = await anext(chunks, None)
                except Exception as exc:  # noqa: BLE001 - mapped by kind, the rest re-raised
                    self._network_failure("speech", exc, budget)
                if chunk is None:
                    break
                piece = converter.feed(chunk)
                if piece:
                    yield piece
        tail = converter.flush()
        if tail:
            yield tail

    # -- failures ---------------------------------------------------------------------------

    def _network_failure(self, what: str, exc: Exception, budget: _Budget) -> NoReturn:
        """Map what sending or reading raised: a refusal, an attempt to retry, or
        ``exc`` itself (a bug, or one of our own errors)."""
        if isinstance(exc, DestinationBlocked):
            raise SpeechRefused(f"the {what} endpoint's {_EGRESS_REFUSED}") from None
        if isinstance(exc, ResolutionFailed):
            raise _Retry("could not be resolved") from None
        if isinstance(exc, TimeoutError):
            raise _Retry(f"did not answer within {budget.total:g} s") from None
        if isinstance(exc, httpx.TimeoutException):
            raise _Retry("timed out") from None
        if isinstance(exc, httpx.HTTPError):
            raise _Retry(f"could not be reached ({type(exc).__name__})") from None
        raise exc

    def _refused_or_retry(
        self, what: str, thing: str, status: int, body: bytes, headers: httpx.Headers
    ) -> NoReturn:
        detail = _api_message(body)
        said = f": {detail}" if detail else ""
        if status in _RETRIED:
            raise _Retry(f"answered HTTP {status}{said}", backoff.retry_after(headers), status)
        if status in (401, 403):
            raise SpeechRefused(
                f"the {what} endpoint refused the API key (HTTP {status})",
                metadata=_status(status),
            )
        raise SpeechRefused(
            f"the {what} endpoint refused {thing} (HTTP {status}){said}",
            metadata=_status(status),
        )

    async def _after_failure(self, what: str, retry: _Retry, attempt: int) -> None:
        """Wait before the next attempt, or raise when the attempts are spent."""
        if attempt >= self._max_retries:
            tries = f" after {attempt + 1} attempts" if attempt else ""
            raise SpeechUnavailable(
                f"the {what} endpoint {retry.reason}{tries}",
                metadata=_status(retry.status) if retry.status else None,
            ) from None
        delay = backoff.full_jitter(
            attempt,
            base_s=self._backoff[0],
            max_s=self._backoff[1],
            rng=self._rng,
            at_least_s=retry.retry_after_s,
        )
        log.warning(
            "%s attempt failed; retrying",
            what,
            extra={"reason": retry.reason, "attempt": attempt + 1, "delay_s": delay},
        )
        await asyncio.sleep(delay)  # retry backoff, not synchronization


async def _read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body, and whether there was more."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            return bytes(body[:limit]), True
    return bytes(body), False
