"""Helpers for the context window and pruning tests: a caller, its workspace and
conversation, and the checks every window must pass."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from grpc import aio
from sqlalchemy import update

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.api.events.v1 import events_pb2
from switchboard.platform.models import MemoryItemRow
from switchboard.platform.server import SwitchboardServer
from tests.service import contextkit
from tests.service.authkit import bearer, quick_user

DEADLINE_S = 10.0
_serial = itertools.count()

PINNED = pb.CONTEXT_ITEM_REASON_PINNED
RELEVANT = pb.CONTEXT_ITEM_REASON_RELEVANT
SUMMARY = pb.CONTEXT_ITEM_REASON_SUMMARY
RECENT = pb.CONTEXT_ITEM_REASON_RECENT
OVER_BUDGET = pb.CONTEXT_ITEM_REASON_OVER_BUDGET
EXPIRED = pb.CONTEXT_ITEM_REASON_EXPIRED

# The reading order of the included slots.
_SLOT_ORDER = {PINNED: 0, RELEVANT: 1, SUMMARY: 2, RECENT: 3}


@dataclass(frozen=True)
class Caller:
    """A signed-in user with a workspace (owner) and a conversation in it."""

    stub: context_pb2_grpc.ContextServiceAsyncStub
    user_id: str
    token: str
    workspace: str
    conversation: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.token)

    @property
    def user(self) -> str:
        return f"users/{self.user_id}"


async def new_caller(mesh: SwitchboardServer, channel: aio.Channel) -> Caller:
    """A fresh user owning a fresh workspace with one empty conversation."""
    user_id, token = await quick_user(mesh)
    stub = stub_on(channel)
    md = bearer(token)
    workspace = (
        await stub.CreateWorkspace(
            pb.CreateWorkspaceRequest(
                workspace=pb.Workspace(display_name="Window tests"),
                workspace_id=f"win-{next(_serial)}-{user_id[:8]}",
            ),
            metadata=md,
            timeout=DEADLINE_S,
        )
    ).workspace
    caller = Caller(stub, user_id, token, workspace.name, "")
    return replace(caller, conversation=(await new_conversation(caller)).name)


async def new_conversation(caller: Caller) -> pb.Conversation:
    response = await caller.stub.CreateConversation(
        pb.CreateConversationRequest(
            parent=caller.workspace, conversation=pb.Conversation(title="t")
        ),
        metadata=caller.md,
        timeout=DEADLINE_S,
    )
    return response.conversation


def stub_on(channel: aio.Channel) -> context_pb2_grpc.ContextServiceAsyncStub:
    return context_pb2_grpc.ContextServiceStub(channel)


def on_channel(caller: Caller, channel: aio.Channel) -> Caller:
    """The same caller and resources, reached through another channel."""
    return replace(caller, stub=stub_on(channel))


def as_user(caller: Caller, user_id: str, token: str) -> Caller:
    """Another user, looking at the same workspace and conversation."""
    return replace(caller, user_id=user_id, token=token)


async def add_member(caller: Caller, user_id: str, role: pb.WorkspaceRole.ValueType) -> None:
    await caller.stub.AddWorkspaceMember(
        pb.AddWorkspaceMemberRequest(parent=caller.workspace, user=f"users/{user_id}", role=role),
        metadata=caller.md,
        timeout=DEADLINE_S,
    )


async def append(
    caller: Caller,
    text: str,
    role: pb.MessageRole.ValueType = pb.MESSAGE_ROLE_USER,
    conversation: str = "",
) -> pb.Message:
    return await contextkit.append(
        caller.stub,
        caller,
        conversation or caller.conversation,
        message=contextkit.text_message(text, role=role),
    )


async def remember(
    caller: Caller,
    parent: str,
    content: str,
    *,
    pinned: bool = False,
    kind: pb.MemoryKind.ValueType = pb.MEMORY_KIND_FACT,
    expire_time: dt.datetime | None = None,
) -> pb.MemoryItem:
    return await contextkit.remember(
        caller.stub,
        caller,
        parent,
        content,
        kind,
        pinned=pinned,
        expire_time=contextkit.timestamp(expire_time) if expire_time is not None else None,
    )


async def window(
    caller: Caller, budget: int, query: str = "", conversation: str = ""
) -> pb.ContextWindow:
    response = await caller.stub.GetContextWindow(
        pb.GetContextWindowRequest(
            conversation=conversation or caller.conversation, token_budget=budget, query=query
        ),
        metadata=caller.md,
        timeout=DEADLINE_S,
    )
    return response.window


async def prune(
    caller: Caller,
    keep_last_messages: int = 0,
    max_tokens: int = 0,
    conversation: str = "",
    *,
    dry_run: bool = False,
) -> pb.PruneConversationResponse:
    response: pb.PruneConversationResponse = await caller.stub.PruneConversation(
        pb.PruneConversationRequest(
            conversation=conversation or caller.conversation,
            keep_last_messages=keep_last_messages,
            max_tokens=max_tokens,
            validate_only=dry_run,
        ),
        metadata=caller.md,
        timeout=DEADLINE_S,
    )
    return response


async def conversation_of(caller: Caller, conversation: str = "") -> pb.Conversation:
    response = await caller.stub.GetConversation(
        pb.GetConversationRequest(name=conversation or caller.conversation),
        metadata=caller.md,
        timeout=DEADLINE_S,
    )
    return response.conversation


async def messages(
    caller: Caller, *, show_archived: bool = False, conversation: str = ""
) -> list[pb.Message]:
    """Every message of the conversation, oldest first, across all pages."""
    return await contextkit.all_messages(
        caller.stub,
        caller,
        conversation or caller.conversation,
        page_size=500,
        show_archived=show_archived,
    )


async def memory_item(caller: Caller, name: str) -> pb.MemoryItem:
    response = await caller.stub.GetMemoryItem(
        pb.GetMemoryItemRequest(name=name), metadata=caller.md, timeout=DEADLINE_S
    )
    return response.memory_item


async def expire_in_database(mesh: SwitchboardServer, memory_name: str) -> None:
    """Move a memory item's expiry into the past, directly in the database.

    The API refuses an expire_time in the past, and waiting for a near-future
    one to pass would be a sleep used as synchronization; so the test writes
    the row the way the passing of time would have left it. Like time passing,
    this bumps no version: call it before any window of the conversation was
    built (and cached).
    """
    memory_id = memory_name.rsplit("/", 1)[1]
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    async with mesh.deps.database.sessions.begin() as db:
        result = await db.execute(
            update(MemoryItemRow).where(MemoryItemRow.id == memory_id).values(expires_at=past)
        )
        assert getattr(result, "rowcount", 1) == 1


@asynccontextmanager
async def awaiting_event(
    mesh: SwitchboardServer, wanted: Callable[[events_pb2.Event], bool]
) -> AsyncIterator[asyncio.Future[events_pb2.Event]]:
    """A future for the first event delivered in ``mesh`` that ``wanted`` accepts."""
    future: asyncio.Future[events_pb2.Event] = asyncio.get_running_loop().create_future()

    def listener(event: events_pb2.Event) -> None:
        if not future.done() and wanted(event):
            future.set_result(event)

    stop = mesh.deps.bus.listen(listener)
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


# -- what every window and every pruned conversation must satisfy ------------------------


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


async def check_nothing_lost(caller: Caller, appended: Sequence[pb.Message]) -> list[pb.Message]:
    """Every appended message is still there exactly once, live or archived under
    an existing summary of this conversation that covers it; returns them all."""
    everything = await messages(caller, show_archived=True)
    assert [m.name for m in everything] == [m.name for m in appended]
    summaries: dict[str, pb.MemoryItem] = {}
    for message in everything:
        if not message.archived:
            assert message.summary == ""
            continue
        assert message.summary.startswith(caller.conversation + "/memories/"), message
        if message.summary not in summaries:
            summaries[message.summary] = await memory_item(caller, message.summary)
        summary = summaries[message.summary]
        assert summary.kind == pb.MEMORY_KIND_SUMMARY
        first, last = range_of(summary)
        assert first <= message.sequence <= last, (message.sequence, first, last)
    # Archived messages are the oldest ones: live messages form a suffix.
    flags = [m.archived for m in everything]
    assert flags == sorted(flags, reverse=True)
    return everything
