"""Helpers for schedule tests: a mesh with a populated workspace, the RPCs, and firing
loops of the test's own on a controllable clock.

A schedule test module shares one mesh per backend among its tests and gives each a
desk (a workspace and users) of its own; it binds the fixtures under the names its
tests take, and runs its tests on the module's event loop (the mesh's)::

    pytestmark = pytest.mark.asyncio(loop_scope="module")
    module_database_url = module_database_url_fixture
    desk_server, desk = desk_server_fixture, desk_fixture
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest_asyncio
from google.protobuf import field_mask_pb2
from grpc import aio
from sqlalchemy import delete
from sqlalchemy.orm import Session

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.context.domain import ContextDomain
from switchboard.dispatcher.ports.context import LocalContext
from switchboard.dispatcher.schedules.firing import Firing, FiringSettings, Send
from switchboard.dispatcher.schedules.store import ScheduleStore
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.policy import Principal
from switchboard.platform.store.models import ScheduleFiringRow, ScheduleRow
from tests.conftest import CALL_DEADLINE_S, built
from tests.infra.clock import FakeClock
from tests.kits.contextkit import Caller, World, context_stub, ctx_world
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


def _desk_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {
        "schedules_max_per_workspace": QUOTA,
        "schedules_min_interval_s": 1.0,
    }
    values.update(overrides)
    return values


@asynccontextmanager
async def desk_mesh(**overrides: Any) -> AsyncIterator[Desk]:
    async with hub_mesh(**_desk_settings(overrides)) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        yield Desk(server, channel, dispatcher_stub(channel), world)


# A schedule test module's fixtures, bound there as ``desk_server, desk =
# desk_server_fixture, desk_fixture`` beside ``module_database_url`` (pytest registers
# a module's fixture under the attribute's name).
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def desk_server_fixture(
    module_database_url: str,
) -> AsyncIterator[tuple[SwitchboardServer, aio.Channel]]:
    """The module's mesh on its database (SQLite, or PostgreSQL too), and a channel to it."""
    async with hub_mesh(**_desk_settings({"database_url": module_database_url})) as made:
        yield made


@pytest_asyncio.fixture(loop_scope="module")
async def desk_fixture(
    desk_server: tuple[SwitchboardServer, aio.Channel],
) -> AsyncIterator[Desk]:
    """A desk of the test's own on the module's mesh: a new workspace and users. Firing
    loops claim due ticks of every workspace, and a loop's claimer name (``replica-a``)
    recurs across tests, so the test's schedules and firings go with it, and the
    catalog gets its real clock back (``on``)."""
    server, channel = desk_server
    world = await ctx_world(server, context_stub(channel))
    made = Desk(server, channel, dispatcher_stub(channel), world)
    catalog = made.dispatcher.schedules
    clock = catalog.clock
    try:
        yield made
    finally:
        catalog.clock = clock

        def forget(db: Session) -> None:
            db.execute(delete(ScheduleFiringRow).where(ScheduleFiringRow.workspace_id == world.id))
            db.execute(delete(ScheduleRow).where(ScheduleRow.workspace_id == world.id))

        await server.shared.database.run(forget, write=True)


def on(desk: Desk, clock: FakeClock) -> None:
    """The catalog computes next fire times on ``clock`` too."""
    desk.dispatcher.schedules.clock = clock


def at(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 instant (for a FakeClock)."""
    return dt.datetime.fromisoformat(text).timestamp()


def loop(
    desk: Desk, clock: FakeClock, instance: str, send: Send | None = None, **settings: Any
) -> Firing:
    """A firing loop of the test's own over the mesh's database and admission, driven by
    ``run_once`` on ``clock`` (never started as a task); ``send`` in place of admission's
    (a test's own that wraps ``admit``)."""
    shared = desk.server.shared
    return Firing(
        store=ScheduleStore(shared.database),
        bus=shared.bus,
        context=LocalContext(built(desk.server, ContextDomain)),
        policy=shared.policy,
        send=send or partial(admit, desk),
        settings=FiringSettings(instance_id=instance, **settings),
        clock=clock,
    )


async def admit(
    desk: Desk, principal: Principal, request: pb.SendMessageRequest, schedule: str
) -> pb.SendMessageResponse:
    """A tick sent through the mesh's admission, as the mesh's own loop sends it."""
    return await desk.dispatcher.send_message(principal, request, schedule=schedule)


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
        timeout=CALL_DEADLINE_S,
    )
    return response.schedule


async def get(d: Desk, name: str, caller: Caller | None = None) -> pb.Schedule:
    response = await d.stub.GetSchedule(
        pb.GetScheduleRequest(name=name),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
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
        timeout=CALL_DEADLINE_S,
    )
    return response.schedule


async def listed(d: Desk, caller: Caller | None = None) -> list[pb.Schedule]:
    found: list[pb.Schedule] = []
    token = ""
    while True:
        page = await d.stub.ListSchedules(
            pb.ListSchedulesRequest(parent=d.world.name, page_size=2, page_token=token),
            metadata=(caller or d.world.owner).md,
            timeout=CALL_DEADLINE_S,
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
            timeout=CALL_DEADLINE_S,
        )
        found.extend(page.firings)
        token = page.next_page_token
        if not token:
            return found
