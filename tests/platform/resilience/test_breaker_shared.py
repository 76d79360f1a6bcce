"""Circuit breakers shared by replicas through a real Redis, and the fallback when
Redis goes away: two ``Breakers`` on one Redis play two replicas, on one fake clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from switchboard.platform.errors import CircuitOpen
from switchboard.platform.resilience.breaker import KEY_PREFIX, Breakers, BreakerState
from tests.conftest import CALL_DEADLINE_S
from tests.infra.clock import FakeClock
from tests.infra.redis import RedisServer

pytestmark = pytest.mark.service

KEY = "workspaces/w/integrations/i"
LABEL = f"integration {KEY}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
async def replicas(
    redis_server: RedisServer, clock: FakeClock
) -> AsyncIterator[tuple[Breakers, Breakers]]:
    pair = tuple(
        Breakers(
            redis_server.url,
            failures=3,
            reset_s=10.0,
            timeout_s=0.5,
            clock=clock,
            redis_retry_s=0.05,
        )
        for _ in range(2)
    )
    a, b = pair
    for breakers in pair:
        await breakers.start()
    try:
        yield a, b
    finally:
        for breakers in pair:
            await breakers.close()


async def fail(breakers: Breakers, times: int) -> None:
    for _ in range(times):
        await (await breakers.acquire(KEY, label=LABEL)).failed()


async def refused(breakers: Breakers) -> CircuitOpen:
    with pytest.raises(CircuitOpen) as caught:
        await breakers.acquire(KEY, label=LABEL)
    return caught.value


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + CALL_DEADLINE_S
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_replicas_share_one_circuit(
    replicas: tuple[Breakers, Breakers], clock: FakeClock, redis_server: RedisServer
) -> None:
    a, b = replicas
    changes: dict[str, list[BreakerState]] = {"a": [], "b": []}
    a.on_change(lambda _key, state: changes["a"].append(state))
    b.on_change(lambda _key, state: changes["b"].append(state))

    # Failures from both replicas count together.
    await fail(a, 2)
    await fail(b, 1)
    assert not a.degraded
    assert not b.degraded
    # B made the transition; A learns it on its next acquire.
    assert changes["b"] == [BreakerState("open", 3, clock.now + 10)]
    assert a.state(KEY).state == "closed"
    error = await refused(a)
    assert error.retry_after_s == pytest.approx(10)
    assert a.state(KEY) == BreakerState("open", 3, clock.now + 10)

    # Half-open: one trial for all replicas.
    clock.now += 10
    trial = await a.acquire(KEY, label=LABEL)
    assert trial.trial
    await refused(b)
    # Releasing the trial (synchronously; Redis follows in the background) frees it.
    trial.released()

    async def b_gets_the_trial() -> bool:
        try:
            permit = await b.acquire(KEY, label=LABEL)
        except CircuitOpen:
            return False
        assert permit.trial
        await permit.failed()
        return True

    await until(b_gets_the_trial)
    assert b.state(KEY) == BreakerState("open", 4, clock.now + 10)
    await refused(a)

    clock.now += 10
    trial = await a.acquire(KEY, label=LABEL)
    await trial.succeeded()
    await (await b.acquire(KEY, label=LABEL)).succeeded()
    assert b.state(KEY) == BreakerState("closed", 0, None)
    assert changes["a"][-1] == BreakerState("closed", 0, None)

    # The hash holds a failing circuit only, with a TTL.
    client = Redis.from_url(redis_server.url)
    try:
        assert await client.exists(KEY_PREFIX + KEY) == 0
        await fail(a, 1)
        assert 0 < await client.pttl(KEY_PREFIX + KEY) <= 86_400_000
        await a.forget(KEY)
        assert await client.exists(KEY_PREFIX + KEY) == 0
    finally:
        await client.aclose()


async def test_without_redis_each_replica_carries_on_alone(
    replicas: tuple[Breakers, Breakers], clock: FakeClock, redis_server: RedisServer
) -> None:
    a, b = replicas
    await fail(a, 2)
    redis_server.kill()

    # No Redis error reaches the caller; A goes on from the state it last saw.
    await fail(a, 1)
    assert a.degraded
    assert a.state(KEY).state == "open"
    await refused(a)
    # B never saw those failures: its own state lets calls through (never fails closed).
    await (await b.acquire(KEY, label=LABEL)).succeeded()
    assert b.degraded

    # The local circuit follows the same rules while Redis is away.
    clock.now += 10
    trial = await a.acquire(KEY, label=LABEL)
    assert trial.trial
    await trial.succeeded()
    assert a.state(KEY).state == "closed"

    # Redis is back (empty: persistence is off): both recover on their own.
    redis_server.restart()

    async def shared_again() -> bool:
        await (await a.acquire(KEY, label=LABEL)).succeeded()
        await (await b.acquire(KEY, label=LABEL)).succeeded()
        return not a.degraded and not b.degraded

    await until(shared_again)
    await fail(a, 3)
    await refused(b)


async def test_a_hung_redis_does_not_hold_callers(
    replicas: tuple[Breakers, Breakers], redis_server: RedisServer
) -> None:
    a, _ = replicas
    redis_server.pause()
    try:
        permit = await a.acquire(KEY, label=LABEL)
        assert a.degraded
        await permit.failed()
        assert a.state(KEY) == BreakerState("closed", 1, None)
    finally:
        redis_server.resume()

    async def recovered() -> bool:
        (await a.acquire(KEY, label=LABEL)).released()
        return not a.degraded

    await until(recovered)
    # Redis never saw the failure counted while it hung.
    assert a.state(KEY) == BreakerState("closed", 0, None)


async def test_start_with_redis_away_is_degraded_not_fatal(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    redis_server.kill()
    breakers = Breakers(redis_server.url, failures=1, reset_s=1.0, timeout_s=0.2, clock=clock)
    await breakers.start()
    try:
        assert breakers.degraded
        await fail(breakers, 1)
        await refused(breakers)
    finally:
        await breakers.close()
