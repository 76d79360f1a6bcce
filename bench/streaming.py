"""Streaming benchmarks: what a streamed token costs, with a model that paces its tokens.

    python bench/streaming.py                the full run (about 8 minutes); prints the report
    python bench/streaming.py --quick        a few seconds per row, to try it out (< 3 min)
    python bench/streaming.py --write        ... and put the report into BENCHMARKS.md
    python bench/streaming.py --json         one JSON line, figures and report (bench/run.py)
    python bench/streaming.py --against DIR  ... and the server of the checkout in DIR (its
                                             services/ and gen/) after this code's in each row:
                                             a before / after in one run (--against-label)
    python bench/streaming.py --label L      the section of a run of other code,
                                             ``## Streaming (L)``, kept beside this one
    python bench/streaming.py --profile      ... plus py-spy on the server in an extra,
                                             unmeasured run of the paced 100-conversation row
    python bench/streaming.py --replicas-row 20:100
                                             instead of the rows: that row on the scaled-out
                                             shape with 1 and 2 dispatcher replicas
                                             (--replica-counts, --rounds; about 12 minutes),
                                             its own section

The model is ``tests/fakes/openai_server.py``'s ``FakeOpenAI`` in its own process
(``python bench/streaming.py model INTERVAL_MS``): the ``echo`` model, which streams the
last user message back one word (one token) per chunk, ``INTERVAL_MS`` apart (0: as fast
as it can). Every message is ``TOKENS`` words, so every answer is ``TOKENS`` tokens.

Each row is one interval and C conversations. First the model is called directly by the
client process (C closed loops of one streamed Chat Completions request each, read to its
end, httpx): the baseline, in the same run. Then a fresh ``switchboard serve --dev``
process (embedded SQLite; ``SERVER_SETTINGS``: the ``llm`` handler pointing at the model,
the rate limits lifted because one account drives every conversation, and room for every
conversation to run at once) and C closed loops, one per conversation: SendMessage (the
``llm`` handler), then WatchRun with ``after_sequence=0`` to the run's end, again.

Per row: first token p50/p99 (from just before the request to the first text), the gap
between successive text frames the client sees minus the model's interval (p50/p99; a
frame of k tokens, merged deltas, counts as k arriving together),
runs/s (runs that ended in the measured window), server CPU per run and per token (its
CPU over the window / runs or tokens delivered in the window), the model server's CPU per
token, the server's peak RSS (VmHWM). CPU is read from /proc for the whole process.

``--replicas-row``: the row on ``switchboard mesh`` (PostgreSQL, Redis, one process per
service, Envoy in front; a fresh mesh per case) with each count of dispatcher replicas,
beside the model direct and the all-in-one server, in rounds whose order alternates. The
client goes through Envoy, so SendMessage and WatchRun land on any replica (a WatchRun on
one that does not own the run follows it over Redis). Server CPU is every process of the
shape, PostgreSQL's backends included, split by process kind; the access lines each
dispatcher replica logged show how Envoy spread the calls.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.client.transport.affinity import AFFINITY_HEADER, affinity
from switchboard.dispatcher.runs.core.store import TERMINAL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

import itertools

from bench import pyspy
from bench.fixtures import Account, create_conversations, create_workspace, register
from bench.harness import (
    CpuMeter,
    Window,
    bearer,
    clients,
    command_line,
    dedicated_channel,
    errors_text,
    host_speed_line,
    median,
    percentile,
    process_cpu_s,
    provenance,
    python,
    report,
    run_client,
    running,
    say,
    section_main,
    serve,
    session,
    settings_text,
    spawn,
    stop,
    verdict,
    wait_quiet,
)
from tests.fakes.openai_server import FakeOpenAI, Reply, echo_reply

SECTION: Final = "## Streaming"
MODEL: Final = "bench-model"
#: Tokens (words) of every answer, unless a row says otherwise.
TOKENS: Final = 32


def message(tokens: int) -> str:
    """The message: ``tokens`` words, echoed back one per chunk."""
    return " ".join(f"w{i}" for i in range(tokens))


#: Conversations per workspace: the per-workspace running limit is lifted anyway.
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
}
#: The issue's goals.
CPU_PER_TOKEN_RATIO: Final = 3.0
GAP_P99_BUDGET_MS: Final = 25.0
FIRST_P99_BUDGET_MS: Final = 100.0
CORES_BUDGET: Final = 1.0
PACED_RUNS_GOAL: Final = 150.0


@dataclass(frozen=True)
class Row:
    interval_ms: int
    conversations: int
    #: Tokens per answer. A row like another but for this splits the server's CPU into
    #: what a run costs whatever its length and what each token adds (``split``).
    tokens: int = TOKENS


@dataclass(frozen=True)
class Sizes:
    rows: tuple[Row, ...]
    warmup_s: float
    seconds: float
    quiet_wait_s: float
    profile_seconds: float


FULL: Final = Sizes(
    rows=(
        Row(0, 1),
        Row(0, 100),
        Row(20, 1),
        Row(20, 10),
        Row(20, 100),
        Row(33, 100),
        Row(33, 100, 128),
        Row(33, 200),
        Row(33, 300),
        Row(33, 400),
    ),
    warmup_s=4.0,
    seconds=12.0,
    quiet_wait_s=20.0,
    profile_seconds=10.0,
)
QUICK: Final = Sizes(
    rows=(Row(0, 1), Row(0, 100), Row(20, 100), Row(33, 100), Row(33, 100, 128), Row(33, 200)),
    warmup_s=2.0,
    seconds=5.0,
    quiet_wait_s=5.0,
    profile_seconds=5.0,
)


# ---------------------------------------------------------------------------------
# The model: FakeOpenAI's echo, paced, in its own process.


async def model_main(interval_ms: int, port: int = 0) -> None:
    """Serve the paced echo model on a free port (or on ``port`` beside another model
    process: both bind it with SO_REUSEPORT); print it; serve until stdin closes."""
    interval = interval_ms / 1000

    def paced(body: dict[str, Any]) -> Reply:
        return dataclasses.replace(echo_reply(body), interval_s=interval)

    fake = FakeOpenAI(default=paced, listen_port=port)
    fake.reuse_port = True
    await fake.start()
    print(fake.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await fake.close()


@dataclass(frozen=True)
class Model:
    url: str
    pid: int
    #: Every model process (``pid`` is the first).
    pids: tuple[int, ...] = ()


@contextlib.contextmanager
def model_server(interval_ms: int, processes: int = 1) -> Iterator[Model]:
    """The paced model; with ``processes`` > 1, that many on one port (SO_REUSEPORT: the
    kernel spreads the server's connections), so the model is not one core's worth."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(running(python(__file__, "model", str(interval_ms))))
        assert first.stdout is not None
        port = int(first.stdout.readline())
        pids = [first.pid]
        for _ in range(processes - 1):
            more = stack.enter_context(
                running(python(__file__, "model", str(interval_ms), str(port)))
            )
            assert more.stdout is not None
            more.stdout.readline()
            pids.append(more.pid)
        yield Model(f"http://127.0.0.1:{port}/v1", first.pid, tuple(pids))


# ---------------------------------------------------------------------------------
# The client process: the measured loops.


class Load:
    """C closed loops; what the client sees of each answer's tokens."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.interval = spec["interval_ms"] / 1000
        self.window = Window()
        self.first_s: list[float] = []
        self.gap_s: list[float] = []
        self.tokens = 0
        self.frames = 0
        self.ended = 0
        self.started = 0
        self.short = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.sent: dict[str, int] = {}
        self.last_runs: dict[str, str] = {}

    def text(self, started: float, times: list[tuple[float, int]]) -> None:
        """One answer's text frames (arrival, tokens); counted if it started in the window."""
        if started not in self.window:
            return
        self.started += 1
        if times:
            self.first_s.append(times[0][0] - started)
        for (before, _), (after, tokens) in itertools.pairwise(times):
            self.gap_s.append(after - before - self.interval)
            # A frame of several tokens (merged deltas) stands for that many arrivals at
            # once, as one by one frames arriving together would be: the gap stays a
            # per-token figure whether or not the server merges.
            self.gap_s.extend([-self.interval] * (tokens - 1))
        if sum(tokens for _, tokens in times) != self.spec["tokens"]:
            self.short += 1

    def delivered(self, at: float, tokens: int) -> None:
        if at in self.window:
            self.tokens += tokens
            self.frames += 1

    def finished(self, at: float) -> None:
        if at in self.window:
            self.ended += 1

    async def run(
        self,
        one: Any,
        names: Sequence[str],
        sources: Sequence[int],
        trees: dict[str, list[int]] | None = None,
    ) -> dict[str, Any]:
        """``sources``: the server's pid (if one) and the model's, last. ``trees``: the
        scaled-out shape's processes by kind, each with its children (PostgreSQL's backends).

        ``start_at`` in the spec (a ``time.time()``): the loops begin then, so several
        client processes share one window (``bench/scale.py``); ``samples``: the figures
        carry the raw first-token and gap samples, for their caller to merge."""
        if "start_at" in self.spec:
            await asyncio.sleep(max(0.0, self.spec["start_at"] - time.time()))
        self.window.start(self.spec["warmup_s"], self.spec["seconds"])

        async def loop(index: int, name: str) -> None:
            rng = random.Random(index)  # noqa: S311 - staggered starts, reproducible
            await asyncio.sleep(rng.uniform(0, 0.5))  # staggered starts
            while self.window.open():
                await one(index, name)

        tasks = [asyncio.create_task(loop(i, n)) for i, n in enumerate(names)]
        await self.window.warm_up()
        cpu = CpuMeter(*sources)
        tree = TreeCpu(trees or {})
        cpu.start()
        tree.start()
        async with pyspy.recording(self.spec.get("profile"), sources[0]):
            await self.window.measured()
            cpu.stop()
            tree.stop()
            await asyncio.gather(*tasks)
        tokens = max(self.tokens, 1)
        figures: dict[str, Any] = {
            "conversations": len(names),
            "interval_ms": self.spec["interval_ms"],
            "runs_per_s": round(self.ended / self.spec["seconds"], 1),
            "runs_ended": self.ended,
            "tokens": self.tokens,
            "frames": self.frames,
            "short_answers": self.short,
            "first_p50_ms": _ms(self.first_s, 0.5),
            "first_p99_ms": _ms(self.first_s, 0.99),
            "gap_p50_ms": _ms(self.gap_s, 0.5),
            "gap_p99_ms": _ms(self.gap_s, 0.99),
            "errors": dict(self.errors),
            "client_cores": round(cpu.client / max(cpu.wall, 1e-9), 2),
            "other_cores": round(cpu.others() / max(cpu.wall, 1e-9), 2),
        }
        if self.spec.get("samples"):
            figures["first_s"] = self.first_s
            figures["gap_s"] = self.gap_s
        model_cpu = cpu.used[-1]
        figures["model_us_per_token"] = round(model_cpu * 1e6 / tokens, 1)
        if len(sources) == 2:
            server_cpu = cpu.used[0]
            figures["server_cores"] = cpu.cores(0)
            figures["server_ms_per_run"] = round(server_cpu * 1000 / max(self.ended, 1), 2)
            figures["server_us_per_token"] = round(server_cpu * 1e6 / tokens, 1)
        if trees:
            wall = max(cpu.wall, 1e-9)
            runs = max(self.ended, 1)
            server_cpu = sum(tree.used.values())
            figures["server_cores"] = round(server_cpu / wall, 2)
            figures["server_ms_per_run"] = round(server_cpu * 1000 / runs, 2)
            figures["server_us_per_token"] = round(server_cpu * 1e6 / tokens, 1)
            figures["ms_per_run_by_process"] = {
                name: round(used * 1000 / runs, 2) for name, used in tree.used.items()
            }
            figures["cores_by_process"] = {
                name: round(used / wall, 2) for name, used in tree.used.items()
            }
            figures["other_cores"] = round(max(0.0, cpu.others() - server_cpu) / wall, 2)
        return figures


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it ended meanwhile
        parents[int(entry.name)] = int(fields[1])
    return parents


class TreeCpu:
    """CPU seconds of named process trees (a process and its descendants, so PostgreSQL's
    postmaster with its backends) over the measured interval, pid by pid: a process that
    started meanwhile counts from 0, one that ended meanwhile loses what it used in it
    (the pools keep their connections, so neither is common). A walk stops at another
    tree's root: the launcher's tree is the launcher alone."""

    def __init__(self, trees: dict[str, list[int]]) -> None:
        self.trees = trees
        self.used = dict.fromkeys(trees, 0.0)
        self._began: dict[str, dict[int, float]] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        children: dict[int, list[int]] = collections.defaultdict(list)
        for pid, parent in _parents().items():
            children[parent].append(pid)
        roots = {pid for pids in self.trees.values() for pid in pids}
        out = {}
        for name, pids in self.trees.items():
            found: dict[int, float] = {}
            stack = list(pids)
            while stack:
                pid = stack.pop()
                with contextlib.suppress(OSError, IndexError, ValueError):
                    found[pid] = process_cpu_s(pid)
                stack.extend(child for child in children.get(pid, ()) if child not in roots)
            out[name] = found
        return out

    def start(self) -> None:
        self._began = self._sample()

    def stop(self) -> None:
        for name, now in self._sample().items():
            before = self._began.get(name, {})
            self.used[name] += sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())


def _ms(samples: Sequence[float], fraction: float) -> float:
    return round(percentile(samples, fraction) * 1000, 2) if samples else float("nan")


def _failure(run: pb.Run) -> str:
    """A run that did not succeed: its state and its error's reason."""
    info = error_details_pb2.ErrorInfo()
    reason = next((info.reason for packed in run.error.details if packed.Unpack(info)), "")
    return " ".join(part for part in (pb.RunState.Name(run.state), reason) if part)


def _tokens(text: str) -> int:
    return len(text.split())


async def client_direct(spec: dict[str, Any]) -> dict[str, Any]:
    """The baseline: each loop streams one Chat Completions request from the model, again."""
    load = Load(spec)
    body = {
        "model": MODEL,
        "stream": True,
        "messages": [{"role": "user", "content": message(spec["tokens"])}],
    }
    limits = httpx.Limits(max_connections=10_000, max_keepalive_connections=10_000)
    async with httpx.AsyncClient(base_url=spec["model_url"], limits=limits, timeout=60) as http:

        async def one(_index: int, _name: str) -> None:
            started = time.perf_counter()
            times: list[tuple[float, int]] = []
            async with http.stream("POST", "/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    choices = chunk.get("choices") or ()
                    text = choices[0]["delta"].get("content") if choices else None
                    if text:
                        at = time.perf_counter()
                        count = _tokens(text)
                        times.append((at, count))
                        load.delivered(at, count)
            load.finished(time.perf_counter())
            load.text(started, times)

        names = [f"direct-{i}" for i in range(spec["conversations"])]
        return await load.run(one, names, [spec["model_pid"]])


async def client_switchboard(spec: dict[str, Any]) -> dict[str, Any]:
    """Each loop: SendMessage (the llm handler), WatchRun to the end, again."""
    load = Load(spec)
    names: list[str] = spec["conversations_names"]
    channels = [dedicated_channel(spec["address"]) for _ in range(max(1, len(names) // 50))]
    stubs = [dispatcher_pb2_grpc.DispatcherServiceStub(c) for c in channels]
    load.sent = dict.fromkeys(names, 0)

    async def one(index: int, name: str) -> None:
        stub = stubs[index % len(stubs)]
        # The routing header, as Switchboard's clients send it (``spec["affinity"]``): the
        # edge sends a conversation's SendMessage and WatchRun to one process.
        metadata: tuple[tuple[str, str], ...] = bearer(spec["token"])
        if spec.get("affinity"):
            metadata = (*metadata, (AFFINITY_HEADER, affinity(name)))
        started = time.perf_counter()
        request = pb.SendMessageRequest(
            conversation=name,
            handler="handlers/llm",
            message=cpb.Message(parts=[cpb.ContentPart(text=message(spec["tokens"]))]),
        )
        try:
            response = await stub.SendMessage(request, metadata=metadata, timeout=60)
        except aio.AioRpcError as err:
            load.errors[f"SendMessage {err.code().name}"] += 1
            await asyncio.sleep(0.05)  # backing off after a refused send
            return
        run = response.run.name
        load.sent[name] += 1
        load.last_runs[name] = run
        times: list[tuple[float, int]] = []
        ended = False
        try:
            async for frame in stub.WatchRun(
                # Merged deltas, as the clients ask: a watcher behind takes fewer frames
                # (a merged one counts the tokens of its text).
                pb.WatchRunRequest(name=run, after_sequence=0, merge_deltas=True),
                metadata=metadata,
                timeout=300,
            ):
                if frame.WhichOneof("frame") != "update":
                    continue
                update = frame.update
                kind = update.WhichOneof("update")
                if kind == "delta":
                    at = time.perf_counter()
                    count = _tokens(update.delta.text)
                    times.append((at, count))
                    load.delivered(at, count)
                elif kind == "state_change" and update.state_change.run.state in TERMINAL:
                    ended = True
                    if update.state_change.run.state != pb.RUN_STATE_SUCCEEDED:
                        load.errors[_failure(update.state_change.run)] += 1
        except aio.AioRpcError as err:
            load.errors[f"WatchRun {err.code().name}"] += 1
        if not ended:
            load.errors["WatchRun ended early"] += 1
        load.finished(time.perf_counter())
        load.text(started, times)

    try:
        if "trees" in spec:
            return await load.run(one, names, [spec["model_pid"]], spec["trees"])
        return await load.run(one, names, [spec["server_pid"], spec["model_pid"]])
    finally:
        for channel in channels:
            await channel.close(None)


# ---------------------------------------------------------------------------------
# The driver.


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def _conversations(address: str, count: int) -> tuple[Account, list[str]]:
    async with dedicated_channel(address) as connection:
        account = await register(connection, "stream@example.com")
        workspaces = [
            await create_workspace(connection, account, f"stream-{w:03d}", f"Stream {w}")
            for w in range((count + PER_WORKSPACE - 1) // PER_WORKSPACE)
        ]
        parents = [workspaces[i // PER_WORKSPACE] for i in range(count)]
        return account, await create_conversations(connection, account, parents)


async def row_case(
    sizes: Sizes,
    directory: Path,
    row: Row,
    model: Model,
    profile: dict[str, Any] | None = None,
    code: Path | None = None,
) -> dict[str, Any]:
    """A fresh server on ``model`` (``code``: from that checkout); C closed loops of
    SendMessage + WatchRun."""
    url = f"sqlite+aiosqlite:///{directory / f'stream-{time.monotonic_ns()}.db'}"
    settings = {**SERVER_SETTINGS, "SWITCHBOARD_LLM_BASE_URL": model.url}
    if code is not None:
        paths = [str(code / "gen"), str(code / "services"), os.environ.get("PYTHONPATH", "")]
        settings["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    with serve(directory, url, settings) as server:
        figures = await _switchboard_client(
            sizes,
            row,
            model,
            server.address,
            seconds=sizes.seconds if profile is None else sizes.profile_seconds,
            server_pid=server.pid,
            profile=profile,
        )
        figures["peak_rss_mib"] = round(_peak_rss_kib(server.pid) / 1024, 1)
    return figures


async def _switchboard_client(
    sizes: Sizes, row: Row, model: Model, address: str, *, seconds: float, **more: Any
) -> dict[str, Any]:
    """Make the row's conversations on the server at ``address``, wait for a quiet
    machine, then run the measuring client's closed loops against it (``more``: what
    this shape adds to the client's arguments)."""
    account, names = await _conversations(address, row.conversations)
    waited = await wait_quiet(sizes.quiet_wait_s)
    figures: dict[str, Any] = await asyncio.to_thread(
        run_client,
        __file__,
        {
            "mode": "switchboard",
            "interval_ms": row.interval_ms,
            "tokens": row.tokens,
            "warmup_s": sizes.warmup_s,
            "seconds": seconds,
            "address": address,
            "token": account.token,
            "model_pid": model.pid,
            "conversations_names": names,
            **more,
        },
    )
    figures["quiet_wait_s"] = waited
    return figures


async def direct_case(sizes: Sizes, row: Row, model: Model) -> dict[str, Any]:
    waited = await wait_quiet(sizes.quiet_wait_s)
    figures = await asyncio.to_thread(
        run_client,
        __file__,
        {
            "mode": "direct",
            "interval_ms": row.interval_ms,
            "tokens": row.tokens,
            "warmup_s": sizes.warmup_s,
            "seconds": sizes.seconds,
            "model_url": model.url,
            "model_pid": model.pid,
            "conversations": row.conversations,
        },
    )
    figures["quiet_wait_s"] = waited
    return figures


# ---------------------------------------------------------------------------------
# The scaled-out shape: ``switchboard mesh`` (PostgreSQL, Redis, a process per service,
# Envoy in front) with one dispatcher replica or more, the client through Envoy.

#: Replicas of the other services: one each, whatever the dispatchers (the mesh's default
#: runs two events replicas; the paced row subscribes to nothing).
MESH_OTHERS: Final = ("auth=1", "context=1", "integration=1", "events=1", "a2a=1")
MESH_READY_S: Final = 300.0
MESH_STOP_S: Final = 120.0


@dataclass(frozen=True)
class MeshUp:
    #: Envoy's plain listener (native gRPC).
    address: str
    #: Each process's pid by its name in mesh.json (``dispatcher-2``), and ``launcher``.
    trees: dict[str, list[int]]
    log: Path


def _mesh_ready(process: subprocess.Popen[str], state_file: Path, log: Path) -> dict[str, Any]:
    """mesh.json once the launcher says ``ready``."""
    deadline = time.monotonic() + MESH_READY_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"switchboard mesh exited ({process.returncode}):\n{_last(log)}")
        with contextlib.suppress(OSError, ValueError):
            state: dict[str, Any] = json.loads(state_file.read_text())
            if state["state"] == "ready":
                return state
        time.sleep(0.2)  # polling the launcher's state file
    raise RuntimeError(f"switchboard mesh did not become ready:\n{_last(log)}")


@contextlib.contextmanager
def mesh(
    directory: Path,
    dispatchers: int,
    settings: dict[str, str],
    shape: Sequence[str] | None = None,
) -> Iterator[MeshUp]:
    """``switchboard mesh`` with ``dispatchers`` dispatcher replicas (or the launcher's
    ``shape`` options instead: ``--processes=N``), every port free, its data in a fresh
    directory; SIGTERM (everything stops in order) and removed on exit."""
    # Not under ``directory``: PostgreSQL runs as its own user under root, and mkdtemp's
    # directories are owner-only; the launcher hands its data directory over itself.
    data = Path(tempfile.mkdtemp(prefix="switchboard-stream-mesh-"))
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SWITCHBOARD_")}
    env.update(settings)
    log = directory / f"mesh-{dispatchers}-{time.monotonic_ns()}.log"
    replicas = (
        list(shape)
        if shape is not None
        else [f"--replicas={one}" for one in (*MESH_OTHERS, f"dispatcher={dispatchers}")]
    )
    with log.open("w") as sink:
        process = spawn(
            python(
                "-m",
                "switchboard.cli",
                "mesh",
                f"--data-dir={data}",
                "--listen=127.0.0.1:0",
                "--admin=127.0.0.1:0",
                *replicas,
            ),
            env=env,
            cwd=directory,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        state = _mesh_ready(process, data / "mesh.json", log)
        trees = {name: [one["pid"]] for name, one in state["processes"].items() if one["pid"]}
        trees["launcher"] = [process.pid]
        yield MeshUp(address=state["edge"]["grpc"], trees=trees, log=log)
    finally:
        stop(process, by="terminate", timeout_s=MESH_STOP_S)
        shutil.rmtree(data, ignore_errors=True)


def _last(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


#: A warning or error line of a process: its logger and its message, without its fields.
_COMPLAINT: Final = re.compile(r" (?:WARNING|ERROR|CRITICAL)\s+(\S+) (.*?)(?= [a-z_]+=|$)")


def complaints(log: Path, most: int = 8) -> dict[str, int]:
    """The warnings and errors the mesh's processes logged once it was ready (what the
    load met, not the notes of a start), by process kind and message, the most frequent
    first: why runs failed, or Redis timed out, when they did."""
    counts: collections.Counter[str] = collections.Counter()
    ready = False
    for line in log.read_text(errors="replace").splitlines():
        name, bar, rest = line.partition(" | ")
        if not ready:
            ready = name.strip() == "mesh" and rest.startswith("ready:")
            continue
        found = _COMPLAINT.search(rest) if bar else None
        if found is not None:
            counts[f"{kind_of(name.strip())}: {found.group(1)} {found.group(2)}"] += 1
    return dict(counts.most_common(most))


def calls_by_replica(log: Path, methods: Sequence[str]) -> dict[str, dict[str, int]]:
    """How many calls of each of ``methods`` each dispatcher replica logged (its access
    lines, prefixed with its name by the launcher): that Envoy spread the runs."""
    counts: dict[str, dict[str, int]] = {}
    for line in log.read_text(errors="replace").splitlines():
        name, bar, rest = line.partition(" | ")
        if not bar or not name.strip().startswith("dispatcher"):
            continue
        if "switchboard.access" not in rest:
            continue  # other lines of a call name its method too
        for method in methods:
            if f"DispatcherService/{method} " in rest:
                per = counts.setdefault(name.strip(), dict.fromkeys(methods, 0))
                per[method] += 1
    return counts


async def mesh_case(
    sizes: Sizes, directory: Path, row: Row, model: Model, dispatchers: int
) -> dict[str, Any]:
    """A fresh mesh with ``dispatchers`` replicas on ``model``; C closed loops of
    SendMessage + WatchRun through Envoy."""
    settings = {**SERVER_SETTINGS, "SWITCHBOARD_LLM_BASE_URL": model.url}
    with mesh(directory, dispatchers, settings) as up:
        figures = await _switchboard_client(
            sizes, row, model, up.address, seconds=sizes.seconds, trees=up.trees
        )
        figures["peak_rss_mib"] = round(
            sum(_peak_rss_kib(pids[0]) for pids in up.trees.values()) / 1024, 1
        )
        log = up.log
    # After the stop: every access line is in the log by then.
    figures["calls_by_replica"] = calls_by_replica(log, ("SendMessage", "WatchRun"))
    figures["complaints"] = complaints(log)
    figures["dispatchers"] = dispatchers
    return figures


async def replicas_part(
    sizes: Sizes, directory: Path, row: Row, counts: Sequence[int], rounds: int
) -> list[dict[str, Any]]:
    """Per round: the model direct, the all-in-one server (SQLite), then the mesh with each
    count of dispatcher replicas, the counts' order reversed every other round (A B, B A)."""
    measured = []
    with model_server(row.interval_ms) as model:
        for number in range(1, rounds + 1):
            order = list(counts) if number % 2 else list(reversed(counts))
            say(f"round {number}: the model, all-in-one, then {order} dispatcher replicas")
            one: dict[str, Any] = {
                "round": number,
                "direct": await direct_case(sizes, row, model),
                "all_in_one": await row_case(sizes, directory, row, model),
                "mesh": {},
            }
            say(f"  direct {_brief(one['direct'])}")
            say(f"  all-in-one {_brief(one['all_in_one'])}")
            for count in order:
                figures = await mesh_case(sizes, directory, row, model, count)
                one["mesh"][str(count)] = figures
                say(f"  mesh, {count} dispatcher(s): {_brief(figures)}")
                say(f"    by process, ms/run: {figures['ms_per_run_by_process']}")
                say(f"    calls by replica: {figures['calls_by_replica']}")
                for complaint, times in figures["complaints"].items():
                    say(f"    logged {times}x: {complaint}")
            measured.append(one)
    return measured


async def drive(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.rows:
        picked = tuple(_row(one) for one in args.rows.split(","))
        sizes = dataclasses.replace(sizes, rows=picked)
    py_spy = pyspy.find(args)
    results: dict[str, Any] = {
        "label": args.label,
        "against_label": args.against_label if args.against else "",
        "rows": [],
    }
    if args.replicas_row:
        return await drive_replicas(args, sizes)
    async with session(results, "switchboard-stream-bench-") as directory:
        for row in sizes.rows:
            say(
                f"row: {row.interval_ms} ms apart, {row.conversations} conversations, "
                f"{row.tokens} tokens"
            )
            with model_server(row.interval_ms) as model:
                direct = await direct_case(sizes, row, model)
                served = await row_case(sizes, directory, row, model)
                against = (
                    await row_case(sizes, directory, row, model, code=Path(args.against))
                    if args.against
                    else None
                )
            results["rows"].append(
                {
                    "interval_ms": row.interval_ms,
                    "conversations": row.conversations,
                    "tokens": row.tokens,
                    "direct": direct,
                    "switchboard": served,
                    **({"against": against} if against is not None else {}),
                }
            )
            say(f"  direct {_brief(direct)}")
            say(f"  switchboard {_brief(served)}")
            if against is not None:
                say(f"  {args.against_label} {_brief(against)}")
        if py_spy is not None:
            out = directory / "profile-paced.txt"
            plan = pyspy.plan(py_spy, sizes.profile_seconds, out)
            profiled = _row(args.profile_row)
            with model_server(profiled.interval_ms) as model:
                await row_case(sizes, directory, profiled, model, plan)
            results["profile"] = {
                "row": dataclasses.asdict(profiled),
                "libraries": pyspy.libraries(out),
                "functions": pyspy.functions(out),
            }
            await pyspy.keep(args, directory, "profile-*.txt")
    text = render(results, command_line("bench/streaming.py"), sizes)
    report(results, text, args)
    return 0


async def drive_replicas(args: argparse.Namespace, sizes: Sizes) -> int:
    row = _row(args.replicas_row)
    counts = tuple(int(n) for n in args.replica_counts.split(","))
    rounds = args.rounds or (1 if args.quick else 2)
    results: dict[str, Any] = {
        "row": dataclasses.asdict(row),
        "counts": counts,
        "rounds": [],
        "cores": os.cpu_count(),
    }
    async with session(results, "switchboard-stream-mesh-bench-") as directory:
        results["rounds"] = await replicas_part(sizes, directory, row, counts, rounds)
    text = render_replicas(results, command_line("bench/streaming.py"), sizes)
    report(results, text, args)
    return 0


def _row(text: str) -> Row:
    """``INTERVAL_MS:C`` or ``INTERVAL_MS:C:TOKENS``."""
    return Row(*(int(n) for n in text.split(":")))


def _row_words(profile: dict[str, Any]) -> str:
    row = profile.get("row", {"interval_ms": 33, "conversations": 100})
    apart = f"{row['interval_ms']} ms apart" if row["interval_ms"] else "unpaced"
    return f"{apart}, {row['conversations']} conversations"


def _brief(f: dict[str, Any]) -> str:
    server = (
        f", server {f['server_us_per_token']} us/token {f['server_ms_per_run']} ms/run "
        f"{f['server_cores']} cores"
        if "server_us_per_token" in f
        else ""
    )
    return (
        f"{f['runs_per_s']} runs/s, first {f['first_p50_ms']}/{f['first_p99_ms']} ms, "
        f"gap {f['gap_p50_ms']}/{f['gap_p99_ms']} ms, model {f['model_us_per_token']} us/token"
        f"{server}, errors {f['errors'] or 0}"
    )


# ---------------------------------------------------------------------------------
# The report.


def _served_line(label: str, r: dict[str, Any], s: dict[str, Any]) -> str:
    ratio = s["server_us_per_token"] / max(s["model_us_per_token"], 1e-9)
    errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())) or "0"
    return (
        f"| {label} | {r['interval_ms']} | {r['conversations']} | {_tokens_of(r)} | switchboard | "
        f"{s['first_p50_ms']} / {s['first_p99_ms']} | {s['gap_p50_ms']} / {s['gap_p99_ms']} | "
        f"{s['runs_per_s']} | {s['server_ms_per_run']} | {s['server_us_per_token']} "
        f"({ratio:.1f}x) | {s['model_us_per_token']} | {s['server_cores']} | "
        f"{s['peak_rss_mib']} | {s['other_cores']} | {errors} |"
    )


def _row_line(label: str, r: dict[str, Any], against: str = "") -> list[str]:
    d = r["direct"]
    lines = [
        f"| model | {r['interval_ms']} | {r['conversations']} | {_tokens_of(r)} | direct | "
        f"{d['first_p50_ms']} / {d['first_p99_ms']} | {d['gap_p50_ms']} / {d['gap_p99_ms']} | "
        f"{d['runs_per_s']} | | | {d['model_us_per_token']} | | | {d['other_cores']} | |",
    ]
    if "against" in r:
        lines.append(_served_line(against, r, r["against"]))
    lines.append(_served_line(label, r, r["switchboard"]))
    return lines


def rows_table(label: str, rows: Sequence[dict[str, Any]], against: str = "") -> list[str]:
    lines = [
        "| code | interval ms | C | tokens | path | first token p50 / p99 ms | gap - interval "
        "p50 / p99 ms | runs/s | server CPU ms/run | server CPU µs/token (x model) | "
        "model CPU µs/token | server cores | server peak RSS MiB | other cores | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.extend(_row_line(label, r, against))
    return lines


def _tokens_of(r: dict[str, Any]) -> int:
    return int(r.get("tokens", TOKENS))


def _find(
    rows: Sequence[dict[str, Any]],
    interval: int,
    conversations: int,
    tokens: int = TOKENS,
    path: str = "switchboard",
) -> dict[str, Any]:
    for r in rows:
        if (
            r["interval_ms"] == interval
            and r["conversations"] == conversations
            and _tokens_of(r) == tokens
            and path in r
        ):
            return dict(r[path])
    return {}


def split(rows: Sequence[dict[str, Any]], path: str = "switchboard") -> list[dict[str, Any]]:
    """The server's CPU split into a run's share and a token's, from two rows that differ
    only in tokens per answer: CPU per token is ``run / T + token``, so two lengths give
    both. ``token`` is what the issue's "parses a chunk and writes a frame" costs; the
    model's own CPU per token is read from the longer row's direct case."""
    out = []
    for long in rows:
        t2 = _tokens_of(long)
        if t2 == TOKENS or path not in long:
            continue
        short = _find(rows, long["interval_ms"], long["conversations"], TOKENS, path)
        if not short:
            continue
        c1, c2 = short["server_us_per_token"], long[path]["server_us_per_token"]
        token = (t2 * c2 - TOKENS * c1) / (t2 - TOKENS)
        out.append(
            {
                "interval_ms": long["interval_ms"],
                "conversations": long["conversations"],
                "tokens": (TOKENS, t2),
                "run_ms": round(TOKENS * (c1 - token) / 1000, 2),
                "token_us": round(token, 1),
                "model_us": long["direct"]["model_us_per_token"],
            }
        )
    return out


def split_lines(rows: Sequence[dict[str, Any]], label: str, against: str = "") -> list[str]:
    lines = []
    for name, path in ((against, "against"), (label, "switchboard")):
        for one in split(rows, path) if name else ():
            t1, t2 = one["tokens"]
            ratio = one["token_us"] / max(one["model_us"], 1e-9)
            lines.append(
                f"- {name}, {one['interval_ms']} ms apart, {one['conversations']} conversations, "
                f"from the {t1}- and {t2}-token rows: a run costs {one['run_ms']} ms of server "
                f"CPU whatever its length, and each token {one['token_us']} µs more "
                f"({ratio:.1f}x the model's {one['model_us']} µs)."
            )
    return lines


def goals(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    at100 = _find(rows, 33, 100)
    if at100:
        ratio = at100["server_us_per_token"] / max(at100["model_us_per_token"], 1e-9)
        lines.append(
            f"- CPU per token at most {CPU_PER_TOKEN_RATIO:g}x the model's (33 ms apart, 100 "
            f"conversations): {verdict(ratio <= CPU_PER_TOKEN_RATIO)}, "
            f"{at100['server_us_per_token']} against {at100['model_us_per_token']} µs "
            f"({ratio:.1f}x)."
        )

    def holds(f: dict[str, Any]) -> bool:
        return bool(
            f
            and f["gap_p99_ms"] < GAP_P99_BUDGET_MS
            and f["first_p99_ms"] < FIRST_P99_BUDGET_MS
            and f["server_cores"] < CORES_BUDGET
            and not f["errors"]
        )

    at200 = _find(rows, 33, 200)
    if at200:
        lines.append(
            f"- 200 conversations, 33 ms apart: gap p99 under {GAP_P99_BUDGET_MS:g} ms above "
            f"the model's, first token p99 under {FIRST_P99_BUDGET_MS:g} ms, under "
            f"{CORES_BUDGET:g} core: {verdict(holds(at200))} (gap p99 {at200['gap_p99_ms']} ms, "
            f"first token p99 {at200['first_p99_ms']} ms, {at200['server_cores']} cores)."
        )
    held = [r["conversations"] for r in rows if r["interval_ms"] == 33 and holds(r["switchboard"])]
    lines.append(
        f"- The largest C measured that holds both (33 ms apart): {max(held) if held else 'none'}."
    )
    paced = _find(rows, 20, 100)
    if paced:
        lines.append(
            f"- runs/s at 100 conversations, 20 ms apart, at least {PACED_RUNS_GOAL:g}: "
            f"{verdict(paced['runs_per_s'] >= PACED_RUNS_GOAL)} ({paced['runs_per_s']})."
        )
    return lines


def render(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    rows = results["rows"]
    label = results["label"]
    lines = [
        SECTION if label == "current" else f"{SECTION} ({label})",
        "",
        *provenance(command, took_s=results.get("seconds")),
        host_speed_line(results["host"]),
        f"- the model: `tests/fakes/openai_server.py`'s echo in its own process, {TOKENS} "
        "tokens (one word a chunk) per answer unless the row says more, the interval apart; "
        "`direct` rows: the client "
        "streams from it (httpx), the baseline; `switchboard` rows: a fresh `switchboard "
        f"serve --dev` per row (embedded SQLite), {settings_text(SERVER_SETTINGS)}, "
        "SendMessage (`handlers/llm`) then WatchRun to the end, C closed loops",
        f"- each row: {sizes.warmup_s:g} s warm-up, {sizes.seconds:g} s measured; the model "
        "direct, then this code's server"
        + (
            f", then `{results['against_label']}`'s (`--against`: the same bench, the server "
            "from that checkout), row by row"
            if results.get("against_label")
            else ""
        ),
        "",
        *rows_table(results["label"], rows, results.get("against_label", "")),
        "",
        *goals(rows),
        *split_lines(rows, label, results.get("against_label", "")),
    ]
    profile = results.get("profile")
    if profile:
        lines += [
            "",
            f"Where the server's time goes ({_row_words(profile)}; {pyspy.RECORD}):",
            "",
            *pyspy.library_table(profile["libraries"]),
        ]
    return "\n".join(lines)


REPLICAS_SECTION: Final = "## Streaming: dispatcher replicas behind the edge"
#: The columns of the CPU split, in order; ``rest``: the launcher and edge-health.
KINDS: Final = (
    "dispatcher",
    "context",
    "postgres",
    "redis",
    "envoy",
    "auth",
    "integration",
    "events",
    "a2a",
)


def kind_of(process: str) -> str:
    """``dispatcher-2`` -> ``dispatcher``; ``edge-health`` stays itself."""
    name, _, number = process.rpartition("-")
    return name if number.isdigit() else process


def by_kind(per_process: dict[str, float]) -> dict[str, float]:
    kinds: dict[str, float] = collections.defaultdict(float)
    for process, value in per_process.items():
        kind = kind_of(process)
        kinds[kind if kind in KINDS else "rest"] += value
    return {kind: round(value, 2) for kind, value in kinds.items()}


def _served(f: dict[str, Any]) -> str:
    return (
        f"{f['first_p50_ms']} / {f['first_p99_ms']} | {f['gap_p50_ms']} / {f['gap_p99_ms']} | "
        f"{f['runs_per_s']}"
    )


def _problems(f: dict[str, Any]) -> str:
    """Errors, and answers that reached the client short of a token (none may)."""
    short = {"short answers": f["short_answers"]} if f.get("short_answers") else {}
    return errors_text({**f["errors"], **short})


def _replica_line(number: int, f: dict[str, Any]) -> str:
    cores = f["cores_by_process"]
    each = " + ".join(str(cores[name]) for name in sorted(cores) if kind_of(name) == "dispatcher")
    calls = f["calls_by_replica"]
    spread = " / ".join(
        f"{calls[name]['SendMessage']}, {calls[name]['WatchRun']}" for name in sorted(calls)
    )
    return (
        f"| {number} | mesh | {f['dispatchers']} | {_served(f)} | {f['server_ms_per_run']} | "
        f"{f['server_cores']} | {each} | {spread} | {f['peak_rss_mib']} | "
        f"{f['other_cores']} | {_problems(f)} |"
    )


def replicas_table(rounds: Sequence[dict[str, Any]], counts: Sequence[int]) -> list[str]:
    lines = [
        "| round | shape | dispatchers | first token p50 / p99 ms | gap - interval p50 / p99 ms "
        "| runs/s | server CPU ms/run | server cores | dispatchers' cores | SendMessage, "
        "WatchRun calls by replica | server peak RSS MiB | other cores | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for one in rounds:
        d, a = one["direct"], one["all_in_one"]
        lines.append(
            f"| {one['round']} | model direct | | {_served(d)} | | | | | | {d['other_cores']} | |"
        )
        lines.append(
            f"| {one['round']} | all-in-one (SQLite) | 1 | {_served(a)} | "
            f"{a['server_ms_per_run']} | {a['server_cores']} | | | {a['peak_rss_mib']} | "
            f"{a['other_cores']} | {_problems(a)} |"
        )
        for count in counts:
            f = one["mesh"].get(str(count))
            if f is not None:
                lines.append(_replica_line(one["round"], f))
    return lines


def split_table(rounds: Sequence[dict[str, Any]], counts: Sequence[int]) -> list[str]:
    """The mesh's server CPU per run by process kind."""
    lines = [
        "| round | dispatchers | " + " | ".join(KINDS) + " | rest | all |",
        "|---|---|" + "---|" * (len(KINDS) + 2),
    ]
    for one in rounds:
        for count in counts:
            f = one["mesh"].get(str(count))
            if f is None:
                continue
            kinds = by_kind(f["ms_per_run_by_process"])
            cells = " | ".join(str(kinds.get(kind, 0.0)) for kind in (*KINDS, "rest"))
            lines.append(f"| {one['round']} | {count} | {cells} | {f['server_ms_per_run']} |")
    return lines


def replicas_summary(rounds: Sequence[dict[str, Any]], counts: Sequence[int]) -> list[str]:
    """Each count's median over the rounds, against the first count's."""

    def med(count: int, key: str) -> float:
        return median(one["mesh"][str(count)][key] for one in rounds)

    first = counts[0]
    lines = []
    for count in counts:
        runs, cpu = med(count, "runs_per_s"), med(count, "server_ms_per_run")
        vs = (
            f" ({runs / max(med(first, 'runs_per_s'), 1e-9):.2f}x the runs/s of {first}, "
            f"{cpu / max(med(first, 'server_ms_per_run'), 1e-9):.2f}x its CPU per run)"
            if count != first
            else ""
        )
        lines.append(
            f"- {count} dispatcher replica(s), the median of {len(rounds)} round(s): "
            f"{runs:g} runs/s, {cpu:g} ms of server CPU per run, "
            f"{med(count, 'server_cores'):g} server cores, first token p99 "
            f"{med(count, 'first_p99_ms'):g} ms, gap p99 {med(count, 'gap_p99_ms'):g} ms{vs}."
        )
    aio_runs = median(one["all_in_one"]["runs_per_s"] for one in rounds)
    lines.append(
        f"- the all-in-one server (SQLite, one process) in the same rounds: {aio_runs:g} runs/s, "
        f"{median(one['all_in_one']['server_ms_per_run'] for one in rounds):g} ms per run; "
        f"the model alone {median(one['direct']['runs_per_s'] for one in rounds):g} runs/s."
    )
    return lines


def complaint_lines(rounds: Sequence[dict[str, Any]], counts: Sequence[int]) -> list[str]:
    """What the mesh's processes logged as warnings or errors, case by case."""
    lines = []
    for one in rounds:
        for count in counts:
            logged = one["mesh"].get(str(count), {}).get("complaints")
            if logged:
                said = "; ".join(f"{text} ({times}x)" for text, times in logged.items())
                lines.append(f"- round {one['round']}, {count} dispatcher(s) logged: {said}")
    return ["", "Warnings and errors the mesh logged:", "", *lines] if lines else []


def render_replicas(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    row = Row(**results["row"])
    counts = results["counts"]
    apart = f"{row.interval_ms} ms apart" if row.interval_ms else "unpaced"
    lines = [
        REPLICAS_SECTION,
        "",
        *provenance(command, took_s=results.get("seconds")),
        host_speed_line(results["host"]),
        f"- the row: {row.conversations} conversations, {row.tokens} tokens {apart}, the model "
        "and the client as in the Streaming section, on the same "
        f"{results['cores']} cores as everything below",
        "- `mesh`: a fresh `switchboard mesh` per case (PostgreSQL, Redis, one process per "
        f"service: {', '.join(MESH_OTHERS)} and the dispatcher replicas given, Envoy in front; "
        "its config rendered by `switchboard.deploy.edge.envoy`: without a routing header, a "
        "random replica per call), "
        f"the client through Envoy's plain listener; {settings_text(SERVER_SETTINGS)} reach "
        "every service. SendMessage and WatchRun land on any replica: a WatchRun on a replica "
        "that does not own the run follows it over Redis. `all-in-one`: `switchboard serve "
        "--dev` on SQLite, as in the Streaming section",
        "- server CPU: every process of the shape summed (PostgreSQL with its backends, the "
        "launcher that relays the logs included) from /proc over the measured window; other "
        "cores: the rest "
        "of the machine (other jobs), neither the server nor the model nor the client",
        f"- each case: {sizes.warmup_s:g} s warm-up, {sizes.seconds:g} s measured; per round "
        f"the model direct, the all-in-one server, then the mesh with {counts} dispatcher "
        "replicas, that order reversed every other round",
        "",
        *replicas_table(results["rounds"], counts),
        "",
        *replicas_summary(results["rounds"], counts),
        "",
        "Server CPU per run (ms) by process kind on the mesh (`rest`: the launcher, which "
        "relays every process's log lines, and edge-health):",
        "",
        *split_table(results["rounds"], counts),
        *complaint_lines(results["rounds"], counts),
    ]
    return "\n".join(lines)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label", default="current", help="the code measured (a section apart)")
    parser.add_argument("--rows", default="", help="only these rows: INTERVAL_MS:C[:TOKENS],...")
    parser.add_argument(
        "--profile-row",
        default="33:100",
        help="the row --profile records (INTERVAL_MS:C[:TOKENS])",
    )
    parser.add_argument(
        "--against",
        default="",
        help="a checkout of other code (its services/ and gen/): its server measured too, "
        "row by row after this code's (a before / after in one run)",
    )
    parser.add_argument("--against-label", default="before", help="how the table names it")
    parser.add_argument(
        "--replicas-row",
        default="",
        metavar="INTERVAL_MS:C[:TOKENS]",
        help="instead of the rows: this row on the scaled-out shape (switchboard mesh: "
        "PostgreSQL, Redis, Envoy) with each count of dispatcher replicas, its own section",
    )
    parser.add_argument(
        "--replica-counts",
        default="1,2",
        metavar="N,N",
        help="dispatcher replicas with --replicas-row (default 1,2)",
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="rounds with --replicas-row (default 2, quick 1)"
    )
    pyspy.flags(parser, "an extra, unmeasured run of the paced 100-conversation row")


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="a few seconds per row",
        options=options,
        roles={
            "client": clients({"direct": client_direct, "switchboard": client_switchboard}),
            "model": model_main,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
