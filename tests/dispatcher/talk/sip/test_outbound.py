"""Calls placed by the server (``PlaceCall``, a schedule that calls) to real SIP phones, and
the ``Call`` records every call leaves (``talk/phone/``).

The server's outbound trunks point at phones of the test (``tests/kits/sipphone.py``:
PJSIP in its own process) on loopback:

- a call placed rings the phone from the trunk's caller ID; it answers, and hears the
  assistant speak first (the opening message is the session's first turn); the call is
  ANSWERED with its voice session, and CALL_CHANGED events follow it; EndCall hangs it
  up, and it is ENDED with who ended it and how long it lasted;
- the called party hanging up, the longest a call may last, a phone that never answers
  (the ring timeout), a busy one, and EndCall while it rings each end the call with their
  own status and reason;
- an ended call counts in QueryUsage with the seconds it was answered;
- a retried PlaceCall (the same request id) places no second call;
- the workspace's call quota: calls at once (across replicas) and minutes a day, a live
  call hung up once they are spent;
- what may not be placed is refused with its status: malformed fields, a trunk that does
  not call for the workspace or that number, a viewer, the workspace's limit, a server
  without SIP;
- a schedule that calls places its call at its tick, answered as any other;
- the calls of a server that stopped are ended on the record, and a server that stops
  ends its own calls' records first.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2, field_mask_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.service import Dispatcher
from switchboard.dispatcher.talk.phone import book as phone_book
from switchboard.dispatcher.talk.phone.store import CallRecord
from switchboard.dispatcher.talk.sip.calls import CallLimits, Calls, _Call
from switchboard.dispatcher.talk.sip.rules import Dialplan
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.values.names import new_id, now
from tests.conftest import CALL_DEADLINE_S, built, fresh_database_url, started
from tests.dispatcher.talk.sip.test_calls import ANSWER, answered
from tests.dispatcher.talk.test_talk import voice_settings
from tests.fakes.audio_server import FakeAudio
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.kits.contextkit import World, all_messages, context_stub, ctx_world, violations
from tests.kits.dispatchkit import dispatcher_stub, eventually
from tests.kits.sipphone import Event, SipPhone, energy
from tests.kits.talkkit import voice_world

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="module"),
]

CALLER_ID: Final = "+15550199"
#: Numbers the trunks may call start with this; others are refused.
ALLOWED: Final = "+1555"
CALLEE: Final = "+15551230001"
WAIT_S: Final = 60.0
OPENING: Final = "Tell Ann her agenda for today."
#: The longest a call lasts here: long enough for every other test's call.
MAX_CALL_S: Final = 30


def decide(body: dict[str, Any]) -> Reply:
    """Every turn, the opening first, is answered with ``ANSWER``."""
    return Reply.text(ANSWER + ".")


@dataclass
class Line:
    server: SwitchboardServer
    world: World
    assistant: str
    channel: aio.Channel
    #: The phone the ``carrier`` trunk calls: it answers every call after 300 ms.
    callee: SipPhone
    #: The phone the ``slow`` trunk calls: it answers only when a test says so.
    slow: SipPhone
    #: The local audio server's address (for a server of a test's own).
    audio: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def line(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Line]:
    folder = tmp_path_factory.mktemp("phones")
    async with (
        FakeAudio() as audio,
        FakeOpenAI(default=decide) as model,
        SipPhone.start(folder, auto_answer=True, ring_ms=300) as callee,
        SipPhone.start(folder) as slow,
    ):
        url = fresh_database_url()
        values: dict[str, object] = {
            "llm_base_url": model.url,
            "llm_model": "fake-model",
            "voice_max_sessions_per_user": 8,
            "schedules_min_interval_s": 1,
            "schedules_poll_s": 0.2,
        }
        # The trunks name the workspace, so it is made first, by a server without SIP on
        # the same database.
        world, assistant = await voice_world(voice_settings(url, audio.url, **values), "Caller")
        workspace_id = world.workspace.name.rsplit("/", 1)[-1]

        def trunk(name: str, phone: SipPhone) -> dict[str, Any]:
            return {
                "name": name,
                "outbound": {
                    "to": f"sip:127.0.0.1:{phone.port}",
                    "caller_id": CALLER_ID,
                    "workspaces": [workspace_id],
                    "numbers": [ALLOWED],
                },
            }

        sip = {
            "sip_listen": "127.0.0.1:0",
            "sip_trunks": json.dumps([trunk("carrier", callee), trunk("slow", slow)]),
            "sip_max_calls_per_workspace": 2,
            "sip_max_call_s": MAX_CALL_S,
        }
        async with (
            started(voice_settings(url, audio.url, **values, **sip)) as server,
            aio.insecure_channel(server.address) as sip_channel,
        ):
            yield Line(server, world, assistant, sip_channel, callee, slow, audio.url)


def place_request(line: Line, **fields: Any) -> pb.PlaceCallRequest:
    request = pb.PlaceCallRequest(
        parent=line.world.workspace.name,
        trunk="carrier",
        to_number=CALLEE,
        assistant=line.assistant,
        opening_message=OPENING,
    )
    for key, value in fields.items():
        if key == "ring_s":
            request.ring_timeout.CopyFrom(duration_pb2.Duration(seconds=value))
        else:
            setattr(request, key, value)
    return request


async def place(line: Line, **fields: Any) -> pb.Call:
    response = await dispatcher_stub(line.channel).PlaceCall(
        place_request(line, **fields), metadata=line.world.owner.md, timeout=CALL_DEADLINE_S
    )
    return response.call


async def get(line: Line, name: str) -> pb.Call:
    response = await dispatcher_stub(line.channel).GetCall(
        pb.GetCallRequest(name=name), metadata=line.world.owner.md, timeout=CALL_DEADLINE_S
    )
    return response.call


async def until(line: Line, name: str, check: Callable[[pb.Call], bool], what: str) -> pb.Call:
    async def reached() -> bool:
        return check(await get(line, name))

    await eventually(reached, what, timeout_s=WAIT_S)
    return await get(line, name)


async def end(line: Line, name: str) -> pb.Call:
    response = await dispatcher_stub(line.channel).EndCall(
        pb.EndCallRequest(name=name), metadata=line.world.owner.md, timeout=CALL_DEADLINE_S
    )
    return response.call


async def incoming(phone: SipPhone, since: int) -> Event:
    return await phone.wait_event(lambda e: e["event"] == "incoming", WAIT_S, since=since)


async def disconnected(phone: SipPhone, n: int) -> Event:
    return await phone.wait_event(
        lambda e: e["event"] == "state" and e["n"] == n and e["state"] == "DISCONNECTED", WAIT_S
    )


def ended(call: pb.Call) -> bool:
    return call.state == pb.CALL_STATE_ENDED


async def test_a_call_placed_is_answered_and_the_assistant_speaks_first(line: Line) -> None:
    changes: list[events_pb2.Event] = []
    stop = line.server.shared.bus.listen(
        lambda e: changes.append(e) if e.type == events_pb2.EVENT_TYPE_CALL_CHANGED else None
    )
    try:
        since = len(line.callee.events)
        call = await place(line)
        assert call.state == pb.CALL_STATE_DIALING
        assert (call.direction, call.channel, call.trunk) == (
            pb.CALL_DIRECTION_OUTBOUND,
            "sip",
            "carrier",
        )
        assert (call.from_number, call.to_number) == (CALLER_ID, CALLEE)
        assert call.opening_message == OPENING
        assert call.user == line.world.owner.name
        rang = await incoming(line.callee, since)
        assert f"sip:{CALLEE}@" in rang["uri"]
        assert f"sip:{CALLER_ID}@" in rang["from"]
        n = int(rang["n"])
        await line.callee.wait_state(n, "CONFIRMED", WAIT_S)
        # Nobody spoke: the assistant answers the opening message.
        await answered(line.callee, n, since)
        assert energy(line.callee.heard(n)) > 0
        live = await until(
            line, call.name, lambda c: bool(c.voice_session), "the call's voice session"
        )
        assert live.state == pb.CALL_STATE_ANSWERED
        assert live.HasField("answer_time")
        assert live.voice_session.startswith(f"{live.conversation}/voiceSessions/")
        messages = await all_messages(
            context_stub(line.channel), line.world.owner, live.conversation
        )
        said = [(m.role, " ".join(p.text for p in m.parts)) for m in messages]
        assert said[0] == (cpb.MESSAGE_ROLE_USER, OPENING)
        assert said[1][0] == cpb.MESSAGE_ROLE_ASSISTANT
        assert ANSWER in said[1][1]
        listed = await dispatcher_stub(line.channel).ListCalls(
            pb.ListCallsRequest(parent=line.world.workspace.name, live_only=True),
            metadata=line.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert call.name in [c.name for c in listed.calls]

        ending = await end(line, call.name)
        assert ending.name == call.name
        await disconnected(line.callee, n)
        done = await until(line, call.name, ended, "the call's end")
        assert done.end_reason == f"ended by {line.world.owner.name}"
        assert done.duration.ToTimedelta() > dt.timedelta(0)
        assert done.end_time.ToDatetime() >= done.answer_time.ToDatetime()
        assert (await end(line, call.name)).state == pb.CALL_STATE_ENDED  # as it is

        async def told() -> bool:
            mine = [e for e in changes if e.call_changed.call.name == call.name]
            return bool(mine) and mine[-1].call_changed.call.state == pb.CALL_STATE_ENDED

        await eventually(told, "the CALL_CHANGED events", timeout_s=WAIT_S)
        mine = [e for e in changes if e.call_changed.call.name == call.name]
        states = [e.call_changed.call.state for e in mine]
        assert mine[0].call_changed.change == events_pb2.CHANGE_KIND_CREATED
        assert states[0] == pb.CALL_STATE_DIALING
        assert pb.CALL_STATE_ANSWERED in states
        assert all(e.workspace == line.world.workspace.name for e in mine)
        assert all(e.conversation == live.conversation for e in mine)
    finally:
        stop()
    listed = await dispatcher_stub(line.channel).ListCalls(
        pb.ListCallsRequest(parent=line.world.workspace.name, live_only=True),
        metadata=line.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert call.name not in [c.name for c in listed.calls]


async def test_the_called_party_hanging_up_ends_the_call(line: Line) -> None:
    since = len(line.callee.events)
    call = await place(line)
    n = int((await incoming(line.callee, since))["n"])
    await line.callee.wait_state(n, "CONFIRMED", WAIT_S)
    await until(line, call.name, lambda c: c.state == pb.CALL_STATE_ANSWERED, "answered")
    await line.callee.hangup(n)
    done = await until(line, call.name, ended, "the call's end")
    assert done.end_reason == "the called party hung up"
    assert done.sip_status == 200
    calls = built(line.server, Calls)
    await eventually(lambda: _none_open(calls), "the call let go", timeout_s=WAIT_S)


async def _none_open(calls: Calls) -> bool:
    return calls.open_calls == 0


async def test_a_call_is_hung_up_at_the_longest_it_may_last(line: Line) -> None:
    since = len(line.callee.events)
    call = await place(line)
    n = int((await incoming(line.callee, since))["n"])
    await line.callee.wait_state(n, "CONFIRMED", WAIT_S)
    await disconnected(line.callee, n)
    done = await until(line, call.name, ended, "the long call's end")
    assert done.end_reason == f"it reached the longest a call may last ({MAX_CALL_S} s)"
    assert done.duration.ToTimedelta() >= dt.timedelta(seconds=MAX_CALL_S)


async def test_calls_count_in_the_usage_with_their_seconds(line: Line) -> None:
    stub = dispatcher_stub(line.channel)

    async def usage(**fields: Any) -> list[pb.UsageRow]:
        found = await stub.QueryUsage(
            pb.QueryUsageRequest(parent=line.world.workspace.name, **fields),
            metadata=line.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        return list(found.rows)

    by_assistant = [pb.USAGE_DIMENSION_ASSISTANT]
    before = {r.assistant: r for r in await usage(group_by=by_assistant)}
    since = len(line.callee.events)
    call = await place(line)
    n = int((await incoming(line.callee, since))["n"])
    await line.callee.wait_state(n, "CONFIRMED", WAIT_S)
    await answered(line.callee, n, since)
    await line.callee.hangup(n)
    done = await until(line, call.name, ended, "the call's end")
    seconds = round(done.duration.ToTimedelta().total_seconds())
    assert seconds >= 1
    after = {r.assistant: r for r in await usage(group_by=by_assistant)}
    was = before.get(line.assistant, pb.UsageRow())
    now_ = after[line.assistant]
    assert now_.call_count == was.call_count + 1
    assert now_.call_seconds == was.call_seconds + seconds
    # The call's turns are runs of the assistant, counted as runs are.
    assert now_.run_count > was.run_count
    # A call has no model: grouped by model, it is in the group of none.
    by_model = await usage(group_by=[pb.USAGE_DIMENSION_MODEL])
    assert sum(r.call_count for r in by_model if r.model) == 0
    assert sum(r.call_count for r in by_model) == now_.call_count
    # Filtered by a model, no call counts.
    assert sum(r.call_count for r in await usage(model="fake-model")) == 0


async def test_a_phone_that_never_answers_busy_or_ended_while_ringing(line: Line) -> None:
    # Nobody answers: given up after the ring timeout.
    since = len(line.slow.events)
    call = await place(line, trunk="slow", ring_s=5)
    n = int((await incoming(line.slow, since))["n"])
    await until(line, call.name, lambda c: c.state == pb.CALL_STATE_RINGING, "ringing")
    await disconnected(line.slow, n)
    done = await until(line, call.name, ended, "the unanswered call's end")
    assert done.end_reason == "nobody answered within 5 s"
    assert not done.HasField("answer_time")
    assert done.duration.ToTimedelta() == dt.timedelta(0)
    assert not done.voice_session

    # Busy.
    since = len(line.slow.events)
    call = await place(line, trunk="slow")
    n = int((await incoming(line.slow, since))["n"])
    await line.slow.answer(n, 486)
    done = await until(line, call.name, ended, "the busy call's end")
    assert (done.sip_status, done.end_reason) == (486, "the line was busy")

    # Ended by a member while it rings.
    since = len(line.slow.events)
    call = await place(line, trunk="slow")
    n = int((await incoming(line.slow, since))["n"])
    await end(line, call.name)
    await disconnected(line.slow, n)
    done = await until(line, call.name, ended, "the call ended while ringing")
    assert done.end_reason == f"ended by {line.world.owner.name}"


async def test_a_retried_place_call_places_no_second_call(line: Line) -> None:
    since = len(line.slow.events)
    first = await place(line, trunk="slow", request_id="call-ann-once")
    again = await place(line, trunk="slow", request_id="call-ann-once")
    assert again.name == first.name
    n = int((await incoming(line.slow, since))["n"])
    await end(line, first.name)
    await disconnected(line.slow, n)
    await until(line, first.name, ended, "the call's end")
    rang = [e for e in line.slow.events[since:] if e["event"] == "incoming"]
    assert len(rang) == 1


async def test_what_may_not_be_placed_is_refused(line: Line) -> None:
    async def refused(
        request: pb.PlaceCallRequest, md: Any = None, channel: aio.Channel | None = None
    ) -> aio.AioRpcError:
        with pytest.raises(aio.AioRpcError) as caught:
            await dispatcher_stub(channel or line.channel).PlaceCall(
                request, metadata=md or line.world.owner.md, timeout=CALL_DEADLINE_S
            )
        return caught.value

    bad = await refused(
        place_request(line, to_number="555-1234", opening_message="", ring_s=1, trunk="")
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(bad)) == {"to_number", "opening_message", "ring_timeout", "trunk"}
    unknown = await refused(place_request(line, trunk="nowhere"))
    assert (unknown.code(), violations(unknown)) == (grpc.StatusCode.INVALID_ARGUMENT, ["trunk"])
    abroad = await refused(place_request(line, to_number="+442079460000"))
    assert (abroad.code(), violations(abroad)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["to_number"],
    )
    viewer = await refused(place_request(line), md=line.world.viewer.md)
    assert viewer.code() == grpc.StatusCode.PERMISSION_DENIED
    # A server without SIP places no call.
    async with (
        started(voice_settings(fresh_database_url(), line.audio)) as plain,
        aio.insecure_channel(plain.address) as channel,
    ):
        world = await ctx_world(plain, context_stub(channel))
        request = place_request(line, parent=world.workspace.name)
        request.assistant = f"{world.workspace.name}/assistants/a"
        nowhere = await refused(request, md=world.owner.md, channel=channel)
    assert nowhere.code() == grpc.StatusCode.FAILED_PRECONDITION

    # The workspace's limit (2 at once).
    since = len(line.slow.events)
    held = [await place(line, trunk="slow") for _ in range(2)]
    busy = await refused(place_request(line, trunk="slow"))
    assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in held:
        await end(line, call.name)
    for call in held:
        await until(line, call.name, ended, "the held call's end")
    rang = [e for e in line.slow.events[since:] if e["event"] == "incoming"]
    assert len(rang) == 2


async def test_a_schedule_that_calls_places_its_call_at_its_tick(line: Line) -> None:
    stub = dispatcher_stub(line.channel)
    since = len(line.callee.events)
    fired: list[pb.ScheduleFiring] = []
    got = asyncio.Event()

    def heard(event: events_pb2.Event) -> None:
        if event.type == events_pb2.EVENT_TYPE_SCHEDULE_FIRED and event.schedule_fired.firing.call:
            fired.append(event.schedule_fired.firing)
            got.set()

    stop = line.server.shared.bus.listen(heard)
    try:
        made = await stub.CreateSchedule(
            pb.CreateScheduleRequest(
                parent=line.world.workspace.name,
                schedule=pb.Schedule(
                    display_name="Morning call",
                    assistant=line.assistant,
                    message_template="Read me my agenda for {{date}}.",
                    interval=duration_pb2.Duration(seconds=1),
                    call=pb.ScheduleCall(trunk="carrier", to_number=CALLEE),
                ),
            ),
            metadata=line.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        schedule = made.schedule
        assert schedule.conversation_mode == pb.SCHEDULE_CONVERSATION_MODE_PER_RUN
        assert not schedule.conversation
        async with asyncio.timeout(WAIT_S):
            await got.wait()
        await stub.PauseSchedule(
            pb.PauseScheduleRequest(name=schedule.name),
            metadata=line.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    finally:
        stop()
    firing = fired[0]
    assert firing.outcome == pb.FIRING_OUTCOME_STARTED
    assert not firing.run
    rang = await incoming(line.callee, since)
    n = int(rang["n"])
    await line.callee.wait_state(n, "CONFIRMED", WAIT_S)
    await answered(line.callee, n, since)
    call = await until(line, firing.call, lambda c: bool(c.voice_session), "the call's session")
    assert call.schedule == schedule.name
    assert call.opening_message.startswith("Read me my agenda for ")
    listed = await stub.ListScheduleFirings(
        pb.ListScheduleFiringsRequest(parent=schedule.name),
        metadata=line.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert firing.call in [f.call for f in listed.firings]
    # Every call the schedule placed (a tick may have come before the pause) is ended.
    for placed in {f.call for f in listed.firings if f.call}:
        await end(line, placed)
        await until(line, placed, ended, "the scheduled call's end")

    bad = pb.Schedule(
        assistant=line.assistant,
        message_template="x",
        interval=duration_pb2.Duration(seconds=1),
        conversation_mode=pb.SCHEDULE_CONVERSATION_MODE_SHARED,
        call=pb.ScheduleCall(trunk="carrier", to_number="12"),
    )
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.CreateSchedule(
            pb.CreateScheduleRequest(parent=line.world.workspace.name, schedule=bad),
            metadata=line.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def set_quota(line: Line, **fields: int) -> None:
    quota = pb.WorkspaceQuota(name=f"{line.world.workspace.name}/quota")
    for key, value in fields.items():
        setattr(quota, key, value)
    await dispatcher_stub(line.channel).UpdateWorkspaceQuota(
        pb.UpdateWorkspaceQuotaRequest(
            quota=quota, update_mask=field_mask_pb2.FieldMask(paths=list(fields))
        ),
        metadata=line.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )


async def test_the_workspaces_call_quota_holds_calls_at_once_and_minutes(line: Line) -> None:
    stub = dispatcher_stub(line.channel)
    try:
        # One call at a time, whichever replica carries it.
        await set_quota(line, max_concurrent_calls=1)
        since = len(line.slow.events)
        first = await place(line, trunk="slow")
        with pytest.raises(aio.AioRpcError) as busy:
            await stub.PlaceCall(
                place_request(line), metadata=line.world.owner.md, timeout=CALL_DEADLINE_S
            )
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1" in (busy.value.details() or "")
        await incoming(line.slow, since)
        await end(line, first.name)
        await until(line, first.name, ended, "the first call's end")

        # Minutes a day: a live call is hung up once they are spent, and no more is placed.
        await set_quota(line, max_concurrent_calls=0, call_minutes_per_day=1000)
        since = len(line.callee.events)
        call = await place(line)
        n = int((await incoming(line.callee, since))["n"])
        await line.callee.wait_state(n, "CONFIRMED", WAIT_S)
        await until(line, call.name, lambda c: c.state == pb.CALL_STATE_ANSWERED, "answered")
        # Two minutes answered already today, in a call of a server long gone.
        book = built(line.server, Dispatcher).calls
        stamp = now() - dt.timedelta(minutes=2)
        earlier = pb.Call(direction=pb.CALL_DIRECTION_INBOUND, assistant=line.assistant)
        earlier.answer_time.FromDatetime(stamp)
        await book._store.add(
            CallRecord(
                workspace_id=line.world.workspace.name.rsplit("/", 1)[-1],
                id=new_id(),
                state=int(pb.CALL_STATE_ANSWERED),
                holder="a-server-long-gone",
                user_id=line.world.owner.id,
                assistant_id=line.assistant.rsplit("/", 1)[-1],
                data=earlier.SerializeToString(),
                created_at=stamp,
                updated_at=stamp,
            ),
            None,
            None,
        )
        await set_quota(line, call_minutes_per_day=1)
        await disconnected(line.callee, n)
        done = await until(line, call.name, ended, "the call hung up at the quota")
        assert done.end_reason == "the workspace's call minutes for today are spent"
        with pytest.raises(aio.AioRpcError) as spent:
            await stub.PlaceCall(
                place_request(line), metadata=line.world.owner.md, timeout=CALL_DEADLINE_S
            )
        assert spent.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "minutes" in (spent.value.details() or "")
    finally:
        await set_quota(line, max_concurrent_calls=0, call_minutes_per_day=0)


async def test_the_calls_of_a_stopped_server_are_ended(line: Line) -> None:
    dispatcher = built(line.server, Dispatcher)
    book = dispatcher.calls
    workspace_id = line.world.workspace.name.rsplit("/", 1)[-1]
    stamp = now()
    orphan = pb.Call(
        direction=pb.CALL_DIRECTION_INBOUND,
        assistant=line.assistant,
        channel="sip",
        from_number="+15557770000",
        to_number=CALLER_ID,
        user=line.world.owner.name,
    )
    orphan.answer_time.FromDatetime(stamp - dt.timedelta(seconds=30))
    call_id = new_id()
    await book._store.add(
        CallRecord(
            workspace_id=workspace_id,
            id=call_id,
            state=int(pb.CALL_STATE_ANSWERED),
            holder="a-server-long-gone",
            user_id=line.world.owner.id,
            assistant_id=line.assistant.rsplit("/", 1)[-1],
            data=orphan.SerializeToString(),
            created_at=stamp,
            updated_at=stamp,
        ),
        None,
        None,
    )
    name = f"{line.world.workspace.name}/calls/{call_id}"
    live = await get(line, name)
    assert live.duration.ToTimedelta() >= dt.timedelta(seconds=30)
    assert await book.end_orphans() >= 1
    done = await get(line, name)
    assert done.state == pb.CALL_STATE_ENDED
    assert done.end_reason == "the server carrying it stopped"
    assert done.duration.ToTimedelta() >= dt.timedelta(seconds=30)

    # A process that stops says so of the calls it carries, before their lines go down.
    opened = await book.opened(
        phone_book.new_call(
            direction=pb.CALL_DIRECTION_INBOUND,
            state=pb.CALL_STATE_ANSWERED,
            trunk="carrier",
            from_number="+15557770001",
            to_number=CALLER_ID,
            assistant=line.assistant,
            conversation="",
            user_id=line.world.owner.id,
        ),
        workspace_id=workspace_id,
        user_id=line.world.owner.id,
    )
    carried = built(line.server, Calls)
    stopping = Calls(
        plan=Dialplan(),
        talks=dispatcher.talks,
        context=carried._context,
        policy=line.server.shared.policy,
        limits=CallLimits(),
        book=book,
    )
    stopping._calls[1] = _Call(number=1, workspace_id=workspace_id, name=opened.call.name)
    await stopping.close()
    closed = await get(line, opened.call.name)
    assert (closed.state, closed.end_reason) == (pb.CALL_STATE_ENDED, "the server stopped")
