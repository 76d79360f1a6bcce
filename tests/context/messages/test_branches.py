"""Conversation branches through the real context service, on SQLite and PostgreSQL:
an edit starts a branch beside the message it replaces, reads and windows follow the
active branch, SwitchBranch moves it, DeleteMessage removes messages and leaves a
tombstone, and every refusal is precise (docs/conversations.md, "Branches")."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.messages import store as message_store
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.context.files.test_files import upload
from tests.kits.contextkit import (
    Caller,
    EventTap,
    Stub,
    World,
    append,
    create_conversation,
    events_fixture,
    get_conversation,
    included_messages,
    refused,
    stub_fixture,
    text_message,
    violations,
    world_fixture,
)

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

ASSISTANT = pb.MESSAGE_ROLE_ASSISTANT


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url, context_max_branches=6)


stub, world, events = stub_fixture, world_fixture, events_fixture


async def listed(
    stub: Stub, caller: Caller, conversation: str, branch: int = 0, page_size: int = 100
) -> tuple[list[pb.Message], int]:
    """Every message of a branch (0: the active one), and the branch read."""
    found: list[pb.Message] = []
    token, read = "", 0
    while True:
        page = await stub.ListMessages(
            pb.ListMessagesRequest(
                parent=conversation, branch=branch, page_size=page_size, page_token=token
            ),
            metadata=caller.md,
            timeout=CALL_DEADLINE_S,
        )
        found.extend(page.messages)
        read = page.branch
        token = page.next_page_token
        if not token:
            return found, read


def texts(messages: list[pb.Message]) -> list[str]:
    return [m.parts[0].text for m in messages]


async def edit(
    stub: Stub, caller: Caller, old: pb.Message, text: str, branch: int = 0
) -> pb.Message:
    conversation = old.name.rsplit("/messages/", 1)[0]
    response = await stub.AppendMessage(
        pb.AppendMessageRequest(
            parent=conversation,
            message=text_message(text, role=old.role),
            replaces=old.name,
            branch=branch,
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.message


async def window_texts(stub: Stub, caller: Caller, conversation: str, branch: int = 0) -> list[str]:
    response = await stub.GetContextWindow(
        pb.GetContextWindowRequest(conversation=conversation, token_budget=4000, branch=branch),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return [m.parts[0].text for m in included_messages(response.window)]


async def switch(
    stub: Stub, caller: Caller, conversation: str, *, message: str = "", branch: int = 0
) -> pb.Conversation:
    response = await stub.SwitchBranch(
        pb.SwitchBranchRequest(conversation=conversation, message=message, branch=branch),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.conversation


async def exchange(stub: Stub, world: World) -> tuple[str, list[pb.Message]]:
    """A conversation of the owner's: question, answer, question, answer."""
    conversation = (await create_conversation(stub, world.owner, world.name)).name
    made = []
    for text, role in (
        ("first question", pb.MESSAGE_ROLE_USER),
        ("first answer", ASSISTANT),
        ("second question", pb.MESSAGE_ROLE_USER),
        ("second answer", ASSISTANT),
    ):
        made.append(await append(stub, world.owner, conversation, text, role=role))
    return conversation, made


async def test_an_edit_starts_a_branch_that_reads_and_windows_follow(
    stub: Stub, world: World, events: EventTap
) -> None:
    conversation, (q1, a1, q2, a2) = await exchange(stub, world)
    plain, branch = await listed(stub, world.owner, conversation)
    assert branch == 1
    # No other versions: read as appended (no siblings to show).
    assert [list(m.siblings) for m in plain] == [[]] * 4
    assert {m.sibling_position for m in plain} == {0}
    assert plain == [q1, a1, q2, a2]
    events.take()

    q2b = await edit(stub, world.owner, q2, "second question, better")
    assert q2b.branch == 2
    assert q2b.sequence == 5
    after = await get_conversation(stub, world.owner, conversation)
    assert (after.active_branch, after.branch_count) == (2, 2)
    seen = events.take()
    assert [e.type for e in seen][:2] == [
        events_pb2.EVENT_TYPE_MESSAGE_CREATED,
        events_pb2.EVENT_TYPE_CONVERSATION_CHANGED,
    ]
    assert seen[1].conversation_changed.conversation.active_branch == 2

    active, branch = await listed(stub, world.owner, conversation)
    assert branch == 2
    assert texts(active) == ["first question", "first answer", "second question, better"]
    assert active[2].siblings == [q2.name, q2b.name]
    assert active[2].sibling_position == 2
    assert not active[0].siblings
    assert active[0].sibling_position == 0
    first, _ = await listed(stub, world.owner, conversation, branch=1)
    assert texts(first) == texts([q1, a1, q2, a2])
    assert first[2].siblings == [q2.name, q2b.name]
    assert first[2].sibling_position == 1
    assert await window_texts(stub, world.owner, conversation) == texts(active)
    # The window counts the branch's messages, not the conversation's: nothing omitted.
    whole = await stub.GetContextWindow(
        pb.GetContextWindowRequest(conversation=conversation, token_budget=4000),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert whole.window.omitted_messages == 0
    assert await window_texts(stub, world.owner, conversation, branch=1) == texts(first)

    # An append names no branch: it goes to the end of the active one.
    a2b = await append(stub, world.owner, conversation, "better answer", role=ASSISTANT)
    assert a2b.branch == 2
    assert (await listed(stub, world.owner, conversation))[0][-1].name == a2b.name
    # Messages appended on branch 1 since stay off branch 2, and the other way round.
    q3 = (
        await stub.AppendMessage(
            pb.AppendMessageRequest(
                parent=conversation, message=text_message("third question"), branch=1
            ),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    ).message
    assert q3.branch == 1
    assert texts((await listed(stub, world.owner, conversation, branch=1))[0])[-1] == (
        "third question"
    )
    assert "third question" not in await window_texts(stub, world.owner, conversation)

    # The switcher: the branch through the older version becomes active again.
    switched = await switch(stub, world.owner, conversation, message=q2.name)
    assert switched.active_branch == 1
    assert switched.version > after.version
    assert events.take()[-1].type == events_pb2.EVENT_TYPE_CONVERSATION_CHANGED
    assert (await window_texts(stub, world.owner, conversation))[-1] == "third question"
    # Already active: nothing changes, no event.
    again = await switch(stub, world.owner, conversation, branch=1)
    assert again.version == switched.version
    assert not events.take()


async def test_branches_nest_and_an_empty_branch_starts_over(stub: Stub, world: World) -> None:
    conversation, (q1, a1, q2, _) = await exchange(stub, world)
    q2b = await edit(stub, world.owner, q2, "q2 take two")
    a2b = await append(stub, world.owner, conversation, "a2 take two", role=ASSISTANT)
    # An edit on branch 2 of its own answer: branch 3, forked from 2.
    a2c = await edit(stub, world.owner, a2b, "a2 take three")
    assert a2c.branch == 3
    third, _ = await listed(stub, world.owner, conversation)
    assert texts(third) == ["first question", "first answer", "q2 take two", "a2 take three"]
    assert third[3].siblings == [a2b.name, a2c.name]
    # The first message edited: a branch with no history before it.
    q1b = await edit(stub, world.owner, q1, "a new start")
    fourth, _ = await listed(stub, world.owner, conversation)
    assert texts(fourth) == ["a new start"]
    assert fourth[0].siblings == [q1.name, q1b.name]
    assert fourth[0].sibling_position == 2
    # CreateBranch after an answer: a branch ending there, nothing of its own yet.
    made = await stub.CreateBranch(
        pb.CreateBranchRequest(conversation=conversation, after=a1.name),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert made.branch == 5
    assert made.conversation.active_branch == 5
    fifth, _ = await listed(stub, world.owner, conversation)
    assert texts(fifth) == ["first question", "first answer"]
    a_new = await append(stub, world.owner, conversation, "q2 take four")
    assert (await listed(stub, world.owner, conversation))[0][-1].siblings == [
        q2.name,
        q2b.name,
        a_new.name,
    ]
    # Switching by a message picks the branch through it that changed last.
    assert (await switch(stub, world.owner, conversation, message=a1.name)).active_branch == 5
    assert (await switch(stub, world.owner, conversation, message=q2b.name)).active_branch == 3


async def test_two_edits_at_once_each_get_their_own_branch(stub: Stub, world: World) -> None:
    conversation, (_, _, q2, _) = await exchange(stub, world)
    first, second = await asyncio.gather(
        edit(stub, world.owner, q2, "version A"), edit(stub, world.owner, q2, "version B")
    )
    assert {first.branch, second.branch} == {2, 3}
    mine, _ = await listed(stub, world.owner, conversation, branch=1)
    assert len(mine[2].siblings) == 3
    assert sorted(mine[2].siblings[1:]) == sorted([first.name, second.name])
    after = await get_conversation(stub, world.owner, conversation)
    assert after.branch_count == 3
    assert after.active_branch in (2, 3)


async def test_delete_removes_messages_and_leaves_a_tombstone(
    stub: Stub, world: World, events: EventTap
) -> None:
    conversation, (q1, a1, q2, a2) = await exchange(stub, world)
    mail = await append(stub, world.owner, conversation, "write to zed@example.org today")
    entity = await stub.ListMemoryItems(
        pb.ListMemoryItemsRequest(parent=conversation),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    cited = [m for m in entity.memory_items if mail.name in m.source_messages]
    assert cited, "the e-mail address should be remembered as an entity"
    before = await get_conversation(stub, world.owner, conversation)
    events.take()

    response = await stub.DeleteMessage(
        pb.DeleteMessageRequest(name=q2.name, with_later=True),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert list(response.deleted) == [q2.name, a2.name, mail.name]
    assert response.conversation.message_count == before.message_count - 3
    seen = events.take()
    tombstones = [e for e in seen if e.type == events_pb2.EVENT_TYPE_MESSAGE_DELETED]
    assert [t.message_deleted.message for t in tombstones] == list(response.deleted)
    assert [t.message_deleted.sequence for t in tombstones] == [3, 4, 5]
    assert all("zed@example.org" not in str(t) for t in tombstones)
    assert any(
        e.type == events_pb2.EVENT_TYPE_MEMORY_CHANGED
        and e.memory_changed.change == events_pb2.CHANGE_KIND_DELETED
        for e in seen
    )
    remaining, _ = await listed(stub, world.owner, conversation)
    assert [m.name for m in remaining] == [q1.name, a1.name]
    await refused(
        stub.GetMessage(
            pb.GetMessageRequest(name=q2.name), metadata=world.owner.md, timeout=CALL_DEADLINE_S
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    left = await stub.ListMemoryItems(
        pb.ListMemoryItemsRequest(parent=conversation),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert not [m for m in left.memory_items if "zed@example.org" in m.content]
    found = await stub.SearchContext(
        pb.SearchContextRequest(parent=world.name, query="zed", mode=pb.SEARCH_MODE_FULL_TEXT),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert not found.results
    assert await window_texts(stub, world.owner, conversation) == ["first question", "first answer"]
    # The next message follows on; a deleted message cannot be deleted twice.
    await append(stub, world.owner, conversation, "onwards")
    await refused(
        stub.DeleteMessage(
            pb.DeleteMessageRequest(name=q2.name), metadata=world.owner.md, timeout=CALL_DEADLINE_S
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_roles_decide_who_edits_switches_and_deletes(stub: Stub, world: World) -> None:
    conversation, (q1, a1, _, _) = await exchange(stub, world)
    editor_said = await append(stub, world.editor, conversation, "the editor's words")
    # Another person's message: not the editor's to edit or delete.
    error = await refused(
        edit(stub, world.editor, q1, "rewritten by someone else"),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "author" in str(error.details())
    await refused(
        stub.DeleteMessage(
            pb.DeleteMessageRequest(name=q1.name), metadata=world.editor.md, timeout=CALL_DEADLINE_S
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # Answers and their own words are.
    await edit(stub, world.editor, editor_said, "the editor's better words")
    await stub.DeleteMessage(
        pb.DeleteMessageRequest(name=a1.name, branch=1),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    # Viewers read every branch but change none.
    for call in (
        edit(stub, world.viewer, q1, "no"),
        switch(stub, world.viewer, conversation, branch=1),
        stub.DeleteMessage(
            pb.DeleteMessageRequest(name=q1.name), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
        ),
        stub.CreateBranch(
            pb.CreateBranchRequest(conversation=conversation),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        ),
    ):
        await refused(call, grpc.StatusCode.PERMISSION_DENIED)
    assert (await listed(stub, world.viewer, conversation, branch=1))[0][0].name == q1.name
    # A stranger learns nothing.
    for call in (
        switch(stub, world.outsider, conversation, branch=1),
        stub.DeleteMessage(
            pb.DeleteMessageRequest(name=q1.name),
            metadata=world.outsider.md,
            timeout=CALL_DEADLINE_S,
        ),
    ):
        await refused(call, grpc.StatusCode.NOT_FOUND)
    # The owner deletes anyone's words.
    await stub.DeleteMessage(
        pb.DeleteMessageRequest(name=editor_said.name, branch=1),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )


async def test_bad_requests_are_refused_precisely(stub: Stub, world: World) -> None:
    conversation, (q1, _, _q2, a2) = await exchange(stub, world)
    other = (await create_conversation(stub, world.owner, world.name)).name
    error = await refused(
        stub.AppendMessage(
            pb.AppendMessageRequest(
                parent=other, message=text_message("elsewhere"), replaces=q1.name
            ),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations(error) == ["replaces"]
    await refused(edit(stub, world.owner, a2, "x", branch=9), grpc.StatusCode.NOT_FOUND)
    # A new version keeps the role of the message it replaces.
    wrong_role = stub.AppendMessage(
        pb.AppendMessageRequest(
            parent=conversation, message=text_message("I answer"), replaces=a2.name
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    await refused(wrong_role, grpc.StatusCode.FAILED_PRECONDITION)
    for request in (
        pb.SwitchBranchRequest(conversation=conversation),
        pb.SwitchBranchRequest(conversation=conversation, branch=1, message=q1.name),
        pb.SwitchBranchRequest(conversation=conversation, branch=-1),
    ):
        error = await refused(
            stub.SwitchBranch(request, metadata=world.owner.md, timeout=CALL_DEADLINE_S),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violations(error) == ["branch", "message"]
    await refused(switch(stub, world.owner, conversation, branch=7), grpc.StatusCode.NOT_FOUND)
    stale = await get_conversation(stub, world.owner, conversation)
    await edit(stub, world.owner, q1, "moves the version")
    await refused(
        stub.SwitchBranch(
            pb.SwitchBranchRequest(conversation=conversation, branch=1, etag=stale.etag),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        grpc.StatusCode.ABORTED,
    )
    error = await refused(
        stub.ListMessages(
            pb.ListMessagesRequest(parent=conversation, branch=-2),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations(error) == ["branch"]
    # The limit on branches (6 here): the sixth edit is one too many.
    for n in range(4):
        await edit(stub, world.owner, q1, f"again {n}", branch=1)
    error = await refused(
        edit(stub, world.owner, q1, "one too many", branch=1), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert "6 branches" in str(error.details())


async def test_delete_removes_the_files_a_message_stored_not_those_it_named(
    stub: Stub, world: World, events: EventTap
) -> None:
    conversation = (await create_conversation(stub, world.owner, world.name)).name
    uploaded = await upload(
        stub, world.owner, world.name, b"shared notes", media_type="text/plain", display_name="n"
    )
    message = pb.Message(
        role=pb.MESSAGE_ROLE_USER,
        parts=[
            pb.ContentPart(text="my recording and the notes"),
            pb.ContentPart(
                file=pb.FileReference(
                    inline_data=b"private words", mime_type="text/plain", display_name="mine"
                )
            ),
            pb.ContentPart(file=pb.FileReference(file=uploaded.name)),
        ],
    )
    stored = await append(stub, world.owner, conversation, message=message)
    own = stored.parts[1].file.file
    assert own
    assert own != uploaded.name
    events.take()
    await stub.DeleteMessage(
        pb.DeleteMessageRequest(name=stored.name), metadata=world.owner.md, timeout=CALL_DEADLINE_S
    )
    gone = [
        e.file_changed.file.name
        for e in events.take()
        if e.type == events_pb2.EVENT_TYPE_FILE_CHANGED
        and e.file_changed.change == events_pb2.CHANGE_KIND_DELETED
    ]
    assert gone == [own]
    await refused(
        stub.GetFile(pb.GetFileRequest(name=own), metadata=world.owner.md, timeout=CALL_DEADLINE_S),
        grpc.StatusCode.NOT_FOUND,
    )
    kept = await stub.GetFile(
        pb.GetFileRequest(name=uploaded.name), metadata=world.owner.md, timeout=CALL_DEADLINE_S
    )
    assert kept.file.name == uploaded.name


async def test_one_deletion_removes_a_bounded_number_of_messages(
    stub: Stub, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(message_store, "MAX_DELETED", 3)
    conversation, (q1, a1, q2, _) = await exchange(stub, world)
    error = await refused(
        stub.DeleteMessage(
            pb.DeleteMessageRequest(name=q1.name, with_later=True),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "at most 3 messages" in str(error.details())
    assert len((await listed(stub, world.owner, conversation))[0]) == 4  # nothing deleted
    done = await stub.DeleteMessage(
        pb.DeleteMessageRequest(name=a1.name, with_later=True),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert len(done.deleted) == 3
    assert [m.name for m in (await listed(stub, world.owner, conversation))[0]] == [q1.name]
    del q2
