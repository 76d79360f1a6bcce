"""Shared fixtures: an in-process server on port 0, its process's parts, and a channel to it."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from grpc import aio

from switchboard.mesh import create_server
from switchboard.platform.process import Shared
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.infra.migrated import sqlite_copy

pytest_plugins = [
    # First: the other plugins' helpers import it (imported first as a plugin, it is rewritten).
    "tests.infra.processlogs",
    "tests.infra.leftovers",
    "tests.infra.tiers",
    "tests.infra.longestfirst",
    "tests.infra.crashsafe",
    "tests.infra.postgres",
    "tests.infra.redis",
    "tests.infra.rediscluster",
    "tests.infra.seaweedfs",
]

_T = TypeVar("_T")


# One directory per test run for the SQLite files of make_settings(). Files, not
# ":memory:": an in-memory database lives in one connection, and a client that
# cancels a call mid-query makes SQLAlchemy discard that connection (and with
# it the whole database).
_DATABASES = Path(tempfile.mkdtemp(prefix="switchboard-tests-"))
_database_serial = itertools.count()
_instance_serial = itertools.count()

#: make_settings()'s database timeout (see there).
TEST_DATABASE_TIMEOUT_S = 30.0

#: A client's deadline on a call whose time is not what the test asserts: a bound that
#: stops a hung call, never a measure of speed. The suite runs four workers on two cores
#: beside lint and mypy (and, in the issue-81 runs, a CPU burner): a call that takes
#: milliseconds alone can wait 10 s for a core there, and a 10 s deadline then failed
#: a test of authorization with DEADLINE_EXCEEDED. A test of deadlines sets its own.
CALL_DEADLINE_S = 60.0


def fresh_database_url() -> str:
    """A new SQLite file already at the newest schema (``tests/infra/migrated.py``)."""
    path = sqlite_copy(_DATABASES / f"test-{next(_database_serial)}.db")
    return f"sqlite+aiosqlite:///{path}"


def make_settings(**overrides: object) -> Settings:
    """Settings for tests: loopback, port 0, dev mode, a private SQLite file, and a
    dispatcher instance id of its own (servers sharing a database each need one)."""
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "dev_mode": True,
        "instance_id": f"test-{next(_instance_serial)}",
        # The suite runs four workers on two cores beside lint and mypy: a worker can
        # wait seconds for a core, and the product's 5 s would call that an outage.
        # Tests of outages set their own short timeout.
        "database_timeout_s": TEST_DATABASE_TIMEOUT_S,
    }
    if "database_url" not in overrides:
        values["database_url"] = fresh_database_url()
    values.update(overrides)
    return Settings.from_values(**values)


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[SwitchboardServer]:
    """A server of ``settings``, started, for the block; shut down at once afterwards."""
    server, _port = await create_server(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace=0)


@pytest.fixture
async def mesh(settings: Settings) -> AsyncIterator[SwitchboardServer]:
    async with started(settings) as server:
        yield server


@pytest.fixture
def shared(mesh: SwitchboardServer) -> Shared:
    """What the served process opened: its database, bus, key ring, memberships..."""
    return mesh.shared


def built(server: SwitchboardServer, kind: type[_T]) -> _T:
    """The part of ``server``'s process that ``kind`` names (its ``Accounts``,
    ``ContextDomain``, ``IntegrationHub``, ``Dispatcher``); the process must serve
    a service that builds it."""
    part = server.shared.built(kind)
    assert part is not None, f"this process built no {kind.__name__}"
    return part


@pytest.fixture
async def channel(mesh: SwitchboardServer) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(mesh.address) as chan:
        yield chan
