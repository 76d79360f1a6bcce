"""A budget's periods: which one an instant falls in, and when it began and ends.

A period is named by its window key, the ``window`` column of
``budget_windows``: ``total``, ``d:2026-11-26``, ``w:2026-11-23`` (the week's
Monday), ``m:2026-11``, or ``r:{run}`` for a per-run budget. Days, weeks and
months begin at midnight in the budget's time zone (``zoneinfo``), so a
budget in ``Asia/Tokyo`` resets at 15:00 UTC. Pure: no I/O.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final
from zoneinfo import ZoneInfo

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.values.timefields import zone

UTC: Final = dt.UTC
TOTAL: Final = "total"


@dataclass(frozen=True)
class Period:
    """One period of a budget: its window key and its bounds (None for unbounded)."""

    window: str
    start: dt.datetime | None
    end: dt.datetime | None


def period_of(
    period: pb.BudgetPeriod.ValueType, time_zone: str, at: dt.datetime, run_id: str = ""
) -> Period:
    """The period of a budget with ``period`` in ``time_zone`` that ``at`` (aware) is in.

    A per-run budget's period is the run (``run_id``); ``ValueError`` for an
    unknown period or time zone (validation refuses both before they are stored).
    """
    if period == pb.BUDGET_PERIOD_TOTAL:
        return Period(TOTAL, None, None)
    if period == pb.BUDGET_PERIOD_RUN:
        return Period(f"r:{run_id}", None, None)
    tz = zone(time_zone)
    if tz is None:
        raise ValueError(f"unknown time zone {time_zone!r}")
    local = at.astimezone(tz)
    day = local.date()
    if period == pb.BUDGET_PERIOD_DAY:
        first, following, key = day, day + dt.timedelta(days=1), f"d:{day.isoformat()}"
    elif period == pb.BUDGET_PERIOD_WEEK:
        first = day - dt.timedelta(days=day.weekday())
        following, key = first + dt.timedelta(days=7), f"w:{first.isoformat()}"
    elif period == pb.BUDGET_PERIOD_MONTH:
        first = day.replace(day=1)
        following = (first + dt.timedelta(days=32)).replace(day=1)
        key = f"m:{first.year:04d}-{first.month:02d}"
    else:
        raise ValueError(f"unknown budget period {period}")
    return Period(key, _midnight(first, tz), _midnight(following, tz))


def _midnight(day: dt.date, tz: ZoneInfo) -> dt.datetime:
    """The first instant of ``day`` in ``tz``, in UTC (a day that begins in a DST
    gap begins at the first valid instant after midnight)."""
    local = dt.datetime.combine(day, dt.time(), tzinfo=tz)
    # Round-trip through UTC resolves a nonexistent local midnight forward.
    return local.astimezone(UTC)
