"""Persistence of memory items, their versions and their full-text search (see
``storebase.py``).

On SQLite an item's text is also indexed in the FTS5 table ``memory_fts``
(kept in step here); on PostgreSQL a generated ``tsvector`` column indexes it.

An item is a fact with time (docs/memory.md): ``valid_until`` retires it without
deleting it, and a new item may supersede an old one, retired in the same
transaction. Each change writes a row of ``memory_versions`` (the state after it);
forgetting an item deletes it, the items it superseded and all their versions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import delete, or_, select, text
from sqlalchemy.orm import Session

from switchboard.api.context.v1.context_pb2 import MemoryFormation
from switchboard.context.records import (
    Exists,
    MemoryRecord,
    MemoryVersionRecord,
    Missing,
    Retired,
    Scope,
    Superseded,
)
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
from switchboard.platform.store.models import (
    ConversationRow,
    MemoryItemRow,
    MemoryVersionRow,
    WorkspaceMemberRow,
    WorkspaceRow,
)
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import check_etag
from switchboard.platform.values.names import now

#: How far a chain of superseded items is followed (history, forgetting).
MAX_CHAIN: Final = 200
#: Versions a history returns at most (the newest).
MAX_HISTORY: Final = 200


@dataclass(frozen=True)
class Written:
    """A memory write's result: the item, and the item it retired, if any."""

    item: MemoryRecord
    retired: MemoryRecord | None = None


@dataclass(frozen=True)
class Validity:
    """Which items a listing takes: ``at`` (true then) or a validity word."""

    which: str = "current"  # "current", "retired" or "all"
    at: dt.datetime | None = None
    #: For a user's scope: only items formed in this workspace or written by people.
    origin_workspace_id: str | None = None


class MemoryStore(StoreBase):
    async def create_memory(
        self,
        record: MemoryRecord,
        *,
        max_per_scope: int,
        max_pinned: int,
        staged: Staged[Any] | None = None,
    ) -> Written:
        """Insert ``record`` (Exists if its id is taken); with ``record.supersedes``,
        retire that item of the scope at the new one's ``valid_from`` (Retired if it
        already is)."""

        editor = _editor(record)

        def tx(db: Session) -> Written:
            row = memory_row(record)
            self._check_scope_live(db, scope_of(row))
            if db.get(MemoryItemRow, row.id) is not None:
                raise Exists("memory", row.scope, row.id)
            if row.origin_workspace_id is not None:
                _check_member(db, row.origin_workspace_id, row.user_id or "")
            if _count_current(db, row.scope) >= max_per_scope:
                raise QuotaExceeded(
                    f"a scope may hold at most {max_per_scope} current memory items",
                    subject="memory items per scope",
                )
            if row.pinned:
                _check_pinned_room(db, row.scope, max_pinned)
            retired = None
            if row.supersedes:
                old = _item(db, row.scope, row.supersedes, lock=not self._sqlite)
                if old.valid_until is not None:
                    raise Retired("memory", row.scope, old.id)
                old.valid_until = row.valid_from or row.created_at
                old.superseded_by = row.id
                old.invalid_reason = "superseded"
                old.version += 1
                old.updated_at = row.created_at
                _add_version(db, old, "retired", editor)
                retired = memory_record(old)
            self._add_memory_row(db, row)
            _add_version(db, row, "created", editor)
            self._touch_scope(db, row)
            return Written(memory_record(row), retired)

        return await self._run(staging(staged, tx), write=True)

    async def get_memory(self, scope: str, memory_id: str) -> MemoryRecord:
        def tx(db: Session) -> MemoryRecord:
            row = _item(db, scope, memory_id)
            _check_conversation(db, row, scope, memory_id)
            return memory_record(row)

        return await self._run(tx, write=False)

    async def update_memory(
        self,
        scope: str,
        memory_id: str,
        etag: str,
        changes: dict[str, Any],
        *,
        editor: str,
        max_pinned: int,
        staged: Staged[Any] | None = None,
    ) -> MemoryRecord:
        def tx(db: Session) -> MemoryRecord:
            row = _item(db, scope, memory_id)
            self._check_scope_live(db, scope_of(row))
            check_etag(etag, row.version)
            if changes.get("pinned") and not row.pinned:
                _check_pinned_room(db, scope, max_pinned)
            was_current = row.valid_until is None
            applied = dict(changes)
            if "valid_until" in applied and applied["valid_until"] is None:
                if row.superseded_by:
                    raise Superseded("memory", scope, memory_id)
                applied["invalid_reason"] = ""
            apply_changes(row, applied)
            if "content" in changes and self._sqlite:
                db.execute(
                    text("UPDATE memory_fts SET content = :content WHERE rowid = :rowid"),
                    {"rowid": row.fts_rowid, "content": row.content},
                )
            retiring = was_current and row.valid_until is not None
            _add_version(db, row, "retired" if retiring else "edited", editor)
            self._touch_scope(db, row)
            return memory_record(row)

        return await self._run(staging(staged, tx), write=True)

    async def delete_memory(
        self, scope: str, memory_id: str, staged: Staged[Any] | None = None
    ) -> list[MemoryRecord]:
        """Forget an item: it, the items it superseded (its history), and all their
        versions; the items deleted, the one named first."""

        def tx(db: Session) -> list[MemoryRecord]:
            row = _item(db, scope, memory_id)
            self._check_scope_live(db, scope_of(row))
            chain = _chain(db, row)
            gone = {item.id for item in chain}
            # A newer item that superseded the first one forgotten keeps no pointer to it.
            if row.superseded_by:
                newer = db.get(MemoryItemRow, row.superseded_by)
                if newer is not None and newer.id not in gone:
                    newer.supersedes = ""
            db.execute(delete(MemoryVersionRow).where(MemoryVersionRow.memory_id.in_(gone)))
            for item in chain:
                if self._sqlite:
                    db.execute(
                        text("DELETE FROM memory_fts WHERE rowid = :rowid"),
                        {"rowid": item.fts_rowid},
                    )
                db.delete(item)
            self._touch_scope(db, row)
            return [memory_record(item) for item in chain]

        return await self._run(staging(staged, tx), write=True)

    async def history(
        self, scope: str, memory_id: str
    ) -> tuple[MemoryRecord, list[MemoryVersionRecord]]:
        """An item and the versions of it and of the items it superseded, oldest
        first (the newest ``MAX_HISTORY``)."""

        def tx(db: Session) -> tuple[MemoryRecord, list[MemoryVersionRecord]]:
            row = _item(db, scope, memory_id)
            _check_conversation(db, row, scope, memory_id)
            chain = _chain(db, row)
            versions = list(
                db.execute(
                    select(MemoryVersionRow)
                    .where(MemoryVersionRow.memory_id.in_([item.id for item in chain]))
                    .order_by(MemoryVersionRow.changed_at.desc(), MemoryVersionRow.version.desc())
                    .limit(MAX_HISTORY)
                ).scalars()
            )
            # A supersession retires the old item and creates the new one at the same
            # instant: the older item's version reads first.
            age = {item.id: position for position, item in enumerate(chain)}
            versions.sort(key=lambda v: (v.changed_at, -age[v.memory_id], v.version))
            found = [_version_record(v) for v in versions]
            if not found:
                # Written before versions were kept: its one known state.
                found = [_synthesized(row)]
            return memory_record(row), found

        return await self._run(tx, write=False)

    async def list_memory(
        self,
        scope: Scope,
        before: tuple[dt.datetime, str] | None,
        limit: int,
        *,
        kinds: Sequence[str],
        pinned_only: bool,
        validity: Validity | None = None,
    ) -> list[MemoryRecord]:
        """The scope's items, newest first; Missing if the scope itself is gone."""
        validity = validity or Validity()
        query = select(MemoryItemRow).where(MemoryItemRow.scope == scope.scope)
        if kinds:
            query = query.where(MemoryItemRow.kind.in_(list(kinds)))
        if pinned_only:
            query = query.where(MemoryItemRow.pinned.is_(True))
        if validity.origin_workspace_id is not None:
            query = query.where(
                or_(
                    MemoryItemRow.origin_workspace_id.is_(None),
                    MemoryItemRow.origin_workspace_id == validity.origin_workspace_id,
                )
            )
        stamp = validity.at or now()
        if validity.at is not None:
            query = query.where(
                or_(
                    MemoryItemRow.valid_from <= stamp,
                    MemoryItemRow.valid_from.is_(None) & (MemoryItemRow.created_at <= stamp),
                ),
                or_(MemoryItemRow.valid_until.is_(None), MemoryItemRow.valid_until > stamp),
            )
        elif validity.which == "current":
            query = query.where(
                or_(MemoryItemRow.valid_until.is_(None), MemoryItemRow.valid_until > stamp)
            )
        elif validity.which == "retired":
            query = query.where(MemoryItemRow.valid_until <= stamp)
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
        origin_workspace_id: str | None = None,
    ) -> list[tuple[MemoryRecord, float]]:
        """The scope's current items matching any term of ``query``, best first;
        Missing if it is gone."""

        def tx(db: Session) -> list[tuple[MemoryRecord, float]]:
            self._check_scope_live(db, scope, writable=False)
            found = self._search(
                db,
                [scope.scope],
                query,
                kinds=kinds,
                limit=limit,
                offset=offset,
                origin_workspace_id=origin_workspace_id,
            )
            return [(memory_record(row), score) for row, score in found]

        return await self._run(tx, write=False)


def _item(db: Session, scope: str, memory_id: str, *, lock: bool = False) -> MemoryItemRow:
    row = db.get(MemoryItemRow, memory_id, with_for_update=lock)
    if row is None or row.scope != scope:
        raise Missing("memory", scope, memory_id)
    return row


def _check_conversation(db: Session, row: MemoryItemRow, scope: str, memory_id: str) -> None:
    """Missing if the item's conversation is gone (its memory goes with it)."""
    if row.conversation_id is not None:
        conversation = db.get(ConversationRow, row.conversation_id)
        if conversation is None or conversation.deleted_at is not None:
            raise Missing("memory", scope, memory_id)


def _editor(record: MemoryRecord) -> str:
    """Who a creation's versions name: the assistant that formed it, else its creator."""
    if record.formation:
        assistant = MemoryFormation.FromString(record.formation).assistant
        if assistant:
            return assistant
    return record.creator


def _check_member(db: Session, workspace_id: str, user_id: str) -> None:
    """Missing unless the user is a member of that live workspace: a user's item is
    marked only with a workspace of theirs."""
    workspace = db.get(WorkspaceRow, workspace_id)
    if (
        workspace is None
        or workspace.deleted_at is not None
        or db.get(WorkspaceMemberRow, (workspace_id, user_id)) is None
    ):
        raise Missing("workspace", workspace_id)


def _count_current(db: Session, scope: str) -> int:
    """A scope's current items: retired ones are history, not a scope's load."""
    statement = counted(
        MemoryItemRow, MemoryItemRow.scope == scope, MemoryItemRow.valid_until.is_(None)
    )
    count: int = db.execute(statement).scalar_one()
    return count


def _chain(db: Session, row: MemoryItemRow) -> list[MemoryItemRow]:
    """``row`` and the items it superseded, newest first (bounded, and safe against a
    cycle a bad write could make)."""
    chain = [row]
    seen = {row.id}
    while chain[-1].supersedes and len(chain) < MAX_CHAIN:
        older = db.get(MemoryItemRow, chain[-1].supersedes)
        if older is None or older.scope != row.scope or older.id in seen:
            break
        seen.add(older.id)
        chain.append(older)
    return chain


def _add_version(db: Session, row: MemoryItemRow, change: str, editor: str) -> None:
    db.add(
        MemoryVersionRow(
            memory_id=row.id,
            version=row.version,
            change=change,
            content=row.content,
            changed_at=row.updated_at,
            editor=editor[:160],
            valid_from=row.valid_from or row.created_at,
            valid_until=row.valid_until,
            invalid_reason=row.invalid_reason,
        )
    )


def _version_record(row: MemoryVersionRow) -> MemoryVersionRecord:
    return MemoryVersionRecord(
        memory_id=row.memory_id,
        version=row.version,
        change=row.change,
        content=row.content,
        changed_at=row.changed_at,
        editor=row.editor,
        valid_from=row.valid_from,
        valid_until=row.valid_until,
        invalid_reason=row.invalid_reason,
    )


def _synthesized(row: MemoryItemRow) -> MemoryVersionRecord:
    return MemoryVersionRecord(
        memory_id=row.id,
        version=row.version,
        change="created",
        content=row.content,
        changed_at=row.updated_at,
        editor=row.creator,
        valid_from=row.valid_from or row.created_at,
        valid_until=row.valid_until,
        invalid_reason=row.invalid_reason,
    )


def _check_pinned_room(db: Session, scope: str, max_pinned: int) -> None:
    require_room(
        db,
        counted(MemoryItemRow, MemoryItemRow.scope == scope, MemoryItemRow.pinned.is_(True)),
        max_pinned,
        f"a scope may pin at most {max_pinned} memory items",
        "pinned memory items",
    )
