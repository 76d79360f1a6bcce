"""What a refused cron expression says (issue 67): the field by name and position, and
why, for each form a person may get wrong; the expression whole when no one field is
the cause."""

from __future__ import annotations

import pytest

from switchboard.dispatcher.schedules.times import cron_problem

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("0 25 * * *", "the hour field (2nd of 5) '25' is out of range 0-23"),
        ("61 * * * *", "the minute field (1st of 5) '61' is out of range 0-59"),
        ("0 0 0 * *", "the day-of-month field (3rd of 5) '0' is out of range 1-31"),
        ("0 0 * 13 *", "the month field (4th of 5) '13' is out of range 1-12"),
        ("0 0 * * 8", "the day-of-week field (5th of 5) '8' is out of range 0-7"),
        ("* * * * * 61", "the second field (6th of 6) '61' is out of range 0-59"),
        ("1-70 * * * *", "the minute field (1st of 5) '70' is out of range 0-59"),
        ("0 1,,2 * * *", "the hour field (2nd of 5) '1,,2' has an empty list item"),
        ("-1 * * * *", "the minute field (1st of 5) '-1' is negative: values are 0-59"),
        (
            "*/0 * * * *",
            "the minute field (1st of 5) step '0' in '*/0' must be a whole number of at least 1",
        ),
        ("0 0 * jan-foo *", "the month field (4th of 5) 'foo' is not a number (1-12) or a name"),
        (
            "? * * * *",
            "the minute field (1st of 5) '?' is allowed only in the day-of-month and "
            "day-of-week fields",
        ),
        ("0 0 * * 1#6", "the day-of-week field (5th of 5) '6' in '1#6' must be 1-5"),
        ("0 0 * * 1#2,3", "the day-of-week field (5th of 5) '1#2,3' mixes an nth weekday"),
        (
            "0 0 30 2 *",
            "never matches a date: no month of the month field '2' has the day-of-month '30'",
        ),
    ],
)
def test_a_bad_field_is_named_with_its_position_and_why(expression: str, problem: str) -> None:
    assert cron_problem(expression).startswith(problem), cron_problem(expression)


@pytest.mark.parametrize(
    "expression",
    ["0 8 * * 1-5", "*/15 2 * * *", "0 0 L * *", "0 9 * * mon#1", "0 0 ? * sun", "5-2 * * * *"],
)
def test_what_croniter_takes_is_taken(expression: str) -> None:
    assert cron_problem(expression) == ""
