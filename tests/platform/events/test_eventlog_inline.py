"""A change's events logged in the change's own transaction (the embedded log on a
SQLite file): no outbox row, no second write, and delivery exactly as before.

What must hold: an acknowledged write has its event in the log whatever crashes (it
is in the same commit); events are delivered only after their commit, each once, in
log position order, whatever writes run together; a write whose commit lost its
answer, or a process that died before delivering, loses nothing and repeats nothing;
outbox rows an older version left are still published once. On PostgreSQL the outbox
path stays, and the same things hold.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import event as sql_event
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import LocalLog
from switchboard.platform.store.db import Database, Group, open_database
from switchboard.platform.store.models import EventLogRow, EventOutboxRow, RunRow
from switchboard.platform.store.outbox import Outbox, Staged, staging
from switchboard.platform.values.names import new_id, now
from tests.conftest import TEST_DATABASE_TIMEOUT_S

pytestmark = pytest.mark.unit


@dataclass
class Log:
    database: Database
    outbox: Outbox
    bus: EventBus
    local: LocalLog
    #: Every event delivered, in delivery order.
    delivered: list[events_pb2.Event]


async def _open(url: str) -> Log:
    database = await open_database(url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    outbox = Outbox(database, grace_s=0.0)
    local = LocalLog(database, retention=10_000, retention_s=3600, memory=1000, outbox=outbox)
    bus = EventBus(local, memory=1000, outbox=outbox)
    delivered: list[events_pb2.Event] = []
    bus.listen(delivered.append)
    await bus.start()
    return Log(database, outbox, bus, local, delivered)


async def _close(log: Log) -> None:
    await log.bus.close()
    await log.database.close()


@pytest.fixture
async def log(database_url: str) -> AsyncIterator[Log]:
    opened = await _open(database_url)
    try:
        yield opened
    finally:
        await _close(opened)


@pytest.fixture
async def sqlite_log(tmp_path: pathlib.Path) -> AsyncIterator[Log]:
    opened = await _open(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}")
    try:
        yield opened
    finally:
        await _close(opened)


def _event(note: str) -> events_pb2.Event:
    event = events_pb2.Event(type=events_pb2.EVENT_TYPE_CONVERSATION_CHANGED)
    event.actor.name = note
    return event


def _notes(events: Sequence[events_pb2.Event]) -> list[str]:
    return [event.actor.name for event in events]


async def _write(log: Log, *notes: str, fail: bool = False, key: str = "") -> Staged[str]:
    """One change (a row of its own) with ``notes``' events staged in its transaction;
    ``fail``: the change raises after staging them (rolled back)."""
    staged: Staged[str] = Staged(log.outbox, lambda _: [_event(note) for note in notes], key=key)

    def work(db: Session) -> str:
        return new_id()

    def failing(db: Session) -> str:
        staging(staged, work)(db)
        raise ValueError("the change fails after staging its events")

    await log.database.run(failing if fail else staging(staged, work), write=True)
    await log.bus.publish_staged(staged.events)
    return staged


async def _stored(database: Database) -> list[tuple[int, events_pb2.Event]]:
    async with database.readers() as db:
        rows = (await db.execute(select(EventLogRow.seq, EventLogRow.data))).all()
    return sorted((seq, events_pb2.Event.FromString(data)) for seq, data in rows)


async def _outbox_rows(database: Database) -> int:
    async with database.readers() as db:
        return len((await db.execute(select(EventOutboxRow.id))).all())


class Statements:
    """The SQL statements the group commit's thread runs."""

    def __init__(self, database: Database) -> None:
        self.seen: list[str] = []
        self._engine = database._sync_engine or database.engine.sync_engine
        sql_event.listen(self._engine, "before_cursor_execute", self._before)

    def _before(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.seen.append(statement.lstrip().upper())

    def remove(self) -> None:
        sql_event.remove(self._engine, "before_cursor_execute", self._before)


async def test_a_changes_events_are_in_the_log_in_its_own_commit_and_delivered_once(
    log: Log,
) -> None:
    statements = Statements(log.database)
    try:
        staged = await _write(log, "a", "b")
    finally:
        statements.remove()
    stored = await _stored(log.database)
    assert _notes([event for _, event in stored]) == ["a", "b"]
    assert _notes(log.delivered) == ["a", "b"]
    # Its writer learns where they were logged.
    assert [event.cursor for event in staged.events] == [f"{seq}-0" for seq, _ in stored]
    assert await _outbox_rows(log.database) == 0
    if log.database.group_commit:
        # One transaction: the change and its events; the outbox is never written.
        assert not any("EVENT_OUTBOX" in statement for statement in statements.seen)
        assert log.outbox.inline is not None
    else:
        assert log.outbox.inline is None  # PostgreSQL: staged, then logged, as before


async def test_a_change_that_rolls_back_delivers_nothing_and_later_ones_follow_in_order(
    log: Log,
) -> None:
    await _write(log, "a")
    with pytest.raises(ValueError, match="fails after staging"):
        await _write(log, "lost", fail=True)
    await _write(log, "b")
    await log.bus.publish_many([_event("c")])
    stored = await _stored(log.database)
    assert _notes([event for _, event in stored]) == ["a", "b", "c"]
    assert _notes(log.delivered) == ["a", "b", "c"]
    positions = [seq for seq, _ in stored]
    assert positions == sorted(positions)


async def test_concurrent_changes_and_appends_are_delivered_once_each_in_log_order(
    log: Log,
) -> None:
    async def change(index: int) -> None:
        await _write(log, f"change-{index}-0", f"change-{index}-1")

    async def append(index: int) -> None:
        await log.bus.publish_many([_event(f"append-{index}")])

    await asyncio.gather(
        *(change(i) for i in range(40)),
        *(append(i) for i in range(40)),
        *(_write(log, f"failed-{i}", fail=True) for i in range(10)),
        return_exceptions=True,
    )
    stored = await _stored(log.database)
    assert len(stored) == 120
    assert not any(note.startswith("failed") for note in _notes(log.delivered))
    # Delivered in position order, each once, exactly what the log holds.
    assert [event.cursor for event in log.delivered] == [f"{seq}-0" for seq, _ in stored]
    assert [event.id for event in log.delivered] == [event.id for _, event in stored]
    for i in range(40):
        notes = _notes(log.delivered)
        assert notes.index(f"change-{i}-1") == notes.index(f"change-{i}-0") + 1


class AnswerLost:
    """The next group commit commits, and then its answer is lost (its thread
    outlived the loop's wait): no after-commit callbacks, its writers see a failure."""

    def __init__(self, database: Database) -> None:
        self.real = database._commit_group
        self.lose_next = False
        database._commit_group = self.commit_group  # type: ignore[method-assign]

    def commit_group(self, works: Any, group: Group) -> Any:
        outcomes = self.real(works, group)
        if self.lose_next:
            self.lose_next = False
            raise TimeoutError("committed, but the answer did not arrive in time")
        return outcomes


async def test_a_change_whose_answer_was_lost_is_delivered_once_before_what_follows(
    sqlite_log: Log,
) -> None:
    log = sqlite_log
    lost = AnswerLost(log.database)
    await _write(log, "a")
    lost.lose_next = True
    # Built once: a write retried after a lost answer (a run's end) stores the same events.
    events = [_event("b"), _event("c")]
    staged: Staged[str] = Staged(log.outbox, lambda _: events)

    def change(db: Session) -> str:
        db.connection().execute(update(RunRow).where(RunRow.id == "none").values(state=0))
        return ""

    with pytest.raises(TimeoutError):
        await log.database.run(staging(staged, change), write=True)
    assert _notes(log.delivered) == ["a"]  # committed, but nobody heard of it
    # The writer retries the same change with the same events: logged once, where
    # the first attempt put them, and it learns their cursors.
    first_cursors = [event.cursor for event in staged.events]
    await log.database.run(staging(staged, change), write=True)
    await log.bus.publish_staged(staged.events)
    await _write(log, "d")
    stored = await _stored(log.database)
    assert _notes([event for _, event in stored]) == ["a", "b", "c", "d"]
    assert _notes(log.delivered) == ["a", "b", "c", "d"]
    assert [event.cursor for event in log.delivered] == [f"{seq}-0" for seq, _ in stored]
    assert [event.cursor for event in staged.events] == first_cursors


async def test_a_process_that_died_before_delivering_has_the_event_after_its_restart(
    tmp_path: pathlib.Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"
    log = await _open(url)
    try:
        await _write(log, "a")
        AnswerLost(log.database).lose_next = True
        staged: Staged[str] = Staged(log.outbox, lambda _: [_event("b")])
        with pytest.raises(TimeoutError):
            await log.database.run(staging(staged, lambda db: ""), write=True)
        assert _notes(log.delivered) == ["a"]
    finally:
        # The process dies here: no write after it reads back what it committed.
        await _close(log)
    restarted = await _open(url)
    try:
        await _write(restarted, "c")
        # The restart's log holds it once, before what came after; the outbox is empty,
        # so no relay publishes anything a second time.
        assert _notes(restarted.bus.recent()) == ["a", "b", "c"]
        assert await _outbox_rows(restarted.database) == 0
        assert await restarted.outbox.relay_once(restarted.bus.publish_many) == 0
    finally:
        await _close(restarted)


async def test_outbox_rows_an_older_version_left_are_published_once(log: Log) -> None:
    leftover = _event("left by an older version")
    leftover.id = new_id()
    leftover.time.FromDatetime(now())

    def stage(db: Session) -> None:
        db.add(
            EventOutboxRow(
                id=leftover.id,
                data=leftover.SerializeToString(),
                key="",
                created_at=now() - dt.timedelta(seconds=60),
            )
        )

    await log.database.run(stage, write=True)
    assert await log.outbox.relay_once(log.bus.publish_many) == 1
    await _write(log, "new")
    assert await log.outbox.relay_once(log.bus.publish_many) == 0
    assert _notes(log.delivered) == ["left by an older version", "new"]
    assert await _outbox_rows(log.database) == 0


async def test_an_event_insert_that_fails_fails_its_change_and_the_log_goes_on(
    sqlite_log: Log,
) -> None:
    log = sqlite_log

    def refuse(db: Session) -> None:
        # The database itself refuses the event's row (the insert runs on the driver).
        db.connection().exec_driver_sql(
            "CREATE TRIGGER refuse_events BEFORE INSERT ON event_log "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )

    def allow(db: Session) -> None:
        db.connection().exec_driver_sql("DROP TRIGGER refuse_events")

    await log.database.run(refuse, write=True)
    with pytest.raises(IntegrityError):
        await _write(log, "refused")
    await log.database.run(allow, write=True)
    await _write(log, "after")
    assert _notes(log.delivered) == ["after"]
    assert _notes([event for _, event in await _stored(log.database)]) == ["after"]
