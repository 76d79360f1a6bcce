"""A schedule's record as the contract shows it: ``pb.Schedule``, ``pb.ScheduleFiring``,
and their SCHEDULE_CHANGED and SCHEDULE_FIRED events."""

from __future__ import annotations

from google.rpc import status_pb2

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher import mapping
from switchboard.dispatcher.schedules import times
from switchboard.dispatcher.schedules.store import FiringRecord, ScheduleRecord
from switchboard.platform.values import names, timefields
from switchboard.platform.values.resources import CallName, RunName, ScheduleName, UserName

#: Fire times a schedule shows (``Schedule.upcoming_fire_times``).
UPCOMING = 5


def schedule_name(workspace_id: str, schedule_id: str) -> str:
    return str(ScheduleName(workspace_id, schedule_id))


def cadence(schedule: pb.Schedule) -> times.Cadence:
    """The ticks of a schedule's stored settings (validated when they were stored)."""
    if schedule.HasField("interval"):
        return times.Cadence(interval=schedule.interval.ToTimedelta())
    return times.Cadence(
        cron=schedule.cron, tz=timefields.zone(schedule.time_zone) or timefields.UTC_ZONE
    )


def message(record: ScheduleRecord) -> pb.Schedule:
    shown = pb.Schedule.FromString(record.data)
    shown.name = schedule_name(record.workspace_id, record.id)
    shown.state = record.state  # type: ignore[assignment]
    shown.creator = str(UserName(record.creator))
    if record.conversation_id:
        shown.conversation = mapping.conversation_name(record.workspace_id, record.conversation_id)
    if record.next_fire_us is not None and record.state == pb.SCHEDULE_STATE_ACTIVE:
        first = times.from_us(record.next_fire_us)
        shown.next_fire_time.FromDatetime(first)
        for tick in cadence(shown).upcoming(first, UPCOMING):
            shown.upcoming_fire_times.add().FromDatetime(tick)
    if record.last_fire_us is not None:
        shown.last_fire_time.FromDatetime(times.from_us(record.last_fire_us))
    # A schedule that calls keeps its last call's name there: not a run.
    shown.last_run = record.last_run if CallName.parse_or_none(record.last_run) is None else ""
    shown.etag = names.etag_of(record.version)
    shown.create_time.FromDatetime(record.created_at)
    shown.update_time.FromDatetime(record.updated_at)
    return shown


def firing(record: FiringRecord) -> pb.ScheduleFiring:
    shown = pb.ScheduleFiring(
        outcome=record.outcome,  # type: ignore[arg-type]
        catch_up=record.catch_up,
    )
    # A tick of a schedule that calls keeps its call's name where a run's would be.
    if CallName.parse_or_none(record.run) is not None:
        shown.call = record.run
    else:
        shown.run = record.run
    shown.fire_time.FromDatetime(times.from_us(record.fire_us))
    shown.claim_time.FromDatetime(record.claim_time)
    if record.error:
        shown.error.CopyFrom(status_pb2.Status.FromString(record.error))
    return shown


def changed_event(
    actor: events_pb2.Actor, change: events_pb2.ChangeKind.ValueType, record: ScheduleRecord
) -> events_pb2.Event:
    return events_pb2.Event(
        type=events_pb2.EVENT_TYPE_SCHEDULE_CHANGED,
        actor=actor,
        workspace=mapping.workspace_name(record.workspace_id),
        schedule_changed=events_pb2.ScheduleChanged(change=change, schedule=message(record)),
    )


def fired_event(record: FiringRecord) -> events_pb2.Event:
    """A tick's SCHEDULE_FIRED, on its workspace (and its run's conversation)."""
    event = events_pb2.Event(
        type=events_pb2.EVENT_TYPE_SCHEDULE_FIRED,
        actor=events_pb2.Actor(name=str(UserName(record.creator))) if record.creator else None,
        workspace=mapping.workspace_name(record.workspace_id),
        schedule_fired=events_pb2.ScheduleFired(
            schedule=schedule_name(record.workspace_id, record.schedule_id),
            firing=firing(record),
        ),
    )
    run = RunName.parse_or_none(record.run)
    if run is not None:
        event.conversation = str(run.parent)
    return event
