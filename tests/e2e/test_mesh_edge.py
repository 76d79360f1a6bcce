"""The mesh's edge answers like one server: ``switchboard mesh`` driven with grpcurl and
grpc-health-probe through its Envoy only.

- ``grpcurl list`` shows every service of the deployment (the five, the A2A front door
  and its card, health and reflection), ``describe`` a service the dispatcher's process
  does not serve, and a call to it works;
- ``grpc-health-probe -service NAME`` answers SERVING for every service name and for
  ``""``; with the context service's replica stopped (SIGSTOP: it still holds its port
  and answers nothing) its name turns NOT_SERVING, and so does ``""``, while every
  other name stays SERVING; resumed (SIGCONT), it is SERVING again.

The turns are awaited on a ``Health/Watch`` stream through the edge, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.deploy.edge.contracts import API, served_by
from tests.e2e.procs import tool
from tests.e2e.test_mesh import READY_TIMEOUT_S, MeshProcess, data_dir
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

__all__ = ["data_dir"]  # the fixture, shared with test_mesh.py

CALL_TIMEOUT_S = 30.0
TURN_TIMEOUT_S = 30.0
#: grpc-health-probe's exit codes (its README): SERVING, and a status other than SERVING.
PROBE_SERVING = 0
PROBE_UNHEALTHY = 4
REFLECTION = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("grpcurl"), "-plaintext", *args],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )


def probe(edge: str, service: str) -> int:
    done = subprocess.run(
        [
            tool("grpc-health-probe"),
            f"-addr={edge}",
            f"-service={service}",
            f"-connect-timeout={CALL_TIMEOUT_S:g}s",
            f"-rpc-timeout={CALL_TIMEOUT_S:g}s",
        ],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S * 3,
        check=False,
    )
    return done.returncode


Watch = aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


async def turns(watch: Watch, status: int) -> None:
    """Reads ``watch`` until it says ``status``."""
    async with asyncio.timeout(TURN_TIMEOUT_S):
        async for reply in watch:
            if reply.status == status:
                return
    raise AssertionError(f"the watch ended before {status}")


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def test_the_edge_lists_every_service_and_answers_health_per_service(
    data_dir: Path,
) -> None:
    with MeshProcess(data_dir) as mesh:
        await asyncio.to_thread(
            mesh.wait_line,
            lambda line: line.startswith("mesh ") and "| ready:" in line,
            READY_TIMEOUT_S,
        )
        state = mesh.state()
        edge = state["edge"]["grpc"]
        contracts = {name: [d.full_name for d in served_by(name)] for name in API}

        listed = await asyncio.to_thread(grpcurl, edge, "list")
        assert listed.returncode == 0, listed.stderr
        assert set(listed.stdout.split()) == {
            *(full for names in contracts.values() for full in names),
            *REFLECTION,
        }
        context = API["context"].full_name
        described = await asyncio.to_thread(grpcurl, edge, "describe", context)
        assert described.returncode == 0, described.stderr
        assert "rpc CreateWorkspace" in described.stdout
        registered = await asyncio.to_thread(
            grpcurl,
            "-d",
            json.dumps({"email": unique_email(), "password": PASSWORD}),
            edge,
            f"{API['auth'].full_name}/Register",
        )
        assert registered.returncode == 0, registered.stderr
        token = json.loads(registered.stdout)["tokens"]["access_token"]
        created = await asyncio.to_thread(
            grpcurl,
            "-H",
            f"authorization: Bearer {token}",
            "-d",
            json.dumps({"workspace": {"displayName": "Edge"}}),
            edge,
            f"{context}/CreateWorkspace",
        )
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["workspace"]["display_name"] == "Edge"

        every_name = ["", *(full for names in contracts.values() for full in names)]
        codes = await asyncio.gather(*(asyncio.to_thread(probe, edge, name) for name in every_name))
        assert dict(zip(every_name, codes, strict=True)) == dict.fromkeys(every_name, PROBE_SERVING)

        context_pids = [
            process["pid"]
            for process in state["processes"].values()
            if process.get("service") == "context"
        ]
        assert context_pids
        async with aio.insecure_channel(edge) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=context))
            whole = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            await turns(watch, health_pb2.HealthCheckResponse.SERVING)
            with stopped(context_pids):
                await turns(watch, health_pb2.HealthCheckResponse.NOT_SERVING)
                await turns(whole, health_pb2.HealthCheckResponse.NOT_SERVING)
                others = [name for name in every_name[1:] if name != context]
                codes = await asyncio.gather(
                    *(asyncio.to_thread(probe, edge, name) for name in [context, *others])
                )
                assert codes[0] == PROBE_UNHEALTHY
                assert dict(zip(others, codes[1:], strict=True)) == dict.fromkeys(
                    others, PROBE_SERVING
                )
            await turns(watch, health_pb2.HealthCheckResponse.SERVING)
            await turns(whole, health_pb2.HealthCheckResponse.SERVING)
            watch.cancel()
            whole.cancel()
        assert await asyncio.to_thread(probe, edge, context) == PROBE_SERVING
        assert mesh.interrupt() == 0
