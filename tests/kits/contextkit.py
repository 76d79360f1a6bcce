"""Helpers for ContextService tests: callers, a populated workspace, a caller's chat,
builders, windows and pruning with the invariants every window must satisfy, events.

Every helper that calls an RPC takes the stub, the caller and the resource it acts on,
in that order."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc import aio
from sqlalchemy import update

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.api.events.v1 import events_pb2
from switchboard.platform.store.models import MemoryItemRow
from tests.conftest import CALL_DEADLINE_S
from tests.kits.authkit import bearer, detail, quick_user

# Only the type stubs know the async stub class; at run time it is ContextServiceStub.
Stub: TypeAlias = "context_pb2_grpc.ContextServiceAsyncStub"
Metadata = tuple[tuple[str, str], ...]

_serial = itertools.count()
_Q = TypeVar("_Q")
_R = TypeVar("_R")
_T = TypeVar("_T")


def context_stub(channel: aio.Channel) -> Stub:
    return context_pb2_grpc.ContextServiceStub(channel)


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


def rpc(
    method: aio.UnaryUnaryMultiCallable[_Q, _R], request: _Q, caller: Caller
) -> aio.UnaryUnaryCall[_Q, _R]:
    """``method(request)`` as ``caller``, within the time every call here is given."""
    return method(request, metadata=caller.md, timeout=CALL_DEADLINE_S)


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


_P = TypeVar("_P", bound=_Page)


async def paged(
    fetch: Callable[[str], Awaitable[_P]], items: Callable[[_P], Iterable[_T]]
) -> tuple[list[list[_T]], list[str]]:
    """Every page of a listing (``fetch`` takes the page token), and the tokens that
    led from one page to the next."""
    pages: list[list[_T]] = []
    tokens: list[str] = []
    token = ""
    while True:
        page = await fetch(token)
        pages.append(list(items(page)))
        token = page.next_page_token
        if not token:
            break
        tokens.append(token)
    return pages, tokens


async def every(
    fetch: Callable[[str], Awaitable[_P]], items: Callable[[_P], Iterable[_T]]
) -> list[_T]:
    """What a listing holds, across all its pages."""
    pages, _tokens = await paged(fetch, items)
    return [item for page in pages for item in page]


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
    caller: Caller,
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
        timeout=CALL_DEADLINE_S,
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
        timeout=CALL_DEADLINE_S,
    )
    return response.member


async def ctx_world(mesh: Any, stub: Stub, display_name: str = "World") -> World:
    """A workspace created over the RPCs: its owner, an editor, a viewer, an outsider."""
    owner, editor, viewer, outsider = [await new_caller(mesh) for _ in range(4)]
    workspace = await create_workspace(stub, owner, display_name)
    await add_member(stub, owner, workspace.name, editor, pb.WORKSPACE_ROLE_EDITOR)
    await add_member(stub, owner, workspace.name, viewer, pb.WORKSPACE_ROLE_VIEWER)
    return World(workspace, owner, editor, viewer, outsider)


# A context test module's fixtures, bound there under the names its tests take:
#     stub, world, events = stub_fixture, world_fixture, events_fixture
# (pytest registers a module's fixture under the attribute's name.)
@pytest.fixture
def stub_fixture(channel: aio.Channel) -> Stub:
    return context_stub(channel)


@pytest.fixture
async def world_fixture(mesh: Any, stub: Stub) -> World:
    return await ctx_world(mesh, stub)


@pytest.fixture
def events_fixture(mesh: Any) -> Iterator[EventTap]:
    with tap(mesh) as recorder:
        yield recorder


async def get_workspace(stub: Stub, caller: Caller, name: str) -> pb.Workspace:
    response = await stub.GetWorkspace(
        pb.GetWorkspaceRequest(name=name), metadata=caller.md, timeout=CALL_DEADLINE_S
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
    caller: Caller,
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
        timeout=CALL_DEADLINE_S,
    )
    return response.conversation


async def get_conversation(stub: Stub, caller: Caller, name: str) -> pb.Conversation:
    response = await stub.GetConversation(
        pb.GetConversationRequest(name=name), metadata=caller.md, timeout=CALL_DEADLINE_S
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
    caller: Caller,
    conversation: str,
    *texts: str,
    role: pb.MessageRole.ValueType = pb.MESSAGE_ROLE_USER,
    request_id: str = "",
    message: pb.Message | None = None,
) -> pb.Message:
    response = await stub.AppendMessage(
        pb.AppendMessageRequest(
            parent=conversation,
            message=message if message is not None else text_message(*texts, role=role),
            request_id=request_id,
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.message


async def all_messages(
    stub: Stub,
    caller: Caller,
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
            timeout=CALL_DEADLINE_S,
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
    caller: Caller,
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
        timeout=CALL_DEADLINE_S,
    )
    return response.memory_item


async def get_memory_item(stub: Stub, caller: Caller, name: str) -> pb.MemoryItem:
    response = await stub.GetMemoryItem(
        pb.GetMemoryItemRequest(name=name), metadata=caller.md, timeout=CALL_DEADLINE_S
    )
    return response.memory_item


async def expire_in_database(mesh: Any, memory_name: str) -> None:
    """Move a memory item's expiry into the past, directly in the database.

    The API refuses an expire_time in the past, and waiting for a near-future
    one to pass would be a sleep used as synchronization; so the test writes
    the row the way the passing of time would have left it. Like time passing,
    this bumps no version: call it before any window of the conversation was
    built (and cached).
    """
    memory_id = memory_name.rsplit("/", 1)[1]
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    async with mesh.shared.database.sessions.begin() as db:
        result = await db.execute(
            update(MemoryItemRow).where(MemoryItemRow.id == memory_id).values(expires_at=past)
        )
        assert getattr(result, "rowcount", 1) == 1


async def search(
    stub: Stub,
    caller: Caller,
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
        timeout=CALL_DEADLINE_S,
    )
    return list(response.results)


# -- a caller's chat, windows and pruning -------------------------------------------------------

PINNED = pb.CONTEXT_ITEM_REASON_PINNED
RELEVANT = pb.CONTEXT_ITEM_REASON_RELEVANT
SUMMARY = pb.CONTEXT_ITEM_REASON_SUMMARY
RECENT = pb.CONTEXT_ITEM_REASON_RECENT
OVER_BUDGET = pb.CONTEXT_ITEM_REASON_OVER_BUDGET
EXPIRED = pb.CONTEXT_ITEM_REASON_EXPIRED

# The reading order of the included slots.
_SLOT_ORDER = {PINNED: 0, RELEVANT: 1, SUMMARY: 2, RECENT: 3}


@dataclass(frozen=True)
class Chat:
    """A caller at a conversation of a workspace, reached through a stub."""

    stub: Stub
    caller: Caller
    workspace: str
    conversation: str


async def new_chat(mesh: Any, channel: aio.Channel) -> Chat:
    """A new user owning a new workspace with one empty conversation."""
    stub = context_stub(channel)
    caller = await new_caller(mesh)
    workspace = await create_workspace(
        stub, caller, "Window tests", workspace_id=f"win-{next(_serial)}-{caller.id[:8]}"
    )
    conversation = await create_conversation(stub, caller, workspace.name, "t")
    return Chat(stub, caller, workspace.name, conversation.name)


async def window(
    stub: Stub, caller: Caller, conversation: str, budget: int, query: str = ""
) -> pb.ContextWindow:
    response = await stub.GetContextWindow(
        pb.GetContextWindowRequest(conversation=conversation, token_budget=budget, query=query),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.window


async def prune(
    stub: Stub,
    caller: Caller,
    conversation: str,
    keep_last_messages: int = 0,
    max_tokens: int = 0,
    *,
    dry_run: bool = False,
) -> pb.PruneConversationResponse:
    response: pb.PruneConversationResponse = await stub.PruneConversation(
        pb.PruneConversationRequest(
            conversation=conversation,
            keep_last_messages=keep_last_messages,
            max_tokens=max_tokens,
            validate_only=dry_run,
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response


def item_name(item: pb.ContextItem) -> str:
    return item.message.name if item.HasField("message") else item.memory_item.name


def names(items: Sequence[pb.ContextItem], reason: int | None = None) -> list[str]:
    return [item_name(i) for i in items if reason is None or i.reason == reason]


def included_messages(win: pb.ContextWindow) -> list[pb.Message]:
    return [i.message for i in win.included if i.HasField("message")]


def check_window(
    win: pb.ContextWindow,
    *,
    budget: int,
    live: Sequence[pb.Message],
    pinned: Sequence[str],
    expired: Sequence[str] = (),
) -> None:
    """The invariants of every window, against the live messages (oldest first)
    and the names of the pinned (not expired) and expired memory items in scope."""
    assert win.token_budget == budget
    assert win.tokenizer
    # The budget holds, and the total is what the included items cost.
    assert win.total_tokens == sum(i.token_count for i in win.included)
    assert 0 <= win.total_tokens <= budget
    for item in (*win.included, *win.excluded):
        own = item.message.token_count if item.HasField("message") else item.memory_item.token_count
        assert item.token_count == own, item
        assert item.HasField("message") or item.HasField("memory_item")
    # Included: reasons of inclusion only, in reading order; nothing listed twice.
    slots = [_SLOT_ORDER[i.reason] for i in win.included]
    assert slots == sorted(slots), [pb.ContextItemReason.Name(i.reason) for i in win.included]
    listed = names(win.included) + names(win.excluded)
    assert len(listed) == len(set(listed)), listed
    assert all(i.reason in (OVER_BUDGET, EXPIRED) for i in win.excluded)
    # Every live pinned item is included as pinned; expired ones never are.
    assert sorted(names(win.included, PINNED)) == sorted(pinned)
    assert set(expired) <= set(names(win.excluded, EXPIRED))
    assert not set(expired) & set(names(win.included))
    for item in win.included:
        if item.HasField("memory_item"):
            assert item.memory_item.pinned == (item.reason == PINNED)
            assert (item.memory_item.kind == pb.MEMORY_KIND_SUMMARY) == (item.reason == SUMMARY)
    # Messages: exactly the newest live ones, in order; the one before them (if
    # any) did not fit, and every older one is counted as omitted.
    shown = included_messages(win)
    assert all(i.reason == RECENT for i in win.included if i.HasField("message"))
    sequences = [m.sequence for m in shown]
    assert sequences == sorted(set(sequences))
    assert [m.name for m in shown] == [m.name for m in live[len(live) - len(shown) :]]
    assert not any(m.archived for m in shown)
    cut = [i for i in win.excluded if i.HasField("message")]
    if len(shown) == len(live):
        assert cut == []
        assert win.omitted_messages == 0
    else:
        assert len(cut) == 1, cut
        assert cut[0].reason == OVER_BUDGET
        assert cut[0].message.name == live[len(live) - len(shown) - 1].name
        assert win.total_tokens + cut[0].token_count > budget
        assert win.omitted_messages == len(live) - len(shown) - 1


def expected_kept(tokens_oldest_first: Sequence[int], keep_last: int, max_tokens: int) -> int:
    """How many live messages a prune keeps, by the contract: the longest run of
    newest messages within both limits (0: no limit), and never fewer than one."""
    kept = 0
    total = 0
    for tokens in reversed(tokens_oldest_first):
        if keep_last and kept >= keep_last:
            break
        if max_tokens and kept and total + tokens > max_tokens:
            break
        kept += 1
        total += tokens
    return kept


def range_of(summary: pb.MemoryItem) -> tuple[int, int]:
    fields: Any = summary.metadata.fields
    return int(fields["first_sequence"].number_value), int(fields["last_sequence"].number_value)


async def check_nothing_lost(chat: Chat, appended: Sequence[pb.Message]) -> list[pb.Message]:
    """Every appended message is still there exactly once, live or archived under
    an existing summary of this conversation that covers it; returns them all."""
    everything = await all_messages(
        chat.stub, chat.caller, chat.conversation, page_size=500, show_archived=True
    )
    assert [m.name for m in everything] == [m.name for m in appended]
    summaries: dict[str, pb.MemoryItem] = {}
    for message in everything:
        if not message.archived:
            assert message.summary == ""
            continue
        assert message.summary.startswith(chat.conversation + "/memories/"), message
        if message.summary not in summaries:
            summaries[message.summary] = await get_memory_item(
                chat.stub, chat.caller, message.summary
            )
        summary = summaries[message.summary]
        assert summary.kind == pb.MEMORY_KIND_SUMMARY
        first, last = range_of(summary)
        assert first <= message.sequence <= last, (message.sequence, first, last)
    # Archived messages are the oldest ones: live messages form a suffix.
    flags = [m.archived for m in everything]
    assert flags == sorted(flags, reverse=True)
    return everything


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
        self._stop = mesh.shared.bus.listen(self.events.append)

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


@asynccontextmanager
async def awaiting_event(
    mesh: Any, wanted: Callable[[events_pb2.Event], bool]
) -> AsyncIterator[asyncio.Future[events_pb2.Event]]:
    """A future for the first event delivered in ``mesh`` that ``wanted`` accepts
    (for events published after the RPC that caused them has returned)."""
    future: asyncio.Future[events_pb2.Event] = asyncio.get_running_loop().create_future()

    def listener(event: events_pb2.Event) -> None:
        if not future.done() and wanted(event):
            future.set_result(event)

    stop = mesh.shared.bus.listen(listener)
    try:
        yield future
    finally:
        stop()


def summary_created(conversation: str) -> Callable[[events_pb2.Event], bool]:
    def wanted(event: events_pb2.Event) -> bool:
        return (
            event.type == events_pb2.EVENT_TYPE_MEMORY_CHANGED
            and event.memory_changed.change == events_pb2.CHANGE_KIND_CREATED
            and event.memory_changed.memory_item.kind == pb.MEMORY_KIND_SUMMARY
            and event.memory_changed.memory_item.name.startswith(conversation + "/memories/")
        )

    return wanted


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
