"""The budget ledger: reservations in the database (``budget_windows``,
``budget_holds``); plain values out. Its statements, built once, are ``ledgersql.py``'s.

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
settling or releasing deletes them. Settling moves the hold to used by what the
call actually used; a threshold crossed is claimed by a conditional
``UPDATE ... SET alerted = :p WHERE alerted < :p``, so each is reported once
per period across replicas.

A hold is never given back unless its call is known not to have been made: a
replica that takes a dead one's runs over charges their holds at what they
reserved (``charge_lost``), since a call in flight at a crash may have been
billed, and a settlement that finds its hold already charged so adds nothing.
Room is only ever freed by the hold's own settlement, so no reservation can
take room that a call still in flight will use, and used + held never passes a
cap (an owner's overdraft aside).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from google.protobuf.message import DecodeError
from sqlalchemy import Connection, delete, select, update
from sqlalchemy.orm import Session

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.budgets.ledgersql import (
    APPLICABLE,
    CLAIM,
    DELETE_HOLD,
    INSERT_HOLD,
    OPEN_WINDOW,
    READ_WINDOW,
    SETTLE,
    UNCAPPED,
    WINDOWS_OF,
    reserving,
)
from switchboard.dispatcher.budgets.resources.periods import period_of
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import BudgetHoldRow, BudgetWindowRow
from switchboard.platform.store.storage import transaction
from switchboard.platform.values import names
from switchboard.platform.values.resources import BudgetName

log = logging.getLogger("switchboard.dispatcher.budgets.ledger")

_T = TypeVar("_T")

#: Run ids released in one statement.
_RELEASE_BATCH: Final = 500


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
        return str(BudgetName(self.workspace_id, self.budget_id))


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
    #: The run's record of it refused it (the run is another instance's now):
    #: nothing was written, the hold is still held.
    refused: bool = False
    #: The hold was already charged at what it reserved (its attempt was given up
    #: for dead, ``Ledger.charge_lost``): nothing more was written.
    charged_before: bool = False


#: Records a settlement on its run in the settlement's transaction:
#: ``(session, cost_micros, input_tokens, output_tokens)``; False refuses it
#: (``runs/core/store.py``: ``RunStore.charging``).
Record = Callable[[Session, int, int, int], bool]
#: Records on a run the charge of a hold its lost attempt left, in the charge's
#: transaction: ``(session, run_id, cost_micros, input_tokens, output_tokens)``
#: (``runs/core/store.py``: ``RunStore.charging_lost``).
LostRecord = Callable[[Session, str, int, int, int], None]


class _Refused(Exception):
    """The run's record refused a settlement: its transaction is rolled back whole."""


@dataclass
class _NoRoom(Exception):
    """Raised inside a reservation's transaction to roll it back whole."""

    full: list[Full] = field(default_factory=list)


def _reserving(caps: Caps | None) -> Any:
    """The conditional UPDATE that holds an ask if it fits ``caps`` (None: whatever they say)."""
    if caps is None:
        return reserving(UNCAPPED)
    return reserving(
        (
            caps.cost is not None,
            caps.input_tokens is not None,
            caps.output_tokens is not None,
            caps.total_tokens is not None,
        )
    )


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
        self._dialect = database.dialect_name
        self._clock = clock

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    # -- which budgets apply -------------------------------------------------------------

    async def applicable(
        self,
        workspace_id: str,
        assistant_id: str = "",
        api_key_id: str = "",
        above: Sequence[str] = (),
    ) -> tuple[Applicable, ...]:
        """The budgets of ``workspace_id`` that apply to a run of ``assistant_id``
        started with ``api_key_id`` (either "" for none), in lock order; ``above``: the
        assistants whose budgets it is charged to as well (a delegate's ancestors), in
        the same read."""
        values = {
            "ws": workspace_id,
            "assistants": [assistant_id, *above],
            "key": api_key_id,
        }

        def work(db: Session) -> list[tuple[str, bytes]]:
            return [(row[0], row[1]) for row in db.connection().execute(APPLICABLE, values)]

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
            "ws": budgets[0].workspace_id,
            "budgets": sorted({budget_id for budget_id, _ in keyed}),
            "windows": sorted({window for _, window in keyed}),
        }

        def work(db: Session) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in db.connection().execute(WINDOWS_OF, values)]

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

        opening = OPEN_WINDOW[self._dialect]
        asks = {
            "ask_cost": ask.cost_micros,
            "ask_in": ask.input_tokens,
            "ask_out": ask.output_tokens,
            "at": at,
        }

        def work(db: Session) -> Hold:
            connection = db.connection()
            no_room: list[Full] = []
            for budget, window in windows:
                caps = budget.caps
                values = {
                    **asks,
                    "ws": budget.workspace_id,
                    "budget": budget.budget_id,
                    "win": window,
                    "cap_cost": caps.cost,
                    "cap_in": caps.input_tokens,
                    "cap_out": caps.output_tokens,
                    "cap_total": caps.total_tokens,
                }
                connection.execute(opening, values)
                result = connection.execute(_reserving(None if overdraft else caps), values)
                if _rowcount(result) != 1:
                    no_room.append(Full(budget, self.reset_of(budget, at)))
            if no_room:
                raise _NoRoom(no_room)
            if windows:
                connection.execute(
                    INSERT_HOLD,
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

    async def settle(self, hold: Hold, actual: Amount, *, record: Record | None = None) -> Settled:
        """Move ``hold`` to used by ``actual`` (what the call used; the rest of the
        hold is released) and report the thresholds this crossed (each once per
        period, whichever replica crosses it). A hold already charged at what it
        reserved (its attempt was given up for dead meanwhile: ``charge_lost``)
        adds nothing more: that charge was the call's worst case.

        ``record``: the run's record of the charge, written in the same
        transaction, so what the budgets used is always what their runs were
        charged, whatever crash comes between; when it refuses (the run is no
        longer this instance's), nothing is settled (``Settled.refused``).
        """

        used = {
            "used_cost": actual.cost_micros,
            "used_in": actual.input_tokens,
            "used_out": actual.output_tokens,
        }
        reserved = hold.amount

        def work(db: Session) -> Settled:
            connection = db.connection()
            keys = [
                {"ws": budget.workspace_id, "budget": budget.budget_id, "win": window}
                for budget, window in hold.windows
            ]
            # The holds first, in lock order: one a takeover charged is gone whole
            # (both take a hold's rows in the same order, in one transaction).
            removed = [
                _rowcount(connection.execute(DELETE_HOLD, {**key, "hold": hold.id})) == 1
                for key in keys
            ]
            if keys and not any(removed):
                return Settled(charged_before=True)
            if record is not None and not record(
                db, actual.cost_micros, actual.input_tokens, actual.output_tokens
            ):
                raise _Refused
            alerts: list[Alert] = []
            for (budget, window), key, had in zip(hold.windows, keys, removed, strict=True):
                held = reserved if had else Amount()
                connection.execute(
                    SETTLE,
                    {
                        **key,
                        **used,
                        "held_cost": held.cost_micros,
                        "held_in": held.input_tokens,
                        "held_out": held.output_tokens,
                    },
                )
                if budget.thresholds:
                    alerts.extend(self._crossed(connection, budget, window, key))
            return Settled(tuple(alerts))

        try:
            return await self._run(work, write=True)
        except _Refused:
            return Settled(refused=True)

    def _crossed(
        self, connection: Connection, budget: Applicable, window: str, key: dict[str, str]
    ) -> list[Alert]:
        """Claim the thresholds of ``budget`` its window's usage has reached and no
        one claimed yet (the row is locked by this transaction's update)."""
        row = connection.execute(READ_WINDOW, key).one_or_none()
        if row is None:
            return []
        used, held = Amount(row[0], row[1], row[2]), Amount(row[3], row[4], row[5])
        share, cap = _fraction(budget.caps, used)
        alerts = []
        for percent in budget.thresholds:
            if percent <= row[6] or share * 100 < percent:
                continue
            claimed = connection.execute(CLAIM, {**key, "percent": percent})
            if _rowcount(claimed) == 1:
                alerts.append(Alert(budget, percent, cap, used, held, window))
        return alerts

    async def release(self, hold: Hold) -> None:
        """Give ``hold`` back unused (its call was never made)."""
        await self.settle(hold, Amount())

    async def charge_lost(
        self,
        run_ids: Sequence[str],
        record: LostRecord | None = None,
        *,
        created_before: dt.datetime | None = None,
    ) -> dict[str, Amount]:
        """Charge every hold of ``run_ids`` at what it reserved (their attempts died
        holding them: a call in flight may have been billed, and nothing will settle
        it), or only those made before ``created_before``; ``record`` adds each
        hold's charge to its run in the same transaction. Returns what each run was
        charged (runs without a hold are absent).

        Held moves to used, so used + held is unchanged: the budget errs toward its
        cap, never past it, and a step asked again reserves from what is left."""
        charged: dict[str, Amount] = {}
        for start in range(0, len(run_ids), _RELEASE_BATCH):
            batch = list(run_ids[start : start + _RELEASE_BATCH])

            def work(db: Session, batch: list[str] = batch) -> dict[str, Amount]:
                rows = db.execute(
                    select(
                        BudgetHoldRow.id,
                        BudgetHoldRow.workspace_id,
                        BudgetHoldRow.budget_id,
                        BudgetHoldRow.window,
                        BudgetHoldRow.run_id,
                        BudgetHoldRow.cost,
                        BudgetHoldRow.input_tokens,
                        BudgetHoldRow.output_tokens,
                    )
                    .where(
                        BudgetHoldRow.run_id.in_(batch),
                        *(
                            ()
                            if created_before is None
                            else (BudgetHoldRow.created_at < created_before,)
                        ),
                    )
                    # The settlements' lock order: by budget, then hold.
                    .order_by(BudgetHoldRow.budget_id, BudgetHoldRow.id)
                ).all()
                holds: dict[str, tuple[str, Amount]] = {}
                for hold_id, workspace_id, budget_id, window, run_id, cost, tokens_in, out in rows:
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
                    # Every budget's row of one hold holds the same amount: the run is
                    # charged it once.
                    holds[hold_id] = (run_id, Amount(cost, tokens_in, out))
                    db.execute(
                        update(BudgetWindowRow)
                        .where(
                            BudgetWindowRow.workspace_id == workspace_id,
                            BudgetWindowRow.budget_id == budget_id,
                            BudgetWindowRow.window == window,
                        )
                        .values(
                            cost_held=BudgetWindowRow.cost_held - cost,
                            input_held=BudgetWindowRow.input_held - tokens_in,
                            output_held=BudgetWindowRow.output_held - out,
                            cost_used=BudgetWindowRow.cost_used + cost,
                            input_used=BudgetWindowRow.input_used + tokens_in,
                            output_used=BudgetWindowRow.output_used + out,
                        )
                        .execution_options(synchronize_session=False)
                    )
                per_run: dict[str, Amount] = {}
                for run_id, amount in holds.values():
                    per_run[run_id] = per_run.get(run_id, Amount()) + amount
                if record is not None:
                    for run_id, amount in sorted(per_run.items()):
                        record(
                            db,
                            run_id,
                            amount.cost_micros,
                            amount.input_tokens,
                            amount.output_tokens,
                        )
                return per_run

            for run_id, amount in (await self._run(work, write=True)).items():
                charged[run_id] = charged.get(run_id, Amount()) + amount
        if charged:
            log.info(
                "budget holds of lost attempts charged at what they reserved",
                extra={"runs": len(charged)},
            )
        return charged

    async def room(self, budgets: Sequence[Applicable], run_id: str) -> dict[str, int]:
        """What is left in the current period of ``budgets`` for ``run_id``, per cap
        (``cost_micros``, ``input_tokens``, ``output_tokens``, ``total_tokens``):
        the least room over the budgets that cap it, never negative; a cap no
        budget sets is absent. Read, not held: a hop reserves it next."""
        at = self._clock()
        keyed = {(b.budget_id, self.window_of(b, run_id, at)): b for b in budgets}
        if not keyed:
            return {}
        statement = select(
            BudgetWindowRow.budget_id,
            BudgetWindowRow.window,
            BudgetWindowRow.cost_used + BudgetWindowRow.cost_held,
            BudgetWindowRow.input_used + BudgetWindowRow.input_held,
            BudgetWindowRow.output_used + BudgetWindowRow.output_held,
        ).where(
            BudgetWindowRow.workspace_id == budgets[0].workspace_id,
            BudgetWindowRow.budget_id.in_(sorted({budget_id for budget_id, _ in keyed})),
            BudgetWindowRow.window.in_(sorted({window for _, window in keyed})),
        )

        def work(db: Session) -> dict[tuple[str, str], Amount]:
            rows = db.execute(statement)
            return {(row[0], row[1]): Amount(row[2], row[3], row[4]) for row in rows}

        taken = await self._run(work, write=False)
        room: dict[str, int] = {}
        for key, budget in keyed.items():
            spent = taken.get(key, Amount())
            caps = budget.caps
            for name, cap, value in (
                ("cost_micros", caps.cost, spent.cost_micros),
                ("input_tokens", caps.input_tokens, spent.input_tokens),
                ("output_tokens", caps.output_tokens, spent.output_tokens),
                ("total_tokens", caps.total_tokens, spent.input_tokens + spent.output_tokens),
            ):
                if cap is not None:
                    left = max(0, cap - value)
                    room[name] = min(room.get(name, left), left)
        return room

    async def window(self, budget: Applicable, window: str) -> tuple[Amount, Amount] | None:
        """``(used, held)`` of one period of ``budget`` (None: nothing reserved in it yet)."""
        statement = select(
            BudgetWindowRow.cost_used,
            BudgetWindowRow.input_used,
            BudgetWindowRow.output_used,
            BudgetWindowRow.cost_held,
            BudgetWindowRow.input_held,
            BudgetWindowRow.output_held,
        ).where(
            BudgetWindowRow.workspace_id == budget.workspace_id,
            BudgetWindowRow.budget_id == budget.budget_id,
            BudgetWindowRow.window == window,
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
