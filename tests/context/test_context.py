"""ContextService end to end in one process, on SQLite and on a real PostgreSQL server.

Workspaces and members, conversations, messages (pagination under concurrent
appends), memory items, full-text search, entity extraction, and the event
every write publishes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc import aio
from sqlalchemy import func, select, update

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import MemoryItemRow, MessageRow
from tests.conftest import CALL_DEADLINE_S, make_settings, started
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import (
    Caller,
    EventTap,
    Stub,
    World,
    add_member,
    all_messages,
    append,
    context_stub,
    create_conversation,
    create_workspace,
    ctx_world,
    events_fixture,
    every,
    from_now,
    get_conversation,
    get_memory_item,
    get_workspace,
    mask,
    member_name,
    memory_item,
    new_caller,
    paged,
    refused,
    remember,
    rpc,
    search,
    struct,
    stub_fixture,
    summary,
    text_message,
    violations,
)
from tests.kits.modulekit import module_channel_fixture, module_database_url_fixture

# One server per backend for the module (starting one per test was most of the module's
# time); each test works in workspaces, users and conversations of its own, so nothing
# one test does is seen by the next.
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ABORTED = grpc.StatusCode.ABORTED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

WS_CHANGED = events_pb2.EVENT_TYPE_WORKSPACE_CHANGED
MEMBER_CHANGED = events_pb2.EVENT_TYPE_MEMBER_CHANGED
CONV_CHANGED = events_pb2.EVENT_TYPE_CONVERSATION_CHANGED
MESSAGE_CREATED = events_pb2.EVENT_TYPE_MESSAGE_CREATED
MEMORY_CHANGED = events_pb2.EVENT_TYPE_MEMORY_CHANGED
CREATED = events_pb2.CHANGE_KIND_CREATED
UPDATED = events_pb2.CHANGE_KIND_UPDATED
DELETED = events_pb2.CHANGE_KIND_DELETED

_GENERATED_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(module_database_url: str) -> AsyncIterator[SwitchboardServer]:
    async with started(make_settings(database_url=module_database_url)) as server:
        yield server


channel = module_channel_fixture


@pytest_asyncio.fixture(loop_scope="module")
async def world(mesh: SwitchboardServer, stub: Stub) -> World:
    """A workspace of this test's own, with users of its own in each role."""
    return await ctx_world(mesh, stub)


stub, events = stub_fixture, events_fixture


@asynccontextmanager
async def limited_mesh(
    database_url: str, **overrides: object
) -> AsyncIterator[tuple[SwitchboardServer, Stub]]:
    """A mesh with some context limits lowered, and a stub to it."""
    server, _port = await create_server(make_settings(database_url=database_url, **overrides))
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            yield server, context_stub(channel)
    finally:
        await server.shutdown(grace=0)


def _id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


async def _list_workspaces(
    stub: Stub, caller: Caller, *, show_deleted: bool = False, page_size: int = 100
) -> list[pb.Workspace]:
    return await every(
        lambda token: rpc(
            stub.ListWorkspaces,
            pb.ListWorkspacesRequest(
                page_size=page_size, page_token=token, show_deleted=show_deleted
            ),
            caller,
        ),
        lambda page: page.workspaces,
    )


async def _list_conversations(
    stub: Stub,
    caller: Caller,
    parent: str,
    *,
    show_archived: bool = False,
    show_deleted: bool = False,
    page_size: int = 100,
) -> list[str]:
    return await every(
        lambda token: rpc(
            stub.ListConversations,
            pb.ListConversationsRequest(
                parent=parent,
                page_size=page_size,
                page_token=token,
                show_archived=show_archived,
                show_deleted=show_deleted,
            ),
            caller,
        ),
        lambda page: [c.name for c in page.conversations],
    )


async def _list_memory(
    stub: Stub,
    caller: Caller,
    parent: str,
    *kinds: pb.MemoryKind.ValueType,
    pinned_only: bool = False,
    page_size: int = 100,
) -> list[pb.MemoryItem]:
    return await every(
        lambda token: rpc(
            stub.ListMemoryItems,
            pb.ListMemoryItemsRequest(
                parent=parent,
                page_size=page_size,
                page_token=token,
                kinds=list(kinds),
                pinned_only=pinned_only,
            ),
            caller,
        ),
        lambda page: page.memory_items,
    )


async def _update_conversation(
    stub: Stub, caller: Caller, conversation: pb.Conversation, *paths: str
) -> pb.Conversation:
    response = await rpc(
        stub.UpdateConversation,
        pb.UpdateConversationRequest(conversation=conversation, update_mask=mask(*paths)),
        caller,
    )
    return response.conversation


def _tampered(token: str) -> str:
    """``token`` with one character changed (inside its MAC)."""
    index = 3
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1 :]


# -- workspaces -----------------------------------------------------------------------------


async def test_create_workspace_makes_the_caller_its_owner(
    mesh: SwitchboardServer, stub: Stub
) -> None:
    owner = await new_caller(mesh)
    created = await create_workspace(
        stub, owner, "  Team Alpha  ", workspace_id="team-alpha", description="the A team"
    )
    assert created.name == "workspaces/team-alpha"
    assert created.display_name == "Team Alpha"
    assert created.description == "the A team"
    assert created.caller_role == pb.WORKSPACE_ROLE_OWNER
    assert created.etag
    assert created.HasField("create_time")
    assert created.HasField("update_time")
    assert not created.HasField("delete_time")

    got = await get_workspace(stub, owner, created.name)
    assert got == created

    members = await rpc(
        stub.ListWorkspaceMembers, pb.ListWorkspaceMembersRequest(parent=created.name), owner
    )
    assert [(m.name, m.user, m.role) for m in members.members] == [
        (member_name(created.name, owner), owner.name, pb.WORKSPACE_ROLE_OWNER)
    ]

    # Without a client-chosen id the server picks a fresh, valid one each time.
    first = await create_workspace(stub, owner, "Random one")
    second = await create_workspace(stub, owner, "Random two")
    assert first.name != second.name
    for workspace in (first, second):
        assert workspace.name.startswith("workspaces/")
        assert _GENERATED_ID.match(_id(workspace.name))
        assert (await get_workspace(stub, owner, workspace.name)).display_name == (
            workspace.display_name
        )


async def test_workspace_id_and_display_name_are_validated(
    mesh: SwitchboardServer, stub: Stub
) -> None:
    owner = await new_caller(mesh)
    for bad in ("ab", "Upper-case", "1-starts-with-a-digit", "under_score", "a" * 64, "sp ace"):
        error = await refused(create_workspace(stub, owner, "Name", workspace_id=bad), INVALID)
        assert violations(error) == ["workspace_id"], bad
    # The rule in words, as the console's hint says it, not a regular expression.
    error = await refused(create_workspace(stub, owner, "Name", workspace_id="ab"), INVALID)
    rule = (
        "must be 3 to 63 characters: lowercase letters, digits and hyphens, starting with a letter"
    )
    assert error.details() == f"workspace_id {rule}"
    [violation] = detail(error, error_details_pb2.BadRequest).field_violations
    assert violation.description == rule
    for blank in ("", "   "):
        error = await refused(create_workspace(stub, owner, blank), INVALID)
        assert violations(error) == ["workspace.display_name"]
    # Every invalid field is reported at once.
    error = await refused(create_workspace(stub, owner, "", workspace_id="X"), INVALID)
    assert violations(error) == ["workspace_id", "workspace.display_name"]
    error = await refused(create_workspace(stub, owner, "n" * 201), INVALID)
    assert violations(error) == ["workspace.display_name"]
    assert await _list_workspaces(stub, owner) == []

    # The longest valid id (63 characters) works end to end.
    longest = "a" + "b" * 62
    created = await create_workspace(stub, owner, "Long", workspace_id=longest)
    assert created.name == f"workspaces/{longest}"
    assert (await get_workspace(stub, owner, created.name)).name == created.name


async def test_duplicate_workspace_id_is_already_exists(
    mesh: SwitchboardServer, stub: Stub
) -> None:
    owner, other = await new_caller(mesh), await new_caller(mesh)
    first = await create_workspace(stub, owner, "First", workspace_id="taken-id")
    for caller in (owner, other):
        error = await refused(
            create_workspace(stub, caller, "Second", workspace_id="taken-id"),
            grpc.StatusCode.ALREADY_EXISTS,
        )
        assert reason(error) == "ERROR_REASON_ALREADY_EXISTS"
    assert await get_workspace(stub, owner, first.name) == first
    assert await _list_workspaces(stub, other) == []


async def test_create_workspace_retry_with_the_same_request_id_creates_one(
    mesh: SwitchboardServer, stub: Stub, events: EventTap
) -> None:
    owner, other = await new_caller(mesh), await new_caller(mesh)
    events.take()
    first = await create_workspace(stub, owner, "Once", request_id="create-ws-1")
    again = await create_workspace(stub, owner, "Once", request_id="create-ws-1")
    assert again.name == first.name
    assert again.etag == first.etag
    assert [w.name for w in await _list_workspaces(stub, owner)] == [first.name]
    assert [summary(e) for e in events.take()] == [(WS_CHANGED, CREATED, first.name)]

    # The same request_id for a different request is refused, and creates nothing.
    error = await refused(
        create_workspace(stub, owner, "Something else", request_id="create-ws-1"), INVALID
    )
    assert violations(error) == ["request_id"]
    error = await refused(create_workspace(stub, owner, "Bad key", request_id="has space"), INVALID)
    assert violations(error) == ["request_id"]
    assert [w.name for w in await _list_workspaces(stub, owner)] == [first.name]
    assert events.take() == []

    # Request ids belong to the caller: another user's identical request is a new one.
    theirs = await create_workspace(stub, other, "Once", request_id="create-ws-1")
    assert theirs.name != first.name
    assert [w.name for w in await _list_workspaces(stub, other)] == [theirs.name]


async def test_concurrent_retries_create_one_workspace(mesh: SwitchboardServer, stub: Stub) -> None:
    owner = await new_caller(mesh)
    results = await asyncio.gather(
        *(create_workspace(stub, owner, "Racy", request_id="race-1") for _ in range(4))
    )
    assert len({w.name for w in results}) == 1
    assert [w.name for w in await _list_workspaces(stub, owner)] == [results[0].name]


async def test_list_workspaces_pages_through_only_the_callers(
    mesh: SwitchboardServer, stub: Stub
) -> None:
    me, other = await new_caller(mesh), await new_caller(mesh)
    mine = [(await create_workspace(stub, me, f"Mine {i}")).name for i in range(4)]
    theirs = await create_workspace(stub, other, "Theirs")
    shared = await create_workspace(stub, other, "Shared")
    await add_member(stub, other, shared.name, me, pb.WORKSPACE_ROLE_VIEWER)
    expected = {*mine, shared.name}

    pages, tokens = await paged(
        lambda token: rpc(
            stub.ListWorkspaces, pb.ListWorkspacesRequest(page_size=2, page_token=token), me
        ),
        lambda page: page.workspaces,
    )
    first_token = tokens[0]
    assert [len(p) for p in pages] == [2, 2, 1]
    listed = [w.name for p in pages for w in p]
    assert len(listed) == len(set(listed)) == 5
    assert set(listed) == expected
    assert theirs.name not in listed
    roles = {w.name: w.caller_role for p in pages for w in p}
    assert roles[shared.name] == pb.WORKSPACE_ROLE_VIEWER
    assert {roles[name] for name in mine} == {pb.WORKSPACE_ROLE_OWNER}

    for bad_request in (
        pb.ListWorkspacesRequest(page_size=2, page_token=_tampered(first_token)),
        pb.ListWorkspacesRequest(page_size=2, page_token="not-a-page-token"),
        pb.ListWorkspacesRequest(page_size=2, page_token=first_token, show_deleted=True),
    ):
        error = await refused(rpc(stub.ListWorkspaces, bad_request, me), INVALID)
        assert violations(error) == ["page_token"]
    # Another caller cannot continue my listing either.
    error = await refused(
        rpc(
            stub.ListWorkspaces,
            pb.ListWorkspacesRequest(page_size=2, page_token=first_token),
            other,
        ),
        INVALID,
    )
    assert violations(error) == ["page_token"]
    error = await refused(
        rpc(stub.ListWorkspaces, pb.ListWorkspacesRequest(page_size=-1), me),
        INVALID,
    )
    assert violations(error) == ["page_size"]


async def test_update_workspace_changes_only_the_masked_fields(
    stub: Stub, world: World, events: EventTap
) -> None:
    events.take()
    original = await get_workspace(stub, world.owner, world.name)
    renamed = (
        await rpc(
            stub.UpdateWorkspace,
            pb.UpdateWorkspaceRequest(
                workspace=pb.Workspace(
                    name=world.name, display_name="Renamed", description="not in the mask"
                ),
                update_mask=mask("display_name"),
            ),
            world.owner,
        )
    ).workspace
    assert renamed.display_name == "Renamed"
    assert renamed.description == original.description == ""
    assert renamed.etag != original.etag
    assert renamed.create_time == original.create_time
    assert renamed.update_time.ToDatetime() >= original.update_time.ToDatetime()

    described = (
        await rpc(
            stub.UpdateWorkspace,
            pb.UpdateWorkspaceRequest(
                workspace=pb.Workspace(
                    name=world.name,
                    display_name="ignored",
                    description="Now described",
                    etag=renamed.etag,
                ),
                update_mask=mask("description"),
            ),
            world.owner,
        )
    ).workspace
    assert (described.display_name, described.description) == ("Renamed", "Now described")
    assert len({original.etag, renamed.etag, described.etag}) == 3
    assert await get_workspace(stub, world.owner, world.name) == described
    assert [summary(e) for e in events.take()] == [
        (WS_CHANGED, UPDATED, world.name),
        (WS_CHANGED, UPDATED, world.name),
    ]

    # Stale etag: ABORTED, nothing changes, nothing is published.
    error = await refused(
        rpc(
            stub.UpdateWorkspace,
            pb.UpdateWorkspaceRequest(
                workspace=pb.Workspace(name=world.name, display_name="Lost", etag=renamed.etag),
                update_mask=mask("display_name"),
            ),
            world.owner,
        ),
        ABORTED,
    )
    assert reason(error) == "ERROR_REASON_ETAG_MISMATCH"
    # Editors may not update the workspace.
    await refused(
        rpc(
            stub.UpdateWorkspace,
            pb.UpdateWorkspaceRequest(
                workspace=pb.Workspace(name=world.name, display_name="Editor's"),
                update_mask=mask("display_name"),
            ),
            world.editor,
        ),
        DENIED,
    )
    error = await refused(
        rpc(
            stub.UpdateWorkspace,
            pb.UpdateWorkspaceRequest(
                workspace=pb.Workspace(name=world.name, display_name="  "),
                update_mask=mask("display_name"),
            ),
            world.owner,
        ),
        INVALID,
    )
    assert violations(error) == ["workspace.display_name"]
    assert await get_workspace(stub, world.owner, world.name) == described
    assert events.take() == []


async def test_update_mask_with_immutable_or_unknown_fields_changes_nothing(
    stub: Stub, world: World, events: EventTap
) -> None:
    events.take()
    before = await get_workspace(stub, world.owner, world.name)
    for path in (
        "name",
        "create_time",
        "update_time",
        "delete_time",
        "etag",
        "caller_role",
        "no_such_field",
    ):
        error = await refused(
            rpc(
                stub.UpdateWorkspace,
                pb.UpdateWorkspaceRequest(
                    workspace=pb.Workspace(
                        name=world.name, display_name="Changed", etag="W/9", description="d"
                    ),
                    update_mask=mask("display_name", path),
                ),
                world.owner,
            ),
            INVALID,
        )
        assert violations(error) == ["update_mask.paths"], path
    error = await refused(
        rpc(
            stub.UpdateWorkspace,
            pb.UpdateWorkspaceRequest(
                workspace=pb.Workspace(name=world.name, display_name="Changed"),
                update_mask=mask("name", "create_time", "etag", "bogus"),
            ),
            world.owner,
        ),
        INVALID,
    )
    assert violations(error) == ["update_mask.paths"] * 4
    assert await get_workspace(stub, world.owner, world.name) == before
    assert events.take() == []


async def test_deleted_workspace_is_gone_for_members_until_undeleted(
    stub: Stub, world: World
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    current = await get_workspace(stub, world.owner, world.name)
    await refused(
        rpc(stub.DeleteWorkspace, pb.DeleteWorkspaceRequest(name=world.name), world.editor),
        DENIED,
    )
    error = await refused(
        rpc(
            stub.DeleteWorkspace,
            pb.DeleteWorkspaceRequest(name=world.name, etag='"999"'),
            world.owner,
        ),
        ABORTED,
    )
    assert reason(error) == "ERROR_REASON_ETAG_MISMATCH"
    deleted = (
        await rpc(
            stub.DeleteWorkspace,
            pb.DeleteWorkspaceRequest(name=world.name, etag=current.etag),
            world.owner,
        )
    ).workspace
    assert deleted.name == world.name
    assert deleted.HasField("delete_time")
    assert deleted.etag != current.etag

    for caller in (world.owner, world.editor, world.viewer):
        await refused(get_workspace(stub, caller, world.name), NOT_FOUND)
        await refused(
            rpc(stub.ListConversations, pb.ListConversationsRequest(parent=world.name), caller),
            NOT_FOUND,
        )
        await refused(get_conversation(stub, caller, conversation.name), NOT_FOUND)
        assert world.name not in [w.name for w in await _list_workspaces(stub, caller)]
    await refused(create_conversation(stub, world.owner, world.name), NOT_FOUND)
    await refused(
        rpc(stub.DeleteWorkspace, pb.DeleteWorkspaceRequest(name=world.name), world.owner),
        NOT_FOUND,
    )

    # show_deleted shows it to its owners only.
    shown = [
        w
        for w in await _list_workspaces(stub, world.owner, show_deleted=True)
        if w.name == world.name
    ]
    assert len(shown) == 1
    assert shown[0].HasField("delete_time")
    for caller in (world.editor, world.viewer):
        listed = await _list_workspaces(stub, caller, show_deleted=True)
        assert world.name not in [w.name for w in listed]

    await refused(
        rpc(stub.UndeleteWorkspace, pb.UndeleteWorkspaceRequest(name=world.name), world.editor),
        DENIED,
    )
    await refused(
        rpc(stub.UndeleteWorkspace, pb.UndeleteWorkspaceRequest(name=world.name), world.outsider),
        NOT_FOUND,
    )
    restored = (
        await rpc(
            stub.UndeleteWorkspace,
            pb.UndeleteWorkspaceRequest(name=world.name, etag=deleted.etag),
            world.owner,
        )
    ).workspace
    assert not restored.HasField("delete_time")
    assert restored.caller_role == pb.WORKSPACE_ROLE_OWNER
    for caller in (world.owner, world.editor, world.viewer):
        assert (await get_workspace(stub, caller, world.name)).etag == restored.etag
    assert (await get_conversation(stub, world.viewer, conversation.name)) == conversation

    error = await refused(
        rpc(stub.UndeleteWorkspace, pb.UndeleteWorkspaceRequest(name=world.name), world.owner),
        PRECONDITION,
    )
    assert reason(error) == "ERROR_REASON_FAILED_PRECONDITION"


async def test_get_workspace_reports_each_callers_role(stub: Stub, world: World) -> None:
    expected = {
        world.owner: pb.WORKSPACE_ROLE_OWNER,
        world.editor: pb.WORKSPACE_ROLE_EDITOR,
        world.viewer: pb.WORKSPACE_ROLE_VIEWER,
    }
    for caller, role in expected.items():
        assert (await get_workspace(stub, caller, world.name)).caller_role == role
    await refused(get_workspace(stub, world.outsider, world.name), NOT_FOUND)
    await refused(get_workspace(stub, world.owner, "workspaces/never-created"), NOT_FOUND)
    error = await refused(get_workspace(stub, world.owner, "workspaces/Bad_Name"), INVALID)
    assert violations(error) == ["name"]


# -- members ---------------------------------------------------------------------------------


async def test_add_member_errors(mesh: SwitchboardServer, stub: Stub, world: World) -> None:
    newcomer = await new_caller(mesh)
    error = await refused(
        rpc(
            stub.AddWorkspaceMember,
            pb.AddWorkspaceMemberRequest(
                parent=world.name,
                user="users/0123456789abcdef0123456789abcdef",
                role=pb.WORKSPACE_ROLE_EDITOR,
            ),
            world.owner,
        ),
        NOT_FOUND,
    )
    assert reason(error) == "ERROR_REASON_NOT_FOUND"
    error = await refused(
        add_member(stub, world.owner, world.name, world.editor, pb.WORKSPACE_ROLE_VIEWER),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert reason(error) == "ERROR_REASON_ALREADY_EXISTS"
    error = await refused(
        add_member(stub, world.owner, world.name, newcomer, pb.WORKSPACE_ROLE_UNSPECIFIED),
        INVALID,
    )
    assert violations(error) == ["role"]
    error = await refused(
        rpc(
            stub.AddWorkspaceMember,
            pb.AddWorkspaceMemberRequest(
                parent=world.name, user="not-a-user", role=pb.WORKSPACE_ROLE_VIEWER
            ),
            world.owner,
        ),
        INVALID,
    )
    assert violations(error) == ["user"]
    # Only owners add members; outsiders do not learn the workspace exists.
    await refused(
        add_member(stub, world.editor, world.name, newcomer, pb.WORKSPACE_ROLE_VIEWER), DENIED
    )
    await refused(
        add_member(stub, world.outsider, world.name, newcomer, pb.WORKSPACE_ROLE_VIEWER),
        NOT_FOUND,
    )
    await refused(get_workspace(stub, newcomer, world.name), NOT_FOUND)
    # The editor kept its role.
    assert (await get_workspace(stub, world.editor, world.name)).caller_role == (
        pb.WORKSPACE_ROLE_EDITOR
    )

    added = await add_member(stub, world.owner, world.name, newcomer, pb.WORKSPACE_ROLE_EDITOR)
    assert added.name == member_name(world.name, newcomer)
    assert added.user == newcomer.name
    assert added.role == pb.WORKSPACE_ROLE_EDITOR
    assert added.HasField("create_time")
    assert (await get_workspace(stub, newcomer, world.name)).caller_role == (
        pb.WORKSPACE_ROLE_EDITOR
    )


async def test_update_member_role(stub: Stub, world: World) -> None:
    await refused(create_conversation(stub, world.viewer, world.name), DENIED)
    promoted = (
        await rpc(
            stub.UpdateWorkspaceMember,
            pb.UpdateWorkspaceMemberRequest(
                member=pb.WorkspaceMember(
                    name=member_name(world.name, world.viewer), role=pb.WORKSPACE_ROLE_EDITOR
                ),
                update_mask=mask("role"),
            ),
            world.owner,
        )
    ).member
    assert promoted.name == member_name(world.name, world.viewer)
    assert promoted.user == world.viewer.name
    assert promoted.role == pb.WORKSPACE_ROLE_EDITOR
    # The new role takes effect on the next call.
    assert (await create_conversation(stub, world.viewer, world.name)).name
    assert (await get_workspace(stub, world.viewer, world.name)).caller_role == (
        pb.WORKSPACE_ROLE_EDITOR
    )

    for bad_mask, role, field in (
        (mask("user"), pb.WORKSPACE_ROLE_VIEWER, "update_mask.paths"),
        (mask("role", "create_time"), pb.WORKSPACE_ROLE_VIEWER, "update_mask.paths"),
        (mask("role"), pb.WORKSPACE_ROLE_UNSPECIFIED, "member.role"),
    ):
        error = await refused(
            rpc(
                stub.UpdateWorkspaceMember,
                pb.UpdateWorkspaceMemberRequest(
                    member=pb.WorkspaceMember(
                        name=member_name(world.name, world.viewer), role=role
                    ),
                    update_mask=bad_mask,
                ),
                world.owner,
            ),
            INVALID,
        )
        assert violations(error) == [field]
    await refused(
        rpc(
            stub.UpdateWorkspaceMember,
            pb.UpdateWorkspaceMemberRequest(
                member=pb.WorkspaceMember(
                    name=member_name(world.name, world.outsider), role=pb.WORKSPACE_ROLE_OWNER
                ),
                update_mask=mask("role"),
            ),
            world.owner,
        ),
        NOT_FOUND,
    )
    # Editors cannot change roles (not even their own).
    await refused(
        rpc(
            stub.UpdateWorkspaceMember,
            pb.UpdateWorkspaceMemberRequest(
                member=pb.WorkspaceMember(
                    name=member_name(world.name, world.editor), role=pb.WORKSPACE_ROLE_OWNER
                ),
                update_mask=mask("role"),
            ),
            world.editor,
        ),
        DENIED,
    )
    assert (await get_workspace(stub, world.viewer, world.name)).caller_role == (
        pb.WORKSPACE_ROLE_EDITOR
    )


async def _set_role(
    stub: Stub, owner: Caller, workspace: str, user: Caller, role: pb.WorkspaceRole.ValueType
) -> pb.WorkspaceMember:
    response = await rpc(
        stub.UpdateWorkspaceMember,
        pb.UpdateWorkspaceMemberRequest(
            member=pb.WorkspaceMember(name=member_name(workspace, user), role=role),
            update_mask=mask("role"),
        ),
        owner,
    )
    return response.member


async def _remove(stub: Stub, caller: Caller, workspace: str, user: Caller) -> None:
    await rpc(
        stub.RemoveWorkspaceMember,
        pb.RemoveWorkspaceMemberRequest(name=member_name(workspace, user)),
        caller,
    )


async def test_the_last_owner_cannot_be_demoted_or_removed(stub: Stub, world: World) -> None:
    for attempt in (
        _set_role(stub, world.owner, world.name, world.owner, pb.WORKSPACE_ROLE_EDITOR),
        _remove(stub, world.owner, world.name, world.owner),
    ):
        error = await refused(attempt, PRECONDITION)
        assert reason(error) == "ERROR_REASON_FAILED_PRECONDITION"
    assert (await get_workspace(stub, world.owner, world.name)).caller_role == (
        pb.WORKSPACE_ROLE_OWNER
    )

    # With a second owner, the first may step down; then the second is the last one.
    await _set_role(stub, world.owner, world.name, world.editor, pb.WORKSPACE_ROLE_OWNER)
    demoted = await _set_role(stub, world.owner, world.name, world.owner, pb.WORKSPACE_ROLE_VIEWER)
    assert demoted.role == pb.WORKSPACE_ROLE_VIEWER
    assert (await get_workspace(stub, world.owner, world.name)).caller_role == (
        pb.WORKSPACE_ROLE_VIEWER
    )
    await refused(_remove(stub, world.editor, world.name, world.editor), PRECONDITION)
    await refused(
        _set_role(stub, world.editor, world.name, world.editor, pb.WORKSPACE_ROLE_EDITOR),
        PRECONDITION,
    )
    # The former owner is now a viewer and may not manage members.
    await refused(
        _set_role(stub, world.owner, world.name, world.owner, pb.WORKSPACE_ROLE_OWNER), DENIED
    )
    assert (await get_workspace(stub, world.editor, world.name)).caller_role == (
        pb.WORKSPACE_ROLE_OWNER
    )


async def test_list_members_pages_through_every_member(
    mesh: SwitchboardServer, stub: Stub, world: World
) -> None:
    extra = [await new_caller(mesh) for _ in range(2)]
    for caller in extra:
        await add_member(stub, world.owner, world.name, caller, pb.WORKSPACE_ROLE_VIEWER)
    expected = {
        world.owner.name: pb.WORKSPACE_ROLE_OWNER,
        world.editor.name: pb.WORKSPACE_ROLE_EDITOR,
        world.viewer.name: pb.WORKSPACE_ROLE_VIEWER,
        **{caller.name: pb.WORKSPACE_ROLE_VIEWER for caller in extra},
    }
    pages, tokens = await paged(
        lambda token: rpc(
            stub.ListWorkspaceMembers,
            pb.ListWorkspaceMembersRequest(parent=world.name, page_size=2, page_token=token),
            world.viewer,
        ),
        lambda page: page.members,
    )
    token = tokens[-1]
    listed = [m for page in pages for m in page]
    assert [len(page) for page in pages] == [2, 2, 1]
    assert len(listed) == 5
    assert {m.user: m.role for m in listed} == expected
    assert all(m.name == f"{world.name}/members/{_id(m.user)}" for m in listed)
    await refused(
        rpc(
            stub.ListWorkspaceMembers,
            pb.ListWorkspaceMembersRequest(parent=world.name),
            world.outsider,
        ),
        NOT_FOUND,
    )
    error = await refused(
        rpc(
            stub.ListWorkspaceMembers,
            pb.ListWorkspaceMembersRequest(parent=world.name, page_token=_tampered(token)),
            world.viewer,
        ),
        INVALID,
    )
    assert violations(error) == ["page_token"]


async def test_a_removed_member_immediately_loses_access(stub: Stub, world: World) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    assert (await get_conversation(stub, world.viewer, conversation.name)).name
    await refused(_remove(stub, world.editor, world.name, world.viewer), DENIED)
    await _remove(stub, world.owner, world.name, world.viewer)
    await refused(get_workspace(stub, world.viewer, world.name), NOT_FOUND)
    await refused(get_conversation(stub, world.viewer, conversation.name), NOT_FOUND)
    await refused(
        rpc(stub.ListConversations, pb.ListConversationsRequest(parent=world.name), world.viewer),
        NOT_FOUND,
    )
    assert world.name not in [w.name for w in await _list_workspaces(stub, world.viewer)]
    await refused(_remove(stub, world.owner, world.name, world.viewer), NOT_FOUND)
    # The others are untouched.
    assert (await get_workspace(stub, world.editor, world.name)).caller_role == (
        pb.WORKSPACE_ROLE_EDITOR
    )


async def test_a_member_may_remove_themselves(stub: Stub, world: World) -> None:
    # The contract: "Removes a member (owners, or members removing themselves)."
    await _remove(stub, world.viewer, world.name, world.viewer)
    await refused(get_workspace(stub, world.viewer, world.name), NOT_FOUND)
    # ...but only themselves.
    await refused(_remove(stub, world.editor, world.name, world.owner), DENIED)


async def test_member_events_name_the_member_and_the_workspace(
    mesh: SwitchboardServer, stub: Stub, world: World, events: EventTap
) -> None:
    newcomer = await new_caller(mesh)
    events.take()
    await add_member(stub, world.owner, world.name, newcomer, pb.WORKSPACE_ROLE_VIEWER)
    await _set_role(stub, world.owner, world.name, newcomer, pb.WORKSPACE_ROLE_EDITOR)
    await _remove(stub, world.owner, world.name, newcomer)
    got = events.take()
    assert [(e.type, e.member_changed.change) for e in got] == [
        (MEMBER_CHANGED, CREATED),
        (MEMBER_CHANGED, UPDATED),
        (MEMBER_CHANGED, DELETED),
    ]
    for event in got:
        assert event.workspace == world.name
        assert event.member_changed.member.user == newcomer.name
        assert event.member_changed.member.name == member_name(world.name, newcomer)
        assert event.actor.name == world.owner.name
    assert [e.member_changed.member.role for e in got] == [
        pb.WORKSPACE_ROLE_VIEWER,
        pb.WORKSPACE_ROLE_EDITOR,
        pb.WORKSPACE_ROLE_EDITOR,  # a deletion carries the membership before it
    ]


# -- conversations ------------------------------------------------------------------------------


async def test_create_and_get_a_conversation(stub: Stub, world: World) -> None:
    metadata = struct(topic="billing", priority=3, tags=["a", "b"])
    created = await create_conversation(
        stub, world.editor, world.name, "Invoices", metadata=metadata
    )
    assert created.name.startswith(f"{world.name}/conversations/")
    assert _GENERATED_ID.match(_id(created.name))
    assert created.title == "Invoices"
    assert created.metadata == metadata
    assert created.creator == world.editor.name
    assert not created.archived
    assert created.message_count == 0
    assert created.etag
    assert created.version >= 1
    assert created.HasField("create_time")
    assert not created.HasField("delete_time")
    for caller in (world.owner, world.editor, world.viewer):
        assert await get_conversation(stub, caller, created.name) == created

    await refused(create_conversation(stub, world.viewer, world.name), DENIED)
    await refused(create_conversation(stub, world.outsider, world.name), NOT_FOUND)
    await refused(get_conversation(stub, world.outsider, created.name), NOT_FOUND)
    error = await refused(create_conversation(stub, world.editor, world.name, "t" * 201), INVALID)
    assert violations(error) == ["conversation.title"]
    await refused(
        get_conversation(stub, world.viewer, f"{world.name}/conversations/nothing-here"),
        NOT_FOUND,
    )
    error = await refused(
        get_conversation(stub, world.viewer, f"{world.name}/conversations/Not_Valid"), INVALID
    )
    assert violations(error) == ["name"]
    assert await _list_conversations(stub, world.viewer, world.name) == [created.name]


async def test_create_conversation_retry_with_the_same_request_id_creates_one(
    stub: Stub, world: World, events: EventTap
) -> None:
    events.take()
    first = await create_conversation(stub, world.editor, world.name, "Once", request_id="c-1")
    again = await create_conversation(stub, world.editor, world.name, "Once", request_id="c-1")
    assert again == first
    assert await _list_conversations(stub, world.viewer, world.name) == [first.name]
    assert [summary(e) for e in events.take()] == [(CONV_CHANGED, CREATED, first.name)]
    error = await refused(
        create_conversation(stub, world.editor, world.name, "Other", request_id="c-1"), INVALID
    )
    assert violations(error) == ["request_id"]
    # Another caller's request_id is their own.
    theirs = await create_conversation(stub, world.owner, world.name, "Once", request_id="c-1")
    assert theirs.name != first.name
    assert sorted(await _list_conversations(stub, world.viewer, world.name)) == sorted(
        [first.name, theirs.name]
    )


async def test_conversations_list_most_recently_updated_first(stub: Stub, world: World) -> None:
    c1, c2, c3 = [
        (await create_conversation(stub, world.editor, world.name, f"c{i}")).name for i in (1, 2, 3)
    ]
    assert await _list_conversations(stub, world.viewer, world.name) == [c3, c2, c1]
    await append(stub, world.editor, c1, "bump")
    assert await _list_conversations(stub, world.viewer, world.name) == [c1, c3, c2]
    assert await _list_conversations(stub, world.viewer, world.name, page_size=2) == [c1, c3, c2]
    await append(stub, world.editor, c2, "bump")
    assert await _list_conversations(stub, world.viewer, world.name, page_size=1) == [c2, c1, c3]


async def test_conversation_list_filters_archived_and_deleted(stub: Stub, world: World) -> None:
    live, archived, deleted = [
        await create_conversation(stub, world.editor, world.name, title)
        for title in ("live", "archived", "deleted")
    ]
    await _update_conversation(
        stub,
        world.editor,
        pb.Conversation(name=archived.name, archived=True),
        "archived",
    )
    await rpc(
        stub.DeleteConversation, pb.DeleteConversationRequest(name=deleted.name), world.editor
    )

    async def listed(**flags: bool) -> set[str]:
        return set(await _list_conversations(stub, world.viewer, world.name, **flags))

    assert await listed() == {live.name}
    assert await listed(show_archived=True) == {live.name, archived.name}
    assert await listed(show_deleted=True) == {live.name, deleted.name}
    assert await listed(show_archived=True, show_deleted=True) == {
        live.name,
        archived.name,
        deleted.name,
    }

    first = await rpc(
        stub.ListConversations,
        pb.ListConversationsRequest(parent=world.name, page_size=1, show_deleted=True),
        world.viewer,
    )
    assert first.next_page_token
    error = await refused(
        rpc(
            stub.ListConversations,
            pb.ListConversationsRequest(
                parent=world.name, page_size=1, page_token=first.next_page_token
            ),
            world.viewer,
        ),
        INVALID,
    )
    assert violations(error) == ["page_token"]


async def test_update_conversation_with_mask_and_etag(
    stub: Stub, world: World, events: EventTap
) -> None:
    original = await create_conversation(
        stub, world.editor, world.name, "Before", metadata=struct(keep="me")
    )
    events.take()
    titled = await _update_conversation(
        stub,
        world.editor,
        pb.Conversation(
            name=original.name, title="After", metadata=struct(ignored=True), etag=original.etag
        ),
        "title",
    )
    assert titled.title == "After"
    assert titled.metadata == struct(keep="me")
    assert titled.etag != original.etag
    assert titled.version > original.version

    retagged = await _update_conversation(
        stub,
        world.owner,
        pb.Conversation(name=original.name, title="ignored", metadata=struct(new="value")),
        "metadata",
    )
    assert (retagged.title, retagged.metadata) == ("After", struct(new="value"))
    assert await get_conversation(stub, world.viewer, original.name) == retagged
    assert [summary(e) for e in events.take()] == [
        (CONV_CHANGED, UPDATED, original.name),
        (CONV_CHANGED, UPDATED, original.name),
    ]

    error = await refused(
        _update_conversation(
            stub,
            world.editor,
            pb.Conversation(name=original.name, title="Stale", etag=titled.etag),
            "title",
        ),
        ABORTED,
    )
    assert reason(error) == "ERROR_REASON_ETAG_MISMATCH"
    for path in ("creator", "message_count", "version", "create_time", "name", "nope"):
        error = await refused(
            _update_conversation(
                stub, world.editor, pb.Conversation(name=original.name, title="X"), "title", path
            ),
            INVALID,
        )
        assert violations(error) == ["update_mask.paths"], path
    await refused(
        _update_conversation(
            stub, world.viewer, pb.Conversation(name=original.name, title="Viewer"), "title"
        ),
        DENIED,
    )
    assert await get_conversation(stub, world.viewer, original.name) == retagged
    assert events.take() == []


async def test_an_archived_conversation_is_read_only_until_unarchived(
    stub: Stub, world: World
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    first = await append(stub, world.editor, conversation.name, "before archiving")
    archived = await _update_conversation(
        stub, world.editor, pb.Conversation(name=conversation.name, archived=True), "archived"
    )
    assert archived.archived
    error = await refused(append(stub, world.editor, conversation.name, "refused"), PRECONDITION)
    assert reason(error) == "ERROR_REASON_FAILED_PRECONDITION"
    await refused(
        _update_conversation(
            stub, world.editor, pb.Conversation(name=conversation.name, title="new"), "title"
        ),
        PRECONDITION,
    )
    # Still readable.
    assert [m.name for m in await all_messages(stub, world.viewer, conversation.name)] == [
        first.name
    ]
    unarchived = await _update_conversation(
        stub, world.editor, pb.Conversation(name=conversation.name, archived=False), "archived"
    )
    assert not unarchived.archived
    second = await append(stub, world.editor, conversation.name, "after unarchiving")
    assert second.sequence > first.sequence
    assert [m.name for m in await all_messages(stub, world.viewer, conversation.name)] == [
        first.name,
        second.name,
    ]


async def test_a_deleted_conversation_is_kept_but_closed_until_undeleted(
    stub: Stub, world: World
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    message = await append(stub, world.editor, conversation.name, "hello")
    memory = await remember(stub, world.editor, conversation.name, "remembered narwhal")
    current = await get_conversation(stub, world.editor, conversation.name)
    error = await refused(
        rpc(
            stub.DeleteConversation,
            pb.DeleteConversationRequest(name=conversation.name, etag=conversation.etag),
            world.editor,
        ),
        ABORTED,
    )
    assert reason(error) == "ERROR_REASON_ETAG_MISMATCH"
    await refused(
        rpc(
            stub.DeleteConversation,
            pb.DeleteConversationRequest(name=conversation.name),
            world.viewer,
        ),
        DENIED,
    )
    deleted = (
        await rpc(
            stub.DeleteConversation,
            pb.DeleteConversationRequest(name=conversation.name, etag=current.etag),
            world.editor,
        )
    ).conversation
    assert deleted.HasField("delete_time")

    # AIP-164: a soft-deleted resource can still be read, with its delete_time.
    got = await get_conversation(stub, world.viewer, conversation.name)
    assert got.HasField("delete_time")
    assert got.etag == deleted.etag
    await refused(append(stub, world.editor, conversation.name, "refused"), NOT_FOUND)
    await refused(all_messages(stub, world.viewer, conversation.name), NOT_FOUND)
    await refused(
        rpc(stub.GetMessage, pb.GetMessageRequest(name=message.name), world.viewer),
        NOT_FOUND,
    )
    await refused(
        _update_conversation(
            stub, world.editor, pb.Conversation(name=conversation.name, title="x"), "title"
        ),
        NOT_FOUND,
    )
    await refused(
        rpc(
            stub.DeleteConversation,
            pb.DeleteConversationRequest(name=conversation.name),
            world.editor,
        ),
        PRECONDITION,
    )
    # Its memory goes with it.
    await refused(get_memory_item(stub, world.viewer, memory.name), NOT_FOUND)
    await refused(_list_memory(stub, world.viewer, conversation.name), NOT_FOUND)
    await refused(search(stub, world.viewer, conversation.name, "narwhal"), NOT_FOUND)
    await refused(remember(stub, world.editor, conversation.name, "more"), NOT_FOUND)

    restored = (
        await rpc(
            stub.UndeleteConversation,
            pb.UndeleteConversationRequest(name=conversation.name, etag=deleted.etag),
            world.editor,
        )
    ).conversation
    assert not restored.HasField("delete_time")
    assert [m.name for m in await all_messages(stub, world.viewer, conversation.name)] == [
        message.name
    ]
    assert (await get_memory_item(stub, world.viewer, memory.name)).content == "remembered narwhal"
    assert (await append(stub, world.editor, conversation.name, "back")).sequence > (
        message.sequence
    )
    error = await refused(
        rpc(
            stub.UndeleteConversation,
            pb.UndeleteConversationRequest(name=conversation.name),
            world.editor,
        ),
        PRECONDITION,
    )
    assert reason(error) == "ERROR_REASON_FAILED_PRECONDITION"


async def test_a_conversation_is_only_found_under_its_own_workspace(
    mesh: SwitchboardServer, stub: Stub
) -> None:
    me = await new_caller(mesh)
    a = await create_workspace(stub, me, "A", workspace_id="space-a")
    b = await create_workspace(stub, me, "B", workspace_id="space-b")
    conversation = await create_conversation(stub, me, a.name, "Lives in A")
    message = await append(stub, me, conversation.name, "in A")
    conversation_id = _id(conversation.name)
    elsewhere = f"{b.name}/conversations/{conversation_id}"

    await refused(get_conversation(stub, me, elsewhere), NOT_FOUND)
    await refused(append(stub, me, elsewhere, "misplaced"), NOT_FOUND)
    await refused(all_messages(stub, me, elsewhere), NOT_FOUND)
    await refused(
        rpc(
            stub.GetMessage,
            pb.GetMessageRequest(name=f"{elsewhere}/messages/{_id(message.name)}"),
            me,
        ),
        NOT_FOUND,
    )
    await refused(
        _update_conversation(stub, me, pb.Conversation(name=elsewhere, title="hijack"), "title"),
        NOT_FOUND,
    )
    await refused(
        rpc(stub.DeleteConversation, pb.DeleteConversationRequest(name=elsewhere), me),
        NOT_FOUND,
    )
    await refused(remember(stub, me, elsewhere, "misplaced memory"), NOT_FOUND)
    await refused(
        rpc(stub.ListMemoryItems, pb.ListMemoryItemsRequest(parent=elsewhere), me),
        NOT_FOUND,
    )
    assert await _list_conversations(stub, me, b.name) == []
    # The conversation itself is untouched.
    after = await get_conversation(stub, me, conversation.name)
    assert (after.title, after.message_count, after.HasField("delete_time")) == (
        "Lives in A",
        1,
        False,
    )


# -- messages -------------------------------------------------------------------------------------


async def test_append_message_validation(
    mesh: SwitchboardServer, stub: Stub, world: World, events: EventTap
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    events.take()
    someone_else = world.owner.name
    cases: list[tuple[pb.Message, list[str]]] = [
        (pb.Message(parts=[pb.ContentPart(text="hi")]), ["message.role"]),
        (pb.Message(role=pb.MESSAGE_ROLE_USER), ["message.parts"]),
        (
            pb.Message(
                role=pb.MESSAGE_ROLE_USER,
                parts=[pb.ContentPart(text="ok"), pb.ContentPart()],
            ),
            ["message.parts[1]"],
        ),
        (text_message(*["p"] * 65), ["message.parts"]),
        (text_message("hi", author=someone_else), ["message.author"]),
        (text_message("hi", author="robots/r2d2"), ["message.author"]),
        (pb.Message(author=someone_else), ["message.role", "message.parts", "message.author"]),
    ]
    for message, fields in cases:
        error = await refused(
            append(stub, world.editor, conversation.name, message=message), INVALID
        )
        assert violations(error) == fields, fields
    assert (await get_conversation(stub, world.viewer, conversation.name)).message_count == 0
    assert await all_messages(stub, world.viewer, conversation.name) == []
    assert events.take() == []
    await refused(append(stub, world.viewer, conversation.name, "viewers read"), DENIED)
    await refused(append(stub, world.outsider, conversation.name, "outsiders"), NOT_FOUND)

    # Exactly at the part limit is fine; the author defaults to the caller;
    # handlers may be named as the author.
    full = await append(stub, world.editor, conversation.name, *["p"] * 64)
    assert len(full.parts) == 64
    assert full.author == world.editor.name
    handler = await append(
        stub,
        world.editor,
        conversation.name,
        message=text_message("answer", role=pb.MESSAGE_ROLE_ASSISTANT, author="handlers/echo"),
    )
    assert handler.author == "handlers/echo"
    assert handler.role == pb.MESSAGE_ROLE_ASSISTANT


async def test_a_message_over_the_size_limit_is_resource_exhausted(database_url: str) -> None:
    async with limited_mesh(database_url, context_max_message_bytes=2048) as (mesh, stub):
        world = await ctx_world(mesh, stub)
        conversation = await create_conversation(stub, world.editor, world.name)
        small = await append(stub, world.editor, conversation.name, "x" * 1000)
        error = await refused(append(stub, world.editor, conversation.name, "x" * 3000), EXHAUSTED)
        assert reason(error) == "ERROR_REASON_REQUEST_TOO_LARGE"
        # Many small parts add up too.
        error = await refused(
            append(stub, world.editor, conversation.name, *["y" * 100] * 30), EXHAUSTED
        )
        assert reason(error) == "ERROR_REASON_REQUEST_TOO_LARGE"
        assert [m.name for m in await all_messages(stub, world.viewer, conversation.name)] == [
            small.name
        ]


async def test_messages_get_increasing_sequences_and_token_counts(stub: Stub, world: World) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    requests = [
        text_message("hello there"),
        text_message("I am the assistant", role=pb.MESSAGE_ROLE_ASSISTANT),
        text_message("be brief", role=pb.MESSAGE_ROLE_SYSTEM),
        pb.Message(
            role=pb.MESSAGE_ROLE_TOOL,
            parts=[
                pb.ContentPart(
                    tool_result=pb.ToolResultContent(
                        id="call_1", outcome="succeeded", text="21.5 C"
                    )
                ),
                pb.ContentPart(data=struct(temperature=21.5, unit="C")),
            ],
        ),
        pb.Message(
            role=pb.MESSAGE_ROLE_USER,
            parts=[
                # File parts become stored files on append: tests/context/files/test_files_runs.py.
                pb.ContentPart(text="see the notes"),
            ],
            metadata=struct(client="pytest"),
        ),
    ]
    stored = [await append(stub, world.editor, conversation.name, message=m) for m in requests]
    sequences = [m.sequence for m in stored]
    assert sequences[0] > 0
    assert all(a < b for a, b in itertools.pairwise(sequences))
    assert len({m.name for m in stored}) == len(stored)
    for request, message in zip(requests, stored, strict=True):
        assert message.name.startswith(f"{conversation.name}/messages/")
        assert message.role == request.role
        assert list(message.parts) == list(request.parts)
        assert message.author == world.editor.name
        assert message.token_count > 0
        assert message.HasField("create_time")
        assert not message.archived
        got = await rpc(stub.GetMessage, pb.GetMessageRequest(name=message.name), world.viewer)
        assert got.message == message
    assert stored[4].metadata == struct(client="pytest")
    assert await all_messages(stub, world.viewer, conversation.name) == stored
    after = await get_conversation(stub, world.viewer, conversation.name)
    assert after.message_count == 5
    assert after.version > conversation.version
    assert after.etag != conversation.etag

    other = await create_conversation(stub, world.editor, world.name)
    await refused(
        rpc(
            stub.GetMessage,
            pb.GetMessageRequest(name=f"{other.name}/messages/{_id(stored[0].name)}"),
            world.viewer,
        ),
        NOT_FOUND,
    )
    await refused(
        rpc(stub.GetMessage, pb.GetMessageRequest(name=stored[0].name), world.outsider),
        NOT_FOUND,
    )


async def _message_rows(mesh: SwitchboardServer, conversation: str) -> int:
    async with mesh.shared.database.sessions() as db:
        count = await db.scalar(
            select(func.count())
            .select_from(MessageRow)
            .where(MessageRow.conversation_id == _id(conversation))
        )
    return int(count or 0)


async def test_append_retry_with_the_same_request_id_appends_once(
    mesh: SwitchboardServer, stub: Stub, world: World, events: EventTap
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    events.take()
    first = await append(stub, world.editor, conversation.name, "once", request_id="m-1")
    again = await append(stub, world.editor, conversation.name, "once", request_id="m-1")
    assert again == first
    racing = await asyncio.gather(
        *(
            append(stub, world.editor, conversation.name, "racing", request_id="m-2")
            for _ in range(4)
        )
    )
    assert len({m.name for m in racing}) == 1
    assert await _message_rows(mesh, conversation.name) == 2
    assert [m.name for m in await all_messages(stub, world.viewer, conversation.name)] == [
        first.name,
        racing[0].name,
    ]
    assert [summary(e) for e in events.take()] == [
        (MESSAGE_CREATED, CREATED, first.name),
        (MESSAGE_CREATED, CREATED, racing[0].name),
    ]
    error = await refused(
        append(stub, world.editor, conversation.name, "different", request_id="m-1"), INVALID
    )
    assert violations(error) == ["request_id"]
    assert await _message_rows(mesh, conversation.name) == 2
    assert (await get_conversation(stub, world.viewer, conversation.name)).message_count == 2
    assert events.take() == []


# -- pagination under concurrent appends ----------------------------------------------------------

WRITERS = 4
PER_WRITER = 50
PAGE = 7


async def test_paging_under_concurrent_appends_returns_every_message_once(
    stub: Stub, world: World
) -> None:
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    total = WRITERS * PER_WRITER
    appended: list[str] = []
    progress = asyncio.Condition()

    async def writer(index: int) -> None:
        for i in range(PER_WRITER):
            message = await append(stub, world.editor, conversation, f"writer {index} message {i}")
            async with progress:
                appended.append(message.name)
                progress.notify_all()

    def grown(since: int) -> bool:
        return len(appended) > since

    seen: list[pb.Message] = []
    requests_during_writes = 0

    async def reader() -> None:
        nonlocal requests_during_writes
        token = ""
        # The names the current token's page returned (a short last page, re-read
        # once more messages exist: it must come back as the same prefix).
        tail: list[str] = []
        while True:
            mark = len(appended)
            if mark < total:
                requests_during_writes += 1
            page = await rpc(
                stub.ListMessages,
                pb.ListMessagesRequest(parent=conversation, page_size=PAGE, page_token=token),
                world.viewer,
            )
            names = [m.name for m in page.messages]
            assert len(names) <= PAGE
            assert names[: len(tail)] == tail, "a page changed under concurrent appends"
            seen.extend(page.messages[len(tail) :])
            if page.next_page_token:
                assert len(names) == PAGE
                token, tail = page.next_page_token, []
                continue
            if mark == total:
                return  # the last page, read after every writer finished
            tail = names
            async with progress:
                await asyncio.wait_for(
                    progress.wait_for(functools.partial(grown, mark)), CALL_DEADLINE_S
                )

    await asyncio.gather(reader(), *(writer(i) for i in range(WRITERS)))

    assert len(appended) == total
    names = [m.name for m in seen]
    assert len(names) == len(set(names)) == total, "a message was skipped or repeated"
    assert set(names) == set(appended)
    sequences = [m.sequence for m in seen]
    assert all(a < b for a, b in itertools.pairwise(sequences))
    assert requests_during_writes >= 2, "the reader never overlapped the writers"
    # Each writer's messages are in the order that writer appended them.
    for index in range(WRITERS):
        texts = [m.parts[0].text for m in seen if m.parts[0].text.startswith(f"writer {index} ")]
        assert texts == [f"writer {index} message {i}" for i in range(PER_WRITER)]


async def test_newest_first_paging_is_the_exact_reverse(stub: Stub, world: World) -> None:
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    for i in range(23):
        await append(stub, world.editor, conversation, f"message {i}")
    oldest_first = await all_messages(stub, world.viewer, conversation, page_size=5)
    newest_first = await all_messages(
        stub, world.viewer, conversation, page_size=5, newest_first=True
    )
    assert len(oldest_first) == 23
    assert [m.parts[0].text for m in oldest_first] == [f"message {i}" for i in range(23)]
    assert newest_first == list(reversed(oldest_first))

    first = await rpc(
        stub.ListMessages,
        pb.ListMessagesRequest(parent=conversation, page_size=5, newest_first=True),
        world.viewer,
    )
    error = await refused(
        rpc(
            stub.ListMessages,
            pb.ListMessagesRequest(
                parent=conversation, page_size=5, page_token=first.next_page_token
            ),
            world.viewer,
        ),
        INVALID,
    )
    assert violations(error) == ["page_token"]
    other = (await create_conversation(stub, world.editor, world.name)).name
    error = await refused(
        rpc(
            stub.ListMessages,
            pb.ListMessagesRequest(
                parent=other, page_size=5, newest_first=True, page_token=first.next_page_token
            ),
            world.viewer,
        ),
        INVALID,
    )
    assert violations(error) == ["page_token"]


# -- memory items -------------------------------------------------------------------------------


async def test_memory_items_in_each_scope(stub: Stub, world: World) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    mine = await remember(
        stub, world.viewer, world.viewer.name, "I like tea", pb.MEMORY_KIND_PREFERENCE
    )
    assert mine.name.startswith(f"{world.viewer.name}/memories/")
    assert mine.kind == pb.MEMORY_KIND_PREFERENCE
    assert mine.content == "I like tea"
    assert mine.creator == world.viewer.name
    assert mine.token_count > 0
    assert mine.etag
    assert mine.HasField("create_time")
    assert not mine.HasField("expire_time")
    assert await get_memory_item(stub, world.viewer, mine.name) == mine
    # Another user's scope does not exist for the caller.
    await refused(remember(stub, world.owner, world.viewer.name, "planted"), NOT_FOUND)
    await refused(get_memory_item(stub, world.owner, mine.name), NOT_FOUND)
    await refused(
        rpc(stub.ListMemoryItems, pb.ListMemoryItemsRequest(parent=world.viewer.name), world.owner),
        NOT_FOUND,
    )

    shared = await remember(stub, world.editor, world.name, "The office is in Lyon")
    assert shared.name.startswith(f"{world.name}/memories/")
    assert shared.creator == world.editor.name
    assert await get_memory_item(stub, world.viewer, shared.name) == shared
    await refused(remember(stub, world.viewer, world.name, "viewers cannot write"), DENIED)
    await refused(get_memory_item(stub, world.outsider, shared.name), NOT_FOUND)

    local = await remember(
        stub, world.editor, conversation.name, "Ticket 42 is urgent", pb.MEMORY_KIND_NOTE
    )
    assert local.name.startswith(f"{conversation.name}/memories/")
    assert await get_memory_item(stub, world.viewer, local.name) == local
    # A memory is found only under its own scope.
    await refused(
        get_memory_item(stub, world.viewer, f"{world.name}/memories/{_id(local.name)}"), NOT_FOUND
    )
    await refused(
        get_memory_item(stub, world.viewer, f"{conversation.name}/memories/{_id(shared.name)}"),
        NOT_FOUND,
    )
    assert [m.name for m in await _list_memory(stub, world.viewer, world.name)] == [shared.name]
    assert [m.name for m in await _list_memory(stub, world.viewer, conversation.name)] == [
        local.name
    ]
    assert [m.name for m in await _list_memory(stub, world.viewer, world.viewer.name)] == [
        mine.name
    ]


async def test_create_memory_item_validation(stub: Stub, world: World) -> None:
    cases: list[tuple[pb.MemoryItem, list[str]]] = [
        (memory_item("fact", pb.MEMORY_KIND_UNSPECIFIED), ["memory_item.kind"]),
        (memory_item("   "), ["memory_item.content"]),
        (memory_item("x" * (8 * 1024 + 1)), ["memory_item.content"]),
        (memory_item("old news", expire_time=from_now(seconds=-5)), ["memory_item.expire_time"]),
        (
            pb.MemoryItem(
                kind=pb.MEMORY_KIND_FACT,
                content="sourced",
                source_messages=["not a message name"],
            ),
            ["memory_item.source_messages[0]"],
        ),
        (memory_item("", pb.MEMORY_KIND_UNSPECIFIED), ["memory_item.kind", "memory_item.content"]),
    ]
    for item, fields in cases:
        error = await refused(
            rpc(
                stub.CreateMemoryItem,
                pb.CreateMemoryItemRequest(parent=world.name, memory_item=item),
                world.editor,
            ),
            INVALID,
        )
        assert violations(error) == fields, fields
        if fields == ["memory_item.source_messages[0]"]:
            # The refusal says what a message's name looks like.
            assert "workspaces/{workspace}/conversations/{conversation}/messages/{message}" in (
                error.details() or ""
            )
    assert await _list_memory(stub, world.viewer, world.name) == []
    future = await remember(
        stub, world.editor, world.name, "expires later", expire_time=from_now(hours=1)
    )
    assert future.HasField("expire_time")


async def test_update_memory_item(stub: Stub, world: World) -> None:
    item = await remember(stub, world.editor, world.name, "short")

    async def update(caller: Caller, changes: pb.MemoryItem, *paths: str) -> pb.MemoryItem:
        response = await rpc(
            stub.UpdateMemoryItem,
            pb.UpdateMemoryItemRequest(memory_item=changes, update_mask=mask(*paths)),
            caller,
        )
        return response.memory_item

    longer = await update(
        world.editor,
        pb.MemoryItem(
            name=item.name,
            content="a much longer piece of content than before, with many more words in it",
            pinned=True,  # not in the mask
            etag=item.etag,
        ),
        "content",
    )
    assert longer.content.startswith("a much longer")
    assert not longer.pinned
    assert longer.token_count > item.token_count
    assert longer.etag != item.etag
    assert longer.kind == item.kind
    assert longer.create_time == item.create_time

    expiry = from_now(hours=2)
    pinned = await update(
        world.owner,
        pb.MemoryItem(name=item.name, pinned=True, expire_time=expiry),
        "pinned",
        "expire_time",
    )
    assert pinned.pinned
    assert pinned.expire_time.seconds == expiry.seconds
    assert pinned.content == longer.content
    cleared = await update(world.editor, pb.MemoryItem(name=item.name), "expire_time")
    assert not cleared.HasField("expire_time")
    assert cleared.pinned
    assert await get_memory_item(stub, world.viewer, item.name) == cleared

    error = await refused(
        update(
            world.editor, pb.MemoryItem(name=item.name, content="stale", etag=item.etag), "content"
        ),
        ABORTED,
    )
    assert reason(error) == "ERROR_REASON_ETAG_MISMATCH"
    for path in ("kind", "creator", "source_messages", "token_count", "name", "bogus"):
        error = await refused(
            update(
                world.editor,
                pb.MemoryItem(name=item.name, kind=pb.MEMORY_KIND_NOTE, content="changed"),
                "content",
                path,
            ),
            INVALID,
        )
        assert violations(error) == ["update_mask.paths"], path
    error = await refused(
        update(
            world.editor,
            pb.MemoryItem(name=item.name, expire_time=from_now(seconds=-1)),
            "expire_time",
        ),
        INVALID,
    )
    assert violations(error) == ["memory_item.expire_time"]
    error = await refused(
        update(world.editor, pb.MemoryItem(name=item.name, content=" "), "content"), INVALID
    )
    assert violations(error) == ["memory_item.content"]
    await refused(
        update(world.viewer, pb.MemoryItem(name=item.name, content="viewer"), "content"), DENIED
    )
    assert await get_memory_item(stub, world.viewer, item.name) == cleared


async def test_list_memory_items_newest_first_with_filters(stub: Stub, world: World) -> None:
    specs = [
        ("fact one", pb.MEMORY_KIND_FACT, False),
        ("note one", pb.MEMORY_KIND_NOTE, True),
        ("preference one", pb.MEMORY_KIND_PREFERENCE, False),
        ("fact two", pb.MEMORY_KIND_FACT, True),
        ("note two", pb.MEMORY_KIND_NOTE, False),
    ]
    created = [
        await remember(stub, world.editor, world.name, content, kind, pinned=pinned)
        for content, kind, pinned in specs
    ]
    newest_first = [m.name for m in reversed(created)]

    pages, tokens = await paged(
        lambda token: rpc(
            stub.ListMemoryItems,
            pb.ListMemoryItemsRequest(parent=world.name, page_size=2, page_token=token),
            world.viewer,
        ),
        lambda page: [m.name for m in page.memory_items],
    )
    first_token = tokens[0]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [name for p in pages for name in p] == newest_first

    def names(items: list[pb.MemoryItem]) -> list[str]:
        return [m.name for m in items]

    notes = names(await _list_memory(stub, world.viewer, world.name, pb.MEMORY_KIND_NOTE))
    assert notes == [created[4].name, created[1].name]
    facts_and_notes = names(
        await _list_memory(
            stub, world.viewer, world.name, pb.MEMORY_KIND_FACT, pb.MEMORY_KIND_NOTE, page_size=1
        )
    )
    assert facts_and_notes == [created[i].name for i in (4, 3, 1, 0)]
    pinned = names(await _list_memory(stub, world.viewer, world.name, pinned_only=True))
    assert pinned == [created[3].name, created[1].name]
    pinned_facts = names(
        await _list_memory(stub, world.viewer, world.name, pb.MEMORY_KIND_FACT, pinned_only=True)
    )
    assert pinned_facts == [created[3].name]
    assert await _list_memory(stub, world.viewer, world.name, pb.MEMORY_KIND_SUMMARY) == []

    error = await refused(
        rpc(
            stub.ListMemoryItems,
            pb.ListMemoryItemsRequest(
                parent=world.name, page_size=2, page_token=first_token, pinned_only=True
            ),
            world.viewer,
        ),
        INVALID,
    )
    assert violations(error) == ["page_token"]
    error = await refused(
        rpc(
            stub.ListMemoryItems,
            pb.ListMemoryItemsRequest(parent=world.name, kinds=[pb.MEMORY_KIND_UNSPECIFIED]),
            world.viewer,
        ),
        INVALID,
    )
    assert violations(error) == ["kinds[0]"]


async def test_delete_memory_item(stub: Stub, world: World) -> None:
    keep = await remember(stub, world.editor, world.name, "keep this walrus")
    drop = await remember(stub, world.editor, world.name, "drop this walrus")
    await refused(
        rpc(stub.DeleteMemoryItem, pb.DeleteMemoryItemRequest(name=drop.name), world.viewer),
        DENIED,
    )
    await rpc(stub.DeleteMemoryItem, pb.DeleteMemoryItemRequest(name=drop.name), world.editor)
    await refused(get_memory_item(stub, world.viewer, drop.name), NOT_FOUND)
    await refused(
        rpc(stub.DeleteMemoryItem, pb.DeleteMemoryItemRequest(name=drop.name), world.editor),
        NOT_FOUND,
    )
    assert [m.name for m in await _list_memory(stub, world.viewer, world.name)] == [keep.name]
    assert [r.memory_item.name for r in await search(stub, world.viewer, world.name, "walrus")] == [
        keep.name
    ]


async def test_pinned_items_per_scope_are_limited(database_url: str) -> None:
    async with limited_mesh(database_url, context_max_pinned=2) as (mesh, stub):
        world = await ctx_world(mesh, stub)
        first = await remember(stub, world.editor, world.name, "pinned one", pinned=True)
        await remember(stub, world.editor, world.name, "pinned two", pinned=True)
        error = await refused(
            remember(stub, world.editor, world.name, "pinned three", pinned=True), EXHAUSTED
        )
        assert reason(error) == "ERROR_REASON_QUOTA_EXCEEDED"
        loose = await remember(stub, world.editor, world.name, "not pinned")
        error = await refused(
            rpc(
                stub.UpdateMemoryItem,
                pb.UpdateMemoryItemRequest(
                    memory_item=pb.MemoryItem(name=loose.name, pinned=True),
                    update_mask=mask("pinned"),
                ),
                world.editor,
            ),
            EXHAUSTED,
        )
        assert reason(error) == "ERROR_REASON_QUOTA_EXCEEDED"
        assert len(await _list_memory(stub, world.viewer, world.name, pinned_only=True)) == 2
        # The limit is per scope.
        for content in ("mine one", "mine two"):
            await remember(stub, world.editor, world.editor.name, content, pinned=True)
        # Unpinning makes room again.
        await rpc(
            stub.UpdateMemoryItem,
            pb.UpdateMemoryItemRequest(
                memory_item=pb.MemoryItem(name=first.name, pinned=False),
                update_mask=mask("pinned"),
            ),
            world.editor,
        )
        repinned = await rpc(
            stub.UpdateMemoryItem,
            pb.UpdateMemoryItemRequest(
                memory_item=pb.MemoryItem(name=loose.name, pinned=True),
                update_mask=mask("pinned"),
            ),
            world.editor,
        )
        assert repinned.memory_item.pinned


async def test_memory_events_carry_their_scope(stub: Stub, world: World, events: EventTap) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    events.take()
    scopes = {
        conversation.name: (world.name, conversation.name, ""),
        world.name: (world.name, "", ""),
        world.editor.name: ("", "", world.editor.name),
    }
    for parent, (workspace, conv, user) in scopes.items():
        item = await remember(stub, world.editor, parent, f"remember {parent}")
        await rpc(
            stub.UpdateMemoryItem,
            pb.UpdateMemoryItemRequest(
                memory_item=pb.MemoryItem(name=item.name, content="updated"),
                update_mask=mask("content"),
            ),
            world.editor,
        )
        await rpc(stub.DeleteMemoryItem, pb.DeleteMemoryItemRequest(name=item.name), world.editor)
        got = events.take()
        assert [summary(e) for e in got] == [
            (MEMORY_CHANGED, CREATED, item.name),
            (MEMORY_CHANGED, UPDATED, item.name),
            (MEMORY_CHANGED, DELETED, item.name),
        ], parent
        for event in got:
            assert (event.workspace, event.conversation, event.user) == (workspace, conv, user)
            assert event.actor.name == world.editor.name
        assert [e.memory_changed.memory_item.content for e in got] == [
            f"remember {parent}",
            "updated",
            "updated",
        ]


# -- search -----------------------------------------------------------------------------------


async def test_search_ranks_items_with_more_query_terms_higher(stub: Stub, world: World) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    more = await remember(stub, world.editor, world.name, "apples bananas cherries orchard harvest")
    fewer = await remember(stub, world.editor, world.name, "apples market stall weekend sale")
    await remember(stub, world.editor, world.name, "quarterly budget review meeting notes")
    note = await remember(
        stub, world.editor, world.name, "apples bananas cherries shopping list", pb.MEMORY_KIND_NOTE
    )
    # The same words in other scopes never show up in this one.
    await remember(stub, world.editor, conversation.name, "apples bananas cherries elsewhere")
    await remember(stub, world.editor, world.editor.name, "apples bananas cherries personal")

    results = await search(stub, world.viewer, world.name, "apples bananas cherries")
    names = [r.memory_item.name for r in results]
    assert set(names) == {more.name, fewer.name, note.name}
    assert names.index(more.name) < names.index(fewer.name)
    assert names.index(note.name) < names.index(fewer.name)
    scores = {r.memory_item.name: r.score for r in results}
    assert scores[more.name] > scores[fewer.name]
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)

    facts = await search(stub, world.viewer, world.name, "apples cherries", pb.MEMORY_KIND_FACT)
    assert [r.memory_item.name for r in facts] == [more.name, fewer.name]
    notes = await search(stub, world.viewer, world.name, "apples", pb.MEMORY_KIND_NOTE)
    assert [r.memory_item.name for r in notes] == [note.name]
    both = await search(
        stub, world.viewer, world.name, "cherries", pb.MEMORY_KIND_NOTE, pb.MEMORY_KIND_FACT
    )
    assert {r.memory_item.name for r in both} == {more.name, note.name}
    assert await search(stub, world.viewer, world.name, "cherries", pb.MEMORY_KIND_SUMMARY) == []

    local = await search(stub, world.viewer, conversation.name, "apples")
    assert [r.memory_item.content for r in local] == ["apples bananas cherries elsewhere"]
    personal = await search(stub, world.editor, world.editor.name, "apples")
    assert [r.memory_item.content for r in personal] == ["apples bananas cherries personal"]
    await refused(search(stub, world.viewer, world.editor.name, "apples"), NOT_FOUND)
    await refused(search(stub, world.outsider, world.name, "apples"), NOT_FOUND)

    # Paging by rank: one at a time, every match once, in the same order.
    pages, _tokens = await paged(
        lambda token: rpc(
            stub.SearchMemoryItems,
            pb.SearchMemoryItemsRequest(
                parent=world.name, query="apples bananas cherries", page_size=1, page_token=token
            ),
            world.viewer,
        ),
        lambda page: [r.memory_item.name for r in page.results],
    )
    assert all(len(page) <= 1 for page in pages)
    assert [name for page in pages for name in page] == names


async def test_search_leaves_out_expired_items(
    mesh: SwitchboardServer, stub: Stub, world: World
) -> None:
    lasting = await remember(stub, world.editor, world.name, "durable walrus fact")
    fading = await remember(
        stub, world.editor, world.name, "fading walrus fact", expire_time=from_now(hours=1)
    )
    before = await search(stub, world.viewer, world.name, "walrus")
    assert {r.memory_item.name for r in before} == {lasting.name, fading.name}
    # Let it expire: move its expiry into the past directly in the database.
    async with mesh.shared.database.sessions() as db, db.begin():
        await db.execute(
            update(MemoryItemRow)
            .where(MemoryItemRow.id == _id(fading.name))
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
        )
    after = await search(stub, world.viewer, world.name, "walrus")
    assert [r.memory_item.name for r in after] == [lasting.name]


FTS_SYNTAX = [
    '"apples',
    'apples"',
    '"apples bananas"',
    "apples*",
    "*",
    "NEAR(apples bananas, 2)",
    "NEAR(",
    "-apples",
    "apples -bananas",
    "content:apples",
    ":",
    "apples OR",
    "OR apples",
    "AND",
    "apples AND NOT bananas",
    "(apples",
    "apples)",
    "((apples) OR (bananas))",
    "apples & !bananas | cherries <-> orchard",
    "apples:* & bananas:A",
    "'apples'",
    "^apples",
    "{apples bananas}",
    "apples\\",
    "apples\x00bananas",
    "ünïcødé äpfel 日本語 apples 🍎",
    "'; DROP TABLE memory_items; --",
    '*:()-"^{}',
    "a",
    "x" * 200 + " apples",
    " ".join(f"word{i}" for i in range(60)) + " apples",
]


async def test_search_queries_full_of_syntax_never_fail(stub: Stub, world: World) -> None:
    target = await remember(stub, world.editor, world.name, "apples bananas cherries orchard")
    for query in FTS_SYNTAX:
        try:
            results = await search(stub, world.viewer, world.name, query)
        except aio.AioRpcError as exc:
            raise AssertionError(f"{query!r}: {exc.code().name} {exc.details()}") from None
        names = [r.memory_item.name for r in results]
        assert set(names) <= {target.name}, query
        # The operators are just text: the words in the query still match (except
        # past the term limit, where "apples" is not searched).
        if re.search(r"apples|bananas|cherries|orchard", query) and "word59" not in query:
            assert names == [target.name], query


async def test_search_needs_a_query(stub: Stub, world: World) -> None:
    for query in ("", "   \n\t"):
        error = await refused(search(stub, world.viewer, world.name, query), INVALID)
        assert violations(error) == ["query"]
    error = await refused(search(stub, world.viewer, world.name, "q" * 1001), INVALID)
    assert violations(error) == ["query"]
    error = await refused(
        search(stub, world.viewer, world.name, "apples", pb.MEMORY_KIND_UNSPECIFIED), INVALID
    )
    assert violations(error) == ["kinds[0]"]


# -- entities ---------------------------------------------------------------------------------


async def test_entities_become_memory_items_with_their_sources(
    stub: Stub, world: World, events: EventTap
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    events.take()
    first = await append(
        stub,
        world.editor,
        conversation.name,
        "ping @alice at alice@example.com, see https://example.com/x on 2026-11-22",
    )
    entities = await _list_memory(stub, world.viewer, conversation.name, pb.MEMORY_KIND_ENTITY)
    by_content = {m.content: m for m in entities}
    assert set(by_content) == {
        "mention: alice",
        "email: alice@example.com",
        "link: https://example.com/x",
        "date: 2026-11-22",
    }
    for item in entities:
        assert item.name.startswith(f"{conversation.name}/memories/")
        assert item.kind == pb.MEMORY_KIND_ENTITY
        assert list(item.source_messages) == [first.name]
    got = events.take()
    assert summary(got[0]) == (MESSAGE_CREATED, CREATED, first.name)
    assert sorted(summary(e) for e in got[1:]) == sorted(
        (MEMORY_CHANGED, CREATED, m.name) for m in entities
    )
    # Nothing leaks into the workspace scope.
    assert await _list_memory(stub, world.viewer, world.name) == []

    second = await append(stub, world.editor, conversation.name, "thanks @alice, and hi @bob")
    again = await _list_memory(stub, world.viewer, conversation.name, pb.MEMORY_KIND_ENTITY)
    contents = sorted(m.content for m in again)
    assert contents == sorted([*by_content, "mention: bob"])
    alice = next(m for m in again if m.content == "mention: alice")
    assert alice.name == by_content["mention: alice"].name
    assert list(alice.source_messages) == [first.name, second.name]
    assert alice.etag != by_content["mention: alice"].etag
    bob = next(m for m in again if m.content == "mention: bob")
    assert list(bob.source_messages) == [second.name]
    for content in ("email: alice@example.com", "link: https://example.com/x"):
        unchanged = next(m for m in again if m.content == content)
        assert list(unchanged.source_messages) == [first.name]
    got = events.take()
    assert summary(got[0]) == (MESSAGE_CREATED, CREATED, second.name)
    assert sorted(summary(e) for e in got[1:]) == sorted(
        [(MEMORY_CHANGED, CREATED, bob.name), (MEMORY_CHANGED, UPDATED, alice.name)]
    )
    # Concurrent mentions of a new entity make one item naming every message.
    racing = await asyncio.gather(
        *(
            append(stub, world.editor, conversation.name, f"hello @carol, take {i}")
            for i in range(4)
        )
    )
    carol = [
        m
        for m in await _list_memory(stub, world.viewer, conversation.name, pb.MEMORY_KIND_ENTITY)
        if m.content == "mention: carol"
    ]
    assert len(carol) == 1
    assert sorted(carol[0].source_messages) == sorted(m.name for m in racing)
    # Entities are searchable like any memory.
    found = await search(stub, world.viewer, conversation.name, "alice")
    assert by_content["mention: alice"].name in [r.memory_item.name for r in found]


# -- every write publishes its event -------------------------------------------------------------

# An etag of version 1: every resource it is sent for has changed since.
STALE = '"1"'


@dataclass(frozen=True)
class Scene:
    """What a write acts on: the owner, a user who is not a member yet, and the
    conversation and memory item made for the write (if it needs them)."""

    stub: Stub
    owner: Caller
    newcomer: Caller
    workspace: str
    conversation: str = ""
    memory: str = ""


class Published(NamedTuple):
    """What the event of a write must say; conversation and memory events also name
    the conversation."""

    kind: int
    change: int
    name: str
    conversation: str = ""


Given = Callable[[Scene], Awaitable[Scene]]
Write = Callable[[Scene], Awaitable[Published]]


@pytest_asyncio.fixture(loop_scope="module")
async def scene(mesh: SwitchboardServer, stub: Stub) -> Scene:
    # A workspace id of its own: the module's server outlives the test.
    workspace = f"workspaces/events-{uuid.uuid4().hex[:12]}"
    return Scene(stub, await new_caller(mesh), await new_caller(mesh), workspace)


# What must exist before a write.


async def nothing(scene: Scene) -> Scene:
    return scene


async def a_workspace(scene: Scene) -> Scene:
    await write_create_workspace(scene)
    return scene


async def a_deleted_workspace(scene: Scene) -> Scene:
    await write_delete_workspace(await a_workspace(scene))
    return scene


async def a_member(scene: Scene) -> Scene:
    await write_add_member(await a_workspace(scene))
    return scene


async def a_conversation(scene: Scene) -> Scene:
    await a_workspace(scene)
    return replace(scene, conversation=(await write_create_conversation(scene)).conversation)


async def a_deleted_conversation(scene: Scene) -> Scene:
    scene = await a_conversation(scene)
    await write_delete_conversation(scene)
    return scene


async def a_memory_item(scene: Scene) -> Scene:
    scene = await a_conversation(scene)
    return replace(scene, memory=(await write_create_memory_item(scene)).name)


async def changed_resources(scene: Scene) -> Scene:
    """A workspace and a conversation past version 1 (so STALE names neither), and a
    memory item of the workspace."""
    scene = await a_conversation(scene)
    await write_update_workspace(scene)
    await write_update_conversation(scene)
    memory = await remember(scene.stub, scene.owner, scene.workspace, "stale target")
    return replace(scene, memory=memory.name)


# The writes, and the event each must publish.


async def write_create_workspace(scene: Scene) -> Published:
    await create_workspace(scene.stub, scene.owner, "Events", workspace_id=_id(scene.workspace))
    return Published(WS_CHANGED, CREATED, scene.workspace)


async def write_update_workspace(scene: Scene) -> Published:
    await scene.stub.UpdateWorkspace(
        pb.UpdateWorkspaceRequest(
            workspace=pb.Workspace(name=scene.workspace, description="changed"),
            update_mask=mask("description"),
        ),
        metadata=scene.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return Published(WS_CHANGED, UPDATED, scene.workspace)


async def write_delete_workspace(scene: Scene) -> Published:
    await scene.stub.DeleteWorkspace(
        pb.DeleteWorkspaceRequest(name=scene.workspace),
        metadata=scene.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return Published(WS_CHANGED, DELETED, scene.workspace)


async def write_undelete_workspace(scene: Scene) -> Published:
    await scene.stub.UndeleteWorkspace(
        pb.UndeleteWorkspaceRequest(name=scene.workspace),
        metadata=scene.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return Published(WS_CHANGED, UPDATED, scene.workspace)


async def write_add_member(scene: Scene) -> Published:
    await add_member(
        scene.stub, scene.owner, scene.workspace, scene.newcomer, pb.WORKSPACE_ROLE_VIEWER
    )
    return Published(MEMBER_CHANGED, CREATED, member_name(scene.workspace, scene.newcomer))


async def write_update_member(scene: Scene) -> Published:
    await _set_role(
        scene.stub, scene.owner, scene.workspace, scene.newcomer, pb.WORKSPACE_ROLE_EDITOR
    )
    return Published(MEMBER_CHANGED, UPDATED, member_name(scene.workspace, scene.newcomer))


async def write_remove_member(scene: Scene) -> Published:
    await _remove(scene.stub, scene.owner, scene.workspace, scene.newcomer)
    return Published(MEMBER_CHANGED, DELETED, member_name(scene.workspace, scene.newcomer))


async def write_create_conversation(scene: Scene) -> Published:
    conversation = await create_conversation(scene.stub, scene.owner, scene.workspace)
    return Published(CONV_CHANGED, CREATED, conversation.name, conversation.name)


async def write_update_conversation(scene: Scene) -> Published:
    await _update_conversation(
        scene.stub, scene.owner, pb.Conversation(name=scene.conversation, title="retitled"), "title"
    )
    return Published(CONV_CHANGED, UPDATED, scene.conversation, scene.conversation)


async def write_delete_conversation(scene: Scene) -> Published:
    await scene.stub.DeleteConversation(
        pb.DeleteConversationRequest(name=scene.conversation),
        metadata=scene.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return Published(CONV_CHANGED, DELETED, scene.conversation, scene.conversation)


async def write_undelete_conversation(scene: Scene) -> Published:
    await scene.stub.UndeleteConversation(
        pb.UndeleteConversationRequest(name=scene.conversation),
        metadata=scene.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return Published(CONV_CHANGED, UPDATED, scene.conversation, scene.conversation)


async def write_append_message(scene: Scene) -> Published:
    message = await append(scene.stub, scene.owner, scene.conversation, "no entities here")
    return Published(MESSAGE_CREATED, CREATED, message.name, scene.conversation)


async def write_create_memory_item(scene: Scene) -> Published:
    memory = await remember(scene.stub, scene.owner, scene.conversation, "a fact")
    return Published(MEMORY_CHANGED, CREATED, memory.name, scene.conversation)


async def write_update_memory_item(scene: Scene) -> Published:
    await scene.stub.UpdateMemoryItem(
        pb.UpdateMemoryItemRequest(
            memory_item=pb.MemoryItem(name=scene.memory, pinned=True), update_mask=mask("pinned")
        ),
        metadata=scene.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return Published(MEMORY_CHANGED, UPDATED, scene.memory, scene.conversation)


async def write_delete_memory_item(scene: Scene) -> Published:
    await scene.stub.DeleteMemoryItem(
        pb.DeleteMemoryItemRequest(name=scene.memory),
        metadata=scene.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return Published(MEMORY_CHANGED, DELETED, scene.memory, scene.conversation)


@pytest.mark.parametrize(
    ("given", "write"),
    [
        pytest.param(nothing, write_create_workspace, id="CreateWorkspace"),
        pytest.param(a_workspace, write_update_workspace, id="UpdateWorkspace"),
        pytest.param(a_workspace, write_delete_workspace, id="DeleteWorkspace"),
        pytest.param(a_deleted_workspace, write_undelete_workspace, id="UndeleteWorkspace"),
        pytest.param(a_workspace, write_add_member, id="AddWorkspaceMember"),
        pytest.param(a_member, write_update_member, id="UpdateWorkspaceMember"),
        pytest.param(a_member, write_remove_member, id="RemoveWorkspaceMember"),
        pytest.param(a_workspace, write_create_conversation, id="CreateConversation"),
        pytest.param(a_conversation, write_update_conversation, id="UpdateConversation"),
        pytest.param(a_conversation, write_delete_conversation, id="DeleteConversation"),
        pytest.param(
            a_deleted_conversation, write_undelete_conversation, id="UndeleteConversation"
        ),
        pytest.param(a_conversation, write_append_message, id="AppendMessage"),
        pytest.param(a_conversation, write_create_memory_item, id="CreateMemoryItem"),
        pytest.param(a_memory_item, write_update_memory_item, id="UpdateMemoryItem"),
        pytest.param(a_memory_item, write_delete_memory_item, id="DeleteMemoryItem"),
    ],
)
async def test_every_write_publishes_its_event(
    given: Given, write: Write, scene: Scene, events: EventTap
) -> None:
    ready = await given(scene)
    events.take()
    expected = await write(ready)
    got = events.take()
    assert [summary(e) for e in got] == [expected[:3]]
    event = got[0]
    assert event.actor.name == scene.owner.name
    assert event.workspace == scene.workspace
    assert event.id
    assert event.HasField("time")
    if expected.kind in (CONV_CHANGED, MESSAGE_CREATED, MEMORY_CHANGED):
        assert event.conversation == expected.conversation


# Writes that fail, and how.


async def update_workspace_stale(scene: Scene) -> object:
    return await scene.stub.UpdateWorkspace(
        pb.UpdateWorkspaceRequest(
            workspace=pb.Workspace(name=scene.workspace, display_name="x", etag=STALE),
            update_mask=mask("display_name"),
        ),
        metadata=scene.owner.md,
        timeout=CALL_DEADLINE_S,
    )


async def delete_workspace_stale(scene: Scene) -> object:
    return await scene.stub.DeleteWorkspace(
        pb.DeleteWorkspaceRequest(name=scene.workspace, etag=STALE),
        metadata=scene.owner.md,
        timeout=CALL_DEADLINE_S,
    )


async def update_conversation_stale(scene: Scene) -> object:
    return await _update_conversation(
        scene.stub,
        scene.owner,
        pb.Conversation(name=scene.conversation, title="x", etag=STALE),
        "title",
    )


async def delete_conversation_stale(scene: Scene) -> object:
    return await scene.stub.DeleteConversation(
        pb.DeleteConversationRequest(name=scene.conversation, etag=STALE),
        metadata=scene.owner.md,
        timeout=CALL_DEADLINE_S,
    )


async def append_invalid_message(scene: Scene) -> object:
    return await append(
        scene.stub, scene.owner, scene.conversation, message=pb.Message(role=pb.MESSAGE_ROLE_USER)
    )


async def remove_last_owner(scene: Scene) -> None:
    await _remove(scene.stub, scene.owner, scene.workspace, scene.owner)


async def create_duplicate_workspace(scene: Scene) -> object:
    return await create_workspace(scene.stub, scene.owner, "dup", workspace_id=_id(scene.workspace))


async def update_memory_item_stale(scene: Scene) -> object:
    return await scene.stub.UpdateMemoryItem(
        pb.UpdateMemoryItemRequest(
            memory_item=pb.MemoryItem(name=scene.memory, content="x", etag='"7"'),
            update_mask=mask("content"),
        ),
        metadata=scene.owner.md,
        timeout=CALL_DEADLINE_S,
    )


FAILED_WRITES: list[tuple[str, Callable[[Scene], Awaitable[object]], grpc.StatusCode]] = [
    ("UpdateWorkspace, stale etag", update_workspace_stale, ABORTED),
    ("DeleteWorkspace, stale etag", delete_workspace_stale, ABORTED),
    ("UpdateConversation, stale etag", update_conversation_stale, ABORTED),
    ("DeleteConversation, stale etag", delete_conversation_stale, ABORTED),
    ("AppendMessage, invalid", append_invalid_message, INVALID),
    ("RemoveWorkspaceMember, last owner", remove_last_owner, PRECONDITION),
    ("CreateWorkspace, duplicate", create_duplicate_workspace, grpc.StatusCode.ALREADY_EXISTS),
    ("UpdateMemoryItem, stale etag", update_memory_item_stale, ABORTED),
]


async def test_failed_writes_publish_nothing(scene: Scene, events: EventTap) -> None:
    # One scene for all: a refused write changes nothing, so none prepares the next.
    ready = await changed_resources(scene)
    events.take()
    for label, write, code in FAILED_WRITES:
        await refused(write(ready), code)
        assert events.take() == [], label


async def test_outsiders_get_not_found_and_viewers_cannot_write(stub: Stub, world: World) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    message = await append(stub, world.editor, conversation.name, "hello")
    memory = await remember(stub, world.editor, world.name, "a fact")
    reads: list[Callable[[Caller], Awaitable[Any]]] = [
        lambda c: get_workspace(stub, c, world.name),
        lambda c: get_conversation(stub, c, conversation.name),
        lambda c: all_messages(stub, c, conversation.name),
        lambda c: rpc(stub.GetMessage, pb.GetMessageRequest(name=message.name), c),
        lambda c: get_memory_item(stub, c, memory.name),
        lambda c: _list_memory(stub, c, world.name),
        lambda c: search(stub, c, world.name, "fact"),
        lambda c: _list_conversations(stub, c, world.name),
    ]
    writes: list[Callable[[Caller], Awaitable[Any]]] = [
        lambda c: create_conversation(stub, c, world.name),
        lambda c: append(stub, c, conversation.name, "hi"),
        lambda c: remember(stub, c, world.name, "x"),
        lambda c: remember(stub, c, conversation.name, "x"),
        lambda c: _update_conversation(
            stub, c, pb.Conversation(name=conversation.name, title="t"), "title"
        ),
    ]
    for call in [*reads, *writes]:
        await refused(call(world.outsider), NOT_FOUND)
    for call in writes:
        await refused(call(world.viewer), DENIED)
    for call in reads:
        await call(world.viewer)


async def test_a_malformed_etag_names_the_field_that_holds_it(stub: Stub, world: World) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    item = await remember(stub, world.editor, world.name, "etag target")
    bad = "not-an-etag"
    cases: list[tuple[Callable[[], Awaitable[Any]], str]] = [
        (
            lambda: rpc(
                stub.UpdateWorkspace,
                pb.UpdateWorkspaceRequest(
                    workspace=pb.Workspace(name=world.name, display_name="x", etag=bad),
                    update_mask=mask("display_name"),
                ),
                world.owner,
            ),
            "workspace.etag",
        ),
        (
            lambda: rpc(
                stub.DeleteWorkspace,
                pb.DeleteWorkspaceRequest(name=world.name, etag=bad),
                world.owner,
            ),
            "etag",
        ),
        (
            lambda: _update_conversation(
                stub,
                world.editor,
                pb.Conversation(name=conversation.name, title="x", etag=bad),
                "title",
            ),
            "conversation.etag",
        ),
        (
            lambda: rpc(
                stub.DeleteConversation,
                pb.DeleteConversationRequest(name=conversation.name, etag=bad),
                world.editor,
            ),
            "etag",
        ),
        (
            lambda: rpc(
                stub.UpdateMemoryItem,
                pb.UpdateMemoryItemRequest(
                    memory_item=pb.MemoryItem(name=item.name, content="x", etag=bad),
                    update_mask=mask("content"),
                ),
                world.editor,
            ),
            "memory_item.etag",
        ),
    ]
    wrong: list[tuple[str, list[str]]] = []
    for call, field in cases:
        error = await refused(call(), INVALID)
        if violations(error) != [field]:
            wrong.append((field, violations(error)))
    assert wrong == [], "field violations must name the request field (expected, got)"
    assert (await get_conversation(stub, world.viewer, conversation.name)).title == "A conversation"
    assert (await get_memory_item(stub, world.viewer, item.name)).content == "etag target"


async def test_counts_are_limited(database_url: str) -> None:
    async with limited_mesh(
        database_url,
        context_max_owned_workspaces=2,
        context_max_members=3,
        context_max_conversations=2,
        context_max_memory_items=2,
    ) as (mesh, stub):
        owner = await new_caller(mesh)
        first = await create_workspace(stub, owner, "One", request_id="ws-1")
        await create_workspace(stub, owner, "Two")
        error = await refused(create_workspace(stub, owner, "Three"), EXHAUSTED)
        assert reason(error) == "ERROR_REASON_QUOTA_EXCEEDED"
        # A retry of an earlier create still answers with what it created.
        assert (await create_workspace(stub, owner, "One", request_id="ws-1")).name == first.name
        assert len(await _list_workspaces(stub, owner)) == 2

        # Members: the owner and two more.
        a, b, c = [await new_caller(mesh) for _ in range(3)]
        await add_member(stub, owner, first.name, a, pb.WORKSPACE_ROLE_EDITOR)
        await add_member(stub, owner, first.name, b, pb.WORKSPACE_ROLE_VIEWER)
        error = await refused(
            add_member(stub, owner, first.name, c, pb.WORKSPACE_ROLE_VIEWER), EXHAUSTED
        )
        assert reason(error) == "ERROR_REASON_QUOTA_EXCEEDED"
        await refused(get_workspace(stub, c, first.name), NOT_FOUND)

        # Conversations, soft-deleted ones included.
        kept = await create_conversation(stub, a, first.name)
        dropped = await create_conversation(stub, a, first.name)
        await rpc(stub.DeleteConversation, pb.DeleteConversationRequest(name=dropped.name), a)
        error = await refused(create_conversation(stub, a, first.name), EXHAUSTED)
        assert reason(error) == "ERROR_REASON_QUOTA_EXCEEDED"

        # Memory items per scope.
        for content in ("one", "two"):
            await remember(stub, a, first.name, f"workspace fact {content}")
        error = await refused(remember(stub, a, first.name, "workspace fact three"), EXHAUSTED)
        assert reason(error) == "ERROR_REASON_QUOTA_EXCEEDED"
        await remember(stub, a, a.name, "the user scope has its own room")
        # A full conversation scope still takes messages; only the entities that fit are kept.
        message = await append(
            stub, a, kept.name, "ping @alice at alice@example.com, see https://example.com/x"
        )
        entities = await _list_memory(stub, a, kept.name, pb.MEMORY_KIND_ENTITY)
        assert len(entities) == 2
        assert all(list(m.source_messages) == [message.name] for m in entities)
        assert [m.name for m in await all_messages(stub, a, kept.name)] == [message.name]


async def test_writes_per_user_are_rate_limited(database_url: str) -> None:
    async with limited_mesh(database_url, context_max_writes_per_minute=5) as (mesh, stub):
        world = await ctx_world(mesh, stub)  # the owner's writes: the workspace, 2 members
        conversation = await create_conversation(stub, world.editor, world.name)
        for text in ("one", "two", "three", "four"):
            await append(stub, world.editor, conversation.name, text)
        error = await refused(append(stub, world.editor, conversation.name, "five"), EXHAUSTED)
        assert reason(error) == "ERROR_REASON_RATE_LIMITED"
        retry = detail(error, error_details_pb2.RetryInfo)
        assert 1 <= retry.retry_delay.seconds <= 60
        # Nothing was written, reads go on, and the limit is each caller's own.
        assert len(await all_messages(stub, world.viewer, conversation.name)) == 4
        await append(stub, world.owner, conversation.name, "the owner's fourth write")
        await append(stub, world.owner, conversation.name, "the owner's fifth write")
        error = await refused(create_conversation(stub, world.owner, world.name), EXHAUSTED)
        assert reason(error) == "ERROR_REASON_RATE_LIMITED"
