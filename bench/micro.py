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

from switchboard.api.auth.v1 import auth_pb2
from switchboard.auth.accounts import Accounts
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
        shared = server.shared
        accounts = shared.built(Accounts)
        assert accounts is not None  # the auth service is served
        sign_in = await accounts.register(
            auth_pb2.RegisterRequest(
                email="micro@example.com",
                password="measured many times 123",  # noqa: S106 - a throwaway account
                display_name="Micro",
            ),
            "-",
        )
        token = sign_in.tokens.access_token
        await shared.authenticator.authenticate(token)
        started = time.perf_counter()
        for _ in range(CALLS):
            await shared.authenticator.authenticate(token)
        cached_us = (time.perf_counter() - started) / CALLS * 1e6
        tokens = shared.tokens  # the verifier the authenticator wraps
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
