"""Speech for the transcription tests, synthesized by eSpeak NG (scripts/install-deps.sh).

``COUNTING`` is what PocketSphinx (tests/fakes/audio_server.py) recognizes
reliably from eSpeak's American voice ``m3`` at 140 words a minute: tried by
hand, it comes back word for word, where most everyday sentences come back as
other words. The leading ". ." is a pause, so the first word is not clipped.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

COUNTING = "one two three four five"
#: What a test asserts the transcript holds (tolerant: the order of these, anywhere).
COUNTING_WORDS = ("three", "four", "five")


def speak(text: str) -> bytes:
    """A WAV (16-bit PCM mono, 22,050 Hz: eSpeak's own rate) of ``text`` spoken."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.fail("espeak-ng is not installed; run scripts/install-deps.sh")
    # A file, not --stdout: a streamed WAV's header cannot say how long it is.
    with tempfile.TemporaryDirectory(prefix="speech-") as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run(
            [espeak, "-v", "en-us+m3", "-s", "140", "-w", str(path), f". . {text}"],
            capture_output=True,
            timeout=30,
            check=True,
        )
        return path.read_bytes()


def says(transcript: str, words: tuple[str, ...] = COUNTING_WORDS) -> bool:
    """Whether ``words`` occur in ``transcript`` in that order, next to each other."""
    return " ".join(words) in " ".join(transcript.lower().split())
