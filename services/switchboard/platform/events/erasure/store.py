"""Erasures of deleted accounts (docs/privacy.md): one row per account, one part per
service, each claimed by one process of that service for a lease and done once.

The auth service writes the erasure in the transaction that deletes the account
(``add_erasure``); the context, dispatcher and integration services erase what they
own (``claim``, ``finish``), and record the messages and runs they removed (``remember``);
the events part comes last (``claim`` holds it back until the others are done), and
redacts every event naming the person or what was removed. A crash mid-part leaves the
part claimed: the lease runs out and any process of the service takes it again, so each
part's work must be idempotent.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session

from switchboard.platform.store.db import Database
from switchboard.platform.store.models import ErasureNameRow, ErasurePartRow, ErasureRow
from switchboard.platform.store.storage import transaction
from switchboard.platform.values.names import new_id, now

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The services' parts, in the order they are written; ``events`` waits for the others.
CONTEXT: Final = "context"
DISPATCHER: Final = "dispatcher"
INTEGRATION: Final = "integration"
EVENTS: Final = "events"
PARTS: Final = (CONTEXT, DISPATCHER, INTEGRATION, EVENTS)
#: The parts each waits for: the context part finds the answers of the person's runs by
#: the runs, which the dispatcher's part then removes; the integration and events parts
#: read the names the others remember, and the events part redacts what all removed.
_BEFORE: Final = {
    DISPATCHER: (CONTEXT,),
    INTEGRATION: (CONTEXT, DISPATCHER),
    EVENTS: (CONTEXT, DISPATCHER, INTEGRATION),
}
#: Names remembered per call (a part removes its rows in batches of about this many).
NAMES_PER_CALL: Final = 500


@dataclass(frozen=True)
class ErasureRecord:
    id: str
    user_id: str
    plan: bytes
    #: The workspaces it keeps to; () for everywhere (an account deleted).
    workspaces: tuple[str, ...]
    created_at: dt.datetime
    done_at: dt.datetime | None
    #: The parts not done yet.
    pending: tuple[str, ...]


def add_erasure(db: Session, user_id: str, plan: bytes, workspaces: Sequence[str]) -> ErasureRecord:
    """Write an erasure and its parts in ``db``'s transaction: an account's deletion
    (``workspaces`` empty: everywhere), or a member's words in ``workspaces`` only."""
    stamp = now()
    row = ErasureRow(
        id=new_id(),
        user_id=user_id,
        plan=plan,
        workspaces=" ".join(workspaces),
        created_at=stamp,
        done_at=None,
    )
    db.add(row)
    db.flush()
    for part in PARTS:
        db.add(ErasurePartRow(erasure_id=row.id, part=part, claimer="", claimed_until=None))
    return ErasureRecord(row.id, user_id, plan, tuple(workspaces), stamp, None, PARTS)


def add_redaction(db: Session, names: Sequence[str]) -> ErasureRecord:
    """Write, in ``db``'s transaction, the redaction of the events naming ``names`` (a
    deleted message's MESSAGE_CREATED): an erasure of no person, whose parts are the
    context service's (SQLite's full-text indexes let go of the words), the webhook
    deliveries' and the log's."""
    stamp = now()
    row = ErasureRow(
        id=new_id(), user_id="", plan=b"", workspaces="", created_at=stamp, done_at=None
    )
    db.add(row)
    db.flush()
    for part in PARTS:
        done = stamp if part == DISPATCHER else None
        db.add(ErasurePartRow(erasure_id=row.id, part=part, claimer="", done_at=done))
    _remember(db, erasure_id=row.id, chunk=sorted(set(names)))
    pending = tuple(p for p in PARTS if p != DISPATCHER)
    return ErasureRecord(row.id, "", b"", (), stamp, None, pending)


class ErasureStore:
    """Claims, names and completion of the erasures' parts."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    async def claim(
        self, part: str, claimer: str, lease: dt.timedelta, limit: int = 10
    ) -> list[ErasureRecord]:
        """Take up to ``limit`` erasures whose ``part`` is not done and not held by a live
        claim, once the parts it waits for (``_BEFORE``) are done."""

        def tx(db: Session) -> list[ErasureRecord]:
            stamp = now()
            free = or_(ErasurePartRow.claimed_until.is_(None), ErasurePartRow.claimed_until < stamp)
            query = select(ErasurePartRow.erasure_id).where(
                ErasurePartRow.part == part, ErasurePartRow.done_at.is_(None), free
            )
            before = _BEFORE.get(part, ())
            if before:
                others = ErasurePartRow.__table__.alias("others")
                query = query.where(
                    ~exists().where(
                        and_(
                            others.c.erasure_id == ErasurePartRow.erasure_id,
                            others.c.part.in_(before),
                            others.c.done_at.is_(None),
                        )
                    )
                )
            ids = list(db.execute(query.limit(limit)).scalars())
            taken: list[str] = []
            for erasure_id in ids:
                claimed = db.execute(
                    update(ErasurePartRow)
                    .where(
                        ErasurePartRow.erasure_id == erasure_id,
                        ErasurePartRow.part == part,
                        ErasurePartRow.done_at.is_(None),
                        free,
                    )
                    .values(claimer=claimer, claimed_until=stamp + lease)
                )
                if getattr(claimed, "rowcount", 0):
                    taken.append(erasure_id)
            return _records(db, taken)

        return await self._run(tx, write=True)

    async def remember(self, erasure_id: str, names: Iterable[str]) -> None:
        """Record resources the erasure removed (their events are redacted last)."""
        batch = sorted(set(names))
        for start in range(0, len(batch), NAMES_PER_CALL):
            await self._run(
                functools.partial(
                    _remember, erasure_id=erasure_id, chunk=batch[start:][:NAMES_PER_CALL]
                ),
                write=True,
            )

    async def names(self, erasure_id: str) -> set[str]:
        def tx(db: Session) -> set[str]:
            return set(
                db.execute(
                    select(ErasureNameRow.name).where(ErasureNameRow.erasure_id == erasure_id)
                ).scalars()
            )

        return await self._run(tx, write=False)

    async def finish(self, erasure_id: str, part: str, claimer: str) -> bool:
        """Mark ``part`` done (if this claimer still holds it); the erasure is done once
        every part is. False if the claim was lost (another process does it again)."""

        def tx(db: Session) -> bool:
            stamp = now()
            done = db.execute(
                update(ErasurePartRow)
                .where(
                    ErasurePartRow.erasure_id == erasure_id,
                    ErasurePartRow.part == part,
                    ErasurePartRow.claimer == claimer,
                    ErasurePartRow.done_at.is_(None),
                )
                .values(done_at=stamp, claimed_until=None)
            )
            if not getattr(done, "rowcount", 0):
                return False
            left = db.execute(
                select(func.count()).where(
                    ErasurePartRow.erasure_id == erasure_id, ErasurePartRow.done_at.is_(None)
                )
            ).scalar_one()
            if not left:
                db.execute(
                    update(ErasureRow).where(ErasureRow.id == erasure_id).values(done_at=stamp)
                )
            return True

        return await self._run(tx, write=True)

    async def release(self, erasure_id: str, part: str, claimer: str) -> None:
        """Let go of a claim on a part not finished, so it is taken again at once."""

        def tx(db: Session) -> None:
            db.execute(
                update(ErasurePartRow)
                .where(
                    ErasurePartRow.erasure_id == erasure_id,
                    ErasurePartRow.part == part,
                    ErasurePartRow.claimer == claimer,
                )
                .values(claimed_until=None)
            )

        await self._run(tx, write=True)

    async def waiting(self, part: str) -> bool:
        """Whether some erasure's ``part`` is not done yet."""

        def tx(db: Session) -> bool:
            return (
                db.execute(
                    select(ErasurePartRow.erasure_id)
                    .where(ErasurePartRow.part == part, ErasurePartRow.done_at.is_(None))
                    .limit(1)
                ).first()
                is not None
            )

        return await self._run(tx, write=False)

    async def get(self, erasure_id: str) -> ErasureRecord | None:
        def tx(db: Session) -> ErasureRecord | None:
            found = _records(db, [erasure_id])
            return found[0] if found else None

        return await self._run(tx, write=False)

    async def list(self, limit: int = 100) -> list[ErasureRecord]:
        """The newest erasures first."""

        def tx(db: Session) -> list[ErasureRecord]:
            ids = list(
                db.execute(
                    select(ErasureRow.id)
                    .order_by(ErasureRow.created_at.desc(), ErasureRow.id)
                    .limit(limit)
                ).scalars()
            )
            found = {record.id: record for record in _records(db, ids)}
            return [found[i] for i in ids if i in found]

        return await self._run(tx, write=False)


def _remember(db: Session, *, erasure_id: str, chunk: Sequence[str]) -> None:
    known = set(
        db.execute(
            select(ErasureNameRow.name).where(
                ErasureNameRow.erasure_id == erasure_id, ErasureNameRow.name.in_(chunk)
            )
        ).scalars()
    )
    for name in chunk:
        if name not in known:
            db.add(ErasureNameRow(erasure_id=erasure_id, name=name))


def _records(db: Session, ids: Sequence[str]) -> list[ErasureRecord]:
    if not ids:
        return []
    rows = db.execute(select(ErasureRow).where(ErasureRow.id.in_(ids))).scalars().all()
    pending: dict[str, list[str]] = {}
    for erasure_id, part in db.execute(
        select(ErasurePartRow.erasure_id, ErasurePartRow.part).where(
            ErasurePartRow.erasure_id.in_(ids), ErasurePartRow.done_at.is_(None)
        )
    ):
        pending.setdefault(erasure_id, []).append(part)
    return [
        ErasureRecord(
            row.id,
            row.user_id,
            row.plan,
            tuple(row.workspaces.split()),
            row.created_at,
            row.done_at,
            tuple(p for p in PARTS if p in pending.get(row.id, [])),
        )
        for row in rows
    ]
