"""A test fake of the hosted OpenAI Chat Completions HTTP API.

The hosted API cannot be reached from the machines these tests run on, so this
module serves the same protocol on ``127.0.0.1``: ``POST /v1/chat/completions``
over hand-written HTTP/1.1 (keep-alive, ``Content-Length`` request bodies,
chunked responses), answering a streamed request with server-sent events in
the API's shapes::

    data: {"id": ..., "object": "chat.completion.chunk", "choices": [{"index": 0,
           "delta": {"content": ...}, "finish_reason": null}], ...}

then a chunk with ``finish_reason``, a usage chunk (``"choices": []``) when
``stream_options.include_usage`` is set, and ``data: [DONE]``. Errors are JSON
``{"error": {"message", "type", "param", "code"}}`` with the API's status codes.
It checks requests as the API does (a model, a non-empty ``messages`` list,
``temperature`` in 0..2, ``stream_options`` only with ``stream``) and honours
``max_tokens`` by cutting the answer with ``finish_reason: "length"``.

Each request takes the next scripted ``Reply``; tests see every request
(headers and parsed body) and every connection the client closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

# The error "type" the API uses for each status (code is set per case).
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    429: "requests",
}

_MAX_HEADER_LINES: Final = 100
_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class Reply:
    """What the fake does with one request. Build it with the class methods."""

    status: int = 200
    content: str = ""
    chunk_words: int = 1
    #: ``True``: counted by the fake; ``(prompt, completion)``: these; ``False``:
    #: never sent, even when asked (as some compatible servers do).
    usage: bool | tuple[int, int] = True
    finish_reason: str = "stop"
    error_message: str = ""
    error_type: str | None = None
    error_code: str | None = None
    retry_after: float | None = None
    #: Seconds before anything (even the status line) is sent.
    first_byte_after_s: float = 0.0
    #: Nothing is sent until this is set (or the client goes away).
    gate: asyncio.Event | None = None
    #: After this many content chunks, wait for ``hold`` (or the client going away).
    hold_after_chunks: int | None = None
    hold: asyncio.Event | None = None
    #: After this many content chunks, close the socket mid-body.
    drop_after_chunks: int | None = None
    #: After this many content chunks, send a chunk that is not JSON.
    malformed_after_chunks: int | None = None
    #: Answer with a whole ``chat.completion`` JSON even when asked to stream.
    ignore_stream: bool = False

    @classmethod
    def text(
        cls,
        content: str,
        *,
        chunk_words: int = 1,
        usage: bool | tuple[int, int] = True,
        finish_reason: str = "stop",
        hold_after_chunks: int | None = None,
        hold: asyncio.Event | None = None,
        ignore_stream: bool = False,
    ) -> Reply:
        """Stream ``content``, ``chunk_words`` words to a chunk (words keep their spaces).

        With ``hold``, stop after ``hold_after_chunks`` content chunks until it is set.
        """
        if (hold is None) != (hold_after_chunks is None):
            raise ValueError("hold and hold_after_chunks go together")
        return cls(
            content=content,
            chunk_words=chunk_words,
            usage=usage,
            finish_reason=finish_reason,
            hold_after_chunks=hold_after_chunks,
            hold=hold,
            ignore_stream=ignore_stream,
        )

    @classmethod
    def error(
        cls,
        status: int,
        *,
        message: str = "",
        error_type: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> Reply:
        """An error response; ``retry_after`` (seconds) becomes a ``Retry-After`` header."""
        return cls(
            status=status,
            error_message=message or f"fake error {status}",
            error_type=error_type,
            error_code=code,
            retry_after=retry_after,
        )

    @classmethod
    def slow(
        cls,
        text: str = "slow answer",
        *,
        first_byte_after_s: float = 0.0,
        gate: asyncio.Event | None = None,
    ) -> Reply:
        """Send nothing for ``first_byte_after_s`` and/or until ``gate`` is set."""
        return cls(content=text, first_byte_after_s=first_byte_after_s, gate=gate)

    @classmethod
    def drop_after(cls, n_chunks: int, text: str = "one two three four five") -> Reply:
        """Send the head, the role chunk and ``n_chunks`` content chunks, then close."""
        return cls(content=text, drop_after_chunks=n_chunks)

    @classmethod
    def malformed_after(cls, n_chunks: int, text: str = "one two three four five") -> Reply:
        """Send ``n_chunks`` content chunks, then an event whose data is not JSON."""
        return cls(content=text, malformed_after_chunks=n_chunks)


@dataclass(frozen=True)
class Received:
    """One request as the fake read it."""

    method: str
    path: str
    #: Header names in lower case.
    headers: dict[str, str]
    #: The parsed JSON body, or ``None`` if it was not JSON.
    body: Any


class _Disconnected(Exception):
    """The client closed the connection while the fake was answering."""


@dataclass
class FakeOpenAI:
    """The fake server. ``async with FakeOpenAI() as fake:`` then use ``fake.url``.

    ``api_key``, if set, is required as ``Authorization: Bearer <key>`` (a 401
    otherwise, as the API answers). ``default`` answers requests once the
    script is used up; without one they get a 500 that says so.
    """

    api_key: str | None = None
    default: Reply | None = None
    requests: list[Received] = field(default_factory=list)
    #: Connections accepted.
    connections: int = 0
    #: Connections the client closed (idle or mid-response).
    client_closed: int = 0
    #: Of those, the ones closed while a response was being sent.
    client_closed_mid_response: int = 0
    _script: deque[Reply] = field(default_factory=deque)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Python 3.11's wait_closed does not wait for open connections.
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
        """The base URL, ``http://127.0.0.1:<port>/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        """Queue replies; each request takes the next one."""
        self._script.extend(replies)

    @property
    def pending(self) -> int:
        """Scripted replies not used yet."""
        return len(self._script)

    async def wait_requests(self, count: int) -> None:
        """Return once ``count`` requests have arrived."""
        await self._wait(lambda: len(self.requests) >= count)

    async def wait_client_closed(self, count: int = 1) -> None:
        """Return once the client has closed ``count`` connections."""
        await self._wait(lambda: self.client_closed >= count)

    async def _wait(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- connections -------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # Only close() cancels these tasks; asyncio (3.11) reports a cancelled
            # connection callback as an unhandled error, so it ends quietly.
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one connection until either side closes it."""
        while True:
            try:
                request = await _read_request(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                request = None
            if request is None:
                self.client_closed += 1
                await self._notify()
                return
            self.requests.append(request)
            await self._notify()
            try:
                keep_alive = await self._respond(request, reader, writer)
            except (_Disconnected, ConnectionError):
                self.client_closed += 1
                self.client_closed_mid_response += 1
                await self._notify()
                return
            if not keep_alive:
                return

    async def _respond(
        self, request: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; whether the connection stays open."""
        keep_alive = request.headers.get("connection", "").lower() != "close"
        if request.method != "POST" or request.path != "/v1/chat/completions":
            await _send_error(
                writer,
                404,
                f"Unknown request URL: {request.method} {request.path}. Please check the URL "
                "for typos, or see the docs at https://platform.openai.com/docs/api-reference/.",
                code="unknown_url",
            )
            return keep_alive
        if self.api_key is not None:
            given = request.headers.get("authorization", "")
            if given != f"Bearer {self.api_key}":
                presented = given.removeprefix("Bearer ")
                masked = presented[:3] + "*" * 8 + presented[-4:] if presented else ""
                message = (
                    f"Incorrect API key provided: {masked}."
                    if presented
                    else "You didn't provide an API key."
                )
                await _send_error(writer, 401, message, code="invalid_api_key")
                return keep_alive
        problem = _invalid(request.body)
        if problem is not None:
            await _send_error(writer, 400, problem[0], param=problem[1])
            return keep_alive

        reply = self._script.popleft() if self._script else self.default
        if reply is None:
            await _send_error(writer, 500, "fake: no scripted reply left", type_="server_error")
            return keep_alive
        if reply.first_byte_after_s:
            await _wait_or_disconnect(reader, asyncio.sleep(reply.first_byte_after_s))
        if reply.gate is not None:
            await _wait_or_disconnect(reader, reply.gate.wait())
        if reply.status != 200:
            await _send_error(
                writer,
                reply.status,
                reply.error_message,
                type_=reply.error_type,
                code=reply.error_code,
                retry_after=reply.retry_after,
            )
            return keep_alive
        body: dict[str, Any] = request.body
        if body.get("stream") is True and not reply.ignore_stream:
            return await self._stream(reply, body, reader, writer) and keep_alive
        await _send_json(writer, 200, self._completion(reply, body))
        return keep_alive

    # -- answers -----------------------------------------------------------

    def _answer(self, reply: Reply, body: dict[str, Any]) -> tuple[list[str], str]:
        """The answer's words (each but the first with its leading space) and finish reason."""
        words = reply.content.split(" ") if reply.content else []
        pieces = [word if index == 0 else " " + word for index, word in enumerate(words)]
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        # One word stands for one token, so max_tokens cuts as the API's does.
        if isinstance(limit, int) and len(pieces) > limit:
            return pieces[:limit], "length"
        return pieces, reply.finish_reason

    def _usage(self, reply: Reply, body: dict[str, Any], pieces: list[str]) -> dict[str, int]:
        if isinstance(reply.usage, tuple):
            prompt, completion = reply.usage
        else:
            prompt = sum(
                len(str(message.get("content", "")).split()) + 4 for message in body["messages"]
            )
            completion = len("".join(pieces).split())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _completion(self, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        pieces, finish = self._answer(reply, body)
        answer: dict[str, Any] = {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
        }
        if reply.usage is not False:
            answer["usage"] = self._usage(reply, body, pieces)
        return answer

    async def _stream(
        self,
        reply: Reply,
        body: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Stream the answer as server-sent events; whether the connection stays open."""
        pieces, finish = self._answer(reply, body)
        options = body.get("stream_options") or {}
        with_usage = bool(options.get("include_usage")) and reply.usage is not False
        identity = {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_fake",
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
            event: dict[str, Any] = {
                **identity,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            if with_usage:
                # The API sends "usage": null on every chunk but the last when asked.
                event["usage"] = None
            return event

        writer.write(
            _head(
                200,
                {
                    "Content-Type": "text/event-stream; charset=utf-8",
                    "Transfer-Encoding": "chunked",
                    "Cache-Control": "no-cache",
                    "Connection": "keep-alive",
                    "x-request-id": f"req_fake{next(self._ids)}",
                },
            )
        )
        await _send_event(
            writer, chunk({"role": "assistant", "content": "", "refusal": None}, None)
        )
        size = max(1, reply.chunk_words)
        groups = ["".join(pieces[i : i + size]) for i in range(0, len(pieces), size)]
        for sent, group in enumerate(groups):
            if reply.drop_after_chunks == sent:
                return False
            if reply.malformed_after_chunks == sent:
                await _send_data(writer, '{"id": "chatcmpl-broken", "choices": [')
                await _send_data(writer, "[DONE]")
                await _end_chunks(writer)
                return True
            if reply.hold_after_chunks == sent and reply.hold is not None:
                await _wait_or_disconnect(reader, reply.hold.wait())
            await _send_event(writer, chunk({"content": group}, None))
        if reply.drop_after_chunks is not None:
            return False
        await _send_event(writer, chunk({}, finish))
        if with_usage:
            await _send_event(
                writer, {**identity, "choices": [], "usage": self._usage(reply, body, pieces)}
            )
        await _send_data(writer, "[DONE]")
        await _end_chunks(writer)
        return True


# -- HTTP/1.1 -----------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader) -> Received | None:
    """The next request on the connection, or ``None`` when the client closed it."""
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
    if headers.get("transfer-encoding", "").lower() == "chunked":
        payload = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            payload += await reader.readexactly(size)
            await reader.readexactly(2)
        data = bytes(payload)
    else:
        data = await reader.readexactly(int(headers.get("content-length", "0")))
    try:
        body = json.loads(data) if data else None
    except ValueError:
        body = None
    return Received(method=method, path=path.split("?")[0], headers=headers, body=body)


def _invalid(body: Any) -> tuple[str, str | None] | None:
    """What the API would refuse in a request body: ``(message, param)``."""
    if not isinstance(body, dict):
        return (
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)",
            None,
        )
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter", None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "[] is too short - 'messages'", "messages"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            return f"Invalid value for 'messages[{index}].role'.", f"messages.[{index}].role"
        if not isinstance(message.get("content"), str | list):
            return f"Invalid type for 'messages[{index}].content'.", f"messages.[{index}].content"
    temperature = body.get("temperature")
    if temperature is not None and not (
        isinstance(temperature, int | float) and 0 <= temperature <= 2
    ):
        return "Invalid 'temperature': must be a number from 0 to 2.", "temperature"
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 1):
        return "Invalid 'max_tokens': integer below minimum value.", "max_tokens"
    if body.get("stream_options") is not None and body.get("stream") is not True:
        return (
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    return None


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send_json(
    writer: asyncio.StreamWriter,
    status: int,
    payload: object,
    extra_headers: dict[str, str] | None = None,
) -> None:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    headers.update(extra_headers or {})
    writer.write(_head(status, headers) + body)
    await writer.drain()


async def _send_error(
    writer: asyncio.StreamWriter,
    status: int,
    message: str,
    *,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
) -> None:
    error_type = type_ or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "error")
    if code is None and status == 429:
        code = "rate_limit_exceeded"
    extra: dict[str, str] = {}
    if retry_after is not None:
        extra["Retry-After"] = f"{retry_after:g}"
    payload = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    await _send_json(writer, status, payload, extra)


async def _send_data(writer: asyncio.StreamWriter, data: str) -> None:
    """One server-sent event as one HTTP chunk."""
    event = f"data: {data}\n\n".encode()
    writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
    await writer.drain()


async def _send_event(writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
    await _send_data(writer, json.dumps(payload, separators=(",", ":")))


async def _end_chunks(writer: asyncio.StreamWriter) -> None:
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def _wait_or_disconnect(reader: asyncio.StreamReader, waiting: Any) -> None:
    """Wait for ``waiting``; raise ``_Disconnected`` if the client closes first.

    A client does not send while it awaits a response (no pipelining), so a
    read that returns means the client closed the connection.
    """
    wait_task = asyncio.ensure_future(waiting)
    eof_task = asyncio.ensure_future(reader.read(1))
    try:
        done, _ = await asyncio.wait({wait_task, eof_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (wait_task, eof_task):
            task.cancel()
        await asyncio.gather(wait_task, eof_task, return_exceptions=True)
    if eof_task in done and wait_task not in done:
        if eof_task.result():
            raise AssertionError("fake: the client sent data while awaiting a response")
        raise _Disconnected
