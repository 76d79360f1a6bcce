"""One server per backend for a whole test module, for modules whose tests each make
users, workspaces and conversations of their own (starting a server per test was most
of such a module's time).

A module binds the fixtures under the names its tests take, and runs its tests on the
module's event loop (the server's)::

    pytestmark = pytest.mark.asyncio(loop_scope="module")
    module_database_url = module_database_url_fixture
    channel = module_channel_fixture  # a channel to the module's ``mesh``
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import pytest_asyncio
from grpc import aio

from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import fresh_database_url
from tests.infra.migrated import sqlite_copy
from tests.infra.postgres import PostgresServer, throwaway_database


@pytest_asyncio.fixture(scope="module", params=["sqlite", "postgres"], loop_scope="module")
async def module_database_url_fixture(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """Like ``database_url`` (once per backend, at the newest schema, without rows), for
    a whole module: a copy of the migrated SQLite file, or a PostgreSQL database copied
    from the migrated template and dropped after the module."""
    if request.param == "sqlite":
        path = sqlite_copy(tmp_path_factory.mktemp("module") / "switchboard.db")
        yield f"sqlite+aiosqlite:///{path}"
        return
    async with _postgres_database(request) as url:
        yield url


@asynccontextmanager
async def database_beside(request: pytest.FixtureRequest, url: str) -> AsyncIterator[str]:
    """Another database of ``url``'s backend at the newest schema, for the block: for a
    second module server, since two servers may not share a SQLite file."""
    if url.startswith("sqlite"):
        yield fresh_database_url()
        return
    async with _postgres_database(request) as other:
        yield other


@asynccontextmanager
async def _postgres_database(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    # Looked up lazily so SQLite-only runs never start PostgreSQL.
    server: PostgresServer = request.getfixturevalue("postgres_server")
    template: str = request.getfixturevalue("migrated_template")
    async with throwaway_database(server, template) as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_channel_fixture(mesh: SwitchboardServer) -> AsyncIterator[aio.Channel]:
    """A channel to the module's ``mesh`` fixture, open for the whole module."""
    async with aio.insecure_channel(mesh.address) as chan:
        yield chan
