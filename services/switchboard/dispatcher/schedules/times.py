"""When a schedule fires: a cron expression read in a time zone, or a fixed interval.

Pure: no I/O and no clock (every function takes the instant it reasons from).

Cron expressions are parsed and walked by croniter, over the **wall clock** of
the schedule's zone (naive local times); each wall time is then made an instant
here, not by croniter, because croniter's own handling of a zone fires a wall
time that happens twice (the fall-back day) twice. The rules:

* a wall time that happens twice (02:30 on the fall-back day) fires once, at
  its first occurrence;
* a wall time that does not exist (02:30 on the spring-forward day) fires once,
  at the first instant after the gap (03:00 local where clocks jump from 02:00
  to 03:00); several such wall times in one gap (``*/15``) are that one tick;
* instants only move forward: a wall time whose instant is not after the last
  tick is passed by (the repeated hour's second pass fires nothing).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final
from zoneinfo import ZoneInfo

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter

from switchboard.platform.timefields import UTC_ZONE

#: Characters of a cron expression.
MAX_CRON: Final = 200
#: Cron fields: minute, hour, day of month, month, day of week; and seconds last.
CRON_FIELDS: Final = (5, 6)
#: Wall times looked at to find one tick (a cron that matches no date in years ends here).
_MAX_STEPS: Final = 10_000
_UTC: Final = dt.UTC
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: The resolution of ticks: one before another is at least this much before it.
_TICK: Final = dt.timedelta(microseconds=1)


def cron_problem(expression: str) -> str:
    """Why ``expression`` is not a cron expression we fire on ("" if it is one)."""
    if len(expression) > MAX_CRON:
        return f"is longer than {MAX_CRON} characters"
    fields = expression.split()
    if len(fields) not in CRON_FIELDS:
        return (
            "must have five fields (minute hour day-of-month month day-of-week) or six "
            f"(with seconds last); it has {len(fields)}"
        )
    try:
        walk = croniter(" ".join(fields), dt.datetime(2000, 1, 1))
        walk.get_next(dt.datetime)
    except CroniterBadDateError:
        return "never matches a date"
    except (CroniterBadCronError, CroniterError, ValueError, KeyError, IndexError, TypeError):
        return "does not parse as a cron expression"
    except OverflowError:
        return "does not parse as a cron expression (a value is out of range)"
    return ""


def to_us(instant: dt.datetime) -> int:
    """Microseconds since the epoch (how ticks are stored and keyed)."""
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(micros: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=micros)


def _instant(wall: dt.datetime, tz: ZoneInfo) -> dt.datetime:
    """The instant a wall time of ``tz`` fires at (the rules in the module's docstring)."""
    first = wall.replace(tzinfo=tz, fold=0)
    if first.astimezone(_UTC).astimezone(tz).replace(tzinfo=None) == wall:
        return first.astimezone(_UTC)  # it exists; fold 0 is its first occurrence
    # In a gap: fold 0 reads it with the offset before the jump, fold 1 with the one
    # after, so the jump lies between the two instants. Find it to the second.
    low = wall.replace(tzinfo=tz, fold=1).astimezone(_UTC)
    high = first.astimezone(_UTC)
    after = high.astimezone(tz).utcoffset()
    lo, hi = to_us(low) // 1_000_000, to_us(high) // 1_000_000
    while lo < hi:
        middle = (lo + hi) // 2
        if from_us(middle * 1_000_000).astimezone(tz).utcoffset() == after:
            hi = middle
        else:
            lo = middle + 1
    return from_us(hi * 1_000_000)


@dataclass(frozen=True)
class Cadence:
    """A schedule's ticks: ``cron`` read in ``tz``, or every ``interval`` (one is set)."""

    cron: str = ""
    tz: ZoneInfo = UTC_ZONE
    interval: dt.timedelta | None = None

    def after(self, instant: dt.datetime) -> dt.datetime | None:
        """The first tick strictly after ``instant`` (None if the cron matches no date)."""
        if self.interval is not None:
            return instant + self.interval
        return next(self._cron_after(instant), None)

    def upcoming(self, tick: dt.datetime, count: int) -> list[dt.datetime]:
        """``tick`` and the ticks after it, ``count`` in all."""
        found = [tick]
        while len(found) < count:
            following = self.after(found[-1])
            if following is None:
                break
            found.append(following)
        return found

    def missed(
        self, first: dt.datetime, now: dt.datetime, keep: int
    ) -> tuple[list[dt.datetime], bool]:
        """The ticks from ``first`` (a tick) to ``now``, at most the latest ``keep`` of
        them, oldest first; and whether there were more than ``keep``."""
        if self.interval is not None:
            step = self.interval
            count = (now - first) // step + 1
            last = first + step * (count - 1)
            kept = [last - step * i for i in range(min(count, keep))]
            return list(reversed(kept)), count > keep
        # Walked back from now, so a schedule stopped for long (a cron every second,
        # a day down) costs ``keep`` steps, not one per tick missed.
        latest = self._latest(now)
        if latest is None or latest < first:
            return [first], False
        ticks = [latest]
        earlier = self._latest(latest - _TICK)
        while earlier is not None and earlier >= first and len(ticks) < keep:
            ticks.insert(0, earlier)
            earlier = self._latest(earlier - _TICK)
        return ticks, earlier is not None and earlier >= first

    def _latest(self, now: dt.datetime) -> dt.datetime | None:
        """The latest cron tick at or before ``now``."""
        wall = now.astimezone(self.tz).replace(tzinfo=None, fold=0) + dt.timedelta(seconds=1)
        walk = croniter(self.cron, wall)
        for _ in range(_MAX_STEPS):
            try:
                candidate = walk.get_prev(dt.datetime)
            except CroniterBadDateError:
                return None
            instant = _instant(candidate, self.tz)
            if instant <= now:
                return instant
        return None

    def _cron_after(self, instant: dt.datetime) -> Iterator[dt.datetime]:
        # fold=0: croniter reads a naive time; the second pass of a repeated hour is
        # told apart by the instants, below.
        wall = instant.astimezone(self.tz).replace(tzinfo=None, fold=0)
        walk = croniter(self.cron, wall)
        for _ in range(_MAX_STEPS):
            try:
                candidate = walk.get_next(dt.datetime)
            except CroniterBadDateError:
                return
            fires = _instant(candidate, self.tz)
            if fires > instant:
                yield fires
                return
