"""What the context service's stores share: transactions, the dialect, lookups, records.

All SQL of the context service lives in its stores (each domain's ``store.py``:
``workspaces/store.py``, ``conversations/store.py``, ``messages/store.py``,
``memory/store.py``, ``windows/store.py``, ``pruning/store.py``, ``files/store.py``,
``semantic/retrieval/store.py``) and this module. Every write runs in one
transaction; on SQLite it begins IMMEDIATE (``platform/store/db.py``), on PostgreSQL
the rows that order concurrent writers (a conversation for appends) are
locked with ``SELECT ... FOR UPDATE``, so sequence numbers and counters stay
exact under concurrency on both. Reads that must be consistent across several
statements (the context window) run in one read transaction: a WAL snapshot on
SQLite, REPEATABLE READ on PostgreSQL.

The stores pick the SQL dialect (full-text search is FTS5 on SQLite,
``tsvector`` on PostgreSQL) and return plain records (``records.py``); no ORM
row leaves them. A missing or refused row is a ``Refused`` naming it by kind
and ids: the domain names the resource for the client.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, TypeVar, TypeVarTuple

from sqlalchemy import Select, and_, bindparam, column, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, OperationalError, ProgrammingError
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from switchboard.context.records import (
    AlreadyDeleted,
    Archived,
    ConversationRecord,
    Kind,
    MemberRecord,
    MemoryRecord,
    MessageRecord,
    Missing,
    NotDeleted,
    Scope,
    Unsearchable,
    WorkspaceRecord,
)
from switchboard.context.text.fulltext import fts5_match, pg_tsquery, query_terms
from switchboard.platform.errors import QuotaExceeded
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import (
    Base,
    ConversationRow,
    MemoryItemRow,
    MemoryScopeRow,
    UserRow,
    WorkspaceMemberRow,
    WorkspaceRow,
    table_of,
)
from switchboard.platform.store.prepared import Prepared
from switchboard.platform.store.storage import transaction
from switchboard.platform.values.names import now

_T = TypeVar("_T")
_R = TypeVar("_R")
_Ts = TypeVarTuple("_Ts")

log = logging.getLogger("switchboard.context.store")

_CONVERSATION_BY_ID: Final = select(ConversationRow).where(ConversationRow.id == bindparam("id"))
_CONVERSATION_FOR_UPDATE: Final = _CONVERSATION_BY_ID.with_for_update()
_MEMORY_BY_IDS: Final = select(MemoryItemRow).where(
    MemoryItemRow.id.in_(bindparam("ids", expanding=True))
)
# The per-run path's conversation read on the driver (decisions 52): every column of
# a ``ConversationRecord``, in its order, so a row is the record's arguments.
_CONVERSATIONS: Final = table_of(ConversationRow)
_CONVERSATION_RECORD: Final = select(
    *(_CONVERSATIONS.c[field] for field in ConversationRecord.__dataclass_fields__)
).where(_CONVERSATIONS.c.id == bindparam("id"))
_RECORD_BY_ID: Final = Prepared(_CONVERSATION_RECORD, name="conversation")
_RECORD_FOR_UPDATE: Final = Prepared(
    _CONVERSATION_RECORD.with_for_update(), name="conversation for update"
)


class MemoryConditions(Protocol):
    """The conditions on memory items a search filter may set, as ``_search`` reads them:
    a parsed ``SearchFilter`` (``semantic/ports.py``) is one. Declared here because
    every store stands on this module, the semantic ones too: it imports none of them.
    """

    @property
    def labels(self) -> frozenset[str] | None: ...
    @property
    def exclude_labels(self) -> frozenset[str]: ...
    @property
    def conversation_ids(self) -> frozenset[str] | None: ...
    @property
    def exclude_conversation_ids(self) -> frozenset[str]: ...
    @property
    def created_after(self) -> dt.datetime | None: ...
    @property
    def created_after_inclusive(self) -> bool: ...
    @property
    def created_before(self) -> dt.datetime | None: ...
    @property
    def created_before_inclusive(self) -> bool: ...


class StoreBase:
    """One database's transactions, dialect and the lookups every context store uses."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._sqlite = database.dialect_name == "sqlite"

    async def _run(
        self, work: Callable[[Session], _T], *, write: bool, snapshot: bool = False
    ) -> _T:
        """One transaction of synchronous ORM code (``Database.run``), errors mapped."""
        return await transaction(self._database, work, write=write, snapshot=snapshot, log=log)

    def _lock(self, query: Select[_R]) -> Select[_R]:
        return query if self._sqlite else query.with_for_update()

    def _match(self, text: str) -> str:
        """The full-text query of ``text``'s terms in this database's dialect."""
        terms = query_terms(text)
        return fts5_match(terms) if self._sqlite else pg_tsquery(terms)

    def _workspace_for_update(
        self, db: Session, workspace_id: str, *, include_deleted: bool = False
    ) -> WorkspaceRow:
        row = (
            db.execute(self._lock(select(WorkspaceRow).where(WorkspaceRow.id == workspace_id)))
        ).scalar_one_or_none()
        if row is None or (row.deleted_at is not None and not include_deleted):
            raise Missing("workspace", workspace_id)
        return row

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
        """The conversation in that workspace (locked for update with ``lock``), or Missing."""
        query = _CONVERSATION_FOR_UPDATE if lock and not self._sqlite else _CONVERSATION_BY_ID
        row = db.execute(query, {"id": conversation_id}).scalar_one_or_none()
        if (
            row is None
            or row.workspace_id != workspace_id
            or (row.deleted_at is not None and not include_deleted)
        ):
            raise Missing("conversation", workspace_id, conversation_id)
        if writable and row.archived:
            raise Archived("conversation", workspace_id, conversation_id)
        return row

    def _conversation_record(
        self,
        db: Session | Connection,
        workspace_id: str,
        conversation_id: str,
        *,
        lock: bool = False,
        writable: bool = False,
    ) -> ConversationRecord:
        """``_conversation`` for the per-run path: one statement on the driver, a record.

        No ORM row: nothing in the session to flush or expire, and about a fifth of
        the ORM select's Python. ``lock`` locks the row for update on PostgreSQL.
        """
        prepared = _RECORD_FOR_UPDATE if lock and not self._sqlite else _RECORD_BY_ID
        row = prepared.first(db, {"id": conversation_id})
        if row is None:
            raise Missing("conversation", workspace_id, conversation_id)
        record = ConversationRecord(*row)
        if record.workspace_id != workspace_id or record.deleted_at is not None:
            raise Missing("conversation", workspace_id, conversation_id)
        if writable and record.archived:
            raise Archived("conversation", workspace_id, conversation_id)
        return record

    def _search_window(
        self,
        db: Session | Connection,
        scopes: Sequence[str],
        query: str,
        *,
        limit: int,
        workspace_id: str,
        at: dt.datetime | None = None,
    ) -> list[tuple[MemoryRecord, float]]:
        """``_search(db, scopes, query, kinds=(), limit=limit, exclude_kinds=("summary",),
        unpinned_only=True)`` for a window's three scopes, on the driver, as records:
        the memory true ``at`` (now if None) of the window's workspace ``workspace_id``."""
        match = self._match(query)
        if not match:
            return []
        scope0, scope1, scope2 = scopes
        params = {
            "scope0": scope0,
            "scope1": scope1,
            "scope2": scope2,
            "match": match,
            "limit": limit,
            "offset": 0,
            "now": at or now(),
            "origin": workspace_id,
            "exclude": "summary",
        }
        try:
            rows = _WINDOW_SEARCH[self._sqlite].rows(db, params)
        except (OperationalError, ProgrammingError, DataError) as exc:
            if not any(word in str(exc.orig).lower() for word in ("fts5", "tsquery", "syntax")):
                raise
            raise Unsearchable() from None
        return [(MemoryRecord(*row[:-1]), float(row[-1])) for row in rows]

    # -- memory rows (written by the memory, message and prune stores) ---------------------

    def _count_scope(self, db: Session, scope: str) -> int:
        count: int = (db.execute(counted(MemoryItemRow, MemoryItemRow.scope == scope))).scalar_one()
        return count

    def _add_memory_row(self, db: Session, row: MemoryItemRow) -> None:
        if self._sqlite:
            top = (db.execute(select(func.max(MemoryItemRow.fts_rowid)))).scalar_one()
            row.fts_rowid = (top or 0) + 1
        db.add(row)
        db.flush()
        if self._sqlite:
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
            return
        insert = sqlite_insert if self._sqlite else pg_insert
        statement = insert(MemoryScopeRow).values(scope=row.scope, version=1)
        db.execute(
            statement.on_conflict_do_update(
                index_elements=[MemoryScopeRow.scope],
                set_={"version": MemoryScopeRow.version + 1},
            )
        )

    def _check_scope_live(self, db: Session, scope: Scope, *, writable: bool = True) -> None:
        """Missing unless the scope exists; Archived for writes to an archived conversation."""
        if scope.conversation_id is not None and scope.workspace_id is not None:
            self._conversation(
                db, scope.workspace_id, scope.conversation_id, writable=writable, lock=True
            )
        elif scope.workspace_id is not None:
            self._workspace_for_update(db, scope.workspace_id)
        elif scope.user_id is not None and db.get(UserRow, scope.user_id) is None:
            raise Missing("scope", scope.scope)

    def _search(
        self,
        db: Session,
        scopes: Sequence[str],
        query: str,
        *,
        kinds: Sequence[str],
        limit: int,
        offset: int = 0,
        exclude_kinds: Sequence[str] = (),
        unpinned_only: bool = False,
        conditions: MemoryConditions | None = None,
        workspace_id: str | None = None,
        origin_workspace_id: str | None = None,
    ) -> list[tuple[MemoryItemRow, float]]:
        """Current items of ``scopes`` matching any term of ``query``, best first.

        ``workspace_id`` instead of ``scopes``: every item of the workspace and of
        its live conversations. ``conditions``: a search filter's memory conditions
        (kind, conversation, create_time; its metadata is for the caller to check).
        ``origin_workspace_id``: of a user's items, only those formed there or
        written by people.
        """
        match = self._match(query)
        if not match or not (scopes or workspace_id):
            return []
        filters = [
            "(m.expires_at IS NULL OR m.expires_at > :now)",
            "(m.valid_until IS NULL OR m.valid_until > :now)",
        ]
        params: dict[str, Any] = {"match": match, "limit": limit, "offset": offset, "now": now()}
        binds: list[BindParameter[Any]] = []

        def one_of(column: str, name: str, values: Sequence[str], negate: bool = False) -> None:
            filters.append(f"{column} {'NOT IN' if negate else 'IN'} :{name}")
            params[name] = list(values)
            binds.append(bindparam(name, expanding=True))

        if workspace_id is not None:
            filters.append(
                "m.workspace_id = :workspace AND (m.conversation_id IS NULL OR EXISTS "
                "(SELECT 1 FROM conversations c WHERE c.id = m.conversation_id "
                "AND c.deleted_at IS NULL))"
            )
            params["workspace"] = workspace_id
        else:
            one_of("m.scope", "scopes", scopes)
        if origin_workspace_id is not None:
            filters.append(
                "(m.origin_workspace_id IS NULL OR m.origin_workspace_id = :origin_workspace)"
            )
            params["origin_workspace"] = origin_workspace_id
        if kinds:
            one_of("m.kind", "kinds", kinds)
        if exclude_kinds:
            one_of("m.kind", "exclude", exclude_kinds, negate=True)
        if unpinned_only:
            filters.append("NOT m.pinned")
        if conditions is not None:
            _memory_conditions(conditions, filters, params, binds)
        sql = _search_sql(" AND ".join(filters), sqlite=self._sqlite)
        try:
            ranked = [
                (str(row[0]), float(row[1]))
                for row in db.connection().execute(text(sql).bindparams(*binds), params).all()
            ]
        except (OperationalError, ProgrammingError, DataError) as exc:
            if not any(word in str(exc.orig).lower() for word in ("fts5", "tsquery", "syntax")):
                raise
            # The query builders only emit quoted terms; anything the engine
            # still refuses is the query's fault, not an outage.
            raise Unsearchable() from None
        if not ranked:
            return []
        rows = {
            row.id: row
            for row in db.execute(_MEMORY_BY_IDS, {"ids": [i for i, _ in ranked]}).scalars()
        }
        return [(rows[i], score) for i, score in ranked if i in rows]


def _memory_conditions(
    conditions: MemoryConditions,
    filters: list[str],
    params: dict[str, Any],
    binds: list[BindParameter[Any]],
) -> None:
    """A search filter's conditions on memory items, as SQL (values bound)."""

    def one_of(sql: str, name: str, values: frozenset[str]) -> None:
        filters.append(sql.format(f":{name}"))
        params[name] = sorted(values)
        binds.append(bindparam(name, expanding=True))

    if conditions.labels is not None:
        one_of("m.kind IN {}", "labels", conditions.labels)
    if conditions.exclude_labels:
        one_of("m.kind NOT IN {}", "not_labels", conditions.exclude_labels)
    if conditions.conversation_ids is not None:
        one_of("m.conversation_id IN {}", "conversations", conditions.conversation_ids)
    if conditions.exclude_conversation_ids:
        one_of(
            "(m.conversation_id IS NULL OR m.conversation_id NOT IN {})",
            "not_conversations",
            conditions.exclude_conversation_ids,
        )
    stamp = table_of(MemoryItemRow).c.created_at.type
    if conditions.created_after is not None:
        op = ">=" if conditions.created_after_inclusive else ">"
        filters.append(f"m.created_at {op} :created_after")
        params["created_after"] = conditions.created_after
        binds.append(bindparam("created_after", type_=stamp))
    if conditions.created_before is not None:
        op = "<=" if conditions.created_before_inclusive else "<"
        filters.append(f"m.created_at {op} :created_before")
        params["created_before"] = conditions.created_before
        binds.append(bindparam("created_before", type_=stamp))


_MEMORY: Final = table_of(MemoryItemRow)
#: Every column of a ``MemoryRecord``, in its order.
MEMORY_COLUMNS: Final = tuple(_MEMORY.c[field] for field in MemoryRecord.__dataclass_fields__)
_MEMORY_SELECT: Final = ", ".join(f"m.{column.name}" for column in MEMORY_COLUMNS)


#: A window's memory: true at ``:now`` (as of then: stated by then, not retired by
#: then), and of a user's items only those of the window's workspace or people's.
CURRENT_AT: Final = (
    "COALESCE(m.valid_from, m.created_at) <= :now "
    "AND (m.valid_until IS NULL OR m.valid_until > :now)"
)
FROM_WORKSPACE: Final = "(m.origin_workspace_id IS NULL OR m.origin_workspace_id = :origin)"


def _window_search(sqlite: bool) -> Prepared:
    """The window's search (``_search`` with its three scopes, no summaries, unpinned
    only), on the driver: the items' columns with their score, in one statement."""
    where = (
        "m.scope IN (:scope0, :scope1, :scope2) "
        "AND (m.expires_at IS NULL OR m.expires_at > :now) "
        f"AND {CURRENT_AT} AND {FROM_WORKSPACE} "
        "AND m.kind NOT IN (:exclude) AND NOT m.pinned"
    )
    sql = _search_sql(where, sqlite=sqlite, columns=_MEMORY_SELECT)
    statement = (
        text(sql)
        .bindparams(bindparam("now", type_=_MEMORY.c.expires_at.type))
        # The score untyped: a float's result processor on asyncpg needs the cursor's
        # column types, which ``Prepared`` does not read.
        .columns(*MEMORY_COLUMNS, column("score"))
    )
    return Prepared(statement, name="window search")


def _search_sql(where: str, *, sqlite: bool, columns: str = "m.id") -> str:
    # ``where`` is built from constant fragments; values are bound.
    if sqlite:
        return (
            f"SELECT {columns}, -bm25(memory_fts) AS score FROM memory_fts "  # noqa: S608
            "JOIN memory_items m ON m.fts_rowid = memory_fts.rowid "
            f"WHERE memory_fts MATCH :match AND {where} "
            "ORDER BY score DESC, m.id LIMIT :limit OFFSET :offset"
        )
    return (
        f"SELECT {columns}, ts_rank_cd(m.search, q) AS score "  # noqa: S608
        "FROM memory_items m, to_tsquery('english', :match) q "
        f"WHERE m.search @@ q AND {where} "
        "ORDER BY score DESC, m.id LIMIT :limit OFFSET :offset"
    )


_WINDOW_SEARCH: Final = {True: _window_search(True), False: _window_search(False)}


class _Versioned(Protocol):
    version: Any
    updated_at: Any


class _SoftDeleted(_Versioned, Protocol):
    deleted_at: Any


def apply_changes(row: _Versioned, changes: dict[str, Any]) -> None:
    """Set ``changes`` on ``row`` as one new version."""
    for field, value in changes.items():
        setattr(row, field, value)
    row.version += 1
    row.updated_at = now()


def set_deleted(row: _SoftDeleted, deleted: bool, kind: Kind, *ids: str) -> None:
    """Soft-delete or restore ``row`` as one new version; refused if it already is so."""
    if (row.deleted_at is not None) == deleted:
        raise (AlreadyDeleted if deleted else NotDeleted)(kind, *ids)
    stamp = now()
    row.deleted_at = stamp if deleted else None
    row.version += 1
    row.updated_at = stamp


def keyset(
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


def counted(model: type[Base], *conditions: ColumnElement[bool]) -> Select[int]:
    return select(func.count()).select_from(model).where(*conditions)


def require_room(db: Session, counted: Select[int], limit: int, message: str, subject: str) -> None:
    """QuotaExceeded (naming ``subject``) unless the ``counted`` rows are below ``limit``."""
    if db.execute(counted).scalar_one() >= limit:
        raise QuotaExceeded(message, subject=subject)


def scope_of(row: MemoryItemRow) -> Scope:
    return Scope(row.scope, row.workspace_id, row.conversation_id, row.user_id)


# -- rows as records ----------------------------------------------------------------------


def workspace_record(row: WorkspaceRow) -> WorkspaceRecord:
    return WorkspaceRecord(
        id=row.id,
        display_name=row.display_name,
        description=row.description,
        created_at=row.created_at,
        updated_at=row.updated_at,
        deleted_at=row.deleted_at,
        version=row.version,
        memory_policy=row.memory_policy or b"",
    )


def member_record(row: WorkspaceMemberRow) -> MemberRecord:
    return MemberRecord(
        workspace_id=row.workspace_id,
        user_id=row.user_id,
        role=row.role,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def conversation_record(row: ConversationRow) -> ConversationRecord:
    return ConversationRecord(
        id=row.id,
        workspace_id=row.workspace_id,
        title=row.title,
        meta=row.meta,
        archived=row.archived,
        creator=row.creator,
        created_at=row.created_at,
        updated_at=row.updated_at,
        deleted_at=row.deleted_at,
        version=row.version,
        last_seq=row.last_seq,
        message_count=row.message_count,
        token_count=row.token_count,
        summary_id=row.summary_id,
        active_branch=row.active_branch,
        branch_count=row.branch_count,
        base_conversation_id=row.base_conversation_id,
        base_message_id=row.base_message_id,
        base_branch=row.base_branch,
        base_seq=row.base_seq,
    )


def message_record(row: Any) -> MessageRecord:
    """A ``MessageRow`` or a Core row of all of its columns, as a record."""
    return MessageRecord(
        id=row.id,
        conversation_id=row.conversation_id,
        seq=row.seq,
        role=row.role,
        token_count=row.token_count,
        archived=row.archived,
        summary_id=row.summary_id,
        created_at=row.created_at,
        data=row.data,
        branch=row.branch,
        parent_seq=row.parent_seq,
    )


_MEMORY_FIELDS: Final = tuple(MemoryRecord.__dataclass_fields__)


def memory_record(row: MemoryItemRow) -> MemoryRecord:
    return MemoryRecord(**{field: getattr(row, field) for field in _MEMORY_FIELDS})


def memory_row(record: MemoryRecord) -> MemoryItemRow:
    """The row to insert for a new memory item."""
    return MemoryItemRow(**{field: getattr(record, field) for field in _MEMORY_FIELDS})
