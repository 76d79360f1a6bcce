"""The server's one backoff (platform/resilience/backoff.py): the capped doubling, full
jitter under it, and the pacer background loops wait on."""

from __future__ import annotations

import asyncio
import random

import pytest

from switchboard.platform.resilience.backoff import Backoff, IdlePoll, ceiling, full_jitter

pytestmark = pytest.mark.unit


def test_the_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    assert [ceiling(n, base_s=0.5, max_s=10.0) for n in range(7)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        10.0,
        10.0,
    ]
    # A loop that retried all night does not overflow.
    assert ceiling(10_000, base_s=0.5, max_s=10.0) == 10.0


def test_full_jitter_stays_under_the_ceiling_and_honours_at_least() -> None:
    rng = random.Random(7)  # noqa: S311 - jitter, reproducible
    for attempt in range(12):
        cap = ceiling(attempt, base_s=1.0, max_s=50.0)
        for _ in range(50):
            assert 0.0 <= full_jitter(attempt, base_s=1.0, max_s=50.0, rng=rng) <= cap
    assert full_jitter(0, base_s=1.0, max_s=50.0, rng=rng, at_least_s=20.0) >= 20.0
    # A Retry-After beyond the maximum waits the maximum only.
    assert full_jitter(0, base_s=1.0, max_s=50.0, rng=rng, at_least_s=1e9) == 50.0


async def test_the_pacer_doubles_to_its_cap_and_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    backoff = Backoff(0.1, 0.5)
    for _ in range(5):
        await backoff.wait()
    assert slept == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next_s == 0.1


def test_an_idle_poll_stretches_while_nothing_is_found_and_snaps_back() -> None:
    idle = IdlePoll(1.0)
    assert [idle.after(found=False) for _ in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert idle.after(found=True) == 1.0
    assert idle.after(found=False) == 1.0  # the look after a find comes at the low period
    assert idle.after(found=False) == 2.0
    idle.reset()  # woken by this process's own work
    assert idle.after(found=False) == 1.0
    assert IdlePoll(0.5, 0.5).after(found=False) == 0.5
    capped = IdlePoll(0.1, 0.3)
    assert [capped.after(found=False) for _ in range(4)] == [0.1, 0.2, 0.3, 0.3]
