"""The budget ledger: reservations in the database (``budget_windows``,
``budget_holds``); plain values out.

A reservation is, per budget that applies, one conditional ``UPDATE`` of the
budget's period row that adds the ask to what it holds only if used + held +
ask stays within every cap, all in one transaction: a budget without room
rolls the whole reservation back. It never reads and then writes: on
PostgreSQL (READ COMMITTED) a second writer blocks on the row lock and
re-evaluates the ``WHERE`` against the committed row before it updates
(``EvalPlanQual``), and SQLite has one writer at a time, so two replicas
cannot both take the last of a budget. Rows are taken in budget order, so two
reservations over the same budgets cannot deadlock.

Each reservation writes one ``budget_holds`` row per budget with the run's id:
settling or releasing deletes them, and a replica that takes a dead one's runs
over releases theirs (``release_runs``). Settling moves the hold to used by
what the call actually used; a threshold crossed is claimed by a conditional
``UPDATE ... SET alerted = :p WHERE alerted < :p``, so each is reported once
per period across replicas.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from google.protobuf.message import DecodeError
from sqlalchemy import BigInteger, Select, Update, and_, bindparam, delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.budgets.periods import period_of
from switchboard.platform import names
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import (
    BudgetHoldRow,
    BudgetRow,
    BudgetWindowRow,
    table_of,
)
from switchboard.platform.store.storage import transaction

log = logging.getLogger("switchboard.dispatcher.budgets.ledger")

_T = TypeVar("_T")

#: Budgets one run can have apply (a workspace has at most this many, the crud's limit is lower).
MAX_APPLICABLE: Final = 100
#: Run ids released in one statement.
_RELEASE_BATCH: Final = 500

W = BudgetWindowRow

# Reserve and settle run around every model call of a run with a budget, and the
# budgets of every message are read: Core statements built once (executed with their
# values), not the ORM's paths nor a statement built per call (which cost about half
# of each call's CPU, bench/budgets.py).
_WINDOWS: Final = table_of(BudgetWindowRow)
_HOLDS: Final = table_of(BudgetHoldRow)
_C: Final = _WINDOWS.c
_WINDOW_KEY: Final = (
    _C.workspace_id == bindparam("k_workspace"),
    _C.budget_id == bindparam("k_budget"),
    _C.window == bindparam("k_window"),
)


def _number(name: str) -> Any:
    return bindparam(name, type_=BigInteger())


def _hold_statement(cost: bool, input_: bool, output: bool, total: bool) -> Update:
    """Add the ask to the window's held amounts where it fits each cap that is set."""
    conditions: list[Any] = []
    if cost:
        conditions.append(_C.cost_used + _C.cost_held + _number("ask_cost") <= _number("cap_cost"))
    if input_:
        conditions.append(
            _C.input_used + _C.input_held + _number("ask_input") <= _number("cap_input")
        )
    if output:
        conditions.append(
            _C.output_used + _C.output_held + _number("ask_output") <= _number("cap_output")
        )
    if total:
        conditions.append(
            _C.input_used
            + _C.input_held
            + _C.output_used
            + _C.output_held
            + _number("ask_input")
            + _number("ask_output")
            <= _number("cap_total")
        )
    return (
        update(_WINDOWS)
        .where(*_WINDOW_KEY, *conditions)
        .values(
            cost_held=_C.cost_held + _number("ask_cost"),
            input_held=_C.input_held + _number("ask_input"),
            output_held=_C.output_held + _number("ask_output"),
        )
    )


#: By which caps are set (cost, input, output, total); none set: an overdraft.
_HOLD: Final = {
    (a, b, c, d): _hold_statement(a, b, c, d)
    for a in (False, True)
    for b in (False, True)
    for c in (False, True)
    for d in (False, True)
}
_DROP_HOLD: Final = _HOLDS.delete().where(
    _HOLDS.c.id == bindparam("k_hold"),
    _HOLDS.c.workspace_id == bindparam("k_workspace"),
    _HOLDS.c.budget_id == bindparam("k_budget"),
)
_ADD_HOLDS: Final = _HOLDS.insert()
#: The current windows of a run's budgets, read at admission.
_WINDOW_ROWS: Final = select(
    _C.budget_id,
    _C.window,
    _C.cost_used,
    _C.cost_held,
    _C.input_used,
    _C.input_held,
    _C.output_used,
    _C.output_held,
).where(
    _C.workspace_id == bindparam("k_workspace"),
    _C.budget_id.in_(bindparam("k_budgets", expanding=True)),
    _C.window.in_(bindparam("k_windows", expanding=True)),
)
_BUDGETS: Final = table_of(BudgetRow)


def _applicable_statement(assistant: bool, api_key: bool) -> Select[str, bytes]:
    """The budgets of a workspace that apply to a run (of an assistant, with a key)."""
    b = _BUDGETS.c
    scopes: list[Any] = [b.scope_kind == "workspace"]
    if assistant:
        scopes.append(and_(b.scope_kind == "assistant", b.scope_id == bindparam("k_assistant")))
    if api_key:
        scopes.append(and_(b.scope_kind == "api_key", b.scope_id == bindparam("k_key")))
    return (
        select(b.id, b.data)
        .where(b.workspace_id == bindparam("k_workspace"), or_(*scopes))
        .order_by(b.id)
        .limit(MAX_APPLICABLE)
    )


#: By (an assistant given, an API key given): every message reads its budgets.
_APPLICABLE: Final = {
    (a, k): _applicable_statement(a, k) for a in (False, True) for k in (False, True)
}
_SETTLE: Final = (
    update(_WINDOWS)
    .where(*_WINDOW_KEY)
    .values(
        cost_held=_C.cost_held - _number("held_cost"),
        input_held=_C.input_held - _number("held_input"),
        output_held=_C.output_held - _number("held_output"),
        cost_used=_C.cost_used + _number("used_cost"),
        input_used=_C.input_used + _number("used_input"),
        output_used=_C.output_used + _number("used_output"),
    )
)


@dataclass(frozen=True)
class Caps:
    """A budget's caps (None: not capped)."""

    cost: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None


@dataclass(frozen=True)
class Applicable:
    """A budget that applies to a run, as the ledger needs it."""

    workspace_id: str
    budget_id: str
    display_name: str
    period: pb.BudgetPeriod.ValueType
    time_zone: str
    caps: Caps
    thresholds: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"workspaces/{self.workspace_id}/budgets/{self.budget_id}"


@dataclass(frozen=True)
class Amount:
    """Cost (micro-units) and tokens: what a step asks, holds or used."""

    cost_micros: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Amount) -> Amount:
        return Amount(
            self.cost_micros + other.cost_micros,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
        )


@dataclass(frozen=True)
class Hold:
    """A reservation: what it holds in each budget's window (one ``budget_holds`` row each)."""

    id: str
    run_id: str
    amount: Amount
    #: ``(budget, window)`` of each budget it holds in, in lock order.
    windows: tuple[tuple[Applicable, str], ...]


@dataclass(frozen=True)
class Full:
    """A budget without room for a step, and when its period resets (None: never)."""

    budget: Applicable
    reset: dt.datetime | None


@dataclass(frozen=True)
class Alert:
    """A threshold a settlement crossed (claimed once per period)."""

    budget: Applicable
    percent: int
    cap: str
    used: Amount
    held: Amount
    window: str


@dataclass(frozen=True)
class Settled:
    alerts: tuple[Alert, ...] = ()


@dataclass
class _NoRoom(Exception):
    """Raised inside a reservation's transaction to roll it back whole."""

    full: list[Full] = field(default_factory=list)


def applicable_of(workspace_id: str, budget_id: str, data: bytes) -> Applicable | None:
    """A stored budget as the ledger reads it (None: unreadable, logged and skipped)."""
    try:
        budget = pb.Budget.FromString(data)
    except DecodeError:
        log.warning("budget not readable", extra={"budget": budget_id})
        return None
    caps = Caps(
        cost=budget.cost_limit_micros if budget.HasField("cost_limit_micros") else None,
        input_tokens=budget.input_token_limit if budget.HasField("input_token_limit") else None,
        output_tokens=budget.output_token_limit if budget.HasField("output_token_limit") else None,
        total_tokens=budget.total_token_limit if budget.HasField("total_token_limit") else None,
    )
    return Applicable(
        workspace_id=workspace_id,
        budget_id=budget_id,
        display_name=budget.display_name,
        period=budget.period,
        time_zone=budget.time_zone,
        caps=caps,
        thresholds=tuple(sorted({t for t in budget.alert_thresholds if 1 <= t <= 100})),
    )


def _fraction(caps: Caps, used: Amount) -> tuple[float, str]:
    """The largest share of a cap ``used`` takes, and that cap's name."""
    best, which = 0.0, ""
    for cap, value, label in (
        (caps.cost, used.cost_micros, "cost"),
        (caps.input_tokens, used.input_tokens, "input_tokens"),
        (caps.output_tokens, used.output_tokens, "output_tokens"),
        (caps.total_tokens, used.input_tokens + used.output_tokens, "total_tokens"),
    ):
        if cap:
            share = value / cap
            if share > best or not which:
                best, which = share, label
    return best, which


def exhausted(caps: Caps, used: Amount, held: Amount) -> bool:
    """Whether a window with ``used`` and ``held`` has no room left under ``caps``."""
    total = used + held
    return any(
        cap is not None and value >= cap
        for cap, value in (
            (caps.cost, total.cost_micros),
            (caps.input_tokens, total.input_tokens),
            (caps.output_tokens, total.output_tokens),
            (caps.total_tokens, total.input_tokens + total.output_tokens),
        )
    )


class Ledger:
    """The budgets of runs and their reservations, in one database."""

    def __init__(self, database: Database, *, clock: Callable[[], dt.datetime] = names.now) -> None:
        self._database = database
        self._insert = sqlite_insert if database.dialect_name == "sqlite" else pg_insert
        #: A period's row, made by its first reservation (two replicas may race to make it).
        self._new_window = self._insert(_WINDOWS).on_conflict_do_nothing()
        self._clock = clock

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    # -- which budgets apply -------------------------------------------------------------

    async def applicable(
        self, workspace_id: str, assistant_id: str = "", api_key_id: str = ""
    ) -> tuple[Applicable, ...]:
        """The budgets of ``workspace_id`` that apply to a run of ``assistant_id``
        started with ``api_key_id`` (either "" for none), in lock order."""
        statement = _APPLICABLE[bool(assistant_id), bool(api_key_id)]
        values = {"k_workspace": workspace_id, "k_assistant": assistant_id, "k_key": api_key_id}

        def work(db: Session) -> list[tuple[str, bytes]]:
            return [(row[0], row[1]) for row in db.connection().execute(statement, values)]

        found = []
        for budget_id, data in await self._run(work, write=False):
            budget = applicable_of(workspace_id, budget_id, data)
            if budget is not None:
                found.append(budget)
        return tuple(found)

    def window_of(self, budget: Applicable, run_id: str, at: dt.datetime | None = None) -> str:
        return period_of(budget.period, budget.time_zone, at or self._clock(), run_id).window

    def reset_of(self, budget: Applicable, at: dt.datetime | None = None) -> dt.datetime | None:
        """When the period of ``budget`` that ``at`` is in ends (None: never, or per run)."""
        return period_of(budget.period, budget.time_zone, at or self._clock(), "").end

    # -- room (admission) ----------------------------------------------------------------

    async def full(self, budgets: Sequence[Applicable], run_id: str = "") -> list[Full]:
        """The budgets of ``budgets`` whose current period has no room at all
        (used + held reached a cap). Per-run budgets are never full before the run."""
        at = self._clock()
        keyed = {
            (b.budget_id, self.window_of(b, run_id, at)): b
            for b in budgets
            if b.period != pb.BUDGET_PERIOD_RUN
        }
        if not keyed:
            return []
        values = {
            "k_workspace": budgets[0].workspace_id,
            "k_budgets": sorted({budget_id for budget_id, _ in keyed}),
            "k_windows": sorted({window for _, window in keyed}),
        }

        def work(db: Session) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in db.connection().execute(_WINDOW_ROWS, values)]

        out: list[Full] = []
        for row in await self._run(work, write=False):
            budget = keyed.get((row[0], row[1]))
            if budget is None:
                continue
            used, held = Amount(row[2], row[4], row[6]), Amount(row[3], row[5], row[7])
            if exhausted(budget.caps, used, held):
                out.append(Full(budget, self.reset_of(budget, at)))
        return out

    # -- reserving -----------------------------------------------------------------------

    async def reserve(
        self,
        budgets: Sequence[Applicable],
        run_id: str,
        ask: Amount,
        *,
        overdraft: bool = False,
    ) -> Hold | list[Full]:
        """Hold ``ask`` in every budget of ``budgets`` for ``run_id``, or in none.

        Returns the hold, or the budgets that had no room (nothing written).
        ``overdraft`` holds it whatever the caps say (an owner allowed it).
        """
        at = self._clock()
        windows = tuple(
            (budget, self.window_of(budget, run_id, at))
            for budget in sorted(budgets, key=lambda b: b.budget_id)
        )
        hold_id = names.new_id()

        def work(db: Session) -> Hold:
            connection = db.connection()
            no_room: list[Full] = []
            for budget, window in windows:
                caps = budget.caps
                capped = not overdraft
                statement = _HOLD[
                    capped and caps.cost is not None,
                    capped and caps.input_tokens is not None,
                    capped and caps.output_tokens is not None,
                    capped and caps.total_tokens is not None,
                ]
                values = {
                    "k_workspace": budget.workspace_id,
                    "k_budget": budget.budget_id,
                    "k_window": window,
                    "ask_cost": ask.cost_micros,
                    "ask_input": ask.input_tokens,
                    "ask_output": ask.output_tokens,
                    "cap_cost": caps.cost or 0,
                    "cap_input": caps.input_tokens or 0,
                    "cap_output": caps.output_tokens or 0,
                    "cap_total": caps.total_tokens or 0,
                }
                if _rowcount(connection.execute(statement, values)) == 1:
                    continue
                # No row for this period yet (its first reservation), or no room: make
                # the row if it is missing, and ask once more.
                connection.execute(
                    self._new_window,
                    {
                        "workspace_id": budget.workspace_id,
                        "budget_id": budget.budget_id,
                        "window": window,
                        "cost_used": 0,
                        "cost_held": 0,
                        "input_used": 0,
                        "input_held": 0,
                        "output_used": 0,
                        "output_held": 0,
                        "alerted": 0,
                        "created_at": at,
                    },
                )
                if _rowcount(connection.execute(statement, values)) != 1:
                    no_room.append(Full(budget, self.reset_of(budget, at)))
            if no_room:
                raise _NoRoom(no_room)
            if windows:
                connection.execute(
                    _ADD_HOLDS,
                    [
                        {
                            "id": hold_id,
                            "workspace_id": budget.workspace_id,
                            "budget_id": budget.budget_id,
                            "window": window,
                            "run_id": run_id,
                            "cost": ask.cost_micros,
                            "input_tokens": ask.input_tokens,
                            "output_tokens": ask.output_tokens,
                            "created_at": at,
                        }
                        for budget, window in windows
                    ],
                )
            return Hold(hold_id, run_id, ask, windows)

        try:
            return await self._run(work, write=True)
        except _NoRoom as refused:
            return refused.full

    # -- settling and releasing ----------------------------------------------------------

    async def settle(self, hold: Hold, actual: Amount) -> Settled:
        """Move ``hold`` to used by ``actual`` (what the call used; the rest of the
        hold is released) and report the thresholds this crossed (each once per
        period, whichever replica crosses it). A hold already released (its run
        taken over meanwhile) only adds ``actual``."""

        def work(db: Session) -> list[Alert]:
            connection = db.connection()
            alerts: list[Alert] = []
            for budget, window in hold.windows:
                key = {
                    "k_workspace": budget.workspace_id,
                    "k_budget": budget.budget_id,
                    "k_window": window,
                }
                removed = connection.execute(_DROP_HOLD, {**key, "k_hold": hold.id})
                held = hold.amount if _rowcount(removed) == 1 else Amount()
                connection.execute(
                    _SETTLE,
                    {
                        **key,
                        "held_cost": held.cost_micros,
                        "held_input": held.input_tokens,
                        "held_output": held.output_tokens,
                        "used_cost": actual.cost_micros,
                        "used_input": actual.input_tokens,
                        "used_output": actual.output_tokens,
                    },
                )
                if budget.thresholds:
                    where = (
                        W.workspace_id == budget.workspace_id,
                        W.budget_id == budget.budget_id,
                        W.window == window,
                    )
                    alerts.extend(self._crossed(db, budget, window, where))
            return alerts

        return Settled(tuple(await self._run(work, write=True)))

    def _crossed(self, db: Session, budget: Applicable, window: str, key: Any) -> list[Alert]:
        """Claim the thresholds of ``budget`` its window's usage has reached and no
        one claimed yet (the row is locked by this transaction's update)."""
        row = db.execute(
            select(
                W.cost_used,
                W.input_used,
                W.output_used,
                W.cost_held,
                W.input_held,
                W.output_held,
                W.alerted,
            ).where(*key)
        ).one_or_none()
        if row is None:
            return []
        used, held = Amount(row[0], row[1], row[2]), Amount(row[3], row[4], row[5])
        share, cap = _fraction(budget.caps, used)
        alerts = []
        for percent in budget.thresholds:
            if percent <= row[6] or share * 100 < percent:
                continue
            claimed = db.execute(
                update(W)
                .where(*key, W.alerted < percent)
                .values(alerted=percent)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(claimed) == 1:
                alerts.append(Alert(budget, percent, cap, used, held, window))
        return alerts

    async def release(self, hold: Hold) -> None:
        """Give ``hold`` back unused (its call was never made)."""
        await self.settle(hold, Amount())

    async def release_runs(self, run_ids: Sequence[str]) -> int:
        """Release every hold of ``run_ids`` (runs taken over from a replica that
        died holding them); returns how many hold rows there were."""
        released = 0
        for start in range(0, len(run_ids), _RELEASE_BATCH):
            batch = list(run_ids[start : start + _RELEASE_BATCH])

            def work(db: Session, batch: list[str] = batch) -> int:
                rows = db.execute(
                    select(
                        BudgetHoldRow.id,
                        BudgetHoldRow.workspace_id,
                        BudgetHoldRow.budget_id,
                        BudgetHoldRow.window,
                        BudgetHoldRow.cost,
                        BudgetHoldRow.input_tokens,
                        BudgetHoldRow.output_tokens,
                    )
                    .where(BudgetHoldRow.run_id.in_(batch))
                    .order_by(BudgetHoldRow.budget_id, BudgetHoldRow.id)
                ).all()
                count = 0
                for hold_id, workspace_id, budget_id, window, cost, input_tokens, output in rows:
                    removed = db.execute(
                        delete(BudgetHoldRow)
                        .where(
                            BudgetHoldRow.id == hold_id,
                            BudgetHoldRow.workspace_id == workspace_id,
                            BudgetHoldRow.budget_id == budget_id,
                        )
                        .execution_options(synchronize_session=False)
                    )
                    if _rowcount(removed) != 1:
                        continue  # settled meanwhile
                    count += 1
                    db.execute(
                        update(W)
                        .where(
                            W.workspace_id == workspace_id,
                            W.budget_id == budget_id,
                            W.window == window,
                        )
                        .values(
                            cost_held=W.cost_held - cost,
                            input_held=W.input_held - input_tokens,
                            output_held=W.output_held - output,
                        )
                        .execution_options(synchronize_session=False)
                    )
                return count

            released += await self._run(work, write=True)
        return released

    async def window(self, budget: Applicable, window: str) -> tuple[Amount, Amount] | None:
        """``(used, held)`` of one period of ``budget`` (None: nothing reserved in it yet)."""
        statement = select(
            W.cost_used, W.input_used, W.output_used, W.cost_held, W.input_held, W.output_held
        ).where(
            W.workspace_id == budget.workspace_id,
            W.budget_id == budget.budget_id,
            W.window == window,
        )

        def work(db: Session) -> tuple[Any, ...] | None:
            row = db.execute(statement).one_or_none()
            return None if row is None else tuple(row)

        row = await self._run(work, write=False)
        if row is None:
            return None
        return Amount(row[0], row[1], row[2]), Amount(row[3], row[4], row[5])


def _rowcount(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
