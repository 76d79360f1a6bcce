"""Phone calls (SIP): Switchboard's own share of a call's turn, and its CPU per second of
audio beside Talk's over gRPC.

    python bench/telephony.py            the full run (about 5 minutes); prints the report
    python bench/telephony.py --quick    fewer calls and seconds, to try it out (< 2 min)
    python bench/telephony.py --write    ... and put the report into BENCHMARKS.md
    python bench/telephony.py --json     one JSON line, figures and report (bench/run.py)

The same parts as ``bench/webrtc.py`` (whose pieces it uses): the local audio server with
its fast engine (``--engine tone``) and the local model server, each in its own process,
and ``switchboard serve --dev``. A dispatch rule must name an assistant and a user that
exist when the server starts, so each phase starts a server without SIP, makes the
account, workspaces and assistants over gRPC (``bench/voice.py``'s ``_place``), stops it,
and serves the same database again with SIP on (``SWITCHBOARD_SIP_LISTEN=127.0.0.1:0``,
the port read from the server's log): one rule, one number, per call, each to its own
assistant (whose instructions name the call, so the fakes' records say whose each
request was); each call gets a conversation of its own.

The phones: client processes of ``PER_PHONE`` calls each, one PJSIP ``Endpoint``
(``pjsua2``: one a process) in each (the ``pjsua2-python`` wheel's PJSIP is built with
PJSUA_MAX_CALLS 4, and cuts a larger ``maxCalls`` to it), measuring one window of the
machine's monotonic clock, PCMU only (every other codec's priority 0), its conference bridge at
8 kHz so nothing is resampled on the phone's side. Each call's audio is an
``AudioMediaPort`` of 20 ms frames at 8 kHz: ``onFrameRequested`` hands out the utterance
when one is said, silence otherwise; ``onFrameReceived`` watches for the answer's first
frame with sound (RMS above ``SOUND_RMS``), stamped in that callback.

**Turns end by the server's voice-activity detector** (a phone has no other way: Talk's
``TURN_DETECTION_SERVER_VAD``, the default 700 ms silence). The end of speech is the
moment the phone's port handed PJSIP the frame holding the utterance's last voiced sample
(the utterances are eSpeak NG speech trimmed to their voice, at 8 kHz). The detector's
own wait is exact, not the nominal 700 ms: each utterance, after a silence, goes offline
through the server's path (G.711 mu-law both ways, Talk's ``turns.Detector`` and
``TurnAudio`` at 8 kHz as the intake uses them), which counts the frames after the last
voiced one that the server must receive before the detector ends the turn; that many
frames' time is subtracted. The same simulation gives each turn's size (the
transcription request's WAV, at 8 kHz).

- **The total**: from the end of speech to the phone's port receiving the answer's first
  frame with sound (after the phone's RTP stream, its jitter buffer and its bridge: what
  ``pjsua2`` shows of a call).
- **Switchboard's own share** = the total minus the detector's wait, minus the endpoints'
  time from the fakes' records on the shared monotonic clock (``bench/webrtc.py``'s
  ``attribute``: the transcription request to its last byte, the model request to the
  chunk that ended the first sentence, the speech request to its first audio byte).
  What is left: the media path in (the phone's RTP, the server's jitter buffer and
  conference bridge, the frame's hop to the loop, the queue to the session), storing the
  turn, starting the run, cutting the sentence, and the media path out (the call's
  ``Playout``, PJSIP's 20 ms clock, PCMU, RTP, the phone's jitter buffer).
- The loop: N calls, each the utterance, the answer's first frame, ``listen_ms`` of the
  answer, then the utterance again over the answer (a caller interrupting: Talk's
  barge-in drops the answer), and so on. When the answer's sound stopped after the
  caller began speaking is reported beside it (barge-in as the caller hears it).

**CPU per second of audio, call beside Talk.** One fresh server (SIP on), ``cpu_sessions``
sessions over Talk (gRPC, ``bench/webrtc.py``'s own Talk client: 16 kHz in, 24 kHz out)
and then as many calls (8 kHz both ways), each the same closed loop: an utterance, the
whole answer heard, the next. The server's CPU from /proc over each measured window, per
second of audio in (the microphone's stream, silence included: the server hears all of
it) and out (the answer's speech).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import gc
import json
import os
import random
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pjsua2 as pj

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench import webrtc
from bench.fixtures import PASSWORD
from bench.harness import (
    CpuMeter,
    command_line,
    dedicated_channel,
    host_speed_line,
    provenance,
    report,
    run_client,
    say,
    section_main,
    serve,
    session,
    settings_text,
    verdict,
    wait_quiet,
)
from bench.voice import MODEL_INTERVAL_MS, SAID, Place, _errors, _ms, _place, child
from bench.webrtc import (
    BASE_WPM,
    SILENCE_MS,
    WPM_STEP,
    Heard16,
    Plan,
    Speech,
    attribute,
    udp_drops,
)
from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.dispatcher.talk.turns import Detector, Heard, TurnAudio
from switchboard.platform.audio import pcm

SECTION: Final = "## Phone calls (SIP)"
#: PCMU's rate: the call's audio both ways, and the phone's bridge.
RATE: Final = 8_000
FRAME_MS: Final = 20
FRAME_BYTES: Final = RATE * FRAME_MS // 1000 * 2
SILENT_FRAME: Final = bytes(FRAME_BYTES)
#: What the phone hears louder than this (RMS of a 20 ms frame, PCM16) is sound (the tone
#: engine's speech is a 200 Hz tone of amplitude 8000; silence decodes to 0).
SOUND_RMS: Final = 200.0
#: The CPU loop's answer is over when the phone heard no sound for this long.
QUIET_S: Final = 0.7
#: The number dialed for call i.
NUMBER: Final = "+1555010{:04d}"
#: The issue's goals: the own share's p99 on the 20-call row, and a call's CPU per second
#: of audio against Talk's over gRPC.
OWN_P99_BUDGET_MS: Final = 300.0
GOAL_CALLS: Final = 20
CPU_RATIO_BUDGET: Final = 1.5
#: Issue 72's figures (CPU ms per second of audio, bench/webrtc.py), quoted, not re-run.
ISSUE_72_WEBRTC_MS: Final = 37.5
ISSUE_72_TALK_MS: Final = 12.7
WAIT_S: Final = 60.0
#: Calls one phone process makes: the ``pjsua2-python`` wheel's PJSIP is built with
#: PJSUA_MAX_CALLS 4 (``maxCalls`` above it is cut to 4: PJ_ETOOMANY on the fifth), and
#: PJSIP allows one endpoint a process.
PER_PHONE: Final = 4
#: How long the phone processes get to start and set their calls up before the warm-up.
DIAL_S: Final = 6.0
#: How long the phones may take to get every call up.
CONNECT_S: Final = 30.0
SIP_SETTINGS: Final[dict[str, str]] = {
    "SWITCHBOARD_SIP_LISTEN": "127.0.0.1:0",
    "SWITCHBOARD_SIP_TRUNKS": json.dumps([{"name": "local", "addresses": ["127.0.0.1/32"]}]),
    "SWITCHBOARD_SIP_MAX_CALLS": "4",
    "SWITCHBOARD_SIP_MAX_CALLS_PER_WORKSPACE": "1000",
    "SWITCHBOARD_SIP_INVITES_PER_S": "100",
    "SWITCHBOARD_SIP_INVITE_BURST": "100",
}
_LISTENING: Final = re.compile(r"SIP listening on \S+:(\d+) \(UDP\)")


#: ``bench/webrtc.py``'s plan, a row per number of calls at once: 4 is what one process
#: carries (the wheel's PJSIP), 20 the issue's goal, whose calls past 4 are refused.
FULL: Final = Plan(
    rows=(1, 4, 20),
    warmup_s=6.0,
    seconds=45.0,
    listen_ms=2000,
    # As many of each as a process takes calls: the two sides alike.
    cpu_sessions=4,
    cpu_warmup_s=5.0,
    cpu_seconds=30.0,
    quiet_wait_s=20.0,
)
QUICK: Final = Plan(
    rows=(1, 5),
    warmup_s=4.0,
    seconds=12.0,
    listen_ms=1000,
    cpu_sessions=2,
    cpu_warmup_s=4.0,
    cpu_seconds=10.0,
    quiet_wait_s=5.0,
)


# ---------------------------------------------------------------------------------
# The utterances, and what the server's detector makes of them.


def ulaw(samples: bytes) -> bytes:
    """PCM16 through G.711 mu-law and back (PCMU both ways: what the server decodes)."""
    values = np.frombuffer(samples, dtype="<i2").astype(np.int32)
    sign = values < 0
    magnitude = np.minimum(np.abs(values), 32635) + 0x84
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    # Decoding: the segment's base plus the mantissa's step, the bias taken off.
    decoded = (((mantissa << 3) + 0x84) << exponent) - 0x84
    out: bytes = np.where(sign, -decoded, decoded).astype("<i2").tobytes()
    return out


def simulate(utterance: bytes) -> Heard16:
    """Feed ``utterance`` (8 kHz), after a second of silence and followed by silence,
    through the server's path: mu-law both ways, then the intake's ``Detector`` and
    ``TurnAudio`` at the call's rate."""
    lead = bytes(pcm.byte_count(1000, RATE))
    last_frame = (len(lead) + len(utterance) - 1) // FRAME_BYTES
    stream = ulaw(lead + utterance + bytes(pcm.byte_count(3000, RATE)))
    detector = Detector(RATE, SILENCE_MS)
    turn = TurnAudio(RATE, 60_000)
    for index in range(len(stream) // FRAME_BYTES):
        data = stream[index * FRAME_BYTES : (index + 1) * FRAME_BYTES]
        heard = detector.hear(data)
        if Heard.START in heard:
            turn.begin(pre_roll=True)
        turn.add(data)
        if Heard.STOP in heard and turn.open:
            return Heard16(index - last_frame, len(turn.end() or b""))
    raise RuntimeError("the detector never ended the simulated turn")


@dataclass(frozen=True)
class Voices:
    #: The calls' utterances (8 kHz) and what the detector makes of them.
    calls: Speech
    #: The same utterances at 16 kHz, for the Talk sessions.
    talk_paths: list[str]


def _voices(directory: Path, count: int) -> Voices:
    paths, heard, seconds, talk = [], [], [], []
    for index in range(count):
        wide = webrtc._spoken(SAID, BASE_WPM + WPM_STEP * index)
        utterance = pcm.resample(wide, webrtc.RATE, RATE)
        path = directory / f"utterance-{index}-8k.pcm"
        path.write_bytes(utterance)
        paths.append(str(path))
        wide_path = directory / f"utterance-{index}-16k.pcm"
        wide_path.write_bytes(wide)
        talk.append(str(wide_path))
        heard.append(simulate(utterance))
        seconds.append(len(utterance) / (2 * RATE))
    return Voices(Speech(paths, heard, seconds), talk)


# ---------------------------------------------------------------------------------
# The phones: one process, one PJSIP endpoint, N calls.


class Line(pj.AudioMediaPort):  # type: ignore[misc]  # pjsua2 is untyped
    """One call's audio at the phone. Both callbacks run on PJSIP's media clock thread;
    ``lock`` guards what they share with the main thread."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.utterance = b""
        self.offset = 0
        #: When the utterance's first and last frames went out (None: not yet).
        self.began: float | None = None
        self.ended: float | None = None
        #: The first frame with sound received at or after ``ended``.
        self.first: float | None = None
        #: Each frame handed out (audio in, to the server), each frame with sound received.
        self.sent: list[float] = []
        self.voiced: list[float] = []
        self.faults = 0

    def say(self, utterance: bytes) -> None:
        with self.lock:
            self.utterance, self.offset = utterance, 0
            self.began = self.ended = self.first = None

    def onFrameRequested(self, frame: Any) -> None:
        try:
            now = time.monotonic()
            with self.lock:
                chunk = SILENT_FRAME
                if self.offset < len(self.utterance):
                    if self.offset == 0:
                        self.began = now
                    chunk = self.utterance[self.offset : self.offset + FRAME_BYTES]
                    self.offset += len(chunk)
                    if self.offset >= len(self.utterance):
                        self.ended = now
                    chunk += SILENT_FRAME[len(chunk) :]
                self.sent.append(now)
            frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
            frame.buf = pj.ByteVector(chunk)
            frame.size = FRAME_BYTES
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.faults += 1

    def onFrameReceived(self, frame: Any) -> None:
        try:
            now = time.monotonic()
            if frame.type != pj.PJMEDIA_FRAME_TYPE_AUDIO or frame.size <= 0:
                return
            samples = np.frombuffer(bytes(frame.buf), dtype="<i2").astype(np.float64)
            if samples.size == 0 or float(np.sqrt(np.mean(samples * samples))) < SOUND_RMS:
                return
            with self.lock:
                self.voiced.append(now)
                if self.ended is not None and self.first is None:
                    self.first = now
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.faults += 1


@dataclass
class Caller:
    """One call as the phone's main thread drives it."""

    index: int
    number: str
    utterance: bytes
    call: Any = None
    line: Line | None = None
    media: Any = None
    codec: str = ""
    up: bool = False
    gone: bool = False
    why: str = ""
    #: The loop's step: "wait" (until ``at``), "speak", "answer", "listen", "done".
    step: str = "wait"
    at: float = 0.0
    turns: list[dict[str, Any]] = field(default_factory=list)


class Dialed(pj.Call):  # type: ignore[misc]  # pjsua2 is untyped
    def __init__(self, account: Any, caller: Caller) -> None:
        super().__init__(account)
        self.caller = caller

    def onCallState(self, prm: Any) -> None:
        try:
            info = self.getInfo()
            if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                self.caller.gone = True
                self.caller.why = f"{info.lastStatusCode} {info.lastReason}"
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.caller.why = "onCallState failed"

    def onCallMediaState(self, prm: Any) -> None:
        try:
            caller = self.caller
            info = self.getInfo()
            for index, media in enumerate(info.media):
                if media.type != pj.PJMEDIA_TYPE_AUDIO:
                    continue
                if media.status != pj.PJSUA_CALL_MEDIA_ACTIVE or caller.line is not None:
                    continue
                line = Line()
                fmt = pj.MediaFormatAudio()
                fmt.type = pj.PJMEDIA_TYPE_AUDIO
                fmt.clockRate = RATE
                fmt.channelCount = 1
                fmt.bitsPerSample = 16
                fmt.frameTimeUsec = FRAME_MS * 1000
                line.createPort(f"caller-{caller.index}", fmt)
                audio = self.getAudioMedia(index)
                audio.startTransmit(line)
                line.startTransmit(audio)
                caller.line, caller.media = line, audio
                caller.codec = str(self.getStreamInfo(index).codecName)
                caller.up = True
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.caller.why = "onCallMediaState failed"


class Phones:
    """The endpoint and its calls. The thread that made the library is the only one that
    calls it: it pumps ``libHandleEvents`` and steps every call's loop between pumps."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.errors: collections.Counter[str] = collections.Counter()
        self.callers = [
            Caller(spec["first"] + index, number, Path(path).read_bytes())
            for index, (number, path) in enumerate(
                zip(spec["numbers"], spec["utterances"], strict=True)
            )
        ]
        ep = self.ep = pj.Endpoint()
        ep.libCreate()
        config = pj.EpConfig()
        config.uaConfig.threadCnt = 0
        config.uaConfig.mainThreadOnly = False
        config.uaConfig.maxCalls = 32
        config.logConfig.level = 0
        config.logConfig.consoleLevel = 0
        config.medConfig.clockRate = RATE
        config.medConfig.sndClockRate = RATE
        # Silence is sent as audio, as a phone's is: the server's detector hears it.
        config.medConfig.noVad = True
        config.medConfig.ecTailLen = 0
        ep.libInit(config)
        transport = pj.TransportConfig()
        transport.port = 0
        transport.boundAddress = "127.0.0.1"
        transport.publicAddress = "127.0.0.1"
        ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, transport)
        ep.audDevManager().setNullDev()
        ep.libStart()
        for info in ep.codecEnum2():
            ep.codecSetPriority(info.codecId, 255 if info.codecId.startswith("PCMU/") else 0)
        account = pj.AccountConfig()
        account.idUri = "sip:+15557654321@127.0.0.1"
        account.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
        account.mediaConfig.transportConfig.port = 0
        self.account = pj.Account()
        self.account.create(account, True)
        self.failed: list[Any] = []

    def pump(self, seconds: float = 0.0) -> None:
        until = time.monotonic() + seconds
        while True:
            self.ep.libHandleEvents(10)
            if time.monotonic() >= until:
                return

    def dial(self) -> None:
        """Every call, a few at a time; until each is up (or gone)."""
        for caller in self.callers:
            caller.call = Dialed(self.account, caller)
            try:
                caller.call.makeCall(
                    f"sip:{caller.number}@{self.spec['sip']}", pj.CallOpParam(True)
                )
            except pj.Error as error:
                # A Call that never got an id trips PJSIP's assertion when deleted: it is
                # kept until the process exits.
                self.failed.append(caller.call)
                caller.call, caller.gone, caller.why = None, True, str(error.info())
                print(f"call {caller.index}: {caller.why}", file=sys.stderr)
            self.pump(0.05)  # INVITEs spaced, as a trunk's would be
        deadline = time.monotonic() + CONNECT_S
        while time.monotonic() < deadline and not all(c.up or c.gone for c in self.callers):
            self.pump()
        for caller in self.callers:
            if not caller.up:
                self.errors[f"call not up: {caller.why or 'no media in time'}"[:80]] += 1

    def hang_up(self) -> None:
        for caller in self.callers:
            if caller.call is not None and not caller.gone:
                try:
                    caller.call.hangup(pj.CallOpParam(True))
                except pj.Error:
                    caller.gone = True  # ended meanwhile
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not all(c.gone for c in self.callers):
            self.pump()
        self.pump(0.2)  # the last responses out

    def close(self) -> None:
        """Every PJSIP object this side holds goes before the library (a Call deleted
        after ``libDestroy`` trips an assertion)."""
        for caller in self.callers:
            if caller.line is not None:
                # Left to its C++ side, never deleted while PJSIP runs: 2.15.1's bridge
                # reads a removed port at its next tick, and pjsua2 frees it at once
                # (decision 83).
                caller.line.__disown__()
            caller.media = caller.line = None
            if caller.call is not None:
                caller.call.caller = None
            caller.call = None
        self.account.shutdown()
        self.account = None
        gc.collect()
        self.ep.libDestroy()
        self.ep = None

    def faults(self) -> int:
        return sum(c.line.faults for c in self.callers if c.line is not None)


def _latency_step(caller: Caller, now: float, listen_s: float, deadline: float) -> None:
    """The latency loop: say the utterance, wait for the answer's first sound, listen
    ``listen_s``, say it again (over the answer: barge-in)."""
    line = caller.line
    if line is None or caller.gone:
        caller.step = "done"
        return
    if caller.step == "wait" and now >= caller.at:
        if now >= deadline:
            caller.step = "done"
            return
        line.say(caller.utterance)
        caller.step = "speak"
    elif caller.step == "speak" and line.ended is not None:
        caller.at = line.ended + WAIT_S
        caller.step = "answer"
    elif caller.step == "answer":
        if line.first is not None:
            caller.turns.append(
                {"began": line.began, "end_speech": line.ended, "first": line.first}
            )
            caller.at = line.first + listen_s
            caller.step = "wait"
        elif now >= caller.at:
            caller.turns.append({"began": line.began, "end_speech": line.ended, "first": None})
            caller.at = now
            caller.step = "wait"


def _cpu_step(caller: Caller, now: float, deadline: float) -> None:
    """The CPU loop: the utterance, the whole answer (until ``QUIET_S`` without sound),
    the next."""
    line = caller.line
    if line is None or caller.gone:
        caller.step = "done"
        return
    if caller.step == "wait" and now >= caller.at:
        if now >= deadline:
            caller.step = "done"
            return
        line.say(caller.utterance)
        caller.step = "speak"
    elif caller.step == "speak" and line.ended is not None:
        caller.at = line.ended + WAIT_S
        caller.step = "answer"
    elif caller.step == "answer":
        with line.lock:
            last = line.voiced[-1] if line.voiced else 0.0
        if line.first is not None and now - last >= QUIET_S:
            caller.turns.append({"end_speech": line.ended, "first": line.first})
            caller.at = now
            caller.step = "wait"
        elif line.first is None and now >= caller.at:
            caller.turns.append({"end_speech": line.ended, "first": None})
            caller.at = now
            caller.step = "wait"


def _barge(line: Line, turns: Sequence[dict[str, Any]]) -> list[float]:
    """For each turn said over an answer: from its first frame out to the last sound of
    the answer the phone heard before the utterance ended."""
    stops = []
    voiced = line.voiced
    for turn in turns:
        began, end = turn.get("began"), turn["end_speech"]
        if began is None or end is None:
            continue
        playing = any(began - 0.1 <= at < began for at in voiced)
        if playing:
            last = max((at for at in voiced if began <= at < end), default=began)
            stops.append(last - began)
    return stops


def _frames_in(callers: Sequence[Caller], begin: float, deadline: float) -> tuple[int, int]:
    sent = heard = 0
    for caller in callers:
        if caller.line is None:
            continue
        with caller.line.lock:
            sent += sum(1 for at in caller.line.sent if begin <= at < deadline)
            heard += sum(1 for at in caller.line.voiced if begin <= at < deadline)
    return sent, heard


def _loop(phones: Phones, spec: dict[str, Any], meter: CpuMeter) -> tuple[float, float, int]:
    """Every call's loop, between pumps of PJSIP's events, until the measured window is
    over and no call is midway through a turn; the window, and the UDP drops in it."""
    # Every phone process measures the same window (the monotonic clock is the machine's).
    begin = max(spec["begin_at"], time.monotonic() + 1.0)
    deadline = begin + spec["seconds"]
    latency = spec["mode"] == "latency"
    for caller in phones.callers:
        rng = random.Random(caller.index)  # noqa: S311 - staggered starts, reproducible
        caller.at = time.monotonic() + (rng.uniform(0, 2.0) if latency else caller.index * 0.5)
    dropped = 0
    metering = "before"
    while time.monotonic() < deadline + WAIT_S:
        phones.ep.libHandleEvents(10)
        now = time.monotonic()
        if metering == "before" and now >= begin:
            meter.start()
            dropped = udp_drops()
            metering = "on"
        elif metering == "on" and now >= deadline:
            meter.stop()
            dropped = udp_drops() - dropped
            metering = "done"
        for caller in phones.callers:
            if latency:
                _latency_step(caller, now, spec["listen_ms"] / 1000, deadline)
            else:
                _cpu_step(caller, now, deadline)
        if metering == "done" and all(c.step in ("done", "wait") for c in phones.callers):
            break
    return begin, deadline, dropped


def _turns(
    phones: Phones, begin: float, deadline: float
) -> tuple[list[dict[str, Any]], list[float]]:
    """The turns answered, as ``webrtc.attribute`` reads them, and the barge-in stops."""
    turns: list[dict[str, Any]] = []
    barge: list[float] = []
    for caller in phones.callers:
        if caller.gone:
            phones.errors[f"call ended early: {caller.why}"[:80]] += 1
        said = [t for t in caller.turns if t["end_speech"] is not None]
        for turn in said:
            measured = begin <= turn["end_speech"] < deadline
            if turn["first"] is None:
                if measured:
                    phones.errors["no answer audio in 60 s"] += 1
                continue
            turns.append(
                {
                    "session": caller.index,
                    "end_speech": turn["end_speech"],
                    "first_packet": turn["first"],
                    "first_frame": turn["first"],
                    "measured": measured,
                }
            )
        if caller.line is not None:
            barge += _barge(caller.line, [t for t in said if begin <= t["end_speech"] < deadline])
    return turns, barge


def client_calls(spec: dict[str, Any]) -> None:
    """The phones' process: ``spec['mode']`` "latency" or "cpu". PJSIP prints to fd 1
    before its log settings apply, so the answer goes to a copy of the original stdout
    and fd 1 becomes stderr's."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    latency = spec["mode"] == "latency"
    meter = (
        CpuMeter(spec["server_pid"], spec["audio_pid"], spec["model_pid"])
        if latency
        else CpuMeter(spec["server_pid"])
    )
    phones = Phones(spec)
    phones.dial()
    begin, deadline, dropped = _loop(phones, spec, meter)
    sent, heard = _frames_in(phones.callers, begin, deadline)
    turns, barge = _turns(phones, begin, deadline)
    result: dict[str, Any] = {
        "codecs": sorted({c.codec for c in phones.callers if c.codec}),
        "up": sum(1 for c in phones.callers if c.up),
        "sent_frames": sent,
        "heard_frames": heard,
        "wall_s": meter.wall,
        "cpu_s": meter.used,
        "client_cpu_s": meter.client,
        "machine_cpu_s": meter.machine,
        "udp_drops": dropped,
        "turns": turns,
        "barge": barge,
        "late_start_s": round(begin - spec["begin_at"], 2),
    }
    if faults := phones.faults():
        phones.errors["exceptions in the audio callbacks"] += faults
    result["errors"] = dict(phones.errors)
    phones.hang_up()
    phones.close()
    out.write(json.dumps(result) + "\n")
    out.flush()
    sys.stderr.flush()
    # Straight out: the interpreter's teardown would collect SWIG objects after the library.
    os._exit(0)


# ---------------------------------------------------------------------------------
# The driver.


async def phoned(spec: dict[str, Any], count: int, warmup_s: float) -> dict[str, Any]:
    """``count`` calls from phone processes of ``PER_PHONE`` calls each, measuring one
    window; their figures together."""
    groups = [range(i, min(i + PER_PHONE, count)) for i in range(0, count, PER_PHONE)]
    # Room for the processes to start and dial before the warm-up.
    begin_at = time.monotonic() + DIAL_S + warmup_s
    seen = await asyncio.gather(
        *(
            asyncio.to_thread(
                run_client,
                __file__,
                {
                    **spec,
                    "first": group.start,
                    "numbers": spec["numbers"][group.start : group.stop],
                    "utterances": spec["utterances"][group.start : group.stop],
                    "begin_at": begin_at,
                },
            )
            for group in groups
        )
    )
    first = seen[0]
    wall = max(first["wall_s"], 1e-9)
    errors: collections.Counter[str] = collections.Counter()
    for one in seen:
        errors.update(one["errors"])
    clients = sum(one["client_cpu_s"] for one in seen)
    processes = sum(first["cpu_s"])
    barge = [stop for one in seen for stop in one["barge"]]
    sent = sum(one["sent_frames"] for one in seen)
    heard = sum(one["heard_frames"] for one in seen)
    return {
        "phones": len(seen),
        "calls_up": sum(one["up"] for one in seen),
        "codecs": sorted({c for one in seen for c in one["codecs"]}),
        "turns": [turn for one in seen for turn in one["turns"]],
        "audio_in_s": round(sent * FRAME_MS / 1000, 1),
        "audio_out_s": round(heard * FRAME_MS / 1000, 1),
        "wall_s": round(wall, 1),
        "server_cpu_s": first["cpu_s"][0],
        "server_cores": round(first["cpu_s"][0] / wall, 3),
        "sources_cores": [round(used / wall, 2) for used in first["cpu_s"]],
        "client_cores": round(clients / wall, 2),
        "other_cores": round(max(0.0, first["machine_cpu_s"] - processes - clients) / wall, 2),
        "udp_drops": max(one["udp_drops"] for one in seen),
        "late_start_s": max(one["late_start_s"] for one in seen),
        "barge_n": len(barge),
        "barge_p50_ms": _ms(barge, 0.5),
        "barge_p99_ms": _ms(barge, 0.99),
        "errors": dict(errors),
    }


def _servers(model_port: int, audio_port: int) -> dict[str, str]:
    return webrtc._servers(model_port, audio_port)


def _rules(place: Place, first: int, count: int) -> str:
    return json.dumps(
        [
            {
                "number": NUMBER.format(index),
                "assistant": place.assistants[first + index],
                "user": place.account.user,
            }
            for index in range(count)
        ]
    )


def _sip_port(log: Path) -> int:
    """The SIP port the server bound, from its log (it logs it once SIP is up)."""
    found = _LISTENING.search(log.read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"the server did not say its SIP port; its log: {log}")
    return int(found.group(1))


async def _login(address: str) -> str:
    """A fresh token for the place's account on this server (``serve --dev``'s signing
    keys are its own)."""
    async with dedicated_channel(address) as channel:
        done = await auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(
                password=auth_pb2.PasswordCredential(
                    email="voice-cpu@example.com", password=PASSWORD
                )
            ),
            timeout=60,
        )
    return str(done.tokens.access_token)


async def _made(directory: Path, url: str, servers: dict[str, str], count: int, who: str) -> Place:
    """The account, workspaces and assistants, made on a server without SIP."""
    with serve(directory, url, servers) as server:
        return await _place(server.address, count, who)


async def latency_phase(plan: Plan, directory: Path, calls: int, voices: Voices) -> dict[str, Any]:
    async with (
        child("audio", json.dumps("tone")) as (audio, audio_port),
        child("model", json.dumps(MODEL_INTERVAL_MS)) as (model, model_port),
    ):
        url = f"sqlite+aiosqlite:///{directory / f'sip-latency-{time.monotonic_ns()}.db'}"
        servers = _servers(model_port, audio_port)
        place = await _made(directory, url, servers, calls, "loop")
        with serve(
            directory,
            url,
            {**servers, **SIP_SETTINGS, "SWITCHBOARD_SIP_RULES": _rules(place, 0, calls)},
        ) as server:
            sip = _sip_port(server.log)
            waited = await wait_quiet(plan.quiet_wait_s)
            say(f"loop: {calls} calls to 127.0.0.1:{sip}, {plan.seconds:g} s")
            seen = await phoned(
                {
                    "mode": "latency",
                    "sip": f"127.0.0.1:{sip}",
                    "numbers": [NUMBER.format(i) for i in range(calls)],
                    "utterances": voices.calls.paths[:calls],
                    "seconds": plan.seconds,
                    "listen_ms": plan.listen_ms,
                    "server_pid": server.pid,
                    "audio_pid": audio.pid,
                    "model_pid": model.pid,
                },
                calls,
                plan.warmup_s,
            )
        timings = (await audio.ask({"timings": True}, 120))["timings"]
        requests = (await model.ask({"requests": True}, 120))["requests"]
    turns = seen.pop("turns")
    seen["audio_cores"], seen["model_cores"] = seen["sources_cores"][1:]
    figures = {
        "sessions": calls,
        **attribute(turns, timings, requests, voices.calls),
        **seen,
        "quiet_wait_s": waited,
    }
    say(f"  {figures}")
    return figures


async def cpu_phase(plan: Plan, directory: Path, voices: Voices) -> list[dict[str, Any]]:
    """Talk over gRPC, then as many calls, on one server with SIP on."""
    count = plan.cpu_sessions
    async with (
        child("audio", json.dumps("tone")) as (_, audio_port),
        child("model", json.dumps(MODEL_INTERVAL_MS)) as (_, model_port),
    ):
        url = f"sqlite+aiosqlite:///{directory / 'sip-cpu.db'}"
        servers = _servers(model_port, audio_port)
        place = await _made(directory, url, servers, 2 * count, "cpu")
        settings = {**servers, **SIP_SETTINGS, "SWITCHBOARD_SIP_RULES": _rules(place, count, count)}
        with serve(directory, url, settings) as server:
            sip = _sip_port(server.log)
            token = await _login(server.address)
            rows = []
            waited = await wait_quiet(plan.quiet_wait_s)
            say(f"cpu: {count} sessions over talk, {plan.cpu_seconds:g} s")
            row = await asyncio.to_thread(
                run_client,
                webrtc.__file__,
                {
                    "mode": "cpu",
                    "transport": "talk",
                    "first": 0,
                    "address": server.address,
                    "token": token,
                    "conversations": place.conversations,
                    "assistants": place.assistants,
                    "sessions": count,
                    "utterances": voices.talk_paths[:count],
                    "warmup_s": plan.cpu_warmup_s,
                    "seconds": plan.cpu_seconds,
                    "server_pid": server.pid,
                },
            )
            row["quiet_wait_s"] = waited
            say(f"  {row}")
            rows.append(row)
            waited = await wait_quiet(plan.quiet_wait_s)
            say(f"cpu: {count} calls, {plan.cpu_seconds:g} s")
            seen = await phoned(
                {
                    "mode": "cpu",
                    "sip": f"127.0.0.1:{sip}",
                    "numbers": [NUMBER.format(i) for i in range(count)],
                    "utterances": voices.calls.paths[:count],
                    "seconds": plan.cpu_seconds,
                    "server_pid": server.pid,
                },
                count,
                plan.cpu_warmup_s,
            )
            audio_s = max(seen["audio_in_s"] + seen["audio_out_s"], 1e-9)
            wall = max(seen["wall_s"], 1e-9)
            row = {
                "transport": "sip",
                "sessions": count,
                "phones": seen["phones"],
                "codecs": seen["codecs"],
                "wall_s": seen["wall_s"],
                "turns": len(seen["turns"]),
                "audio_in_s": seen["audio_in_s"],
                "audio_out_s": seen["audio_out_s"],
                "server_cores": seen["server_cores"],
                "client_cores": seen["client_cores"],
                "server_ms_per_audio_s": round(seen["server_cpu_s"] * 1000 / audio_s, 1),
                "server_ms_per_session_s": round(seen["server_cpu_s"] * 1000 / (wall * count), 1),
                "late_start_s": seen["late_start_s"],
                "errors": seen["errors"],
            }
            row["quiet_wait_s"] = waited
            say(f"  {row}")
            rows.append(row)
    return rows


async def drive(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    if args.calls:
        plan = dataclasses.replace(plan, rows=tuple(int(n) for n in args.calls.split(",")))
    if args.cpu_sessions is not None:
        plan = dataclasses.replace(plan, cpu_sessions=args.cpu_sessions)
    results: dict[str, Any] = {"plan": dataclasses.asdict(plan)}
    async with session(results, "switchboard-sip-bench-") as directory:
        most = max(*plan.rows, plan.cpu_sessions)
        voices = await asyncio.to_thread(_voices, directory, most)
        results["speech"] = {
            "seconds": [round(s, 2) for s in voices.calls.seconds],
            "wait_frames": [h.wait_frames for h in voices.calls.heard],
        }
        say(f"utterances: {results['speech']}")
        results["loop"] = [await latency_phase(plan, directory, n, voices) for n in plan.rows]
        results["cpu"] = await cpu_phase(plan, directory, voices) if plan.cpu_sessions else []
    text = render(results, command_line("bench/telephony.py"), plan)
    report(results, text, args)
    return 0


# ---------------------------------------------------------------------------------
# The report.

_HOPS: Final = {
    "end of speech to transcription, less the detector's wait": "the end of speech to the "
    "transcription request, less the detector's wait",
    "transcript to model": "the transcript to the model request",
    "sentence to speech": "the first sentence to the speech request",
    "speech's first byte to the packet at the client": "the speech's first byte to its "
    "first frame at the phone",
}


def _loop_line(row: dict[str, Any]) -> str:
    return (
        f"| {row['sessions']} | {row['calls_up']} | {row['turns']} ({row['unattributed']}, "
        f"{row['size_off']}) | "
        f"{row['own_p50_ms']} / {row['own_p99_ms']} / {row['own_max_ms']} | "
        f"{row['total_p50_ms']} / {row['total_p99_ms']} | {row['wait_p50_ms']} | "
        f"{row['transcription_p50_ms']}, {row['model_p50_ms']}, {row['speech_p50_ms']} | "
        f"{row['barge_p50_ms']} / {row['barge_p99_ms']} ({row['barge_n']}) | "
        f"{row['server_cores']} | {row['client_cores']} | {row['other_cores']} | "
        f"{row['audio_in_s']} / {row['audio_out_s']} | {row['udp_drops']} | "
        f"{_errors(row['errors'])} |"
    )


def _hops_line(row: dict[str, Any]) -> str:
    hops = "; ".join(
        f"{_HOPS.get(name, name)} {p50} / {p99}" for name, (p50, p99) in row["gaps"].items()
    )
    many = "s" if row["sessions"] != 1 else ""
    return f"- {row['sessions']} call{many}: {hops}"


def _cpu_line(row: dict[str, Any]) -> str:
    transport = "SIP call (PCMU, 8 kHz)" if row["transport"] == "sip" else "Talk over gRPC"
    return (
        f"| {transport} | {row['sessions']} | {row['turns']} | {row['audio_in_s']} / "
        f"{row['audio_out_s']} | {row['server_ms_per_audio_s']} | "
        f"{row['server_ms_per_session_s']} | {row['server_cores']} | {row['client_cores']} | "
        f"{_errors(row['errors'])} |"
    )


def goals(rows: Sequence[dict[str, Any]], cpu: Sequence[dict[str, Any]]) -> list[str]:
    row = next((r for r in rows if r["sessions"] == GOAL_CALLS), None)
    if row is None:
        lines = [
            f"- A call's own share of a turn p99 under {OWN_P99_BUDGET_MS:g} ms with "
            f"{GOAL_CALLS} calls on two cores: not measured (no {GOAL_CALLS}-call row)."
        ]
    else:
        clean = not row["errors"] and not row["unattributed"] and row["turns"] > 0
        met = clean and row["own_p99_ms"] <= OWN_P99_BUDGET_MS
        carried = (
            ""
            if row["calls_up"] == row["sessions"]
            else f"; only {row['calls_up']} of the {row['sessions']} calls were answered"
        )
        lines = [
            f"- A call's own share of a turn p99 under {OWN_P99_BUDGET_MS:g} ms with "
            f"{GOAL_CALLS} calls on two cores: {verdict(met)} ({row['own_p99_ms']} ms; p50 "
            f"{row['own_p50_ms']} ms{carried}).",
        ]
    by = {r["transport"]: r for r in cpu}
    if "talk" in by and "sip" in by:
        talk, sip = by["talk"], by["sip"]
        ratio = sip["server_ms_per_audio_s"] / max(talk["server_ms_per_audio_s"], 1e-9)
        ok = not sip["errors"] and not talk["errors"] and ratio <= CPU_RATIO_BUDGET
        lines.append(
            f"- A call's CPU per second of audio at most {CPU_RATIO_BUDGET:g}x a Talk "
            f"session's over gRPC: {verdict(ok)} ({ratio:.2f}x: a call "
            f"{sip['server_ms_per_audio_s']} ms, Talk {talk['server_ms_per_audio_s']} ms in "
            f"the same run; for reference, not re-run: issue 72's WebRTC "
            f"{ISSUE_72_WEBRTC_MS:g} ms against Talk's {ISSUE_72_TALK_MS:g} ms, "
            f"{ISSUE_72_WEBRTC_MS / ISSUE_72_TALK_MS:.2f}x)."
        )
    return lines


def render(results: dict[str, Any], command: str, plan: Plan) -> str:
    rows, cpu = results["loop"], results["cpu"]
    spoken = results["speech"]
    codecs = sorted({c for row in [*rows, *cpu] for c in row.get("codecs", [])})
    lines = [
        SECTION,
        "",
        *provenance(command, took_s=results.get("seconds")),
        host_speed_line(results["host"]),
        "- the server: `switchboard serve --dev` (embedded SQLite) with "
        f"{settings_text(webrtc.SETTINGS)}, and SIP: "
        f"{settings_text({k: v for k, v in SIP_SETTINGS.items() if 'TRUNKS' not in k})}, "
        "one trunk (127.0.0.1/32) and one dispatch rule per call (its own number, assistant "
        "and, per call, a new conversation); the rules' assistants and user made over gRPC "
        "on a first server without SIP, the same database then served with it; "
        "`SWITCHBOARD_VOICE_URL` at the local audio server (`--engine tone`) and "
        "`SWITCHBOARD_LLM_BASE_URL` at the local model server, each in its own process; the "
        f"model writes a word every {MODEL_INTERVAL_MS} ms",
        f"- the phones: client processes of at most {PER_PHONE} calls each, one PJSIP endpoint "
        "(`pjsua2`) in each (the `pjsua2-python` wheel's PJSIP is built with "
        f"`PJSUA_MAX_CALLS` {PER_PHONE}: a larger `maxCalls` is cut to it), PCMU only "
        f"(negotiated: {', '.join(codecs) or '?'}), the phone's bridge at 8 kHz; each call's "
        "audio an `AudioMediaPort` of 20 ms frames (the utterance when said, silence "
        "otherwise; PJSIP's VAD off, so silence is sent); the answer's first frame with "
        f"sound (RMS above {SOUND_RMS:g}) stamped in `onFrameReceived`",
        f'- the loop: N calls, each its own assistant, saying "{SAID}" (eSpeak NG, call i '
        f"at {BASE_WPM} + {WPM_STEP}i words a minute, at 8 kHz: "
        f"{min(spoken['seconds'])} to {max(spoken['seconds'])} s, trimmed to the voice), "
        f"silence after it, the answer's first sound, {plan.listen_ms} ms of the answer, "
        "then the utterance again over the answer (barge-in by voice: Talk drops the "
        f"answer); {plan.warmup_s:g} s warm-up, {plan.seconds:g} s measured (turns whose "
        "speech ended in it); turns end by Talk's detector (`TURN_DETECTION_SERVER_VAD`, "
        "700 ms), a phone has no other way",
        "- the total: from the moment the phone's port handed PJSIP the frame with the "
        "utterance's last voiced sample to the phone's port receiving the answer's first "
        "frame with sound (after the phone's own RTP stream, jitter buffer and bridge: the "
        "nearest `pjsua2` shows; so the phone's side of the media path is in the own share)",
        "- subtracted: the detector's wait, exactly: the frames after the last voiced one "
        "that the server must receive before Talk's detector ends the turn, found by feeding "
        "each utterance offline through the server's path (mu-law both ways, "
        "`turns.Detector` and `TurnAudio` at 8 kHz; PJSIP's conference bridge at the "
        "server resamples 8 to 16 to 8 kHz, which the simulation leaves out): "
        f"{min(spoken['wait_frames'])} to {max(spoken['wait_frames'])} frames of 20 ms by "
        "utterance; and the endpoints' time from their own records (same monotonic clock): "
        "the transcription request to its last byte, the model request to the chunk that "
        "ends the first sentence, the speech request to its first audio byte",
        "",
        "| calls dialed | calls answered | turns (unattributed, turn size off) | own share "
        "p50 / p99 / max ms | "
        "total p50 / p99 ms | detector's wait p50 ms | endpoints p50 ms (transcription, "
        "model, speech) | barge-in: the answer's last sound after the caller began, p50 / "
        "p99 ms (turns) | server cores | client cores | other cores | audio in / out s | "
        "UDP datagrams dropped (machine) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_loop_line(row) for row in rows),
        "",
        "The own share hop by hop, p50 / p99 ms (the four add up to it; the first holds the "
        "media path in: the phone's RTP, the server's jitter buffer and conference bridge, "
        "the frame's hop from PJSIP's thread to the loop, the session's queue and detector; "
        "the last the media path out: the call's playout queue, PJSIP's 20 ms clock, PCMU, "
        "RTP, the phone's jitter buffer and bridge):",
        "",
        *(_hops_line(row) for row in rows),
        "",
        *goals(rows, cpu),
    ]
    if cpu:
        lines += [
            "",
            f"CPU per second of audio, a call beside Talk: one server (SIP on), "
            f"{plan.cpu_sessions} sessions over Talk (gRPC, `TURN_DETECTION_SERVER_VAD`, "
            "`bench/webrtc.py`'s Talk client: the same utterances at 16 kHz streamed in 20 "
            "ms frames at a microphone's pace, silence between them, the answer at 24 kHz), "
            f"then {plan.cpu_sessions} calls (8 kHz both ways); each session's loop: its "
            "utterance, the whole answer heard (two sentences, the tone engine; a call's "
            f"answer is over after {QUIET_S:g} s without sound), the next; "
            f"{plan.cpu_warmup_s:g} s warm-up, {plan.cpu_seconds:g} s measured each. Audio "
            "in is the microphone's stream, silence included (the server hears all of it); "
            "out is the answer's speech. The server's CPU from /proc.",
            "",
            "| transport | sessions | turns | audio in / out s | server CPU ms per s of audio "
            "| server CPU ms per session-second | server cores | client cores | errors |",
            "|---|---|---|---|---|---|---|---|---|",
            *(_cpu_line(row) for row in cpu),
        ]
    return "\n".join(lines)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", default="", help="the loop phase's rows: calls at once, N,N,...")
    parser.add_argument(
        "--cpu-sessions", type=int, help="the CPU phase's sessions of each kind (0: no CPU phase)"
    )


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="fewer calls and seconds",
        options=options,
        roles={"client": client_calls},
    )


if __name__ == "__main__":
    raise SystemExit(main())
