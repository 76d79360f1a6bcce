"""The assistants table: SQL, idempotency, the quota, etags and the one default; plain records out.

An assistant is stored as its serialized ``Assistant`` message (``data``, built
and read by ``catalog.py``; this module never parses it) beside the columns
that are queried. ``is_default`` is the only copy of ``workspace_default``, so
clearing a previous default touches no blob. No ORM row leaves this module,
and nothing here builds a resource name or raises a request-field error: the
domain does both. Writes stage their events (``platform/store/outbox.py``) in the
same transaction, so every committed change has its ASSISTANT_CHANGED. What
every workspace's keyed records share (the key, the quota, etags, pages, the
delete) is ``platform/store/keyed.py``'s.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from switchboard.platform.store.keyed import BY_ID, KeyedStore, Table
from switchboard.platform.store.models import AssistantRow
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


@dataclass(frozen=True)
class Written:
    """What a create or update wrote: the assistant, and the previous default it cleared."""

    record: AssistantRecord
    #: Assistants of the workspace that stopped being its default (version bumped).
    cleared: tuple[AssistantRecord, ...] = ()
    #: False when a create was the retry of an earlier one (nothing was written).
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
    )


ASSISTANTS: Final = Table(AssistantRow, _record, noun="assistant", plural="assistants", order=BY_ID)


class AssistantStore(KeyedStore[AssistantRow, AssistantRecord, str]):
    """``_lock_workspace`` also serializes default changes on PostgreSQL, so "one
    default" holds under concurrency as the quota does."""

    table = ASSISTANTS

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
            )
            return Written(self._added(db, row), cleared)

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
    ) -> Written | None:
        """Replace ``data`` with ``edit(data)`` (on the locked row), set ``is_default``
        unless None (clearing the previous default), bump the version; None if missing."""

        def change(db: Session, row: AssistantRow) -> Written:
            stamp = now()
            cleared = (
                self._clear_default(db, workspace_id, assistant_id, stamp) if is_default else ()
            )
            row.data = edit(row.data)
            if is_default is not None:
                row.is_default = is_default
            return Written(self._bumped(db, row, stamp), cleared)

        return await self._update(
            workspace_id, assistant_id, etag, change, staged, lock_workspace=bool(is_default)
        )
