"""``switchboard edge-health`` against real gRPC replicas: health per service across its
replicas, the deployment as ``""``, and reflection for every contract.

Each replica is a grpc.aio server on a free port with the standard health servicer,
set by the test as a real process would set it; a stopped server is a replica gone.
Changes are awaited on a ``Watch`` stream of the aggregator (no sleeps).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from grpc import StatusCode, aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from switchboard.deploy.edge.contracts import API, served_by
from switchboard.deploy.edge.health import Address, Deployment, EdgeHealth, serve
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import tool

pytestmark = pytest.mark.service

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Replica:
    """One process of a short service name: its health servicer and its server."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.health = HealthServicer()
        self.server = aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def start(self) -> None:
        await self.server.start()
        for descriptor in served_by(self.name):
            await self.health.set(descriptor.full_name, SERVING)

    async def set(self, serving: bool) -> None:
        for descriptor in served_by(self.name):
            await self.health.set(descriptor.full_name, SERVING if serving else NOT_SERVING)


@asynccontextmanager
async def deployment(
    counts: dict[str, int],
) -> AsyncIterator[tuple[dict[str, list[Replica]], str]]:
    replicas = {name: [Replica(name) for _ in range(count)] for name, count in counts.items()}
    for group in replicas.values():
        for replica in group:
            await replica.start()
    edge = EdgeHealth(
        Deployment(
            {
                name: tuple(Address("127.0.0.1", r.port) for r in group)
                for name, group in replicas.items()
            }
        ),
        interval_s=0.1,
        check_timeout_s=0.1,
    )
    server, port = await serve(edge, Address("127.0.0.1", 0))
    stop = asyncio.Event()
    rounds = asyncio.create_task(edge.run(stop))
    try:
        yield replicas, f"127.0.0.1:{port}"
    finally:
        stop.set()
        await rounds
        await edge.close()
        await server.stop(None)
        for group in replicas.values():
            for replica in group:
                await replica.server.stop(None)


Watch = aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


async def check(channel: aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_DEADLINE_S
    )
    return int(reply.status)


async def watch_until(watch: Watch, status: int) -> None:
    async with asyncio.timeout(CALL_DEADLINE_S):
        async for reply in watch:
            if reply.status == status:
                return
    raise AssertionError(f"the watch ended before {status}")


MESH = {"auth": 1, "context": 1, "dispatcher": 2, "integration": 1, "events": 2, "a2a": 1}


async def test_each_service_is_serving_while_one_replica_is() -> None:
    async with deployment(MESH) as (replicas, address), aio.insecure_channel(address) as channel:
        for name in API:
            for descriptor in served_by(name):
                assert await check(channel, descriptor.full_name) == SERVING
        assert await check(channel, "") == SERVING

        events = API["events"].full_name
        stub = health_pb2_grpc.HealthStub(channel)
        watch_events = stub.Watch(health_pb2.HealthCheckRequest(service=events))
        watch_all = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        await watch_until(watch_events, SERVING)
        await watch_until(watch_all, SERVING)

        # One of two replicas draining: the service still serves.
        await replicas["events"][0].set(False)
        # The other one gone too (its server stopped): nobody serves it.
        await replicas["events"][1].server.stop(None)
        await watch_until(watch_events, NOT_SERVING)
        await watch_until(watch_all, NOT_SERVING)
        assert await check(channel, events) == NOT_SERVING
        # ...and only it: every other service is still answered SERVING.
        for name in set(API) - {"events"}:
            assert await check(channel, API[name].full_name) == SERVING

        # A replica that serves again brings the name (and the deployment) back.
        await replicas["events"][0].set(True)
        await watch_until(watch_events, SERVING)
        await watch_until(watch_all, SERVING)
        watch_events.cancel()
        watch_all.cancel()


async def test_a_name_the_deployment_does_not_have_is_not_found() -> None:
    without_a2a = {name: count for name, count in MESH.items() if name != "a2a"}
    async with deployment(without_a2a) as (_, address), aio.insecure_channel(address) as channel:
        for unknown in ("switchboard.api.nope.v1.Nope", API["a2a"].full_name):
            with pytest.raises(aio.AioRpcError) as refused:
                await check(channel, unknown)
            assert refused.value.code() == StatusCode.NOT_FOUND
            assert repr(unknown) in (refused.value.details() or "")
            assert API["context"].full_name in (refused.value.details() or "")
        assert await check(channel, "") == SERVING


async def test_reflection_lists_every_service_of_the_deployment() -> None:
    async with deployment(MESH) as (_, address):
        grpcurl = tool("grpcurl")
        listed = await asyncio.to_thread(
            subprocess.run,
            [grpcurl, "-plaintext", address, "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        expected = {d.full_name for name in API for d in served_by(name)} | {
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        assert set(listed.stdout.split()) == expected
        described = await asyncio.to_thread(
            subprocess.run,
            [grpcurl, "-plaintext", address, "describe", API["context"].full_name],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert "rpc CreateWorkspace" in described.stdout
