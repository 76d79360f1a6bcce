"""A server to benchmark, in its own process: prints its port, serves until stdin closes.

python bench/target.py bare         grpc.aio + health only (no interceptor)
python bench/target.py switchboard  the real assembly (create_server, all services)
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from switchboard.mesh import create_server
from switchboard.platform.config import Settings
from switchboard.platform.logging import configure_logging


async def _bare() -> tuple[aio.Server, int]:
    server = aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


def _quiet_logging() -> None:
    """Access lines are formatted exactly as in production, into a sink that costs nothing."""
    configure_logging("INFO", "json")
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sink)


async def main(variant: str) -> None:
    if variant == "bare":
        server, port = await _bare()
    else:
        _quiet_logging()
        wrapped, port = await create_server(Settings(host="127.0.0.1", port=0, dev_mode=True))
        await wrapped.start()
        server = wrapped.grpc_server
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
