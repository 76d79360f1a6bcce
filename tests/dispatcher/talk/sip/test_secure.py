"""Calls over SIP over TLS with SRTP audio (``SWITCHBOARD_SIP_TLS_*``, a trunk's ``tls`` and
``srtp``), against real SIP phones (``tests/kits/sipphone.py``: PJSIP in its own process)
on loopback, with a certificate the test makes:

- a phone calling over TLS with SRTP is answered, and hears the answer; its call is
  recorded ``tls`` and ``srtp``;
- the trunk that requires both refuses a call over UDP (403) and one over TLS whose offer
  has no SRTP keys (488), neither leaving a voice session;
- a call the server places on that trunk goes to the phone over TLS, offering SRTP, and the
  phone hears the opening message over it;
- keys offered that PJSIP cannot use leave the audio plain RTP: a call on the trunk that
  requires SRTP is hung up at once, saying why;
- a call placed to a phone whose certificate the server does not trust
  (``SWITCHBOARD_SIP_TLS_CA``) ends unanswered, its INVITE never sent.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import pytest_asyncio
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.talk.sip.calls import Calls
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, built, fresh_database_url, started
from tests.dispatcher.talk.sip.test_calls import answered
from tests.dispatcher.talk.sip.test_outbound import decide
from tests.dispatcher.talk.test_talk import stored_sessions, voice_settings
from tests.fakes.audio_server import FakeAudio
from tests.fakes.openai_server import FakeOpenAI
from tests.infra.speech import COUNTING
from tests.kits.certs import self_signed
from tests.kits.contextkit import World
from tests.kits.dispatchkit import dispatcher_stub, eventually
from tests.kits.sipphone import CallEnded, Event, SipPhone, energy, speech_wav
from tests.kits.talkkit import voice_world

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="module"),
]

NUMBER: Final = "+15550100"
CALLER: Final = "+15557654321"
CALLER_ID: Final = "+15550199"
CALLEE: Final = "+15551230001"
WAIT_S: Final = 60.0


@dataclass
class Line:
    server: SwitchboardServer
    world: World
    assistant: str
    channel: aio.Channel
    port: int  # the server's SIP over UDP
    tls_port: int  # and over TLS
    pem: tuple[Path, Path]
    #: The phone the ``secure`` trunk calls out to, over TLS with SRTP; it answers.
    callee: SipPhone
    #: The ``untrusted`` trunk's: the same, with a certificate of its own, not trusted.
    stranger: SipPhone

    def uri(self, *, tls: bool = True) -> str:
        if tls:
            return f"sip:{NUMBER}@127.0.0.1:{self.tls_port};transport=tls"
        return f"sip:{NUMBER}@127.0.0.1:{self.port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def line(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Line]:
    folder = tmp_path_factory.mktemp("secure")
    pem = self_signed(folder)
    other = self_signed(tmp_path_factory.mktemp("stranger"))
    async with (
        FakeAudio() as audio,
        FakeOpenAI(default=decide) as model,
        SipPhone.start(folder, auto_answer=True, ring_ms=300, tls=pem, srtp="mandatory") as callee,
        SipPhone.start(folder, auto_answer=True, tls=other, srtp="mandatory") as stranger,
    ):
        url = fresh_database_url()
        values: dict[str, object] = {
            "llm_base_url": model.url,
            "llm_model": "fake-model",
            "voice_max_sessions_per_user": 8,
        }
        world, assistant = await voice_world(voice_settings(url, audio.url, **values), "Secure")

        def outbound(phone: SipPhone) -> dict[str, Any]:
            return {
                "to": f"sip:127.0.0.1:{phone.tls_port}",
                "caller_id": CALLER_ID,
                "workspaces": [world.workspace.name.rsplit("/", 1)[-1]],
                "numbers": ["+1555"],
            }

        trunks = [
            {
                "name": "secure",
                "addresses": ["127.0.0.1/32"],
                "tls": True,
                "srtp": True,
                "outbound": outbound(callee),
            },
            {"name": "untrusted", "tls": True, "srtp": True, "outbound": outbound(stranger)},
        ]
        rules = [{"number": NUMBER, "assistant": assistant, "user": world.owner.name}]
        sip = {
            "sip_listen": "127.0.0.1:0",
            "sip_tls_listen": "127.0.0.1:0",
            "sip_tls_cert": str(pem[0]),
            "sip_tls_key": str(pem[1]),
            # The callee's certificate is its own authority: trusted; the stranger's is not.
            "sip_tls_ca": str(pem[0]),
            "sip_trunks": json.dumps(trunks),
            "sip_rules": json.dumps(rules),
        }
        async with started(voice_settings(url, audio.url, **values, **sip)) as server:
            engine = built(server, Calls).engine
            assert engine is not None
            assert engine.tls_port > 0
            async with aio.insecure_channel(server.address) as sip_channel:
                yield Line(
                    server,
                    world,
                    assistant,
                    sip_channel,
                    engine.port,
                    engine.tls_port,
                    pem,
                    callee,
                    stranger,
                )


async def calls(line: Line) -> list[pb.Call]:
    response = await dispatcher_stub(line.channel).ListCalls(
        pb.ListCallsRequest(parent=line.world.workspace.name),
        metadata=line.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return list(response.calls)


async def place(line: Line, trunk: str) -> pb.Call:
    response = await dispatcher_stub(line.channel).PlaceCall(
        pb.PlaceCallRequest(
            parent=line.world.workspace.name,
            trunk=trunk,
            to_number=CALLEE,
            assistant=line.assistant,
            opening_message="Say the numbers.",
        ),
        metadata=line.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.call


async def get_call(line: Line, name: str) -> pb.Call:
    response = await dispatcher_stub(line.channel).GetCall(
        pb.GetCallRequest(name=name), metadata=line.world.owner.md, timeout=CALL_DEADLINE_S
    )
    return response.call


async def media_up(phone: SipPhone, n: int) -> Event:
    return await phone.wait_event(
        lambda e: e["event"] == "media" and e["n"] == n and e["status"] == "ACTIVE", WAIT_S
    )


async def test_a_call_over_tls_with_srtp_is_answered_and_recorded_secure(
    line: Line, tmp_path: Path
) -> None:
    speech = speech_wav(COUNTING, tmp_path / "counting.wav")
    async with SipPhone.start(tmp_path, tls=line.pem, srtp="mandatory") as phone:
        n = await phone.call(line.uri(), from_user=CALLER)
        await phone.wait_state(n, "CONFIRMED", WAIT_S)
        assert (await media_up(phone, n))["srtp"] is True
        since = len(phone.events)
        await phone.play(n, speech)
        await answered(phone, n, since)
        assert energy(phone.heard(n)) > 0

        async def recorded() -> bool:
            found = [c for c in await calls(line) if c.direction == pb.CALL_DIRECTION_INBOUND]
            return bool(found) and found[0].srtp

        await eventually(recorded, "the call recorded with SRTP", timeout_s=WAIT_S)
        (call,) = [c for c in await calls(line) if c.direction == pb.CALL_DIRECTION_INBOUND]
        assert call.tls
        assert call.from_number == CALLER
        await phone.hangup(n)


async def test_the_secure_trunk_refuses_udp_and_audio_without_srtp(
    line: Line, tmp_path: Path
) -> None:
    before = await stored_sessions(line.server, line.world.workspace.name)
    codes = {}
    async with (
        SipPhone.start(tmp_path, tls=line.pem) as plain_audio,
        SipPhone.start(tmp_path) as udp,
    ):
        for what, phone, uri in (
            ("udp", udp, line.uri(tls=False)),
            ("tls without srtp", plain_audio, line.uri()),
        ):
            n = await phone.call(uri, from_user=CALLER)
            with pytest.raises(CallEnded) as refused:
                await phone.wait_state(n, "CONFIRMED", WAIT_S)
            codes[what] = (refused.value.event["code"], refused.value.event["reason"])
    assert codes == {"udp": (403, "TLS required"), "tls without srtp": (488, "SRTP required")}
    assert await stored_sessions(line.server, line.world.workspace.name) == before


async def test_a_call_placed_on_the_secure_trunk_goes_over_tls_with_srtp(line: Line) -> None:
    callee = line.callee
    since = len(callee.events)
    placed = await place(line, "secure")
    assert placed.tls
    invite = await callee.wait_event(lambda e: e["event"] == "incoming", WAIT_S, since=since)
    message = str(invite["message"])
    assert message.startswith(f"INVITE sip:{CALLEE}@127.0.0.1:{callee.tls_port};transport=tls")
    assert "SIP/2.0/TLS" in message
    assert "RTP/SAVP" in message
    assert "a=crypto:" in message
    n = int(invite["n"])
    assert (await media_up(callee, n))["srtp"] is True
    await answered(callee, n, since)

    async def recorded() -> bool:
        call = await get_call(line, placed.name)
        return call.state == pb.CALL_STATE_ANSWERED and call.srtp

    await eventually(recorded, "the placed call answered, with SRTP", timeout_s=WAIT_S)
    await dispatcher_stub(line.channel).EndCall(
        pb.EndCallRequest(name=placed.name),
        metadata=line.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    await callee.wait_state(n, "DISCONNECTED", WAIT_S)


async def test_a_call_placed_to_a_certificate_not_trusted_ends_unanswered(line: Line) -> None:
    since = len(line.stranger.events)
    placed = await place(line, "untrusted")

    async def ended() -> bool:
        call = await get_call(line, placed.name)
        return call.state == pb.CALL_STATE_ENDED

    await eventually(ended, "the call to an untrusted certificate ended", timeout_s=WAIT_S)
    call = await get_call(line, placed.name)
    assert not call.HasField("answer_time")
    assert call.sip_status == 503, call  # PJSIP's: the TLS connection failed
    assert [e for e in line.stranger.events[since:] if e["event"] == "incoming"] == []


async def _read_message(reader: asyncio.StreamReader) -> str:
    """One SIP message off a stream: its head, and its body by Content-Length."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)).decode()
    lengths = [
        int(line.split(":", 1)[1])
        for line in head.split("\r\n")
        if line.lower().startswith(("content-length:", "l:"))
    ]
    body = await asyncio.wait_for(reader.readexactly(lengths[0]), WAIT_S) if lengths else b""
    return head + body.decode()


def _header(message: str, name: str) -> str:
    for line in message.split("\r\n"):
        if line.lower().startswith(name.lower() + ":"):
            return line.split(":", 1)[1].strip()
    return ""


async def test_keys_offered_but_not_used_end_a_call_its_trunk_needs_srtp_for(
    line: Line,
) -> None:
    # A hand-made INVITE over TLS whose only SRTP key is of a suite no one has: PJSIP
    # answers with plain RTP (the offer was RTP/AVP, keys optional); the trunk requires
    # SRTP, so the server hangs up at once, saying why.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", line.tls_port, ssl=context)
    here = writer.get_extra_info("sockname")[1]
    call_id, tag = uuid.uuid4().hex, uuid.uuid4().hex[:8]
    sdp = (
        "v=0\r\no=raw 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio 49170 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
        "a=crypto:1 NO_SUCH_SUITE_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n"
    )
    invite = (
        f"INVITE sip:{NUMBER}@127.0.0.1:{line.tls_port};transport=tls SIP/2.0\r\n"
        f"Via: SIP/2.0/TLS 127.0.0.1:{here};rport;branch=z9hG4bK{uuid.uuid4().hex}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{CALLER}@127.0.0.1>;tag={tag}\r\n"
        f"To: <sip:{NUMBER}@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:raw@127.0.0.1:{here};transport=tls>\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(sdp)}\r\n\r\n{sdp}"
    )
    writer.write(invite.encode())
    try:
        while True:
            answer = await _read_message(reader)
            if not answer.startswith("SIP/2.0 1"):
                break
        assert answer.startswith("SIP/2.0 200"), answer
        assert "a=crypto" not in answer
        to = _header(answer, "to")
        ack = (
            f"ACK sip:{NUMBER}@127.0.0.1:{line.tls_port};transport=tls SIP/2.0\r\n"
            f"Via: SIP/2.0/TLS 127.0.0.1:{here};rport;branch=z9hG4bK{uuid.uuid4().hex}\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:{CALLER}@127.0.0.1>;tag={tag}\r\nTo: {to}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        )
        writer.write(ack.encode())
        bye = await _read_message(reader)
        assert bye.startswith("BYE "), bye
        ok = "".join(
            f"{name}: {_header(bye, name)}\r\n" for name in ("Via", "From", "To", "Call-ID", "CSeq")
        )
        writer.write(f"SIP/2.0 200 OK\r\n{ok}Content-Length: 0\r\n\r\n".encode())
        await writer.drain()
    finally:
        writer.close()

    async def ended() -> bool:
        found = [c for c in await calls(line) if c.from_number == CALLER]
        return bool(found) and found[0].state == pb.CALL_STATE_ENDED

    await eventually(ended, "the call without SRTP ended", timeout_s=WAIT_S)
    call = next(c for c in await calls(line) if c.from_number == CALLER)
    assert call.end_reason == "its audio was not SRTP, as its trunk requires", call
    assert call.tls
    assert not call.srtp
