"""Persistence of runs: every SQL statement of the dispatcher lives here.

A run row keeps the whole ``Run`` message (``data``) beside the columns that
are queried: the conversation (listing, newest first), the assistant and the
time its state last changed (listing across a workspace, filtered and counted),
the state and the owning dispatcher instance (recovery after a restart). ``job`` holds what a
restart needs to start the run again: the handler request and the ids of the
credential it runs under.

Each instance keeps a lease (``dispatcher_leases``) while it lives; the active
runs of an instance whose lease expired are taken over by another one, and
saves are fenced by the owner, so a replica that lost its runs cannot
overwrite what their new owner stored.

What the store takes and returns as plain values, and its refusal of a REJECT-policy
message, are ``records.py``'s.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

from sqlalchemy import (
    BindParameter,
    Update,
    and_,
    bindparam,
    delete,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.mapping import state_time
from switchboard.dispatcher.runs.core.records import (
    Charged,
    Listing,
    NewRun,
    Owner,
    Stored,
    raise_busy,
)
from switchboard.platform.errors import NotFound
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import DispatcherLeaseRow, RunRow, table_of
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.prepared import Prepared
from switchboard.platform.store.storage import (
    Idempotency,
    claim,
    earlier,
    retrying,
    transaction,
)
from switchboard.platform.values.names import now

log = logging.getLogger("switchboard.dispatcher.runs.core.store")

_T = TypeVar("_T")

#: Runs a save's work in another write's transaction (``RunStore.save``).
Around = Callable[[Callable[[Session], bool]], Awaitable[bool]]
#: Run ids read in one statement.
_BATCH: Final = 500
#: The states of a run that has not ended (a paused one is active: it resumes).
ACTIVE: Final = (pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING, pb.RUN_STATE_REQUIRES_ACTION)
#: The states a run ends in.
TERMINAL: Final = frozenset(
    {
        pb.RUN_STATE_SUCCEEDED,
        pb.RUN_STATE_FAILED,
        pb.RUN_STATE_CANCELLED,
        pb.RUN_STATE_DEADLINE_EXCEEDED,
    }
)

# A run is inserted once and saved twice (started, ended): statements compiled once
# and run on the driver (``platform/store/prepared.py``), not the ORM's unit of work or
# ``Connection.execute``'s per-statement Python.
_RUNS: Final = table_of(RunRow)
_RUN_COLUMNS: Final = (
    "id",
    "workspace_id",
    "conversation_id",
    "state",
    "worker",
    "creator",
    "created_at",
    "updated_at",
    "assistant_id",
    "state_time",
    "data",
    "job",
    "api_key_id",
    "parent_id",
    "root_id",
)
_INSERT_RUN: Final = Prepared(_RUNS.insert(), columns=_RUN_COLUMNS, name="runs.insert")
#: A run that has not ended; the states inline, not an expanding IN list, so a
#: statement with it compiles once.
_IS_ACTIVE: Final = _RUNS.c.state.in_([literal_column(str(int(state))) for state in ACTIVE])
#: Active runs of a conversation (the REJECT check).
_BUSY: Final = Prepared(
    select(func.count())
    .select_from(_RUNS)
    .where(_RUNS.c.conversation_id == bindparam("conversation"), _IS_ACTIVE),
    name="runs.busy",
)
_STATE: Final[dict[str, BindParameter[object]]] = {
    "state": bindparam("state"),
    "data": bindparam("data"),
    "state_time": bindparam("state_time"),
    "updated_at": bindparam("stamp"),
}
#: What a run's end stores beside its state, for QueryUsage (``budgets/usage.py``):
#: in the same statement, so the end costs no second one. ``api_key_id`` is set at
#: insert and never here.
_USAGE: Final[dict[str, BindParameter[object]]] = {
    "model": bindparam("model"),
    "input_tokens": bindparam("input_tokens"),
    "output_tokens": bindparam("output_tokens"),
    "cost_micros": bindparam("cost_micros"),
    "usage_day": bindparam("usage_day"),
    "budget_lowered_calls": bindparam("budget_lowered_calls"),
    "unpriced_calls": bindparam("unpriced_calls"),
}


#: Whom a write of a run is for: fenced by the owner (a run another instance took
#: over is not overwritten) and never after its end (nothing follows a terminal
#: state, whichever attempt of it writes late).
_FENCE: Final = (_RUNS.c.id == bindparam("run"), _RUNS.c.worker == bindparam("owner"), _IS_ACTIVE)


def _save(*, job: bool, end: bool) -> Update:
    values: dict[str, object] = dict(_STATE)
    if job:
        values["job"] = bindparam("job")  # a run's tool steps, stored when it pauses
    if end:
        values.update(_USAGE)
    fence = _FENCE[:2]
    # The same end again is the retry of a save whose answer was lost (it committed).
    ended = _RUNS.c.state == bindparam("state")
    return update(_RUNS).where(*fence, or_(_IS_ACTIVE, ended)).values(values)


#: A queued run's note of what it waits behind (``Run.queued_behind``): only while it is
#: still stored QUEUED, so a note written late never takes a started run back.
_SAVE_QUEUED: Final = Prepared(
    update(_RUNS)
    .where(*_FENCE[:2], _RUNS.c.state == literal_column(str(int(pb.RUN_STATE_QUEUED))))
    .values(data=bindparam("data"), updated_at=bindparam("stamp")),
    name="runs.save_queued",
)
#: By (with the job, ended).
_SAVE_RUN: Final = {
    (job, end): Prepared(_save(job=job, end=end), name="runs.save")
    for job in (False, True)
    for end in (False, True)
}
_SAVE_JOB: Final = Prepared(
    update(_RUNS).where(*_FENCE).values(job=bindparam("job")), name="runs.save_job"
)
#: A settlement's record on its run: while a run is active its usage columns add up
#: what its budgets were charged (the run's end overwrites them with its usage, which
#: covers them). Fenced like a save: a run another instance took over is not
#: charged by this one.
_CHARGE: Final = Prepared(
    update(_RUNS)
    .where(*_FENCE)
    .values(
        cost_micros=_RUNS.c.cost_micros + bindparam("cost"),
        input_tokens=_RUNS.c.input_tokens + bindparam("input_tokens"),
        output_tokens=_RUNS.c.output_tokens + bindparam("output_tokens"),
    ),
    name="runs.charge",
)
_LEASES: Final = table_of(DispatcherLeaseRow)
#: A renewal of a lease that is still held: the common case is one statement.
_RENEW: Final = Prepared(
    update(_LEASES)
    .where(_LEASES.c.instance == bindparam("i"), _LEASES.c.expires_at >= bindparam("at"))
    .values(expires_at=bindparam("until"), address=bindparam("address")),
    name="leases.renew",
)


class RunStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    async def replayed(self, key: Idempotency) -> Stored | None:
        """The run an earlier request with this idempotency key created, if any."""
        return await self._run(lambda db: _replayed(db, earlier(db, key)), write=False)

    async def create(self, new: NewRun) -> tuple[Stored, bool]:
        """Insert the run; (the run, True) if an earlier request with the key made it."""
        return await retrying(lambda: self._run(self.creating(new), write=True))

    def creating(self, new: NewRun) -> Callable[[Session], tuple[Stored, bool]]:
        """``create`` as a work of another transaction (its input message's: both
        commit together, ``ports/context.py``); the caller retries a conflict."""

        def work(db: Session) -> tuple[Stored, bool]:
            first = claim(db, new.idempotency, new.run.name)
            if first is not None:
                replayed = _replayed(db, first)
                if replayed is None:
                    raise NotFound("the run created by this request_id is gone")
                return replayed, True
            if new.reject_if_active and _BUSY.scalar(db, {"conversation": new.conversation_id}):
                raise_busy()
            when = now()
            _INSERT_RUN.execute(
                db,
                {
                    "id": new.run_id,
                    "workspace_id": new.workspace_id,
                    "conversation_id": new.conversation_id,
                    "state": new.run.state,
                    "worker": new.worker,
                    "creator": new.creator,
                    "created_at": when,
                    "updated_at": when,
                    "assistant_id": new.run.assistant.rsplit("/", 1)[-1],
                    "state_time": state_time(new.run),
                    "data": new.run.SerializeToString(),
                    "job": new.job,
                    "api_key_id": new.api_key_id,
                    "parent_id": new.parent_id,
                    "root_id": new.root_id or new.run_id,
                },
            )
            return Stored(new.run, new.job, new.workspace_id, new.conversation_id), False

        return work

    async def save(
        self,
        run_id: str,
        run: pb.Run,
        *,
        owner: str,
        staged: Staged[bool] | None = None,
        job: bytes | None = None,
        other_job: tuple[str, bytes] | None = None,
        around: Around | None = None,
    ) -> bool:
        """Persist the run's current state; False if ``owner`` no longer owns it
        (taken over by another instance, or purged with its conversation), or it
        ended already (in another state: a late write of an attempt let go of).

        ``staged``: events written in the same transaction (its build gets the result).
        ``job``: the restart data too, when it changed (a pause stores the steps).
        ``other_job``: another run's id and job, stored in the same transaction and
        fenced alike (a consumed steer: its end and the target's journal of it land
        together or not at all; False, nothing stored, if either is not ``owner``'s).
        ``around``: runs the save's work in the transaction of another write (an end
        with its answer, ``execution.py``), fenced alike: False rolls that back too.
        """
        values: dict[str, object] = {
            "run": run_id,
            "owner": owner,
            "state": run.state,
            "data": run.SerializeToString(),
            "state_time": state_time(run),
            "stamp": now(),
        }
        if job is not None:
            values["job"] = job
        ended = run.state in TERMINAL
        if ended:
            values.update(usage_values(run))
        statement = _SAVE_RUN[job is not None, ended]

        def work(db: Session) -> bool:
            saved = bool(statement.execute(db, values))
            if saved and other_job is not None:
                other = {"run": other_job[0], "owner": owner, "job": other_job[1]}
                if not _SAVE_JOB.execute(db, other):
                    raise _Fenced  # rolls the run's save back with it
            if not saved and around is not None:
                raise _Fenced  # nor is the write it goes with
            return saved

        saving = staging(staged, work)
        try:
            if around is not None:
                return await around(saving)
            return await self._run(saving, write=True)
        except _Fenced:
            return False

    async def transaction(self, work: Callable[[Session], _T]) -> _T:
        """``work`` as a write transaction of its own (what an ``Around`` runs a save in
        where it cannot share another's)."""
        return await self._run(work, write=True)

    async def save_queued(self, run_id: str, run: pb.Run, *, owner: str) -> bool:
        """Store a queued run's new ``queued_behind``; False unless the run is still
        stored QUEUED and ``owner``'s (it started, ended or was taken over meanwhile)."""
        values = {"run": run_id, "owner": owner, "data": run.SerializeToString(), "stamp": now()}

        def work(db: Session) -> bool:
            return bool(_SAVE_QUEUED.execute(db, values))

        return await self._run(work, write=True)

    async def oldest_active(self, workspace_id: str, conversation_id: str) -> Stored | None:
        """The conversation's oldest active run (any replica's), if it has one."""

        def work(db: Session) -> RunRow | None:
            return db.scalar(
                select(RunRow)
                .where(
                    RunRow.workspace_id == workspace_id,
                    RunRow.conversation_id == conversation_id,
                    RunRow.state.in_(ACTIVE),
                )
                .order_by(RunRow.created_at, RunRow.id)
                .limit(1)
            )

        row = await self._run(work, write=False)
        return None if row is None else _stored(row)

    async def save_job(self, run_id: str, job: bytes, *, owner: str) -> bool:
        """Store the run's restart data (its tool steps so far); False if not ``owner``'s."""
        values = {"run": run_id, "owner": owner, "job": job}

        def work(db: Session) -> bool:
            return bool(_SAVE_JOB.execute(db, values))

        return await self._run(work, write=True)

    def charging(
        self, run_id: str, owner: str, *, given_up: Callable[[], bool]
    ) -> Callable[[Session, int, int, int], bool]:
        """What records a settlement on run ``run_id`` inside the settlement's own
        transaction (``Ledger.settle``): ``(session, cost, input, output)``, False
        (the settlement must not count) once ``owner`` no longer owns the run, or
        ``given_up()`` says its attempt let go of it."""

        def charge(db: Session, cost: int, input_tokens: int, output_tokens: int) -> bool:
            if given_up():
                return False
            values = {
                "run": run_id,
                "owner": owner,
                "cost": cost,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
            }
            return bool(_CHARGE.execute(db, values))

        return charge

    def charging_lost(self, owner: str) -> Callable[[Session, str, int, int, int], None]:
        """What records on a run, inside the ledger's transaction
        (``Ledger.charge_lost``), the charge of the holds its lost attempt left:
        ``(session, run_id, cost, input, output)``, for runs ``owner`` took over."""

        def charge(db: Session, run_id: str, cost: int, input_tokens: int, output: int) -> None:
            values = {
                "run": run_id,
                "owner": owner,
                "cost": cost,
                "input_tokens": input_tokens,
                "output_tokens": output,
            }
            _CHARGE.execute(db, values)

        return charge

    async def renew_lease(self, instance: str, until: dt.datetime, address: str = "") -> bool:
        """Record that ``instance`` lives until ``until`` (its runs are not taken before)
        and that other replicas reach it at ``address``.

        False when the lease had lapsed (expired, or gone: another instance took its
        runs over and dropped it): runs ``instance`` holds may be another's now.
        """
        at = now()
        values = {"i": instance, "at": at, "until": until, "address": address}

        def work(db: Session) -> bool:
            if _RENEW.execute(db, values):
                return True
            lease = db.get(DispatcherLeaseRow, instance, with_for_update=True)
            if lease is None:
                db.add(DispatcherLeaseRow(instance=instance, expires_at=until, address=address))
            else:
                lease.expires_at = until
                lease.address = address
            return False

        return await self._run(work, write=True)

    async def foreign(self, run_ids: Sequence[str], instance: str) -> set[str]:
        """The runs of ``run_ids`` that ``instance`` does not own (another instance
        took them over, or they were purged)."""
        found: set[str] = set()
        for start in range(0, len(run_ids), _BATCH):
            batch = list(run_ids[start : start + _BATCH])

            def work(db: Session, batch: list[str] = batch) -> set[str]:
                owned = db.scalars(
                    select(RunRow.id).where(RunRow.id.in_(batch), RunRow.worker == instance)
                )
                return set(batch) - set(owned)

            found |= await self._run(work, write=False)
        return found

    async def expired_owners(self, instance: str) -> list[str]:
        """Instances other than ``instance`` whose lease has expired."""

        def work(db: Session) -> list[str]:
            return list(
                db.scalars(
                    select(DispatcherLeaseRow.instance).where(
                        DispatcherLeaseRow.expires_at < now(),
                        DispatcherLeaseRow.instance != instance,
                    )
                )
            )

        return await self._run(work, write=False)

    async def take_over(self, dead: str, instance: str) -> list[Stored]:
        """Move ``dead``'s active runs to ``instance``, oldest first; drop its lease.

        Rows are locked (PostgreSQL; SQLite serializes writers), so when two
        instances reap the same one each run moves once. A lease renewed in
        the meantime (the instance came back) keeps its runs. Nothing moves
        while ``instance``'s own lease has lapsed: runs it held may have been
        taken from it, and it takes none back before its renewal has found
        them and let go of them (``Recovery``), so no attempt it gave up can
        write for a run it owns again.
        """

        def work(db: Session) -> list[Stored]:
            at = now()
            # Both leases locked in one order: two instances reaping each other
            # wait in turn instead of deadlocking.
            leases = {
                lease.instance: lease.expires_at
                for lease in db.scalars(
                    select(DispatcherLeaseRow)
                    .where(DispatcherLeaseRow.instance.in_(sorted({instance, dead})))
                    .order_by(DispatcherLeaseRow.instance)
                    .with_for_update()
                )
            }
            own, lease = leases.get(instance), leases.get(dead)
            if own is None or own < at or lease is None or lease >= at:
                return []
            rows = list(
                db.scalars(
                    select(RunRow)
                    .where(RunRow.worker == dead, RunRow.state.in_(ACTIVE))
                    .order_by(RunRow.created_at, RunRow.id)
                    .with_for_update()
                )
            )
            for row in rows:
                row.worker = instance
            db.execute(delete(DispatcherLeaseRow).where(DispatcherLeaseRow.instance == dead))
            return [_stored(row) for row in rows]

        return await self._run(work, write=True)

    async def get_with_owner(
        self, workspace_id: str, conversation_id: str, run_id: str
    ) -> tuple[Stored, Owner]:
        """The run, and the instance that owns it with that instance's lease."""

        def work(db: Session) -> tuple[RunRow, str | None, dt.datetime | None] | None:
            row = db.execute(
                select(RunRow, DispatcherLeaseRow.address, DispatcherLeaseRow.expires_at)
                .outerjoin(DispatcherLeaseRow, DispatcherLeaseRow.instance == RunRow.worker)
                .where(
                    RunRow.id == run_id,
                    RunRow.conversation_id == conversation_id,
                    RunRow.workspace_id == workspace_id,
                )
            ).first()
            return None if row is None else (row[0], row[1], row[2])

        found = await self._run(work, write=False)
        if found is None:
            raise NotFound("run not found")
        row, address, expires_at = found
        owner = Owner(
            instance=row.worker,
            address=address or "",
            # No lease at all: taken over meanwhile, or never leased; either way not live.
            live=expires_at is not None and expires_at >= now(),
        )
        return _stored(row), owner

    async def get(self, workspace_id: str, conversation_id: str, run_id: str) -> Stored:
        def work(db: Session) -> RunRow | None:
            return db.scalar(
                select(RunRow).where(
                    RunRow.id == run_id,
                    RunRow.conversation_id == conversation_id,
                    RunRow.workspace_id == workspace_id,
                )
            )

        row = await self._run(work, write=False)
        if row is None:
            raise NotFound("run not found")
        return _stored(row)

    async def page(
        self, listing: Listing, *, after: tuple[dt.datetime, str] | None, limit: int
    ) -> tuple[list[RunRow], int]:
        """The runs ``listing`` selects, newest first, strictly after the keyset
        ``after``, and how many it selects in all (one read: the count and the page
        agree)."""

        def work(db: Session) -> tuple[list[RunRow], int]:
            where = [RunRow.workspace_id == listing.workspace_id]
            if listing.conversation_id:
                where.append(RunRow.conversation_id == listing.conversation_id)
            if listing.assistant_id:
                where.append(RunRow.assistant_id == listing.assistant_id)
            if listing.states:
                where.append(RunRow.state.in_(list(listing.states)))
            if listing.changed_after is not None:
                where.append(RunRow.state_time > listing.changed_after)
            if listing.parent_id:
                where.append(RunRow.parent_id == listing.parent_id)
            total = db.scalar(select(func.count()).select_from(RunRow).where(*where)) or 0
            query = select(RunRow).where(*where)
            if after is not None:
                at, run_id = after
                query = query.where(
                    or_(
                        RunRow.created_at < at,
                        and_(RunRow.created_at == at, RunRow.id < run_id),
                    )
                )
            query = query.order_by(RunRow.created_at.desc(), RunRow.id.desc()).limit(limit)
            return list(db.scalars(query)), total

        return await self._run(work, write=False)

    async def tree_size(self, root_id: str) -> int:
        """How many runs the tree rooted at ``root_id`` holds, its root included."""

        def work(db: Session) -> int:
            query = select(func.count()).select_from(RunRow).where(RunRow.root_id == root_id)
            return db.scalar(query) or 0

        return await self._run(work, write=False)

    async def children(self, parent_id: str) -> list[pb.Run]:
        """The runs the run ``parent_id`` started (its delegate calls), oldest first."""

        def work(db: Session) -> list[bytes]:
            query = (
                select(RunRow.data)
                .where(RunRow.parent_id == parent_id)
                .order_by(RunRow.created_at, RunRow.id)
            )
            return list(db.scalars(query))

        return [pb.Run.FromString(data) for data in await self._run(work, write=False)]

    async def owned_active(self, worker: str) -> list[Stored]:
        """Active runs owned by ``worker``, oldest first (recovery after a restart)."""

        def work(db: Session) -> list[RunRow]:
            return list(
                db.scalars(
                    select(RunRow)
                    .where(RunRow.worker == worker, RunRow.state.in_(ACTIVE))
                    .order_by(RunRow.created_at, RunRow.id)
                )
            )

        return [_stored(row) for row in await self._run(work, write=False)]


class _Fenced(Exception):
    """A save's second row was not the owner's: the transaction is rolled back."""


def usage_values(run: pb.Run) -> dict[str, object]:
    """The usage columns of an ended run: its model, tokens, cost in micro-units (the
    handler's ``cost_micros``, else its estimate in US dollars) and the UTC day it ended."""
    usage = run.usage
    cost = usage.cost_micros or round(usage.estimated_cost_usd * 1_000_000)
    ended = run.end_time.ToDatetime(dt.UTC) if run.HasField("end_time") else now()
    return {
        "model": usage.model[:256],
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cost_micros": cost,
        "usage_day": ended.date().isoformat(),
        "budget_lowered_calls": usage.budget_lowered_calls,
        "unpriced_calls": usage.unpriced_calls,
    }


def _replayed(db: Session, resource: str | None) -> Stored | None:
    if resource is None:
        return None
    row = db.get(RunRow, resource.rsplit("/", 1)[-1])
    return None if row is None else _stored(row)  # None: purged with its conversation


def _stored(row: RunRow) -> Stored:
    return Stored(
        pb.Run.FromString(row.data),
        row.job,
        row.workspace_id,
        row.conversation_id,
        Charged(row.cost_micros, row.input_tokens, row.output_tokens),
    )
