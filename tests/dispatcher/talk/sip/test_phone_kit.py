"""The test phone (tests/kits/sipphone.py) against itself: real PJSIP on both ends of
each call, over loopback, each phone in its own process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CALL_DEADLINE_S
from tests.kits.sipphone import CallEnded, Event, SipPhone, energy, speech_wav

pytestmark = pytest.mark.e2e

CALLER_ID = "+15557654321"
#: RMS of speech through G.711 is in the thousands; the phone's silence is zero.
SPEECH_RMS = 300.0
SILENCE_RMS = 50.0


async def test_a_call_carries_speech_and_dtmf_and_ends(tmp_path: Path) -> None:
    async with (
        SipPhone.start(tmp_path, auto_answer=True) as a,
        SipPhone.start(tmp_path) as b,
    ):
        n = await b.call(
            f"sip:a@127.0.0.1:{a.port}", from_user=CALLER_ID, headers={"X-Kit-Test": "yes"}
        )
        incoming = await a.wait_event(lambda e: e["event"] == "incoming", CALL_DEADLINE_S)
        assert CALLER_ID in incoming["from"]
        assert "X-Kit-Test: yes" in incoming["message"]
        assert incoming["uri"] == f"sip:a@127.0.0.1:{a.port}"
        assert "sip:a@127.0.0.1" in incoming["to"]
        m = int(incoming["n"])
        await b.wait_state(n, "CONFIRMED", CALL_DEADLINE_S)
        await a.wait_state(m, "CONFIRMED", CALL_DEADLINE_S)
        media = await b.wait_event(
            lambda e: e["event"] == "media" and e["n"] == n and e["status"] == "ACTIVE",
            CALL_DEADLINE_S,
        )
        assert (media["codec"], media["rate"]) == ("PCMU", 8000)  # first of the defaults

        wav = speech_wav("hello, this is the test phone", tmp_path / "hello.wav")
        await b.play(n, wav)
        await b.wait_played(n, CALL_DEADLINE_S)
        sound = await a.wait_event(lambda e: e["event"] == "sound" and e["n"] == m, CALL_DEADLINE_S)
        await a.wait_event(
            lambda e: e["event"] == "quiet" and e["n"] == m and e["at_ms"] > sound["at_ms"],
            CALL_DEADLINE_S,
        )
        assert energy(a.heard(m)) > SPEECH_RMS
        # A played nothing: what B heard is the phone's silence, the baseline.
        assert energy(b.heard(n)) < SILENCE_RMS

        await b.dtmf(n, "1#", method="rfc4733")
        await a.wait_event(lambda e: e["event"] == "dtmf" and e["digit"] == "#", CALL_DEADLINE_S)
        await b.dtmf(n, "5", method="info")
        await a.wait_event(lambda e: e["event"] == "dtmf" and e["digit"] == "5", CALL_DEADLINE_S)
        digits = [(e["digit"], e["method"]) for e in a.events if e["event"] == "dtmf"]
        assert digits == [("1", "rfc4733"), ("#", "rfc4733"), ("5", "info")]

        await b.hangup(n)
        ended = await a.wait_state(m, "DISCONNECTED", CALL_DEADLINE_S)
        assert ended["code"] == 200  # the BYE's answer
        await b.wait_state(n, "DISCONNECTED", CALL_DEADLINE_S)
        assert not await a.hangup(m)  # ended already: nothing to do, and no error
        assert not [e for e in a.events + b.events if e["event"] == "fault"]


async def test_no_common_codec_is_refused_with_488(tmp_path: Path) -> None:
    async with (
        SipPhone.start(tmp_path, auto_answer=True) as a,
        SipPhone.start(tmp_path, codecs=["speex/8000/1"]) as c,
    ):
        n = await c.call(f"sip:a@127.0.0.1:{a.port}", from_user="c")
        ended: Event = await c.wait_state(n, "DISCONNECTED", CALL_DEADLINE_S)
        assert ended["code"] == 488
        assert not [e for e in c.events if e["event"] == "state" and e["state"] == "CONFIRMED"]


async def test_a_refer_is_seen_and_the_target_called(tmp_path: Path) -> None:
    async with (
        SipPhone.start(tmp_path, auto_answer=True) as a,
        SipPhone.start(tmp_path) as b,
        SipPhone.start(tmp_path, auto_answer=True) as c,
    ):
        n = await b.call(f"sip:a@127.0.0.1:{a.port}", from_user="b")
        incoming = await a.wait_event(lambda e: e["event"] == "incoming", CALL_DEADLINE_S)
        m = int(incoming["n"])
        await a.wait_state(m, "CONFIRMED", CALL_DEADLINE_S)
        target = f"sip:c@127.0.0.1:{c.port}"
        await a.transfer(m, target)

        transfer = await b.wait_event(lambda e: e["event"] == "transfer", CALL_DEADLINE_S)
        assert transfer["n"] == n
        assert target in transfer["target"]
        await b.wait_state(int(transfer["new_n"]), "CONFIRMED", CALL_DEADLINE_S)
        at_c = await c.wait_event(lambda e: e["event"] == "incoming", CALL_DEADLINE_S)
        assert "sip:b@127.0.0.1" in at_c["from"]
        await a.wait_event(
            lambda e: e["event"] == "transfer_status" and e["final"] and e["code"] == 200,
            CALL_DEADLINE_S,
        )


async def test_calls_are_answered_or_refused_by_hand(tmp_path: Path) -> None:
    async with (
        SipPhone.start(tmp_path) as a,
        SipPhone.start(tmp_path, codecs=["G722/16000/1"]) as b,
    ):
        n = await b.call(f"sip:a@127.0.0.1:{a.port}")
        m = int((await a.wait_event(lambda e: e["event"] == "incoming"))["n"])
        await b.wait_state(n, "EARLY")  # the phone rings (180) until it is answered
        await a.answer(m)
        await b.wait_state(n, "CONFIRMED")
        media = await a.wait_event(
            lambda e: e["event"] == "media" and e["n"] == m and e["status"] == "ACTIVE"
        )
        assert (media["codec"], media["rate"]) == ("G722", 16000)

        # What is queued can be dropped before it is played.
        wav = speech_wav("a long sentence that will not be heard to the end", tmp_path / "l.wav")
        first = await b.play(n, wav)
        second = await b.play(n, wav)
        assert await b.clear(n) in ([first, second], [second])
        await b.wait_played(n)
        assert [e for e in b.events if e["event"] == "played" and e.get("cleared")]
        await b.hangup(n)
        await a.wait_state(m, "DISCONNECTED")

        k = await b.call(f"sip:a@127.0.0.1:{a.port}")
        incoming = await a.wait_event(lambda e: e["event"] == "incoming" and e["n"] != m)
        await a.hangup(int(incoming["n"]), code=486)
        refused = await b.wait_state(k, "DISCONNECTED")
        assert refused["code"] == 486
        with pytest.raises(CallEnded):
            await b.wait_state(k, "CONFIRMED")
