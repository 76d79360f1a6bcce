"""The reads a context window is built from, in one snapshot (see ``storebase.py``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import bindparam, func, or_, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from switchboard.context.branches import store as branching
from switchboard.context.branches.paths import Path, plain
from switchboard.context.records import (
    ConversationRecord,
    MemoryRecord,
    MessageRecord,
    Missing,
)
from switchboard.context.storebase import MEMORY_COLUMNS, StoreBase, log
from switchboard.platform.store.db import DatabaseUnavailable, is_outage
from switchboard.platform.store.models import MemoryItemRow, MessageRow, table_of
from switchboard.platform.store.prepared import Prepared
from switchboard.platform.values.names import now

_WINDOW_VERSIONS: Final = (
    "SELECT c.workspace_id, c.deleted_at IS NOT NULL, c.version, "
    "(SELECT version FROM memory_scopes WHERE scope = :workspace_scope), "
    "(SELECT version FROM memory_scopes WHERE scope = :user_scope) "
    "FROM conversations c WHERE c.id = :conversation"
)
# The window's reads, compiled once and run on the driver (``prepared.py``), in one
# snapshot per window (see ``window_rows``); rows are tuples in the records' order.
_MESSAGES: Final = table_of(MessageRow)
_WINDOW_VERSIONS_PREPARED: Final = Prepared(text(_WINDOW_VERSIONS), name="window versions")
_NOW: Final = bindparam("now", type_=MemoryItemRow.__table__.c.valid_until.type)
_PINNED: Final = Prepared(
    select(*MEMORY_COLUMNS)
    .where(
        MemoryItemRow.scope.in_([bindparam("scope0"), bindparam("scope1"), bindparam("scope2")]),
        MemoryItemRow.pinned.is_(True),
        # True at the window's time (``storebase.CURRENT_AT``) and of its workspace.
        func.coalesce(MemoryItemRow.valid_from, MemoryItemRow.created_at) <= _NOW,
        or_(MemoryItemRow.valid_until.is_(None), MemoryItemRow.valid_until > _NOW),
        or_(
            MemoryItemRow.origin_workspace_id.is_(None),
            MemoryItemRow.origin_workspace_id == bindparam("origin"),
        ),
    )
    .order_by(MemoryItemRow.created_at, MemoryItemRow.id)
    .limit(bindparam("limit")),
    name="pinned memory",
)
_LATEST_USER_MESSAGE: Final = Prepared(
    select(*(_MESSAGES.c[field] for field in MessageRecord.__dataclass_fields__))
    .where(_MESSAGES.c.conversation_id == bindparam("conversation"), _MESSAGES.c.role == "user")
    .order_by(_MESSAGES.c.seq.desc())
    .limit(1),
    name="latest user message",
)
_SUMMARY: Final = Prepared(
    select(*MEMORY_COLUMNS).where(MemoryItemRow.id == bindparam("id")), name="summary"
)
_RECENT_MESSAGES: Final = Prepared(
    select(_MESSAGES.c.seq, _MESSAGES.c.token_count, _MESSAGES.c.data)
    .where(
        _MESSAGES.c.conversation_id == bindparam("conversation"),
        _MESSAGES.c.archived.is_(False),
        _MESSAGES.c.seq < bindparam("upper"),
    )
    .order_by(_MESSAGES.c.seq.desc())
    .limit(bindparam("limit")),
    name="recent messages",
)
# A conversation with branches, or a fork, reads one branch's history: the same reads,
# with its condition (``branches/paths.py``: it names the conversations it reads), built
# per window.
_LATEST_ON_PATH: Final = (
    select(*(_MESSAGES.c[field] for field in MessageRecord.__dataclass_fields__))
    .where(_MESSAGES.c.role == "user")
    .order_by(_MESSAGES.c.seq.desc())
)
_RECENT_ON_PATH: Final = (
    select(_MESSAGES.c.seq, _MESSAGES.c.token_count, _MESSAGES.c.data)
    .where(_MESSAGES.c.archived.is_(False), _MESSAGES.c.seq < bindparam("upper"))
    .order_by(_MESSAGES.c.seq.desc())
    .limit(bindparam("limit"))
)
_RECENT_PAGE: Final = 256
_RECENT_FIRST_PAGE: Final = 32


@dataclass(frozen=True)
class WindowScopes:
    """The memory scopes a conversation's window draws on, by name."""

    conversation: str
    workspace: str
    user: str

    def all(self) -> list[str]:
        return [self.conversation, self.workspace, self.user]


@dataclass(frozen=True)
class WindowRows:
    """Everything a context window is built from, read in one snapshot."""

    conversation: ConversationRecord
    workspace_version: int
    user_version: int
    pinned: list[MemoryRecord]
    relevant: list[tuple[MemoryRecord, float]]
    summary: MemoryRecord | None
    # (seq, token_count) of live messages, newest first, at least covering the budget.
    recent: list[tuple[int, int]]
    # The stored ``Message`` of each of them, by seq.
    bodies: dict[int, bytes]
    # The branch history read (every message while the conversation has one branch).
    path: Path = field(default_factory=plain)
    # Live messages of that history (None: the conversation's count, one branch).
    live: int | None = None


class WindowStore(StoreBase):
    async def window_version(
        self, workspace_id: str, conversation_id: str, scopes: WindowScopes
    ) -> tuple[int, int, int]:
        """The versions a conversation's window depends on: the conversation's, its
        workspace's memory and the caller's memory. One plain statement: it runs
        on every GetContextWindow, cached or not."""
        try:
            rows = await self._database.fetch(
                _WINDOW_VERSIONS, _window_params(conversation_id, scopes)
            )
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("context database call failed: %s", type(exc).__name__)
            raise DatabaseUnavailable() from exc
        return _window_versions(rows, workspace_id, conversation_id)

    async def window_rows(
        self,
        workspace_id: str,
        conversation_id: str,
        scopes: WindowScopes,
        *,
        budget: int,
        query: Callable[[MessageRecord | None], str],
        relevant_limit: int,
        max_pinned: int,
        at: dt.datetime | None = None,
        branch: int = 0,
    ) -> WindowRows:
        """Read everything a window needs in one snapshot.

        ``query(latest user message)`` is the text relevant memory is searched with;
        ``at``: the memory true then (now if None).
        """

        def tx(db: Session) -> WindowRows:
            connection = db.connection()
            conversation = self._conversation_record(connection, workspace_id, conversation_id)
            versions = _WINDOW_VERSIONS_PREPARED.rows(
                connection, _window_params(conversation_id, scopes)
            )
            found = _window_versions(versions, workspace_id, conversation_id)
            return self._window_rows(
                connection,
                conversation,
                found,
                scopes,
                budget,
                query,
                relevant_limit,
                max_pinned,
                at,
                branch,
            )

        return await self._run(tx, write=False, snapshot=True)

    async def window_read(
        self,
        workspace_id: str,
        conversation_id: str,
        scopes: WindowScopes,
        *,
        cached: Callable[[tuple[int, int, int]], bool],
        budget: int,
        query: Callable[[MessageRecord | None], str],
        relevant_limit: int,
        max_pinned: int,
        branch: int = 0,
    ) -> tuple[tuple[int, int, int], WindowRows | None]:
        """``window_version`` and, unless ``cached(versions)``, ``window_rows``, in one
        snapshot and one thread hop: a run reads its window right after appending to
        the conversation, when no cached window can match.

        ``cached`` runs in the database's thread: it may only read.
        """

        def tx(db: Session) -> tuple[tuple[int, int, int], WindowRows | None]:
            connection = db.connection()
            versions = _WINDOW_VERSIONS_PREPARED.rows(
                connection, _window_params(conversation_id, scopes)
            )
            found = _window_versions(versions, workspace_id, conversation_id)
            if cached(found):
                return found, None
            conversation = self._conversation_record(connection, workspace_id, conversation_id)
            rows = self._window_rows(
                connection,
                conversation,
                found,
                scopes,
                budget,
                query,
                relevant_limit,
                max_pinned,
                branch=branch,
            )
            return found, rows

        return await self._run(tx, write=False, snapshot=True)

    def _window_rows(
        self,
        connection: Connection,
        conversation: ConversationRecord,
        versions: tuple[int, int, int],
        scopes: WindowScopes,
        budget: int,
        query: Callable[[MessageRecord | None], str],
        relevant_limit: int,
        max_pinned: int,
        at: dt.datetime | None = None,
        branch: int = 0,
    ) -> WindowRows:
        """The rest of a window's reads, in the snapshot ``versions`` were read in.
        A conversation with branches is read on ``branch`` (0: the active one)."""
        number = branching.check_branch(conversation, branch)
        history = branching.path(connection, conversation, number)
        every = scopes.all()
        stamp = at or now()
        pinned = _PINNED.rows(
            connection,
            {
                "scope0": every[0],
                "scope1": every[1],
                "scope2": every[2],
                "limit": max_pinned * len(every),
                "now": stamp,
                "origin": conversation.workspace_id,
            },
        )
        if history.every:
            latest = _LATEST_USER_MESSAGE.first(connection, {"conversation": conversation.id})
        else:
            latest = connection.execute(
                _LATEST_ON_PATH.where(history.condition(conversation.id)).limit(1)
            ).first()
        relevant = self._search_window(
            connection,
            every,
            query(MessageRecord(*latest) if latest is not None else None),
            limit=relevant_limit,
            workspace_id=conversation.workspace_id,
            at=at,
        )
        summary = None
        if conversation.summary_id:
            summary = _SUMMARY.first(connection, {"id": conversation.summary_id})
        recent, bodies = _recent(connection, conversation, budget, history)
        live = None
        if not history.every:
            live = int(
                connection.execute(
                    select(func.count())
                    .select_from(_MESSAGES)
                    .where(_MESSAGES.c.archived.is_(False), history.condition(conversation.id))
                ).scalar_one()
            )
        return WindowRows(
            conversation=conversation,
            workspace_version=versions[1],
            user_version=versions[2],
            pinned=[MemoryRecord(*row) for row in pinned],
            relevant=relevant,
            summary=MemoryRecord(*summary) if summary is not None else None,
            recent=recent,
            bodies=bodies,
            path=history,
            live=live,
        )


def _recent(
    connection: Connection, conversation: ConversationRecord, budget: int, history: Path
) -> tuple[list[tuple[int, int]], dict[int, bytes]]:
    """(seq, tokens) of the newest live messages covering ``budget``, and their bodies.

    Newest first, in pages, until the budget is covered: a long conversation
    never loads more than what can fit (plus one page). The first page is what
    the budget holds at 16 tokens a message, then pages double: a small budget
    over a long conversation does not fetch hundreds of bodies it cannot use.
    The bodies come along: nearly all of them end up in the window.
    """
    recent: list[tuple[int, int]] = []
    bodies: dict[int, bytes] = {}
    covered = 0
    upper = conversation.last_seq + 1
    page_size = min(max(budget // 16, _RECENT_FIRST_PAGE), _RECENT_PAGE)
    on_path = None if history.every else _RECENT_ON_PATH.where(history.condition(conversation.id))
    while covered <= budget:
        params = {"conversation": conversation.id, "upper": upper, "limit": page_size}
        if on_path is None:
            page = _RECENT_MESSAGES.rows(connection, params)
        else:
            page = [tuple(row) for row in connection.execute(on_path, params).all()]
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
    return recent, bodies


def _window_params(conversation_id: str, scopes: WindowScopes) -> dict[str, Any]:
    return {
        "conversation": conversation_id,
        "workspace_scope": scopes.workspace,
        "user_scope": scopes.user,
    }


def _window_versions(
    rows: Sequence[tuple[Any, ...]], workspace_id: str, conversation_id: str
) -> tuple[int, int, int]:
    """(conversation, workspace memory, user memory) versions from ``_WINDOW_VERSIONS``."""
    if not rows or rows[0][0] != workspace_id or rows[0][1]:
        raise Missing("conversation", workspace_id, conversation_id)
    _, _, version, workspace_version, user_version = rows[0]
    return int(version), int(workspace_version or 0), int(user_version or 0)
