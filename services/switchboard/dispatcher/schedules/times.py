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
from typing import Final, Literal
from zoneinfo import ZoneInfo

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter

from switchboard.platform.values.timefields import UTC_ZONE

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


@dataclass(frozen=True)
class _Field:
    """One position of a cron expression, as a refusal names it."""

    name: str
    low: int
    high: int
    #: Names it takes for its values (``jan``, ``sun``), lowercase, from ``low``.
    names: tuple[str, ...] = ()
    #: Whether ``?`` (any) is allowed here.
    question: bool = False


_MINUTE: Final = _Field("minute", 0, 59)
#: Positions of a five-field expression, and the seconds a sixth adds last.
_FIELDS: Final = (
    _MINUTE,
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31, question=True),
    _Field(
        "month",
        1,
        12,
        names=("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
    ),
    # croniter reads 7 as Sunday too.
    _Field(
        "day-of-week", 0, 7, names=("sun", "mon", "tue", "wed", "thu", "fri", "sat"), question=True
    ),
)
_SECOND: Final = _Field("second", 0, 59)
_ORDINALS: Final = ("1st", "2nd", "3rd", "4th", "5th", "6th")


def _parsed(expression: str) -> Literal["fires", "never", "refused"]:
    """What croniter makes of ``expression``: a cron that fires, one it takes that never
    matches a date, or one it refuses."""
    try:
        croniter(expression, dt.datetime(2000, 1, 1)).get_next(dt.datetime)
    except CroniterBadDateError:
        return "never"
    except (CroniterBadCronError, CroniterError, ValueError, KeyError, IndexError, TypeError):
        return "refused"
    except OverflowError:
        return "refused"
    return "fires"


def _value_problem(field: _Field, value: str) -> str:
    """Why ``value`` (one end of a range) is not a value of ``field`` ("" if it is)."""
    if value.isdigit():
        number = int(value)
        if not field.low <= number <= field.high:
            return f"'{value}' is out of range {field.low}-{field.high}"
        return ""
    if value.lower() in field.names:
        return ""
    if value.startswith("-") and value[1:].isdigit():
        return f"'{value}' is negative: values are {field.low}-{field.high}"
    named = f" or a name ({field.names[0]}-{field.names[-1]})" if field.names else ""
    return f"'{value}' is not a number ({field.low}-{field.high}){named}"


def _token_problem(field: _Field, token: str) -> str:
    """Why croniter refuses ``token`` in ``field``, said as far as the common forms go:
    ``*``, ``?``, values, ranges ``a-b``, steps ``/n``, ``n#k`` and lists of them."""
    for item in token.split(","):
        problem = _item_problem(field, item, token)
        if problem:
            return problem
    # A form past the common ones (L, W, H) that croniter does not take here.
    return f"'{token}' is not a valid {field.name} value"


def _item_problem(field: _Field, item: str, token: str) -> str:
    """Why one list item of ``token`` is refused ("" if nothing said here is wrong)."""
    if not item:
        return f"'{token}' has an empty list item"
    base, slash, step = item.partition("/")
    if slash:
        if "/" in step:
            return f"'{item}' has more than one step"
        if not step.isdigit() or int(step) < 1:
            return f"step '{step}' in '{item}' must be a whole number of at least 1"
    if base == "*":
        return ""
    if base == "?":
        if field.question:
            return ""
        return "'?' is allowed only in the day-of-month and day-of-week fields"
    if "#" in base and field.name == "day-of-week":
        return _nth_problem(field, base, token)
    ends = base.split("-")
    if len(ends) > 2 and not base.startswith("-"):
        return f"'{base}' is not a range: a range is low-high"
    if len(ends) == 2 and ends[0] and ends[1]:
        return _value_problem(field, ends[0]) or _value_problem(field, ends[1])
    return _value_problem(field, base)


def _nth_problem(field: _Field, base: str, token: str) -> str:
    """Why ``base``, a day of week's ``n#k`` (the kth such weekday), is refused."""
    weekday, _, nth = base.partition("#")
    problem = _value_problem(field, weekday)
    if problem:
        return problem
    if not nth.isdigit() or not 1 <= int(nth) <= 5:
        return f"'{nth}' in '{base}' must be 1-5 (the nth such weekday of the month)"
    if "," in token:
        return f"'{token}' mixes an nth weekday (#) with other values"
    return ""


def _ordinal(position: int) -> str:
    return _ORDINALS[position - 1] if position <= len(_ORDINALS) else f"{position}th"


def cron_problem(expression: str) -> str:
    """Why ``expression`` is not a cron expression we fire on ("" if it is one): which
    field (by name and position) and why, where one field alone is the cause."""
    if len(expression) > MAX_CRON:
        return f"is longer than {MAX_CRON} characters"
    fields = expression.split()
    if len(fields) not in CRON_FIELDS:
        return (
            "must have five fields (minute hour day-of-month month day-of-week) or six "
            f"(with seconds last); it has {len(fields)}"
        )
    kinds = (*_FIELDS, _SECOND)[: len(fields)]
    # Parsed once: a date never matched is found only after croniter's whole search.
    parsed = _parsed(" ".join(fields))
    if parsed == "refused":
        for position, (kind, token) in enumerate(zip(kinds, fields, strict=True), start=1):
            alone = ["*"] * len(fields)
            alone[position - 1] = token
            if _parsed(" ".join(alone)) == "refused":
                return (
                    f"the {kind.name} field ({_ordinal(position)} of {len(fields)}) "
                    f"{_token_problem(kind, token)}"
                )
        return "does not parse as a cron expression (its fields do not go together)"
    if parsed == "never":
        day, month, weekday = fields[2], fields[3], fields[4]
        if weekday in ("*", "?"):
            return (
                f"never matches a date: no month of the month field '{month}' has the "
                f"day-of-month '{day}'"
            )
        return "never matches a date"
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
