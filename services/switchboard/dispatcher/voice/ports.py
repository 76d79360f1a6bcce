"""The port to the speech engines: recognition and synthesis.

The adapter is ``platform/audio/openai.py`` (an OpenAI-compatible audio API at
``SWITCHBOARD_VOICE_URL``), built in ``dispatcher/build.py``; without that
setting there is no engine and speech is ``SPEECH_NOT_CONFIGURED``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class SpeechEngine(Protocol):
    """Turns speech into text and text into speech.

    Failures raise ``platform.errors.SpeechUnavailable`` (the endpoint is down
    or failing after its retries: worth retrying later) or ``SpeechRefused``
    (it refused the audio, the model or the voice); their messages are safe to
    show the caller (never the key).
    """

    async def transcribe(
        self, audio: bytes, *, media_type: str, filename: str, model: str, language: str
    ) -> str:
        """The transcript of ``audio`` (a file: WAV here), stripped."""
        ...

    def speak(
        self, text: str, *, model: str, voice: str, sample_rate_hz: int
    ) -> AsyncIterator[bytes]:
        """``text`` spoken: mono PCM16 little-endian at ``sample_rate_hz``, yielded
        as the endpoint streams it (pieces of any length, each a whole number of
        samples), so the first audio goes out before the rest is synthesized."""
        ...

    async def close(self) -> None: ...
