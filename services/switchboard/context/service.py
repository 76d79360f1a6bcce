"""The context service's domain: validation, limits, events, windows and pruning.

The guard (``platform/authn.py``) has already checked the caller's role in
the workspace a request names before anything here runs; this module checks
what the guard cannot see: that the conversation, message or memory item
named actually lives in that workspace (NOT_FOUND otherwise, never another
workspace's data), and every size and count limit.

Requests and results are the contract's messages (plain protobuf data, no
grpc): resources are served as the contract defines them, and events carry
the same resource messages.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import logging
import re
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Final, ParamSpec, TypeAlias, TypeVar

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message as ProtoMessage

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.entities import EntityExtractor
from switchboard.context.pruning import (
    PruneLimits,
    auto_prune_limits,
    needs_auto_prune,
    plan_prune,
)
from switchboard.context.search import fts5_match, pg_tsquery, query_terms
from switchboard.context.store import (
    Appended,
    ContextStore,
    EntityRecord,
    new_id,
    now,
)
from switchboard.context.summarizer import Summarizer, SummaryInput
from switchboard.context.tokens import TokenCounter, message_tokens, render_parts
from switchboard.context.window import (
    Candidate,
    PinnedOverBudget,
    Reason,
    plan_window,
)
from switchboard.context.windowcache import WindowCache
from switchboard.platform import names, pagination, timefields
from switchboard.platform.bus import EventBus
from switchboard.platform.cache import Cache
from switchboard.platform.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    Violations,
)
from switchboard.platform.fieldmask import update_paths
from switchboard.platform.models import (
    ConversationRow,
    MemoryItemRow,
    MessageRow,
    WorkspaceMemberRow,
    WorkspaceRow,
)
from switchboard.platform.names import checked_etag, etag_of
from switchboard.platform.outbox import Staged
from switchboard.platform.pagination import from_micros, micros
from switchboard.platform.policy import Principal, Role
from switchboard.platform.rendering import render_parts_briefly
from switchboard.platform.storage import Idempotency, idempotency

log = logging.getLogger("switchboard.context")

_ID = names.ID
_WORKSPACE = names.WORKSPACE
_CONVERSATION = names.CONVERSATION
_MESSAGE = names.MESSAGE
_MEMBER = names.MEMBER
_USER = names.USER
_SCOPE = names.MEMORY_SCOPE
_MEMORY = names.MEMORY_ITEM
_CLIENT_ID = re.compile(r"[a-z][a-z0-9-]{2,62}")
_TOOL = names.TOOL
#: A tool call's id, as models and the dispatcher make them.
_TOOL_CALL_ID: Final = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: A function name as chat APIs accept it.
_FUNCTION_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_OUTCOMES: Final = ("succeeded", "error", "failed", "denied")

if TYPE_CHECKING:
    _Change: TypeAlias = events_pb2.ChangeKind.ValueType

_ROLES: Final[dict[pb.WorkspaceRole.ValueType, Role]] = {
    pb.WORKSPACE_ROLE_VIEWER: Role.VIEWER,
    pb.WORKSPACE_ROLE_EDITOR: Role.EDITOR,
    pb.WORKSPACE_ROLE_OWNER: Role.OWNER,
}
_ROLE_PROTOS: Final = {role.name.lower(): value for value, role in _ROLES.items()}
_MESSAGE_ROLES: Final = {
    pb.MESSAGE_ROLE_USER: "user",
    pb.MESSAGE_ROLE_ASSISTANT: "assistant",
    pb.MESSAGE_ROLE_SYSTEM: "system",
    pb.MESSAGE_ROLE_TOOL: "tool",
}
_KINDS: Final[dict[pb.MemoryKind.ValueType, str]] = {
    pb.MEMORY_KIND_FACT: "fact",
    pb.MEMORY_KIND_PREFERENCE: "preference",
    pb.MEMORY_KIND_SUMMARY: "summary",
    pb.MEMORY_KIND_ENTITY: "entity",
    pb.MEMORY_KIND_NOTE: "note",
}
_KIND_PROTOS: Final = {name: value for value, name in _KINDS.items()}
_REASONS: Final = {
    Reason.PINNED: pb.CONTEXT_ITEM_REASON_PINNED,
    Reason.RELEVANT: pb.CONTEXT_ITEM_REASON_RELEVANT,
    Reason.SUMMARY: pb.CONTEXT_ITEM_REASON_SUMMARY,
    Reason.RECENT: pb.CONTEXT_ITEM_REASON_RECENT,
    Reason.OVER_BUDGET: pb.CONTEXT_ITEM_REASON_OVER_BUDGET,
    Reason.EXPIRED: pb.CONTEXT_ITEM_REASON_EXPIRED,
}

# Bump when the cached window's shape or the planning rules change.
_WINDOW_FORMAT: Final = "w2"


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
    max_query_chars: int = 1000
    relevant_limit: int = 10
    auto_prune_messages: int = 5000
    auto_prune_tokens: int = 0
    summary_tokens: int = 512
    purge_after_s: int = 30 * 86400
    writes_per_minute: int = 6000


def _ts(when: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if when is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _struct(data: bytes) -> struct_pb2.Struct | None:
    if not data:
        return None
    value = struct_pb2.Struct()
    value.ParseFromString(data)
    return value


# -- resources as the contract shows them ---------------------------------------------


def workspace_proto(row: WorkspaceRow, role: str | None = None) -> pb.Workspace:
    return pb.Workspace(
        name=f"workspaces/{row.id}",
        display_name=row.display_name,
        description=row.description,
        create_time=_ts(row.created_at),
        update_time=_ts(row.updated_at),
        delete_time=_ts(row.deleted_at),
        etag=etag_of(row.version),
        caller_role=_ROLE_PROTOS.get(role or "", pb.WORKSPACE_ROLE_UNSPECIFIED),
    )


def member_proto(row: WorkspaceMemberRow) -> pb.WorkspaceMember:
    return pb.WorkspaceMember(
        name=f"workspaces/{row.workspace_id}/members/{row.user_id}",
        user=f"users/{row.user_id}",
        role=_ROLE_PROTOS[row.role],
        create_time=_ts(row.created_at),
        update_time=_ts(row.updated_at or row.created_at),
    )


def conversation_proto(row: ConversationRow) -> pb.Conversation:
    return pb.Conversation(
        name=f"workspaces/{row.workspace_id}/conversations/{row.id}",
        title=row.title,
        metadata=_struct(row.meta),
        archived=row.archived,
        creator=row.creator,
        create_time=_ts(row.created_at),
        update_time=_ts(row.updated_at),
        delete_time=_ts(row.deleted_at),
        etag=etag_of(row.version),
        message_count=row.message_count,
        version=row.version,
    )


def message_proto(row: MessageRow, workspace_id: str) -> pb.Message:
    message = pb.Message()
    message.ParseFromString(row.data)
    message.archived = row.archived
    if row.summary_id:
        conversation = f"workspaces/{workspace_id}/conversations/{row.conversation_id}"
        message.summary = f"{conversation}/memories/{row.summary_id}"
    return message


def memory_proto(row: MemoryItemRow) -> pb.MemoryItem:
    return pb.MemoryItem(
        name=f"{row.scope}/memories/{row.id}",
        kind=_KIND_PROTOS.get(row.kind, pb.MEMORY_KIND_UNSPECIFIED),
        content=row.content,
        pinned=row.pinned,
        source_messages=row.sources.split(),
        metadata=_struct(row.meta),
        create_time=_ts(row.created_at),
        expire_time=_ts(row.expires_at),
        creator=row.creator,
        token_count=row.token_count,
        etag=etag_of(row.version),
        update_time=_ts(row.updated_at),
    )


# -- validation ---------------------------------------------------------------------------


_match = names.match


def _text(value: str, field: str, limit: int, violations: Violations) -> None:
    if len(value) > limit:
        violations.add(field, f"is longer than {limit} characters")


def _metadata(value: struct_pb2.Struct, field: str, limit: int) -> bytes:
    data = value.SerializeToString(deterministic=True)
    if len(data) > limit:
        raise RequestTooLarge(f"{field} is larger than {limit} bytes")
    return data


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
        if self._role in _MESSAGE_ROLES and self._role != wanted:
            self._violations.add(field, f"is only allowed in {_MESSAGE_ROLES[wanted]} messages")

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
        found = _TOOL.fullmatch(value)
        if found is None:
            self._violations.add(
                f"{field}.tool", "must be a tool name, workspaces/{w}/integrations/{i}/tools/{tool}"
            )
        elif found[1] != self._workspace_id:
            self._violations.add(
                f"{field}.tool", f"must be a tool of workspaces/{self._workspace_id}"
            )


def _tool_links(message: pb.Message) -> tuple[frozenset[str], frozenset[str]]:
    """The ids of the tool calls a message makes and of those it answers."""
    calls = frozenset(p.tool_call.id for p in message.parts if p.HasField("tool_call"))
    answers = frozenset(p.tool_result.id for p in message.parts if p.HasField("tool_result"))
    return calls, answers


def _idempotency(principal: Principal, method: str, request: ProtoMessage) -> Idempotency | None:
    return idempotency(principal.user_id, method, request)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _write(
    method: Callable[Concatenate[ContextService, Principal, _P], Awaitable[_R]],
) -> Callable[Concatenate[ContextService, Principal, _P], Awaitable[_R]]:
    """A write: it spends one of the caller's writes per minute before it runs."""

    @functools.wraps(method)
    async def spend(
        self: ContextService, principal: Principal, /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _R:
        await self._spend_write(principal)
        return await method(self, principal, *args, **kwargs)

    return spend


def _keep_alive(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("context background task failed", exc_info=task.exception())


class ContextService:
    def __init__(
        self,
        store: ContextStore,
        bus: EventBus,
        cache: WindowCache,
        counters: Cache,
        *,
        counter: TokenCounter,
        summarizer: Summarizer,
        extractor: EntityExtractor,
        limits: Limits,
        page_tokens: pagination.PageTokens,
    ) -> None:
        self._store = store
        self._pages = page_tokens
        self._bus = bus
        self._cache = cache
        # Fixed-window rate counters (Redis when configured, memory otherwise).
        self._counters = counters
        self._counter = counter
        self._summarizer = summarizer
        self._extractor = extractor
        self.limits = limits
        self._pruning: dict[str, asyncio.Task[pb.PruneConversationResponse]] = {}
        # Weak: a conversation's lock lives only while a prune holds or awaits it.
        self._prune_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._maintenance: asyncio.Task[None] | None = None
        self._closed = False

    async def _spend_write(self, principal: Principal) -> None:
        limit = self.limits.writes_per_minute
        count, reset_s = await self._counters.hit(f"context:writes:{principal.user_id}", 60)
        if count > limit:
            raise RateLimited(
                f"more than {limit} context writes in a minute; slow down",
                retry_after_s=max(reset_s, 1.0),
            )

    async def start(self, *, maintain: bool = True) -> None:
        """Start background work; ``maintain`` only in processes serving ContextService."""
        if maintain:
            self._maintenance = asyncio.create_task(self._maintain(), name="context-maintenance")

    async def close(self) -> None:
        self._closed = True
        pending: set[asyncio.Task[Any]] = {*self._pruning.values()}
        if self._maintenance is not None:
            pending.add(self._maintenance)
        # One cancel() is not always enough on Python 3.11: asyncio.wait_for
        # swallows a cancellation that races with its inner future finishing
        # (every database call ends in one). So cancel until they are done.
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        await self._cache.close()

    async def _maintain(self) -> None:
        """Purge soft-deleted workspaces and conversations past their recovery window."""
        while not self._closed:
            try:
                cutoff = now() - dt.timedelta(seconds=self.limits.purge_after_s)
                await self._store.purge_workspaces(cutoff)
                await self._store.purge_conversations(cutoff)
                await self._store.purge_idempotency()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("context maintenance failed; retrying later", exc_info=True)
            await asyncio.sleep(3600)

    # -- events ---------------------------------------------------------------------------

    def _staged(
        self, build: Callable[[Any], Sequence[events_pb2.Event] | None], key: str = ""
    ) -> Staged[Any]:
        """The events of a write, written in its transaction (``platform/outbox.py``)."""
        return Staged(self._bus.outbox, build, key=key)

    async def _announce(self, staged: Staged[Any]) -> None:
        await self._bus.publish_staged(staged.events)

    def _event(
        self,
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
        event = events_pb2.Event(
            type=kind, actor=actor, user=user, workspace=workspace, conversation=conversation
        )
        getattr(event, field).CopyFrom(payload)
        return event

    def _workspace_event(
        self, principal: Principal, change: _Change, row: WorkspaceRow
    ) -> events_pb2.Event:
        return self._event(
            principal,
            events_pb2.EVENT_TYPE_WORKSPACE_CHANGED,
            workspace=f"workspaces/{row.id}",
            field="workspace_changed",
            payload=events_pb2.WorkspaceChanged(
                change=change,
                workspace=workspace_proto(row),
            ),
        )

    def _member_event(
        self, principal: Principal, change: _Change, row: WorkspaceMemberRow
    ) -> events_pb2.Event:
        member = member_proto(row)
        return self._event(
            principal,
            events_pb2.EVENT_TYPE_MEMBER_CHANGED,
            workspace=f"workspaces/{row.workspace_id}",
            user=member.user,
            field="member_changed",
            payload=events_pb2.MemberChanged(change=change, member=member),
        )

    def _conversation_event(
        self, principal: Principal | None, change: _Change, row: ConversationRow
    ) -> events_pb2.Event:
        conversation = conversation_proto(row)
        return self._event(
            principal,
            events_pb2.EVENT_TYPE_CONVERSATION_CHANGED,
            workspace=f"workspaces/{row.workspace_id}",
            conversation=conversation.name,
            field="conversation_changed",
            payload=events_pb2.ConversationChanged(
                change=change,
                conversation=conversation,
            ),
        )

    def _memory_event(
        self, principal: Principal | None, change: _Change, row: MemoryItemRow
    ) -> events_pb2.Event:
        scope = row.scope
        conversation = scope if row.conversation_id else ""
        workspace = f"workspaces/{row.workspace_id}" if row.workspace_id else ""
        user = scope if row.user_id else ""
        return self._event(
            principal,
            events_pb2.EVENT_TYPE_MEMORY_CHANGED,
            workspace=workspace,
            conversation=conversation,
            user=user,
            field="memory_changed",
            payload=events_pb2.MemoryChanged(
                change=change,
                memory_item=memory_proto(row),
            ),
        )

    # -- workspaces -----------------------------------------------------------------------

    @_write
    async def create_workspace(
        self, principal: Principal, request: pb.CreateWorkspaceRequest
    ) -> pb.Workspace:
        violations = Violations()
        workspace = request.workspace
        if request.workspace_id and not _CLIENT_ID.fullmatch(request.workspace_id):
            violations.add("workspace_id", "must match [a-z][a-z0-9-]{2,62}")
        if not workspace.display_name.strip():
            violations.add("workspace.display_name", "is required")
        _text(
            workspace.display_name,
            "workspace.display_name",
            self.limits.max_title_chars,
            violations,
        )
        _text(
            workspace.description,
            "workspace.description",
            self.limits.max_description_chars,
            violations,
        )
        violations.check()
        idempotency = _idempotency(principal, "CreateWorkspace", request)
        staged = self._staged(
            lambda made: (
                [self._workspace_event(principal, events_pb2.CHANGE_KIND_CREATED, made[0])]
                if made[1]
                else None
            ),
            idempotency.key if idempotency else "",
        )
        row, _ = await self._store.create_workspace(
            request.workspace_id or f"w{new_id()[:20]}",
            workspace.display_name.strip(),
            workspace.description,
            principal.user_id,
            idempotency,
            self.limits.max_owned_workspaces,
            staged,
        )
        await self._announce(staged)
        return workspace_proto(row, "owner")

    async def get_workspace(self, role: Role | None, name: str) -> pb.Workspace:
        workspace_id = _match(_WORKSPACE, name, "name").group(1)
        row = await self._store.get_workspace(workspace_id)
        if row is None:
            raise NotFound(f"{name} not found")
        return workspace_proto(row, role.name.lower() if role else None)

    async def list_workspaces(
        self, principal: Principal, request: pb.ListWorkspacesRequest
    ) -> pb.ListWorkspacesResponse:
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        token = pagination.fingerprint("workspaces", principal.user_id, request.show_deleted)
        after = None
        if request.page_token:
            stamp, last = self._pages.decode(
                request.page_token, token, (pagination.MICROS, pagination.ID)
            )
            after = (from_micros(stamp), str(last))
        rows = await self._store.list_workspaces(
            principal.user_id, after, size + 1, show_deleted=request.show_deleted
        )
        response = pb.ListWorkspacesResponse(
            workspaces=[workspace_proto(row, role) for row, role in rows[:size]]
        )
        if len(rows) > size:
            last_row = rows[size - 1][0]
            response.next_page_token = self._pages.encode(
                [micros(last_row.created_at), last_row.id], token
            )
        return response

    @_write
    async def update_workspace(
        self, principal: Principal, request: pb.UpdateWorkspaceRequest
    ) -> pb.Workspace:
        workspace = request.workspace
        workspace_id = _match(_WORKSPACE, workspace.name, "workspace.name").group(1)
        paths = update_paths(
            request.update_mask, workspace, ("display_name", "description"), "update_mask"
        )
        violations = Violations()
        changes: dict[str, Any] = {}
        if "display_name" in paths:
            if not workspace.display_name.strip():
                violations.add("workspace.display_name", "is required")
            _text(
                workspace.display_name,
                "workspace.display_name",
                self.limits.max_title_chars,
                violations,
            )
            changes["display_name"] = workspace.display_name.strip()
        if "description" in paths:
            _text(
                workspace.description,
                "workspace.description",
                self.limits.max_description_chars,
                violations,
            )
            changes["description"] = workspace.description
        violations.check()
        staged = self._staged(
            lambda done: [self._workspace_event(principal, events_pb2.CHANGE_KIND_UPDATED, done)]
        )
        row = await self._store.update_workspace(
            workspace_id, checked_etag(workspace.etag, "workspace.etag"), changes, staged
        )
        await self._announce(staged)
        return workspace_proto(row, "owner")

    @_write
    async def set_workspace_deleted(
        self, principal: Principal, name: str, etag: str, *, deleted: bool
    ) -> pb.Workspace:
        workspace_id = _match(_WORKSPACE, name, "name").group(1)
        change = events_pb2.CHANGE_KIND_DELETED if deleted else events_pb2.CHANGE_KIND_UPDATED
        staged = self._staged(lambda done: [self._workspace_event(principal, change, done)])
        row = await self._store.set_workspace_deleted(
            workspace_id, checked_etag(etag, "etag"), deleted=deleted, staged=staged
        )
        await self._announce(staged)
        return workspace_proto(row, "owner")

    # -- members ----------------------------------------------------------------------------

    def _role(self, value: pb.WorkspaceRole.ValueType, field: str) -> str:
        role = _ROLES.get(value)
        if role is None:
            raise InvalidArgument(
                f"{field} is required", [FieldViolation(field, "must be viewer, editor or owner")]
            )
        return role.name.lower()

    @_write
    async def add_member(
        self, principal: Principal, request: pb.AddWorkspaceMemberRequest
    ) -> pb.WorkspaceMember:
        workspace_id = _match(_WORKSPACE, request.parent, "parent").group(1)
        user_id = _match(_USER, request.user, "user").group(1)
        role = self._role(request.role, "role")
        staged = self._staged(
            lambda done: [self._member_event(principal, events_pb2.CHANGE_KIND_CREATED, done)]
        )
        row = await self._store.add_member(
            workspace_id, user_id, role, self.limits.max_members, staged=staged
        )
        await self._announce(staged)
        return member_proto(row)

    @_write
    async def update_member(
        self, principal: Principal, request: pb.UpdateWorkspaceMemberRequest
    ) -> pb.WorkspaceMember:
        found = _match(_MEMBER, request.member.name, "member.name")
        paths = update_paths(request.update_mask, request.member, ("role",), "update_mask")
        if "role" not in paths:
            raise InvalidArgument(
                "update_mask must name role",
                [FieldViolation("update_mask.paths", "must name role")],
            )
        role = self._role(request.member.role, "member.role")
        staged = self._staged(
            lambda done: [self._member_event(principal, events_pb2.CHANGE_KIND_UPDATED, done)]
        )
        row = await self._store.update_member(found.group(1), found.group(2), role, staged=staged)
        await self._announce(staged)
        return member_proto(row)

    @_write
    async def remove_member(self, principal: Principal, role: Role | None, name: str) -> None:
        found = _match(_MEMBER, name, "name")
        # Any member may leave; removing someone else is an owner's decision.
        if found.group(2) != principal.user_id and role != Role.OWNER:
            raise PermissionDenied("removing another member needs the owner role in the workspace")
        staged = self._staged(
            lambda done: [self._member_event(principal, events_pb2.CHANGE_KIND_DELETED, done)]
        )
        await self._store.remove_member(found.group(1), found.group(2), staged=staged)
        await self._announce(staged)

    async def list_members(
        self, request: pb.ListWorkspaceMembersRequest
    ) -> pb.ListWorkspaceMembersResponse:
        workspace_id = _match(_WORKSPACE, request.parent, "parent").group(1)
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        token = pagination.fingerprint("members", workspace_id)
        after = ""
        if request.page_token:
            after = str(self._pages.decode(request.page_token, token, (pagination.ID,))[0])
        rows = await self._store.list_members(workspace_id, after, size + 1)
        response = pb.ListWorkspaceMembersResponse(members=[member_proto(r) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = self._pages.encode([rows[size - 1].user_id], token)
        return response

    # -- conversations ------------------------------------------------------------------------

    @_write
    async def create_conversation(
        self, principal: Principal, request: pb.CreateConversationRequest
    ) -> pb.Conversation:
        workspace_id = _match(_WORKSPACE, request.parent, "parent").group(1)
        violations = Violations()
        conversation = request.conversation
        _text(conversation.title, "conversation.title", self.limits.max_title_chars, violations)
        violations.check()
        meta = _metadata(
            conversation.metadata, "conversation.metadata", self.limits.max_metadata_bytes
        )
        idempotency = _idempotency(principal, "CreateConversation", request)
        staged = self._staged(
            lambda made: (
                [self._conversation_event(principal, events_pb2.CHANGE_KIND_CREATED, made[0])]
                if made[1]
                else None
            ),
            idempotency.key if idempotency else "",
        )
        row, _ = await self._store.create_conversation(
            workspace_id,
            conversation.title,
            meta,
            principal.user_name,
            idempotency,
            self.limits.max_conversations,
            staged,
        )
        await self._announce(staged)
        return conversation_proto(row)

    async def get_conversation(self, name: str) -> pb.Conversation:
        found = _match(_CONVERSATION, name, "name")
        return conversation_proto(await self._store.get_conversation(found[1], found[2]))

    async def list_conversations(
        self, request: pb.ListConversationsRequest
    ) -> pb.ListConversationsResponse:
        workspace_id = _match(_WORKSPACE, request.parent, "parent").group(1)
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        token = pagination.fingerprint(
            "conversations", workspace_id, request.show_archived, request.show_deleted
        )
        before = None
        if request.page_token:
            stamp, last = self._pages.decode(
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
            response.next_page_token = self._pages.encode(
                [micros(last_row.updated_at), last_row.id], token
            )
        return response

    @_write
    async def update_conversation(
        self, principal: Principal, request: pb.UpdateConversationRequest
    ) -> pb.Conversation:
        conversation = request.conversation
        found = _match(_CONVERSATION, conversation.name, "conversation.name")
        paths = update_paths(
            request.update_mask, conversation, ("title", "metadata", "archived"), "update_mask"
        )
        violations = Violations()
        changes: dict[str, Any] = {}
        if "title" in paths:
            _text(conversation.title, "conversation.title", self.limits.max_title_chars, violations)
            changes["title"] = conversation.title
        violations.check()
        if "metadata" in paths:
            changes["meta"] = _metadata(
                conversation.metadata, "conversation.metadata", self.limits.max_metadata_bytes
            )
        if "archived" in paths:
            changes["archived"] = conversation.archived
        staged = self._staged(
            lambda done: [self._conversation_event(principal, events_pb2.CHANGE_KIND_UPDATED, done)]
        )
        row = await self._store.update_conversation(
            found[1],
            found[2],
            checked_etag(conversation.etag, "conversation.etag"),
            changes,
            staged,
        )
        await self._announce(staged)
        return conversation_proto(row)

    @_write
    async def set_conversation_deleted(
        self, principal: Principal, name: str, etag: str, *, deleted: bool
    ) -> pb.Conversation:
        found = _match(_CONVERSATION, name, "name")
        change = events_pb2.CHANGE_KIND_DELETED if deleted else events_pb2.CHANGE_KIND_UPDATED
        staged = self._staged(lambda done: [self._conversation_event(principal, change, done)])
        row = await self._store.set_conversation_deleted(
            found[1], found[2], checked_etag(etag, "etag"), deleted=deleted, staged=staged
        )
        await self._announce(staged)
        return conversation_proto(row)

    # -- messages -------------------------------------------------------------------------------

    @_write
    async def append_message(
        self, principal: Principal, request: pb.AppendMessageRequest
    ) -> pb.Message:
        found = _match(_CONVERSATION, request.parent, "parent")
        workspace_id, conversation_id = found[1], found[2]
        message = request.message
        violations = Violations()
        role = _MESSAGE_ROLES.get(message.role)
        if role is None:
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
        if message.role == pb.MESSAGE_ROLE_TOOL and message.parts and not tools.results:
            violations.add("message.parts", "needs a tool_result part in a tool message")
        author = message.author or principal.user_name
        if author != principal.user_name and not author.startswith("handlers/"):
            violations.add("message.author", "must be the caller or a handlers/ name")
        violations.check()
        size = message.ByteSize()
        if size > self.limits.max_message_bytes:
            raise RequestTooLarge(
                f"message is {size} bytes; the limit is {self.limits.max_message_bytes}"
            )
        stored = pb.Message(
            role=message.role,
            author=author,
            parts=message.parts,
            metadata=message.metadata if message.HasField("metadata") else None,
            run=message.run,
        )
        if message.HasField("metadata"):
            _metadata(message.metadata, "message.metadata", self.limits.max_metadata_bytes)
        for index, part in enumerate(message.parts):
            if part.HasField("tool_call"):
                # Arguments are client data like metadata, and bounded the same way.
                _metadata(
                    part.tool_call.arguments,
                    f"message.parts[{index}].tool_call.arguments",
                    self.limits.max_metadata_bytes,
                )
        tokens = message_tokens(self._counter, message.parts)
        stored.token_count = tokens
        conversation_name = request.parent
        # Text parts only: tool arguments and outputs are machine text (and
        # outputs come from outside), not entities a person mentioned.
        entities = self._entities(render_parts(p for p in message.parts if p.HasField("text")))

        def encode(message_id: str, seq: int, when: dt.datetime) -> bytes:
            stored.name = f"{conversation_name}/messages/{message_id}"
            stored.sequence = seq
            stored.create_time.FromDatetime(when)
            return stored.SerializeToString()

        idempotency = _idempotency(principal, "AppendMessage", request)

        def events(done: Appended) -> list[events_pb2.Event] | None:
            if done.replayed:
                return None
            created = self._event(
                principal,
                events_pb2.EVENT_TYPE_MESSAGE_CREATED,
                workspace=f"workspaces/{workspace_id}",
                conversation=conversation_name,
                field="message_created",
                payload=events_pb2.MessageCreated(
                    message=message_proto(done.message, workspace_id)
                ),
            )
            return [
                created,
                *(
                    self._memory_event(principal, events_pb2.CHANGE_KIND_CREATED, row)
                    for row in done.created_memory
                ),
                *(
                    self._memory_event(principal, events_pb2.CHANGE_KIND_UPDATED, row)
                    for row in done.updated_memory
                ),
            ]

        staged = self._staged(events, idempotency.key if idempotency else "")
        appended = await self._store.append_message(
            workspace_id,
            conversation_id,
            role=role or "user",
            tokens=tokens,
            encode=encode,
            entities=entities,
            entity_creator="system",
            max_memory_per_scope=self.limits.max_memory_items,
            idempotency=idempotency,
            staged=staged,
        )
        # A replay publishes what its first attempt left in the outbox, if anything.
        await self._announce(staged)
        if appended.replayed:
            return message_proto(appended.message, workspace_id)
        self._maybe_auto_prune(appended.conversation)
        return staged.events[0].message_created.message

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
                    tokens=self._counter.count(content),
                )
            )
        return records

    async def get_message(self, name: str) -> pb.Message:
        found = _match(_MESSAGE, name, "name")
        row = await self._store.get_message(found[1], found[2], found[3])
        return message_proto(row, found[1])

    async def list_messages(self, request: pb.ListMessagesRequest) -> pb.ListMessagesResponse:
        found = _match(_CONVERSATION, request.parent, "parent")
        size = pagination.page_size(request.page_size, default=50, maximum=500)
        token = pagination.fingerprint(
            "messages", request.parent, request.show_archived, request.newest_first
        )
        after = None
        if request.page_token:
            after = int(self._pages.decode(request.page_token, token, (pagination.COUNT,))[0])
        rows = await self._store.list_messages(
            found[1],
            found[2],
            after,
            size + 1,
            show_archived=request.show_archived,
            newest_first=request.newest_first,
        )
        response = pb.ListMessagesResponse(
            messages=[message_proto(r, found[1]) for r in rows[:size]]
        )
        if len(rows) > size:
            response.next_page_token = self._pages.encode([rows[size - 1].seq], token)
        return response

    # -- memory -----------------------------------------------------------------------------------

    def _scope_row(self, scope: str, field: str) -> MemoryItemRow:
        """A memory row template naming ``scope``'s owner columns."""
        found = _match(_SCOPE, scope, field)
        parts = found.group(1).split("/")
        row = MemoryItemRow(scope=scope, workspace_id=None, conversation_id=None, user_id=None)
        if parts[0] == "users":
            row.user_id = parts[1]
        else:
            row.workspace_id = parts[1]
            if len(parts) == 4:
                row.conversation_id = parts[3]
        return row

    def _memory_name(self, name: str, field: str) -> tuple[str, str]:
        found = _match(_MEMORY, name, field)
        return found.group(1), found.group(2)

    def _expiry(self, item: pb.MemoryItem, field: str) -> dt.datetime | None:
        if not item.HasField("expire_time"):
            return None
        when = timefields.timestamp(item.expire_time, field)
        if when <= now():
            raise InvalidArgument(
                f"{field} is in the past", [FieldViolation(field, "must be in the future")]
            )
        return when

    def _content(self, content: str, field: str, violations: Violations) -> None:
        if not content.strip():
            violations.add(field, "is required")
        _text(content, field, self.limits.max_memory_chars, violations)

    @_write
    async def create_memory(
        self, principal: Principal, request: pb.CreateMemoryItemRequest
    ) -> pb.MemoryItem:
        row = self._scope_row(request.parent, "parent")
        item = request.memory_item
        violations = Violations()
        kind = _KINDS.get(item.kind)
        if kind is None:
            violations.add("memory_item.kind", "must be fact, preference, summary, entity or note")
        self._content(item.content, "memory_item.content", violations)
        if len(item.source_messages) > 50:
            violations.add("memory_item.source_messages", "has more than 50 entries")
        for index, source in enumerate(item.source_messages):
            if not _MESSAGE.fullmatch(source):
                violations.add(f"memory_item.source_messages[{index}]", "is not a message name")
        violations.check()
        stamp = now()
        row.id = new_id()
        row.kind = kind or "note"
        row.content = item.content
        row.pinned = item.pinned
        row.meta = (
            _metadata(item.metadata, "memory_item.metadata", self.limits.max_metadata_bytes)
            if item.HasField("metadata")
            else b""
        )
        row.sources = " ".join(item.source_messages)
        row.creator = principal.user_name
        row.created_at = stamp
        row.updated_at = stamp
        row.expires_at = self._expiry(item, "memory_item.expire_time")
        row.token_count = self._counter.count(item.content)
        row.version = 1
        staged = self._staged(
            lambda done: [self._memory_event(principal, events_pb2.CHANGE_KIND_CREATED, done)]
        )
        created = await self._store.create_memory(
            row,
            max_per_scope=self.limits.max_memory_items,
            max_pinned=self.limits.max_pinned,
            staged=staged,
        )
        await self._announce(staged)
        return memory_proto(created)

    async def get_memory(self, name: str) -> pb.MemoryItem:
        scope, memory_id = self._memory_name(name, "name")
        return memory_proto(await self._store.get_memory(scope, memory_id))

    @_write
    async def update_memory(
        self, principal: Principal, request: pb.UpdateMemoryItemRequest
    ) -> pb.MemoryItem:
        item = request.memory_item
        scope, memory_id = self._memory_name(item.name, "memory_item.name")
        paths = update_paths(
            request.update_mask,
            item,
            ("content", "pinned", "metadata", "expire_time"),
            "update_mask",
        )
        violations = Violations()
        changes: dict[str, Any] = {}
        if "content" in paths:
            self._content(item.content, "memory_item.content", violations)
            changes["content"] = item.content
            changes["token_count"] = self._counter.count(item.content)
        violations.check()
        if "pinned" in paths:
            changes["pinned"] = item.pinned
        if "metadata" in paths:
            changes["meta"] = _metadata(
                item.metadata, "memory_item.metadata", self.limits.max_metadata_bytes
            )
        if "expire_time" in paths:
            changes["expires_at"] = self._expiry(item, "memory_item.expire_time")
        staged = self._staged(
            lambda done: [self._memory_event(principal, events_pb2.CHANGE_KIND_UPDATED, done)]
        )
        row = await self._store.update_memory(
            scope,
            memory_id,
            checked_etag(item.etag, "memory_item.etag"),
            changes,
            max_pinned=self.limits.max_pinned,
            staged=staged,
        )
        await self._announce(staged)
        return memory_proto(row)

    @_write
    async def delete_memory(self, principal: Principal, name: str) -> None:
        scope, memory_id = self._memory_name(name, "name")
        staged = self._staged(
            lambda done: [self._memory_event(principal, events_pb2.CHANGE_KIND_DELETED, done)]
        )
        await self._store.delete_memory(scope, memory_id, staged=staged)
        await self._announce(staged)

    def _kinds(self, kinds: Sequence[pb.MemoryKind.ValueType], field: str) -> list[str]:
        names = []
        for index, kind in enumerate(kinds):
            name = _KINDS.get(kind)
            if name is None:
                raise InvalidArgument(
                    f"{field}[{index}] is not a memory kind",
                    [FieldViolation(f"{field}[{index}]", "is not a memory kind")],
                )
            names.append(name)
        return names

    async def list_memory(self, request: pb.ListMemoryItemsRequest) -> pb.ListMemoryItemsResponse:
        template = self._scope_row(request.parent, "parent")
        kinds = self._kinds(request.kinds, "kinds")
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        token = pagination.fingerprint("memory", request.parent, sorted(kinds), request.pinned_only)
        before = None
        if request.page_token:
            stamp, last = self._pages.decode(
                request.page_token, token, (pagination.MICROS, pagination.ID)
            )
            before = (from_micros(stamp), str(last))
        await self._store.scope_live(template)
        rows = await self._store.list_memory(
            request.parent, before, size + 1, kinds=kinds, pinned_only=request.pinned_only
        )
        response = pb.ListMemoryItemsResponse(memory_items=[memory_proto(r) for r in rows[:size]])
        if len(rows) > size:
            last_row = rows[size - 1]
            response.next_page_token = self._pages.encode(
                [micros(last_row.created_at), last_row.id], token
            )
        return response

    def _match_expression(self, text: str) -> str:
        terms = query_terms(text)
        return fts5_match(terms) if self._store.sqlite else pg_tsquery(terms)

    async def search_memory(
        self, request: pb.SearchMemoryItemsRequest
    ) -> pb.SearchMemoryItemsResponse:
        template = self._scope_row(request.parent, "parent")
        violations = Violations()
        if not request.query.strip():
            violations.add("query", "is required")
        _text(request.query, "query", self.limits.max_query_chars, violations)
        violations.check()
        kinds = self._kinds(request.kinds, "kinds")
        size = pagination.page_size(request.page_size, default=10, maximum=50)
        token = pagination.fingerprint("search", request.parent, request.query, sorted(kinds))
        # Ranked results page by rank position: a relevance order has no stable
        # key (scores move as the corpus changes). The window is capped.
        offset = 0
        if request.page_token:
            offset = int(
                self._pages.decode(
                    request.page_token, token, (pagination.Int(0, _MAX_SEARCH_RESULTS),)
                )[0]
            )
        if offset >= _MAX_SEARCH_RESULTS:
            return pb.SearchMemoryItemsResponse()
        await self._store.scope_live(template)
        rows = await self._store.search_memory(
            [request.parent],
            self._match_expression(request.query),
            kinds=kinds,
            limit=size + 1,
            offset=offset,
        )
        response = pb.SearchMemoryItemsResponse(
            results=[
                pb.ScoredMemoryItem(memory_item=memory_proto(row), score=score)
                for row, score in rows[:size]
            ]
        )
        if len(rows) > size and offset + size < _MAX_SEARCH_RESULTS:
            response.next_page_token = self._pages.encode([offset + size], token)
        return response

    # -- the context window ------------------------------------------------------------------------

    async def context_window(
        self, principal: Principal, request: pb.GetContextWindowRequest
    ) -> bytes:
        """The serialized ``GetContextWindowResponse`` (cached as bytes, served as bytes)."""
        found = _match(_CONVERSATION, request.conversation, "conversation")
        workspace_id, conversation_id = found[1], found[2]
        violations = Violations()
        if request.token_budget <= 0:
            violations.add("token_budget", "must be positive")
        elif request.token_budget > self.limits.max_window_tokens:
            violations.add("token_budget", f"must be at most {self.limits.max_window_tokens}")
        _text(request.query, "query", self.limits.max_query_chars, violations)
        violations.check()
        user_scope = principal.user_name
        version, workspace_version, user_version = await self._store.window_version(
            workspace_id, conversation_id, user_scope
        )
        key = ":".join(
            (
                "ctxwin",
                _WINDOW_FORMAT,
                self._counter.name,
                conversation_id,
                str(version),
                str(workspace_version),
                principal.user_id,
                str(user_version),
                str(request.token_budget),
                hashlib.sha256(request.query.encode()).hexdigest()[:16],
            )
        )
        cached = await self._cache.get(key)
        if cached is not None:
            return cached
        payload, valid_until, built_version = await self._build_window(
            workspace_id, conversation_id, user_scope, request
        )
        if built_version == (version, workspace_version, user_version):
            # Only a window built from exactly the versions in the key is cached
            # under it; one that saw a newer write is served but not stored.
            await self._cache.put(key, payload, valid_until)
        return payload

    async def _build_window(
        self,
        workspace_id: str,
        conversation_id: str,
        user_scope: str,
        request: pb.GetContextWindowRequest,
    ) -> tuple[bytes, float, tuple[int, int, int]]:
        budget = request.token_budget

        def match(latest: MessageRow | None) -> str:
            text = request.query
            if not text and latest is not None:
                text = render_parts(
                    p for p in message_proto(latest, workspace_id).parts if p.HasField("text")
                )
            return self._match_expression(text)

        rows = await self._store.window_rows(
            workspace_id,
            conversation_id,
            user_scope,
            budget=budget,
            match=match,
            relevant_limit=self.limits.relevant_limit,
            max_pinned=self.limits.max_pinned,
        )
        stamp = now()
        memories: dict[str, MemoryItemRow] = {}
        valid_until = float("inf")

        def candidate(row: MemoryItemRow) -> Candidate:
            nonlocal valid_until
            key = f"{row.scope}/memories/{row.id}"
            memories[key] = row
            expired = row.expires_at is not None and row.expires_at <= stamp
            if row.expires_at is not None and not expired:
                valid_until = min(valid_until, row.expires_at.timestamp())
            return Candidate(key=key, tokens=row.token_count, expired=expired)

        conversation = rows.conversation
        # Every loaded body: most are shown, and the planner pairs tool calls
        # with their results (window.py, rule 6).
        messages = {seq: pb.Message.FromString(rows.bodies[seq]) for seq, _ in rows.recent}
        recent = []
        for seq, tokens in rows.recent:
            calls, answers = _tool_links(messages[seq])
            recent.append(Candidate(key=str(seq), tokens=tokens, calls=calls, answers=answers))
        try:
            plan = plan_window(
                budget=budget,
                pinned=[candidate(r) for r in rows.pinned],
                relevant=[candidate(r) for r, _ in rows.relevant],
                summary=candidate(rows.summary) if rows.summary is not None else None,
                recent=recent,
                older_messages=max(0, conversation.message_count - len(recent)),
            )
        except PinnedOverBudget as exc:
            raise FailedPrecondition(
                f"the pinned memory items need {exc.needed} tokens, more than the "
                f"token_budget of {budget}; raise the budget or unpin items",
                metadata={"pinned_tokens": str(exc.needed)},
            ) from None

        def item(choice: Any) -> pb.ContextItem:
            entry = pb.ContextItem(
                reason=_REASONS[choice.reason], token_count=choice.candidate.tokens
            )
            memory = memories.get(choice.candidate.key)
            if memory is not None:
                entry.memory_item.CopyFrom(memory_proto(memory))
            else:
                entry.message.CopyFrom(messages[int(choice.candidate.key)])
            return entry

        window = pb.ContextWindow(
            conversation=f"workspaces/{workspace_id}/conversations/{conversation_id}",
            conversation_version=conversation.version,
            token_budget=budget,
            total_tokens=plan.total_tokens,
            included=[item(c) for c in plan.included],
            excluded=[item(c) for c in plan.excluded],
            tokenizer=self._counter.name,
            omitted_messages=plan.omitted_messages,
        )
        payload = pb.GetContextWindowResponse(window=window).SerializeToString()
        return (
            payload,
            valid_until,
            (conversation.version, rows.workspace_version, rows.user_version),
        )

    # -- pruning ---------------------------------------------------------------------------

    @_write
    async def prune(
        self, principal: Principal, request: pb.PruneConversationRequest
    ) -> pb.PruneConversationResponse:
        found = _match(_CONVERSATION, request.conversation, "conversation")
        violations = Violations()
        if request.keep_last_messages < 0:
            violations.add("keep_last_messages", "must not be negative")
        if request.max_tokens < 0:
            violations.add("max_tokens", "must not be negative")
        if not request.keep_last_messages and not request.max_tokens:
            violations.add("keep_last_messages", "or max_tokens is required")
        violations.check()
        limits = PruneLimits(
            keep_last_messages=request.keep_last_messages, max_tokens=request.max_tokens
        )
        return await self._prune(
            principal, found[1], found[2], limits, validate_only=request.validate_only
        )

    async def _prune(
        self,
        principal: Principal | None,
        workspace_id: str,
        conversation_id: str,
        limits: PruneLimits,
        *,
        validate_only: bool = False,
    ) -> pb.PruneConversationResponse:
        conversation = await self._store.get_conversation(workspace_id, conversation_id)
        name = f"workspaces/{workspace_id}/conversations/{conversation_id}"
        if conversation.deleted_at is not None:
            raise NotFound(f"{name} not found")
        if conversation.archived:
            # Read-only, as for appends (the archive step re-checks under the lock).
            raise FailedPrecondition(f"{name} is archived; unarchive it to change it")
        lock = self._prune_locks.get(conversation_id)
        if lock is None:
            lock = self._prune_locks[conversation_id] = asyncio.Lock()
        async with lock:
            for _ in range(_PRUNE_ATTEMPTS):
                live = await self._store.live_tokens(workspace_id, conversation_id)
                count = plan_prune([tokens for _, tokens in live], limits)
                if count == 0 or validate_only:
                    return pb.PruneConversationResponse(
                        pruned_message_count=count, kept_message_count=len(live) - count
                    )
                upto = live[count - 1][0]
                summary = await self._fold(principal, workspace_id, conversation_id, upto, count)
                if summary is not None:
                    return pb.PruneConversationResponse(
                        summary=memory_proto(summary),
                        pruned_message_count=count,
                        kept_message_count=len(live) - count,
                    )
        raise FailedPrecondition("the conversation kept changing while pruning; retry")

    async def _fold(
        self,
        principal: Principal | None,
        workspace_id: str,
        conversation_id: str,
        upto: int,
        count: int,
    ) -> MemoryItemRow | None:
        messages, previous = await self._store.prune_inputs(conversation_id, upto)
        if len(messages) != count:
            return None
        inputs = [
            SummaryInput(
                role=row.role,
                author=proto.author,
                # Tool calls and results as one line each: what happened, not the payloads.
                text=render_parts_briefly(proto.parts),
            )
            for row in messages
            for proto in (message_proto(row, workspace_id),)
        ]
        text = await self._summarizer.summarize(
            previous.content if previous is not None else None,
            inputs,
            max_tokens=self.limits.summary_tokens,
            counter=self._counter,
        )
        conversation_name = f"workspaces/{workspace_id}/conversations/{conversation_id}"
        first = _previous_first(previous) or messages[0].seq
        meta = struct_pb2.Struct()
        meta.update(
            {
                "first_sequence": first,
                "last_sequence": messages[-1].seq,
                "summarizer": self._summarizer.name,
            }
        )
        stamp = now()
        summary = MemoryItemRow(
            id=new_id(),
            scope=conversation_name,
            workspace_id=workspace_id,
            conversation_id=conversation_id,
            user_id=None,
            kind="summary",
            content=text or "(no text content)",
            pinned=False,
            meta=meta.SerializeToString(deterministic=True),
            sources="",
            creator=f"handlers/{self._summarizer.name}",
            created_at=stamp,
            updated_at=stamp,
            expires_at=None,
            token_count=self._counter.count(text or "(no text content)"),
            version=1,
        )
        staged = self._staged(
            lambda done: (
                [
                    self._memory_event(principal, events_pb2.CHANGE_KIND_CREATED, summary),
                    self._conversation_event(principal, events_pb2.CHANGE_KIND_UPDATED, done[0]),
                ]
                if done is not None
                else []
            )
        )
        done = await self._store.archive(
            workspace_id,
            conversation_id,
            upto_seq=upto,
            expected_summary=previous.id if previous is not None else None,
            expected_count=count,
            summary=summary,
            staged=staged,
        )
        if done is None:
            return None
        await self._announce(staged)
        return summary

    def _maybe_auto_prune(self, conversation: ConversationRow) -> None:
        limits = self.limits
        if not needs_auto_prune(
            conversation.message_count,
            conversation.token_count,
            limits.auto_prune_messages,
            limits.auto_prune_tokens,
        ):
            return
        if conversation.id in self._pruning:
            return
        task = asyncio.create_task(
            self._prune(
                None,  # the service's own doing: its events name the actor "system"
                conversation.workspace_id,
                conversation.id,
                auto_prune_limits(limits.auto_prune_messages, limits.auto_prune_tokens),
            ),
            name=f"auto-prune-{conversation.id}",
        )
        self._pruning[conversation.id] = task
        task.add_done_callback(lambda t: self._pruning.pop(conversation.id, None))
        task.add_done_callback(_keep_alive)


def _previous_first(previous: MemoryItemRow | None) -> int | None:
    """The first sequence an earlier summary covered (a new one covers it too)."""
    if previous is None:
        return None
    meta = _struct(previous.meta)
    if meta is None or "first_sequence" not in meta:
        return None
    first = meta["first_sequence"]
    return int(first) if isinstance(first, int | float) else None


_MAX_SEARCH_RESULTS: Final = 500
_PRUNE_ATTEMPTS: Final = 5
