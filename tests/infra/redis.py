"""A real ``redis-server`` for tests, with handles to break it on purpose.

Tests of the cache need the failures a fake cannot produce: a server that stops
answering while its sockets stay open (SIGSTOP), one that vanishes (SIGKILL),
and one that comes back on the same address (restart). ``RedisServer`` runs a
throwaway server on 127.0.0.1 with persistence off, in its own directory, and
``redis_server`` is the function-scoped fixture that always cleans it up.

``durable=True`` (fixture ``durable_redis_server``) turns on the append-only
file with ``appendfsync always``, as a deployment of the event log must: every
write Redis acknowledged survives a SIGKILL, and ``restart`` reloads it from
the same directory.

The methods are synchronous so that sync and async tests can use them alike;
``start`` and ``restart`` block only until the server answers PING (tens of
milliseconds).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import pytest

from tests.infra import processlogs

#: How long a fresh server may take to answer PING before we give up on it: a bound on
#: a hang, never a speed check (tests/conftest.py's CALL_DEADLINE_S; a plugin, this
#: module does not import conftest).
STARTUP_DEADLINE_S: Final = 60.0
#: How long ``stop`` waits for a clean exit before it escalates to SIGKILL.
STOP_DEADLINE_S: Final = 5.0
#: A random free port can be taken by someone else before redis binds it;
#: that race is retried with a new port this many times.
PORT_ATTEMPTS: Final = 5
#: Pause between readiness polls: short, so start-up costs what redis needs.
_POLL_INTERVAL_S: Final = 0.005
_BIND_COLLISION: Final = "Address already in use"


class RedisServerError(RuntimeError):
    """The test server could not be started or did not become ready."""


class _PortCollisionError(RedisServerError):
    """Another process owns the port we picked; try a different one."""


def find_redis_server() -> str | None:
    """The ``redis-server`` executable on PATH (or the Debian location), if any."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    fallback = "/usr/bin/redis-server"
    return fallback if os.access(fallback, os.X_OK) else None


def _free_port() -> int:
    # Binding port 0 lets the kernel choose a free port. It is released before
    # redis binds it, so another process may grab it in between; start()
    # detects that collision and retries with a new port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _server_pid(port: int, timeout_s: float) -> int | None:
    """The ``process_id`` of whatever redis answers on ``port``, or None if none answers.

    A raw RESP exchange keeps the helper free of client-library retry policies.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                data += chunk
            header, _, body = data.partition(b"\r\n")
            if not header.startswith(b"$"):
                # "-LOADING ..." or another error: not ready yet.
                return None
            length = int(header[1:])
            while len(body) < length:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                body += chunk
    except OSError:
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 in its own directory.

    Persistence is off unless ``durable``: then every acknowledged write is in
    the append-only file (fsync per write) before Redis answers.
    """

    def __init__(
        self,
        executable: str,
        directory: Path | None = None,
        *,
        durable: bool = False,
        extra_args: Sequence[str] = (),
        free_port: Callable[[], int] = _free_port,
    ) -> None:
        self._executable = executable
        self._durable = durable
        # A cluster node's options, and its port picker (its bus port is port + 10000).
        self._extra_args = tuple(extra_args)
        self._free_port = free_port
        self._owns_directory = directory is None
        self._directory = (
            Path(tempfile.mkdtemp(prefix="redis-test-")) if directory is None else directory
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._paused = False

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("the server has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    def start(self) -> None:
        """Start on a free port, retrying if another process takes the port first."""
        if self.running:
            raise RedisServerError("the server is already running")
        last_error: RedisServerError | None = None
        for _ in range(PORT_ATTEMPTS):
            try:
                self._launch(self._free_port())
                return
            except _PortCollisionError as exc:
                last_error = exc
        raise RedisServerError(
            f"no free port after {PORT_ATTEMPTS} attempts: {last_error}"
        ) from last_error

    def restart(self) -> None:
        """Start again on the same port (after ``kill`` or ``stop``), so clients can reconnect."""
        if self.running:
            raise RedisServerError("restart() needs a stopped server; call kill() or stop() first")
        port = self.port
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            try:
                self._launch(port)
                return
            except _PortCollisionError:
                # The port cannot change here, so a collision can only be waited out
                # (for example a client socket still being torn down).
                if time.monotonic() >= deadline:
                    raise
                time.sleep(_POLL_INTERVAL_S)

    def pause(self) -> None:
        """SIGSTOP: sockets stay open, nothing is answered (a hung or partitioned server)."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT: the server answers again, including whatever queued up meanwhile."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def kill(self) -> None:
        """SIGKILL and reap: the server vanishes and its connections are reset."""
        process = self._require_process()
        process.kill()
        process.wait()
        self._paused = False

    def stop(self) -> None:
        """Terminate cleanly (escalating to SIGKILL) and remove the directory. Idempotent."""
        process = self._process
        if process is not None and process.poll() is None:
            if self._paused:
                # A stopped process does not act on SIGTERM until it is continued.
                process.send_signal(signal.SIGCONT)
                self._paused = False
            process.terminate()
            try:
                process.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._paused = False
        if self._owns_directory:
            shutil.rmtree(self._directory, ignore_errors=True)

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            raise RedisServerError("the server is not running")
        return self._process

    def _signal(self, signum: signal.Signals) -> None:
        self._require_process().send_signal(signum)

    def _launch(self, port: int) -> None:
        # Each start's own file, outside the directory ``stop`` removes: kept if the test
        # that owns it fails (tests/infra/processlogs.py).
        log_path = processlogs.log_file(f"redis-{port}")
        command = [
            self._executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            *(
                ("--appendonly", "yes", "--appendfsync", "always")
                if self._durable
                else ("--appendonly", "no")
            ),
            "--dir",
            str(self._directory),
            "--logfile",
            str(log_path),
            "--daemonize",
            "no",
            *self._extra_args,
        ]
        # A new session keeps a terminal's Ctrl-C away from the server, so the
        # fixture's teardown is the only thing that stops it.
        # stderr goes to a file, not a pipe: nobody drains a pipe after start-up. The log's
        # own (both append, so neither overwrites the other).
        with log_path.open("ab") as stderr:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            self._wait_ready(process, port, log_path)
        except BaseException:
            if process.poll() is None:
                process.kill()
            process.wait()
            raise
        self._process = process
        self._port = port
        self._paused = False

    @staticmethod
    def _wait_ready(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        # Poll until *this* process answers: comparing INFO's process_id guards
        # against a different server that already owned the port.
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            if process.poll() is not None:
                details = log_path.read_text(errors="replace").strip() if log_path.exists() else ""
                if _BIND_COLLISION in details:
                    raise _PortCollisionError(f"port {port} is taken")
                raise RedisServerError(
                    f"redis-server exited with code {process.returncode} on port {port}:\n{details}"
                )
            owner = _server_pid(port, timeout_s=0.2)
            if owner == process.pid:
                return
            if owner is not None:
                # Someone else answers on our port; ours will fail to bind and exit.
                process.kill()
                process.wait()
                raise _PortCollisionError(f"port {port} is served by pid {owner}")
            if time.monotonic() >= deadline:
                raise RedisServerError(
                    f"redis-server on port {port} not ready after {STARTUP_DEADLINE_S}s"
                )
            time.sleep(_POLL_INTERVAL_S)


def _fixture_server(
    tmp_path_factory: pytest.TempPathFactory, *, durable: bool
) -> Iterator[RedisServer]:
    executable = find_redis_server()
    if executable is None:
        pytest.fail(
            "redis-server is required for this test but was not found on PATH or at "
            "/usr/bin/redis-server; install it (e.g. `apt-get install redis-server`).",
            pytrace=False,
        )
    server = RedisServer(executable, tmp_path_factory.mktemp("redis"), durable=durable)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A started, private ``redis-server``; stopped afterwards even if paused or killed.

    A missing ``redis-server`` fails the test: skipping would silently drop the
    failure-mode coverage these tests exist for.
    """
    yield from _fixture_server(tmp_path_factory, durable=False)


@pytest.fixture
def durable_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Like ``redis_server``, with the append-only file on (``appendfsync always``):
    what Redis acknowledged survives ``kill`` and is back after ``restart``."""
    yield from _fixture_server(tmp_path_factory, durable=True)
