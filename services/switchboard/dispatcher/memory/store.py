"""The forming jobs (``memory_jobs``): written by the feeder with its cursor, claimed
by the workers of every replica, each claim with an expiry.

* A job is **claimed** by setting ``claimer`` and ``claimed_until``; a claim that
  lapses (its worker died) makes the job due again. Every write of a worker is
  guarded by its claim (claimer and expiry unchanged), so a worker that lost its
  claim writes nothing.
* ``exchange`` may grow while a job is claimed (an idle conversation's later run
  joins it): ``finish`` keeps the exchanges it did not form, due, with no plan.
* ``plan`` (state ``decided``) is stored before a decision is applied: a job
  retaken with a plan applies it, and does not ask the model again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from switchboard.dispatcher.memory.plans.plan import (
    CONSOLIDATE,
    DECIDED,
    FORM,
    PAUSED,
    PENDING,
    Exchange,
    Turn,
)
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import MemoryJobRow, WorkspaceRow
from switchboard.platform.store.storage import transaction
from switchboard.platform.values.names import now

log = logging.getLogger("switchboard.dispatcher.memory")

_T = TypeVar("_T")
MAX_ERROR_CHARS: Final = 512


@dataclass
class Job:
    """A job a worker holds until ``claimed_until`` (moved on by ``renew``)."""

    id: str
    kind: str
    workspace_id: str
    conversation: str
    user_id: str
    exchange: bytes
    plan: bytes
    state: str
    attempts: int
    claimer: str
    claimed_until: dt.datetime


@dataclass(frozen=True)
class NewTurn:
    """A finished run for the feeder to write: its own job (``merge`` false), or
    joined to its conversation's idle job, which it pushes back to ``not_before``."""

    job_id: str
    workspace_id: str
    conversation: str
    exchange: Exchange
    turn: Turn
    not_before: dt.datetime
    merge: bool


def _count(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


class JobStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    @staticmethod
    def _held(job: Job) -> Any:
        return and_(
            MemoryJobRow.id == job.id,
            MemoryJobRow.claimer == job.claimer,
            MemoryJobRow.claimed_until == job.claimed_until,
        )

    # -- the feeder ------------------------------------------------------------------

    def feeding(self, turns: Sequence[NewTurn]) -> Callable[[Session], int]:
        """The jobs of ``turns``, as the work of the feeder's transaction."""

        def work(db: Session) -> int:
            made = 0
            alive = set(
                db.scalars(
                    select(WorkspaceRow.id).where(
                        WorkspaceRow.id.in_({t.workspace_id for t in turns})
                    )
                )
            )
            for new in turns:
                if new.workspace_id not in alive:
                    continue  # purged since the run ended
                row = db.get(MemoryJobRow, new.job_id, with_for_update=True)
                if row is None:
                    db.add(
                        _new_row(
                            new.job_id,
                            FORM,
                            new.workspace_id,
                            new.exchange.dumps(),
                            new.not_before,
                            conversation=new.conversation,
                            run=new.turn.run,
                            assistant=new.exchange.assistant,
                            user_id=new.exchange.user_id,
                        )
                    )
                    made += 1
                elif new.merge:
                    # The latest run's policy and assistant form the whole conversation.
                    joined = replace(
                        new.exchange, turns=Exchange.loads(row.exchange).adding(new.turn).turns
                    )
                    row.exchange = joined.dumps()
                    row.run = new.turn.run
                    row.not_before = max(row.not_before, new.not_before)
                    made += 1
                db.flush()
            return made

        return work

    # -- the workers -----------------------------------------------------------------

    async def claim(
        self, me: str, until: dt.datetime, limit: int
    ) -> tuple[list[Job], dt.datetime | None]:
        """Up to ``limit`` due jobs claimed until ``until``; and when the next job not
        due yet falls due (None: none waits)."""

        def look(db: Session) -> tuple[bool, dt.datetime | None]:
            current = now()
            found = db.scalar(
                select(MemoryJobRow.id)
                .where(MemoryJobRow.not_before <= current, _free(current))
                .limit(1)
            )
            return found is not None, _later(db, current)

        # An idle worker writes nothing: a read first, a claim only when one is due.
        anything, later = await self._run(look, write=False)
        if not anything:
            return [], later

        def work(db: Session) -> tuple[list[Job], dt.datetime | None]:
            current = now()
            free = _free(current)
            rows = list(
                db.scalars(
                    select(MemoryJobRow)
                    .where(MemoryJobRow.not_before <= current, free)
                    .order_by(MemoryJobRow.not_before)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            )
            jobs = []
            for row in rows:
                row.claimer, row.claimed_until = me, until
                jobs.append(
                    Job(
                        id=row.id,
                        kind=row.kind,
                        workspace_id=row.workspace_id,
                        conversation=row.conversation,
                        user_id=row.user_id,
                        exchange=row.exchange,
                        plan=row.plan,
                        state=row.state,
                        attempts=row.attempts,
                        claimer=me,
                        claimed_until=until,
                    )
                )
            db.flush()
            return jobs, _later(db, current)

        return await self._run(work, write=True)

    async def renew(self, jobs: Sequence[Job], until: dt.datetime) -> None:
        """Extend the claims still held; a job whose claim was lost keeps its old
        ``claimed_until`` (and its worker's writes are skipped)."""

        def work(db: Session) -> list[Job]:
            return [
                job
                for job in jobs
                if _count(
                    db.execute(
                        update(MemoryJobRow).where(self._held(job)).values(claimed_until=until)
                    )
                )
            ]

        for job in await self._run(work, write=True):
            job.claimed_until = until

    async def store_plan(self, job: Job, plan: bytes) -> bool:
        """Store the plan (state ``decided``) or its progress; whether the claim held."""

        def work(db: Session) -> int:
            return _count(
                db.execute(
                    update(MemoryJobRow)
                    .where(self._held(job))
                    .values(plan=plan, state=DECIDED, last_error="")
                )
            )

        if await self._run(work, write=True):
            job.plan, job.state = plan, DECIDED
            return True
        return False

    async def finish(self, job: Job, done: Sequence[str]) -> bool:
        """The job is done with ``done`` (the runs an exchange job formed, the users a
        consolidation went over): deleted, or kept with what joined it meanwhile or is
        left, due, with no plan. Whether the claim held."""

        def work(db: Session) -> bool:
            row = db.scalars(select(MemoryJobRow).where(self._held(job)).with_for_update()).first()
            if row is None:
                return False
            left = Exchange.loads(row.exchange).without(done)
            if not left.turns:
                db.delete(row)
                return True
            row.exchange = left.dumps()
            row.plan, row.state, row.attempts, row.last_error = b"", PENDING, 0, ""
            row.claimer, row.claimed_until = "", None
            return True

        return await self._run(work, write=True)

    async def put_back(
        self, job: Job, when: dt.datetime, error: str, *, paused: bool = False
    ) -> None:
        """Give the job back, due at ``when``, with ``error`` and one more attempt (a
        plan stored stays); ``paused``: it waits for a budget's room."""

        def work(db: Session) -> None:
            values: dict[str, Any] = {
                "not_before": when,
                "claimer": "",
                "claimed_until": None,
                "last_error": error[:MAX_ERROR_CHARS],
            }
            if paused:
                values["state"] = PAUSED
            else:
                values["attempts"] = MemoryJobRow.attempts + 1
            db.execute(update(MemoryJobRow).where(self._held(job)).values(**values))

        await self._run(work, write=True)

    async def release(self, jobs: Sequence[Job]) -> None:
        """Make claimed jobs due again at once (a clean shutdown)."""

        def work(db: Session) -> None:
            for job in jobs:
                db.execute(
                    update(MemoryJobRow)
                    .where(self._held(job))
                    .values(claimer="", claimed_until=None)
                )

        await self._run(work, write=True)

    async def wake_paused(self, workspace_id: str) -> int:
        """A workspace's budgets changed: its paused jobs are due now."""

        def work(db: Session) -> int:
            return _count(
                db.execute(
                    update(MemoryJobRow)
                    .where(
                        MemoryJobRow.workspace_id == workspace_id,
                        MemoryJobRow.state == PAUSED,
                    )
                    .values(not_before=now(), state=PENDING)
                )
            )

        return await self._run(work, write=True)

    async def consolidate(
        self, workspace_id: str, user_id: str, users: Sequence[str], when: dt.datetime
    ) -> None:
        """Ask for the workspace's consolidation at ``when`` (or sooner, if asked
        already), over its scope and ``users``' scopes; ``user_id`` acts for it."""
        job_id = f"{CONSOLIDATE}:{workspace_id}"

        def work(db: Session) -> None:
            row = db.get(MemoryJobRow, job_id, with_for_update=True)
            if row is None:
                exchange = Exchange((), "", user_id, "", b"", b"")
                db.add(
                    _new_row(
                        job_id,
                        CONSOLIDATE,
                        workspace_id,
                        _users(exchange, users),
                        when,
                        user_id=user_id,
                    )
                )
                return
            merged = _users(Exchange.loads(row.exchange), users)
            if merged != row.exchange:
                row.exchange = merged
            row.user_id = user_id
            row.not_before = min(row.not_before, when)

        await self._run(work, write=True)

    async def drop(self, job: Job) -> None:
        """Delete a job whatever it holds (recorded FAILED)."""

        def work(db: Session) -> None:
            db.execute(delete(MemoryJobRow).where(self._held(job)))

        await self._run(work, write=True)


def _new_row(
    job_id: str,
    kind: str,
    workspace_id: str,
    exchange: bytes,
    not_before: dt.datetime,
    **fields: str,
) -> MemoryJobRow:
    return MemoryJobRow(
        id=job_id,
        kind=kind,
        workspace_id=workspace_id,
        exchange=exchange,
        plan=b"",
        state=PENDING,
        enqueued_at=now(),
        not_before=not_before,
        claimer="",
        claimed_until=None,
        attempts=0,
        last_error="",
        **{"conversation": "", "run": "", "assistant": "", "user_id": "", **fields},
    )


def _free(current: dt.datetime) -> Any:
    """Not claimed, or its claim lapsed."""
    return or_(MemoryJobRow.claimed_until.is_(None), MemoryJobRow.claimed_until <= current)


def _later(db: Session, current: dt.datetime) -> dt.datetime | None:
    """When the next job not due yet falls due; a claimed job's claim lapsing is that
    job falling due again."""
    waiting = db.scalar(
        select(func.min(MemoryJobRow.not_before)).where(MemoryJobRow.not_before > current)
    )
    lapsing = db.scalar(
        select(func.min(MemoryJobRow.claimed_until)).where(MemoryJobRow.claimed_until > current)
    )
    found = [when for when in (waiting, lapsing) if when is not None]
    return min(found) if found else None


def _users(exchange: Exchange, users: Sequence[str]) -> bytes:
    """A consolidation's users, kept as its exchange's turns (one per user scope)."""
    have = {turn.run for turn in exchange.turns}
    epoch = dt.datetime.fromtimestamp(0, dt.UTC)
    turns = [*exchange.turns, *(Turn(u, "", "", epoch) for u in sorted(set(users) - have))]
    return Exchange(tuple(turns), "", exchange.user_id, "", b"", b"").dumps()


__all__ = ["Job", "JobStore", "NewTurn"]
