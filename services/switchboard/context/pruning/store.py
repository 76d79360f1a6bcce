"""Persistence of pruning and maintenance: archiving under a summary, purging (``storebase.py``)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from sqlalchemy import bindparam, delete, func, select, text, update
from sqlalchemy.orm import Session

from switchboard.context.branches import store as branching
from switchboard.context.records import ConversationRecord, MemoryRecord, MessageRecord
from switchboard.context.storebase import (
    StoreBase,
    conversation_record,
    memory_record,
    memory_row,
    message_record,
)
from switchboard.platform.store.models import (
    ConversationRow,
    IdempotencyRow,
    MemoryItemRow,
    MessageRow,
    WorkspaceRow,
)
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import IDEMPOTENCY_TTL
from switchboard.platform.values.names import now


class PruneStore(StoreBase):
    async def live_tokens(self, workspace_id: str, conversation_id: str) -> list[tuple[int, int]]:
        """(seq, tokens) of every live message that may be folded, oldest first.

        A conversation with branches folds only the history every branch shares (its
        first messages, before the earliest fork): its one summary then holds for every
        branch, and a branch never reads a summary of messages it does not hold."""
        query = (
            select(MessageRow.seq, MessageRow.token_count)
            .where(MessageRow.conversation_id == conversation_id, MessageRow.archived.is_(False))
            .order_by(MessageRow.seq)
        )

        def tx(db: Session) -> list[tuple[int, int]]:
            conversation = conversation_record(
                self._conversation(db, workspace_id, conversation_id)
            )
            connection = db.connection()
            read = query
            if conversation.base_conversation_id or branching.has_forks(
                connection, conversation_id
            ):
                # A fork's history is partly another's rows, and a source's is partly
                # its forks': neither is folded (docs/conversations.md, "Forks").
                return []
            if conversation.branched:
                read = read.where(
                    MessageRow.branch == 1,
                    MessageRow.seq <= branching.shared_upto(connection, conversation_id),
                )
            return [(int(seq), int(tokens)) for seq, tokens in db.execute(read).all()]

        return await self._run(tx, write=False, snapshot=True)

    async def prune_inputs(
        self, conversation_id: str, upto_seq: int
    ) -> tuple[list[MessageRecord], MemoryRecord | None]:
        """The live messages up to ``upto_seq`` and the current summary."""
        query = (
            select(MessageRow)
            .where(
                MessageRow.conversation_id == conversation_id,
                MessageRow.archived.is_(False),
                MessageRow.seq <= upto_seq,
            )
            .order_by(MessageRow.seq)
        )

        def tx(db: Session) -> tuple[list[MessageRecord], MemoryRecord | None]:
            conversation = db.get(ConversationRow, conversation_id)
            summary = (
                db.get(MemoryItemRow, conversation.summary_id)
                if conversation is not None and conversation.summary_id
                else None
            )
            messages = [message_record(row) for row in db.execute(query).scalars()]
            return messages, memory_record(summary) if summary is not None else None

        return await self._run(tx, write=False, snapshot=True)

    async def archive(
        self,
        workspace_id: str,
        conversation_id: str,
        *,
        upto_seq: int,
        expected_summary: str | None,
        expected_count: int,
        summary: MemoryRecord,
        staged: Staged[Any] | None = None,
    ) -> tuple[ConversationRecord, int] | None:
        """Archive live messages up to ``upto_seq`` under ``summary``.

        None if another prune got there first (the caller plans again).
        """
        upto = (
            MessageRow.conversation_id == conversation_id,
            MessageRow.archived.is_(False),
            MessageRow.seq <= upto_seq,
        )

        def tx(db: Session) -> tuple[ConversationRecord, int] | None:
            conversation = self._conversation(
                db, workspace_id, conversation_id, writable=True, lock=True
            )
            if conversation.summary_id != expected_summary:
                return None
            count, tokens = db.execute(
                select(func.count(), func.coalesce(func.sum(MessageRow.token_count), 0)).where(
                    *upto
                )
            ).one()
            if int(count) != expected_count:
                return None
            self._add_memory_row(db, memory_row(summary))
            db.execute(update(MessageRow).where(*upto).values(archived=True, summary_id=summary.id))
            conversation.summary_id = summary.id
            conversation.message_count -= int(count)
            conversation.token_count -= int(tokens)
            conversation.version += 1
            conversation.updated_at = now()
            return conversation_record(conversation), int(count)

        return await self._run(staging(staged, tx), write=True)

    # -- maintenance -------------------------------------------------------------------

    async def purge_workspaces(self, deleted_before: dt.datetime) -> list[str]:
        """Hard-delete workspaces soft-deleted before ``deleted_before``; their ids."""

        def tx(db: Session) -> list[str]:
            ids = list(
                db.execute(
                    select(WorkspaceRow.id).where(WorkspaceRow.deleted_at < deleted_before)
                ).scalars()
            )
            if ids:
                self._drop_search_rows(db, "workspace_id", ids)
                db.execute(delete(WorkspaceRow).where(WorkspaceRow.id.in_(ids)))
            return ids

        return await self._run(tx, write=True)

    async def purge_conversations(self, deleted_before: dt.datetime) -> int:
        """Hard-delete conversations soft-deleted before ``deleted_before``; how many."""

        def tx(db: Session) -> int:
            forked = select(ConversationRow.base_conversation_id).where(
                ConversationRow.base_conversation_id.is_not(None)
            )
            ids = list(
                db.execute(
                    select(ConversationRow.id).where(
                        ConversationRow.deleted_at < deleted_before,
                        # A source waits for its forks: they read its rows.
                        ConversationRow.id.not_in(forked),
                    )
                ).scalars()
            )
            if ids:
                self._drop_search_rows(db, "conversation_id", ids)
                db.execute(delete(ConversationRow).where(ConversationRow.id.in_(ids)))
            return len(ids)

        return await self._run(tx, write=True)

    def _drop_search_rows(
        self, db: Session, owner: Literal["workspace_id", "conversation_id"], ids: list[str]
    ) -> None:
        """SQLite's FTS5 rows of the memory items the purge's cascade deletes."""
        if not self._sqlite:
            return  # PostgreSQL's index is a column of the rows themselves
        # ``owner`` is one of two constant column names; the ids are bound.
        db.execute(
            text(
                "DELETE FROM memory_fts WHERE rowid IN (SELECT fts_rowid FROM "  # noqa: S608
                f"memory_items WHERE {owner} IN :ids)"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": ids},
        )

    async def purge_idempotency(self) -> int:
        """Forget idempotency keys (of every service) older than their time to live."""

        def tx(db: Session) -> int:
            result = db.execute(
                delete(IdempotencyRow).where(IdempotencyRow.created_at < now() - IDEMPOTENCY_TTL)
            )
            return int(getattr(result, "rowcount", 0) or 0)

        return await self._run(tx, write=True)
