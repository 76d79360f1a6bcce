"""Persistence of conversations (see ``storebase.py`` for the rules)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from switchboard.context.records import Archived, ConversationRecord
from switchboard.context.storebase import (
    StoreBase,
    apply_changes,
    conversation_record,
    counted,
    keyset,
    require_room,
    set_deleted,
)
from switchboard.platform.errors import NotFound
from switchboard.platform.store.models import ConversationRow
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
            earlier = claim(db, idempotency, conversation_id)
            if earlier is not None:
                found = db.get(ConversationRow, earlier)
                if found is None:
                    raise NotFound("the conversation created by this request_id is gone")
                return conversation_record(found), False
            require_room(
                db,
                counted(ConversationRow, ConversationRow.workspace_id == workspace_id),
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
                # Set here, not only by the column's default: the record is read before
                # the insert is flushed.
                active_branch=1,
                branch_count=1,
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
