"""The port for audio transcription: an audio file's bytes in, its transcript out.

The files domain takes an optional ``Transcriber``; with one, an audio file's
text is PENDING when it is stored and a background task transcribes it. The
adapter (an OpenAI-compatible transcription endpoint) is built from the
settings in ``context/build.py``.
"""

from __future__ import annotations

from typing import Protocol


class Transcriber(Protocol):
    """Turns speech into text."""

    async def transcribe(self, data: bytes, *, media_type: str, filename: str) -> str:
        """The transcript of ``data``; raises any exception on failure (the file's
        text state becomes FAILED with a short reason)."""
        ...
