"""Voice benchmarks: Switchboard's own share of the voice loop, barge-in, and CPU per second
of audio.

    python bench/voice.py            the full run (about 4 minutes); prints the report
    python bench/voice.py --quick    fewer sessions and seconds, to try it out (< 2 min)
    python bench/voice.py --write    ... and put the report into BENCHMARKS.md
    python bench/voice.py --json     one JSON line, figures and report (bench/run.py)

**The loop, with fast engines.** A fresh ``switchboard serve --dev`` process (embedded
SQLite; ``SERVER_SETTINGS``) with ``SWITCHBOARD_VOICE_URL`` at the local audio server in
its own process with its fast engine (``tests/fakes/audio_server.py --engine tone``: a
transcription answers a fixed sentence at once, speech is a tone as long as the text,
made as fast as it can be) and the local model server in its own process
(``tests/fakes/openai_server.py``, ``MODEL_INTERVAL_MS`` between words, as a hosted model
streams). Each of ``sessions`` Talk sessions has its own assistant (``handlers/llm``,
instructions naming the session, which the model answers with ``Session N is listening
now.`` and more sentences) and conversation, and runs turns in a closed loop: START_TURN,
a turn of PCM16 at 16 kHz sent in 20 ms frames at the pace of speech (each session's a
different length, so the audio server's records tell whose a transcription was),
END_TURN (``TURN_DETECTION_CLIENT``), read until the first ``speech`` update of the
turn's run, listen to the answer a while (``listen_ms``, as it is played: the pace of a
conversation), INTERRUPT, read until the run ends.

- **The total**: from just before END_TURN is written to the first ``speech`` update read.
- **The endpoints' share** on that path, from the fakes' own records on the same
  monotonic clock (``time.monotonic()``, one clock for every process on the machine):
  the transcription request (arrival to its answer's last byte), the model (the request's
  arrival to the chunk that ended the first sentence), the speech request (arrival to its
  first audio byte).
- **Switchboard's own share** = the total minus the endpoints' share: storing the turn
  and its recording, starting the run, the run's pipeline, cutting the sentence, relaying
  the audio, and both gRPC hops.
- **Barge-in**: from just before INTERRUPT is written to the last ``speech`` update of
  that run read after it (0 when none came after it); also when SPEECH_INTERRUPTED came.

**CPU per second of audio, with the real engines.** A second, small phase: a fresh server
with the audio server's real engines (PocketSphinx, eSpeak NG), ``cpu_sessions`` sessions
each saying a sentence eSpeak spoke (in real time) and hearing the whole answer spoken
back. Switchboard's CPU and the audio server's (with its eSpeak subprocesses) over the
measured time, per second of audio streamed in and out in that time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import os
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench import pyspy
from bench.fixtures import Account, create_conversations, create_workspace, register
from bench.harness import (
    Child,
    CpuMeter,
    answer,
    bearer,
    clients,
    command_line,
    dedicated_channel,
    gather_limited,
    host_speed_line,
    percentile,
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
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.platform.audio import pcm
from tests.fakes.audio_server import FakeAudio
from tests.fakes.openai_server import FakeOpenAI, Reply

SECTION: Final = "## Voice"
MODEL: Final = "bench-model"
#: The model's pace: a word every this many ms (about 50 tokens a second).
MODEL_INTERVAL_MS: Final = 20
RATE: Final = 16_000
FRAME_MS: Final = 20
#: Conversations per workspace.
PER_WORKSPACE: Final = 10
SERVER_SETTINGS: Final[dict[str, str]] = {
    "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
    "SWITCHBOARD_LLM_MODEL": MODEL,
    "SWITCHBOARD_LLM_MAX_RETRIES": "0",
    "SWITCHBOARD_LLM_MAX_CONNECTIONS": "1000",
    "SWITCHBOARD_DISPATCHER_MAX_RUNNING": "1000",
    "SWITCHBOARD_DISPATCHER_MAX_RUNNING_PER_WORKSPACE": "1000",
    "SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "10000000",
    "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_USER": "10000000",
    "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_WORKSPACE": "10000000",
    "SWITCHBOARD_VOICE_MAX_SESSIONS": "1000",
    "SWITCHBOARD_VOICE_MAX_SESSIONS_PER_USER": "1000",
}
#: The issue's goals.
OWN_P99_BUDGET_MS: Final = 30.0
BARGE_P99_BUDGET_MS: Final = 50.0
#: The answer after its first sentence: long, so it is still being spoken when interrupted.
REST: Final = " ".join(
    [
        "The weather is fine today and the sky is clear over the hills.",
        "A light wind comes from the west and the evening will be warm.",
        "Tomorrow brings a little rain in the morning and sun after noon.",
        "The week ends dry, with the warmest day on Saturday afternoon.",
    ]
    * 3
)
#: What a session says in the real-engine phase (eSpeak NG speaks it, PocketSphinx hears it).
SAID: Final = "one two three four five"
CPU_ANSWER: Final = "Yes, I heard you count.\nIt is a fine day and the sky is clear."


@dataclass(frozen=True)
class Plan:
    #: Sessions at once, a row each (the issue's goals are the 50-session row's); the
    #: single session shows the path without contention.
    rows: tuple[int, ...]
    warmup_s: float
    seconds: float
    #: The shortest turn; session i's is ``turn_ms + 20 * i``.
    turn_ms: int
    #: How long a session listens to the answer before it interrupts (a conversation's
    #: pace: the user speaks, hears some of the answer, speaks again).
    listen_ms: int
    cpu_sessions: int
    cpu_warmup_s: float
    cpu_seconds: float
    quiet_wait_s: float


FULL: Final = Plan(
    rows=(1, 50),
    warmup_s=5.0,
    seconds=30.0,
    turn_ms=1000,
    listen_ms=3000,
    cpu_sessions=3,
    cpu_warmup_s=4.0,
    cpu_seconds=40.0,
    quiet_wait_s=20.0,
)
QUICK: Final = Plan(
    rows=(1, 10),
    warmup_s=3.0,
    seconds=10.0,
    turn_ms=600,
    listen_ms=1000,
    cpu_sessions=2,
    cpu_warmup_s=3.0,
    cpu_seconds=12.0,
    quiet_wait_s=5.0,
)


def turn_bytes(turn_ms: int, index: int) -> int:
    """Session ``index``'s turn, in bytes of PCM16 at 16 kHz (each session's differs)."""
    return pcm.byte_count(turn_ms + 20 * index, RATE)


def wav_bytes(turn_ms: int, index: int) -> int:
    """The size of the WAV Switchboard sends for transcription (the turn, 44-byte header)."""
    return turn_bytes(turn_ms, index) + 44


# ---------------------------------------------------------------------------------
# The fakes, each in its own process: they serve, and answer their records on request.


async def _commands() -> AsyncIterator[str]:
    """The driver's commands, one a line on stdin, until it closes stdin."""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        yield line


async def audio_main(engine: str) -> None:
    """The audio server with ``engine`` on a free port; each command answers its timings."""
    fake = FakeAudio(engine="tone" if engine == "tone" else "real")
    await fake.start()
    print(fake.port, flush=True)
    async for _ in _commands():
        answer(
            {
                "timings": [
                    [t.path, t.arrived, t.first_byte, t.last_byte, t.detail] for t in fake.timings
                ]
            }
        )
    await fake.close()


_SESSION: Final = re.compile(r"bench (cpu )?session (\d+)")


def _system(body: dict[str, Any]) -> str:
    for message in body.get("messages", ()):
        if message.get("role") == "system" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


def bench_reply(interval_s: float, body: dict[str, Any]) -> Reply:
    """The model's answer to a session (its instructions name it): a first sentence that
    names the session, then more, a word at a time, ``interval_s`` apart."""
    found = _SESSION.search(_system(body))
    if found is not None and found.group(1):
        content = CPU_ANSWER
    else:
        who = found.group(2) if found is not None else "?"
        content = f"Session {who} is listening now.\n{REST}"
    return dataclasses.replace(Reply.text(content), interval_s=interval_s)


async def model_main(interval_ms: int) -> None:
    """The model on a free port; each command answers, per request, its session, arrival
    and when the chunk that ended its first sentence went out."""
    fake = FakeOpenAI(default=functools.partial(bench_reply, interval_ms / 1000))
    await fake.start()
    print(fake.port, flush=True)
    async for _ in _commands():
        records = []
        for request in fake.requests:
            found = _SESSION.search(_system(request.body or {}))
            text = ""
            ended = None
            for at, piece in list(request.sent):
                text += piece
                if "\n" in text:
                    ended = at
                    break
            records.append(
                [int(found.group(2)) if found else -1, request.arrived, ended, bool(found)]
            )
        answer({"requests": records})
    await fake.close()


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and of its children it waited for (the audio
    server's eSpeak NG subprocesses)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------
# The client process.


def _frames(data: bytes) -> Iterator[bytes]:
    size = pcm.byte_count(FRAME_MS, RATE)
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _control(action: int) -> pb.TalkRequest:
    return pb.TalkRequest(control=pb.TalkControl(action=action))  # type: ignore[arg-type]


def _speech_of(frame: pb.TalkResponse, run: str) -> int:
    """Bytes of speech in ``frame`` if it is a speech update of ``run`` (else -1)."""
    if frame.WhichOneof("frame") != "update" or frame.update.run != run:
        return -1
    if frame.update.WhichOneof("update") != "speech":
        return -1
    return len(frame.update.speech.audio)


def _ended(frame: pb.TalkResponse, run: str) -> bool:
    return (
        frame.WhichOneof("frame") == "update"
        and frame.update.run == run
        and frame.update.WhichOneof("update") == "state_change"
        and frame.update.state_change.run.state
        in (
            pb.RUN_STATE_SUCCEEDED,
            pb.RUN_STATE_FAILED,
            pb.RUN_STATE_CANCELLED,
            pb.RUN_STATE_DEADLINE_EXCEEDED,
        )
    )


class Voice:
    """One Talk session, written and read in turn by one task."""

    def __init__(self, stub: Any, metadata: Any, spec: dict[str, Any], index: int) -> None:
        self.index = index
        self.call = stub.Talk(metadata=metadata, timeout=spec["seconds"] + 600)
        self.turn = 0
        self.read_timeout_s = 60.0

    async def open(self, conversation: str, assistant: str) -> None:
        await self.call.write(
            pb.TalkRequest(
                start=pb.TalkStart(
                    conversation=conversation,
                    assistant=assistant,
                    turn_detection=pb.TURN_DETECTION_CLIENT,
                )
            )
        )
        first = await self.read()
        if first.WhichOneof("frame") != "session":
            raise RuntimeError(f"the session did not start: {first}")

    async def read(self) -> pb.TalkResponse:
        """The next frame but heartbeats; an error frame raises."""
        while True:
            async with asyncio.timeout(self.read_timeout_s):
                frame = await self.call.read()
            if frame is aio.EOF:  # type: ignore[attr-defined]
                raise RuntimeError("the session ended")
            assert isinstance(frame, pb.TalkResponse)
            kind = frame.WhichOneof("frame")
            if kind == "heartbeat":
                continue
            if kind == "error":
                raise RuntimeError(f"error frame: {frame.error.message}")
            return frame

    async def say(self, audio: bytes, sent: list[tuple[float, int]]) -> float:
        """A turn: START_TURN, ``audio`` at the pace of speech, END_TURN; when END_TURN
        was about to be written."""
        self.turn += 1
        await self.call.write(_control(pb.TALK_ACTION_START_TURN))
        began = time.monotonic()
        for count, frame in enumerate(_frames(audio)):
            await self.call.write(pb.TalkRequest(audio=pb.AudioChunk(data=frame)))
            sent.append((time.monotonic(), len(frame)))
            # The pace of a microphone: frame n leaves n frames after the first.
            await asyncio.sleep(max(0.0, began + (count + 1) * FRAME_MS / 1000 - time.monotonic()))
        at = time.monotonic()
        await self.call.write(_control(pb.TALK_ACTION_END_TURN))
        return at

    async def run_of_turn(self) -> str:
        """The run of the turn just ended, from its final transcript."""
        while True:
            frame = await self.read()
            if (
                frame.WhichOneof("frame") == "transcript"
                and frame.transcript.final
                and frame.transcript.turn == self.turn
            ):
                return frame.transcript.run
            if (
                frame.WhichOneof("frame") == "event"
                and frame.event.kind == pb.TALK_EVENT_KIND_TURN_EMPTY
            ):
                raise RuntimeError("an empty turn")

    async def first_speech(self, run: str) -> int:
        """Read to the first speech update of ``run``; its size."""
        while (size := _speech_of(frame := await self.read(), run)) < 0:
            if _ended(frame, run):
                raise RuntimeError("the run ended without speech")
        return size

    async def interrupted_turn(
        self,
        audio: bytes,
        listen_s: float,
        sent: list[tuple[float, int]],
        heard: list[tuple[float, int]],
    ) -> dict[str, Any]:
        """Say ``audio``, wait for the answer's first speech, listen ``listen_s``,
        interrupt it, read to the run's end: when each happened."""
        end_turn = await self.say(audio, sent)
        run = await self.run_of_turn()
        size = await self.first_speech(run)
        first_speech = time.monotonic()
        heard.append((first_speech, size))
        # Speech comes at the pace of playback: read it until the listening is over.
        while time.monotonic() < first_speech + listen_s:
            frame = await self.read()
            if _ended(frame, run):
                raise RuntimeError("the answer ended before the interrupt")
            if (size := _speech_of(frame, run)) >= 0:
                heard.append((time.monotonic(), size))
        interrupt = time.monotonic()
        await self.call.write(_control(pb.TALK_ACTION_INTERRUPT))
        last_speech = None
        acknowledged = None
        after = 0
        while True:
            frame = await self.read()
            at = time.monotonic()
            size = _speech_of(frame, run)
            if size >= 0:
                heard.append((at, size))
                last_speech = at
                after += 1
            elif (
                frame.WhichOneof("frame") == "event"
                and frame.event.kind == pb.TALK_EVENT_KIND_SPEECH_INTERRUPTED
            ):
                acknowledged = at
            elif _ended(frame, run):
                return {
                    "session": self.index,
                    "end_turn": end_turn,
                    "first_speech": first_speech,
                    "interrupt": interrupt,
                    "last_speech": last_speech,
                    "acknowledged": acknowledged,
                    "speech_after": after,
                    "state": pb.RunState.Name(frame.update.state_change.run.state),
                }

    async def close(self) -> None:
        with contextlib.suppress(aio.AioRpcError, RuntimeError, TimeoutError):
            await self.call.write(_control(pb.TALK_ACTION_END_SESSION))
            await self.call.done_writing()
        self.call.cancel()


def _sessions(
    spec: dict[str, Any],
) -> tuple[list[Any], list[aio.Channel], Any]:
    metadata = bearer(spec["token"])
    channels = [dedicated_channel(spec["address"]) for _ in range(max(1, spec["sessions"] // 25))]
    stubs = [dispatcher_pb2_grpc.DispatcherServiceStub(c) for c in channels]
    return stubs, channels, metadata


async def client_latency(spec: dict[str, Any]) -> dict[str, Any]:
    """``sessions`` closed loops of turns: speak, END_TURN, first speech, INTERRUPT, end."""
    stubs, channels, metadata = _sessions(spec)
    turns: list[dict[str, Any]] = []
    errors: collections.Counter[str] = collections.Counter()
    sent: list[tuple[float, int]] = []
    heard: list[tuple[float, int]] = []
    begin = time.monotonic() + spec["warmup_s"]
    deadline = begin + spec["seconds"]

    async def loop(index: int) -> None:
        voice = Voice(stubs[index % len(stubs)], metadata, spec, index)
        audio = bytes(turn_bytes(spec["turn_ms"], index))
        # A quiet hum, not silence: nothing here detects voice, but it is audio all the same.
        audio = (b"\x10\x00\xf0\xff" * (len(audio) // 4 + 1))[: len(audio)]
        rng = random.Random(index)  # noqa: S311 - staggered starts, reproducible
        try:
            await voice.open(spec["conversations"][index], spec["assistants"][index])
            await asyncio.sleep(rng.uniform(0, 1.0))  # staggered starts
            while time.monotonic() < deadline:
                turn = await voice.interrupted_turn(audio, spec["listen_ms"] / 1000, sent, heard)
                turns.append({**turn, "measured": begin <= turn["end_turn"] < deadline})
        except aio.AioRpcError as err:
            errors[f"Talk {err.code().name}"] += 1
        except (RuntimeError, TimeoutError) as exc:
            errors[type(exc).__name__ + ": " + str(exc)[:60]] += 1
        finally:
            await voice.close()

    cpu = CpuMeter(spec["server_pid"], spec["audio_pid"], spec["model_pid"])
    tasks = [asyncio.create_task(loop(i)) for i in range(spec["sessions"])]
    await asyncio.sleep(max(0.0, begin - time.monotonic()))
    cpu.start()
    async with pyspy.recording(spec.get("profile"), spec["server_pid"]):
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        cpu.stop()
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close(None)
    audio_in = sum(n for at, n in sent if begin <= at < deadline)
    audio_out = sum(n for at, n in heard if begin <= at < deadline)
    return {
        "turns": turns,
        "errors": dict(errors),
        "server_cores": cpu.cores(0),
        "audio_cores": cpu.cores(1),
        "model_cores": cpu.cores(2),
        "client_cores": round(cpu.client / max(cpu.wall, 1e-9), 2),
        "other_cores": round(cpu.others() / max(cpu.wall, 1e-9), 2),
        "audio_in_s": round(audio_in / (2 * RATE), 1),
        "audio_out_s": round(audio_out / (2 * spec["output_rate"]), 1),
    }


async def client_cpu(spec: dict[str, Any]) -> dict[str, Any]:
    """``cpu_sessions`` closed loops: say the sentence, hear the whole answer."""
    stubs, channels, metadata = _sessions(spec)
    said = await asyncio.to_thread(Path(spec["said"]).read_bytes)
    sent: list[tuple[float, int]] = []
    heard: list[tuple[float, int]] = []
    errors: collections.Counter[str] = collections.Counter()
    transcripts: collections.Counter[str] = collections.Counter()
    begin = time.monotonic() + spec["warmup_s"]
    deadline = begin + spec["seconds"]

    async def loop(index: int) -> None:
        voice = Voice(stubs[index % len(stubs)], metadata, spec, index)
        try:
            await voice.open(spec["conversations"][index], spec["assistants"][index])
            await asyncio.sleep(index * 0.5)  # staggered starts
            while time.monotonic() < deadline:
                await voice.say(said, sent)
                while True:
                    frame = await voice.read()
                    if frame.WhichOneof("frame") == "transcript" and frame.transcript.final:
                        transcripts[frame.transcript.text] += 1
                        run = frame.transcript.run
                        break
                while not _ended(frame := await voice.read(), run):
                    size = _speech_of(frame, run)
                    if size > 0:
                        heard.append((time.monotonic(), size))
        except aio.AioRpcError as err:
            errors[f"Talk {err.code().name}"] += 1
        except (RuntimeError, TimeoutError) as exc:
            errors[type(exc).__name__ + ": " + str(exc)[:60]] += 1
        finally:
            await voice.close()

    tasks = [asyncio.create_task(loop(i)) for i in range(spec["sessions"])]
    await asyncio.sleep(max(0.0, begin - time.monotonic()))
    started = [time.monotonic(), *_cpu_now(spec)]
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    stopped = [time.monotonic(), *_cpu_now(spec)]
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close(None)
    wall, server, audio, model = (b - a for a, b in zip(started, stopped, strict=True))
    audio_in = sum(n for at, n in sent if begin <= at < deadline) / (2 * RATE)
    audio_out = sum(n for at, n in heard if begin <= at < deadline) / (2 * spec["output_rate"])
    seconds = max(audio_in + audio_out, 1e-9)
    return {
        "wall_s": round(wall, 1),
        "audio_in_s": round(audio_in, 1),
        "audio_out_s": round(audio_out, 1),
        "server_cores": round(server / wall, 2),
        "audio_cores": round(audio / wall, 2),
        "model_cores": round(model / wall, 3),
        "server_ms_per_audio_s": round(server * 1000 / seconds, 1),
        "audio_ms_per_audio_s": round(audio * 1000 / seconds, 1),
        "transcripts": dict(transcripts.most_common(3)),
        "errors": dict(errors),
    }


def _cpu_now(spec: dict[str, Any]) -> list[float]:
    from bench.harness import process_cpu_s

    return [
        process_cpu_s(spec["server_pid"]),
        tree_cpu_s(spec["audio_pid"]),
        process_cpu_s(spec["model_pid"]),
    ]


# ---------------------------------------------------------------------------------
# The driver.


@dataclass(frozen=True)
class Place:
    account: Account
    conversations: list[str]
    assistants: list[str]


async def _place(address: str, count: int, who: str) -> Place:
    """An account, and per session a conversation and an assistant naming the session."""
    async with dedicated_channel(address) as channel:
        account = await register(channel, f"voice-{who}@example.com")
        workspaces = [
            await create_workspace(channel, account, f"voice-{who}-{w:03d}", f"Voice {w}")
            for w in range((count + PER_WORKSPACE - 1) // PER_WORKSPACE)
        ]
        parents = [workspaces[i // PER_WORKSPACE] for i in range(count)]
        conversations = await create_conversations(channel, account, parents)
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        cpu = "cpu " if who == "cpu" else ""

        async def assistant(index: int) -> str:
            created = await stub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=parents[index],
                    assistant=pb.Assistant(
                        display_name=f"Voice {index}",
                        handler="handlers/llm",
                        instructions=f"You are bench {cpu}session {index}.",
                        voice=pb.VoiceSettings(language="en"),
                    ),
                ),
                metadata=account.metadata,
                timeout=30,
            )
            return created.assistant.name

        assistants = await gather_limited(
            [functools.partial(assistant, index) for index in range(count)]
        )
        return Place(account, conversations, assistants)


@contextlib.asynccontextmanager
async def child(name: str, *args: str) -> AsyncIterator[tuple[Child, int]]:
    """A fake in its own process (``python voice.py ROLE ARG``) and its port."""
    process = await Child.start(name, __file__, name, *args)
    try:
        port = int(await process.line(120))
        yield process, port
    finally:
        await process.close()


def attribute(
    turns: Sequence[dict[str, Any]],
    timings: Sequence[Sequence[Any]],
    requests: Sequence[Sequence[Any]],
    turn_ms: int,
) -> dict[str, Any]:
    """Each measured turn's endpoints' share, from the fakes' records: the transcription of
    its session's size, its session's model request and speech request, each arriving
    between its END_TURN and its first speech."""
    by_size: dict[str, list[Sequence[Any]]] = collections.defaultdict(list)
    by_text: dict[int, list[Sequence[Any]]] = collections.defaultdict(list)
    for timing in timings:
        path, _arrived, _first, _last, detail = timing
        if path.endswith("/transcriptions"):
            by_size[detail].append(timing)
        else:
            found = re.match(r"Session (\d+) ", detail)
            if found is not None:
                by_text[int(found.group(1))].append(timing)
    by_session: dict[int, list[Sequence[Any]]] = collections.defaultdict(list)
    for request in requests:
        by_session[int(request[0])].append(request)

    def within(items: list[Sequence[Any]], start: float, end: float, at: int) -> Any:
        return next((item for item in items if start <= item[at] <= end), None)

    own, total, transcription, model, speech = [], [], [], [], []
    gaps: dict[str, list[float]] = collections.defaultdict(list)
    unattributed = 0
    for turn in turns:
        if not turn["measured"]:
            continue
        start, end, index = turn["end_turn"], turn["first_speech"], turn["session"]
        heard = within(by_size[str(wav_bytes(turn_ms, index))], start, end, 1)
        asked = within(by_session[index], start, end, 1)
        spoke = within(by_text[index], start, end, 1)
        if heard is None or asked is None or spoke is None or asked[2] is None:
            unattributed += 1
            continue
        parts = (heard[3] - heard[1], asked[2] - asked[1], spoke[2] - spoke[1])
        transcription.append(parts[0])
        model.append(parts[1])
        speech.append(parts[2])
        total.append(end - start)
        own.append(end - start - sum(parts))
        # The own share, hop by hop: the four gaps between the endpoints add up to it.
        gaps["to transcription"].append(heard[1] - start)
        gaps["transcript to model"].append(asked[1] - heard[3])
        gaps["sentence to speech"].append(spoke[1] - asked[2])
        gaps["audio to client"].append(end - spoke[2])
    return {
        "turns": len(total),
        "unattributed": unattributed,
        "own_p50_ms": _ms(own, 0.5),
        "own_p99_ms": _ms(own, 0.99),
        "own_max_ms": _ms(own, 1.0),
        "total_p50_ms": _ms(total, 0.5),
        "total_p99_ms": _ms(total, 0.99),
        "transcription_p50_ms": _ms(transcription, 0.5),
        "model_p50_ms": _ms(model, 0.5),
        "speech_p50_ms": _ms(speech, 0.5),
        "gaps": {name: [_ms(v, 0.5), _ms(v, 0.99)] for name, v in gaps.items()},
    }


def barge_in(turns: Sequence[dict[str, Any]]) -> dict[str, Any]:
    measured = [t for t in turns if t["measured"]]
    last = [
        max(0.0, t["last_speech"] - t["interrupt"]) if t["last_speech"] is not None else 0.0
        for t in measured
    ]
    acknowledged = [
        t["acknowledged"] - t["interrupt"] for t in measured if t["acknowledged"] is not None
    ]
    states = collections.Counter(t["state"] for t in measured)
    return {
        "interrupts": len(measured),
        "barge_p50_ms": _ms(last, 0.5),
        "barge_p99_ms": _ms(last, 0.99),
        "barge_max_ms": _ms(last, 1.0),
        "with_speech_after": sum(1 for t in measured if t["speech_after"]),
        "acknowledged_p50_ms": _ms(acknowledged, 0.5),
        "acknowledged_p99_ms": _ms(acknowledged, 0.99),
        "states": dict(states),
    }


def _ms(samples: Sequence[float], fraction: float) -> float:
    return round(percentile(samples, fraction) * 1000, 2) if samples else float("nan")


async def latency_phase(
    plan: Plan, directory: Path, sessions: int, profile: dict[str, Any] | None = None
) -> dict[str, Any]:
    async with (
        child("audio", json.dumps("tone")) as (audio, audio_port),
        child("model", json.dumps(MODEL_INTERVAL_MS)) as (model, model_port),
    ):
        settings = {
            **SERVER_SETTINGS,
            "SWITCHBOARD_LLM_BASE_URL": f"http://127.0.0.1:{model_port}/v1",
            "SWITCHBOARD_VOICE_URL": f"http://127.0.0.1:{audio_port}/v1",
        }
        url = f"sqlite+aiosqlite:///{directory / f'voice-latency-{time.monotonic_ns()}.db'}"
        with serve(directory, url, settings) as server:
            place = await _place(server.address, sessions, "loop")
            waited = await wait_quiet(plan.quiet_wait_s)
            say(f"loop: {sessions} sessions, {plan.seconds:g} s")
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
                    "warmup_s": plan.warmup_s,
                    "seconds": plan.seconds,
                    "turn_ms": plan.turn_ms,
                    "listen_ms": plan.listen_ms,
                    "output_rate": 24_000,
                    "server_pid": server.pid,
                    "audio_pid": audio.pid,
                    "model_pid": model.pid,
                    "profile": profile,
                },
            )
        timings = (await audio.ask({"timings": True}, 120))["timings"]
        requests = (await model.ask({"requests": True}, 120))["requests"]
    turns = seen.pop("turns")
    figures = {
        "sessions": sessions,
        **attribute(turns, timings, requests, plan.turn_ms),
        **barge_in(turns),
        **seen,
        "quiet_wait_s": waited,
    }
    say(f"  {figures}")
    return figures


def _said(directory: Path) -> Path:
    """``SAID`` spoken by eSpeak NG, PCM16 at 16 kHz, in a file for the client."""
    from tests.infra.speech import speak

    samples, rate = pcm.from_wav(speak(SAID))
    path = directory / "said.pcm"
    path.write_bytes(bytes(pcm.byte_count(300, RATE)) + pcm.resample(samples, rate, RATE))
    return path


async def cpu_phase(plan: Plan, directory: Path) -> dict[str, Any]:
    async with (
        child("audio", json.dumps("real")) as (audio, audio_port),
        child("model", json.dumps(MODEL_INTERVAL_MS)) as (model, model_port),
    ):
        settings = {
            **SERVER_SETTINGS,
            "SWITCHBOARD_LLM_BASE_URL": f"http://127.0.0.1:{model_port}/v1",
            "SWITCHBOARD_VOICE_URL": f"http://127.0.0.1:{audio_port}/v1",
        }
        url = f"sqlite+aiosqlite:///{directory / 'voice-cpu.db'}"
        said = await asyncio.to_thread(_said, directory)
        with serve(directory, url, settings) as server:
            place = await _place(server.address, plan.cpu_sessions, "cpu")
            waited = await wait_quiet(plan.quiet_wait_s)
            say(f"cpu: {plan.cpu_sessions} sessions with the real engines, {plan.cpu_seconds:g} s")
            figures = await asyncio.to_thread(
                run_client,
                __file__,
                {
                    "mode": "cpu",
                    "address": server.address,
                    "token": place.account.token,
                    "conversations": place.conversations,
                    "assistants": place.assistants,
                    "sessions": plan.cpu_sessions,
                    "warmup_s": plan.cpu_warmup_s,
                    "seconds": plan.cpu_seconds,
                    "said": str(said),
                    "output_rate": 24_000,
                    "server_pid": server.pid,
                    "audio_pid": audio.pid,
                    "model_pid": model.pid,
                },
            )
    figures["quiet_wait_s"] = waited
    say(f"  {figures}")
    return figures


async def drive(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    if args.sessions:
        plan = dataclasses.replace(plan, rows=tuple(int(n) for n in args.sessions.split(",")))
    results: dict[str, Any] = {"plan": dataclasses.asdict(plan)}
    py_spy = pyspy.find(args)
    async with session(results, "switchboard-voice-bench-") as directory:
        results["loop"] = [await latency_phase(plan, directory, n) for n in plan.rows]
        results["cpu"] = await cpu_phase(plan, directory)
        if py_spy is not None:
            say("profile: the loop again, py-spy on the server (not measured)")
            out = directory / "profile-voice.txt"
            most = max(plan.rows)
            await latency_phase(plan, directory, most, pyspy.plan(py_spy, plan.seconds, out))
            results["profile"] = {
                "libraries": pyspy.libraries(out),
                "functions": pyspy.functions(out),
            }
            await pyspy.keep(args, directory, "profile-*.txt")
    text = render(results, command_line("bench/voice.py"), plan)
    report(results, text, args)
    return 0


# ---------------------------------------------------------------------------------
# The report.


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"


def _loop_line(row: dict[str, Any]) -> str:
    return (
        f"| {row['sessions']} | {row['turns']} ({row['unattributed']}) | {row['own_p50_ms']} / "
        f"{row['own_p99_ms']} / {row['own_max_ms']} | {row['total_p50_ms']} / "
        f"{row['total_p99_ms']} | {row['transcription_p50_ms']}, {row['model_p50_ms']}, "
        f"{row['speech_p50_ms']} | {row['barge_p50_ms']} / {row['barge_p99_ms']} / "
        f"{row['barge_max_ms']} | {row['with_speech_after']} of {row['interrupts']} | "
        f"{row['acknowledged_p50_ms']} / {row['acknowledged_p99_ms']} | "
        f"{row['server_cores']} | {row['audio_in_s']} / {row['audio_out_s']} | "
        f"{row['other_cores']} | {_errors(row['errors'])} |"
    )


def _hops_line(row: dict[str, Any]) -> str:
    hops = "; ".join(f"{name} {p50} / {p99}" for name, (p50, p99) in row["gaps"].items())
    many = "s" if row["sessions"] != 1 else ""
    return f"- {row['sessions']} session{many}: {hops}"


def goals(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's goals, on the row with the most sessions."""
    row = max(rows, key=lambda r: int(r["sessions"]))
    clean = not row["errors"] and not row["unattributed"]
    own_met = clean and row["own_p99_ms"] <= OWN_P99_BUDGET_MS
    barge_met = clean and row["barge_p99_ms"] <= BARGE_P99_BUDGET_MS
    return [
        f"- Switchboard's own share p99 at most {OWN_P99_BUDGET_MS:g} ms with "
        f"{row['sessions']} sessions: {verdict(own_met)} ({row['own_p99_ms']} ms).",
        f"- Barge-in, INTERRUPT to the last `speech` update of the run, p99 at most "
        f"{BARGE_P99_BUDGET_MS:g} ms with {row['sessions']} sessions: {verdict(barge_met)} "
        f"({row['barge_p99_ms']} ms).",
    ]


def render(results: dict[str, Any], command: str, plan: Plan) -> str:
    rows = results["loop"]
    cpu = results["cpu"]
    ratio = cpu["server_ms_per_audio_s"] / max(cpu["audio_ms_per_audio_s"], 1e-9)
    return "\n".join(
        [
            SECTION,
            "",
            *provenance(command, took_s=results.get("seconds")),
            host_speed_line(results["host"]),
            f"- the server: a fresh `switchboard serve --dev` per row (embedded SQLite), "
            f"{settings_text(SERVER_SETTINGS)}, `SWITCHBOARD_VOICE_URL` at the local audio "
            "server and `SWITCHBOARD_LLM_BASE_URL` at the local model server, each in its own "
            f"process; the model writes a word every {MODEL_INTERVAL_MS} ms",
            "- the loop: N Talk sessions at once, each its own assistant (`handlers/llm`) and "
            "conversation, turns in a closed loop: START_TURN, "
            f"{plan.turn_ms} ms and more of PCM16 at 16 kHz in {FRAME_MS} ms frames at the "
            "pace of speech, END_TURN (`TURN_DETECTION_CLIENT`), the first `speech` update of "
            f"the turn's run, {plan.listen_ms} ms more of the answer (as it is played), "
            "INTERRUPT, the run's end; the audio server's fast engine "
            "(`--engine tone`); "
            f"{plan.warmup_s:g} s warm-up, {plan.seconds:g} s measured (turns whose END_TURN "
            "was sent in it)",
            "- Switchboard's own share: END_TURN to the first `speech` update, minus the "
            "endpoints' time on that path from their own records (same monotonic clock): the "
            "transcription request to its last byte, the model request to the chunk that ends "
            "the first sentence, the speech request to its first audio byte; barge-in: "
            "INTERRUPT to the last `speech` update of its run (0 when none came after it)",
            "",
            "| sessions | turns (unattributed) | own share p50 / p99 / max ms | total p50 / p99 "
            "ms | endpoints p50 ms (transcription, model, speech) | barge-in p50 / p99 / max ms "
            "| interrupts with speech after | SPEECH_INTERRUPTED p50 / p99 ms | server cores | "
            "audio in / out s | other cores | errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *(_loop_line(row) for row in rows),
            "",
            "The own share hop by hop, p50 / p99 ms (the four add up to it): END_TURN to the "
            "transcription request; its answer to the model request (the turn and its "
            "recording stored, the run started); the first sentence's end to the speech "
            "request; its first audio byte to the client:",
            "",
            *(_hops_line(row) for row in rows),
            "",
            *goals(rows),
            "",
            f"CPU per second of audio, with the real engines (PocketSphinx, eSpeak NG): "
            f'{plan.cpu_sessions} sessions, each saying "{SAID}" (eSpeak NG, in real time) and '
            "hearing the whole answer spoken back (paced as played), "
            f"{plan.cpu_warmup_s:g} s warm-up, {plan.cpu_seconds:g} s measured; CPU from /proc "
            "(the audio server's with its eSpeak NG subprocesses).",
            "",
            "| audio in / out s | server CPU ms per s of audio | audio server CPU ms per s of "
            "audio | server / audio server | server cores | audio server cores | errors |",
            "|---|---|---|---|---|---|---|",
            f"| {cpu['audio_in_s']} / {cpu['audio_out_s']} | {cpu['server_ms_per_audio_s']} | "
            f"{cpu['audio_ms_per_audio_s']} | {ratio:.2f} | {cpu['server_cores']} | "
            f"{cpu['audio_cores']} | {_errors(cpu['errors'])} |",
            *_profile_lines(results.get("profile")),
        ]
    )


def _profile_lines(profile: dict[str, Any] | None) -> list[str]:
    if not profile:
        return []
    functions = profile["functions"]
    busy = functions.get("main_samples", 0) + functions.get("other_samples", 0)
    return [
        "",
        f"Where the server's time goes in the loop ({pyspy.RECORD}, an extra run):",
        "",
        *pyspy.library_table(profile["libraries"]),
        "",
        *pyspy.function_table(
            "% of busy samples | Switchboard function (inclusive)",
            functions.get("inclusive", [])[:12],
            busy,
        ),
    ]


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sessions", default="", help="the loop phase's rows: sessions at once, N,N,..."
    )
    pyspy.flags(parser, "an extra, unmeasured run of the loop phase")


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="fewer sessions and seconds",
        options=options,
        roles={
            "client": clients({"latency": client_latency, "cpu": client_cpu}),
            "audio": audio_main,
            "model": model_main,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
