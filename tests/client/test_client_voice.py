"""switchboard.client.voice: the numbering, the turns a drop loses, and resuming.

The pure parts (``Ledger``, ``ReplyBuilder``, the PCM helpers) directly; the session
against a scripted Talk server (tests/kits/scriptedtalk.py) on a real gRPC server, which
drops the call at exact points: after so many numbered frames, or mid-turn. The same
client against the real server: tests/client/test_client_voice_service.py.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.client import (
    Client,
    Resumed,
    SessionEnded,
    SpeechNotConfigured,
    StreamPolicy,
    pcm_from_wav,
    pcm_to_wav,
)
from switchboard.client.backoff import Backoff
from switchboard.client.voice import (
    MAX_FRAME_BYTES,
    TURN_BITS,
    Ledger,
    ReplyBuilder,
    TalkSession,
    frames_of,
    resample,
    talk_start,
    turn_of,
)
from switchboard.platform import errors
from switchboard.platform.rpc.status import to_grpc_status
from tests.conftest import CALL_DEADLINE_S
from tests.kits.scriptedtalk import CONVERSATION, SPEECH_CHUNK, TURN, ScriptedTalk, scripted

pytestmark = pytest.mark.unit

FAST = StreamPolicy(backoff=Backoff(initial_s=0.01, max_s=0.05), idle_timeout_s=5.0)
CLIENT = pb.TURN_DETECTION_CLIENT


@pytest.fixture
async def server() -> AsyncIterator[tuple[ScriptedTalk, Client]]:
    async with scripted() as (servicer, address), Client(address, streams=FAST) as client:
        yield servicer, client


def _talk(client: Client, **options: object) -> TalkSession:
    return client.talk(CONVERSATION, turn_detection="client", **options)  # type: ignore[arg-type]


def _pcm(samples: int, start: int = 0) -> bytes:
    return array.array("h", (((start + i) % 2000) - 1000 for i in range(samples))).tobytes()


async def _frames_until_end(talk: TalkSession) -> list[pb.TalkResponse]:
    return [frame async for frame in talk]


# -- numbering and the ledger ----------------------------------------------------------------


def test_a_turns_frames_are_numbered_from_turn_shifted_by_40() -> None:
    assert TURN == 1 << TURN_BITS
    assert turn_of(3 * TURN) == 3
    assert turn_of(3 * TURN + 17) == 3
    # A run recovered after a restart numbers from 2^32 up: still the same turn.
    assert turn_of(3 * TURN + 2**32 + 1) == 3
    assert turn_of(0) == 0


def _final(turn: int) -> pb.TalkResponse:
    return pb.TalkResponse(
        sequence=turn * TURN, transcript=pb.Transcript(turn=turn, text="hi", final=True)
    )


def _event(kind: pb.TalkEventKind.ValueType, turn: int) -> pb.TalkResponse:
    return pb.TalkResponse(event=pb.TalkEvent(kind=kind, turn=turn))


def test_replayed_numbered_frames_are_dropped_and_unnumbered_ones_kept() -> None:
    ledger = Ledger(CLIENT, after_sequence=TURN + 2)
    assert not ledger.take(pb.TalkResponse(sequence=TURN + 1))
    assert not ledger.take(pb.TalkResponse(sequence=TURN + 2))
    assert ledger.take(pb.TalkResponse(sequence=TURN + 3))
    assert ledger.received == TURN + 3
    assert ledger.take(pb.TalkResponse(heartbeat=pb.Heartbeat()))
    assert ledger.received == TURN + 3


def test_with_client_turns_audio_outside_a_turn_is_not_kept() -> None:
    ledger = Ledger(CLIENT)
    ledger.audio(b"\x00\x01")
    assert ledger.unanswered == 0
    # An end with no turn is answered (TURN_EMPTY) all the same.
    ledger.end_turn()
    ledger.take(_event(pb.TALK_EVENT_KIND_TURN_EMPTY, 1))
    assert ledger.unanswered == 0
    ledger.start_turn()
    ledger.audio(b"\x00\x01" * 3)
    ledger.end_turn()
    ledger.text("typed")
    assert ledger.unanswered == 2
    # Answered in order: the spoken turn, then the typed one.
    ledger.take(_final(1))
    assert [t.text for t in ledger.pending] == ["typed"]
    ledger.take(_event(pb.TALK_EVENT_KIND_TURN_EMPTY, 2))
    assert ledger.unanswered == 0


def test_a_resume_finds_the_turns_the_server_did_not_take() -> None:
    ledger = Ledger(CLIENT, turn_count=4)
    ledger.start_turn()
    ledger.audio(b"a" * 4)
    ledger.end_turn()  # turn 5: taken (the resumed session counts 5)
    ledger.text("six")  # its frame never arrived
    ledger.start_turn()
    ledger.audio(b"b" * 6)  # being spoken: discarded by the server
    lost = ledger.resumed(pb.VoiceSession(turn_count=5))
    assert [(bytes(t.audio), t.text, t.ended) for t in lost] == [
        (b"", "six", True),
        (b"b" * 6, "", False),
    ]
    # Turn 5 is still unanswered: its transcript comes (replayed or live).
    assert [bytes(t.audio) for t in ledger.pending] == [b"a" * 4]
    ledger.restore(lost)
    assert ledger.unanswered == 3
    assert ledger.open is not None
    assert bytes(ledger.open.audio) == b"b" * 6


def test_empty_and_failed_turns_are_answers_that_take_no_number() -> None:
    ledger = Ledger(CLIENT, turn_count=1)
    for text in ("silence", "refused", "two", "three"):
        ledger.text(text)
    # An empty turn and a failed one give their number up to the next turn.
    ledger.take(_event(pb.TALK_EVENT_KIND_TURN_EMPTY, 2))
    ledger.take(pb.TalkResponse(error={"code": 14, "message": "speech unavailable"}))
    ledger.take(_final(2))
    # The server took turn 3 ("three") before the drop: nothing is lost.
    assert ledger.resumed(pb.VoiceSession(turn_count=3)) == []
    assert [t.text for t in ledger.pending] == ["three"]


def test_with_server_turns_only_audio_heard_as_speech_is_a_lost_turn() -> None:
    ledger = Ledger(pb.TURN_DETECTION_SERVER_VAD, turn_count=0)
    ledger.audio(b"\x00" * 8)  # silence: the detector heard nothing yet
    assert ledger.resumed(pb.VoiceSession(turn_count=0)) == []
    ledger.audio(b"\x00" * 8)
    ledger.take(_event(pb.TALK_EVENT_KIND_SPEECH_STARTED, 1))
    ledger.audio(b"\x01" * 8)
    ledger.take(_event(pb.TALK_EVENT_KIND_SPEECH_STOPPED, 1))
    ledger.audio(b"\x00" * 4)
    ledger.take(_event(pb.TALK_EVENT_KIND_SPEECH_STARTED, 2))
    ledger.audio(b"\x02" * 4)
    # Turn 1 was taken; turn 2 was being spoken.
    lost = ledger.resumed(pb.VoiceSession(turn_count=1))
    assert [(bytes(t.audio), t.ended) for t in lost] == [(b"\x00" * 4 + b"\x02" * 4, False)]
    assert [bytes(t.audio) for t in ledger.pending] == [b"\x00" * 8 + b"\x01" * 8]
    ledger.take(_final(1))
    assert ledger.unanswered == 0


def test_a_turn_longer_than_kept_is_marked_truncated() -> None:
    ledger = Ledger(CLIENT, max_turn_bytes=10)
    ledger.start_turn()
    ledger.audio(b"x" * 8)
    ledger.audio(b"y" * 8)
    (lost,) = ledger.resumed(pb.VoiceSession())
    assert bytes(lost.audio) == b"x" * 8 + b"y" * 2
    assert lost.truncated


# -- the reply ---------------------------------------------------------------------------------


def _update(turn: int, sequence: int, update: pb.RunUpdate) -> pb.TalkResponse:
    update.sequence = sequence
    return pb.TalkResponse(sequence=turn * TURN + sequence, update=update)


def _state(state: pb.RunState.ValueType) -> pb.RunUpdate:
    return pb.RunUpdate(state_change=pb.RunStateChange(run=pb.Run(name="r", state=state)))


def _speech(audio: bytes) -> pb.RunUpdate:
    return pb.RunUpdate(
        speech=pb.SpeechChunk(audio=audio, format=pb.AudioFormat(sample_rate_hz=16_000))
    )


def test_a_reply_joins_the_turns_text_and_speech_and_ignores_other_turns() -> None:
    builder = ReplyBuilder()
    frames = [
        pb.TalkResponse(transcript=pb.Transcript(turn=2, text="one tw", final=False)),
        _final(2),
        _update(2, 1, _state(pb.RUN_STATE_QUEUED)),
        _update(1, 9, _speech(b"old!")),  # the previous turn's run, still speaking
        _update(2, 2, pb.RunUpdate(delta=handler_pb2.TextDelta(text="Hello"))),
        _update(2, 3, _speech(b"\x01\x00" * 8)),
        _update(2, 4, _speech(b"\x02\x00" * 8)),
    ]
    assert [builder.add(frame) for frame in frames] == [None] * len(frames)
    reply = builder.add(_update(2, 5, _state(pb.RUN_STATE_SUCCEEDED)))
    assert reply is not None
    assert (reply.turn, reply.transcript, reply.text) == (2, "hi", "Hello")
    assert reply.speech == b"\x01\x00" * 8 + b"\x02\x00" * 8
    assert reply.rate_hz == 16_000
    assert reply.speech_ms == 1
    assert reply.succeeded
    assert not reply.interrupted
    assert pcm_from_wav(reply.wav()) == (reply.speech, 16_000)


def test_an_empty_turn_is_a_reply_without_a_run() -> None:
    builder = ReplyBuilder()
    reply = builder.add(_event(pb.TALK_EVENT_KIND_TURN_EMPTY, 3))
    assert reply is not None
    assert reply.empty
    assert reply.turn == 3


def test_an_interrupted_answer_says_so() -> None:
    builder = ReplyBuilder()
    builder.add(_final(1))
    builder.add(_update(1, 1, _speech(b"\x01\x00")))
    builder.add(_event(pb.TALK_EVENT_KIND_SPEECH_INTERRUPTED, 1))
    reply = builder.add(_update(1, 2, _state(pb.RUN_STATE_CANCELLED)))
    assert reply is not None
    assert reply.interrupted
    assert reply.speech == b"\x01\x00"


# -- PCM -----------------------------------------------------------------------------------


def test_audio_is_cut_into_frames_of_whole_samples_under_the_limit() -> None:
    pcm = _pcm(100_000)
    frames = frames_of(pcm)
    assert [len(f) for f in frames] == [MAX_FRAME_BYTES] * 3 + [200_000 - 3 * MAX_FRAME_BYTES]
    assert b"".join(frames) == pcm
    assert [len(f) for f in frames_of(b"\x00" * 10, 5)] == [4, 4, 2]
    with pytest.raises(ValueError, match="holds no sample"):
        frames_of(b"\x00\x00", 1)


def test_wav_round_trips_and_converts_to_a_session_rate() -> None:
    pcm = _pcm(22_050)
    wav = pcm_to_wav(pcm, 22_050)
    assert pcm_from_wav(wav) == (pcm, 22_050)
    converted, rate = pcm_from_wav(wav, 16_000)
    assert rate == 16_000
    assert len(converted) == 2 * 16_000
    assert resample(pcm, 22_050, 22_050) == pcm
    with pytest.raises(ValueError, match="not a PCM WAV"):
        pcm_from_wav(b"RIFF....WAVEfmt nonsense")


def test_the_start_frame_says_what_was_asked() -> None:
    start = talk_start(
        CONVERSATION,
        assistant="workspaces/w/assistants/a",
        input_rate_hz=48_000,
        turn_detection="server_vad",
        silence_s=0.5,
        barge_in=True,
    )
    assert start.input_format.sample_rate_hz == 48_000
    assert start.output_format.sample_rate_hz == 24_000
    assert start.turn_detection == pb.TURN_DETECTION_SERVER_VAD
    assert start.silence.ToMilliseconds() == 500
    assert start.barge_in
    # The end-of-turn detector: unset (the assistant's), or named either way.
    assert start.turn_detector == pb.TURN_DETECTOR_UNSPECIFIED
    assert start.turn_eagerness == pb.TURN_EAGERNESS_UNSPECIFIED
    smart = talk_start(CONVERSATION, turn_detector="smart_turn", turn_eagerness="HIGH")
    assert smart.turn_detector == pb.TURN_DETECTOR_SMART_TURN
    assert smart.turn_eagerness == pb.TURN_EAGERNESS_HIGH
    named = talk_start(
        CONVERSATION,
        turn_detector=pb.TURN_DETECTOR_SILENCE,
        turn_eagerness="turn_eagerness_low",
    )
    assert (named.turn_detector, named.turn_eagerness) == (
        pb.TURN_DETECTOR_SILENCE,
        pb.TURN_EAGERNESS_LOW,
    )
    pinned = talk_start(CONVERSATION, assistant="workspaces/w/assistants/a", assistant_revision=3)
    assert (pinned.assistant, pinned.assistant_revision) == ("workspaces/w/assistants/a", 3)
    assert start.assistant_revision == 0
    with pytest.raises(ValueError, match="input_rate_hz"):
        talk_start(CONVERSATION, input_rate_hz=22_050)
    unset = talk_start(CONVERSATION, turn_detector="", turn_eagerness="")
    assert unset.turn_detector == pb.TURN_DETECTOR_UNSPECIFIED
    with pytest.raises(ValueError, match="TURN_DETECTOR_PSYCHIC"):
        talk_start(CONVERSATION, turn_detector="psychic")


# -- the session against a scripted server ---------------------------------------------------


async def test_a_spoken_turn_comes_back_as_a_reply(server: tuple[ScriptedTalk, Client]) -> None:
    servicer, client = server
    pcm = _pcm(80_000)
    async with _talk(client) as talk:
        assert talk.name.startswith(CONVERSATION + "/voiceSessions/")
        await talk.start_turn()
        await talk.send_audio(pcm)
        await talk.end_turn()
        reply = await asyncio.wait_for(talk.reply(), CALL_DEADLINE_S)
    assert reply.transcript == f"heard {len(pcm)} bytes"
    assert reply.text == f"you said: heard {len(pcm)} bytes"
    assert reply.speech == SPEECH_CHUNK * 3
    assert reply.run is not None
    assert reply.run.name.endswith("/runs/r1")
    assert servicer.only.audio_frames == [
        MAX_FRAME_BYTES,
        MAX_FRAME_BYTES,
        160_000 - 2 * MAX_FRAME_BYTES,
    ]
    assert talk.resumes == 0
    # Leaving the block ended the session.
    assert servicer.only.controls[-1] == (pb.TALK_ACTION_END_SESSION, 0)


async def test_a_drop_mid_answer_resumes_with_no_frame_repeated_or_lost(
    server: tuple[ScriptedTalk, Client],
) -> None:
    servicer, client = server
    # Drop after three numbered frames of the answer, and replay two frames the
    # client had before the one it resumes after (it must drop them).
    servicer.plan.after_numbered = 3
    servicer.plan.overlap = 2
    resumes: list[Resumed] = []
    async with _talk(client, on_resume=resumes.append) as talk:
        await talk.say("hello")
        await talk.end()
        frames = await asyncio.wait_for(_frames_until_end(talk), CALL_DEADLINE_S)
    session = servicer.only
    numbered = [f.sequence for f in frames if f.sequence]
    assert numbered == [f.sequence for f in session.log]
    assert numbered == sorted(set(numbered))
    assert session.calls == ["start", f"resume:{TURN + 2}"]
    assert talk.resumes == 1
    assert [r.after_sequence for r in resumes] == [TURN + 2]
    assert resumes[0].lost == ()
    # The resume shows as one session frame, where it happened.
    kinds = [f.WhichOneof("frame") for f in frames]
    assert kinds.count("session") == 1
    assert frames[kinds.index("session") - 1].sequence == TURN + 2
    assert talk.last_sequence == session.log[-1].sequence


async def test_a_silent_stream_is_taken_for_dead_and_resumed(
    server: tuple[ScriptedTalk, Client],
) -> None:
    servicer, _ = server
    servicer.plan.stall_after_numbered = 4
    quick = StreamPolicy(backoff=Backoff(initial_s=0.01, max_s=0.05), idle_timeout_s=0.5)
    async with (
        Client(servicer.address, streams=quick) as client,
        _talk(client) as talk,
    ):
        await talk.say("hello")
        reply = await asyncio.wait_for(talk.reply(), CALL_DEADLINE_S)
    assert reply.transcript == "typed hello"
    assert reply.speech == SPEECH_CHUNK * 3
    assert talk.resumes == 1
    assert talk.last_error is not None
    assert "no frame on the voice session" in str(talk.last_error)
    assert servicer.only.calls == ["start", f"resume:{TURN + 3}"]


async def test_a_turn_being_spoken_when_the_connection_drops_is_sent_again(
    server: tuple[ScriptedTalk, Client],
) -> None:
    servicer, client = server
    servicer.plan.after_audio = 2  # the server drops after the second audio frame
    chunks = [_pcm(4_000, start=i) for i in range(5)]
    async with _talk(client, max_frame_bytes=8_000) as talk:
        await talk.start_turn()
        for chunk in chunks:
            await talk.send_audio(chunk)
        await talk.end_turn()
        reply = await asyncio.wait_for(talk.reply(), CALL_DEADLINE_S)
    # Every byte reached the turn the server answered: none twice, none lost.
    assert reply.transcript == f"heard {sum(map(len, chunks))} bytes"
    assert talk.resumes == 1
    (lost,) = talk.lost_turns
    assert lost.resent
    # Sent before the client saw the drop: the whole turn, or what went before it.
    assert b"".join(chunks).startswith(lost.audio)
    assert len(lost.audio) >= 2 * 8_000
    assert servicer.only.turn_count == 1


async def test_without_resending_a_lost_turn_is_reported_to_resend_by_hand(
    server: tuple[ScriptedTalk, Client],
) -> None:
    servicer, client = server
    servicer.plan.after_audio = 2
    resumed = asyncio.Event()
    async with _talk(client, resend_lost=False, on_resume=lambda _: resumed.set()) as talk:
        await talk.start_turn()
        await talk.send_audio(_pcm(4_000))
        await talk.send_audio(_pcm(4_000, start=7))
        await asyncio.wait_for(resumed.wait(), CALL_DEADLINE_S)
        (lost,) = talk.lost_turns
        assert lost.audio == _pcm(4_000) + _pcm(4_000, start=7)
        assert not lost.resent
        assert not lost.ended
        await talk.resend(lost)
        await talk.end_turn()
        reply = await asyncio.wait_for(talk.reply(), CALL_DEADLINE_S)
    assert reply.transcript == "heard 16000 bytes"
    assert servicer.only.controls[:2] == [
        (pb.TALK_ACTION_START_TURN, 0),
        (pb.TALK_ACTION_START_TURN, 0),
    ]


async def test_an_on_resume_hook_may_send_the_lost_turn_itself(
    server: tuple[ScriptedTalk, Client],
) -> None:
    servicer, client = server
    servicer.plan.after_audio = 1
    talk: TalkSession
    resent = asyncio.Event()

    async def resend(resumed: Resumed) -> None:
        for lost in resumed.lost:
            await talk.resend(lost)
        resent.set()

    async with _talk(client, resend_lost=False, on_resume=resend) as talk:
        await talk.start_turn()
        await talk.send_audio(_pcm(3_000))
        await asyncio.wait_for(resent.wait(), CALL_DEADLINE_S)
        await talk.end_turn()
        reply = await asyncio.wait_for(talk.reply(), CALL_DEADLINE_S)
    assert reply.transcript == "heard 6000 bytes"
    assert [lost.resent for lost in talk.lost_turns] == [False]


async def test_an_interrupt_reaches_the_server_with_what_was_heard(
    server: tuple[ScriptedTalk, Client],
) -> None:
    servicer, client = server
    async with _talk(client) as talk:
        await talk.interrupt(heard_through_sequence=TURN + 4)
        frame = await asyncio.wait_for(anext(talk), CALL_DEADLINE_S)
    assert frame.event.kind == pb.TALK_EVENT_KIND_SPEECH_INTERRUPTED
    assert servicer.only.controls[0] == (pb.TALK_ACTION_INTERRUPT, TURN + 4)


async def test_a_session_past_its_window_ends_with_session_ended(
    server: tuple[ScriptedTalk, Client],
) -> None:
    servicer, client = server
    servicer.plan.after_numbered = 1
    servicer.plan.forget = True
    async with _talk(client) as talk:
        await talk.say("hello")
        with pytest.raises(SessionEnded):
            await asyncio.wait_for(_frames_until_end(talk), CALL_DEADLINE_S)
        # Sending after the end says why too.
        with pytest.raises(SessionEnded):
            await talk.say("anyone?")


async def test_a_refused_start_is_raised_when_the_session_opens(
    server: tuple[ScriptedTalk, Client],
) -> None:
    servicer, client = server
    servicer.refuse_start = to_grpc_status(errors.SpeechNotConfigured("no voice"), "")
    with pytest.raises(SpeechNotConfigured):
        async with _talk(client):
            pass
    assert servicer.sessions == {}


async def test_a_session_is_resumed_by_name_after_the_last_sequence(
    server: tuple[ScriptedTalk, Client],
) -> None:
    servicer, client = server
    async with _talk(client) as first:
        await first.say("one")
        reply = await asyncio.wait_for(first.reply(), CALL_DEADLINE_S)
        name, position = first.name, first.last_sequence
        await first.say("two")
        heard = await asyncio.wait_for(anext(first), CALL_DEADLINE_S)
        # The process stops here, as a crash leaves it: no END_SESSION.
        pump = first._pump
        assert pump is not None
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        first._call.cancel()
    assert reply.transcript == "typed one"
    assert heard.transcript.text == "typed two"
    async with client.resume_talk(name, after_sequence=position) as again:
        second = await asyncio.wait_for(again.reply(), CALL_DEADLINE_S)
    assert second.transcript == "typed two"
    assert servicer.only.calls == ["start", f"resume:{position}"]


async def test_odd_audio_and_sends_after_the_end_are_refused(
    server: tuple[ScriptedTalk, Client],
) -> None:
    _, client = server
    async with _talk(client) as talk:
        with pytest.raises(ValueError, match="whole 2-byte samples"):
            await talk.send_audio(b"\x00\x01\x02")
        await talk.end()
        with pytest.raises(SessionEnded):
            await talk.send_audio(b"\x00\x00")
        assert await _frames_until_end(talk) == []
