"""Forks through the real context service, on SQLite and PostgreSQL: a new conversation
shares another's history up to a message without copying it, and goes on on its own; a
message deleted in the source leaves the fork too; the source is kept while a fork reads
it; the refusals are precise (docs/conversations.md, "Forks")."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.pruning.store import PruneStore
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.context.messages.test_branches import edit, exchange, listed, texts, window_texts
from tests.kits.contextkit import (
    Caller,
    Stub,
    World,
    append,
    get_conversation,
    prune,
    refused,
    stub_fixture,
    violations,
    world_fixture,
)

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

ASSISTANT = pb.MESSAGE_ROLE_ASSISTANT


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url)


stub, world = stub_fixture, world_fixture


async def fork(
    stub: Stub, caller: Caller, message: str, title: str = "", request_id: str = ""
) -> pb.Conversation:
    response = await stub.ForkConversation(
        pb.ForkConversationRequest(
            message=message, conversation=pb.Conversation(title=title), request_id=request_id
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.conversation


async def test_a_fork_shares_the_history_up_to_a_message_and_goes_on_alone(
    stub: Stub, world: World
) -> None:
    source, (q1, a1, q2, a2) = await exchange(stub, world)
    forked = await fork(stub, world.editor, a1.name, "Another way", request_id="fork-1")
    assert forked.forked_from == a1.name
    assert forked.title == "Another way"
    assert forked.creator == world.editor.name
    assert forked.message_count == 2
    # A retry is the same fork.
    assert (await fork(stub, world.editor, a1.name, "Another way", request_id="fork-1")) == forked

    shared, _ = await listed(stub, world.editor, forked.name)
    assert [m.name for m in shared] == [q1.name, a1.name]  # the source's rows, by their names
    mine = await append(stub, world.editor, forked.name, "a different second question")
    assert mine.sequence == a1.sequence + 1
    assert texts((await listed(stub, world.editor, forked.name))[0]) == [
        "first question",
        "first answer",
        "a different second question",
    ]
    assert await window_texts(stub, world.editor, forked.name) == [
        "first question",
        "first answer",
        "a different second question",
    ]
    # The source goes on unchanged.
    await append(stub, world.owner, source, "third question")
    assert texts((await listed(stub, world.owner, source))[0])[-1] == "third question"
    assert "third question" not in await window_texts(stub, world.editor, forked.name)

    # Its own messages branch as any conversation's: editing its first one keeps the
    # shared history under the new version.
    better = await edit(stub, world.editor, mine, "a better second question")
    assert better.branch == 2
    assert texts((await listed(stub, world.editor, forked.name))[0]) == [
        "first question",
        "first answer",
        "a better second question",
    ]
    # The shared history is edited where it lives, not in the fork.
    error = await refused(
        stub.AppendMessage(
            pb.AppendMessageRequest(
                parent=forked.name,
                message=pb.Message(
                    role=pb.MESSAGE_ROLE_USER, parts=[pb.ContentPart(text="not here")]
                ),
                replaces=a1.name,
            ),
            metadata=world.editor.md,
            timeout=CALL_DEADLINE_S,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations(error) == ["replaces"]
    del q2, a2


async def test_deleting_a_shared_message_reaches_the_fork(stub: Stub, world: World) -> None:
    source, (q1, a1, q2, _) = await exchange(stub, world)
    forked = await fork(stub, world.owner, q2.name)
    before = await window_texts(stub, world.owner, forked.name)  # cached under its version
    assert before == ["first question", "first answer", "second question"]
    version = (await get_conversation(stub, world.owner, forked.name)).version
    await stub.DeleteMessage(
        pb.DeleteMessageRequest(name=a1.name), metadata=world.owner.md, timeout=CALL_DEADLINE_S
    )
    assert (await get_conversation(stub, world.owner, forked.name)).version == version + 1
    assert await window_texts(stub, world.owner, forked.name) == [
        "first question",
        "second question",
    ]
    assert [m.name for m in (await listed(stub, world.owner, forked.name))[0]] == [
        q1.name,
        q2.name,
    ]
    # A fork of the fork reads through both.
    deeper = await fork(stub, world.owner, q2.name)
    await append(stub, world.owner, deeper.name, "deeper still")
    twice = await fork(
        stub, world.owner, (await listed(stub, world.owner, deeper.name))[0][-1].name
    )
    assert texts((await listed(stub, world.owner, twice.name))[0]) == [
        "first question",
        "second question",
        "deeper still",
    ]
    del source


async def test_a_source_is_kept_while_its_forks_read_it(
    stub: Stub, world: World, mesh: SwitchboardServer
) -> None:
    source, (q1, a1, _, _) = await exchange(stub, world)
    forked = await fork(stub, world.owner, a1.name)
    # Neither is pruned: their histories are shared.
    for name in (source, forked.name):
        pruned = await prune(stub, world.owner, name, keep_last_messages=1)
        assert pruned.pruned_message_count == 0
    await stub.DeleteConversation(
        pb.DeleteConversationRequest(name=source), metadata=world.owner.md, timeout=CALL_DEADLINE_S
    )
    store = PruneStore(mesh.shared.database)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    # Deleted and due, the source waits for its fork; the fork still reads it.
    assert await store.purge_conversations(later) == 0
    assert texts((await listed(stub, world.owner, forked.name))[0]) == [
        "first question",
        "first answer",
    ]
    await stub.DeleteConversation(
        pb.DeleteConversationRequest(name=forked.name),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert await store.purge_conversations(later) == 1  # the fork first
    assert await store.purge_conversations(later) == 1  # then its source
    del q1


async def test_forks_are_refused_precisely(stub: Stub, world: World) -> None:
    source, (q1, _, _, _) = await exchange(stub, world)
    await refused(fork(stub, world.viewer, q1.name), grpc.StatusCode.PERMISSION_DENIED)
    await refused(fork(stub, world.outsider, q1.name), grpc.StatusCode.NOT_FOUND)
    error = await refused(fork(stub, world.owner, "nothing"), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(error) == ["message"]
    error = await refused(
        fork(stub, world.owner, q1.name, title="x" * 500), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert violations(error) == ["conversation.title"]
    await refused(fork(stub, world.owner, f"{source}/messages/gone"), grpc.StatusCode.NOT_FOUND)
    # Eight forks deep at most.
    current = q1.name
    for _ in range(8):
        made = await fork(stub, world.owner, current)
        current = (await append(stub, world.owner, made.name, "on")).name
    await refused(fork(stub, world.owner, current), grpc.StatusCode.FAILED_PRECONDITION)
