"""A database and a Redis for a module's processes, when a module starts its
``switchboard serve`` processes once instead of once per test (each test then works
with users, workspaces and conversations of its own).

Plain generators, for a test module's own module-scoped fixtures to ``yield from``:
the conftest's ``postgres_url`` and ``redis_server`` are per test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from tests.infra.postgres import PostgresServer, create_database, drop_database
from tests.infra.redis import RedisServer, _fixture_server

_T = TypeVar("_T")


def _in_thread(work: Coroutine[Any, Any, _T]) -> _T:
    # In a thread of its own: a module fixture may be set up while a test's loop runs.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result()


def database(server: PostgresServer, template: str) -> Iterator[str]:
    """The URL of a fresh database copied from ``template`` (the migrated one: the schema
    at head, the tables empty), dropped afterwards."""
    name = _in_thread(create_database(server, template))
    try:
        yield server.url(name)
    finally:
        _in_thread(drop_database(server, name))


def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private ``redis-server``, as the conftest's ``redis_server`` starts it; a test
    that pauses or kills it brings it back before it ends."""
    yield from _fixture_server(tmp_path_factory, durable=False)
