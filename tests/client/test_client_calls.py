"""switchboard.client's phone calls (``place_call``, ``get_call``, ``list_calls``,
``end_call``, ``wait_call``) against a real server with SIP, whose outbound trunk calls a
real SIP phone (``tests/kits/sipphone.py``: PJSIP in its own process) on loopback:

- a call placed through the client rings the phone, which answers; the client sees it
  ANSWERED (get, list, live only), a retry with the same request id places no second
  call, and ``end_call`` hangs it up: ENDED, ended by the user who signed in;
- a call that only rings: ``wait_call`` for RINGING returns it, one for ANSWERED runs out
  of time (``DeadlineExceeded``), and ``end_call`` ends it while it rings;
- what the server refuses comes back as the client's typed errors: ``InvalidArgument``
  naming the fields, ``NotFound`` for a call that does not exist.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import pytest
import pytest_asyncio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.client import Client, DeadlineExceeded, InvalidArgument, NotFound
from switchboard.client.client import call_state
from tests.client.test_clientkit import PASSWORD, new_workspace, unique_email
from tests.conftest import CALL_DEADLINE_S, fresh_database_url, started
from tests.dispatcher.talk.sip.test_calls import ANSWER
from tests.dispatcher.talk.test_talk import voice_settings
from tests.fakes.audio_server import FakeAudio
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.kits.sipphone import Event, SipPhone

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="module"),
]

CALLER_ID: Final = "+15550199"
#: The trunk calls only numbers that start with this.
ALLOWED: Final = "+1555"
CALLEE: Final = "+15551230001"
OPENING: Final = "Tell Ann her agenda for today."


def decide(body: dict[str, Any]) -> Reply:
    return Reply.text(ANSWER + ".")


@dataclass
class Line:
    #: Signed in to the server with SIP, as the workspace's owner.
    client: Client
    #: ``users/u``: who the client is.
    user: str
    workspace: str
    assistant: str
    #: The phone the ``carrier`` trunk calls: it answers every call after 300 ms.
    phone: SipPhone
    #: The phone the ``slow`` trunk calls: it never answers.
    slow: SipPhone


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def line(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Line]:
    email = unique_email("calls")
    folder = tmp_path_factory.mktemp("phones")
    async with (
        FakeAudio() as audio,
        FakeOpenAI(default=decide) as model,
        SipPhone.start(folder, auto_answer=True, ring_ms=300) as phone,
        SipPhone.start(folder) as slow,
    ):
        url = fresh_database_url()
        values: dict[str, object] = {"llm_base_url": model.url, "llm_model": "fake-model"}
        # The trunk names the workspace, so it is made first, by a server without SIP on
        # the same database.
        async with (
            started(voice_settings(url, audio.url, **values)) as plain,
            Client(plain.address) as setup,
        ):
            await setup.register(email, PASSWORD)
            workspace = await new_workspace(setup, "Calls")
            made = await setup.dispatcher.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=workspace,
                    assistant=pb.Assistant(
                        display_name="Caller",
                        handler="handlers/llm",
                        voice=pb.VoiceSettings(language="en"),
                    ),
                )
            )

        def trunk(name: str, callee: SipPhone) -> dict[str, Any]:
            return {
                "name": name,
                "outbound": {
                    "to": f"sip:127.0.0.1:{callee.port}",
                    "caller_id": CALLER_ID,
                    "workspaces": [workspace.removeprefix("workspaces/")],
                    "numbers": [ALLOWED],
                },
            }

        trunks = [trunk("carrier", phone), trunk("slow", slow)]
        sip = {"sip_listen": "127.0.0.1:0", "sip_trunks": json.dumps(trunks)}
        async with (
            started(voice_settings(url, audio.url, **values, **sip)) as server,
            Client(server.address, timeout_s=CALL_DEADLINE_S) as client,
        ):
            signed = await client.sign_in(email, PASSWORD)
            yield Line(client, signed.user.name, workspace, made.assistant.name, phone, slow)


async def incoming(phone: SipPhone, since: int) -> Event:
    return await phone.wait_event(lambda e: e["event"] == "incoming", CALL_DEADLINE_S, since=since)


async def test_a_call_placed_is_answered_listed_and_ended(line: Line) -> None:
    client = line.client
    since = len(line.phone.events)
    call = await client.place_call(
        line.workspace,
        trunk="carrier",
        to_number=CALLEE,
        assistant=line.assistant,
        opening_message=OPENING,
        ring_timeout_s=20,
        request_id="client-call-once",
    )
    assert call.state == pb.CALL_STATE_DIALING
    assert (call.direction, call.trunk, call.from_number, call.to_number) == (
        pb.CALL_DIRECTION_OUTBOUND,
        "carrier",
        CALLER_ID,
        CALLEE,
    )
    assert (call.assistant, call.opening_message, call.user) == (
        line.assistant,
        OPENING,
        line.user,
    )
    # The transport's retry of a keyed PlaceCall, as a person's: the same call.
    again = await client.place_call(
        line.workspace,
        trunk="carrier",
        to_number=CALLEE,
        assistant=line.assistant,
        opening_message=OPENING,
        ring_timeout_s=20,
        request_id="client-call-once",
    )
    assert again.name == call.name

    rang = await incoming(line.phone, since)
    assert f"sip:{CALLEE}@" in rang["uri"]
    n = int(rang["n"])
    await line.phone.wait_state(n, "CONFIRMED", CALL_DEADLINE_S)
    answered = await client.wait_call(call, states=["answered"], timeout_s=CALL_DEADLINE_S)
    assert answered.state == pb.CALL_STATE_ANSWERED
    assert answered.HasField("answer_time")
    got = await client.get_call(call.name)
    assert (got.name, got.state) == (call.name, pb.CALL_STATE_ANSWERED)
    assert got.conversation.startswith(f"{line.workspace}/conversations/")
    live = await client.list_calls(line.workspace, live_only=True)
    assert [c.name for c in live] == [call.name]
    assert live[0].state == pb.CALL_STATE_ANSWERED
    assert call.name in [c.name for c in await client.list_calls(line.workspace)]

    ending = await client.end_call(call)
    assert ending.name == call.name
    await line.phone.wait_state(n, "DISCONNECTED", CALL_DEADLINE_S)
    done = await client.wait_call(call.name, states=["ended"], timeout_s=CALL_DEADLINE_S)
    assert done.state == pb.CALL_STATE_ENDED
    assert done.end_reason == f"ended by {line.user}"
    assert done.duration.ToTimedelta().total_seconds() > 0
    # Ending an ended call returns it as it is; a wait for ANSWERED ends at ENDED.
    assert (await client.end_call(call.name)).end_reason == done.end_reason
    assert (await client.wait_call(call)).state == pb.CALL_STATE_ENDED
    assert await client.list_calls(line.workspace, live_only=True) == []
    assert [e for e in line.phone.events[since:] if e["event"] == "incoming"] == [rang]


async def test_what_the_server_refuses_is_a_typed_error(line: Line) -> None:
    client = line.client
    with pytest.raises(InvalidArgument) as bad:
        await client.place_call(
            line.workspace,
            trunk="",
            to_number="555-1234",
            assistant=line.assistant,
            opening_message="",
            ring_timeout_s=1,
        )
    assert {v.field for v in bad.value.violations} == {
        "trunk",
        "to_number",
        "opening_message",
        "ring_timeout",
    }
    # A number the trunk does not call: refused on the field, and no call placed.
    with pytest.raises(InvalidArgument) as abroad:
        await client.place_call(
            line.workspace,
            trunk="carrier",
            to_number="+442079460000",
            assistant=line.assistant,
            opening_message=OPENING,
        )
    assert [v.field for v in abroad.value.violations] == ["to_number"]
    with pytest.raises(NotFound):
        await client.get_call(f"{line.workspace}/calls/none-such")
    with pytest.raises(NotFound):
        await client.end_call(f"{line.workspace}/calls/none-such")
    with pytest.raises(InvalidArgument):
        await client.get_call("calls/not-a-name")
    assert await client.list_calls(line.workspace, live_only=True) == []


async def test_a_schedule_is_made_to_call(line: Line) -> None:
    client = line.client
    schedule = await client.create_schedule(
        line.workspace,
        "Read me my agenda for {{date}}.",
        cron="0 8 * * 1-5",
        time_zone="Europe/Berlin",
        assistant=line.assistant,
        call=("carrier", "+15551230001"),
    )
    assert (schedule.call.trunk, schedule.call.to_number) == ("carrier", "+15551230001")
    assert schedule.conversation_mode == pb.SCHEDULE_CONVERSATION_MODE_PER_RUN
    with pytest.raises(InvalidArgument) as bad:
        await client.create_schedule(
            line.workspace,
            "x",
            interval_s=60,
            handler="handlers/echo",
            call=("carrier", "12"),
        )
    assert {"schedule.call.to_number", "schedule.assistant"} <= {
        v.field for v in bad.value.violations
    }
    await client.delete_schedule(schedule)


async def test_a_call_that_only_rings_is_waited_on_and_ended_while_ringing(line: Line) -> None:
    client = line.client
    since = len(line.slow.events)
    call = await client.place_call(
        line.workspace,
        trunk="slow",
        to_number=CALLEE,
        assistant=line.assistant,
        opening_message=OPENING,
    )
    n = int((await incoming(line.slow, since))["n"])
    ringing = await client.wait_call(call, states="ringing", timeout_s=CALL_DEADLINE_S)
    assert ringing.state == pb.CALL_STATE_RINGING
    # Nobody picks up: a wait for ANSWERED runs out (the ring timeout is 30 s).
    with pytest.raises(DeadlineExceeded):
        await client.wait_call(call, states=[pb.CALL_STATE_ANSWERED], timeout_s=1)
    assert [c.name for c in await client.list_calls(line.workspace, live_only=True)] == [call.name]
    await client.end_call(call)
    await line.slow.wait_state(n, "DISCONNECTED", CALL_DEADLINE_S)
    done = await client.wait_call(call, states=["ended"], timeout_s=CALL_DEADLINE_S)
    assert done.end_reason == f"ended by {line.user}"
    assert not done.HasField("answer_time")
    assert await client.list_calls(line.workspace, live_only=True) == []


@pytest.mark.unit
async def test_call_states_are_named_as_the_contract_names_them() -> None:
    assert call_state("ringing") == pb.CALL_STATE_RINGING
    assert call_state("CALL_STATE_ANSWERED") == pb.CALL_STATE_ANSWERED
    assert call_state(pb.CALL_STATE_ENDED) == pb.CALL_STATE_ENDED
    with pytest.raises(ValueError, match="CALL_STATE_LOST"):
        call_state("lost")
