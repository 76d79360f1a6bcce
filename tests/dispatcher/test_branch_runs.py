"""Runs on conversation branches (docs/conversations.md, "Branches"): an edit sent with
SendMessage answers on its new branch, RegenerateMessage answers the same question again
beside the old answer, a run keeps to its branch whatever is active when it ends, and the
refusals are precise. Real mesh, the echo handler, SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from tests.conftest import CALL_DEADLINE_S
from tests.dispatcher.assistants.test_assistants import Desk, create, desk_mesh
from tests.kits.contextkit import Caller, context_stub, create_conversation, refused, violations
from tests.kits.dispatchkit import finished, request, send, stored_running

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
ECHO = "handlers/echo"


@pytest.fixture
async def desk(database_url: str) -> Any:
    async with desk_mesh(database_url=database_url) as made:
        yield made


async def active_texts(d: Desk, conversation: str, branch: int = 0) -> list[str]:
    page = await context_stub(d.channel).ListMessages(
        cpb.ListMessagesRequest(parent=conversation, branch=branch),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return [m.parts[0].text for m in page.messages]


async def listed(d: Desk, conversation: str, branch: int = 0) -> list[cpb.Message]:
    page = await context_stub(d.channel).ListMessages(
        cpb.ListMessagesRequest(parent=conversation, branch=branch),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return list(page.messages)


async def regenerate(
    d: Desk, message: str, caller: Caller | None = None, **fields: Any
) -> pb.RegenerateMessageResponse:
    response: pb.RegenerateMessageResponse = await d.stub.RegenerateMessage(
        pb.RegenerateMessageRequest(message=message, **fields),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
    )
    return response


async def asked(d: Desk, conversation: str, text: str, **fields: Any) -> pb.Run:
    """``text`` sent to the echo handler, and its run once finished."""
    sent = await send(d.stub, d.world.owner, request(conversation, text, handler=ECHO, **fields))
    run = await finished(d.stub, d.world.owner, sent.run.name)
    assert run.state == pb.RUN_STATE_SUCCEEDED, run
    return run


async def test_an_edit_and_a_regenerated_answer_run_on_their_own_branches(desk: Desk) -> None:
    d = desk
    conversation = (
        await create_conversation(context_stub(d.channel), d.world.owner, d.world.name)
    ).name
    first = await asked(d, conversation, "hello there")
    assert first.branch == 1
    question = first.input_message

    # The edit: SendMessage with replaces.
    sent = await send(
        d.stub,
        d.world.owner,
        pb.SendMessageRequest(
            conversation=conversation,
            message=cpb.Message(parts=[cpb.ContentPart(text="hello again")]),
            handler=ECHO,
            replaces=question,
        ),
    )
    assert sent.message.branch == 2
    assert sent.run.branch == 2
    edited = await finished(d.stub, d.world.owner, sent.run.name)
    assert edited.state == pb.RUN_STATE_SUCCEEDED
    assert edited.branch == 2
    on_two = await listed(d, conversation)
    assert len(on_two) == 2
    assert on_two[0].parts[0].text == "hello again"
    assert on_two[0].siblings == [question, sent.message.name]
    assert on_two[1].name == edited.output_message
    assert on_two[1].branch == 2
    assert await active_texts(d, conversation, branch=1) == [
        "hello there",
        (await listed(d, conversation, branch=1))[1].parts[0].text,
    ]

    # Regenerate the edited question's answer: a third branch, the same question.
    again = await regenerate(d, edited.output_message, request_id="again-1")
    # A retry with the same id is the same run, on the same branch: nothing new.
    repeated = await regenerate(d, edited.output_message, request_id="again-1")
    assert repeated.run.name == again.run.name
    assert again.message.name == sent.message.name
    assert again.run.branch == 3
    assert again.run.input_message == sent.message.name
    redone = await finished(d.stub, d.world.owner, again.run.name)
    assert redone.state == pb.RUN_STATE_SUCCEEDED
    on_three = await listed(d, conversation)
    assert [m.name for m in on_three] == [sent.message.name, redone.output_message]
    assert on_three[1].siblings == [edited.output_message, redone.output_message]
    assert on_three[1].sibling_position == 2
    conversation_now = await context_stub(d.channel).GetConversation(
        cpb.GetConversationRequest(name=conversation),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert (
        conversation_now.conversation.active_branch,
        conversation_now.conversation.branch_count,
    ) == (3, 3)


async def test_a_run_answers_on_its_branch_when_another_becomes_active(desk: Desk) -> None:
    d = desk
    contexts = context_stub(d.channel)
    conversation = (await create_conversation(contexts, d.world.owner, d.world.name)).name
    await asked(d, conversation, "one")
    slow = await send(
        d.stub,
        d.world.owner,
        request(conversation, "three slow words", handler=ECHO, delay_ms=300),
    )
    await stored_running(d.stub, d.world.owner, slow.run.name)
    # Meanwhile the person starts over from the first message, on a new branch.
    fresh = await contexts.CreateBranch(
        cpb.CreateBranchRequest(conversation=conversation),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert fresh.conversation.active_branch == 2
    # A steer of the run joins the run's branch, not the active one.
    steered = await d.stub.SteerRun(
        pb.SteerRunRequest(
            run=slow.run.name, message=cpb.Message(parts=[cpb.ContentPart(text="and more")])
        ),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert steered.message.branch == 1
    assert steered.run.branch == 1
    done = await finished(d.stub, d.world.owner, slow.run.name)
    assert done.state == pb.RUN_STATE_SUCCEEDED
    assert done.branch == 1
    assert await active_texts(d, conversation) == []
    first = await listed(d, conversation, branch=1)
    assert done.output_message in [m.name for m in first]
    assert steered.message.name in [m.name for m in first]
    assert {m.branch for m in first} == {1}


async def test_edits_and_regenerations_are_refused_precisely(desk: Desk) -> None:
    d = desk
    contexts = context_stub(d.channel)
    conversation = (await create_conversation(contexts, d.world.owner, d.world.name)).name
    run = await asked(d, conversation, "the owner asks")
    other = (await create_conversation(contexts, d.world.owner, d.world.name)).name

    # replaces names a message of another conversation, or asks to steer.
    for fields, field in (
        ({"conversation": other, "replaces": run.input_message}, "replaces"),
        ({"conversation": conversation, "replaces": "not a name"}, "replaces"),
        (
            {
                "conversation": conversation,
                "replaces": run.input_message,
                "concurrency_policy": pb.CONCURRENCY_POLICY_STEER,
            },
            "concurrency_policy",
        ),
    ):
        error = await refused(
            d.stub.SendMessage(
                pb.SendMessageRequest(
                    message=cpb.Message(parts=[cpb.ContentPart(text="x")]), handler=ECHO, **fields
                ),
                metadata=d.world.owner.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.INVALID_ARGUMENT,
        )
        assert violations(error) == [field]
    # Only its author edits a message; a viewer edits nothing; a stranger sees nothing.
    edit = pb.SendMessageRequest(
        conversation=conversation,
        message=cpb.Message(parts=[cpb.ContentPart(text="mine now")]),
        handler=ECHO,
        replaces=run.input_message,
    )
    error = await refused(
        d.stub.SendMessage(edit, metadata=d.world.editor.md, timeout=CALL_DEADLINE_S),
        CODE.PERMISSION_DENIED,
    )
    assert "author" in str(error.details())
    await refused(
        d.stub.SendMessage(edit, metadata=d.world.viewer.md, timeout=CALL_DEADLINE_S),
        CODE.PERMISSION_DENIED,
    )
    await refused(
        d.stub.SendMessage(edit, metadata=d.world.outsider.md, timeout=CALL_DEADLINE_S),
        CODE.NOT_FOUND,
    )
    # An answer is an answer: a question cannot be "regenerated".
    await refused(regenerate(d, run.input_message), CODE.FAILED_PRECONDITION)
    await refused(regenerate(d, run.output_message, d.world.viewer), CODE.PERMISSION_DENIED)
    await refused(regenerate(d, run.output_message, d.world.outsider), CODE.NOT_FOUND)
    error = await refused(regenerate(d, "not-a-message"), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["message"]
    error = await refused(
        regenerate(d, run.output_message, concurrency_policy=pb.CONCURRENCY_POLICY_STEER),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == ["concurrency_policy"]
    # Nothing refused made a branch.
    after = await contexts.GetConversation(
        cpb.GetConversationRequest(name=conversation),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert after.conversation.branch_count == 1
    # The editor regenerates (answers are anyone's to redo) with the same assistant.
    helper = await create(d, pb.Assistant(display_name="Echo", handler=ECHO))
    sent = await send(
        d.stub,
        d.world.owner,
        pb.SendMessageRequest(
            conversation=conversation,
            message=cpb.Message(parts=[cpb.ContentPart(text="to the assistant")]),
            assistant=helper.name,
        ),
    )
    answered = await finished(d.stub, d.world.owner, sent.run.name)
    redo = await regenerate(d, answered.output_message, d.world.editor)
    assert redo.run.assistant == helper.name
    assert redo.run.creator == d.world.editor.name


async def test_an_edit_while_a_run_answers_follows_the_concurrency_policy(desk: Desk) -> None:
    d = desk
    contexts = context_stub(d.channel)
    conversation = (await create_conversation(contexts, d.world.owner, d.world.name)).name
    slow = await send(
        d.stub,
        d.world.owner,
        request(conversation, "three slow words", handler=ECHO, delay_ms=300),
    )
    await stored_running(d.stub, d.world.owner, slow.run.name)
    edit = pb.SendMessageRequest(
        conversation=conversation,
        message=cpb.Message(parts=[cpb.ContentPart(text="three quick words")]),
        handler=ECHO,
        replaces=slow.message.name,
        concurrency_policy=pb.CONCURRENCY_POLICY_REJECT,
    )
    # REJECT: the conversation is busy; nothing is stored, no branch is made.
    await refused(
        d.stub.SendMessage(edit, metadata=d.world.owner.md, timeout=CALL_DEADLINE_S),
        CODE.ABORTED,
    )
    busy = await contexts.GetConversation(
        cpb.GetConversationRequest(name=conversation),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert busy.conversation.branch_count == 1
    # INTERRUPT: the run answering is superseded, and the edit answers on its branch.
    edit.concurrency_policy = pb.CONCURRENCY_POLICY_INTERRUPT
    edited = await send(d.stub, d.world.owner, edit)
    superseded = await finished(d.stub, d.world.owner, slow.run.name)
    assert superseded.state == pb.RUN_STATE_CANCELLED
    answered = await finished(d.stub, d.world.owner, edited.run.name)
    assert answered.state == pb.RUN_STATE_SUCCEEDED
    assert answered.branch == 2
