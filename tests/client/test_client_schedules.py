"""switchboard.client against a real in-process server: schedules, through the client's
own methods (create, get, list, update with the etag, pause, resume, firings, delete)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.client import Client, EtagMismatch, InvalidArgument, NotFound
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.client.test_clientkit import PASSWORD, new_workspace, unique_email
from tests.conftest import make_settings, started

pytestmark = pytest.mark.service

DEADLINE_S = 30.0


@pytest.fixture
def settings() -> Settings:
    # Ticks a second apart, so a test sees its schedule fire.
    return make_settings(schedules_min_interval_s=1)


@pytest.fixture
async def signed_in(settings: Settings) -> AsyncIterator[tuple[Client, str]]:
    server: SwitchboardServer
    async with started(settings) as server, Client(server.address) as client:
        await client.register(unique_email("schedules"), PASSWORD)
        yield client, await new_workspace(client)


async def test_a_schedule_is_made_fires_changes_pauses_and_goes(
    signed_in: tuple[Client, str],
) -> None:
    client, workspace = signed_in
    # A cron expression that does not parse: refused on its field, nothing stored.
    with pytest.raises(InvalidArgument) as bad:
        await client.create_schedule(workspace, "tick", cron="every minute", handler="echo")
    assert any(v.field.endswith("cron") for v in bad.value.violations)
    assert await client.list_schedules(workspace) == []

    async with client.follow([workspace], types=["SCHEDULE_FIRED"]) as fired:
        await asyncio.wait_for(fired.ready(), DEADLINE_S)
        schedule = await client.create_schedule(
            workspace,
            "tick of {{schedule}}",
            interval_s=1,
            handler="echo",
            display_name="Ticker",
            schedule_id="ticker",
        )
        assert schedule.name == f"{workspace}/schedules/ticker"
        assert schedule.state == pb.SCHEDULE_STATE_ACTIVE
        assert schedule.interval.seconds == 1
        assert schedule.HasField("next_fire_time")
        # Its first firing, as the event says it.
        event = await asyncio.wait_for(anext(fired), DEADLINE_S)
    assert event.schedule_fired.schedule == schedule.name
    firings = await client.schedule_firings(schedule)
    assert event.schedule_fired.firing.fire_time in [f.fire_time for f in firings]
    assert all(f.outcome != pb.FIRING_OUTCOME_UNSPECIFIED for f in firings)

    assert [s.name for s in await client.list_schedules(workspace)] == [schedule.name]
    current = await client.get_schedule(schedule.name)
    current.display_name = "Ticker, renamed"
    renamed = await client.update_schedule(current, ["display_name"])
    assert renamed.display_name == "Ticker, renamed"
    assert renamed.etag != current.etag
    # The version read before the rename is stale now.
    current.display_name = "Lost update"
    with pytest.raises(EtagMismatch):
        await client.update_schedule(current, ["display_name"])

    paused = await client.pause_schedule(renamed.name)
    assert paused.state == pb.SCHEDULE_STATE_PAUSED
    assert not paused.HasField("next_fire_time")
    resumed = await client.resume_schedule(paused)
    assert resumed.state == pb.SCHEDULE_STATE_ACTIVE
    await client.delete_schedule(resumed.name)
    with pytest.raises(NotFound):
        await client.get_schedule(resumed.name)
