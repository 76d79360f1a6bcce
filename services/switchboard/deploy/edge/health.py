"""``switchboard edge-health``: the answers the mesh's edge gives for the deployment as a whole.

Envoy routes by path, and health and reflection have one path each whatever
service they are about, so through Envoy they used to reach one cluster's
process, which knows only what it serves itself: ``grpcurl list`` showed the
dispatcher alone and ``Health/Check`` for the context service answered
NOT_FOUND. Envoy cannot merge answers from several clusters, so this small
server, which knows every service's replicas (the same list Envoy is rendered
from), answers both at the edge (decision 41 in docs/decisions.md):

- **Health per service across its replicas.** Every ``interval_s`` it asks each
  replica's own ``grpc.health.v1.Health/Check`` for each contract that replica
  serves, each call bounded by ``check_timeout_s``. A service name is SERVING
  while at least one replica says SERVING, NOT_SERVING otherwise (every replica
  down, stopped, draining or unreachable). ``""`` is the deployment: SERVING
  while every service is. Any other name is NOT_FOUND, as on one process. It
  keeps no state of its own: a restart asks again.
- **Reflection for every contract of the deployment**, served from the
  descriptors this package was generated with; calls still go to the services.

A DNS name among the replicas (a Kubernetes headless Service) is resolved at
every round, and each address it returns is a replica. Per-process probes are
unchanged: each process still answers for itself on its own port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.deploy.edge.contracts import API, OPTIONAL_API, served_by
from switchboard.platform import background
from switchboard.platform.observe.logging import configure_logging
from switchboard.platform.rpc.health import Health
from switchboard.platform.rpc.reflection import enable_reflection

log = logging.getLogger("switchboard.edgehealth")

EXIT_USAGE: Final = 2
HEALTH_SERVICE: Final = "grpc.health.v1.Health"
SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
#: A replica that comes back is found within about this long (gRPC's own backoff grows
#: to two minutes, which would hide it).
_RECONNECT_MAX_MS: Final = 1000


class UsageError(ValueError):
    """The command line does not describe a deployment."""


@dataclass(frozen=True)
class Address:
    """``HOST:PORT``; a DNS name stands for every address it resolves to."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, sep, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise UsageError(f"expected HOST:PORT, got {text!r}")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Deployment:
    """Each short service name of the deployment and its replicas."""

    replicas: Mapping[str, tuple[Address, ...]]

    def __post_init__(self) -> None:
        missing = sorted(set(API) - OPTIONAL_API - set(self.replicas))
        if missing:
            raise UsageError(f"no replicas for {', '.join(missing)}")
        unknown = sorted(set(self.replicas) - set(API))
        if unknown:
            raise UsageError(f"unknown services {', '.join(unknown)}; known: {', '.join(API)}")
        for name, addresses in self.replicas.items():
            if not addresses:
                raise UsageError(f"{name} has no replicas")

    @classmethod
    def parse(cls, entries: Sequence[str]) -> Deployment:
        """``NAME=HOST:PORT[,HOST:PORT...]`` entries, as ``switchboard envoy --service`` takes."""
        replicas: dict[str, tuple[Address, ...]] = {}
        for entry in entries:
            name, sep, addresses = entry.partition("=")
            if not sep or not addresses:
                raise UsageError(f"--service expects NAME=HOST:PORT[,HOST:PORT...], got {entry!r}")
            if name in replicas:
                raise UsageError(f"--service {name} given twice")
            replicas[name] = tuple(Address.parse(part) for part in addresses.split(","))
        return cls(replicas)

    def contracts(self) -> dict[str, tuple[str, ...]]:
        """Each short name's contracts (full names): its own service and its companions."""
        return {name: tuple(d.full_name for d in served_by(name)) for name in self.replicas}

    def names(self) -> list[str]:
        return [full for contracts in self.contracts().values() for full in contracts]


class EdgeHealth:
    """The aggregating health servicer and the rounds that feed it."""

    def __init__(
        self, deployment: Deployment, *, interval_s: float, check_timeout_s: float
    ) -> None:
        self.deployment = deployment
        self.interval_s = interval_s
        self.check_timeout_s = check_timeout_s
        self.servicer = Health()
        self._contracts = deployment.contracts()
        #: The last answer per name; None until the first round.
        self.status: dict[str, bool] = {}
        self._channels: dict[str, tuple[aio.Channel, health_pb2_grpc.HealthStub]] = {}
        #: Each short name's replica addresses at the last round (DNS names resolved).
        self._resolved: dict[str, list[str]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def round(self) -> None:
        """Ask every replica once and publish what changed."""
        results = await asyncio.gather(
            *(self._service(name, contracts) for name, contracts in self._contracts.items())
        )
        serving: dict[str, bool] = {}
        counts: dict[str, tuple[int, int]] = {}
        for found in results:
            for full, (up, total) in found.items():
                serving[full] = up > 0
                counts[full] = (up, total)
        serving[""] = all(serving.values())
        for name, up in serving.items():
            if self.status.get(name) == up:
                continue
            if name in self.status or not up:
                detail = f" ({counts[name][0]} of {counts[name][1]} replicas)" if name else ""
                log.info("%s is %s%s", name or "the deployment", _word(up), detail)
            self.status[name] = up
            await self.servicer.set(name, SERVING if up else NOT_SERVING)
        self._forget({address for found in self._resolved.values() for address in found})

    async def run(self, stop: asyncio.Event) -> None:
        """A round every ``interval_s`` until ``stop``; each round's checks run at once,
        each bounded by the check timeout, and the next round starts an interval after."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await stop.wait()
            if stop.is_set():
                return
            await self.round()

    async def close(self) -> None:
        await self.servicer.enter_graceful_shutdown()
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            await channel.close(None)

    async def _service(self, name: str, contracts: tuple[str, ...]) -> dict[str, tuple[int, int]]:
        addresses = await self._resolve(self.deployment.replicas[name])
        self._resolved[name] = addresses
        checks = await asyncio.gather(
            *(self._check(address, full) for address in addresses for full in contracts)
        )
        found: dict[str, tuple[int, int]] = {}
        for index, full in enumerate(contracts):
            answers = checks[index :: len(contracts)]
            found[full] = (sum(answers), len(addresses))
        return found

    async def _resolve(self, replicas: tuple[Address, ...]) -> list[str]:
        loop = asyncio.get_running_loop()
        addresses: list[str] = []
        for replica in replicas:
            try:
                async with asyncio.timeout(self.check_timeout_s):
                    infos = await loop.getaddrinfo(
                        replica.host, replica.port, type=socket.SOCK_STREAM
                    )
            except (OSError, TimeoutError) as exc:
                # No address (a headless Service with no ready pod): no replica serves.
                log.debug("cannot resolve %s: %s", replica, exc)
                continue
            for info in infos:
                found = str(Address(str(info[4][0]), replica.port))
                if found not in addresses:
                    addresses.append(found)
        return addresses

    async def _check(self, address: str, service: str) -> bool:
        stub = self._stub(address)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.check_timeout_s
            )
        except aio.AioRpcError:
            return False
        return bool(reply.status == SERVING)

    def _stub(self, address: str) -> health_pb2_grpc.HealthStub:
        if address not in self._channels:
            channel = aio.insecure_channel(
                address,
                options=[
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.min_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", _RECONNECT_MAX_MS),
                ],
            )
            self._channels[address] = (channel, health_pb2_grpc.HealthStub(channel))
        return self._channels[address][1]

    def _forget(self, current: set[str]) -> None:
        """Close channels to addresses no name resolves to any more (pods that left)."""
        for address in set(self._channels) - current:
            channel, _ = self._channels.pop(address)
            background.spawn(
                channel.close(None), name="edge-health-close", logger=log, keep=self._closing
            )


def _word(serving: bool) -> str:
    return "SERVING" if serving else "NOT_SERVING"


def run_edge_health(args: argparse.Namespace) -> int:
    try:
        deployment = Deployment.parse(args.service)
        listen = Address.parse(args.listen)
    except UsageError as exc:
        print(f"switchboard edge-health: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not 0 < args.interval <= 300 or not 0 < args.check_timeout <= 60:
        print(
            "switchboard edge-health: --interval must be in (0, 300] and --check-timeout "
            "in (0, 60]",
            file=sys.stderr,
        )
        return EXIT_USAGE
    configure_logging("INFO", args.log_format)
    edge = EdgeHealth(
        deployment,
        interval_s=args.interval,
        check_timeout_s=args.check_timeout,
    )
    try:
        return asyncio.run(_serve(edge, listen))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


async def serve(edge: EdgeHealth, listen: Address) -> tuple[aio.Server, int]:
    """The bound, started server; the first round has answered every name."""
    await edge.round()
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(edge.servicer, server)
    enable_reflection(server, [*edge.deployment.names(), HEALTH_SERVICE])
    port = server.add_insecure_port(str(listen))
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    return server, port


async def _serve(edge: EdgeHealth, listen: Address) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    # As ``switchboard serve`` does: a handler that outlives the loop.
    def on_signal(_signum: int, _frame: object) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        server, port = await serve(edge, listen)
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)  # noqa: TRY400 - one line, no traceback
        await edge.close()
        return EXIT_USAGE
    log.info(
        "switchboard edge-health listening",
        extra={"address": str(Address(listen.host, port)), "port": port},
    )
    try:
        await edge.run(stop)
    finally:
        await edge.close()
        await server.stop(1.0)
    return 0


__all__ = [
    "Address",
    "Deployment",
    "EdgeHealth",
    "UsageError",
    "run_edge_health",
    "serve",
]
