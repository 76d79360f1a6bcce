"""Assistants (DispatcherService): CRUD, authorization, ids, masks and etags, the default,
events, idempotency, the quota, and resolution through the per-workspace cache. What an
assistant may hold is test_validation.py's, on the desk here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.dispatcher.assistants.catalog import CACHE_TTL_S, Assistants
from switchboard.dispatcher.assistants.store import AssistantRecord, AssistantStore
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.errors import InvalidArgument, NotFound
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, built
from tests.infra.clock import FakeClock
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import (
    World,
    context_stub,
    create_workspace,
    ctx_world,
    refused,
    tap,
    violations,
)
from tests.kits.dispatchkit import Stub, dispatcher_stub
from tests.kits.eventkit import Subscriber, ws
from tests.kits.integrationkit import Stub as IntegrationStub
from tests.kits.integrationkit import create as create_integration
from tests.kits.integrationkit import hub_mesh, integration_stub

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
QUOTA = 3
ASSISTANT_CHANGED = events_pb2.EVENT_TYPE_ASSISTANT_CHANGED


@dataclass(frozen=True)
class Desk:
    """A mesh with an llm provider named ``primary`` configured, a populated workspace,
    and the stubs."""

    server: SwitchboardServer
    channel: aio.Channel
    stub: Stub
    hub: IntegrationStub
    world: World

    @property
    def assistants(self) -> Assistants:
        return built(self.server, Dispatcher).assistants


@asynccontextmanager
async def desk_mesh(**overrides: Any) -> AsyncIterator[Desk]:
    values: dict[str, Any] = {
        "dispatcher_max_assistants_per_workspace": QUOTA,
        # Never called: the llm handler and its provider only need to exist.
        "llm_base_url": "http://127.0.0.1:1/v1",
        "llm_model": "test-model",
    }
    values.update(overrides)
    async with hub_mesh(**values) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        yield Desk(server, channel, dispatcher_stub(channel), integration_stub(channel), world)


@pytest.fixture
async def desk() -> AsyncIterator[Desk]:
    async with desk_mesh() as made:
        yield made


@pytest.fixture
async def any_desk(database_url: str) -> AsyncIterator[Desk]:
    """``desk`` once on SQLite and once on PostgreSQL (the stores' locking differs)."""
    async with desk_mesh(database_url=database_url) as made:
        yield made


# -- helpers ----------------------------------------------------------------------------------


async def create(
    d: Desk,
    assistant: pb.Assistant | None = None,
    *,
    assistant_id: str = "",
    request_id: str = "",
    caller: Any = None,
    parent: str = "",
) -> pb.Assistant:
    response = await d.stub.CreateAssistant(
        pb.CreateAssistantRequest(
            parent=parent or d.world.name,
            assistant=assistant if assistant is not None else pb.Assistant(display_name="Helper"),
            assistant_id=assistant_id,
            request_id=request_id,
        ),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
    )
    return response.assistant


async def get(d: Desk, name: str, caller: Any = None) -> pb.Assistant:
    response = await d.stub.GetAssistant(
        pb.GetAssistantRequest(name=name),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
    )
    return response.assistant


async def update(d: Desk, assistant: pb.Assistant, *paths: str, caller: Any = None) -> pb.Assistant:
    response = await d.stub.UpdateAssistant(
        pb.UpdateAssistantRequest(
            assistant=assistant, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        ),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
    )
    return response.assistant


async def delete(d: Desk, name: str, etag: str = "", caller: Any = None) -> None:
    await d.stub.DeleteAssistant(
        pb.DeleteAssistantRequest(name=name, etag=etag),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
    )


async def list_all(d: Desk, caller: Any = None, page_size: int = 0) -> list[pb.Assistant]:
    found: list[pb.Assistant] = []
    token = ""
    while True:
        page = await d.stub.ListAssistants(
            pb.ListAssistantsRequest(parent=d.world.name, page_size=page_size, page_token=token),
            metadata=(caller or d.world.owner).md,
            timeout=CALL_DEADLINE_S,
        )
        found.extend(page.assistants)
        token = page.next_page_token
        if not token:
            return found


async def mcp_server(d: Desk, workspace: str, integration_id: str) -> str:
    """An integration (never connected to) that an assistant's tools can name."""
    made = await create_integration(
        d.hub,
        d.world.owner,
        workspace,
        ipb.Integration(
            kind=ipb.INTEGRATION_KIND_MCP_SERVER,
            endpoint="http://127.0.0.1:1/mcp",
            display_name="Tools",
        ),
        integration_id=integration_id,
    )
    return made.name


def changes(events: list[events_pb2.Event]) -> list[tuple[int, str, str]]:
    """(change, assistant name, etag) of each ASSISTANT_CHANGED event."""
    return [
        (
            e.assistant_changed.change,
            e.assistant_changed.assistant.name,
            e.assistant_changed.assistant.etag,
        )
        for e in events
        if e.type == ASSISTANT_CHANGED
    ]


# -- the lifecycle ----------------------------------------------------------------------------


async def test_an_owner_creates_reads_lists_updates_and_deletes_an_assistant(
    any_desk: Desk,
) -> None:
    d = any_desk
    tools = await mcp_server(d, d.world.name, "search")
    made = await create(
        d,
        pb.Assistant(
            display_name="  Support  ",
            description="Answers customers",
            instructions="Be brief.",
            handler="handlers/echo",
            model=hpb.ModelSettings(provider="primary", temperature=0.2, max_output_tokens=500),
            tools=[
                pb.AssistantTools(
                    integration=tools, tools=["find", "open"], approval_required_tools=["open"]
                )
            ],
            context_token_budget=8000,
            max_tool_steps=4,
            etag='"99"',  # output only: ignored
        ),
        assistant_id="support",
    )
    assert made.name == f"{d.world.name}/assistants/support"
    assert made.display_name == "Support"
    assert made.etag == '"1"'
    assert made.create_time.seconds > 0
    assert made.update_time == made.create_time
    assert made.model.temperature == pytest.approx(0.2)
    assert made.model.HasField("temperature")
    assert not made.model.HasField("top_p")
    assert list(made.tools[0].approval_required_tools) == ["open"]
    assert not made.workspace_default

    assert await get(d, made.name, d.world.viewer) == made
    assert [a.name for a in await list_all(d, d.world.editor)] == [made.name]

    renamed = await update(
        d, pb.Assistant(name=made.name, etag=made.etag, instructions="Be kind."), "instructions"
    )
    assert renamed.etag == '"2"'
    assert renamed.instructions == "Be kind."
    assert renamed.display_name == "Support"  # outside the mask: kept
    assert renamed.tools == made.tools
    stale = await refused(
        update(d, pb.Assistant(name=made.name, etag=made.etag, description="x"), "description"),
        CODE.ABORTED,
    )
    assert reason(stale) == "ERROR_REASON_ETAG_MISMATCH"
    # No etag: the last write wins.
    cleared = await update(d, pb.Assistant(name=made.name), "model", "tools")
    assert cleared.etag == '"3"'
    assert not cleared.HasField("model")
    assert not cleared.tools
    assert await get(d, made.name) == cleared

    stale = await refused(delete(d, made.name, renamed.etag), CODE.ABORTED)
    assert reason(stale) == "ERROR_REASON_ETAG_MISMATCH"
    await delete(d, made.name, cleared.etag)
    await refused(get(d, made.name), CODE.NOT_FOUND)
    await refused(delete(d, made.name), CODE.NOT_FOUND)
    await refused(update(d, pb.Assistant(name=made.name), "description"), CODE.NOT_FOUND)
    assert await list_all(d) == []


async def test_an_update_without_a_mask_changes_the_fields_it_sets_and_star_replaces_all(
    desk: Desk,
) -> None:
    made = await create(
        desk,
        pb.Assistant(display_name="Full", instructions="Long", max_tool_steps=2),
        assistant_id="full",
    )
    changed = await update(desk, pb.Assistant(name=made.name, description="Only this"))
    assert changed.description == "Only this"
    assert changed.instructions == "Long"
    assert changed.max_tool_steps == 2
    replaced = await update(desk, pb.Assistant(name=made.name, description="Only this"), "*")
    assert replaced.instructions == ""
    assert replaced.max_tool_steps == 0
    assert replaced.display_name == "full"  # an empty display name falls back to the id


async def test_retrieval_settings_are_stored_and_replaced_by_their_path(desk: Desk) -> None:
    settings = pb.RetrievalSettings(
        enabled=True,
        top_k=20,
        token_budget=32_000,
        mode=cpb.SEARCH_MODE_SEMANTIC,
        filter="source = memory AND kind = fact",
        search_tool=True,
    )
    made = await create(desk, pb.Assistant(display_name="Finder", retrieval=settings))
    assert made.retrieval == settings
    assert (await get(desk, made.name)).retrieval == settings
    changed = await update(
        desk,
        pb.Assistant(name=made.name, retrieval=pb.RetrievalSettings(enabled=True)),
        "retrieval",
    )
    assert changed.retrieval == pb.RetrievalSettings(enabled=True)
    assert changed.display_name == "Finder"
    cleared = await update(desk, pb.Assistant(name=made.name), "retrieval")
    assert not cleared.HasField("retrieval")


async def test_list_pages_by_id_through_every_assistant_once(desk: Desk) -> None:
    for assistant_id in ("cc", "aa", "bb"):
        await create(desk, assistant_id=assistant_id)
    seen = await list_all(desk, desk.world.viewer, page_size=2)
    assert [a.name.rsplit("/", 1)[1] for a in seen] == ["aa", "bb", "cc"]
    bad = await refused(
        desk.stub.ListAssistants(
            pb.ListAssistantsRequest(parent=desk.world.name, page_token="forged"),
            metadata=desk.world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(bad) == ["page_token"]


# -- authorization: owners define, members read, strangers see nothing ---------------------------


def _calls(d: Desk, name: str) -> dict[str, Any]:
    return {
        "CreateAssistant": lambda md: d.stub.CreateAssistant(
            pb.CreateAssistantRequest(parent=d.world.name, assistant=pb.Assistant()),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        ),
        "GetAssistant": lambda md: d.stub.GetAssistant(
            pb.GetAssistantRequest(name=name), metadata=md, timeout=CALL_DEADLINE_S
        ),
        "ListAssistants": lambda md: d.stub.ListAssistants(
            pb.ListAssistantsRequest(parent=d.world.name), metadata=md, timeout=CALL_DEADLINE_S
        ),
        "UpdateAssistant": lambda md: d.stub.UpdateAssistant(
            pb.UpdateAssistantRequest(
                assistant=pb.Assistant(name=name, description="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            ),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        ),
        "DeleteAssistant": lambda md: d.stub.DeleteAssistant(
            pb.DeleteAssistantRequest(name=name), metadata=md, timeout=CALL_DEADLINE_S
        ),
    }


_ALLOWED = {
    "CreateAssistant": ("owner",),
    "GetAssistant": ("owner", "editor", "viewer"),
    "ListAssistants": ("owner", "editor", "viewer"),
    "UpdateAssistant": ("owner",),
    "DeleteAssistant": ("owner",),
}


@pytest.mark.parametrize("role", ["owner", "editor", "viewer", "outsider"])
async def test_owners_edit_members_read_and_outsiders_see_nothing(desk: Desk, role: str) -> None:
    made = await create(desk, assistant_id="target")
    caller = getattr(desk.world, role)
    for method, call in _calls(desk, made.name).items():
        try:
            await call(caller.md)
            code = CODE.OK
        except aio.AioRpcError as exc:
            code = exc.code()
        if role == "outsider":
            assert code == CODE.NOT_FOUND, (method, code)
        elif role in _ALLOWED[method]:
            assert code == CODE.OK, (method, code)
        else:
            assert code == CODE.PERMISSION_DENIED, (method, code)
    # Only the owner's delete (the last call) removed it.
    if role == "owner":
        await refused(get(desk, made.name), CODE.NOT_FOUND)
    else:
        assert (await get(desk, made.name)).description == ""


# -- ids, masks and etags ---------------------------------------------------------------------


async def test_malformed_ids_masks_and_etags_are_refused(desk: Desk) -> None:
    d = desk
    error = await refused(create(d, assistant_id="Not_An_Id"), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["assistant_id"]
    rule = (
        "must be 2 to 63 characters: lowercase letters, digits and hyphens, starting with a letter"
    )
    assert error.details() == f"assistant_id {rule}"
    [violation] = detail(error, error_details_pb2.BadRequest).field_violations
    assert violation.description == rule
    made = await create(d, assistant_id="helper")
    taken = await refused(create(d, assistant_id="helper"), CODE.ALREADY_EXISTS)
    assert made.name in (taken.details() or "")
    for paths in (["nope"], ["name"], ["etag"], ["display_name", "create_time"]):
        error = await refused(
            update(d, pb.Assistant(name=made.name), *paths), CODE.INVALID_ARGUMENT
        )
        assert violations(error) == ["update_mask.paths"], paths
    error = await refused(
        update(d, pb.Assistant(name=made.name, etag="yesterday"), "description"),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == ["assistant.etag"]
    error = await refused(
        update(d, pb.Assistant(name=made.name, handler="handlers/nope"), "handler"),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == ["assistant.handler"]
    # Fields outside the mask are not validated (nor changed).
    kept = await update(
        d, pb.Assistant(name=made.name, description="ok", max_tool_steps=99), "description"
    )
    assert (kept.description, kept.max_tool_steps) == ("ok", 0)
    error = await refused(delete(d, made.name, "W/nope"), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["etag"]
    error = await refused(get(d, "workspaces/x/assistants/Bad"), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["name"]


# -- the workspace default --------------------------------------------------------------------


async def test_a_workspace_has_at_most_one_default_assistant(any_desk: Desk) -> None:
    d = any_desk
    with tap(d.server) as events:
        first = await create(d, pb.Assistant(workspace_default=True), assistant_id="first")
        assert first.workspace_default
        second = await create(d, pb.Assistant(workspace_default=True), assistant_id="second")
        seen = changes(events.take())
    now_first = await get(d, first.name)
    assert not now_first.workspace_default
    assert now_first.etag == '"2"'
    # The cleared default's change is evented too, with its new etag, before the new one's.
    assert seen[1:] == [
        (events_pb2.CHANGE_KIND_UPDATED, first.name, '"2"'),
        (events_pb2.CHANGE_KIND_CREATED, second.name, '"1"'),
    ]
    assert (await d.assistants.resolve(d.world.id, "")) == second

    back = await update(
        d, pb.Assistant(name=first.name, workspace_default=True), "workspace_default"
    )
    assert back.workspace_default
    assert [a.workspace_default for a in await list_all(d)] == [True, False]
    assert (await get(d, second.name)).etag == '"2"'
    resolved = await d.assistants.resolve(d.world.id, "")
    assert resolved is not None
    assert resolved.name == first.name

    await update(d, pb.Assistant(name=first.name, workspace_default=False), "workspace_default")
    assert await d.assistants.resolve(d.world.id, "") is None


async def test_concurrent_defaults_and_creates_keep_one_default_and_the_quota(
    any_desk: Desk,
) -> None:
    d = any_desk
    outcomes = await asyncio.gather(
        *(
            create(d, pb.Assistant(workspace_default=True), assistant_id=f"a{i}")
            for i in range(QUOTA + 2)
        ),
        return_exceptions=True,
    )
    made = [o for o in outcomes if isinstance(o, pb.Assistant)]
    refusals = [o for o in outcomes if not isinstance(o, pb.Assistant)]
    assert len(made) == QUOTA
    assert all(
        isinstance(e, aio.AioRpcError) and e.code() == CODE.RESOURCE_EXHAUSTED for e in refusals
    )
    listed = await list_all(d)
    assert len(listed) == QUOTA
    assert sum(a.workspace_default for a in listed) == 1
    await asyncio.gather(
        *(
            update(d, pb.Assistant(name=a.name, workspace_default=True), "workspace_default")
            for a in listed
        )
    )
    assert sum(a.workspace_default for a in await list_all(d)) == 1


# -- events -----------------------------------------------------------------------------------


async def test_members_see_every_change_on_the_workspace_stream(desk: Desk) -> None:
    d = desk
    subscriber = Subscriber(
        d.channel, d.world.viewer.token, scopes=[ws(d.world.id)], types=[ASSISTANT_CHANGED]
    )
    try:
        await subscriber.live()
        made = await create(d, pb.Assistant(display_name="Watched"), assistant_id="watched")
        changed = await update(d, pb.Assistant(name=made.name, description="New"), "description")
        await delete(d, made.name, changed.etag)
        events = await subscriber.until(3)
    finally:
        subscriber.call.cancel()
    assert [(e.assistant_changed.change, e.assistant_changed.assistant.etag) for e in events] == [
        (events_pb2.CHANGE_KIND_CREATED, '"1"'),
        (events_pb2.CHANGE_KIND_UPDATED, '"2"'),
        (events_pb2.CHANGE_KIND_DELETED, '"2"'),
    ]
    for event in events:
        assert event.type == ASSISTANT_CHANGED
        assert event.workspace == d.world.name
        assert event.actor.name == d.world.owner.name
        assert event.assistant_changed.assistant.name == made.name
    assert events[1].assistant_changed.assistant.description == "New"


async def test_a_refused_write_has_no_event(desk: Desk) -> None:
    made = await create(desk, assistant_id="quiet")
    with tap(desk.server) as events:
        await refused(create(desk, assistant_id="quiet"), CODE.ALREADY_EXISTS)
        await refused(
            update(desk, pb.Assistant(name=made.name, etag='"7"'), "description"), CODE.ABORTED
        )
        await refused(delete(desk, made.name, '"7"'), CODE.ABORTED)
        await refused(create(desk, pb.Assistant(max_tool_steps=99)), CODE.INVALID_ARGUMENT)
        assert changes(events.take()) == []


# -- idempotency and the quota ----------------------------------------------------------------


async def test_a_retried_create_with_the_same_request_id_creates_once(any_desk: Desk) -> None:
    d = any_desk
    with tap(d.server) as events:
        first = await create(d, pb.Assistant(display_name="Once"), request_id="make-1")
        again = await create(d, pb.Assistant(display_name="Once"), request_id="make-1")
        created = changes(events.take())
    assert again == first
    assert created == [(events_pb2.CHANGE_KIND_CREATED, first.name, '"1"')]
    other = await refused(
        create(d, pb.Assistant(display_name="Else"), request_id="make-1"), CODE.INVALID_ARGUMENT
    )
    assert violations(other) == ["request_id"]
    bad = await refused(create(d, request_id="no spaces"), CODE.INVALID_ARGUMENT)
    assert violations(bad) == ["request_id"]
    # Another caller's key is another key.
    assert len(await list_all(d)) == 1


async def test_a_workspace_holds_at_most_its_quota_of_assistants(desk: Desk) -> None:
    for _ in range(QUOTA):
        await create(desk)
    full = await refused(create(desk), CODE.RESOURCE_EXHAUSTED)
    assert reason(full) == "ERROR_REASON_QUOTA_EXCEEDED"
    # Another workspace has its own quota.
    other = await create_workspace(context_stub(desk.channel), desk.world.owner, "Other")
    assert (await create(desk, parent=other.name)).name.startswith(other.name)


# -- resolution -------------------------------------------------------------------------------


async def test_resolve_follows_every_change(desk: Desk) -> None:
    d, resolve = desk, desk.assistants.resolve
    w = d.world.id
    assert await resolve(w, "") is None  # cached: the workspace has none
    made = await create(
        d, pb.Assistant(instructions="v1", workspace_default=True), assistant_id="main"
    )
    assert await resolve(w, "") == made
    assert await resolve(w, made.name) == made
    changed = await update(d, pb.Assistant(name=made.name, instructions="v2"), "instructions")
    resolved = await resolve(w, made.name)
    assert resolved is not None
    assert resolved.instructions == "v2"
    # What resolve returns is the caller's: changing it changes no one else's.
    resolved.instructions = "scribbled"
    assert await resolve(w, "") == changed
    await delete(d, made.name)
    assert await resolve(w, "") is None
    with pytest.raises(NotFound):
        await resolve(w, made.name)


async def test_resolve_refuses_names_of_other_workspaces_and_malformed_ones(desk: Desk) -> None:
    resolve = desk.assistants.resolve
    with pytest.raises(InvalidArgument) as other:
        await resolve(desk.world.id, "workspaces/elsewhere/assistants/main", "message.assistant")
    assert [v.field for v in other.value.violations] == ["message.assistant"]
    with pytest.raises(InvalidArgument) as malformed:
        await resolve(desk.world.id, "assistants/main")
    assert [v.field for v in malformed.value.violations] == ["assistant"]
    with pytest.raises(NotFound):
        await resolve(desk.world.id, f"{desk.world.name}/assistants/missing")


class CountingStore:
    """Counts the resolve cache's reads of the store; ``gate`` (if set) holds what a
    read found until the test lets it go."""

    def __init__(self, store: AssistantStore) -> None:
        self._page = store.page
        self.reads = 0
        self.entered = asyncio.Event()
        self.gate: asyncio.Event | None = None

    async def page(self, workspace_id: str, after: str | None, limit: int) -> list[AssistantRecord]:
        self.reads += 1
        found = await self._page(workspace_id, after, limit)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return found


def counting(d: Desk, monkeypatch: pytest.MonkeyPatch) -> CountingStore:
    store: AssistantStore = d.assistants._store
    counter = CountingStore(store)
    monkeypatch.setattr(store, "page", counter.page)
    return counter


async def rewrite(d: Desk, assistant_id: str, instructions: str) -> None:
    """Change an assistant as another process would, with no event reaching this one."""

    def edit(data: bytes) -> bytes:
        stored = pb.Assistant.FromString(data)
        stored.instructions = instructions
        return stored.SerializeToString()

    assert await AssistantStore(d.server.shared.database).update(
        d.world.id, assistant_id, "", edit, None, None, author="users/another-process"
    )


async def test_resolve_reads_a_workspace_once_until_its_change_event_arrives(
    desk: Desk, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = desk
    made = await create(d, pb.Assistant(instructions="v1"), assistant_id="main")
    counter = counting(d, monkeypatch)
    found = await asyncio.gather(*(d.assistants.resolve(d.world.id, made.name) for _ in range(20)))
    assert {a.instructions if a else "" for a in found} == {"v1"}
    assert counter.reads == 1  # one read however many messages waited for it
    await rewrite(d, "main", "v2")
    cached = await d.assistants.resolve(d.world.id, made.name)
    assert cached is not None
    assert cached.instructions == "v1"
    assert counter.reads == 1
    # Another process's change arrives as its event: the workspace is read again.
    await d.server.shared.bus.publish(
        events_pb2.Event(type=ASSISTANT_CHANGED, workspace=d.world.name)
    )
    fresh = await d.assistants.resolve(d.world.id, made.name)
    assert fresh is not None
    assert fresh.instructions == "v2"
    assert counter.reads == 2
    # Other workspaces' events and other types leave the entry alone.
    await d.server.shared.bus.publish(
        events_pb2.Event(type=ASSISTANT_CHANGED, workspace="workspaces/x")
    )
    await d.server.shared.bus.publish(
        events_pb2.Event(type=events_pb2.EVENT_TYPE_INTEGRATION_CHANGED, workspace=d.world.name)
    )
    await d.assistants.resolve(d.world.id, "")
    assert counter.reads == 2
    # A deleted workspace takes its assistants along, without events of their own.
    await d.server.shared.bus.publish(
        events_pb2.Event(
            type=events_pb2.EVENT_TYPE_WORKSPACE_CHANGED,
            workspace=d.world.name,
            workspace_changed=events_pb2.WorkspaceChanged(change=events_pb2.CHANGE_KIND_DELETED),
        )
    )
    await d.assistants.resolve(d.world.id, "")
    assert counter.reads == 3


async def test_a_missed_event_is_outlived_by_the_cache_ttl(
    desk: Desk, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = desk
    clock = FakeClock()
    d.assistants.clock = clock
    made = await create(d, pb.Assistant(instructions="v1"), assistant_id="main")
    counter = counting(d, monkeypatch)
    assert (await d.assistants.resolve(d.world.id, made.name)) == made
    await rewrite(d, "main", "v2")
    clock.advance(CACHE_TTL_S - 0.1)
    held = await d.assistants.resolve(d.world.id, made.name)
    assert held is not None
    assert held.instructions == "v1"
    clock.advance(0.2)
    fresh = await d.assistants.resolve(d.world.id, made.name)
    assert fresh is not None
    assert fresh.instructions == "v2"
    assert counter.reads == 2


async def test_a_read_overtaken_by_a_change_does_not_fill_the_cache(
    desk: Desk, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = desk
    made = await create(d, pb.Assistant(instructions="v1"), assistant_id="main")
    counter = counting(d, monkeypatch)
    counter.gate = asyncio.Event()
    waiting = asyncio.create_task(d.assistants.resolve(d.world.id, made.name))
    await counter.entered.wait()
    # The change lands while the read is in flight: what it read predates it.
    await update(d, pb.Assistant(name=made.name, instructions="v2"), "instructions")
    counter.gate.set()
    overtaken = await waiting
    assert overtaken is not None
    assert overtaken.instructions == "v1"
    counter.gate = None
    fresh = await d.assistants.resolve(d.world.id, made.name)
    assert fresh is not None
    assert fresh.instructions == "v2"
    assert counter.reads == 2
