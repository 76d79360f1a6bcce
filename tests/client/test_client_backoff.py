"""switchboard.client.backoff: capped exponential delays with bounded jitter."""

from __future__ import annotations

import random

import pytest

from switchboard.client.backoff import Backoff

pytestmark = pytest.mark.unit


def test_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = Backoff(initial_s=0.1, max_s=2.0, multiplier=2.0, jitter=0.0)
    assert [policy.delay(attempt) for attempt in range(7)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    )


def test_jitter_stays_within_its_fraction_of_the_cap_and_spreads_clients() -> None:
    policy = Backoff(initial_s=1.0, max_s=8.0, jitter=0.5)
    rng = random.Random(19)  # noqa: S311 - jitter, not secrets
    for attempt in range(6):
        cap = policy.cap(attempt)
        drawn = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert all(cap * 0.5 <= d <= cap for d in drawn)
        # Clients that broke together do not come back together.
        assert max(drawn) - min(drawn) > cap * 0.3


def test_the_servers_retry_delay_is_a_floor_even_above_the_cap() -> None:
    policy = Backoff(initial_s=0.1, max_s=1.0)
    assert policy.delay(0, at_least_s=7.5) == 7.5
    assert policy.delay(10, at_least_s=0.01) >= 0.5
    assert policy.delay(0, at_least_s=None) <= 0.1


def test_a_follower_that_retried_all_night_does_not_overflow() -> None:
    policy = Backoff(initial_s=0.2, max_s=5.0, multiplier=3.0)
    assert policy.cap(10**9) == 5.0
    assert 2.5 <= policy.delay(10**9) <= 5.0


@pytest.mark.parametrize(
    "values",
    [
        {"initial_s": 0.0},
        {"initial_s": 2.0, "max_s": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"jitter": -0.1},
    ],
)
def test_nonsense_is_refused(values: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"backoff|jitter"):
        Backoff(**values)
