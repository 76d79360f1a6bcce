"""Phone calls over SIP (``talk/sip``) against a real SIP phone: PJSIP in its own process
(``tests/kits/sipphone.py``) calls the server's PJSIP over loopback, with digest
credentials, and plays eSpeak NG speech; the local audio server recognizes it (PocketSphinx)
and speaks the answer; the local model server answers as a scripted model
(``decide``), keyed by the keys the phone presses, so each test steers the assistant:

- a spoken turn is answered aloud, and the phone hears it (its energy, and PocketSphinx's
  transcript of what it heard); the call is a conversation of the mapped caller's, with
  its caller ID, a voice session and the turn's message; keys pressed arrive as one
  message; the caller hanging up ends the session;
- speaking over the answer interrupts it (its run cancelled, the rest never heard);
- the assistant presses keys, transfers the call (a REFER the phone follows to a second
  phone) and hangs up (after its goodbye), each a tool call of its run;
- a G.722 phone is carried at 16 kHz;
- an anonymous caller acts as the rule's user; a caller mapped to a viewer is refused;
  a caller without credentials is challenged, one with wrong ones refused, a number no
  rule has is 404, a phone with no codec in common 488, a flood from one address 503, and
  malformed SIP is answered 400 or dropped, the server going on: none of them leaves a
  voice session;
- baresip, another SIP stack, calls in with its digest answer, is heard and hears the
  answer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import pytest_asyncio
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.talk.sip.calls import Calls
from switchboard.platform.audio import pcm
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import VoiceSessionRow
from tests.conftest import CALL_DEADLINE_S, built, fresh_database_url, started
from tests.dispatcher.talk.test_talk import stored_sessions, voice_settings
from tests.fakes.audio_server import FakeAudio, Recognizer
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.speech import COUNTING, says
from tests.kits.contextkit import World, all_messages, context_stub
from tests.kits.dispatchkit import dispatcher_stub, eventually
from tests.kits.sipphone import CallEnded, Event, SipPhone, energy, speech_wav
from tests.kits.talkkit import voice_world

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="module"),
]

NUMBER: Final = "+15550100"
#: A caller ID the rule maps to the workspace's editor, and one it maps to its viewer.
EDITOR_CALLER: Final = "+15557654321"
VIEWER_CALLER: Final = "+15557650000"
ANONYMOUS: Final = "+15559990000"
USERNAME: Final = "pbx"
PASSWORD: Final = "a-long-trunk-secret"
WAIT_S: Final = 60.0
#: RMS of speech through G.711 is in the thousands; silence is near zero.
SPEECH_RMS: Final = 300.0
#: The answer to a spoken turn: the words PocketSphinx knows eSpeak NG by.
ANSWER: Final = COUNTING
#: What a transcript of telephone audio must hold, in order: at 8 kHz PocketSphinx took
#: the last word, "five", for "i do" once.
HEARD: Final = ("two", "three", "four")
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
        return Reply.text("Done. Goodbye.")
    text = _text(last)
    if "keys pressed: 9" in text:
        return Reply.tool_calls([("end_call", {"reason": "the caller pressed 9"})])
    if "keys pressed: 5" in text:
        return Reply.tool_calls([("send_keys", {"keys": "42"})])
    if "keys pressed: 0" in text:
        return Reply.tool_calls([("transfer_call", {"destination": "desk"})])
    if "keys pressed" in text:
        return Reply.text("You pressed keys.")
    long = any("keys pressed: 7" in _text(m) for m in messages if m["role"] == "user")
    return Reply.text(LONG if long else ANSWER + ".")


def _text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content)
    return str(content)


@dataclass
class Line:
    """The module's server with SIP, its world and assistant, and the fakes."""

    server: SwitchboardServer
    port: int
    world: World
    assistant: str
    model: FakeOpenAI
    channel: aio.Channel
    #: A phone the rule's ``desk`` transfers to, answering every call.
    desk: SipPhone

    @property
    def uri(self) -> str:
        return f"sip:{NUMBER}@127.0.0.1:{self.port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def line(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Line]:
    async with (
        FakeAudio() as audio,
        FakeOpenAI(default=decide) as model,
        SipPhone.start(tmp_path_factory.mktemp("desk"), auto_answer=True) as desk,
    ):
        url = fresh_database_url()
        values: dict[str, object] = {
            "llm_base_url": model.url,
            "llm_model": "fake-model",
            "voice_max_sessions_per_user": 8,
        }
        # The rules name users and an assistant, so they are made first, by a server
        # without SIP on the same database.
        world, assistant = await voice_world(voice_settings(url, audio.url, **values), "Phone")
        trunks = [
            {
                "name": "local",
                "addresses": ["127.0.0.1/32"],
                "username": USERNAME,
                "password": PASSWORD,
            }
        ]
        rules = [
            {
                "number": NUMBER,
                "trunks": ["local"],
                "assistant": assistant,
                "user": world.owner.name,
                "callers": {EDITOR_CALLER: world.editor.name, VIEWER_CALLER: world.viewer.name},
                "transfer": {"desk": f"sip:desk@127.0.0.1:{desk.port}"},
            }
        ]
        sip = {
            "sip_listen": "127.0.0.1:0",
            "sip_trunks": json.dumps(trunks),
            "sip_rules": json.dumps(rules),
            "sip_dtmf_pause_s": 0.5,
            "metrics_port": 0,
        }
        async with started(voice_settings(url, audio.url, **values, **sip)) as server:
            calls = built(server, Calls)
            assert calls.engine is not None
            async with aio.insecure_channel(server.address) as channel:
                yield Line(server, calls.engine.port, world, assistant, model, channel, desk)


async def dial(phone: SipPhone, line: Line, caller: str = EDITOR_CALLER) -> int:
    n = await phone.call(line.uri, from_user=caller, auth=(USERNAME, PASSWORD))
    await phone.wait_state(n, "CONFIRMED", WAIT_S)
    return n


async def answered(phone: SipPhone, n: int, since: int = 0) -> Event:
    """The answer's sound on call ``n`` after event ``since``, and the quiet after it."""
    sound = await phone.wait_event(
        lambda e: e["event"] == "sound" and e["n"] == n, WAIT_S, since=since
    )
    return await phone.wait_event(
        lambda e: e["event"] == "quiet" and e["n"] == n and e["at_ms"] > sound["at_ms"],
        WAIT_S,
        since=since,
    )


async def call_row(line: Line, conversation: str) -> VoiceSessionRow:
    conversation_id = conversation.rsplit("/", 1)[-1]

    def read(db: Session) -> VoiceSessionRow:
        row = db.execute(
            select(VoiceSessionRow).where(VoiceSessionRow.conversation_id == conversation_id)
        ).scalar_one()
        db.expunge(row)
        return row

    return await line.server.shared.database.run(read, write=False)


async def call_conversation(line: Line, caller: str) -> cpb.Conversation:
    """The newest conversation of a call from ``caller``."""
    stub = context_stub(line.channel)
    found = await stub.ListConversations(
        cpb.ListConversationsRequest(parent=line.world.workspace.name, page_size=100),
        metadata=line.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    calls = [c for c in found.conversations if c.metadata.fields.get("caller", None) is not None]
    mine = [c for c in calls if c.metadata.fields["caller"].string_value == caller]
    assert mine, [c.title for c in found.conversations]
    return max(mine, key=lambda c: c.create_time.ToDatetime())


async def runs_of(line: Line, conversation: str) -> list[pb.Run]:
    listed = await dispatcher_stub(line.channel).ListRuns(
        pb.ListRunsRequest(parent=conversation, page_size=100),
        metadata=line.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return list(listed.runs)


def scraped(server: SwitchboardServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert server.metrics is not None
    found = {}
    for family in text_string_to_metric_families(server.metrics.text().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def transcript(heard: bytes) -> str:
    words, _ = Recognizer().transcribe(pcm.to_wav(heard, 16_000))
    return words


async def test_a_call_is_answered_aloud_and_keys_pressed_are_a_message(
    line: Line, tmp_path: Path
) -> None:
    speech = speech_wav(COUNTING, tmp_path / "counting.wav")
    async with SipPhone.start(tmp_path) as phone:
        n = await dial(phone, line)
        media = await phone.wait_event(
            lambda e: e["event"] == "media" and e["n"] == n and e["status"] == "ACTIVE", WAIT_S
        )
        assert (media["codec"], media["rate"]) == ("PCMU", 8000)
        since = len(phone.events)
        await phone.play(n, speech)
        await answered(phone, n, since)
        heard = phone.heard(n)
        assert energy(heard) > 0
        assert says(transcript(heard), HEARD), transcript(heard)

        await phone.dtmf(n, "12#")
        conversation = await call_conversation(line, EDITOR_CALLER)
        stub = context_stub(line.channel)

        async def keys_arrived() -> bool:
            messages = await all_messages(stub, line.world.editor, conversation.name)
            return any("[keys pressed: 1 2 #]" in _parts(m) for m in messages)

        await eventually(keys_arrived, "the keys' message", timeout_s=WAIT_S)
        messages = await all_messages(stub, line.world.editor, conversation.name)
        assert conversation.title == f"Call from {EDITOR_CALLER} to {NUMBER}"
        fields = conversation.metadata.fields
        assert fields["channel"].string_value == "sip"
        assert fields["dialed"].string_value == NUMBER
        assert fields["caller_known"].bool_value
        # The mapped caller's own conversation.
        assert conversation.creator == line.world.editor.name
        spoken = [m for m in messages if m.role == cpb.MESSAGE_ROLE_USER]
        # Heard as a turn: PocketSphinx's model is for 16 kHz, and over PCMU's 8 kHz it
        # gets the words wrong (the G.722 test checks them).
        assert _parts(spoken[0]).strip()
        answers = [m for m in messages if m.role == cpb.MESSAGE_ROLE_ASSISTANT]
        assert ANSWER in _parts(answers[0])

        row = await call_row(line, conversation.name)
        session = pb.VoiceSession.FromString(row.data)
        assert session.input_format.sample_rate_hz == 8000
        assert session.output_format.sample_rate_hz == 8000
        assert row.ended_at is None
        await phone.hangup(n)

        async def ended() -> bool:
            return (await call_row(line, conversation.name)).ended_at is not None

        await eventually(ended, "the session's end", timeout_s=WAIT_S)
    calls = built(line.server, Calls)

    async def let_go() -> bool:
        return calls.open_calls == 0

    await eventually(let_go, "the call let go", timeout_s=WAIT_S)


def _parts(message: cpb.Message) -> str:
    return " ".join(part.text for part in message.parts)


async def test_speaking_over_the_answer_interrupts_it(line: Line, tmp_path: Path) -> None:
    speech = speech_wav(COUNTING, tmp_path / "counting.wav")
    async with SipPhone.start(tmp_path) as phone:
        n = await dial(phone, line)
        since = len(phone.events)
        await phone.dtmf(n, "7#")  # the answers are long from here on
        await answered(phone, n, since)  # "You pressed keys."
        since = len(phone.events)
        await phone.play(n, speech)
        sound = await phone.wait_event(
            lambda e: e["event"] == "sound" and e["n"] == n, WAIT_S, since=since
        )
        # The answer is playing: the caller speaks over it.
        await phone.play(n, speech)
        quiet = await phone.wait_event(
            lambda e: e["event"] == "quiet" and e["n"] == n and e["at_ms"] > sound["at_ms"],
            WAIT_S,
            since=since,
        )
        conversation = await call_conversation(line, EDITOR_CALLER)
        runs = await runs_of(line, conversation.name)
        states = [r.state for r in sorted(runs, key=lambda r: r.create_time.ToDatetime())]
        assert pb.RUN_STATE_CANCELLED in states, states
        # What was heard of the long answer stopped well short of its length.
        long_ms = len(LONG.split()) * 60_000 // 180
        assert quiet["at_ms"] - sound["at_ms"] < long_ms
        await phone.hangup(n)


async def test_the_assistant_presses_keys_transfers_and_hangs_up(
    line: Line, tmp_path: Path
) -> None:
    async with SipPhone.start(tmp_path) as phone:
        n = await dial(phone, line)
        await phone.dtmf(n, "5#")
        four = await phone.wait_event(
            lambda e: e["event"] == "dtmf" and e["n"] == n and e["digit"] == "4", WAIT_S
        )
        await phone.wait_event(
            lambda e: e["event"] == "dtmf" and e["n"] == n and e["digit"] == "2",
            WAIT_S,
            since=phone.events.index(four),
        )
        tools = line.model.requests[-1].body.get("tools", [])
        offered = {t["function"]["name"] for t in tools}
        assert {"end_call", "send_keys", "transfer_call"} <= offered

        await phone.dtmf(n, "9#")
        ended = await phone.wait_state(n, "DISCONNECTED", WAIT_S)
        assert ended["code"] == 200  # the server's BYE, after its goodbye
        conversation = await call_conversation(line, EDITOR_CALLER)
        runs = await runs_of(line, conversation.name)
        assert sum(r.tool_call_count for r in runs) >= 2

    # A transfer: the phone follows the REFER to the desk, and the server's leg ends.
    async with SipPhone.start(tmp_path) as phone:
        n = await dial(phone, line)
        await phone.dtmf(n, "0#")
        refer = await phone.wait_event(lambda e: e["event"] == "transfer" and e["n"] == n, WAIT_S)
        assert refer["target"] == f"sip:desk@127.0.0.1:{line.desk.port}"
        incoming = await line.desk.wait_event(
            lambda e: e["event"] == "incoming" and EDITOR_CALLER in e["from"], WAIT_S
        )
        await line.desk.wait_state(int(incoming["n"]), "CONFIRMED", WAIT_S)
        ended = await phone.wait_state(n, "DISCONNECTED", WAIT_S)
        assert ended["code"] == 200
        await phone.hangup(int(refer["new_n"]))


async def test_a_g722_phone_is_carried_at_16_khz(line: Line, tmp_path: Path) -> None:
    speech = speech_wav(COUNTING, tmp_path / "counting.wav")
    async with SipPhone.start(tmp_path, codecs=["G722/16000/1"]) as phone:
        n = await dial(phone, line, caller=ANONYMOUS)
        media = await phone.wait_event(
            lambda e: e["event"] == "media" and e["n"] == n and e["status"] == "ACTIVE", WAIT_S
        )
        assert (media["codec"], media["rate"]) == ("G722", 16000)
        since = len(phone.events)
        await phone.play(n, speech)
        await answered(phone, n, since)
        conversation = await call_conversation(line, ANONYMOUS)
        messages = await all_messages(
            context_stub(line.channel), line.world.owner, conversation.name
        )
        spoken = [m for m in messages if m.role == cpb.MESSAGE_ROLE_USER]
        # The caller's words, heard at 16 kHz, are recognized whole (the answer's, heard
        # by the phone, are the PCMU test's: through G.722 PocketSphinx took "one two" for
        # "well you to" at times).
        assert energy(phone.heard(n)) > 0
        assert says(_parts(spoken[0]), HEARD), _parts(spoken[0])
        # An anonymous caller's call is the rule's user's.
        assert conversation.creator == line.world.owner.name
        assert not conversation.metadata.fields["caller_known"].bool_value
        session = pb.VoiceSession.FromString((await call_row(line, conversation.name)).data)
        assert session.input_format.sample_rate_hz == 16000
        assert session.output_format.sample_rate_hz == 16000
        await phone.hangup(n)


async def test_refused_calls_leave_no_voice_session(line: Line, tmp_path: Path) -> None:
    before = await stored_sessions(line.server, line.world.workspace.name)
    async with (
        SipPhone.start(tmp_path) as phone,
        SipPhone.start(tmp_path, codecs=["speex/8000/1"]) as speex,
    ):
        codes = {}
        attempts = {
            "viewer": (phone, line.uri, VIEWER_CALLER, (USERNAME, PASSWORD)),
            "no credentials": (phone, line.uri, EDITOR_CALLER, None),
            "wrong password": (phone, line.uri, EDITOR_CALLER, (USERNAME, "not the secret")),
            "no rule": (
                phone,
                f"sip:+15550199@127.0.0.1:{line.port}",
                EDITOR_CALLER,
                (USERNAME, PASSWORD),
            ),
            "no common codec": (speex, line.uri, EDITOR_CALLER, (USERNAME, PASSWORD)),
        }
        for what, (who, uri, caller, auth) in attempts.items():
            n = await who.call(uri, from_user=caller, auth=auth)
            with pytest.raises(CallEnded) as refused:
                await who.wait_state(n, "CONFIRMED", WAIT_S)
            codes[what] = refused.value.event["code"]
    assert codes == {
        "viewer": 403,
        "no credentials": 401,
        "wrong password": 403,
        "no rule": 404,
        "no common codec": 488,
    }
    assert await stored_sessions(line.server, line.world.workspace.name) == before
    # Each refusal counted by its status (PJSIP's own 488 is not seen by the server).
    found = scraped(line.server)
    assert found[("switchboard_sip_refused_total", (("code", "401"),))] >= 1
    assert found[("switchboard_sip_refused_total", (("code", "403"),))] >= 2
    assert found[("switchboard_sip_refused_total", (("code", "404"),))] >= 1
    assert found[("switchboard_sip_calls", (("state", "answered"),))] == 0


def _invite(port: int, source: str, number: str, call_id: str) -> bytes:
    sdp = (
        f"v=0\r\no=- 1 1 IN IP4 {source}\r\ns=-\r\nc=IN IP4 {source}\r\nt=0 0\r\n"
        "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    head = (
        f"INVITE sip:{number}@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {source}:5099;rport;branch=z9hG4bK{uuid.uuid4().hex}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:flood@{source}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{number}@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:flood@{source}:5099>\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(sdp)}\r\n\r\n"
    )
    return (head + sdp).encode()


async def _answers(sock: socket.socket, count: int) -> list[int]:
    """The final status of each of ``count`` INVITEs sent on ``sock``, by Call-ID."""
    loop = asyncio.get_running_loop()
    finals: dict[str, int] = {}

    async def read() -> None:
        while len(finals) < count:
            data = await loop.sock_recv(sock, 65_535)
            text = data.decode(errors="replace")
            status = int(text.split(" ", 2)[1]) if text.startswith("SIP/2.0 ") else 0
            lines = text.split("\r\n")
            ids = [h.split(":", 1)[1].strip() for h in lines if h.lower().startswith("call-id:")]
            call_id = ids[0] if ids else ""
            if status >= 200:
                finals[call_id] = status

    await asyncio.wait_for(read(), WAIT_S)
    return list(finals.values())


async def test_an_unknown_address_a_flood_and_malformed_sip_are_refused(
    line: Line, tmp_path: Path
) -> None:
    before = await stored_sessions(line.server, line.world.workspace.name)
    # 127.0.0.2 is loopback too, and no trunk's address.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.2", 0))
        sock.setblocking(False)
        source = "127.0.0.2"
        target = ("127.0.0.1", line.port)
        flood = 30
        for i in range(flood):
            sock.sendto(_invite(line.port, source, NUMBER, f"flood-{i}"), target)
        statuses = await _answers(sock, flood)
        # Every one refused: the first as no trunk's, past the burst as too many from one
        # address (503), and while PJSIP's call slots are held, by PJSIP itself (486).
        assert len(statuses) == flood
        assert set(statuses) <= {403, 486, 503}, statuses
        assert 403 in statuses
        assert statuses.count(403) <= 10
        # Malformed: not SIP at all, and an INVITE with a broken header: the server
        # goes on, and answers the next call.
        sock.sendto(b"\x00\xffnot sip at all\r\n\r\n", target)
        broken = _invite(line.port, source, NUMBER, "broken").replace(
            b"CSeq: 1 INVITE", b"CSeq: one INVITE"
        )
        sock.sendto(broken, target)
    async with SipPhone.start(tmp_path) as phone:
        n = await dial(phone, line)
        await phone.hangup(n)
    assert await stored_sessions(line.server, line.world.workspace.name) == before + 1


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_baresip_calls_in_and_hears_the_answer(line: Line, tmp_path: Path) -> None:
    """Another SIP stack (baresip, on libre) against the server: its digest answer, its
    SDP and RTP; it plays speech from a file and keeps what it heard (sndfile)."""
    baresip = shutil.which("baresip")
    assert baresip is not None, "baresip is not installed; run scripts/install-deps.sh"
    home = tmp_path / "baresip"
    home.mkdir()
    speech = speech_wav(COUNTING, tmp_path / "counting.wav")
    padded = tmp_path / "padded.wav"
    samples, rate = pcm.from_wav(speech.read_bytes())
    # At the call's rate (aufile takes no other), half a second of silence first while
    # the call's media settles, and time after it for the answer.
    said = pcm.resample(samples, rate, 8_000)
    padded.write_bytes(pcm.to_wav(bytes(8_000) + said + bytes(8_000 * 2 * 8), 8_000))
    (home / "config").write_text(
        "\n".join(
            [
                f"sip_listen 127.0.0.1:{_free_udp_port()}",
                f"audio_source aufile,{padded}",
                "audio_player aubridge,nil",
                "audio_alert aubridge,nil",
                "module_path /usr/lib/baresip/modules",
                "module g711.so",
                "module aufile.so",
                "module aubridge.so",
                "module sndfile.so",
                "module_app account.so",
                "module_app menu.so",
                f"snd_path {home}",
                "",
            ]
        )
    )
    (home / "accounts").write_text(
        f"<sip:{EDITOR_CALLER}@127.0.0.1>;auth_user={USERNAME};auth_pass={PASSWORD};"
        "regint=0;audio_codecs=PCMU\n"
    )
    process = await asyncio.create_subprocess_exec(
        baresip,
        "-f",
        str(home),
        "-e",
        f"/dial {line.uri}",
        # It quits after this long; its call ends before, when the file has played.
        "-t",
        "15",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), WAIT_S)
    text = output.decode(errors="replace")
    dumps = sorted(home.glob("dump-*-dec.wav"))
    assert dumps, text[-3000:]
    heard, heard_rate = pcm.from_wav(dumps[0].read_bytes())
    assert "terminated" in text, text[-3000:]
    # It heard the answer: speech-loud frames in what it decoded (PocketSphinx's 16 kHz
    # model reads baresip's 8 kHz dump poorly; the PCMU test reads the words).
    frame = pcm.byte_count(20, heard_rate)
    loudest = max(energy(heard[i : i + frame]) for i in range(0, len(heard), frame))
    assert loudest > SPEECH_RMS, text[-3000:]
    # The server heard it: a turn, and the answer to it, in the caller's conversation.
    conversation = await call_conversation(line, EDITOR_CALLER)
    messages = await all_messages(context_stub(line.channel), line.world.editor, conversation.name)
    roles = [m.role for m in messages]
    assert cpb.MESSAGE_ROLE_USER in roles, text[-3000:]
    answers = [_parts(m) for m in messages if m.role == cpb.MESSAGE_ROLE_ASSISTANT]
    assert any(ANSWER in a for a in answers), answers

    async def ended() -> bool:
        return (await call_row(line, conversation.name)).ended_at is not None

    await eventually(ended, "the session's end", timeout_s=WAIT_S)
