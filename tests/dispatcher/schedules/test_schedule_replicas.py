"""Schedules on the scaled-out shape: two `switchboard serve` replicas on one
PostgreSQL and one Redis (lease 2 s), two schedules of the echo handler firing every
second (the minimum interval lowered for the test), each tick in a conversation of
its own (PER_RUN: no tick waits behind another's run, so a tick's run is its own
and nothing else decides when it starts). ``minute`` skips missed ticks (SKIP),
``catch-up`` runs once for them (RUN_ONCE).

1. Twenty ticks of firing. About half way, one replica is SIGKILLed at the worst moment
   for a tick: PostgreSQL is made to hold every write of a run (the test takes a
   SHARE lock on ``runs``) until a tick has been claimed, and the replica that claimed
   it is killed before its run could be stored (its conversation and message may be).
   The survivor carries on firing, takes the orphaned tick over once the dead replica's
   lease has run out (replayed with the tick's request ids: the same conversation and
   message, one run), and the dead replica is started again (same instance id) then;
   the firing goes on, past the twentieth tick and at least ``AFTER`` ticks after it is
   back.
2. Both replicas are stopped (SIGTERM) for longer than the missed-tick grace, then
   started again. The loop records at most the latest ``MAX_RECORDED_MISSED`` ticks of
   an outage that are past the grace, the oldest saying that earlier ones were missed
   too; the ticks still within the grace fire in the same pass.

Then, from ListScheduleFirings, ListRuns, the conversations and the SCHEDULE_FIRED
events: every tick from the first to the last has one firing (but the outage's
unrecorded ones); every tick of part 1 (the orphaned one too) started exactly one
run, no run exists that no tick started, every run SUCCEEDED with its own tick's
message in a conversation of its own, and none started twice; the ticks missed while
nothing ran are SKIPPED with no run for ``minute``, and for ``catch-up`` SKIPPED but
one (the latest), which started the one catch-up run; both schedules go on firing
afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import grpc
import pytest
from google.protobuf import duration_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.dispatcher.schedules.firing import MAX_RECORDED_MISSED
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import scaled_env
from tests.e2e.replicas import Replica, sign_up
from tests.infra.redis import RedisServer
from tests.kits.contextkit import Caller, all_messages, context_stub, create_workspace

# Generous: beside other workers at a load of 14 on 2 cores it took 210 s.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

INTERVAL_S: Final = 1
INTERVAL_US: Final = INTERVAL_S * 1_000_000
#: Ticks of the first part, at least (the kill comes half way): enough to fire before,
#: during and after the kill; the ticks while the replica is away and back come on top
#: (a wait of their own).
TICKS: Final = 20
LEASE_S: Final = 2.0
#: A tick claimed this long after it was due is missed (SWITCHBOARD_SCHEDULES_MISSED_GRACE_S):
#: well above what a loaded machine delays a claim by (up to 3.8 s seen at a load of 9 on
#: 2 cores, while the killed replica started again), below the outage.
GRACE_S: Final = 10.0
#: An orphaned tick's run is created this soon after the kill (lease, scan, send; loaded).
TAKEN_OVER_WITHIN_S: Final = 5 * LEASE_S
#: Ticks missed past the grace while both replicas are away (at least).
MISSED: Final = 2
#: Ticks each schedule fires after the restart before the test stops them.
AFTER: Final = 3
#: How long one wait for the system to move on may take.
SETTLE_S: Final = 60.0
REPLICAS: Final = ("replica-1", "replica-2")
RETRYABLE: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
)
TEMPLATE: Final = "{{schedule}} at {{fire_time}}"
DECIDED: Final = frozenset(
    {pb.FIRING_OUTCOME_STARTED, pb.FIRING_OUTCOME_SKIPPED, pb.FIRING_OUTCOME_FAILED}
)

EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

T = TypeVar("T")


@pytest.fixture
def postgres_url(migrated_postgres_url: str) -> str:
    """The database at the newest schema already (``postgres_engine`` reads it too): on an
    empty one both replicas migrate at once, and beside a CPU burner the second's wait
    for the first ran past its timeout (``cannot open the database``)."""
    return migrated_postgres_url


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    return {
        **scaled_env(tmp_path, postgres_url, redis_server.url),
        "SWITCHBOARD_DISPATCHER_LEASE_S": str(LEASE_S),
        "SWITCHBOARD_SCHEDULES_MIN_INTERVAL_S": str(INTERVAL_S),
        "SWITCHBOARD_SCHEDULES_MISSED_GRACE_S": str(GRACE_S),
        "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_USER": "100000",
        "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_WORKSPACE": "100000",
        "SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "100000",
        # Stopping both replicas waits for no stream.
        "SWITCHBOARD_SHUTDOWN_GRACE_S": "2",
        "PYTHONFAULTHANDLER": "1",
    }


def tick(firing: pb.ScheduleFiring) -> int:
    """A firing's tick, in microseconds since the epoch (as ticks are stored)."""
    return firing.fire_time.ToMicroseconds()


def seconds(stamp: Timestamp) -> float:
    return stamp.ToMicroseconds() / 1e6


class Cluster:
    """The replicas, and calls that go to one that is up (the other while one is away)."""

    def __init__(self, replicas: list[Replica], caller: Caller) -> None:
        self.replicas = replicas
        self.caller = caller
        self.retries: Counter[str] = Counter()

    async def call(self, what: str, call: Callable[[Replica], Awaitable[T]]) -> T:
        deadline = time.monotonic() + SETTLE_S
        for attempt in itertools.count():
            up = [replica for replica in self.replicas if replica.up]
            assert up, f"{what}: no replica is up"
            replica = up[attempt % len(up)]
            try:
                return await call(replica)
            except aio.AioRpcError as error:
                if error.code() not in RETRYABLE or time.monotonic() > deadline:
                    raise
                self.retries[what] += 1
                await asyncio.sleep(0.1)  # retry backoff: the other replica, or this one back
        raise AssertionError("unreachable")

    async def firings(self, schedule: str) -> list[pb.ScheduleFiring]:
        """Every firing of the schedule, oldest tick first."""

        async def listed(replica: Replica) -> list[pb.ScheduleFiring]:
            found: list[pb.ScheduleFiring] = []
            page_token = ""
            while True:
                page = await replica.stub.ListScheduleFirings(
                    pb.ListScheduleFiringsRequest(
                        parent=schedule, page_size=100, page_token=page_token
                    ),
                    metadata=self.caller.md,
                    timeout=CALL_DEADLINE_S,
                )
                found.extend(page.firings)
                page_token = page.next_page_token
                if not page_token:
                    return sorted(found, key=tick)

        return await self.call("ListScheduleFirings", listed)

    async def until(
        self,
        what: str,
        schedule: str,
        done: Callable[[list[pb.ScheduleFiring]], bool],
        within_s: float = SETTLE_S,
    ) -> list[pb.ScheduleFiring]:
        """The schedule's firings once ``done`` holds of them (polled, under a deadline)."""
        deadline = time.monotonic() + within_s
        while True:
            found = await self.firings(schedule)
            if done(found):
                return found
            assert time.monotonic() < deadline, f"{what}: {[summary(f) for f in found[-5:]]}"
            await asyncio.sleep(0.2)  # polling the stored firings, under a deadline

    async def runs(self, workspace: str) -> list[pb.Run]:
        async def listed(replica: Replica) -> list[pb.Run]:
            found: list[pb.Run] = []
            page_token = ""
            while True:
                page = await replica.stub.ListRuns(
                    pb.ListRunsRequest(parent=workspace, page_size=100, page_token=page_token),
                    metadata=self.caller.md,
                    timeout=CALL_DEADLINE_S,
                )
                found.extend(page.runs)
                page_token = page.next_page_token
                if not page_token:
                    return found

        return await self.call("ListRuns", listed)

    async def ended(self, workspace: str) -> list[pb.Run]:
        """The workspace's runs once none is queued or running (polled, under a deadline):
        a tick's firing is STARTED when its run is, not when the run ends."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            runs = await self.runs(workspace)
            going = [r.name for r in runs if r.state in (pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING)]
            if not going:
                return runs
            assert time.monotonic() < deadline, f"runs never ended: {going}"
            await asyncio.sleep(0.2)  # polling the stored runs, under a deadline

    async def conversations(self, workspace: str) -> dict[str, list[tuple[str, str]]]:
        """Each conversation of the workspace, and its user messages (name, text)."""

        async def listed(replica: Replica) -> dict[str, list[tuple[str, str]]]:
            assert replica.channel is not None
            stub = context_stub(replica.channel)
            names: list[str] = []
            page_token = ""
            while True:
                page = await stub.ListConversations(
                    cpb.ListConversationsRequest(
                        parent=workspace, page_size=100, page_token=page_token
                    ),
                    metadata=self.caller.md,
                    timeout=CALL_DEADLINE_S,
                )
                names.extend(c.name for c in page.conversations)
                page_token = page.next_page_token
                if not page_token:
                    break
            return {
                name: [
                    (message.name, "".join(part.text for part in message.parts))
                    for message in await all_messages(stub, self.caller, name)
                    if message.role == cpb.MESSAGE_ROLE_USER
                ]
                for name in names
            }

        return await self.call("ListMessages", listed)

    async def fired_events(self, workspace: str) -> list[events_pb2.ScheduleFired]:
        async def listed(replica: Replica) -> list[events_pb2.ScheduleFired]:
            assert replica.channel is not None
            stub = events_pb2_grpc.EventServiceStub(replica.channel)
            found: list[events_pb2.ScheduleFired] = []
            page_token = ""
            while True:
                page = await stub.ListEvents(
                    events_pb2.ListEventsRequest(
                        scopes=[events_pb2.Scope(workspace=workspace)],
                        types=[events_pb2.EVENT_TYPE_SCHEDULE_FIRED],
                        page_size=500,
                        page_token=page_token,
                    ),
                    metadata=self.caller.md,
                    timeout=CALL_DEADLINE_S,
                )
                found.extend(event.schedule_fired for event in page.events)
                page_token = page.next_page_token
                if not page_token:
                    return found

        return await self.call("ListEvents", listed)


def summary(firing: pb.ScheduleFiring) -> str:
    outcome = pb.FiringOutcome.Name(firing.outcome).removeprefix("FIRING_OUTCOME_")
    return f"{firing.fire_time.ToJsonString()} {outcome}{' catch-up' if firing.catch_up else ''}"


def decided(firings: list[pb.ScheduleFiring], count: int) -> bool:
    return sum(f.outcome in DECIDED for f in firings) >= count


async def create_schedule(
    cluster: Cluster, workspace: str, schedule_id: str, policy: pb.MissedTickPolicy.ValueType
) -> pb.Schedule:
    request = pb.CreateScheduleRequest(
        parent=workspace,
        schedule_id=schedule_id,
        request_id=f"create-{schedule_id}",
        schedule=pb.Schedule(
            display_name=schedule_id,
            handler="handlers/echo",
            message_template=TEMPLATE,
            interval=duration_pb2.Duration(seconds=INTERVAL_S),
            conversation_mode=pb.SCHEDULE_CONVERSATION_MODE_PER_RUN,
            missed_tick_policy=policy,
        ),
    )

    async def created(replica: Replica) -> pb.Schedule:
        response = await replica.stub.CreateSchedule(
            request, metadata=cluster.caller.md, timeout=CALL_DEADLINE_S
        )
        return response.schedule

    return await cluster.call("CreateSchedule", created)


async def pause(cluster: Cluster, schedule: str) -> None:
    async def paused(replica: Replica) -> None:
        await replica.stub.PauseSchedule(
            pb.PauseScheduleRequest(name=schedule),
            metadata=cluster.caller.md,
            timeout=CALL_DEADLINE_S,
        )

    await cluster.call("PauseSchedule", paused)


@dataclass(frozen=True)
class Orphan:
    """The kill: who died, when, and the ticks it had claimed but not started."""

    victim: str
    killed_at: float
    #: (schedule, tick) of each.
    ticks: list[tuple[str, int]]
    #: Those claimed after runs were held: their runs were not stored when it died.
    aimed: list[tuple[str, int]]


async def kill_a_claimer(cluster: Cluster, database: AsyncEngine, schedules: list[str]) -> Orphan:
    """Hold every write of a run in PostgreSQL (a SHARE lock on ``runs``: reads go on)
    until a tick is claimed, then SIGKILL the replica that claimed it. A tick claimed
    after the lock was granted cannot have its run stored (one claimed before may have:
    its run stored, its firing not yet settled, also a case the takeover must get right)."""
    async with database.connect() as db:
        await db.execute(text("SET LOCAL lock_timeout = '10s'"))
        await db.execute(text("LOCK TABLE runs IN SHARE MODE"))
        # Claims are stamped by the replicas on this machine's clock.
        locked_at = time.time()
        deadline = time.monotonic() + SETTLE_S
        while True:
            claimed = [c for c in await claimers(db, schedules) if c.claimed_at > locked_at]
            if claimed:
                break
            assert time.monotonic() < deadline, "no tick was claimed while runs were held"
            await asyncio.sleep(0.02)  # polling the claims, under a deadline
        victim = next(r for r in cluster.replicas if r.name == claimed[0].claimer)
        victim.kill()
        killed_at = time.time()
        held = [c for c in await claimers(db, schedules) if c.claimer == victim.name]
        await db.rollback()
    return Orphan(
        victim.name,
        killed_at,
        ticks=sorted((c.schedule, c.tick) for c in held),
        aimed=sorted((c.schedule, c.tick) for c in held if c.claimed_at > locked_at),
    )


@dataclass(frozen=True)
class Claim:
    schedule: str
    tick: int
    claimer: str
    claimed_at: float


async def claimers(db: AsyncConnection, schedules: list[str]) -> list[Claim]:
    """Each firing claimed and not yet settled, as stored (the claimer is in no
    response)."""
    found: list[Claim] = []
    for schedule in schedules:
        _, workspace_id, _, schedule_id = schedule.split("/")
        rows = await db.execute(
            text(
                "SELECT fire_us, claimer, claim_time FROM schedule_firings WHERE"
                " workspace_id = :w AND schedule_id = :s AND outcome = :claimed"
                " ORDER BY fire_us"
            ),
            {"w": workspace_id, "s": schedule_id, "claimed": pb.FIRING_OUTCOME_CLAIMED},
        )
        found.extend(
            Claim(schedule, int(us), str(claimer), stamp.timestamp())
            for us, claimer, stamp in rows.all()
        )
    return found


def letter(firing: pb.ScheduleFiring) -> str:
    """A firing as one letter: S started, C the catch-up run, K skipped, F failed,
    c still claimed."""
    if firing.outcome == pb.FIRING_OUTCOME_STARTED:
        return "C" if firing.catch_up else "S"
    return {
        pb.FIRING_OUTCOME_SKIPPED: "K",
        pb.FIRING_OUTCOME_FAILED: "F",
        pb.FIRING_OUTCOME_CLAIMED: "c",
    }.get(firing.outcome, "?")


@dataclass(frozen=True)
class Seen:
    """What the test read once everything had settled."""

    #: Each schedule's firings, oldest tick first.
    firings: dict[str, list[pb.ScheduleFiring]]
    runs: list[pb.Run]
    #: Each conversation of the workspace and its user messages (name, text).
    conversations: dict[str, list[tuple[str, str]]]
    events: list[events_pb2.ScheduleFired]
    orphan: Orphan
    stopped_at: float
    restarted_at: float


def lateness(seen: Seen) -> str:
    """How late ticks were claimed, and their runs created, after their ticks (the
    first part's and the restart's ticks, not the outage's): for the record."""
    runs = {run.name: run for run in seen.runs}
    orphaned = set(seen.orphan.ticks)
    claimed: list[tuple[float, int]] = []
    created: list[float] = []
    taken: list[float] = []
    for name, found in seen.firings.items():
        for index, firing in enumerate(found):
            if firing.outcome == pb.FIRING_OUTCOME_SKIPPED or firing.catch_up:
                continue
            if not seen.stopped_at - GRACE_S < seconds(firing.fire_time) < seen.restarted_at:
                claimed.append((seconds(firing.claim_time) - seconds(firing.fire_time), index))
            run = runs.get(firing.run)
            if run is None:
                continue
            delay = seconds(run.create_time) - seconds(firing.fire_time)
            if (name, tick(firing)) in orphaned:
                taken.append(delay)
            elif not seen.stopped_at - GRACE_S < seconds(firing.fire_time) < seen.restarted_at:
                created.append(delay)
    claimed.sort()
    created.sort()
    if not claimed or not created:
        return "nothing fired"
    return (
        f"ticks claimed after: median {claimed[len(claimed) // 2][0]:.3f} s, "
        f"max {claimed[-1][0]:.3f} s (tick {claimed[-1][1]}); runs created after: median "
        f"{created[len(created) // 2]:.3f} s, max {created[-1]:.3f} s; "
        f"orphaned ticks' runs {[round(t, 2) for t in taken]} s"
    )


def check(seen: Seen) -> None:
    runs = {run.name: run for run in seen.runs}
    # Every run of the workspace is a schedule's, and succeeded.
    assert {run.schedule for run in seen.runs} <= set(seen.firings)
    assert {
        n: pb.RunState.Name(r.state) for n, r in runs.items() if r.state != pb.RUN_STATE_SUCCEEDED
    } == {}
    by_tick: dict[tuple[str, int], pb.ScheduleFiring] = {}
    for name, found in seen.firings.items():
        ticks = [tick(f) for f in found]
        assert len(set(ticks)) == len(ticks), name
        # Every tick from the first to the last once, one interval apart; but the loop
        # records the latest MAX_RECORDED_MISSED ticks of a longer outage, and the oldest
        # of those says earlier ones were missed too: one gap there, with no run in it.
        gaps = [
            (after, b - a)
            for after, (a, b) in zip(found[1:], itertools.pairwise(ticks), strict=True)
            if b - a != INTERVAL_US
        ]
        assert len(gaps) <= 1, (name, [(summary(f), step) for f, step in gaps])
        for after, step in gaps:
            assert step % INTERVAL_US == 0, (name, step)
            assert after.outcome == pb.FIRING_OUTCOME_SKIPPED, summary(after)
            assert "earlier ticks were missed too" in after.error.message, after.error.message
        by_tick.update({(name, t): f for t, f in zip(ticks, found, strict=True)})
        # A started tick names its run, and the run is this schedule's; no other does.
        for firing in found:
            assert bool(firing.run) == (firing.outcome == pb.FIRING_OUTCOME_STARTED), summary(
                firing
            )
        started = [f.run for f in found if f.run]
        assert len(started) == len(set(started)), [r for r, n in Counter(started).items() if n > 1]
        assert set(started) == {n for n, r in runs.items() if r.schedule == name}
        # Part 1 ran every tick; then the outage's ticks were missed (the first of
        # them past the grace at the restart), and it went on.
        letters = "".join(letter(f) for f in found)
        missed = [f for f in found if f.outcome == pb.FIRING_OUTCOME_SKIPPED or f.catch_up]
        assert missed, letters
        # Due after the stop began (but for the grace), and claimed after the restart:
        # the first replica up claims them, maybe before the test saw the second up.
        assert all(
            seen.stopped_at - GRACE_S < seconds(f.fire_time) <= seconds(f.claim_time)
            and seconds(f.claim_time) > seen.stopped_at
            for f in missed
        ), [summary(f) for f in missed]
        assert all(f.error.message for f in missed if f.outcome == pb.FIRING_OUTCOME_SKIPPED)
        # All claimed at once, on the restart, when the first tick due after the stop was
        # older than the grace.
        assert len({f.claim_time.ToMicroseconds() for f in missed}) == 1
        before = found[found.index(missed[0]) - 1]
        first_due = tick(before) + INTERVAL_US
        assert missed[0].claim_time.ToMicroseconds() - first_due > GRACE_S * 1e6
        assert len(missed) <= MAX_RECORDED_MISSED
        assert bool(gaps) == (len(missed) == MAX_RECORDED_MISSED and tick(missed[0]) > first_due)
        if name.endswith("/minute"):
            assert re.fullmatch(rf"S{{{TICKS - 2},}}K{{{MISSED},}}S{{{AFTER},}}", letters), letters
        else:
            # RUN_ONCE: one run for the missed ticks, for the latest of them.
            assert re.fullmatch(rf"S{{{TICKS - 2},}}K{{{MISSED - 1},}}CS{{{AFTER},}}", letters), (
                letters
            )
    # Each run in a conversation of its own, holding its tick's message and no other;
    # and no conversation without a run (a tick sent twice would leave one).
    of_run = {conversation_of(run): run for run in seen.runs}
    assert len(of_run) == len(runs)
    assert set(seen.conversations) == set(of_run)
    for conversation, texts in seen.conversations.items():
        run = of_run[conversation]
        firing = next(f for (n, _), f in by_tick.items() if f.run == run.name and n == run.schedule)
        assert texts == [(run.input_message, rendered(run.schedule, firing))], summary(firing)
    # The orphaned ticks: claimed by the dead replica, each started once (the checks
    # above: one firing, one run). Those it claimed while runs were held had no run when
    # it died: theirs was made by the survivor after its lease ran out (a scan every
    # third of a lease), not much later: late by what the kill costs, never lost.
    assert seen.orphan.aimed
    assert set(seen.orphan.aimed) <= set(seen.orphan.ticks)
    for orphaned in seen.orphan.ticks:
        assert by_tick[orphaned].outcome == pb.FIRING_OUTCOME_STARTED, summary(by_tick[orphaned])
    for orphaned in seen.orphan.aimed:
        taken_s = seconds(runs[by_tick[orphaned].run].create_time) - seen.orphan.killed_at
        assert 0 < taken_s < TAKEN_OVER_WITHIN_S, taken_s
    # One SCHEDULE_FIRED event per decided firing, saying what ListScheduleFirings says.
    final = Counter(
        (e.schedule, tick(e.firing), e.firing.outcome, e.firing.run, e.firing.catch_up)
        for e in seen.events
        if e.firing.outcome in DECIDED
    )
    assert final == Counter((n, t, f.outcome, f.run, f.catch_up) for (n, t), f in by_tick.items())


def conversation_of(run: pb.Run) -> str:
    return run.name.rsplit("/runs/", 1)[0]


def rendered(schedule: str, firing: pb.ScheduleFiring) -> str:
    """The template as the tick renders it (the display name is the id; an interval
    schedule's zone is UTC)."""
    fire_time = EPOCH + dt.timedelta(microseconds=tick(firing))
    return f"{schedule.rsplit('/', 1)[1]} at {fire_time.isoformat()}"


async def test_ticks_run_exactly_once_through_a_sigkill_and_a_full_stop(
    env: dict[str, str], postgres_engine: AsyncEngine
) -> None:
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        replicas = [Replica(name, env, stack) for name in REPLICAS]
        await asyncio.gather(*(replica.start() for replica in replicas))
        try:
            first = replicas[0]
            assert first.channel is not None
            assert first.process is not None
            caller = await sign_up(first.process.address, "schedules")
            workspace = (
                await create_workspace(context_stub(first.channel), caller, "Schedules")
            ).name
            cluster = Cluster(replicas, caller)
            minute = await create_schedule(cluster, workspace, "minute", pb.MISSED_TICK_POLICY_SKIP)
            catch_up = await create_schedule(
                cluster, workspace, "catch-up", pb.MISSED_TICK_POLICY_RUN_ONCE
            )
            names = [minute.name, catch_up.name]

            # 1. Twenty ticks of firing, a claimer killed half way.
            await cluster.until("half the ticks", minute.name, lambda f: decided(f, TICKS // 2))
            orphan = await kill_a_claimer(cluster, postgres_engine, names)
            victim = next(r for r in replicas if r.name == orphan.victim)

            for name in names:
                mine = {t for s, t in orphan.ticks if s == name}
                await cluster.until(
                    "the orphaned ticks taken over",
                    name,
                    lambda found: all(f.outcome in DECIDED for f in found if tick(f) in mine),  # noqa: B023 - awaited here
                )
            taken_over_s = time.time() - orphan.killed_at
            await victim.start()
            back_at = time.time()
            for name in names:
                await cluster.until(
                    "firing on with the killed replica back",
                    name,
                    lambda found: (
                        sum(
                            f.outcome == pb.FIRING_OUTCOME_STARTED
                            and seconds(f.fire_time) > back_at
                            for f in found
                        )
                        >= AFTER
                    ),
                )
            minute_firings = await cluster.until(
                "the first part's ticks", minute.name, lambda f: decided(f, TICKS)
            )

            # 2. Every replica stopped for longer than the grace, then started again.
            stopping = time.monotonic()
            await asyncio.gather(*(replica.stop() for replica in replicas))
            stopped_at = time.time()
            stop_s = time.monotonic() - stopping
            # The outage is the scenario, not a synchronisation: nothing fires meanwhile,
            # and the ticks due in its first seconds (at least MISSED) are past the grace
            # at the restart; those due within the grace then fire as usual.
            await asyncio.sleep(GRACE_S + (MISSED + 1) * INTERVAL_S)
            starting = time.monotonic()
            await asyncio.gather(*(replica.start() for replica in replicas))
            restarted_at = time.time()
            start_s = time.monotonic() - starting
            for name in names:
                await cluster.until(
                    "firing again after the restart",
                    name,
                    lambda found: (
                        sum(
                            f.outcome == pb.FIRING_OUTCOME_STARTED
                            and seconds(f.fire_time) > restarted_at
                            for f in found
                        )
                        >= AFTER
                    ),
                )
            for name in names:
                await pause(cluster, name)
            for name in names:
                await cluster.until(
                    "every claim decided",
                    name,
                    lambda found: all(f.outcome in DECIDED for f in found),
                )

            firings = {name: await cluster.firings(name) for name in names}
            runs = await cluster.ended(workspace)
            conversations = await cluster.conversations(workspace)
            events = await cluster.fired_events(workspace)
        finally:
            for replica in replicas:
                await replica.close()
    print(
        f"{time.monotonic() - started:.1f} s in all; killed {orphan.victim} holding ticks "
        f"{orphan.ticks} (aimed {orphan.aimed}), taken over {taken_over_s:.1f} s after the "
        f"kill; SIGTERM took "
        f"{stop_s:.1f} s, away {restarted_at - stopped_at:.1f} s (starting {start_s:.1f} s); "
        f"retries {dict(cluster.retries)}; "
        + "; ".join(
            f"{name}: {''.join(letter(f) for f in found)}" for name, found in firings.items()
        )
    )
    seen = Seen(firings, runs, conversations, events, orphan, stopped_at, restarted_at)
    print(lateness(seen))
    check(seen)
    assert len(minute_firings) >= TICKS
