"""A database and a Redis for a module's processes, when a module starts its
``switchboard serve`` processes once instead of once per test (each test then works
with users, workspaces and conversations of its own).

Plain generators, for a test module's own module-scoped fixtures to ``yield from``:
the conftest's ``postgres_url`` and ``redis_server`` are per test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.infra.postgres import PostgresServer
from tests.infra.postgres import _admin as postgres_admin
from tests.infra.redis import RedisServer, _fixture_server


def _admin(server: PostgresServer, sql: str) -> None:
    # In a thread of its own: a module fixture may be set up while a test's loop runs.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, postgres_admin(server, sql)).result()


def database(server: PostgresServer, template: str) -> Iterator[str]:
    """The URL of a fresh database copied from ``template`` (the migrated one: the schema
    at head, the tables empty), dropped afterwards."""
    name = f"test_{uuid.uuid4().hex}"
    _admin(server, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield server.url(name)
    finally:
        # FORCE: a process that leaked a connection must not leak the database.
        _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private ``redis-server``, as the conftest's ``redis_server`` starts it; a test
    that pauses or kills it brings it back before it ends."""
    yield from _fixture_server(tmp_path_factory, durable=False)
