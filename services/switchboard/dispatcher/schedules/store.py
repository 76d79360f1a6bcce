"""The schedules and schedule_firings tables: SQL, idempotency, the quota, etags, the claim.

A schedule is stored as its serialized ``Schedule`` settings (``data``, built and
read by ``catalog.py``; never parsed here) beside the columns that are queried.
Ticks are microseconds since the epoch. A tick is **claimed** in one
transaction that moves the schedule's ``next_fire_us`` on, conditional on the
value the claimer read, and inserts the tick's firing row, whose primary key
(schedule, tick) is the claim: two replicas cannot both commit one tick.

No ORM row leaves this module, and nothing here builds a resource name or
raises a request-field error. What every workspace's keyed records share (the
key, the quota, etags, pages, the delete) is ``platform/store/keyed.py``'s.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import ColumnElement, Select, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.store.keyed import BY_ID, Created, KeyedStore, Table
from switchboard.platform.store.models import DispatcherLeaseRow, ScheduleFiringRow, ScheduleRow
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import Idempotency
from switchboard.platform.values.names import now

ACTIVE: Final = int(pb.SCHEDULE_STATE_ACTIVE)
CLAIMED: Final = int(pb.FIRING_OUTCOME_CLAIMED)
#: Settled firings kept per schedule (the oldest go as new ticks are claimed): a
#: schedule firing every second would otherwise add 86,400 rows a day.
MAX_FIRINGS_KEPT: Final = 1_000


@dataclass(frozen=True)
class ScheduleRecord:
    """One schedule as stored; ``data`` is the serialized ``Schedule`` (its settings)."""

    workspace_id: str
    id: str
    uid: str
    data: bytes
    state: int
    next_fire_us: int | None
    last_fire_us: int | None
    last_run: str
    conversation_id: str
    creator: str
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int


@dataclass(frozen=True)
class FiringRecord:
    """One claimed tick; ``creator`` and ``uid`` are its schedule's."""

    workspace_id: str
    schedule_id: str
    fire_us: int
    claim_time: dt.datetime
    claimer: str
    outcome: int
    catch_up: bool
    run: str
    error: bytes
    request: bytes
    title: str
    creator: str = ""


@dataclass(frozen=True)
class NewFiring:
    """A firing a claim inserts: the tick it fires (CLAIMED) or one it skips."""

    fire_us: int
    outcome: int
    catch_up: bool = False
    error: bytes = b""
    request: bytes = b""
    title: str = ""


@dataclass(frozen=True)
class Edit:
    """What an update, a pause or a resume stores (``data`` None: unchanged)."""

    data: bytes | None
    state: int
    next_fire_us: int | None


def _record(row: ScheduleRow) -> ScheduleRecord:
    return ScheduleRecord(
        workspace_id=row.workspace_id,
        id=row.id,
        uid=row.uid,
        data=row.data,
        state=row.state,
        next_fire_us=row.next_fire_us,
        last_fire_us=row.last_fire_us,
        last_run=row.last_run,
        conversation_id=row.conversation_id,
        creator=row.creator,
        created_at=row.created_at,
        updated_at=row.updated_at,
        version=row.version,
    )


def _firing(row: ScheduleFiringRow, creator: str = "") -> FiringRecord:
    return FiringRecord(
        workspace_id=row.workspace_id,
        schedule_id=row.schedule_id,
        fire_us=row.fire_us,
        claim_time=row.claim_time,
        claimer=row.claimer,
        outcome=row.outcome,
        catch_up=row.catch_up,
        run=row.run,
        error=row.error,
        request=row.request,
        title=row.title,
        creator=creator,
    )


def _count(result: object) -> int:
    """Rows an UPDATE matched (``CursorResult.rowcount``; ``Session.execute`` is typed
    as returning a plain ``Result``)."""
    return int(getattr(result, "rowcount", 0))


def _prune(db: Session, workspace_id: str, schedule_id: str) -> None:
    """Drop the schedule's settled firings older than its ``MAX_FIRINGS_KEPT`` newest."""
    mine = (
        ScheduleFiringRow.workspace_id == workspace_id,
        ScheduleFiringRow.schedule_id == schedule_id,
    )
    oldest_kept = db.execute(
        select(ScheduleFiringRow.fire_us)
        .where(*mine)
        .order_by(ScheduleFiringRow.fire_us.desc())
        .offset(MAX_FIRINGS_KEPT - 1)
        .limit(1)
    ).scalar_one_or_none()
    if oldest_kept is not None:
        db.execute(
            delete(ScheduleFiringRow).where(
                *mine,
                ScheduleFiringRow.fire_us < oldest_kept,
                ScheduleFiringRow.outcome != CLAIMED,
            )
        )


def _orphan_filter(claimer: str) -> tuple[ColumnElement[bool], ...]:
    """Unsettled firings of claimers other than ``claimer`` with no live lease."""
    live = select(DispatcherLeaseRow.instance).where(DispatcherLeaseRow.expires_at >= now())
    return (
        ScheduleFiringRow.outcome == CLAIMED,
        ScheduleFiringRow.claimer != claimer,
        ScheduleFiringRow.claimer.not_in(live),
    )


def _orphans(claimer: str) -> Select[int]:
    return select(ScheduleFiringRow.fire_us).where(*_orphan_filter(claimer))


def _with_creator() -> Select[ScheduleFiringRow, str]:
    """Firings beside their schedule's creator (whom the runs they start act as)."""
    return select(ScheduleFiringRow, ScheduleRow.creator).join(
        ScheduleRow,
        and_(
            ScheduleRow.workspace_id == ScheduleFiringRow.workspace_id,
            ScheduleRow.id == ScheduleFiringRow.schedule_id,
        ),
    )


#: A schedule's firings go with it.
SCHEDULES: Final = Table(
    ScheduleRow,
    _record,
    noun="schedule",
    plural="schedules",
    order=BY_ID,
    dependents=((ScheduleFiringRow, "schedule_id"),),
)


class ScheduleStore(KeyedStore[ScheduleRow, ScheduleRecord, str]):
    table = SCHEDULES

    # -- the resource -----------------------------------------------------------------------

    async def create(
        self,
        record: ScheduleRecord,
        *,
        idempotency: Idempotency | None,
        max_per_workspace: int,
        staged: Staged[Created[ScheduleRecord]] | None,
    ) -> Created[ScheduleRecord]:
        """Insert ``record`` as the catalog made it (its uid, times and first tick), never
        fired yet, at version 1 (``_create``)."""

        def row() -> ScheduleRow:
            return ScheduleRow(
                workspace_id=record.workspace_id,
                id=record.id,
                uid=record.uid,
                data=record.data,
                state=record.state,
                next_fire_us=record.next_fire_us,
                last_fire_us=None,
                last_run="",
                conversation_id=record.conversation_id,
                creator=record.creator,
                created_at=record.created_at,
                updated_at=record.updated_at,
                version=1,
            )

        return await self._create(
            record.workspace_id, record.id, row, idempotency, max_per_workspace, staged
        )

    async def update(
        self,
        workspace_id: str,
        schedule_id: str,
        etag: str,
        edit: Callable[[ScheduleRecord], Edit],
        staged: Staged[ScheduleRecord | None] | None,
    ) -> ScheduleRecord | None:
        """Store ``edit(record)`` on the locked row and bump the version; None if missing."""

        def change(db: Session, row: ScheduleRow) -> ScheduleRecord:
            edited = edit(_record(row))
            if edited.data is not None:
                row.data = edited.data
            row.state = edited.state
            row.next_fire_us = edited.next_fire_us
            return self._bumped(db, row)

        return await self._update(workspace_id, schedule_id, etag, change, staged)

    async def firings(
        self, workspace_id: str, schedule_id: str, before_us: int | None, limit: int
    ) -> list[FiringRecord]:
        """The schedule's firings, newest tick first, before ``before_us`` (exclusive)."""

        def tx(db: Session) -> list[FiringRecord]:
            query = select(ScheduleFiringRow).where(
                ScheduleFiringRow.workspace_id == workspace_id,
                ScheduleFiringRow.schedule_id == schedule_id,
            )
            if before_us is not None:
                query = query.where(ScheduleFiringRow.fire_us < before_us)
            query = query.order_by(ScheduleFiringRow.fire_us.desc()).limit(limit)
            return [_firing(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)

    # -- the firing loop ------------------------------------------------------------------

    async def due(self, now_us: int, limit: int) -> tuple[list[ScheduleRecord], int | None]:
        """Active schedules whose next tick is at or before ``now_us``, soonest first,
        and the soonest next tick of any (``next_due``), in one read: an idle pass
        of the firing loop costs one transaction."""

        def tx(db: Session) -> tuple[list[ScheduleRecord], int | None]:
            query = (
                select(ScheduleRow)
                .where(ScheduleRow.state == ACTIVE, ScheduleRow.next_fire_us <= now_us)
                .order_by(ScheduleRow.next_fire_us)
                .limit(limit)
            )
            return [_record(row) for row in db.execute(query).scalars()], _next_due(db)

        return await self._run(tx, write=False)

    async def next_due(self) -> int | None:
        """The soonest next tick of any active schedule."""
        return await self._run(_next_due, write=False)

    async def claim(
        self,
        record: ScheduleRecord,
        *,
        next_fire_us: int | None,
        last_fire_us: int,
        firings: Sequence[NewFiring],
        claimer: str,
        staged: Staged[bool] | None,
    ) -> bool:
        """Claim ticks of ``record``: move its next tick on, conditional on the one it
        was read with, and insert ``firings``; False if another claimer (or a change)
        got there first. A concurrent insert of the same tick fails the transaction
        (Conflict from ``transaction``): the caller treats that as False too."""

        def tx(db: Session) -> bool:
            moved = db.execute(
                update(ScheduleRow)
                .where(
                    ScheduleRow.workspace_id == record.workspace_id,
                    ScheduleRow.id == record.id,
                    ScheduleRow.state == ACTIVE,
                    ScheduleRow.next_fire_us == record.next_fire_us,
                )
                .values(next_fire_us=next_fire_us, last_fire_us=last_fire_us)
                .execution_options(synchronize_session=False)
            )
            if _count(moved) != 1:
                return False
            stamp = now()
            for new in firings:
                db.add(
                    ScheduleFiringRow(
                        workspace_id=record.workspace_id,
                        schedule_id=record.id,
                        fire_us=new.fire_us,
                        claim_time=stamp,
                        claimer=claimer,
                        outcome=new.outcome,
                        catch_up=new.catch_up,
                        run="",
                        error=new.error,
                        request=new.request,
                        title=new.title,
                    )
                )
            db.flush()
            _prune(db, record.workspace_id, record.id)
            return True

        return await self._run(staging(staged, tx), write=True)

    async def settle(
        self,
        firing: FiringRecord,
        *,
        outcome: int,
        run: str,
        error: bytes,
        staged: Staged[FiringRecord | None] | None,
    ) -> FiringRecord | None:
        """Record a claimed tick's outcome (and its run as the schedule's last); None if
        it was settled already (a replay by another replica) or is gone."""

        def tx(db: Session) -> FiringRecord | None:
            row = db.get(
                ScheduleFiringRow,
                (firing.workspace_id, firing.schedule_id, firing.fire_us),
                with_for_update=True,
            )
            if row is None or row.outcome != CLAIMED:
                return None
            row.outcome = outcome
            row.run = run
            row.error = error
            if run:
                db.execute(
                    update(ScheduleRow)
                    .where(
                        ScheduleRow.workspace_id == firing.workspace_id,
                        ScheduleRow.id == firing.schedule_id,
                        or_(
                            ScheduleRow.last_fire_us.is_(None),
                            ScheduleRow.last_fire_us <= firing.fire_us,
                        ),
                    )
                    .values(last_run=run)
                    .execution_options(synchronize_session=False)
                )
            db.flush()
            return _firing(row, firing.creator)

        return await self._run(staging(staged, tx), write=True)

    async def claimed_by(self, claimer: str, limit: int) -> list[FiringRecord]:
        """Firings ``claimer`` claimed and has not settled, oldest first."""

        def tx(db: Session) -> list[FiringRecord]:
            rows = db.execute(
                _with_creator()
                .where(ScheduleFiringRow.outcome == CLAIMED, ScheduleFiringRow.claimer == claimer)
                .order_by(ScheduleFiringRow.fire_us)
                .limit(limit)
            ).all()
            return [_firing(row, creator) for row, creator in rows]

        return await self._run(tx, write=False)

    async def take_over(self, claimer: str, limit: int) -> list[FiringRecord]:
        """Move to ``claimer`` the unsettled firings of claimers whose dispatcher lease
        expired (or was dropped when their runs were taken over); each moves once,
        conditional on the claimer it was read with."""

        def orphaned(db: Session) -> bool:
            return db.execute(_orphans(claimer).limit(1)).first() is not None

        # Read first: a pass that finds nothing (nearly always) takes no write lock.
        if not await self._run(orphaned, write=False):
            return []

        def tx(db: Session) -> list[FiringRecord]:
            rows = db.execute(
                _with_creator()
                .where(*_orphan_filter(claimer))
                .order_by(ScheduleFiringRow.fire_us)
                .limit(limit)
            ).all()
            taken = []
            for row, creator in rows:
                moved = db.execute(
                    update(ScheduleFiringRow)
                    .where(
                        ScheduleFiringRow.workspace_id == row.workspace_id,
                        ScheduleFiringRow.schedule_id == row.schedule_id,
                        ScheduleFiringRow.fire_us == row.fire_us,
                        ScheduleFiringRow.claimer == row.claimer,
                        ScheduleFiringRow.outcome == CLAIMED,
                    )
                    .values(claimer=claimer)
                    .execution_options(synchronize_session=False)
                )
                if _count(moved) == 1:
                    taken.append(_firing(row, creator))
            return taken

        return await self._run(tx, write=True)


def _next_due(db: Session) -> int | None:
    value = db.execute(
        select(func.min(ScheduleRow.next_fire_us)).where(ScheduleRow.state == ACTIVE)
    ).scalar_one_or_none()
    return int(value) if value is not None else None
