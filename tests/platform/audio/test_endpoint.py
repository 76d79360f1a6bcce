"""Smart Turn on eSpeak NG's speech (platform/audio/endpoint.py), with the model that
scripts/install-tools.sh installs: an ended sentence is judged finished, a phrase cut
mid-way not; off the event loop; a missing or broken file is no model, not an error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from switchboard.platform.audio import pcm
from switchboard.platform.audio.endpoint import SMART_TURN_FILE, Model, SmartTurn
from tests.infra.speech import COUNTING, speak

pytestmark = pytest.mark.unit

MODELS = Path(__file__).resolve().parents[3] / ".tools" / "models"


@pytest.fixture(scope="module")
def model() -> Model:
    if not (MODELS / SMART_TURN_FILE).is_file():
        pytest.fail(f"no {SMART_TURN_FILE} in {MODELS}: run scripts/install-tools.sh")
    return Model(MODELS / SMART_TURN_FILE)


def said(text: str, rate: int = 16_000) -> bytes:
    """``text`` spoken, without eSpeak's quiet around it, then 200 ms of silence (the
    pause after which Talk asks the model)."""
    samples, source = pcm.from_wav(speak(text))
    values = memoryview(samples).cast("h")
    loud = [i for i, value in enumerate(values) if abs(value) > 300]
    words = samples[loud[0] * 2 : (loud[-1] + 1) * 2]
    return pcm.resample(words, source, rate) + bytes(pcm.byte_count(200, rate))


def test_an_ended_sentence_is_finished(model: Model) -> None:
    assert model.probability(said(COUNTING), 16_000) > 0.8


@pytest.mark.parametrize("phrase", ["my phone number is", "and then I", "I need to go to the"])
def test_a_phrase_cut_mid_way_is_not(model: Model, phrase: str) -> None:
    assert model.probability(said(phrase), 16_000) < 0.3


def test_other_rates_are_resampled_to_the_models(model: Model) -> None:
    assert model.probability(said(COUNTING, 24_000), 24_000) > 0.8
    assert model.probability(said("my phone number is", 48_000), 48_000) < 0.3


def test_only_the_last_eight_seconds_count(model: Model) -> None:
    window = bytes(pcm.byte_count(8_000, 16_000) - len(said(COUNTING))) + said(COUNTING)
    noise = bytes(range(256)) * 64
    assert model.probability(noise + window, 16_000) == model.probability(window, 16_000)
    # A shorter turn is zeros before it: the same as the window of zeros and the turn.
    assert model.probability(said(COUNTING), 16_000) == model.probability(window, 16_000)


async def test_the_loop_runs_while_the_model_reads() -> None:
    judge = SmartTurn(MODELS)
    reading = asyncio.ensure_future(judge.probability(said(COUNTING), 16_000))
    turns = 0
    try:
        while not reading.done():
            turns += 1
            await asyncio.sleep(0)  # one turn of the loop, counted while the model reads
        probability = await reading
    finally:
        judge.close()
    assert probability is not None
    assert probability > 0.8
    # Loading and reading take tens of milliseconds of the model's own thread; the loop
    # went round many times meanwhile.
    assert turns > 10


def available(judge: SmartTurn) -> bool:
    return judge.available


async def test_a_missing_or_broken_file_is_no_model(tmp_path: Path) -> None:
    missing = SmartTurn(tmp_path)
    assert not missing.available
    assert await missing.probability(b"\0\0" * 1600, 16_000) is None
    missing.close()
    (tmp_path / SMART_TURN_FILE).write_bytes(b"not a model")
    broken = SmartTurn(tmp_path)
    assert available(broken)  # the file is there ...
    assert await broken.probability(b"\0\0" * 1600, 16_000) is None  # ... but does not load
    assert not available(broken)
    broken.close()
