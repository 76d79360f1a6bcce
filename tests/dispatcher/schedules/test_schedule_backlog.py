"""A backlog of due ticks on a controllable clock (issue 67): one pass claims and sends
every tick due, each once across replicas; only ticks found due more than the grace
after their time are missed, and the skipped ones say how late they were."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.schedules import firing as firing_module
from tests.conftest import CALL_DEADLINE_S
from tests.infra.clock import FakeClock
from tests.kits.modulekit import module_database_url_fixture
from tests.kits.schedulekit import (
    DAY,
    Desk,
    at,
    create,
    cron,
    desk_fixture,
    desk_server_fixture,
    every,
    firings,
    loop,
    on,
)

# One mesh per backend for the module; each test has a workspace and users of its own,
# and its schedules and firings go with it (``desk_fixture``).
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

STARTED = pb.FIRING_OUTCOME_STARTED
SKIPPED = pb.FIRING_OUTCOME_SKIPPED


module_database_url = module_database_url_fixture
desk_server, desk = desk_server_fixture, desk_fixture


def offsets(found: list[pb.ScheduleFiring]) -> list[tuple[float, int]]:
    """(seconds after DAY, outcome), oldest tick first."""
    base = at(DAY)
    return sorted((f.fire_time.ToDatetime(dt.UTC).timestamp() - base, f.outcome) for f in found)


async def next_fire(desk: Desk, name: str) -> float:
    shown = (
        await desk.stub.GetSchedule(
            pb.GetScheduleRequest(name=name), metadata=desk.world.owner.md, timeout=CALL_DEADLINE_S
        )
    ).schedule
    return shown.next_fire_time.ToDatetime(dt.UTC).timestamp() - at(DAY)


async def test_a_backlog_of_ticks_is_caught_up_in_one_poll(desk: Desk) -> None:
    clock = FakeClock(at(DAY))
    on(desk, clock)
    made = await create(desk, every(1))
    firing = loop(desk, clock, "replica-a", grace_s=60.0)
    # The loop fell 30 s behind (a slow database, a busy process): 30 ticks are due,
    # each within the grace.
    clock.advance(30.5)
    await firing.run_once()
    found = await firings(desk, made.name)
    assert offsets(found) == [(float(s), STARTED) for s in range(1, 31)]
    assert not any(f.catch_up for f in found)
    assert len({f.run for f in found}) == 30
    assert await next_fire(desk, made.name) == 31.0


async def test_two_loops_share_a_backlog_each_tick_once(desk: Desk) -> None:
    clock = FakeClock(at(DAY))
    on(desk, clock)
    made = [await create(desk, every(1)) for _ in range(3)]
    first, second = loop(desk, clock, "replica-a"), loop(desk, clock, "replica-b")
    clock.advance(12)
    await asyncio.gather(first.run_once(), second.run_once())
    for schedule in made:
        found = await firings(desk, schedule.name)
        assert offsets(found) == [(float(s), STARTED) for s in range(1, 13)]
        assert len({f.run for f in found}) == 12


@pytest.mark.parametrize("policy", [pb.MISSED_TICK_POLICY_SKIP, pb.MISSED_TICK_POLICY_RUN_ONCE])
async def test_only_ticks_later_than_the_grace_are_missed(
    desk: Desk, policy: pb.MissedTickPolicy.ValueType
) -> None:
    clock = FakeClock(at(DAY))
    on(desk, clock)
    schedule = cron("* * * * * *")  # every second
    schedule.missed_tick_policy = policy
    made = await create(desk, schedule)
    firing = loop(desk, clock, "replica-a", grace_s=5.0)
    # Found 10.4 s on: ticks 1-5 are 9.4-5.4 s late (missed), 6-10 are 4.4-0.4 s
    # late (within the grace: they fire as usual).
    clock.advance(10.4)
    await firing.run_once()
    found = await firings(desk, made.name)
    fired = [(float(s), STARTED) for s in range(6, 11)]
    if policy == pb.MISSED_TICK_POLICY_SKIP:
        assert offsets(found) == [(float(s), SKIPPED) for s in range(1, 6)] + fired
        assert not any(f.catch_up for f in found)
    else:
        assert (
            offsets(found) == [(float(s), SKIPPED) for s in range(1, 5)] + [(5.0, STARTED)] + fired
        )
        assert [
            f.fire_time.ToDatetime(dt.UTC).timestamp() - at(DAY) for f in found if f.catch_up
        ] == [5.0]
    late = {
        round(f.fire_time.ToDatetime(dt.UTC).timestamp() - at(DAY)): f.error.message
        for f in found
        if f.outcome == SKIPPED
    }
    assert late[1].startswith("missed: found due 9.4 s after its time"), late[1]
    assert "SWITCHBOARD_SCHEDULES_MISSED_GRACE_S (5 s)" in late[1]
    assert all(f.error.message == "" for f in found if f.outcome == STARTED)
    assert await next_fire(desk, made.name) == 11.0


async def test_a_long_outage_records_the_latest_missed_and_fires_the_grace(desk: Desk) -> None:
    clock = FakeClock(at(DAY))
    on(desk, clock)
    made = await create(desk, every(10))
    firing = loop(desk, clock, "replica-a", grace_s=60.0)
    # 125 s on: ticks 10-60 are more than 60 s late (six: the latest five are
    # recorded, the oldest of them says so); 70-120 are within the grace.
    clock.advance(125)
    await firing.run_once()
    found = await firings(desk, made.name)
    assert offsets(found) == [(float(s), SKIPPED) for s in range(20, 61, 10)] + [
        (float(s), STARTED) for s in range(70, 121, 10)
    ]
    oldest = min(found, key=lambda f: f.fire_time.ToDatetime(dt.UTC))
    assert "earlier ticks were missed too" in oldest.error.message
    assert await next_fire(desk, made.name) == 130.0


async def test_a_backlog_longer_than_one_claim_goes_on_at_once(
    desk: Desk, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(firing_module, "MAX_TICKS_PER_CLAIM", 4)
    clock = FakeClock(at(DAY))
    on(desk, clock)
    made = await create(desk, every(1))
    firing = loop(desk, clock, "replica-a", grace_s=60.0)
    clock.advance(10)
    # Four ticks a claim; the pass asks for the next one at once, not after a poll.
    assert await firing.run_once() == 0.0
    assert offsets(await firings(desk, made.name)) == [(float(s), STARTED) for s in range(1, 5)]
    await firing.run_once()
    assert await firing.run_once() > 0.0
    assert offsets(await firings(desk, made.name)) == [(float(s), STARTED) for s in range(1, 11)]
