"""The ledger's statements (``ledger.py``), built once.

A reservation is on every model call's path, and the admission's read of the
windows on every budgeted message's: Core statements built once (the
conditional UPDATE once per combination of caps), not per call. Building and
keying a statement costs several times what SQLite takes to run it. A window is
keyed by the bind parameters ``ws``, ``budget`` and ``win``; the ledger passes
the values.
"""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import and_, bindparam, delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from switchboard.platform.store.models import (
    BudgetHoldRow,
    BudgetRow,
    BudgetWindowRow,
    table_of,
)

#: Budgets one run can have apply (a workspace has at most this many, the crud's limit is lower).
MAX_APPLICABLE: Final = 100

#: Which caps a budget sets: cost, input tokens, output tokens, total tokens.
Shape = tuple[bool, bool, bool, bool]
#: No cap at all: an owner's overdraft holds whatever the caps say.
UNCAPPED: Final[Shape] = (False, False, False, False)

_WINDOWS: Final = table_of(BudgetWindowRow)
_HOLDS: Final = table_of(BudgetHoldRow)
_BUDGETS: Final = table_of(BudgetRow)
_WC = _WINDOWS.c
_KEY: Final = (
    _WC.workspace_id == bindparam("ws"),
    _WC.budget_id == bindparam("budget"),
    _WC.window == bindparam("win"),
)
_NEW_WINDOW: Final = {
    "workspace_id": bindparam("ws"),
    "budget_id": bindparam("budget"),
    "window": bindparam("win"),
    "cost_used": 0,
    "cost_held": 0,
    "input_used": 0,
    "input_held": 0,
    "output_used": 0,
    "output_held": 0,
    "alerted": 0,
    "created_at": bindparam("at"),
}
OPEN_WINDOW: Final = {
    "sqlite": sqlite_insert(_WINDOWS).values(_NEW_WINDOW).on_conflict_do_nothing(),
    "postgresql": pg_insert(_WINDOWS).values(_NEW_WINDOW).on_conflict_do_nothing(),
}
INSERT_HOLD: Final = _HOLDS.insert()
_HOLD_KEY: Final = (
    _HOLDS.c.id == bindparam("hold"),
    _HOLDS.c.workspace_id == bindparam("ws"),
    _HOLDS.c.budget_id == bindparam("budget"),
)
DELETE_HOLD: Final = delete(_HOLDS).where(*_HOLD_KEY)
SETTLE: Final = (
    update(_WINDOWS)
    .where(*_KEY)
    .values(
        cost_held=_WC.cost_held - bindparam("held_cost"),
        input_held=_WC.input_held - bindparam("held_in"),
        output_held=_WC.output_held - bindparam("held_out"),
        cost_used=_WC.cost_used + bindparam("used_cost"),
        input_used=_WC.input_used + bindparam("used_in"),
        output_used=_WC.output_used + bindparam("used_out"),
    )
)
READ_WINDOW: Final = select(
    _WC.cost_used,
    _WC.input_used,
    _WC.output_used,
    _WC.cost_held,
    _WC.input_held,
    _WC.output_held,
    _WC.alerted,
).where(*_KEY)
#: The current windows of a message's budgets, read at its admission.
WINDOWS_OF: Final = select(
    _WC.budget_id,
    _WC.window,
    _WC.cost_used,
    _WC.cost_held,
    _WC.input_used,
    _WC.input_held,
    _WC.output_used,
    _WC.output_held,
).where(
    _WC.workspace_id == bindparam("ws"),
    _WC.budget_id.in_(bindparam("budgets", expanding=True)),
    _WC.window.in_(bindparam("windows", expanding=True)),
)
CLAIM: Final = (
    update(_WINDOWS)
    .where(*_KEY, _WC.alerted < bindparam("percent"))
    .values(alerted=bindparam("percent"))
)
# Every kind of scope in one statement: no budget has an assistant or key scope with an
# empty id, so "" (no assistant, no key) matches none of those.
APPLICABLE: Final = (
    select(_BUDGETS.c.id, _BUDGETS.c.data)
    .where(
        _BUDGETS.c.workspace_id == bindparam("ws"),
        or_(
            _BUDGETS.c.scope_kind == "workspace",
            and_(
                _BUDGETS.c.scope_kind == "assistant",
                _BUDGETS.c.scope_id.in_(bindparam("assistants", expanding=True)),
            ),
            and_(_BUDGETS.c.scope_kind == "api_key", _BUDGETS.c.scope_id == bindparam("key")),
        ),
    )
    .order_by(_BUDGETS.c.id)
    .limit(MAX_APPLICABLE)
)
_RESERVES: dict[Shape, Any] = {}


def reserving(shape: Shape) -> Any:
    """The conditional UPDATE that holds an ask if it fits the caps ``shape`` says a
    budget sets (``UNCAPPED``: whatever they say)."""
    statement = _RESERVES.get(shape)
    if statement is None:
        has_cost, has_in, has_out, has_total = shape
        conditions: list[Any] = []
        if has_cost:
            conditions.append(
                _WC.cost_used + _WC.cost_held + bindparam("ask_cost") <= bindparam("cap_cost")
            )
        if has_in:
            conditions.append(
                _WC.input_used + _WC.input_held + bindparam("ask_in") <= bindparam("cap_in")
            )
        if has_out:
            conditions.append(
                _WC.output_used + _WC.output_held + bindparam("ask_out") <= bindparam("cap_out")
            )
        if has_total:
            conditions.append(
                _WC.input_used
                + _WC.input_held
                + _WC.output_used
                + _WC.output_held
                + bindparam("ask_in")
                + bindparam("ask_out")
                <= bindparam("cap_total")
            )
        statement = _RESERVES[shape] = (
            update(_WINDOWS)
            .where(*_KEY, *conditions)
            .values(
                cost_held=_WC.cost_held + bindparam("ask_cost"),
                input_held=_WC.input_held + bindparam("ask_in"),
                output_held=_WC.output_held + bindparam("ask_out"),
            )
        )
    return statement
