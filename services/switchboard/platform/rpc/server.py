"""Server assembly: one grpc.aio server with limits, health, reflection and the interceptor.

``build_server`` knows nothing about particular services: it takes
registrations. ``switchboard.mesh.create_server`` decides which services run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf.descriptor import ServiceDescriptor
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.platform import background
from switchboard.platform.config import ConfigError, KernelSettings
from switchboard.platform.observe.logging import quiet_client_cancellations, quiet_http_requests
from switchboard.platform.observe.metrics import Metrics, MetricsEndpoint
from switchboard.platform.observe.telemetry import Tracing
from switchboard.platform.process import Shared
from switchboard.platform.rpc.health import Health
from switchboard.platform.rpc.interceptors import ErrorInterceptor
from switchboard.platform.rpc.reflection import enable_reflection
from switchboard.platform.rpc.registration import register
from switchboard.platform.security.authn import Guard

log = logging.getLogger("switchboard.server")

HEALTH_SERVICE = "grpc.health.v1.Health"


def why_not_bound(host: str, port: int) -> str:
    """Why ``host:port`` cannot be listened on, in words (grpc only says "Failed to bind
    ... set GRPC_VERBOSITY=debug"): the same bind tried with a plain socket."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"the host {host!r} does not resolve ({exc.strerror or exc})"
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
            probe.listen()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "the address is already in use (another server listens on that port)"
        if exc.errno == errno.EACCES:
            return "permission denied (ports below 1024 need privileges)"
        if exc.errno == errno.EADDRNOTAVAIL:
            return "the host is not an address of this machine"
        return exc.strerror or str(exc)
    return "grpc could not bind it (GRPC_VERBOSITY=debug says why)"


class BindError(Exception):
    """The server could not listen on the requested address."""


@dataclass(frozen=True)
class ServiceRegistration:
    """One service to serve: its descriptor, the servicer, and the methods whose
    servicer answers with bytes it serialized itself (``platform/rpc/registration.py``)."""

    service: ServiceDescriptor
    servicer: object
    preserialized: frozenset[str] = frozenset()
    #: The servicer checks its requests' JSON depth and numbers itself
    #: (``registration.check_json``), to answer in its protocol's terms (A2A);
    #: otherwise registration does.
    checks_json_depth: bool = False
    #: Called with the bound port before the server starts (the dispatcher
    #: advertises where other replicas reach it).
    on_bound: Callable[[int], Awaitable[None]] | None = None
    #: Adds the service's readers to the process's metrics, when they are served.
    observe: Callable[[Metrics], None] | None = None

    @property
    def name(self) -> str:
        return self.service.full_name


def grpc_options(settings: KernelSettings) -> list[tuple[str, int]]:
    """Channel arguments enforcing the transport limits in ``settings``."""
    ms = 1000
    options = [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * ms)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * ms)),
        # Keepalive enforcement: a client pinging more often than this (with or
        # without calls in flight) earns strikes and is disconnected with
        # GOAWAY ENHANCE_YOUR_CALM after max_ping_strikes.
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            int(settings.keepalive_min_client_ping_interval_s * ms),
        ),
        ("grpc.http2.max_ping_strikes", settings.keepalive_max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_s * ms)),
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * ms)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * ms)),
        ]
    return options


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Longest advertised address (the lease's column).
MAX_ADVERTISE_CHARS = 300
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - compared, not bound


def advertise_address(settings: KernelSettings, port: int) -> str:
    """Where other replicas reach this process: ``SWITCHBOARD_ADVERTISE_ADDRESS``, else
    the bound host and ``port``, or the host name when bound to every address."""
    address = settings.advertise_address
    if not address:
        host = settings.host
        address = format_address(socket.gethostname() if host in _ANY_ADDRESS else host, port)
    if len(address) > MAX_ADVERTISE_CHARS:
        raise ConfigError(
            f"SWITCHBOARD_ADVERTISE_ADDRESS: at most {MAX_ADVERTISE_CHARS} characters"
        )
    return address


class SwitchboardServer:
    """A bound server: start it, stop it gracefully, wait for it."""

    def __init__(
        self,
        settings: KernelSettings,
        server: aio.Server,
        health: Health,
        port: int,
        service_names: Sequence[str],
        resources: contextlib.AsyncExitStack,
        shared: Shared | None = None,
    ) -> None:
        self.settings = settings
        self.grpc_server = server
        self.health = health
        self.port = port
        self.service_names = tuple(service_names)
        self._resources = resources
        self._stopped = asyncio.Event()
        self._stopping = False
        self._started = False
        self._components: dict[str, bool] = {}
        self._health_updates: set[asyncio.Task[None]] = set()
        self._shared = shared
        #: The process's metrics, and the bound port of their endpoint (0: not served).
        self.metrics: Metrics | None = None
        self.metrics_port = 0
        #: Times each component's entry turned NOT_SERVING (a metric's source).
        self.outages: dict[str, int] = {}

    @property
    def address(self) -> str:
        return format_address(self.settings.host, self.port)

    @property
    def shared(self) -> Shared:
        """The process's shared resources and built parts, for tests and tools."""
        if self._shared is None:
            raise RuntimeError("this server serves no process (built by build_server alone)")
        return self._shared

    async def start(self) -> None:
        await self.grpc_server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in self.service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._started = True
        for name, serving in self._components.items():
            await self.health.set(name, _status(serving))
        log.info(
            "switchboard listening",
            extra={
                "address": self.address,
                "port": self.port,
                "services": list(self.service_names),
                "metrics_port": self.metrics_port,
            },
        )

    def report(self, component: str, serving: bool) -> None:
        """Publish a dependency's state as its own health entry (``component``).

        The overall entry ("") stays SERVING: the process still answers, on its
        fallbacks. Operators and dashboards probe the component to see "degraded".
        """
        if not serving and self._components.get(component, True):
            self.outages[component] = self.outages.get(component, 0) + 1
        self._components[component] = serving
        if self._started and not self._stopping:
            background.spawn(
                self.health.set(component, _status(serving)),
                name=f"health-{component}",
                logger=log,
                keep=self._health_updates,
            )

    @property
    def components(self) -> dict[str, bool]:
        """Each reported component's health entry: serving or not."""
        return dict(self._components)

    async def shutdown(self, grace: float | None = None) -> None:
        """Health to NOT_SERVING, optional drain delay, refuse new calls, let
        in-flight calls finish within ``grace``, then close resources."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace_s = self.settings.shutdown_grace_s if grace is None else grace
        log.info("shutting down", extra={"grace_s": grace_s})
        await self.health.enter_graceful_shutdown()
        if self.settings.shutdown_drain_delay_s > 0:
            await asyncio.sleep(self.settings.shutdown_drain_delay_s)
        await self.grpc_server.stop(grace_s)
        await self._resources.aclose()
        log.info("stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def tune_gc(settings: KernelSettings) -> None:
    """Freeze what start-up allocated, apply the configured GC thresholds and the
    interpreter's switch interval.

    Every open stream keeps a few dozen long-lived objects, so with CPython's
    defaults a process holding thousands of subscribers spends a large share
    of its CPU in collections and pauses for hundreds of milliseconds
    (BENCHMARKS.md, "What the server's garbage collector costs"). Frozen
    objects are never scanned again; higher thresholds make collections rare.

    The switch interval is how long the event loop's thread may keep the
    interpreter while a database thread (or gRPC's poller) waits for it; each
    SQLite call hands it back and forth, so while the loop is busy a
    transaction waits about this long per statement (decision 34).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*settings.gc_threshold)
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    _large_buffers_to_the_os()


#: glibc's ``M_MMAP_THRESHOLD`` parameter of ``mallopt``, and the size from which
#: allocations are their own mappings (glibc's starting value).
_M_MMAP_THRESHOLD: Final = -3
_MMAP_FROM_BYTES: Final = 128 * 1024


def _large_buffers_to_the_os() -> None:
    """Keep buffers of 128 KiB and more (a file's 1 MiB chunks) in mappings of their own,
    so that a freed one goes back to the system at once.

    glibc starts so, but raises the threshold to the size of the first such buffer
    freed, after which 1 MiB chunks come from its arenas, one per thread, and are kept
    there: a 500 MiB upload grew the server's resident set by 35-53 MiB instead of a few
    (bench/files.py). Setting the threshold explicitly stops that adjustment. Other C
    libraries have no ``mallopt``; nothing changes there.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM_BYTES)


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    if serving:
        return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING


async def build_server(
    settings: KernelSettings,
    registrations: Sequence[ServiceRegistration],
    *,
    guard: Guard | None = None,
    resources: contextlib.AsyncExitStack | None = None,
    shared: Shared | None = None,
    tracing: Tracing | None = None,
    metrics: Metrics | None = None,
) -> SwitchboardServer:
    """Create, configure and bind the server (not started). Raises BindError.

    Without a ``guard`` no call is authenticated: only tests of the transport
    itself build servers that way. ``resources`` close at shutdown; ``shared``
    is kept on the server for tests and tools that need the process's objects.
    With ``tracing`` every call but health's gets a span; without it no
    tracing interceptor is installed at all.
    """
    resources = resources or contextlib.AsyncExitStack()
    quiet_client_cancellations()
    quiet_http_requests()
    interceptors: list[Any] = [ErrorInterceptor(guard, metrics=metrics)]
    if tracing is not None:
        # First, so outermost: the span is current while the error interceptor
        # runs, and the request id, the access line and the mapped status are
        # the span's. Health is left out (``telemetry._not_health``).
        interceptors.insert(0, tracing.server_interceptor())
    server = aio.server(
        interceptors=interceptors,
        options=grpc_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for registration in registrations:
        register(
            server,
            registration.service,
            registration.servicer,
            preserialized=registration.preserialized,
            check_json_depth=not registration.checks_json_depth,
        )
    names = [r.name for r in registrations]
    enable_reflection(server, [*names, HEALTH_SERVICE])
    address = format_address(settings.host, settings.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        why = why_not_bound(settings.host, settings.port)
        raise BindError(f"cannot listen on {address}: {why}")
    result = SwitchboardServer(settings, server, health, port, names, resources, shared)
    result.metrics = metrics
    if metrics is not None and settings.metrics_port is not None:
        # Its own port, bound now like the server's: a clash stops the start.
        metrics_address = format_address(settings.metrics_host, settings.metrics_port)
        try:
            endpoint = await MetricsEndpoint.open(
                metrics, settings.metrics_host, settings.metrics_port
            )
        except OSError as exc:
            raise BindError(f"cannot serve metrics on {metrics_address}: {exc}") from exc
        resources.push_async_callback(endpoint.close)
        result.metrics_port = endpoint.port
        log.info(
            "metrics listening",
            extra={
                "address": format_address(settings.metrics_host, endpoint.port),
                "metrics_port": endpoint.port,
            },
        )
    return result
