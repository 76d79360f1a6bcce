"""Schedules (DispatcherService): CRUD with etags and masks, pause and resume, the
validation of every field with nothing stored on a refusal, the per-workspace limit,
idempotent creates, authorization and SCHEDULE_CHANGED events."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from google.protobuf import duration_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.kits.authkit import reason
from tests.kits.contextkit import context_stub, refused, tap, violations
from tests.kits.modulekit import module_database_url_fixture
from tests.kits.schedulekit import (
    QUOTA,
    Desk,
    create,
    cron,
    desk_fixture,
    desk_server_fixture,
    every,
    firings,
    get,
    listed,
    update,
)

# One mesh per backend for the module; each test has a workspace and users of its own,
# and its schedules and firings go with it (``desk_fixture``).
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

CODE = grpc.StatusCode
CHANGED = events_pb2.EVENT_TYPE_SCHEDULE_CHANGED


module_database_url = module_database_url_fixture
desk_server, desk = desk_server_fixture, desk_fixture


async def conversations(d: Desk) -> list[str]:
    page = await context_stub(d.channel).ListConversations(
        cpb.ListConversationsRequest(parent=d.world.name, page_size=100),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return [c.name for c in page.conversations]


async def test_create_get_list_update_delete_with_etags(desk: Desk) -> None:
    with tap(desk.server) as events:
        made = await create(desk, cron("30 2 * * *", "Europe/Berlin"), schedule_id="nightly")
        assert made.name == f"{desk.world.name}/schedules/nightly"
        assert made.state == pb.SCHEDULE_STATE_ACTIVE
        assert made.creator == f"users/{desk.world.owner.id}"
        assert made.conversation_mode == pb.SCHEDULE_CONVERSATION_MODE_SHARED
        assert made.conversation in await conversations(desk)
        assert made.concurrency_policy == pb.CONCURRENCY_POLICY_ENQUEUE
        assert made.missed_tick_policy == pb.MISSED_TICK_POLICY_SKIP
        upcoming = [t.ToDatetime(dt.UTC) for t in made.upcoming_fire_times]
        assert len(upcoming) == 5
        assert upcoming[0] == made.next_fire_time.ToDatetime(dt.UTC)
        assert all(
            t.astimezone(dt.timezone(dt.timedelta(hours=1))).hour in (2, 3) for t in upcoming
        )
        assert upcoming == sorted(upcoming)
        assert await get(desk, made.name, desk.world.viewer) == made
        assert [s.name for s in await listed(desk, desk.world.viewer)] == [made.name]

        moved = await update(
            desk,
            pb.Schedule(name=made.name, etag=made.etag, cron="0 9 * * 1", display_name="Weekly"),
            "cron",
            "display_name",
        )
        assert moved.etag != made.etag
        assert moved.display_name == "Weekly"
        assert moved.message_template == made.message_template
        assert moved.next_fire_time.ToDatetime(dt.UTC).weekday() == 0
        stale = await refused(
            update(
                desk, pb.Schedule(name=made.name, etag=made.etag, display_name="x"), "display_name"
            ),
            CODE.ABORTED,
        )
        assert reason(stale) == "ERROR_REASON_ETAG_MISMATCH"

        # From cron to interval: the zone must go too.
        bad = await refused(
            update(
                desk,
                pb.Schedule(name=made.name, interval=duration_pb2.Duration(seconds=60)),
                "cron",
                "interval",
            ),
            CODE.INVALID_ARGUMENT,
        )
        assert violations(bad) == ["schedule.time_zone"]
        switched = await update(
            desk,
            pb.Schedule(name=made.name, interval=duration_pb2.Duration(seconds=60)),
            "cron",
            "interval",
            "time_zone",
        )
        assert switched.HasField("interval")
        assert not switched.cron
        await refused(
            desk.stub.DeleteSchedule(
                pb.DeleteScheduleRequest(name=made.name, etag=made.etag),
                metadata=desk.world.owner.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.ABORTED,
        )
        await desk.stub.DeleteSchedule(
            pb.DeleteScheduleRequest(name=made.name, etag=switched.etag),
            metadata=desk.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        await refused(get(desk, made.name), CODE.NOT_FOUND)
        await refused(firings(desk, made.name), CODE.NOT_FOUND)
    changes = [
        (e.schedule_changed.change, e.schedule_changed.schedule.etag)
        for e in events.events
        if e.type == CHANGED and e.schedule_changed.schedule.name.startswith(desk.world.name + "/")
    ]
    assert changes == [
        (events_pb2.CHANGE_KIND_CREATED, made.etag),
        (events_pb2.CHANGE_KIND_UPDATED, moved.etag),
        (events_pb2.CHANGE_KIND_UPDATED, switched.etag),
        (events_pb2.CHANGE_KIND_DELETED, switched.etag),
    ]


async def test_pause_and_resume(desk: Desk) -> None:
    made = await create(desk, every(3600))
    paused = (
        await desk.stub.PauseSchedule(
            pb.PauseScheduleRequest(name=made.name, etag=made.etag),
            metadata=desk.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    ).schedule
    assert paused.state == pb.SCHEDULE_STATE_PAUSED
    assert not paused.HasField("next_fire_time")
    assert not paused.upcoming_fire_times
    await refused(
        desk.stub.ResumeSchedule(
            pb.ResumeScheduleRequest(name=made.name, etag=made.etag),
            metadata=desk.world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.ABORTED,
    )
    before = dt.datetime.now(dt.UTC)
    resumed = (
        await desk.stub.ResumeSchedule(
            pb.ResumeScheduleRequest(name=made.name, etag=paused.etag),
            metadata=desk.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    ).schedule
    assert resumed.state == pb.SCHEDULE_STATE_ACTIVE
    # From the next tick after now: one interval after the resume.
    first = resumed.next_fire_time.ToDatetime(dt.UTC)
    assert (
        before + dt.timedelta(seconds=3599)
        <= first
        <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3600)
    )
    assert await firings(desk, made.name) == []


async def test_only_owners_change_schedules_and_members_read_them(desk: Desk) -> None:
    made = await create(desk, every(3600))
    world = desk.world
    await refused(create(desk, every(3600), caller=world.editor), CODE.PERMISSION_DENIED)
    await refused(
        update(
            desk, pb.Schedule(name=made.name, display_name="x"), "display_name", caller=world.editor
        ),
        CODE.PERMISSION_DENIED,
    )
    await refused(get(desk, made.name, world.outsider), CODE.NOT_FOUND)
    assert await firings(desk, made.name, caller=world.viewer) == []
    await refused(
        desk.stub.PauseSchedule(
            pb.PauseScheduleRequest(name=made.name),
            metadata=world.editor.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.PERMISSION_DENIED,
    )
    await refused(
        desk.stub.ResumeSchedule(
            pb.ResumeScheduleRequest(name=made.name),
            metadata=world.editor.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.PERMISSION_DENIED,
    )


def _bad(**fields: object) -> pb.Schedule:
    schedule = pb.Schedule(display_name="Bad", message_template="hi", cron="* * * * *")
    for field, value in fields.items():
        if field == "interval":
            schedule.cron = ""
            schedule.interval.FromTimedelta(value)  # type: ignore[arg-type]
        elif field == "timeout":
            schedule.timeout.FromTimedelta(value)  # type: ignore[arg-type]
        else:
            setattr(schedule, field, value)
    return schedule


@pytest.mark.parametrize(
    ("schedule", "fields"),
    [
        (_bad(cron=""), ["schedule"]),
        (_bad(interval=dt.timedelta(seconds=60), cron="* * * * *"), ["schedule"]),
        (_bad(cron="61 * * * *"), ["schedule.cron"]),
        (_bad(cron="* * * *"), ["schedule.cron"]),
        (_bad(cron="0 0 30 2 *"), ["schedule.cron"]),
        (_bad(time_zone="Mars/Olympus"), ["schedule.time_zone"]),
        (_bad(time_zone="../../etc/passwd"), ["schedule.time_zone"]),
        (_bad(time_zone="Europe"), ["schedule.time_zone"]),
        (_bad(interval=dt.timedelta(seconds=60), time_zone="UTC"), ["schedule.time_zone"]),
        (_bad(interval=dt.timedelta(milliseconds=500)), ["schedule.interval"]),
        (_bad(interval=dt.timedelta(days=367)), ["schedule.interval"]),
        (_bad(message_template=""), ["schedule.message_template"]),
        (_bad(message_template="  \n "), ["schedule.message_template"]),
        (_bad(message_template="x" * 16_001), ["schedule.message_template"]),
        (_bad(display_name="d" * 201), ["schedule.display_name"]),
        (_bad(concurrency_policy=9), ["schedule.concurrency_policy"]),
        (_bad(missed_tick_policy=7), ["schedule.missed_tick_policy"]),
        (_bad(conversation_mode=5), ["schedule.conversation_mode"]),
        (_bad(timeout=dt.timedelta(seconds=-1)), ["schedule.timeout"]),
        (_bad(handler="nope"), ["schedule.handler"]),
        (_bad(handler="handlers/missing"), ["schedule.handler"]),
        (_bad(assistant="workspaces/other/assistants/a"), ["schedule.assistant"]),
    ],
)
async def test_bad_input_is_refused_with_the_field_and_nothing_is_stored(
    desk: Desk, schedule: pb.Schedule, fields: list[str]
) -> None:
    before = await conversations(desk)
    error = await refused(create(desk, schedule), CODE.INVALID_ARGUMENT)
    assert violations(error) == fields
    assert await listed(desk) == []
    assert await conversations(desk) == before


async def test_an_unknown_assistant_is_not_found_and_a_foreign_handler_refused(desk: Desk) -> None:
    await refused(
        create(desk, _bad(assistant=f"{desk.world.name}/assistants/ghost")), CODE.NOT_FOUND
    )
    helper = (
        await desk.stub.CreateAssistant(
            pb.CreateAssistantRequest(
                parent=desk.world.name,
                assistant=pb.Assistant(display_name="Helper", handler="handlers/echo"),
            ),
            metadata=desk.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    ).assistant
    error = await refused(
        create(desk, _bad(assistant=helper.name, handler="handlers/llm")), CODE.INVALID_ARGUMENT
    )
    assert violations(error) == ["schedule.handler"]
    made = await create(desk, _bad(assistant=helper.name, handler="handlers/echo"))
    assert made.assistant == helper.name
    assert [s.name for s in await listed(desk)] == [made.name]


async def test_the_limit_per_workspace_and_idempotent_creates(desk: Desk) -> None:
    first = await create(desk, every(3600), request_id="once")
    again = await create(desk, every(3600), request_id="once")
    assert again == first
    assert len(await conversations(desk)) == 1
    await refused(create(desk, every(7200), request_id="once"), CODE.INVALID_ARGUMENT)
    await create(desk, every(3600), schedule_id="second")
    await refused(create(desk, every(3600), schedule_id="second"), CODE.ALREADY_EXISTS)
    await create(desk, every(3600))
    assert len(await listed(desk)) == QUOTA
    # A retry still answers with its first schedule at the limit.
    assert await create(desk, every(3600), request_id="once") == first
    before = await conversations(desk)
    error = await refused(create(desk, every(3600)), CODE.RESOURCE_EXHAUSTED)
    assert reason(error) == "ERROR_REASON_QUOTA_EXCEEDED"
    assert await conversations(desk) == before
    error = await refused(create(desk, every(60), schedule_id="Bad_Id"), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["schedule_id"]


async def test_per_run_schedules_make_no_conversation_at_create(desk: Desk) -> None:
    schedule = every(3600)
    schedule.conversation_mode = pb.SCHEDULE_CONVERSATION_MODE_PER_RUN
    made = await create(desk, schedule)
    assert made.conversation == ""
    assert await conversations(desk) == []
