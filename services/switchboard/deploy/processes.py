"""The mesh's processes: how each kind starts, shows it is ready, restarts and stops.

The launcher treats every process alike (``Child``); a kind says only what is
its own: its command and environment, what "ready" means for it, and how it
stops. Ready means what its clients need, not that the process is alive:
PostgreSQL accepts a login, Redis answers PING, a service's gRPC health check
answers SERVING for its service name, Envoy's admin says LIVE after its first
round of health checks. Each check has its own timeout and the whole wait is
bounded, so a stuck process fails the start with its last lines instead of
hanging it.

A restarted process gets the port it had: Envoy's static clusters name it,
and its active health checks route around the gap meanwhile. Every child runs
in a session of its own (a terminal's Ctrl-C reaches only the launcher, which
stops them in order) with a parent-death signal. Redis writes with
``appendfsync always``: an acknowledged event survives. Output from every
process goes through one writer thread, so a slow terminal never stalls the
event loop that supervises them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import queue
import re
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol, TextIO

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

from switchboard.deploy.machine import (
    LOOPBACK,
    SUPERUSER,
    Layout,
    MeshError,
    Secrets,
    StartError,
    describe_exit,
    envoy_binary,
    free_port,
    postgres_bin_dir,
    postgres_owner,
    redis_server_binary,
)
from switchboard.deploy.ports import bind_failure
from switchboard.platform.observe.otelenv import OtelEnv

log = logging.getLogger("switchboard.mesh")

if TYPE_CHECKING:
    # envoy-data-plane is a heavy import: only the mesh and envoy commands pay for it.
    from switchboard.deploy.edge.envoy import EdgeSpec, HostPort

#: The database and its owner (the services connect as it).
DATABASE: Final = "switchboard"
DATABASE_USER: Final = "switchboard"
#: Extra lines for postgresql.conf on first run. Seven processes each keep a
#: pool, a lock connection and a probe: PostgreSQL's default 100 is too few.
POSTGRES_SETTINGS: Final = {
    "listen_addresses": f"'{LOOPBACK}'",
    "unix_socket_directories": "''",
    "max_connections": "300",
}

POLL_S: Final = 0.1  # between readiness checks
CHECK_TIMEOUT_S: Final = 1.0  # one readiness check (gRPC health, a connection)
#: edge-health's check of one replica: Envoy's own health check timeout (EdgeSpec).
EDGE_CHECK_TIMEOUT_S: Final = 2.0
ADMIN_TIMEOUT_S: Final = 30.0  # creating the role and the database
INITDB_TIMEOUT_S: Final = 120.0
ENVOY_STOP_S: Final = 10.0
STORE_STOP_S: Final = 30.0  # PostgreSQL's fast shutdown checkpoints; Redis fsyncs
KILL_WAIT_S: Final = 5.0  # after SIGKILL
SERVICE_STOP_MARGIN_S: Final = 10.0  # on top of the services' own shutdown grace
PUMP_DRAIN_S: Final = 2.0  # for a stopped process's last lines
PORT_ATTEMPTS: Final = 5
MAX_LINE_BYTES: Final = 64 * 1024
TAIL_LINES: Final = 30
OUTPUT_QUEUE: Final = 10_000
_LISTENING = re.compile(r"switchboard listening\b.*?\bport=(\d+)")
_EDGE_LISTENING = re.compile(r"switchboard edge-health listening\b.*?\bport=(\d+)")


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


class Host(Protocol):
    """What a process needs from the mesh that runs it (the launcher's ``Mesh`` is one;
    this module does not import the launcher, which imports it)."""

    @property
    def layout(self) -> Layout: ...
    @property
    def keys(self) -> Secrets: ...
    @property
    def output(self) -> Output: ...
    #: Every service's environment; set once PostgreSQL and Redis are up.
    @property
    def base_env(self) -> dict[str, str]: ...
    @property
    def shutdown_grace_s(self) -> float: ...
    @property
    def envoy_log_level(self) -> str: ...
    def guard(self, pdeathsig: signal.Signals, user: pwd.struct_passwd | None) -> list[str]: ...
    def say(self, text: str) -> None: ...
    def save_state(self) -> None: ...
    def context_for(self, index: int) -> Service: ...
    def dispatcher_for(self, index: int) -> Service: ...
    def edge_spec(self, bound: dict[str, HostPort]) -> EdgeSpec: ...
    def upstreams(self) -> dict[str, tuple[HostPort, ...]]: ...
    @property
    def health_interval_s(self) -> float: ...


class Child:
    """One supervised process: started, made ready, restarted on the same port, stopped."""

    kind: ClassVar[str]
    #: Stops it cleanly; also its parent-death signal.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, mesh: Host, name: str) -> None:
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
            try:
                self.on_line(text)
            except Exception:
                # The output must still be read (a full pipe would stop the process),
                # and the line shown; why it could not be handled is logged.
                log.exception("a line of a process's output could not be handled")
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

    async def poll_serving(
        self,
        listening: asyncio.Event,
        address: Callable[[], str],
        service: str,
        deadline: float,
        what: str,
    ) -> None:
        """Wait for the process's listening line, then for ``Health/Check(service)`` SERVING
        at ``address()``, read once the line has told the port."""

        async def listened() -> bool:
            return listening.is_set()

        await self.poll(listened, deadline, "its listening line")
        async with aio.insecure_channel(address()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                try:
                    reply = await stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=CHECK_TIMEOUT_S
                    )
                except aio.AioRpcError:
                    return False
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            await self.poll(serving, deadline, what)

    def last_lines(self) -> str:
        if not self.tail:
            return ""
        held = bind_failure(self.tail)
        return "; its last lines:\n  " + "\n  ".join(self.tail) + (f"\n{held}" if held else "")


class Postgres(Child):
    kind = "postgres"
    #: Fast shutdown: clients are disconnected, the cluster is checkpointed.
    stop_signal = signal.SIGINT

    def __init__(self, mesh: Host) -> None:
        super().__init__(mesh, "postgres")
        made_by = mesh.layout.pgdata / "PG_VERSION"
        # An existing cluster needs the major version that made it (pgserver's 16 comes
        # first for new ones, a cluster made by the system's 15 stays on 15).
        self.bin_dir = postgres_bin_dir(made_by.read_text().strip() if made_by.exists() else None)

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

    def __init__(self, mesh: Host) -> None:
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


#: A ``Service`` that runs every service: a whole-run process (``--processes``).
EVERY_SERVICE: Final = "all"


class Service(Child):
    """``switchboard serve --services NAME``: one replica of one service; with
    ``EVERY_SERVICE``, ``switchboard serve`` with them all, which serves a run whole
    (the dispatcher reads the context in its own process: no hop per run)."""

    kind = "service"

    def __init__(self, mesh: Host, name: str, service: str, index: int) -> None:
        super().__init__(mesh, name)
        self.service = service
        self.index = index
        from switchboard.mesh import SERVICES

        # Ready once it serves runs (a process builds every service before it listens).
        self.full_name = SERVICES["dispatcher" if service == EVERY_SERVICE else service][
            0
        ].full_name
        self._listening = asyncio.Event()
        #: Its metrics endpoint's bound port (0: not served), from its listening line.
        self.metrics_port = 0
        #: Its carriers' media-streams server's port (0: none; ``environment``).
        self.streams_port = 0

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
            *(() if self.service == EVERY_SERVICE else ("--services", self.service)),
        ]

    def environment(self) -> dict[str, str]:
        env = dict(self.mesh.base_env)
        # A dispatcher replica owns its runs by this id: stable across its restarts.
        env["SWITCHBOARD_INSTANCE_ID"] = self.name
        env.pop("SWITCHBOARD_CONTEXT_ADDRESS", None)
        env.pop("SWITCHBOARD_DISPATCHER_ADDRESS", None)
        if self.service in ("dispatcher", "a2a"):
            env["SWITCHBOARD_CONTEXT_ADDRESS"] = self.mesh.context_for(self.index).address
        if self.service == "a2a":
            env["SWITCHBOARD_DISPATCHER_ADDRESS"] = self.mesh.dispatcher_for(self.index).address
        telemetry = (
            "switchboard" if self.service == EVERY_SERVICE else f"switchboard-{self.service}"
        )
        env.update(telemetry_identity(env, telemetry, self.name))
        if env.get("SWITCHBOARD_METRICS_PORT", "").strip():
            # Every process serves its own metrics: one port for all would clash.
            env["SWITCHBOARD_METRICS_PORT"] = "0"
        if env.pop("SWITCHBOARD_STREAMS_LISTEN", "").strip() and self.service in (
            "dispatcher",
            EVERY_SERVICE,
        ):
            # Each dispatcher serves the carriers' media streams on a port of its own (one
            # for all would clash), the same across its restarts: Envoy's /telephony/
            # route names them all (launcher.Mesh.edge_spec).
            self.streams_port = self.streams_port or free_port()
            env["SWITCHBOARD_STREAMS_LISTEN"] = f"{LOOPBACK}:{self.streams_port}"
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
            self.metrics_port = _listening_port(text, "metrics_port")
            self._listening.set()

    async def wait_ready(self, deadline: float) -> None:
        await self.poll_serving(
            self._listening,
            lambda: self.address,
            self.full_name,
            deadline,
            f"SERVING for {self.full_name}",
        )

    def state(self) -> dict[str, Any]:
        return {
            **super().state(),
            "service": self.service,
            "instance_id": self.name,
            "address": self.address,
            "metrics_port": self.metrics_port,
        }


def telemetry_identity(env: dict[str, str], service_name: str, instance: str) -> dict[str, str]:
    """The OTEL_* a process adds to ``env`` to tell its telemetry apart: its own
    ``OTEL_SERVICE_NAME`` (``switchboard-dispatcher``; replicas share it) unless the user
    named the service, and its replica name as ``service.instance.id``. The rest of the
    OTEL_* variables (endpoint, sampler...) reach every process as the user set them."""
    otel = OtelEnv.read(env)
    attributes = otel.resource_attributes
    keys = otel.resource_keys()
    added: dict[str, str] = {}
    if not otel.service_name and "service.name" not in keys:
        added["OTEL_SERVICE_NAME"] = service_name
    if "service.instance.id" not in keys:
        instance_id = f"service.instance.id={instance}"
        added["OTEL_RESOURCE_ATTRIBUTES"] = (
            f"{attributes.rstrip(',')},{instance_id}" if attributes.strip() else instance_id
        )
    return added


def _listening_port(text: str, key: str = "port") -> int:
    """The port (or ``metrics_port``) in a ``switchboard listening`` log line, JSON or
    text; 0 if none."""
    if text.startswith("{"):
        try:
            entry = json.loads(text)
        except json.JSONDecodeError:
            return 0
        port = entry.get(key) if isinstance(entry, dict) else None
        return port if isinstance(port, int) else 0
    if key != "port":
        found = re.search(rf"\b{key}=(\d+)", text)
        return int(found.group(1)) if found else 0
    found = _LISTENING.search(text)
    return int(found.group(1)) if found else 0


class EdgeHealthServer(Child):
    """``switchboard edge-health``: health per service across its replicas and reflection
    for every service, which Envoy routes to it (``switchboard.deploy.edge.health``)."""

    kind = "edge-health"

    def __init__(self, mesh: Host) -> None:
        super().__init__(mesh, "edge-health")
        self._listening = asyncio.Event()

    def command(self) -> list[str]:
        replicas = [
            f"--service={name}={','.join(map(str, addresses))}"
            for name, addresses in self.mesh.upstreams().items()
        ]
        return [
            sys.executable,
            "-m",
            "switchboard.cli",
            "edge-health",
            # Free at first; then the same one, which Envoy's cluster names.
            f"--listen={LOOPBACK}:{self.port}",
            # As often as Envoy checks the replicas itself, and as patiently (a busy
            # replica answering late is not taken for a stopped one).
            f"--interval={self.mesh.health_interval_s:g}",
            f"--check-timeout={EDGE_CHECK_TIMEOUT_S:g}",
            "--log-format=text",
            *replicas,
        ]

    def stop_timeout_s(self) -> float:
        return ENVOY_STOP_S

    async def spawn(self) -> None:
        self._listening.clear()
        await super().spawn()

    def on_line(self, text: str) -> None:
        found = _EDGE_LISTENING.search(text)
        if found and not self._listening.is_set():
            self.port = int(found.group(1))
            self._listening.set()

    async def wait_ready(self, deadline: float) -> None:
        # The deployment as a whole: every service has a serving replica.
        await self.poll_serving(
            self._listening, lambda: self.address, "", deadline, "SERVING for the deployment"
        )

    def state(self) -> dict[str, Any]:
        return {**super().state(), "address": self.address}


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

    def __init__(self, mesh: Host) -> None:
        super().__init__(mesh, "envoy")
        self.binary = envoy_binary()
        self.config = mesh.layout.envoy / "envoy.yaml"
        self.admin_file = mesh.layout.envoy / "admin-address"
        #: The listeners' and admin's real addresses, once Envoy has bound them.
        self.bound: dict[str, HostPort] = {}

    def stop_timeout_s(self) -> float:
        return ENVOY_STOP_S

    def environment(self) -> dict[str, str]:
        # Its tracer's resource detector reads OTEL_RESOURCE_ATTRIBUTES.
        env = dict(self.mesh.base_env)
        env.update(telemetry_identity(env, "switchboard-envoy", self.name))
        return env

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
            self.mesh.envoy_log_level,
        ]

    async def spawn(self) -> None:
        from switchboard.deploy.edge.envoy import render

        spec = self.mesh.edge_spec(self.bound)
        self.config.write_text(render(spec))
        self.admin_file.unlink(missing_ok=True)
        await super().spawn()

    async def wait_ready(self, deadline: float) -> None:
        from switchboard.deploy.edge.envoy import PLAIN_LISTENER, TLS_LISTENER, HostPort

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
