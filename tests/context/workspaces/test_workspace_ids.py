"""Workspace ids from a stranger's point of view (docs/contracts.md, "Names"; decision 42).

A workspace id chosen by its creator is a global name, like an organization's: whether it
is taken is public, and ``CreateWorkspace`` with a taken id says ALREADY_EXISTS to anyone.
That is all a stranger learns. The refusal is the same for a live and a deleted workspace
and names no owner, title or description, and every other call on a taken workspace answers
a stranger exactly as for an id nobody ever took.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.authkit import detail
from tests.kits.contextkit import (
    Caller,
    Stub,
    create_conversation,
    create_workspace,
    new_caller,
    stub_fixture,
)

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

TITLE = "Acme secret plans"
DESCRIPTION = "the merger nobody may know about"


@pytest.fixture
def settings(database_url: str) -> Settings:
    # On SQLite and on a real PostgreSQL server: each decides "taken" in its own SQL.
    return make_settings(database_url=database_url)


stub = stub_fixture


async def answer(call: Awaitable[Any], workspace_id: str) -> tuple[str, str, str, list[str]]:
    """What a failed call tells its caller, with the id it named written as ``ID``: the code,
    the message, the reason and the ErrorInfo metadata (the request id left out)."""
    try:
        await call
    except aio.AioRpcError as error:
        info: error_details_pb2.ErrorInfo = detail(error, error_details_pb2.ErrorInfo)
        metadata = sorted(
            f"{key}={value.replace(workspace_id, 'ID')}"
            for key, value in info.metadata.items()
            if key != "request_id"
        )
        message = (error.details() or "").replace(workspace_id, "ID")
        return error.code().name, message, info.reason, metadata
    raise AssertionError("the call succeeded")


Probe = Callable[[Stub, Caller, str], Awaitable[Any]]

PROBES: dict[str, Probe] = {
    "GetWorkspace": lambda stub, who, ws: stub.GetWorkspace(
        pb.GetWorkspaceRequest(name=f"workspaces/{ws}"), metadata=who.md, timeout=CALL_DEADLINE_S
    ),
    "UpdateWorkspace": lambda stub, who, ws: stub.UpdateWorkspace(
        pb.UpdateWorkspaceRequest(
            workspace=pb.Workspace(name=f"workspaces/{ws}", display_name="Mine now"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=who.md,
        timeout=CALL_DEADLINE_S,
    ),
    "DeleteWorkspace": lambda stub, who, ws: stub.DeleteWorkspace(
        pb.DeleteWorkspaceRequest(name=f"workspaces/{ws}"), metadata=who.md, timeout=CALL_DEADLINE_S
    ),
    "ListWorkspaceMembers": lambda stub, who, ws: stub.ListWorkspaceMembers(
        pb.ListWorkspaceMembersRequest(parent=f"workspaces/{ws}"),
        metadata=who.md,
        timeout=CALL_DEADLINE_S,
    ),
    "AddWorkspaceMember": lambda stub, who, ws: stub.AddWorkspaceMember(
        pb.AddWorkspaceMemberRequest(
            parent=f"workspaces/{ws}", user=who.name, role=pb.WORKSPACE_ROLE_OWNER
        ),
        metadata=who.md,
        timeout=CALL_DEADLINE_S,
    ),
    "ListConversations": lambda stub, who, ws: stub.ListConversations(
        pb.ListConversationsRequest(parent=f"workspaces/{ws}"),
        metadata=who.md,
        timeout=CALL_DEADLINE_S,
    ),
    "CreateConversation": lambda stub, who, ws: stub.CreateConversation(
        pb.CreateConversationRequest(
            parent=f"workspaces/{ws}", conversation=pb.Conversation(title="x")
        ),
        metadata=who.md,
        timeout=CALL_DEADLINE_S,
    ),
    "SearchMemoryItems": lambda stub, who, ws: stub.SearchMemoryItems(
        pb.SearchMemoryItemsRequest(parent=f"workspaces/{ws}", query="merger"),
        metadata=who.md,
        timeout=CALL_DEADLINE_S,
    ),
}


async def test_a_stranger_learns_that_a_workspace_id_is_taken_and_nothing_else(
    mesh: SwitchboardServer, stub: Stub
) -> None:
    owner, stranger = await new_caller(mesh), await new_caller(mesh)
    live = await create_workspace(
        stub, owner, TITLE, workspace_id="acme-plans", description=DESCRIPTION
    )
    await create_conversation(stub, owner, live.name)
    deleted = await create_workspace(stub, owner, TITLE, workspace_id="acme-gone")
    await stub.DeleteWorkspace(
        pb.DeleteWorkspaceRequest(name=deleted.name), metadata=owner.md, timeout=CALL_DEADLINE_S
    )

    # Taken is public, to anyone: live or deleted, the same answer...
    taken = [
        await answer(create_workspace(stub, stranger, "Mine", workspace_id=ws), ws)
        for ws in ("acme-plans", "acme-gone")
    ]
    assert taken[0] == taken[1]
    code, message, reason, metadata = taken[0]
    assert message == "workspaces/ID already exists", message
    assert (code, reason) == ("ALREADY_EXISTS", "ERROR_REASON_ALREADY_EXISTS")
    # ... and it says nothing about the workspace or who has it.
    said = " ".join([message, *metadata])
    for secret in (TITLE, DESCRIPTION, owner.id, "deleted"):
        assert secret not in said, said

    # Everything else on a taken id answers a stranger as on an id nobody took.
    for rpc, probe in PROBES.items():
        on_taken = await answer(probe(stub, stranger, "acme-plans"), "acme-plans")
        on_free = await answer(probe(stub, stranger, "never-taken"), "never-taken")
        assert on_taken == on_free, rpc
        assert on_taken[0] == grpc.StatusCode.NOT_FOUND.name, (rpc, on_taken)
    workspaces = await stub.ListWorkspaces(
        pb.ListWorkspacesRequest(), metadata=stranger.md, timeout=CALL_DEADLINE_S
    )
    assert list(workspaces.workspaces) == []

    # A free id is the stranger's, and the owner's workspace is untouched.
    mine = await create_workspace(stub, stranger, "Mine", workspace_id="never-taken")
    assert mine.name == "workspaces/never-taken"
    again = await stub.GetWorkspace(
        pb.GetWorkspaceRequest(name=live.name), metadata=owner.md, timeout=CALL_DEADLINE_S
    )
    assert (again.workspace.display_name, again.workspace.description) == (TITLE, DESCRIPTION)
