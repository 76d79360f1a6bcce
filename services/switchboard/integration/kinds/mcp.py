"""MCP servers as integrations: the official ``mcp`` SDK's client behind ``Connector``.

One ``McpConnector`` holds one long-lived MCP session with one server, opened
on first use (``initialize``), over the streamable HTTP transport or, for a
server the operator configured, over stdio.

**Egress.** Every HTTP request the SDK makes goes through
``platform.egress.http_client``: the SDK speaks ``httpx2``, so a small
``httpx2`` transport hands each request to that egress-checked ``httpx``
client (which resolves, checks and dials the checked address: no DNS
rebinding, no redirects followed, no environment proxies). The same bridge
bounds the bytes a response may carry and tells the connector what became of
each request (see "Reconnection").

**stdio.** ``stdio:<id>`` names a server from the operator's
``SWITCHBOARD_INTEGRATION_MCP_STDIO_SERVERS`` (``parse_stdio_servers``); the
hub passes the matching ``StdioServer``. An API call never supplies a
command, so no API call can make the server start a process it was not told
to. The SDK's stdio client runs it in its own process group and, on close,
closes its stdin, then terminates and kills the group (bounded waits).

**Session ownership.** The session lives in a background task of its own:
anyio task groups and cancel scopes must be left by the task that entered
them, and the SDK's HTTP transport ends its task group with an exception
when a request cannot connect. Callers send through the session from their
own tasks; a session that failed is retired (its task winds down, bounded)
and the next call opens a new one.

**Tools.** ``list_tools`` follows ``nextCursor`` (at most ``MAX_TOOL_PAGES``
pages and ``MAX_TOOLS`` tools; more is a broken server) and caches the list
until the server sends ``notifications/tools/list_changed`` (the cache is
dropped and ``on_tools_changed`` called) or a new session starts (the server
may have changed while we were away). ``call_tool`` checks the name against
the list first (``ToolNotFound`` without a call; a stale list is refreshed
once), sends ``tools/call`` with a progress token and the call's idempotency
key in ``params._meta`` (``platform/idempotency.MCP_META``), and forwards
``notifications/progress``. A deadline or a cancelled caller makes the SDK
send ``notifications/cancelled`` for the request before ``TimeoutError`` or
``CancelledError`` reaches the caller. Text content is joined by newlines,
image and audio content and embedded resources become ``ToolResult.files``
(base64 decoded; a blob resource named by its URI's last segment; a text
resource stays in the text too, and is a file when it names a media type),
``structuredContent`` kept, ``isError`` becomes ``ToolResult.is_error``, and
a JSON-RPC error the server answers the call with is a tool error too (an
HTTP error status is ``Unreachable``). A result
whose text, files and serialized structured content exceed ``max_result_bytes``
raises ``ResultTooLarge``; over HTTP the response is cut off once it carries
``raw_limit(max_result_bytes)`` bytes, and the server is told to stop.

**Reconnection.** A dropped connection is met at three levels:

1. Within a request, the SDK resumes a broken response stream with
   ``Last-Event-ID`` when the server sent event ids (servers with an event
   store); the caller sees nothing.
2. A session the server no longer knows (HTTP 404 on a request carrying its
   session id, as the spec says; 400, as the TypeScript SDK's servers answer)
   or a connection that failed is retired. ``ping`` and ``tools/list`` are
   retried once on a new session. ``tools/call`` is retried once only when
   its request provably did not run: it never left (the connection could
   not be made) or the server refused the session. A call that may have run
   (the connection broke after the request was sent, or a stdio server
   exited) raises ``Unreachable`` and is never repeated.
3. The next call after any failure opens a new session (``initialize``).

**Errors.** ``Unreachable`` names the server by host and port (or
``stdio:<id>``) and says what failed; never a path, query, header or
credential. ``DestinationBlocked`` comes from the egress policy unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import functools
import json
import logging
import mimetypes
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast
from urllib.parse import unquote, urlsplit

import anyio
import httpx
import httpx2
from pydantic import ValidationError

from switchboard.api.context.v1 import context_pb2
from switchboard.integration.ports.connectors import (
    Malformed,
    Progress,
    ToolNotFound,
    ToolResult,
    ToolsChanged,
    ToolSpec,
    Unreachable,
)
from switchboard.platform.errors import (
    DestinationBlocked,
    FieldViolation,
    InvalidArgument,
    ResolutionFailed,
    ResultTooLarge,
)
from switchboard.platform.imports import imported
from switchboard.platform.security.egress import (
    EgressPolicy,
    HttpEndpoint,
    http_client,
    parse_http_endpoint,
)
from switchboard.platform.values import idempotency, jsonbounds, names
from switchboard.platform.values.jsonbounds import JsonRejected

# The SDK is imported when the first session opens (``_import_sdk``), not with this
# module: about a second of CPU (its client brings its server side), which every process
# would spend at start though most never speak to an MCP server.
if TYPE_CHECKING:
    import mcp_types as types
    from mcp.client.session import ClientSession, IncomingMessage
    from mcp.shared.exceptions import MCPError

log = logging.getLogger("switchboard.integration.kinds.mcp")

STDIO_PREFIX: Final = "stdio:"
#: Operator-chosen stdio server ids (``stdio:<id>``).
STDIO_ID: Final = names.CLIENT_ID
#: Most tools one server may list, and pages one listing may take.
MAX_TOOLS: Final = 1000
MAX_TOOL_PAGES: Final = 100
#: Largest message accepted outside a tool result (a tools/list page, a
#: notification); also the per-event bound of the SDK's SSE parser.
DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1_048_576
#: Most arguments and environment entries in one stdio server setting.
_MAX_STDIO_ARGS: Final = 256
_MAX_STDIO_ENV: Final = 256

#: A tool call's response stream may stay silent while the tool works; the
#: caller's deadline (at most the hub's cap) ends the call, this only bounds
#: a response stream the caller has already abandoned.
_RESPONSE_IDLE_TIMEOUT_S: Final = 3600.0
#: How long close() waits for a session to wind down (an HTTP DELETE, or a
#: stdio server's stdin close, terminate and kill) before cancelling it.
_CLOSE_TIMEOUT_S: Final = 10.0
#: Headers the bridge does not copy from the SDK's request: httpx sets them
#: for the request it sends. Compression is refused (``identity``) so the byte
#: bounds count what is parsed, with no decompression bomb behind them.
_NOT_FORWARDED: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "accept-encoding"}
)
#: HTTP statuses that say the server no longer knows the session.
_SESSION_GONE: Final = frozenset({400, 404})

_T = TypeVar("_T")


#: The SDK's modules a session uses, the last of them imported last.
_SDK: Final = ("mcp_types", "mcp.client.session", "mcp.client.stdio", "mcp.client.streamable_http")


@functools.cache
def _client_info() -> types.Implementation:
    """How this client introduces itself to MCP servers: the installed release's version."""
    import mcp_types as types

    return types.Implementation(name="switchboard", version=metadata.version("switchboard-mesh"))


def raw_limit(max_result_bytes: int) -> int:
    """Bytes a tool call's HTTP response may carry for a result of ``max_result_bytes``.

    The wire form escapes text and often repeats structured content as text,
    so it may be several times the result; past this bound it is no longer
    worth reading.
    """
    return 4 * max_result_bytes + 65_536


# ---------------------------------------------------------------------------
# Operator-configured stdio servers


@dataclass(frozen=True)
class StdioServer:
    """One MCP server the operator allows to run as a child process over stdio."""

    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None


def _string_list(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a non-empty list of strings")
    if len(value) > _MAX_STDIO_ARGS:
        raise ValueError(f"{what} has more than {_MAX_STDIO_ARGS} entries")
    if not all(isinstance(item, str) and item and "\x00" not in item for item in value):
        raise ValueError(f"{what} must hold non-empty strings without NUL characters")
    return tuple(value)


def parse_stdio_servers(text: str) -> dict[str, StdioServer]:
    """Parse ``SWITCHBOARD_INTEGRATION_MCP_STDIO_SERVERS``.

    ``{"id": {"command": ["node", "server.js"], "env": {"K": "V"}, "cwd": "/srv"}}``;
    ``env`` and ``cwd`` are optional, an empty text means no servers. Raises
    ``ValueError`` naming the offending id and key (never an env value: those
    are often credentials).
    """
    if not text.strip():
        return {}
    try:
        data = jsonbounds.loads(text, max_bytes=DEFAULT_MAX_MESSAGE_BYTES)
    except JsonRejected as exc:
        raise ValueError(f"the stdio MCP servers setting is {exc}") from None
    # ValueError throughout (not TypeError): the setting's text is malformed.
    if not isinstance(data, dict):
        raise ValueError("the stdio MCP servers setting must be a JSON object of id: server")  # noqa: TRY004
    servers: dict[str, StdioServer] = {}
    for server_id, spec in data.items():
        if not STDIO_ID.fullmatch(server_id):
            raise ValueError(f"stdio MCP server id {server_id[:80]!r} {names.CLIENT_ID_RULE.must}")
        where = f"stdio MCP server {server_id!r}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be an object with a command")  # noqa: TRY004
        unknown = sorted(set(spec) - {"command", "env", "cwd"})
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; expected command, env, cwd")
        command = _string_list(spec.get("command"), f"{where}: command")
        env = spec.get("env", {})
        if not isinstance(env, dict) or len(env) > _MAX_STDIO_ENV:
            raise ValueError(f"{where}: env must be an object of at most {_MAX_STDIO_ENV} names")
        for key, value in env.items():
            if not key or "=" in key or "\x00" in key:
                raise ValueError(f"{where}: env has an invalid variable name")
            if not isinstance(value, str) or "\x00" in value:
                raise ValueError(f"{where}: env {key!r} must be a string without NUL characters")
        cwd = spec.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not cwd or "\x00" in cwd):
            raise ValueError(f"{where}: cwd must be a non-empty path")
        servers[server_id] = StdioServer(command=command, env=dict(env), cwd=cwd)
    return servers


# ---------------------------------------------------------------------------
# What the HTTP layer saw of one request


class _Request:
    """The fate of one request, as the HTTP bridge saw it.

    Found through ``_REQUEST``: the SDK carries the sending task's context
    variables to the task that POSTs the message, so the bridge sees the
    record of the call that caused the POST.
    """

    __slots__ = (
        "broken",
        "limit",
        "malformed",
        "reached",
        "rejected",
        "seen",
        "status",
        "task",
        "too_large",
    )

    def __init__(self, limit: int, *, reached: bool = False) -> None:
        #: Bytes its responses may carry in all.
        self.limit = limit
        self.seen = 0
        #: The request may have reached the server (it may have run).
        self.reached = reached
        #: The server refused the session: the request did not run.
        self.rejected = False
        #: The connection failed while sending or reading.
        self.broken = False
        self.too_large = False
        #: Why its response must not be parsed ("a message nested deeper than ...").
        self.malformed: str | None = None
        #: The HTTP status its POST got.
        self.status: int | None = None
        #: The caller's task, cancelled when the response grows too large.
        self.task: asyncio.Task[Any] | None = None


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "switchboard_mcp_request", default=None
)


class _Live:
    """One session and the task that owns it."""

    def __init__(self) -> None:
        self.session: ClientSession | None = None
        self.ready = asyncio.Event()
        self.stop = asyncio.Event()
        self.dead = False
        self.error: BaseException | None = None
        #: The first exception the HTTP bridge saw (raised before the
        #: transport's task group turns it into a group).
        self.transport_error: BaseException | None = None
        #: The last HTTP error or redirect status a request got.
        self.http_status: int | None = None
        #: What the server sent that is not JSON-RPC (then the session is retired).
        self.malformed: str | None = None


class _OtherUrl(httpx2.TransportError):
    """The SDK asked for a URL the integration does not name (a followed redirect)."""


class _TooLarge(httpx2.StreamError):
    """A response carried more bytes than its request allows.

    A ``StreamError``: what the SDK's transport expects from a body it cannot
    read, so it fails the request instead of its whole task group.
    """

    def __init__(self) -> None:
        super().__init__("the response is larger than allowed")


class _Malformed(httpx2.StreamError):
    """A response the SDK must not parse: nested too deep, or compressed.

    A ``StreamError`` for the same reason as ``_TooLarge``.
    """

    def __init__(self) -> None:
        super().__init__("the response is malformed")


class _BoundedBody(httpx2.AsyncByteStream):
    """An ``httpx`` response body handed to ``httpx2``, counted against a bound and
    measured by ``jsonbounds.StreamGauge`` before the SDK's parser sees any of it."""

    def __init__(
        self, response: httpx.Response, live: _Live, request: _Request | None, limit: int | None
    ) -> None:
        self._response = response
        self._live = live
        self._request = request
        self._limit = limit
        line_limit = max(limit or 0, request.limit if request is not None else 0)
        self._gauge = jsonbounds.StreamGauge(max_line_bytes=line_limit or DEFAULT_MAX_MESSAGE_BYTES)

    def _stop(self) -> None:
        record = self._request
        if record is not None and record.task is not None:
            # The SDK treats a failed stream as a lost connection and would
            # retry it; cancelling the caller ends the call now (and sends
            # notifications/cancelled).
            record.task.cancel()
            record.task = None

    def _refuse(self, reason: str) -> _Malformed:
        record = self._request
        if record is not None:
            record.malformed = reason
            self._stop()
        else:
            # The standalone stream's notifications: the session is broken.
            self._live.malformed = reason
            self._live.dead = True
        return _Malformed()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        record = self._request
        seen = 0
        encoding = self._response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Asked for identity: a compressed body would defeat both bounds.
            raise self._refuse("with a compressed body (identity was asked for)")
        try:
            async for chunk in self._response.aiter_raw():
                seen += len(chunk)
                if record is not None:
                    record.seen += len(chunk)
                    over = record.seen > record.limit
                else:
                    over = self._limit is not None and seen > self._limit
                if over:
                    if record is not None:
                        record.too_large = True
                        self._stop()
                    raise _TooLarge
                self._gauge.feed(chunk)
                yield chunk
            # Before the iteration ends, that is before the SDK parses the last line.
            self._gauge.close()
        except JsonRejected as rejected:
            raise self._refuse(f"with a message {rejected}") from None
        except httpx.HTTPError as exc:
            if record is not None:
                record.broken = True
            _lost(self._live, exc)
            raise

    async def aclose(self) -> None:
        await self._response.aclose()


class _EgressBridge(httpx2.AsyncBaseTransport):
    """Sends the SDK's ``httpx2`` requests through the egress-checked ``httpx`` client."""

    def __init__(
        self, client: httpx.AsyncClient, live: _Live, max_message_bytes: int, url: str
    ) -> None:
        self._client = client
        self._live = live
        self._max_message_bytes = max_message_bytes
        self._url = httpx2.URL(url)

    def _only_the_endpoint(self, request: httpx2.Request) -> None:
        """The client carries the integration's credential: it goes to the URL the
        integration names and nowhere else, whatever the SDK asks (it follows
        same-origin redirects unless told not to; see ``_transport``)."""
        if request.url != self._url:
            refused = _OtherUrl("a request to another URL than the endpoint is never sent")
            _lost(self._live, refused)
            raise refused

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self._only_the_endpoint(request)
        record = _REQUEST.get()
        is_post = request.method == "POST"
        body = await request.aread()
        headers = [
            (name, value)
            for name, value in request.headers.multi_items()
            if name.lower() not in _NOT_FORWARDED
        ]
        headers.append(("accept-encoding", "identity"))
        timeout = request.extensions.get("timeout") or {}
        # The standalone GET stream (no request of ours behind it) waits for
        # notifications as long as the session lives; closing the session ends it.
        if request.method == "GET" and record is None:
            read = None
        elif request.method == "DELETE":
            # Ending a session is a courtesy: not worth waiting for long.
            read = timeout.get("connect")
        else:
            read = timeout.get("read")
        outgoing = self._client.build_request(
            request.method,
            str(request.url),
            headers=headers,
            content=body or None,
            timeout=httpx.Timeout(
                connect=timeout.get("connect"),
                read=read,
                write=timeout.get("write"),
                pool=timeout.get("pool"),
            ),
        )
        try:
            response = await self._client.send(outgoing, stream=True)
        except (
            httpx.ConnectError,
            httpx.ConnectTimeout,
            DestinationBlocked,
            ResolutionFailed,
        ) as exc:
            # Nothing was sent: the request cannot have run.
            _lost(self._live, exc)
            raise
        except httpx.HTTPError as exc:
            if record is not None and is_post:
                record.reached = True
                record.broken = True
            _lost(self._live, exc)
            raise
        status = response.status_code
        if is_post:
            session_gone = status in _SESSION_GONE and "mcp-session-id" in request.headers
            if session_gone:
                self._live.dead = True
            if status >= 300:
                self._live.http_status = status
            if record is not None and record.status is None:
                record.status = status
                if session_gone:
                    record.rejected = True
                else:
                    record.reached = True
        limit = self._max_message_bytes if is_post else None
        return httpx2.Response(
            status_code=status,
            headers=response.headers.multi_items(),
            stream=_BoundedBody(response, self._live, record, limit),
            request=request,
        )


def _lost(live: _Live, exc: BaseException) -> None:
    """The connection failed: the session is done (the next call opens a new one)."""
    if live.transport_error is None:
        live.transport_error = exc
    live.dead = True


# ---------------------------------------------------------------------------
# The connector


def _find(exc: BaseException | None, kind: type[_T]) -> _T | None:
    """The first exception of ``kind`` in ``exc``, its groups and its causes."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        stack.extend([current.__cause__, current.__context__])
    return None


class McpConnector:
    """The hub's client of one MCP server (see the module doc)."""

    def __init__(
        self,
        endpoint: str,
        *,
        headers: Mapping[str, str] | None = None,
        egress: EgressPolicy,
        connect_timeout_s: float,
        on_tools_changed: ToolsChanged | None = None,
        stdio: StdioServer | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._http: HttpEndpoint | None = None
        self._stdio: StdioServer | None = None
        if endpoint.startswith(STDIO_PREFIX):
            if stdio is None:
                message = "names a stdio MCP server the operator has not configured"
                raise InvalidArgument(
                    f"endpoint {message}", [FieldViolation(field="endpoint", description=message)]
                )
            self._stdio = stdio
            self._label = endpoint
        else:
            self._http = parse_http_endpoint(endpoint, "endpoint")
            host = f"[{self._http.host}]" if ":" in self._http.host else self._http.host
            self._label = f"{host}:{self._http.port}"
        self._headers = dict(headers or {})
        self._egress = egress
        self._connect_timeout_s = connect_timeout_s
        self._on_tools_changed = on_tools_changed
        self._max_message_bytes = max_message_bytes
        self._lock = asyncio.Lock()
        self._live: _Live | None = None
        self._owners: set[asyncio.Task[None]] = set()
        self._tools: dict[str, ToolSpec] | None = None
        self._tools_epoch = 0
        self._closed = False

    @property
    def label(self) -> str:
        """How errors and logs name the server: ``host:port`` or ``stdio:<id>``."""
        return self._label

    # -- the Connector interface ----------------------------------------------

    # Each entry point imports the SDK (off the loop, within its timeout) before anything
    # else: the methods below import its modules where they use them, and a first use on
    # the loop while a worker thread imports the same package can deadlock its locks.

    async def probe(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await imported(*_SDK)
            await self._request("ping", lambda session: session.send_ping())

    async def list_tools(self, timeout_s: float) -> list[ToolSpec]:
        async with asyncio.timeout(timeout_s):
            await imported(*_SDK)
            tools = self._tools if self._tools is not None else await self._listing()
            return list(tools.values())

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any],
        *,
        timeout_s: float,
        max_result_bytes: int,
        progress: Progress | None = None,
        idempotency_key: str = "",
    ) -> ToolResult:
        async with asyncio.timeout(timeout_s):
            await imported(*_SDK)
            tools = self._tools
            if tools is None or name not in tools:
                tools = await self._listing()
            if name not in tools:
                raise ToolNotFound(f"MCP server {self._label} has no tool {name!r}")
            return await self._call(name, arguments, max_result_bytes, progress, idempotency_key)

    async def close(self) -> None:
        self._closed = True
        if self._live is not None:
            self._retire(self._live)
        owners = set(self._owners)
        if not owners:
            return
        _, pending = await asyncio.wait(owners, timeout=_CLOSE_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_CLOSE_TIMEOUT_S)

    # -- requests ---------------------------------------------------------------

    async def _request(self, what: str, send: Callable[[ClientSession], Awaitable[_T]]) -> _T:
        """Send a request that is safe to repeat, once more on a new session if one failed."""
        from mcp.shared.exceptions import MCPError

        task = asyncio.current_task()
        for attempt in range(2):
            live, session = await self._session()
            record = _Request(self._max_message_bytes)
            record.task = task
            token = _REQUEST.set(record)
            try:
                return await send(session)
            except asyncio.CancelledError:
                stopped = record.too_large or record.malformed is not None
                if stopped and task is not None and task.uncancel() == 0:
                    raise self._refused(record, what) from None
                raise
            except MCPError as exc:
                if record.too_large or record.malformed is not None:
                    raise self._refused(record, what) from None
                if not self._failed(record, exc):
                    raise Unreachable(
                        f"MCP server {self._label} answered {what} with error {exc.code}"
                    ) from None
                self._retire(live)
                if attempt == 0:
                    continue
                raise self._unreachable(live) from None
            except ValidationError:
                raise Malformed(
                    f"MCP server {self._label} answered {what} with a malformed message"
                ) from None
            finally:
                record.task = None
                _REQUEST.reset(token)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _listing(self) -> dict[str, ToolSpec]:
        import mcp_types as types

        # A new session drops the cache: open it before noting the epoch.
        await self._session()
        epoch = self._tools_epoch

        async def pages(session: ClientSession) -> list[types.Tool]:
            tools: list[types.Tool] = []
            cursor: str | None = None
            for _ in range(MAX_TOOL_PAGES):
                params = None if cursor is None else types.PaginatedRequestParams(cursor=cursor)
                page = await session.send_request(
                    types.ListToolsRequest(params=params), types.ListToolsResult
                )
                tools.extend(page.tools)
                if len(tools) > MAX_TOOLS:
                    break
                cursor = page.next_cursor
                if cursor is None:
                    return tools
            raise Unreachable(
                f"MCP server {self._label} lists more than {MAX_TOOLS} tools or "
                f"{MAX_TOOL_PAGES} pages"
            )

        listed = await self._request("tools/list", pages)
        specs: dict[str, ToolSpec] = {}
        for tool in listed:
            # Schemas are measured by the hub, for every connector (tools._check_schemas).
            specs.setdefault(tool.name, _spec(tool))
        # A list_changed that arrived while we listed makes this listing stale.
        if epoch == self._tools_epoch:
            self._tools = specs
        return specs

    async def _call(
        self,
        name: str,
        arguments: Mapping[str, Any],
        max_result_bytes: int,
        on_progress: Progress | None,
        key: str,
    ) -> ToolResult:
        import mcp_types as types
        from mcp.shared.exceptions import MCPError

        finished = False

        async def forward(progress: float, total: float | None, message: str | None) -> None:
            # The SDK runs progress callbacks as tasks of their own: one may
            # still be pending when the result is back; it is dropped then.
            if on_progress is not None and not finished:
                await on_progress(progress, total, message or "")

        # The SDK's own way to set a request's _meta (ClientSession.call_tool's
        # ``meta``); it adds the progress token beside it when it sends. The
        # cast: the type is an open TypedDict (PEP 728), which mypy cannot read.
        meta = cast(types.RequestParamsMeta, {idempotency.MCP_META: key}) if key else None
        request = types.CallToolRequest(
            params=types.CallToolRequestParams(name=name, arguments=dict(arguments), _meta=meta)
        )
        task = asyncio.current_task()
        try:
            for attempt in range(2):
                live, session = await self._session()
                # Over stdio nothing tells whether a request was read: assume it was.
                record = _Request(raw_limit(max_result_bytes), reached=self._stdio is not None)
                record.task = task
                token = _REQUEST.set(record)
                try:
                    result = await session.send_request(
                        request,
                        types.CallToolResult,
                        progress_callback=None if on_progress is None else forward,
                    )
                except asyncio.CancelledError:
                    stopped = record.too_large or record.malformed is not None
                    if stopped and task is not None and task.uncancel() == 0:
                        raise self._refused(record, "tools/call", max_result_bytes) from None
                    raise
                except MCPError as exc:
                    if record.too_large or record.malformed is not None:
                        raise self._refused(record, "tools/call", max_result_bytes) from None
                    if not self._failed(record, exc):
                        if record.status is not None and record.status >= 400:
                            raise Unreachable(
                                f"MCP server {self._label} answered HTTP {record.status}"
                            ) from None
                        return await self._tool_error(name, exc)
                    self._retire(live)
                    if attempt == 0 and not record.reached:
                        continue
                    raise self._unreachable(live) from None
                except ValidationError:
                    raise Malformed(
                        f"MCP server {self._label} answered tools/call with a malformed result"
                    ) from None
                finally:
                    record.task = None
                    _REQUEST.reset(token)
                return _result(result, max_result_bytes)
        finally:
            finished = True
        raise AssertionError("unreachable")  # pragma: no cover

    async def _tool_error(self, name: str, exc: MCPError) -> ToolResult:
        """A JSON-RPC error the server answered a call with."""
        import mcp_types as types

        if exc.code in (types.INVALID_PARAMS, types.METHOD_NOT_FOUND):
            # Unknown tool (the spec's answer is INVALID_PARAMS): our list was stale.
            self._invalidate_tools()
            if name not in await self._listing():
                raise ToolNotFound(f"MCP server {self._label} has no tool {name!r}") from None
        return ToolResult(text=f"MCP error {exc.code}: {exc.message[:1000]}", is_error=True)

    def _refused(
        self, record: _Request, what: str, max_result_bytes: int | None = None
    ) -> Exception:
        """Why the bridge stopped reading ``record``'s response."""
        if record.malformed is not None:
            return Malformed(f"MCP server {self._label} answered {what} {record.malformed}")
        if max_result_bytes is not None:
            return self._too_large(max_result_bytes)
        return Malformed(
            f"MCP server {self._label} answered {what} with a message larger than "
            f"{self._max_message_bytes} bytes"
        )

    def _too_large(self, max_result_bytes: int) -> ResultTooLarge:
        return ResultTooLarge(
            f"the result of MCP server {self._label} is larger than {max_result_bytes} bytes"
        )

    def _failed(self, record: _Request, exc: MCPError) -> bool:
        """Whether ``exc`` says the session or its connection failed (not a server answer).

        ``CONNECTION_CLOSED`` is what the SDK answers a request whose session
        or stream ended (a stdio server that exited, a response stream that
        broke and could not be resumed).
        """
        import mcp_types as types

        return record.broken or record.rejected or exc.code == types.CONNECTION_CLOSED

    def _unreachable(self, live: _Live) -> Exception:
        """The safe error for a session that failed: what failed, never secrets."""
        if live.malformed is not None:
            return Malformed(f"MCP server {self._label} answered {live.malformed}")
        return self._lost(live)

    def _lost(self, live: _Live) -> Exception:
        from mcp.shared.exceptions import MCPError

        error = live.transport_error or live.error
        blocked = _find(error, DestinationBlocked)
        if blocked is not None:
            return DestinationBlocked(blocked.message, blocked.violations)
        resolution = _find(error, ResolutionFailed)
        if resolution is not None:
            why = resolution.message
        elif _find(error, httpx.TimeoutException) or _find(error, TimeoutError) is not None:
            why = "timed out"
        elif _find(error, httpx.ConnectError):
            why = "connection refused or failed"
        elif _find(error, httpx.HTTPError):
            why = "the connection broke"
        elif self._stdio is not None and _find(error, OSError) is not None:
            why = "the server process could not be started"
        elif _find(error, _OtherUrl) is not None:
            why = "it redirected to another URL, which is never followed"
        elif live.http_status is not None and live.http_status < 400:
            why = f"answered HTTP {live.http_status}, a redirect (redirects are never followed)"
        elif live.http_status is not None:
            why = f"answered HTTP {live.http_status}"
        elif _find(error, MCPError) or _find(error, ValidationError):
            why = "the MCP handshake failed"
        elif self._stdio is not None:
            why = "the server process exited"
        else:
            why = "the connection was lost"
        return Unreachable(f"MCP server {self._label} is unreachable: {why}")

    # -- the session -------------------------------------------------------------

    async def _session(self) -> tuple[_Live, ClientSession]:
        """The live session, opening one if there is none (bounded by connect_timeout_s)."""
        live = self._live
        if live is None or live.dead or live.session is None:
            if self._closed:
                raise Unreachable(f"MCP server {self._label}: the connector is closed")
            # In a worker thread: a second of importing on the loop would stall every
            # call this process serves, not only this one.
            await imported(*_SDK)
            async with self._lock:
                live = self._live
                if live is None or live.dead:
                    if live is not None:
                        self._retire(live)
                    live = self._start()
            await live.ready.wait()
        if live.session is None:
            self._retire(live)
            raise self._unreachable(live)
        return live, live.session

    def _start(self) -> _Live:
        live = _Live()
        self._live = live
        # The server may have changed its tools while no session was open.
        self._invalidate_tools()
        # The owner must not inherit a caller's request record.
        context = contextvars.copy_context()
        context.run(_REQUEST.set, None)
        task = asyncio.get_running_loop().create_task(self._own(live), context=context)
        self._owners.add(task)
        task.add_done_callback(self._owners.discard)
        return live

    def _retire(self, live: _Live) -> None:
        live.dead = True
        live.stop.set()
        if self._live is live:
            self._live = None

    async def _own(self, live: _Live) -> None:
        """Open the session, serve until told to stop or the connection ends, close it."""
        try:
            # Within the try: a session that cannot start fails its callers, never hangs them.
            import mcp_types as types
            from mcp.client.session import ClientSession

            async with contextlib.AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport(live))
                # Forward what the transport reads, to learn when it ends (a stdio
                # server that exited) instead of at the next request.
                inbox, session_read = anyio.create_memory_object_stream[Any](0)
                pumps = await stack.enter_async_context(anyio.create_task_group())
                stack.callback(pumps.cancel_scope.cancel)

                async def pump() -> None:
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                        async with inbox:
                            async for item in read:
                                if isinstance(item, Exception):
                                    # A line the SDK could not read as JSON-RPC (pydantic's
                                    # parser also stops at ~200 levels): the server is
                                    # broken, and a request it answered so would wait for
                                    # its timeout. The session ends; its requests fail now.
                                    live.malformed = "with a message that is not valid JSON-RPC"
                                    break
                                await inbox.send(item)
                    live.dead = True
                    live.stop.set()

                pumps.start_soon(pump)

                async def on_message(message: IncomingMessage) -> None:
                    if isinstance(message, types.ToolListChangedNotification):
                        self._tools_changed(live)

                session = await stack.enter_async_context(
                    ClientSession(
                        session_read, write, message_handler=on_message, client_info=_client_info()
                    )
                )
                with anyio.fail_after(self._connect_timeout_s):
                    await session.initialize()
                live.session = session
                live.ready.set()
                await live.stop.wait()
        except Exception as exc:  # noqa: BLE001 - any failure ends the session; callers map it
            live.error = exc
            log.debug(
                "MCP session ended",
                extra={"server": self._label, "error": type(exc).__name__},
            )
        finally:
            live.dead = True
            live.ready.set()

    @contextlib.asynccontextmanager
    async def _transport(self, live: _Live) -> AsyncIterator[tuple[Any, Any]]:
        from mcp.client.stdio import StdioServerParameters, stdio_client
        from mcp.client.streamable_http import streamable_http_client

        if self._stdio is not None:
            server = self._stdio
            parameters = StdioServerParameters(
                command=server.command[0],
                args=list(server.command[1:]),
                env=dict(server.env) or None,
                cwd=server.cwd,
            )
            # Spawning is quick; the handshake after it is bounded by connect_timeout_s.
            async with stdio_client(parameters) as streams:
                yield streams
            return
        if self._http is None:  # pragma: no cover - the constructor sets one of the two
            raise RuntimeError("no endpoint")
        async with contextlib.AsyncExitStack() as stack:
            client = http_client(
                self._egress,
                timeout_s=self._connect_timeout_s,
                headers=self._headers,
                timeout=httpx.Timeout(self._connect_timeout_s, read=_RESPONSE_IDLE_TIMEOUT_S),
            )
            stack.push_async_callback(client.aclose)
            bridge = _EgressBridge(client, live, self._max_message_bytes, self._http.url)
            sdk_client = await stack.enter_async_context(
                httpx2.AsyncClient(
                    transport=bridge,
                    # The SDK follows a same-origin redirect by itself, up to the
                    # client's max_redirects, whatever follow_redirects says: none.
                    follow_redirects=False,
                    max_redirects=0,
                    timeout=httpx2.Timeout(self._connect_timeout_s, read=_RESPONSE_IDLE_TIMEOUT_S),
                )
            )
            streams = await stack.enter_async_context(
                streamable_http_client(
                    self._http.url,
                    http_client=sdk_client,
                    max_sse_event_size=self._max_message_bytes,
                )
            )
            yield streams

    # -- the tool list cache -----------------------------------------------------

    def _invalidate_tools(self) -> None:
        self._tools = None
        self._tools_epoch += 1

    def _tools_changed(self, live: _Live) -> None:
        if live is not self._live:
            return
        self._invalidate_tools()
        if self._on_tools_changed is not None:
            try:
                self._on_tools_changed()
            except Exception:
                log.exception("on_tools_changed failed", extra={"server": self._label})


def _spec(tool: types.Tool) -> ToolSpec:
    title = tool.title or (tool.annotations.title if tool.annotations is not None else None)
    return ToolSpec(
        name=tool.name,
        description=tool.description or "",
        input_schema=tool.input_schema,
        title=title or "",
        output_schema=tool.output_schema,
    )


def _result(result: types.CallToolResult, max_result_bytes: int) -> ToolResult:
    import mcp_types as types

    parts: list[str] = []
    files: list[context_pb2.FileReference] = []
    size = 0
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        elif isinstance(block, types.ImageContent | types.AudioContent):
            found = _file(block.data, block.mime_type, f"{block.type}-{len(files) + 1}", block.type)
            files.append(found)
            parts.append(f"[{block.type}: {found.display_name}, {found.mime_type}]")
        elif isinstance(block, types.EmbeddedResource):
            resource = block.resource
            if isinstance(resource, types.TextResourceContents):
                # Text the model reads, as before; with a media type it is a
                # document too, stored like any file the tool returns.
                parts.append(resource.text)
                if resource.mime_type:
                    files.append(
                        context_pb2.FileReference(
                            inline_data=resource.text.encode(),
                            mime_type=resource.mime_type,
                            display_name=_file_name(
                                _resource_name(resource.uri, len(files) + 1), resource.mime_type
                            ),
                        )
                    )
            else:
                found = _file(
                    resource.blob,
                    resource.mime_type or "application/octet-stream",
                    _resource_name(resource.uri, len(files) + 1),
                    "resource",
                )
                files.append(found)
                parts.append(f"[resource: {found.display_name}, {found.mime_type}]")
        else:
            # Links to resources the server holds: nothing to store without reading them.
            parts.append(f"[{block.type} content]")
    text = "\n".join(parts)
    # Parsed by pydantic, which stops at about 200 levels: within what json.dumps and
    # the hub walk; its depth is the hub's to measure, for every connector
    # (tools._check_result).
    structured = result.structured_content
    size += len(text.encode()) + sum(len(found.inline_data) for found in files)
    if structured is not None:
        size += len(json.dumps(structured, separators=(",", ":")).encode())
    if size > max_result_bytes:
        raise ResultTooLarge(f"the tool's result is larger than {max_result_bytes} bytes")
    return ToolResult(
        structured=structured, text=text, is_error=bool(result.is_error), files=tuple(files)
    )


#: Characters kept of a file name a server gives (a resource URI's last segment).
_MAX_NAME_CHARS: Final = 200


def _file(data: str, mime_type: str, stem: str, kind: str) -> context_pb2.FileReference:
    """Base64 content as a file to store; Malformed when it is not base64."""
    try:
        content = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed(f"its tool answered with {kind} content that is not base64") from None
    return context_pb2.FileReference(
        inline_data=content, mime_type=mime_type, display_name=_file_name(stem, mime_type)
    )


#: Extensions of the types tools return most, where the platform's table has none or
#: an unusual one (``mimetypes`` knows ``audio/x-wav``, not ``audio/wav``).
_EXTENSIONS: Final = {
    "audio/wav": ".wav",
    "audio/mpeg": ".mp3",
    "audio/ogg": ".ogg",
    "audio/webm": ".webm",
    "audio/flac": ".flac",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "text/plain": ".txt",
    "text/markdown": ".md",
}


def _file_name(stem: str, mime_type: str) -> str:
    """``stem``, with the media type's extension when it has none."""
    kind = mime_type.split(";", 1)[0].strip().lower()
    extension = _EXTENSIONS.get(kind) or mimetypes.guess_extension(kind) or ""
    name = stem if "." in stem else stem + extension
    return name[:_MAX_NAME_CHARS]


def _resource_name(uri: object, position: int) -> str:
    """A resource's file name: its URI's last path segment, else ``resource-N``."""
    segment = urlsplit(str(uri)).path.rstrip("/").rsplit("/", 1)[-1]
    name = unquote(segment).strip()
    return (name or f"resource-{position}")[:_MAX_NAME_CHARS]
