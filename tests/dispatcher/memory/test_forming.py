"""Memory forming in a real server, on SQLite and PostgreSQL: finished runs are read
from the event log, the model (the local fake of the OpenAI protocol, scripted here
by the request's body: tests/fakes/openai_server.py) answers candidate facts and
decisions with structured output, and the decisions become memory items with their
sources, their formation and their time, each announced as MEMORY_DECIDED.

One server per backend for the module; each test has its own workspace, users and
facts (the scripted model answers by the exchange's text, so tests never share an
answer).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.memory.plans.plan import Decision, Exchange, Plan, Turn, item_id
from switchboard.dispatcher.memory.store import Job, NewTurn
from switchboard.dispatcher.memory.worker import MemoryForming
from switchboard.platform.rpc.server import SwitchboardServer
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
from tests.fakes.openai_server import FakeOpenAI
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


async def test_a_fact_told_is_remembered_with_its_source_and_formation(
    mesh: SwitchboardServer,
    stub: Stub,
    dstub: DStub,
    world: World,
    model: tuple[FakeOpenAI, Model],
    decided: Decided,
) -> None:
    script = model[1]
    script.facts["I live in Lisbon, and our team ships on Fridays."] = [
        [fact("Lives in Lisbon."), fact("The team ships on Fridays.", "workspace_fact")]
    ]
    keeper = await assistant(dstub, world, USER_AND_WORKSPACE)
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    run = await told(
        dstub,
        world.editor,
        conversation,
        keeper,
        "I live in Lisbon, and our team ships on Fridays.",
    )
    await decided.wait(lambda: len(decided.of(run.name)) == 2)

    events = [e for e in decided.events if e.memory_decided.run == run.name]
    assert {d.memory_decided.action for d in events} == {events_pb2.MEMORY_DECISION_ACTION_ADD}
    assert {d.memory_decided.outcome for d in events} == {events_pb2.MEMORY_FORMING_OUTCOME_APPLIED}
    # A user's decision goes to that user only; a workspace's to the workspace.
    mine = next(e for e in events if e.user)
    assert (mine.user, mine.workspace) == (world.editor.name, "")
    assert next(e for e in events if not e.user).workspace == world.name

    [personal] = await items(stub, world.editor, world.editor.name, workspace=world.name)
    assert personal.content == "Lives in Lisbon."
    assert personal.kind == cpb.MEMORY_KIND_FACT
    assert personal.name == mine.memory_decided.memory_item
    assert list(personal.source_messages) == [run.input_message, run.output_message]
    assert personal.workspace == world.name  # formed here: only this workspace uses it
    assert personal.confidence == pytest.approx(0.8)
    assert personal.formation == cpb.MemoryFormation(
        assistant=keeper, policy="assistant", model="primary/m-1", run=run.name
    )
    assert personal.HasField("valid_time")
    [shared] = await items(stub, world.editor, world.name)
    assert shared.content == "The team ships on Fridays."
    assert not shared.workspace

    async def formed() -> bool:
        jobs = await pending(mesh, world.id)
        return [job for job in jobs if not job[0].startswith("consolidate:")] == []

    await eventually(formed, "the exchange's job deleted")


async def test_a_changed_fact_supersedes_and_a_retraction_invalidates(
    stub: Stub,
    dstub: DStub,
    world: World,
    model: tuple[FakeOpenAI, Model],
    decided: Decided,
) -> None:
    script = model[1]
    script.facts["I work at Acme."] = [[fact("Works at Acme.")]]
    script.facts["I moved to Globex."] = [[fact("Works at Globex.")]]
    script.decisions["Works at Globex."] = ("update", "Works at Acme.")
    script.facts["I quit Globex."] = [[fact("No longer works at Globex.")]]
    script.decisions["No longer works at Globex."] = ("invalidate", "Works at Globex.")
    keeper = await assistant(dstub, world, USER_AND_WORKSPACE)
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    runs = []
    for said in ("I work at Acme.", "I moved to Globex.", "I quit Globex."):
        run = await told(dstub, world.editor, conversation, keeper, said)
        await decided.count(run.name, 1)
        runs.append(run)
    added, updated, invalidated = (decided.of(run.name)[0] for run in runs)
    assert updated.action == events_pb2.MEMORY_DECISION_ACTION_UPDATE
    assert updated.replaces == added.memory_item
    assert invalidated.action == events_pb2.MEMORY_DECISION_ACTION_INVALIDATE
    assert invalidated.replaces == updated.memory_item

    everything = {
        item.name: item
        for item in await items(
            stub, world.editor, world.editor.name, world.name, cpb.MEMORY_VALIDITY_ALL
        )
    }
    old, new = everything[added.memory_item], everything[updated.memory_item]
    assert old.HasField("invalid_time")
    assert old.superseded_by == new.name
    assert new.supersedes == old.name
    assert new.HasField("invalid_time")  # retracted by the third exchange
    assert new.invalid_reason
    assert await items(stub, world.editor, world.editor.name, world.name) == []


async def test_an_answer_breaking_the_schema_twice_fails_and_applies_nothing(
    stub: Stub,
    dstub: DStub,
    world: World,
    model: tuple[FakeOpenAI, Model],
    decided: Decided,
) -> None:
    script = model[1]
    script.facts["I collect stamps."] = ["{not json", '{"facts": "Collects stamps"}']
    keeper = await assistant(dstub, world, USER_AND_WORKSPACE)
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    run = await told(dstub, world.editor, conversation, keeper, "I collect stamps.")
    await decided.wait(lambda: len(decided.of(run.name)) == 1)
    [failed] = [e for e in decided.events if e.memory_decided.run == run.name]
    assert failed.memory_decided.outcome == events_pb2.MEMORY_FORMING_OUTCOME_FAILED
    assert failed.memory_decided.action == events_pb2.MEMORY_DECISION_ACTION_UNSPECIFIED
    assert "Collects stamps" not in failed.memory_decided.reason  # nothing of the answer
    assert (failed.workspace, failed.conversation) == (world.name, conversation)
    assert await items(stub, world.editor, world.editor.name, world.name) == []


async def test_an_answer_breaking_the_schema_once_is_asked_again(
    stub: Stub,
    dstub: DStub,
    world: World,
    model: tuple[FakeOpenAI, Model],
    decided: Decided,
) -> None:
    script = model[1]
    script.facts["I play the cello."] = ["[]", [fact("Plays the cello.")]]
    keeper = await assistant(dstub, world, USER_AND_WORKSPACE)
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    run = await told(dstub, world.editor, conversation, keeper, "I play the cello.")
    await decided.wait(lambda: len(decided.of(run.name)) == 1)
    [added] = decided.of(run.name)
    assert added.action == events_pb2.MEMORY_DECISION_ACTION_ADD
    [item] = await items(stub, world.editor, world.editor.name, world.name)
    assert item.content == "Plays the cello."


async def test_a_budget_at_its_cap_pauses_forming_and_never_the_runs(
    stub: Stub,
    dstub: DStub,
    world: World,
    model: tuple[FakeOpenAI, Model],
    decided: Decided,
) -> None:
    script = model[1]
    script.facts["I speak Danish."] = [[fact("Speaks Danish.")]]
    keeper = await assistant(dstub, world, USER_AND_WORKSPACE)
    # Room for a run's worst case (its prompt and 64 answer tokens at $1/Mtok), not
    # for forming's (its prompt and 4,000 answer tokens).
    budget = await dstub.CreateBudget(
        pb.CreateBudgetRequest(
            parent=world.name,
            budget_id="cap",
            budget=pb.Budget(
                display_name="Cap",
                scope=world.name,
                period=pb.BUDGET_PERIOD_DAY,
                cost_limit_micros=2000,
            ),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    run = await told(dstub, world.editor, conversation, keeper, "I speak Danish.")
    await decided.wait(lambda: len(decided.of(run.name)) == 1)
    [paused] = decided.of(run.name)
    assert paused.outcome == events_pb2.MEMORY_FORMING_OUTCOME_PAUSED
    # Runs go on answering while forming waits.
    again = await told(dstub, world.editor, conversation, keeper, "Still there?")
    assert again.state == pb.RUN_STATE_SUCCEEDED
    assert await items(stub, world.editor, world.editor.name, world.name) == []

    # Room again: the budget's change wakes the paused job at once.
    raised = pb.Budget(name=budget.budget.name, cost_limit_micros=1_000_000)
    await dstub.UpdateBudget(
        pb.UpdateBudgetRequest(
            budget=raised, update_mask=field_mask_pb2.FieldMask(paths=["cost_limit_micros"])
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    await decided.wait(lambda: len(decided.of(run.name)) == 2)
    assert decided.of(run.name)[1].action == events_pb2.MEMORY_DECISION_ACTION_ADD
    [item] = await items(stub, world.editor, world.editor.name, world.name)
    assert item.content == "Speaks Danish."


async def test_a_stored_plan_retaken_applies_each_decision_once(
    mesh: SwitchboardServer,
    stub: Stub,
    dstub: DStub,
    world: World,
    model: tuple[FakeOpenAI, Model],
    decided: Decided,
) -> None:
    forming = built(mesh, MemoryForming)
    # The run's assistant forms nothing itself (no policy, and the workspace's is off):
    # the job below, as a crashed worker left it, is the only forming of its exchange.
    keeper = await assistant(dstub, world, cpb.MemoryPolicy())
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    run = await told(dstub, world.editor, conversation, keeper, "Nothing to see here.")
    asked = len(model[1].asked)
    scope = world.editor.name
    key = "crash-test-" + world.id
    plan = Plan(
        key=key,
        model="primary/m-1",
        decisions=[
            Decision(
                "add",
                scope,
                "Owns a red bicycle.",
                cpb.MEMORY_CATEGORY_PERSON_FACTS,
                0.7,
                None,
                item=item_id(key, 0),
            ),
            Decision(
                "add",
                scope,
                "Prefers window seats.",
                cpb.MEMORY_CATEGORY_PREFERENCES,
                0.9,
                None,
                item=item_id(key, 1),
            ),
        ],
    )
    # The first decision was applied, and the worker died before it recorded so.
    await stub.CreateMemoryItem(
        cpb.CreateMemoryItemRequest(
            parent=scope,
            memory_item_id=item_id(key, 0),
            memory_item=cpb.MemoryItem(
                kind=cpb.MEMORY_KIND_FACT, content="Owns a red bicycle.", workspace=world.name
            ),
        ),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    exchange = Exchange(
        turns=(Turn(run.name, run.input_message, run.output_message, now()),),
        assistant=keeper,
        user_id=world.editor.id,
        source="assistant",
        policy=USER_AND_WORKSPACE.SerializeToString(),
        model=b"",
    )

    def write(db: Any) -> None:
        db.add(
            MemoryJobRow(
                id=f"run:{run.name}:crashed",
                kind="exchange",
                workspace_id=world.id,
                conversation=conversation,
                run=run.name,
                assistant=keeper,
                user_id=world.editor.id,
                exchange=exchange.dumps(),
                plan=plan.dumps(),
                state="decided",
                enqueued_at=now(),
                not_before=now(),
                claimer="a-replica-that-died",
                claimed_until=now(),  # lapsed
                attempts=0,
                last_error="",
            )
        )

    await mesh.shared.database.run(write, write=True)
    forming.wake()
    await decided.wait(lambda: len(decided.of(run.name)) == 2)
    current = await items(stub, world.editor, scope, world.name)
    assert sorted(item.content for item in current) == [
        "Owns a red bicycle.",
        "Prefers window seats.",
    ]
    assert len(model[1].asked) == asked  # the stored plan was applied, not asked again

    async def finished() -> bool:
        return not any(job[0].endswith(":crashed") for job in await pending(mesh, world.id))

    await eventually(finished, "the retaken job deleted")
    # Taken again (a second crash after both were applied): nothing more is made.
    await mesh.shared.database.run(write, write=True)
    forming.wake()
    await decided.wait(lambda: len(decided.of(run.name)) == 4)
    assert len(await items(stub, world.editor, scope, world.name)) == 2


async def test_an_exchange_joining_an_idle_job_while_it_is_formed_is_kept(
    mesh: SwitchboardServer, world: World
) -> None:
    store = built(mesh, MemoryForming).store
    later = now() + dt.timedelta(hours=1)  # never due while the test runs: no worker takes it
    conversation = f"{world.name}/conversations/c1"

    def turn(run: str) -> NewTurn:
        said = Turn(f"{conversation}/runs/{run}", "", "", now())
        exchange = Exchange((said,), "", world.editor.id, "assistant", b"", b"")
        return NewTurn(
            job_id=f"idle:{conversation}:{world.editor.id}",
            workspace_id=world.id,
            conversation=conversation,
            exchange=exchange,
            turn=said,
            not_before=later,
            merge=True,
        )

    job_id = turn("r1").job_id
    await mesh.shared.database.run(store.feeding([turn("r1")]), write=True)
    claimed_until = later + dt.timedelta(minutes=1)

    def claim(db: Any) -> bytes:
        row = db.get(MemoryJobRow, job_id)
        row.claimer, row.claimed_until = "this-test", claimed_until
        return bytes(row.exchange)

    read = await mesh.shared.database.run(claim, write=True)
    job = Job(
        job_id,
        "exchange",
        world.id,
        conversation,
        world.editor.id,
        read,
        b"",
        "pending",
        0,
        "this-test",
        claimed_until,
    )
    # While the first exchange is formed, the conversation's next run joins the job.
    await mesh.shared.database.run(store.feeding([turn("r2")]), write=True)
    assert await store.finish(job, [f"{conversation}/runs/r1"])

    def left(db: Any) -> tuple[list[str], str, str]:
        row = db.get(MemoryJobRow, job_id)
        runs = [t.run for t in Exchange.loads(row.exchange).turns]
        db.delete(row)
        return runs, row.state, row.claimer

    assert await mesh.shared.database.run(left, write=True) == (
        [f"{conversation}/runs/r2"],
        "pending",
        "",
    )
