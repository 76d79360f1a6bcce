"""Helpers for ContextService tests: callers, a populated workspace, builders, events."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import grpc
from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.api.events.v1 import events_pb2
from tests.service.authkit import bearer, detail, quick_user

# Only the type stubs know the async stub class; at run time it is ContextServiceStub.
Stub: TypeAlias = "context_pb2_grpc.ContextServiceAsyncStub"
Metadata = tuple[tuple[str, str], ...]

TIMEOUT_S = 20.0


def context_stub(channel: aio.Channel) -> Stub:
    return context_pb2_grpc.ContextServiceStub(channel)


class Signed(Protocol):
    """Whatever carries a caller's credential (this kit's Caller, windowkit's)."""

    @property
    def md(self) -> Metadata: ...


@dataclass(frozen=True)
class Caller:
    """A signed-in user: id, access token, and the metadata that carries it."""

    id: str
    token: str

    @property
    def name(self) -> str:
        return f"users/{self.id}"

    @property
    def md(self) -> Metadata:
        return bearer(self.token)


async def new_caller(mesh: Any) -> Caller:
    user_id, token = await quick_user(mesh)
    return Caller(user_id, token)


@dataclass(frozen=True)
class World:
    """A workspace with one member of each role, and a user who is not a member."""

    workspace: pb.Workspace
    owner: Caller
    editor: Caller
    viewer: Caller
    outsider: Caller

    @property
    def name(self) -> str:
        return self.workspace.name

    @property
    def id(self) -> str:
        return self.workspace.name.removeprefix("workspaces/")


# -- workspaces and members ---------------------------------------------------------------


async def create_workspace(
    stub: Stub,
    caller: Signed,
    display_name: str = "Test workspace",
    *,
    workspace_id: str = "",
    description: str = "",
    request_id: str = "",
) -> pb.Workspace:
    response = await stub.CreateWorkspace(
        pb.CreateWorkspaceRequest(
            workspace=pb.Workspace(display_name=display_name, description=description),
            workspace_id=workspace_id,
            request_id=request_id,
        ),
        metadata=caller.md,
        timeout=TIMEOUT_S,
    )
    return response.workspace


async def add_member(
    stub: Stub,
    owner: Caller,
    workspace: str,
    user: Caller,
    role: pb.WorkspaceRole.ValueType,
) -> pb.WorkspaceMember:
    response = await stub.AddWorkspaceMember(
        pb.AddWorkspaceMemberRequest(parent=workspace, user=user.name, role=role),
        metadata=owner.md,
        timeout=TIMEOUT_S,
    )
    return response.member


async def ctx_world(mesh: Any, stub: Stub, display_name: str = "World") -> World:
    """A workspace created over the RPCs: its owner, an editor, a viewer, an outsider."""
    owner, editor, viewer, outsider = [await new_caller(mesh) for _ in range(4)]
    workspace = await create_workspace(stub, owner, display_name)
    await add_member(stub, owner, workspace.name, editor, pb.WORKSPACE_ROLE_EDITOR)
    await add_member(stub, owner, workspace.name, viewer, pb.WORKSPACE_ROLE_VIEWER)
    return World(workspace, owner, editor, viewer, outsider)


async def get_workspace(stub: Stub, caller: Signed, name: str) -> pb.Workspace:
    response = await stub.GetWorkspace(
        pb.GetWorkspaceRequest(name=name), metadata=caller.md, timeout=TIMEOUT_S
    )
    return response.workspace


def member_name(workspace: str, user: Caller) -> str:
    return f"{workspace}/members/{user.id}"


# -- conversations and messages -------------------------------------------------------------


def struct(**values: Any) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(values)
    return value


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def create_conversation(
    stub: Stub,
    caller: Signed,
    parent: str,
    title: str = "A conversation",
    *,
    metadata: struct_pb2.Struct | None = None,
    request_id: str = "",
) -> pb.Conversation:
    response = await stub.CreateConversation(
        pb.CreateConversationRequest(
            parent=parent,
            conversation=pb.Conversation(title=title, metadata=metadata),
            request_id=request_id,
        ),
        metadata=caller.md,
        timeout=TIMEOUT_S,
    )
    return response.conversation


async def get_conversation(stub: Stub, caller: Signed, name: str) -> pb.Conversation:
    response = await stub.GetConversation(
        pb.GetConversationRequest(name=name), metadata=caller.md, timeout=TIMEOUT_S
    )
    return response.conversation


def text_message(
    *texts: str,
    role: pb.MessageRole.ValueType = pb.MESSAGE_ROLE_USER,
    author: str = "",
) -> pb.Message:
    return pb.Message(role=role, author=author, parts=[pb.ContentPart(text=text) for text in texts])


async def append(
    stub: Stub,
    caller: Signed,
    conversation: str,
    *texts: str,
    request_id: str = "",
    message: pb.Message | None = None,
) -> pb.Message:
    response = await stub.AppendMessage(
        pb.AppendMessageRequest(
            parent=conversation,
            message=message if message is not None else text_message(*texts),
            request_id=request_id,
        ),
        metadata=caller.md,
        timeout=TIMEOUT_S,
    )
    return response.message


async def all_messages(
    stub: Stub,
    caller: Signed,
    conversation: str,
    *,
    page_size: int = 100,
    newest_first: bool = False,
    show_archived: bool = False,
) -> list[pb.Message]:
    """Every message, page after page."""
    found: list[pb.Message] = []
    token = ""
    while True:
        page = await stub.ListMessages(
            pb.ListMessagesRequest(
                parent=conversation,
                page_size=page_size,
                page_token=token,
                newest_first=newest_first,
                show_archived=show_archived,
            ),
            metadata=caller.md,
            timeout=TIMEOUT_S,
        )
        found.extend(page.messages)
        token = page.next_page_token
        if not token:
            return found


# -- memory ---------------------------------------------------------------------------------


def timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def from_now(**delta: float) -> timestamp_pb2.Timestamp:
    return timestamp(dt.datetime.now(dt.UTC) + dt.timedelta(**delta))


def memory_item(
    content: str,
    kind: pb.MemoryKind.ValueType = pb.MEMORY_KIND_FACT,
    *,
    pinned: bool = False,
    expire_time: timestamp_pb2.Timestamp | None = None,
    metadata: struct_pb2.Struct | None = None,
) -> pb.MemoryItem:
    return pb.MemoryItem(
        kind=kind, content=content, pinned=pinned, expire_time=expire_time, metadata=metadata
    )


async def remember(
    stub: Stub,
    caller: Signed,
    parent: str,
    content: str,
    kind: pb.MemoryKind.ValueType = pb.MEMORY_KIND_FACT,
    *,
    pinned: bool = False,
    expire_time: timestamp_pb2.Timestamp | None = None,
) -> pb.MemoryItem:
    response = await stub.CreateMemoryItem(
        pb.CreateMemoryItemRequest(
            parent=parent,
            memory_item=memory_item(content, kind, pinned=pinned, expire_time=expire_time),
        ),
        metadata=caller.md,
        timeout=TIMEOUT_S,
    )
    return response.memory_item


async def search(
    stub: Stub,
    caller: Signed,
    parent: str,
    query: str,
    *kinds: pb.MemoryKind.ValueType,
    page_size: int = 0,
) -> list[pb.ScoredMemoryItem]:
    response = await stub.SearchMemoryItems(
        pb.SearchMemoryItemsRequest(
            parent=parent, query=query, kinds=list(kinds), page_size=page_size
        ),
        metadata=caller.md,
        timeout=TIMEOUT_S,
    )
    return list(response.results)


# -- errors ---------------------------------------------------------------------------------


async def refused(call: Awaitable[Any], code: grpc.StatusCode) -> aio.AioRpcError:
    """Await ``call``, which must fail with ``code``; returns the error."""
    try:
        await call
    except aio.AioRpcError as exc:
        error = exc
    else:
        raise AssertionError(f"expected {code.name}, but the call succeeded")
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    return error


def violations(error: aio.AioRpcError) -> list[str]:
    """The fields named by the error's BadRequest, in order."""
    bad: error_details_pb2.BadRequest = detail(error, error_details_pb2.BadRequest)
    return [violation.field for violation in bad.field_violations]


# -- events ---------------------------------------------------------------------------------


class EventTap:
    """Every event the mesh's bus delivers while attached.

    The embedded log delivers to listeners before ``publish`` returns, and the
    context service publishes before its RPC returns, so an RPC's events are
    here once the call has returned.
    """

    def __init__(self, mesh: Any) -> None:
        self.events: list[events_pb2.Event] = []
        self._stop = mesh.deps.bus.listen(self.events.append)

    def take(self) -> list[events_pb2.Event]:
        """The events seen since the previous take()."""
        taken, self.events[:] = list(self.events), []
        return taken

    def close(self) -> None:
        self._stop()


@contextmanager
def tap(mesh: Any) -> Iterator[EventTap]:
    recorder = EventTap(mesh)
    try:
        yield recorder
    finally:
        recorder.close()


def payload_name(event: events_pb2.Event) -> str:
    """The resource name the event's payload carries."""
    kind = event.WhichOneof("payload")
    if kind == "workspace_changed":
        return event.workspace_changed.workspace.name
    if kind == "member_changed":
        return event.member_changed.member.name
    if kind == "conversation_changed":
        return event.conversation_changed.conversation.name
    if kind == "message_created":
        return event.message_created.message.name
    if kind == "memory_changed":
        return event.memory_changed.memory_item.name
    raise AssertionError(f"unexpected payload {kind!r}")


def change_of(event: events_pb2.Event) -> int:
    """The ChangeKind of the payload (CHANGE_KIND_CREATED for MESSAGE_CREATED)."""
    kind = event.WhichOneof("payload")
    if kind == "message_created":
        return events_pb2.CHANGE_KIND_CREATED
    value: int = getattr(event, str(kind)).change
    return value


def summary(event: events_pb2.Event) -> tuple[int, int, str]:
    """(type, change, payload resource name): what a write's event must say."""
    return event.type, change_of(event), payload_name(event)
