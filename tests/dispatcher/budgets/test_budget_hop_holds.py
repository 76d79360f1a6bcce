"""A hop's hold on SQLite and PostgreSQL (budgets/ledger.py ``room``, spending.py
``RunBudget.reserve_rest``) and a handed cap (``RunBudget`` with ``handed``): what is left is
the least room over the budgets per cap; a hop holds all of it, so another run cannot take
it meanwhile, and settles what the callee reported; with nothing left it waits like any step
and goes on when room is freed; a handed cap is enforced without pausing."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.budgets.ledger import Amount, Hold, Ledger
from switchboard.dispatcher.budgets.spending import Read, RunBudget, Spending
from switchboard.dispatcher.handlers.handed import HEADER, Handed
from switchboard.platform.errors import BudgetExhausted
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import LocalLog
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import BudgetRow, WorkspaceRow
from switchboard.platform.store.outbox import Outbox

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
    found = Database(database_url, timeout_s=10.0)
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
    async with asyncio.timeout(10):
        await host.paused.wait()
    assert host.run.required_action.budget.budgets == ["workspaces/acme/budgets/daily"]
    await first.settle(hold, 200, 0, 0)  # 300 freed: the paused hop looks again
    async with asyncio.timeout(10):
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
