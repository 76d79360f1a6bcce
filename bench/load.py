"""Closed-loop load from its own process.

    python bench/load.py ADDRESS TOKEN RPC CONCURRENCY SECONDS    prints one JSON line

RPC is one of:
- `health`: grpc.health.v1.Health/Check (SERVING);
- `jwks`: AuthService/GetJwks without a credential (public);
- `jwks-auth`: AuthService/GetJwks with `authorization: Bearer TOKEN`;
- `jwks-header`: the same call to a server where GetJwks is public (the header
  travels but nothing checks it: the transport's share of the cost);
- `error`: AuthService/GetPrincipal without a credential (the full error path:
  UNAUTHENTICATED with ErrorInfo, access log included);
- `logins`: CONCURRENCY workers calling Login with the benchmark account while
  one more worker calls health Check, to measure an unrelated RPC meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench.fixtures import BENCH_EMAIL, PASSWORD
from bench.harness import bearer, summary


def _summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    return {**summary(latencies), "qps": round(len(latencies) / elapsed, 1)}


async def _loop(
    once: Callable[[], Awaitable[None]], deadline: float, latencies: list[float]
) -> None:
    while (start := time.perf_counter()) < deadline:
        await once()
        latencies.append(time.perf_counter() - start)


async def main(address: str, token: str, rpc: str, concurrency: int, seconds: float) -> None:
    async with aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        metadata = bearer(token)

        async def check() -> None:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)

        async def jwks() -> None:
            await auth.GetJwks(auth_pb2.GetJwksRequest(), timeout=10)

        async def jwks_auth() -> None:
            await auth.GetJwks(auth_pb2.GetJwksRequest(), metadata=metadata, timeout=10)

        async def error() -> None:
            try:
                await auth.GetPrincipal(auth_pb2.GetPrincipalRequest(), timeout=10)
            except aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise

        async def login() -> None:
            await auth.Login(
                auth_pb2.LoginRequest(
                    password=auth_pb2.PasswordCredential(email=BENCH_EMAIL, password=PASSWORD)
                ),
                timeout=30,
            )

        if rpc == "logins":
            for _ in range(3):
                await login()
            logins: list[float] = []
            probes: list[float] = []
            deadline = time.perf_counter() + seconds
            begun = time.perf_counter()
            await asyncio.gather(
                _loop(check, deadline, probes),
                *(_loop(login, deadline, logins) for _ in range(concurrency)),
            )
            elapsed = time.perf_counter() - begun
            result = _summary(logins, elapsed)
            probe = _summary(probes, elapsed)
            result.update({"health_p50_ms": probe["p50_ms"], "health_p99_ms": probe["p99_ms"]})
            print(json.dumps(result))
            return

        once = {
            "health": check,
            "jwks": jwks,
            "jwks-header": jwks_auth,  # same bytes on the wire; the server ignores them
            "jwks-auth": jwks_auth,
            "error": error,
        }[rpc]
        for _ in range(200):  # warm-up: connection, caches, allocator
            await once()
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds
        begun = time.perf_counter()
        await asyncio.gather(*(_loop(once, deadline, latencies) for _ in range(concurrency)))
        elapsed = time.perf_counter() - begun
    print(json.dumps(_summary(latencies, elapsed)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])))
