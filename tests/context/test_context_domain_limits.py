"""The context domain's limits, without gRPC: each names the field or the limit it enforces."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.common import Limits
from switchboard.platform.errors import (
    FieldViolation,
    InvalidArgument,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
)
from tests.kits.contextdomainkit import Kit, open_domain

pytestmark = pytest.mark.unit

LIMITS = Limits(
    max_title_chars=10,
    max_metadata_bytes=64,
    max_message_bytes=2048,
    max_parts=2,
    max_memory_chars=20,
    max_members=2,
    max_owned_workspaces=2,
    max_pinned=1,
    writes_per_minute=1000,
)


@pytest.fixture
async def kit(tmp_path: pathlib.Path) -> AsyncIterator[Kit]:
    async with open_domain(tmp_path, LIMITS) as opened:
        yield opened


def text(value: str) -> pb.ContentPart:
    return pb.ContentPart(text=value)


async def test_a_workspace_names_every_invalid_field_at_once(kit: Kit) -> None:
    owner = await kit.user()
    request = pb.CreateWorkspaceRequest(
        workspace_id="1-starts-with-a-digit",
        workspace=pb.Workspace(display_name="x" * 11, description="fine"),
    )
    with pytest.raises(InvalidArgument) as raised:
        await kit.domain.workspaces.create(owner, request)
    assert raised.value.violations == (
        FieldViolation(
            "workspace_id",
            "must be 3 to 63 characters: lowercase letters, digits and hyphens, "
            "starting with a letter",
        ),
        FieldViolation("workspace.display_name", "is longer than 10 characters"),
    )
    assert kit.events == []


async def test_a_user_owns_at_most_max_owned_workspaces(kit: Kit) -> None:
    owner = await kit.user()
    for _ in range(LIMITS.max_owned_workspaces):
        await kit.workspace(owner)
    with pytest.raises(QuotaExceeded) as raised:
        await kit.workspace(owner)
    assert raised.value.subject == "workspaces per owner"
    assert raised.value.message == "a user may own at most 2 workspaces"


async def test_a_workspace_holds_at_most_max_members(kit: Kit) -> None:
    owner, first, second = await kit.user(), await kit.user(), await kit.user()
    workspace = await kit.workspace(owner)

    async def add(member: str) -> pb.WorkspaceMember:
        return await kit.domain.members.add(
            owner,
            pb.AddWorkspaceMemberRequest(
                parent=workspace.name, user=member, role=pb.WORKSPACE_ROLE_VIEWER
            ),
        )

    await add(first.user_name)  # the owner is the first member
    with pytest.raises(QuotaExceeded) as raised:
        await add(second.user_name)
    assert raised.value.subject == "members per workspace"


async def test_a_message_over_its_limits_names_each_field(kit: Kit) -> None:
    caller = await kit.user()
    conversation = await kit.conversation(caller)
    message = pb.Message(
        role=pb.MESSAGE_ROLE_USER,
        author="users/someone-else",
        parts=[text("a"), pb.ContentPart(), text("c")],
    )
    with pytest.raises(InvalidArgument) as raised:
        await kit.domain.messages.append(
            caller, pb.AppendMessageRequest(parent=conversation.name, message=message)
        )
    assert raised.value.violations == (
        FieldViolation("message.parts", "has more than 2 parts"),
        FieldViolation("message.parts[1]", "is empty"),
        FieldViolation("message.author", "must be the caller or a handlers/ name"),
    )


async def test_a_message_over_max_message_bytes_is_too_large(kit: Kit) -> None:
    caller = await kit.user()
    conversation = await kit.conversation(caller)
    message = pb.Message(role=pb.MESSAGE_ROLE_USER, parts=[text("x" * 4000)])
    with pytest.raises(RequestTooLarge, match="the limit is 2048"):
        await kit.domain.messages.append(
            caller, pb.AppendMessageRequest(parent=conversation.name, message=message)
        )


async def test_tool_parts_are_checked_against_the_role_and_the_workspace(kit: Kit) -> None:
    caller = await kit.user()
    conversation = await kit.conversation(caller)
    call = pb.ToolCallContent(id="call-1", tool="workspaces/elsewhere/integrations/i/tools/t")
    message = pb.Message(role=pb.MESSAGE_ROLE_USER, parts=[pb.ContentPart(tool_call=call)])
    with pytest.raises(InvalidArgument) as raised:
        await kit.domain.messages.append(
            caller, pb.AppendMessageRequest(parent=conversation.name, message=message)
        )
    workspace = conversation.name.split("/conversations/")[0]
    assert raised.value.violations == (
        FieldViolation("message.parts[0].tool_call", "is only allowed in assistant messages"),
        FieldViolation("message.parts[0].tool_call.tool", f"must be a tool of {workspace}"),
    )


async def test_memory_content_and_pins_are_bounded(kit: Kit) -> None:
    caller = await kit.user()

    async def remember(content: str, *, pinned: bool = False) -> pb.MemoryItem:
        return await kit.domain.memory.create(
            caller,
            pb.CreateMemoryItemRequest(
                parent=caller.user_name,
                memory_item=pb.MemoryItem(kind=pb.MEMORY_KIND_NOTE, content=content, pinned=pinned),
            ),
        )

    with pytest.raises(InvalidArgument) as raised:
        await remember("x" * 21)
    assert raised.value.violations == (
        FieldViolation("memory_item.content", "is longer than 20 characters"),
    )
    await remember("pinned once", pinned=True)
    with pytest.raises(QuotaExceeded) as quota:
        await remember("pinned twice", pinned=True)
    assert quota.value.subject == "pinned memory items"


async def test_writes_past_the_rate_are_refused_with_a_retry_time(tmp_path: pathlib.Path) -> None:
    async with open_domain(tmp_path, Limits(writes_per_minute=2)) as kit:
        caller = await kit.user()
        await kit.workspace(caller)
        await kit.workspace(caller)
        with pytest.raises(RateLimited) as raised:
            await kit.workspace(caller)
        assert raised.value.retry_after_s >= 1.0
        # Reads do not spend writes.
        assert (await kit.domain.workspaces.list(caller, pb.ListWorkspacesRequest())).workspaces
