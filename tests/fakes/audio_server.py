"""A local server of the OpenAI audio API, for tests and local runs: real speech
recognition and synthesis, on ``127.0.0.1``, with nothing hosted.

``POST /v1/audio/transcriptions`` takes the API's ``multipart/form-data`` request
(``file``, ``model``, optional ``response_format`` ``json`` (the default),
``text`` or ``verbose_json``, ``language``, ``prompt``, ``temperature``) and
answers ``{"text": ...}`` as the API does. The words are recognized by
PocketSphinx (its PyPI package carries an English acoustic model, a language
model and a dictionary): the file must be a WAV of 16-bit PCM, mono or stereo
(mixed down), at any rate (resampled to the model's 16 kHz); audio in which
PocketSphinx's voice activity detector hears no speech is answered with empty
text (its decoder alone guesses words even in digital silence). Anything else
(MP3, Ogg, 8-bit or float WAV, not audio at all) is refused with the API's
``400`` ("Audio file might be corrupted or unsupported"), a request without
a file or a model with the API's ``400`` naming the field, a body over the
API's 25 MB with its ``413``. Errors are JSON ``{"error": {"message", "type",
"param", "code"}}``.

``POST /v1/audio/speech`` takes the API's JSON (``model``, ``input``, ``voice``,
``response_format``, ``speed``) and answers with the text spoken by eSpeak NG
(Debian's ``espeak-ng``), streamed with ``Transfer-Encoding: chunked`` as it
is synthesized: ``espeak-ng --stdout`` runs as a subprocess, and its WAV
stream (22,050 Hz) is converted to the API's 24 kHz 16-bit mono piece by piece
and sent at once. ``response_format`` ``pcm`` is that raw PCM, ``wav`` the same
after a header of unknown length; the API's other formats (``mp3``, its default,
``opus``, ``aac``, ``flac``) are a ``400`` saying which are served. A missing
``model``, ``input`` or ``voice``, an ``input`` over 4096 characters or a
``speed`` outside 0.25 to 4 are the API's ``400``s naming the field. Every voice
is eSpeak's ``en-us+m3`` at 140 words a minute (times ``speed``), after a short
pause: what PocketSphinx recognizes (tests/infra/speech.py).

Recognition runs one request at a time (one decoder). Run on its own (the
command line below, as the e2e tests run it), the server recognizes in a process of
its own: PocketSphinx holds the interpreter lock while it decodes (about 0.75 s of
a 1.6 s utterance on two cores), so in a thread it stalled the server's loop, and
every speech request with it, behind each transcription (on a busy host the
backlog held answers back by seconds; tests/fakes/recognizer_worker.py). In a
test's own process (``FakeAudio()``) it stays in a worker thread. Tests can make the next
requests fail (``fail_next``) to check a client's retries, hold transcriptions and let
them through one by one in an order they choose (``hold``, ``held``, ``release``: a
slow recognizer, made deterministic), and see every
request (``requests``) and when each arrived and its answer's first and last
bytes left (``timings``, on ``time.monotonic()``: a benchmark in the same
process takes the time spent in here out of its own). ``engine="tone"``
swaps the engines for instant ones (a fixed transcript; a tone as long as the
text for speech), so a benchmark measures its client, not them.

Run on its own (from the repository root)::

    .venv/bin/python -m tests.fakes.audio_server --port 0 [--engine tone]

prints its base URL (``http://127.0.0.1:<port>/v1``) on the first line of
stdout and serves until it is killed. See docs/local-model.md, "Local audio".
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import email.parser
import email.policy
import json
import math
import shutil
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from switchboard.platform.audio import pcm
from tests.fakes.plainhttp import (
    LoopbackServer,
    key_refusal,
    read_head,
    send,
    send_error,
    send_json,
    serve_until_signalled,
)

#: The API's limit on an upload (25 MB).
MAX_BODY_BYTES: Final = 25 * 1024 * 1024
#: What the model was trained on.
MODEL_RATE: Final = 16_000
_FORMATS: Final = frozenset({"json", "text", "verbose_json"})
UNSUPPORTED: Final = "Audio file might be corrupted or unsupported"
#: Speech: the formats served (the API's others, mp3 its default among them, are
#: refused), their media types, and the API's limits.
_SPEECH_FORMATS: Final = {"pcm": "audio/pcm", "wav": "audio/wav"}
SPEECH_RATE: Final = 24_000
MAX_SPEECH_CHARS: Final = 4096
MIN_SPEED: Final = 0.25
MAX_SPEED: Final = 4.0
#: The voice PocketSphinx recognizes (tests/infra/speech.py), whatever voice is asked for.
ESPEAK_VOICE: Final = "en-us+m3"
ESPEAK_WPM: Final = 140
_READ_BYTES: Final = 8192
#: The fast engine: how long a character of text sounds (about eSpeak's pace at 140 wpm).
TONE_MS_PER_CHAR: Final = 60
TONE_TRANSCRIPT: Final = "what is the weather like today"
Engine = Literal["real", "tone"]


@dataclass(frozen=True)
class Received:
    """One request as the fake read it: the form's text fields, and the file's
    name, media type and size (its bytes are not kept)."""

    method: str
    path: str
    #: Header names in lower case.
    headers: dict[str, str]
    fields: dict[str, str]
    filename: str = ""
    file_type: str = ""
    file_size: int = -1
    #: A JSON request's parsed body (speech), as sent.
    body: Any = None


@dataclass
class Timing:
    """When a request arrived and its answer's first and last bytes went out
    (``time.monotonic()``; for speech, the first audio), so a benchmark can take
    the time spent in here out of its own figures."""

    path: str
    arrived: float
    first_byte: float | None = None
    last_byte: float | None = None
    #: What the request was about: the text to speak, or the uploaded file's size.
    detail: str = ""


_Route = Callable[
    [str, str, dict[str, str], bytes, asyncio.StreamWriter, bool, Timing], Awaitable[None]
]


class Unsupported(ValueError):
    """Audio the recognizer cannot read."""


def pcm16_mono(data: bytes) -> tuple[bytes, int]:
    """The samples of a 16-bit PCM WAV mixed down to mono, and their rate; raises
    ``Unsupported`` for anything else."""
    try:
        samples, rate = pcm.from_wav(data)
    except pcm.NotPcm as exc:
        raise Unsupported(str(exc)) from None
    if not 8_000 <= rate <= 192_000:
        raise Unsupported(f"{rate} Hz")
    return samples, rate


class Recognizer:
    """PocketSphinx's English model, one utterance at a time (a decoder is not
    safe to share between threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decoder: Any = None
        self._vad: Any = None

    def transcribe(self, data: bytes) -> tuple[str, float]:
        """The words in a WAV, and its duration in seconds; raises ``Unsupported``."""
        samples, rate = pcm16_mono(data)
        duration = len(samples) / 2 / rate
        audio = pcm.resample(samples, rate, MODEL_RATE)
        with self._lock:
            if self._decoder is None:
                from pocketsphinx import Decoder, Vad  # loads the model: once, when first needed

                self._decoder = Decoder(loglevel="FATAL")
                self._vad = Vad(Vad.LOOSE, MODEL_RATE)
            # No speech, no words: the decoder alone guesses some in silence ("dog").
            size = self._vad.frame_bytes
            if not any(
                self._vad.is_speech(audio[start : start + size])
                for start in range(0, len(audio) - size + 1, size)
            ):
                return "", duration
            decoder = self._decoder
            decoder.start_utt()
            decoder.process_raw(audio, full_utt=True)
            decoder.end_utt()
            hypothesis = decoder.hyp()
        return (hypothesis.hypstr if hypothesis is not None else ""), duration


@dataclass
class FakeAudio(LoopbackServer):
    """The fake server. ``async with FakeAudio() as fake:`` then use ``fake.url``.

    ``api_key``, if set, is required as ``Authorization: Bearer <key>`` (a 401
    otherwise, as the API answers). ``engine="tone"`` swaps the real engines for
    instant ones (a benchmark's, to measure its client rather than them):
    transcription answers ``tone_transcript`` at once, speech is a tone as long as
    the text would take to say, made as fast as it can be.
    """

    api_key: str | None = None
    engine: Engine = "real"
    #: eSpeak's pace at ``speed`` 1 (words a minute; ``speed`` scales it, within 80-450).
    speech_wpm: int = ESPEAK_WPM
    tone_transcript: str = TONE_TRANSCRIPT
    host: str = "127.0.0.1"
    #: The port to listen on; 0 picks a free one.
    listen_port: int = 0
    #: Called with each request as it arrives (the command line logs them).
    on_request: Callable[[Received], None] | None = None
    requests: list[Received] = field(default_factory=list)
    #: Every request to an endpoint, in order of arrival (a 404 or 401 is not).
    timings: list[Timing] = field(default_factory=list)
    recognizer: Recognizer = field(default_factory=Recognizer)
    #: Recognize in a process of its own (the command line's server), not a thread.
    recognize_apart: bool = False
    #: That process (``tests/fakes/recognizer_worker.py``, started at the first
    #: transcription), and the lock that keeps its requests one at a time.
    _apart: asyncio.subprocess.Process | None = field(default=None, init=False, repr=False)
    _apart_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    _failures: deque[int] = field(default_factory=deque)
    #: Transcriptions waiting for ``release``, in order of arrival (None: not holding).
    _held: list[asyncio.Future[None]] | None = field(default=None, init=False, repr=False)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition, init=False, repr=False)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` well-formed requests with ``status`` (429 with
        ``Retry-After: 0``), as an overloaded or failing API would."""
        self._failures.extend([status] * count)

    def hold(self) -> None:
        """Hold every transcription from now on until ``release`` lets it through."""
        if self._held is None:
            self._held = []

    async def held(self, count: int) -> None:
        """Wait until ``count`` transcriptions are held."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self._held or ()) >= count)

    def release(self, index: int = 0) -> None:
        """Let the ``index``-th transcription still held (in order of arrival) through."""
        assert self._held is not None, "hold() first"
        self._held.pop(index).set_result(None)

    def reset(self) -> None:
        """Forget the failures still owed and stop holding, letting every held
        transcription through: the state a fresh server starts in, for a server one
        test leaves to the next."""
        self._failures.clear()
        held, self._held = self._held, None
        for gate in held or ():
            if not gate.done():  # its request may have gone (a cancelled client)
                gate.set_result(None)

    async def _gate(self) -> None:
        if self._held is None:
            return
        gate = asyncio.get_running_loop().create_future()
        self._held.append(gate)
        async with self._arrived:
            self._arrived.notify_all()
        await gate

    # -- connections -------------------------------------------------------

    async def _transcribe(self, data: bytes) -> tuple[str, float]:
        if not self.recognize_apart:
            return await asyncio.to_thread(self.recognizer.transcribe, data)
        async with self._apart_lock:
            process = self._apart
            if process is None or process.returncode is not None:
                process = self._apart = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "tests.fakes.recognizer_worker",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            assert process.stdin is not None
            assert process.stdout is not None
            process.stdin.write(struct.pack(">Q", len(data)) + data)
            await process.stdin.drain()
            line = await process.stdout.readline()
        if not line:
            raise RuntimeError("the recognition process ended")
        answer = json.loads(line)
        if answer.get("unsupported"):
            raise Unsupported
        return str(answer["text"]), float(answer["duration"])

    async def close(self) -> None:
        process, self._apart = self._apart, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        await super().close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection stays open."""
        head = await read_head(reader)
        if head is None:
            return False
        arrived = time.monotonic()
        method, path, headers = head
        keep_alive = headers.get("connection", "").lower() != "close"
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY_BYTES:
            await send_error(
                writer,
                413,
                f"Maximum content size limit ({MAX_BODY_BYTES}) exceeded ({length} bytes read)",
                keep_alive=False,
            )
            return False
        body = await reader.readexactly(length)
        routes: dict[str, _Route] = {
            "/v1/audio/transcriptions": self._transcription,
            "/v1/audio/speech": self._speech,
        }
        route = routes.get(path) if method == "POST" else None
        if route is None:
            await send_error(writer, 404, f"Invalid URL ({method} {path})", keep_alive=keep_alive)
            return keep_alive
        refused = key_refusal(self.api_key, headers)
        if refused is not None:
            await send_error(writer, 401, refused, code="invalid_api_key", keep_alive=keep_alive)
            return keep_alive
        timing = Timing(path, arrived)
        self.timings.append(timing)
        await route(method, path, headers, body, writer, keep_alive, timing)
        if timing.last_byte is None:  # a whole answer, written at once
            timing.first_byte = timing.last_byte = time.monotonic()
        return keep_alive

    def _received(self, received: Received) -> None:
        self.requests.append(received)
        if self.on_request is not None:
            self.on_request(received)

    async def _failed(self, writer: asyncio.StreamWriter, *, keep_alive: bool) -> bool:
        """Answer with the next failure ``fail_next`` asked for; whether there was one."""
        if not self._failures:
            return False
        status = self._failures.popleft()
        extra = {"Retry-After": "0"} if status == 429 else {}
        await send_error(
            writer,
            status,
            "Rate limit reached" if status == 429 else "The server had an error",
            type_="requests" if status == 429 else "server_error",
            keep_alive=keep_alive,
            headers=extra,
        )
        return True

    async def _transcription(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
        keep_alive: bool,
        timing: Timing,
    ) -> None:
        form = _form(headers.get("content-type", ""), body)
        if form is None:
            await send_error(writer, 400, "Could not parse multipart form", keep_alive=keep_alive)
            return
        fields, upload = form
        timing.detail = str(len(upload[2])) if upload else ""
        self._received(
            Received(
                method,
                path,
                headers,
                fields,
                filename=upload[0] if upload else "",
                file_type=upload[1] if upload else "",
                file_size=len(upload[2]) if upload else -1,
            )
        )
        if not fields.get("model"):
            await send_error(
                writer,
                400,
                "you must provide a model parameter",
                param="model",
                keep_alive=keep_alive,
            )
            return
        if upload is None:
            await send_error(
                writer,
                400,
                "1 validation error for Request\nbody -> file\n  field required",
                param="file",
                keep_alive=keep_alive,
            )
            return
        response_format = fields.get("response_format", "json") or "json"
        if response_format not in _FORMATS:
            await send_error(
                writer,
                400,
                f"response_format {response_format!r} is not supported by the local audio "
                f"server; use one of {sorted(_FORMATS)}",
                param="response_format",
                keep_alive=keep_alive,
            )
            return
        if await self._failed(writer, keep_alive=keep_alive):
            return
        await self._gate()
        try:
            if self.engine == "tone":
                text, duration = self.tone_transcript, len(upload[2]) / (2 * MODEL_RATE)
            else:
                text, duration = await self._transcribe(upload[2])
        except Unsupported:
            await send_error(
                writer, 400, UNSUPPORTED, param="file", code="invalid_value", keep_alive=keep_alive
            )
            return
        if response_format == "text":
            await send(writer, 200, (text + "\n").encode(), "text/plain", keep_alive=keep_alive)
            return
        answer: dict[str, Any] = {"text": text}
        if response_format == "verbose_json":
            answer = {
                "task": "transcribe",
                "language": "english",
                "duration": round(duration, 2),
                "text": text,
                "segments": [],
            }
        await send_json(writer, 200, answer, keep_alive=keep_alive)

    async def _speech(  # noqa: PLR0912 - one branch per refusal the API gives
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
        keep_alive: bool,
        timing: Timing,
    ) -> None:
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            await send_error(
                writer,
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)",
                keep_alive=keep_alive,
            )
            return
        self._received(
            Received(
                method,
                path,
                headers,
                {key: str(value) for key, value in request.items()},
                body=request,
            )
        )
        for name in ("model", "input", "voice"):
            if request.get(name) in (None, ""):
                await send_error(
                    writer,
                    400,
                    "you must provide a model parameter"
                    if name == "model"
                    else f"Missing required parameter: '{name}'.",
                    param=name,
                    code=None if name == "model" else "missing_required_parameter",
                    keep_alive=keep_alive,
                )
                return
            if not isinstance(request[name], str):
                await send_error(
                    writer,
                    400,
                    f"Invalid type for '{name}': expected a string, but got "
                    f"{type(request[name]).__name__} instead.",
                    param=name,
                    code="invalid_type",
                    keep_alive=keep_alive,
                )
                return
        text: str = request["input"]
        timing.detail = text
        if len(text) > MAX_SPEECH_CHARS:
            await send_error(
                writer,
                400,
                f"[{{'type': 'string_too_long', 'loc': ('body', 'input'), 'msg': 'String "
                f"should have at most {MAX_SPEECH_CHARS} characters'}}]",
                param="input",
                code="string_too_long",
                keep_alive=keep_alive,
            )
            return
        response_format = request.get("response_format", "mp3")
        if response_format not in _SPEECH_FORMATS:
            await send_error(
                writer,
                400,
                f"response_format {response_format!r} is not supported by the local audio "
                f"server; use one of {sorted(_SPEECH_FORMATS)}",
                param="response_format",
                keep_alive=keep_alive,
            )
            return
        speed = request.get("speed", 1.0)
        if (
            isinstance(speed, bool)
            or not isinstance(speed, int | float)
            or not MIN_SPEED <= speed <= MAX_SPEED
        ):
            await send_error(
                writer,
                400,
                f"Invalid 'speed': {speed!r}. Expected a number between {MIN_SPEED} and "
                f"{MAX_SPEED}.",
                param="speed",
                code="invalid_value",
                keep_alive=keep_alive,
            )
            return
        if await self._failed(writer, keep_alive=keep_alive):
            return
        lines = [
            "HTTP/1.1 200 OK",
            f"Content-Type: {_SPEECH_FORMATS[response_format]}",
            "Transfer-Encoding: chunked",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if response_format == "wav":
            writer.write(_chunk(_streamed_wav_header(SPEECH_RATE)))
        pieces = (
            tone(text, float(speed))
            if self.engine == "tone"
            else espeak(text, float(speed), self.speech_wpm)
        )
        try:
            async for piece in pieces:
                if timing.first_byte is None:
                    timing.first_byte = time.monotonic()
                writer.write(_chunk(piece))
                await writer.drain()
        finally:
            await pieces.aclose()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        timing.last_byte = time.monotonic()
        if timing.first_byte is None:
            timing.first_byte = timing.last_byte


# -- speech -------------------------------------------------------------------


async def espeak(
    text: str, speed: float, base_wpm: int = ESPEAK_WPM
) -> AsyncGenerator[bytes, None]:
    """``text`` spoken by eSpeak NG, PCM16 at 24 kHz, as it synthesizes: its WAV
    stream (22,050 Hz) read from the pipe and converted piece by piece."""
    program = shutil.which("espeak-ng")
    if program is None:
        raise RuntimeError("espeak-ng is not installed; run scripts/install-deps.sh")
    words_per_minute = max(80, min(450, round(base_wpm * speed)))
    process = await asyncio.create_subprocess_exec(
        program,
        "-v",
        ESPEAK_VOICE,
        "-s",
        str(words_per_minute),
        "--stdout",
        "--stdin",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        # The text on stdin, not the command line: it may start with a dash. The leading
        # pause keeps the first word from being clipped (tests/infra/speech.py).
        process.stdin.write(f". . {text}".encode())
        await process.stdin.drain()
        process.stdin.close()
        rate = await _wav_stream_rate(process.stdout)
        converter = pcm.Resampler(rate, SPEECH_RATE)
        while data := await process.stdout.read(_READ_BYTES):
            piece = converter.feed(data)
            if piece:
                yield piece
        tail = converter.flush()
        if tail:
            yield tail
    finally:
        if process.returncode is None:  # the listener left: stop synthesizing
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        # Read to the end, not only wait: a pipe whose reading was paused (its buffer full,
        # nobody reading) never sees its end, and its transport would stay open.
        await process.communicate()


async def _wav_stream_rate(stdout: asyncio.StreamReader) -> int:
    """Read a streamed WAV's header up to its ``data`` chunk; its rate (16-bit mono)."""
    riff = await stdout.readexactly(12)
    if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise Unsupported("espeak-ng did not write a WAV")
    rate = 0
    for _ in range(16):
        kind, size = struct.unpack("<4sI", await stdout.readexactly(8))
        if kind == b"data":
            if not rate:
                raise Unsupported("espeak-ng's WAV has no format")
            return rate
        chunk = await stdout.readexactly(size + size % 2)
        if kind == b"fmt ":
            _format, channels, rate, _bytes, _align, bits = struct.unpack("<HHIIHH", chunk[:16])
            if channels != 1 or bits != 16:
                raise Unsupported(f"espeak-ng wrote {bits}-bit audio with {channels} channels")
    raise Unsupported("espeak-ng's WAV has no data")


async def tone(text: str, speed: float) -> AsyncGenerator[bytes, None]:
    """The fast engine's speech: a 200 Hz tone as long as ``text`` would take to say
    (``TONE_MS_PER_CHAR`` a character), made as fast as it can be, in 100 ms pieces."""
    left = _tone_bytes(len(text) * TONE_MS_PER_CHAR / speed)
    while left > 0:
        piece = _TONE_PIECE[: min(left, len(_TONE_PIECE))]
        left -= len(piece)
        yield piece
        await asyncio.sleep(0)  # let other requests in between pieces, as a real engine would


def _tone_bytes(ms: float) -> int:
    """Bytes of ``ms`` milliseconds of PCM16 at 24 kHz (whole samples)."""
    return int(ms * SPEECH_RATE / 1000) * 2


def _tone_piece() -> bytes:
    period = [round(8000 * math.sin(2 * math.pi * i / 120)) for i in range(120)]  # 200 Hz
    return array.array("h", period * 20).tobytes()  # 100 ms at 24 kHz


_TONE_PIECE: Final = _tone_piece()


def _chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a ``Transfer-Encoding: chunked`` body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _streamed_wav_header(rate: int) -> bytes:
    """A WAV header for PCM16 mono of unknown length (the sizes at their maximum, as
    streaming encoders write them)."""
    return (
        b"RIFF"
        + struct.pack("<I", 0xFFFFFFFF)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", 0xFFFFFFFF)
    )


# -- HTTP/1.1 -----------------------------------------------------------------


def _form(
    content_type: str, body: bytes
) -> tuple[dict[str, str], tuple[str, str, bytes] | None] | None:
    """A ``multipart/form-data`` body's text fields and its ``file`` (name, media
    type, bytes); None when it is not a multipart form."""
    if (
        not content_type.lower().startswith("multipart/form-data")
        or "boundary=" not in content_type
    ):
        return None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        return None
    fields: dict[str, str] = {}
    upload: tuple[str, str, bytes] | None = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        if name == "file":
            upload = (part.get_filename() or "", part.get_content_type(), data)
        else:
            fields[name] = data.decode("utf-8", "replace")
    return fields, upload


# -- the command line ---------------------------------------------------------


def _log_request(request: Received) -> None:
    if request.path.endswith("/speech"):
        text = request.fields.get("input", "")
        detail = f"voice={request.fields.get('voice')!r} input={text[:60]!r} ({len(text)} chars)"
    else:
        detail = f"file={request.filename!r} ({request.file_type}, {request.file_size} bytes)"
    print(
        f"{request.method} {request.path} model={request.fields.get('model')!r} {detail}",
        file=sys.stderr,
        flush=True,
    )


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeAudio(
        api_key=args.api_key,
        engine=args.engine,
        speech_wpm=args.speech_wpm,
        recognize_apart=True,
        host=args.host,
        listen_port=args.port,
        on_request=None if args.quiet else _log_request,
    )
    await serve_until_signalled(fake)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.audio_server",
        description="A local server of the OpenAI audio API: transcriptions (speech "
        "recognized by PocketSphinx from 16-bit PCM WAV) and speech (synthesized by eSpeak "
        "NG, streamed as PCM or WAV). Prints its base URL on the first line of stdout and "
        "serves until killed.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument("--api-key", help="require this bearer key")
    parser.add_argument(
        "--engine",
        choices=["real", "tone"],
        default="real",
        help="real: PocketSphinx and eSpeak NG (the default); tone: instant, for benchmarks "
        "(a fixed transcript, and a tone as long as the text for speech)",
    )
    parser.add_argument(
        "--speech-wpm",
        type=int,
        default=ESPEAK_WPM,
        help=f"eSpeak's pace, words a minute (default {ESPEAK_WPM}; a request's speed scales "
        "it, within 80 to 450): slower speech makes longer answers",
    )
    parser.add_argument("--quiet", action="store_true", help="do not log requests to stderr")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"audio_server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
