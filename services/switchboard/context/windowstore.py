"""The reads a context window is built from, in one snapshot (see ``storebase.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session

from switchboard.context.records import (
    ConversationRecord,
    MemoryRecord,
    MessageRecord,
    Missing,
)
from switchboard.context.storebase import (
    StoreBase,
    conversation_record,
    log,
    memory_record,
    message_record,
)
from switchboard.platform.store.db import DatabaseUnavailable, is_outage
from switchboard.platform.store.models import ConversationRow, MemoryItemRow, MessageRow

_WINDOW_VERSIONS: Final = (
    "SELECT c.workspace_id, c.deleted_at IS NOT NULL, c.version, "
    "(SELECT version FROM memory_scopes WHERE scope = :workspace_scope), "
    "(SELECT version FROM memory_scopes WHERE scope = :user_scope) "
    "FROM conversations c WHERE c.id = :conversation"
)
_WINDOW_VERSIONS_TEXT: Final = text(_WINDOW_VERSIONS)
# The window's reads, built once (one snapshot per window; see ``window_rows``).
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
    ) -> WindowRows:
        """Read everything a window needs in one snapshot.

        ``query(latest user message)`` is the text relevant memory is searched with.
        """

        def tx(db: Session) -> WindowRows:
            conversation = self._conversation(db, workspace_id, conversation_id)
            params = _window_params(conversation_id, scopes)
            # Core statements on the connection: the ORM's execute costs more (decisions 39).
            core = db.connection()
            versions = [tuple(row) for row in core.execute(_WINDOW_VERSIONS_TEXT, params).all()]
            _, workspace_version, user_version = _window_versions(
                versions, workspace_id, conversation_id
            )
            limit = max_pinned * len(scopes.all())
            pinned = list(db.execute(_PINNED, {"scopes": scopes.all(), "limit": limit}).scalars())
            latest = db.execute(
                _LATEST_USER_MESSAGE, {"conversation": conversation_id}
            ).scalar_one_or_none()
            relevant = self._search(
                db,
                scopes.all(),
                query(message_record(latest) if latest is not None else None),
                kinds=(),
                limit=relevant_limit,
                exclude_kinds=("summary",),
                unpinned_only=True,
            )
            summary = (
                db.get(MemoryItemRow, conversation.summary_id) if conversation.summary_id else None
            )
            recent, bodies = _recent(db, conversation, budget)
            return WindowRows(
                conversation=conversation_record(conversation),
                workspace_version=workspace_version,
                user_version=user_version,
                pinned=[memory_record(row) for row in pinned],
                relevant=[(memory_record(row), score) for row, score in relevant],
                summary=memory_record(summary) if summary is not None else None,
                recent=recent,
                bodies=bodies,
            )

        return await self._run(tx, write=False, snapshot=True)


def _recent(
    db: Session, conversation: ConversationRow, budget: int
) -> tuple[list[tuple[int, int]], dict[int, bytes]]:
    """(seq, tokens) of the newest live messages covering ``budget``, and their bodies.

    Newest first, in pages, until the budget is covered: a long conversation
    never loads more than what can fit (plus one page). The first page is what
    the budget holds at 16 tokens a message, then pages double: a small budget
    over a long conversation does not fetch hundreds of bodies it cannot use.
    The bodies come along (Core rows, not ORM objects): nearly all of them end
    up in the window.
    """
    recent: list[tuple[int, int]] = []
    bodies: dict[int, bytes] = {}
    covered = 0
    core = db.connection()
    upper = conversation.last_seq + 1
    page_size = min(max(budget // 16, _RECENT_FIRST_PAGE), _RECENT_PAGE)
    while covered <= budget:
        page = core.execute(
            _RECENT_MESSAGES,
            {"conversation": conversation.id, "upper": upper, "limit": page_size},
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
