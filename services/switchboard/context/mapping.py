"""The context service's records as the contract shows them, and its resource names.

Every ``pb`` resource the domain answers with or puts in an event is built
here from the plain records the stores return (``records.py``).
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from google.protobuf import struct_pb2, timestamp_pb2

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.records import (
    ConversationRecord,
    Kind,
    MemberRecord,
    MemoryRecord,
    MemoryVersionRecord,
    MessageRecord,
    WorkspaceRecord,
)
from switchboard.platform.security.policy import Role
from switchboard.platform.values.names import etag_of
from switchboard.platform.values.resources import (
    ConversationName,
    MemberName,
    MemoryName,
    MemoryScope,
    MessageName,
    UserName,
    WorkspaceName,
    parse_memory_scope,
)

ROLES: Final[dict[pb.WorkspaceRole.ValueType, Role]] = {
    pb.WORKSPACE_ROLE_VIEWER: Role.VIEWER,
    pb.WORKSPACE_ROLE_EDITOR: Role.EDITOR,
    pb.WORKSPACE_ROLE_OWNER: Role.OWNER,
}
_ROLE_PROTOS: Final = {role.name.lower(): value for value, role in ROLES.items()}
MESSAGE_ROLES: Final = {
    pb.MESSAGE_ROLE_USER: "user",
    pb.MESSAGE_ROLE_ASSISTANT: "assistant",
    pb.MESSAGE_ROLE_SYSTEM: "system",
    pb.MESSAGE_ROLE_TOOL: "tool",
}
KINDS: Final[dict[pb.MemoryKind.ValueType, str]] = {
    pb.MEMORY_KIND_FACT: "fact",
    pb.MEMORY_KIND_PREFERENCE: "preference",
    pb.MEMORY_KIND_SUMMARY: "summary",
    pb.MEMORY_KIND_ENTITY: "entity",
    pb.MEMORY_KIND_NOTE: "note",
    pb.MEMORY_KIND_PLAN: "plan",
}
_KIND_PROTOS: Final = {name: value for value, name in KINDS.items()}


def resource_name(kind: Kind, ids: tuple[str, ...]) -> str:
    """The name of the resource a store refusal names by kind and ids."""
    if kind == "workspace":
        return str(WorkspaceName(*ids))
    if kind == "user":
        return str(UserName(*ids))
    if kind == "member":
        return str(MemberName(*ids))
    if kind == "conversation":
        return str(ConversationName(*ids))
    if kind == "message":
        return str(MessageName(*ids))
    if kind == "memory":
        scope, memory_id = ids  # the scope as the domain passed it in: a name it parsed
        return str(MemoryName(parse_memory_scope(scope, "name"), memory_id))
    return ids[0]  # a scope is stored as its name


def memory_name(row: MemoryRecord) -> MemoryName:
    """The memory item's name, its scope from its owner columns (``row.scope`` is that
    scope's name)."""
    scope: MemoryScope
    if row.user_id is not None:
        scope = UserName(row.user_id)
    elif row.conversation_id is not None:
        scope = ConversationName(row.workspace_id or "", row.conversation_id)
    else:
        scope = WorkspaceName(row.workspace_id or "")
    return MemoryName(scope, row.id)


def timestamp(when: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if when is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def struct(data: bytes) -> struct_pb2.Struct | None:
    if not data:
        return None
    value = struct_pb2.Struct()
    value.ParseFromString(data)
    return value


def workspace_proto(row: WorkspaceRecord, role: str | None = None) -> pb.Workspace:
    return pb.Workspace(
        name=str(WorkspaceName(row.id)),
        display_name=row.display_name,
        description=row.description,
        create_time=timestamp(row.created_at),
        update_time=timestamp(row.updated_at),
        delete_time=timestamp(row.deleted_at),
        etag=etag_of(row.version),
        caller_role=_ROLE_PROTOS.get(role or "", pb.WORKSPACE_ROLE_UNSPECIFIED),
        memory_policy=(
            pb.MemoryPolicy.FromString(row.memory_policy) if row.memory_policy else None
        ),
    )


def member_proto(row: MemberRecord) -> pb.WorkspaceMember:
    return pb.WorkspaceMember(
        name=str(MemberName(row.workspace_id, row.user_id)),
        user=str(UserName(row.user_id)),
        role=_ROLE_PROTOS[row.role],
        create_time=timestamp(row.created_at),
        update_time=timestamp(row.updated_at or row.created_at),
    )


def conversation_proto(row: ConversationRecord) -> pb.Conversation:
    return pb.Conversation(
        name=str(ConversationName(row.workspace_id, row.id)),
        title=row.title,
        metadata=struct(row.meta),
        archived=row.archived,
        creator=row.creator,
        create_time=timestamp(row.created_at),
        update_time=timestamp(row.updated_at),
        delete_time=timestamp(row.deleted_at),
        etag=etag_of(row.version),
        message_count=row.message_count,
        version=row.version,
        active_branch=row.active_branch,
        branch_count=row.branch_count,
        forked_from=(
            str(MessageName(row.workspace_id, row.base_conversation_id, row.base_message_id))
            if row.base_conversation_id
            else ""
        ),
    )


def message_proto(row: MessageRecord, workspace_id: str) -> pb.Message:
    message = pb.Message()
    message.ParseFromString(row.data)
    message.archived = row.archived
    message.branch = row.branch
    if row.summary_id:
        conversation = ConversationName(workspace_id, row.conversation_id)
        message.summary = str(MemoryName(conversation, row.summary_id))
    return message


def memory_proto(row: MemoryRecord) -> pb.MemoryItem:
    return pb.MemoryItem(
        name=str(memory_name(row)),
        kind=_KIND_PROTOS.get(row.kind, pb.MEMORY_KIND_UNSPECIFIED),
        content=row.content,
        pinned=row.pinned,
        source_messages=row.sources.split(),
        metadata=struct(row.meta),
        create_time=timestamp(row.created_at),
        expire_time=timestamp(row.expires_at),
        creator=row.creator,
        token_count=row.token_count,
        etag=etag_of(row.version),
        update_time=timestamp(row.updated_at),
        valid_time=timestamp(row.valid_from or row.created_at),
        invalid_time=timestamp(row.valid_until),
        supersedes=_sibling(row, row.supersedes),
        superseded_by=_sibling(row, row.superseded_by),
        confidence=row.confidence_milli / 1000,
        formation=_formation(row.formation),
        invalid_reason=row.invalid_reason,
        workspace=str(WorkspaceName(row.origin_workspace_id)) if row.origin_workspace_id else "",
        version=row.version,
    )


def _sibling(row: MemoryRecord, memory_id: str) -> str:
    """The name of another item of ``row``'s scope ("" for none)."""
    return f"{row.scope}/memories/{memory_id}" if memory_id else ""


def _formation(data: bytes) -> pb.MemoryFormation | None:
    return pb.MemoryFormation.FromString(data) if data else None


_CHANGE_PROTOS: Final = {
    "created": pb.MEMORY_CHANGE_CREATED,
    "edited": pb.MEMORY_CHANGE_EDITED,
    "retired": pb.MEMORY_CHANGE_RETIRED,
}


def memory_version_proto(scope: str, row: MemoryVersionRecord) -> pb.MemoryItemVersion:
    return pb.MemoryItemVersion(
        memory_item=f"{scope}/memories/{row.memory_id}",
        version=row.version,
        change=_CHANGE_PROTOS.get(row.change, pb.MEMORY_CHANGE_UNSPECIFIED),
        content=row.content,
        change_time=timestamp(row.changed_at),
        editor=row.editor,
        valid_time=timestamp(row.valid_from),
        invalid_time=timestamp(row.valid_until),
        invalid_reason=row.invalid_reason,
    )
