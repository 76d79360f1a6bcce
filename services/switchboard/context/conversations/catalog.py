"""Conversations: validation, limits, events.

A conversation named in a request must live in the workspace the name says
(the guard checked the caller's role there): NOT_FOUND otherwise, never
another workspace's conversation.
"""

from __future__ import annotations

from typing import Any

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.common import (
    Common,
    Domain,
    check_text,
    conversation_event,
    metadata_bytes,
    request_key,
    stored,
    write,
)
from switchboard.context.conversations.store import ConversationStore
from switchboard.context.mapping import conversation_proto
from switchboard.context.records import ConversationRecord
from switchboard.platform.errors import Violations
from switchboard.platform.security.policy import Principal
from switchboard.platform.store import pagination
from switchboard.platform.store.outbox import Staged
from switchboard.platform.store.pagination import from_micros, micros
from switchboard.platform.store.storage import Idempotency
from switchboard.platform.values.fieldmask import update_paths
from switchboard.platform.values.names import checked_etag
from switchboard.platform.values.resources import ConversationName, MessageName, WorkspaceName


class Conversations(Domain):
    def __init__(self, common: Common, store: ConversationStore) -> None:
        super().__init__(common)
        self._store = store

    @write
    async def create(
        self, principal: Principal, request: pb.CreateConversationRequest
    ) -> pb.Conversation:
        workspace_id = WorkspaceName.parse(request.parent, "parent").workspace
        conversation = request.conversation
        meta = self._checked(conversation)
        key = request_key(principal, "CreateConversation", request)
        staged = _made(principal, self.common, key)
        row, _ = await stored(
            self._store.create_conversation(
                workspace_id,
                conversation.title,
                meta,
                principal.user_name,
                key,
                self.limits.max_conversations,
                staged,
            )
        )
        await self.common.announce(staged)
        return conversation_proto(row)

    @write
    async def fork(
        self, principal: Principal, request: pb.ForkConversationRequest
    ) -> pb.Conversation:
        """A new conversation sharing another's history up to a message
        (docs/conversations.md, "Forks")."""
        message = MessageName.parse(request.message, "message")
        conversation = request.conversation
        meta = self._checked(conversation)
        key = request_key(principal, "ForkConversation", request)
        staged = _made(principal, self.common, key)
        row, _ = await stored(
            self._store.fork_conversation(
                message.workspace,
                message.conversation,
                message.message,
                title=conversation.title,
                meta=meta,
                creator=principal.user_name,
                idempotency=key,
                max_per_workspace=self.limits.max_conversations,
                staged=staged,
            )
        )
        await self.common.announce(staged)
        return conversation_proto(row)

    def _checked(self, conversation: pb.Conversation) -> bytes:
        """A new conversation's title checked, and its metadata as stored."""
        violations = Violations()
        check_text(
            conversation.title, "conversation.title", self.limits.max_title_chars, violations
        )
        violations.check()
        return metadata_bytes(
            conversation.metadata, "conversation.metadata", self.limits.max_metadata_bytes
        )

    async def get(self, name: str) -> pb.Conversation:
        conversation = ConversationName.parse(name, "name")
        row = await stored(
            self._store.get_conversation(conversation.workspace, conversation.conversation)
        )
        return conversation_proto(row)

    async def list(self, request: pb.ListConversationsRequest) -> pb.ListConversationsResponse:
        workspace_id = WorkspaceName.parse(request.parent, "parent").workspace
        pages = self.common.pages
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        token = pagination.fingerprint(
            "conversations", workspace_id, request.show_archived, request.show_deleted
        )
        before = None
        if request.page_token:
            stamp, last = pages.decode(
                request.page_token, token, (pagination.MICROS, pagination.ID)
            )
            before = (from_micros(stamp), str(last))
        rows = await self._store.list_conversations(
            workspace_id,
            before,
            size + 1,
            show_archived=request.show_archived,
            show_deleted=request.show_deleted,
        )
        response = pb.ListConversationsResponse(
            conversations=[conversation_proto(r) for r in rows[:size]]
        )
        if len(rows) > size:
            last_row = rows[size - 1]
            response.next_page_token = pages.encode(
                [micros(last_row.updated_at), last_row.id], token
            )
        return response

    @write
    async def update(
        self, principal: Principal, request: pb.UpdateConversationRequest
    ) -> pb.Conversation:
        conversation = request.conversation
        name = ConversationName.parse(conversation.name, "conversation.name")
        paths = update_paths(
            request.update_mask, conversation, ("title", "metadata", "archived"), "update_mask"
        )
        violations = Violations()
        changes: dict[str, Any] = {}
        if "title" in paths:
            check_text(
                conversation.title, "conversation.title", self.limits.max_title_chars, violations
            )
            changes["title"] = conversation.title
        violations.check()
        if "metadata" in paths:
            changes["meta"] = metadata_bytes(
                conversation.metadata, "conversation.metadata", self.limits.max_metadata_bytes
            )
        if "archived" in paths:
            changes["archived"] = conversation.archived
        staged = self.common.staged(
            lambda done: [conversation_event(principal, events_pb2.CHANGE_KIND_UPDATED, done)]
        )
        row = await stored(
            self._store.update_conversation(
                name.workspace,
                name.conversation,
                checked_etag(conversation.etag, "conversation.etag"),
                changes,
                staged,
            )
        )
        await self.common.announce(staged)
        return conversation_proto(row)

    @write
    async def set_deleted(
        self, principal: Principal, name: str, etag: str, *, deleted: bool
    ) -> pb.Conversation:
        conversation = ConversationName.parse(name, "name")
        change = events_pb2.CHANGE_KIND_DELETED if deleted else events_pb2.CHANGE_KIND_UPDATED
        staged = self.common.staged(lambda done: [conversation_event(principal, change, done)])
        row = await stored(
            self._store.set_conversation_deleted(
                conversation.workspace,
                conversation.conversation,
                checked_etag(etag, "etag"),
                deleted=deleted,
                staged=staged,
            )
        )
        await self.common.announce(staged)
        return conversation_proto(row)


def _made(
    principal: Principal, common: Common, key: Idempotency | None
) -> Staged[tuple[ConversationRecord, bool]]:
    """A new conversation's event, staged with its write (none for a replay)."""
    return common.staged(
        lambda made: (
            [conversation_event(principal, events_pb2.CHANGE_KIND_CREATED, made[0])]
            if made[1]
            else None
        ),
        key.key if key else "",
    )
