"""Messages: validation (tool calls and results too), limits, files, entity memory, events.

File parts become stored files of the workspace before the message is stored
(``attachments.py``), and the message's token count includes their text.

An append stores the message, counts it into its conversation and remembers
the entities its text mentions, in one transaction; a conversation over its
automatic pruning limit is then pruned in the background (``pruning/pruner.py``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from google.protobuf import struct_pb2
from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.common import (
    Common,
    Domain,
    check_branch,
    conversation_event,
    event,
    memory_event,
    message_in,
    metadata_bytes,
    request_key,
    stored,
    write,
)
from switchboard.context.files.mapping import file_event
from switchboard.context.mapping import MESSAGE_ROLES, conversation_proto, message_proto
from switchboard.context.messages.attachments import (
    Attached,
    Attachments,
    check_inline_sizes,
    check_references,
    file_parts,
)
from switchboard.context.messages.store import (
    Appended,
    Deleted,
    EntityRecord,
    Listed,
    MessageStore,
    NewMessage,
)
from switchboard.context.records import ConversationRecord, MessageRecord, Missing
from switchboard.context.text.entities import EntityExtractor
from switchboard.context.windows.documents import measure
from switchboard.platform.errors import (
    FailedPrecondition,
    PermissionDenied,
    RequestTooLarge,
    Violations,
)
from switchboard.platform.security.policy import Principal, Role
from switchboard.platform.store import pagination
from switchboard.platform.values.names import new_id
from switchboard.platform.values.resources import (
    ConversationName,
    FileName,
    MessageName,
    ToolName,
    WorkspaceName,
)
from switchboard.shared.parttext import render_parts

_T = TypeVar("_T")

#: A tool call's id, as models and the dispatcher make them.
_TOOL_CALL_ID: Final = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: A function name as chat APIs accept it.
_FUNCTION_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_OUTCOMES: Final = ("succeeded", "error", "failed", "denied")


class _ToolParts:
    """Checks the ``tool_call`` and ``tool_result`` parts of one appended message."""

    def __init__(
        self, role: pb.MessageRole.ValueType, workspace_id: str, violations: Violations
    ) -> None:
        self._role = role
        self._workspace_id = workspace_id
        self._violations = violations
        # (kind, id) to the part that used it first: ids pair calls with
        # results, so one message repeating an id would be ambiguous.
        self._seen: dict[tuple[str, str], int] = {}
        self.results = 0

    def check(self, index: int, part: pb.ContentPart) -> None:
        kind = part.WhichOneof("part")
        field = f"message.parts[{index}].{kind}"
        if kind == "tool_call":
            call = part.tool_call
            self._placed(field, pb.MESSAGE_ROLE_ASSISTANT)
            self._id(field, kind, index, call.id)
            self._tool(field, call.tool)
            if not call.function_name:
                if not call.tool:
                    self._violations.add(f"{field}.function_name", "is required when tool is empty")
            elif _FUNCTION_NAME.fullmatch(call.function_name) is None:
                self._violations.add(
                    f"{field}.function_name", "must be at most 64 letters, digits, '_' or '-'"
                )
        elif kind == "tool_result":
            result = part.tool_result
            self.results += 1
            self._placed(field, pb.MESSAGE_ROLE_TOOL)
            self._id(field, kind, index, result.id)
            self._tool(field, result.tool)
            if result.outcome not in TOOL_OUTCOMES:
                self._violations.add(
                    f"{field}.outcome",
                    f"must be one of {', '.join(TOOL_OUTCOMES)}"
                    if result.outcome
                    else "is required",
                )

    def _placed(self, field: str, wanted: pb.MessageRole.ValueType) -> None:
        # An unknown role is reported on message.role already.
        if self._role in MESSAGE_ROLES and self._role != wanted:
            self._violations.add(field, f"is only allowed in {MESSAGE_ROLES[wanted]} messages")

    def _id(self, field: str, kind: str, index: int, value: str) -> None:
        if not value:
            self._violations.add(f"{field}.id", "is required")
        elif _TOOL_CALL_ID.fullmatch(value) is None:
            self._violations.add(
                f"{field}.id", "must be 1-128 letters, digits, '_', '.', ':' or '-'"
            )
        elif (kind, value) in self._seen:
            first = self._seen[kind, value]
            self._violations.add(f"{field}.id", f"repeats message.parts[{first}].{kind}.id")
        else:
            self._seen[kind, value] = index

    def _tool(self, field: str, value: str) -> None:
        if not value:
            return
        tool = ToolName.parse_or_none(value)
        if tool is None:
            self._violations.add(
                f"{field}.tool", "must be a tool name, workspaces/{w}/integrations/{i}/tools/{tool}"
            )
        elif tool.workspace != self._workspace_id:
            self._violations.add(
                f"{field}.tool", f"must be a tool of {WorkspaceName(self._workspace_id)}"
            )


class Messages(Domain):
    def __init__(
        self,
        common: Common,
        store: MessageStore,
        *,
        extractor: EntityExtractor,
        appended: Callable[[ConversationRecord], None],
        attachments: Attachments | None = None,
    ) -> None:
        super().__init__(common)
        self._store = store
        self._extractor = extractor
        # Resolves file parts to stored files (None: a server without files).
        self._attachments = attachments
        # Told of every conversation an append grew (automatic pruning).
        self._appended = appended

    def _check(self, principal: Principal, message: pb.Message, workspace_id: str) -> str:
        """The author of ``message`` once every field is valid and within the limits."""
        violations = Violations()
        if message.role not in MESSAGE_ROLES:
            violations.add("message.role", "must be user, assistant, system or tool")
        if not message.parts:
            violations.add("message.parts", "needs at least one part")
        if len(message.parts) > self.limits.max_parts:
            violations.add("message.parts", f"has more than {self.limits.max_parts} parts")
        tools = _ToolParts(message.role, workspace_id, violations)
        for index, part in enumerate(message.parts):
            if part.WhichOneof("part") is None:
                violations.add(f"message.parts[{index}]", "is empty")
            tools.check(index, part)
        check_references(message.parts, violations)
        if message.role == pb.MESSAGE_ROLE_TOOL and message.parts and not tools.results:
            violations.add("message.parts", "needs a tool_result part in a tool message")
        author = message.author or principal.user_name
        if author != principal.user_name and not author.startswith("handlers/"):
            violations.add("message.author", "must be the caller or a handlers/ name")
        violations.check()
        size = self._stored_size(message)
        if size > self.limits.max_message_bytes:
            raise RequestTooLarge(
                f"message is {size} bytes; the limit is {self.limits.max_message_bytes}"
            )
        if message.HasField("metadata"):
            metadata_bytes(message.metadata, "message.metadata", self.limits.max_metadata_bytes)
        for index, part in enumerate(message.parts):
            if part.HasField("tool_call"):
                # Arguments are client data like metadata, and bounded the same way.
                metadata_bytes(
                    part.tool_call.arguments,
                    f"message.parts[{index}].tool_call.arguments",
                    self.limits.max_metadata_bytes,
                )
        return author

    @write
    async def append(self, principal: Principal, request: pb.AppendMessageRequest) -> pb.Message:
        message, _ = await self._appending(principal, request, _nothing)
        return message

    @write
    async def append_with(
        self,
        principal: Principal,
        request: pb.AppendMessageRequest,
        after: Callable[[Session, pb.Message], _T],
        *,
        message_id: str = "",
    ) -> tuple[pb.Message, _T]:
        """``append``, and ``after`` with the stored message in the same transaction:
        a write the message starts (the dispatcher's run) or ends (its end, with the
        answer) commits with it or not at all, and the two cost one transaction.
        ``after`` is synchronous ORM code on the same database; a refusal it raises
        leaves nothing stored. ``message_id``: the new message's id, chosen by the
        caller (a run's end names its answer before the two are written); a replay
        answers with the first attempt's message, under its own name."""
        return await self._appending(principal, request, after, message_id)

    async def _appending(
        self,
        principal: Principal,
        request: pb.AppendMessageRequest,
        after: Callable[[Session, pb.Message], _T],
        message_id: str = "",
    ) -> tuple[pb.Message, _T]:
        workspace_id = ConversationName.parse(request.parent, "parent").workspace
        message = request.message
        author = self._check(principal, message, workspace_id)
        stored_message = pb.Message(
            role=message.role,
            author=author,
            parts=message.parts,
            metadata=message.metadata if message.HasField("metadata") else None,
            run=message.run,
        )
        attached = Attached()
        if any(True for _ in file_parts(stored_message.parts)):
            if self._attachments is None:
                raise FailedPrecondition("this server stores no files: file parts are refused")
            attached = await self._attachments.attach(
                principal, author, workspace_id, stored_message.parts
            )
        try:
            return await self._append(
                principal, request, stored_message, attached, after, message_id
            )
        except BaseException:
            if self._attachments is not None:
                await self._attachments.discard(attached)
            raise

    async def _append(
        self,
        principal: Principal,
        request: pb.AppendMessageRequest,
        stored_message: pb.Message,
        attached: Attached,
        after: Callable[[Session, pb.Message], _T],
        message_id: str = "",
    ) -> tuple[pb.Message, _T]:
        conversation = ConversationName.parse(request.parent, "parent")
        workspace_id, conversation_id = conversation.workspace, conversation.conversation
        message = request.message
        stored_message.token_count = await self._tokens(stored_message.parts, attached)
        message_id = message_id or new_id()
        stored_message.name = str(MessageName(workspace_id, conversation_id, message_id))

        def encode(seq: int, when: dt.datetime, branch: int) -> bytes:
            stored_message.sequence = seq
            stored_message.create_time.FromDatetime(when)
            stored_message.branch = branch
            return stored_message.SerializeToString()

        new = NewMessage(
            id=message_id,
            name=stored_message.name,
            scope=request.parent,
            role=MESSAGE_ROLES[message.role],
            tokens=stored_message.token_count,
            encode=encode,
            # Text parts only: tool arguments and outputs are machine text (and
            # outputs come from outside), not entities a person mentioned.
            entities=self._entities(render_parts(p for p in message.parts if p.HasField("text"))),
            entity_creator="system",
            # Searchable by its words from the moment it is stored, as the indexer
            # would read it (whatever the semantic index's state).
            words=render_parts(stored_message.parts),
            branch=request.branch,
            replaces=await self._replaced(principal, request),
            max_branches=self.limits.max_branches,
            owned_files=[FileName.parse(name, "file").file for name in attached.stored],
            author=stored_message.author,
        )
        key = request_key(principal, "AppendMessage", request)
        staged = self.common.staged(
            lambda done: _events(principal, workspace_id, request.parent, done),
            key.key if key else "",
        )

        def message_of(appended: Appended) -> pb.Message:
            if appended.replayed:
                # The first attempt's message.
                return message_proto(appended.message, workspace_id)
            return staged.events[0].message_created.message

        appended, result = await stored(
            self._store.append_message_with(
                workspace_id,
                conversation_id,
                new,
                lambda db, appended: after(db, message_of(appended)),
                max_memory_per_scope=self.limits.max_memory_items,
                idempotency=key,
                staged=staged,
            )
        )
        # A replay publishes what its first attempt left in the outbox, if anything.
        await self.common.announce(staged)
        if appended.replayed:
            # The first attempt's message names its own files; this one's are unused.
            if self._attachments is not None:
                await self._attachments.discard(attached)
        else:
            self._appended(appended.conversation)
        return message_of(appended), result

    async def _replaced(self, principal: Principal, request: pb.AppendMessageRequest) -> str:
        """The id of the message ``request`` is a new version of ("" : none), once it
        is known to be one the caller may replace: a message of the conversation, of
        the same role, and for a person's message, their own."""
        if not request.replaces:
            return ""
        conversation = ConversationName.parse(request.parent, "parent")
        replaced = message_in(conversation, request.replaces, "replaces")
        old = await self.get(request.replaces)
        if old.role != request.message.role:
            raise FailedPrecondition(
                f"replaces: the message is a {MESSAGE_ROLES.get(old.role, 'message')} message; "
                f"its new version must be one too"
            )
        if old.role == pb.MESSAGE_ROLE_USER and old.author != principal.user_name:
            raise PermissionDenied("only its author may edit a person's message")
        return replaced.message

    def _stored_size(self, message: pb.Message) -> int:
        """The serialized size of ``message`` as stored: inline bytes become files
        (within their own limit), so the message's limit is for the rest."""
        if not any(reference.inline_data for _, reference in file_parts(message.parts)):
            return message.ByteSize()
        check_inline_sizes(
            message.parts, self._attachments.max_inline_bytes if self._attachments else 0
        )
        stored = pb.Message()
        stored.CopyFrom(message)
        for _, reference in file_parts(stored.parts):
            reference.ClearField("inline_data")
        return stored.ByteSize()

    async def _tokens(self, parts: Sequence[pb.ContentPart], attached: Attached) -> int:
        """The message's tokens, its files' text included, as a window counts them
        (``documents.measure``)."""
        texts: dict[str, tuple[str, int]] = {}
        if attached.named and self._attachments is not None:
            texts = await self._attachments.files.texts(attached.named)
        return measure(self.common.counter, parts, texts, self.limits.image_tokens).tokens

    def _entities(self, text: str) -> list[EntityRecord]:
        if not text:
            return []
        records = []
        for entity in self._extractor.extract(text):
            meta = struct_pb2.Struct()
            meta.update({"entity_kind": entity.kind, "value": entity.value, "text": entity.text})
            content = f"{entity.kind}: {entity.value}"
            records.append(
                EntityRecord(
                    content=content,
                    meta=meta.SerializeToString(deterministic=True),
                    tokens=self.common.counter.count(content),
                )
            )
        return records

    @write
    async def delete(
        self, principal: Principal, role: Role | None, request: pb.DeleteMessageRequest
    ) -> pb.DeleteMessageResponse:
        """Delete a message (and, with ``with_later``, the later ones on the branch).
        Editors delete answers and their own messages; another person's needs an owner."""
        name = MessageName.parse(request.name, "name")
        violations = Violations()
        check_branch(request.branch, violations)
        violations.check()

        def may_delete(record: MessageRecord) -> None:
            if role == Role.OWNER or record.role != "user":
                return
            author = message_proto(record, name.workspace).author
            if author != principal.user_name:
                raise PermissionDenied(
                    "deleting another person's message needs the owner role in the workspace"
                )

        conversation = str(name.parent)
        staged = self.common.staged(
            lambda done: _deleted_events(principal, name.workspace, conversation, done)
        )
        done: Deleted = await stored(
            self._store.delete_messages(
                name.workspace,
                name.conversation,
                name.message,
                with_later=request.with_later,
                branch=request.branch,
                may_delete=may_delete,
                staged=staged,
            )
        )
        await self.common.announce(staged)
        return pb.DeleteMessageResponse(
            deleted=[
                str(MessageName(name.workspace, name.conversation, record.id))
                for record in done.messages
            ],
            conversation=conversation_proto(done.conversation),
        )

    async def erase(
        self, workspace_id: str, conversation_id: str, message_id: str
    ) -> list[str] | None:
        """Delete one message for an erasure (docs/privacy.md), the service acting on its
        own: only that message, wherever it is. The ids of the files it owned (marked
        deleted); None if it or its conversation is gone."""
        conversation = str(ConversationName(workspace_id, conversation_id))
        staged = self.common.staged(
            lambda done: _deleted_events(None, workspace_id, conversation, done)
        )
        try:
            done = await self._store.delete_messages(
                workspace_id,
                conversation_id,
                message_id,
                with_later=False,
                branch=0,
                may_delete=lambda record: None,
                staged=staged,
                redact=False,  # the erasure's last part redacts the log
            )
        except Missing:
            return None  # gone, or its conversation is deleted (the caller purges those)
        await self.common.announce(staged)
        return [file.id for file in done.files]

    async def get(self, name: str) -> pb.Message:
        message = MessageName.parse(name, "name")
        listed = await stored(
            self._store.get_message(message.workspace, message.conversation, message.message)
        )
        return _with_siblings(listed, message.workspace)[0]

    async def list(self, request: pb.ListMessagesRequest) -> pb.ListMessagesResponse:
        conversation = ConversationName.parse(request.parent, "parent")
        violations = Violations()
        check_branch(request.branch, violations)
        violations.check()
        pages = self.common.pages
        size = pagination.page_size(request.page_size, default=50, maximum=500)
        token = pagination.fingerprint(
            "messages",
            request.parent,
            request.show_archived,
            request.newest_first,
            *((request.branch,) if request.branch else ()),
        )
        after, branch = None, request.branch
        if request.page_token:
            # The branch the first page read: a switch meanwhile does not move the pages.
            values = pages.decode(request.page_token, token, (pagination.COUNT, pagination.COUNT))
            after, branch = int(values[0]), int(values[1])
        listed = await stored(
            self._store.list_messages(
                conversation.workspace,
                conversation.conversation,
                after,
                size + 1,
                show_archived=request.show_archived,
                newest_first=request.newest_first,
                branch=branch,
            )
        )
        rows = listed.messages
        response = pb.ListMessagesResponse(
            messages=_with_siblings(listed, conversation.workspace, size), branch=listed.branch
        )
        if len(rows) > size:
            response.next_page_token = pages.encode([rows[size - 1].seq, listed.branch], token)
        return response


def _with_siblings(listed: Listed, workspace_id: str, size: int | None = None) -> list[pb.Message]:
    """The messages read, each with its versions when it has more than one (a message
    with none other reads as it was appended)."""
    messages = []
    for row in listed.messages[:size]:
        message = message_proto(row, workspace_id)
        ids = listed.siblings.get(row.id, [])
        if len(ids) > 1 and row.id in ids:
            message.siblings.extend(
                str(MessageName(workspace_id, row.conversation_id, sibling)) for sibling in ids
            )
            message.sibling_position = ids.index(row.id) + 1
        messages.append(message)
    return messages


def _events(
    principal: Principal, workspace_id: str, conversation: str, done: Appended
) -> list[events_pb2.Event] | None:
    """An append's events: the message, then the entity memory it created or cited."""
    if done.replayed:
        return None
    created = event(
        principal,
        events_pb2.EVENT_TYPE_MESSAGE_CREATED,
        workspace=str(WorkspaceName(workspace_id)),
        conversation=conversation,
        field="message_created",
        payload=events_pb2.MessageCreated(message=message_proto(done.message, workspace_id)),
    )
    return [
        created,
        # A new version started a branch, now the active one.
        *(
            (conversation_event(principal, events_pb2.CHANGE_KIND_UPDATED, done.conversation),)
            if done.forked
            else ()
        ),
        *(
            memory_event(principal, events_pb2.CHANGE_KIND_CREATED, row)
            for row in done.created_memory
        ),
        *(
            memory_event(principal, events_pb2.CHANGE_KIND_UPDATED, row)
            for row in done.updated_memory
        ),
    ]


def _deleted_events(
    principal: Principal | None, workspace_id: str, conversation: str, done: Deleted
) -> list[events_pb2.Event]:
    """A deletion's events: a tombstone per message (where it was, never what it
    said), the entity memory it changed, and the conversation after it."""
    workspace = str(WorkspaceName(workspace_id))
    tombstones = [
        event(
            principal,
            events_pb2.EVENT_TYPE_MESSAGE_DELETED,
            workspace=workspace,
            conversation=conversation,
            field="message_deleted",
            payload=events_pb2.MessageDeleted(
                message=str(MessageName(workspace_id, record.conversation_id, record.id)),
                sequence=record.seq,
                branch=record.branch,
            ),
        )
        for record in done.messages
    ]
    return [
        *tombstones,
        *(
            memory_event(principal, events_pb2.CHANGE_KIND_DELETED, row)
            for row in done.deleted_memory
        ),
        *(
            memory_event(principal, events_pb2.CHANGE_KIND_UPDATED, row)
            for row in done.updated_memory
        ),
        *(
            file_event(
                events_pb2.Actor(name=principal.user_name if principal else "system"),
                events_pb2.CHANGE_KIND_DELETED,
                row,
            )
            for row in done.files
        ),
        conversation_event(principal, events_pb2.CHANGE_KIND_UPDATED, done.conversation),
    ]


def _nothing(db: Session, message: pb.Message) -> None:
    """A plain append's: nothing written beside the message."""
