"""The calls table (migration 0029): SQL only, plain records out.

A call is stored as its serialized ``Call`` (``data``, built and read by ``book.py``;
never parsed here) beside the columns a list, a take-over and an erasure read: its state,
the dispatcher instance carrying it (``holder``) and the user it acts as. A workspace
keeps its newest ``MAX_KEPT`` calls: each insert drops the oldest ended ones beyond that.

The workspace's call quota (``CallQuota``) is checked in the insert's own transaction,
under the workspace's lock: the calls live on every replica, and the seconds answered
today (the ended calls' and the live ones' so far), so two replicas cannot both admit
the last call the quota allows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.errors import QuotaExceeded
from switchboard.platform.store.keyed import NEWEST_FIRST, Created, KeyedStore, Table
from switchboard.platform.store.models import CallRow, DispatcherLeaseRow
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import Idempotency, claim, retrying
from switchboard.platform.values.names import now

ENDED: Final = int(pb.CALL_STATE_ENDED)
ANSWERED: Final = int(pb.CALL_STATE_ANSWERED)
#: The RetryInfo of a refusal for calls live at once: a call's end cannot be foreseen.
CALLS_RETRY_S: Final = 30.0
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
    answered_at: dt.datetime | None = None


@dataclass(frozen=True)
class CallQuota:
    """A workspace's call quota (``WorkspaceQuota``); 0: no limit."""

    max_concurrent_calls: int = 0
    call_minutes_per_day: int = 0
    #: The quota's name, for a refusal (``workspaces/{w}/quota``).
    subject: str = ""


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
        answered_at=row.answered_at,
    )


def _seconds_today(db: Session, workspace_id: str, at: dt.datetime) -> float:
    """Seconds answered today (UTC) in the workspace: the ended calls' and, for the live
    ones, so far (a live call answered before midnight counts whole, as it will when it
    ends today)."""
    ended = db.execute(
        select(func.coalesce(func.sum(CallRow.seconds), 0)).where(
            CallRow.workspace_id == workspace_id, CallRow.usage_day == at.date().isoformat()
        )
    ).scalar_one()
    answered = db.execute(
        select(CallRow.answered_at).where(
            CallRow.workspace_id == workspace_id,
            CallRow.state != ENDED,
            CallRow.answered_at.is_not(None),
        )
    ).scalars()
    return float(ended) + sum(max(0.0, (at - a).total_seconds()) for a in answered if a)


def _check_quota(db: Session, workspace_id: str, quota: CallQuota) -> None:
    if quota.max_concurrent_calls:
        live = db.execute(
            select(func.count())
            .select_from(CallRow)
            .where(CallRow.workspace_id == workspace_id, CallRow.state != ENDED)
        ).scalar_one()
        if live >= quota.max_concurrent_calls:
            raise QuotaExceeded(
                f"the workspace has {live} calls live; its quota is "
                f"{quota.max_concurrent_calls}; retry when one ends",
                subject=quota.subject,
                retry_after_s=CALLS_RETRY_S,
            )
    if quota.call_minutes_per_day:
        used = _seconds_today(db, workspace_id, now())
        if used >= quota.call_minutes_per_day * 60:
            raise QuotaExceeded(
                f"the workspace's {quota.call_minutes_per_day} minutes of calls for today "
                "are spent",
                subject=quota.subject,
            )


#: Given (state, data) of a call as it stands, what it becomes: (state, data, the seconds
#: it was answered), or None for unchanged.
Change = Callable[[int, bytes], tuple[int, bytes, int] | None]


class CallStore(KeyedStore[CallRow, CallRecord, tuple[dt.datetime, str]]):
    table = Table(CallRow, _record, "call", "calls", NEWEST_FIRST)

    async def add(
        self,
        record: CallRecord,
        idempotency: Idempotency | None,
        staged: Staged[Created[CallRecord]] | None,
        quota: CallQuota | None = None,
    ) -> Created[CallRecord]:
        """Insert ``record``; for the retry of an earlier request with the same key, the
        call that one made as it now stands (nothing inserted). QuotaExceeded past the
        workspace's ``quota``."""

        def tx(db: Session) -> Created[CallRecord]:
            first = claim(db, idempotency, f"{record.workspace_id}/{record.id}")
            if first is not None:
                return Created(self._earlier(db, first), fresh=False)
            if quota is not None and (quota.max_concurrent_calls or quota.call_minutes_per_day):
                self._lock_workspace(db, record.workspace_id)
                _check_quota(db, record.workspace_id, quota)
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
                answered_at=record.created_at if record.state == ANSWERED else None,
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
            if row.state == ANSWERED and row.answered_at is None:
                row.answered_at = row.updated_at
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
                query = query.where(NEWEST_FIRST.where(CallRow, after))
            query = query.order_by(*NEWEST_FIRST.columns(CallRow)).limit(limit)
            return [_record(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)

    async def live_answered(self, holder: str, limit: int) -> list[CallRecord]:
        """The answered calls ``holder`` carries (for the minutes' quota)."""

        def tx(db: Session) -> list[CallRecord]:
            query = (
                select(CallRow)
                .where(CallRow.holder == holder, CallRow.state == ANSWERED)
                .limit(limit)
            )
            return [_record(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)

    async def seconds_today(self, workspace_id: str) -> float:
        """The workspace's seconds of calls answered today, live ones so far."""
        return await self._run(lambda db: _seconds_today(db, workspace_id, now()), write=False)

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
