"""The reads of a search (``search.py``) besides the chunk store's ranked lists:
memory items' full-text search over a workspace or a conversation, and the sources
of ranked chunks (memory items, messages, files, the chunks themselves).

Hydration is where visibility is decided: a source that is gone (deleted
item, deleted conversation or file, expired item) or outside the searched
workspace is left out, whatever the chunk index still holds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from switchboard.context.records import MemoryRecord, MessageRecord, Scope
from switchboard.context.semantic.ports import SearchFilter
from switchboard.context.storebase import StoreBase, memory_record, message_record
from switchboard.platform.store.models import (
    ConversationRow,
    FileRow,
    MemoryItemRow,
    MessageRow,
    SemanticChunkRow,
)
from switchboard.platform.values.names import now
from switchboard.platform.values.resources import ConversationName

_Id = TypeVar("_Id", str, int)
#: Ids per ``IN`` list (well under SQLite's bound-parameter limit).
_BATCH = 500


@dataclass(frozen=True)
class FileInfo:
    workspace_id: str
    display_name: str


@dataclass(frozen=True)
class ChunkInfo:
    source_kind: str
    source: str
    chunk_index: int
    start_offset: int
    end_offset: int
    text: str


@dataclass
class Sources:
    """The live sources of ranked results, by id."""

    memory: dict[str, MemoryRecord] = field(default_factory=dict)
    #: Messages of live conversations, with their conversation's workspace.
    messages: dict[str, tuple[MessageRecord, str]] = field(default_factory=dict)
    files: dict[str, FileInfo] = field(default_factory=dict)
    chunks: dict[int, ChunkInfo] = field(default_factory=dict)


def _batches(ids: Collection[_Id]) -> list[list[_Id]]:
    items = sorted(ids)
    return [items[i : i + _BATCH] for i in range(0, len(items), _BATCH)]


class SearchStore(StoreBase):
    async def context_memory(
        self,
        workspace_id: str,
        conversation_id: str | None,
        query: str,
        conditions: SearchFilter,
        *,
        limit: int,
    ) -> list[tuple[MemoryRecord, float]]:
        """Memory items of a workspace (and its live conversations), or of one
        conversation and its workspace, matching ``query``, best first; Missing
        if the workspace or conversation is gone."""

        def tx(db: Session) -> list[tuple[MemoryRecord, float]]:
            if conversation_id is None:
                self._check_scope_live(db, Scope("", workspace_id=workspace_id), writable=False)
                found = self._search(
                    db,
                    (),
                    query,
                    kinds=(),
                    limit=limit,
                    conditions=conditions,
                    workspace_id=workspace_id,
                )
            else:
                conversation = ConversationName(workspace_id, conversation_id)
                scope = Scope(
                    str(conversation),
                    workspace_id=workspace_id,
                    conversation_id=conversation_id,
                )
                self._check_scope_live(db, scope, writable=False)
                found = self._search(
                    db,
                    [scope.scope, str(conversation.parent)],
                    query,
                    kinds=(),
                    limit=limit,
                    conditions=conditions,
                )
            return [(memory_record(row), score) for row, score in found]

        return await self._run(tx, write=False)

    async def search_memory_scope(
        self, scope: Scope, query: str, *, conditions: SearchFilter, limit: int, offset: int = 0
    ) -> list[tuple[MemoryRecord, float]]:
        """A memory scope's items matching ``query`` under the filter's conditions
        (not its metadata), best first; Missing if the scope is gone."""

        def tx(db: Session) -> list[tuple[MemoryRecord, float]]:
            self._check_scope_live(db, scope, writable=False)
            found = self._search(
                db,
                [scope.scope],
                query,
                kinds=(),
                limit=limit,
                offset=offset,
                conditions=conditions,
            )
            return [(memory_record(row), score) for row, score in found]

        return await self._run(tx, write=False)

    async def check_live(self, scope: Scope) -> None:
        """Missing unless the scope (workspace, conversation, user) exists."""
        await self._run(lambda db: self._check_scope_live(db, scope, writable=False), write=False)

    async def sources(
        self,
        *,
        memory_ids: Collection[str] = (),
        message_ids: Collection[str] = (),
        file_ids: Collection[str] = (),
        chunk_ids: Collection[int] = (),
    ) -> Sources:
        """The live, unexpired sources among those ids (the rest are left out)."""

        def tx(db: Session) -> Sources:
            found = Sources()
            stamp = now()
            conversations: dict[str, tuple[str, bool]] = {}

            def live_conversation(conversation_id: str) -> str | None:
                if conversation_id not in conversations:
                    row = db.get(ConversationRow, conversation_id)
                    conversations[conversation_id] = (
                        (row.workspace_id, row.deleted_at is None) if row else ("", False)
                    )
                workspace, live = conversations[conversation_id]
                return workspace if live else None

            for batch in _batches(memory_ids):
                for row in db.execute(
                    select(MemoryItemRow).where(MemoryItemRow.id.in_(batch))
                ).scalars():
                    if row.expires_at is not None and _aware(row.expires_at) <= stamp:
                        continue
                    if row.conversation_id is not None and not live_conversation(
                        row.conversation_id
                    ):
                        continue
                    found.memory[row.id] = memory_record(row)
            for batch in _batches(message_ids):
                query = select(MessageRow).where(MessageRow.id.in_(batch))
                for message in db.execute(query).scalars():
                    workspace = live_conversation(message.conversation_id)
                    if workspace is not None:
                        found.messages[message.id] = (message_record(message), workspace)
            for batch in _batches(file_ids):
                files = select(FileRow.id, FileRow.workspace_id, FileRow.display_name).where(
                    FileRow.id.in_(batch), FileRow.deleted_at.is_(None)
                )
                for file_id, workspace_id, display_name in db.execute(files):
                    found.files[file_id] = FileInfo(workspace_id, display_name)
            for numbers in _batches(chunk_ids):
                chunks = select(SemanticChunkRow).where(SemanticChunkRow.id.in_(numbers))
                for chunk in db.execute(chunks).scalars():
                    found.chunks[int(chunk.id)] = ChunkInfo(
                        chunk.source_kind,
                        chunk.source,
                        chunk.chunk_index,
                        chunk.start_offset,
                        chunk.end_offset,
                        chunk.text,
                    )
            return found

        if not (memory_ids or message_ids or file_ids or chunk_ids):
            return Sources()
        return await self._run(tx, write=False)


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
