"""Helpers for schedule tests: a mesh with a populated workspace, the RPCs, and firing
loops of the test's own on a controllable clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from google.protobuf import field_mask_pb2
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.context.domain import ContextDomain
from switchboard.dispatcher.ports.context import LocalContext
from switchboard.dispatcher.schedules.firing import Firing, FiringSettings
from switchboard.dispatcher.schedules.store import ScheduleStore
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import built
from tests.infra.clock import FakeClock
from tests.kits.contextkit import TIMEOUT_S, Caller, World, context_stub, ctx_world
from tests.kits.dispatchkit import Stub, dispatcher_stub
from tests.kits.integrationkit import hub_mesh

#: Schedules a workspace may hold in these meshes.
QUOTA = 3
#: A day the tests' clocks start from: after today, so the mesh's own loop (on the real
#: clock) never finds their schedules due.
DAY = "2027-01-04T12:00:00+00:00"


@dataclass(frozen=True)
class Desk:
    server: SwitchboardServer
    channel: aio.Channel
    stub: Stub
    world: World

    @property
    def dispatcher(self) -> Dispatcher:
        return built(self.server, Dispatcher)


@asynccontextmanager
async def desk_mesh(**overrides: Any) -> AsyncIterator[Desk]:
    values: dict[str, Any] = {
        "schedules_max_per_workspace": QUOTA,
        "schedules_min_interval_s": 1.0,
    }
    values.update(overrides)
    async with hub_mesh(**values) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        yield Desk(server, channel, dispatcher_stub(channel), world)


# A schedule test module's fixture, bound there as ``desk = desk_fixture`` (pytest
# registers a module's fixture under the attribute's name).
@pytest.fixture
async def desk_fixture(database_url: str) -> AsyncIterator[Desk]:
    """A desk on the test's database (``database_url``: SQLite, or PostgreSQL too)."""
    async with desk_mesh(database_url=database_url) as made:
        yield made


def on(desk: Desk, clock: FakeClock) -> None:
    """The catalog computes next fire times on ``clock`` too."""
    desk.dispatcher.schedules.clock = clock


def at(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 instant (for a FakeClock)."""
    return dt.datetime.fromisoformat(text).timestamp()


def loop(desk: Desk, clock: FakeClock, instance: str, **settings: Any) -> Firing:
    """A firing loop of the test's own over the mesh's database and admission, driven by
    ``run_once`` on ``clock`` (never started as a task)."""
    dispatcher = desk.dispatcher
    shared = desk.server.shared

    async def send(principal: Any, request: pb.SendMessageRequest, schedule: str) -> Any:
        return await dispatcher.send_message(principal, request, schedule=schedule)

    return Firing(
        store=ScheduleStore(shared.database),
        bus=shared.bus,
        context=LocalContext(built(desk.server, ContextDomain)),
        policy=shared.policy,
        send=send,
        settings=FiringSettings(instance_id=instance, **settings),
        clock=clock,
    )


def every(seconds: int) -> pb.Schedule:
    schedule = pb.Schedule(display_name="Tick", message_template="tick {{fire_time}}")
    schedule.interval.seconds = seconds
    return schedule


def cron(expression: str, zone: str = "") -> pb.Schedule:
    return pb.Schedule(
        display_name="Cron", message_template="hello {{date}}", cron=expression, time_zone=zone
    )


async def create(
    d: Desk,
    schedule: pb.Schedule,
    *,
    schedule_id: str = "",
    request_id: str = "",
    caller: Caller | None = None,
) -> pb.Schedule:
    response = await d.stub.CreateSchedule(
        pb.CreateScheduleRequest(
            parent=d.world.name,
            schedule=schedule,
            schedule_id=schedule_id,
            request_id=request_id,
        ),
        metadata=(caller or d.world.owner).md,
        timeout=TIMEOUT_S,
    )
    return response.schedule


async def get(d: Desk, name: str, caller: Caller | None = None) -> pb.Schedule:
    response = await d.stub.GetSchedule(
        pb.GetScheduleRequest(name=name), metadata=(caller or d.world.owner).md, timeout=TIMEOUT_S
    )
    return response.schedule


async def update(
    d: Desk, schedule: pb.Schedule, *paths: str, caller: Caller | None = None
) -> pb.Schedule:
    response = await d.stub.UpdateSchedule(
        pb.UpdateScheduleRequest(
            schedule=schedule, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        ),
        metadata=(caller or d.world.owner).md,
        timeout=TIMEOUT_S,
    )
    return response.schedule


async def listed(d: Desk, caller: Caller | None = None) -> list[pb.Schedule]:
    found: list[pb.Schedule] = []
    token = ""
    while True:
        page = await d.stub.ListSchedules(
            pb.ListSchedulesRequest(parent=d.world.name, page_size=2, page_token=token),
            metadata=(caller or d.world.owner).md,
            timeout=TIMEOUT_S,
        )
        found.extend(page.schedules)
        token = page.next_page_token
        if not token:
            return found


async def firings(
    d: Desk, name: str, *, page_size: int = 100, caller: Caller | None = None
) -> list[pb.ScheduleFiring]:
    found: list[pb.ScheduleFiring] = []
    token = ""
    while True:
        page = await d.stub.ListScheduleFirings(
            pb.ListScheduleFiringsRequest(parent=name, page_size=page_size, page_token=token),
            metadata=(caller or d.world.owner).md,
            timeout=TIMEOUT_S,
        )
        found.extend(page.firings)
        token = page.next_page_token
        if not token:
            return found
