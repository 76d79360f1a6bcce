"""Closed-loop load from its own process: C workers call one RPC for D seconds.

    python bench/load.py ADDRESS RPC CONCURRENCY SECONDS    prints one JSON line

RPC is `health` (grpc.health.v1.Health/Check, SERVING) or `unimplemented`
(AuthService/GetJwks: the full error path, ErrorInfo and access log included).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc


async def main(address: str, rpc: str, concurrency: int, seconds: float) -> None:
    async with aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        auth = auth_pb2_grpc.AuthServiceStub(channel)

        async def once() -> None:
            if rpc == "health":
                await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                return
            try:
                await auth.GetJwks(auth_pb2.GetJwksRequest(), timeout=10)
            except aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise

        for _ in range(200):  # warm-up: connection, caches, JIT-free but allocator-warm
            await once()
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while (start := time.perf_counter()) < deadline:
                await once()
                latencies.append(time.perf_counter() - start)

        begun = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - begun
    cuts = statistics.quantiles(latencies, n=100)
    print(
        json.dumps(
            {
                "calls": len(latencies),
                "qps": round(len(latencies) / elapsed, 1),
                "p50_ms": round(cuts[49] * 1000, 3),
                "p99_ms": round(cuts[98] * 1000, 3),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
