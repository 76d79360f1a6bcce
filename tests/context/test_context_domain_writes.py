"""The context domain's writes, without gRPC: etags, idempotent creates, named refusals."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
from google.protobuf import field_mask_pb2

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.platform.errors import (
    AlreadyExists,
    EtagMismatch,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from tests.kits.contextdomainkit import Kit, open_domain

pytestmark = pytest.mark.unit


@pytest.fixture
async def kit(tmp_path: pathlib.Path) -> AsyncIterator[Kit]:
    async with open_domain(tmp_path) as opened:
        yield opened


def retitle(name: str, title: str, etag: str) -> pb.UpdateConversationRequest:
    return pb.UpdateConversationRequest(
        conversation=pb.Conversation(name=name, title=title, etag=etag),
        update_mask=field_mask_pb2.FieldMask(paths=["title"]),
    )


async def test_an_update_takes_the_current_etag_and_refuses_a_stale_one(kit: Kit) -> None:
    caller = await kit.user()
    conversation = await kit.conversation(caller)
    updated = await kit.domain.conversations.update(
        caller, retitle(conversation.name, "First", conversation.etag)
    )
    assert (updated.title, updated.etag) == ("First", '"2"')
    with pytest.raises(EtagMismatch):
        await kit.domain.conversations.update(
            caller, retitle(conversation.name, "Second", conversation.etag)
        )
    # No etag: the update applies to whatever is current.
    assert (await kit.domain.conversations.update(caller, retitle(updated.name, "Third", ""))).etag
    assert (await kit.domain.conversations.get(conversation.name)).title == "Third"


async def test_a_malformed_etag_is_the_requests_field_error(kit: Kit) -> None:
    caller = await kit.user()
    conversation = await kit.conversation(caller)
    with pytest.raises(InvalidArgument) as raised:
        await kit.domain.conversations.update(caller, retitle(conversation.name, "T", "v1"))
    assert raised.value.violations == (FieldViolation("conversation.etag", "is malformed"),)


async def test_a_create_retried_with_its_request_id_creates_once(kit: Kit) -> None:
    caller = await kit.user()
    request = pb.CreateWorkspaceRequest(
        request_id="retry-1", workspace=pb.Workspace(display_name="Once")
    )
    first = await kit.domain.workspaces.create(caller, request)
    again = await kit.domain.workspaces.create(caller, request)
    assert again == first
    created = [e for e in kit.events if e.type == events_pb2.EVENT_TYPE_WORKSPACE_CHANGED]
    assert [e.workspace_changed.workspace.name for e in created] == [first.name]

    changed = pb.CreateWorkspaceRequest(
        request_id="retry-1", workspace=pb.Workspace(display_name="Other")
    )
    with pytest.raises(InvalidArgument) as raised:
        await kit.domain.workspaces.create(caller, changed)
    assert raised.value.violations == (
        FieldViolation("request_id", "was already used for a different request"),
    )


async def test_an_append_retried_with_its_request_id_stores_one_message(kit: Kit) -> None:
    caller = await kit.user()
    conversation = await kit.conversation(caller)
    request = pb.AppendMessageRequest(
        parent=conversation.name,
        request_id="turn-1",
        message=pb.Message(role=pb.MESSAGE_ROLE_USER, parts=[pb.ContentPart(text="hi")]),
    )
    first = await kit.domain.messages.append(caller, request)
    again = await kit.domain.messages.append(caller, request)
    assert again == first
    assert first.sequence == 1
    listed = await kit.domain.messages.list(pb.ListMessagesRequest(parent=conversation.name))
    assert [m.name for m in listed.messages] == [first.name]


async def test_refusals_name_the_resource(kit: Kit) -> None:
    caller = await kit.user()
    conversation = await kit.conversation(caller)
    workspace = conversation.name.split("/conversations/")[0]
    missing = f"{workspace}/conversations/nope"
    with pytest.raises(NotFound, match=f"^{missing} not found$"):
        await kit.domain.conversations.get(missing)
    with pytest.raises(NotFound, match=f"^{conversation.name}/messages/m1 not found$"):
        await kit.domain.messages.get(f"{conversation.name}/messages/m1")
    with pytest.raises(AlreadyExists, match=f"^{workspace}/members/{caller.user_id} already"):
        await kit.domain.members.add(
            caller,
            pb.AddWorkspaceMemberRequest(
                parent=workspace, user=caller.user_name, role=pb.WORKSPACE_ROLE_EDITOR
            ),
        )
    with pytest.raises(FailedPrecondition, match=f"^{conversation.name} is already not deleted$"):
        await kit.domain.conversations.set_deleted(caller, conversation.name, "", deleted=False)


async def test_an_archived_conversation_takes_no_messages(kit: Kit) -> None:
    caller = await kit.user()
    conversation = await kit.conversation(caller)
    await kit.domain.conversations.update(
        caller,
        pb.UpdateConversationRequest(
            conversation=pb.Conversation(name=conversation.name, archived=True),
            update_mask=field_mask_pb2.FieldMask(paths=["archived"]),
        ),
    )
    with pytest.raises(FailedPrecondition, match="is archived; unarchive it to change it"):
        await kit.say(caller, conversation.name, "still there?")


async def test_the_last_owner_cannot_leave(kit: Kit) -> None:
    owner = await kit.user()
    workspace = await kit.workspace(owner)
    with pytest.raises(FailedPrecondition, match="must keep an owner"):
        await kit.domain.members.remove(owner, None, f"{workspace.name}/members/{owner.user_id}")
