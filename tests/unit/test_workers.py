"""Internal workers: a Redis consumer group shares the log's events, and XAUTOCLAIM
takes over what a dead consumer left pending (real redis-server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.bus import EventBus
from switchboard.platform.eventlog import Logged, RedisLog
from switchboard.platform.workers import Handler, StreamWorker
from tests.infra.redis import RedisServer

TIMEOUT_S = 0.2
DEADLINE_S = 10.0
KEY = "test:work"


@pytest.fixture
async def bus(redis_server: RedisServer) -> AsyncIterator[EventBus]:
    log = RedisLog(
        redis_server.url,
        key=KEY,
        timeout_s=TIMEOUT_S,
        retention=10_000,
        retention_s=86_400,
        memory=100,
        outbox_limit=100,
        dedupe_window_s=60,
    )
    bus = EventBus(log, memory=100)
    await bus.start()
    yield bus
    await bus.close()


class Group:
    """Runs workers of one group; stops them all at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.running: dict[str, StreamWorker] = {}

    def start(self, name: str, handler: Handler, **options: object) -> StreamWorker:
        options.setdefault("timeout_s", TIMEOUT_S)
        worker = StreamWorker(
            self.url,
            key=KEY,
            group="g",
            consumer=name,
            handler=handler,
            start="0",
            **options,  # type: ignore[arg-type]
        )
        worker.start()
        self.running[name] = worker
        return worker

    async def stop(self, name: str) -> None:
        await self.running.pop(name).close()

    async def stop_all(self) -> None:
        for name in list(self.running):
            await self.stop(name)


@pytest.fixture
async def group(redis_server: RedisServer) -> AsyncIterator[Group]:
    running = Group(redis_server.url)
    yield running
    await running.stop_all()


def _event(note: str) -> events_pb2.Event:
    event = events_pb2.Event(type=events_pb2.EVENT_TYPE_WORKSPACE_CHANGED, workspace="workspaces/w")
    event.actor.name = note
    return event


class Record:
    def __init__(self) -> None:
        self.handled: list[tuple[str, str]] = []
        self.changed = asyncio.Event()

    def handler(self, name: str) -> Handler:
        async def handle(item: Logged) -> None:
            self.handled.append((name, item.event.id))
            self.changed.set()

        return handle

    async def until(self, count: int) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while len(self.handled) < count:
                self.changed.clear()
                await self.changed.wait()


async def test_each_event_goes_to_one_member_of_the_group(bus: EventBus, group: Group) -> None:
    record = Record()
    # Delivery is at least once: a command that times out (an ack, under a loaded
    # machine) makes an event come again. Generous bounds keep this test about
    # the normal path; the failure paths have their own tests.
    group.start("a", record.handler("a"), timeout_s=2.0)
    group.start("b", record.handler("b"), timeout_s=2.0)
    published = [await bus.publish(_event(str(i))) for i in range(60)]
    await record.until(60)
    handled_ids = [event_id for _, event_id in record.handled]
    assert sorted(handled_ids) == sorted(e.id for e in published)
    assert len(set(handled_ids)) == len(handled_ids), "no event handled twice"


async def test_a_dead_consumers_pending_events_are_claimed(bus: EventBus, group: Group) -> None:
    entered = asyncio.Event()

    async def hang(item: Logged) -> None:
        entered.set()
        await asyncio.Event().wait()  # a consumer stuck forever, then killed

    group.start("doomed", hang)
    stuck = await bus.publish(_event("stuck"))
    async with asyncio.timeout(DEADLINE_S):
        await entered.wait()
    await group.stop("doomed")  # dies with the entry pending, never acknowledged
    record = Record()
    group.start("rescuer", record.handler("rescuer"), min_idle_s=0.1)
    later = await bus.publish(_event("later"))
    await record.until(2)
    assert sorted(event_id for _, event_id in record.handled) == sorted([stuck.id, later.id])


async def test_a_poison_event_is_dropped_after_max_deliveries(bus: EventBus, group: Group) -> None:
    attempts: list[str] = []
    record = Record()

    async def fail_on_poison(item: Logged) -> None:
        if item.event.actor.name == "poison":
            attempts.append(item.event.id)
            raise RuntimeError("cannot handle this one")
        await record.handler("w")(item)

    group.start("w", fail_on_poison, min_idle_s=0.05, max_deliveries=3)
    poison = await bus.publish(_event("poison"))
    await bus.publish(_event("fine"))
    await record.until(1)
    async with asyncio.timeout(DEADLINE_S):
        while len(attempts) < 3:  # noqa: ASYNC110 - retries happen on the worker's own schedule
            await asyncio.sleep(0.02)
    # Dropped after the third failure: acknowledged, never retried again.
    client = group.running["w"]._client
    async with asyncio.timeout(DEADLINE_S):
        while (await client.xpending(KEY, "g"))["pending"]:  # noqa: ASYNC110 - polled state
            await asyncio.sleep(0.02)
    assert attempts == [poison.id] * 3


async def test_a_consumer_handles_its_own_pending_entries_first(
    bus: EventBus, group: Group, redis_server: RedisServer
) -> None:
    """Entries Redis handed to a consumer whose reply it lost (a read that timed out under
    load, a restart) are handled when it resumes, not only after ``min_idle_s``."""
    published = [await bus.publish(_event(str(i))) for i in range(5)]
    # What a lost reply leaves behind: the entries are pending on "a", never handled.
    reader = Redis.from_url(redis_server.url)
    try:
        await reader.xgroup_create(KEY, "g", id="0", mkstream=True)
        lost: Any = await reader.xreadgroup("g", "a", {KEY: ">"}, count=100)
        assert len(lost[0][1]) == 5
    finally:
        await reader.aclose()
    record = Record()
    # An idle claim would take a minute: only the consumer's own recovery can be in time.
    group.start("a", record.handler("a"), min_idle_s=60)
    await record.until(5)
    assert sorted(event_id for _, event_id in record.handled) == sorted(e.id for e in published)
