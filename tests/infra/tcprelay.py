"""A TCP relay that a test can cut: every connection dropped at once, new ones refused for a
while, then accepted again; or pointed at another target (a restarted server).

It listens on 127.0.0.1, port 0 (the kernel picks a free port, nothing is raced), and
copies bytes both ways to its target, which it knows nothing about (TLS, HTTP/2 and gRPC
pass through unchanged). It runs its own asyncio loop in a daemon thread so synchronous
tests (a browser driven from a subprocess) can use it::

    with TcpRelay(envoy.tls_port) as relay:
        page_url = f"https://localhost:{relay.port}/"
        relay.cut(refuse=True)    # RST every open connection, RST new ones too
        ...                       # what happens while the network is gone
        relay.restore()           # accept again

A cut or a refused connection ends with a reset (SO_LINGER 0), as a lost network or a
rebooted peer looks to the client: no orderly FIN it could mistake for a closed stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from tests.conftest import CALL_DEADLINE_S

T = TypeVar("T")

CHUNK: Final = 65536


@dataclass
class RelayStats:
    accepted: int = 0
    refused: int = 0
    cut: int = 0


class _Pair:
    """One client connection and its connection to the target."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpRelay:
    """127.0.0.1:``port`` relayed to 127.0.0.1:``target_port``."""

    def __init__(self, target_port: int = 0, *, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.stats = RelayStats()
        self._refusing = False
        self._pairs: set[_Pair] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> TcpRelay:
        self._thread.start()
        self.port = self._call(self._listen())
        return self

    def cut(self, *, refuse: bool = False) -> int:
        """Reset every open connection (and, with ``refuse``, every new one until
        ``restore``). Returns how many connections were cut."""

        async def cut() -> int:
            self._refusing = refuse
            pairs = list(self._pairs)
            self._pairs.clear()
            for pair in pairs:
                pair.reset()
            self.stats.cut += len(pairs)
            return len(pairs)

        return self._call(cut())

    def restore(self) -> None:
        """Accept new connections again."""

        async def restore() -> None:
            self._refusing = False

        self._call(restore())

    def retarget(self, port: int) -> None:
        """Send new connections to ``port`` (open ones keep their target)."""

        async def retarget() -> None:
            self.target_port = port

        self._call(retarget())

    @property
    def open_connections(self) -> int:
        async def count() -> int:
            return len(self._pairs)

        return self._call(count())

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for pair in list(self._pairs):
                pair.reset()
            self._pairs.clear()
            # The connections' handlers end here, not when the stopped loop's tasks are
            # collected: that logged "Task was destroyed but it is pending!" at ERROR
            # into whichever test was running then.
            handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CALL_DEADLINE_S)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> TcpRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop's side ------------------------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CALL_DEADLINE_S)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing or not self.target_port:
            self.stats.refused += 1
            _reset(writer)
            return
        self.stats.accepted += 1
        pair = _Pair(writer)
        self._pairs.add(pair)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            self._pairs.discard(pair)
            _reset(writer)
            return
        pair.upstream = up_writer
        if pair not in self._pairs:  # cut while connecting
            pair.reset()
            return
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            if pair in self._pairs:
                self._pairs.discard(pair)
                for side in (writer, up_writer):
                    side.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
        # Half-close: the other direction may still be talking.
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError, RuntimeError):
        sink.transport.abort()
