"""The calls table (migration 0029): SQL only, plain records out.

A call is stored as its serialized ``Call`` (``data``, built and read by ``book.py``;
never parsed here) beside the columns a list, a take-over and an erasure read: its state,
the dispatcher instance carrying it (``holder``) and the user it acts as. A workspace
keeps its newest ``MAX_KEPT`` calls: each insert drops the oldest ended ones beyond that.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import ColumnElement, and_, delete, or_, select
from sqlalchemy.orm import Session

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.store import pagination
from switchboard.platform.store.keyed import Created, KeyedStore, Table
from switchboard.platform.store.models import CallRow, DispatcherLeaseRow
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import Idempotency, claim, retrying
from switchboard.platform.values.names import now

ENDED: Final = int(pb.CALL_STATE_ENDED)
#: Calls a workspace keeps (the oldest ended ones go as new ones come).
MAX_KEPT: Final = 10_000


@dataclass(frozen=True)
class CallRecord:
    """One call as stored; ``data`` is its serialized ``Call``."""

    workspace_id: str
    id: str
    state: int
    holder: str
    user_id: str
    assistant_id: str
    data: bytes
    created_at: dt.datetime
    updated_at: dt.datetime
    #: Once ended: the UTC day it ended and how long it was answered (QueryUsage's).
    usage_day: str = ""
    seconds: int = 0


@dataclass(frozen=True)
class Holder:
    """Where a live call is carried: its holder's advertised address, and whether the
    holder's lease is current."""

    address: str
    live: bool


def _record(row: CallRow) -> CallRecord:
    return CallRecord(
        workspace_id=row.workspace_id,
        id=row.id,
        state=row.state,
        holder=row.holder,
        user_id=row.user_id,
        assistant_id=row.assistant_id,
        data=row.data,
        created_at=row.created_at,
        updated_at=row.updated_at,
        usage_day=row.usage_day,
        seconds=row.seconds,
    )


class ByNewest:
    """Newest first, by (created_at, id) descending: a console shows the latest calls."""

    @property
    def shape(self) -> tuple[pagination.Part, ...]:
        return (pagination.MICROS, pagination.ID)

    def after(self, key: list[str | int]) -> tuple[dt.datetime, str]:
        stamp, last = key
        return pagination.from_micros(stamp), str(last)

    def key(self, record: Any) -> list[str | int]:
        return [pagination.micros(record.created_at), record.id]

    def where(self, row: Any, after: tuple[dt.datetime, str]) -> ColumnElement[bool]:
        stamp, last = after
        return or_(row.created_at < stamp, and_(row.created_at == stamp, row.id < last))

    def columns(self, row: Any) -> tuple[Any, ...]:
        return (row.created_at.desc(), row.id.desc())


BY_NEWEST: Final = ByNewest()
#: Given (state, data) of a call as it stands, what it becomes: (state, data, the seconds
#: it was answered), or None for unchanged.
Change = Callable[[int, bytes], tuple[int, bytes, int] | None]


class CallStore(KeyedStore[CallRow, CallRecord, tuple[dt.datetime, str]]):
    table = Table(CallRow, _record, "call", "calls", BY_NEWEST)

    async def add(
        self,
        record: CallRecord,
        idempotency: Idempotency | None,
        staged: Staged[Created[CallRecord]] | None,
    ) -> Created[CallRecord]:
        """Insert ``record``; for the retry of an earlier request with the same key, the
        call that one made as it now stands (nothing inserted)."""

        def tx(db: Session) -> Created[CallRecord]:
            first = claim(db, idempotency, f"{record.workspace_id}/{record.id}")
            if first is not None:
                return Created(self._earlier(db, first), fresh=False)
            self._prune(db, record.workspace_id)
            row = CallRow(
                workspace_id=record.workspace_id,
                id=record.id,
                state=record.state,
                holder=record.holder,
                user_id=record.user_id,
                assistant_id=record.assistant_id,
                usage_day="",
                seconds=0,
                data=record.data,
                created_at=record.created_at,
                updated_at=record.updated_at,
            )
            return Created(self._added(db, row))

        async def run() -> Created[CallRecord]:
            return await self._run(staging(staged, tx), write=True)

        return await retrying(run)

    def _prune(self, db: Session, workspace_id: str) -> None:
        kept = (
            select(CallRow.id)
            .where(CallRow.workspace_id == workspace_id)
            .order_by(CallRow.created_at.desc(), CallRow.id.desc())
            .limit(MAX_KEPT - 1)
        )
        db.execute(
            delete(CallRow)
            .where(
                CallRow.workspace_id == workspace_id,
                CallRow.state == ENDED,
                CallRow.id.not_in(kept.scalar_subquery()),
            )
            .execution_options(synchronize_session=False)
        )

    async def change(
        self,
        workspace_id: str,
        call_id: str,
        change: Change,
        staged: Staged[CallRecord | None] | None,
    ) -> CallRecord | None:
        """``change`` applied to the locked row; None if there is no such call or the
        change left it as it was (an ended call never changes again)."""

        def tx(db: Session) -> CallRecord | None:
            row = db.get(CallRow, (workspace_id, call_id), with_for_update=True)
            if row is None or row.state == ENDED:
                return None
            made = change(row.state, row.data)
            if made is None:
                return None
            row.state, row.data, row.seconds = made
            row.updated_at = now()
            if row.state == ENDED:
                # Counted on the day it ended, as a run's usage is.
                row.usage_day = row.updated_at.date().isoformat()
            db.flush()
            return _record(row)

        return await self._run(staging(staged, tx), write=True)

    async def with_holder(
        self, workspace_id: str, call_id: str
    ) -> tuple[CallRecord, Holder] | None:
        def tx(db: Session) -> tuple[CallRecord, Holder] | None:
            found = db.execute(
                select(CallRow, DispatcherLeaseRow.address, DispatcherLeaseRow.expires_at)
                .outerjoin(DispatcherLeaseRow, DispatcherLeaseRow.instance == CallRow.holder)
                .where(CallRow.workspace_id == workspace_id, CallRow.id == call_id)
            ).first()
            if found is None:
                return None
            row, address, expires_at = found
            live = expires_at is not None and expires_at >= now()
            return _record(row), Holder(address=address or "", live=live)

        return await self._run(tx, write=False)

    async def listed(
        self,
        workspace_id: str,
        after: tuple[dt.datetime, str] | None,
        limit: int,
        *,
        live_only: bool,
    ) -> list[CallRecord]:
        def tx(db: Session) -> list[CallRecord]:
            query = select(CallRow).where(CallRow.workspace_id == workspace_id)
            if live_only:
                query = query.where(CallRow.state != ENDED)
            if after is not None:
                query = query.where(BY_NEWEST.where(CallRow, after))
            query = query.order_by(*BY_NEWEST.columns(CallRow)).limit(limit)
            return [_record(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)

    async def orphans(self, holder: str, limit: int) -> list[CallRecord]:
        """Calls not ended whose holder is not ``holder`` and has no current lease: the
        process carrying them stopped (their lines went down with it)."""

        def tx(db: Session) -> list[CallRecord]:
            query = (
                select(CallRow)
                .outerjoin(DispatcherLeaseRow, DispatcherLeaseRow.instance == CallRow.holder)
                .where(
                    CallRow.state != ENDED,
                    CallRow.holder != holder,
                    or_(
                        DispatcherLeaseRow.instance.is_(None),
                        DispatcherLeaseRow.expires_at < now(),
                    ),
                )
                .limit(limit)
            )
            return [_record(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)
