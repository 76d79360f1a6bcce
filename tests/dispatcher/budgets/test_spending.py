"""A run's budget in process (``spending.py``'s ``RunBudget``, and what it counts with in
``room.py``).

A hop's hold on SQLite and PostgreSQL (budgets/ledger.py ``room``, spending.py
``RunBudget.reserve_rest``) and a handed cap (``RunBudget`` with ``handed``, room.py
``HandedCaps``): what is left is the least room over the budgets per cap; a hop holds all of
it, so another run cannot take it meanwhile, and settles what the callee reported; with
nothing left it waits like any step and goes on when room is freed; a handed cap is enforced
without pausing.

A run paused at a budget's cap waits for the first of its wake-ups (``spending._first``); a
cancel of the run that comes while that wait lets go of the wake-ups it no longer needs must
still cancel it (issue 67: a cancelled run went on waiting at its cap, and the runs queued
behind it in its conversation never started).

Budgets across hops, the formats: the ``x-switchboard-budget`` metadata and the budget
extension's object both ways (dispatcher/handlers/handed.py), the usage an A2A agent reports
(integration/kinds/a2a.py ``usage_of`` and the relay), the front door's reading of the
extension and its report of an ended task's usage (a2a/mapping.py), and how a hop splits
what is left of a total-token cap (room.py ``rest``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format

from switchboard.a2a import mapping
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.budgets.ledger import Amount, Hold, Ledger
from switchboard.dispatcher.budgets.room import rest
from switchboard.dispatcher.budgets.spending import Read, RunBudget, Spending, _first
from switchboard.dispatcher.handlers.handed import (
    BUDGET_EXTENSION,
    HEADER,
    MAX_VALUE,
    Handed,
    extension_value,
    header_value,
    parse_extension,
    parse_header,
)
from switchboard.integration.kinds.a2a import _Relay, usage_of
from switchboard.platform.errors import BudgetExhausted, InvalidArgument
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import LocalLog
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import BudgetRow, WorkspaceRow
from switchboard.platform.store.outbox import Outbox
from tests.conftest import CALL_DEADLINE_S, TEST_DATABASE_TIMEOUT_S

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


class Host:
    """The run's pause, as the run loop gives it: records what happened."""

    def __init__(self, run: pb.Run) -> None:
        self.run = run
        self.paused = asyncio.Event()
        self.resumed = 0

    async def pause(self) -> None:
        self.run.state = pb.RUN_STATE_REQUIRES_ACTION
        self.paused.set()

    async def resume(self) -> None:
        self.run.state = pb.RUN_STATE_RUNNING
        self.resumed += 1


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    found = Database(database_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    try:
        await found.migrate()
        async with found.sessions() as session:
            session.add(WorkspaceRow(id="acme", created_at=NOW, updated_at=NOW))
            await session.commit()
        yield found
    finally:
        await found.close()


@pytest.fixture
async def spending(database: Database) -> AsyncIterator[Spending]:
    outbox = Outbox(database)
    bus = EventBus(
        LocalLog(database, retention=1000, retention_s=3600, memory=100, outbox=outbox),
        memory=100,
        outbox=outbox,
    )
    await bus.start()
    try:
        yield Spending(Ledger(database, clock=lambda: NOW), bus, approval_timeout_s=30.0)
    finally:
        await bus.close()


async def _budget(database: Database, budget_id: str, **caps: int) -> None:
    budget = pb.Budget(display_name=budget_id, period=pb.BUDGET_PERIOD_DAY, **caps)  # type: ignore[arg-type]
    async with database.sessions() as session:
        session.add(
            BudgetRow(
                workspace_id="acme",
                id=budget_id,
                scope_kind="workspace",
                scope_id="",
                data=budget.SerializeToString(),
                created_at=NOW,
                updated_at=NOW,
            )
        )
        await session.commit()


async def _run_budget(
    spending: Spending, run_id: str, handed: Handed | None = None
) -> tuple[RunBudget, Host]:
    run = pb.Run(name=f"workspaces/acme/conversations/c1/runs/{run_id}", state=pb.RUN_STATE_RUNNING)
    host = Host(run)
    read = Read(await spending.applicable("acme", "", ""), spending.version("acme"))
    budget = spending.run_budget(read, run, "acme", "", host, handed)
    assert budget is not None
    return budget, host


async def test_what_is_left_is_the_least_room_per_cap(
    database: Database,
    spending: Spending,
) -> None:
    await _budget(database, "a", cost_limit_micros=1000, total_token_limit=500)
    await _budget(database, "b", cost_limit_micros=600, input_token_limit=300)
    ledger = spending.ledger
    budgets = await ledger.applicable("acme")
    held = await ledger.reserve(budgets, "r0", Amount(100, 50, 20))
    assert isinstance(held, Hold)
    await ledger.settle(held, Amount(40, 50, 20))

    room = await ledger.room(budgets, "r1")

    # cost: min(1000 - 40, 600 - 40); input: 300 - 50; total: 500 - 70; output uncapped.
    assert room == {"cost_micros": 560, "input_tokens": 250, "total_tokens": 430}


async def test_a_hop_holds_all_that_is_left_and_settles_what_was_reported(
    database: Database,
    spending: Spending,
) -> None:
    await _budget(database, "daily", cost_limit_micros=1000)
    hop, _ = await _run_budget(spending, "r1")
    other, _ = await _run_budget(spending, "r2")

    hold, handed = await hop.reserve_rest()
    # Held for the callee: another run of the same budget finds no room meanwhile.
    refused = await spending.ledger.reserve(other.budgets, "r2", Amount(cost_micros=1))
    await hop.settle(hold, 300, 10, 20)
    after = await spending.ledger.room(hop.budgets, "r3")

    assert handed == Handed(cost_micros=1000)
    assert not isinstance(refused, Hold)
    assert after == {"cost_micros": 700}


async def test_a_hop_with_nothing_left_waits_until_room_is_freed(
    database: Database,
    spending: Spending,
) -> None:
    await _budget(database, "daily", cost_limit_micros=500)
    first, _ = await _run_budget(spending, "r1")
    second, host = await _run_budget(spending, "r2")
    hold, _ = await first.reserve_rest()

    waiting = asyncio.create_task(second.reserve_rest())
    async with asyncio.timeout(CALL_DEADLINE_S):
        await host.paused.wait()
    assert host.run.required_action.budget.budgets == ["workspaces/acme/budgets/daily"]
    await first.settle(hold, 200, 0, 0)  # 300 freed: the paused hop looks again
    async with asyncio.timeout(CALL_DEADLINE_S):
        second_hold, handed = await waiting

    assert handed == Handed(cost_micros=300)
    assert host.resumed == 1
    await second.release(second_hold)


async def test_a_handed_cap_is_enforced_without_pausing(spending: Spending) -> None:
    # No stored budget at all: the handed cap alone.
    budget, host = await _run_budget(spending, "r1", Handed(cost_micros=500, total_tokens=100))
    assert budget.caps_cost

    step = await budget.reserve(300, 40, 40)
    with pytest.raises(BudgetExhausted) as caught:
        await budget.reserve(300, 0, 0)  # 200 left of the cost
    await budget.settle(step, 250, 30, 30)
    hold, handed = await budget.reserve_rest()  # what a nested hop would be handed
    await budget.release(hold)
    with pytest.raises(BudgetExhausted):
        await budget.reserve(0, 30, 20)  # 40 tokens left of the total

    assert caught.value.subject == HEADER
    assert [s for s, _ in caught.value.subjects] == [f"{HEADER}.cost_micros"]
    assert handed == Handed(cost_micros=250, total_tokens=40)
    assert not host.paused.is_set()
    # Nothing was written to the ledger for it.
    assert await spending.ledger.room((), "r1") == {}


async def test_a_handed_cap_applies_beside_the_stored_budgets(
    database: Database,
    spending: Spending,
) -> None:
    await _budget(database, "daily", cost_limit_micros=1000)
    budget, _ = await _run_budget(spending, "r1", Handed(cost_micros=400))

    hold, handed = await budget.reserve_rest()
    await budget.settle(hold, 150, 0, 0)

    assert handed == Handed(cost_micros=400)  # the lesser of the two
    assert await spending.ledger.room(budget.budgets, "r2") == {"cost_micros": 850}
    with pytest.raises(BudgetExhausted):
        await budget.reserve(300, 0, 0)  # 250 left of what was handed


async def test_a_hop_that_holds_nothing_still_hands_what_is_left_and_is_charged(
    database: Database, spending: Spending
) -> None:
    """An interactive expert's hop: its tool calls reserve from the same budget while it runs."""
    await _budget(database, "daily", cost_limit_micros=1000)
    hop, _ = await _run_budget(spending, "r1")

    hold, handed = await hop.reserve_rest(hold=False)
    tool = await hop.reserve(400, 0, 0)  # a priced tool call the expert asked for
    await hop.settle(tool, 400, 0, 0)
    await hop.settle(hold, 250, 0, 0)  # what the expert reported for itself

    assert handed == Handed(cost_micros=1000)
    assert await spending.ledger.room(hop.budgets, "r2") == {"cost_micros": 350}


# -- a pause's wake-ups ----------------------------------------------------------------------


async def test_a_cancel_while_the_wait_lets_go_of_its_wakeups_cancels_the_waiter() -> None:
    letting_go = asyncio.Event()
    let_go = asyncio.Event()

    async def slow_to_stop() -> None:
        # A wake-up that takes a moment to stop, as a task on a busy loop does.
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            letting_go.set()
            await let_go.wait()
            raise

    waiter = asyncio.create_task(_first(slow_to_stop(), timeout_s=0.01))
    await letting_go.wait()  # the wait timed out and is letting go of its wake-up
    waiter.cancel()  # the run is cancelled right then
    let_go.set()
    done, _ = await asyncio.wait([waiter], timeout=CALL_DEADLINE_S)
    assert done, "the waiter never ended"
    assert waiter.cancelled(), "the cancel was swallowed: the waiter returned as if woken"


# -- across hops, the formats ----------------------------------------------------------------


def test_the_header_names_only_the_caps_that_apply_in_order_and_reads_back() -> None:
    handed = Handed(cost_micros=1500, total_tokens=9000)
    assert header_value(handed) == "cost_micros=1500;total_tokens=9000"
    assert parse_header(header_value(handed)) == handed
    every = Handed(1, 2, 3, 4)
    assert header_value(every) == "cost_micros=1;input_tokens=2;output_tokens=3;total_tokens=4"
    assert parse_header(" output_tokens = 7 ; ") == Handed(output_tokens=7)
    assert parse_header("cost_micros=0") == Handed(cost_micros=0)
    assert Handed(cost_micros=0).empty()
    assert not Handed(cost_micros=1, input_tokens=5).empty()
    assert not Handed()


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("", HEADER),
        ("cost_micros", HEADER),
        ("dollars=5", HEADER),
        ("cost_micros=-1", f"{HEADER}.cost_micros"),
        ("cost_micros=1.5", f"{HEADER}.cost_micros"),
        ("cost_micros=٣", f"{HEADER}.cost_micros"),  # a digit, but not an ASCII one
        (f"cost_micros={MAX_VALUE + 1}", f"{HEADER}.cost_micros"),
        ("cost_micros=1;cost_micros=2", f"{HEADER}.cost_micros"),
        ("cost_micros=1;" * 40, HEADER),
    ],
)
def test_a_malformed_header_is_invalid_argument_naming_the_field(value: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_header(value)
    assert [v.field for v in caught.value.violations] == [field]


def test_the_extension_object_reads_back_and_is_checked() -> None:
    handed = Handed(cost_micros=2000, input_tokens=100)
    value = extension_value(handed)
    assert value == {"cost_micros": 2000, "input_tokens": 100}
    # Through a Struct, as it travels: numbers become doubles.
    struct = a2a.Message().metadata
    struct.update({BUDGET_EXTENSION: value})
    travelled = json_format.MessageToDict(struct)[BUDGET_EXTENSION]
    assert parse_extension(travelled, "m") == handed
    for bad, field in [
        ([1], "m"),
        ({}, "m"),
        ({"cost": 1}, "m"),
        ({"cost_micros": -1.0}, "m.cost_micros"),
        ({"cost_micros": 0.5}, "m.cost_micros"),
        ({"cost_micros": True}, "m.cost_micros"),
        ({"cost_micros": None}, "m.cost_micros"),
        ({"cost_micros": float("inf")}, "m.cost_micros"),
        ({"cost_micros": 1e300}, "m.cost_micros"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            parse_extension(bad, "m")
        assert [v.field for v in caught.value.violations] == [field], bad


def test_the_front_door_reads_the_extension_from_the_message_metadata() -> None:
    message = a2a.Message(message_id="m1", role=a2a.ROLE_USER, parts=[a2a.Part(text="hi")])
    assert mapping.handed_in(message) is None
    message.metadata.update({BUDGET_EXTENSION: {"cost_micros": 300, "total_tokens": 50}})
    assert mapping.handed_in(message) == Handed(cost_micros=300, total_tokens=50)
    message.metadata.update({BUDGET_EXTENSION: {"cost_micros": -3}})
    with pytest.raises(InvalidArgument) as caught:
        mapping.handed_in(message)
    assert [v.field for v in caught.value.violations] == [
        f"message.metadata[{BUDGET_EXTENSION!r}].cost_micros"
    ]


def _run(state: int, **usage: Any) -> pb.Run:
    run = pb.Run(name="workspaces/w1/conversations/c1/runs/r1", state=state)  # type: ignore[arg-type]
    for name, value in usage.items():
        setattr(run.usage, name, value)
    return run


def test_an_ended_task_reports_its_usage_and_a_running_one_does_not() -> None:
    ended = _run(pb.RUN_STATE_SUCCEEDED, input_tokens=12, output_tokens=30, cost_micros=72)
    task = mapping.task(ended, "", "answer")
    report = {"input_tokens": 12, "output_tokens": 30, "cost_micros": 72}
    assert json_format.MessageToDict(task.metadata)["usage"] == report
    event = mapping.status_event(ended, (4, 1))
    assert json_format.MessageToDict(event.status_update.metadata)["usage"] == report
    running = _run(pb.RUN_STATE_RUNNING, input_tokens=12)
    assert "usage" not in mapping.task(running, "", None).metadata.fields
    # What the front door reports, the caller reads.
    reported = usage_of(json_format.MessageToDict(task.metadata))
    assert (reported.input_tokens, reported.output_tokens, reported.cost_micros) == (12, 30, 72)


def test_usage_is_read_from_the_standard_places_and_bounded() -> None:
    def read(metadata: dict[str, Any]) -> tuple[int, int, int]:
        usage = usage_of(metadata)
        return usage.input_tokens, usage.output_tokens, usage.cost_micros

    assert read({}) == (0, 0, 0)
    assert read({"usage": {"input_tokens": 3, "output_tokens": 4, "cost_micros": 5}}) == (3, 4, 5)
    assert read({"usage": {"prompt_tokens": 3.0, "completion_tokens": 4}}) == (3, 4, 0)
    assert read({BUDGET_EXTENSION: {"usage": {"cost_micros": 9}}}) == (0, 0, 9)
    assert read({"usage": {"input_tokens": -1, "output_tokens": "7", "cost_micros": 1e30}}) == (
        0,
        0,
        0,
    )
    assert read({"usage": {"input_tokens": 2**40}}) == (0, 0, 0)  # beyond int32 tokens
    assert read({"usage": "lots"}) == (0, 0, 0)


def test_the_relay_charges_the_last_usage_the_task_reported() -> None:
    relay = _Relay()
    working = a2a.StreamResponse(
        status_update=a2a.TaskStatusUpdateEvent(
            task_id="t1", context_id="c1", status=a2a.TaskStatus(state=a2a.TASK_STATE_WORKING)
        )
    )
    working.status_update.metadata.update({"usage": {"cost_micros": 10}})
    done = a2a.StreamResponse(
        task=a2a.Task(
            id="t1",
            context_id="c1",
            status=a2a.TaskStatus(state=a2a.TASK_STATE_COMPLETED),
            artifacts=[a2a.Artifact(artifact_id="a", parts=[a2a.Part(text="ok")])],
        )
    )
    done.task.metadata.update({"usage": {"input_tokens": 5, "output_tokens": 6, "cost_micros": 40}})
    relay.take(working)
    relay.take(done)
    result = relay.result("agent")
    assert (result.usage.input_tokens, result.usage.output_tokens) == (5, 6)
    assert result.usage.cost_micros == 40
    assert result.usage.estimated_cost_usd == pytest.approx(40e-6)


def test_a_hop_holds_all_that_is_left_within_a_total_cap() -> None:
    assert rest({"cost_micros": 700}) == Amount(700, 0, 0)
    assert rest({"total_tokens": 90}) == Amount(0, 90, 0)
    assert rest({"input_tokens": 30, "total_tokens": 90}) == Amount(0, 30, 60)
    assert rest({"output_tokens": 30, "total_tokens": 90}) == Amount(0, 60, 30)
    assert rest({"input_tokens": 80, "output_tokens": 80, "total_tokens": 90}) == Amount(0, 10, 80)
    assert rest({"input_tokens": 5, "output_tokens": 6}) == Amount(0, 5, 6)
