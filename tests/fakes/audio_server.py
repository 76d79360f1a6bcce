"""A local server of the OpenAI audio API, for tests and local runs: real speech
recognition, on ``127.0.0.1``, with nothing hosted.

``POST /v1/audio/transcriptions`` takes the API's ``multipart/form-data`` request
(``file``, ``model``, optional ``response_format`` ``json`` (the default),
``text`` or ``verbose_json``, ``language``, ``prompt``, ``temperature``) and
answers ``{"text": ...}`` as the API does. The words are recognized by
PocketSphinx (its PyPI package carries an English acoustic model, a language
model and a dictionary): the file must be a WAV of 16-bit PCM, mono or stereo
(mixed down), at any rate (resampled to the model's 16 kHz). Anything else
(MP3, Ogg, 8-bit or float WAV, not audio at all) is refused with the API's
``400`` ("Audio file might be corrupted or unsupported"), a request without
a file or a model with the API's ``400`` naming the field, a body over the
API's 25 MB with its ``413``. Errors are JSON ``{"error": {"message", "type",
"param", "code"}}``.

Recognition runs in a worker thread, one request at a time (one decoder), so
the server keeps accepting connections meanwhile. Tests can make the next
requests fail (``fail_next``) to check a client's retries, and see every
request (``requests``).

Run on its own (from the repository root)::

    .venv/bin/python -m tests.fakes.audio_server --port 0

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
import io
import json
import signal
import sys
import threading
import wave
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
#: The API's limit on an upload (25 MB).
MAX_BODY_BYTES: Final = 25 * 1024 * 1024
_MAX_HEADER_LINES: Final = 100
#: What the model was trained on.
MODEL_RATE: Final = 16_000
_FORMATS: Final = frozenset({"json", "text", "verbose_json"})
UNSUPPORTED: Final = "Audio file might be corrupted or unsupported"


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


class Unsupported(ValueError):
    """Audio the recognizer cannot read."""


def pcm16_mono(data: bytes) -> tuple[array.array[int], int]:
    """The samples of a 16-bit PCM WAV mixed down to mono, and their rate; raises
    ``Unsupported`` for anything else."""
    try:
        with wave.open(io.BytesIO(data), "rb") as audio:
            channels, width, rate = (
                audio.getnchannels(),
                audio.getsampwidth(),
                audio.getframerate(),
            )
            frames = audio.readframes(audio.getnframes())
    except (wave.Error, EOFError) as exc:
        raise Unsupported(str(exc)) from None
    if width != 2 or channels not in (1, 2) or not 8_000 <= rate <= 192_000:
        raise Unsupported(f"{width * 8}-bit, {channels} channels, {rate} Hz")
    samples = array.array("h")
    samples.frombytes(frames[: len(frames) - len(frames) % 2])
    if sys.byteorder == "big":  # pragma: no cover - WAV is little-endian
        samples.byteswap()
    if channels == 2:
        samples = array.array(
            "h", ((a + b) // 2 for a, b in zip(samples[::2], samples[1::2], strict=False))
        )
    return samples, rate


def resample(samples: array.array[int], rate: int, target: int = MODEL_RATE) -> array.array[int]:
    """``samples`` at ``target`` Hz, by linear interpolation (enough for speech the
    recognizer reads: its features stop well below either Nyquist frequency)."""
    if rate == target or not samples:
        return samples
    count = len(samples) * target // rate
    step = rate / target
    last = len(samples) - 1
    out = array.array("h", bytes(2 * count))
    for index in range(count):
        position = index * step
        left = int(position)
        right = min(left + 1, last)
        fraction = position - left
        out[index] = int(samples[left] + (samples[right] - samples[left]) * fraction)
    return out


class Recognizer:
    """PocketSphinx's English model, one utterance at a time (a decoder is not
    safe to share between threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decoder: Any = None

    def transcribe(self, data: bytes) -> tuple[str, float]:
        """The words in a WAV, and its duration in seconds; raises ``Unsupported``."""
        samples, rate = pcm16_mono(data)
        duration = len(samples) / rate
        pcm = resample(samples, rate).tobytes()
        with self._lock:
            if self._decoder is None:
                from pocketsphinx import Decoder  # loads the model: once, when first needed

                self._decoder = Decoder(loglevel="FATAL")
            decoder = self._decoder
            decoder.start_utt()
            decoder.process_raw(pcm, full_utt=True)
            decoder.end_utt()
            hypothesis = decoder.hyp()
        return (hypothesis.hypstr if hypothesis is not None else ""), duration


@dataclass
class FakeAudio:
    """The fake server. ``async with FakeAudio() as fake:`` then use ``fake.url``.

    ``api_key``, if set, is required as ``Authorization: Bearer <key>`` (a 401
    otherwise, as the API answers).
    """

    api_key: str | None = None
    host: str = "127.0.0.1"
    #: The port to listen on; 0 picks a free one.
    listen_port: int = 0
    #: Called with each request as it arrives (the command line logs them).
    on_request: Callable[[Received], None] | None = None
    requests: list[Received] = field(default_factory=list)
    recognizer: Recognizer = field(default_factory=Recognizer)
    _failures: deque[int] = field(default_factory=deque)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> FakeAudio:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.listen_port)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the fake is not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """The base URL, ``http://<host>:<port>/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` well-formed requests with ``status`` (429 with
        ``Retry-After: 0``), as an overloaded or failing API would."""
        self._failures.extend([status] * count)

    # -- connections -------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or close() ended the connection
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _one(  # noqa: PLR0912 - one branch per answer the API gives
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; whether the connection stays open."""
        head = await _read_head(reader)
        if head is None:
            return False
        method, path, headers = head
        keep_alive = headers.get("connection", "").lower() != "close"
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY_BYTES:
            await _send_error(
                writer,
                413,
                f"Maximum content size limit ({MAX_BODY_BYTES}) exceeded ({length} bytes read)",
                keep_alive=False,
            )
            return False
        body = await reader.readexactly(length)
        if method != "POST" or path != "/v1/audio/transcriptions":
            await _send_error(writer, 404, f"Invalid URL ({method} {path})", keep_alive=keep_alive)
            return keep_alive
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            presented = headers.get("authorization", "").removeprefix("Bearer ")
            message = (
                f"Incorrect API key provided: {presented[:3]}{'*' * 8}{presented[-4:]}."
                if presented
                else "You didn't provide an API key."
            )
            await _send_error(writer, 401, message, code="invalid_api_key", keep_alive=keep_alive)
            return keep_alive
        form = _form(headers.get("content-type", ""), body)
        if form is None:
            await _send_error(
                writer,
                400,
                "Could not parse multipart form",
                keep_alive=keep_alive,
            )
            return keep_alive
        fields, upload = form
        received = Received(
            method,
            path,
            headers,
            fields,
            filename=upload[0] if upload else "",
            file_type=upload[1] if upload else "",
            file_size=len(upload[2]) if upload else -1,
        )
        self.requests.append(received)
        if self.on_request is not None:
            self.on_request(received)
        if not fields.get("model"):
            await _send_error(
                writer,
                400,
                "you must provide a model parameter",
                param="model",
                keep_alive=keep_alive,
            )
            return keep_alive
        if upload is None:
            await _send_error(
                writer,
                400,
                "1 validation error for Request\nbody -> file\n  field required",
                param="file",
                keep_alive=keep_alive,
            )
            return keep_alive
        response_format = fields.get("response_format", "json") or "json"
        if response_format not in _FORMATS:
            await _send_error(
                writer,
                400,
                f"response_format {response_format!r} is not supported by the local audio "
                f"server; use one of {sorted(_FORMATS)}",
                param="response_format",
                keep_alive=keep_alive,
            )
            return keep_alive
        if self._failures:
            status = self._failures.popleft()
            extra = {"Retry-After": "0"} if status == 429 else {}
            await _send_error(
                writer,
                status,
                "Rate limit reached" if status == 429 else "The server had an error",
                type_="requests" if status == 429 else "server_error",
                keep_alive=keep_alive,
                headers=extra,
            )
            return keep_alive
        try:
            text, duration = await asyncio.to_thread(self.recognizer.transcribe, upload[2])
        except Unsupported:
            await _send_error(
                writer, 400, UNSUPPORTED, param="file", code="invalid_value", keep_alive=keep_alive
            )
            return keep_alive
        if response_format == "text":
            await _send(writer, 200, (text + "\n").encode(), "text/plain", keep_alive=keep_alive)
            return keep_alive
        answer: dict[str, Any] = {"text": text}
        if response_format == "verbose_json":
            answer = {
                "task": "transcribe",
                "language": "english",
                "duration": round(duration, 2),
                "text": text,
                "segments": [],
            }
        await _send_json(writer, 200, answer, keep_alive=keep_alive)
        return keep_alive


# -- HTTP/1.1 -----------------------------------------------------------------


async def _read_head(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str]] | None:
    line = await reader.readline()
    if not line:
        return None
    method, path, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADER_LINES):
        raw = await reader.readline()
        if not raw:
            return None
        header = raw.decode("latin-1").rstrip("\r\n")
        if not header:
            break
        name, _, value = header.partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, path.split("?")[0], headers


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


async def _send(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str,
    *,
    keep_alive: bool,
    headers: dict[str, str] | None = None,
) -> None:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


async def _send_json(
    writer: asyncio.StreamWriter,
    status: int,
    value: Any,
    *,
    keep_alive: bool,
    headers: dict[str, str] | None = None,
) -> None:
    await _send(
        writer,
        status,
        json.dumps(value).encode(),
        "application/json",
        keep_alive=keep_alive,
        headers=headers,
    )


async def _send_error(
    writer: asyncio.StreamWriter,
    status: int,
    message: str,
    *,
    keep_alive: bool,
    param: str | None = None,
    code: str | None = None,
    type_: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> None:
    error = {"message": message, "type": type_, "param": param, "code": code}
    await _send_json(writer, status, {"error": error}, keep_alive=keep_alive, headers=headers)


# -- the command line ---------------------------------------------------------


def _log_request(request: Received) -> None:
    print(
        f"{request.method} {request.path} model={request.fields.get('model')!r} "
        f"file={request.filename!r} ({request.file_type}, {request.file_size} bytes)",
        file=sys.stderr,
        flush=True,
    )


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeAudio(
        api_key=args.api_key,
        host=args.host,
        listen_port=args.port,
        on_request=None if args.quiet else _log_request,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await fake.start()
    try:
        print(fake.url, flush=True)
        await stop.wait()
    finally:
        await fake.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.audio_server",
        description="A local server of the OpenAI audio transcription API (speech recognized "
        "by PocketSphinx from 16-bit PCM WAV). Prints its base URL on the first line of "
        "stdout and serves until killed.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument("--api-key", help="require this bearer key")
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
