"""Branches: starting one and switching the active one (docs/conversations.md).

An edit starts its branch with its message (``messages/catalog.py``, ``replaces``); a
regenerated answer starts one here, ending at the message answered, and its run
appends there (``dispatcher``'s RegenerateMessage). Each change of the active branch
is a CONVERSATION_CHANGED event: a client following the conversation learns which
branch reads now follow.
"""

from __future__ import annotations

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.branches.store import BranchStore, Fork
from switchboard.context.common import (
    Common,
    Domain,
    conversation_event,
    message_in,
    stored,
    write,
)
from switchboard.context.mapping import conversation_proto
from switchboard.context.records import ConversationRecord
from switchboard.platform.errors import FieldViolation, InvalidArgument
from switchboard.platform.security.policy import Principal
from switchboard.platform.values.names import checked_etag
from switchboard.platform.values.resources import ConversationName


class Branches(Domain):
    def __init__(self, common: Common, store: BranchStore) -> None:
        super().__init__(common)
        self._store = store

    @write
    async def create(
        self, principal: Principal, request: pb.CreateBranchRequest
    ) -> pb.CreateBranchResponse:
        conversation = ConversationName.parse(request.conversation, "conversation")
        after = message_in(conversation, request.after, "after").message if request.after else ""
        staged = self.common.staged(
            lambda done: [
                conversation_event(principal, events_pb2.CHANGE_KIND_UPDATED, done.conversation)
            ]
        )
        forked: Fork = await stored(
            self._store.create_branch(
                conversation.workspace,
                conversation.conversation,
                after,
                etag=checked_etag(request.etag, "etag"),
                max_branches=self.limits.max_branches,
                staged=staged,
            )
        )
        await self.common.announce(staged)
        return pb.CreateBranchResponse(
            conversation=conversation_proto(forked.conversation), branch=forked.number
        )

    @write
    async def switch(
        self, principal: Principal, request: pb.SwitchBranchRequest
    ) -> pb.Conversation:
        conversation = ConversationName.parse(request.conversation, "conversation")
        if bool(request.branch) == bool(request.message) or request.branch < 0:
            message = "set exactly one of branch (a positive number) and message"
            raise InvalidArgument(
                message,
                [FieldViolation("branch", message), FieldViolation("message", message)],
            )
        message_id = (
            message_in(conversation, request.message, "message").message if request.message else ""
        )

        def events(done: tuple[ConversationRecord, bool]) -> list[events_pb2.Event] | None:
            row, changed = done
            if not changed:
                return None  # already active
            return [conversation_event(principal, events_pb2.CHANGE_KIND_UPDATED, row)]

        staged = self.common.staged(events)
        etag = checked_etag(request.etag, "etag")
        row, _ = await stored(
            self._store.switch_branch(
                conversation.workspace,
                conversation.conversation,
                branch=request.branch,
                message_id=message_id,
                etag=etag,
                staged=staged,
            )
        )
        await self.common.announce(staged)
        return conversation_proto(row)
