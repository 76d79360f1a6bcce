"""The budget ledger's SQL on SQLite and PostgreSQL: which budgets apply, reservations
that never pass a cap (also when many race from two engines on one database), settling,
releasing, takeover releases, and thresholds claimed once per period."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.budgets.ledger import Amount, Full, Hold, Ledger
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import BudgetHoldRow, BudgetRow, WorkspaceRow
from tests.conftest import TEST_DATABASE_TIMEOUT_S

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    try:
        await database.migrate()
        async with database.sessions() as session:
            session.add(WorkspaceRow(id="acme", created_at=NOW, updated_at=NOW))
            await session.commit()
        yield database
    finally:
        await database.close()


async def _budget(
    db: Database,
    budget_id: str,
    *,
    kind: str = "workspace",
    scope_id: str = "",
    period: pb.BudgetPeriod.ValueType = pb.BUDGET_PERIOD_DAY,
    **caps: int | list[int],
) -> None:
    budget = pb.Budget(display_name=budget_id, period=period, **caps)  # type: ignore[arg-type]
    async with db.sessions() as session:
        session.add(
            BudgetRow(
                workspace_id="acme",
                id=budget_id,
                scope_kind=kind,
                scope_id=scope_id,
                data=budget.SerializeToString(),
                created_at=NOW,
                updated_at=NOW,
            )
        )
        await session.commit()


async def _holds(db: Database) -> int:
    async with db.sessions() as session:
        return len((await session.execute(BudgetHoldRow.__table__.select())).all())


async def test_the_budgets_of_a_run_are_its_workspace_s_its_assistant_s_and_its_key_s(
    db: Database,
) -> None:
    await _budget(db, "everything", cost_limit_micros=100)
    await _budget(db, "helper", kind="assistant", scope_id="helper", cost_limit_micros=100)
    await _budget(db, "other", kind="assistant", scope_id="other", cost_limit_micros=100)
    await _budget(db, "key", kind="api_key", scope_id="k1", input_token_limit=5)
    ledger = Ledger(db, clock=lambda: NOW)

    found = await ledger.applicable("acme", "helper", "k1")

    assert [b.budget_id for b in found] == ["everything", "helper", "key"]
    assert found[2].caps.input_tokens == 5
    assert found[2].caps.cost is None
    assert [b.budget_id for b in await ledger.applicable("acme")] == ["everything"]
    assert await ledger.applicable("elsewhere", "helper", "k1") == ()


async def test_a_reservation_holds_in_every_budget_or_in_none(db: Database) -> None:
    await _budget(db, "big", cost_limit_micros=1000)
    await _budget(db, "small", cost_limit_micros=100, alert_thresholds=[50])
    ledger = Ledger(db, clock=lambda: NOW)
    budgets = await ledger.applicable("acme")

    first = await ledger.reserve(budgets, "r1", Amount(cost_micros=80))
    refused = await ledger.reserve(budgets, "r2", Amount(cost_micros=30))

    assert isinstance(first, Hold)
    assert isinstance(refused, list)
    assert [full.budget.budget_id for full in refused] == ["small"]
    assert refused[0].reset == dt.datetime(2026, 11, 27, tzinfo=dt.UTC)
    # The big budget took nothing from the refused reservation.
    big, _small = budgets
    assert await ledger.window(big, "d:2026-11-26") == (Amount(), Amount(cost_micros=80))
    assert await _holds(db) == 2


async def test_settling_moves_the_hold_to_what_was_used_and_frees_the_rest(
    db: Database,
) -> None:
    await _budget(db, "tokens", total_token_limit=100, cost_limit_micros=1000)
    ledger = Ledger(db, clock=lambda: NOW)
    budgets = await ledger.applicable("acme")
    hold = await ledger.reserve(budgets, "r1", Amount(500, 40, 50))
    assert isinstance(hold, Hold)
    assert isinstance(await ledger.reserve(budgets, "r2", Amount(0, 5, 10)), list)

    await ledger.settle(hold, Amount(120, 40, 7))

    assert await ledger.window(budgets[0], "d:2026-11-26") == (Amount(120, 40, 7), Amount())
    assert await _holds(db) == 0
    assert isinstance(await ledger.reserve(budgets, "r2", Amount(0, 5, 10)), Hold)


async def test_release_gives_a_hold_back_and_takeover_charges_a_run_s_holds(
    db: Database,
) -> None:
    await _budget(db, "b", cost_limit_micros=100)
    await _budget(db, "per-run", period=pb.BUDGET_PERIOD_RUN, cost_limit_micros=100)
    ledger = Ledger(db, clock=lambda: NOW)
    budgets = await ledger.applicable("acme")
    one = await ledger.reserve(budgets, "r1", Amount(cost_micros=40))
    two = await ledger.reserve(budgets, "r2", Amount(cost_micros=50))
    assert isinstance(one, Hold)
    assert isinstance(two, Hold)
    recorded: list[tuple[str, int, int, int]] = []

    def record(_db: object, run_id: str, cost: int, tokens_in: int, out: int) -> None:
        recorded.append((run_id, cost, tokens_in, out))

    await ledger.release(one)
    # Its attempt lost: charged at what it reserved, in both of its budgets, and
    # recorded once on its run.
    assert await ledger.charge_lost(["r2", "r3"], record=record) == {"r2": Amount(50)}
    assert recorded == [("r2", 50, 0, 0)]

    assert await ledger.window(budgets[0], "d:2026-11-26") == (Amount(50), Amount())
    assert await ledger.window(budgets[1], "r:r2") == (Amount(50), Amount())
    assert await _holds(db) == 0
    # The room it took stays taken: another run gets only what is left ...
    assert isinstance(await ledger.reserve(budgets, "r4", Amount(cost_micros=51)), list)
    four = await ledger.reserve(budgets, "r4", Amount(cost_micros=50))
    assert isinstance(four, Hold)
    # ... and the lost attempt, had it lived on to settle, adds nothing more: the cap holds.
    settled = await ledger.settle(two, Amount(cost_micros=10))
    assert settled.charged_before
    assert await ledger.window(budgets[0], "d:2026-11-26") == (Amount(50), Amount(50))
    await ledger.settle(four, Amount(cost_micros=50))
    assert await ledger.window(budgets[0], "d:2026-11-26") == (Amount(100), Amount())
    assert await ledger.charge_lost(["r2"], record=record) == {}


async def test_overdraft_holds_past_the_cap(db: Database) -> None:
    await _budget(db, "b", output_token_limit=10)
    ledger = Ledger(db, clock=lambda: NOW)
    budgets = await ledger.applicable("acme")

    assert isinstance(await ledger.reserve(budgets, "r1", Amount(output_tokens=50)), list)
    hold = await ledger.reserve(budgets, "r1", Amount(output_tokens=50), overdraft=True)

    assert isinstance(hold, Hold)
    assert [f.budget.budget_id for f in await ledger.full(budgets)] == ["b"]


async def test_a_full_budget_is_seen_before_a_run_starts(db: Database) -> None:
    await _budget(db, "b", cost_limit_micros=100)
    ledger = Ledger(db, clock=lambda: NOW)
    budgets = await ledger.applicable("acme")
    assert await ledger.full(budgets) == []
    hold = await ledger.reserve(budgets, "r1", Amount(cost_micros=100))
    assert isinstance(hold, Hold)

    full = await ledger.full(budgets)

    assert full == [Full(budgets[0], dt.datetime(2026, 11, 27, tzinfo=dt.UTC))]
    # The next day is a new period.
    tomorrow = Ledger(db, clock=lambda: NOW + dt.timedelta(days=1))
    assert await tomorrow.full(budgets) == []


async def test_each_threshold_is_reported_once_per_period(db: Database) -> None:
    await _budget(db, "b", cost_limit_micros=100, alert_thresholds=[80, 50, 100])
    ledger = Ledger(db, clock=lambda: NOW)
    budgets = await ledger.applicable("acme")
    reported: list[int] = []
    for used in (30, 30, 10, 30):
        hold = await ledger.reserve(budgets, "r1", Amount(cost_micros=used))
        assert isinstance(hold, Hold)
        settled = await ledger.settle(hold, Amount(cost_micros=used))
        reported.extend(alert.percent for alert in settled.alerts)
        assert all(alert.cap == "cost" for alert in settled.alerts)

    assert reported == [50, 80, 100]


async def test_racing_reservations_from_two_engines_never_pass_the_cap(
    db: Database, database_url: str
) -> None:
    await _budget(db, "shared", cost_limit_micros=1_000, total_token_limit=10_000)
    await _budget(db, "per-key", kind="api_key", scope_id="k1", cost_limit_micros=5_000)
    second = Database(database_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    try:
        ledgers = [Ledger(db, clock=lambda: NOW), Ledger(second, clock=lambda: NOW)]
        budgets = await ledgers[0].applicable("acme", "", "k1")

        async def one(index: int) -> Hold | list[Full]:
            return await ledgers[index % 2].reserve(budgets, f"r{index}", Amount(cost_micros=30))

        outcomes = await asyncio.gather(*(one(index) for index in range(80)))
    finally:
        await second.close()

    held = [outcome for outcome in outcomes if isinstance(outcome, Hold)]
    # 1000 // 30 = 33 fit; every other one was refused, by the shared budget.
    assert len(held) == 33
    refused = [outcome for outcome in outcomes if isinstance(outcome, list)]
    assert all([f.budget.budget_id for f in full] == ["shared"] for full in refused)
    _used, holding = await ledgers[0].window(budgets[1], "d:2026-11-26") or (None, None)
    assert holding == Amount(cost_micros=33 * 30)
    assert await _holds(db) == 66
