"""The audio server's recognition process (``tests/fakes/audio_server.py``).

PocketSphinx holds the interpreter lock while it decodes, so the command line's audio
server recognizes here, in a process of its own, and its loop keeps serving speech
meanwhile. The protocol, one request at a time: the server writes a WAV's length (8
bytes, big-endian) and the WAV; this answers one JSON line, ``{"text", "duration"}``,
or ``{"unsupported": true}`` for audio the recognizer cannot read. It ends when its
standard input does.
"""

from __future__ import annotations

import json
import struct
import sys

from tests.fakes.audio_server import Recognizer, Unsupported


def main() -> int:
    recognizer = Recognizer()
    source, sink = sys.stdin.buffer, sys.stdout
    while header := source.read(8):
        (size,) = struct.unpack(">Q", header)
        data = source.read(size)
        try:
            text, duration = recognizer.transcribe(data)
            answer: dict[str, object] = {"text": text, "duration": duration}
        except Unsupported:
            answer = {"unsupported": True}
        sink.write(json.dumps(answer) + "\n")
        sink.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
