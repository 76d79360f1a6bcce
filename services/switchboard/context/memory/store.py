"""Persistence of memory items and their full-text search (see ``storebase.py``).

On SQLite an item's text is also indexed in the FTS5 table ``memory_fts``
(kept in step here); on PostgreSQL a generated ``tsvector`` column indexes it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from switchboard.context.records import MemoryRecord, Missing, Scope
from switchboard.context.storebase import (
    StoreBase,
    apply_changes,
    counted,
    keyset,
    memory_record,
    memory_row,
    require_room,
    scope_of,
)
from switchboard.platform.errors import QuotaExceeded
from switchboard.platform.store.models import ConversationRow, MemoryItemRow
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import check_etag


class MemoryStore(StoreBase):
    async def create_memory(
        self,
        record: MemoryRecord,
        *,
        max_per_scope: int,
        max_pinned: int,
        staged: Staged[Any] | None = None,
    ) -> MemoryRecord:
        def tx(db: Session) -> MemoryRecord:
            row = memory_row(record)
            self._check_scope_live(db, scope_of(row))
            if self._count_scope(db, row.scope) >= max_per_scope:
                raise QuotaExceeded(
                    f"a scope may hold at most {max_per_scope} memory items",
                    subject="memory items per scope",
                )
            if row.pinned:
                _check_pinned_room(db, row.scope, max_pinned)
            self._add_memory_row(db, row)
            self._touch_scope(db, row)
            return memory_record(row)

        return await self._run(staging(staged, tx), write=True)

    async def get_memory(self, scope: str, memory_id: str) -> MemoryRecord:
        def tx(db: Session) -> MemoryRecord:
            row = _item(db, scope, memory_id)
            if row.conversation_id is not None:
                conversation = db.get(ConversationRow, row.conversation_id)
                if conversation is None or conversation.deleted_at is not None:
                    raise Missing("memory", scope, memory_id)
            return memory_record(row)

        return await self._run(tx, write=False)

    async def update_memory(
        self,
        scope: str,
        memory_id: str,
        etag: str,
        changes: dict[str, Any],
        *,
        max_pinned: int,
        staged: Staged[Any] | None = None,
    ) -> MemoryRecord:
        def tx(db: Session) -> MemoryRecord:
            row = _item(db, scope, memory_id)
            self._check_scope_live(db, scope_of(row))
            check_etag(etag, row.version)
            if changes.get("pinned") and not row.pinned:
                _check_pinned_room(db, scope, max_pinned)
            apply_changes(row, changes)
            if "content" in changes and self._sqlite:
                db.execute(
                    text("UPDATE memory_fts SET content = :content WHERE rowid = :rowid"),
                    {"rowid": row.fts_rowid, "content": row.content},
                )
            self._touch_scope(db, row)
            return memory_record(row)

        return await self._run(staging(staged, tx), write=True)

    async def delete_memory(
        self, scope: str, memory_id: str, staged: Staged[Any] | None = None
    ) -> MemoryRecord:
        def tx(db: Session) -> MemoryRecord:
            row = _item(db, scope, memory_id)
            self._check_scope_live(db, scope_of(row))
            if self._sqlite:
                db.execute(
                    text("DELETE FROM memory_fts WHERE rowid = :rowid"), {"rowid": row.fts_rowid}
                )
            db.delete(row)
            self._touch_scope(db, row)
            return memory_record(row)

        return await self._run(staging(staged, tx), write=True)

    async def list_memory(
        self,
        scope: Scope,
        before: tuple[dt.datetime, str] | None,
        limit: int,
        *,
        kinds: Sequence[str],
        pinned_only: bool,
    ) -> list[MemoryRecord]:
        """The scope's items, newest first; Missing if the scope itself is gone."""
        query = select(MemoryItemRow).where(MemoryItemRow.scope == scope.scope)
        if kinds:
            query = query.where(MemoryItemRow.kind.in_(list(kinds)))
        if pinned_only:
            query = query.where(MemoryItemRow.pinned.is_(True))
        query = keyset(
            query, MemoryItemRow.created_at, MemoryItemRow.id, before, newest_first=True
        ).limit(limit)

        def tx(db: Session) -> list[MemoryRecord]:
            self._check_scope_live(db, scope, writable=False)
            return [memory_record(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)

    async def search_memory(
        self,
        scope: Scope,
        query: str,
        *,
        kinds: Sequence[str],
        limit: int,
        offset: int = 0,
    ) -> list[tuple[MemoryRecord, float]]:
        """The scope's items matching any term of ``query``, best first; Missing if it is gone."""

        def tx(db: Session) -> list[tuple[MemoryRecord, float]]:
            self._check_scope_live(db, scope, writable=False)
            found = self._search(db, [scope.scope], query, kinds=kinds, limit=limit, offset=offset)
            return [(memory_record(row), score) for row, score in found]

        return await self._run(tx, write=False)


def _item(db: Session, scope: str, memory_id: str) -> MemoryItemRow:
    row = db.get(MemoryItemRow, memory_id)
    if row is None or row.scope != scope:
        raise Missing("memory", scope, memory_id)
    return row


def _check_pinned_room(db: Session, scope: str, max_pinned: int) -> None:
    require_room(
        db,
        counted(MemoryItemRow, MemoryItemRow.scope == scope, MemoryItemRow.pinned.is_(True)),
        max_pinned,
        f"a scope may pin at most {max_pinned} memory items",
        "pinned memory items",
    )
