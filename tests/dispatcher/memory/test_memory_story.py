"""The story issue 82 is done by, through a real server on SQLite and PostgreSQL: a person
tells an assistant a fact in one conversation and sees it remembered with its source;
changes it in a later conversation and sees the old one retired; asks about it in a third
and gets the current one; and forgets it for good.

The model is the local fake of the OpenAI protocol (tests/fakes/openai_server.py),
scripted by the request's body: forming's calls by their schema, and a run's call by
answering with what the window remembered (so the answer shows what the model was given).
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc import aio
from sqlalchemy import update

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.memory.worker import MemoryForming
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import MemoryJobRow
from switchboard.platform.values.names import now
from tests.conftest import CALL_DEADLINE_S, built
from tests.dispatcher.memory.memorykit import (
    Decided,
    Model,
    assistant,
    decided_fixture,
    dstub_fixture,
    fact,
    items,
    mesh_fixture,
    model_fixture,
    told,
    world_fixture,
)
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.kits.contextkit import Stub, World, create_conversation, stub_fixture
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import eventually
from tests.kits.modulekit import module_channel_fixture, module_database_url_fixture

pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

module_database_url = module_database_url_fixture
channel = module_channel_fixture
stub = stub_fixture
model = model_fixture
mesh = mesh_fixture
world = world_fixture
dstub = dstub_fixture
decided = decided_fixture

INSTRUCTIONS = "Answer from what you remember about the person."
USER_ONLY = cpb.MemoryPolicy(mode=cpb.MEMORY_FORMING_MODE_USER)


def remembered_lines(body: dict[str, Any]) -> list[str]:
    """The lines of the window's "Remembered about ..." block the model was given."""
    for message in body["messages"]:
        content = message.get("content")
        if message["role"] == "system" and isinstance(content, str) and "Remembered" in content:
            block = content.split("Remembered about this user and conversation:\n", 1)[1]
            return [line for line in block.split("\n\n", 1)[0].splitlines() if line]
    return []


def answer_from_memory(body: dict[str, Any]) -> Reply:
    lines = remembered_lines(body)
    return Reply.text(" | ".join(lines) if lines else "I remember nothing.", usage=(30, 5))


async def answer_text(stub: Stub, world: World, name: str) -> str:
    message = await stub.GetMessage(
        cpb.GetMessageRequest(name=name), metadata=world.editor.md, timeout=CALL_DEADLINE_S
    )
    return "".join(part.text for part in message.message.parts)


async def test_tell_change_ask_and_forget_a_fact(
    mesh: SwitchboardServer,
    stub: Stub,
    dstub: DStub,
    world: World,
    model: tuple[FakeOpenAI, Model],
    decided: Decided,
) -> None:
    script = model[1]
    script.runs[INSTRUCTIONS] = answer_from_memory
    script.facts["By the way, I live in Paris."] = [[fact("Lives in Paris.")]]
    script.facts["News: I moved to Berlin last month."] = [[fact("Lives in Berlin.")]]
    script.decisions["Lives in Berlin."] = ("update", "Lives in Paris.")
    keeper = await assistant(dstub, world, USER_ONLY, instructions=INSTRUCTIONS)
    me = world.editor

    # 1. Told in one conversation: remembered, with its source.
    first = (await create_conversation(stub, me, world.name, "first")).name
    told_run = await told(dstub, me, first, keeper, "By the way, I live in Paris.")
    await decided.count(told_run.name, 1)
    [paris] = await items(stub, me, me.name, workspace=world.name)
    assert paris.content == "Lives in Paris."
    assert list(paris.source_messages) == [told_run.input_message, told_run.output_message]
    assert paris.formation.assistant == keeper
    source = await stub.GetMessage(
        cpb.GetMessageRequest(name=paris.source_messages[0]),
        metadata=me.md,
        timeout=CALL_DEADLINE_S,
    )
    assert source.message.parts[0].text == "By the way, I live in Paris."

    # 2. Changed in a later conversation: the old fact is retired, not deleted.
    second = (await create_conversation(stub, me, world.name, "second")).name
    moved = await told(dstub, me, second, keeper, "News: I moved to Berlin last month.")
    await decided.count(moved.name, 1)
    [update] = decided.of(moved.name)
    assert update.action == events_pb2.MEMORY_DECISION_ACTION_UPDATE
    assert update.replaces == paris.name
    [berlin] = await items(stub, me, me.name, workspace=world.name)
    assert berlin.content == "Lives in Berlin."
    assert berlin.supersedes == paris.name
    [retired] = await items(
        stub, me, me.name, workspace=world.name, validity=cpb.MEMORY_VALIDITY_RETIRED
    )
    assert retired.name == paris.name
    assert retired.superseded_by == berlin.name
    assert retired.invalid_time == berlin.valid_time
    history = await stub.GetMemoryItem(
        cpb.GetMemoryItemRequest(name=berlin.name, include_history=True),
        metadata=me.md,
        timeout=CALL_DEADLINE_S,
    )
    assert [(v.content, v.change) for v in history.history] == [
        ("Lives in Paris.", cpb.MEMORY_CHANGE_CREATED),
        ("Lives in Paris.", cpb.MEMORY_CHANGE_RETIRED),
        ("Lives in Berlin.", cpb.MEMORY_CHANGE_CREATED),
    ]

    # 3. Asked in a third conversation: the model is given the current fact only.
    third = (await create_conversation(stub, me, world.name, "third")).name
    asked = await told(dstub, me, third, keeper, "Where do I live these days, Berlin or Paris?")
    answer = await answer_text(stub, world, asked.output_message)
    assert answer.startswith("- Lives in Berlin. (learned ")
    assert "Paris" not in answer

    # 4. Forgotten for good: the item, its history, and the model no longer sees it.
    await stub.DeleteMemoryItem(
        cpb.DeleteMemoryItemRequest(name=berlin.name), metadata=me.md, timeout=CALL_DEADLINE_S
    )
    for gone in (berlin.name, paris.name):
        with pytest.raises(aio.AioRpcError) as error:
            await stub.GetMemoryItem(
                cpb.GetMemoryItemRequest(name=gone, include_history=True),
                metadata=me.md,
                timeout=CALL_DEADLINE_S,
            )
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert await items(stub, me, me.name, validity=cpb.MEMORY_VALIDITY_ALL) == []
    fourth = (await create_conversation(stub, me, world.name, "fourth")).name
    again = await told(dstub, me, fourth, keeper, "Where do I live these days, Berlin or Paris?")
    assert await answer_text(stub, world, again.output_message) == "I remember nothing."


async def test_nothing_is_formed_for_a_person_who_may_no_longer_write_there(
    mesh: SwitchboardServer,
    stub: Stub,
    dstub: DStub,
    world: World,
    model: tuple[FakeOpenAI, Model],
    decided: Decided,
) -> None:
    idle = cpb.MemoryPolicy(mode=cpb.MEMORY_FORMING_MODE_USER_AND_WORKSPACE, idle_minutes=30)
    keeper = await assistant(dstub, world, idle)
    me = world.editor
    model[1].facts["My badge number is 4411."] = [[fact("Badge number 4411.")]]
    conversation = (await create_conversation(stub, me, world.name, "badge")).name
    run = await told(dstub, me, conversation, keeper, "My badge number is 4411.")
    job_id = f"idle:{conversation}:{me.id}"
    await eventually(
        lambda: _has_job(mesh, job_id), "the exchange waits for the conversation to be idle"
    )
    # Made a viewer before the conversation went idle: forming may not act for them.
    await stub.UpdateWorkspaceMember(
        cpb.UpdateWorkspaceMemberRequest(
            member=cpb.WorkspaceMember(
                name=f"{world.name}/members/{me.id}", role=cpb.WORKSPACE_ROLE_VIEWER
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["role"]),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )

    def due(db: Any) -> None:
        db.execute(update(MemoryJobRow).where(MemoryJobRow.id == job_id).values(not_before=now()))

    await mesh.shared.database.run(due, write=True)
    built(mesh, MemoryForming).wake()
    await decided.count(run.name, 1)
    [outcome] = decided.of(run.name)
    assert outcome.outcome == events_pb2.MEMORY_FORMING_OUTCOME_FAILED
    assert "no longer write" in outcome.reason
    assert await items(stub, me, me.name, validity=cpb.MEMORY_VALIDITY_ALL) == []
    assert "My badge number is 4411." not in model[1].exchanges


async def _has_job(mesh: SwitchboardServer, job_id: str) -> bool:
    def read(db: Any) -> bool:
        return db.get(MemoryJobRow, job_id) is not None

    found: bool = await mesh.shared.database.run(read, write=False)
    return found
