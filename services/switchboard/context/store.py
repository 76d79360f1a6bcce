"""Persistence of the context service: workspaces, members, conversations,
messages, memory items, full-text search and idempotency keys.

All SQL of the context service lives here. Every write runs in one
transaction; on SQLite it begins IMMEDIATE (``platform/db.py``), on PostgreSQL
the rows that order concurrent writers (a conversation for appends) are
locked with ``SELECT ... FOR UPDATE``, so sequence numbers and counters stay
exact under concurrency on both.

Reads that must be consistent across several statements (the context window)
run in one read transaction: a WAL snapshot on SQLite, REPEATABLE READ on
PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar, TypeVarTuple

from sqlalchemy import Select, and_, bindparam, delete, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import (
    DataError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from switchboard.platform import names
from switchboard.platform.db import Database, DatabaseUnavailable, is_outage
from switchboard.platform.errors import (
    AlreadyExists,
    EtagMismatch,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
)
from switchboard.platform.models import (
    Base,
    ConversationRow,
    IdempotencyRow,
    MemoryItemRow,
    MemoryScopeRow,
    MessageRow,
    UserRow,
    WorkspaceMemberRow,
    WorkspaceRow,
    table_of,
)
from switchboard.platform.outbox import Staged, staging
from switchboard.platform.storage import (
    IDEMPOTENCY_TTL,
    Idempotency,
    claim,
    retrying,
    transaction,
)

_T = TypeVar("_T")
_R = TypeVar("_R")
_Ts = TypeVarTuple("_Ts")

log = logging.getLogger("switchboard.context.store")

# Statements of the per-message path, built once: building a statement (its
# clauses and cache key) cost more than running it from SQLAlchemy's cache.
_CONVERSATION_BY_ID: Final = select(ConversationRow).where(ConversationRow.id == bindparam("id"))
_CONVERSATION_FOR_UPDATE: Final = _CONVERSATION_BY_ID.with_for_update()
_MESSAGES: Final = table_of(MessageRow)
_CONVERSATIONS: Final = table_of(ConversationRow)
#: An append's two writes in Core: the ORM's unit of work cost about 1 ms for them.
_INSERT_MESSAGE: Final = _MESSAGES.insert()
_COUNT_MESSAGE: Final = (
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
# The window's reads (one snapshot per window; see ``window_rows``).
_PINNED: Final = (
    select(MemoryItemRow)
    .where(
        MemoryItemRow.scope.in_(bindparam("scopes", expanding=True)),
        MemoryItemRow.pinned.is_(True),
    )
    .order_by(MemoryItemRow.created_at, MemoryItemRow.id)
    .limit(bindparam("limit"))
)
_LATEST_USER_MESSAGE: Final = (
    select(MessageRow)
    .where(MessageRow.conversation_id == bindparam("conversation"), MessageRow.role == "user")
    .order_by(MessageRow.seq.desc())
    .limit(1)
)
_RECENT_MESSAGES: Final = (
    select(MessageRow.seq, MessageRow.token_count, MessageRow.data)
    .where(
        MessageRow.conversation_id == bindparam("conversation"),
        MessageRow.archived.is_(False),
        MessageRow.seq < bindparam("upper"),
    )
    .order_by(MessageRow.seq.desc())
    .limit(bindparam("limit"))
)
_MEMORY_BY_IDS: Final = select(MemoryItemRow).where(
    MemoryItemRow.id.in_(bindparam("ids", expanding=True))
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Appended:
    """What an append wrote: the message, the conversation after it, entity memory."""

    message: MessageRow
    conversation: ConversationRow
    created_memory: list[MemoryItemRow]
    updated_memory: list[MemoryItemRow]
    replayed: bool = False


@dataclass(frozen=True)
class EntityRecord:
    """An entity to remember from an appended message (``kind``: mention, link...)."""

    content: str
    meta: bytes
    tokens: int


@dataclass(frozen=True)
class WindowRows:
    """Everything a context window is built from, read in one snapshot."""

    conversation: ConversationRow
    workspace_version: int
    user_version: int
    pinned: list[MemoryItemRow]
    relevant: list[tuple[MemoryItemRow, float]]
    summary: MemoryItemRow | None
    # (seq, token_count) of live messages, newest first, at least covering the budget.
    recent: list[tuple[int, int]]
    # The stored ``Message`` of each of them, by seq.
    bodies: dict[int, bytes]
    latest_user_message: MessageRow | None


def etag_version(etag: str) -> int | None:
    """The version an etag we issued (``"N"`` or ``W/"N"``) names; None for anything else."""
    return names.etag_version(etag)


def check_etag(etag: str, version: int) -> None:
    """Raise ABORTED unless ``etag`` (if given; the service checked its form) names ``version``."""
    if etag and etag_version(etag) != version:
        raise EtagMismatch("the resource changed since the etag was read; read it again")


class ContextStore:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._sessions = database.sessions
        self._readers = database.readers
        self.sqlite = database.dialect_name == "sqlite"

    # -- transactions --------------------------------------------------------------

    async def _run(
        self, work: Callable[[Session], _T], *, write: bool, snapshot: bool = False
    ) -> _T:
        """One transaction of synchronous ORM code (``Database.run``), errors mapped."""
        return await transaction(self._database, work, write=write, snapshot=snapshot, log=log)

    async def _rows(self, query: Select[_R]) -> list[_R]:
        """The ORM objects a single-entity query selects, in one read transaction."""
        return await self._run(lambda db: list(db.execute(query).scalars()), write=False)

    def _lock(self, query: Select[_R]) -> Select[_R]:
        return query if self.sqlite else query.with_for_update()

    async def purge_idempotency(self) -> int:
        def tx(db: Session) -> int:
            result = db.execute(
                delete(IdempotencyRow).where(IdempotencyRow.created_at < now() - IDEMPOTENCY_TTL)
            )
            return int(getattr(result, "rowcount", 0) or 0)

        return await self._run(tx, write=True)

    def _bump_scope(self, db: Session, scope: str) -> None:
        insert = sqlite_insert if self.sqlite else pg_insert
        statement = insert(MemoryScopeRow).values(scope=scope, version=1)
        db.execute(
            statement.on_conflict_do_update(
                index_elements=[MemoryScopeRow.scope],
                set_={"version": MemoryScopeRow.version + 1},
            )
        )

    # -- workspaces ------------------------------------------------------------------

    async def create_workspace(
        self,
        workspace_id: str,
        display_name: str,
        description: str,
        owner_id: str,
        idempotency: Idempotency | None,
        max_owned: int,
        staged: Staged[Any] | None = None,
    ) -> tuple[WorkspaceRow, bool]:
        async def run() -> tuple[WorkspaceRow, bool]:
            def tx(db: Session) -> tuple[WorkspaceRow, bool]:
                earlier = claim(db, idempotency, workspace_id)
                if earlier is not None:
                    row = db.get(WorkspaceRow, earlier)
                    if row is None:
                        raise NotFound(f"workspaces/{earlier} not found")
                    return row, False
                _require_room(
                    db,
                    _counted(
                        WorkspaceMemberRow,
                        WorkspaceMemberRow.user_id == owner_id,
                        WorkspaceMemberRow.role == "owner",
                    ),
                    max_owned,
                    f"a user may own at most {max_owned} workspaces",
                    "workspaces per owner",
                )
                if db.get(WorkspaceRow, workspace_id) is not None:
                    raise _already_exists(f"workspaces/{workspace_id}")
                stamp = now()
                row = WorkspaceRow(
                    id=workspace_id,
                    display_name=display_name,
                    description=description,
                    created_at=stamp,
                    updated_at=stamp,
                    deleted_at=None,
                    version=1,
                )
                db.add(row)
                db.flush()
                db.add(
                    WorkspaceMemberRow(
                        workspace_id=workspace_id,
                        user_id=owner_id,
                        role="owner",
                        created_at=stamp,
                        updated_at=stamp,
                    )
                )
                return row, True

            return await self._run(staging(staged, tx), write=True)

        return await retrying(run)

    async def get_workspace(self, workspace_id: str) -> WorkspaceRow | None:
        def tx(db: Session) -> WorkspaceRow | None:
            return db.get(WorkspaceRow, workspace_id)

        return await self._run(tx, write=False)

    async def list_workspaces(
        self,
        user_id: str,
        after: tuple[dt.datetime, str] | None,
        limit: int,
        *,
        show_deleted: bool,
    ) -> list[tuple[WorkspaceRow, str]]:
        query = (
            select(WorkspaceRow, WorkspaceMemberRow.role)
            .join(WorkspaceMemberRow, WorkspaceMemberRow.workspace_id == WorkspaceRow.id)
            .where(WorkspaceMemberRow.user_id == user_id)
        )
        if show_deleted:
            # Deleted workspaces are visible to their owners only (to restore them).
            query = query.where(
                or_(WorkspaceRow.deleted_at.is_(None), WorkspaceMemberRow.role == "owner")
            )
        else:
            query = query.where(WorkspaceRow.deleted_at.is_(None))
        query = _keyset(query, WorkspaceRow.created_at, WorkspaceRow.id, after).limit(limit)

        def tx(db: Session) -> list[tuple[WorkspaceRow, str]]:
            return [(row, role) for row, role in (db.execute(query)).all()]

        return await self._run(tx, write=False)

    async def update_workspace(
        self,
        workspace_id: str,
        etag: str,
        changes: dict[str, Any],
        staged: Staged[Any] | None = None,
    ) -> WorkspaceRow:
        def tx(db: Session) -> WorkspaceRow:
            row = self._workspace_for_update(db, workspace_id)
            check_etag(etag, row.version)
            for field, value in changes.items():
                setattr(row, field, value)
            row.version += 1
            row.updated_at = now()
            return row

        return await self._run(staging(staged, tx), write=True)

    async def set_workspace_deleted(
        self,
        workspace_id: str,
        etag: str,
        *,
        deleted: bool,
        staged: Staged[Any] | None = None,
    ) -> WorkspaceRow:
        def tx(db: Session) -> WorkspaceRow:
            row = self._workspace_for_update(db, workspace_id, include_deleted=True)
            check_etag(etag, row.version)
            if (row.deleted_at is not None) == deleted:
                state = "deleted" if deleted else "not deleted"
                raise FailedPrecondition(f"workspaces/{workspace_id} is already {state}")
            stamp = now()
            row.deleted_at = stamp if deleted else None
            row.version += 1
            row.updated_at = stamp
            return row

        return await self._run(staging(staged, tx), write=True)

    def _workspace_for_update(
        self, db: Session, workspace_id: str, *, include_deleted: bool = False
    ) -> WorkspaceRow:
        row = (
            db.execute(self._lock(select(WorkspaceRow).where(WorkspaceRow.id == workspace_id)))
        ).scalar_one_or_none()
        if row is None or (row.deleted_at is not None and not include_deleted):
            raise NotFound(f"workspaces/{workspace_id} not found")
        return row

    async def purge_workspaces(self, deleted_before: dt.datetime) -> list[str]:
        """Hard-delete workspaces soft-deleted before ``deleted_before``; their ids."""

        def tx(db: Session) -> list[str]:
            ids = list(
                (
                    db.execute(
                        select(WorkspaceRow.id).where(WorkspaceRow.deleted_at < deleted_before)
                    )
                ).scalars()
            )
            if ids:
                if self.sqlite:
                    db.execute(
                        text(
                            "DELETE FROM memory_fts WHERE rowid IN (SELECT fts_rowid FROM "
                            "memory_items WHERE workspace_id IN :ids)"
                        ).bindparams(bindparam("ids", expanding=True)),
                        {"ids": ids},
                    )
                db.execute(delete(WorkspaceRow).where(WorkspaceRow.id.in_(ids)))
            return ids

        return await self._run(tx, write=True)

    # -- members -----------------------------------------------------------------------

    async def add_member(
        self,
        workspace_id: str,
        user_id: str,
        role: str,
        max_members: int,
        staged: Staged[Any] | None = None,
    ) -> WorkspaceMemberRow:
        def tx(db: Session) -> WorkspaceMemberRow:
            self._workspace_for_update(db, workspace_id)
            if db.get(UserRow, user_id) is None:
                raise NotFound(f"users/{user_id} not found")
            if db.get(WorkspaceMemberRow, (workspace_id, user_id)) is not None:
                raise _already_exists(f"workspaces/{workspace_id}/members/{user_id}")
            _require_room(
                db,
                _counted(WorkspaceMemberRow, WorkspaceMemberRow.workspace_id == workspace_id),
                max_members,
                f"a workspace may have at most {max_members} members",
                "members per workspace",
            )
            stamp = now()
            row = WorkspaceMemberRow(
                workspace_id=workspace_id,
                user_id=user_id,
                role=role,
                created_at=stamp,
                updated_at=stamp,
            )
            db.add(row)
            return row

        return await self._run(staging(staged, tx), write=True)

    async def update_member(
        self, workspace_id: str, user_id: str, role: str, staged: Staged[Any] | None = None
    ) -> WorkspaceMemberRow:
        def tx(db: Session) -> WorkspaceMemberRow:
            self._workspace_for_update(db, workspace_id)
            row = self._member(db, workspace_id, user_id)
            if row.role == "owner" and role != "owner":
                self._keep_an_owner(db, workspace_id)
            row.role = role
            row.updated_at = now()
            return row

        return await self._run(staging(staged, tx), write=True)

    async def remove_member(
        self, workspace_id: str, user_id: str, staged: Staged[Any] | None = None
    ) -> WorkspaceMemberRow:
        def tx(db: Session) -> WorkspaceMemberRow:
            self._workspace_for_update(db, workspace_id)
            row = self._member(db, workspace_id, user_id)
            if row.role == "owner":
                self._keep_an_owner(db, workspace_id)
            db.delete(row)
            return row

        return await self._run(staging(staged, tx), write=True)

    def _member(self, db: Session, workspace_id: str, user_id: str) -> WorkspaceMemberRow:
        row = db.get(WorkspaceMemberRow, (workspace_id, user_id))
        if row is None:
            raise NotFound(f"workspaces/{workspace_id}/members/{user_id} not found")
        return row

    def _keep_an_owner(self, db: Session, workspace_id: str) -> None:
        owners = (
            db.execute(
                select(func.count())
                .select_from(WorkspaceMemberRow)
                .where(
                    WorkspaceMemberRow.workspace_id == workspace_id,
                    WorkspaceMemberRow.role == "owner",
                )
            )
        ).scalar_one()
        if owners <= 1:
            raise FailedPrecondition(
                "a workspace must keep an owner; make another member owner first"
            )

    async def list_members(
        self, workspace_id: str, after_user: str, limit: int
    ) -> list[WorkspaceMemberRow]:
        query = select(WorkspaceMemberRow).where(WorkspaceMemberRow.workspace_id == workspace_id)
        if after_user:
            query = query.where(WorkspaceMemberRow.user_id > after_user)

        def tx(db: Session) -> list[WorkspaceMemberRow]:
            return list(
                (db.execute(query.order_by(WorkspaceMemberRow.user_id).limit(limit))).scalars()
            )

        return await self._run(tx, write=False)

    # -- conversations -----------------------------------------------------------------

    async def create_conversation(
        self,
        workspace_id: str,
        title: str,
        meta: bytes,
        creator: str,
        idempotency: Idempotency | None,
        max_per_workspace: int,
        staged: Staged[Any] | None = None,
    ) -> tuple[ConversationRow, bool]:
        async def run() -> tuple[ConversationRow, bool]:
            conversation_id = new_id()

            def tx(db: Session) -> tuple[ConversationRow, bool]:
                self._workspace_for_update(db, workspace_id)
                earlier = claim(db, idempotency, conversation_id)
                if earlier is not None:
                    row = db.get(ConversationRow, earlier)
                    if row is None:
                        raise NotFound("the conversation created by this request_id is gone")
                    return row, False
                _require_room(
                    db,
                    _counted(ConversationRow, ConversationRow.workspace_id == workspace_id),
                    max_per_workspace,
                    f"a workspace may hold at most {max_per_workspace} conversations",
                    "conversations per workspace",
                )
                stamp = now()
                row = ConversationRow(
                    id=conversation_id,
                    workspace_id=workspace_id,
                    title=title,
                    meta=meta,
                    archived=False,
                    creator=creator,
                    created_at=stamp,
                    updated_at=stamp,
                    deleted_at=None,
                    version=1,
                    last_seq=0,
                    message_count=0,
                    token_count=0,
                    summary_id=None,
                )
                db.add(row)
                return row, True

            return await self._run(staging(staged, tx), write=True)

        return await retrying(run)

    async def get_conversation(self, workspace_id: str, conversation_id: str) -> ConversationRow:
        """The conversation (soft-deleted ones too), or NotFound."""

        return await self._run(
            lambda db: self._conversation(db, workspace_id, conversation_id, include_deleted=True),
            write=False,
        )

    async def list_conversations(
        self,
        workspace_id: str,
        before: tuple[dt.datetime, str] | None,
        limit: int,
        *,
        show_archived: bool,
        show_deleted: bool,
    ) -> list[ConversationRow]:
        query = select(ConversationRow).where(ConversationRow.workspace_id == workspace_id)
        if not show_archived:
            query = query.where(ConversationRow.archived.is_(False))
        if not show_deleted:
            query = query.where(ConversationRow.deleted_at.is_(None))
        query = _keyset(
            query, ConversationRow.updated_at, ConversationRow.id, before, newest_first=True
        )
        return await self._rows(query.limit(limit))

    def _conversation(
        self,
        db: Session,
        workspace_id: str,
        conversation_id: str,
        *,
        include_deleted: bool = False,
        lock: bool = False,
        writable: bool = False,
    ) -> ConversationRow:
        """The conversation in that workspace (locked for update with ``lock``), or NotFound."""
        query = _CONVERSATION_FOR_UPDATE if lock and not self.sqlite else _CONVERSATION_BY_ID
        row = db.execute(query, {"id": conversation_id}).scalar_one_or_none()
        name = f"workspaces/{workspace_id}/conversations/{conversation_id}"
        if (
            row is None
            or row.workspace_id != workspace_id
            or (row.deleted_at is not None and not include_deleted)
        ):
            raise NotFound(f"{name} not found")
        if writable and row.archived:
            raise FailedPrecondition(f"{name} is archived; unarchive it to change it")
        return row

    def _conversation_for_update(
        self,
        db: Session,
        workspace_id: str,
        conversation_id: str,
        *,
        include_deleted: bool = False,
        writable: bool = False,
    ) -> ConversationRow:
        return self._conversation(
            db,
            workspace_id,
            conversation_id,
            include_deleted=include_deleted,
            writable=writable,
            lock=True,
        )

    async def update_conversation(
        self,
        workspace_id: str,
        conversation_id: str,
        etag: str,
        changes: dict[str, Any],
        staged: Staged[Any] | None = None,
    ) -> ConversationRow:
        def tx(db: Session) -> ConversationRow:
            row = self._conversation_for_update(db, workspace_id, conversation_id)
            check_etag(etag, row.version)
            if row.archived and set(changes) - {"archived"} and changes.get("archived", True):
                raise FailedPrecondition(
                    f"workspaces/{workspace_id}/conversations/{conversation_id} is archived; "
                    "unarchive it to change it"
                )
            for field, value in changes.items():
                setattr(row, field, value)
            row.version += 1
            row.updated_at = now()
            return row

        return await self._run(staging(staged, tx), write=True)

    async def set_conversation_deleted(
        self,
        workspace_id: str,
        conversation_id: str,
        etag: str,
        *,
        deleted: bool,
        staged: Staged[Any] | None = None,
    ) -> ConversationRow:
        def tx(db: Session) -> ConversationRow:
            row = self._conversation_for_update(
                db, workspace_id, conversation_id, include_deleted=True
            )
            check_etag(etag, row.version)
            if (row.deleted_at is not None) == deleted:
                state = "deleted" if deleted else "not deleted"
                raise FailedPrecondition(
                    f"workspaces/{workspace_id}/conversations/{conversation_id} is already {state}"
                )
            stamp = now()
            row.deleted_at = stamp if deleted else None
            row.version += 1
            row.updated_at = stamp
            return row

        return await self._run(staging(staged, tx), write=True)

    async def purge_conversations(self, deleted_before: dt.datetime) -> int:
        def tx(db: Session) -> int:
            ids = list(
                (
                    db.execute(
                        select(ConversationRow.id).where(
                            ConversationRow.deleted_at < deleted_before
                        )
                    )
                ).scalars()
            )
            if ids:
                if self.sqlite:
                    db.execute(
                        text(
                            "DELETE FROM memory_fts WHERE rowid IN (SELECT fts_rowid FROM "
                            "memory_items WHERE conversation_id IN :ids)"
                        ).bindparams(bindparam("ids", expanding=True)),
                        {"ids": ids},
                    )
                db.execute(delete(ConversationRow).where(ConversationRow.id.in_(ids)))
            return len(ids)

        return await self._run(tx, write=True)

    # -- messages ------------------------------------------------------------------------

    async def append_message(
        self,
        workspace_id: str,
        conversation_id: str,
        *,
        role: str,
        tokens: int,
        encode: Callable[[str, int, dt.datetime], bytes],
        entities: Sequence[EntityRecord],
        entity_creator: str,
        max_memory_per_scope: int,
        idempotency: Idempotency | None,
        staged: Staged[Any] | None = None,
    ) -> Appended:
        """Append one message; ``encode(id, seq, time)`` gives its stored bytes."""

        async def run() -> Appended:
            message_id = new_id()

            def tx(db: Session) -> Appended:
                conversation = self._conversation_for_update(
                    db, workspace_id, conversation_id, writable=True
                )
                earlier = claim(db, idempotency, message_id)
                if earlier is not None:
                    message = db.get(MessageRow, earlier)
                    if message is None:
                        raise NotFound("the message created by this request_id is gone")
                    return Appended(message, conversation, [], [], replayed=True)
                stamp = now()
                seq = conversation.last_seq + 1
                values = {
                    "id": message_id,
                    "conversation_id": conversation_id,
                    "seq": seq,
                    "role": role,
                    "token_count": tokens,
                    "archived": False,
                    "summary_id": None,
                    "created_at": stamp,
                    "data": encode(message_id, seq, stamp),
                }
                connection = db.connection()
                connection.execute(_INSERT_MESSAGE, values)
                connection.execute(
                    _COUNT_MESSAGE,
                    {"conversation": conversation_id, "seq": seq, "stamp": stamp, "tokens": tokens},
                )
                # The caller's copies, as stored (never flushed: the rows are written).
                message = MessageRow(**values)
                for key, value in (
                    ("last_seq", seq),
                    ("version", conversation.version + 1),
                    ("updated_at", stamp),
                    ("message_count", conversation.message_count + 1),
                    ("token_count", conversation.token_count + tokens),
                ):
                    set_committed_value(conversation, key, value)
                created, updated = self._remember_entities(
                    db,
                    conversation,
                    f"workspaces/{workspace_id}/conversations/{conversation_id}/messages/{message_id}",
                    entities,
                    entity_creator,
                    max_memory_per_scope,
                    stamp,
                )
                return Appended(message, conversation, created, updated)

            return await self._run(staging(staged, tx), write=True)

        return await retrying(run)

    def _remember_entities(
        self,
        db: Session,
        conversation: ConversationRow,
        message_name: str,
        entities: Sequence[EntityRecord],
        creator: str,
        max_per_scope: int,
        stamp: dt.datetime,
    ) -> tuple[list[MemoryItemRow], list[MemoryItemRow]]:
        if not entities:
            return [], []
        scope = f"workspaces/{conversation.workspace_id}/conversations/{conversation.id}"
        existing = {
            row.content: row
            for row in (
                db.execute(
                    select(MemoryItemRow).where(
                        MemoryItemRow.scope == scope,
                        MemoryItemRow.kind == "entity",
                        MemoryItemRow.content.in_([e.content for e in entities]),
                    )
                )
            ).scalars()
        }
        room = max_per_scope - self._count_scope(db, scope)
        created: list[MemoryItemRow] = []
        updated: list[MemoryItemRow] = []
        for entity in entities:
            row = existing.get(entity.content)
            if row is not None:
                sources = row.sources.split()
                # The newest mentions matter most; the list stays bounded.
                if message_name not in sources:
                    row.sources = " ".join([*sources, message_name][-MAX_SOURCES:])
                    row.updated_at = stamp
                    row.version += 1
                    updated.append(row)
                continue
            if room <= 0:
                break  # the scope is full; the message itself is kept
            room -= 1
            row = MemoryItemRow(
                id=new_id(),
                scope=scope,
                workspace_id=conversation.workspace_id,
                conversation_id=conversation.id,
                user_id=None,
                kind="entity",
                content=entity.content,
                pinned=False,
                meta=entity.meta,
                sources=message_name,
                creator=creator,
                created_at=stamp,
                updated_at=stamp,
                expires_at=None,
                token_count=entity.tokens,
                version=1,
            )
            self._add_memory_row(db, row)
            created.append(row)
        return created, updated

    async def get_message(
        self, workspace_id: str, conversation_id: str, message_id: str
    ) -> MessageRow:
        def tx(db: Session) -> MessageRow:
            self._conversation(db, workspace_id, conversation_id)
            message = db.get(MessageRow, message_id)
            if message is None or message.conversation_id != conversation_id:
                raise NotFound(
                    f"workspaces/{workspace_id}/conversations/{conversation_id}/messages/"
                    f"{message_id} not found"
                )
            return message

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
    ) -> list[MessageRow]:
        query = select(MessageRow).where(MessageRow.conversation_id == conversation_id)
        if not show_archived:
            query = query.where(MessageRow.archived.is_(False))
        if after_seq is not None:
            query = query.where(
                MessageRow.seq < after_seq if newest_first else MessageRow.seq > after_seq
            )
        query = query.order_by(MessageRow.seq.desc() if newest_first else MessageRow.seq)

        def tx(db: Session) -> list[MessageRow]:
            self._conversation(db, workspace_id, conversation_id)
            return list((db.execute(query.limit(limit))).scalars())

        return await self._run(tx, write=False, snapshot=True)

    # -- memory ----------------------------------------------------------------------------

    def _count_scope(self, db: Session, scope: str) -> int:
        count: int = (
            db.execute(_counted(MemoryItemRow, MemoryItemRow.scope == scope))
        ).scalar_one()
        return count

    def _add_memory_row(self, db: Session, row: MemoryItemRow) -> None:
        if self.sqlite:
            top = (db.execute(select(func.max(MemoryItemRow.fts_rowid)))).scalar_one()
            row.fts_rowid = (top or 0) + 1
        db.add(row)
        db.flush()
        if self.sqlite:
            db.execute(
                text("INSERT INTO memory_fts(rowid, content) VALUES (:rowid, :content)"),
                {"rowid": row.fts_rowid, "content": row.content},
            )

    def _touch_scope(self, db: Session, row: MemoryItemRow) -> None:
        """A memory change invalidates the windows that may include it."""
        if row.conversation_id is not None:
            db.execute(
                update(ConversationRow)
                .where(ConversationRow.id == row.conversation_id)
                .values(version=ConversationRow.version + 1)
            )
        else:
            self._bump_scope(db, row.scope)

    async def create_memory(
        self,
        row: MemoryItemRow,
        *,
        max_per_scope: int,
        max_pinned: int,
        staged: Staged[Any] | None = None,
    ) -> MemoryItemRow:
        def tx(db: Session) -> MemoryItemRow:
            self._check_scope_live(db, row)
            if self._count_scope(db, row.scope) >= max_per_scope:
                raise QuotaExceeded(
                    f"a scope may hold at most {max_per_scope} memory items",
                    subject="memory items per scope",
                )
            if row.pinned:
                self._check_pinned_room(db, row.scope, max_pinned)
            self._add_memory_row(db, row)
            self._touch_scope(db, row)
            return row

        return await self._run(staging(staged, tx), write=True)

    def _check_scope_live(self, db: Session, row: MemoryItemRow, *, writable: bool = True) -> None:
        """NotFound unless the scope exists; FailedPrecondition for writes to an archived one."""
        if row.conversation_id is not None and row.workspace_id is not None:
            self._conversation_for_update(
                db, row.workspace_id, row.conversation_id, writable=writable
            )
        elif row.workspace_id is not None:
            self._workspace_for_update(db, row.workspace_id)
        elif row.user_id is not None and db.get(UserRow, row.user_id) is None:
            raise NotFound(f"{row.scope} not found")

    def _check_pinned_room(self, db: Session, scope: str, max_pinned: int) -> None:
        _require_room(
            db,
            _counted(MemoryItemRow, MemoryItemRow.scope == scope, MemoryItemRow.pinned.is_(True)),
            max_pinned,
            f"a scope may pin at most {max_pinned} memory items",
            "pinned memory items",
        )

    async def get_memory(self, scope: str, memory_id: str) -> MemoryItemRow:
        def tx(db: Session) -> MemoryItemRow:
            row = db.get(MemoryItemRow, memory_id)
            if row is None or row.scope != scope:
                raise NotFound(f"{scope}/memories/{memory_id} not found")
            if row.conversation_id is not None:
                conversation = db.get(ConversationRow, row.conversation_id)
                if conversation is None or conversation.deleted_at is not None:
                    raise NotFound(f"{scope}/memories/{memory_id} not found")
            return row

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
    ) -> MemoryItemRow:
        def tx(db: Session) -> MemoryItemRow:
            row = db.get(MemoryItemRow, memory_id)
            if row is None or row.scope != scope:
                raise NotFound(f"{scope}/memories/{memory_id} not found")
            self._check_scope_live(db, row)
            check_etag(etag, row.version)
            if changes.get("pinned") and not row.pinned:
                self._check_pinned_room(db, scope, max_pinned)
            for field, value in changes.items():
                setattr(row, field, value)
            row.version += 1
            row.updated_at = now()
            if "content" in changes and self.sqlite:
                db.execute(
                    text("UPDATE memory_fts SET content = :content WHERE rowid = :rowid"),
                    {"rowid": row.fts_rowid, "content": row.content},
                )
            self._touch_scope(db, row)
            return row

        return await self._run(staging(staged, tx), write=True)

    async def delete_memory(
        self, scope: str, memory_id: str, staged: Staged[Any] | None = None
    ) -> MemoryItemRow:
        def tx(db: Session) -> MemoryItemRow:
            row = db.get(MemoryItemRow, memory_id)
            if row is None or row.scope != scope:
                raise NotFound(f"{scope}/memories/{memory_id} not found")
            self._check_scope_live(db, row)
            if self.sqlite:
                db.execute(
                    text("DELETE FROM memory_fts WHERE rowid = :rowid"), {"rowid": row.fts_rowid}
                )
            db.delete(row)
            self._touch_scope(db, row)
            return row

        return await self._run(staging(staged, tx), write=True)

    async def list_memory(
        self,
        scope: str,
        before: tuple[dt.datetime, str] | None,
        limit: int,
        *,
        kinds: Sequence[str],
        pinned_only: bool,
    ) -> list[MemoryItemRow]:
        query = select(MemoryItemRow).where(MemoryItemRow.scope == scope)
        if kinds:
            query = query.where(MemoryItemRow.kind.in_(list(kinds)))
        if pinned_only:
            query = query.where(MemoryItemRow.pinned.is_(True))
        query = _keyset(
            query, MemoryItemRow.created_at, MemoryItemRow.id, before, newest_first=True
        )
        return await self._rows(query.limit(limit))

    async def scope_live(self, scope_row: MemoryItemRow) -> None:
        """NotFound unless the scope (conversation, workspace, user) still exists."""

        def tx(db: Session) -> None:
            self._check_scope_live(db, scope_row, writable=False)

        return await self._run(tx, write=False)

    async def search_memory(
        self,
        scopes: Sequence[str],
        match: str,
        *,
        kinds: Sequence[str],
        limit: int,
        offset: int = 0,
    ) -> list[tuple[MemoryItemRow, float]]:
        """Items matching ``match`` (fts5 syntax on SQLite, tsquery on PostgreSQL), best first."""
        if not match or not scopes:
            return []
        return await self._run(
            lambda db: self._search(db, scopes, match, kinds=kinds, limit=limit, offset=offset),
            write=False,
        )

    def _search(
        self,
        db: Session,
        scopes: Sequence[str],
        match: str,
        *,
        kinds: Sequence[str],
        limit: int,
        offset: int = 0,
        exclude_kinds: Sequence[str] = (),
        unpinned_only: bool = False,
    ) -> list[tuple[MemoryItemRow, float]]:
        if not match or not scopes:
            return []
        filters = [
            "m.scope IN :scopes",
            "(m.expires_at IS NULL OR m.expires_at > :now)",
        ]
        params: dict[str, Any] = {
            "scopes": list(scopes),
            "match": match,
            "limit": limit,
            "offset": offset,
            "now": now(),
        }
        binds: list[BindParameter[Any]] = [bindparam("scopes", expanding=True)]
        if kinds:
            filters.append("m.kind IN :kinds")
            params["kinds"] = list(kinds)
            binds.append(bindparam("kinds", expanding=True))
        if exclude_kinds:
            filters.append("m.kind NOT IN :exclude")
            params["exclude"] = list(exclude_kinds)
            binds.append(bindparam("exclude", expanding=True))
        if unpinned_only:
            filters.append("NOT m.pinned")
        where = " AND ".join(filters)
        # ``where`` is built from the constant fragments above; values are bound.
        if self.sqlite:
            sql = (
                "SELECT m.id, -bm25(memory_fts) AS score FROM memory_fts "  # noqa: S608
                "JOIN memory_items m ON m.fts_rowid = memory_fts.rowid "
                f"WHERE memory_fts MATCH :match AND {where} "
                "ORDER BY score DESC, m.id LIMIT :limit OFFSET :offset"
            )
        else:
            sql = (
                "SELECT m.id, ts_rank_cd(m.search, q) AS score "  # noqa: S608
                "FROM memory_items m, to_tsquery('english', :match) q "
                f"WHERE m.search @@ q AND {where} "
                "ORDER BY score DESC, m.id LIMIT :limit OFFSET :offset"
            )
        try:
            ranked = [
                (str(row[0]), float(row[1]))
                for row in (db.execute(text(sql).bindparams(*binds), params)).all()
            ]
        except (OperationalError, ProgrammingError, DataError) as exc:
            if not any(word in str(exc.orig).lower() for word in ("fts5", "tsquery", "syntax")):
                raise
            # The query builders only emit quoted terms; anything the engine
            # still refuses is the query's fault, not an outage.
            raise InvalidArgument(
                "the query cannot be searched", [FieldViolation("query", "cannot be searched")]
            ) from None
        if not ranked:
            return []
        rows = {
            row.id: row
            for row in db.execute(_MEMORY_BY_IDS, {"ids": [i for i, _ in ranked]}).scalars()
        }
        return [(rows[i], score) for i, score in ranked if i in rows]

    # -- the context window ----------------------------------------------------------------

    async def window_version(
        self, workspace_id: str, conversation_id: str, user_scope: str
    ) -> tuple[int, int, int]:
        """The versions a conversation's window depends on: the conversation's, its
        workspace's memory and the caller's memory. One plain statement: it runs
        on every GetContextWindow, cached or not."""
        params = _window_params(workspace_id, conversation_id, user_scope)
        try:
            rows = await self._database.fetch(_WINDOW_VERSIONS, params)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("context database call failed: %s", type(exc).__name__)
            raise DatabaseUnavailable() from exc
        return _window_versions(rows, workspace_id, conversation_id)

    def _window_version(
        self, db: Session, workspace_id: str, conversation_id: str, user_scope: str
    ) -> tuple[ConversationRow, int, int]:
        """The conversation row and its window's versions, in ``db``'s snapshot."""
        conversation = self._conversation(db, workspace_id, conversation_id)
        params = _window_params(workspace_id, conversation_id, user_scope)
        rows = [tuple(row) for row in db.execute(_WINDOW_VERSIONS_TEXT, params).all()]
        _, workspace_version, user_version = _window_versions(rows, workspace_id, conversation_id)
        return conversation, workspace_version, user_version

    async def window_rows(
        self,
        workspace_id: str,
        conversation_id: str,
        user_scope: str,
        *,
        budget: int,
        match: Callable[[MessageRow | None], str],
        relevant_limit: int,
        max_pinned: int,
    ) -> WindowRows:
        """Read everything a window needs in one snapshot (see the module docstring)."""
        scopes = [
            f"workspaces/{workspace_id}/conversations/{conversation_id}",
            f"workspaces/{workspace_id}",
            user_scope,
        ]

        def tx(db: Session) -> WindowRows:
            conversation, workspace_version, user_version = self._window_version(
                db, workspace_id, conversation_id, user_scope
            )
            pinned = list(
                db.execute(_PINNED, {"scopes": scopes, "limit": max_pinned * len(scopes)}).scalars()
            )
            latest_user = db.execute(
                _LATEST_USER_MESSAGE, {"conversation": conversation_id}
            ).scalar_one_or_none()
            relevant = self._search(
                db,
                scopes,
                match(latest_user),
                kinds=(),
                limit=relevant_limit,
                exclude_kinds=("summary",),
                unpinned_only=True,
            )
            summary = (
                db.get(MemoryItemRow, conversation.summary_id) if conversation.summary_id else None
            )
            recent: list[tuple[int, int]] = []
            bodies: dict[int, bytes] = {}
            covered = 0
            upper = conversation.last_seq + 1
            # Newest first, in pages, until the budget is covered: a long
            # conversation never loads more than what can fit (plus one page).
            # The first page is what the budget holds at 16 tokens a message,
            # then pages double: a small budget over a long conversation does
            # not fetch hundreds of bodies it cannot use. The bodies come along
            # (Core rows, not ORM objects): nearly all of them end up in the window.
            page_size = min(max(budget // 16, _RECENT_FIRST_PAGE), _RECENT_PAGE)
            while covered <= budget:
                page = db.execute(
                    _RECENT_MESSAGES,
                    {"conversation": conversation_id, "upper": upper, "limit": page_size},
                ).all()
                for seq, tokens, data in page:
                    recent.append((int(seq), int(tokens)))
                    bodies[int(seq)] = data
                    covered += int(tokens)
                    if covered > budget:
                        break
                if len(page) < page_size:
                    break
                upper = int(page[-1][0])
                page_size = min(page_size * 2, _RECENT_PAGE)
            return WindowRows(
                conversation=conversation,
                workspace_version=workspace_version,
                user_version=user_version,
                pinned=pinned,
                relevant=relevant,
                summary=summary,
                recent=recent,
                bodies=bodies,
                latest_user_message=latest_user,
            )

        return await self._run(tx, write=False, snapshot=True)

    # -- pruning ---------------------------------------------------------------------------

    async def live_tokens(self, workspace_id: str, conversation_id: str) -> list[tuple[int, int]]:
        """(seq, tokens) of every live message, oldest first."""

        def tx(db: Session) -> list[tuple[int, int]]:
            self._conversation(db, workspace_id, conversation_id)
            return [
                (int(seq), int(tokens))
                for seq, tokens in (
                    db.execute(
                        select(MessageRow.seq, MessageRow.token_count)
                        .where(
                            MessageRow.conversation_id == conversation_id,
                            MessageRow.archived.is_(False),
                        )
                        .order_by(MessageRow.seq)
                    )
                ).all()
            ]

        return await self._run(tx, write=False, snapshot=True)

    async def prune_inputs(
        self, conversation_id: str, upto_seq: int
    ) -> tuple[list[MessageRow], MemoryItemRow | None]:
        """The live messages up to ``upto_seq`` and the current summary."""

        def tx(db: Session) -> tuple[list[MessageRow], MemoryItemRow | None]:
            conversation = db.get(ConversationRow, conversation_id)
            summary = (
                db.get(MemoryItemRow, conversation.summary_id)
                if conversation is not None and conversation.summary_id
                else None
            )
            messages = list(
                (
                    db.execute(
                        select(MessageRow)
                        .where(
                            MessageRow.conversation_id == conversation_id,
                            MessageRow.archived.is_(False),
                            MessageRow.seq <= upto_seq,
                        )
                        .order_by(MessageRow.seq)
                    )
                ).scalars()
            )
            return messages, summary

        return await self._run(tx, write=False, snapshot=True)

    async def archive(
        self,
        workspace_id: str,
        conversation_id: str,
        *,
        upto_seq: int,
        expected_summary: str | None,
        expected_count: int,
        summary: MemoryItemRow,
        staged: Staged[Any] | None = None,
    ) -> tuple[ConversationRow, int] | None:
        """Archive live messages up to ``upto_seq`` under ``summary``.

        None if another prune got there first (the caller plans again).
        """

        def tx(db: Session) -> tuple[ConversationRow, int] | None:
            conversation = self._conversation_for_update(
                db, workspace_id, conversation_id, writable=True
            )
            if conversation.summary_id != expected_summary:
                return None
            live = (
                db.execute(
                    select(func.count(), func.coalesce(func.sum(MessageRow.token_count), 0)).where(
                        MessageRow.conversation_id == conversation_id,
                        MessageRow.archived.is_(False),
                        MessageRow.seq <= upto_seq,
                    )
                )
            ).one()
            if int(live[0]) != expected_count:
                return None
            self._add_memory_row(db, summary)
            db.execute(
                update(MessageRow)
                .where(
                    MessageRow.conversation_id == conversation_id,
                    MessageRow.archived.is_(False),
                    MessageRow.seq <= upto_seq,
                )
                .values(archived=True, summary_id=summary.id)
            )
            conversation.summary_id = summary.id
            conversation.message_count -= int(live[0])
            conversation.token_count -= int(live[1])
            conversation.version += 1
            conversation.updated_at = now()
            return conversation, int(live[0])

        return await self._run(staging(staged, tx), write=True)


MAX_SOURCES: Final = 20
_WINDOW_VERSIONS: Final = (
    "SELECT c.workspace_id, c.deleted_at IS NOT NULL, c.version, "
    "(SELECT version FROM memory_scopes WHERE scope = :workspace_scope), "
    "(SELECT version FROM memory_scopes WHERE scope = :user_scope) "
    "FROM conversations c WHERE c.id = :conversation"
)
_WINDOW_VERSIONS_TEXT: Final = text(_WINDOW_VERSIONS)
_RECENT_PAGE: Final = 256
_RECENT_FIRST_PAGE: Final = 32


def _keyset(
    query: Select[*_Ts],
    stamp: InstrumentedAttribute[dt.datetime],
    key: InstrumentedAttribute[str],
    after: tuple[dt.datetime, str] | None,
    *,
    newest_first: bool = False,
) -> Select[*_Ts]:
    """Order by (stamp, key) and start strictly after the page token's ``after``."""
    if after is not None:
        if newest_first:
            query = query.where(or_(stamp < after[0], and_(stamp == after[0], key < after[1])))
        else:
            query = query.where(or_(stamp > after[0], and_(stamp == after[0], key > after[1])))
    if newest_first:
        return query.order_by(stamp.desc(), key.desc())
    return query.order_by(stamp, key)


def _window_params(workspace_id: str, conversation_id: str, user_scope: str) -> dict[str, Any]:
    return {
        "conversation": conversation_id,
        "workspace_scope": f"workspaces/{workspace_id}",
        "user_scope": user_scope,
    }


def _window_versions(
    rows: Sequence[tuple[Any, ...]], workspace_id: str, conversation_id: str
) -> tuple[int, int, int]:
    """(conversation, workspace memory, user memory) versions from ``_WINDOW_VERSIONS``."""
    if not rows or rows[0][0] != workspace_id or rows[0][1]:
        raise NotFound(f"workspaces/{workspace_id}/conversations/{conversation_id} not found")
    _, _, version, workspace_version, user_version = rows[0]
    return int(version), int(workspace_version or 0), int(user_version or 0)


def _counted(model: type[Base], *conditions: ColumnElement[bool]) -> Select[int]:
    return select(func.count()).select_from(model).where(*conditions)


def _require_room(
    db: Session, counted: Select[int], limit: int, message: str, subject: str
) -> None:
    """QuotaExceeded (naming ``subject``) unless the ``counted`` rows are below ``limit``."""
    if db.execute(counted).scalar_one() >= limit:
        raise QuotaExceeded(message, subject=subject)


def _already_exists(name: str) -> AlreadyExists:
    return AlreadyExists(f"{name} already exists")
