"""Turn detection: when does a spoken turn end? Smart Turn against silence alone, on a
labelled set of eSpeak NG speech.

    python bench/turns.py            the full set (about 15 seconds on two cores)
    python bench/turns.py --quick    one voice, six sentences, one pause (a few seconds)
    python bench/turns.py --write    ... and put the report into BENCHMARKS.md
    python bench/turns.py --json     one JSON line, figures and report (bench/run.py)

**The set.** Each sentence is said by eSpeak NG (``VOICES``, 140 and 175 words a minute)
two ways: **ended**, the whole sentence in one breath, then 2 s of silence; and **paused**,
cut mid-phrase ("my phone number is" ... "five five five, one two three four."): the
first part, a pause of ``PAUSES`` ms (digital silence), the rest, 2 s of silence. A turn
that ends before the speaker's last word is a **false cut-off** (in a paused sentence,
almost always in the pause); the **added latency** of an ended sentence is from the end of
its speech to the turn's end, the model's reading time included where the model ended it.

**The detectors**, run as Talk's intake runs them (``dispatcher/talk/turns.py``'s
``Detector`` and ``TurnAudio`` in 20 ms frames at 16 kHz, ``platform/audio/endpoint.py``'s
model on the turn so far at each 200 ms pause, the turn cut at its threshold, the silence
window the fallback): silence alone at 300, 500 and 700 ms (Talk's default), and
SMART_TURN at each eagerness with the default 700 ms window. The model's probability at a
pause is the same whatever the threshold (the same audio up to it), so each is read once.

**CPU per second of audio**: the speech stage (webrtcvad) over the whole set, and the
model's readings (each one's CPU time: mel features and the network, one thread), per
second of audio fed, for SMART_TURN at MEDIUM.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench.harness import command_line, provenance, report, section_main
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.talk.turns import THRESHOLDS, Detector, Heard, TurnAudio
from switchboard.platform.audio import pcm
from switchboard.platform.audio.endpoint import SMART_TURN_FILE, Model

RATE: Final = 16_000
FRAME_MS: Final = 20
MODELS: Final = Path(__file__).resolve().parents[1] / ".tools" / "models"
#: Each sentence cut where a speaker might stop to think, and its rest.
SENTENCES: Final = (
    ("my phone number is", "five five five, one two three four."),
    ("I would like to book a table for", "two people at eight tonight."),
    ("can you tell me the weather in", "Paris tomorrow morning?"),
    ("send the report to", "the whole team by Friday."),
    ("the meeting has been moved to", "next Tuesday afternoon."),
    ("my account number is", "four seven two nine."),
    ("I need to go to the", "airport before noon."),
    ("please remind me to", "call my mother this evening."),
    ("the address is twelve", "Baker Street in London."),
    ("what I really want is", "a quiet room with a view."),
    ("could you add", "milk and eggs to my list?"),
    ("and then I", "went straight back home."),
)
VOICES: Final = (("en-us+m3", 140), ("en-us+f3", 175))
PAUSES: Final = (300, 500, 1_000)
SILENCES: Final = (300, 500, 700, 1_500)
#: SMART_TURN's fallback windows: Talk's default, and a longer one (Pipecat's is 3 s).
SMART_SILENCES: Final = (700, 1_500)
LEAD_MS: Final = 300
TAIL_MS: Final = 2_000
EAGERNESS: Final = {
    "LOW": pb.TURN_EAGERNESS_LOW,
    "MEDIUM": pb.TURN_EAGERNESS_MEDIUM,
    "HIGH": pb.TURN_EAGERNESS_HIGH,
}


@dataclass(frozen=True)
class Item:
    """One labelled recording: PCM16 at 16 kHz, and where its last word ends (ms)."""

    name: str
    ended: bool
    audio: bytes
    speech_end_ms: int
    #: A paused item's pause, in ms of the audio: a turn ending in it is a cut-off.
    pause: tuple[int, int] | None = None


def spoken(text: str, voice: str, speed: int) -> bytes:
    """``text`` said by eSpeak NG, PCM16 at 16 kHz, without the quiet around it."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is not installed; run scripts/install-deps.sh")
    with tempfile.TemporaryDirectory(prefix="turns-") as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run(
            [espeak, "-v", voice, "-s", str(speed), "-w", str(path), text],
            capture_output=True,
            timeout=30,
            check=True,
        )
        samples, rate = pcm.from_wav(path.read_bytes())
    audio = pcm.resample(samples, rate, RATE)
    values = memoryview(audio).cast("h")
    loud = [i for i, value in enumerate(values) if abs(value) > 300]
    return audio[loud[0] * 2 : (loud[-1] + 1) * 2]


def silence(ms: int) -> bytes:
    return bytes(pcm.byte_count(ms, RATE))


def labelled_set(quick: bool) -> list[Item]:
    sentences = SENTENCES[:6] if quick else SENTENCES
    voices = VOICES[:1] if quick else VOICES
    pauses = PAUSES[:1] if quick else PAUSES
    items = []
    for voice, speed in voices:
        for number, (first, rest) in enumerate(sentences):
            whole = spoken(f"{first} {rest}", voice, speed)
            items.append(
                Item(
                    f"{voice}/{number}/ended",
                    True,
                    silence(LEAD_MS) + whole + silence(TAIL_MS),
                    LEAD_MS + pcm.duration_ms(len(whole), RATE),
                )
            )
            head, tail = spoken(first, voice, speed), spoken(rest, voice, speed)
            head_end = LEAD_MS + pcm.duration_ms(len(head), RATE)
            for pause_ms in pauses:
                items.append(
                    Item(
                        f"{voice}/{number}/paused {pause_ms}",
                        False,
                        silence(LEAD_MS) + head + silence(pause_ms) + tail + silence(TAIL_MS),
                        head_end + pause_ms + pcm.duration_ms(len(tail), RATE),
                        (head_end, head_end + pause_ms),
                    )
                )
    return items


class Readings:
    """The model's probability at each pause of each item (the same for every threshold),
    and what each reading cost."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self._seen: dict[tuple[str, int], float] = {}
        self.cpu_s: list[float] = []
        self.wall_ms: dict[tuple[str, int], float] = {}

    def probability(self, item: Item, turn_audio: bytes, at: int) -> float:
        key = (item.name, at)
        if key not in self._seen:
            cpu, wall = time.process_time(), time.perf_counter()
            self._seen[key] = self._model.probability(turn_audio, RATE)
            self.cpu_s.append(time.process_time() - cpu)
            self.wall_ms[key] = (time.perf_counter() - wall) * 1000
        return self._seen[key]


@dataclass(frozen=True)
class Outcome:
    #: When each turn ended (ms of audio; plus the model's reading for a MODEL end).
    ends_ms: list[float]
    reasons: list[str]


def detect(item: Item, silence_ms: int, threshold: float | None, readings: Readings) -> Outcome:
    """The turns of ``item`` as Talk's intake ends them (``threshold`` None: silence alone)."""
    detector = Detector(RATE, silence_ms)
    turn = TurnAudio(RATE, 60_000)
    size = pcm.byte_count(FRAME_MS, RATE)
    ends: list[float] = []
    reasons: list[str] = []
    for start in range(0, len(item.audio), size):
        frame = item.audio[start : start + size]
        heard = detector.hear(frame)
        if Heard.START in heard:
            turn.begin(pre_roll=True)
        turn.add(frame)
        now = pcm.duration_ms(start + len(frame), RATE)
        if Heard.STOP in heard and turn.open and not detector.speaking:
            turn.end()
            ends.append(now)
            reasons.append("SILENCE")
        elif heard and heard[-1] is Heard.PAUSE and threshold is not None and turn.open:
            probability = readings.probability(item, turn.audio(), start)
            if probability >= threshold:
                detector.cut()
                turn.end()
                ends.append(now + readings.wall_ms[(item.name, start)])
                reasons.append("MODEL")
    return Outcome(ends, reasons)


def score(items: list[Item], outcomes: list[Outcome]) -> dict[str, Any]:
    cut = 0
    cut_ended = 0
    cut_by_pause: dict[int, int] = dict.fromkeys(PAUSES, 0)
    paused = sum(1 for item in items if not item.ended)
    ended = len(items) - paused
    latencies: list[float] = []
    by_model = 0
    for item, outcome in zip(items, outcomes, strict=True):
        early = [end for end in outcome.ends_ms if end < item.speech_end_ms - FRAME_MS]
        if early:
            if item.ended:
                cut_ended += 1
            else:
                cut += 1
                assert item.pause is not None
                cut_by_pause[item.pause[1] - item.pause[0]] += 1
        if item.ended and not early and outcome.ends_ms:
            latencies.append(outcome.ends_ms[0] - item.speech_end_ms)
            by_model += outcome.reasons[0] == "MODEL"
    latencies.sort()
    return {
        "false_cutoffs_paused": cut,
        "false_cutoffs_by_pause": cut_by_pause,
        "paused": paused,
        "false_cutoffs_ended": cut_ended,
        "ended": ended,
        "latency_p50_ms": statistics.median(latencies) if latencies else 0.0,
        "latency_p90_ms": latencies[int(0.9 * (len(latencies) - 1))] if latencies else 0.0,
        "latency_mean_ms": statistics.fmean(latencies) if latencies else 0.0,
        "ended_by_model": by_model,
    }


def vad_cpu_per_s(items: list[Item]) -> float:
    """The speech stage's CPU (webrtcvad, 20 ms frames) per second of audio, in ms."""
    audio_s = sum(pcm.duration_ms(len(item.audio), RATE) for item in items) / 1000
    size = pcm.byte_count(FRAME_MS, RATE)
    started = time.process_time()
    for item in items:
        detector = Detector(RATE, SMART_SILENCES[0])
        for start in range(0, len(item.audio), size):
            detector.hear(item.audio[start : start + size])
    return (time.process_time() - started) * 1000 / audio_s


async def drive(args: argparse.Namespace) -> int:
    path = MODELS / SMART_TURN_FILE
    if not path.is_file():
        raise SystemExit(f"no {SMART_TURN_FILE} in {MODELS}: run scripts/install-tools.sh")
    began = time.monotonic()
    items = labelled_set(args.quick)
    readings = Readings(Model(path))
    rows: list[tuple[str, dict[str, Any]]] = []
    for silence_ms in SILENCES:
        outcomes = [detect(item, silence_ms, None, readings) for item in items]
        rows.append((f"silence alone, {silence_ms} ms", score(items, outcomes)))
    for fallback_ms in SMART_SILENCES:
        for label, eagerness in EAGERNESS.items():
            threshold = THRESHOLDS[eagerness]
            outcomes = [detect(item, fallback_ms, threshold, readings) for item in items]
            rows.append(
                (
                    f"SMART_TURN {label} (at {threshold:g}), {fallback_ms} ms fallback",
                    score(items, outcomes),
                )
            )
    audio_s = sum(pcm.duration_ms(len(item.audio), RATE) for item in items) / 1000
    readings_cpu_ms = [s * 1000 for s in readings.cpu_s]
    readings_cpu_ms.sort()
    figures: dict[str, Any] = {
        "rows": dict(rows),
        "vad_cpu_ms_per_s": vad_cpu_per_s(items),
        "readings": len(readings_cpu_ms),
        "reading_cpu_p50_ms": statistics.median(readings_cpu_ms),
        "reading_cpu_p99_ms": readings_cpu_ms[int(0.99 * (len(readings_cpu_ms) - 1))],
        "model_cpu_ms_per_s": sum(readings_cpu_ms) / audio_s,
        "audio_s": audio_s,
        "items": len(items),
    }
    took = round(time.monotonic() - began)
    report(figures, render(figures, items, took), args)
    return 0


def int8_isa() -> str:
    """Which x86 instructions onnxruntime multiplies int8 with here: a reading's cost
    depends on it (decisions 60, "Why the sums are wide")."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "VNNI"
    return "AVX2" if "avx2" in flags else "neither AVX2 nor VNNI"


def render(figures: dict[str, Any], items: list[Item], took_s: int) -> str:
    import onnxruntime

    paused = sum(1 for item in items if not item.ended)
    pauses = sorted({item.pause[1] - item.pause[0] for item in items if item.pause is not None})
    lines = [
        "## Turn detection",
        "",
        *provenance(
            command_line("bench/turns.py"),
            versions=f", onnxruntime {onnxruntime.__version__}, Smart Turn v3.2 (CPU, int8, "
            f"summed wide; this host's int8 products: {int8_isa()})",
            took_s=took_s,
        ),
        f"- set: {figures['items']} recordings, {figures['audio_s']:.0f} s of audio: "
        f"{len(items) - paused} ended sentences and {paused} cut mid-phrase with a pause "
        "(eSpeak NG; bench/turns.py's docstring). Audio time, fed in 20 ms frames; a turn the "
        "model ends counts its reading's wall time too",
        "",
        "| detector | false cut-offs, paused (by pause: "
        + ", ".join(f"{ms} ms" for ms in pauses)
        + ") | false cut-offs, ended | added latency p50 / p90 / mean ms | ended by the model |",
        "|---|---|---|---|---|",
    ]
    for label, row in figures["rows"].items():
        by_pause = ", ".join(str(row["false_cutoffs_by_pause"][ms]) for ms in pauses)
        lines.append(
            f"| {label} | {row['false_cutoffs_paused']} of {row['paused']} ({by_pause}) | "
            f"{row['false_cutoffs_ended']} of {row['ended']} | "
            f"{row['latency_p50_ms']:.0f} / {row['latency_p90_ms']:.0f} / "
            f"{row['latency_mean_ms']:.0f} | {row['ended_by_model']} of {row['ended']} |"
        )
    lines += [
        "",
        f"- CPU per second of audio: the speech stage (webrtcvad) "
        f"{figures['vad_cpu_ms_per_s']:.2f} ms; the model's readings "
        f"{figures['model_cpu_ms_per_s']:.1f} ms over the set (one at each 200 ms pause: "
        f"{figures['readings']} readings, {figures['reading_cpu_p50_ms']:.0f} ms p50, "
        f"{figures['reading_cpu_p99_ms']:.0f} ms p99 of one thread each)",
    ]
    return "\n".join(lines)


def main() -> int:
    return section_main(__doc__, drive, quick="one voice, six sentences, one pause length")


if __name__ == "__main__":
    raise SystemExit(main())
