"""``switchboard mesh``: the scaled-out shape on one machine, from its own binaries.

One command runs what a deployment runs, each part a process of its own, so
the mesh shape can be tried and tested without containers: PostgreSQL and
Redis with their files in a data directory, ``switchboard migrate`` once, one
``switchboard serve --services NAME`` per replica (auth, context, integration,
two events, two dispatchers by default) on free loopback ports, and Envoy in
front with the configuration ``switchboard.deploy.edge.envoy`` renders for the mesh
shape. This module is the command and the order of things; what it promises:

- **Like production, never dev mode**: the services get the mesh's secrets,
  PostgreSQL, Redis and Envoy as their trusted proxy.
- **Health-gated start**: a process starts once what it needs is ready
  (bounded by ``--start-timeout``). Dispatchers wait for the context service
  they call; Envoy starts last, and one line says where to connect.
- **Supervision**: a process that exits unexpectedly is started again on the
  same port, with exponential backoff and at most ``--max-restarts`` failures
  in a row; past that the mesh stops with exit code 1.
- **The state file** (``mesh.json`` in the data directory) names every process,
  its pid, port and status, and Envoy's URLs; it is rewritten on every change.
- **Stopping**: SIGINT, SIGTERM or SIGHUP stop Envoy first, then the
  dispatchers and the other services (SIGTERM: they drain), then Redis and
  PostgreSQL (fast shutdown), each bounded by a timeout and then SIGKILL; the
  exit code is 0.

The processes themselves are in ``switchboard.deploy.processes``; the data
directory, the secrets and the binaries in ``switchboard.deploy.machine``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import pwd
import shutil
import signal
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from switchboard.deploy.machine import (
    LOOPBACK,
    Layout,
    MeshError,
    Secrets,
    StartError,
    describe_exit,
    ensure_secrets,
    guard,
)
from switchboard.deploy.ports import Wanted, check_free
from switchboard.deploy.processes import (
    EVERY_SERVICE,
    Child,
    EdgeHealthServer,
    Envoy,
    Migrate,
    Output,
    Postgres,
    Redis,
    Service,
)
from switchboard.platform.observe.otelenv import OtelEnv
from switchboard.platform.resilience import backoff
from switchboard.platform.values import names

# envoy-data-plane is a heavy import: only the mesh and envoy commands pay for it.
if TYPE_CHECKING:
    from switchboard.deploy.edge.envoy import EdgeSpec, HostPort

EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

#: Replicas per service unless ``--replicas NAME=N`` says otherwise.
DEFAULT_REPLICAS: Final = {
    "auth": 1,
    "context": 1,
    "integration": 1,
    "events": 2,
    "dispatcher": 2,
    "a2a": 1,
}
MAX_REPLICAS: Final = 16
#: ``--processes``: the same bound (each process holds up to 10 of PostgreSQL's 300
#: connections, and more processes than cores take turns on them).
MAX_PROCESSES: Final = MAX_REPLICAS
BACKOFF_S: Final = 0.5
BACKOFF_MAX_S: Final = 10.0
#: A process that served this long has its failures forgotten.
STABLE_S: Final = 60.0
_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
        # Envoy starts last: a port it cannot have must stop the mesh before the rest starts.
        check_free(options.fixed_ports())
        keys = ensure_secrets(layout)
    except MeshError as exc:
        lock.close()
        print(f"switchboard mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    names = [
        "mesh",
        "postgres",
        "redis",
        "migrate",
        "edge-health",
        "envoy",
        *options.replica_names(),
    ]
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


# Options.


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
    console: Path | None = None
    #: Whole-run processes (``--processes``); 0: one process per service (``replicas``).
    processes: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        from switchboard.deploy.edge.envoy import API, HostPort, SpecError, bootstrap

        processes = _processes(
            getattr(args, "processes", None), oversubscribe=getattr(args, "oversubscribe", False)
        )
        if processes and args.replicas:
            raise MeshError(
                "--processes runs every service in each process and --replicas sizes one "
                "process per service: give one of them"
            )
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
                console=args.console.expanduser().resolve() if args.console else None,
                processes=processes,
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

    def fixed_ports(self) -> list[Wanted]:
        """The ports the mesh binds by number (every other one is picked free)."""
        wanted = [
            Wanted(self.listen.host, self.listen.port, "Envoy's listener", "--listen"),
            Wanted(self.admin.host, self.admin.port, "Envoy's admin interface", "--admin"),
        ]
        if self.tls_listen is not None:
            wanted.append(
                Wanted(
                    self.tls_listen.host,
                    self.tls_listen.port,
                    "Envoy's TLS listener",
                    "--tls-listen",
                )
            )
        return wanted

    def replica_names(self) -> list[str]:
        return [name for _, name, _ in self.service_processes()]

    def service_processes(self) -> list[tuple[str, str, int]]:
        """Each ``switchboard serve`` process: what it serves (a service's short name, or
        ``EVERY_SERVICE``), its name (``events-2``, ``switchboard-1``) and its number."""
        if self.processes:
            return [
                (EVERY_SERVICE, f"switchboard-{index}", index)
                for index in range(1, self.processes + 1)
            ]
        return [
            (service, name, index)
            for service in self.replicas
            for name, index in self.replicas_of(service)
        ]

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
        """Envoy's spec; ``bound`` holds the listeners' real ports once Envoy has run.

        The console's directory is read here, each time: a rebuilt console is what
        a restarted Envoy serves.
        """
        from switchboard.deploy.edge.envoy import (
            ENVOY_SERVICE_NAME,
            Console,
            EdgeSpec,
            ServerLimits,
            Tls,
            Tracing,
        )

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
            console=Console.from_directory(self.console) if self.console else None,
            # The OTEL_* variables the services get: Envoy joins their traces.
            tracing=Tracing.from_environment(
                environ, service_name=OtelEnv.read(environ).service_name or ENVOY_SERVICE_NAME
            ),
        )


# The mesh.


class Mesh:
    """Every process of the mesh: started in order, supervised, stopped in reverse."""

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
            for service, name, index in options.service_processes()
        ]
        self.edge_health = EdgeHealthServer(self)
        self.envoy = Envoy(self)

    # Shared by the processes.

    def guard(self, pdeathsig: signal.Signals, user: pwd.struct_passwd | None) -> list[str]:
        return guard(pdeathsig, user, setpriv=self._setpriv)

    def say(self, text: str) -> None:
        self.output.line("mesh", text)

    def replicas(self, service: str) -> list[Service]:
        """The processes that serve ``service``: its own replicas, or every whole-run one."""
        return [child for child in self.services if child.service in (service, EVERY_SERVICE)]

    def dispatcher_for(self, index: int) -> Service:
        """The dispatcher replica a2a front door number ``index`` calls (spread over them;
        a call for a run another replica owns is forwarded there)."""
        dispatchers = self.replicas("dispatcher")
        return dispatchers[(index - 1) % len(dispatchers)]

    def context_for(self, index: int) -> Service:
        """The context replica dispatcher number ``index`` calls (spread over them)."""
        contexts = self.replicas("context")
        return contexts[(index - 1) % len(contexts)]

    def upstreams(self) -> dict[str, tuple[HostPort, ...]]:
        from switchboard.deploy.edge.envoy import HostPort

        return {
            service: tuple(HostPort(LOOPBACK, child.port) for child in self.replicas(service))
            for service in self.options.replicas
        }

    @property
    def envoy_log_level(self) -> str:
        return self.options.envoy_log_level

    @property
    def health_interval_s(self) -> float:
        return self.options.health_interval_s

    def edge_spec(self, bound: dict[str, HostPort]) -> EdgeSpec:
        """Envoy's spec for this mesh; ``bound``: the listeners' real ports once it ran."""
        from switchboard.deploy.edge.envoy import HostPort

        spec = self.options.edge_spec(self.upstreams(), self.base_env, self.certificate, bound)
        # The carriers' media streams, where the dispatchers serve them (processes.py).
        telephony = tuple(
            HostPort(LOOPBACK, child.streams_port)
            for child in self.replicas("dispatcher")
            if child.streams_port
        )
        # Health and reflection for the whole deployment (started before Envoy).
        return dataclasses.replace(
            spec, edge_health=HostPort(LOOPBACK, self.edge_health.port), telephony=telephony
        )

    def children(self) -> list[Child]:
        return [self.postgres, self.redis, *self.services, self.edge_health, self.envoy]

    def save_state(self) -> None:
        """``mesh.json``, replaced whole: a reader never sees half of it."""
        state = {
            "launcher_pid": os.getpid(),
            "state": self.state,
            "failure": self.failure or None,
            "data_dir": str(self.layout.root),
            "edge": self.envoy.urls(),
            "processes": {child.name: child.state() for child in self.children()},
            "updated": names.now().isoformat(timespec="milliseconds"),
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
        # Dispatchers call the context service: they start once it serves; the a2a
        # front door calls both, once the dispatchers serve (their ports known). A
        # whole-run process calls neither: they all start at once.
        later = {"dispatcher", "a2a"}
        first = [child for child in self.services if child.service not in later]
        await together(*(self._launch(child) for child in first))
        for service in ("dispatcher", "a2a"):
            own = [child for child in self.services if child.service == service]
            await together(*(self._launch(child) for child in own))
        await self._launch(self.edge_health)
        await self._launch(self.envoy)
        self.state = "ready"
        self.save_state()
        urls = self.envoy.urls()
        tls = f", TLS (HTTP/2 for browsers) at {urls['tls_url']}" if urls["tls_url"] else ""
        if self.options.console is not None:
            tls += f"; the console at {urls['tls_url'] or urls['url']}/"
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
            delay = backoff.ceiling(failures - 1, base_s=BACKOFF_S, max_s=BACKOFF_MAX_S)
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
        await self.edge_health.stop()
        await together(*(child.stop() for child in self.replicas("dispatcher")))
        await together(*(child.stop() for child in self.services))
        await together(self.redis.stop(), self.postgres.stop())
        self.state = "failed" if self.failure else "stopped"
        self.save_state()
        self.say("stopped" if not self.failure else f"stopped after a failure: {self.failure}")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container's cpuset
    sets it), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _processes(text: str | None, *, oversubscribe: bool = False) -> int:
    """``--processes``: 0 when not given; ``auto`` is one per usable core. More than the
    usable cores only with ``--oversubscribe`` (a benchmark's CPU per run with processes
    waiting their turn for a core, issue 80), never more than ``MAX_PROCESSES``."""
    if text is None:
        return 0
    cores = usable_cores()
    most = MAX_PROCESSES if oversubscribe else min(cores, MAX_PROCESSES)
    if text.strip().lower() == "auto":
        return max(1, most)
    if not text.strip().isdigit():
        raise MeshError(f"--processes expects a number or auto, got {text!r}")
    count = int(text)
    if count < 1:
        raise MeshError("--processes must be at least 1")
    if count > most:
        if oversubscribe:
            raise MeshError(f"--processes {count}: at most {most}")
        raise MeshError(
            f"--processes {count} is more than the {cores} core(s) this launcher may use "
            f"(at most {most}): a process is one interpreter, one core at most, and more "
            "processes than cores take turns on them, each costing its share "
            "(--oversubscribe allows it, to measure that cost)"
        )
    return count


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

    from switchboard.deploy.edge.devcert import make_dev_cert

    cert, key = directory / "dev-cert.pem", directory / "dev-key.pem"
    if cert.exists() and key.exists():
        expires = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
        if expires - names.now() > dt.timedelta(days=1):
            return cert, key
    made = make_dev_cert(directory, force=True)
    return made.cert_file, made.key_file


__all__ = [
    "DEFAULT_REPLICAS",
    "Mesh",
    "Options",
    "run_mesh",
]
