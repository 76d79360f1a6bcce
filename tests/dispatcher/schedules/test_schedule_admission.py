"""Budgets and quotas apply to a schedule's runs as to anyone's: a tick is an ordinary
message through SendMessage's admission, as the schedule's creator. A tick whose
workspace has a budget with no room, or whose messages-per-minute quota is spent, is
recorded as a FAILED firing with the refusal's own status (RESOURCE_EXHAUSTED,
BUDGET_EXHAUSTED naming the budget; RATE_LIMITED with when to retry), its
SCHEDULE_FIRED event says the same, and no run and no message is stored for it.
In one process, on SQLite and PostgreSQL; the schedules fire every second (the
minimum interval lowered for the test), and every wait is on a SCHEDULE_FIRED event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.budgets.ledger import Amount, Hold, Ledger
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.contextkit import Stub, World, all_messages, stub_fixture, tap, world_fixture
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import dispatcher_stub

pytestmark = pytest.mark.service

stub, world = stub_fixture, world_fixture

M = TypeVar("M", error_details_pb2.ErrorInfo, error_details_pb2.QuotaFailure)

#: The schedules' interval: the minimum, lowered for the test.
INTERVAL_S = 1
#: How long a test waits for a firing: a few ticks on a loaded machine.
FIRED_WITHIN_S = 30.0


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(
        database_url=database_url,
        schedules_min_interval_s=INTERVAL_S,
    )


@pytest.fixture
def dstub(channel: aio.Channel) -> DStub:
    return dispatcher_stub(channel)


def unpacked(status: status_pb2.Status, kind: type[M]) -> M | None:
    """The first detail of ``kind`` in a stored status, if any."""
    for packed in status.details:
        found = kind()
        if packed.Unpack(found):
            return found
    return None


def reason_in(status: status_pb2.Status) -> str:
    info = unpacked(status, error_details_pb2.ErrorInfo)
    return info.reason if info is not None else ""


async def create_schedule(dstub: DStub, world: World, schedule_id: str) -> pb.Schedule:
    """A schedule of the owner's: the echo handler every second, one conversation."""
    response = await dstub.CreateSchedule(
        pb.CreateScheduleRequest(
            parent=world.name,
            schedule_id=schedule_id,
            schedule=pb.Schedule(
                display_name="Every second",
                handler="handlers/echo",
                message_template="tick {{fire_time}}",
                interval=duration_pb2.Duration(seconds=INTERVAL_S),
                conversation_mode=pb.SCHEDULE_CONVERSATION_MODE_SHARED,
            ),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.schedule


@asynccontextmanager
async def firing(
    mesh: SwitchboardServer, dstub: DStub, world: World, schedule_id: str, count: int
) -> AsyncIterator[tuple[pb.Schedule, list[pb.ScheduleFiring]]]:
    """A new schedule, paused once ``count`` of its ticks have a final outcome; yields
    it and those firings (their SCHEDULE_FIRED events'), oldest first."""
    decided: list[pb.ScheduleFiring] = []
    enough = asyncio.Event()
    settled = asyncio.Event()
    name = f"{world.name}/schedules/{schedule_id}"

    def heard(event: events_pb2.Event) -> None:
        if event.type != events_pb2.EVENT_TYPE_SCHEDULE_FIRED:
            return
        fired = event.schedule_fired
        if fired.schedule == name and fired.firing.outcome != pb.FIRING_OUTCOME_CLAIMED:
            decided.append(fired.firing)
            settled.set()
            if len(decided) >= count:
                enough.set()

    stop = mesh.shared.bus.listen(heard)
    try:
        schedule = await create_schedule(dstub, world, schedule_id)
        async with asyncio.timeout(FIRED_WITHIN_S):
            await enough.wait()
        await dstub.PauseSchedule(
            pb.PauseScheduleRequest(name=schedule.name),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        # A tick claimed before the pause still ends after it (under load one was read
        # while CLAIMED): the schedule is quiet once no stored firing is in flight.
        async with asyncio.timeout(FIRED_WITHIN_S):
            while True:
                settled.clear()
                stored = await firings(dstub, world, schedule.name)
                if all(f.outcome != pb.FIRING_OUTCOME_CLAIMED for f in stored):
                    break
                await settled.wait()  # the next tick of it that ends
    finally:
        stop()
    yield schedule, sorted(decided, key=lambda f: f.fire_time.ToNanoseconds())


async def firings(dstub: DStub, world: World, schedule: str) -> list[pb.ScheduleFiring]:
    """Every firing of the schedule, oldest first."""
    found: list[pb.ScheduleFiring] = []
    page_token = ""
    while True:
        page = await dstub.ListScheduleFirings(
            pb.ListScheduleFiringsRequest(parent=schedule, page_size=100, page_token=page_token),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        found.extend(page.firings)
        page_token = page.next_page_token
        if not page_token:
            return sorted(found, key=lambda f: f.fire_time.ToNanoseconds())


async def runs_of(dstub: DStub, world: World) -> list[pb.Run]:
    response = await dstub.ListRuns(
        pb.ListRunsRequest(parent=world.name, page_size=100),
        metadata=world.viewer.md,
        timeout=CALL_DEADLINE_S,
    )
    return list(response.runs)


async def user_messages(stub: Stub, world: World, conversation: str) -> list[str]:
    return [
        "".join(part.text for part in message.parts)
        for message in await all_messages(stub, world.viewer, conversation)
        if message.role == cpb.MESSAGE_ROLE_USER
    ]


async def test_a_tick_a_spent_budget_has_no_room_for_fails_and_starts_no_run(
    mesh: SwitchboardServer, stub: Stub, dstub: DStub, world: World
) -> None:
    budget = (
        await dstub.CreateBudget(
            pb.CreateBudgetRequest(
                parent=world.name,
                budget_id="daily",
                budget=pb.Budget(
                    display_name="Daily",
                    scope=world.name,
                    period=pb.BUDGET_PERIOD_DAY,
                    cost_limit_micros=5,
                ),
            ),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    ).budget
    # Spent, as a run that cost the whole cap would have spent it.
    ledger = Ledger(mesh.shared.database)
    hold = await ledger.reserve(await ledger.applicable(world.id), "spent", Amount(cost_micros=5))
    assert isinstance(hold, Hold)
    await ledger.settle(hold, Amount(cost_micros=5))

    with tap(mesh) as events:
        async with firing(mesh, dstub, world, "spent", 2) as (schedule, fired):
            stored = await firings(dstub, world, schedule.name)
            runs = await runs_of(dstub, world)
            asked = await user_messages(stub, world, schedule.conversation)
        seen = events.take()

    assert len(fired) >= 2
    for one in fired:
        assert one.outcome == pb.FIRING_OUTCOME_FAILED
        assert not one.run
        assert one.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert reason_in(one.error) == "ERROR_REASON_BUDGET_EXHAUSTED"
        failure = unpacked(one.error, error_details_pb2.QuotaFailure)
        assert failure is not None
        assert [v.subject for v in failure.violations] == [budget.name]
    # ListScheduleFirings says what the events said, tick for tick.
    assert [(f.fire_time, f.outcome, f.error) for f in stored[: len(fired)]] == [
        (f.fire_time, f.outcome, f.error) for f in fired
    ]
    assert {f.outcome for f in stored} == {pb.FIRING_OUTCOME_FAILED}
    # Nothing was stored for any tick: no run, no message in its conversation.
    assert runs == []
    assert asked == []
    # The budget said why, as it does to a person whose message it refuses.
    alerts = [e.budget_alert for e in seen if e.type == events_pb2.EVENT_TYPE_BUDGET_ALERT]
    assert alerts
    assert {a.kind for a in alerts} == {events_pb2.BUDGET_ALERT_KIND_MESSAGE_REFUSED}


async def test_a_tick_past_the_workspaces_messages_per_minute_fails_and_starts_no_run(
    stub: Stub, dstub: DStub, world: World, mesh: SwitchboardServer
) -> None:
    # One message a minute in the workspace: the first tick takes it.
    await dstub.UpdateWorkspaceQuota(
        pb.UpdateWorkspaceQuotaRequest(
            quota=pb.WorkspaceQuota(name=f"{world.name}/quota", messages_per_minute=1),
            update_mask=field_mask_pb2.FieldMask(paths=["messages_per_minute"]),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )

    async with firing(mesh, dstub, world, "quota", 2) as (schedule, fired):
        stored = await firings(dstub, world, schedule.name)
        runs = await runs_of(dstub, world)
        asked = await user_messages(stub, world, schedule.conversation)

    first, *later = fired
    assert first.outcome == pb.FIRING_OUTCOME_STARTED
    assert later
    for one in later:
        assert one.outcome == pb.FIRING_OUTCOME_FAILED
        assert not one.run
        assert one.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert reason_in(one.error) == "ERROR_REASON_RATE_LIMITED"
        assert "in this workspace" in one.error.message
    assert [(f.fire_time, f.outcome, f.run) for f in stored[: len(fired)]] == [
        (f.fire_time, f.outcome, f.run) for f in fired
    ]
    # The first tick's run, and no other: one run of the schedule, one message.
    assert [(run.name, run.schedule) for run in runs] == [(first.run, schedule.name)]
    assert len(asked) == 1
