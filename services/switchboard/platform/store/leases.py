"""One feeder at a time: a single-row table holding a cursor over the event log, the
replica that feeds from it, and when its lease ends (``webhook_cursor``,
``semantic_cursor``). The feeders advance the cursor themselves, in the transaction
that writes what they derived from the events; taking and giving up the lease is
the same for every such table, and lives here.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from switchboard.platform.store.db import Database
from switchboard.platform.store.storage import transaction
from switchboard.platform.values.names import now

#: The one row's id.
ROW_ID = 1


async def take_lease(
    database: Database, table: Any, holder: str, until: dt.datetime, *, log: logging.Logger
) -> str | None:
    """Hold or keep ``table``'s lease until ``until``: the cursor, or None if another
    replica holds it.

    The cursor is read under the row lock, so a replica taking over sees everything
    its predecessor committed. A lease another replica holds is seen in a read
    transaction first: the replicas that wait write nothing.
    """

    def held(db: Session) -> bool:
        row = db.execute(select(table.holder, table.lease_until).where(table.id == ROW_ID)).first()
        return (
            row is not None
            and row.holder not in ("", holder)
            and row.lease_until is not None
            and row.lease_until > now()
        )

    if await transaction(database, held, write=False, log=log):
        return None

    def work(db: Session) -> str | None:
        insert = sqlite_insert if database.dialect_name == "sqlite" else pg_insert
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

    return await transaction(database, work, write=True, log=log)


async def release_lease(
    database: Database, table: Any, holder: str, *, log: logging.Logger
) -> None:
    """Give ``table``'s lease up at once (a clean shutdown), so another replica feeds now."""

    def work(db: Session) -> None:
        db.execute(
            update(table)
            .where(table.id == ROW_ID, table.holder == holder)
            .values(holder="", lease_until=None)
        )

    await transaction(database, work, write=True, log=log)
