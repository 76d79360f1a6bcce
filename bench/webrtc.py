"""Voice over WebRTC: Switchboard's own share of a turn through ``ConnectTalk``, and its CPU
per second of audio beside Talk's over gRPC.

    python bench/webrtc.py            the full run (about 5 minutes); prints the report
    python bench/webrtc.py --quick    fewer sessions and seconds, to try it out (< 2 min)
    python bench/webrtc.py --write    ... and put the report into BENCHMARKS.md
    python bench/webrtc.py --json     one JSON line, figures and report (bench/run.py)

The same parts as ``bench/voice.py`` (whose pieces it uses): a fresh ``switchboard serve
--dev`` per phase (``SERVER_SETTINGS``, and room for the peers), the local audio server
with its fast engine (``--engine tone``) and the local model server, each in its own
process. The clients are ``aiortc`` peers (the server's own stack) in one client process:
each a page as ``tests/dispatcher/talk/webrtc/test_peers.py`` drives it, its microphone a
``media.SpeechTrack`` (a 20 ms frame every 20 ms: the session's utterance when one is
pushed, silence otherwise), the ``talk`` data channel for the session's frames, the
answer on its inbound track.

**Turns end by the server's voice-activity detector** (``TURN_DETECTION_SERVER_VAD``,
the default 700 ms silence), as a browser's do: a client END_TURN on the data channel
would race the last audio frames (SCTP and RTP are separate paths, and the server's
jitter buffer holds audio back), so its "end of speech" would not be the end of what the
server heard. The end of speech is the moment the client's microphone handed its sender
the frame holding the utterance's last voiced sample (the utterances are eSpeak NG
speech, trimmed to their voice). The detector's own wait is exact, not the nominal
700 ms: the driver feeds each utterance, after a silence, through the server's path
offline (``pcm.Resampler`` to 48 kHz as the microphone does, Opus encoded by the
track's encoder and decoded by aiortc's, ``media.Inbound``, Talk's ``turns.Detector`` and
``TurnAudio`` as the intake uses them) and counts the 20 ms frames after the last voiced
one that the server must receive before the detector ends the turn (about 32 to 35 of them: the
silence rule allows 10 % voiced frames in the window); that many frames' time is what is
subtracted as the detector's wait. The same simulation gives each turn's size, which
tells whose turn a transcription request was (each session speaks at its own pace, so
its utterance has its own length).

- **The total**: from the end of speech to the arrival, at the client, of the first RTP
  packet of the answer with sound in it (an Opus packet longer than digital silence's
  3 bytes): the packet the server sent, before the
  client's own jitter buffer (the decoded frame's time is reported beside it).
- **Switchboard's own share** = the total minus the detector's wait, minus the endpoints'
  time from the fakes' records on the shared monotonic clock (the transcription request to
  its last byte, the model request to the chunk that ended the first sentence, the speech
  request to its first audio byte). What is left: the media path in (the network, the
  server's jitter buffer, Opus decoding, resampling, the queue to the session), storing
  the turn, starting the run, cutting the sentence, and the media path out (the speech
  track's 20 ms clock, Opus encoding, the packet).
- The loop: ``sessions`` peers, each its own assistant and conversation: the utterance,
  the first answer packet, ``listen_ms`` of the answer, INTERRUPT on the data channel,
  the run's end, the answer's silence on the track, the next utterance.

**CPU per second of audio, Talk beside WebRTC.** One fresh server, ``cpu_sessions``
sessions over Talk (gRPC, the same server VAD, the same PCM streamed in 20 ms frames at
the pace of a microphone, silence between utterances) and then as many over WebRTC, each
the same closed loop: an utterance, the whole answer heard, the next. The server's CPU
from /proc over each measured window, per second of audio in (the microphone's stream,
silence included: the server hears all of it) and out (the answer's speech).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import dataclasses
import fractions
import functools
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, Packet
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench.harness import (
    CpuMeter,
    bearer,
    command_line,
    dedicated_channel,
    gather_limited,
    host_speed_line,
    process_cpu_s,
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
from bench.harness import clients as client_roles
from bench.voice import (
    MODEL_INTERVAL_MS,
    SAID,
    SERVER_SETTINGS,
    Voice,
    _errors,
    _ms,
    _place,
    child,
)
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.dispatcher.talk.turns import Detector, Heard, TurnAudio
from switchboard.dispatcher.talk.webrtc.media import Inbound, SpeechTrack, opus_encoder, pcm_of
from switchboard.dispatcher.talk.webrtc.peer import CHANNEL
from switchboard.platform.audio import pcm

_T = typing.TypeVar("_T")
SECTION: Final = "## Voice over WebRTC"
RATE: Final = 16_000
OUTPUT_RATE: Final = 24_000
FRAME_MS: Final = 20
#: Talk's default silence window (``TURN_DETECTION_SERVER_VAD``).
SILENCE_MS: Final = 700
SETTINGS: Final[dict[str, str]] = {
    **SERVER_SETTINGS,
    "SWITCHBOARD_WEBRTC_MAX_PEERS": "200",
    "SWITCHBOARD_WEBRTC_MAX_PEERS_PER_USER": "200",
}
#: The issue's goal, on the 20-session row.
OWN_P99_BUDGET_MS: Final = 150.0
#: Issue 52's figure for Talk (real engines, audio in counted as the turns alone).
TALK_ISSUE_52_MS: Final = 18.4
#: An Opus packet longer than this carries sound: one of digital silence is 3 bytes. (The
#: server's track encodes its own packets, which carry no RFC 6464 audio level.)
SILENT_PAYLOAD_BYTES: Final = 8
#: Silent packets in a row after the answer that say it is over on the track.
SETTLED_PACKETS: Final = 10
#: Inbound packets further apart than this are counted as a stall of the server's sender.
STALL_S: Final = 0.06
WAIT_S: Final = 60.0
#: Each session speaks ``SAID`` at its own pace (words a minute), so each turn has its
#: own length.
BASE_WPM: Final = 140
WPM_STEP: Final = 4


@dataclass(frozen=True)
class Plan:
    #: Sessions at once, a row each (the issue's goal is the 20-session row's).
    rows: tuple[int, ...]
    warmup_s: float
    seconds: float
    #: How long a session listens to the answer before it interrupts.
    listen_ms: int
    cpu_sessions: int
    cpu_warmup_s: float
    cpu_seconds: float
    quiet_wait_s: float


FULL: Final = Plan(
    rows=(1, 20),
    warmup_s=6.0,
    seconds=45.0,
    listen_ms=2000,
    cpu_sessions=5,
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


def _spoken(text: str, wpm: int) -> bytes:
    """``text`` said by eSpeak NG at ``wpm`` words a minute: mono PCM16 at 16 kHz, trimmed
    to its voice (the first and last 10 ms with a sample louder than a whisper)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed; run scripts/install-deps.sh")
    with tempfile.TemporaryDirectory(prefix="webrtc-speech-") as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run(
            [espeak, "-v", "en-us+m3", "-s", str(wpm), "-w", str(path), text],
            capture_output=True,
            timeout=30,
            check=True,
        )
        samples, rate = pcm.from_wav(path.read_bytes())
    audio = array.array("h")
    audio.frombytes(pcm.resample(samples, rate, RATE))
    step = RATE // 100
    loud = [
        start
        for start in range(0, len(audio), step)
        if max(map(abs, audio[start : start + step])) > 500
    ]
    if not loud:
        raise RuntimeError(f"eSpeak NG said nothing audible for {text!r}")
    return audio[loud[0] : min(len(audio), loud[-1] + step)].tobytes()


@dataclass(frozen=True)
class Heard16:
    """What Talk's detector makes of an utterance as the server receives it."""

    #: Microphone frames after the one holding the last voiced sample that the server
    #: needs before the detector ends the turn.
    wait_frames: int
    #: The turn's audio, bytes of PCM16 at 16 kHz (its WAV is 44 more).
    turn_bytes: int


def simulate(utterance: bytes) -> Heard16:
    """Feed ``utterance``, after a second of silence and followed by silence, through the
    server's path: the microphone's conversion to 48 kHz, Opus both ways (the track's
    encoder, aiortc's decoder), ``media.Inbound``, and the intake's ``Detector`` and
    ``TurnAudio``."""
    frame_bytes = pcm.byte_count(FRAME_MS, 48_000)
    lead = bytes(pcm.byte_count(1000, 48_000))
    # As ``SpeechTrack.push`` converts it (a fresh converter), then silence.
    said = pcm.Resampler(RATE, 48_000).feed(utterance)
    last_frame = (len(lead) + len(said) - 1) // frame_bytes
    stream = lead + said + bytes(pcm.byte_count(3000, 48_000))
    encoder, decoder = opus_encoder(), OpusDecoder()  # as the microphone's track encodes
    inbound = Inbound(RATE)
    detector = Detector(RATE, SILENCE_MS)
    turn = TurnAudio(RATE, 60_000)
    base = fractions.Fraction(1, 48_000)
    samples = frame_bytes // pcm.SAMPLE_BYTES
    for index in range(len(stream) // frame_bytes):
        frame = AudioFrame(format="s16", layout="mono", samples=samples)
        frame.planes[0].update(stream[index * frame_bytes : (index + 1) * frame_bytes])
        frame.sample_rate = 48_000
        frame.pts = index * samples
        frame.time_base = base
        for packet in encoder.encode(frame):
            for decoded in decoder.decode(JitterFrame(bytes(packet), frame.pts)):
                data = inbound.feed(decoded)  # type: ignore[arg-type]
                heard = detector.hear(data)
                if Heard.START in heard:
                    turn.begin(pre_roll=True)
                turn.add(data)
                if Heard.STOP in heard and turn.open:
                    return Heard16(index - last_frame, len(turn.end() or b""))
    raise RuntimeError("the detector never ended the simulated turn")


# ---------------------------------------------------------------------------------
# The client's side of a peer.


class Microphone(SpeechTrack):
    """The client's microphone: an utterance when pushed, silence otherwise; when the
    frame holding each utterance's last sample went to the sender."""

    def __init__(self) -> None:
        super().__init__(send_silence=True)
        self.ended: dict[int, asyncio.Future[float]] = {}
        self.sent: list[float] = []

    def say(self, sequence: int, utterance: bytes) -> asyncio.Future[float]:
        future = self.ended[sequence] = asyncio.get_running_loop().create_future()
        self.push(sequence, utterance, RATE)
        return future

    async def recv(self) -> Packet[Any]:
        before = self.heard_through
        frame = await super().recv()
        now = time.monotonic()
        self.sent.append(now)
        if self.heard_through != before:
            done = self.ended.pop(self.heard_through, None)
            if done is not None and not done.done():
                done.set_result(now)
        return frame


class Ear:
    """The answer as the client receives it: each RTP packet's arrival and level (before
    the client's jitter buffer), and the decoded frames (after it)."""

    def __init__(self) -> None:
        self.voiced: list[float] = []
        self.packets = 0
        self.lost = 0
        self.stalls = 0
        self._last_at: float | None = None
        self._last_sequence: int | None = None
        self._silent_run = 0
        self._mark = float("inf")
        self.first_packet: asyncio.Future[float] | None = None
        self.first_frame: asyncio.Future[float] | None = None
        #: Set while the track is quiet: the server sends nothing between answers, so
        #: quiet is no voiced packet for a while (or that many silent ones in a row).
        self.settled = asyncio.Event()
        self.settled.set()
        self._quiet: asyncio.TimerHandle | None = None

    def listen_from(self, at: float) -> tuple[asyncio.Future[float], asyncio.Future[float]]:
        """The next sound heard after ``at`` is the answer's first: when its packet
        arrives, and when its frame comes out of the jitter buffer."""
        loop = asyncio.get_running_loop()
        self._mark = at
        self.first_packet = loop.create_future()
        self.first_frame = loop.create_future()
        return self.first_packet, self.first_frame

    def packet(self, packet: Any) -> None:
        now = time.monotonic()
        self.packets += 1
        if (
            self._last_at is not None
            and now - self._last_at > STALL_S
            and not self.settled.is_set()
        ):
            # A gap within an answer (between answers nothing is sent at all).
            self.stalls += 1
        self._last_at = now
        number = int(packet.sequence_number)
        if self._last_sequence is not None:
            self.lost += max(0, (number - self._last_sequence - 1) % 65536)
        self._last_sequence = number
        sound = len(packet.payload) > SILENT_PAYLOAD_BYTES
        if sound:
            self.voiced.append(now)
            self._silent_run = 0
            self.settled.clear()
            if self._quiet is not None:
                self._quiet.cancel()
            self._quiet = asyncio.get_running_loop().call_later(
                SETTLED_PACKETS * 0.02, self.settled.set
            )
            first = self.first_packet
            if now >= self._mark and first is not None and not first.done():
                first.set_result(now)
        else:
            self._silent_run += 1
            if self._silent_run >= SETTLED_PACKETS:
                self.settled.set()

    def frame(self, frame: AudioFrame) -> None:
        if self.first_frame is None or self.first_frame.done():
            return
        samples = array.array("h")
        samples.frombytes(pcm_of(frame))
        if samples and max(samples) - min(samples) > 600:
            now = time.monotonic()
            if now >= self._mark:
                self.first_frame.set_result(now)


class Page:
    """One browser page: its peer connection, microphone, ear and the session's frames."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.microphone = Microphone()
        self.pc.addTrack(self.microphone)
        self.ear = Ear()
        receiver = self.pc.getReceivers()[0]
        handle = receiver._handle_rtp_packet

        async def heard(packet: Any, arrival_time_ms: int) -> None:
            self.ear.packet(packet)
            await handle(packet, arrival_time_ms=arrival_time_ms)

        receiver._handle_rtp_packet = heard  # type: ignore[method-assign]
        self.channel = self.pc.createDataChannel(CHANNEL)
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)
        self.frames: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.errors: collections.Counter[str] = collections.Counter()
        self.tasks: list[asyncio.Task[None]] = []

    def _on_message(self, message: str | bytes) -> None:
        frame = json.loads(message)
        if "error" in frame:
            self.errors["error frame: " + str(frame["error"].get("message", ""))[:60]] += 1
        self.frames.append(frame)
        self.arrived.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        async def listen() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                self.ear.frame(frame)  # type: ignore[arg-type]

        self.tasks.append(asyncio.ensure_future(listen()))

    async def connect(self, stub: Any, metadata: Any, conversation: str, assistant: str) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        connected = await stub.ConnectTalk(
            pb.ConnectTalkRequest(
                offer=self.pc.localDescription.sdp,
                start=pb.TalkStart(
                    conversation=conversation,
                    assistant=assistant,
                    turn_detection=pb.TURN_DETECTION_SERVER_VAD,
                ),
            ),
            metadata=metadata,
            timeout=WAIT_S,
        )
        await self.pc.setRemoteDescription(
            RTCSessionDescription(sdp=connected.answer, type="answer")
        )
        await self.until("the session frame", lambda f: "session" in f)

    async def until(self, what: str, done: Callable[[dict[str, Any]], bool], start: int = 0) -> int:
        """The index of the first frame from ``start`` on that ``done`` holds for."""

        async def seen(start: int) -> int:
            while True:
                for index in range(start, len(self.frames)):
                    if done(self.frames[index]):
                        return index
                start = len(self.frames)
                self.arrived.clear()
                await self.arrived.wait()

        return await within(what, seen(start))

    def send(self, frame: dict[str, Any]) -> None:
        if self.channel.readyState != "open":
            said = next(
                (str(f["error"].get("message")) for f in reversed(self.frames) if "error" in f),
                "no error frame",
            )
            raise RuntimeError(f"the data channel closed ({said[:80]})")
        self.channel.send(json.dumps(frame))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.channel.readyState == "open":
                self.send({"control": {"action": "TALK_ACTION_END_SESSION"}})
        await self.pc.close()
        for task in self.tasks:
            task.cancel()


_TERMINAL: Final = frozenset(
    {
        "RUN_STATE_SUCCEEDED",
        "RUN_STATE_FAILED",
        "RUN_STATE_CANCELLED",
        "RUN_STATE_DEADLINE_EXCEEDED",
    }
)


def _final(frame: dict[str, Any]) -> bool:
    return bool(frame.get("transcript", {}).get("final", False))


def _ended(run: str) -> Callable[[dict[str, Any]], bool]:
    def done(frame: dict[str, Any]) -> bool:
        update = frame.get("update", {})
        state = update.get("stateChange", {}).get("run", {}).get("state")
        return bool(update.get("run") == run and state in _TERMINAL)

    return done


async def within(what: str, awaited: Awaitable[_T]) -> _T:
    """``awaited``, or a TimeoutError naming ``what`` was awaited after ``WAIT_S``."""
    try:
        async with asyncio.timeout(WAIT_S):
            return await awaited
    except TimeoutError:
        raise TimeoutError(f"no {what} in {WAIT_S:g} s") from None


@dataclass(frozen=True)
class Said:
    """A turn said: when its last frame went out, its run, the index of its final
    transcript among the page's frames, and the answer's first sound (to come)."""

    end: float
    run: str
    index: int
    first_packet: asyncio.Future[float]
    first_frame: asyncio.Future[float]


async def _turn(page: Page, sequence: int, utterance: bytes) -> Said:
    """Say ``utterance`` once the answer before it is over on the track."""
    await within("silence on the track after the answer", page.ear.settled.wait())
    seen = len(page.frames)
    end = await within("last frame of the utterance sent", page.microphone.say(sequence, utterance))
    packet, frame = page.ear.listen_from(end)
    index = await page.until("final transcript", _final, seen)
    return Said(end, str(page.frames[index]["transcript"]["run"]), index, packet, frame)


def _utterances(spec: dict[str, Any]) -> list[bytes]:
    return [Path(path).read_bytes() for path in spec["utterances"]]


def _grpc(spec: dict[str, Any]) -> tuple[list[Any], list[aio.Channel], Any]:
    channels = [dedicated_channel(spec["address"]) for _ in range(max(1, spec["sessions"] // 25))]
    stubs = [dispatcher_pb2_grpc.DispatcherServiceStub(c) for c in channels]
    return stubs, channels, bearer(spec["token"])


async def _pages(spec: dict[str, Any], stubs: list[Any], metadata: Any, first: int) -> list[Page]:
    """A connected page per session, ``first`` the first of the place's sessions used."""
    pages = [Page(i) for i in range(spec["sessions"])]

    async def connect(page: Page) -> None:
        where = first + page.index
        await page.connect(
            stubs[page.index % len(stubs)],
            metadata,
            spec["conversations"][where],
            spec["assistants"][where],
        )

    await gather_limited([functools.partial(connect, page) for page in pages], limit=4)
    return pages


def _counted(errors: collections.Counter[str], exc: BaseException) -> None:
    if isinstance(exc, aio.AioRpcError):
        errors[f"{exc.code().name}: {exc.details()}"[:80]] += 1
    else:
        errors[type(exc).__name__ + ": " + str(exc)[:60]] += 1


async def client_latency(spec: dict[str, Any]) -> dict[str, Any]:
    """``sessions`` pages in closed loops: the utterance, the first answer packet,
    ``listen_ms`` of the answer, INTERRUPT, the run's end."""
    utterances = _utterances(spec)
    stubs, channels, metadata = _grpc(spec)
    errors: collections.Counter[str] = collections.Counter()
    turns: list[dict[str, Any]] = []
    pages = await _pages(spec, stubs, metadata, 0)
    begin = time.monotonic() + spec["warmup_s"]
    deadline = begin + spec["seconds"]

    async def loop(page: Page) -> None:
        rng = random.Random(page.index)  # noqa: S311 - staggered starts, reproducible
        await asyncio.sleep(rng.uniform(0, 2.0))  # staggered starts
        sequence = 0
        try:
            while time.monotonic() < deadline:
                sequence += 1
                said = await _turn(page, sequence, utterances[page.index])
                transcript_at = time.monotonic()
                first_packet = await within("answer's first packet", said.first_packet)
                first_frame = await within("answer's first frame", said.first_frame)
                # The answer as it is played, a while: the pace of a conversation.
                await asyncio.sleep(
                    max(0.0, first_packet + spec["listen_ms"] / 1000 - time.monotonic())
                )
                page.send({"control": {"action": "TALK_ACTION_INTERRUPT"}})
                await page.until("end of the interrupted run", _ended(said.run), said.index)
                turns.append(
                    {
                        "session": page.index,
                        "end_speech": said.end,
                        "transcript_at": transcript_at,
                        "first_packet": first_packet,
                        "first_frame": first_frame,
                        "measured": begin <= said.end < deadline,
                    }
                )
        except (RuntimeError, TimeoutError) as exc:
            _counted(errors, exc)

    cpu = CpuMeter(spec["server_pid"], spec["audio_pid"], spec["model_pid"])
    tasks = [asyncio.create_task(loop(page)) for page in pages]
    await asyncio.sleep(max(0.0, begin - time.monotonic()))
    cpu.start()
    dropped = udp_drops()
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    cpu.stop()
    dropped = udp_drops() - dropped
    await asyncio.gather(*tasks)
    figures = _media_figures(pages, begin, deadline)
    for page in pages:
        errors.update(page.errors)
        await page.close()
    for channel in channels:
        await channel.close(None)
    return {
        "turns": turns,
        "errors": dict(errors),
        "server_cores": cpu.cores(0),
        "audio_cores": cpu.cores(1),
        "model_cores": cpu.cores(2),
        "client_cores": round(cpu.client / max(cpu.wall, 1e-9), 2),
        "other_cores": round(cpu.others() / max(cpu.wall, 1e-9), 2),
        "udp_drops": dropped,
        **figures,
    }


def udp_drops() -> int:
    """UDP datagrams the machine's kernel dropped for a full receive buffer (all sockets:
    the server's and the clients' media and data channel packets among them)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    names, values = [line for line in lines if line[0] == "Udp:"][:2]
    return int(values[names.index("RcvbufErrors")])


def _media_figures(pages: Sequence[Page], begin: float, deadline: float) -> dict[str, Any]:
    sent = sum(1 for page in pages for at in page.microphone.sent if begin <= at < deadline)
    heard = sum(1 for page in pages for at in page.ear.voiced if begin <= at < deadline)
    return {
        "audio_in_s": round(sent * FRAME_MS / 1000, 1),
        "audio_out_s": round(heard * FRAME_MS / 1000, 1),
        "packets_in": sum(page.ear.packets for page in pages),
        "packets_lost": sum(page.ear.lost for page in pages),
        "stalls": sum(page.ear.stalls for page in pages),
    }


# -- CPU: the same loop over Talk and over WebRTC.


class VadVoice(Voice):
    """A Talk session over gRPC with the server's detector: a microphone's stream of 20 ms
    frames, the utterance when one is pushed, silence otherwise (``bench/voice.py``'s
    ``Voice`` reads)."""

    def __init__(self, stub: Any, metadata: Any, spec: dict[str, Any], index: int) -> None:
        super().__init__(stub, metadata, spec, index)
        self.pending = bytearray()
        self.sent: list[float] = []
        self.heard: list[tuple[float, int]] = []
        self.muted = False

    async def open_vad(self, conversation: str, assistant: str) -> None:
        await self.call.write(
            pb.TalkRequest(
                start=pb.TalkStart(
                    conversation=conversation,
                    assistant=assistant,
                    turn_detection=pb.TURN_DETECTION_SERVER_VAD,
                )
            )
        )
        first = await self.read()
        if first.WhichOneof("frame") != "session":
            raise RuntimeError(f"the session did not start: {first}")

    async def stream(self) -> None:
        """The microphone: a frame each 20 ms until ``muted`` (never cancelled mid-write:
        a write cancelled cancels the call)."""
        size = pcm.byte_count(FRAME_MS, RATE)
        began = time.monotonic()
        count = 0
        while not self.muted:
            data = bytes(self.pending[:size])
            del self.pending[:size]
            await self.call.write(
                pb.TalkRequest(audio=pb.AudioChunk(data=data + bytes(size - len(data))))
            )
            self.sent.append(time.monotonic())
            count += 1
            await asyncio.sleep(max(0.0, began + count * FRAME_MS / 1000 - time.monotonic()))

    async def answered(self) -> None:
        """Read to the end of the run of the turn being said, counting its speech."""
        run = ""
        while True:
            frame = await self.read()
            kind = frame.WhichOneof("frame")
            if kind == "transcript" and frame.transcript.final and not run:
                run = frame.transcript.run
            elif kind == "update" and run and frame.update.run == run:
                if frame.update.WhichOneof("update") == "speech":
                    self.heard.append((time.monotonic(), len(frame.update.speech.audio)))
                elif frame.update.WhichOneof("update") == "state_change" and (
                    pb.RunState.Name(frame.update.state_change.run.state) in _TERMINAL
                ):
                    return


@dataclass
class Loops:
    """The CPU phase's sessions running: their tasks, and how to end them."""

    tasks: list[asyncio.Task[None]]
    #: Closes the sessions; the seconds of audio in and out within the window.
    finish: Callable[[float, float], Awaitable[tuple[float, float]]]


async def _webrtc_loops(
    spec: dict[str, Any], utterances: list[bytes], turns: collections.Counter[str], **kw: Any
) -> Loops:
    pages = await _pages(spec, kw["stubs"], kw["metadata"], spec["first"])

    async def loop(page: Page) -> None:
        await asyncio.sleep(page.index * 0.5)  # staggered starts
        sequence = 0
        while time.monotonic() < kw["deadline"]:
            sequence += 1
            said = await _turn(page, sequence, utterances[page.index])
            await page.until("end of the run", _ended(said.run), said.index)
            turns["turns"] += 1

    async def finish(begin: float, deadline: float) -> tuple[float, float]:
        media = _media_figures(pages, begin, deadline)
        for page in pages:
            kw["errors"].update(page.errors)
            await page.close()
        return media["audio_in_s"], media["audio_out_s"]

    return Loops([_guarded(loop(page), kw["errors"]) for page in pages], finish)


async def _talk_loops(
    spec: dict[str, Any], utterances: list[bytes], turns: collections.Counter[str], **kw: Any
) -> Loops:
    voices = []
    for index in range(spec["sessions"]):
        voice = VadVoice(kw["stubs"][index % len(kw["stubs"])], kw["metadata"], spec, index)
        where = spec["first"] + index
        await voice.open_vad(spec["conversations"][where], spec["assistants"][where])
        voices.append(voice)

    async def loop(voice: VadVoice) -> None:
        microphone = asyncio.create_task(voice.stream())
        try:
            await asyncio.sleep(voice.index * 0.5)  # staggered starts
            while time.monotonic() < kw["deadline"]:
                voice.pending += utterances[voice.index]
                await within("end of the run", voice.answered())
                turns["turns"] += 1
        finally:
            voice.muted = True
            with contextlib.suppress(aio.AioRpcError, asyncio.InvalidStateError):
                await microphone

    async def finish(begin: float, deadline: float) -> tuple[float, float]:
        sent = sum(1 for v in voices for at in v.sent if begin <= at < deadline)
        heard = sum(n for v in voices for at, n in v.heard if begin <= at < deadline)
        for voice in voices:
            with contextlib.suppress(asyncio.InvalidStateError):
                await voice.close()
        return sent * FRAME_MS / 1000, heard / (pcm.SAMPLE_BYTES * OUTPUT_RATE)

    return Loops([_guarded(loop(voice), kw["errors"]) for voice in voices], finish)


def _guarded(
    work: Coroutine[Any, Any, None], errors: collections.Counter[str]
) -> asyncio.Task[None]:
    async def guarded() -> None:
        try:
            await work
        except (RuntimeError, TimeoutError, aio.AioRpcError, asyncio.InvalidStateError) as exc:
            _counted(errors, exc)

    return asyncio.create_task(guarded())


async def client_cpu(spec: dict[str, Any]) -> dict[str, Any]:
    """``sessions`` closed loops over ``spec['transport']``: an utterance, the whole
    answer, the next; the server's CPU over the measured window."""
    stubs, channels, metadata = _grpc(spec)
    errors: collections.Counter[str] = collections.Counter()
    turns: collections.Counter[str] = collections.Counter()
    begin = time.monotonic() + spec["warmup_s"]
    deadline = begin + spec["seconds"]
    start = _webrtc_loops if spec["transport"] == "webrtc" else _talk_loops
    loops = await start(
        spec,
        _utterances(spec),
        turns,
        stubs=stubs,
        metadata=metadata,
        deadline=deadline,
        errors=errors,
    )
    await asyncio.sleep(max(0.0, begin - time.monotonic()))
    started = (time.monotonic(), process_cpu_s(spec["server_pid"]), time.process_time())
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    stopped = (time.monotonic(), process_cpu_s(spec["server_pid"]), time.process_time())
    await asyncio.gather(*loops.tasks)
    wall, server, client = (b - a for a, b in zip(started, stopped, strict=True))
    audio_in, audio_out = await loops.finish(begin, deadline)
    for channel in channels:
        await channel.close(None)
    seconds = max(audio_in + audio_out, 1e-9)
    return {
        "transport": spec["transport"],
        "sessions": spec["sessions"],
        "wall_s": round(wall, 1),
        "turns": turns["turns"],
        "audio_in_s": round(audio_in, 1),
        "audio_out_s": round(audio_out, 1),
        "server_cores": round(server / wall, 3),
        "client_cores": round(client / wall, 2),
        "server_ms_per_audio_s": round(server * 1000 / seconds, 1),
        "server_ms_per_session_s": round(server * 1000 / (wall * spec["sessions"]), 1),
        "errors": dict(errors),
    }


async def client_idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Connected pages that say nothing, ``spec['steps']`` of them in turn (each step adds
    pages to those connected): their microphones send silence, as a browser's does, and
    the server's CPU is measured over ``seconds`` at each step."""
    stubs, channels, metadata = _grpc({**spec, "sessions": max(spec["steps"])})
    pages: list[Page] = []
    rows = []
    for count in spec["steps"]:
        more = await _pages({**spec, "sessions": count - len(pages)}, stubs, metadata, len(pages))
        for page in more:
            page.index += len(pages)
        pages += more
        await asyncio.sleep(spec["warmup_s"])
        started = (time.monotonic(), process_cpu_s(spec["server_pid"]), time.process_time())
        await asyncio.sleep(spec["seconds"])
        stopped = (time.monotonic(), process_cpu_s(spec["server_pid"]), time.process_time())
        wall, server, client = (b - a for a, b in zip(started, stopped, strict=True))
        errors = sum(sum(page.errors.values()) for page in pages)
        rows.append(
            {
                "peers": len(pages),
                "wall_s": round(wall, 1),
                "server_cores": round(server / wall, 3),
                "client_cores": round(client / wall, 2),
                "errors": errors,
            }
        )
    for page in pages:
        await page.close()
    for channel in channels:
        await channel.close(None)
    return {"rows": rows}


async def idle_phase(directory: Path, steps: Sequence[int], seconds: float) -> dict[str, Any]:
    """What a connected, quiet peer costs the server: ``--idle N,N,...``."""
    async with (
        child("audio", json.dumps("tone")) as (_, audio_port),
        child("model", json.dumps(MODEL_INTERVAL_MS)) as (_, model_port),
    ):
        url = f"sqlite+aiosqlite:///{directory / 'webrtc-idle.db'}"
        with serve(directory, url, _servers(model_port, audio_port)) as server:
            place = await _place(server.address, max(steps), "idle")
            say(f"idle: {', '.join(map(str, steps))} quiet peers, {seconds:g} s each")
            seen = await asyncio.to_thread(
                run_client,
                __file__,
                {
                    "mode": "idle",
                    "address": server.address,
                    "token": place.account.token,
                    "conversations": place.conversations,
                    "assistants": place.assistants,
                    "steps": list(steps),
                    "warmup_s": 5.0,
                    "seconds": seconds,
                    "server_pid": server.pid,
                },
            )
    rows = seen["rows"]
    base = rows[0]
    for row in rows[1:]:
        added = row["peers"] - base["peers"]
        row["server_ms_per_peer_s"] = round(
            (row["server_cores"] - base["server_cores"]) * 1000 / added, 1
        )
    return {"rows": rows}


# ---------------------------------------------------------------------------------
# The driver.


@dataclass(frozen=True)
class Speech:
    paths: list[str]
    heard: list[Heard16]
    seconds: list[float]


def _speech(directory: Path, count: int) -> Speech:
    paths, heard, seconds = [], [], []
    for index in range(count):
        utterance = _spoken(SAID, BASE_WPM + WPM_STEP * index)
        path = directory / f"utterance-{index}.pcm"
        path.write_bytes(utterance)
        paths.append(str(path))
        heard.append(simulate(utterance))
        seconds.append(len(utterance) / (2 * RATE))
    return Speech(paths, heard, seconds)


def _servers(model_port: int, audio_port: int) -> dict[str, str]:
    return {
        **SETTINGS,
        "SWITCHBOARD_LLM_BASE_URL": f"http://127.0.0.1:{model_port}/v1",
        "SWITCHBOARD_VOICE_URL": f"http://127.0.0.1:{audio_port}/v1",
    }


async def latency_phase(
    plan: Plan, directory: Path, sessions: int, speech: Speech
) -> dict[str, Any]:
    async with (
        child("audio", json.dumps("tone")) as (audio, audio_port),
        child("model", json.dumps(MODEL_INTERVAL_MS)) as (model, model_port),
    ):
        url = f"sqlite+aiosqlite:///{directory / f'webrtc-latency-{time.monotonic_ns()}.db'}"
        with serve(directory, url, _servers(model_port, audio_port)) as server:
            place = await _place(server.address, sessions, "loop")
            waited = await wait_quiet(plan.quiet_wait_s)
            say(f"loop: {sessions} WebRTC sessions, {plan.seconds:g} s")
            seen = await asyncio.to_thread(
                run_client,
                __file__,
                {
                    "mode": "latency",
                    "address": server.address,
                    "token": place.account.token,
                    "conversations": place.conversations,
                    "assistants": place.assistants,
                    "sessions": sessions,
                    "utterances": speech.paths[:sessions],
                    "warmup_s": plan.warmup_s,
                    "seconds": plan.seconds,
                    "listen_ms": plan.listen_ms,
                    "server_pid": server.pid,
                    "audio_pid": audio.pid,
                    "model_pid": model.pid,
                },
            )
        timings = (await audio.ask({"timings": True}, 120))["timings"]
        requests = (await model.ask({"requests": True}, 120))["requests"]
    turns = seen.pop("turns")
    figures = {
        "sessions": sessions,
        **attribute(turns, timings, requests, speech),
        **seen,
        "quiet_wait_s": waited,
    }
    say(f"  {figures}")
    return figures


async def cpu_phase(plan: Plan, directory: Path, speech: Speech) -> list[dict[str, Any]]:
    """Talk, then WebRTC, on one server: the same sessions' loop and audio."""
    count = plan.cpu_sessions
    async with (
        child("audio", json.dumps("tone")) as (_, audio_port),
        child("model", json.dumps(MODEL_INTERVAL_MS)) as (_, model_port),
    ):
        url = f"sqlite+aiosqlite:///{directory / 'webrtc-cpu.db'}"
        with serve(directory, url, _servers(model_port, audio_port)) as server:
            place = await _place(server.address, 2 * count, "cpu")
            rows = []
            for first, transport in ((0, "talk"), (count, "webrtc")):
                waited = await wait_quiet(plan.quiet_wait_s)
                say(f"cpu: {count} sessions over {transport}, {plan.cpu_seconds:g} s")
                row = await asyncio.to_thread(
                    run_client,
                    __file__,
                    {
                        "mode": "cpu",
                        "transport": transport,
                        "first": first,
                        "address": server.address,
                        "token": place.account.token,
                        "conversations": place.conversations,
                        "assistants": place.assistants,
                        "sessions": count,
                        "utterances": speech.paths[:count],
                        "warmup_s": plan.cpu_warmup_s,
                        "seconds": plan.cpu_seconds,
                        "server_pid": server.pid,
                    },
                )
                row["quiet_wait_s"] = waited
                say(f"  {row}")
                rows.append(row)
    return rows


def attribute(
    turns: Sequence[dict[str, Any]],
    timings: Sequence[Sequence[Any]],
    requests: Sequence[Sequence[Any]],
    speech: Speech,
) -> dict[str, Any]:
    """Each measured turn's detector wait and endpoints' share: its session's model and
    speech requests, and the transcription between its end of speech (plus the detector's
    wait) and its model request, of its size (nearest, if several)."""
    transcriptions: list[Sequence[Any]] = []
    by_text: dict[int, list[Sequence[Any]]] = collections.defaultdict(list)
    for timing in timings:
        path, _arrived, _first, _last, detail = timing
        if path.endswith("/transcriptions"):
            transcriptions.append(timing)
        elif detail.startswith("Session "):
            by_text[int(detail.split()[1])].append(timing)
    by_session: dict[int, list[Sequence[Any]]] = collections.defaultdict(list)
    for request in requests:
        by_session[int(request[0])].append(request)

    def within(items: list[Sequence[Any]], start: float, end: float) -> Any:
        return next((item for item in items if start <= item[1] <= end), None)

    samples: dict[str, list[float]] = collections.defaultdict(list)
    gaps: dict[str, list[float]] = collections.defaultdict(list)
    unattributed = 0
    size_off = 0
    for turn in turns:
        if not turn["measured"]:
            continue
        index, start, end = turn["session"], turn["end_speech"], turn["first_packet"]
        wait = speech.heard[index].wait_frames * FRAME_MS / 1000
        asked = within(by_session[index], start, end)
        spoke = within(by_text[index], start, end)
        if asked is None or spoke is None or asked[2] is None:
            unattributed += 1
            continue
        expected = speech.heard[index].turn_bytes + 44
        candidates = [
            t
            for t in transcriptions
            if start + wait - 0.05 <= t[1] and t[3] is not None and t[3] <= asked[1]
        ]
        if not candidates:
            unattributed += 1
            continue
        heard = min(candidates, key=lambda t: abs(int(t[4]) - expected))
        if abs(int(heard[4]) - expected) > pcm.byte_count(2 * FRAME_MS, RATE):
            size_off += 1
        parts = (heard[3] - heard[1], asked[2] - asked[1], spoke[2] - spoke[1])
        total = end - start
        samples["total"].append(total)
        samples["wait"].append(wait)
        samples["transcription"].append(parts[0])
        samples["model"].append(parts[1])
        samples["speech"].append(parts[2])
        samples["own"].append(total - wait - sum(parts))
        samples["client_buffer"].append(turn["first_frame"] - end)
        # The own share, hop by hop: the four gaps between the endpoints add up to it.
        gaps["end of speech to transcription, less the detector's wait"].append(
            heard[1] - start - wait
        )
        gaps["transcript to model"].append(asked[1] - heard[3])
        gaps["sentence to speech"].append(spoke[1] - asked[2])
        gaps["speech's first byte to the packet at the client"].append(end - spoke[2])
    return {
        "turns": len(samples["own"]),
        "unattributed": unattributed,
        "size_off": size_off,
        "own_p50_ms": _ms(samples["own"], 0.5),
        "own_p99_ms": _ms(samples["own"], 0.99),
        "own_max_ms": _ms(samples["own"], 1.0),
        "total_p50_ms": _ms(samples["total"], 0.5),
        "total_p99_ms": _ms(samples["total"], 0.99),
        "wait_p50_ms": _ms(samples["wait"], 0.5),
        "transcription_p50_ms": _ms(samples["transcription"], 0.5),
        "model_p50_ms": _ms(samples["model"], 0.5),
        "speech_p50_ms": _ms(samples["speech"], 0.5),
        "client_buffer_p50_ms": _ms(samples["client_buffer"], 0.5),
        "gaps": {name: [_ms(v, 0.5), _ms(v, 0.99)] for name, v in gaps.items()},
    }


async def drive(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    if args.idle:
        steps = [0, *(int(n) for n in args.idle.split(","))]
        async with session({}, "switchboard-webrtc-idle-") as directory:
            idle = await idle_phase(directory, steps, 10.0 if args.quick else 30.0)
        print(json.dumps(idle))
        return 0
    if args.sessions:
        plan = dataclasses.replace(plan, rows=tuple(int(n) for n in args.sessions.split(",")))
    results: dict[str, Any] = {"plan": dataclasses.asdict(plan)}
    async with session(results, "switchboard-webrtc-bench-") as directory:
        most = max(*plan.rows, plan.cpu_sessions)
        speech = await asyncio.to_thread(_speech, directory, most)
        results["speech"] = {
            "seconds": [round(s, 2) for s in speech.seconds],
            "wait_frames": [h.wait_frames for h in speech.heard],
        }
        say(f"utterances: {results['speech']}")
        results["loop"] = [await latency_phase(plan, directory, n, speech) for n in plan.rows]
        results["cpu"] = await cpu_phase(plan, directory, speech)
    text = render(results, command_line("bench/webrtc.py"), plan)
    report(results, text, args)
    return 0


# ---------------------------------------------------------------------------------
# The report.


def _loop_line(row: dict[str, Any]) -> str:
    return (
        f"| {row['sessions']} | {row['turns']} ({row['unattributed']}, {row['size_off']}) | "
        f"{row['own_p50_ms']} / {row['own_p99_ms']} / {row['own_max_ms']} | "
        f"{row['total_p50_ms']} / {row['total_p99_ms']} | {row['wait_p50_ms']} | "
        f"{row['transcription_p50_ms']}, {row['model_p50_ms']}, {row['speech_p50_ms']} | "
        f"{row['client_buffer_p50_ms']} | {row['server_cores']} | {row['client_cores']} | "
        f"{row['other_cores']} | {row['audio_in_s']} / {row['audio_out_s']} | "
        f"{row['packets_lost']} of {row['packets_in']}, {row['stalls']}, {row['udp_drops']} | "
        f"{_errors(row['errors'])} |"
    )


def _hops_line(row: dict[str, Any]) -> str:
    hops = "; ".join(f"{name} {p50} / {p99}" for name, (p50, p99) in row["gaps"].items())
    many = "s" if row["sessions"] != 1 else ""
    return f"- {row['sessions']} session{many}: {hops}"


def _cpu_line(row: dict[str, Any]) -> str:
    return (
        f"| {row['transport']} | {row['sessions']} | {row['turns']} | {row['audio_in_s']} / "
        f"{row['audio_out_s']} | {row['server_ms_per_audio_s']} | "
        f"{row['server_ms_per_session_s']} | {row['server_cores']} | {row['client_cores']} | "
        f"{_errors(row['errors'])} |"
    )


def goals(rows: Sequence[dict[str, Any]], cpu: Sequence[dict[str, Any]]) -> list[str]:
    row = max(rows, key=lambda r: int(r["sessions"]))
    clean = not row["errors"] and not row["unattributed"]
    met = clean and row["own_p99_ms"] <= OWN_P99_BUDGET_MS
    by = {r["transport"]: r for r in cpu}
    talk, webrtc = by["talk"], by["webrtc"]
    ratio = webrtc["server_ms_per_audio_s"] / max(talk["server_ms_per_audio_s"], 1e-9)
    return [
        f"- Switchboard's own share of a turn over WebRTC p99 at most {OWN_P99_BUDGET_MS:g} ms "
        f"with {row['sessions']} sessions: {verdict(met)} ({row['own_p99_ms']} ms; p50 "
        f"{row['own_p50_ms']} ms).",
        f"- CPU per second of audio beside Talk's: WebRTC {webrtc['server_ms_per_audio_s']} ms, "
        f"Talk over gRPC {talk['server_ms_per_audio_s']} ms in the same run "
        f"({ratio:.2f}x; issue 52's {TALK_ISSUE_52_MS:g} ms for Talk counted the turns' audio "
        "alone, with the real engines, so it is not this table's figure).",
    ]


def render(results: dict[str, Any], command: str, plan: Plan) -> str:
    rows, cpu = results["loop"], results["cpu"]
    spoken = results["speech"]
    return "\n".join(
        [
            SECTION,
            "",
            *provenance(command, took_s=results.get("seconds")),
            host_speed_line(results["host"]),
            f"- the server: a fresh `switchboard serve --dev` per phase (embedded SQLite), "
            f"{settings_text(SETTINGS)}, `SWITCHBOARD_VOICE_URL` at the local audio server "
            "(`--engine tone`) and `SWITCHBOARD_LLM_BASE_URL` at the local model server, each "
            f"in its own process; the model writes a word every {MODEL_INTERVAL_MS} ms",
            "- the clients: `aiortc` peers in one client process (the server's stack), each a "
            "page as the service tests drive it: `ConnectTalk` with its offer and a "
            "`TalkStart` (`TURN_DETECTION_SERVER_VAD`, the default 700 ms silence), a "
            "`media.SpeechTrack` microphone (a 20 ms frame every 20 ms), the `talk` data "
            "channel, the answer on the inbound track",
            f'- the loop: N sessions, each its own assistant and conversation, saying "{SAID}" '
            f"(eSpeak NG, session i at {BASE_WPM} + {WPM_STEP}i words a minute: "
            f"{min(spoken['seconds'])} to {max(spoken['seconds'])} s, trimmed to the voice), "
            f"silence after it, the answer's first packet, {plan.listen_ms} ms of the answer "
            "(as it is played), INTERRUPT on the data channel, the run's end, the track "
            f"silent again, the next turn; {plan.warmup_s:g} s warm-up, {plan.seconds:g} s "
            "measured (turns whose speech ended in it)",
            "- why the server's detector and not END_TURN: a browser's turns end by it, and "
            "an END_TURN on the data channel (SCTP) races the last audio frames (RTP, held "
            "80 ms in the server's jitter buffer), so it would not mark the end of what the "
            "server heard",
            "- the total: from the moment the client's microphone handed its sender the "
            "frame with the utterance's last voiced sample to the arrival at the client of "
            "the answer's first packet with sound in it (an Opus packet longer than digital "
            "silence's 3 bytes; before the client's jitter buffer)",
            "- subtracted: the detector's wait, exactly: the frames after the last voiced "
            "one that the server must receive before Talk's detector ends the turn, found "
            "by feeding each utterance offline through the server's path (48 kHz, Opus both "
            "ways, `media.Inbound`, `turns.Detector`, `TurnAudio`): "
            f"{min(spoken['wait_frames'])} to {max(spoken['wait_frames'])} frames of 20 ms "
            "by utterance, not the nominal 700 ms; and the endpoints' time from their own "
            "records (same monotonic clock): the transcription request to its last byte, the "
            "model request to the chunk that ends the first sentence, the speech request to "
            "its first audio byte",
            "",
            "| sessions | turns (unattributed, turn size off) | own share p50 / p99 / max "
            "ms | total p50 / p99 ms | detector's wait p50 ms | endpoints p50 ms "
            "(transcription, model, speech) | + client jitter buffer p50 ms | server cores "
            "| client cores | other cores | audio in / out s | answer packets lost of received, "
            "gaps > 60 ms; UDP datagrams dropped (machine) | errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *(_loop_line(row) for row in rows),
            "",
            "The own share hop by hop, p50 / p99 ms (the four add up to it): the end of "
            "speech to the transcription request, less the detector's wait (the media path "
            "in: loopback, the server's jitter buffer, Opus decoding, resampling, the queue "
            "into the session, the detector; aiortc's audio jitter buffer hands a packet on "
            "once 4 more have come, 80 ms of it, as the client's column shows on its side); "
            "the transcript to the model request (the turn and its recording stored, the run "
            "started); the first sentence's end to the "
            "speech request; the speech's first byte to its packet at the client (the "
            "speech update, the track's 20 ms clock, Opus encoding, loopback):",
            "",
            *(_hops_line(row) for row in rows),
            "",
            *goals(rows, cpu),
            "",
            f"CPU per second of audio, Talk beside WebRTC: one server, {plan.cpu_sessions} "
            "sessions over Talk (gRPC, `TURN_DETECTION_SERVER_VAD`, the same utterances "
            "streamed in 20 ms frames at a microphone's pace, silence between them), then "
            f"{plan.cpu_sessions} over WebRTC; each session's loop: its utterance, the whole "
            "answer heard (two sentences, the tone engine), the next; "
            f"{plan.cpu_warmup_s:g} s warm-up, {plan.cpu_seconds:g} s measured each. Audio in "
            "is the microphone's stream, silence included (the server hears all of it); out "
            "is the answer's speech. The server's CPU from /proc.",
            "",
            "| transport | sessions | turns | audio in / out s | server CPU ms per s of audio "
            "| server CPU ms per session-second | server cores | client cores | errors |",
            "|---|---|---|---|---|---|---|---|---|",
            *(_cpu_line(row) for row in cpu),
        ]
    )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sessions", default="", help="the loop phase's rows: sessions at once, N,N,..."
    )
    parser.add_argument(
        "--idle",
        default="",
        help="only what quiet, connected peers cost the server: N,N,... peers in turn "
        "(after none), 30 s each (10 with --quick); prints JSON",
    )


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="fewer sessions and seconds",
        options=options,
        roles={
            "client": client_roles(
                {"latency": client_latency, "cpu": client_cpu, "idle": client_idle}
            )
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
