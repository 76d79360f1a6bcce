"""The event log on a real Redis Cluster (three masters, three replicas): its keys in
one slot, one order for every process, replay and resume from a cursor, tokens on
their conversations' streams in the log's slot, and a master killed (SIGKILL) while a
process appends: every acknowledged append is still there, in order, and a reader
resumes from its cursor.

The cluster comes from ``redis_cluster`` (tests/infra/rediscluster.py); every wait is
a poll or an event under a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import RedisLog, format_cursor, parse_cursor
from tests.infra.rediscluster import Cluster
from tests.platform.events.test_eventlog import _Collector, _event, _token

# Real processes: six redis-servers, redis-cli, and a master killed on purpose.
pytestmark = pytest.mark.e2e

#: A command's bound: a cluster client learns the slots on its first command, and the
#: append waits for a replica (WAIT) within it.
TIMEOUT_S = 1.0
#: For tests that are not about outages: no command may time out under CPU load (a token
#: that times out is dropped, an append that does goes to the outbox without a cursor).
OUTAGE_FREE_TIMEOUT_S = 10.0
DEADLINE_S = 30.0
STREAM = "{test:events}"


@pytest.fixture
async def buses() -> AsyncIterator[list[EventBus]]:
    opened: list[EventBus] = []
    yield opened
    for bus in opened:
        await bus.close()


async def _open(
    buses: list[EventBus],
    url: str,
    *,
    memory: int = 1_000,
    timeout_s: float = TIMEOUT_S,
    tail: bool = True,
) -> EventBus:
    log = RedisLog(
        url,
        key="test:events",
        timeout_s=timeout_s,
        retention=10_000,
        retention_s=86_400,
        memory=memory,
        outbox_limit=10_000,
        dedupe_window_s=60,
    )
    bus = EventBus(log, memory=memory)
    await bus.start()
    buses.append(bus)
    if tail:
        await bus.tail()  # as a process serving a subscriber does
    return bus


async def _until(predicate: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(DEADLINE_S):
            while not predicate():  # noqa: ASYNC110 - state has no event to wait on
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out after {DEADLINE_S}s waiting for {what}")


def test_the_logs_keys_share_one_slot(redis_cluster: Cluster) -> None:
    with redis_cluster.nodes[0].client() as c:
        slots = {
            int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for key in (STREAM, f"{STREAM}:id:some-event", f"{STREAM}:horizon", f"{STREAM}:tokens")
        }
    assert len(slots) == 1


async def test_one_ordered_log_with_replay_and_resume(
    buses: list[EventBus], redis_cluster: Cluster
) -> None:
    a = await _open(buses, redis_cluster.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    b = await _open(buses, redis_cluster.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    on_b = _Collector(b)
    published = [
        await bus.publish(_event(f"{name}{i}"))
        for i in range(15)
        for name, bus in (("a", a), ("b", b))
    ]
    assert all(event.cursor for event in published), "each append acknowledged with its cursor"
    seen = [item.event.id for item in await on_b.until(30)]
    assert seen == [event.id for event in published]
    # The stream is the configured name under its hash tag, on the master of that slot.
    master = redis_cluster.master_of(STREAM)
    with master.client() as c:
        assert c.xlen(STREAM) == 30
        assert c.exists(f"{STREAM}:id:{published[0].id}") == 1
    # Replay from storage and resume after a cursor, on a process that saw none of it live.
    c_bus = await _open(buses, redis_cluster.url, memory=10)
    everything = await c_bus.read((0, 0), c_bus.head, 1_000)
    assert [item.event.id for item in everything] == seen
    cursor = parse_cursor(published[9].cursor)
    assert cursor is not None
    rest = await c_bus.read(cursor, c_bus.head, 1_000)
    assert [item.event.id for item in rest] == [event.id for event in published[10:]]


async def test_tokens_cross_processes_on_their_conversations_streams_in_the_logs_slot(
    buses: list[EventBus], redis_cluster: Cluster
) -> None:
    """A conversation's tokens go on its own stream under the log's hash tag (one slot,
    so one read covers every followed conversation); a process that follows it mid-run
    reads back what was said, then hears the rest live."""
    sender = await _open(buses, redis_cluster.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    hearing = await _open(buses, redis_cluster.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    conversation = "workspaces/w/conversations/c"
    stream = f"{STREAM}:tokens:{conversation}"
    master = redis_cluster.master_of(STREAM)

    def said() -> int:
        with master.client() as c:
            return int(c.xlen(stream))

    logged = await sender.publish(_event("logged"))
    position = parse_cursor(logged.cursor)
    assert position is not None
    sender.announce([_token("before", conversation)], after=position)
    await _until(lambda: said() >= 1, "the first token on its conversation's stream")
    unfollow = await hearing.follow([conversation])
    on_hearing = _Collector(hearing)
    sender.announce([_token("live", conversation)], after=position)
    await on_hearing.until(1)
    unfollow()
    with redis_cluster.nodes[0].client() as c:
        assert int(c.execute_command("CLUSTER", "KEYSLOT", stream)) == int(
            c.execute_command("CLUSTER", "KEYSLOT", STREAM)
        )
    held = [item.event.actor.name for item in hearing.ring.items()]
    assert held[-2:] == ["before", "live"] or held == ["logged", "before", "live"]
    assert [item.event.actor.name for item in on_hearing.items if item.token] == ["live"]


async def test_a_master_killed_while_appending_loses_nothing_acknowledged(
    buses: list[EventBus], redis_cluster: Cluster
) -> None:
    writer = await _open(buses, redis_cluster.url)
    reader = await _open(buses, redis_cluster.url)
    live = _Collector(reader)
    published: list[events_pb2.Event] = []
    stop = asyncio.Event()

    async def append() -> None:
        serial = 0
        while not stop.is_set():
            published.append(await writer.publish(_event(f"e{serial}")))
            serial += 1
            # A steady rate, not a flood: held appends must not fill the outbox.
            await asyncio.sleep(0.005)

    appender = asyncio.create_task(append())
    try:
        await _until(lambda: sum(1 for e in published if e.cursor) >= 50, "50 appends")
        master = redis_cluster.master_of(STREAM)
        replica = redis_cluster.replica_of(master)
        # The newest append acknowledged with a cursor before the master dies: the
        # reader's place to resume from.
        resume_from = next(e for e in reversed(published) if e.cursor)
        master.server.kill()
        killed_at = len(published)
        await asyncio.to_thread(redis_cluster.wait_promoted, replica)
        await _until(lambda: len(published) >= killed_at + 50, "50 appends after the failover")
        # The promoted replica has no replica of its own: no append is acknowledged
        # with a cursor (they wait in the outbox) until the killed node is back, as
        # the new master's replica.
        # (The one append in flight at the kill may have had its answer before it.)
        assert not any(event.cursor for event in published[killed_at + 1 :])
        master.server.restart()
        await asyncio.to_thread(redis_cluster.wait_ok, redis_cluster.live())
    finally:
        stop.set()
        await appender
    await _until(lambda: writer.held == 0 and writer.state == "ok", "the outbox to flush")

    # Everything the writer was told about is in the log once, in publish order, and
    # an append acknowledged with a cursor is at that cursor.
    fresh = await _open(buses, redis_cluster.url, memory=10)
    log = await fresh.read((0, 0), fresh.head, 100_000)
    assert [item.event.id for item in log] == [event.id for event in published]
    positions = {item.event.id: item.cursor for item in log}
    for event in published:
        if event.cursor:
            assert positions[event.id] == event.cursor
    # A reader resumes from its cursor on the promoted replica.
    start = parse_cursor(resume_from.cursor)
    assert start is not None
    after = await fresh.read(start, fresh.head, 100_000)
    index = [event.id for event in published].index(resume_from.id)
    assert [item.event.id for item in after] == [event.id for event in published[index + 1 :]]
    # The live reader went on through the failover and saw every append, in log order.
    await live.until(len(published))
    assert {item.event.id for item in live.items} >= {event.id for event in published}
    seen_positions = [item.position for item in live.items]
    assert seen_positions == sorted(seen_positions)
    assert format_cursor(seen_positions[-1]) == log[-1].cursor
