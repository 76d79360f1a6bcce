"""A server to benchmark, in its own process: prints "PORT TOKEN", serves until stdin closes.

python bench/target.py bare              grpc.aio + health only (no interceptor)
python bench/target.py switchboard       the real assembly (create_server, all services)
python bench/target.py switchboard-auth  the same, but GetJwks requires a bearer token
python bench/target.py switchboard-auth-nocache   ... with the verified-token cache off

TOKEN is an access token of a user created at start ("-" for bare). The
"-auth" variants change one access rule in this process only, so the
authenticated and the public call are the same RPC doing the same work; the
difference is the guard.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from switchboard.mesh import create_server
from switchboard.platform import access
from switchboard.platform.config import Settings
from switchboard.platform.logging import configure_logging
from switchboard.platform.policy import Scope

BENCH_EMAIL = "bench@example.com"
BENCH_PASSWORD = "measured many times 123"  # noqa: S105 - a throwaway benchmark account


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
    token = "-"  # noqa: S105 - placeholder: bare has no auth
    if variant == "bare":
        server, port = await _bare()
    else:
        _quiet_logging()
        if variant.startswith("switchboard-auth"):
            access.RULES["/switchboard.api.auth.v1.AuthService/GetJwks"] = access.authenticated(
                Scope.READ
            )
        directory = tempfile.mkdtemp(prefix="switchboard-bench-")
        settings = Settings(
            host="127.0.0.1",
            port=0,
            dev_mode=True,
            database_url=f"sqlite+aiosqlite:///{directory}/bench.db",  # type: ignore[arg-type]
            token_cache_size=0 if variant.endswith("nocache") else 10_000,
            # The login benchmark signs in from one address many times a second.
            login_max_attempts_per_address=1_000_000,
            login_max_failures_per_account=100_000,
        )
        wrapped, port = await create_server(settings)
        await wrapped.start()
        from switchboard.auth.accounts import ClientContext

        sign_in = await wrapped.deps.accounts.register(
            BENCH_EMAIL, BENCH_PASSWORD, "Bench", ClientContext(address="127.0.0.1")
        )
        token = sign_in.tokens.access_token
        server = wrapped.grpc_server
    print(port, token, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
