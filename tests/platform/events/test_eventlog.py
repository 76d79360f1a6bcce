"""The event log: cursors, the wire format of shared frames, the ring, and the Redis
Stream backend against a real redis-server (two buses = two processes' views)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Final

import pytest
import redis.asyncio as redis

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.errors import CursorExpired, DependencyUnavailable
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import (
    _APPEND_SCRIPT,
    Logged,
    RedisLog,
    Ring,
    batch_payload,
    format_cursor,
    parse_cursor,
)
from tests.conftest import CALL_DEADLINE_S
from tests.infra.redis import RedisServer

pytestmark = pytest.mark.unit

TIMEOUT_S = 0.2
#: For tests that are not about outages: no append may time out under CPU load.
OUTAGE_FREE_TIMEOUT_S = 10.0


def _event(note: str, workspace: str = "workspaces/w") -> events_pb2.Event:
    event = events_pb2.Event(
        id=f"id-{note}", type=events_pb2.EVENT_TYPE_WORKSPACE_CHANGED, workspace=workspace
    )
    event.actor.name = note
    event.time.GetCurrentTime()
    return event


# -- cursors and frames ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["", "1", "1-", "-1", "a-1", "1-1-1-1", "1-1-", " 1-1", "1" * 21 + "-0"]
)
def test_malformed_cursors_are_refused(text: str) -> None:
    assert parse_cursor(text) is None


def test_cursors_round_trip_and_order() -> None:
    # A token's position (three parts) sorts after the logged event it follows.
    positions = [
        (0, 0),
        (1, 0),
        (1, 0, 7),
        (1, 5),
        (1700000000000, 12),
        (2**64 - 1, 2**64 - 1),
    ]
    for position in positions:
        assert parse_cursor(format_cursor(position)) == position
    assert parse_cursor(f"{2**64}-0") is None
    assert sorted(positions, reverse=True) == sorted(positions)[::-1]


def test_shared_frames_are_valid_protobuf() -> None:
    items = [Logged((i, 0), _event(str(i) * (i * 50))) for i in range(1, 6)]
    single = events_pb2.SubscribeResponse.FromString(items[0].frame())
    assert list(single.batch.events) == [items[0].event]
    assert single.batch.cursor == "1-0"
    assert items[0].frame() is items[0].frame(), "built once, shared by every subscriber"
    batch = events_pb2.EventBatch.FromString(batch_payload(items))
    assert list(batch.events) == [item.event for item in items]
    assert batch.cursor == "5-0"
    assert batch.SerializeToString() == batch_payload(items)


def test_ring_holds_everything_after_its_floor() -> None:
    ring = Ring(capacity=8)
    ring.append([Logged((i, 0), _event(str(i))) for i in range(1, 21)])
    assert ring.floor > (0, 0)
    assert not ring.covers((ring.floor[0] - 1, 0))
    held = ring.after(ring.floor, (20, 0), 100)
    assert [item.position[0] for item in held] == list(range(ring.floor[0] + 1, 21))
    assert [i.position[0] for i in ring.after((15, 0), (18, 0), 2)] == [16, 17]
    ring.reset([], (0, 0), known=False)
    assert not ring.covers((0, 0)), "an unknown log is never served from memory"


def _state(bus: EventBus) -> str:
    return bus.state  # a call, so the type checker does not pin a value across awaits


def _known(bus: EventBus) -> bool:
    return bus.ring.known


# -- Redis Streams ---------------------------------------------------------------------

BusFactory = Callable[..., "asyncio.Future[EventBus]"]


@pytest.fixture
async def buses(redis_server: RedisServer) -> AsyncIterator[list[EventBus]]:
    opened: list[EventBus] = []
    yield opened
    for bus in opened:
        await bus.close()


async def _open(
    buses: list[EventBus],
    url: str,
    *,
    retention: int = 10_000,
    memory: int = 100,
    timeout_s: float = TIMEOUT_S,
    hear_tokens: bool = True,
    tail: bool = True,
) -> EventBus:
    log = RedisLog(
        url,
        key="test:events",
        timeout_s=timeout_s,
        retention=retention,
        retention_s=86_400,
        memory=memory,
        outbox_limit=1_000,
        dedupe_window_s=60,
    )
    bus = EventBus(log, memory=memory, hear_tokens=hear_tokens)
    await bus.start()
    buses.append(bus)
    if tail:
        await bus.tail()  # as a process serving a subscriber does
    return bus


class _Collector:
    """A fan-out sink following one workspace, with an awaitable count."""

    def __init__(self, bus: EventBus, key: str = "workspaces/w") -> None:
        self.keys: tuple[str, ...] = (key,)
        self.watches: tuple[str, ...] = ()
        self.owner = "users/collector"
        self.items: list[Logged] = []
        self._changed = asyncio.Event()
        bus.fanout.attach(self)

    def push(self, item: Logged) -> bool:
        self.items.append(item)
        return True

    def wake(self) -> None:
        self._changed.set()

    def recheck(self) -> None:
        return None

    async def until(self, count: int) -> list[Logged]:
        async with asyncio.timeout(CALL_DEADLINE_S):
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.items


async def test_one_ordered_log_across_processes(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    # Ordering, not outages: 40 appends at once on a loaded 2-core machine can
    # take longer than the short timeout the fault tests use, and an append that
    # times out goes to the outbox without a cursor (CI saw it once).
    a = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    b = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    on_a, on_b = _Collector(a), _Collector(b)
    published = await asyncio.gather(
        *(
            bus.publish(_event(f"{name}{i}"))
            for i in range(20)
            for name, bus in (("a", a), ("b", b))
        )
    )
    assert all(event.cursor for event in published)
    seen_a = [item.event.id for item in await on_a.until(40)]
    seen_b = [item.event.id for item in await on_b.until(40)]
    assert seen_a == seen_b, "both processes see the same order"
    assert sorted(seen_a) == sorted(event.id for event in published)
    positions = [item.position for item in on_a.items]
    assert positions == sorted(positions)
    # Replay from storage (older than either ring) matches the live order.
    c = await _open(buses, redis_server.url, memory=10, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    replay = await c.read((0, 0), c.head, 1_000)
    assert [item.event.id for item in replay] == seen_a


async def test_publishing_during_a_pause_lands_exactly_once_after(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    bus = await _open(buses, redis_server.url)
    other = await _open(buses, redis_server.url)
    collector = _Collector(other)
    states: list[str] = []
    bus.on_state_change(states.append)
    first = await bus.publish(_event("before"))
    redis_server.pause()
    try:
        # Does not block the publisher: the event waits in the outbox, without a cursor yet.
        async with asyncio.timeout(TIMEOUT_S * 4):
            held = [await bus.publish(_event(f"during{i}")) for i in range(5)]
        assert bus.state == "degraded"
        assert all(not event.cursor for event in held[1:])
    finally:
        redis_server.resume()
    after = await bus.publish(_event("after"))
    got = await collector.until(7)
    # The first "during" publish timed out with its command already in Redis's
    # socket: it executed on SIGCONT and the retry was recognised as a duplicate.
    assert [i.event.id for i in got] == [e.id for e in [first, *held, after]]
    async with asyncio.timeout(CALL_DEADLINE_S):
        while _state(bus) != "ok":  # noqa: ASYNC110 - state has no event to wait on
            await asyncio.sleep(0.01)
    assert states[0] == "degraded"
    assert states[-1] == "ok"
    replay = await other.read((0, 0), other.head, 100)
    assert len({i.event.id for i in replay}) == len(replay) == 7, "no duplicate in the log"


async def test_kill_and_restart_flushes_the_outbox_in_order(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    bus = await _open(buses, redis_server.url)
    collector = _Collector(bus)
    before = [await bus.publish(_event(f"b{i}")) for i in range(3)]
    await collector.until(3)
    redis_server.kill()
    during = [await bus.publish(_event(f"d{i}")) for i in range(3)]
    assert bus.state == "degraded"
    redis_server.restart()
    got = await collector.until(6)
    assert [i.event.id for i in got] == [e.id for e in before + during]


async def test_trimmed_cursor_is_out_of_range(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    bus = await _open(buses, redis_server.url, retention=100, memory=50)
    first = await bus.publish(_event("first"))
    for i in range(600):
        await bus.publish(_event(str(i)))
    with pytest.raises(CursorExpired) as caught:
        await bus.check_cursor(parse_cursor(first.cursor) or (0, 0))
    oldest = caught.value.metadata["oldest_cursor"]
    position = parse_cursor(oldest)
    assert position is not None
    await bus.check_cursor(position)  # resuming after the oldest cursor is allowed


async def test_starting_while_redis_is_down_recovers_on_its_own(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    seed = await _open(buses, redis_server.url)
    old = await seed.publish(_event("old"))
    redis_server.pause()
    try:
        bus = await _open(buses, redis_server.url, tail=False)
        assert bus.state == "degraded"
        assert not bus.ring.known, "nothing is served from an unknown log"
        with pytest.raises(DependencyUnavailable):
            await bus.tail()  # a subscriber now is told to retry
    finally:
        redis_server.resume()
    async with asyncio.timeout(CALL_DEADLINE_S):
        while _state(bus) != "ok":  # noqa: ASYNC110 - found by a background task
            await asyncio.sleep(0.01)
    await bus.tail()
    assert _known(bus)
    assert old.id in [e.id for e in bus.recent()]
    collector = _Collector(bus)
    new = await bus.publish(_event("new"))
    assert [i.event.id for i in await collector.until(1)] == [new.id]


C1: Final = "workspaces/w/conversations/c1"
C2: Final = "workspaces/w/conversations/c2"


def _token(note: str, conversation: str) -> events_pb2.Event:
    event = _event(note)
    event.type = events_pb2.EVENT_TYPE_RUN_UPDATED
    event.conversation = conversation
    return event


async def _logged(bus: EventBus, note: str) -> tuple[int, ...]:
    logged = await bus.publish(_event(note))
    position = parse_cursor(logged.cursor)
    assert position is not None
    return position


def _tokens_in(bus: EventBus) -> list[str]:
    """The tokens a process's ring holds, in ring order."""
    return [item.event.actor.name for item in bus.ring.items() if item.token]


async def test_a_process_hears_the_tokens_of_the_conversations_it_follows_only(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    """Each conversation's tokens go on a stream of their own: a process that follows one
    conversation reads that one (not the other's), one that serves no stream of runs
    (``hear_tokens=False``) reads none, and a process does not hear its own back."""
    sender = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    follower = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    deaf = await _open(buses, redis_server.url, hear_tokens=False)
    unfollow = await follower.follow([C1])
    own = await sender.follow([C1])
    on_follower, on_sender = _Collector(follower, C1), _Collector(sender, C1)
    after = await _logged(sender, "logged")
    sender.announce([_token("c1-a", C1)], after=after)
    sender.announce([_token("c2", C2)], after=after)
    sender.announce([_token("c1-b", C1)], after=after)
    seen = [item.event.actor.name for item in await on_follower.until(2)]
    unfollow()
    own()
    assert seen == ["c1-a", "c1-b"]
    assert _tokens_in(follower) == ["c1-a", "c1-b"], "the other conversation's never came"
    assert [i.event.actor.name for i in on_sender.items] == ["c1-a", "c1-b"], "once each"
    assert _tokens_in(deaf) == []


async def test_a_conversation_followed_mid_run_is_read_back_where_its_tokens_were_said(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    """Tokens said while nothing on a process followed their conversation are read back
    when it is followed: filed after the logged event each followed, ahead of later
    ones, so a replay or a watch begun now has them; a subscriber already live is not
    sent them, and following it again hears none of them twice."""
    sender = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    late = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    # A process that follows all along: once it heard them, Redis has them.
    witness = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    await witness.follow([C1])
    on_late, on_witness = _Collector(late), _Collector(witness)
    first = await _logged(sender, "first")
    sender.announce([_token("one", C1), _token("two", C1)], after=first)
    second = await _logged(sender, "second")
    sender.announce([_token("three", C1)], after=second)
    await _logged(sender, "third")
    await on_witness.until(6)
    await on_late.until(3)
    assert _tokens_in(late) == []
    unfollow = await late.follow([C1])
    held = [item.event.actor.name for item in late.ring.items()]
    assert held == ["first", "one", "two", "second", "three", "third"]
    assert [i.event.actor.name for i in on_late.items] == ["first", "second", "third"]
    unfollow()
    again = await late.follow([C1])
    sender.announce([_token("four", C1)], after=second)
    async with asyncio.timeout(CALL_DEADLINE_S):
        while "four" not in _tokens_in(late):  # noqa: ASYNC110 - read by a background task
            await asyncio.sleep(0.01)
    again()
    assert _tokens_in(late) == ["one", "two", "three", "four"]


async def test_a_workspace_follower_hears_every_conversation_from_when_it_follows(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    """A workspace's or a user's subscriber spans conversations: its process reads the
    stream of every conversation's tokens, written while some process follows it."""
    sender = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    follower = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    witness = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    await witness.follow([C1])
    on_witness = _Collector(witness, C1)
    after = await _logged(sender, "logged")
    sender.announce([_token("before", C1)], after=after)
    await on_witness.until(1)  # said, and in Redis, before the follower follows
    unfollow = await follower.follow(["workspaces/w"])
    sender.announce([_token("c1", C1), _token("c2", C2)], after=after)
    async with asyncio.timeout(CALL_DEADLINE_S):
        while len(_tokens_in(follower)) < 2:  # noqa: ASYNC110 - read by a background task
            await asyncio.sleep(0.01)
    unfollow()
    assert _tokens_in(follower) == ["c1", "c2"]


async def test_an_entry_or_a_message_that_is_not_ours_is_skipped_and_the_readers_go_on(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    """Something else with access to Redis writes a stream entry that is not an event and
    a tokens message that does not decode: each is skipped (said once), and the stream
    reader and the token listener, which every subscriber of the process depends on, go
    on (they caught only Redis errors: one such entry stopped delivery for good)."""
    a = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    b = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    await b.follow([C1])
    on_b = _Collector(b)
    stranger = redis.Redis.from_url(redis_server.url)
    try:
        await stranger.xadd("test:events", {b"e": b"\xff not a protobuf"})
        await stranger.xadd("test:events", {b"other": b"field"})
        tokens = f"test:events:tokens:{C1}"
        await stranger.xadd(tokens, {b"o": b"12345678", b"b": b"\xff\xff not a batch"})
        await stranger.xadd(tokens, {b"other": b"field"})
    finally:
        await stranger.aclose()
    after = await a.publish(_event("after"))
    position = parse_cursor(after.cursor)
    assert position is not None
    a.announce([_token("token", C1)], after=position)
    seen = [item.event.actor.name for item in await on_b.until(2)]
    assert seen == ["after", "token"]


async def test_a_batch_appended_after_redis_lost_the_script_lands_once_each(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    """Several events go in one pipeline by the append script's digest (no SCRIPT EXISTS
    round trip before each). A Redis that lost the script (restarted, flushed) answers
    NOSCRIPT: the script is loaded again and the batch lands, each event once, in order."""
    bus = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    collector = _Collector(bus)
    first = [_event(f"first{i}") for i in range(3)]
    await bus.publish_many(first)
    client = redis.Redis.from_url(redis_server.url)
    try:
        await client.script_flush()
        assert await client.script_exists(bus_sha(bus)) == [False]
        second = [_event(f"second{i}") for i in range(3)]
        await bus.publish_many(second)
        assert await client.script_exists(bus_sha(bus)) == [True]
        # No SCRIPT EXISTS before a batch: one round trip per append.
        asked = await _script_exists_calls(client)
        third = [_event(f"third{i}") for i in range(3)]
        await bus.publish_many(third)
        assert await _script_exists_calls(client) == asked
    finally:
        await client.aclose()
    seen = [item.event.id for item in await collector.until(9)]
    assert seen == [event.id for event in (*first, *second, *third)]
    assert bus.state == "ok"
    stored = await bus.read((0, 0), bus.head, 100)
    assert [item.event.id for item in stored] == seen


async def _script_exists_calls(client: redis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))


def bus_sha(_bus: EventBus) -> str:
    """The append script's digest, as Redis names it."""
    return hashlib.sha1(_APPEND_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis's own name


# -- the whole log, or its control events --------------------------------------------------


def _member_changed(note: str) -> events_pb2.Event:
    event = _event(note)
    event.type = events_pb2.EVENT_TYPE_MEMBER_CHANGED
    return event


def _message(note: str) -> events_pb2.Event:
    event = _event(note)
    event.type = events_pb2.EVENT_TYPE_MESSAGE_CREATED
    event.conversation = C1
    return event


class _Heard:
    """A listener's events (as a cache's invalidation hears them), awaitable by count."""

    def __init__(self, bus: EventBus) -> None:
        self.notes: list[str] = []
        self._changed = asyncio.Event()
        bus.listen(self._on_event)

    def _on_event(self, event: events_pb2.Event) -> None:
        if not event.cursor or len(event.cursor.split("-")) == 2:  # logged, not a token
            self.notes.append(event.actor.name)
            self._changed.set()

    async def until(self, *notes: str) -> list[str]:
        async with asyncio.timeout(CALL_DEADLINE_S):
            while not set(notes) <= set(self.notes):
                self._changed.clear()
                await self._changed.wait()
        return self.notes


async def _open_lingering(buses: list[EventBus], url: str, linger_s: float) -> EventBus:
    log = RedisLog(
        url,
        key="test:events",
        timeout_s=OUTAGE_FREE_TIMEOUT_S,
        retention=10_000,
        retention_s=86_400,
        memory=100,
        outbox_limit=1_000,
        dedupe_window_s=60,
    )
    log.tail_linger_s = linger_s
    bus = EventBus(log, memory=100)
    await bus.start()
    buses.append(bus)
    return bus


async def test_a_process_that_needs_no_whole_log_hears_only_the_control_events(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    """A process that serves no subscriber, follows no other process's run and holds no
    feeder's lease reads the control stream, not the log: its caches' listeners hear a
    membership change, never another process's message; its ring serves nothing."""
    writer = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    idle = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S, tail=False)
    heard = _Heard(idle)
    on_writer = _Collector(writer)
    await writer.publish(_message("message"))
    await writer.publish(_member_changed("member"))
    await on_writer.until(2)
    assert await heard.until("member") == ["member"]
    assert not idle.ring.known
    assert [e.actor.name for e in idle.recent() if e.type != _member_changed("").type] == []
    newest = await idle.newest()
    assert newest == writer.head, "the log's head, asked of Redis"


async def test_a_process_that_begins_to_read_the_whole_log_misses_no_control_event(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    """Beginning to read the whole log: the control events said since the control stream
    was last read reach the listeners once each, the newest events are in the ring, and
    everything after is delivered; once nothing needs it (past its linger) the process
    goes back to the control stream from where it was, hearing nothing twice."""
    writer = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    process = await _open_lingering(buses, redis_server.url, linger_s=0.0)
    heard = _Heard(process)
    await writer.publish(_member_changed("first"))
    await heard.until("first")
    await writer.publish(_member_changed("second"))
    await writer.publish(_message("message"))
    untail = await process.tail()
    assert _known(process)
    ring = [item.event.actor.name for item in process.ring.items()]
    assert ring[-3:] == ["first", "second", "message"]
    await writer.publish(_message("live"))
    await heard.until("second", "live")
    assert heard.notes == ["first", "second", "live"]
    untail()
    async with asyncio.timeout(CALL_DEADLINE_S):
        while _known(process):  # noqa: ASYNC110 - the reader goes back in its next round
            await asyncio.sleep(0.01)
    await writer.publish(_message("unheard"))
    await writer.publish(_member_changed("third"))
    assert await heard.until("third") == ["first", "second", "live", "third"]


async def test_tokens_of_a_process_that_reads_no_whole_log_still_reach_a_follower(
    buses: list[EventBus], redis_server: RedisServer
) -> None:
    """A run's owner that serves no subscriber has nothing to show its tokens to: they go
    to the processes that follow the conversation at once (no wait for the owner's own
    read of the log), each numbered after the logged event it follows."""
    owner = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S, tail=False)
    follower = await _open(buses, redis_server.url, timeout_s=OUTAGE_FREE_TIMEOUT_S)
    await follower.follow([C1])
    on_follower = _Collector(follower, C1)
    after = await _logged(owner, "logged")
    owner.announce([_token("token", C1)], after=after)
    await on_follower.until(1)
    assert _tokens_in(follower) == ["token"]
    [token] = [item for item in follower.ring.items() if item.token]
    assert token.position[:2] >= after
    assert _tokens_in(owner) == []
