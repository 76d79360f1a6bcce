"""Persistence of runs: every SQL statement of the dispatcher lives here.

A run row keeps the whole ``Run`` message (``data``) beside the columns that
are queried: the conversation (listing, newest first), the state and the
owning dispatcher instance (recovery after a restart). ``job`` holds what a
restart needs to start the run again: the handler request and the ids of the
credential it runs under.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.db import Database
from switchboard.platform.errors import (
    Conflict,
    ConversationBusy,
    DependencyUnavailable,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from switchboard.platform.models import IdempotencyRow, RunRow

log = logging.getLogger("switchboard.dispatcher.store")

_T = TypeVar("_T")
_OUTAGES: Final = (OperationalError, InterfaceError, PoolTimeout, TimeoutError, OSError)
ACTIVE: Final = (pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING)
IDEMPOTENCY_TTL: Final = dt.timedelta(hours=24)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Stored:
    """A run as the store returns it, with its restart data."""

    run: pb.Run
    job: bytes
    workspace_id: str
    conversation_id: str


@dataclass(frozen=True)
class NewRun:
    """What ``create`` inserts."""

    run_id: str
    workspace_id: str
    conversation_id: str
    creator: str
    worker: str
    run: pb.Run
    job: bytes
    #: "<user>/SendMessage/<request_id>" and the request's fingerprint, or empty.
    idempotency_key: str = ""
    fingerprint: str = ""
    #: Refuse (ConversationBusy) if the conversation has an active run.
    reject_if_active: bool = False


class RunStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        try:
            return await self._database.run(work, write=write)
        except IntegrityError as exc:
            raise Conflict("a concurrent request wrote the same run; retry") from exc
        except _OUTAGES as exc:
            log.warning("dispatcher database call failed", exc_info=True)
            raise DependencyUnavailable("the database is unavailable; retry") from exc

    async def replayed(self, key: str, fingerprint: str) -> Stored | None:
        """The run an earlier request with this idempotency key created, if any."""

        def work(db: Session) -> Stored | None:
            return _replayed(db, key, fingerprint)

        return await self._run(work, write=False)

    async def create(self, new: NewRun) -> tuple[Stored, bool]:
        """Insert the run; (the run, True) if an earlier request with the key made it."""

        def work(db: Session) -> tuple[Stored, bool]:
            if new.idempotency_key:
                earlier = _replayed(db, new.idempotency_key, new.fingerprint)
                if earlier is not None:
                    return earlier, True
            if new.reject_if_active:
                busy = db.scalar(
                    select(func.count())
                    .select_from(RunRow)
                    .where(RunRow.conversation_id == new.conversation_id)
                    .where(RunRow.state.in_(ACTIVE))
                )
                if busy:
                    raise ConversationBusy(
                        "the conversation already has an active run (policy REJECT); "
                        "retry when it ends, or send with ENQUEUE or INTERRUPT",
                    )
            when = now()
            db.add(
                RunRow(
                    id=new.run_id,
                    workspace_id=new.workspace_id,
                    conversation_id=new.conversation_id,
                    state=new.run.state,
                    worker=new.worker,
                    creator=new.creator,
                    created_at=when,
                    updated_at=when,
                    data=new.run.SerializeToString(),
                    job=new.job,
                )
            )
            if new.idempotency_key:
                db.add(
                    IdempotencyRow(
                        key=new.idempotency_key,
                        fingerprint=new.fingerprint,
                        resource=new.run.name,
                        created_at=when,
                    )
                )
            return Stored(new.run, new.job, new.workspace_id, new.conversation_id), False

        return await self._run(work, write=True)

    async def save(self, run_id: str, run: pb.Run, *, worker: str | None = None) -> None:
        """Persist the run's current state (and its new owner, if given)."""
        values: dict[str, object] = {
            "state": run.state,
            "data": run.SerializeToString(),
            "updated_at": now(),
        }
        if worker is not None:
            values["worker"] = worker

        def work(db: Session) -> None:
            db.execute(update(RunRow).where(RunRow.id == run_id).values(**values))

        await self._run(work, write=True)

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
        self,
        workspace_id: str,
        conversation_id: str,
        *,
        states: Sequence[int],
        after: tuple[dt.datetime, str] | None,
        limit: int,
    ) -> list[RunRow]:
        """Runs of the conversation, newest first, strictly after the keyset ``after``."""

        def work(db: Session) -> list[RunRow]:
            query = select(RunRow).where(
                RunRow.conversation_id == conversation_id, RunRow.workspace_id == workspace_id
            )
            if states:
                query = query.where(RunRow.state.in_(list(states)))
            if after is not None:
                at, run_id = after
                query = query.where(
                    or_(
                        RunRow.created_at < at,
                        and_(RunRow.created_at == at, RunRow.id < run_id),
                    )
                )
            query = query.order_by(RunRow.created_at.desc(), RunRow.id.desc()).limit(limit)
            return list(db.scalars(query))

        return await self._run(work, write=False)

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

    async def purge_idempotency(self, older_than: dt.datetime) -> None:
        def work(db: Session) -> None:
            db.execute(
                delete(IdempotencyRow).where(
                    IdempotencyRow.created_at < older_than,
                    IdempotencyRow.key.like("%/SendMessage/%"),
                )
            )

        await self._run(work, write=True)


def _replayed(db: Session, key: str, fingerprint: str) -> Stored | None:
    found = db.get(IdempotencyRow, key)
    if found is None or found.created_at < now() - IDEMPOTENCY_TTL:
        return None
    if found.fingerprint != fingerprint:
        raise InvalidArgument(
            "request_id was already used for a different request",
            [FieldViolation("request_id", "was used for a different request")],
        )
    run_id = found.resource.rsplit("/", 1)[-1]
    row = db.get(RunRow, run_id)
    if row is None:  # the conversation was purged since
        return None
    return _stored(row)


def _stored(row: RunRow) -> Stored:
    return Stored(pb.Run.FromString(row.data), row.job, row.workspace_id, row.conversation_id)
