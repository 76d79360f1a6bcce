"""The leased feeder (``platform/events/feeder.py``) on a real database, SQLite and
PostgreSQL, and the embedded event log: every event taken once and in log order
whichever replica feeds, the lease handed over at close and taken over after a
crash, what concerns the consumer not at all passed over without a transaction, a
new deployment starting at the head its replica started at, a cursor behind the log's
horizon, and the cursor's compare-and-set.

The consumer writes one row per event it takes (a workspace named by the event's
id) in the transaction that moves the cursor: a second take of an event would break
the row's key, and the rows and the stored cursor are read in one snapshot."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import LocalLog, Logged
from switchboard.platform.events.feeder import FeedSettings, LeasedFeeder
from switchboard.platform.events.feedstore import ROW_ID, Work
from switchboard.platform.store.db import Database, open_database
from switchboard.platform.store.models import WebhookCursorRow, WorkspaceRow
from switchboard.platform.values.names import now
from tests.conftest import CALL_DEADLINE_S, TEST_DATABASE_TIMEOUT_S

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

log = logging.getLogger("tests.feeder")

#: The workspace whose events the consumer takes; the others are not its concern.
MINE = "workspaces/mine"
OTHER = "workspaces/other"
GAP_WARNING = "test feeder cursor is outside the retained event log"


@dataclass
class Taker:
    """A consumer: one workspace row per event of ``MINE``, one ``gap-<n>`` row for
    each gap in the log."""

    takeovers: int = 0
    renewals: int = 0
    gaps: int = 0
    counts: list[int] = field(default_factory=list)

    def wakes(self, event: events_pb2.Event) -> bool:
        return event.workspace == MINE

    async def taken(self) -> None:
        self.takeovers += 1

    async def renewed(self) -> None:
        self.renewals += 1

    async def taking(self, items: Sequence[Logged]) -> Work | None:
        ids = [item.event.id for item in items if item.event.workspace == MINE]
        return _rows(ids) if ids else None

    def gap(self) -> Work | None:
        self.gaps += 1
        return _rows([f"gap-{self.gaps}"])

    def written(self, count: int) -> None:
        self.counts.append(count)


#: The order rows are written in, across transactions and feeders (kept in ``version``).
_WRITES = itertools.count(1)


def _rows(ids: Sequence[str]) -> Work:
    def work(db: Session) -> int:
        current = now()
        db.add_all(
            WorkspaceRow(id=ident, created_at=current, updated_at=current, version=next(_WRITES))
            for ident in ids
        )
        db.flush()
        return len(ids)

    return work


@dataclass
class World:
    database: Database
    bus: EventBus
    feeders: list[LeasedFeeder] = field(default_factory=list)

    def feeder(
        self,
        instance_id: str,
        consumer: Taker | None = None,
        *,
        batch: int = 8,
        lease_s: float = 1.0,
    ) -> LeasedFeeder:
        made = LeasedFeeder(
            self.database,
            self.bus,
            WebhookCursorRow,
            consumer or Taker(),
            FeedSettings(
                name="test feeder",
                lease_s=lease_s,
                poll_s=0.05,
                batch=batch,
                gap_warning=GAP_WARNING,
            ),
            instance_id=instance_id,
            log=log,
        )
        self.feeders.append(made)
        return made

    async def publish(self, count: int, workspace: str = MINE) -> list[events_pb2.Event]:
        events = [
            events_pb2.Event(type=events_pb2.EVENT_TYPE_WORKSPACE_CHANGED, workspace=workspace)
            for _ in range(count)
        ]
        await self.bus.publish_many(events)
        return events

    async def stored(self) -> tuple[list[str], str, str]:
        """The rows taken (in the order written), the stored cursor and its holder, in
        one snapshot."""

        def work(db: Session) -> tuple[list[str], str, str]:
            rows = db.execute(select(WorkspaceRow.id).order_by(WorkspaceRow.version)).scalars()
            cursor = db.get(WebhookCursorRow, ROW_ID)
            return (
                list(rows),
                cursor.cursor if cursor is not None else "",
                cursor.holder if cursor is not None else "",
            )

        return await self.database.run(work, write=False, snapshot=True)

    async def taken(self) -> set[str]:
        return set((await self.stored())[0])


@asynccontextmanager
async def world(url: str, *, retention: int = 10_000) -> AsyncIterator[World]:
    database = await open_database(url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    bus = EventBus(
        LocalLog(database, retention=retention, retention_s=86_400, memory=100), memory=100
    )
    await bus.start()
    made = World(database, bus)
    try:
        yield made
    finally:
        for feeder in made.feeders:
            await feeder.close()
        await bus.close()
        await database.close()


async def eventually(check: Callable[[], Awaitable[object]], what: str) -> None:
    deadline = time.monotonic() + CALL_DEADLINE_S
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)  # polling a stored state, under a deadline


async def running(feeder: LeasedFeeder) -> None:
    """Start ``feeder`` and wait until it feeds (a new deployment's cursor is at the
    head: what is published before that is not taken)."""
    await feeder.start()
    await eventually(lambda: _true(bool(feeder.fed)), "the feeder holding the lease")


def ids(events: Sequence[events_pb2.Event]) -> list[str]:
    return [event.id for event in events]


async def test_each_event_is_taken_once_in_log_order_whichever_replica_feeds(
    database_url: str,
) -> None:
    async with world(database_url) as w:
        taker = Taker()
        a, b = w.feeder("a", taker), w.feeder("b")
        await running(a)
        await b.start()
        first = [*await w.publish(5), *await w.publish(20)]

        async def all_taken(expected: list[str]) -> bool:
            return (await w.stored())[0] == expected

        await eventually(lambda: all_taken(ids(first)), "the first events taken")
        assert (a.feeding, b.feeding) == (True, False)
        assert (await w.stored())[1:] == (first[-1].cursor, "a")
        # Renewed every third of the lease; taken over (``taken``) only once.
        await eventually(lambda: _true(taker.renewals >= 3), "a renewing its lease")
        assert taker.takeovers == 1

        # A clean close hands the lease over at once: b feeds on from a's cursor.
        await a.close()
        assert (await w.stored())[2] == ""
        second = await w.publish(12)
        await eventually(lambda: all_taken(ids(first + second)), "the later events taken")
        assert (a.feeding, b.feeding) == (False, True)
        assert (await w.stored())[1:] == (second[-1].cursor, "b")


async def test_a_crashed_holders_lease_is_taken_over_once_it_lapses(database_url: str) -> None:
    async with world(database_url) as w:
        a = w.feeder("a")
        await running(a)
        before = await w.publish(3)
        await eventually(lambda: _has(w, ids(before)), "a taking the first events")
        await a.close(release=False)  # as a crash: the lease stays a's until it lapses
        assert (await w.stored())[2] == "a"

        taker = Taker()
        b = w.feeder("b", taker)
        await b.start()
        after = await w.publish(4)
        await eventually(lambda: _true(b.feeding), "b taking the lapsed lease over")
        await eventually(lambda: _has(w, ids(before + after)), "b taking the later events")
        assert taker.takeovers == 1
        assert (await w.stored())[0] == ids(before + after)


async def test_events_of_no_concern_make_no_transaction_until_the_lease_is_renewed(
    database_url: str,
) -> None:
    async with world(database_url) as w:
        taker = Taker()
        # Rounds driven one at a time; the lease is renewed 2 s after it was stored.
        feeder = w.feeder("a", taker, lease_s=6.0)
        await feeder.feed_once()  # the lease taken, the cursor at the head
        mine = await w.publish(2)
        assert await feeder.feed_once() is False  # fewer than a batch: nothing more now
        others = await w.publish(5, OTHER)
        assert await feeder.feed_once() is False
        assert feeder.fed == others[-1].cursor
        assert await w.stored() == (ids(mine), mine[-1].cursor, "a")
        # How far it read is stored with the lease's next renewal.
        await feeder.start()
        await eventually(
            lambda: _stored_cursor(w, others[-1].cursor), "the renewal storing the cursor"
        )
        assert (await w.stored())[0] == ids(mine)
        assert taker.counts == [2]


async def test_a_new_deployment_starts_at_the_head(database_url: str) -> None:
    async with world(database_url) as w:
        earlier = await w.publish(4)
        feeder = w.feeder("a")
        await feeder.start()
        await eventually(lambda: _stored_cursor(w, earlier[-1].cursor), "the cursor at the head")
        later = await w.publish(2)
        await eventually(lambda: _has(w, ids(later)), "the later events taken")
        assert (await w.stored())[0] == ids(later)


async def test_a_new_deployment_takes_what_came_after_its_start_before_its_lease(
    database_url: str,
) -> None:
    # Another replica's lease, never fed, lapses 1 s from now: the feeder started now
    # takes it over then with no cursor stored. What was published after it started is
    # its to take (a process reads the whole log only once it holds the lease).
    async with world(database_url) as w:
        earlier = await w.publish(2)
        feeder = w.feeder("a")
        assert await feeder.store.take_lease("b", now() + dt.timedelta(seconds=1)) == ""
        await feeder.start()
        meanwhile = await w.publish(3)
        await eventually(lambda: _true(feeder.feeding), "the feeder taking the lapsed lease")
        await eventually(lambda: _has(w, ids(meanwhile)), "the events published meanwhile")
        assert (await w.stored())[0] == ids(meanwhile)
        assert earlier[-1].cursor < meanwhile[0].cursor


async def test_a_cursor_behind_the_horizon_writes_the_gap_and_feeds_on(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with world(database_url, retention=10) as w:
        taker = Taker()
        first = w.feeder("a", taker, batch=200)
        await running(first)
        before = await w.publish(1)
        await eventually(lambda: _has(w, ids(before)), "the first event taken")
        await first.close()
        # Enough events while it is away for the log to trim (it trims every 1000).
        await w.publish(1005, OTHER)
        again = w.feeder("a", taker, batch=200)
        with caplog.at_level(logging.WARNING, logger=log.name):
            await again.start()
            after = await w.publish(2)
            await eventually(lambda: _has(w, ["gap-1", *ids(after)]), "the gap and later events")
        assert [r.message for r in caplog.records if r.name == log.name] == [GAP_WARNING]
        assert (await w.stored())[0] == [*ids(before), "gap-1", *ids(after)]


async def test_the_cursor_moves_only_by_compare_and_set(database_url: str) -> None:
    async with world(database_url) as w:
        a, b = w.feeder("a"), w.feeder("b")
        cursor = await a.store.take_lease("a", now())  # a lease that has lapsed already
        assert cursor == ""
        assert await b.store.take_lease("b", b.lease_until()) == ""
        # a still believes it holds the lease: its move, and what it writes, are refused.
        assert await a.store.advance("a", "", "1-0", a.lease_until(), _rows(["lost"])) is None
        assert await b.store.advance("b", "0-0", "1-0", b.lease_until(), _rows(["stale"])) is None
        assert await b.store.advance("b", "", "1-0", b.lease_until(), _rows(["moved"])) == 1
        assert await w.stored() == (["moved"], "1-0", "b")
        await b.store.release_lease("b")
        assert (await w.stored())[2] == ""


async def _true(value: bool) -> bool:
    return value


async def _has(w: World, expected: Sequence[str]) -> bool:
    return set(expected) <= await w.taken()


async def _stored_cursor(w: World, cursor: str) -> bool:
    return (await w.stored())[1] == cursor
