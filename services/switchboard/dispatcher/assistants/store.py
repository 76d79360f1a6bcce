"""The assistants table: SQL, idempotency, the quota, etags and the one default; plain records out.

An assistant is stored as its serialized ``Assistant`` message (``data``, built
and read by ``catalog.py``; this module never parses it) beside the columns
that are queried. ``is_default`` is the only copy of ``workspace_default``, so
clearing a previous default touches no blob. No ORM row leaves this module,
and nothing here builds a resource name or raises a request-field error: the
domain does both. Writes stage their events (``platform/store/outbox.py``) in the
same transaction, so every committed change has its ASSISTANT_CHANGED.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from switchboard.platform.errors import NotFound, QuotaExceeded
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import AssistantRow, WorkspaceRow
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import (
    Idempotency,
    check_etag,
    claim,
    retrying,
    transaction,
    workspace_page,
)
from switchboard.platform.values.names import now

log = logging.getLogger("switchboard.dispatcher.assistants.store")

_T = TypeVar("_T")


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


@dataclass(frozen=True)
class Written:
    """What a create or update wrote: the assistant, and the previous default it cleared."""

    record: AssistantRecord
    #: Assistants of the workspace that stopped being its default (version bumped).
    cleared: tuple[AssistantRecord, ...] = ()
    #: False when a create was the retry of an earlier one (nothing was written).
    fresh: bool = True


class IdTaken(Exception):
    """The id is in use in the workspace (the domain tells the client, with the name)."""


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
    )


class AssistantStore:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._sqlite = database.dialect_name == "sqlite"

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    def _lock_workspace(self, db: Session, workspace_id: str) -> None:
        """Serialize the workspace's creates and default changes on PostgreSQL, so the
        quota and "one default" hold under concurrency (SQLite serializes writers).

        Taken before any assistant row: every writer that takes both takes them in
        this order, so two of them cannot deadlock.
        """
        if not self._sqlite:
            db.execute(
                select(WorkspaceRow.id).where(WorkspaceRow.id == workspace_id).with_for_update()
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
        """Insert the assistant (clearing the previous default if it is one).

        ``Written.fresh`` is False for the retry of an earlier create with the same
        key (its assistant, as it now stands); NotFound if that one was deleted since.
        IdTaken if the id is in use, QuotaExceeded past ``max_per_workspace``.
        """

        def tx(db: Session) -> Written:
            earlier = claim(db, idempotency, f"{workspace_id}/{assistant_id}")
            if earlier is not None:
                found_ws, _, found_id = earlier.partition("/")
                row = db.get(AssistantRow, (found_ws, found_id))
                if row is None:
                    raise NotFound("the assistant this request created was deleted")
                return Written(_record(row), fresh=False)
            self._lock_workspace(db, workspace_id)
            count = db.execute(
                select(func.count())
                .select_from(AssistantRow)
                .where(AssistantRow.workspace_id == workspace_id)
            ).scalar_one()
            if count >= max_per_workspace:
                raise QuotaExceeded(
                    f"a workspace may hold at most {max_per_workspace} assistants",
                    subject="assistants per workspace",
                )
            if db.get(AssistantRow, (workspace_id, assistant_id)) is not None:
                raise IdTaken(assistant_id)
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
            )
            db.add(row)
            db.flush()
            return Written(_record(row), cleared)

        async def run() -> Written:
            return await self._run(staging(staged, tx), write=True)

        return await retrying(run)

    async def get(self, workspace_id: str, assistant_id: str) -> AssistantRecord | None:
        def tx(db: Session) -> AssistantRecord | None:
            row = db.get(AssistantRow, (workspace_id, assistant_id))
            return _record(row) if row is not None else None

        return await self._run(tx, write=False)

    async def page(self, workspace_id: str, after: str | None, limit: int) -> list[AssistantRecord]:
        """The workspace's assistants by id, after ``after`` (exclusive), at most ``limit``."""

        def tx(db: Session) -> list[AssistantRecord]:
            query = workspace_page(AssistantRow, workspace_id, after, limit)
            return [_record(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)

    async def update(
        self,
        workspace_id: str,
        assistant_id: str,
        etag: str,
        edit: Callable[[bytes], bytes],
        is_default: bool | None,
        staged: Staged[Written | None] | None,
    ) -> Written | None:
        """Replace ``data`` with ``edit(data)`` (on the locked row), set ``is_default``
        unless None (clearing the previous default), bump the version; None if missing."""

        def tx(db: Session) -> Written | None:
            if is_default:
                self._lock_workspace(db, workspace_id)
            row = db.get(AssistantRow, (workspace_id, assistant_id), with_for_update=True)
            if row is None:
                return None
            check_etag(etag, row.version, "assistant")
            stamp = now()
            cleared = (
                self._clear_default(db, workspace_id, assistant_id, stamp) if is_default else ()
            )
            row.data = edit(row.data)
            if is_default is not None:
                row.is_default = is_default
            row.version += 1
            row.updated_at = stamp
            db.flush()
            return Written(_record(row), cleared)

        return await self._run(staging(staged, tx), write=True)

    async def delete(
        self,
        workspace_id: str,
        assistant_id: str,
        etag: str,
        staged: Staged[AssistantRecord | None] | None,
    ) -> AssistantRecord | None:
        """Delete the assistant; the record as it was, or None if it does not exist."""

        def tx(db: Session) -> AssistantRecord | None:
            row = db.get(AssistantRow, (workspace_id, assistant_id), with_for_update=True)
            if row is None:
                return None
            check_etag(etag, row.version, "assistant")
            record = _record(row)
            db.execute(
                delete(AssistantRow).where(
                    AssistantRow.workspace_id == workspace_id, AssistantRow.id == assistant_id
                )
            )
            return record

        return await self._run(staging(staged, tx), write=True)
