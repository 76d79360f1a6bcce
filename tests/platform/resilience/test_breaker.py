"""The circuit breakers' state machine, on a fake clock (per-process ``Breakers`` and
the single ``CircuitBreaker`` the llm handler uses)."""

from __future__ import annotations

import pytest
from google.rpc import error_details_pb2

from switchboard.platform.errors import CircuitOpen, Code
from switchboard.platform.resilience.breaker import Breakers, BreakerState, CircuitBreaker, Permit
from switchboard.platform.rpc.status import to_status_proto
from tests.infra.clock import FakeClock

pytestmark = pytest.mark.unit

KEY = "workspaces/w/integrations/i"
LABEL = f"integration {KEY}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def breakers(clock: FakeClock) -> Breakers:
    return Breakers(failures=3, reset_s=10.0, clock=clock)


async def fail(breakers: Breakers, times: int, key: str = KEY) -> None:
    for _ in range(times):
        await (await breakers.acquire(key, label=LABEL)).failed()


async def refused(breakers: Breakers, key: str = KEY) -> CircuitOpen:
    with pytest.raises(CircuitOpen) as caught:
        await breakers.acquire(key, label=LABEL)
    return caught.value


async def test_closed_until_n_failures_in_a_row(breakers: Breakers, clock: FakeClock) -> None:
    assert breakers.state(KEY) == BreakerState("closed", 0, None)
    await fail(breakers, 2)
    assert breakers.state(KEY) == BreakerState("closed", 2, None)
    # A success resets the count: failures must be in a row.
    await (await breakers.acquire(KEY, label=LABEL)).succeeded()
    assert breakers.state(KEY) == BreakerState("closed", 0, None)
    await fail(breakers, 2)
    assert breakers.state(KEY).state == "closed"
    await fail(breakers, 1)
    assert breakers.state(KEY) == BreakerState("open", 3, clock.now + 10)


async def test_an_open_circuit_refuses_at_once_with_the_retry_time(
    breakers: Breakers, clock: FakeClock
) -> None:
    await fail(breakers, 3)
    clock.now += 2.5
    error = await refused(breakers)
    assert error.code is Code.UNAVAILABLE
    assert error.retry_after_s == pytest.approx(7.5)
    assert error.message == f"integration {KEY}: circuit open; retry in 8 s"
    # The status carries RetryInfo with that delay.
    status = to_status_proto(error, "")
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status.details)
    assert retry.retry_delay.ToMilliseconds() == 7500
    # Other keys are independent.
    await (await breakers.acquire("workspaces/w/integrations/other", label="x")).succeeded()


async def test_half_open_lets_one_trial_through_and_closes_on_success(
    breakers: Breakers, clock: FakeClock
) -> None:
    await fail(breakers, 3)
    clock.now += 10
    assert breakers.state(KEY) == BreakerState("half_open", 3, None)
    trial = await breakers.acquire(KEY, label=LABEL)
    assert trial.trial
    # The trial holds the circuit for its lease (reset_s by default).
    assert breakers.state(KEY) == BreakerState("half_open", 3, clock.now + 10)
    second = await refused(breakers)
    assert second.retry_after_s == pytest.approx(10)
    await trial.succeeded()
    assert breakers.state(KEY) == BreakerState("closed", 0, None)
    permit = await breakers.acquire(KEY, label=LABEL)
    assert not permit.trial


async def test_a_failed_trial_reopens(breakers: Breakers, clock: FakeClock) -> None:
    await fail(breakers, 3)
    clock.now += 11
    await (await breakers.acquire(KEY, label=LABEL)).failed()
    assert breakers.state(KEY) == BreakerState("open", 4, clock.now + 10)
    clock.now += 9.9
    await refused(breakers)
    clock.now += 0.1
    assert (await breakers.acquire(KEY, label=LABEL)).trial


async def test_a_released_trial_frees_the_circuit_for_the_next(
    breakers: Breakers, clock: FakeClock
) -> None:
    await fail(breakers, 3)
    clock.now += 10
    trial = await breakers.acquire(KEY, label=LABEL)
    await refused(breakers)
    trial.released()
    assert breakers.state(KEY) == BreakerState("half_open", 3, None)
    assert (await breakers.acquire(KEY, label=LABEL)).trial


async def test_a_lost_trial_expires_with_its_lease(clock: FakeClock) -> None:
    breakers = Breakers(failures=1, reset_s=10.0, clock=clock, trial_lease_s=3.0)
    await fail(breakers, 1)
    clock.now += 10
    lost = await breakers.acquire(KEY, label=LABEL)
    clock.now += 2.9
    await refused(breakers)
    clock.now += 0.1
    again = await breakers.acquire(KEY, label=LABEL)
    assert again.trial
    # The first trial's late release does not free the second's claim.
    lost.released()
    await refused(breakers)


async def test_a_late_failure_restarts_the_open_period(
    breakers: Breakers, clock: FakeClock
) -> None:
    early = await breakers.acquire(KEY, label=LABEL)
    await fail(breakers, 3)
    clock.now += 5
    await early.failed()
    assert breakers.state(KEY) == BreakerState("open", 4, clock.now + 10)


async def test_a_late_success_closes(breakers: Breakers) -> None:
    early = await breakers.acquire(KEY, label=LABEL)
    await fail(breakers, 3)
    await early.succeeded()
    assert breakers.state(KEY) == BreakerState("closed", 0, None)


async def test_only_the_first_verdict_counts(breakers: Breakers, clock: FakeClock) -> None:
    permit = await breakers.acquire(KEY, label=LABEL)
    await permit.failed()
    await permit.failed()
    permit.released()
    await permit.succeeded()
    assert breakers.state(KEY) == BreakerState("closed", 1, None)
    await fail(breakers, 2)
    clock.now += 10
    trial = await breakers.acquire(KEY, label=LABEL)
    await trial.succeeded()
    await trial.failed()
    assert breakers.state(KEY).state == "closed"


async def test_on_change_reports_every_transition(breakers: Breakers, clock: FakeClock) -> None:
    seen: list[tuple[str, BreakerState]] = []
    breakers.on_change(lambda key, state: seen.append((key, state)))

    def broken(key: str, state: BreakerState) -> None:
        raise RuntimeError("a listener's bug")

    breakers.on_change(broken)
    start = clock.now
    await fail(breakers, 3)
    clock.now += 10
    trial = await breakers.acquire(KEY, label=LABEL)
    await trial.failed()
    clock.now += 10
    trial = await breakers.acquire(KEY, label=LABEL)
    trial.released()
    trial = await breakers.acquire(KEY, label=LABEL)
    await trial.succeeded()
    t = start
    assert seen == [
        (KEY, BreakerState("open", 3, t + 10)),
        (KEY, BreakerState("half_open", 3, t + 20)),
        (KEY, BreakerState("open", 4, t + 20)),
        (KEY, BreakerState("half_open", 4, t + 30)),
        (KEY, BreakerState("half_open", 4, None)),
        (KEY, BreakerState("half_open", 4, t + 30)),
        (KEY, BreakerState("closed", 0, None)),
    ]


async def test_forget(breakers: Breakers) -> None:
    await fail(breakers, 3)
    await breakers.forget(KEY)
    assert breakers.state(KEY) == BreakerState("closed", 0, None)
    assert isinstance(await breakers.acquire(KEY, label=LABEL), Permit)


async def test_without_redis_it_is_never_degraded(breakers: Breakers) -> None:
    await breakers.start()
    assert not breakers.degraded
    await breakers.close()


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="failures"):
        Breakers(failures=0, reset_s=1)
    with pytest.raises(ValueError, match="reset_s"):
        Breakers(failures=1, reset_s=0)


def test_circuit_breaker_single(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failures=2, reset_s=10.0, clock=clock)
    assert breaker.allow()
    breaker.failed()
    assert breaker.state == "closed"
    breaker.failed()
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.now += 10
    assert breaker.state == "half-open"
    assert breaker.allow()
    assert not breaker.allow()
    breaker.released()
    assert breaker.allow()
    breaker.failed()
    assert breaker.state == "open"
    clock.now += 10
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == "closed"
