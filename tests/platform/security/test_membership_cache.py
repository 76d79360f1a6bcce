"""``CachedMemberships``: the unary calls' membership check from memory, exact while the
cache layer is fresh. Two processes are two ``Cache`` objects on one real redis-server:
a change published through one drops the other's entries by its message, and its event
drops them whatever happened to the message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import pytest

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.cache import Cache
from switchboard.platform.security.membership import CachedMemberships, MembershipStore
from switchboard.platform.security.policy import Role
from tests.conftest import CALL_DEADLINE_S
from tests.infra.redis import RedisServer

pytestmark = pytest.mark.unit

TIMEOUT_S = 0.5
LEASE_S = 2.0


class Store:
    """The database's answers, with every read counted (what the cache saves)."""

    def __init__(self) -> None:
        self.roles: dict[tuple[str, str], Role] = {}
        self.reads = 0
        self.deleted: set[str] = set()
        #: Set to hold reads until released (a read racing an invalidation).
        self.gate: asyncio.Event | None = None

    async def role_of(
        self, workspace_id: str, user_id: str, *, include_deleted: bool = False
    ) -> Role | None:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        if workspace_id in self.deleted and not include_deleted:
            return None
        return self.roles.get((workspace_id, user_id))


def member_changed(workspace_id: str, user_id: str) -> events_pb2.Event:
    event = events_pb2.Event(
        type=events_pb2.EVENT_TYPE_MEMBER_CHANGED, workspace=f"workspaces/{workspace_id}"
    )
    event.member_changed.member.user = f"users/{user_id}"
    return event


Make = Callable[..., Awaitable[CachedMemberships]]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    caches: list[Cache] = []

    async def build(url: str, store: Store, size: int = 100) -> CachedMemberships:
        cache = Cache(url, timeout_s=TIMEOUT_S, lease_s=LEASE_S)
        caches.append(cache)
        cached = CachedMemberships(cast(MembershipStore, store), cache, size=size)
        await cache.start()
        async with asyncio.timeout(CALL_DEADLINE_S):
            while not cache.fresh():  # noqa: ASYNC110 - the subscription's first confirmation
                await asyncio.sleep(0.01)
        return cached

    yield build
    for cache in caches:
        await cache.close()


async def test_a_role_is_read_once_and_then_from_memory(make: Make) -> None:
    store = Store()
    store.roles[("w1", "u1")] = Role.EDITOR
    cached = await make("", store)
    assert await cached.role_of("w1", "u1") == Role.EDITOR
    assert await cached.role_of("w1", "u1") == Role.EDITOR
    # Not a member is remembered too (until a change of the workspace).
    assert await cached.role_of("w1", "u2") is None
    assert await cached.role_of("w1", "u2") is None
    assert store.reads == 2
    # A soft-deleted workspace's check always reads.
    await cached.role_of("w1", "u1", include_deleted=True)
    await cached.role_of("w1", "u1", include_deleted=True)
    assert store.reads == 4


async def test_a_change_published_in_one_process_drops_the_others_entries(
    make: Make, redis_server: RedisServer
) -> None:
    store = Store()
    store.roles[("w1", "u1")] = Role.OWNER
    store.roles[("w2", "u1")] = Role.OWNER
    here = await make(redis_server.url, store)
    there = await make(redis_server.url, store)
    for process in (here, there):
        assert await process.role_of("w1", "u1") == Role.OWNER
        assert await process.role_of("w2", "u1") == Role.OWNER
    # The member is demoted: committed, then published through ``here``.
    store.roles[("w1", "u1")] = Role.VIEWER
    await here.publishing([member_changed("w1", "u1")])
    # ``here`` dropped its entries before ``publishing`` returned.
    assert await here.role_of("w1", "u1") == Role.VIEWER
    # ``there`` hears the message (polled: the message's arrival is all it waits for).
    async with asyncio.timeout(CALL_DEADLINE_S):
        while await there.role_of("w1", "u1") != Role.VIEWER:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    # Another workspace's entries stay: answered from memory.
    reads = store.reads
    assert await there.role_of("w2", "u1") == Role.OWNER
    assert await here.role_of("w2", "u1") == Role.OWNER
    assert store.reads == reads


async def test_the_changes_event_drops_entries_when_no_message_came(make: Make) -> None:
    store = Store()
    store.roles[("w1", "u1")] = Role.OWNER
    cached = await make("", store)
    await cached.role_of("w1", "u1")
    store.deleted.add("w1")
    # The writer died before its message: the event (in its transaction) still comes.
    deleted = events_pb2.Event(
        type=events_pb2.EVENT_TYPE_WORKSPACE_CHANGED, workspace="workspaces/w1"
    )
    cached.on_event(deleted)
    assert await cached.role_of("w1", "u1") is None
    # Other events change nothing.
    store.deleted.clear()
    cached.on_event(
        events_pb2.Event(type=events_pb2.EVENT_TYPE_CONVERSATION_CHANGED, workspace="workspaces/w1")
    )
    assert await cached.role_of("w1", "u1") is None


async def test_nothing_is_trusted_while_the_cache_is_not_fresh(
    make: Make, redis_server: RedisServer
) -> None:
    store = Store()
    store.roles[("w1", "u1")] = Role.OWNER
    cached = await make(redis_server.url, store)
    await cached.role_of("w1", "u1")
    await cached.role_of("w1", "u1")
    assert store.reads == 1
    redis_server.pause()
    try:
        async with asyncio.timeout(CALL_DEADLINE_S):
            while cached._cache.fresh():  # noqa: ASYNC110 - the lease running out
                await asyncio.sleep(0.05)
        # Redis cannot vouch for the invalidations: every check reads the database.
        await cached.role_of("w1", "u1")
        await cached.role_of("w1", "u1")
        assert store.reads == 3
    finally:
        redis_server.resume()


async def test_a_read_racing_a_change_is_not_kept(make: Make) -> None:
    store = Store()
    store.roles[("w1", "u1")] = Role.OWNER
    cached = await make("", store)
    store.gate = asyncio.Event()
    read = asyncio.create_task(cached.role_of("w1", "u1"))
    async with asyncio.timeout(CALL_DEADLINE_S):
        while store.reads == 0:  # noqa: ASYNC110 - the read has begun
            await asyncio.sleep(0)
    # The change commits and is published while the read is in flight (it read OWNER).
    await cached.publishing([member_changed("w1", "u1")])
    store.gate.set()
    assert await read == Role.OWNER
    store.gate = None
    store.roles[("w1", "u1")] = Role.VIEWER
    # The stale answer was not kept: the next check reads again.
    assert await cached.role_of("w1", "u1") == Role.VIEWER


async def test_the_cache_is_bounded_and_forgets_the_oldest_workspace_first(
    make: Make,
) -> None:
    store = Store()
    cached = await make("", store, size=3)
    for user in ("a", "b"):
        await cached.role_of("w1", user)
    await cached.role_of("w2", "a")
    await cached.role_of("w3", "a")  # over the bound: w1's two entries go
    reads = store.reads
    await cached.role_of("w2", "a")
    await cached.role_of("w3", "a")
    assert store.reads == reads
    await cached.role_of("w1", "a")
    assert store.reads == reads + 1
    # Size 0: no cache at all.
    uncached = Store()
    none = await make("", uncached, size=0)
    await none.role_of("w1", "a")
    await none.role_of("w1", "a")
    assert uncached.reads == 2
