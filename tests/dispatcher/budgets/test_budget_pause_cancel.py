"""A run paused at a budget's cap waits for the first of its wake-ups
(``spending._first``); a cancel of the run that comes while that wait lets go of
the wake-ups it no longer needs must still cancel it (issue 67: a cancelled run
went on waiting at its cap, and the runs queued behind it in its conversation
never started)."""

from __future__ import annotations

import asyncio

import pytest

from switchboard.dispatcher.budgets.spending import _first

pytestmark = pytest.mark.unit


async def test_a_cancel_while_the_wait_lets_go_of_its_wakeups_cancels_the_waiter() -> None:
    letting_go = asyncio.Event()
    let_go = asyncio.Event()

    async def slow_to_stop() -> None:
        # A wake-up that takes a moment to stop, as a task on a busy loop does.
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            letting_go.set()
            await let_go.wait()
            raise

    waiter = asyncio.create_task(_first(slow_to_stop(), timeout_s=0.01))
    await letting_go.wait()  # the wait timed out and is letting go of its wake-up
    waiter.cancel()  # the run is cancelled right then
    let_go.set()
    done, _ = await asyncio.wait([waiter], timeout=5)
    assert done, "the waiter never ended"
    assert waiter.cancelled(), "the cancel was swallowed: the waiter returned as if woken"
