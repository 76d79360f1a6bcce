"""What the local OpenAI-compatible servers of the test kit share: HTTP/1.1 on a plain
asyncio socket server (keep-alive, a request head at a time), answered the way the
OpenAI API answers, and the life of such a server on loopback.

No web framework: a fake must answer exactly what it is told to, including the
malformed and the slow, and must close its connections when a test says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from typing import Any, Final, Self

#: Reason phrases of the statuses the fakes answer.
REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
MAX_HEADER_LINES: Final = 100


def openai_error(
    message: str,
    param: str | None = None,
    *,
    code: str | None = None,
    type_: str = "invalid_request_error",
) -> dict[str, Any]:
    """An error body as the OpenAI API sends it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def key_refusal(api_key: str | None, headers: dict[str, str]) -> str | None:
    """Why the API answers 401 to a request with these (lower-case) ``headers``, as its
    message says it (the key presented masked); None when ``api_key`` is not required
    or is the one presented."""
    given = headers.get("authorization", "")
    if api_key is None or given == f"Bearer {api_key}":
        return None
    presented = given.removeprefix("Bearer ")
    if not presented:
        return "You didn't provide an API key."
    return f"Incorrect API key provided: {presented[:3]}{'*' * 8}{presented[-4:]}."


async def read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]] | None:
    """The next request's method, path (without its query) and headers (lower-case
    names); None when the client closed the connection."""
    line = await reader.readline()
    if not line:
        return None
    method, path, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        raw = await reader.readline()
        if not raw:
            return None
        header = raw.decode("latin-1").rstrip("\r\n")
        if not header:
            break
        name, _, value = header.partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, path.split("?")[0], headers


async def send(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str,
    *,
    keep_alive: bool,
    headers: dict[str, str] | None = None,
) -> None:
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


async def send_json(
    writer: asyncio.StreamWriter,
    status: int,
    value: Any,
    *,
    keep_alive: bool,
    headers: dict[str, str] | None = None,
) -> None:
    body = json.dumps(value).encode()
    await send(writer, status, body, "application/json", keep_alive=keep_alive, headers=headers)


async def send_error(
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
    body = openai_error(message, param, code=code, type_=type_)
    await send_json(writer, status, body, keep_alive=keep_alive, headers=headers)


class LoopbackServer:
    """The life of a fake: ``async with`` (or ``start()``/``close()``), its ``port``
    and ``url``, and each connection served by the subclass's ``_one`` until it says
    the connection ends. A dataclass subclass declares the fields below."""

    host: str
    #: The port to listen on; 0 picks a free one, and a restart keeps the one picked.
    listen_port: int
    #: Bind with SO_REUSEPORT: several processes of one fake share a port (a benchmark's
    #: model that is more than one core's worth).
    reuse_port: bool = False
    _server: asyncio.Server | None
    _tasks: set[asyncio.Task[None]]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._connection, self.host, self.listen_port, reuse_port=self.reuse_port or None
        )
        self.listen_port = self.port

    async def close(self) -> None:
        """Stop serving: the port refuses connections until ``start()`` again (same port)."""
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
        """The base URL, ``http://<host>:<port>/v1``."""
        return f"http://{self.host}:{self.listen_port}/v1"

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection stays open."""
        raise NotImplementedError

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError, ValueError):
            pass  # the client went away, or close() ended the connection
        finally:
            self._tasks.discard(task)
            writer.close()
            # close() cancels this task: its wait for the socket to close is cut short too.
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


async def serve_until_signalled(fake: LoopbackServer) -> None:
    """The command line's life of a fake: its URL on stdout, then serving until
    SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with fake:
        print(fake.url, flush=True)
        await stop.wait()
