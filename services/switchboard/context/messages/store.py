"""Persistence of messages and the entity memory an append writes (see ``storebase.py``).

A message's words are indexed for full-text search in its append's transaction, so a
message is found by them as soon as it is stored, whatever the semantic index holds
(migration 0023): on SQLite a row of ``messages_fts`` keyed by ``fts_rowid`` (a trigger
removes it with the message), on PostgreSQL the ``search`` column, inserted with the row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy import bindparam, func, literal_column, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from switchboard.context.records import (
    ConversationRecord,
    MemoryRecord,
    MessageRecord,
    Missing,
)
from switchboard.context.storebase import (
    StoreBase,
    memory_record,
    message_record,
)
from switchboard.platform.errors import NotFound
from switchboard.platform.store.models import ConversationRow, MemoryItemRow, MessageRow, table_of
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.prepared import Prepared
from switchboard.platform.store.storage import Idempotency, claim, retrying
from switchboard.platform.values.names import new_id, now

_T = TypeVar("_T")

#: An entity memory item keeps the names of this many of the newest messages mentioning it.
MAX_SOURCES: Final = 20

_MESSAGES: Final = table_of(MessageRow)
_CONVERSATIONS: Final = table_of(ConversationRow)
_MESSAGE_FIELDS: Final = tuple(MessageRecord.__dataclass_fields__)
# An append's statements compiled once and run on the driver (``prepared.py``): the
# ORM's unit of work, and even Core's execute, cost more than SQLite's own work.
_INSERT_MESSAGE: Final = Prepared(_MESSAGES.insert(), columns=(*_MESSAGE_FIELDS, "fts_rowid"))
#: The FTS5 row's key: SQLite's own rowid of ``messages`` could change at a VACUUM.
_NEXT_FTS_ROWID: Final = Prepared(select(func.coalesce(func.max(_MESSAGES.c.fts_rowid), 0) + 1))
_INDEX_WORDS_SQLITE: Final = Prepared(
    text("INSERT INTO messages_fts(rowid, text) VALUES (:rowid, :text)")
)
# ``search`` is outside the models (``models.SEARCH_COLUMNS``): the same table, with it.
_SEARCHABLE: Final = sa.table(
    "messages",
    *(sa.column(column.name, column.type) for column in _MESSAGES.c),
    sa.column("search"),
)
_INSERT_MESSAGE_PG: Final = Prepared(
    _SEARCHABLE.insert().values(
        search=func.to_tsvector(
            literal_column("'english'::regconfig"), bindparam("words", type_=sa.Text())
        )
    ),
    columns=(*_MESSAGE_FIELDS, "words"),
)
_COUNT_MESSAGE: Final = Prepared(
    update(_CONVERSATIONS)
    .where(_CONVERSATIONS.c.id == bindparam("conversation"))
    .values(
        last_seq=bindparam("seq"),
        version=_CONVERSATIONS.c.version + 1,
        updated_at=bindparam("stamp"),
        message_count=_CONVERSATIONS.c.message_count + 1,
        token_count=_CONVERSATIONS.c.token_count + bindparam("tokens"),
    )
)
#: Every column of a ``MessageRecord``, in its order.
_MESSAGE_BY_ID: Final = Prepared(
    select(*(_MESSAGES.c[field] for field in _MESSAGE_FIELDS)).where(
        _MESSAGES.c.id == bindparam("id")
    )
)


@dataclass(frozen=True)
class Appended:
    """What an append wrote: the message, the conversation after it, entity memory."""

    message: MessageRecord
    conversation: ConversationRecord
    created_memory: list[MemoryRecord]
    updated_memory: list[MemoryRecord]
    replayed: bool = False


@dataclass(frozen=True)
class EntityRecord:
    """An entity to remember from an appended message."""

    content: str
    meta: bytes
    tokens: int


@dataclass(frozen=True)
class NewMessage:
    """A message to append: its id, its stored bytes (``encode(seq, time)``) and its entities.

    ``name`` is the message's resource name and ``scope`` its conversation's:
    entity memory items are stored under the scope and cite the message by name.
    """

    id: str
    name: str
    scope: str
    role: str
    tokens: int
    encode: Callable[[int, dt.datetime], bytes]
    entities: Sequence[EntityRecord]
    entity_creator: str
    #: What full-text search matches the message by (its text as a model reads it).
    words: str = ""


class MessageStore(StoreBase):
    async def append_message(
        self,
        workspace_id: str,
        conversation_id: str,
        new: NewMessage,
        *,
        max_memory_per_scope: int,
        idempotency: Idempotency | None,
        staged: Staged[Any] | None = None,
    ) -> Appended:
        appended, _ = await self.append_message_with(
            workspace_id,
            conversation_id,
            new,
            _nothing,
            max_memory_per_scope=max_memory_per_scope,
            idempotency=idempotency,
            staged=staged,
        )
        return appended

    async def append_message_with(
        self,
        workspace_id: str,
        conversation_id: str,
        new: NewMessage,
        after: Callable[[Session, Appended], _T],
        *,
        max_memory_per_scope: int,
        idempotency: Idempotency | None,
        staged: Staged[Any] | None = None,
    ) -> tuple[Appended, _T]:
        """``append_message``, and ``after`` (another domain's write that the message
        starts: a run's row) in the same transaction, once the message and its events
        are written: both commit, or neither does (``after`` refusing rolls the message
        back). A conflict retries the two together."""
        tx = staging(
            staged,
            self._append_tx(workspace_id, conversation_id, new, max_memory_per_scope, idempotency),
        )

        def both(db: Session) -> tuple[Appended, _T]:
            appended = tx(db)
            return appended, after(db, appended)

        return await retrying(lambda: self._run(both, write=True))

    def _append_tx(
        self,
        workspace_id: str,
        conversation_id: str,
        new: NewMessage,
        max_memory_per_scope: int,
        idempotency: Idempotency | None,
    ) -> Callable[[Session], Appended]:
        def tx(db: Session) -> Appended:
            connection = db.connection()
            conversation = self._conversation_record(
                connection, workspace_id, conversation_id, writable=True, lock=True
            )
            earlier = claim(db, idempotency, new.id)
            if earlier is not None:
                message = _MESSAGE_BY_ID.first(connection, {"id": earlier})
                if message is None:
                    raise NotFound("the message created by this request_id is gone")
                return Appended(MessageRecord(*message), conversation, [], [], True)
            stamp = now()
            seq = conversation.last_seq + 1
            values: dict[str, Any] = {
                "id": new.id,
                "conversation_id": conversation_id,
                "seq": seq,
                "role": new.role,
                "token_count": new.tokens,
                "archived": False,
                "summary_id": None,
                "created_at": stamp,
                "data": new.encode(seq, stamp),
            }
            self._insert_message(connection, values, new.words)
            _COUNT_MESSAGE.execute(
                connection,
                {"conversation": conversation_id, "seq": seq, "stamp": stamp, "tokens": new.tokens},
            )
            # The conversation as the update left it.
            after = dataclasses.replace(
                conversation,
                last_seq=seq,
                version=conversation.version + 1,
                updated_at=stamp,
                message_count=conversation.message_count + 1,
                token_count=conversation.token_count + new.tokens,
            )
            created, updated = self._remember_entities(
                db, conversation, new, max_memory_per_scope, stamp
            )
            return Appended(MessageRecord(**values), after, created, updated)

        return tx

    def _insert_message(self, connection: Connection, values: dict[str, Any], words: str) -> None:
        """The message's row and its words' full-text index, in the append's transaction."""
        if not self._sqlite:
            _INSERT_MESSAGE_PG.execute(connection, {**values, "words": words})
            return
        rowid = _NEXT_FTS_ROWID.scalar(connection)
        _INSERT_MESSAGE.execute(connection, {**values, "fts_rowid": rowid})
        _INDEX_WORDS_SQLITE.execute(connection, {"rowid": rowid, "text": words})

    def _remember_entities(
        self,
        db: Session,
        conversation: ConversationRecord,
        new: NewMessage,
        max_per_scope: int,
        stamp: dt.datetime,
    ) -> tuple[list[MemoryRecord], list[MemoryRecord]]:
        """Entity items for ``new``'s entities: new ones created, known ones citing it too."""
        if not new.entities:
            return [], []
        existing = {
            row.content: row
            for row in db.execute(
                select(MemoryItemRow).where(
                    MemoryItemRow.scope == new.scope,
                    MemoryItemRow.kind == "entity",
                    MemoryItemRow.content.in_([e.content for e in new.entities]),
                )
            ).scalars()
        }
        room = max_per_scope - self._count_scope(db, new.scope)
        created: list[MemoryRecord] = []
        updated: list[MemoryRecord] = []
        for entity in new.entities:
            row = existing.get(entity.content)
            if row is not None:
                sources = row.sources.split()
                # The newest mentions matter most; the list stays bounded.
                if new.name not in sources:
                    row.sources = " ".join([*sources, new.name][-MAX_SOURCES:])
                    row.updated_at = stamp
                    row.version += 1
                    updated.append(memory_record(row))
                continue
            if room <= 0:
                break  # the scope is full; the message itself is kept
            room -= 1
            row = MemoryItemRow(
                id=new_id(),
                scope=new.scope,
                workspace_id=conversation.workspace_id,
                conversation_id=conversation.id,
                user_id=None,
                kind="entity",
                content=entity.content,
                pinned=False,
                meta=entity.meta,
                sources=new.name,
                creator=new.entity_creator,
                created_at=stamp,
                updated_at=stamp,
                expires_at=None,
                token_count=entity.tokens,
                version=1,
            )
            self._add_memory_row(db, row)
            created.append(memory_record(row))
        return created, updated

    async def get_message(
        self, workspace_id: str, conversation_id: str, message_id: str
    ) -> MessageRecord:
        def tx(db: Session) -> MessageRecord:
            self._conversation(db, workspace_id, conversation_id)
            message = db.get(MessageRow, message_id)
            if message is None or message.conversation_id != conversation_id:
                raise Missing("message", workspace_id, conversation_id, message_id)
            return message_record(message)

        return await self._run(tx, write=False)

    async def list_messages(
        self,
        workspace_id: str,
        conversation_id: str,
        after_seq: int | None,
        limit: int,
        *,
        show_archived: bool,
        newest_first: bool,
    ) -> list[MessageRecord]:
        query = select(MessageRow).where(MessageRow.conversation_id == conversation_id)
        if not show_archived:
            query = query.where(MessageRow.archived.is_(False))
        if after_seq is not None:
            query = query.where(
                MessageRow.seq < after_seq if newest_first else MessageRow.seq > after_seq
            )
        query = query.order_by(MessageRow.seq.desc() if newest_first else MessageRow.seq)

        def tx(db: Session) -> list[MessageRecord]:
            self._conversation(db, workspace_id, conversation_id)
            return [message_record(row) for row in db.execute(query.limit(limit)).scalars()]

        return await self._run(tx, write=False, snapshot=True)


def _nothing(db: Session, appended: Appended) -> None:
    """A plain append's: nothing written beside the message."""
