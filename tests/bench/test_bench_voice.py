"""bench/voice.py's arithmetic: a turn's endpoints' share found in the fakes' records,
the own share as the rest (the hops adding up to it), and barge-in."""

from __future__ import annotations

from typing import Any

import pytest

from bench.voice import QUICK, attribute, barge_in, bench_reply, render, wav_bytes

pytestmark = pytest.mark.unit

TURN_MS = 1000


def turn(session: int, start: float, first: float, **more: Any) -> dict[str, Any]:
    return {
        "session": session,
        "end_turn": start,
        "first_speech": first,
        "interrupt": first + 0.001,
        "last_speech": None,
        "acknowledged": first + 0.002,
        "speech_after": 0,
        "state": "RUN_STATE_CANCELLED",
        "measured": True,
        **more,
    }


def test_the_own_share_is_the_total_less_each_endpoint_on_the_path() -> None:
    turns = [turn(3, 10.000, 10.200), turn(4, 10.050, 10.400)]
    timings = [
        # session 3's transcription (its size), 10 ms inside; session 4's after it
        ["/v1/audio/transcriptions", 10.005, 10.015, 10.015, str(wav_bytes(TURN_MS, 3))],
        ["/v1/audio/transcriptions", 10.060, 10.070, 10.070, str(wav_bytes(TURN_MS, 4))],
        # its speech: first byte 2 ms after arrival
        ["/v1/audio/speech", 10.150, 10.152, 10.300, "Session 3 is listening now."],
        ["/v1/audio/speech", 10.350, 10.351, 10.500, "Session 4 is listening now."],
        # an earlier turn's speech of session 3: outside the window, not taken
        ["/v1/audio/speech", 9.000, 9.001, 9.100, "Session 3 is listening now."],
    ]
    requests = [[3, 10.020, 10.140, True], [4, 10.080, 10.340, True]]
    figures = attribute(turns, timings, requests, TURN_MS)
    assert figures["turns"] == 2
    assert figures["unattributed"] == 0
    # session 3: 200 ms in all; 10 + 120 + 2 in the endpoints: 68 ms its own
    # session 4: 350 ms in all; 10 + 260 + 1 in the endpoints: 79 ms its own
    assert figures["own_p50_ms"] == pytest.approx(68.0)
    assert figures["own_p99_ms"] == pytest.approx(79.0)
    assert figures["total_p99_ms"] == pytest.approx(350.0)
    # the hops of session 3: 5 + 5 + 10 + 48 = 68
    hops = {name: p50 for name, (p50, _p99) in figures["gaps"].items()}
    assert hops == pytest.approx(
        {
            "to transcription": 5.0,
            "transcript to model": 5.0,
            "sentence to speech": 10.0,
            "audio to client": 48.0,
        }
    )


def test_a_turn_without_all_its_records_is_counted_apart() -> None:
    turns = [turn(1, 5.0, 5.2), turn(2, 5.0, 5.2, measured=False)]
    figures = attribute(turns, [], [[1, 5.01, 5.1, True]], TURN_MS)
    assert (figures["turns"], figures["unattributed"]) == (0, 1)


def test_barge_in_is_interrupt_to_the_last_speech_after_it() -> None:
    turns = [
        turn(1, 0.0, 1.0, last_speech=1.004, speech_after=2),  # 3 ms after the interrupt
        turn(2, 0.0, 1.0),  # none after it: 0
    ]
    figures = barge_in(turns)
    assert figures["barge_p99_ms"] == pytest.approx(3.0)
    assert figures["barge_p50_ms"] == 0.0
    assert figures["with_speech_after"] == 1
    assert figures["acknowledged_p99_ms"] == pytest.approx(1.0)


def test_the_model_names_the_session_in_its_first_sentence() -> None:
    body = {"messages": [{"role": "system", "content": "You are bench session 17."}]}
    reply = bench_reply(0.02, body)
    assert reply.content.startswith("Session 17 is listening now.\n")
    assert reply.interval_s == 0.02
    cpu = bench_reply(0.02, {"messages": [{"role": "system", "content": "bench cpu session 1"}]})
    assert "\n" in cpu.content


def test_the_report_judges_the_goals_on_the_largest_row() -> None:
    def row(sessions: int, own_p99: float, barge_p99: float) -> dict[str, Any]:
        figures = attribute([], [], [], TURN_MS)
        figures.update(barge_in([]))
        figures.update(
            sessions=sessions,
            own_p99_ms=own_p99,
            barge_p99_ms=barge_p99,
            gaps={"to transcription": [1.0, 2.0]},
            errors={},
            server_cores=0.5,
            audio_in_s=1.0,
            audio_out_s=1.0,
            other_cores=0.0,
        )
        return figures

    results = {
        "host": [{"loop_ms": 30.0, "hop_us": 25.0}] * 2,
        "seconds": 100,
        "loop": [row(1, 12.0, 3.0), row(50, 45.0, 20.0)],
        "cpu": {
            "audio_in_s": 10.0,
            "audio_out_s": 20.0,
            "server_ms_per_audio_s": 20.0,
            "audio_ms_per_audio_s": 80.0,
            "server_cores": 0.05,
            "audio_cores": 0.2,
            "errors": {},
        },
    }
    text = render(results, "python bench/voice.py", QUICK)
    assert text.startswith("## Voice\n")
    assert "with 50 sessions: **missed** (45.0 ms)" in text
    assert "p99 at most 50 ms with 50 sessions: met (20.0 ms)" in text
    assert "| 10.0 / 20.0 | 20.0 | 80.0 | 0.25 |" in text
