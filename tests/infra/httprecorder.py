"""An HTTP server that records every request and answers from a table, in its own thread.

The security tests use it as what the hub must never reach (a schema's remote
``$ref``, a redirect's target) and as an endpoint that answers with a redirect;
the file tests as a URL a message names (a body streamed without a length).
It runs on threads of its own, not on the test's event loop: a client that
blocks the loop while it waits for an answer must still get one (and the test
must see that it asked).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Answer only once this is set (a slow server); after ``hold_s`` the server sets
    #: it itself and answers, so a test can tell the hold ran out.
    hold: threading.Event | None = None
    hold_s: float = 20.0
    #: Send the body with chunked transfer encoding (no length given up front),
    #: in pieces of this many bytes; 0: with a content-length.
    chunk_bytes: int = 0
    #: After the body's chunks, wait for this before ending the body (as ``hold``).
    hold_end: threading.Event | None = None


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class Recorder:
    """``url(path)`` answers ``routes[path]`` (404 otherwise); ``seen`` lists every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Reply] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                with recorder._lock:
                    recorder.seen.append(
                        Seen(
                            self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
                        )
                    )
                reply = recorder.routes.get(self.path.split("?", 1)[0], Reply(404))
                if reply.hold is not None and not reply.hold.wait(reply.hold_s):
                    reply.hold.set()
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.chunk_bytes:
                    self._chunked(reply)
                    return
                self.send_header("content-length", str(len(reply.body)))
                self.end_headers()
                # The client may go away before the body (a length over its limit).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(reply.body)

            def _chunked(self, reply: Reply) -> None:
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                try:
                    for start in range(0, len(reply.body), reply.chunk_bytes):
                        piece = reply.body[start : start + reply.chunk_bytes]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.flush()
                    if reply.hold_end is not None and not reply.hold_end.wait(reply.hold_s):
                        reply.hold_end.set()
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away mid-body, as a size limit makes it

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def do_DELETE(self) -> None:
                self._answer()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests_to(self, path: str) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if seen.path.split("?", 1)[0] == path]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@contextmanager
def recording() -> Iterator[Recorder]:
    recorder = Recorder()
    recorder.start()
    try:
        yield recorder
    finally:
        recorder.stop()
