"""The assistants table: SQL, idempotency, the quota, etags and the one default; plain records out.

An assistant is stored as its serialized ``Assistant`` message (``data``, built
and read by ``catalog.py``; this module never parses it) beside the columns
that are queried. ``is_default`` is the only copy of ``workspace_default``, so
clearing a previous default touches no blob. No ORM row leaves this module,
and nothing here builds a resource name or raises a request-field error: the
domain does both. Every change of ``data`` is also a row of ``assistant_revisions``
(numbered by ``revision``, kept whole, the oldest beyond the kept count dropped), written
in the same transaction. Writes stage their events (``platform/store/outbox.py``) in the
same transaction, so every committed change has its ASSISTANT_CHANGED. What
every workspace's keyed records share (the key, the quota, etags, pages, the
delete) is ``platform/store/keyed.py``'s.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from switchboard.platform.store.db import Database
from switchboard.platform.store.keyed import BY_ID, KeyedStore, Table
from switchboard.platform.store.models import AssistantRevisionRow, AssistantRow
from switchboard.platform.store.outbox import Staged
from switchboard.platform.store.storage import Idempotency
from switchboard.platform.values.names import now


@dataclass(frozen=True)
class AssistantRecord:
    """One assistant as stored; ``data`` is the serialized ``Assistant`` (its settings)."""

    workspace_id: str
    id: str
    data: bytes
    is_default: bool
    creator: str
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int
    #: The current revision (``revisions``).
    revision: int = 1


#: What made a revision, as stored.
CREATED: Final = "created"
UPDATED: Final = "updated"
ROLLED_BACK: Final = "rolled_back"


@dataclass(frozen=True)
class RevisionRecord:
    """One revision as stored: ``data`` is the serialized ``Assistant`` settings then."""

    workspace_id: str
    assistant_id: str
    revision: int
    data: bytes
    author: str
    created_at: dt.datetime
    origin: str
    #: For ROLLED_BACK: the revision restored.
    restored: int


class RevisionMissing(LookupError):
    """A rollback named a revision that is not kept (the domain says NOT_FOUND)."""


@dataclass(frozen=True)
class Written:
    """What a create or update wrote: the assistant, and the previous default it cleared."""

    record: AssistantRecord
    #: Assistants of the workspace that stopped being its default (version bumped).
    cleared: tuple[AssistantRecord, ...] = ()
    #: False when nothing was written: a create that was the retry of an earlier one,
    #: or a rollback to the configuration it already has.
    fresh: bool = True


def _record(row: AssistantRow) -> AssistantRecord:
    return AssistantRecord(
        workspace_id=row.workspace_id,
        id=row.id,
        data=row.data,
        is_default=row.is_default,
        creator=row.creator,
        created_at=row.created_at,
        updated_at=row.updated_at,
        version=row.version,
        revision=row.revision,
    )


def _revision(row: AssistantRevisionRow) -> RevisionRecord:
    return RevisionRecord(
        workspace_id=row.workspace_id,
        assistant_id=row.assistant_id,
        revision=row.revision,
        data=row.data,
        author=row.author,
        created_at=row.created_at,
        origin=row.origin,
        restored=row.restored,
    )


ASSISTANTS: Final = Table(
    AssistantRow,
    _record,
    noun="assistant",
    plural="assistants",
    order=BY_ID,
    dependents=((AssistantRevisionRow, "assistant_id"),),
)


class AssistantStore(KeyedStore[AssistantRow, AssistantRecord, str]):
    """``_lock_workspace`` also serializes default changes on PostgreSQL, so "one
    default" holds under concurrency as the quota does."""

    table = ASSISTANTS

    def __init__(self, database: Database, *, max_revisions: int = 1000) -> None:
        super().__init__(database)
        #: Revisions kept per assistant; a change beyond it drops the oldest.
        self.max_revisions = max_revisions

    def _revise(
        self,
        db: Session,
        row: AssistantRow,
        stamp: dt.datetime,
        author: str,
        origin: str,
        restored: int = 0,
    ) -> None:
        """Record ``row``'s ``data`` as its revision ``row.revision`` (the caller numbers
        it), and drop what falls beyond the kept count."""
        db.add(
            AssistantRevisionRow(
                workspace_id=row.workspace_id,
                assistant_id=row.id,
                revision=row.revision,
                data=row.data,
                author=author,
                created_at=stamp,
                origin=origin,
                restored=restored,
            )
        )
        oldest_kept = row.revision - self.max_revisions
        if oldest_kept > 0:
            db.execute(
                delete(AssistantRevisionRow)
                .where(
                    AssistantRevisionRow.workspace_id == row.workspace_id,
                    AssistantRevisionRow.assistant_id == row.id,
                    AssistantRevisionRow.revision <= oldest_kept,
                )
                .execution_options(synchronize_session=False)
            )

    def _clear_default(
        self, db: Session, workspace_id: str, keep: str, stamp: dt.datetime
    ) -> tuple[AssistantRecord, ...]:
        rows = (
            db.execute(
                select(AssistantRow)
                .where(
                    AssistantRow.workspace_id == workspace_id,
                    AssistantRow.is_default.is_(True),
                    AssistantRow.id != keep,
                )
                .with_for_update()
            )
            .scalars()
            .all()
        )
        cleared = []
        for row in rows:
            row.is_default = False
            row.version += 1
            row.updated_at = stamp
            cleared.append(row)
        db.flush()
        return tuple(_record(row) for row in cleared)

    async def create(
        self,
        workspace_id: str,
        assistant_id: str,
        *,
        data: bytes,
        is_default: bool,
        creator: str,
        idempotency: Idempotency | None,
        max_per_workspace: int,
        staged: Staged[Written] | None,
    ) -> Written:
        """Insert the assistant (clearing the previous default if it is one), as
        ``KeyedStore._insert`` allows (the key, the quota, the id)."""

        def insert(db: Session) -> Written:
            stamp = now()
            cleared = (
                self._clear_default(db, workspace_id, assistant_id, stamp) if is_default else ()
            )
            row = AssistantRow(
                workspace_id=workspace_id,
                id=assistant_id,
                data=data,
                is_default=is_default,
                creator=creator,
                created_at=stamp,
                updated_at=stamp,
                version=1,
                revision=1,
            )
            self._added(db, row)
            self._revise(db, row, stamp, creator, CREATED)
            db.flush()
            return Written(self.table.record(row), cleared)

        return await self._insert(
            workspace_id,
            assistant_id,
            insert,
            lambda earlier: Written(earlier, fresh=False),
            idempotency=idempotency,
            max_per_workspace=max_per_workspace,
            staged=staged,
        )

    async def update(
        self,
        workspace_id: str,
        assistant_id: str,
        etag: str,
        edit: Callable[[bytes], bytes],
        is_default: bool | None,
        staged: Staged[Written | None] | None,
        *,
        author: str,
    ) -> Written | None:
        """Replace ``data`` with ``edit(data)`` (on the locked row), set ``is_default``
        unless None (clearing the previous default), bump the version; a new revision by
        ``author`` when ``data`` changed. None if the assistant is missing."""

        def change(db: Session, row: AssistantRow) -> Written:
            stamp = now()
            cleared = (
                self._clear_default(db, workspace_id, assistant_id, stamp) if is_default else ()
            )
            data = edit(row.data)
            if data != row.data:
                row.data = data
                row.revision += 1
                self._revise(db, row, stamp, author, UPDATED)
            if is_default is not None:
                row.is_default = is_default
            return Written(self._bumped(db, row, stamp), cleared)

        return await self._update(
            workspace_id, assistant_id, etag, change, staged, lock_workspace=bool(is_default)
        )

    async def roll_back(
        self,
        workspace_id: str,
        assistant_id: str,
        etag: str,
        restore: int,
        staged: Staged[Written | None] | None,
        *,
        author: str,
    ) -> Written | None:
        """Make revision ``restore``'s data current as a new revision by ``author``
        (RevisionMissing if it is not kept); nothing at all, not even the version, when
        it already is. None if the assistant is missing."""

        def change(db: Session, row: AssistantRow) -> Written:
            restored = db.get(AssistantRevisionRow, (workspace_id, assistant_id, restore))
            if restored is None:
                raise RevisionMissing(restore)
            if restored.data == row.data:
                # A repeated rollback: nothing changes, not even the etag.
                return Written(self.table.record(row), fresh=False)
            stamp = now()
            row.data = restored.data
            row.revision += 1
            self._revise(db, row, stamp, author, ROLLED_BACK, restore)
            return Written(self._bumped(db, row, stamp))

        return await self._update(workspace_id, assistant_id, etag, change, staged)

    async def revision(
        self, workspace_id: str, assistant_id: str, revision: int
    ) -> RevisionRecord | None:
        """Revision ``revision`` of the assistant, if kept."""

        def tx(db: Session) -> RevisionRecord | None:
            row = db.get(AssistantRevisionRow, (workspace_id, assistant_id, revision))
            return _revision(row) if row is not None else None

        return await self._run(tx, write=False)

    async def revisions(
        self, workspace_id: str, assistant_id: str, before: int | None, limit: int
    ) -> list[RevisionRecord]:
        """The assistant's kept revisions, newest first, below ``before`` (exclusive)."""

        def tx(db: Session) -> list[RevisionRecord]:
            query = select(AssistantRevisionRow).where(
                AssistantRevisionRow.workspace_id == workspace_id,
                AssistantRevisionRow.assistant_id == assistant_id,
            )
            if before is not None:
                query = query.where(AssistantRevisionRow.revision < before)
            query = query.order_by(AssistantRevisionRow.revision.desc()).limit(limit)
            return [_revision(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)

    async def revision_count(self, workspace_id: str, assistant_id: str) -> int:
        """How many revisions of the assistant are kept (tests and the bench read it)."""

        def tx(db: Session) -> int:
            return int(
                db.execute(
                    select(func.count()).where(
                        AssistantRevisionRow.workspace_id == workspace_id,
                        AssistantRevisionRow.assistant_id == assistant_id,
                    )
                ).scalar_one()
            )

        return await self._run(tx, write=False)
