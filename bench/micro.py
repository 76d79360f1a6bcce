"""In-process cost of the guard's credential check, without the transport.

    python bench/micro.py    prints one JSON line: microseconds per call

Separates what authentication itself costs from the noise of two processes
sharing two cores in the QPS figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time

from switchboard.auth.accounts import ClientContext
from switchboard.mesh import create_server
from switchboard.platform.config import Settings

CALLS = 20_000


async def main() -> None:
    logging.disable(logging.WARNING)
    directory = tempfile.mkdtemp(prefix="switchboard-micro-")
    settings = Settings(
        host="127.0.0.1",
        port=0,
        dev_mode=True,
        database_url=f"sqlite+aiosqlite:///{directory}/micro.db",  # type: ignore[arg-type]
    )
    server, _ = await create_server(settings)
    try:
        deps = server.deps
        sign_in = await deps.accounts.register(
            "micro@example.com", "measured many times 123", "Micro", ClientContext(address="-")
        )
        token = sign_in.tokens.access_token
        await deps.authenticator.authenticate(token)
        started = time.perf_counter()
        for _ in range(CALLS):
            await deps.authenticator.authenticate(token)
        cached_us = (time.perf_counter() - started) / CALLS * 1e6
        tokens = deps.accounts._tokens  # the verifier the authenticator wraps
        started = time.perf_counter()
        for _ in range(CALLS // 10):
            tokens.verify(token)
        verify_us = (time.perf_counter() - started) / (CALLS // 10) * 1e6
    finally:
        await server.shutdown(grace=0)
    print(
        json.dumps(
            {"cached_authenticate_us": round(cached_us, 2), "verify_us": round(verify_us, 1)}
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
