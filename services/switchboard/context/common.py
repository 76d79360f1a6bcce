"""What every part of the context domain shares: limits, the write rate, events, checks.

Each resource's domain object (workspaces, conversations, messages, memory,
windows, pruning) holds one ``Common``: the settings' limits, the caller's
writes per minute, and the event bus its writes publish on. A write's events
are built in its transaction (``staged``, the outbox) and published after it
(``announce``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeAlias, TypeVar

from google.protobuf import struct_pb2
from google.protobuf.message import Message as ProtoMessage

from switchboard.api.events.v1 import events_pb2
from switchboard.context.mapping import (
    conversation_proto,
    member_proto,
    memory_proto,
    resource_name,
    workspace_proto,
)
from switchboard.context.records import (
    AlreadyDeleted,
    Archived,
    ConversationRecord,
    Exists,
    MemberRecord,
    MemoryRecord,
    Missing,
    NotDeleted,
    Refused,
    Retired,
    Superseded,
    WorkspaceRecord,
)
from switchboard.context.text.tokencount import TokenCounter
from switchboard.platform.cache import Cache
from switchboard.platform.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    RateLimited,
    RequestTooLarge,
    SwitchboardError,
    Violations,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.security.policy import Principal
from switchboard.platform.store import pagination
from switchboard.platform.store.outbox import Staged
from switchboard.platform.store.storage import Idempotency, idempotency
from switchboard.platform.values.resources import ConversationName, MessageName, WorkspaceName

if TYPE_CHECKING:
    _Change: TypeAlias = events_pb2.ChangeKind.ValueType

_T = TypeVar("_T")


@dataclass(frozen=True)
class Limits:
    """Every size and count the context service accepts (settings ``context_*``)."""

    max_title_chars: int = 200
    max_description_chars: int = 2000
    max_metadata_bytes: int = 16 * 1024
    max_message_bytes: int = 256 * 1024
    max_parts: int = 64
    max_memory_chars: int = 8 * 1024
    max_members: int = 1000
    max_owned_workspaces: int = 100
    max_conversations: int = 10_000
    max_memory_items: int = 10_000
    max_pinned: int = 50
    max_window_tokens: int = 1_000_000
    #: Tokens an image counts for in a message (a fixed estimate).
    image_tokens: int = 765
    max_query_chars: int = 1000
    relevant_limit: int = 10
    auto_prune_messages: int = 5000
    auto_prune_tokens: int = 0
    summary_tokens: int = 512
    purge_after_s: int = 30 * 86400
    writes_per_minute: int = 6000
    #: Branches one conversation may have (edits and regenerated answers make them).
    max_branches: int = 100


class Common:
    """The limits, write rate, page tokens, token counter and events of the whole domain."""

    def __init__(
        self,
        bus: EventBus,
        counters: Cache,
        *,
        limits: Limits,
        page_tokens: pagination.PageTokens,
        counter: TokenCounter,
    ) -> None:
        self.bus = bus
        # Fixed-window rate counters (Redis when configured, memory otherwise).
        self._counters = counters
        self.limits = limits
        self.pages = page_tokens
        self.counter = counter

    async def spend_write(self, principal: Principal) -> None:
        limit = self.limits.writes_per_minute
        count, reset_s = await self._counters.hit(f"context:writes:{principal.user_id}", 60)
        if count > limit:
            raise RateLimited(
                f"more than {limit} context writes in a minute; slow down",
                retry_after_s=max(reset_s, 1.0),
            )

    def staged(
        self, build: Callable[[Any], Sequence[events_pb2.Event] | None], key: str = ""
    ) -> Staged[Any]:
        """The events of a write, written in its transaction (``platform/store/outbox.py``)."""
        return Staged(self.bus.outbox, build, key=key)

    async def announce(self, staged: Staged[Any]) -> None:
        await self.bus.publish_staged(staged.events)


class Domain:
    """One resource's domain object: everything it shares is in ``common``."""

    def __init__(self, common: Common) -> None:
        self.common = common
        self.limits = common.limits


_D = TypeVar("_D", bound=Domain)
_P = ParamSpec("_P")


def write(
    method: Callable[Concatenate[_D, Principal, _P], Awaitable[_T]],
) -> Callable[Concatenate[_D, Principal, _P], Awaitable[_T]]:
    """A write: it spends one of the caller's writes per minute before it runs."""

    @functools.wraps(method)
    async def spend(self: _D, principal: Principal, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        await self.common.spend_write(principal)
        return await method(self, principal, *args, **kwargs)

    return spend


async def stored(call: Awaitable[_T]) -> _T:
    """``call``'s answer; a store's refusal becomes the client's error, naming the resource."""
    try:
        return await call
    except Refused as refused:
        raise refusal(refused) from None


def refusal(refused: Refused) -> SwitchboardError:
    name = resource_name(refused.kind, refused.ids)
    if isinstance(refused, Missing):
        return NotFound(f"{name} not found")
    if isinstance(refused, Exists):
        return AlreadyExists(f"{name} already exists")
    if isinstance(refused, Retired):
        return FailedPrecondition(f"{name} is already retired")
    if isinstance(refused, Superseded):
        return FailedPrecondition(
            f"{name} was superseded by a newer item; it cannot become current again"
        )
    if isinstance(refused, Archived):
        return FailedPrecondition(f"{name} is archived; unarchive it to change it")
    if isinstance(refused, AlreadyDeleted):
        return FailedPrecondition(f"{name} is already deleted")
    if isinstance(refused, NotDeleted):
        return FailedPrecondition(f"{name} is already not deleted")
    raise TypeError(f"unknown store refusal {type(refused).__name__}")


# -- checks -------------------------------------------------------------------------------


def check_text(value: str, field: str, limit: int, violations: Violations) -> None:
    if len(value) > limit:
        violations.add(field, f"is longer than {limit} characters")


def check_branch(branch: int, violations: Violations, field: str = "branch") -> None:
    """A request's branch number: 0 (the active branch) or a branch's."""
    if branch < 0:
        violations.add(field, "must be 0 (the active branch) or a branch number")


def message_in(conversation: ConversationName, name: str, field: str) -> MessageName:
    """Message ``name`` (the request's ``field``), which must be one of ``conversation``:
    INVALID_ARGUMENT naming the field otherwise."""
    message = MessageName.parse(name, field)
    if message.parent != conversation:
        violations = Violations()
        violations.add(field, f"must be a message of {conversation}")
        violations.check()
    return message


def metadata_bytes(value: struct_pb2.Struct, field: str, limit: int) -> bytes:
    data = value.SerializeToString(deterministic=True)
    if len(data) > limit:
        raise RequestTooLarge(f"{field} is larger than {limit} bytes")
    return data


def request_key(principal: Principal, method: str, request: ProtoMessage) -> Idempotency | None:
    """The idempotency key of ``request``'s ``request_id``, scoped to the caller."""
    return idempotency(principal.user_id, method, request)


# -- events -------------------------------------------------------------------------------


def event(
    principal: Principal | None,
    kind: events_pb2.EventType.ValueType,
    *,
    workspace: str = "",
    conversation: str = "",
    user: str = "",
    field: str,
    payload: ProtoMessage,
) -> events_pb2.Event:
    """An event of ``kind`` whose payload oneof ``field`` is ``payload``.

    ``principal`` None: the service acted on its own (automatic pruning).
    """
    actor = events_pb2.Actor(name="system")
    if principal is not None:
        actor = events_pb2.Actor(
            name=principal.user_name,
            credential=principal.session_name or principal.api_key_name,
        )
    built = events_pb2.Event(
        type=kind, actor=actor, user=user, workspace=workspace, conversation=conversation
    )
    getattr(built, field).CopyFrom(payload)
    return built


def workspace_event(
    principal: Principal, change: _Change, row: WorkspaceRecord
) -> events_pb2.Event:
    return event(
        principal,
        events_pb2.EVENT_TYPE_WORKSPACE_CHANGED,
        workspace=str(WorkspaceName(row.id)),
        field="workspace_changed",
        payload=events_pb2.WorkspaceChanged(change=change, workspace=workspace_proto(row)),
    )


def member_event(principal: Principal, change: _Change, row: MemberRecord) -> events_pb2.Event:
    member = member_proto(row)
    return event(
        principal,
        events_pb2.EVENT_TYPE_MEMBER_CHANGED,
        workspace=str(WorkspaceName(row.workspace_id)),
        user=member.user,
        field="member_changed",
        payload=events_pb2.MemberChanged(change=change, member=member),
    )


def conversation_event(
    principal: Principal | None, change: _Change, row: ConversationRecord
) -> events_pb2.Event:
    conversation = conversation_proto(row)
    return event(
        principal,
        events_pb2.EVENT_TYPE_CONVERSATION_CHANGED,
        workspace=str(WorkspaceName(row.workspace_id)),
        conversation=conversation.name,
        field="conversation_changed",
        payload=events_pb2.ConversationChanged(change=change, conversation=conversation),
    )


def memory_event(
    principal: Principal | None, change: _Change, row: MemoryRecord
) -> events_pb2.Event:
    scope = row.scope
    return event(
        principal,
        events_pb2.EVENT_TYPE_MEMORY_CHANGED,
        workspace=str(WorkspaceName(row.workspace_id)) if row.workspace_id else "",
        conversation=scope if row.conversation_id else "",
        user=scope if row.user_id else "",
        field="memory_changed",
        payload=events_pb2.MemoryChanged(change=change, memory_item=memory_proto(row)),
    )
