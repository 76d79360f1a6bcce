"""Memory items and their search: validation, limits, events.

A memory item lives in a scope: a user (``users/u``), a workspace or a
conversation. The guard checked the caller may use the scope a request names;
this module checks the item named is in that scope (NOT_FOUND otherwise).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Final

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.common import (
    Common,
    Domain,
    check_text,
    memory_event,
    metadata_bytes,
    stored,
    write,
)
from switchboard.context.mapping import KINDS, memory_proto, memory_version_proto
from switchboard.context.memory.store import MemoryStore, Validity, Written
from switchboard.context.records import MemoryRecord, Scope
from switchboard.context.semantic.retrieval.search import Search
from switchboard.platform.errors import FieldViolation, InvalidArgument, Violations
from switchboard.platform.security.policy import Principal
from switchboard.platform.store import pagination
from switchboard.platform.store.pagination import from_micros, micros
from switchboard.platform.values import timefields
from switchboard.platform.values.fieldmask import update_paths
from switchboard.platform.values.names import MEMORY_ID_RULE, checked_etag, new_id, now
from switchboard.platform.values.resources import (
    ConversationName,
    MemoryName,
    MessageName,
    UserName,
    WorkspaceName,
    parse_memory_scope,
)

#: How many messages one memory item may cite.
MAX_SOURCE_MESSAGES: Final = 50
MAX_REASON_CHARS: Final = 200
#: How far ahead of the server's clock a client's "now" may be.
CLOCK_SKEW: Final = dt.timedelta(seconds=60)
MAX_FORMATION_CHARS: Final = 255
_VALIDITY: Final = {
    pb.MEMORY_VALIDITY_UNSPECIFIED: "current",
    pb.MEMORY_VALIDITY_CURRENT: "current",
    pb.MEMORY_VALIDITY_RETIRED: "retired",
    pb.MEMORY_VALIDITY_ALL: "all",
}


def scope_of(name: str, field: str) -> Scope:
    """The scope ``name`` (in request field ``field``) names, with its owner ids."""
    scope = parse_memory_scope(name, field)
    if isinstance(scope, UserName):
        return Scope(name, user_id=scope.user)
    if isinstance(scope, ConversationName):
        return Scope(name, workspace_id=scope.workspace, conversation_id=scope.conversation)
    return Scope(name, workspace_id=scope.workspace)


def kinds_of(kinds: Sequence[pb.MemoryKind.ValueType], field: str) -> list[str]:
    found = []
    for index, kind in enumerate(kinds):
        name = KINDS.get(kind)
        if name is None:
            raise InvalidArgument(
                f"{field}[{index}] is not a memory kind",
                [FieldViolation(f"{field}[{index}]", "is not a memory kind")],
            )
        found.append(name)
    return found


def _expiry(item: pb.MemoryItem, field: str) -> dt.datetime | None:
    if not item.HasField("expire_time"):
        return None
    when = timefields.timestamp(item.expire_time, field)
    if when <= now():
        raise InvalidArgument(
            f"{field} is in the past", [FieldViolation(field, "must be in the future")]
        )
    return when


def _past(item: pb.MemoryItem, name: str, field: str) -> dt.datetime | None:
    """``item``'s timestamp field ``name``, which may not be in the future."""
    if not item.HasField(name):  # type: ignore[arg-type]
        return None
    when = timefields.timestamp(getattr(item, name), field)
    stamp = now()
    if when > stamp + CLOCK_SKEW:
        raise InvalidArgument(
            f"{field} is in the future", [FieldViolation(field, "must not be in the future")]
        )
    # A client whose clock runs a little ahead means "now".
    return min(when, stamp)


def _origin(scope: Scope, workspace: str, field: str) -> str | None:
    """The workspace id a user's item is marked with (None: none)."""
    if not workspace:
        return None
    if scope.user_id is None:
        raise InvalidArgument(
            f"{field} applies to a user's items only",
            [FieldViolation(field, "applies to a user's items only")],
        )
    return WorkspaceName.parse(workspace, field).workspace


def _check_formation(principal: Principal, item: pb.MemoryItem, violations: Violations) -> None:
    """A formed item's provenance is memory forming's to write: the console shows it as
    "formed by" an assistant, so a person cannot claim it for what they wrote."""
    if not _forming(principal):
        if item.HasField("formation"):
            violations.add("memory_item.formation", "is set by memory forming only")
        if item.confidence:
            violations.add("memory_item.confidence", "is set by memory forming only")
        return
    formation = item.formation
    for name in ("assistant", "policy", "model", "run"):
        if len(getattr(formation, name)) > MAX_FORMATION_CHARS:
            violations.add(
                f"memory_item.formation.{name}", f"is longer than {MAX_FORMATION_CHARS} characters"
            )
    if not 0.0 <= item.confidence <= 1.0:
        violations.add("memory_item.confidence", "must be 0 to 1")


def _forming(principal: Principal) -> bool:
    """Whether the caller is a server's own work for the person (memory forming acts
    without their session or key: ``platform/rpc/outbound/peers.delegated_session``)."""
    return not principal.session_id and not principal.api_key_id


def _memory_name(name: str, field: str) -> tuple[str, str]:
    memory = MemoryName.parse(name, field)
    return str(memory.scope), memory.memory


class Memory(Domain):
    def __init__(self, common: Common, store: MemoryStore, search: Search) -> None:
        super().__init__(common)
        self._store = store
        #: Ranks for SearchMemoryItems (modes, filters: ``semantic/retrieval/search.py``).
        self._search = search

    def _content(self, content: str, field: str, violations: Violations) -> None:
        if not content.strip():
            violations.add(field, "is required")
        check_text(content, field, self.limits.max_memory_chars, violations)

    def _metadata(self, item: pb.MemoryItem) -> bytes:
        return metadata_bytes(item.metadata, "memory_item.metadata", self.limits.max_metadata_bytes)

    @write
    async def create(
        self, principal: Principal, request: pb.CreateMemoryItemRequest
    ) -> pb.MemoryItem:
        scope = scope_of(request.parent, "parent")
        item = request.memory_item
        violations = Violations()
        kind = KINDS.get(item.kind)
        if kind is None:
            violations.add(
                "memory_item.kind", "must be fact, preference, summary, entity, note or plan"
            )
        self._content(item.content, "memory_item.content", violations)
        if len(item.source_messages) > MAX_SOURCE_MESSAGES:
            violations.add("memory_item.source_messages", "has more than 50 entries")
        for index, source in enumerate(item.source_messages):
            if MessageName.parse_or_none(source) is None:
                violations.add(f"memory_item.source_messages[{index}]", MessageName.refusal(source))
        _check_formation(principal, item, violations)
        if request.memory_item_id and not MEMORY_ID_RULE.regex.fullmatch(request.memory_item_id):
            violations.add("memory_item_id", MEMORY_ID_RULE.must)
        supersedes = ""
        if item.supersedes:
            memory = MemoryName.parse_or_none(item.supersedes)
            if memory is None or str(memory.scope) != scope.scope:
                violations.add("memory_item.supersedes", "must name an item of the same parent")
            else:
                supersedes = memory.memory
        violations.check()
        origin = _origin(scope, item.workspace, "memory_item.workspace")
        valid_from = _past(item, "valid_time", "memory_item.valid_time")
        stamp = now()
        record = MemoryRecord(
            id=request.memory_item_id or new_id(),
            scope=scope.scope,
            workspace_id=scope.workspace_id,
            conversation_id=scope.conversation_id,
            user_id=scope.user_id,
            kind=kind or "note",
            content=item.content,
            pinned=item.pinned,
            meta=self._metadata(item) if item.HasField("metadata") else b"",
            sources=" ".join(item.source_messages),
            creator=principal.user_name,
            created_at=stamp,
            updated_at=stamp,
            expires_at=_expiry(item, "memory_item.expire_time"),
            token_count=self.common.counter.count(item.content),
            version=1,
            valid_from=valid_from,
            supersedes=supersedes,
            confidence_milli=round(item.confidence * 1000),
            formation=item.formation.SerializeToString() if item.HasField("formation") else b"",
            origin_workspace_id=origin,
        )
        staged = self.common.staged(lambda done: _written_events(principal, done))
        created: Written = await stored(
            self._store.create_memory(
                record,
                max_per_scope=self.limits.max_memory_items,
                max_pinned=self.limits.max_pinned,
                staged=staged,
            )
        )
        await self.common.announce(staged)
        return memory_proto(created.item)

    async def get(self, name: str) -> pb.MemoryItem:
        scope, memory_id = _memory_name(name, "name")
        return memory_proto(await stored(self._store.get_memory(scope, memory_id)))

    async def read(self, request: pb.GetMemoryItemRequest) -> pb.GetMemoryItemResponse:
        """GetMemoryItem: the item, with its history if asked."""
        if not request.include_history:
            return pb.GetMemoryItemResponse(memory_item=await self.get(request.name))
        scope, memory_id = _memory_name(request.name, "name")
        item, versions = await stored(self._store.history(scope, memory_id))
        return pb.GetMemoryItemResponse(
            memory_item=memory_proto(item),
            history=[memory_version_proto(scope, version) for version in versions],
        )

    @write
    async def update(
        self, principal: Principal, request: pb.UpdateMemoryItemRequest
    ) -> pb.MemoryItem:
        item = request.memory_item
        scope, memory_id = _memory_name(item.name, "memory_item.name")
        paths = update_paths(
            request.update_mask,
            item,
            (
                "content",
                "pinned",
                "metadata",
                "expire_time",
                "valid_time",
                "invalid_time",
                "invalid_reason",
            ),
            "update_mask",
        )
        violations = Violations()
        changes: dict[str, Any] = {}
        if "content" in paths:
            self._content(item.content, "memory_item.content", violations)
            changes["content"] = item.content
            changes["token_count"] = self.common.counter.count(item.content)
        violations.check()
        if "pinned" in paths:
            changes["pinned"] = item.pinned
        if "metadata" in paths:
            changes["meta"] = self._metadata(item)
        if "expire_time" in paths:
            changes["expires_at"] = _expiry(item, "memory_item.expire_time")
        if "valid_time" in paths:
            changes["valid_from"] = _past(item, "valid_time", "memory_item.valid_time")
        if "invalid_time" in paths:
            changes["valid_until"] = _past(item, "invalid_time", "memory_item.invalid_time")
        if "invalid_reason" in paths:
            if len(item.invalid_reason) > MAX_REASON_CHARS:
                raise InvalidArgument(
                    "memory_item.invalid_reason is too long",
                    [
                        FieldViolation(
                            "memory_item.invalid_reason",
                            f"is longer than {MAX_REASON_CHARS} characters",
                        )
                    ],
                )
            changes["invalid_reason"] = item.invalid_reason
        staged = self.common.staged(
            lambda done: [memory_event(principal, events_pb2.CHANGE_KIND_UPDATED, done)]
        )
        row = await stored(
            self._store.update_memory(
                scope,
                memory_id,
                checked_etag(item.etag, "memory_item.etag"),
                changes,
                editor=principal.user_name,
                max_pinned=self.limits.max_pinned,
                staged=staged,
            )
        )
        await self.common.announce(staged)
        return memory_proto(row)

    @write
    async def delete(self, principal: Principal, name: str) -> None:
        scope, memory_id = _memory_name(name, "name")
        # One DELETED event per item forgotten: the indexer drops each one's passages.
        staged = self.common.staged(
            lambda done: [
                memory_event(principal, events_pb2.CHANGE_KIND_DELETED, item) for item in done
            ]
        )
        await stored(self._store.delete_memory(scope, memory_id, staged=staged))
        await self.common.announce(staged)

    async def list(self, request: pb.ListMemoryItemsRequest) -> pb.ListMemoryItemsResponse:
        scope = scope_of(request.parent, "parent")
        kinds = kinds_of(request.kinds, "kinds")
        pages = self.common.pages
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        origin = _origin(scope, request.workspace, "workspace")
        validity = Validity(
            which=_VALIDITY.get(request.validity, "current"),
            at=(
                timefields.timestamp(request.valid_at, "valid_at")
                if request.HasField("valid_at")
                else None
            ),
            origin_workspace_id=origin,
        )
        if request.validity not in _VALIDITY:
            raise InvalidArgument(
                "validity is not a memory validity",
                [FieldViolation("validity", "is not a memory validity")],
            )
        parts: list[object] = ["memory", request.parent, sorted(kinds), request.pinned_only]
        if request.validity or request.HasField("valid_at") or request.workspace:
            # Tokens of a listing without them stay as they were before.
            parts += [validity.which, str(validity.at), request.workspace]
        token = pagination.fingerprint(*parts)
        before = None
        if request.page_token:
            stamp, last = pages.decode(
                request.page_token, token, (pagination.MICROS, pagination.ID)
            )
            before = (from_micros(stamp), str(last))
        rows = await stored(
            self._store.list_memory(
                scope,
                before,
                size + 1,
                kinds=kinds,
                pinned_only=request.pinned_only,
                validity=validity,
            )
        )
        response = pb.ListMemoryItemsResponse(memory_items=[memory_proto(r) for r in rows[:size]])
        if len(rows) > size:
            last_row = rows[size - 1]
            response.next_page_token = pages.encode(
                [micros(last_row.created_at), last_row.id], token
            )
        return response

    async def search(self, request: pb.SearchMemoryItemsRequest) -> pb.SearchMemoryItemsResponse:
        scope = scope_of(request.parent, "parent")
        violations = Violations()
        if not request.query.strip():
            violations.add("query", "is required")
        check_text(request.query, "query", self.limits.max_query_chars, violations)
        violations.check()
        kinds = kinds_of(request.kinds, "kinds")
        origin = _origin(scope, request.workspace, "workspace")
        return await self._search.search_memory(request, scope, kinds, origin)


def _written_events(principal: Principal, done: Written) -> list[events_pb2.Event]:
    """A create's events: the retired item's change first, then the new item."""
    events = []
    if done.retired is not None:
        events.append(memory_event(principal, events_pb2.CHANGE_KIND_UPDATED, done.retired))
    events.append(memory_event(principal, events_pb2.CHANGE_KIND_CREATED, done.item))
    return events
