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
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.dispatcher.runs.store import TERMINAL

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
    host_speed_line,
    percentile,
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


async def model_main(interval_ms: int) -> None:
    """Serve the paced echo model on a free port; print it; serve until stdin closes."""
    interval = interval_ms / 1000

    def paced(body: dict[str, Any]) -> Reply:
        return dataclasses.replace(echo_reply(body), interval_s=interval)

    fake = FakeOpenAI(default=paced)
    await fake.start()
    print(fake.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await fake.close()


@dataclass(frozen=True)
class Model:
    url: str
    pid: int


@contextlib.contextmanager
def model_server(interval_ms: int) -> Iterator[Model]:
    with running(python(__file__, "model", str(interval_ms))) as process:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield Model(f"http://127.0.0.1:{port}/v1", process.pid)


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

    async def run(self, one: Any, names: Sequence[str], sources: Sequence[int]) -> dict[str, Any]:
        self.window.start(self.spec["warmup_s"], self.spec["seconds"])

        async def loop(index: int, name: str) -> None:
            rng = random.Random(index)  # noqa: S311 - staggered starts, reproducible
            await asyncio.sleep(rng.uniform(0, 0.5))  # staggered starts
            while self.window.open():
                await one(index, name)

        tasks = [asyncio.create_task(loop(i, n)) for i, n in enumerate(names)]
        await self.window.warm_up()
        cpu = CpuMeter(*sources)
        cpu.start()
        async with pyspy.recording(self.spec.get("profile"), sources[0]):
            await self.window.measured()
            cpu.stop()
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
        model_cpu = cpu.used[-1]
        figures["model_us_per_token"] = round(model_cpu * 1e6 / tokens, 1)
        if len(sources) == 2:
            server_cpu = cpu.used[0]
            figures["server_cores"] = cpu.cores(0)
            figures["server_ms_per_run"] = round(server_cpu * 1000 / max(self.ended, 1), 2)
            figures["server_us_per_token"] = round(server_cpu * 1e6 / tokens, 1)
        return figures


def _ms(samples: Sequence[float], fraction: float) -> float:
    return round(percentile(samples, fraction) * 1000, 2) if samples else float("nan")


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
    metadata = bearer(spec["token"])
    names: list[str] = spec["conversations_names"]
    channels = [dedicated_channel(spec["address"]) for _ in range(max(1, len(names) // 50))]
    stubs = [dispatcher_pb2_grpc.DispatcherServiceStub(c) for c in channels]
    load.sent = dict.fromkeys(names, 0)

    async def one(index: int, name: str) -> None:
        stub = stubs[index % len(stubs)]
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
                        load.errors[pb.RunState.Name(update.state_change.run.state)] += 1
        except aio.AioRpcError as err:
            load.errors[f"WatchRun {err.code().name}"] += 1
        if not ended:
            load.errors["WatchRun ended early"] += 1
        load.finished(time.perf_counter())
        load.text(started, times)

    try:
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
        account, names = await _conversations(server.address, row.conversations)
        waited = await wait_quiet(sizes.quiet_wait_s)
        figures = await asyncio.to_thread(
            run_client,
            __file__,
            {
                "mode": "switchboard",
                "interval_ms": row.interval_ms,
                "tokens": row.tokens,
                "warmup_s": sizes.warmup_s,
                "seconds": sizes.seconds if profile is None else sizes.profile_seconds,
                "address": server.address,
                "token": account.token,
                "server_pid": server.pid,
                "model_pid": model.pid,
                "conversations_names": names,
                "profile": profile,
            },
        )
        figures["peak_rss_mib"] = round(_peak_rss_kib(server.pid) / 1024, 1)
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
