"""Memory items as facts with time (docs/memory.md), through the real service on SQLite
and PostgreSQL: a newer item supersedes an older one without deleting it, a retired item
leaves windows and searches but stays in its history, a window of a past time takes what
was true then, forgetting removes a whole history, and a user's item formed in one
workspace never reaches another's window.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.domain import ContextDomain
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.policy import AuthMethod, Principal, Scope
from tests.conftest import CALL_DEADLINE_S, built, make_settings, started
from tests.kits.authkit import detail
from tests.kits.contextkit import (
    RELEVANT,
    Caller,
    Chat,
    Stub,
    add_member,
    append,
    create_conversation,
    create_workspace,
    names,
    new_caller,
    new_chat,
)
from tests.kits.modulekit import module_channel_fixture, module_database_url_fixture

pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

module_database_url = module_database_url_fixture
channel = module_channel_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(module_database_url: str) -> AsyncIterator[SwitchboardServer]:
    async with started(make_settings(database_url=module_database_url)) as server:
        yield server


def fields(error: aio.AioRpcError) -> list[str]:
    """The fields a refusal's field violations name."""
    bad = detail(error, error_details_pb2.BadRequest)
    return [violation.field for violation in bad.field_violations]


def stamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(when)
    return value


async def create(
    stub: Stub,
    caller: Caller,
    parent: str,
    content: str,
    *,
    supersedes: str = "",
    memory_id: str = "",
    workspace: str = "",
    valid_time: dt.datetime | None = None,
    sources: tuple[str, ...] = (),
) -> pb.MemoryItem:
    item = pb.MemoryItem(
        kind=pb.MEMORY_KIND_FACT,
        content=content,
        supersedes=supersedes,
        workspace=workspace,
        source_messages=sources,
    )
    if valid_time is not None:
        item.valid_time.CopyFrom(stamp(valid_time))
    response = await stub.CreateMemoryItem(
        pb.CreateMemoryItemRequest(parent=parent, memory_item=item, memory_item_id=memory_id),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.memory_item


async def listed(
    stub: Stub,
    caller: Caller,
    parent: str,
    validity: pb.MemoryValidity.ValueType = pb.MEMORY_VALIDITY_UNSPECIFIED,
    *,
    valid_at: dt.datetime | None = None,
    workspace: str = "",
) -> list[str]:
    request = pb.ListMemoryItemsRequest(
        parent=parent, validity=validity, workspace=workspace, page_size=100
    )
    if valid_at is not None:
        request.valid_at.CopyFrom(stamp(valid_at))
    response = await stub.ListMemoryItems(request, metadata=caller.md, timeout=CALL_DEADLINE_S)
    return [item.content for item in response.memory_items]


async def history(stub: Stub, caller: Caller, name: str) -> pb.GetMemoryItemResponse:
    return await stub.GetMemoryItem(
        pb.GetMemoryItemRequest(name=name, include_history=True),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )


async def window_of(
    chat: Chat, query: str, valid_at: dt.datetime | None = None
) -> pb.ContextWindow:
    request = pb.GetContextWindowRequest(
        conversation=chat.conversation, token_budget=2000, query=query
    )
    if valid_at is not None:
        request.valid_at.CopyFrom(stamp(valid_at))
    response = await chat.stub.GetContextWindow(
        request, metadata=chat.caller.md, timeout=CALL_DEADLINE_S
    )
    return response.window


def contents(win: pb.ContextWindow) -> list[str]:
    return [i.memory_item.content for i in win.included if i.HasField("memory_item")]


async def test_a_newer_item_supersedes_an_older_one_which_stays_in_its_history(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    said = await append(c.stub, c.caller, c.conversation, "I live in Paris.")
    old = await create(
        c.stub, c.caller, c.workspace, "The team lives in Paris.", sources=(said.name,)
    )
    assert old.valid_time == old.create_time
    assert not old.HasField("invalid_time")
    assert old.version == 1
    before_move = dt.datetime.now(dt.UTC)
    new = await create(
        c.stub, c.caller, c.workspace, "The team moved to Berlin.", supersedes=old.name
    )
    assert new.supersedes == old.name

    got = await history(c.stub, c.caller, old.name)
    retired = got.memory_item
    assert retired.superseded_by == new.name
    assert retired.invalid_reason == "superseded"
    assert retired.invalid_time == new.valid_time
    assert retired.version == 2
    # The current list, the retired list and all: nothing deleted.
    assert await listed(c.stub, c.caller, c.workspace) == ["The team moved to Berlin."]
    assert await listed(c.stub, c.caller, c.workspace, pb.MEMORY_VALIDITY_RETIRED) == [
        "The team lives in Paris."
    ]
    assert len(await listed(c.stub, c.caller, c.workspace, pb.MEMORY_VALIDITY_ALL)) == 2
    # What was true before the move.
    assert await listed(c.stub, c.caller, c.workspace, valid_at=before_move) == [
        "The team lives in Paris."
    ]
    # The new item's history holds the old item's versions, oldest first.
    versions = (await history(c.stub, c.caller, new.name)).history
    assert [(v.memory_item, v.change) for v in versions] == [
        (old.name, pb.MEMORY_CHANGE_CREATED),
        (old.name, pb.MEMORY_CHANGE_RETIRED),
        (new.name, pb.MEMORY_CHANGE_CREATED),
    ]
    assert versions[0].content == "The team lives in Paris."
    assert versions[1].invalid_reason == "superseded"

    # A window takes only what is true now; one asked for before the move, the old fact.
    now_window = await window_of(c, "Where does the team live? Paris Berlin")
    assert contents(now_window) == ["The team moved to Berlin."]
    then = await window_of(c, "Where does the team live? Paris Berlin", valid_at=before_move)
    assert contents(then) == ["The team lives in Paris."]
    # A search finds current items only.
    found = await c.stub.SearchMemoryItems(
        pb.SearchMemoryItemsRequest(parent=c.workspace, query="Paris Berlin team"),
        metadata=c.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    assert [r.memory_item.name for r in found.results] == [new.name]

    # A retired item cannot be superseded again.
    with pytest.raises(aio.AioRpcError) as error:
        await create(c.stub, c.caller, c.workspace, "Again", supersedes=old.name)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_retiring_by_hand_is_a_version_and_can_be_undone_unless_superseded(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    item = await create(c.stub, c.caller, c.workspace, "The office is on floor three.")
    retire = pb.MemoryItem(name=item.name, invalid_reason="moved out")
    retire.invalid_time.CopyFrom(stamp(dt.datetime.now(dt.UTC)))
    done = await c.stub.UpdateMemoryItem(
        pb.UpdateMemoryItemRequest(
            memory_item=retire,
            update_mask=field_mask_pb2.FieldMask(paths=["invalid_time", "invalid_reason"]),
        ),
        metadata=c.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    assert done.memory_item.HasField("invalid_time")
    assert await listed(c.stub, c.caller, c.workspace) == []
    # Current again: clearing the time.
    back = await c.stub.UpdateMemoryItem(
        pb.UpdateMemoryItemRequest(
            memory_item=pb.MemoryItem(name=item.name),
            update_mask=field_mask_pb2.FieldMask(paths=["invalid_time"]),
        ),
        metadata=c.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    assert not back.memory_item.HasField("invalid_time")
    assert back.memory_item.invalid_reason == ""
    changes = [v.change for v in (await history(c.stub, c.caller, item.name)).history]
    assert changes == [pb.MEMORY_CHANGE_CREATED, pb.MEMORY_CHANGE_RETIRED, pb.MEMORY_CHANGE_EDITED]

    newer = await create(c.stub, c.caller, c.workspace, "Floor four now.", supersedes=item.name)
    assert newer.supersedes == item.name
    with pytest.raises(aio.AioRpcError) as error:
        await c.stub.UpdateMemoryItem(
            pb.UpdateMemoryItemRequest(
                memory_item=pb.MemoryItem(name=item.name),
                update_mask=field_mask_pb2.FieldMask(paths=["invalid_time"]),
            ),
            metadata=c.caller.md,
            timeout=CALL_DEADLINE_S,
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_bad_times_ids_and_references_are_invalid_arguments(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    with pytest.raises(aio.AioRpcError) as error:
        await create(c.stub, c.caller, c.workspace, "x", valid_time=future)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error.value) == ["memory_item.valid_time"]
    with pytest.raises(aio.AioRpcError) as error:
        await create(c.stub, c.caller, c.workspace, "x", memory_id="Not_An_Id")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error.value) == ["memory_item_id"]
    other = await create(c.stub, c.caller, c.caller.name, "mine")
    with pytest.raises(aio.AioRpcError) as error:
        await create(c.stub, c.caller, c.workspace, "x", supersedes=other.name)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error.value) == ["memory_item.supersedes"]
    with pytest.raises(aio.AioRpcError) as error:
        await create(c.stub, c.caller, c.workspace, "x", workspace=c.workspace)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error.value) == ["memory_item.workspace"]


async def test_a_create_with_an_id_is_applied_once(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    first = await create(c.stub, c.caller, c.workspace, "Once.", memory_id="m-once-1")
    assert first.name == f"{c.workspace}/memories/m-once-1"
    with pytest.raises(aio.AioRpcError) as error:
        await create(c.stub, c.caller, c.workspace, "Once.", memory_id="m-once-1")
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await listed(c.stub, c.caller, c.workspace) == ["Once."]


async def test_forgetting_removes_the_item_and_every_item_of_its_history(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    first = await create(c.stub, c.caller, c.caller.name, "Likes tea.")
    second = await create(
        c.stub, c.caller, c.caller.name, "Likes green tea.", supersedes=first.name
    )
    third = await create(
        c.stub, c.caller, c.caller.name, "Likes jasmine tea.", supersedes=second.name
    )
    kept = await create(c.stub, c.caller, c.caller.name, "Plays chess.")
    await c.stub.DeleteMemoryItem(
        pb.DeleteMemoryItemRequest(name=third.name), metadata=c.caller.md, timeout=CALL_DEADLINE_S
    )
    for gone in (first, second, third):
        with pytest.raises(aio.AioRpcError) as error:
            await history(c.stub, c.caller, gone.name)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert await listed(c.stub, c.caller, c.caller.name, pb.MEMORY_VALIDITY_ALL) == [kept.content]


async def test_forgetting_a_retired_item_leaves_the_newer_one_without_a_pointer(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    old = await create(c.stub, c.caller, c.workspace, "Standup at nine.")
    new = await create(c.stub, c.caller, c.workspace, "Standup at ten.", supersedes=old.name)
    await c.stub.DeleteMemoryItem(
        pb.DeleteMemoryItemRequest(name=old.name), metadata=c.caller.md, timeout=CALL_DEADLINE_S
    )
    got = await history(c.stub, c.caller, new.name)
    assert got.memory_item.supersedes == ""
    assert [v.memory_item for v in got.history] == [new.name]


async def test_a_users_item_formed_in_one_workspace_never_reaches_another(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    here = await new_chat(mesh, channel)
    stub, me = here.stub, here.caller
    there_ws = await create_workspace(stub, me, "Elsewhere", workspace_id=f"else-{me.id[:10]}")
    there = Chat(
        stub, me, there_ws.name, (await create_conversation(stub, me, there_ws.name, "t")).name
    )
    formed = await create(stub, me, me.name, "Prefers answers in French.", workspace=here.workspace)
    assert formed.workspace == here.workspace
    written = await create(stub, me, me.name, "Is called Sam.")
    query = "French answers Sam called prefers"
    assert sorted(contents(await window_of(here, query))) == sorted(
        [formed.content, written.content]
    )
    assert contents(await window_of(there, query)) == [written.content]
    assert names((await window_of(there, query)).included, RELEVANT) == [written.name]
    # Listing and searching the user's memory for one workspace.
    assert await listed(stub, me, me.name, workspace=there.workspace) == [written.content]
    assert sorted(await listed(stub, me, me.name, workspace=here.workspace)) == sorted(
        [formed.content, written.content]
    )
    found = await stub.SearchMemoryItems(
        pb.SearchMemoryItemsRequest(parent=me.name, query=query, workspace=there.workspace),
        metadata=me.md,
        timeout=CALL_DEADLINE_S,
    )
    assert [r.memory_item.name for r in found.results] == [written.name]
    # Only a workspace of the user's own can mark an item.
    stranger = await new_caller(mesh)
    with pytest.raises(aio.AioRpcError) as error:
        await create(stub, stranger, stranger.name, "x", workspace=here.workspace)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    # A member may.
    await add_member(stub, me, here.workspace, stranger, pb.WORKSPACE_ROLE_VIEWER)
    theirs = await create(stub, stranger, stranger.name, "x", workspace=here.workspace)
    assert theirs.workspace == here.workspace


async def test_a_workspace_memory_policy_is_set_by_owners_and_checked(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    policy = pb.MemoryPolicy(
        mode=pb.MEMORY_FORMING_MODE_USER_AND_WORKSPACE,
        idle_minutes=5,
        categories=[pb.MemoryCategoryRule(category=pb.MEMORY_CATEGORY_PLANS)],
    )
    policy.categories[0].ttl.FromSeconds(3600)
    mask = field_mask_pb2.FieldMask(paths=["memory_policy"])
    updated = await c.stub.UpdateWorkspace(
        pb.UpdateWorkspaceRequest(
            workspace=pb.Workspace(name=c.workspace, memory_policy=policy), update_mask=mask
        ),
        metadata=c.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    assert updated.workspace.memory_policy == policy
    got = await c.stub.GetWorkspace(
        pb.GetWorkspaceRequest(name=c.workspace), metadata=c.caller.md, timeout=CALL_DEADLINE_S
    )
    assert got.workspace.memory_policy == policy
    bad = pb.MemoryPolicy(
        mode=pb.MEMORY_FORMING_MODE_USER,
        idle_minutes=5000,
        max_candidates=99,
        categories=[
            pb.MemoryCategoryRule(category=pb.MEMORY_CATEGORY_PLANS),
            pb.MemoryCategoryRule(category=pb.MEMORY_CATEGORY_PLANS),
        ],
    )
    with pytest.raises(aio.AioRpcError) as error:
        await c.stub.UpdateWorkspace(
            pb.UpdateWorkspaceRequest(
                workspace=pb.Workspace(name=c.workspace, memory_policy=bad), update_mask=mask
            ),
            metadata=c.caller.md,
            timeout=CALL_DEADLINE_S,
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error.value) == [
        f"workspace.memory_policy.{field}"
        for field in ("idle_minutes", "max_candidates", "categories[1].category")
    ]
    # An editor may not set it.
    editor = await new_caller(mesh)
    await add_member(c.stub, c.caller, c.workspace, editor, pb.WORKSPACE_ROLE_EDITOR)
    with pytest.raises(aio.AioRpcError) as error:
        await c.stub.UpdateWorkspace(
            pb.UpdateWorkspaceRequest(
                workspace=pb.Workspace(name=c.workspace, memory_policy=policy), update_mask=mask
            ),
            metadata=editor.md,
            timeout=CALL_DEADLINE_S,
        )
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_formed_items_provenance_is_memory_formings_to_write(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    formed = pb.MemoryItem(
        kind=pb.MEMORY_KIND_FACT,
        content="Prefers tea.",
        confidence=0.75,
        formation=pb.MemoryFormation(
            assistant=f"{c.workspace}/assistants/keeper", policy="assistant", model="p/m"
        ),
    )
    request = pb.CreateMemoryItemRequest(parent=c.workspace, memory_item=formed)
    # A person cannot claim an assistant formed what they wrote.
    with pytest.raises(aio.AioRpcError) as error:
        await c.stub.CreateMemoryItem(request, metadata=c.caller.md, timeout=CALL_DEADLINE_S)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error.value) == ["memory_item.formation", "memory_item.confidence"]
    # Memory forming acts for the person without their session or key.
    forming = Principal(c.caller.id, AuthMethod.PASSWORD, frozenset({Scope.READ, Scope.WRITE}))
    item = await built(mesh, ContextDomain).memory.create(forming, request)
    assert item.confidence == pytest.approx(0.75)
    assert item.formation == formed.formation
    [version] = (await history(c.stub, c.caller, item.name)).history
    assert version.editor == formed.formation.assistant
