"""When schedules fire (``dispatcher/schedules/times.py``): cron on a zone's wall clock with
the DST days made explicit, intervals, missed ticks, and what is refused."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from switchboard.dispatcher.schedules.times import Cadence, cron_problem, from_us, to_us
from switchboard.platform.values.timefields import zone

pytestmark = pytest.mark.unit

BERLIN = ZoneInfo("Europe/Berlin")


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).astimezone(dt.UTC)


def walk(cadence: Cadence, start: str, count: int) -> list[str]:
    found, at = [], utc(start)
    for _ in range(count):
        following = cadence.after(at)
        assert following is not None
        found.append(following.astimezone(cadence.tz).isoformat())
        at = following
    return found


def test_a_0230_schedule_fires_once_at_0300_on_the_spring_forward_day() -> None:
    daily = Cadence(cron="30 2 * * *", tz=BERLIN)
    assert walk(daily, "2027-03-27T12:00:00+00:00", 3) == [
        "2027-03-28T03:00:00+02:00",
        "2027-03-29T02:30:00+02:00",
        "2027-03-30T02:30:00+02:00",
    ]


def test_a_0230_schedule_fires_once_on_the_fall_back_day() -> None:
    daily = Cadence(cron="30 2 * * *", tz=BERLIN)
    assert walk(daily, "2027-10-30T12:00:00+00:00", 3) == [
        "2027-10-31T02:30:00+02:00",
        "2027-11-01T02:30:00+01:00",
        "2027-11-02T02:30:00+01:00",
    ]
    # Asked from inside the repeated hour's second pass: nothing more that day.
    assert walk(daily, "2027-10-31T01:10:00+00:00", 1) == ["2027-11-01T02:30:00+01:00"]


def test_every_quarter_hour_across_both_dst_days() -> None:
    quarter = Cadence(cron="*/15 * * * *", tz=BERLIN)
    # The gap's four wall times are one tick, at 03:00.
    assert walk(quarter, "2027-03-28T00:40:00+00:00", 3) == [
        "2027-03-28T01:45:00+01:00",
        "2027-03-28T03:00:00+02:00",
        "2027-03-28T03:15:00+02:00",
    ]
    # Each wall time of the repeated hour fires at its first occurrence only.
    assert walk(quarter, "2027-10-31T00:40:00+00:00", 3) == [
        "2027-10-31T02:45:00+02:00",
        "2027-10-31T03:00:00+01:00",
        "2027-10-31T03:15:00+01:00",
    ]


def test_seconds_as_the_sixth_field_and_intervals() -> None:
    assert walk(Cadence(cron="* * * * * */20"), "2027-01-01T00:00:05+00:00", 2) == [
        "2027-01-01T00:00:20+00:00",
        "2027-01-01T00:00:40+00:00",
    ]
    every = Cadence(interval=dt.timedelta(seconds=90))
    assert every.upcoming(utc("2027-03-28T00:59:00+00:00"), 3) == [
        utc("2027-03-28T00:59:00+00:00"),
        utc("2027-03-28T01:00:30+00:00"),
        utc("2027-03-28T01:02:00+00:00"),
    ]


def test_missed_ticks_are_the_latest_few() -> None:
    quarter = Cadence(cron="*/15 * * * *")
    ticks, more = quarter.missed(
        utc("2027-01-01T00:00:00+00:00"), utc("2027-01-02T00:07:00+00:00"), 3
    )
    assert ticks == [utc(f"2027-01-01T23:{m}:00+00:00") for m in ("30", "45")] + [
        utc("2027-01-02T00:00:00+00:00")
    ]
    assert more
    every = Cadence(interval=dt.timedelta(seconds=10))
    ticks, more = every.missed(
        utc("2027-01-01T00:00:00+00:00"), utc("2027-01-01T00:00:25+00:00"), 5
    )
    assert ticks == [utc(f"2027-01-01T00:00:{s:02d}+00:00") for s in (0, 10, 20)]
    assert not more


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("* * * *", "must have five fields"),
        ("* * * * * * *", "must have five fields"),
        ("61 * * * *", "the minute field (1st of 5) '61' is out of range 0-59"),
        ("0 0 30 2 *", "never matches a date"),
        ("x" * 201, "is longer than 200"),
    ],
)
def test_bad_cron_expressions_say_why(expression: str, problem: str) -> None:
    assert problem in cron_problem(expression)


def test_good_cron_expressions_and_zones() -> None:
    assert cron_problem("0 8 * * 1-5") == ""
    assert cron_problem("*/5 * * * * 30") == ""
    assert zone("") is not None
    assert zone("America/New_York") is not None
    for bad in (
        "Mars/Olympus",
        "../etc/passwd",
        "/etc/localtime",
        "Europe/../UTC",
        "Europe",
        "\x00",
    ):
        assert zone(bad) is None
    instant = utc("2027-03-28T01:00:00.123456+00:00")
    assert from_us(to_us(instant)) == instant
