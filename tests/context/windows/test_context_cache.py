"""The context window cache with a real Redis: a write followed by GetContextWindow
never returns the old window, with Redis up, down, and coming back, and across
two processes sharing one database and one Redis.

The cache is keyed by the versions a window was built from, read from the
database on every request; these tests make sure that an entry of an older
version is never served, wherever it still sits (a process's memory, Redis
before an outage, another process).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from grpc import aio
from redis.asyncio import Redis

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.auth.accounts import Accounts, ClientContext
from switchboard.auth.store import AuthStore
from switchboard.context.domain import ContextDomain
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.policy import AuthMethod
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, built, make_settings, started
from tests.infra.redis import RedisServer
from tests.kits.contextkit import (
    PINNED,
    Caller,
    Chat,
    all_messages,
    append,
    context_stub,
    included_messages,
    names,
    new_chat,
    remember,
    window,
)

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

BUDGET = 4000
REDIS_TIMEOUT_S = 0.2


@pytest.fixture
def settings(request: pytest.FixtureRequest, redis_server: RedisServer) -> Settings:
    shared: dict[str, object] = {}
    if "other_mesh" in request.fixturenames:
        # Two processes share the database: PostgreSQL, as a SQLite file
        # belongs to one process (a second one is refused).
        shared["database_url"] = request.getfixturevalue("postgres_url")
    return make_settings(redis_url=redis_server.url, redis_timeout_s=REDIS_TIMEOUT_S, **shared)


def hits(mesh: SwitchboardServer) -> int:
    return int(built(mesh, ContextDomain).windows.cache.hits)


def retry_redis_now(mesh: SwitchboardServer) -> None:
    """Let the window cache try Redis again at once.

    After a failure the cache leaves Redis alone for ``retry_s`` (memory only);
    this stands for that interval having passed, without sleeping through it.
    """
    built(mesh, ContextDomain).windows.cache._down_until = 0.0


def conversation_id(c: Chat) -> str:
    return c.conversation.rsplit("/", 1)[1]


async def stored(redis: RedisServer, c: Chat) -> dict[bytes, bytes]:
    """The window cache entries of ``c``'s conversation held in Redis.

    A new client each time: the server may have been restarted since the last look.
    """
    found: dict[bytes, bytes] = {}
    client = Redis.from_url(redis.url, socket_timeout=CALL_DEADLINE_S)
    try:
        async for key in client.scan_iter(match=f"*{conversation_id(c)}*"):
            value = await client.get(key)
            if isinstance(key, bytes) and isinstance(value, bytes):
                found[key] = value
    finally:
        await client.aclose()
    return found


def serialized(win: pb.ContextWindow) -> bytes:
    return pb.GetContextWindowResponse(window=win).SerializeToString()


async def served_twice(mesh: SwitchboardServer, c: Chat) -> pb.ContextWindow:
    """The window, read twice; the second read is a cache hit with the same content."""
    win = await window(c.stub, c.caller, c.conversation, BUDGET)
    before = hits(mesh)
    assert await window(c.stub, c.caller, c.conversation, BUDGET) == win
    assert hits(mesh) == before + 1
    return win


def texts(win: pb.ContextWindow) -> list[str]:
    return [m.parts[0].text for m in included_messages(win)]


async def expect_fresh(c: Chat, wanted: list[str], pinned: list[str] | None = None) -> None:
    """The window shows exactly the conversation's live messages ``wanted`` (and pins)."""
    win = await window(c.stub, c.caller, c.conversation, BUDGET)
    assert texts(win) == wanted
    assert [m.parts[0].text for m in await all_messages(c.stub, c.caller, c.conversation)] == wanted
    if pinned is not None:
        assert sorted(names(win.included, PINNED)) == sorted(pinned)


# -- Redis up -------------------------------------------------------------------------------


async def test_redis_up_windows_are_shared_through_redis_and_never_stale(
    mesh: SwitchboardServer, channel: aio.Channel, redis_server: RedisServer
) -> None:
    c = await new_chat(mesh, channel)
    await append(c.stub, c.caller, c.conversation, "one")
    old = await served_twice(mesh, c)
    # Stored in Redis too, as the very window served.
    entries = await stored(redis_server, c)
    assert len(entries) == 1
    assert next(iter(entries.values())).endswith(serialized(old))

    await append(c.stub, c.caller, c.conversation, "two")
    new = await served_twice(mesh, c)
    assert texts(new) == ["one", "two"]
    assert new.conversation_version > old.conversation_version
    assert len(await stored(redis_server, c)) == 2  # the old entry is unreachable, not served

    pins = []
    for parent in (c.conversation, c.workspace, c.caller.name):
        await served_twice(mesh, c)
        pins.append(
            (await remember(c.stub, c.caller, parent, f"pin in {parent}", pinned=True)).name
        )
        win = await served_twice(mesh, c)
        assert sorted(names(win.included, PINNED)) == sorted(pins)


# -- Redis down -----------------------------------------------------------------------------


async def test_redis_killed_then_restarted_windows_are_never_stale(
    mesh: SwitchboardServer, channel: aio.Channel, redis_server: RedisServer
) -> None:
    c = await new_chat(mesh, channel)
    await append(c.stub, c.caller, c.conversation, "one")
    await served_twice(mesh, c)
    assert await stored(redis_server, c)

    redis_server.kill()
    await append(c.stub, c.caller, c.conversation, "two")
    await expect_fresh(c, ["one", "two"])
    await served_twice(mesh, c)  # memory still caches while Redis is away
    workspace_pin = await remember(
        c.stub, c.caller, c.workspace, "pinned while Redis was down", pinned=True
    )
    await expect_fresh(c, ["one", "two"], [workspace_pin.name])
    await append(c.stub, c.caller, c.conversation, "three")
    await expect_fresh(c, ["one", "two", "three"], [workspace_pin.name])

    redis_server.restart()
    await expect_fresh(c, ["one", "two", "three"], [workspace_pin.name])
    # Recovery: once the retry interval is over, windows are stored in Redis again.
    retry_redis_now(mesh)
    await append(c.stub, c.caller, c.conversation, "four")
    await expect_fresh(c, ["one", "two", "three", "four"], [workspace_pin.name])
    (entry,) = (await stored(redis_server, c)).values()  # the restarted Redis started empty
    assert entry.endswith(serialized(await window(c.stub, c.caller, c.conversation, BUDGET)))
    user_pin = await remember(
        c.stub, c.caller, c.caller.name, "pinned after Redis came back", pinned=True
    )
    await expect_fresh(c, ["one", "two", "three", "four"], [workspace_pin.name, user_pin.name])
    await served_twice(mesh, c)


async def test_redis_paused_then_resumed_old_entries_in_redis_are_never_served(
    mesh: SwitchboardServer, channel: aio.Channel, redis_server: RedisServer
) -> None:
    c = await new_chat(mesh, channel)
    await append(c.stub, c.caller, c.conversation, "one")
    old = await served_twice(mesh, c)
    before_outage = await stored(redis_server, c)
    assert len(before_outage) == 1

    redis_server.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        await append(c.stub, c.caller, c.conversation, "two")
        await expect_fresh(c, ["one", "two"])
        await served_twice(mesh, c)
        pin = await remember(c.stub, c.caller, c.workspace, "pinned while Redis hung", pinned=True)
        await expect_fresh(c, ["one", "two"], [pin.name])
    finally:
        redis_server.resume()

    # Redis is back with exactly what it held before the outage: the old
    # version's window, which must stay unreachable.
    assert await stored(redis_server, c) == before_outage
    assert next(iter(before_outage.values())).endswith(serialized(old))
    retry_redis_now(mesh)
    await expect_fresh(c, ["one", "two"], [pin.name])
    await append(c.stub, c.caller, c.conversation, "three")
    await expect_fresh(c, ["one", "two", "three"], [pin.name])
    await served_twice(mesh, c)
    # Redis is in use again: the new window went there next to the old one.
    assert len(await stored(redis_server, c)) == 2


# -- two processes ----------------------------------------------------------------------------


@pytest.fixture
async def other_mesh(mesh: SwitchboardServer) -> AsyncIterator[SwitchboardServer]:
    """A second server on the same database and the same Redis (another process)."""
    shared = mesh.shared.settings
    async with started(
        make_settings(
            database_url=shared.database_url.get_secret_value(),
            redis_url=shared.redis_url.get_secret_value(),
            redis_timeout_s=REDIS_TIMEOUT_S,
        )
    ) as server:
        yield server


@pytest.fixture
async def other_channel(other_mesh: SwitchboardServer) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(other_mesh.address) as chan:
        yield chan


async def signed_in_on(server: SwitchboardServer, c: Chat) -> str:
    """An access token of ``c``'s user issued by ``server`` (dev keys differ per process)."""
    user = await AuthStore(server.shared.database).user_by_id(c.caller.id)
    assert user is not None
    sign_in = await built(server, Accounts).start_session(
        user, AuthMethod.PASSWORD, ClientContext(address="127.0.0.1")
    )
    return str(sign_in.tokens.access_token)


async def test_a_write_in_one_process_is_seen_by_a_window_in_another(
    mesh: SwitchboardServer,
    channel: aio.Channel,
    other_mesh: SwitchboardServer,
    other_channel: aio.Channel,
    redis_server: RedisServer,
) -> None:
    a = await new_chat(mesh, channel)
    # The same user and conversation, through the other process with a token it issued.
    b = Chat(
        context_stub(other_channel),
        Caller(a.caller.id, await signed_in_on(other_mesh, a)),
        a.workspace,
        a.conversation,
    )
    await append(a.stub, a.caller, a.conversation, "one")

    # B builds the window and stores it (memory and Redis); A is served B's entry.
    old = await served_twice(other_mesh, b)
    a_hits = hits(mesh)
    assert await window(a.stub, a.caller, a.conversation, BUDGET) == old
    assert hits(mesh) == a_hits + 1
    assert len(await stored(redis_server, a)) == 1

    # Written through A: B's memory and Redis hold only the old version.
    await append(a.stub, a.caller, a.conversation, "two")
    await expect_fresh(b, ["one", "two"])
    pins = [
        (await remember(a.stub, a.caller, a.workspace, "workspace pin via A", pinned=True)).name
    ]
    await expect_fresh(b, ["one", "two"], pins)
    pins.append(
        (await remember(a.stub, a.caller, a.caller.name, "user pin via A", pinned=True)).name
    )
    await expect_fresh(b, ["one", "two"], pins)
    await served_twice(other_mesh, b)

    # And the other way round, with A's memory holding the window.
    await served_twice(mesh, a)
    await append(b.stub, b.caller, b.conversation, "three")
    pins.append(
        (
            await remember(b.stub, b.caller, b.conversation, "conversation pin via B", pinned=True)
        ).name
    )
    await expect_fresh(a, ["one", "two", "three"], pins)

    # Redis hangs while only A works; once it is back, B (which never saw the
    # outage, so it reads Redis) finds there only windows of older versions.
    await served_twice(other_mesh, b)
    redis_server.pause()
    try:
        await append(a.stub, a.caller, a.conversation, "four")
        await expect_fresh(a, ["one", "two", "three", "four"], pins)
    finally:
        redis_server.resume()
    assert built(other_mesh, ContextDomain).windows.cache.redis_up
    entries = len(await stored(redis_server, a))
    await expect_fresh(b, ["one", "two", "three", "four"], pins)
    assert len(await stored(redis_server, a)) == entries + 1  # B stored the new one

    # Redis hung while both work: each keeps its own memory; still never stale.
    await served_twice(mesh, a)
    await served_twice(other_mesh, b)
    redis_server.pause()
    try:
        await append(a.stub, a.caller, a.conversation, "five")
        await expect_fresh(b, ["one", "two", "three", "four", "five"], pins)
        await append(b.stub, b.caller, b.conversation, "six")
        await expect_fresh(a, ["one", "two", "three", "four", "five", "six"], pins)
    finally:
        redis_server.resume()
    retry_redis_now(mesh)
    retry_redis_now(other_mesh)
    everything = ["one", "two", "three", "four", "five", "six", "seven"]
    await append(a.stub, a.caller, a.conversation, "seven")
    await expect_fresh(b, everything, pins)
    await expect_fresh(a, everything, pins)
