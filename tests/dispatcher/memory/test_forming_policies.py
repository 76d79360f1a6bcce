"""Whose policy forms what, in a real server on SQLite and PostgreSQL: an assistant's
policy is checked when saved; the workspace's default applies to an assistant without
one; a delegated child run forms only under its own assistant's policy; idle
conversations are formed once, all their exchanges together; consolidation merges
near-duplicates and retires expired items, each as a MEMORY_DECIDED event.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import update

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.domain import ContextDomain
from switchboard.dispatcher.memory.plans.plan import Exchange
from switchboard.dispatcher.memory.worker import MemoryForming
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.policy import Principal
from switchboard.platform.store.models import MemoryJobRow
from switchboard.platform.values.names import now
from tests.conftest import CALL_DEADLINE_S, built
from tests.dispatcher.memory.memorykit import (
    USER_AND_WORKSPACE,
    Decided,
    Model,
    assistant,
    decided_fixture,
    dstub_fixture,
    fact,
    items,
    mesh_fixture,
    model_fixture,
    pending,
    told,
    world_fixture,
)
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.kits.contextkit import (
    Stub,
    World,
    create_conversation,
    expire_in_database,
    stub_fixture,
    violations,
)
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import eventually, watch_all
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


async def test_an_assistants_policy_is_checked_and_updated_by_its_mask(
    dstub: DStub, world: World
) -> None:
    bad = cpb.MemoryPolicy(
        mode=cpb.MEMORY_FORMING_MODE_USER,
        provider="nowhere",
        idle_minutes=5000,
        max_candidates=21,
        categories=[
            cpb.MemoryCategoryRule(category=cpb.MEMORY_CATEGORY_PLANS),
            cpb.MemoryCategoryRule(category=cpb.MEMORY_CATEGORY_PLANS),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await assistant(dstub, world, bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(refused.value)) >= {
        "assistant.memory_policy.provider",
        "assistant.memory_policy.idle_minutes",
        "assistant.memory_policy.max_candidates",
        "assistant.memory_policy.categories[1].category",
    }
    name = await assistant(dstub, world, cpb.MemoryPolicy())
    good = cpb.MemoryPolicy(mode=cpb.MEMORY_FORMING_MODE_WORKSPACE, idle_minutes=5)
    updated = await dstub.UpdateAssistant(
        pb.UpdateAssistantRequest(
            assistant=pb.Assistant(name=name, memory_policy=good),
            update_mask=field_mask_pb2.FieldMask(paths=["memory_policy"]),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert updated.assistant.memory_policy == good


async def test_the_workspaces_policy_applies_to_an_assistant_without_one(
    stub: Stub,
    dstub: DStub,
    world: World,
    model: tuple[FakeOpenAI, Model],
    decided: Decided,
) -> None:
    model[1].facts["My daughter is called Ada."] = [[fact("Has a daughter called Ada.")]]
    await stub.UpdateWorkspace(
        cpb.UpdateWorkspaceRequest(
            workspace=cpb.Workspace(
                name=world.name,
                memory_policy=cpb.MemoryPolicy(mode=cpb.MEMORY_FORMING_MODE_USER),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["memory_policy"]),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    keeper = await assistant(dstub, world, cpb.MemoryPolicy())
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    run = await told(dstub, world.editor, conversation, keeper, "My daughter is called Ada.")
    await decided.count(run.name, 1)
    [item] = await items(stub, world.editor, world.editor.name, world.name)
    assert item.formation.policy == "workspace"
    assert item.formation.assistant == keeper


async def test_a_delegate_forms_memory_only_under_its_own_policy(
    mesh: SwitchboardServer,
    stub: Stub,
    dstub: DStub,
    world: World,
    model: tuple[FakeOpenAI, Model],
    decided: Decided,
) -> None:
    script = model[1]
    boss_says, helper_says = f"You are the boss of {world.id}.", f"You help {world.id}."
    helper = await assistant(dstub, world, USER_AND_WORKSPACE, instructions=helper_says)
    # The parent forms nothing (no policy, the workspace's is off); its child does.
    boss = await assistant(
        dstub, world, cpb.MemoryPolicy(), instructions=boss_says, delegates=(helper,)
    )
    tool = "ask_" + helper.rsplit("/", 1)[-1]

    def boss_turn(body: dict[str, Any]) -> Reply:
        if any(m["role"] == "tool" for m in body["messages"]):
            return Reply.text("The helper answered.")
        return Reply.tool_calls([(tool, {"input": "My badge number is 4711."}, "c-1")])

    script.runs[boss_says] = boss_turn
    script.runs[helper_says] = lambda body: Reply.text("Badge noted.")
    script.facts["My badge number is 4711."] = [[fact("Badge number is 4711.")]]
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    parent = await told(dstub, world.editor, conversation, boss, "Please register my badge.")
    listed = await dstub.ListRuns(
        pb.ListRunsRequest(parent=world.name, parent_run=parent.name),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    [child] = listed.runs
    assert (await watch_all(dstub, world.editor, child.name)).final.state == (
        pb.RUN_STATE_SUCCEEDED
    )
    await decided.count(child.name, 1)
    [item] = await items(stub, world.editor, world.editor.name, world.name)
    assert item.formation.assistant == helper
    assert item.formation.run == child.name
    # The parent's run ended after its child's: had it a job, it would be in the table
    # now, or its exchange would have been asked about.
    jobs = await pending(mesh, world.id)
    assert not [job for job in jobs if parent.name in job[0]]
    assert "Please register my badge." not in script.exchanges


async def test_an_idle_conversation_is_formed_once_with_all_its_exchanges(
    mesh: SwitchboardServer,
    stub: Stub,
    dstub: DStub,
    world: World,
    model: tuple[FakeOpenAI, Model],
    decided: Decided,
) -> None:
    forming = built(mesh, MemoryForming)
    idle = cpb.MemoryPolicy(mode=cpb.MEMORY_FORMING_MODE_USER, idle_minutes=30)
    keeper = await assistant(dstub, world, idle)
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    model[1].facts["And I surf."] = [[fact("Surfs."), fact("Skis.")]]
    first = await told(dstub, world.editor, conversation, keeper, "I ski.")
    second = await told(dstub, world.editor, conversation, keeper, "And I surf.")
    job_id = f"idle:{conversation}:{world.editor.id}"

    async def joined() -> bool:
        def read(db: Any) -> bytes | None:
            row = db.get(MemoryJobRow, job_id)
            return None if row is None else bytes(row.exchange)

        data = await mesh.shared.database.run(read, write=False)
        return data is not None and len(Exchange.loads(data).turns) == 2

    await eventually(joined, "both exchanges in the conversation's one job")
    # Idle for long enough (here: made due by hand).

    def due(db: Any) -> None:
        db.execute(update(MemoryJobRow).where(MemoryJobRow.id == job_id).values(not_before=now()))

    await mesh.shared.database.run(due, write=True)
    forming.wake()
    await decided.count(second.name, 2)
    assert not decided.of(first.name)  # one round, named by its latest run
    current = await items(stub, world.editor, world.editor.name, world.name)
    assert sorted(item.content for item in current) == ["Skis.", "Surfs."]
    assert set(current[0].source_messages) == {
        first.input_message,
        first.output_message,
        second.input_message,
        second.output_message,
    }


async def test_consolidation_merges_near_duplicates_and_retires_expired_items(
    mesh: SwitchboardServer, stub: Stub, world: World, decided: Decided
) -> None:
    forming = built(mesh, MemoryForming)
    scope = world.editor.name
    formation = cpb.MemoryFormation(policy="assistant", model="primary/m-1")

    async def create(content: str, **fields: Any) -> cpb.MemoryItem:
        # As forming writes them: a formed item's provenance is not a person's to write.
        return await built(mesh, ContextDomain).memory.create(
            Principal.acting_for(world.editor.id),
            cpb.CreateMemoryItemRequest(
                parent=scope,
                memory_item=cpb.MemoryItem(
                    kind=cpb.MEMORY_KIND_PREFERENCE,
                    content=content,
                    workspace=world.name,
                    formation=formation,
                    **fields,
                ),
            ),
        )

    older = await create("Likes green tea.")
    newer = await create("likes  green tea!")
    later = cpb.MemoryItem().expire_time
    later.FromDatetime(now() + dt.timedelta(hours=1))
    passing = await create("Is in Oslo this week.", expire_time=later)
    # Its time passes (written as its passing leaves the row: no sleep).
    await expire_in_database(mesh, passing.name)

    def expired() -> bool:
        # Both of the pass's decisions: the merge and the expiry are announced apart.
        replaced = {e.memory_decided.replaces for e in decided.events}
        return {passing.name, newer.name} <= replaced

    async def consolidated() -> bool:
        # Asked again until the pass has run (it is idempotent).
        await forming.store.consolidate(world.id, world.editor.id, [world.editor.id], now())
        forming.wake()
        return expired()

    await eventually(consolidated, "the near-duplicate merged and the expired item retired")
    merged = [
        e.memory_decided
        for e in decided.events
        if e.memory_decided.action == events_pb2.MEMORY_DECISION_ACTION_MERGE
        and e.memory_decided.replaces == newer.name
    ]
    assert merged[0].memory_item == older.name
    everything = {
        item.name: item
        for item in await items(stub, world.editor, scope, world.name, cpb.MEMORY_VALIDITY_ALL)
    }
    assert everything[newer.name].invalid_reason == f"merged into {older.name}"
    assert everything[passing.name].invalid_reason == "expired"
    assert everything[passing.name].invalid_time == everything[passing.name].expire_time
    assert [i.name for i in await items(stub, world.editor, scope, world.name)] == [older.name]
