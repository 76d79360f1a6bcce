"""Background work whose failures are always heard (platform/background.py)."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from switchboard.platform import background
from switchboard.platform.background import FailureNotes

pytestmark = pytest.mark.unit

log = logging.getLogger("tests.background")


async def test_a_spawned_task_that_fails_is_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    kept: set[asyncio.Task[object]] = set()

    async def broken() -> None:
        raise RecursionError("maximum recursion depth exceeded")

    task = background.spawn(broken(), name="refresh-x", logger=log, keep=kept)
    assert task in kept
    await asyncio.wait([task])
    await asyncio.sleep(0)  # the done callback runs on the next turn of the loop
    assert kept == set()
    del task
    gc.collect()
    failed = [r for r in caplog.records if r.name == "tests.background"]
    assert [(r.levelname, r.getMessage(), r.__dict__["task"]) for r in failed] == [
        ("ERROR", "background task failed", "refresh-x")
    ]
    assert failed[0].exc_info is not None
    assert isinstance(failed[0].exc_info[1], RecursionError)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_a_cancelled_or_successful_task_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tests.background")

    async def forever() -> None:
        await asyncio.Event().wait()

    async def fine() -> int:
        return 1

    held = background.spawn(forever(), name="held", logger=log)
    done = background.spawn(fine(), name="fine", logger=log)
    held.cancel()
    await asyncio.wait([held, done])
    await asyncio.sleep(0)
    assert done.result() == 1
    assert [r for r in caplog.records if r.name == "tests.background"] == []


def _one() -> None:
    raise ValueError("one 1")


def _two() -> None:
    raise ValueError("two 2")


def _fail(where: int) -> BaseException:
    """The exception raised on line one or line two, with its traceback."""
    try:
        (_one if where == 1 else _two)()
    except ValueError as exc:
        return exc
    raise AssertionError("unreachable")


def test_failure_notes_log_each_cause_once_until_a_success(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tests.background")
    notes = FailureNotes(log)
    for _ in range(3):
        notes.failed("round failed", _fail(1), loop="feeder")
    notes.failed("round failed", _fail(2))
    notes.succeeded()
    notes.failed("round failed", _fail(1))
    levels = [(r.levelname, r.exc_info is not None) for r in caplog.records]
    assert levels == [
        ("ERROR", True),
        ("DEBUG", False),
        ("DEBUG", False),
        ("ERROR", True),  # another line raised it: another cause
        ("ERROR", True),  # news again after a success
    ]
    assert caplog.records[0].__dict__["loop"] == "feeder"
