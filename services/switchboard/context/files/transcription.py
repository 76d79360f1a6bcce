"""Audio transcription through an OpenAI-compatible endpoint (``Transcriber``).

``POST {url}/audio/transcriptions`` as ``multipart/form-data``: ``model``,
``file`` (the audio, named with an extension the API reads its format from)
and ``response_format=json``; the answer's ``text`` is the transcript.

The URL is the operator's (``SWITCHBOARD_CONTEXT_TRANSCRIPTION_URL``), never a
user's, but the call still goes through the egress policy like every outbound
call: a loopback or private endpoint (a local server in development) needs
``SWITCHBOARD_EGRESS_ALLOW_LOOPBACK`` or ``..._ALLOW_PRIVATE``, and a name is
resolved and checked per connection.

Each attempt has a connect timeout and an overall one; 408, 409, 429, 5xx,
connection errors and timeouts are retried a bounded number of times with
jittered doubling delays (never less than a ``Retry-After``, within a cap);
anything else fails at once. What a failure says (``TranscriptionFailed``) is
safe to show the file's readers: the HTTP status and the API's own message,
cut short, never the key (a 401 or 403 says only that the key was refused),
headers or the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from pathlib import PurePosixPath
from typing import Final

import httpx

from switchboard.platform import backoff
from switchboard.platform.errors import DestinationBlocked, ResolutionFailed
from switchboard.platform.security.egress import EgressPolicy, http_client

log = logging.getLogger("switchboard.context.transcription")

#: Statuses worth another attempt: the request may succeed later as it is.
_RETRIED: Final = frozenset({408, 409, 429, 500, 502, 503, 504})
#: A transcript longer than this is not a transcript (hours of speech are far less).
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024
MAX_DETAIL_CHARS: Final = 200
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


class TranscriptionFailed(Exception):
    """The audio could not be transcribed; ``str()`` is safe to show."""


class _Retry(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


def upload_name(filename: str, media_type: str) -> str:
    """A file name the API reads the format from: ``filename`` made plain ASCII,
    with the media type's extension when it has no audio extension of its own."""
    name = _UNSAFE_NAME.sub("_", PurePosixPath(filename.replace("\\", "/")).name)[:100]
    name = name.strip(" .") or "audio"
    if PurePosixPath(name).suffix.lower() in _KNOWN_SUFFIXES:
        return name
    return name + _EXTENSIONS.get(media_type.split(";", 1)[0].strip().lower(), ".wav")


def _retry_after(headers: httpx.Headers) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue
    return None


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


class OpenAITranscriber:
    """``Transcriber`` over an OpenAI-compatible ``/audio/transcriptions`` endpoint."""

    def __init__(
        self,
        url: str,
        *,
        model: str,
        api_key: str,
        policy: EgressPolicy,
        max_bytes: int,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 2,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
    ) -> None:
        self._endpoint = url.rstrip("/") + "/audio/transcriptions"
        self._model = model
        self._max_bytes = max_bytes
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

    async def transcribe(self, data: bytes, *, media_type: str, filename: str) -> str:
        if len(data) > self._max_bytes:
            raise TranscriptionFailed(
                f"the audio is {len(data)} bytes, more than the {self._max_bytes} bytes "
                "sent for transcription"
            )
        if not data:
            raise TranscriptionFailed("the audio file is empty")
        name = upload_name(filename, media_type)
        kind = media_type or "application/octet-stream"
        attempt = 0
        while True:
            try:
                return await self._attempt(data, kind, name)
            except _Retry as retry:
                if attempt >= self._max_retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise TranscriptionFailed(
                        f"the transcription endpoint {retry.reason}{tries}"
                    ) from None
                delay = backoff.full_jitter(
                    attempt,
                    base_s=self._backoff[0],
                    max_s=self._backoff[1],
                    rng=self._rng,
                    at_least_s=retry.retry_after_s,
                )
                log.warning(
                    "transcription attempt failed; retrying",
                    extra={"reason": retry.reason, "attempt": attempt + 1, "delay_s": delay},
                )
                attempt += 1
                await asyncio.sleep(delay)  # retry backoff, not synchronization

    async def _attempt(self, data: bytes, media_type: str, name: str) -> str:
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._client.stream(
                    "POST",
                    self._endpoint,
                    data={"model": self._model, "response_format": "json"},
                    files={"file": (name, data, media_type)},
                ) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_ANSWER_BYTES:
                            raise TranscriptionFailed(
                                "the transcription endpoint answered with more than "
                                f"{MAX_ANSWER_BYTES} bytes"
                            )
        except DestinationBlocked:
            raise TranscriptionFailed(
                "the transcription endpoint's address is refused by the egress policy "
                "(SWITCHBOARD_EGRESS_ALLOW_LOOPBACK, _ALLOW_PRIVATE or _ALLOW_CIDRS allow it)"
            ) from None
        except ResolutionFailed:
            raise _Retry("could not be resolved") from None
        except TimeoutError:
            raise _Retry(f"did not answer within {self._timeout_s:g} s") from None
        except httpx.TimeoutException:
            raise _Retry("timed out") from None
        except httpx.HTTPError as exc:
            raise _Retry(f"could not be reached ({type(exc).__name__})") from None
        status = response.status_code
        if status in _RETRIED:
            detail = _api_message(bytes(body))
            raise _Retry(
                f"answered HTTP {status}" + (f": {detail}" if detail else ""),
                _retry_after(response.headers),
            )
        if status in (401, 403):
            raise TranscriptionFailed(
                f"the transcription endpoint refused the API key (HTTP {status}); "
                "check SWITCHBOARD_CONTEXT_TRANSCRIPTION_API_KEY"
            )
        if status != 200:
            detail = _api_message(bytes(body))
            raise TranscriptionFailed(
                f"the transcription endpoint refused the audio (HTTP {status})"
                + (f": {detail}" if detail else "")
            )
        try:
            answer = json.loads(bytes(body))
        except ValueError:
            answer = None
        text = answer.get("text") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise TranscriptionFailed(
                "the transcription endpoint answered without a transcript (no JSON `text`)"
            )
        return text.strip()
