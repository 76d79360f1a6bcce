"""Persistence of a leased feeder (``feeder.py``): a single-row table holding a cursor
over the event log, the replica that feeds from it, and when its lease ends
(``webhook_cursor``, ``semantic_cursor``: the same columns, one table per feeder).

The cursor moves only by compare-and-set (``holder`` and the old ``cursor`` must
match) in the transaction that writes what the feeder's consumer made of the events
read (``advance``), so an event is taken once whichever replica reads it. The row
is locked by that update first: it is what orders feeders.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from switchboard.platform.store.db import Database
from switchboard.platform.store.storage import transaction
from switchboard.platform.values.names import now

#: The one row's id.
ROW_ID: Final = 1

#: What a consumer writes with a move of the cursor: the rows it made (a count).
Work = Callable[[Session], int]


def _nothing(_db: Session) -> int:
    return 0


class FeedStore:
    """The cursor row of one feeder's table (a mapped class with ``id``, ``cursor``,
    ``holder`` and ``lease_until``)."""

    def __init__(self, database: Database, table: Any, *, log: logging.Logger) -> None:
        self._database = database
        self._table = table
        self._log = log

    async def take_lease(self, holder: str, until: dt.datetime) -> str | None:
        """Hold or keep the lease until ``until``: the cursor, or None if another
        replica holds it.

        The cursor is read under the row lock, so a replica taking over sees
        everything its predecessor committed. A lease another replica holds is seen
        in a read transaction first: the replicas that wait write nothing.
        """
        table = self._table

        def held(db: Session) -> bool:
            row = db.execute(
                select(table.holder, table.lease_until).where(table.id == ROW_ID)
            ).first()
            return (
                row is not None
                and row.holder not in ("", holder)
                and row.lease_until is not None
                and row.lease_until > now()
            )

        if await transaction(self._database, held, write=False, log=self._log):
            return None

        def work(db: Session) -> str | None:
            insert = sqlite_insert if self._database.dialect_name == "sqlite" else pg_insert
            db.execute(
                insert(table)
                .values(id=ROW_ID, cursor="", holder="", lease_until=None)
                .on_conflict_do_nothing(index_elements=[table.id])
            )
            row = db.get(table, ROW_ID, with_for_update=True, populate_existing=True)
            if row is None:  # inserted above, in this transaction
                raise RuntimeError(f"the {table.__tablename__} row is missing")
            if (
                row.holder
                and row.holder != holder
                and row.lease_until is not None
                and row.lease_until > now()
            ):
                return None
            row.holder = holder
            row.lease_until = until
            cursor: str = row.cursor
            return cursor

        return await transaction(self._database, work, write=True, log=self._log)

    async def release_lease(self, holder: str) -> None:
        """Give the lease up at once (a clean shutdown), so another replica feeds now."""
        table = self._table

        def work(db: Session) -> None:
            db.execute(
                update(table)
                .where(table.id == ROW_ID, table.holder == holder)
                .values(holder="", lease_until=None)
            )

        await transaction(self._database, work, write=True, log=self._log)

    async def advance(
        self,
        holder: str,
        old_cursor: str,
        new_cursor: str,
        lease_until: dt.datetime,
        work: Work | None = None,
    ) -> int | None:
        """Move the cursor from ``old_cursor`` to ``new_cursor``, renew the lease to
        ``lease_until`` and run ``work`` in the same transaction.

        None if ``holder`` no longer holds the lease or the cursor moved meanwhile
        (nothing is written); else what ``work`` returned (0 without one).
        """
        table = self._table
        then = work or _nothing

        def moved(db: Session) -> int | None:
            result = db.execute(
                update(table)
                .where(table.id == ROW_ID, table.holder == holder, table.cursor == old_cursor)
                .values(cursor=new_cursor, lease_until=lease_until)
            )
            if not int(getattr(result, "rowcount", 0) or 0):
                return None
            return then(db)

        return await transaction(self._database, moved, write=True, log=self._log)


__all__ = ["ROW_ID", "FeedStore", "Work"]
