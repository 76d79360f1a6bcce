"""Phone calls over carriers' media streams: Switchboard's own share of a call's turn, and
its CPU per second of audio beside Talk's over gRPC.

    python bench/streams.py            the full run (about 5 minutes); prints the report
    python bench/streams.py --quick    fewer calls and seconds, to try it out (< 2 min)
    python bench/streams.py --write    ... and put the report into BENCHMARKS.md
    python bench/streams.py --json     one JSON line, figures and report (bench/run.py)

The twin of ``bench/telephony.py`` (SIP) for the carriers' media streams
(``dispatcher/talk/streams``, docs/telephony.md "Carriers' media streams"). SIP carries
only 4 calls a phone process (the ``pjsua2-python`` wheel), so the issue's 20 calls are
measured here, where nothing caps them. The same parts: the local audio server with its
fast engine (``--engine tone``) and the local model server, each in its own process, and
``switchboard serve --dev``. A dispatch rule must name an assistant and a user that exist
when the server starts, so each phase makes the account, workspaces and assistants on a
server without streams (``telephony._made``), stops it, and serves the same database
again with media streams on (``SWITCHBOARD_STREAMS_LISTEN=127.0.0.1:0``, the port read
from the server's log; ``SWITCHBOARD_STREAMS_PUBLIC_URL`` an ``http://`` URL, which dev
mode allows): one rule, one number, per call, each to its own assistant (whose
instructions name the call, so the fakes' records say whose each request was); each call
gets a conversation of its own.

The carrier: client processes of ``PER_CLIENT`` calls each, one asyncio loop and one
aiohttp session in each, doing what Twilio does (``tests/dispatcher/talk/streams/
carrier.py``'s webhook, its signature and its mapping of the public URL): the signed voice
webhook, the TwiML answer read, the ``<Stream>``'s WebSocket opened with its signed
upgrade, ``connected`` and ``start`` with the answer's ``<Parameter>``, then a ``media``
frame of 20 ms of 8 kHz mu-law every 20 ms by deadline (each tick's time counted from the
start, so a late wake-up is made up, never added up): the utterance when one is said,
silence otherwise, as a phone line sends. Each ``media`` frame the server sends is
stamped on arrival and decoded; one louder than ``SOUND_RMS`` (RMS of its PCM16) is sound.
Each process says when its calls are up; once every one has, the driver gives them all
one window of the machine's monotonic clock (the warm-up, then the measured seconds).

**Turns end by the server's voice-activity detector** (a phone has no other way: the
call's Talk session uses ``TURN_DETECTION_SERVER_VAD``, 700 ms of silence). The end of
speech is the moment the frame holding the utterance's last voiced sample was handed to
the socket (the utterances are ``telephony.py``'s: eSpeak NG speech trimmed to its voice,
at 8 kHz). The detector's own wait is exact, not the nominal 700 ms: each utterance, after
a silence, goes offline through the server's path (the streams' own G.711 tables both
ways, ``streams/audio.py``: exactly what the carrier sends and the server decodes; then
Talk's ``turns.Detector`` and ``TurnAudio`` at 8 kHz), which counts the frames after the
last voiced one that the server must receive before the detector ends the turn; that
many frames' time is subtracted. The same simulation gives each turn's size.

- **The total**: from the end of speech to the arrival of the answer's first ``media``
  frame with sound at the carrier (what a carrier would play: the server paces the
  answer in real time and holds what is not yet due).
- **Switchboard's own share** = the total minus the detector's wait, minus the endpoints'
  time from the fakes' records on the shared monotonic clock (``bench/webrtc.py``'s
  ``attribute``, as ``telephony.py`` uses it: the transcription request to its last byte,
  the model request to the chunk that ended the first sentence, the speech request to
  its first audio byte). What is left: the media path in (the WebSocket, JSON and base64,
  mu-law decoding, the 20 ms framing, the queue to the session), storing the turn,
  starting the run, cutting the sentence, and the media path out (the call's
  ``StreamPlayout``, the pacer's 20 ms tick, mu-law encoding, the frame to the carrier).
- The loop: N calls, each the utterance, the answer's first frame with sound,
  ``listen_ms`` of the answer, then the utterance again over the answer (a caller
  interrupting: Talk's barge-in drops the answer, and the server sends ``clear``). When
  the answer's sound stopped arriving after the caller began speaking is reported beside
  it (barge-in as the caller hears it), and the ``clear`` frames counted.

**CPU per second of audio, call beside Talk.** One fresh server (streams on),
``cpu_sessions`` sessions over Talk (gRPC, ``bench/webrtc.py``'s own Talk client: 16 kHz
in, 24 kHz out) and then as many stream calls (8 kHz mu-law both ways), each the same
closed loop: an utterance, the whole answer heard, the next. The server's CPU from /proc
over each measured window, per second of audio in (the line's stream, silence included:
the server hears all of it) and out (the answer's speech).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench import telephony, webrtc
from bench.harness import (
    Child,
    CpuMeter,
    answer,
    command_line,
    host_speed_line,
    provenance,
    quiet_gc,
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
from bench.telephony import (
    CPU_RATIO_BUDGET,
    GOAL_CALLS,
    ISSUE_72_TALK_MS,
    ISSUE_72_WEBRTC_MS,
    NUMBER,
    OWN_P99_BUDGET_MS,
    QUIET_S,
    SOUND_RMS,
    Voices,
)
from bench.voice import MODEL_INTERVAL_MS, SAID, _errors, _ms, child
from bench.webrtc import BASE_WPM, SILENCE_MS, WPM_STEP, Heard16, Plan, Speech, attribute
from switchboard.dispatcher.talk.streams import audio
from switchboard.dispatcher.talk.streams.signing import twilio_signature
from switchboard.dispatcher.talk.turns import Detector, Heard, TurnAudio
from switchboard.platform.audio import pcm
from tests.dispatcher.talk.streams.carrier import Carrier, call_sid, local, webhook

SECTION: Final = "## Phone calls (carriers' media streams)"
RATE: Final = audio.RATE
FRAME_MS: Final = 20
#: One 20 ms frame of silence as the line sends it (mu-law of zero).
SILENCE: Final = audio.encode(bytes(audio.PCM_FRAME_BYTES))
#: The carrier's account as the server knows it: the auth token that signs, and the
#: public URL the signatures cover (``http://``: dev mode allows it; the carrier maps it
#: to the server's local port, as a proxy would).
AUTH_TOKEN: Final = "0123456789abcdef0123456789abcdef"  # noqa: S105 - a made-up account
PUBLIC_URL: Final = "http://127.0.0.1"
CALLER: Final = "+15557654321"
STREAMS_SETTINGS: Final[dict[str, str]] = {
    "SWITCHBOARD_STREAMS_LISTEN": "127.0.0.1:0",
    "SWITCHBOARD_STREAMS_PUBLIC_URL": PUBLIC_URL,
    "SWITCHBOARD_STREAMS_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
    "SWITCHBOARD_STREAMS_MAX_CALLS": "100",
    "SWITCHBOARD_STREAMS_MAX_CALLS_PER_WORKSPACE": "100",
}
_LISTENING: Final = re.compile(r"media streams served on \S+:(\d+) for")
WAIT_S: Final = 60.0
#: Calls one carrier process makes (each a WebSocket and 50 frames a second each way).
PER_CLIENT: Final = 5
#: How long the carrier processes may take to start (importing the faithful carrier
#: imports the test suite's server helpers) and set their calls up.
DIAL_S: Final = 120.0
#: Between two calls' webhooks, as a carrier's would come.
DIAL_GAP_S: Final = 0.05


#: ``bench/webrtc.py``'s plan, a row per number of calls at once (20: the issue's goal).
FULL: Final = Plan(
    rows=(1, 4, 20),
    warmup_s=6.0,
    seconds=45.0,
    listen_ms=2000,
    # As telephony.py's: the two sides alike, and the SIP section's figures beside these.
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


def simulate(utterance: bytes) -> Heard16:
    """Feed ``utterance`` (8 kHz), after a second of silence and followed by silence,
    through the server's path: the streams' mu-law both ways (the carrier's encoding, the
    server's decoding), then the intake's ``Detector`` and ``TurnAudio`` at 8 kHz."""
    lead = bytes(pcm.byte_count(1000, RATE))
    last_frame = (len(lead) + len(utterance) - 1) // audio.PCM_FRAME_BYTES
    stream = audio.decode(audio.encode(lead + utterance + bytes(pcm.byte_count(3000, RATE))))
    detector = Detector(RATE, SILENCE_MS)
    turn = TurnAudio(RATE, 60_000)
    for index in range(len(stream) // audio.PCM_FRAME_BYTES):
        data = stream[index * audio.PCM_FRAME_BYTES : (index + 1) * audio.PCM_FRAME_BYTES]
        heard = detector.hear(data)
        if Heard.START in heard:
            turn.begin(pre_roll=True)
        turn.add(data)
        if Heard.STOP in heard and turn.open:
            return Heard16(index - last_frame, len(turn.end() or b""))
    raise RuntimeError("the detector never ended the simulated turn")


def _voices(directory: Path, count: int) -> Voices:
    """``telephony.py``'s utterances, each heard as the streams' path hears it."""
    made = telephony._voices(directory, count)
    heard = [simulate(Path(path).read_bytes()) for path in made.calls.paths]
    return Voices(Speech(made.calls.paths, heard, made.calls.seconds), made.talk_paths)


# ---------------------------------------------------------------------------------
# The carrier: one process, one aiohttp session, N calls.


@dataclass
class Call:
    """One call's stream, from the carrier's side; its loop's turns."""

    index: int
    number: str
    utterance: bytes
    ws: aiohttp.ClientWebSocketResponse | None = None
    sid: str = ""
    stream_sid: str = ""
    up: bool = False
    gone: bool = False
    why: str = ""
    #: mu-law not yet sent of what is being said.
    pending: bytearray = field(default_factory=bytearray)
    #: When the utterance's first and last frames went out; the first frame with sound
    #: that arrived after the last (each a future for the loop to wait on).
    began: float | None = None
    ended: asyncio.Future[float] | None = None
    first: asyncio.Future[float] | None = None
    #: Each frame sent, each frame with sound received.
    sent: list[float] = field(default_factory=list)
    voiced: list[float] = field(default_factory=list)
    #: When each ``clear`` arrived.
    clears: list[float] = field(default_factory=list)
    #: Set by each frame with sound.
    sound: asyncio.Event = field(default_factory=asyncio.Event)
    sequence: int = 0
    turns: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def say(self) -> tuple[asyncio.Future[float], asyncio.Future[float]]:
        loop = asyncio.get_running_loop()
        self.ended, self.first = loop.create_future(), loop.create_future()
        self.began = None
        self.pending = bytearray(audio.encode(self.utterance))
        return self.ended, self.first

    async def send(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        async with asyncio.timeout(WAIT_S):
            await self.ws.send_str(json.dumps(frame))

    def ids(self) -> dict[str, str]:
        self.sequence += 1
        return {"sequenceNumber": str(self.sequence), "streamSid": self.stream_sid}


async def _dial(http: aiohttp.ClientSession, carrier: Carrier, call: Call) -> None:
    """The webhook, the stream opened and started; ``call.up`` once it is."""
    sid = call.sid = call_sid()
    hooked = await webhook(http, carrier, to=call.number, caller=CALLER, call_sid=sid)
    if hooked.status != 200 or hooked.rejected is not None:
        call.gone, call.why = True, f"webhook {hooked.status} {hooked.rejected or ''}".strip()
        return
    url, parameters = hooked.stream()
    async with asyncio.timeout(WAIT_S):
        call.ws = await http.ws_connect(
            local(carrier, url),
            headers={"X-Twilio-Signature": twilio_signature(AUTH_TOKEN, url)},
            timeout=aiohttp.ClientWSTimeout(ws_close=10),
        )
    call.stream_sid = "MZ" + call_sid()[2:]
    await call.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    start = {
        "streamSid": call.stream_sid,
        "accountSid": "AC" + "0" * 32,
        "callSid": sid,
        "tracks": ["inbound"],
        "customParameters": parameters,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
    }
    await call.send({"event": "start", **call.ids(), "start": start})
    loop = asyncio.get_running_loop()
    call.tasks += [loop.create_task(_line(call)), loop.create_task(_ear(call))]
    call.up = True


async def _line(call: Call) -> None:
    """A phone line: a 20 ms frame every 20 ms, by deadline, speech or silence."""
    assert call.ws is not None
    loop = asyncio.get_running_loop()
    start = loop.time()
    chunk = 0
    while not call.ws.closed:
        chunk += 1
        await asyncio.sleep(max(0.0, start + chunk * audio.FRAME_S - loop.time()))
        data = bytes(call.pending[: audio.FRAME_SAMPLES])
        del call.pending[: audio.FRAME_SAMPLES]
        media = {
            "track": "inbound",
            "chunk": str(chunk),
            "timestamp": str(chunk * FRAME_MS),
            "payload": base64.b64encode(data + SILENCE[len(data) :]).decode(),
        }
        now = time.monotonic()
        if data and call.began is None:
            call.began = now
        try:
            await call.send({"event": "media", **call.ids(), "media": media})
        except (ConnectionError, RuntimeError, TimeoutError):
            return  # the socket is going: the reader sees its end
        call.sent.append(now)
        if data and not call.pending and call.ended is not None and not call.ended.done():
            call.ended.set_result(now)


async def _ear(call: Call) -> None:
    """What the server sends, each frame stamped on arrival."""
    assert call.ws is not None
    async for message in call.ws:
        now = time.monotonic()
        if message.type != aiohttp.WSMsgType.TEXT:
            continue
        frame = json.loads(message.data)
        event = frame.get("event")
        if event == "clear":
            call.clears.append(now)
        if event != "media":
            continue
        pcm16 = audio.decode(base64.b64decode(frame["media"]["payload"]))
        samples = np.frombuffer(pcm16, dtype="<i2").astype(np.float64)
        if samples.size == 0 or float(np.sqrt(np.mean(samples * samples))) < SOUND_RMS:
            continue
        call.voiced.append(now)
        call.sound.set()
        ended, first = call.ended, call.first
        if ended is not None and ended.done() and first is not None and not first.done():
            first.set_result(now)
    if not call.gone:
        call.gone, call.why = True, f"the server closed the stream ({call.ws.close_code})"


async def _latency_loop(call: Call, listen_s: float, deadline: float) -> None:
    """Say the utterance, wait for the answer's first sound, listen ``listen_s``, say it
    again (over the answer: barge-in)."""
    rng = random.Random(call.index)  # noqa: S311 - staggered starts, reproducible
    await asyncio.sleep(rng.uniform(0, 2.0))
    while time.monotonic() < deadline and not call.gone:
        began = time.monotonic()
        ended, first = call.say()
        async with asyncio.timeout(WAIT_S):
            end = await ended
        try:
            async with asyncio.timeout(WAIT_S):
                heard = await first
        except TimeoutError:
            call.turns.append({"began": call.began or began, "end_speech": end, "first": None})
            continue
        call.turns.append({"began": call.began or began, "end_speech": end, "first": heard})
        # The answer as it is played, a while: the pace of a conversation.
        await asyncio.sleep(max(0.0, heard + listen_s - time.monotonic()))


async def _cpu_loop(call: Call, deadline: float) -> None:
    """The utterance, the whole answer (until ``QUIET_S`` without sound), the next."""
    await asyncio.sleep(call.index * 0.5)  # staggered starts
    while time.monotonic() < deadline and not call.gone:
        ended, first = call.say()
        async with asyncio.timeout(WAIT_S):
            end = await ended
        try:
            async with asyncio.timeout(WAIT_S):
                heard = await first
        except TimeoutError:
            call.turns.append({"end_speech": end, "first": None})
            continue
        async with asyncio.timeout(WAIT_S):
            # Until the answer has been quiet for QUIET_S: woken by each sound, or when
            # the quiet would be long enough.
            while (gap := call.voiced[-1] + QUIET_S - time.monotonic()) > 0:
                call.sound.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(gap):
                        await call.sound.wait()
        call.turns.append({"end_speech": end, "first": heard})


def _barge(call: Call, turns: Sequence[dict[str, Any]]) -> list[float]:
    """For each turn said over an answer: from its first frame out to the last sound of
    the answer that arrived before the utterance ended."""
    stops = []
    for turn in turns:
        began, end = turn.get("began"), turn["end_speech"]
        if began is None or end is None:
            continue
        if any(began - 0.1 <= at < began for at in call.voiced):
            last = max((at for at in call.voiced if began <= at < end), default=began)
            stops.append(last - began)
    return stops


def _turns(
    calls: Sequence[Call], begin: float, deadline: float, errors: collections.Counter[str]
) -> tuple[list[dict[str, Any]], list[float]]:
    """The turns answered, as ``webrtc.attribute`` reads them, and the barge-in stops."""
    turns: list[dict[str, Any]] = []
    barge: list[float] = []
    for call in calls:
        if call.gone:
            errors[f"call ended early: {call.why}"[:80]] += 1
        for turn in call.turns:
            measured = begin <= turn["end_speech"] < deadline
            if turn["first"] is None:
                if measured:
                    errors["no answer audio in 60 s"] += 1
                continue
            turns.append(
                {
                    "session": call.index,
                    "end_speech": turn["end_speech"],
                    "first_packet": turn["first"],
                    "first_frame": turn["first"],
                    "measured": measured,
                }
            )
        barge += _barge(call, [t for t in call.turns if begin <= t["end_speech"] < deadline])
    return turns, barge


async def _hang_up(call: Call) -> None:
    if call.ws is not None and not call.ws.closed:
        stop = {"accountSid": "AC" + "0" * 32, "callSid": call.sid}
        try:
            await call.send({"event": "stop", **call.ids(), "stop": stop})
            async with asyncio.timeout(10):
                await call.ws.close()
        except (ConnectionError, RuntimeError, TimeoutError):
            pass  # gone meanwhile
    for task in call.tasks:
        task.cancel()
    await asyncio.gather(*call.tasks, return_exceptions=True)


def _counted(errors: collections.Counter[str], done: Sequence[BaseException | None]) -> None:
    for exc in done:
        if exc is not None:
            errors[f"{type(exc).__name__}: {exc}"[:80]] += 1


async def client_calls(spec: dict[str, Any]) -> dict[str, Any]:
    """The carrier's process: ``spec['mode']`` "latency" or "cpu"."""
    latency = spec["mode"] == "latency"
    meter = (
        CpuMeter(spec["server_pid"], spec["audio_pid"], spec["model_pid"])
        if latency
        else CpuMeter(spec["server_pid"])
    )
    said = [await asyncio.to_thread(Path(path).read_bytes) for path in spec["utterances"]]
    calls = [
        Call(spec["first"] + index, number, utterance)
        for index, (number, utterance) in enumerate(zip(spec["numbers"], said, strict=True))
    ]
    errors: collections.Counter[str] = collections.Counter()
    carrier = Carrier(
        "twilio", PUBLIC_URL, f"http://127.0.0.1:{spec['port']}", twilio_token=AUTH_TOKEN
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        for call in calls:
            try:
                await _dial(http, carrier, call)
            except (aiohttp.ClientError, TimeoutError, AssertionError) as exc:
                call.gone, call.why = True, f"{type(exc).__name__}: {exc}"
            if not call.up:
                errors[f"call not up: {call.why}"[:80]] += 1
            await asyncio.sleep(DIAL_GAP_S)  # webhooks spaced, as a carrier's would be
        quiet_gc()
        # Every carrier process measures the same window (the monotonic clock is the
        # machine's), which the driver sets once every process has its calls up.
        answer({"ready": sum(1 for call in calls if call.up)})
        async with asyncio.timeout(DIAL_S):
            told = await asyncio.to_thread(sys.stdin.readline)
        if not told.strip():
            raise RuntimeError("the driver went away before the window was set")
        begin_at = float(told)
        begin = max(begin_at, time.monotonic())
        deadline = begin + spec["seconds"]
        live = [call for call in calls if call.up]
        loops = [
            _latency_loop(call, spec["listen_ms"] / 1000, deadline)
            if latency
            else _cpu_loop(call, deadline)
            for call in live
        ]
        running = asyncio.gather(*loops, return_exceptions=True)
        await asyncio.sleep(max(0.0, begin - time.monotonic()))
        meter.start()
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        meter.stop()
        async with asyncio.timeout(3 * WAIT_S):
            _counted(errors, await running)
        sent = sum(1 for call in calls for at in call.sent if begin <= at < deadline)
        heard = sum(1 for call in calls for at in call.voiced if begin <= at < deadline)
        turns, barge = _turns(calls, begin, deadline, errors)
        await asyncio.gather(*(_hang_up(call) for call in calls))
    return {
        "up": sum(1 for call in calls if call.up),
        "sent_frames": sent,
        "heard_frames": heard,
        "clears": sum(1 for call in calls for at in call.clears if begin <= at < deadline),
        "wall_s": meter.wall,
        "cpu_s": meter.used,
        "client_cpu_s": meter.client,
        "machine_cpu_s": meter.machine,
        "turns": turns,
        "barge": barge,
        "late_start_s": round(begin - begin_at, 2),
        "errors": dict(errors),
    }


def client(spec: dict[str, Any]) -> None:
    answer(asyncio.run(client_calls(spec)))


# ---------------------------------------------------------------------------------
# The driver.


async def streamed(spec: dict[str, Any], count: int, warmup_s: float) -> dict[str, Any]:
    """``count`` calls from carrier processes of ``PER_CLIENT`` calls each, measuring one
    window; their figures together."""
    groups = [range(i, min(i + PER_CLIENT, count)) for i in range(0, count, PER_CLIENT)]
    started: list[Child] = []
    try:
        for group in groups:
            part = {
                **spec,
                "first": group.start,
                "numbers": spec["numbers"][group.start : group.stop],
                "utterances": spec["utterances"][group.start : group.stop],
            }
            started.append(
                await Child.start(f"carrier {group.start}", __file__, "client", json.dumps(part))
            )
        for carrier in started:
            await carrier.answer(DIAL_S)
        # The warm-up counts from every call up, in every process.
        begin_at = time.monotonic() + warmup_s
        for carrier in started:
            await carrier.send(repr(begin_at))
        seen = [
            await carrier.answer(warmup_s + spec["seconds"] + 4 * WAIT_S) for carrier in started
        ]
    finally:
        for carrier in started:
            await carrier.close()
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
        "carriers": len(seen),
        "calls_up": sum(one["up"] for one in seen),
        "turns": [turn for one in seen for turn in one["turns"]],
        "audio_in_s": round(sent * FRAME_MS / 1000, 1),
        "audio_out_s": round(heard * FRAME_MS / 1000, 1),
        "clears": sum(one["clears"] for one in seen),
        "wall_s": round(wall, 1),
        "server_cpu_s": first["cpu_s"][0],
        "server_cores": round(first["cpu_s"][0] / wall, 3),
        "sources_cores": [round(used / wall, 2) for used in first["cpu_s"]],
        "client_cores": round(clients / wall, 2),
        "other_cores": round(max(0.0, first["machine_cpu_s"] - processes - clients) / wall, 2),
        "late_start_s": max(one["late_start_s"] for one in seen),
        "barge_n": len(barge),
        "barge_p50_ms": _ms(barge, 0.5),
        "barge_p99_ms": _ms(barge, 0.99),
        "errors": dict(errors),
    }


def _streams_port(log: Path) -> int:
    """The port the media streams server bound, from the server's log (said at start)."""
    found = _LISTENING.search(log.read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"the server did not say its media streams port; its log: {log}")
    return int(found.group(1))


def _settings(servers: dict[str, str], rules: str) -> dict[str, str]:
    return {**servers, **STREAMS_SETTINGS, "SWITCHBOARD_STREAMS_RULES": rules}


async def latency_phase(plan: Plan, directory: Path, calls: int, voices: Voices) -> dict[str, Any]:
    async with (
        child("audio", json.dumps("tone")) as (sound, audio_port),
        child("model", json.dumps(MODEL_INTERVAL_MS)) as (model, model_port),
    ):
        url = f"sqlite+aiosqlite:///{directory / f'streams-latency-{time.monotonic_ns()}.db'}"
        servers = telephony._servers(model_port, audio_port)
        place = await telephony._made(directory, url, servers, calls, "loop")
        with serve(directory, url, _settings(servers, telephony._rules(place, 0, calls))) as server:
            port = _streams_port(server.log)
            waited = await wait_quiet(plan.quiet_wait_s)
            say(f"loop: {calls} stream calls to 127.0.0.1:{port}, {plan.seconds:g} s")
            seen = await streamed(
                {
                    "mode": "latency",
                    "port": port,
                    "numbers": [NUMBER.format(i) for i in range(calls)],
                    "utterances": voices.calls.paths[:calls],
                    "seconds": plan.seconds,
                    "listen_ms": plan.listen_ms,
                    "server_pid": server.pid,
                    "audio_pid": sound.pid,
                    "model_pid": model.pid,
                },
                calls,
                plan.warmup_s,
            )
        timings = (await sound.ask({"timings": True}, 120))["timings"]
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
    """Talk over gRPC, then as many stream calls, on one server with streams on."""
    count = plan.cpu_sessions
    async with (
        child("audio", json.dumps("tone")) as (_, audio_port),
        child("model", json.dumps(MODEL_INTERVAL_MS)) as (_, model_port),
    ):
        url = f"sqlite+aiosqlite:///{directory / 'streams-cpu.db'}"
        servers = telephony._servers(model_port, audio_port)
        place = await telephony._made(directory, url, servers, 2 * count, "cpu")
        settings = _settings(servers, telephony._rules(place, count, count))
        with serve(directory, url, settings) as server:
            port = _streams_port(server.log)
            token = await telephony._login(server.address)
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
            say(f"cpu: {count} stream calls, {plan.cpu_seconds:g} s")
            seen = await streamed(
                {
                    "mode": "cpu",
                    "port": port,
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
                "transport": "streams",
                "sessions": count,
                "carriers": seen["carriers"],
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
    async with session(results, "switchboard-streams-bench-") as directory:
        most = max(*plan.rows, plan.cpu_sessions)
        voices = await asyncio.to_thread(_voices, directory, most)
        results["speech"] = {
            "seconds": [round(s, 2) for s in voices.calls.seconds],
            "wait_frames": [h.wait_frames for h in voices.calls.heard],
        }
        say(f"utterances: {results['speech']}")
        results["loop"] = [await latency_phase(plan, directory, n, voices) for n in plan.rows]
        results["cpu"] = await cpu_phase(plan, directory, voices) if plan.cpu_sessions else []
    text = render(results, command_line("bench/streams.py"), plan)
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
    "first frame at the carrier",
}


def _loop_line(row: dict[str, Any]) -> str:
    return (
        f"| {row['sessions']} | {row['calls_up']} | {row['turns']} ({row['unattributed']}, "
        f"{row['size_off']}) | "
        f"{row['own_p50_ms']} / {row['own_p99_ms']} / {row['own_max_ms']} | "
        f"{row['total_p50_ms']} / {row['total_p99_ms']} | {row['wait_p50_ms']} | "
        f"{row['transcription_p50_ms']}, {row['model_p50_ms']}, {row['speech_p50_ms']} | "
        f"{row['barge_p50_ms']} / {row['barge_p99_ms']} ({row['barge_n']}) | "
        f"{row['clears']} | {row['server_cores']} | {row['client_cores']} | "
        f"{row['other_cores']} | {row['audio_in_s']} / {row['audio_out_s']} | "
        f"{_errors(row['errors'])} |"
    )


def _hops_line(row: dict[str, Any]) -> str:
    hops = "; ".join(
        f"{_HOPS.get(name, name)} {p50} / {p99}" for name, (p50, p99) in row["gaps"].items()
    )
    many = "s" if row["sessions"] != 1 else ""
    return f"- {row['sessions']} call{many}: {hops}"


def _cpu_line(row: dict[str, Any]) -> str:
    transport = (
        "media-stream call (mu-law, 8 kHz)" if row["transport"] == "streams" else "Talk over gRPC"
    )
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
            f"- A media-stream call's own share of a turn p99 under {OWN_P99_BUDGET_MS:g} ms "
            f"with {GOAL_CALLS} calls on two cores: not measured (no {GOAL_CALLS}-call row)."
        ]
    else:
        clean = not row["errors"] and not row["unattributed"] and row["turns"] > 0
        ok = clean and row["own_p99_ms"] <= OWN_P99_BUDGET_MS
        carried = (
            ""
            if row["calls_up"] == row["sessions"]
            else f"; only {row['calls_up']} of the {row['sessions']} calls were up"
        )
        lines = [
            f"- A media-stream call's own share of a turn p99 under {OWN_P99_BUDGET_MS:g} ms "
            f"with {GOAL_CALLS} calls on two cores: {verdict(ok)} ({row['own_p99_ms']} ms; "
            f"p50 {row['own_p50_ms']} ms{carried}).",
        ]
    by = {r["transport"]: r for r in cpu}
    if "talk" in by and "streams" in by:
        talk, streams = by["talk"], by["streams"]
        ratio = streams["server_ms_per_audio_s"] / max(talk["server_ms_per_audio_s"], 1e-9)
        ok = not streams["errors"] and not talk["errors"] and ratio <= CPU_RATIO_BUDGET
        lines.append(
            f"- A media-stream call's CPU per second of audio at most {CPU_RATIO_BUDGET:g}x a "
            f"Talk session's over gRPC: {verdict(ok)} ({ratio:.2f}x: a call "
            f"{streams['server_ms_per_audio_s']} ms, Talk {talk['server_ms_per_audio_s']} ms "
            f"in the same run; for reference, not re-run: issue 72's WebRTC "
            f"{ISSUE_72_WEBRTC_MS:g} ms against Talk's {ISSUE_72_TALK_MS:g} ms, "
            f"{ISSUE_72_WEBRTC_MS / ISSUE_72_TALK_MS:.2f}x)."
        )
    return lines


def render(results: dict[str, Any], command: str, plan: Plan) -> str:
    rows, cpu = results["loop"], results["cpu"]
    spoken = results["speech"]
    late = max((r.get("late_start_s", 0.0) for r in [*rows, *cpu]), default=0.0)
    lines = [
        SECTION,
        "",
        *provenance(command, took_s=results.get("seconds")),
        host_speed_line(results["host"]),
        "- the server: `switchboard serve --dev` (embedded SQLite) with "
        f"{settings_text(webrtc.SETTINGS)}, and media streams: "
        f"{settings_text({k: v for k, v in STREAMS_SETTINGS.items() if 'TOKEN' not in k})}, "
        "a Twilio auth token, and one dispatch rule per call (its own number, assistant and, "
        "per call, a new conversation); the rules' assistants and user made over gRPC on a "
        "first server without streams, the same database then served with them; "
        "`SWITCHBOARD_VOICE_URL` at the local audio server (`--engine tone`) and "
        "`SWITCHBOARD_LLM_BASE_URL` at the local model server, each in its own process; the "
        f"model writes a word every {MODEL_INTERVAL_MS} ms",
        f"- the carrier: client processes of at most {PER_CLIENT} calls each (asyncio and "
        "aiohttp), doing what Twilio does (`tests/dispatcher/talk/streams/carrier.py`'s "
        "signed webhook; the TwiML answer read; the stream's signed WebSocket upgrade; "
        "`connected`, `start` with the answer's `<Parameter>`); each call a `media` frame of "
        "20 ms of 8 kHz mu-law every 20 ms by deadline (the utterance when said, silence "
        "otherwise); each frame the server sends stamped on arrival, the answer's first "
        f"with sound (RMS above {SOUND_RMS:g}) its first sound; the warm-up starts once "
        "every process has its calls up, and all measure one window (the latest process "
        f"began it {late:g} s late)",
        f'- the loop: N calls, each its own assistant, saying "{SAID}" (eSpeak NG, call i '
        f"at {BASE_WPM} + {WPM_STEP}i words a minute, at 8 kHz: "
        f"{min(spoken['seconds'])} to {max(spoken['seconds'])} s, trimmed to the voice), "
        f"silence after it, the answer's first sound, {plan.listen_ms} ms of the answer, "
        "then the utterance again over the answer (barge-in by voice: Talk drops the "
        f"answer and the server sends `clear`); {plan.warmup_s:g} s warm-up, "
        f"{plan.seconds:g} s measured (turns whose speech ended in it); turns end by Talk's "
        "detector (`TURN_DETECTION_SERVER_VAD`, 700 ms), a phone has no other way",
        "- the total: from the moment the frame with the utterance's last voiced sample was "
        "handed to the carrier's socket to the arrival of the answer's first `media` frame "
        "with sound at the carrier (the server paces the answer in real time, so what "
        "arrives is what a carrier would play; the carrier's own jitter buffer and the "
        "telephone network are not in it)",
        "- subtracted: the detector's wait, exactly: the frames after the last voiced one "
        "that the server must receive before Talk's detector ends the turn, found by feeding "
        "each utterance offline through the server's path (the streams' own G.711 mu-law "
        "both ways, `turns.Detector` and `TurnAudio` at 8 kHz; nothing is resampled on "
        f"this path): {min(spoken['wait_frames'])} to {max(spoken['wait_frames'])} frames "
        "of 20 ms by utterance; and the endpoints' time from their own records (same "
        "monotonic clock): the transcription request to its last byte, the model request to "
        "the chunk that ends the first sentence, the speech request to its first audio byte",
        "",
        "| calls | calls up | turns (unattributed, turn size off) | own share "
        "p50 / p99 / max ms | "
        "total p50 / p99 ms | detector's wait p50 ms | endpoints p50 ms (transcription, "
        "model, speech) | barge-in: the answer's last sound after the caller began, p50 / "
        "p99 ms (turns) | `clear` frames received | server cores | client cores | other cores | "
        "audio in / out s | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_loop_line(row) for row in rows),
        "",
        "The own share hop by hop, p50 / p99 ms (the four add up to it; the first holds the "
        "media path in: the WebSocket, JSON and base64, mu-law decoding, the 20 ms framing, "
        "the session's queue and detector; the last the media path out: the call's playout "
        "queue, the pacer's 20 ms tick, mu-law encoding, the frame to the carrier):",
        "",
        *(_hops_line(row) for row in rows),
        "",
        *goals(rows, cpu),
    ]
    if cpu:
        lines += [
            "",
            "CPU per second of audio, a media-stream call beside Talk: one server (streams "
            f"on), {plan.cpu_sessions} sessions over Talk (gRPC, `TURN_DETECTION_SERVER_VAD`, "
            "`bench/webrtc.py`'s Talk client: the same utterances at 16 kHz streamed in 20 "
            "ms frames at a microphone's pace, silence between them, the answer at 24 kHz), "
            f"then {plan.cpu_sessions} stream calls (8 kHz mu-law both ways); each session's "
            "loop: its utterance, the whole answer heard (two sentences, the tone engine; a "
            f"call's answer is over after {QUIET_S:g} s without sound), the next; "
            f"{plan.cpu_warmup_s:g} s warm-up, {plan.cpu_seconds:g} s measured each. Audio "
            "in is the line's stream, silence included (the server hears all of it); "
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
        roles={"client": client},
    )


if __name__ == "__main__":
    raise SystemExit(main())
