"""Schedules as a process builds them: the catalog of a workspace's schedules, and the
firing loop that sends their ticks."""

from __future__ import annotations

import datetime as dt

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.handlers.router import Router
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.schedules.catalog import ScheduleLimits, Schedules
from switchboard.dispatcher.schedules.firing import Firing, FiringSettings, Place, Send
from switchboard.dispatcher.schedules.settings import ScheduleSettings
from switchboard.dispatcher.schedules.store import ScheduleStore
from switchboard.platform.process import Shared


def schedules_catalog(
    shared: Shared, context: ContextPort, assistants: Assistants, router: Router
) -> Schedules:
    """A workspace's schedules; an assistant or a handler they name must exist."""
    settings = shared.section(ScheduleSettings)

    async def assistant(workspace_id: str, name: str, revision: int) -> pb.Assistant | None:
        if revision:
            return await assistants.resolve_revision(
                workspace_id, name, revision, "schedule.assistant_revision"
            )
        return await assistants.resolve(workspace_id, name, "schedule.assistant")

    async def handler_exists(workspace_id: str, handler_id: str) -> bool:
        return await router.find(workspace_id, handler_id) is not None

    return Schedules(
        ScheduleStore(shared.database),
        shared.bus,
        shared.page_tokens,
        context,
        ScheduleLimits(
            max_per_workspace=settings.schedules_max_per_workspace,
            min_interval=dt.timedelta(seconds=settings.schedules_min_interval_s),
        ),
        assistant=assistant,
        handler_exists=handler_exists,
    )


def schedule_firing(
    shared: Shared, context: ContextPort, send: Send, *, lease_s: float, place: Place
) -> Firing:
    """The firing loop: each tick sent by ``send`` (the dispatcher's admission, as the
    schedule's creator), or placed as a call by ``place`` for a schedule that calls;
    ``lease_s``: how long a replica's claim on a tick lasts."""
    settings = shared.section(ScheduleSettings)
    return Firing(
        store=ScheduleStore(shared.database),
        bus=shared.bus,
        context=context,
        policy=shared.policy,
        send=send,
        place=place,
        settings=FiringSettings(
            instance_id=shared.instance_id,
            poll_s=settings.schedules_poll_s,
            grace_s=settings.schedules_missed_grace_s,
            lease_s=lease_s,
        ),
    )
