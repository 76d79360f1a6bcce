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

from switchboard.context.branches import store as branching
from switchboard.context.files.store import FileRecord, file_record
from switchboard.context.records import (
    ConversationRecord,
    MemoryRecord,
    MessageRecord,
    Missing,
)
from switchboard.context.storebase import (
    StoreBase,
    conversation_record,
    memory_record,
    message_record,
)
from switchboard.platform.errors import FailedPrecondition, NotFound, QuotaExceeded
from switchboard.platform.events.erasure.store import add_redaction
from switchboard.platform.store.models import (
    ConversationRow,
    FileRow,
    MemoryItemRow,
    MessageFileRow,
    MessageRow,
    table_of,
)
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.prepared import Prepared
from switchboard.platform.store.storage import Idempotency, claim, retrying
from switchboard.platform.values.names import new_id, now
from switchboard.platform.values.resources import ConversationName, MessageName

_T = TypeVar("_T")

#: An entity memory item keeps the names of this many of the newest messages mentioning it.
MAX_SOURCES: Final = 20
#: A deletion with the later messages removes at most this many (one transaction, one
#: tombstone event each).
MAX_DELETED: Final = 1000

_MESSAGES: Final = table_of(MessageRow)
_CONVERSATIONS: Final = table_of(ConversationRow)
_MESSAGE_FIELDS: Final = tuple(MessageRecord.__dataclass_fields__)
# An append's statements compiled once and run on the driver (``prepared.py``): the
# ORM's unit of work, and even Core's execute, cost more than SQLite's own work.
_INSERT_MESSAGE: Final = Prepared(
    _MESSAGES.insert(), columns=(*_MESSAGE_FIELDS, "author", "fts_rowid")
)
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
    columns=(*_MESSAGE_FIELDS, "author", "words"),
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
    #: The message is a new version of another: it started a branch (``replaces``).
    forked: bool = False


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
    encode: Callable[[int, dt.datetime, int], bytes]
    entities: Sequence[EntityRecord]
    entity_creator: str
    #: What full-text search matches the message by (its text as a model reads it).
    words: str = ""
    #: The branch to append to (0: the active one), and the message this one is a new
    #: version of ("": none), which starts a new branch (``branches/``).
    branch: int = 0
    replaces: str = ""
    max_branches: int = 0
    #: The ids of the files the append stored for it (deleted with it).
    owned_files: Sequence[str] = ()
    #: ``Message.author`` (``users/{u}``, ``handlers/{h}``): a column too, so that an
    #: erasure finds a person's messages without reading every message.
    author: str = ""


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
            if new.replaces or new.branch or conversation.branched:
                conversation, branch, parent_seq = self._branch_place(
                    connection, conversation, new, stamp
                )
            else:
                # One branch (the plain path): the message follows the newest one.
                branch, parent_seq = 1, conversation.last_seq
            values: dict[str, Any] = {
                "id": new.id,
                "conversation_id": conversation_id,
                "seq": seq,
                "role": new.role,
                "token_count": new.tokens,
                "archived": False,
                "summary_id": None,
                "created_at": stamp,
                "data": new.encode(seq, stamp, branch),
                "branch": branch,
                "parent_seq": parent_seq,
            }
            self._insert_message(connection, values, new.words, new.author)
            if new.owned_files:
                connection.execute(
                    sa.insert(MessageFileRow),
                    [{"message_id": new.id, "file_id": f} for f in new.owned_files],
                )
            _COUNT_MESSAGE.execute(
                connection,
                {"conversation": conversation_id, "seq": seq, "stamp": stamp, "tokens": new.tokens},
            )
            branching.moved_head(connection, conversation, branch, seq)
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
            return Appended(
                MessageRecord(**values), after, created, updated, forked=bool(new.replaces)
            )

        return tx

    def _branch_place(
        self,
        connection: Connection,
        conversation: ConversationRecord,
        new: NewMessage,
        stamp: dt.datetime,
    ) -> tuple[ConversationRecord, int, int]:
        """Where ``new`` goes in a conversation with branches, or one it makes branch:
        (the conversation after any fork, its branch, the sequence it follows)."""
        branch = branching.check_branch(conversation, new.branch)
        if not new.replaces:
            return conversation, branch, branching.head(connection, conversation, branch)
        workspace_id, conversation_id = conversation.workspace_id, conversation.id
        old = branching.place(connection, conversation_id, new.replaces)
        if old is None:
            raise Missing("message", workspace_id, conversation_id, new.replaces)
        if not new.branch:
            # The message's own branch holds it, whichever is active: two edits of
            # one message at once each fork from where it is.
            branch = old.branch
        elif not branching.path(connection, conversation, branch).holds(old.branch, old.seq):
            raise FailedPrecondition(
                f"replaces: the message is not on branch {branch}; name a branch that holds it"
            )
        branching.check_unfolded(connection, conversation_id, old.parent_seq, "replaces")
        forked = branching.fork(
            connection,
            conversation,
            source=branch,
            after=old.parent_seq,
            max_branches=new.max_branches,
            stamp=stamp,
        )
        # A new version of ``old``: it follows what ``old`` followed.
        return forked.conversation, forked.number, old.parent_seq

    def _insert_message(
        self, connection: Connection, values: dict[str, Any], words: str, author: str
    ) -> None:
        """The message's row and its words' full-text index, in the append's transaction."""
        if not self._sqlite:
            _INSERT_MESSAGE_PG.execute(connection, {**values, "author": author, "words": words})
            return
        rowid = _NEXT_FTS_ROWID.scalar(connection)
        _INSERT_MESSAGE.execute(connection, {**values, "author": author, "fts_rowid": rowid})
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

    async def get_message(self, workspace_id: str, conversation_id: str, message_id: str) -> Listed:
        def tx(db: Session) -> Listed:
            conversation = conversation_record(
                self._conversation(db, workspace_id, conversation_id)
            )
            message = db.get(MessageRow, message_id)
            if message is None or message.conversation_id != conversation_id:
                raise Missing("message", workspace_id, conversation_id, message_id)
            record = message_record(message)
            return Listed(
                [record],
                conversation.active_branch,
                _siblings(db.connection(), conversation, [record]),
            )

        return await self._run(tx, write=False)

    async def delete_messages(
        self,
        workspace_id: str,
        conversation_id: str,
        message_id: str,
        *,
        with_later: bool,
        branch: int,
        may_delete: Callable[[MessageRecord], None],
        staged: Staged[Any] | None = None,
        redact: bool = True,
    ) -> Deleted:
        """Delete a message (with ``with_later``, and every later one on ``branch``'s
        history, 0: the active one): rows, their words' index, their citations in
        entity memory. ``may_delete`` refuses one the caller may not delete (nothing
        is deleted then). A branch whose newest message goes keeps following its
        sequence: what is appended there next is still a version of what followed it.
        With ``redact``, the log's events naming them are redacted in the background
        (``platform/events/erasure``), the redaction written in this transaction."""

        def tx(db: Session) -> Deleted:
            connection = db.connection()
            conversation = self._conversation_record(
                connection, workspace_id, conversation_id, writable=True, lock=True
            )
            number = branching.check_branch(conversation, branch)
            found = _MESSAGE_BY_ID.first(connection, {"id": message_id})
            first = MessageRecord(*found) if found is not None else None
            if first is None or first.conversation_id != conversation_id:
                raise Missing("message", workspace_id, conversation_id, message_id)
            history = branching.path(connection, conversation, number)
            if (with_later or branch) and not history.holds(first.branch, first.seq):
                raise FailedPrecondition(
                    f"the message is not on branch {number}; name a branch that holds it"
                )
            doomed = [first]
            if with_later:
                later = (
                    select(*(_MESSAGES.c[f] for f in _MESSAGE_FIELDS))
                    .where(
                        _MESSAGES.c.conversation_id == conversation_id,
                        _MESSAGES.c.seq > first.seq,
                        history.condition(conversation_id),
                    )
                    .order_by(_MESSAGES.c.seq)
                )
                found_later = connection.execute(later.limit(MAX_DELETED)).all()
                if len(found_later) >= MAX_DELETED:
                    raise QuotaExceeded(
                        f"a deletion removes at most {MAX_DELETED} messages; delete the later "
                        "ones first, or the conversation",
                        subject="messages per deletion",
                    )
                doomed += [MessageRecord(*row) for row in found_later]
            for record in doomed:
                may_delete(record)
            ids = [record.id for record in doomed]
            files = _delete_owned_files(db, ids)
            # SQLite's words go by the trigger of migration 0023, PostgreSQL's with the row
            # (and ``message_files`` with it).
            db.execute(sa.delete(MessageRow).where(MessageRow.id.in_(ids)))
            names = {_name(workspace_id, record) for record in doomed}
            if redact:
                add_redaction(db, sorted(names))
            deleted_memory, updated_memory = self._forget_citations(
                db, str(ConversationName(workspace_id, conversation_id)), names
            )
            live = [record for record in doomed if not record.archived]
            stamp = now()
            tokens = sum(record.token_count for record in live)
            db.execute(
                update(_CONVERSATIONS)
                .where(_CONVERSATIONS.c.id == conversation_id)
                .values(
                    version=_CONVERSATIONS.c.version + 1,
                    updated_at=stamp,
                    message_count=_CONVERSATIONS.c.message_count - len(live),
                    token_count=_CONVERSATIONS.c.token_count - tokens,
                )
            )
            forks = branching.forks_of(connection, conversation_id)
            if forks:
                # Their windows read these rows too: a new version each.
                db.execute(
                    update(_CONVERSATIONS)
                    .where(_CONVERSATIONS.c.id.in_(forks))
                    .values(version=_CONVERSATIONS.c.version + 1)
                )
            after = dataclasses.replace(
                conversation,
                version=conversation.version + 1,
                updated_at=stamp,
                message_count=conversation.message_count - len(live),
                token_count=conversation.token_count - tokens,
            )
            return Deleted(doomed, deleted_memory, updated_memory, after, files)

        return await retrying(lambda: self._run(staging(staged, tx), write=True))

    def _forget_citations(
        self, db: Session, scope: str, names: set[str]
    ) -> tuple[list[MemoryRecord], list[MemoryRecord]]:
        """Entity items of the conversation stop citing deleted messages; one that then
        cites none is deleted (it holds words only they had)."""
        deleted: list[MemoryRecord] = []
        updated: list[MemoryRecord] = []
        rows = db.execute(
            select(MemoryItemRow).where(
                MemoryItemRow.scope == scope, MemoryItemRow.kind == "entity"
            )
        ).scalars()
        for row in rows:
            sources = row.sources.split()
            kept = [source for source in sources if source not in names]
            if len(kept) == len(sources):
                continue
            if kept:
                row.sources = " ".join(kept)
                row.updated_at = now()
                row.version += 1
                updated.append(memory_record(row))
                continue
            if self._sqlite:
                db.execute(
                    text("DELETE FROM memory_fts WHERE rowid = :rowid"), {"rowid": row.fts_rowid}
                )
            deleted.append(memory_record(row))
            db.delete(row)
        # The conversation's version, which the caller moves, covers its memory's windows.
        return deleted, updated

    async def list_messages(
        self,
        workspace_id: str,
        conversation_id: str,
        after_seq: int | None,
        limit: int,
        *,
        show_archived: bool,
        newest_first: bool,
        branch: int = 0,
    ) -> Listed:
        """A page of ``branch``'s history (0: the active branch), with each message's
        siblings when the conversation has branches."""
        # The conversation's messages, or the branch's history (which names the
        # conversations it reads: a fork's shared history is its source's rows).
        query = select(MessageRow)
        if not show_archived:
            query = query.where(MessageRow.archived.is_(False))
        if after_seq is not None:
            query = query.where(
                MessageRow.seq < after_seq if newest_first else MessageRow.seq > after_seq
            )
        query = query.order_by(MessageRow.seq.desc() if newest_first else MessageRow.seq)

        def tx(db: Session) -> Listed:
            conversation = conversation_record(
                self._conversation(db, workspace_id, conversation_id)
            )
            number = branching.check_branch(conversation, branch)
            connection = db.connection()
            history = branching.path(connection, conversation, number)
            read = query.where(history.condition(conversation_id))
            rows = [message_record(row) for row in db.execute(read.limit(limit)).scalars()]
            return Listed(rows, number, _siblings(connection, conversation, rows))

        return await self._run(tx, write=False, snapshot=True)


@dataclass(frozen=True)
class Deleted:
    """What a message deletion removed: the messages (oldest first), the entity items
    left citing nothing (deleted) or citing fewer messages, the conversation after."""

    messages: list[MessageRecord]
    deleted_memory: list[MemoryRecord]
    updated_memory: list[MemoryRecord]
    conversation: ConversationRecord
    #: The files the messages owned, deleted with them.
    files: list[FileRecord] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class Listed:
    """Messages read, the branch they were read on, and each one's siblings (by id:
    the ids of every message following the one it follows, oldest first; empty while
    the conversation has one branch)."""

    messages: list[MessageRecord]
    branch: int
    siblings: dict[str, list[str]]


def _delete_owned_files(db: Session, message_ids: list[str]) -> list[FileRecord]:
    """The live files the messages owned, deleted: their text (a transcript, a document's
    words) cleared now, their bytes collected once nothing live names their content
    (``files/blobs``)."""
    owned = select(MessageFileRow.file_id).where(MessageFileRow.message_id.in_(message_ids))
    rows = list(
        db.execute(
            select(FileRow).where(FileRow.id.in_(owned), FileRow.deleted_at.is_(None))
        ).scalars()
    )
    stamp = now()
    for row in rows:
        row.deleted_at = stamp
        row.updated_at = stamp
        row.version += 1
        row.text = ""
        row.text_tokens = 0
    db.flush()
    return [file_record(row) for row in rows]


def _name(workspace_id: str, record: MessageRecord) -> str:
    return str(MessageName(workspace_id, record.conversation_id, record.id))


def _siblings(
    connection: Connection, conversation: ConversationRecord, rows: Sequence[MessageRecord]
) -> dict[str, list[str]]:
    if not conversation.branched or not rows:
        return {}
    following = branching.siblings(connection, conversation.id, [r.parent_seq for r in rows])
    return {r.id: following.get(r.parent_seq, [r.id]) for r in rows}


def _nothing(db: Session, appended: Appended) -> None:
    """A plain append's: nothing written beside the message."""
