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
from switchboard.context.mapping import KINDS, memory_proto
from switchboard.context.memory.store import MemoryStore
from switchboard.context.records import MemoryRecord, Scope
from switchboard.context.semantic.retrieval.search import Search
from switchboard.platform.errors import FieldViolation, InvalidArgument, Violations
from switchboard.platform.security.policy import Principal
from switchboard.platform.store import pagination
from switchboard.platform.store.pagination import from_micros, micros
from switchboard.platform.values import timefields
from switchboard.platform.values.fieldmask import update_paths
from switchboard.platform.values.names import checked_etag, new_id, now
from switchboard.platform.values.resources import (
    ConversationName,
    MemoryName,
    MessageName,
    UserName,
    parse_memory_scope,
)

#: How many messages one memory item may cite.
MAX_SOURCE_MESSAGES: Final = 50


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
            violations.add("memory_item.kind", "must be fact, preference, summary, entity or note")
        self._content(item.content, "memory_item.content", violations)
        if len(item.source_messages) > MAX_SOURCE_MESSAGES:
            violations.add("memory_item.source_messages", "has more than 50 entries")
        for index, source in enumerate(item.source_messages):
            if MessageName.parse_or_none(source) is None:
                violations.add(f"memory_item.source_messages[{index}]", MessageName.refusal(source))
        violations.check()
        stamp = now()
        record = MemoryRecord(
            id=new_id(),
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
        )
        staged = self.common.staged(
            lambda done: [memory_event(principal, events_pb2.CHANGE_KIND_CREATED, done)]
        )
        created = await stored(
            self._store.create_memory(
                record,
                max_per_scope=self.limits.max_memory_items,
                max_pinned=self.limits.max_pinned,
                staged=staged,
            )
        )
        await self.common.announce(staged)
        return memory_proto(created)

    async def get(self, name: str) -> pb.MemoryItem:
        scope, memory_id = _memory_name(name, "name")
        return memory_proto(await stored(self._store.get_memory(scope, memory_id)))

    @write
    async def update(
        self, principal: Principal, request: pb.UpdateMemoryItemRequest
    ) -> pb.MemoryItem:
        item = request.memory_item
        scope, memory_id = _memory_name(item.name, "memory_item.name")
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
            changes["token_count"] = self.common.counter.count(item.content)
        violations.check()
        if "pinned" in paths:
            changes["pinned"] = item.pinned
        if "metadata" in paths:
            changes["meta"] = self._metadata(item)
        if "expire_time" in paths:
            changes["expires_at"] = _expiry(item, "memory_item.expire_time")
        staged = self.common.staged(
            lambda done: [memory_event(principal, events_pb2.CHANGE_KIND_UPDATED, done)]
        )
        row = await stored(
            self._store.update_memory(
                scope,
                memory_id,
                checked_etag(item.etag, "memory_item.etag"),
                changes,
                max_pinned=self.limits.max_pinned,
                staged=staged,
            )
        )
        await self.common.announce(staged)
        return memory_proto(row)

    @write
    async def delete(self, principal: Principal, name: str) -> None:
        scope, memory_id = _memory_name(name, "name")
        staged = self.common.staged(
            lambda done: [memory_event(principal, events_pb2.CHANGE_KIND_DELETED, done)]
        )
        await stored(self._store.delete_memory(scope, memory_id, staged=staged))
        await self.common.announce(staged)

    async def list(self, request: pb.ListMemoryItemsRequest) -> pb.ListMemoryItemsResponse:
        scope = scope_of(request.parent, "parent")
        kinds = kinds_of(request.kinds, "kinds")
        pages = self.common.pages
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        token = pagination.fingerprint("memory", request.parent, sorted(kinds), request.pinned_only)
        before = None
        if request.page_token:
            stamp, last = pages.decode(
                request.page_token, token, (pagination.MICROS, pagination.ID)
            )
            before = (from_micros(stamp), str(last))
        rows = await stored(
            self._store.list_memory(
                scope, before, size + 1, kinds=kinds, pinned_only=request.pinned_only
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
        return await self._search.search_memory(request, scope, kinds)
