"""Audio transcription through an OpenAI-compatible endpoint (``Transcriber``).

The HTTP client is the platform's (``platform/audio/openai.py``, shared with
the dispatcher's voice): ``POST {url}/audio/transcriptions`` through the egress
policy, with its timeouts and bounded, jittered retries. This adapter adds the
files' own limits (the size sent for transcription) and words its failures as
``TranscriptionFailed``, safe to show the file's readers: the HTTP status and
the API's own message, cut short, never the key (a 401 or 403 says only that
the key was refused, and which setting holds it).

The URL is the operator's (``SWITCHBOARD_CONTEXT_TRANSCRIPTION_URL``), never a
user's; a loopback or private endpoint (a local server in development) needs
``SWITCHBOARD_EGRESS_ALLOW_LOOPBACK`` or ``..._ALLOW_PRIVATE``.
"""

from __future__ import annotations

from switchboard.platform.audio.openai import OpenAIAudio, upload_name
from switchboard.platform.errors import SpeechRefused, SpeechUnavailable
from switchboard.platform.security.egress import EgressPolicy

__all__ = ["OpenAITranscriber", "TranscriptionFailed", "upload_name"]


class TranscriptionFailed(Exception):
    """The audio could not be transcribed; ``str()`` is safe to show."""


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
        self._model = model
        self._max_bytes = max_bytes
        self._audio = OpenAIAudio(
            url,
            api_key=api_key,
            policy=policy,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_retries=max_retries,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
        )

    async def close(self) -> None:
        await self._audio.close()

    async def transcribe(self, data: bytes, *, media_type: str, filename: str) -> str:
        if len(data) > self._max_bytes:
            raise TranscriptionFailed(
                f"the audio is {len(data)} bytes, more than the {self._max_bytes} bytes "
                "sent for transcription"
            )
        if not data:
            raise TranscriptionFailed("the audio file is empty")
        try:
            return await self._audio.transcribe(
                data, media_type=media_type, filename=filename, model=self._model, language=""
            )
        except (SpeechRefused, SpeechUnavailable) as exc:
            message = exc.message
            if exc.metadata.get("http_status") in ("401", "403"):
                message += "; check SWITCHBOARD_CONTEXT_TRANSCRIPTION_API_KEY"
            raise TranscriptionFailed(message) from None
