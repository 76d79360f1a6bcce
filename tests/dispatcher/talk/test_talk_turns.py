"""Turn detection on real speech: eSpeak NG's voice through WebRTC's detector.

Speech begins once the detector is sure of it, ends only after the session's
silence, and a pause shorter than that does not end it (it is heard as a pause,
once, when the end-of-turn model would be asked; a turn the model cut starts
again at the next words); 24 kHz input (which the
detector does not take) is resampled for it; the turn keeps the moment before
the onset and stops growing at the longest turn.
"""

from __future__ import annotations

import pytest

from switchboard.dispatcher.talk.turns import PRE_ROLL_MS, Detector, Heard, TurnAudio
from switchboard.platform.audio import pcm
from tests.infra.speech import COUNTING, speak

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def spoken() -> tuple[bytes, int]:
    return pcm.from_wav(speak(COUNTING))


def at(rate: int, spoken: tuple[bytes, int]) -> bytes:
    samples, source = spoken
    return pcm.resample(samples, source, rate)


def trimmed(audio: bytes) -> bytes:
    """``audio`` without the quiet eSpeak leaves before and after the words."""
    values = memoryview(audio).cast("h")
    loud = [i for i, value in enumerate(values) if abs(value) > 300]
    return audio[loud[0] * 2 : (loud[-1] + 1) * 2]


def changes_in(detector: Detector, audio: bytes, rate: int) -> list[tuple[int, bool]]:
    """(millisecond, change) for each change, fed in 20 ms frames as a microphone would."""
    size = pcm.byte_count(20, rate)
    seen = []
    for start in range(0, len(audio), size):
        for change in detector.feed(audio[start : start + size]):
            seen.append((pcm.duration_ms(start + size, rate), change))
    return seen


@pytest.mark.parametrize("rate", [8_000, 16_000, 24_000, 48_000])
def test_speech_then_silence_is_one_turn(spoken: tuple[bytes, int], rate: int) -> None:
    speech = at(rate, spoken)
    audio = bytes(pcm.byte_count(500, rate)) + speech + bytes(pcm.byte_count(1_500, rate))
    detector = Detector(rate, silence_ms=700)
    seen = changes_in(detector, audio, rate)
    assert [change for _, change in seen] == [True, False]
    began, stopped = seen[0][0], seen[1][0]
    speech_ms = pcm.duration_ms(len(speech), rate)
    assert began >= 500
    # It ends after the session's silence, not before the speech is over.
    assert stopped >= 500 + speech_ms - 300
    assert stopped <= 500 + speech_ms + 700 + 200
    assert not detector.speaking


def test_a_pause_shorter_than_the_silence_does_not_end_the_turn(
    spoken: tuple[bytes, int],
) -> None:
    speech = trimmed(at(16_000, spoken))
    pause = bytes(pcm.byte_count(400, 16_000))
    audio = speech + pause + speech + bytes(pcm.byte_count(1_500, 16_000))
    seen = changes_in(Detector(16_000, silence_ms=700), audio, 16_000)
    assert [change for _, change in seen] == [True, False]
    # With a silence shorter than the pause, the pause ends it.
    seen = changes_in(Detector(16_000, silence_ms=200), audio, 16_000)
    assert [change for _, change in seen][:3] == [True, False, True]


def test_silence_alone_is_no_speech() -> None:
    detector = Detector(16_000, silence_ms=700)
    assert changes_in(detector, bytes(pcm.byte_count(3_000, 16_000)), 16_000) == []


def test_a_turn_keeps_what_came_just_before_it_and_stops_at_its_limit() -> None:
    turn = TurnAudio(16_000, max_turn_ms=1_000)
    for _ in range(50):  # a second before the turn: only the pre-roll is kept
        turn.add(bytes(pcm.byte_count(20, 16_000)))
    turn.begin(pre_roll=True)
    assert PRE_ROLL_MS <= turn.ms < PRE_ROLL_MS + 40
    while not turn.full:
        turn.add(b"\x01\x00" * 320)
    turn.add(b"\x01\x00" * 320)
    assert turn.ms == 1_000
    audio = turn.end()
    assert audio is not None
    assert len(audio) == pcm.byte_count(1_000, 16_000)
    assert not turn.open
    assert turn.end() is None


def heard_in(detector: Detector, audio: bytes, rate: int) -> list[tuple[int, Heard]]:
    size = pcm.byte_count(20, rate)
    seen = []
    for start in range(0, len(audio), size):
        for heard in detector.hear(audio[start : start + size]):
            seen.append((pcm.duration_ms(start + size, rate), heard))
    return seen


def test_a_pause_is_heard_once_before_the_silence_ends_the_speech(
    spoken: tuple[bytes, int],
) -> None:
    speech = trimmed(at(16_000, spoken))
    pause = bytes(pcm.byte_count(400, 16_000))
    audio = speech + pause + speech + bytes(pcm.byte_count(1_500, 16_000))
    seen = heard_in(Detector(16_000, silence_ms=700), audio, 16_000)
    assert [heard for _, heard in seen] == [Heard.START, Heard.PAUSE, Heard.PAUSE, Heard.STOP]
    speech_ms = pcm.duration_ms(len(speech), 16_000)
    first_pause, last_pause, stop = seen[1][0], seen[2][0], seen[3][0]
    # 200 ms of unvoiced frames after the words (and the detector's own tail), once each.
    assert speech_ms + 200 <= first_pause <= speech_ms + 400
    # The silence ends it later (its window may hold a tenth of voiced frames: a little less).
    assert 700 - 200 - 100 <= stop - last_pause <= 700 - 200


def test_a_cut_turn_starts_again_at_the_next_speech(spoken: tuple[bytes, int]) -> None:
    speech = trimmed(at(16_000, spoken))
    detector = Detector(16_000, silence_ms=700)
    first = heard_in(detector, speech + bytes(pcm.byte_count(300, 16_000)), 16_000)
    assert [heard for _, heard in first] == [Heard.START, Heard.PAUSE]
    detector.cut()
    assert not detector.speaking
    # No STOP for the turn that was cut; the next words are a new START.
    again = heard_in(detector, bytes(pcm.byte_count(1_000, 16_000)) + speech, 16_000)
    assert [heard for _, heard in again][:1] == [Heard.START]
