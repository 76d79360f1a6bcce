"""The outbox's rows once their events landed in a log that is not the database
(``platform/store/outbox.py``: the Redis log's ``landed``), on SQLite and PostgreSQL:
the rows of changes landing close together go in one delete transaction, not one
each; a full batch goes at once; none is left, and none is published again by the
relay meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.store.db import Database, open_database
from switchboard.platform.store.models import EventOutboxRow
from switchboard.platform.store.outbox import Outbox
from tests.conftest import CALL_DEADLINE_S, TEST_DATABASE_TIMEOUT_S

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    made = await open_database(database_url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    try:
        yield made
    finally:
        await made.close()


class Counted(Outbox):
    """An outbox that counts its delete transactions."""

    deletes: list[int]

    async def _delete(self, ids: list[str]) -> None:
        # Counted before the transaction: a test that sees the rows gone (another
        # connection can, before this coroutine resumes) sees every delete counted.
        self.deletes.append(len(ids))
        await super()._delete(ids)


async def staged(database: Database, outbox: Outbox, count: int) -> list[events_pb2.Event]:
    """``count`` events, each staged by a change (a transaction) of its own."""
    events = []
    for _ in range(count):
        event = events_pb2.Event(type=events_pb2.EVENT_TYPE_WORKSPACE_CHANGED, workspace="w")

        def work(db: Session, event: events_pb2.Event = event) -> None:
            outbox.stage(db, [event])

        await database.run(work, write=True)
        events.append(event)
    return events


async def rows(database: Database) -> int:
    def work(db: Session) -> int:
        return int(db.scalar(select(func.count()).select_from(EventOutboxRow)) or 0)

    return await database.run(work, write=False)


async def relayed_nothing(events: Sequence[events_pb2.Event]) -> None:
    raise AssertionError(f"the relay published {len(events)} events that had landed")


async def until_rows(database: Database, count: int) -> None:
    deadline = time.monotonic() + CALL_DEADLINE_S
    while await rows(database) != count:
        assert time.monotonic() < deadline, f"timed out waiting for {count} rows left"
        await asyncio.sleep(0.02)  # polling a stored state, under a deadline


async def test_the_rows_of_changes_landing_apart_go_in_one_delete(database: Database) -> None:
    # A gathering longer than the test: only the close (or a full batch) deletes.
    outbox = Counted(database, grace_s=0.0, gather_s=600.0)
    outbox.deletes = []
    events = await staged(database, outbox, 5)
    outbox.start(relayed_nothing)
    try:
        outbox.publishing(events)
        for event in events:
            # Each landing apart, with a database round trip between (as appends come).
            outbox.landed([event])
            assert await rows(database) == 5
        assert outbox.deletes == []
        await outbox.close()
        assert outbox.deletes == [5]
        assert await rows(database) == 0
        assert outbox.pending == set()
    finally:
        await outbox.close()  # again, if the test stopped before it: nothing left to do


async def test_a_full_batch_is_deleted_without_waiting_for_the_gathering(
    database: Database,
) -> None:
    outbox = Counted(database, grace_s=0.0, gather_s=600.0)
    outbox.deletes = []
    many = [
        events_pb2.Event(id=f"e{n:03}", type=events_pb2.EVENT_TYPE_WORKSPACE_CHANGED)
        for n in range(450)
    ]

    def work(db: Session) -> None:
        outbox.stage(db, many)

    await database.run(work, write=True)
    outbox.start(relayed_nothing)
    try:
        outbox.publishing(many)
        outbox.landed(many)
        await until_rows(database, 0)
        assert outbox.deletes == [200, 200, 50]
        assert outbox.pending == set()
    finally:
        await outbox.close()
