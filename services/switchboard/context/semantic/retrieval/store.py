"""The reads of a search (``search.py``) besides the chunk store's ranked lists:
memory items' and messages' full-text search over a workspace or a conversation (each
through its own index, written with the item or the message), and the sources of
ranked results (memory items, messages, files, the chunks themselves).

Hydration is where visibility is decided: a source that is gone (deleted
item, deleted conversation or file, expired item) or outside the searched
workspace is left out, whatever the chunk index still holds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from sqlalchemy import bindparam, select, text
from sqlalchemy.exc import DataError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter

from switchboard.context.records import MemoryRecord, MessageRecord, Scope, Unsearchable
from switchboard.context.semantic.ports import SearchFilter
from switchboard.context.storebase import StoreBase, memory_record, message_record
from switchboard.platform.store.models import (
    ConversationRow,
    FileRow,
    MemoryItemRow,
    MessageRow,
    SemanticChunkRow,
    table_of,
)
from switchboard.platform.values.names import now
from switchboard.platform.values.resources import ConversationName

_Id = TypeVar("_Id", str, int)
#: Ids per ``IN`` list (well under SQLite's bound-parameter limit).
_BATCH = 500
_MESSAGE_CREATED: Final = table_of(MessageRow).c.created_at.type


@dataclass(frozen=True)
class MessageHit:
    """A message full-text search found: its conversation, id and relevance."""

    conversation_id: str
    message_id: str
    score: float


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
        self,
        scope: Scope,
        query: str,
        *,
        conditions: SearchFilter,
        limit: int,
        offset: int = 0,
        origin_workspace_id: str | None = None,
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
                origin_workspace_id=origin_workspace_id,
            )
            return [(memory_record(row), score) for row, score in found]

        return await self._run(tx, write=False)

    async def context_messages(
        self,
        workspace_id: str,
        conversation_id: str | None,
        query: str,
        conditions: SearchFilter,
        *,
        limit: int,
        keep: Callable[[bytes], bool] | None = None,
    ) -> list[MessageHit]:
        """Messages of the workspace's live conversations (or of one conversation)
        matching ``query`` through their own full-text index, best first, under the
        filter's conditions on messages (role, conversation, create_time); ``keep``
        decides the rest from a message's stored bytes. A deleted conversation's
        messages are left out; Unsearchable if the engine refuses the query."""
        match = self._match(query)
        if not match or limit <= 0 or not _may_match_messages(conditions):
            return []
        where = ["cv.workspace_id = :workspace", "cv.deleted_at IS NULL"]
        params: dict[str, Any] = {"match": match, "workspace": workspace_id}
        binds: list[BindParameter[Any]] = []
        if conversation_id is not None:
            where.append("m.conversation_id = :conversation")
            params["conversation"] = conversation_id
        _message_conditions(conditions, where, params, binds)
        sql = _message_search_sql(" AND ".join(where), sqlite=self._sqlite, data=keep is not None)
        statement = text(sql).bindparams(*binds)
        # Pages of candidates until ``limit`` are kept: ``keep`` may drop some.
        page = limit if keep is None else max(limit, _BATCH)

        def tx(db: Session) -> list[MessageHit]:
            found: list[MessageHit] = []
            offset = 0
            while len(found) < limit:
                try:
                    rows = (
                        db.connection()
                        .execute(statement, {**params, "limit": page, "offset": offset})
                        .all()
                    )
                except (OperationalError, ProgrammingError, DataError) as exc:
                    if not any(w in str(exc.orig).lower() for w in ("fts5", "tsquery", "syntax")):
                        raise
                    raise Unsearchable() from None
                for message_id, conversation, data, score in rows:
                    if keep is None or keep(data):
                        found.append(MessageHit(conversation, message_id, float(score)))
                if len(rows) < page:
                    break
                offset += page
            return found[:limit]

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
                    if row.valid_until is not None and _aware(row.valid_until) <= stamp:
                        continue  # retired: history, not something to find
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


def _may_match_messages(conditions: SearchFilter) -> bool:
    """Whether a message can hold the conditions: it belongs to a conversation and is
    no document passage."""
    if conditions.sources is not None and "message" not in conditions.sources:
        return False
    if "message" in conditions.exclude_sources:
        return False
    return not conditions.without_conversation and conditions.files is None


def _message_conditions(
    conditions: SearchFilter,
    where: list[str],
    params: dict[str, Any],
    binds: list[BindParameter[Any]],
) -> None:
    """A search filter's conditions on messages, as SQL on ``messages m`` (values bound);
    a message's label is its role, as its passages' is."""

    def one_of(column: str, name: str, values: frozenset[str] | None, negate: bool) -> None:
        if values is None or (negate and not values):
            return
        if not values:  # "one of nothing"
            where.append("1 = 0")
            return
        where.append(f"{column} {'NOT IN' if negate else 'IN'} :{name}")
        params[name] = sorted(values)
        binds.append(bindparam(name, expanding=True))

    one_of("m.role", "roles", conditions.labels, False)
    one_of("m.role", "not_roles", conditions.exclude_labels, True)
    one_of("m.conversation_id", "conversations", conditions.conversation_ids, False)
    one_of("m.conversation_id", "not_conversations", conditions.exclude_conversation_ids, True)
    if conditions.created_after is not None:
        op = ">=" if conditions.created_after_inclusive else ">"
        where.append(f"m.created_at {op} :created_after")
        params["created_after"] = conditions.created_after
        binds.append(bindparam("created_after", type_=_MESSAGE_CREATED))
    if conditions.created_before is not None:
        op = "<=" if conditions.created_before_inclusive else "<"
        where.append(f"m.created_at {op} :created_before")
        params["created_before"] = conditions.created_before
        binds.append(bindparam("created_before", type_=_MESSAGE_CREATED))


def _message_search_sql(where: str, *, sqlite: bool, data: bool) -> str:
    """The messages' full-text query; ``data``: with each message's stored bytes."""
    # ``where`` is built from constant fragments; values are bound.
    columns = f"m.id, m.conversation_id, {'m.data' if data else 'NULL'}"
    if sqlite:
        return (
            f"SELECT {columns}, -bm25(messages_fts) AS score FROM messages_fts "  # noqa: S608
            "JOIN messages m ON m.fts_rowid = messages_fts.rowid "
            "JOIN conversations cv ON cv.id = m.conversation_id "
            f"WHERE messages_fts MATCH :match AND {where} "
            "ORDER BY score DESC, m.id LIMIT :limit OFFSET :offset"
        )
    # ts_rank, as the chunk index ranks passages, so one list reads the same either way.
    return (
        f"SELECT {columns}, ts_rank(m.search, q) AS score "  # noqa: S608
        "FROM messages m JOIN conversations cv ON cv.id = m.conversation_id, "
        "to_tsquery('english', :match) q "
        f"WHERE m.search @@ q AND {where} "
        "ORDER BY score DESC, m.id LIMIT :limit OFFSET :offset"
    )


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
