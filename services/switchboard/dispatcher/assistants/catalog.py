"""Assistants: how a workspace's messages are answered (instructions, model, tools, budget).

Owners define them (CreateAssistant, UpdateAssistant, DeleteAssistant; the
access table checks the role before any of this runs), members read them and
name one in SendMessage; a message that names none and forces no handler uses
the workspace's default assistant, if it has one (at most one: setting the flag
on one clears it on the previous default in the same transaction). What a
request may set is checked by ``validation.py`` before anything is written.

Every change is written with its ASSISTANT_CHANGED event (the outbox, so an
acknowledged write has its event whatever crashes). ``get`` and
``list_assistants`` read the database; ``resolve``, on the path of every
SendMessage, reads a per-workspace cache that every process drops on the
workspace's ASSISTANT_CHANGED event, kept at most ``CACHE_TTL_S`` in case an
event from another process was missed.

This module does not import grpc; the servicer is transport only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Final

from google.protobuf import field_mask_pb2

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.assistants import mapping as assistant_mapping
from switchboard.dispatcher.assistants.holders import Holder, HolderStore
from switchboard.dispatcher.assistants.store import (
    AssistantRecord,
    AssistantStore,
    RevisionMissing,
    Written,
)
from switchboard.dispatcher.assistants.validation import (
    AssistantLimits,
    AssistantRules,
    FilterCheck,
)
from switchboard.platform.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.security.policy import Principal
from switchboard.platform.store import pagination
from switchboard.platform.store.keyed import Catalog
from switchboard.platform.store.outbox import Staged
from switchboard.platform.store.pagination import PageTokens
from switchboard.platform.store.storage import idempotency
from switchboard.platform.values import names
from switchboard.platform.values.fieldmask import update_paths
from switchboard.platform.values.resources import AssistantName, WorkspaceName

log = logging.getLogger("switchboard.dispatcher.assistants.catalog")

_CLIENT_ID: Final = names.CLIENT_ID
#: What UpdateAssistant may change, in the contract's order.
MUTABLE: Final = (
    "display_name",
    "description",
    "instructions",
    "handler",
    "model",
    "tools",
    "context_token_budget",
    "max_tool_steps",
    "workspace_default",
    "voice",
    "retrieval",
    "delegates",
    "handoffs",
    "memory_policy",
)
#: The fields kept in the stored blob (``workspace_default`` is a column).
_SETTINGS: Final = tuple(path for path in MUTABLE if path != "workspace_default")
#: A cached workspace is dropped on its ASSISTANT_CHANGED event; this is the
#: backstop for an event from another process that never arrived.
CACHE_TTL_S: Final = 5.0
#: Workspaces kept in the resolve cache; the least recently used beyond it are dropped.
MAX_CACHED_WORKSPACES: Final = 10_000
#: Serialized bytes the resolve cache holds at most (an assistant may carry
#: 32,000 characters of instructions): least recently used workspaces go first.
MAX_CACHED_BYTES: Final = 64 * 1024 * 1024
#: Assistants read per workspace into the cache (the ceiling of the per-workspace quota).
MAX_LOADED: Final = 10_000
#: Revisions per ListAssistantRevisions page at most (each holds a whole configuration).
MAX_REVISIONS_PAGE: Final = 50
#: Serialized configurations per page at most (fewer revisions when they are large).
MAX_REVISIONS_PAGE_BYTES: Final = 1024 * 1024


def _checked_revision(revision: int, field: str, *, required: bool) -> None:
    if not (names.is_revision(revision) or (revision == 0 and not required)):
        must = "must be a revision number, 1 or more" if required else "must be 0 or more"
        raise InvalidArgument(f"{field} {must}", [FieldViolation(field, must)])


def _no_revision(name: str, revision: int) -> NotFound:
    return NotFound(f"{name} keeps no revision {revision}", metadata={"assistant": name})


@dataclass(frozen=True)
class _Workspace:
    """A workspace's assistants as the resolve cache holds them."""

    by_id: dict[str, pb.Assistant]
    default: pb.Assistant | None
    #: When its read started (monotonic): what it shows is at least that recent.
    loaded_at: float
    size: int
    #: Whether any of them may hand a conversation over: if none may, no message of
    #: the workspace looks for a conversation's holder.
    hands_over: bool = False


def _copy(assistant: pb.Assistant) -> pb.Assistant:
    copied = pb.Assistant()
    copied.CopyFrom(assistant)
    return copied


class Assistants:
    def __init__(
        self,
        store: AssistantStore,
        bus: EventBus,
        page_tokens: PageTokens,
        limits: AssistantLimits,
        *,
        handler_exists: Callable[[str, str], Awaitable[bool]],
        integration_exists: Callable[[str], Awaitable[bool]],
        check_filter: FilterCheck | None = None,
        holders: HolderStore | None = None,
    ) -> None:
        self._store = store
        #: Which assistant holds each handed-over conversation (None: no handoffs here).
        self._holders = holders
        self._bus = bus
        self._catalog = Catalog(store, bus, page_tokens)
        self._pages = page_tokens
        self.limits = limits
        self._rules = AssistantRules(
            limits,
            handler_exists=handler_exists,
            integration_exists=integration_exists,
            assistants=self._stored_ids,
            check_filter=check_filter,
        )
        self._cache: OrderedDict[str, _Workspace] = OrderedDict()
        self._cached_bytes = 0
        #: The read in flight per workspace; a change drops it from here, and a
        #: read no longer here does not fill the cache (it may predate the change).
        self._loading: dict[str, asyncio.Task[_Workspace]] = {}
        self._unlisten: Callable[[], None] | None = None
        #: The resolve cache's clock (tests move it instead of sleeping).
        self.clock: Callable[[], float] = time.monotonic

    async def start(self) -> None:
        """Begin following ASSISTANT_CHANGED events (the resolve cache)."""
        self._unlisten = self._bus.listen(self._on_event)

    async def close(self) -> None:
        """Stop following events."""
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        loading = list(self._loading.values())
        self._loading.clear()
        for task in loading:
            task.cancel()
        if loading:
            await asyncio.gather(*loading, return_exceptions=True)
        self._forget_all()

    # -- events ---------------------------------------------------------------------------

    def _written(
        self, principal: Principal, change: events_pb2.ChangeKind.ValueType, done: Written
    ) -> list[events_pb2.Event]:
        # The previous default's change first: a reader never sees two defaults.
        events = [
            assistant_mapping.event(principal, events_pb2.CHANGE_KIND_UPDATED, r)
            for r in done.cleared
        ]
        events.append(assistant_mapping.event(principal, change, done.record))
        return events

    def _on_event(self, event: events_pb2.Event) -> None:
        """Every process: a workspace's assistants changed (or it was deleted, which takes
        them along without events of their own), so its cached ones are stale."""
        deleted = (
            event.type == events_pb2.EVENT_TYPE_WORKSPACE_CHANGED
            and event.workspace_changed.change == events_pb2.CHANGE_KIND_DELETED
        )
        if event.type != events_pb2.EVENT_TYPE_ASSISTANT_CHANGED and not deleted:
            return
        workspace = WorkspaceName.parse_or_none(event.workspace)
        if workspace is not None:
            self._forget(workspace.workspace)

    # -- CRUD -----------------------------------------------------------------------------

    async def create(
        self, principal: Principal, request: pb.CreateAssistantRequest
    ) -> pb.Assistant:
        workspace_id = WorkspaceName.parse(request.parent, "parent").workspace
        if request.assistant_id and not _CLIENT_ID.fullmatch(request.assistant_id):
            raise InvalidArgument(
                f"assistant_id {names.CLIENT_ID_RULE.must}",
                [FieldViolation("assistant_id", names.CLIENT_ID_RULE.must)],
            )
        key = idempotency(principal.user_id, "CreateAssistant", request)
        assistant_id = request.assistant_id or names.new_id()
        given = request.assistant
        settings = await self._rules.settings(workspace_id, given, _SETTINGS, assistant_id)

        async def write(staged: Staged[Written]) -> Written:
            written = await self._store.create(
                workspace_id,
                assistant_id,
                data=settings.SerializeToString(deterministic=True),
                is_default=given.workspace_default,
                creator=principal.user_name,
                idempotency=key,
                max_per_workspace=self.limits.max_per_workspace,
                staged=staged,
            )
            self._forget(workspace_id)
            return written

        written = await self._catalog.created(
            str(AssistantName(workspace_id, assistant_id)),
            key,
            lambda done: self._written(principal, events_pb2.CHANGE_KIND_CREATED, done),
            write,
        )
        return assistant_mapping.message(written.record)

    async def get(self, name: str, revision: int = 0) -> pb.Assistant:
        """The assistant, or as its kept ``revision`` configured it (0: the current one)."""
        assistant = AssistantName.parse(name, "name")
        _checked_revision(revision, "revision", required=False)
        record = await self._catalog.found(name, assistant.workspace, assistant.assistant)
        return await self._at(assistant_mapping.message(record), revision)

    async def _at(self, current: pb.Assistant, revision: int) -> pb.Assistant:
        """``current`` as its kept ``revision`` configured it (0: as it is); NOT_FOUND
        if it keeps no such revision. An earlier revision is one read: it never changes."""
        if not revision or revision == current.revision:
            return current
        assistant = AssistantName.parse(current.name, "name")
        kept = await self._store.revision(assistant.workspace, assistant.assistant, revision)
        if kept is None:
            raise _no_revision(current.name, revision)
        return assistant_mapping.at_revision(current, kept)

    async def list_revisions(
        self, request: pb.ListAssistantRevisionsRequest
    ) -> pb.ListAssistantRevisionsResponse:
        assistant = AssistantName.parse(request.parent, "parent")
        size = pagination.page_size(request.page_size, default=20, maximum=MAX_REVISIONS_PAGE)
        fingerprint = pagination.fingerprint("assistant-revisions", str(assistant))
        before = None
        if request.page_token:
            (before,) = self._pages.decode(request.page_token, fingerprint, (pagination.COUNT,))
        record = await self._catalog.found(request.parent, assistant.workspace, assistant.assistant)
        current = assistant_mapping.message(record)
        kept = await self._store.revisions(
            assistant.workspace, assistant.assistant, int(before) if before else None, size + 1
        )
        # A page ends at `size` revisions or once it holds MAX_REVISIONS_PAGE_BYTES of
        # configurations (always at least one): an assistant may hold hundreds of KiB
        # (instructions, delegates' schemas), and a page must stay well inside a
        # client's default 4 MiB message limit.
        shown: list[pb.AssistantRevision] = []
        held = 0
        for kept_revision in kept[:size]:
            if shown and held + len(kept_revision.data) > MAX_REVISIONS_PAGE_BYTES:
                break
            shown.append(assistant_mapping.revision(assistant, current, kept_revision))
            held += len(kept_revision.data)
        token = ""
        if len(kept) > len(shown):
            token = self._pages.encode((shown[-1].revision,), fingerprint)
        return pb.ListAssistantRevisionsResponse(revisions=shown, next_page_token=token)

    async def rollback(
        self, principal: Principal, request: pb.RollbackAssistantRequest
    ) -> pb.Assistant:
        """Make revision ``request.revision``'s configuration current, as a new revision
        (none if it already is). The configuration is checked as an update would be:
        what it names (delegates, integrations, handlers) may have gone since."""
        assistant = AssistantName.parse(request.name, "name")
        workspace_id, assistant_id = assistant.workspace, assistant.assistant
        _checked_revision(request.revision, "revision", required=True)
        names.checked_etag(request.etag, "etag")
        kept = await self._store.revision(workspace_id, assistant_id, request.revision)
        if kept is None:
            await self._catalog.found(request.name, workspace_id, assistant_id)
            raise _no_revision(request.name, request.revision)
        restored = pb.Assistant.FromString(kept.data)
        try:
            await self._rules.settings(workspace_id, restored, _SETTINGS, assistant_id)
        except InvalidArgument as refused:
            raise FailedPrecondition(
                f"revision {request.revision} no longer holds: {refused}",
                metadata={"assistant": request.name},
            ) from None

        async def write(staged: Staged[Written | None]) -> Written | None:
            try:
                written = await self._store.roll_back(
                    workspace_id,
                    assistant_id,
                    request.etag,
                    request.revision,
                    staged,
                    author=principal.user_name,
                )
            except RevisionMissing:
                # Dropped beyond the kept count since it was read.
                raise _no_revision(request.name, request.revision) from None
            if written is not None:
                self._forget(workspace_id)
            return written

        written = await self._catalog.changed(
            request.name,
            lambda done: (
                self._written(principal, events_pb2.CHANGE_KIND_UPDATED, done) if done.fresh else []
            ),
            write,
        )
        return assistant_mapping.message(written.record)

    async def list_assistants(self, request: pb.ListAssistantsRequest) -> pb.ListAssistantsResponse:
        records, token = await self._catalog.listed(
            request.parent, request.page_size, request.page_token, default=50
        )
        return pb.ListAssistantsResponse(
            assistants=[assistant_mapping.message(r) for r in records], next_page_token=token
        )

    async def update(
        self, principal: Principal, request: pb.UpdateAssistantRequest
    ) -> pb.Assistant:
        given = request.assistant
        assistant = AssistantName.parse(given.name, "assistant.name")
        workspace_id, assistant_id = assistant.workspace, assistant.assistant
        # No mask: the fields the request sets (AIP-134, as for integrations);
        # "*" replaces every field, the way a form that edits the whole
        # assistant saves it.
        paths = update_paths(request.update_mask, given, MUTABLE)
        names.checked_etag(given.etag, "assistant.etag")
        settings = await self._rules.settings(workspace_id, given, paths, assistant_id)
        mask = field_mask_pb2.FieldMask(paths=[p for p in paths if p in _SETTINGS])

        def edit(data: bytes) -> bytes:
            stored = pb.Assistant.FromString(data)
            mask.MergeMessage(
                settings, stored, replace_message_field=True, replace_repeated_field=True
            )
            return stored.SerializeToString(deterministic=True)

        is_default = given.workspace_default if "workspace_default" in paths else None

        async def write(staged: Staged[Written | None]) -> Written | None:
            written = await self._store.update(
                workspace_id,
                assistant_id,
                given.etag,
                edit,
                is_default,
                staged,
                author=principal.user_name,
            )
            if written is not None:
                self._forget(workspace_id)
            return written

        written = await self._catalog.changed(
            given.name,
            lambda done: self._written(principal, events_pb2.CHANGE_KIND_UPDATED, done),
            write,
        )
        return assistant_mapping.message(written.record)

    async def delete(self, principal: Principal, name: str, etag: str) -> None:
        assistant = AssistantName.parse(name, "name")
        names.checked_etag(etag, "etag")

        async def write(staged: Staged[AssistantRecord | None]) -> AssistantRecord | None:
            deleted = await self._store.delete(
                assistant.workspace, assistant.assistant, etag, staged
            )
            if deleted is not None:
                self._forget(assistant.workspace)
            return deleted

        await self._catalog.changed(
            name,
            lambda done: [assistant_mapping.event(principal, events_pb2.CHANGE_KIND_DELETED, done)],
            write,
        )

    # -- resolution (the hot path) ----------------------------------------------------------

    async def resolve(
        self, workspace_id: str, name: str, field: str = "assistant"
    ) -> pb.Assistant | None:
        """The assistant ``name`` names (NOT_FOUND on ``field`` if it does not exist, or
        INVALID_ARGUMENT if it is not in ``workspace_id``), or for an empty name the
        workspace's default one (None if it has none). Cached per workspace."""
        assistant_id = ""
        if name:
            named = AssistantName.parse(name, field)
            workspace = WorkspaceName(workspace_id)
            if named.parent != workspace:
                raise InvalidArgument(
                    f"{field} is not an assistant of {workspace}",
                    [FieldViolation(field, f"must be an assistant of {workspace}")],
                )
            assistant_id = named.assistant
        cached = await self._workspace(workspace_id)
        if not assistant_id:
            return _copy(cached.default) if cached.default is not None else None
        assistant = cached.by_id.get(assistant_id)
        if assistant is None:
            raise NotFound(f"{name} not found", metadata={"assistant": name})
        # A copy: callers may change what they are given, and the cache is shared.
        return _copy(assistant)

    async def resolve_revision(
        self, workspace_id: str, name: str, revision: int, field: str = "assistant_revision"
    ) -> pb.Assistant:
        """``name`` (as ``resolve`` checks it) as its kept ``revision`` configured it
        (NOT_FOUND on ``field`` if it keeps no such revision). The current revision
        comes from the cache; an earlier one is read (it never changes)."""
        _checked_revision(revision, field, required=True)
        current = await self.resolve(workspace_id, name)
        if current is None:  # pragma: no cover - resolve raises for a name it does not know
            raise NotFound(f"{name} not found")
        return await self._at(current, revision)

    async def held(self, workspace_id: str, conversation_id: str) -> pb.Assistant | None:
        """The assistant a handoff left holding the conversation (None: none did, or it
        is gone since: the default answers then)."""
        holder = await self.holder(workspace_id, conversation_id)
        if holder is None:
            return None
        found = (await self._workspace(workspace_id)).by_id.get(holder.assistant_id)
        return _copy(found) if found is not None else None

    async def holder(self, workspace_id: str, conversation_id: str) -> Holder | None:
        """The conversation's holder as stored (None: none, or no assistant of the
        workspace hands over, so none is looked up)."""
        if self._holders is None or not (await self._workspace(workspace_id)).hands_over:
            return None
        return await self._holders.get(conversation_id)

    async def hand_over(self, workspace_id: str, conversation_id: str, holder: Holder) -> None:
        """``holder`` holds the conversation from now on (``runs/delegation/handoffs.py``)."""
        if self._holders is None:  # pragma: no cover - the build always gives one
            raise RuntimeError("no holder store")
        await self._holders.hand_over(workspace_id, conversation_id, holder)

    async def _workspace(self, workspace_id: str, *, fresh: bool = False) -> _Workspace:
        """``fresh``: read again unless this process's cache is known current (an
        owner's write checks against what is stored, not what another process may
        have changed since)."""
        cached = self._cache.get(workspace_id)
        if fresh and cached is not None:
            self._drop(workspace_id)
            cached = None
        if cached is not None and self.clock() - cached.loaded_at < CACHE_TTL_S:
            self._cache.move_to_end(workspace_id)
            return cached
        task = self._loading.get(workspace_id)
        if task is None:
            # One read per workspace however many messages wait for it.
            task = asyncio.get_running_loop().create_task(
                self._load(workspace_id), name=f"assistants-{workspace_id}"
            )
            self._loading[workspace_id] = task
            task.add_done_callback(functools.partial(self._loaded, workspace_id))
        # Shielded: a caller that gives up does not cancel the others' read.
        return await asyncio.shield(task)

    async def _load(self, workspace_id: str) -> _Workspace:
        started = self.clock()
        records = await self._store.page(workspace_id, None, MAX_LOADED)
        by_id = {record.id: assistant_mapping.message(record) for record in records}
        default = next((by_id[r.id] for r in records if r.is_default), None)
        size = sum(len(r.data) for r in records)
        hands_over = any(a.handoffs for a in by_id.values())
        return _Workspace(by_id, default, started, size, hands_over)

    def _loaded(self, workspace_id: str, task: asyncio.Task[_Workspace]) -> None:
        if task.cancelled():
            return
        failed = task.exception()  # retrieved even if every waiter gave up
        if self._loading.get(workspace_id) is not task:
            return  # a change came during the read: the next lookup reads again
        del self._loading[workspace_id]
        if failed is not None:
            return
        self._put(workspace_id, task.result())

    def _put(self, workspace_id: str, entry: _Workspace) -> None:
        self._drop(workspace_id)
        if entry.size > MAX_CACHED_BYTES:
            return  # served, not kept
        self._cache[workspace_id] = entry
        self._cached_bytes += entry.size
        while len(self._cache) > MAX_CACHED_WORKSPACES or self._cached_bytes > MAX_CACHED_BYTES:
            oldest = next(iter(self._cache))
            self._drop(oldest)

    def _drop(self, workspace_id: str) -> None:
        entry = self._cache.pop(workspace_id, None)
        if entry is not None:
            self._cached_bytes -= entry.size

    def _forget(self, workspace_id: str) -> None:
        """The workspace's assistants changed: drop them, and any read in flight."""
        self._drop(workspace_id)
        self._loading.pop(workspace_id, None)

    async def _stored_ids(self, workspace_id: str) -> Collection[str]:
        """The ids of the workspace's assistants as stored now (another process may
        have changed them since this one's cache was filled)."""
        return (await self._workspace(workspace_id, fresh=True)).by_id

    def _forget_all(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0
