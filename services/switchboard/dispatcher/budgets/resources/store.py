"""The budgets table, the read of their windows, and the usage sums over runs: SQL only.

A budget is stored as its serialized ``Budget`` (``data``, without its usage;
built and read by ``catalog.py``) beside the columns that find the budgets of a
run: ``scope_kind`` and ``scope_id``. The ledger (the run side) writes the
windows; this module only reads them to show a budget's usage. No ORM row
leaves this module and nothing here builds a resource name or raises a
request-field error: the domain does both. Writes stage their BUDGET_CHANGED
events (``platform/store/outbox.py``) in the same transaction. What every
workspace's keyed records share (the key, the quota, etags, pages) is
``platform/store/keyed.py``'s.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import BigInteger, String, and_, case, cast, func, literal, or_, select, union_all
from sqlalchemy.orm import Session

from switchboard.platform.store.db import Database
from switchboard.platform.store.keyed import BY_ID, Created, KeyedStore, Table
from switchboard.platform.store.models import BudgetRow, BudgetWindowRow, CallRow, RunRow
from switchboard.platform.store.outbox import Staged
from switchboard.platform.store.storage import Idempotency, transaction
from switchboard.platform.values.names import now

log = logging.getLogger("switchboard.dispatcher.budgets.resources.store")

#: ``scope_kind`` of each kind of scope. ``scope_id`` is "" for the workspace, the
#: assistant's id, or the API key's id (the last segment of ``users/{u}/apiKeys/{k}``:
#: key ids are unique, and ``runs.api_key_id`` holds the same id, so the ledger finds
#: the budgets of a run by equality on both columns).
WORKSPACE: Final = "workspace"
ASSISTANT: Final = "assistant"
API_KEY: Final = "api_key"


@dataclass(frozen=True)
class BudgetRecord:
    """One budget as stored; ``data`` is the serialized ``Budget`` (without usage)."""

    workspace_id: str
    id: str
    scope_kind: str
    scope_id: str
    data: bytes
    creator: str
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int


@dataclass(frozen=True)
class Window:
    """What one period of a budget used (settled) and holds (reserved)."""

    cost_used: int = 0
    cost_held: int = 0
    input_used: int = 0
    input_held: int = 0
    output_used: int = 0
    output_held: int = 0


@dataclass(frozen=True)
class NewBudget:
    """What ``BudgetStore.create`` inserts."""

    workspace_id: str
    id: str
    scope_kind: str
    scope_id: str
    data: bytes
    creator: str


def _record(row: BudgetRow) -> BudgetRecord:
    return BudgetRecord(
        workspace_id=row.workspace_id,
        id=row.id,
        scope_kind=row.scope_kind,
        scope_id=row.scope_id,
        data=row.data,
        creator=row.creator,
        created_at=row.created_at,
        updated_at=row.updated_at,
        version=row.version,
    )


#: A budget's windows (and their holds) go with it.
BUDGETS: Final = Table(
    BudgetRow,
    _record,
    noun="budget",
    plural="budgets",
    order=BY_ID,
    dependents=((BudgetWindowRow, "budget_id"),),
)


class BudgetStore(KeyedStore[BudgetRow, BudgetRecord, str]):
    table = BUDGETS

    async def create(
        self,
        record: NewBudget,
        *,
        idempotency: Idempotency | None,
        max_per_workspace: int,
        staged: Staged[Created[BudgetRecord]] | None,
    ) -> Created[BudgetRecord]:
        """Insert ``record``, created and changed now, at version 1 (``_create``)."""

        def row() -> BudgetRow:
            stamp = now()
            return BudgetRow(
                workspace_id=record.workspace_id,
                id=record.id,
                scope_kind=record.scope_kind,
                scope_id=record.scope_id,
                data=record.data,
                creator=record.creator,
                created_at=stamp,
                updated_at=stamp,
                version=1,
            )

        return await self._create(
            record.workspace_id, record.id, row, idempotency, max_per_workspace, staged
        )

    async def update(
        self,
        workspace_id: str,
        budget_id: str,
        etag: str,
        edit: Callable[[bytes], bytes],
        staged: Staged[BudgetRecord | None] | None,
    ) -> BudgetRecord | None:
        """Replace ``data`` with ``edit(data)`` on the locked row (``edit`` may raise to
        refuse the result: nothing is written) and bump the version; None if missing."""

        def change(db: Session, row: BudgetRow) -> BudgetRecord:
            row.data = edit(row.data)
            return self._bumped(db, row)

        return await self._update(workspace_id, budget_id, etag, change, staged)

    async def windows(
        self, workspace_id: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Window]:
        """The stored windows of ``keys`` ((budget id, window key) pairs) in one read;
        a period nothing was reserved in yet has no row (and is not in the answer)."""
        if not keys:
            return {}
        wanted = set(keys)

        def tx(db: Session) -> dict[tuple[str, str], Window]:
            rows = db.execute(
                select(BudgetWindowRow).where(
                    BudgetWindowRow.workspace_id == workspace_id,
                    or_(
                        *(
                            and_(
                                BudgetWindowRow.budget_id == budget_id,
                                BudgetWindowRow.window == window,
                            )
                            for budget_id, window in wanted
                        )
                    ),
                )
            ).scalars()
            return {
                (row.budget_id, row.window): Window(
                    cost_used=row.cost_used,
                    cost_held=row.cost_held,
                    input_used=row.input_used,
                    input_held=row.input_held,
                    output_used=row.output_used,
                    output_held=row.output_held,
                )
                for row in rows
            }

        return await self._run(tx, write=False)


# -- usage ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageQuery:
    """Which ended runs (and calls) of a workspace to sum, and how to group them."""

    workspace_id: str
    #: Of "day", "assistant", "api_key" and "model", in the order the rows are sorted by.
    group_by: Sequence[str]
    #: ``usage_day`` from ``first_day`` to ``last_day`` (inclusive), ``YYYY-MM-DD``.
    first_day: str
    last_day: str
    assistant_id: str | None = None
    #: (user id, key id) of ``users/{u}/apiKeys/{k}``.
    api_key: tuple[str, str] | None = None
    model: str | None = None


@dataclass(frozen=True)
class UsageSum:
    #: The group's values, by dimension (only those grouped by).
    keys: dict[str, str]
    #: The user whose API key the group's ``api_key`` is (grouped by API key).
    key_user: str
    run_count: int
    input_tokens: int
    output_tokens: int
    cost_micros: int
    #: Runs with a model call made with ``max_tokens`` lowered to fit a budget.
    budget_lowered_runs: int = 0
    #: Runs with a model call the price table has no price for.
    unpriced_runs: int = 0
    #: Phone calls that ended, and how long they were answered.
    call_count: int = 0
    call_seconds: int = 0


class UsageStore:
    """Sums over the usage columns every run's end stores (``runs/core/store.py``), and
    the calls that ended (``talk/phone/store.py``: a call counts where a run of its
    assistant on its day would, never under an API key or a model)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def sums(self, query: UsageQuery, offset: int, limit: int) -> list[UsageSum]:
        """Rows ``offset`` to ``offset + limit`` of the grouped sums, ordered by the groups."""
        zero, none = literal(0, BigInteger), literal("", String)
        runs = select(
            RunRow.usage_day.label("day"),
            RunRow.assistant_id.label("assistant"),
            RunRow.api_key_id.label("api_key"),
            RunRow.model.label("model"),
            # A key is one user's: the run's creator names it (runs store the key's id).
            RunRow.creator.label("key_user"),
            literal(1, BigInteger).label("runs"),
            RunRow.input_tokens.label("input_tokens"),
            RunRow.output_tokens.label("output_tokens"),
            RunRow.cost_micros.label("cost_micros"),
            case((RunRow.budget_lowered_calls > 0, 1), else_=0).label("lowered"),
            case((RunRow.unpriced_calls > 0, 1), else_=0).label("unpriced"),
            zero.label("calls"),
            zero.label("call_seconds"),
        ).where(
            RunRow.workspace_id == query.workspace_id,
            # Ended runs only: an active run's day is "" and sorts before every date.
            RunRow.usage_day >= query.first_day,
            RunRow.usage_day <= query.last_day,
        )
        if query.assistant_id is not None:
            runs = runs.where(RunRow.assistant_id == query.assistant_id)
        if query.api_key is not None:
            user_id, key_id = query.api_key
            runs = runs.where(RunRow.api_key_id == key_id, RunRow.creator == user_id)
        if query.model is not None:
            runs = runs.where(RunRow.model == query.model)
        parts = [runs]
        if query.api_key is None and query.model is None:
            calls = select(
                CallRow.usage_day,
                CallRow.assistant_id,
                none,
                none,
                none,
                zero,
                zero,
                zero,
                zero,
                zero,
                zero,
                literal(1, BigInteger),
                cast(CallRow.seconds, BigInteger),
            ).where(
                CallRow.workspace_id == query.workspace_id,
                # Ended calls only, as for runs.
                CallRow.usage_day >= query.first_day,
                CallRow.usage_day <= query.last_day,
            )
            if query.assistant_id is not None:
                calls = calls.where(CallRow.assistant_id == query.assistant_id)
            parts.append(calls)
        both = union_all(*parts).subquery()
        columns = [both.c[d] for d in query.group_by]
        if "api_key" in query.group_by:
            columns.append(func.max(both.c.key_user).label("key_user"))

        def total(column: str) -> Any:
            return func.coalesce(func.sum(both.c[column]), 0)

        def tx(db: Session) -> list[UsageSum]:
            statement = select(
                *columns,
                total("runs").label("run_count"),
                total("input_tokens").label("input_tokens"),
                total("output_tokens").label("output_tokens"),
                total("cost_micros").label("cost_micros"),
                total("lowered").label("budget_lowered_runs"),
                total("unpriced").label("unpriced_runs"),
                total("calls").label("call_count"),
                total("call_seconds").label("call_seconds"),
            )
            if query.group_by:
                plain = [both.c[d] for d in query.group_by]
                statement = statement.group_by(*plain).order_by(*plain)
            statement = statement.offset(offset).limit(limit)
            return [
                UsageSum(
                    keys={d: str(getattr(row, d)) for d in query.group_by},
                    key_user=str(row.key_user) if "api_key" in query.group_by else "",
                    run_count=int(row.run_count),
                    input_tokens=int(row.input_tokens),
                    output_tokens=int(row.output_tokens),
                    cost_micros=int(row.cost_micros),
                    budget_lowered_runs=int(row.budget_lowered_runs),
                    unpriced_runs=int(row.unpriced_runs),
                    call_count=int(row.call_count),
                    call_seconds=int(row.call_seconds),
                )
                for row in db.execute(statement)
                # Ungrouped, no runs still make one row of zeros: no group, no row.
                if row.run_count or row.call_count
            ]

        return await transaction(self._database, tx, write=False, log=log)
