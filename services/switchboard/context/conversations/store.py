"""Persistence of conversations (see ``storebase.py`` for the rules)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from switchboard.context.branches import store as branching
from switchboard.context.records import Archived, ConversationRecord, Missing
from switchboard.context.storebase import (
    StoreBase,
    apply_changes,
    conversation_record,
    counted,
    keyset,
    require_room,
    set_deleted,
)
from switchboard.platform.errors import FailedPrecondition, NotFound
from switchboard.platform.store.models import ConversationRow, MessageRow
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import Idempotency, check_etag, claim, retrying
from switchboard.platform.values.names import new_id, now


class ConversationStore(StoreBase):
    async def create_conversation(
        self,
        workspace_id: str,
        title: str,
        meta: bytes,
        creator: str,
        idempotency: Idempotency | None,
        max_per_workspace: int,
        staged: Staged[Any] | None = None,
    ) -> tuple[ConversationRecord, bool]:
        """The new conversation and True; the earlier one and False on a replay."""

        def tx(db: Session) -> tuple[ConversationRecord, bool]:
            conversation_id = new_id()
            self._workspace_for_update(db, workspace_id)
            earlier = _claimed(db, idempotency, conversation_id)
            if earlier is not None:
                return earlier, False
            _room(db, workspace_id, max_per_workspace)
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
                # Set here, not only by the column's default: the record is read before
                # the insert is flushed.
                active_branch=1,
                branch_count=1,
                base_conversation_id=None,
                base_message_id="",
                base_branch=0,
                base_seq=0,
            )
            db.add(row)
            return conversation_record(row), True

        return await retrying(lambda: self._run(staging(staged, tx), write=True))

    async def fork_conversation(
        self,
        workspace_id: str,
        source_id: str,
        message_id: str,
        *,
        title: str,
        meta: bytes,
        creator: str,
        idempotency: Idempotency | None,
        max_per_workspace: int,
        staged: Staged[Any] | None = None,
    ) -> tuple[ConversationRecord, bool]:
        """A new conversation sharing ``source_id``'s history up to ``message_id`` (its
        own branch's), and True; the earlier one and False on a replay. Nothing is
        copied: its reads take the source's rows up to that message
        (``branches/paths.py``), and the source keeps them while it has forks."""

        def tx(db: Session) -> tuple[ConversationRecord, bool]:
            connection = db.connection()
            conversation_id = new_id()
            self._workspace_for_update(db, workspace_id)
            source = self._conversation_record(connection, workspace_id, source_id)
            found = branching.place(connection, source_id, message_id)
            if found is None:
                raise Missing("message", workspace_id, source_id, message_id)
            earlier = _claimed(db, idempotency, conversation_id)
            if earlier is not None:
                return earlier, False
            if _depth(connection, source) >= branching.MAX_FORK_DEPTH:
                raise FailedPrecondition(
                    f"message: forks go {branching.MAX_FORK_DEPTH} deep at most; fork an "
                    "earlier conversation"
                )
            branching.check_unfolded(connection, source_id, found.seq, "message")
            _room(db, workspace_id, max_per_workspace)
            history = branching.path(connection, source, found.branch)
            count, tokens = connection.execute(
                select(func.count(), func.coalesce(func.sum(MessageRow.token_count), 0)).where(
                    history.condition(source_id),
                    MessageRow.seq <= found.seq,
                    MessageRow.archived.is_(False),
                )
            ).one()
            stamp = now()
            row = ConversationRow(
                id=conversation_id,
                workspace_id=workspace_id,
                title=title or source.title,
                meta=meta,
                archived=False,
                creator=creator,
                created_at=stamp,
                updated_at=stamp,
                deleted_at=None,
                version=1,
                # Its own messages follow the shared one.
                last_seq=found.seq,
                message_count=int(count),
                token_count=int(tokens),
                # The source's summary, of history before the shared message (checked).
                summary_id=source.summary_id,
                active_branch=1,
                branch_count=1,
                base_conversation_id=source_id,
                base_message_id=message_id,
                base_branch=found.branch,
                base_seq=found.seq,
            )
            db.add(row)
            return conversation_record(row), True

        return await retrying(lambda: self._run(staging(staged, tx), write=True))

    async def get_conversation(self, workspace_id: str, conversation_id: str) -> ConversationRecord:
        """The conversation (soft-deleted ones too), or Missing."""
        return await self._run(
            lambda db: conversation_record(
                self._conversation(db, workspace_id, conversation_id, include_deleted=True)
            ),
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
    ) -> list[ConversationRecord]:
        """The workspace's conversations, most recently updated first."""
        query = select(ConversationRow).where(ConversationRow.workspace_id == workspace_id)
        if not show_archived:
            query = query.where(ConversationRow.archived.is_(False))
        if not show_deleted:
            query = query.where(ConversationRow.deleted_at.is_(None))
        query = keyset(
            query, ConversationRow.updated_at, ConversationRow.id, before, newest_first=True
        ).limit(limit)
        return await self._run(
            lambda db: [conversation_record(row) for row in db.execute(query).scalars()],
            write=False,
        )

    async def update_conversation(
        self,
        workspace_id: str,
        conversation_id: str,
        etag: str,
        changes: dict[str, Any],
        staged: Staged[Any] | None = None,
    ) -> ConversationRecord:
        def tx(db: Session) -> ConversationRecord:
            row = self._conversation(db, workspace_id, conversation_id, lock=True)
            check_etag(etag, row.version)
            # An archived conversation takes only the change that unarchives it.
            if row.archived and set(changes) - {"archived"} and changes.get("archived", True):
                raise Archived("conversation", workspace_id, conversation_id)
            apply_changes(row, changes)
            return conversation_record(row)

        return await self._run(staging(staged, tx), write=True)

    async def set_conversation_deleted(
        self,
        workspace_id: str,
        conversation_id: str,
        etag: str,
        *,
        deleted: bool,
        staged: Staged[Any] | None = None,
    ) -> ConversationRecord:
        def tx(db: Session) -> ConversationRecord:
            row = self._conversation(
                db, workspace_id, conversation_id, include_deleted=True, lock=True
            )
            check_etag(etag, row.version)
            set_deleted(row, deleted, "conversation", workspace_id, conversation_id)
            return conversation_record(row)

        return await self._run(staging(staged, tx), write=True)


def _depth(connection: Connection, conversation: ConversationRecord) -> int:
    """How many forks deep ``conversation`` is (0: not a fork)."""
    depth, current = 0, conversation
    while current.base_conversation_id and depth < branching.MAX_FORK_DEPTH:
        found = branching.record(connection, current.base_conversation_id)
        if found is None:  # pragma: no cover - sources outlive their forks
            break
        depth, current = depth + 1, found
    return depth


def _claimed(
    db: Session, idempotency: Idempotency | None, conversation_id: str
) -> ConversationRecord | None:
    """The conversation an earlier request with the same key made (None: this is the
    first; its key is claimed for ``conversation_id``)."""
    earlier = claim(db, idempotency, conversation_id)
    if earlier is None:
        return None
    found = db.get(ConversationRow, earlier)
    if found is None:
        raise NotFound("the conversation created by this request_id is gone")
    return conversation_record(found)


def _room(db: Session, workspace_id: str, max_per_workspace: int) -> None:
    require_room(
        db,
        counted(ConversationRow, ConversationRow.workspace_id == workspace_id),
        max_per_workspace,
        f"a workspace may hold at most {max_per_workspace} conversations",
        "conversations per workspace",
    )
