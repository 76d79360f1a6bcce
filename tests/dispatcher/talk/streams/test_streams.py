"""Phone calls over carriers' media streams (``talk/streams``) against a faithful carrier
(``carrier.py``): Twilio's webhook signed as Twilio signs it, its TwiML answer read, the
stream's WebSocket opened with the answer's ``<Parameter>`` and fed eSpeak NG speech as
20 ms mu-law frames in real time. The local audio server recognizes the caller
(PocketSphinx) and speaks the answer; the local model server answers as a scripted model
(``decide``), keyed by the keys the caller presses:

- a spoken turn is answered aloud, and the carrier hears it (its energy, and
  PocketSphinx's transcript); the call is a conversation of the mapped caller's, with the
  call's metadata; keys pressed arrive as one message; only ``end_call`` is offered; the
  caller hanging up (``stop``) ends the session;
- speaking over the answer sends ``clear`` and cancels the run;
- the assistant's ``end_call`` closes the stream after its goodbye;
- a bad or missing signature is 403 (webhook and upgrade); a forged, replayed, expired
  or another call's ticket, malformed frames, media before the start and an unknown
  event close the stream (1008); a number no rule has is ``<Reject/>``, a caller who
  cannot write ``<Reject/>``, the limits ``<Reject reason="busy"/>`` and a stream past
  them closed (1013): none of them leaves a voice session;
- Telnyx's flavour (ed25519 signatures, its field names) is answered the same way;
- a call goes through a real Envoy in front of the server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.talk.streams.calls import MediaStreams
from switchboard.dispatcher.talk.streams.signing import twilio_signature
from switchboard.platform.audio import pcm
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import VoiceSessionRow
from tests.conftest import CALL_DEADLINE_S, built, fresh_database_url, started
from tests.dispatcher.talk.streams.carrier import (
    Carrier,
    StreamCall,
    call_sid,
    local,
    rms,
    stream,
    webhook,
)
from tests.dispatcher.talk.test_talk import stored_sessions, voice_settings
from tests.e2e.envoy import EnvoyProcess
from tests.fakes.audio_server import FakeAudio, Recognizer
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.speech import COUNTING, says, speak
from tests.kits.contextkit import World, all_messages, context_stub
from tests.kits.dispatchkit import dispatcher_stub, eventually
from tests.kits.talkkit import voice_world

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="module"),
]

NUMBER: Final = "+15550100"
EDITOR_CALLER: Final = "+15557654321"
VIEWER_CALLER: Final = "+15557650000"
ANONYMOUS: Final = "+15559990000"
PUBLIC_URL: Final = "https://calls.switchboard.test"
AUTH_TOKEN: Final = "0123456789abcdef0123456789abcdef"
WAIT_S: Final = 60.0
ANSWER: Final = COUNTING
#: What the transcript of the answer heard at 8 kHz holds, in order (PocketSphinx took
#: "four five" for "or ah you" at 8 kHz).
HEARD: Final = ("one", "two", "three")
#: A long answer (about 25 s spoken), to speak over.
LONG: Final = " ".join(
    [
        "The weather is fine today and the sky is clear over the hills.",
        "A light wind comes from the west and the evening will be warm.",
        "Tomorrow brings a little rain in the morning and sun after noon.",
        "The week ends dry, with the warmest day on Saturday afternoon.",
        "Next week starts cool, and the nights are long and quiet.",
    ]
)


def decide(body: dict[str, Any]) -> Reply:
    """The model: the keys pressed choose what it does; a spoken turn is answered with
    ``ANSWER`` (``LONG`` once the caller pressed 7)."""
    messages = body["messages"]
    last = messages[-1]
    if last["role"] == "tool":
        return Reply.text("Goodbye.")
    text = _text(last)
    if "keys pressed: 9" in text:
        return Reply.tool_calls([("end_call", {"reason": "the caller pressed 9"})])
    if "keys pressed" in text:
        return Reply.text("You pressed keys.")
    long = any("keys pressed: 7" in _text(m) for m in messages if m["role"] == "user")
    return Reply.text(LONG if long else ANSWER + ".")


def _text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content)
    return str(content)


def _parts(message: cpb.Message) -> str:
    return " ".join(part.text for part in message.parts)


@dataclass
class Line:
    """The module's server with media streams, its world and assistant, and the fakes."""

    server: SwitchboardServer
    world: World
    model: FakeOpenAI
    channel: aio.Channel
    http: aiohttp.ClientSession
    twilio: Carrier
    telnyx: Carrier

    @property
    def streams(self) -> MediaStreams:
        return built(self.server, MediaStreams)


def streams_settings(
    port: int | str, rules: list[dict[str, Any]], telnyx_public: str, **more: object
) -> dict[str, object]:
    return {
        "streams_listen": f"127.0.0.1:{port}",
        "streams_public_url": PUBLIC_URL,
        "streams_twilio_auth_token": AUTH_TOKEN,
        "streams_telnyx_public_key": telnyx_public,
        "streams_rules": json.dumps(rules),
        "metrics_port": 0,
        **more,
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def line() -> AsyncIterator[Line]:
    telnyx_key = Ed25519PrivateKey.generate()
    telnyx_public = base64.b64encode(
        telnyx_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ).decode()
    async with FakeAudio() as audio, FakeOpenAI(default=decide) as model:
        url = fresh_database_url()
        values: dict[str, object] = {
            "llm_base_url": model.url,
            "llm_model": "fake-model",
            "voice_max_sessions_per_user": 8,
        }
        world, assistant = await voice_world(voice_settings(url, audio.url, **values), "Phone")
        rules = [
            {
                "number": NUMBER,
                "assistant": assistant,
                "user": world.owner.name,
                "callers": {EDITOR_CALLER: world.editor.name, VIEWER_CALLER: world.viewer.name},
            }
        ]
        # One call at a time: the limits' test fills them with one.
        settings = streams_settings(0, rules, telnyx_public, streams_max_calls=1)
        async with (
            started(voice_settings(url, audio.url, **values, **settings)) as server,
            aio.insecure_channel(server.address) as channel,
            aiohttp.ClientSession() as http,
        ):
            local = f"http://127.0.0.1:{built(server, MediaStreams).port}"
            twilio = Carrier("twilio", PUBLIC_URL, local, twilio_token=AUTH_TOKEN)
            telnyx = Carrier("telnyx", PUBLIC_URL, local, telnyx_key=telnyx_key)
            yield Line(server, world, model, channel, http, twilio, telnyx)


@pytest_asyncio.fixture(loop_scope="module")
async def quiet_line(line: Line) -> AsyncIterator[Line]:
    """The line, every call of the test let go after it (the next one's limits are free)."""
    yield line

    async def let_go() -> bool:
        return line.streams.open_calls == 0

    await eventually(let_go, "the calls let go", timeout_s=WAIT_S)


async def call_row(line: Line, conversation: str) -> VoiceSessionRow:
    conversation_id = conversation.rsplit("/", 1)[-1]

    def read(db: Session) -> VoiceSessionRow:
        row = db.execute(
            select(VoiceSessionRow).where(VoiceSessionRow.conversation_id == conversation_id)
        ).scalar_one()
        db.expunge(row)
        return row

    return await line.server.shared.database.run(read, write=False)


async def runs_of(line: Line, conversation: str) -> list[pb.Run]:
    listed = await dispatcher_stub(line.channel).ListRuns(
        pb.ListRunsRequest(parent=conversation, page_size=100),
        metadata=line.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return list(listed.runs)


def calls_gauge(server: SwitchboardServer, carrier: str) -> float:
    assert server.metrics is not None
    for family in text_string_to_metric_families(server.metrics.text().decode()):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "switchboard_media_streams_calls" and labels.get("carrier") == carrier:
                return float(sample.value)
    raise AssertionError("no switchboard_media_streams_calls sample")


def speech_8k(text: str) -> bytes:
    samples, rate = pcm.from_wav(speak(text))
    return pcm.resample(samples, rate, 8_000)


def transcript(heard: bytes) -> str:
    words, _ = Recognizer().transcribe(pcm.to_wav(pcm.resample(heard, 8_000, 16_000), 16_000))
    return words


async def call_conversation(line: Line, caller: str) -> cpb.Conversation:
    """The newest conversation of a call from ``caller``."""
    found = await context_stub(line.channel).ListConversations(
        cpb.ListConversationsRequest(parent=line.world.workspace.name, page_size=100),
        metadata=line.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    calls = [c for c in found.conversations if "caller" in c.metadata.fields]
    mine = [c for c in calls if c.metadata.fields["caller"].string_value == caller]
    assert mine, [c.title for c in found.conversations]
    return max(mine, key=lambda c: c.create_time.ToDatetime())


async def dial(line: Line, caller: str = EDITOR_CALLER, carrier: Carrier | None = None) -> Any:
    """The webhook answered with a stream for a fresh call: its answer and call id."""
    sid = call_sid()
    answer = await webhook(
        line.http, carrier or line.twilio, to=NUMBER, caller=caller, call_sid=sid
    )
    assert answer.status == 200, answer
    assert answer.rejected is None, answer
    return answer, sid


async def up(line: Line, call: StreamCall) -> None:
    """The call admitted: its session has begun."""

    async def admitted() -> bool:
        return line.streams.open_calls == 1 and any(
            c.bridge is not None and c.bridge.live for c in line.streams._calls.values()
        )

    await eventually(admitted, "the call admitted", timeout_s=WAIT_S)


async def test_a_call_is_answered_aloud_and_keys_pressed_are_a_message(quiet_line: Line) -> None:
    line = quiet_line
    answer, sid = await dial(line)
    url, parameters = answer.stream()
    assert url == "wss://calls.switchboard.test/telephony/twilio/stream"
    assert set(parameters) == {"call"}
    async with stream(line.http, line.twilio, answer, sid) as call:
        await up(line, call)
        assert calls_gauge(line.server, "twilio") == 1
        assert calls_gauge(line.server, "telnyx") == 0
        since = len(call.received)
        call.play(speech_8k(COUNTING))
        await call.answered(since)
        heard = bytes(call.heard)
        assert rms(heard) > 0
        assert says(transcript(heard), HEARD), transcript(heard)

        await call.dtmf("12#")
        conversation = await call_conversation(line, EDITOR_CALLER)
        stub = context_stub(line.channel)

        async def keys_arrived() -> bool:
            messages = await all_messages(stub, line.world.editor, conversation.name)
            return any("[keys pressed: 1 2 #]" in _parts(m) for m in messages)

        await eventually(keys_arrived, "the keys' message", timeout_s=WAIT_S)
        # A stream can neither press keys nor transfer: only end_call is offered.
        tools = line.model.requests[-1].body.get("tools", [])
        assert {t["function"]["name"] for t in tools} >= {"end_call"}
        assert not {t["function"]["name"] for t in tools} & {"send_keys", "transfer_call"}

        assert conversation.title == f"Call from {EDITOR_CALLER} to {NUMBER}"
        fields = conversation.metadata.fields
        assert fields["channel"].string_value == "twilio"
        assert fields["dialed"].string_value == NUMBER
        assert fields["call_sid"].string_value == sid
        assert fields["caller_known"].bool_value
        assert conversation.creator == line.world.editor.name
        messages = await all_messages(stub, line.world.editor, conversation.name)
        answers = [m for m in messages if m.role == cpb.MESSAGE_ROLE_ASSISTANT]
        assert ANSWER in _parts(answers[0])
        row = await call_row(line, conversation.name)
        session = pb.VoiceSession.FromString(row.data)
        assert session.input_format.sample_rate_hz == 8000
        assert session.output_format.sample_rate_hz == 8000
        assert row.ended_at is None
        await call.stop()

        async def ended() -> bool:
            return (await call_row(line, conversation.name)).ended_at is not None

        await eventually(ended, "the session's end", timeout_s=WAIT_S)


async def test_speaking_over_the_answer_sends_clear(quiet_line: Line) -> None:
    line = quiet_line
    answer, sid = await dial(line)
    speech = speech_8k(COUNTING)
    async with stream(line.http, line.twilio, answer, sid) as call:
        await up(line, call)
        since = len(call.received)
        await call.dtmf("7#")  # the answers are long from here on
        await call.answered(since)  # "You pressed keys."
        since = len(call.received)
        call.play(speech)
        await call.wait_for(
            "the long answer's sound", lambda: any(h.loud for h in call.received[since:])
        )
        # The answer is playing: the caller speaks over it.
        call.play(speech)
        await call.wait_for("a clear", lambda: call.clears > 0)
        conversation = await call_conversation(line, EDITOR_CALLER)

        async def cancelled() -> bool:
            runs = await runs_of(line, conversation.name)
            return any(r.state == pb.RUN_STATE_CANCELLED for r in runs)

        await eventually(cancelled, "the run cancelled", timeout_s=WAIT_S)
        # What came of the long answer stopped well short of its length.
        loud = [h.at for h in call.received[since:] if h.loud]
        long_s = len(LONG.split()) * 60 / 180
        assert loud[-1] - loud[0] < long_s
        await call.stop()


async def test_end_call_closes_the_stream_after_the_goodbye(quiet_line: Line) -> None:
    line = quiet_line
    answer, sid = await dial(line)
    async with stream(line.http, line.twilio, answer, sid) as call:
        await up(line, call)
        since = len(call.received)
        await call.dtmf("9#")
        assert await call.closed() == aiohttp.WSCloseCode.OK
        # The goodbye was heard before the close.
        assert any(h.loud for h in call.received[since:])
    conversation = await call_conversation(line, EDITOR_CALLER)
    runs = await runs_of(line, conversation.name)
    assert sum(r.tool_call_count for r in runs) >= 1


async def test_a_stream_call_is_a_call_record_end_call_hangs_up(quiet_line: Line) -> None:
    line = quiet_line
    stub = dispatcher_stub(line.channel)
    answer, sid = await dial(line, caller=ANONYMOUS)
    async with stream(line.http, line.twilio, answer, sid) as call:
        await up(line, call)
        conversation = await call_conversation(line, ANONYMOUS)

        async def recorded() -> pb.Call | None:
            listed = await stub.ListCalls(
                pb.ListCallsRequest(parent=line.world.workspace.name, live_only=True),
                metadata=line.world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
            mine = [c for c in listed.calls if c.conversation == conversation.name]
            return mine[0] if mine and mine[0].voice_session else None

        await eventually(recorded, "the call's record", timeout_s=WAIT_S)
        live = await recorded()
        assert live is not None
        assert (live.channel, live.trunk) == ("twilio", "twilio")
        assert live.state == pb.CALL_STATE_ANSWERED
        assert (live.from_number, live.to_number) == (ANONYMOUS, NUMBER)
        assert live.direction == pb.CALL_DIRECTION_INBOUND
        assert not live.caller_known
        assert live.HasField("answer_time")
        await stub.EndCall(
            pb.EndCallRequest(name=live.name), metadata=line.world.owner.md, timeout=CALL_DEADLINE_S
        )
        assert await call.closed() == aiohttp.WSCloseCode.OK

    async def ended() -> bool:
        found = await stub.GetCall(
            pb.GetCallRequest(name=live.name), metadata=line.world.owner.md, timeout=CALL_DEADLINE_S
        )
        return found.call.state == pb.CALL_STATE_ENDED

    await eventually(ended, "the call's end", timeout_s=WAIT_S)
    done = await stub.GetCall(
        pb.GetCallRequest(name=live.name), metadata=line.world.owner.md, timeout=CALL_DEADLINE_S
    )
    assert done.call.end_reason == f"ended by {line.world.owner.name}"
    assert done.call.HasField("end_time")


async def test_bad_signatures_are_403(quiet_line: Line) -> None:
    line = quiet_line
    before = await stored_sessions(line.server, line.world.workspace.name)
    sid = call_sid()
    for headers in ({}, {"X-Twilio-Signature": "d3Jvbmc="}):
        refused = await webhook(
            line.http, line.twilio, to=NUMBER, caller=EDITOR_CALLER, call_sid=sid, headers=headers
        )
        assert (refused.status, refused.text) == (403, "")
    # Signed with another token.
    other = Carrier("twilio", PUBLIC_URL, line.twilio.local_url, twilio_token="f" * 32)
    refused = await webhook(line.http, other, to=NUMBER, caller=EDITOR_CALLER, call_sid=sid)
    assert refused.status == 403
    # Telnyx: another key, and a stale timestamp.
    stranger = Carrier(
        "telnyx", PUBLIC_URL, line.twilio.local_url, telnyx_key=Ed25519PrivateKey.generate()
    )
    refused = await webhook(line.http, stranger, to=NUMBER, caller=EDITOR_CALLER, call_sid=sid)
    assert refused.status == 403
    assert line.telnyx.telnyx_key is not None
    stale = str(int(time.time()) - 3600)
    body = b"To=%2B15550100"
    signature = base64.b64encode(line.telnyx.telnyx_key.sign(stale.encode() + b"|" + body))
    async with line.http.post(
        line.twilio.local_url + "/telephony/telnyx/voice",
        data=body,
        headers={"telnyx-timestamp": stale, "telnyx-signature-ed25519": signature.decode()},
    ) as posted:
        assert posted.status == 403
    # The upgrade: a webhook's good answer, then an unsigned or wrongly signed stream.
    answer, sid = await dial(line)
    for signature_text in ("", "d3Jvbmc="):
        with pytest.raises(aiohttp.WSServerHandshakeError) as upgrade:
            async with stream(line.http, line.twilio, answer, sid, signature=signature_text):
                pass
        assert upgrade.value.status == 403
    assert await stored_sessions(line.server, line.world.workspace.name) == before


async def test_forged_replayed_and_expired_tickets_close_the_stream(quiet_line: Line) -> None:
    line = quiet_line
    before = await stored_sessions(line.server, line.world.workspace.name)
    answer, sid = await dial(line)
    ticket = answer.stream()[1]["call"]
    body, _, signature = ticket.partition(".")
    forged_body = base64.urlsafe_b64encode(
        json.dumps({**json.loads(base64.urlsafe_b64decode(body)), "caller": ANONYMOUS}).encode()
    ).decode()
    expired = line.streams.tickets.issue(
        carrier="twilio",
        rule=0,
        caller=EDITOR_CALLER,
        dialed=NUMBER,
        call_id=sid,
        now=time.time() - 600,
    )
    tries = {
        "forged": {"call": f"{forged_body}.{signature}"},
        "none": {},
        "expired": {"call": expired},
        "a wrong signature": {"call": ticket[:-4] + "0000"},
    }
    for what, parameters in tries.items():
        async with stream(line.http, line.twilio, answer, sid, parameters=parameters) as call:
            assert await call.closed() == aiohttp.WSCloseCode.POLICY_VIOLATION, what
    # Telnyx's ticket for the call, on Twilio's stream.
    telnyx_answer = await webhook(
        line.http, line.telnyx, to=NUMBER, caller=EDITOR_CALLER, call_sid=sid
    )
    telnyx_ticket = telnyx_answer.stream()[1]
    async with stream(line.http, line.twilio, answer, sid, parameters=telnyx_ticket) as call:
        assert await call.closed() == aiohttp.WSCloseCode.POLICY_VIOLATION
    # Another call's ticket.
    async with stream(line.http, line.twilio, answer, call_sid()) as call:
        assert await call.closed() == aiohttp.WSCloseCode.POLICY_VIOLATION
    # That one is spent now (redeemed for the wrong call): the right call may not reuse it.
    async with stream(line.http, line.twilio, answer, sid) as call:
        assert await call.closed() == aiohttp.WSCloseCode.POLICY_VIOLATION
    # A fresh webhook's ticket works once, and only once.
    answer, sid = await dial(line)
    async with stream(line.http, line.twilio, answer, sid) as call:
        await up(line, call)
        async with stream(line.http, line.twilio, answer, sid) as again:
            assert await again.closed() == aiohttp.WSCloseCode.POLICY_VIOLATION
        await call.stop()
    assert await stored_sessions(line.server, line.world.workspace.name) == before + 1


async def _raw(line: Line, frames: list[str]) -> int | None:
    """A signed stream sent ``frames`` as they are; how the server closed it."""
    answer, _ = await dial(line)
    url, _ = answer.stream()
    async with line.http.ws_connect(
        local(line.twilio, url),
        headers={"X-Twilio-Signature": twilio_signature(AUTH_TOKEN, url)},
    ) as ws:
        for frame in frames:
            await ws.send_str(frame)
        async with asyncio.timeout(WAIT_S):
            async for _ in ws:
                pass
        return ws.close_code


async def test_malformed_frames_close_the_stream_without_logging_them(
    quiet_line: Line, caplog: pytest.LogCaptureFixture
) -> None:
    line = quiet_line
    before = await stored_sessions(line.server, line.world.workspace.name)
    secret = "a-payload-the-log-must-not-hold"
    connected = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    media = json.dumps(
        {"event": "media", "streamSid": "MZ1", "media": {"payload": "AAAA", "track": "inbound"}}
    )
    cases = {
        "not JSON": [f"{{not json {secret}"],
        "an unknown event": [json.dumps({"event": "sing", "words": secret})],
        "a list": [json.dumps([secret])],
        "media before the start": [connected, media],
        "a start without its fields": [json.dumps({"event": "start", "start": {"x": secret}})],
    }
    # Too many at once: past the burst of 800 messages.
    cases["a flood"] = [connected] * 1000
    with caplog.at_level(logging.DEBUG, logger="switchboard"):
        for what, frames in cases.items():
            assert await _raw(line, frames) == aiohttp.WSCloseCode.POLICY_VIOLATION, what
        # A message past 16 KiB: aiohttp's own close.
        too_big = json.dumps({"event": "connected", "padding": secret * 600})
        assert await _raw(line, [too_big]) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert secret not in caplog.text
    assert await stored_sessions(line.server, line.world.workspace.name) == before


async def test_sockets_past_the_limit_are_503(quiet_line: Line) -> None:
    """Twice the calls' limit (one here) of sockets at once; the next is 503."""
    line = quiet_line
    answer, _ = await dial(line)
    url, _ = answer.stream()
    headers = {"X-Twilio-Signature": twilio_signature(AUTH_TOKEN, url)}
    held = [await line.http.ws_connect(local(line.twilio, url), headers=headers) for _ in range(2)]
    try:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await line.http.ws_connect(local(line.twilio, url), headers=headers)
        assert refused.value.status == 503
    finally:
        for ws in held:
            await ws.close()


async def test_refused_calls_leave_nothing_in_talk(quiet_line: Line) -> None:
    line = quiet_line
    before = await stored_sessions(line.server, line.world.workspace.name)
    nowhere = await webhook(
        line.http, line.twilio, to="+15550199", caller=EDITOR_CALLER, call_sid=call_sid()
    )
    assert nowhere.rejected == ""
    viewer = await webhook(
        line.http, line.twilio, to=NUMBER, caller=VIEWER_CALLER, call_sid=call_sid()
    )
    assert viewer.rejected == ""
    # The limits (one call): a second call while one is up is busy at its webhook, and a
    # stream whose webhook passed before is closed at its start.
    early, early_sid = await dial(line)
    answer, sid = await dial(line)
    async with stream(line.http, line.twilio, answer, sid) as call:
        await up(line, call)
        busy = await webhook(
            line.http, line.twilio, to=NUMBER, caller=EDITOR_CALLER, call_sid=call_sid()
        )
        assert busy.rejected == "busy"
        async with stream(line.http, line.twilio, early, early_sid) as late:
            assert await late.closed() == aiohttp.WSCloseCode.TRY_AGAIN_LATER
        await call.stop()
    assert await stored_sessions(line.server, line.world.workspace.name) == before + 1


async def test_a_telnyx_call_is_answered(quiet_line: Line) -> None:
    line = quiet_line
    answer, sid = await dial(line, caller=ANONYMOUS, carrier=line.telnyx)
    url, _ = answer.stream()
    assert url == "wss://calls.switchboard.test/telephony/telnyx/stream"
    async with stream(line.http, line.telnyx, answer, sid) as call:
        await up(line, call)
        since = len(call.received)
        call.play(speech_8k(COUNTING))
        await call.answered(since)
        conversation = await call_conversation(line, ANONYMOUS)
        fields = conversation.metadata.fields
        assert fields["channel"].string_value == "telnyx"
        assert not fields["caller_known"].bool_value
        # An anonymous caller's call is the rule's user's.
        assert conversation.creator == line.world.owner.name
        await call.stop()


async def test_a_call_through_envoy(quiet_line: Line) -> None:
    """The carrier reaches the server through a real Envoy (``switchboard envoy
    --telephony``): the webhook over HTTP/1.1, the stream as a WebSocket upgraded on
    ``/telephony/`` only, both signatures holding over the public URL Envoy passes on."""
    line = quiet_line
    proxy = EnvoyProcess(
        line.server.address, extra_args=(f"--telephony=127.0.0.1:{line.streams.port}",)
    )
    await asyncio.to_thread(proxy.__enter__)
    try:
        edge = Carrier("twilio", PUBLIC_URL, proxy.url, twilio_token=AUTH_TOKEN)
        sid = call_sid()
        answer = await webhook(line.http, edge, to=NUMBER, caller=EDITOR_CALLER, call_sid=sid)
        assert answer.status == 200
        assert answer.rejected is None, answer.text
        async with stream(line.http, edge, answer, sid) as call:
            await up(line, call)
            since = len(call.received)
            call.play(speech_8k(COUNTING))
            await call.answered(since)
            assert rms(bytes(call.heard)) > 0
            await call.stop()
        # Elsewhere the upgrade is refused: a gRPC path is no WebSocket.
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await line.http.ws_connect(
                proxy.url.replace("http", "ws", 1) + "/switchboard.api.auth.v1.AuthService/Logout"
            )
    finally:
        await asyncio.to_thread(proxy.__exit__, None, None, None)
