"""A local server of the OpenAI Chat Completions HTTP API, for tests and local runs.

The hosted API cannot be reached from the machines these tests run on, so this
module serves the same protocol on ``127.0.0.1``: ``POST /v1/chat/completions``
over hand-written HTTP/1.1 (keep-alive, ``Content-Length`` request bodies,
chunked responses), answering a streamed request with server-sent events in
the API's shapes::

    data: {"id": ..., "object": "chat.completion.chunk", "choices": [{"index": 0,
           "delta": {"content": ...}, "finish_reason": null}], ...}

then a chunk with ``finish_reason``, a usage chunk (``"choices": []``) when
``stream_options.include_usage`` is set, and ``data: [DONE]``. Tool calls stream
as the API streams them: the first fragment of each call carries its ``index``,
``id``, ``type`` and ``function.name`` with empty ``arguments``, the arguments
follow in pieces keyed by the same ``index``, and the answer ends with
``finish_reason: "tool_calls"``. Errors are JSON ``{"error": {"message",
"type", "param", "code"}}`` with the API's status codes. It checks requests as
the API does (a model, a non-empty ``messages`` list, ``temperature`` in 0..2,
``top_p`` in 0..1, ``stream_options`` only with ``stream``, ``tools`` as
function objects with valid names, ``tool_choice`` only with ``tools``, every
assistant ``tool_calls`` answered by the ``tool`` messages right after it and
every ``tool`` message answering such a call; content arrays of typed parts:
``text`` parts, and ``image_url`` parts in user messages only, with a
``data:image/...;base64,`` or http(s) URL and an optional ``detail``) and honours ``max_tokens`` by
cutting the answer with ``finish_reason: "length"``.

Each request takes the next scripted ``Reply`` (or calls a scripted function of
the request body that returns one); tests see every request (headers and
parsed body) and every connection the client closed.

Run on its own (from the repository root)::

    .venv/bin/python -m tests.fakes.openai_server --port 0 [--model echo|scripted]

prints its base URL (``http://127.0.0.1:<port>/v1``) on the first line of
stdout and serves until it is killed. See docs/local-model.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import itertools
import json
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeAlias

from tests.fakes.plainhttp import LoopbackServer, key_refusal, read_head

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

_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})
_FUNCTION_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_MAX_TOOLS: Final = 128
_TOOL_CHOICES: Final = frozenset({"none", "auto", "required"})


@dataclass(frozen=True)
class FakeToolCall:
    """One tool call of a scripted answer.

    ``arguments`` is the JSON text sent (a test may send text that is not
    JSON); ``id`` ``None`` gets a generated ``call_...`` id, ``""`` sends none.
    """

    name: str
    arguments: str = "{}"
    id: str | None = None


#: A tool call as ``Reply.tool_calls`` takes it: a ``FakeToolCall``, or
#: ``(name, arguments)`` / ``(name, arguments, id)`` where ``arguments`` is a
#: dict (sent as its JSON) or a string (sent as it is).
CallSpec: TypeAlias = (
    FakeToolCall
    | tuple[str, "dict[str, Any] | str"]
    | tuple[str, "dict[str, Any] | str", "str | None"]
)


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
    #: After this many content chunks, send a chunk holding a value this many levels deep.
    nested_after_chunks: int | None = None
    nested_depth: int = 0
    #: Answer with a whole ``chat.completion`` JSON even when asked to stream.
    ignore_stream: bool = False
    #: Tool calls, after the content.
    calls: tuple[FakeToolCall, ...] = ()
    #: Characters of arguments per streamed fragment.
    chunk_chars: int = 8
    #: Seconds between content chunks after the first (a model's pace); 0: as fast as it can.
    interval_s: float = 0.0
    #: The response's ``id`` (every chunk's); ``None``: a fresh ``chatcmpl-fake<n>``.
    response_id: str | None = None

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
    def tool_calls(
        cls,
        calls: Sequence[CallSpec],
        *,
        content: str = "",
        chunk_chars: int = 8,
        chunk_words: int = 1,
        usage: bool | tuple[int, int] = True,
        finish_reason: str = "tool_calls",
        drop_after_chunks: int | None = None,
        hold_after_chunks: int | None = None,
        hold: asyncio.Event | None = None,
        ignore_stream: bool = False,
    ) -> Reply:
        """Answer with ``content`` (streamed by words first, may be empty) and then
        tool calls, their arguments streamed ``chunk_chars`` characters a fragment.

        ``drop_after_chunks`` and ``hold_after_chunks`` count every delta chunk
        after the role chunk: content chunks, then each call's first fragment
        and its argument fragments.
        """
        if not calls:
            raise ValueError("a tool call answer needs at least one call")
        if (hold is None) != (hold_after_chunks is None):
            raise ValueError("hold and hold_after_chunks go together")
        return cls(
            content=content,
            chunk_words=chunk_words,
            usage=usage,
            finish_reason=finish_reason,
            calls=tuple(_tool_call(spec) for spec in calls),
            chunk_chars=max(1, chunk_chars),
            drop_after_chunks=drop_after_chunks,
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

    @classmethod
    def nested_after(
        cls, n_chunks: int, depth: int, text: str = "one two three four five"
    ) -> Reply:
        """Send ``n_chunks`` content chunks, then a chunk whose delta also holds a list
        ``depth`` levels deep (valid JSON, built as text: ``json.dumps`` would recurse)."""
        return cls(content=text, nested_after_chunks=n_chunks, nested_depth=depth)


#: What answers one request: a Reply, or a function of the parsed request body
#: that returns one (to answer from what the request holds, e.g. tool results).
Answer: TypeAlias = "Reply | Callable[[dict[str, Any]], Reply]"


def _tool_call(spec: CallSpec) -> FakeToolCall:
    if isinstance(spec, FakeToolCall):
        return spec
    name, arguments, *rest = spec
    call_id = rest[0] if rest else None
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return FakeToolCall(name=name, arguments=text, id=call_id)


@dataclass(frozen=True)
class Received:
    """One request as the fake read it."""

    method: str
    path: str
    #: Header names in lower case.
    headers: dict[str, str]
    #: The parsed JSON body, or ``None`` if it was not JSON.
    body: Any
    #: When its request line was read (``time.monotonic()``), and each streamed content
    #: chunk's text with when it was written: a benchmark in another process (the same
    #: clock) takes the model's own time out of its figures.
    arrived: float = 0.0
    sent: list[tuple[float, str]] = field(default_factory=list)


#: The request being answered's ``sent`` (each connection is a task of its own), so that
#: ``_stream``, which subclasses override, keeps its signature.
_SENT: contextvars.ContextVar[list[tuple[float, str]]] = contextvars.ContextVar("sent")


class _Disconnected(Exception):
    """The client closed the connection while the fake was answering."""


@dataclass
class FakeOpenAI(LoopbackServer):
    """The fake server. ``async with FakeOpenAI() as fake:`` then use ``fake.url``.

    ``api_key``, if set, is required as ``Authorization: Bearer <key>`` (a 401
    otherwise, as the API answers). ``default`` answers requests once the
    script is used up; without one they get a 500 that says so.
    """

    api_key: str | None = None
    default: Answer | None = None
    host: str = "127.0.0.1"
    #: The port to listen on; 0 picks a free one.
    listen_port: int = 0
    #: Called with each request as it arrives (the command line logs them).
    on_request: Callable[[Received], None] | None = None
    requests: list[Received] = field(default_factory=list)
    #: Connections accepted.
    connections: int = 0
    #: Connections the client closed (idle or mid-response).
    client_closed: int = 0
    #: Of those, the ones closed while a response was being sent.
    client_closed_mid_response: int = 0
    _script: deque[Answer] = field(default_factory=deque)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def script(self, *replies: Answer) -> None:
        """Queue replies; each request takes the next one. A function is called
        with the request's parsed body and answers with the Reply it returns."""
        self._script.extend(replies)

    @property
    def pending(self) -> int:
        """Scripted replies not used yet."""
        return len(self._script)

    def reset(self) -> None:
        """Forget the replies not used yet and the requests recorded: for a server one
        test leaves to the next (which reads its requests by their index). The
        connection counts, and ``default``, stay."""
        self._script.clear()
        self.requests.clear()

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
            if self.on_request is not None:
                self.on_request(request)
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
        refused = key_refusal(self.api_key, request.headers)
        if refused is not None:
            await _send_error(writer, 401, refused, code="invalid_api_key")
            return keep_alive
        problem = _invalid(request.body)
        if problem is not None:
            await _send_error(writer, 400, problem[0], param=problem[1])
            return keep_alive

        answer = self._script.popleft() if self._script else self.default
        if answer is None:
            await _send_error(writer, 500, "fake: no scripted reply left", type_="server_error")
            return keep_alive
        reply = answer if isinstance(answer, Reply) else answer(request.body)
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
            _SENT.set(request.sent)
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

    def _call_ids(self, reply: Reply) -> list[str | None]:
        """Each call's id as sent (``None``: no id field)."""
        ids: list[str | None] = []
        for call in reply.calls:
            if call.id is None:
                ids.append(f"call_fake{next(self._ids)}")
            else:
                ids.append(call.id or None)
        return ids

    def _usage(self, reply: Reply, body: dict[str, Any], pieces: list[str]) -> dict[str, int]:
        if isinstance(reply.usage, tuple):
            prompt, completion = reply.usage
        else:
            prompt = sum(_words(message) + 4 for message in body["messages"])
            completion = len("".join(pieces).split()) + sum(
                len(call.name.split("_")) + len(call.arguments) // 4 + 1 for call in reply.calls
            )
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _completion(self, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        pieces, finish = self._answer(reply, body)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(pieces) if pieces or not reply.calls else None,
            "refusal": None,
        }
        if reply.calls:
            message["tool_calls"] = [
                {
                    **({"id": call_id} if call_id is not None else {}),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call, call_id in zip(reply.calls, self._call_ids(reply), strict=True)
            ]
        answer: dict[str, Any] = {
            "id": reply.response_id or f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_fake",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
        }
        if reply.usage is not False:
            answer["usage"] = self._usage(reply, body, pieces)
        return answer

    def _deltas(self, reply: Reply, pieces: list[str]) -> list[dict[str, Any]]:
        """The answer's delta chunks after the role chunk: content, then tool calls."""
        size = max(1, reply.chunk_words)
        deltas: list[dict[str, Any]] = [
            {"content": "".join(pieces[i : i + size])} for i in range(0, len(pieces), size)
        ]
        for index, (call, call_id) in enumerate(
            zip(reply.calls, self._call_ids(reply), strict=True)
        ):
            first: dict[str, Any] = {"index": index}
            if call_id is not None:
                first["id"] = call_id
            first["type"] = "function"
            first["function"] = {"name": call.name, "arguments": ""}
            deltas.append({"tool_calls": [first]})
            text, step = call.arguments, reply.chunk_chars
            deltas.extend(
                {"tool_calls": [{"index": index, "function": {"arguments": text[i : i + step]}}]}
                for i in range(0, len(text), step)
            )
        return deltas

    async def _stream(
        self,
        reply: Reply,
        body: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Stream the answer as server-sent events; whether the connection stays open."""
        sent_log = _SENT.get(None)
        pieces, finish = self._answer(reply, body)
        options = body.get("stream_options") or {}
        with_usage = bool(options.get("include_usage")) and reply.usage is not False
        identity = {
            "id": reply.response_id or f"chatcmpl-fake{next(self._ids)}",
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
        # The API opens a call-only answer with content null, a text answer with "".
        opening = None if reply.calls and not pieces else ""
        await _send_event(
            writer, chunk({"role": "assistant", "content": opening, "refusal": None}, None)
        )
        for sent, delta in enumerate(self._deltas(reply, pieces)):
            if reply.drop_after_chunks == sent:
                return False
            if reply.malformed_after_chunks == sent:
                await _send_data(writer, '{"id": "chatcmpl-broken", "choices": [')
                await _send_data(writer, "[DONE]")
                await _end_chunks(writer)
                return True
            if reply.nested_after_chunks == sent:
                deep = "[" * reply.nested_depth + "]" * reply.nested_depth
                await _send_data(
                    writer,
                    '{"id": "chatcmpl-nested", "object": "chat.completion.chunk", "choices": '
                    '[{"index": 0, "delta": {"content": "x", "extra": ' + deep + "}}]}",
                )
                await _send_data(writer, "[DONE]")
                await _end_chunks(writer)
                return True
            if reply.hold_after_chunks == sent and reply.hold is not None:
                await _wait_or_disconnect(reader, reply.hold.wait())
            if reply.interval_s and sent:
                await asyncio.sleep(reply.interval_s)  # the model's pace, not synchronisation
            await _send_event(writer, chunk(delta, None))
            if "content" in delta and sent_log is not None:
                sent_log.append((time.monotonic(), delta["content"]))
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


def _words(message: dict[str, Any]) -> int:
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    words = len(content.split()) if isinstance(content, str) else 0
    for call in message.get("tool_calls") or ():
        words += len(str(call.get("function", {}).get("arguments", ""))) // 4 + 1
    return words


# -- HTTP/1.1 -----------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader) -> Received | None:
    """The next request on the connection, or ``None`` when the client closed it."""
    head = await read_head(reader)
    if head is None:
        return None
    arrived = time.monotonic()
    method, path, headers = head
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
    return Received(method=method, path=path, headers=headers, body=body, arrived=arrived)


Problem: TypeAlias = tuple[str, "str | None"]


def _invalid(body: Any) -> Problem | None:
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
    problem = _invalid_messages(messages) or _invalid_tools(body)
    if problem is not None:
        return problem
    temperature = body.get("temperature")
    if temperature is not None and not (
        isinstance(temperature, int | float) and 0 <= temperature <= 2
    ):
        return "Invalid 'temperature': must be a number from 0 to 2.", "temperature"
    top_p = body.get("top_p")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 <= top_p <= 1):
        return "Invalid 'top_p': must be a number from 0 to 1.", "top_p"
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 1):
        return "Invalid 'max_tokens': integer below minimum value.", "max_tokens"
    if body.get("stream_options") is not None and body.get("stream") is not True:
        return (
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    return None


def _invalid_messages(messages: list[Any]) -> Problem | None:
    """Roles and contents, and the API's pairing of tool calls with tool messages:
    an assistant message's ``tool_calls`` must each be answered by the ``tool``
    messages right after it, and a ``tool`` message must answer one of them."""
    unanswered: list[str] = []
    open_ids: set[str] = set()
    opened_at = 0
    for index, message in enumerate(messages):
        where = f"messages.[{index}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            return f"Invalid value for 'messages[{index}].role'.", f"{where}.role"
        role = message["role"]
        if role != "tool" and unanswered:
            return _unanswered(unanswered, opened_at)
        calls = message.get("tool_calls") if role == "assistant" else None
        content = message.get("content")
        content_optional = role == "assistant" and calls is not None
        if not (isinstance(content, str | list) or (content_optional and content is None)):
            return (
                f"Invalid type for 'messages[{index}].content': expected one of a string or "
                f"array of objects, but got {_json_type(content)} instead.",
                f"{where}.content",
            )
        problem = _invalid_content(content, role, index) if isinstance(content, list) else None
        if problem is not None:
            return problem
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                return (
                    f"Missing required parameter: 'messages[{index}].tool_call_id'.",
                    f"{where}.tool_call_id",
                )
            if call_id not in open_ids:
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"{where}.role",
                )
            if call_id in unanswered:
                unanswered.remove(call_id)
            continue
        open_ids = set()
        if calls is None:
            continue
        problem = _invalid_calls(calls, index)
        if problem is not None:
            return problem
        unanswered = [call["id"] for call in calls]
        open_ids = set(unanswered)
        opened_at = index
    if unanswered:
        return _unanswered(unanswered, opened_at)
    return None


#: The part types each role's content array may hold, as the API accepts them.
_PART_TYPES: Final = {
    "user": frozenset({"text", "image_url", "input_audio", "file"}),
    "system": frozenset({"text"}),
    "developer": frozenset({"text"}),
    "assistant": frozenset({"text", "refusal"}),
    "tool": frozenset({"text"}),
}
_ALL_PART_TYPES: Final = ("text", "image_url", "input_audio", "refusal", "audio", "file")
_IMAGE_DETAILS: Final = frozenset({"auto", "low", "high"})
_DATA_URL: Final = re.compile(r"data:(image/[a-z0-9.+-]+);base64,([A-Za-z0-9+/]*={0,2})")


def _invalid_content(content: list[Any], role: str, index: int) -> Problem | None:
    """A content array as the API checks it: at least one part, each a known
    ``type`` its role may carry; text parts with a string ``text``; image parts
    (user messages only) with a ``data:image/...;base64,`` or http(s) ``url``,
    the base64 well formed, and ``detail`` one of auto, low or high if given."""
    where = f"messages[{index}].content"
    if not content:
        return (
            f"Invalid '{where}': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            where,
        )
    for number, part in enumerate(content):
        at = f"{where}[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict) or kind is None:
            return f"Missing required parameter: '{at}.type'.", f"{at}.type"
        if kind not in _ALL_PART_TYPES:
            supported = ", ".join(f"'{name}'" for name in _ALL_PART_TYPES)
            return f"Invalid value: {kind!r}. Supported values are: {supported}.", f"{at}.type"
        if kind not in _PART_TYPES[role]:
            if kind == "image_url":
                return (
                    f"Invalid 'messages[{index}]': Image URLs are only allowed for messages "
                    f"with role 'user', but this message with role '{role}' contains an image "
                    "URL.",
                    f"messages[{index}]",
                )
            return (
                f"Invalid value: {kind!r}. Supported values are: "
                + ", ".join(f"'{name}'" for name in sorted(_PART_TYPES[role]))
                + ".",
                f"{at}.type",
            )
        if kind == "text" and not isinstance(part.get("text"), str):
            return f"Missing required parameter: '{at}.text'.", f"{at}.text"
        if kind == "image_url":
            problem = _invalid_image(part.get("image_url"), at)
            if problem is not None:
                return problem
    return None


def _invalid_image(image: object, at: str) -> Problem | None:
    if not isinstance(image, dict) or not isinstance(image.get("url"), str):
        return f"Missing required parameter: '{at}.image_url.url'.", f"{at}.image_url.url"
    url = image["url"]
    if url.startswith("data:"):
        found = _DATA_URL.fullmatch(url)
        if found is None or len(found[2]) % 4:
            return (
                "Invalid image URL: the data URL must be data:image/<type>;base64,<data> "
                "with valid base64.",
                f"{at}.image_url.url",
            )
    elif not url.startswith(("http://", "https://")):
        return (
            f"Invalid '{at}.image_url.url'. Expected a valid URL, but got a value with an "
            "invalid format.",
            f"{at}.image_url.url",
        )
    detail = image.get("detail")
    if detail is not None and detail not in _IMAGE_DETAILS:
        return (
            f"Invalid value: {detail!r}. Supported values are: 'auto', 'low', and 'high'.",
            f"{at}.image_url.detail",
        )
    return None


def images_of(body: dict[str, Any]) -> list[tuple[int, str]]:
    """The image parts a request carried: (message index, url), in order."""
    found: list[tuple[int, str]] = []
    for index, message in enumerate(body.get("messages") or ()):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            found.extend(
                (index, part["image_url"]["url"])
                for part in content
                if isinstance(part, dict) and part.get("type") == "image_url"
            )
    return found


def _unanswered(ids: list[str], index: int) -> Problem:
    return (
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        + ", ".join(ids),
        f"messages.[{index}].role",
    )


def _invalid_calls(calls: Any, index: int) -> Problem | None:
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list) or not calls:
        return f"Invalid '{where}': empty array. Expected an array with minimum length 1.", where
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(call.get("id"), str)
            or call.get("type") != "function"
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            return f"Invalid value for '{where}[{number}]'.", f"{where}[{number}]"
        if not _FUNCTION_NAME.fullmatch(function["name"]):
            return _bad_name(f"{where}[{number}].function.name")
    return None


def _invalid_tools(body: dict[str, Any]) -> Problem | None:
    tools = body.get("tools")
    if tools is not None:
        problem = _invalid_tool_list(tools)
        if problem is not None:
            return problem
    choice = body.get("tool_choice")
    if choice is None:
        return None
    if tools is None:
        return (
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
            "are specified.",
            "tool_choice",
        )
    names = {tool["function"]["name"] for tool in tools}
    if choice in _TOOL_CHOICES:
        return None
    if (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and choice["function"].get("name") in names
    ):
        return None
    return "Invalid value for 'tool_choice'.", "tool_choice"


def _invalid_tool_list(tools: object) -> Problem | None:
    if not isinstance(tools, list):
        return "Invalid type for 'tools': expected an array.", "tools"
    if not tools:
        return "Invalid 'tools': empty array. Expected an array with minimum length 1.", "tools"
    if len(tools) > _MAX_TOOLS:
        return (
            f"Invalid 'tools': array too long. Expected an array with maximum length "
            f"{_MAX_TOOLS}, but got an array with length {len(tools)} instead.",
            "tools",
        )
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            return f"Invalid value for 'tools[{index}]'.", f"tools[{index}]"
        if not isinstance(function.get("name"), str) or not _FUNCTION_NAME.fullmatch(
            function["name"]
        ):
            return _bad_name(f"tools[{index}].function.name")
        if not isinstance(function.get("description", ""), str):
            return (
                f"Invalid type for 'tools[{index}].function.description'.",
                f"tools[{index}].function.description",
            )
        if not isinstance(function.get("parameters", {}), dict):
            return (
                f"Invalid type for 'tools[{index}].function.parameters'.",
                f"tools[{index}].function.parameters",
            )
    return None


def _bad_name(param: str) -> Problem:
    return (
        f"Invalid '{param}': string does not match pattern. Expected a string that matches "
        "the pattern '^[a-zA-Z0-9_-]{1,64}$'.",
        param,
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    return "a value"


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


# -- the echo model -------------------------------------------------------------

_CALL_HEAD: Final = re.compile(r"\s*call\s+([a-zA-Z0-9_-]{1,64})\s+")


def _text(content: object) -> str:
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return content if isinstance(content, str) else ""


def parse_call_lines(text: str) -> list[tuple[str, str]] | None:
    """``[(function name, arguments JSON)]`` if ``text`` is nothing but one or more
    ``call <function_name> <json object>`` (the object may span lines), else ``None``."""
    decoder = json.JSONDecoder()
    calls: list[tuple[str, str]] = []
    position = 0
    text = text.strip()
    while position < len(text):
        head = _CALL_HEAD.match(text, position)
        if head is None:
            return None
        try:
            value, end = decoder.raw_decode(text, head.end())
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        calls.append((head.group(1), text[head.end() : end]))
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
    return calls or None


def echo_reply(body: dict[str, Any]) -> Reply:
    """The ``echo`` model: repeats the last user message, word by word.

    With tools offered (``tool_choice`` not ``"none"``), a last user message of
    ``call <function_name> <json object>`` lines is answered with those tool
    calls, whether the functions were offered or not. After tool results it
    answers ``Tool <name> returned: <text>``, one line per result.
    """
    messages: list[dict[str, Any]] = body["messages"]
    if messages[-1].get("role") == "tool":
        first = len(messages) - 1
        while first > 0 and messages[first - 1].get("role") == "tool":
            first -= 1
        asked = (messages[first - 1].get("tool_calls") or []) if first else []
        names = {call["id"]: call["function"]["name"] for call in asked}
        return Reply.text(
            "\n".join(
                f"Tool {names.get(message['tool_call_id'], '?')} returned: "
                f"{_text(message.get('content'))}"
                for message in messages[first:]
            )
        )
    users = [message for message in messages if message.get("role") == "user"]
    text = _text(users[-1].get("content")) if users else ""
    if body.get("tools") and body.get("tool_choice", "auto") != "none":
        calls = parse_call_lines(text)
        if calls is not None:
            return Reply.tool_calls(calls)
    return Reply.text(text or "(empty message)")


# -- scripts and the command line --------------------------------------------------


def reply_from_json(item: object) -> Reply:
    """A Reply from its JSON form, as ``--script`` files hold them:

    ``{"text": "...", "chunk_words": 1, "usage": [prompt, completion], "finish_reason": "stop"}``,
    ``{"tool_calls": [{"name": "...", "arguments": {...} or "raw text", "id": "..."}],
    "content": "", "chunk_chars": 8, "usage": ...}`` or
    ``{"error": 429, "message": "...", "code": "...", "retry_after": 1.5}``.
    """
    if not isinstance(item, dict):
        raise TypeError(f"a reply must be an object, got {item!r}")
    usage_value = item.get("usage", True)
    usage: bool | tuple[int, int] = (
        (int(usage_value[0]), int(usage_value[1]))
        if isinstance(usage_value, list)
        else bool(usage_value)
    )
    if "error" in item:
        return Reply.error(
            int(item["error"]),
            message=str(item.get("message", "")),
            code=item.get("code"),
            retry_after=item.get("retry_after"),
        )
    if "tool_calls" in item:
        calls = [
            FakeToolCall(
                name=str(call["name"]),
                arguments=(
                    call["arguments"]
                    if isinstance(call.get("arguments"), str)
                    else json.dumps(call.get("arguments", {}))
                ),
                id=call.get("id"),
            )
            for call in item["tool_calls"]
        ]
        return Reply.tool_calls(
            calls,
            content=str(item.get("content", "")),
            chunk_chars=int(item.get("chunk_chars", 8)),
            usage=usage,
        )
    if "text" in item:
        return Reply.text(
            str(item["text"]),
            chunk_words=int(item.get("chunk_words", 1)),
            usage=usage,
            finish_reason=str(item.get("finish_reason", "stop")),
        )
    raise ValueError(f"a reply needs 'text', 'tool_calls' or 'error', got keys {sorted(item)}")


def load_script(path: Path) -> list[Reply]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise TypeError(f"{path}: expected a JSON list of replies")
    return [reply_from_json(item) for item in data]


def _log_request(request: Received) -> None:
    body = request.body if isinstance(request.body, dict) else {}
    messages = body.get("messages")
    print(
        f"{request.method} {request.path} model={body.get('model')!r} "
        f"messages={len(messages) if isinstance(messages, list) else '?'} "
        f"tools={len(body.get('tools') or [])} tool_choice={body.get('tool_choice')!r}",
        file=sys.stderr,
        flush=True,
    )


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeOpenAI(
        api_key=args.api_key,
        default=echo_reply if args.model == "echo" else None,
        host=args.host,
        listen_port=args.port,
        on_request=None if args.quiet else _log_request,
    )
    fake.script(*args.replies)
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
        prog="python -m tests.fakes.openai_server",
        description="A local server of the OpenAI Chat Completions API (streaming and tool "
        "calls). Prints its base URL on the first line of stdout and serves until killed.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument(
        "--model",
        choices=("echo", "scripted"),
        default="echo",
        help="echo: repeat the last user message (and make 'call <function> {json}' tool "
        "calls); scripted: only the --script replies, then errors",
    )
    parser.add_argument("--script", type=Path, help="JSON list of replies answered first, in order")
    parser.add_argument("--api-key", help="require this bearer key")
    parser.add_argument("--quiet", action="store_true", help="do not log requests to stderr")
    args = parser.parse_args(argv)
    if args.model == "scripted" and args.script is None:
        parser.error("--model scripted needs --script")
    try:
        args.replies = load_script(args.script) if args.script is not None else []
    except (ValueError, TypeError, KeyError, OSError) as exc:
        parser.error(f"--script: {exc}")
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"openai_server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
