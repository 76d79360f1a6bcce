"""The firing loop: a one-second schedule firing in a served mesh (runs and SCHEDULE_FIRED
events), and loops of the test's own on a controllable clock over the same database: two
loops claiming at once never fire a tick twice, DST days, missed ticks, a claim taken
over from a replica whose lease expired, a creator who may no longer write."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.runs.core.store import RunStore
from switchboard.dispatcher.schedules import store as schedule_store
from switchboard.dispatcher.schedules.store import ScheduleStore
from switchboard.platform.security.policy import Principal, Role
from tests.conftest import CALL_DEADLINE_S
from tests.infra import postgres as postgres_infra
from tests.infra.clock import FakeClock
from tests.infra.postgres import PostgresServer
from tests.kits.contextkit import struct
from tests.kits.dispatchkit import eventually, get_run
from tests.kits.eventkit import Subscriber, set_role, ws
from tests.kits.modulekit import module_database_url_fixture
from tests.kits.schedulekit import (
    DAY,
    Desk,
    admit,
    at,
    create,
    cron,
    desk_fixture,
    desk_mesh,
    desk_server_fixture,
    every,
    firings,
    loop,
    on,
)

# One mesh per backend for the module; each test has a workspace and users of its own,
# and its schedules and firings go with it (``desk_fixture``). The tests of the mesh's
# own loop (its poll interval, a database outage) start a mesh of their own.
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

FIRED = events_pb2.EVENT_TYPE_SCHEDULE_FIRED
STARTED = pb.FIRING_OUTCOME_STARTED
SKIPPED = pb.FIRING_OUTCOME_SKIPPED
FAILED = pb.FIRING_OUTCOME_FAILED


module_database_url = module_database_url_fixture
desk_server, desk = desk_server_fixture, desk_fixture


def ticks(found: list[pb.ScheduleFiring]) -> list[tuple[str, int]]:
    return [(f.fire_time.ToDatetime(dt.UTC).isoformat(), f.outcome) for f in found]


async def runs_in(desk: Desk, conversation: str) -> list[pb.Run]:
    page = await desk.stub.ListRuns(
        pb.ListRunsRequest(parent=conversation, page_size=100),
        metadata=desk.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return list(page.runs)


async def test_a_one_second_schedule_fires_runs_and_events() -> None:
    async with desk_mesh(schedules_poll_s=0.2) as desk:
        world = desk.world
        subscriber = Subscriber(
            desk.channel, world.viewer.token, scopes=[ws(world.id)], types=[FIRED]
        )
        await subscriber.live()
        made = await create(desk, every(1))
        events = await subscriber.until(3)
        await desk.stub.PauseSchedule(
            pb.PauseScheduleRequest(name=made.name),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        fired = [e.schedule_fired for e in events[:3]]
        assert {f.schedule for f in fired} == {made.name}
        assert [f.firing.outcome for f in fired] == [STARTED] * 3
        # Three ticks of the one-second schedule. Ticks claimed together are sent side by
        # side (CONCURRENT_SENDS), so on a busy host a later tick's event can come before an
        # earlier one's: the earlier is in the listing, settled or still CLAIMED.
        times = sorted(f.firing.fire_time.ToDatetime(dt.UTC) for f in fired)
        second = dt.timedelta(seconds=1)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(g >= second and g % second == dt.timedelta(0) for g in gaps), gaps
        for f in fired:
            run = await get_run(desk.stub, world.owner, f.firing.run)
            assert run.schedule == made.name
            assert run.name.startswith(made.conversation + "/runs/")
            assert run.creator == f"users/{world.owner.id}"
        listed = await firings(desk, made.name, page_size=1)
        assert [f.fire_time for f in listed] == sorted(
            (f.fire_time for f in listed), key=lambda t: t.ToDatetime(), reverse=True
        )
        assert {f.firing.run for f in fired} <= {f.run for f in listed}
        each_tick = {times[0] + n * second for n in range((times[-1] - times[0]) // second + 1)}
        assert each_tick <= {f.fire_time.ToDatetime(dt.UTC) for f in listed}, ticks(listed)
        # On a busy host some ticks have no run: one claimed when the schedule was paused
        # and not yet settled (CLAIMED), or one claimed past the grace (SKIPPED).
        started = [f for f in listed if f.outcome == STARTED]
        assert len({f.run for f in started}) == len(started)
        assert all(not f.run for f in listed if f.outcome != STARTED), ticks(listed)
        shown = (
            await desk.stub.GetSchedule(
                pb.GetScheduleRequest(name=made.name),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
        ).schedule
        assert shown.last_fire_time == listed[0].fire_time
        # The run of the latest firing that started one (a firing still CLAIMED may settle
        # between the listing and GetSchedule, and start a later one).
        claimed = any(f.outcome == pb.FIRING_OUTCOME_CLAIMED for f in listed)
        assert shown.last_run == started[0].run or claimed, (shown.last_run, ticks(listed))


async def test_two_loops_on_one_database_never_fire_a_tick_twice(desk: Desk) -> None:
    clock = FakeClock(at(DAY))
    on(desk, clock)
    made = [await create(desk, every(1)) for _ in range(3)]
    first, second = loop(desk, clock, "replica-a"), loop(desk, clock, "replica-b")
    for _ in range(6):
        clock.advance(1)
        await asyncio.gather(first.run_once(), second.run_once())
    for schedule in made:
        found = await firings(desk, schedule.name)
        assert [f.outcome for f in found] == [STARTED] * 6, ticks(found)
        assert len({f.fire_time.ToDatetime() for f in found}) == 6
        runs = await runs_in(desk, schedule.conversation)
        assert sorted(r.name for r in runs) == sorted(f.run for f in found)


async def test_a_0230_schedule_on_the_spring_forward_day_fires_once_at_0300(desk: Desk) -> None:
    # Europe/Berlin jumps from 02:00 to 03:00 on 2027-03-28: 02:30 does not exist.
    clock = FakeClock(at("2027-03-27T12:00:00+00:00"))
    on(desk, clock)
    made = await create(desk, cron("30 2 * * *", "Europe/Berlin"))
    assert made.next_fire_time.ToDatetime(dt.UTC).isoformat() == "2027-03-28T01:00:00+00:00"
    firing = loop(desk, clock, "replica-a")
    clock.now = at("2027-03-28T00:59:59+00:00")
    await firing.run_once()
    assert await firings(desk, made.name) == []
    for moment in ("2027-03-28T01:00:00+00:00", "2027-03-28T01:30:00+00:00"):
        clock.now = at(moment)
        await firing.run_once()
    assert ticks(await firings(desk, made.name)) == [("2027-03-28T01:00:00+00:00", STARTED)]
    shown = (
        await desk.stub.GetSchedule(
            pb.GetScheduleRequest(name=made.name),
            metadata=desk.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    ).schedule
    # The next day it is 02:30 again, in summer time.
    assert shown.next_fire_time.ToDatetime(dt.UTC).isoformat() == "2027-03-29T00:30:00+00:00"


async def test_a_0230_schedule_on_the_fall_back_day_fires_once(desk: Desk) -> None:
    # Europe/Berlin goes back from 03:00 to 02:00 on 2027-10-31: 02:30 happens twice.
    clock = FakeClock(at("2027-10-30T12:00:00+00:00"))
    on(desk, clock)
    made = await create(desk, cron("30 2 * * *", "Europe/Berlin"))
    firing = loop(desk, clock, "replica-a")
    for moment in (
        "2027-10-31T00:30:00+00:00",  # 02:30 summer time: fires
        "2027-10-31T01:30:00+00:00",  # 02:30 again, winter time: nothing
        "2027-10-31T12:00:00+00:00",
    ):
        clock.now = at(moment)
        await firing.run_once()
    assert ticks(await firings(desk, made.name)) == [("2027-10-31T00:30:00+00:00", STARTED)]
    shown = (
        await desk.stub.GetSchedule(
            pb.GetScheduleRequest(name=made.name),
            metadata=desk.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    ).schedule
    assert shown.next_fire_time.ToDatetime(dt.UTC).isoformat() == "2027-11-01T01:30:00+00:00"


@pytest.mark.parametrize("policy", [pb.MISSED_TICK_POLICY_SKIP, pb.MISSED_TICK_POLICY_RUN_ONCE])
async def test_missed_ticks_follow_the_policy(
    desk: Desk, policy: pb.MissedTickPolicy.ValueType
) -> None:
    clock = FakeClock(at(DAY))
    on(desk, clock)
    schedule = every(10)
    schedule.missed_tick_policy = policy
    made = await create(desk, schedule)
    firing = loop(desk, clock, "replica-a", grace_s=5.0)
    # Nothing ran for 207 s: 20 ticks fell, the latest 7 s ago, more than the grace.
    clock.advance(207)
    await firing.run_once()
    found = await firings(desk, made.name)
    base = at(DAY)
    latest = [
        dt.datetime.fromtimestamp(base + s, dt.UTC).isoformat() for s in (200, 190, 180, 170, 160)
    ]
    if policy == pb.MISSED_TICK_POLICY_SKIP:
        assert ticks(found) == [(t, SKIPPED) for t in latest]
    else:
        assert ticks(found) == [(latest[0], STARTED)] + [(t, SKIPPED) for t in latest[1:]]
        assert found[0].catch_up
    assert all(f.error.message.startswith("missed") for f in found if f.outcome == SKIPPED)
    # On from now, in the same phase.
    shown = (
        await desk.stub.GetSchedule(
            pb.GetScheduleRequest(name=made.name),
            metadata=desk.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    ).schedule
    assert shown.next_fire_time.ToDatetime(dt.UTC).timestamp() == base + 210
    clock.advance(5)
    await firing.run_once()
    assert (await firings(desk, made.name))[0].outcome == STARTED


async def test_a_claim_of_a_replica_whose_lease_expired_is_taken_over_never_run_twice(
    desk: Desk,
) -> None:
    clock = FakeClock(at(DAY))
    on(desk, clock)
    made = await create(desk, every(1))
    database = desk.server.shared.database
    store = ScheduleStore(database)
    ghost = loop(desk, clock, "ghost")
    clock.advance(1)
    record = await store.get(desk.world.id, made.name.rsplit("/", 1)[-1])
    assert record is not None
    [claimed] = await ghost.claim(record)
    # The ghost sent the tick's message, then died before recording it.
    sent = await desk.dispatcher.send_message(
        Principal.acting_for(claimed.creator),
        pb.SendMessageRequest.FromString(claimed.request),
        schedule=made.name,
    )
    leases = RunStore(database)
    now = dt.datetime.now(dt.UTC)
    await leases.renew_lease("ghost", now + dt.timedelta(seconds=60))
    other = loop(desk, clock, "replica-b")
    assert await other.replay_claimed() == 0  # its lease still runs
    assert [f.outcome for f in await firings(desk, made.name)] == [pb.FIRING_OUTCOME_CLAIMED]
    await leases.renew_lease("ghost", now - dt.timedelta(seconds=1))
    assert await other.replay_claimed() == 1
    found = await firings(desk, made.name)
    assert [(f.outcome, f.run) for f in found] == [(STARTED, sent.run.name)]
    assert [r.name for r in await runs_in(desk, made.conversation)] == [sent.run.name]
    assert await other.replay_claimed() == 0
    assert await ghost.replay_claimed() == 0


async def test_a_creator_who_may_no_longer_write_gets_a_failed_firing(desk: Desk) -> None:
    clock = FakeClock(at(DAY))
    on(desk, clock)
    world = desk.world
    await set_role(desk.server, world.id, world.editor.id, Role.OWNER)
    made = await create(desk, every(1), caller=world.editor)
    await set_role(desk.server, world.id, world.editor.id, Role.VIEWER)
    firing = loop(desk, clock, "replica-a")
    clock.advance(1)
    await firing.run_once()
    [found] = await firings(desk, made.name)
    assert found.outcome == FAILED
    assert found.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in found.error.details)
    assert "Traceback" not in found.error.message
    assert await runs_in(desk, made.conversation) == []


async def test_a_busy_conversation_under_reject_skips_the_tick(desk: Desk) -> None:
    clock = FakeClock(at(DAY))
    on(desk, clock)
    schedule = every(1)
    schedule.concurrency_policy = pb.CONCURRENCY_POLICY_REJECT
    made = await create(desk, schedule)
    firing = loop(desk, clock, "replica-a")
    # A run of the conversation that takes a while: the tick finds it busy.
    await desk.stub.SendMessage(
        pb.SendMessageRequest(
            conversation=made.conversation,
            message=cpb.Message(parts=[cpb.ContentPart(text=" ".join(["word"] * 40))]),
            handler="handlers/echo",
            parameters=struct(delay_ms=50),
        ),
        metadata=desk.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    clock.advance(1)
    await firing.run_once()
    [found] = await firings(desk, made.name)
    assert found.outcome == SKIPPED
    assert found.error.code == grpc.StatusCode.ABORTED.value[0]


async def test_a_tick_claimed_while_its_conversation_sends_waits_its_turn(desk: Desk) -> None:
    """A SHARED conversation's ticks go one after another across passes too: a pass that
    claims a tick while the last pass's tick is still being sent adds it to that line."""
    clock = FakeClock(at(DAY))
    on(desk, clock)
    made = await create(desk, every(1))
    entered, go = asyncio.Event(), asyncio.Event()
    sent: list[str] = []
    under_way: list[int] = []

    async def send(
        principal: Principal, request: pb.SendMessageRequest, schedule: str
    ) -> pb.SendMessageResponse:
        under_way.append(len(under_way) - len(sent) + 1)
        first = not entered.is_set()
        entered.set()
        if first:
            await go.wait()  # the first tick's send is slow
        try:
            return await admit(desk, principal, request, schedule)
        finally:
            sent.append(request.message.parts[0].text)

    firing = loop(desk, clock, "replica-a", send=send)
    try:
        clock.advance(1)
        await firing.run_once(wait=False)
        async with asyncio.timeout(CALL_DEADLINE_S):
            await entered.wait()
        clock.advance(1)
        await firing.run_once(wait=False)  # the next tick, claimed while the first sends
        go.set()
        found = await eventually_settled(desk, made.name, 2)
    finally:
        go.set()
        await firing.stop()
    assert [f.outcome for f in found] == [STARTED] * 2, ticks(found)
    assert max(under_way) == 1, under_way  # never two of its ticks at once
    assert sent == sorted(sent), sent  # oldest first
    runs = await runs_in(desk, made.conversation)
    assert len(runs) == 2


async def eventually_settled(desk: Desk, name: str, count: int) -> list[pb.ScheduleFiring]:
    found: list[pb.ScheduleFiring] = []

    async def settled() -> bool:
        nonlocal found
        found = await firings(desk, name)
        return len(found) == count and all(f.outcome != pb.FIRING_OUTCOME_CLAIMED for f in found)

    await eventually(settled, f"{count} firings settled")
    return found


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A cluster of this module's own: the outage test stops and restarts it."""
    with postgres_infra.running_postgres() as server:
        yield server


async def test_the_loop_survives_a_database_outage(
    own_postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.dispatcher.schedules")
    said = asyncio.Event()

    class Noticed(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "cannot fire now" in record.getMessage():
                said.set()

    logging.getLogger("switchboard.dispatcher.schedules").addHandler(noticed := Noticed())
    try:
        await _outage(own_postgres, caplog, said)
    finally:
        logging.getLogger("switchboard.dispatcher.schedules").removeHandler(noticed)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot fire now" in m for m in messages) == 1, messages
    assert "schedules fire again" in messages


async def _outage(
    own_postgres: PostgresServer, caplog: pytest.LogCaptureFixture, said: asyncio.Event
) -> None:
    async with desk_mesh(
        database_url=own_postgres.url("postgres"), schedules_poll_s=0.2, database_timeout_s=2.0
    ) as desk:
        fired: asyncio.Queue[events_pb2.Event] = asyncio.Queue()
        stop = desk.server.shared.bus.listen(
            lambda e: fired.put_nowait(e) if e.type == FIRED else None
        )
        try:
            made = await create(desk, every(1))
            async with asyncio.timeout(CALL_DEADLINE_S):
                await fired.get()
            await asyncio.to_thread(postgres_infra.stop_postgres, own_postgres)
            try:
                async with asyncio.timeout(CALL_DEADLINE_S):
                    await said.wait()
            finally:
                await asyncio.to_thread(postgres_infra.start_postgres, own_postgres)
            back = dt.datetime.now(dt.UTC)
            async with asyncio.timeout(CALL_DEADLINE_S * 3):
                while True:
                    event = await fired.get()
                    firing = event.schedule_fired.firing
                    if firing.claim_time.ToDatetime(dt.UTC) >= back and firing.outcome == STARTED:
                        break
            await desk.stub.PauseSchedule(
                pb.PauseScheduleRequest(name=made.name),
                metadata=desk.world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
        finally:
            stop()


async def test_a_schedule_keeps_its_latest_firings(
    desk: Desk, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schedule_store, "MAX_FIRINGS_KEPT", 3)
    clock = FakeClock(at(DAY))
    on(desk, clock)
    made = await create(desk, every(1))
    firing = loop(desk, clock, "replica-a")
    for _ in range(5):
        clock.advance(1)
        await firing.run_once()
    found = await firings(desk, made.name)
    base = at(DAY)
    assert ticks(found) == [
        (dt.datetime.fromtimestamp(base + s, dt.UTC).isoformat(), STARTED) for s in (5, 4, 3)
    ]
