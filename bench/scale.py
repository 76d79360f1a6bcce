"""Scale: what a run costs on the shape that scales, and how runs/s grows with processes.

    python bench/scale.py                    the paced row 20:100, all-in-one and 1, 2
                                             whole-run processes, 2 rounds (about 5 min)
    python bench/scale.py --quick            one round, short windows (about 2 min)
    python bench/scale.py --write            ... and put the report into BENCHMARKS.md
    python bench/scale.py --row 20:800 --processes 1,2,4,8
                                             a many-core machine's table

Each round measures, on the same machine and the same paced model (``bench/streaming.py``'s
echo model, 32 tokens ``INTERVAL_MS`` apart, in as many processes as the row needs):

- ``the model, direct``: the same closed loops streaming from the model itself, in as many
  client processes: the model's limit (and the clients'), each with its cores;
- ``all-in-one``: one ``switchboard serve --dev`` on embedded SQLite, the in-memory cache and
  event log (the first-hour shape), the client straight to it;
- ``N processes``: ``switchboard mesh --processes N`` (N processes that each serve every
  service, so a run is served whole by one of them; PostgreSQL, Redis and Envoy shared; the
  launcher's edge-health), the client through Envoy's plain listener;
- ``N processes, N x C conversations`` (N above one): each process as loaded as the single
  one was. A process's CPU per run falls as its load rises (more runs share each group
  commit, each merged frame, each wake-up), so two processes on the row's C conversations
  pay for half the load each as well as for each other; this row leaves only the latter.

The client is ``bench/streaming.py``'s closed loops (SendMessage, then WatchRun to the run's
end, again), in as many processes as the row needs (one per 200 conversations), all on one
window. CPU is read from /proc by this process over that window for every process of the
shape, the model's and the clients': each part's CPU per run says what a run costs it, its
cores say which part bound the row. From the parts' CPU per run the report projects what a
deployment of N processes carries and which shared part binds it first.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench import streaming
from bench.harness import (
    command_line,
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
from bench.sizing import TALK_SESSION_MS, Point
from bench.sizing import Model as SizingModel
from bench.streaming import SERVER_SETTINGS, Model, Row, TreeCpu, model_server
from switchboard.deploy.launcher import usable_cores

SECTION: Final = "## Scale: whole-run processes behind the edge"
#: The issue's goals (69): the scaled-out shape's CPU per run against the all-in-one's...
COST_GOAL: Final = 1.3
#: ... and two processes' against one's.
SCALE_GOAL: Final = 1.1
#: Issue 80: the Switchboard processes' CPU per run with 4 processes against 1's.
FLAT_GOAL: Final = 1.1
#: Issue 80, streaming within one process: the all-in-one's runs/s on the paced row at
#: least this share of the model's limit, and its CPU per streamed token at most this many
#: times the model server's.
STREAM_SHARE_GOAL: Final = 0.5
STREAM_TOKEN_GOAL: Final = 3.0
#: Issue 80, many cores: runs/s with N processes at least this times N one process's, at
#: N = 4 and 8, with the first token's p99 under ``MANY_P99_MS`` below saturation.
MANY_GOAL: Final = 0.75
MANY_COUNTS: Final = (4, 8)
MANY_P99_MS: Final = 1000.0
#: Conversations per client process, and tokens per second per model process.
PER_CLIENT: Final = 200
PER_MODEL_TOKENS_S: Final = 20_000
PER_DIRECT_CLIENT: Final = 50
#: The measuring client's script (its ``client`` role).
CLIENT_SCRIPT: Final = str(Path(streaming.__file__).resolve())
#: The clients' interpreters start and import before the shared window opens.
CLIENT_START_S: Final = 4.0
#: A single-threaded part (a Switchboard process, Redis, one client or model process) at
#: this share of a core is taken for the row's bound.
BUSY: Final = 0.85
#: Every part together at this share of the host's cores: the host is the bound (the
#: scheduler's slack on two cores is a few tenths of one).
HOST_BUSY: Final = 0.8
#: The share of a core the projection lets each part use (a loop at a full core queues).
HEADROOM: Final = 0.8


@dataclass(frozen=True)
class Plan:
    row: Row
    processes: tuple[int, ...]
    rounds: int
    warmup_s: float
    seconds: float
    quiet_wait_s: float
    #: Also each count N > 1 at N times the row's conversations (``one_round``).
    matched: bool = True
    #: The client's calls carry the routing header, as Switchboard's clients' do.
    affinity: bool = True


def _clients(row: Row) -> int:
    return max(1, math.ceil(row.conversations / PER_CLIENT))


def _direct_clients(row: Row) -> int:
    """The direct row's clients: an HTTP client reading Chat Completions streams costs
    several times a gRPC one per run (httpx), so more of them, one per 50 conversations,
    on at most half the host's cores (the model needs the rest)."""
    return max(1, min(usable_cores() // 2, math.ceil(row.conversations / PER_DIRECT_CLIENT)))


def paced_limit(row: Row) -> float:
    """Runs/s the paced model allows: each conversation's run takes tokens x interval."""
    return row.conversations * 1000 / max(row.interval_ms * row.tokens, 1e-9)


def _models(row: Row) -> int:
    if not row.interval_ms:
        return 2
    tokens_s = row.conversations * 1000 / row.interval_ms
    return max(1, math.ceil(tokens_s / PER_MODEL_TOKENS_S))


def _slices(names: Sequence[str], parts: int) -> list[list[str]]:
    return [list(names[i::parts]) for i in range(parts) if names[i::parts]]


async def measure(
    plan: Plan,
    model: Model,
    address: str,
    trees: dict[str, list[int]],
) -> dict[str, Any]:
    """The row's conversations on ``address``, then the client processes on one window;
    every part's CPU (``trees``, the model's and the clients') read here over it."""
    account, names = await streaming._conversations(address, plan.row.conversations)
    waited = await wait_quiet(plan.quiet_wait_s)
    specs = [
        {
            "mode": "switchboard",
            "address": address,
            "token": account.token,
            "conversations_names": part,
            "affinity": plan.affinity,
            "trees": {},
        }
        for part in _slices(names, _clients(plan.row))
    ]
    return await _on_one_window(plan, model, specs, trees, waited)


async def measure_direct(plan: Plan, model: Model) -> dict[str, Any]:
    """The model alone: the row's closed loops streaming Chat Completions from it, in as
    many client processes as the row needs, so the row is the model's limit and not one
    client's."""
    waited = await wait_quiet(plan.quiet_wait_s)
    parts = _slices([str(i) for i in range(plan.row.conversations)], _direct_clients(plan.row))
    specs = [
        {"mode": "direct", "model_url": model.url, "conversations": len(part)} for part in parts
    ]
    return await _on_one_window(plan, model, specs, {}, waited)


async def _on_one_window(
    plan: Plan,
    model: Model,
    specs: Sequence[dict[str, Any]],
    trees: dict[str, list[int]],
    waited: float,
) -> dict[str, Any]:
    start_at = time.time() + CLIENT_START_S
    common = {
        "interval_ms": plan.row.interval_ms,
        "tokens": plan.row.tokens,
        "warmup_s": plan.warmup_s,
        "seconds": plan.seconds,
        "model_pid": model.pid,
        "start_at": start_at,
        "samples": True,
    }
    running = [
        asyncio.create_task(asyncio.to_thread(run_client, CLIENT_SCRIPT, {**common, **spec}))
        for spec in specs
    ]
    # The window opens at start_at + warm-up in every client; read the CPU around it.
    await asyncio.sleep(max(0.0, start_at + plan.warmup_s - time.time()))
    clients = _client_pids()
    meter = TreeCpu({**trees, "model": list(model.pids or (model.pid,)), **clients})
    meter.start()
    await asyncio.sleep(plan.seconds)
    meter.stop()
    answers = await asyncio.gather(*running)
    return _merged(answers, meter.used, plan.seconds, waited)


def _client_pids() -> dict[str, list[int]]:
    """The client processes now running (``streaming.py client``), by name."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            if len(argv) > 2 and argv[1].endswith(b"streaming.py") and argv[2] == b"client":
                found.append(int(entry.name))
    return {f"client-{i}": [pid] for i, pid in enumerate(sorted(found), start=1)}


def _merged(
    answers: Sequence[dict[str, Any]], used: dict[str, float], seconds: float, waited: float
) -> dict[str, Any]:
    runs = sum(a["runs_ended"] for a in answers)
    tokens = sum(a["tokens"] for a in answers)
    first = [x for a in answers for x in a["first_s"]]
    gap = [x for a in answers for x in a["gap_s"]]
    errors: collections.Counter[str] = collections.Counter()
    for a in answers:
        errors.update(a["errors"])

    def ms(samples: Sequence[float], fraction: float) -> float:
        return round(percentile(samples, fraction) * 1000, 1) if samples else float("nan")

    per_run = {name: round(cpu * 1000 / max(runs, 1), 2) for name, cpu in used.items()}
    cores = {name: round(cpu / seconds, 2) for name, cpu in used.items()}
    return {
        "runs_per_s": round(runs / seconds, 1),
        "runs_ended": runs,
        "tokens": tokens,
        "short_answers": sum(a["short_answers"] for a in answers),
        "first_p50_ms": ms(first, 0.5),
        "first_p99_ms": ms(first, 0.99),
        "gap_p50_ms": ms(gap, 0.5),
        "gap_p99_ms": ms(gap, 0.99),
        "errors": dict(errors),
        "ms_per_run": per_run,
        "cores": cores,
        "quiet_wait_s": waited,
    }


#: A part of the server side, by the name of its process in mesh.json.
def part_of(name: str) -> str:
    if name.startswith("switchboard"):
        return "processes"
    if name.startswith("client-"):
        return "client"
    if name in ("postgres", "redis", "envoy", "model", "server"):
        return name
    return "rest"  # the launcher (it relays the logs), edge-health


SERVER_PARTS: Final = ("server", "processes", "postgres", "redis", "envoy", "rest")


def by_part(figures: dict[str, Any], what: str = "ms_per_run") -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for name, value in figures[what].items():
        out[part_of(name)] += value
    return {k: round(v, 2) for k, v in out.items()}


def server_ms(figures: dict[str, Any]) -> float:
    parts = by_part(figures)
    return round(sum(parts.get(p, 0.0) for p in SERVER_PARTS), 2)


def bound(figures: dict[str, Any], cores: int) -> str:
    """The part that bound the row: a single-threaded part at a core, else the host's
    cores when they were all busy, else none (the paced model sets the pace)."""
    busy = {
        name: value
        for name, value in figures["cores"].items()
        if part_of(name) in ("processes", "server", "redis", "client", "model") and value >= BUSY
    }
    if busy:
        name = max(busy, key=lambda n: busy[n])
        return f"{name} ({busy[name]:g} of a core)"
    total = sum(figures["cores"].values())
    if total >= HOST_BUSY * cores:
        return (
            f"the host's {cores} cores ({total:.2f} busy, every part together: the processes "
            "wait their turn for a core)"
        )
    return f"nothing at a core ({total:.2f} of {cores} cores busy): the model's pace"


@contextlib.contextmanager
def all_in_one(directory: Path, model: Model) -> Iterator[tuple[str, dict[str, list[int]]]]:
    url = f"sqlite+aiosqlite:///{directory / f'scale-{time.monotonic_ns()}.db'}"
    with serve(directory, url, {**SERVER_SETTINGS, "SWITCHBOARD_LLM_BASE_URL": model.url}) as up:
        yield up.address, {"server": [up.pid]}


@contextlib.contextmanager
def processes(
    directory: Path, model: Model, count: int
) -> Iterator[tuple[str, dict[str, list[int]]]]:
    settings = {**SERVER_SETTINGS, "SWITCHBOARD_LLM_BASE_URL": model.url}
    # More processes than cores on purpose (issue 80's flat-cost goal on two cores): CPU
    # per run is still measurable while processes wait their turn for a core.
    shape = [f"--processes={count}", *(["--oversubscribe"] if count > usable_cores() else [])]
    with streaming.mesh(directory, 0, settings, shape=shape) as up:
        yield up.address, up.trees


async def one_round(plan: Plan, directory: Path, model: Model, number: int) -> dict[str, Any]:
    """The all-in-one, each count of processes on the row, then (``plan.matched``) each
    count above one with the row's conversations times the count: every process as
    loaded as the single one was. The counts' order is reversed every other round."""
    order = list(plan.processes) if number % 2 else list(reversed(plan.processes))
    say(f"round {number}: the model direct, all-in-one, then {order} processes")
    direct = await measure_direct(plan, model)
    say(f"  direct: {_brief(direct)}")
    with all_in_one(directory, model) as (address, trees):
        figures = await measure(plan, model, address, trees)
    say(f"  all-in-one: {_brief(figures)}")
    measured: dict[str, Any] = {
        "round": number,
        "direct": direct,
        "all_in_one": figures,
        "processes": {},
        "matched": {},
    }
    for count in order:
        with processes(directory, model, count) as (address, trees):
            figures = await measure(plan, model, address, trees)
        measured["processes"][str(count)] = figures
        say(f"  {count} processes: {_brief(figures)}")
    for count in order if plan.matched else ():
        if count == 1:
            continue
        loaded = dataclasses.replace(
            plan, row=dataclasses.replace(plan.row, conversations=plan.row.conversations * count)
        )
        with processes(directory, model, count) as (address, trees):
            figures = await measure(loaded, model, address, trees)
        measured["matched"][str(count)] = figures
        say(f"  {count} processes, {loaded.row.conversations} conversations: {_brief(figures)}")
    return measured


def _brief(f: dict[str, Any]) -> str:
    return (
        f"{f['runs_per_s']} runs/s, first {f['first_p50_ms']}/{f['first_p99_ms']} ms, "
        f"server {server_ms(f)} ms/run {by_part(f)}, cores {by_part(f, 'cores')}, "
        f"errors {f['errors'] or 0}"
    )


async def drive(args: argparse.Namespace) -> int:
    row = streaming._row(args.row)
    counts = tuple(int(n) for n in args.processes.split(","))
    plan = Plan(
        row=row,
        processes=counts,
        rounds=args.rounds or (1 if args.quick else 2),
        warmup_s=2.0 if args.quick else 4.0,
        seconds=6.0 if args.quick else 12.0,
        quiet_wait_s=5.0 if args.quick else 20.0,
        matched=not args.no_matched,
        affinity=not args.no_affinity,
    )
    cores = usable_cores()
    results: dict[str, Any] = {
        "row": {
            "interval_ms": row.interval_ms,
            "conversations": row.conversations,
            "tokens": row.tokens,
        },
        "processes": counts,
        "cores": cores,
        "clients": _clients(row),
        "models": _models(row),
        "rounds": [],
    }
    async with session(results, "switchboard-scale-bench-") as directory:
        with model_server(row.interval_ms, _models(row)) as model:
            for number in range(1, plan.rounds + 1):
                results["rounds"].append(await one_round(plan, directory, model, number))
    text = render(results, command_line("bench/scale.py"), plan)
    report(results, text, args)
    return 0


# ---------------------------------------------------------------------------------
# The report.


def _row_line(number: int, label: str, f: dict[str, Any], base: float, cores: int) -> str:
    parts = by_part(f)
    total = server_ms(f)
    errors = ", ".join(f"{k} {v}" for k, v in sorted(f["errors"].items())) or "0"
    served = f"{total} ({total / max(base, 1e-9):.2f}x)" if total else "(no server)"
    return (
        f"| {number} | {label} | {f['runs_per_s']} | {f['first_p50_ms']} / {f['first_p99_ms']} "
        f"| {f['gap_p50_ms']} / {f['gap_p99_ms']} | {served} "
        f"| {parts.get('server', parts.get('processes', 0.0))} | {parts.get('postgres', 0.0)} "
        f"| {parts.get('redis', 0.0)} | {parts.get('envoy', 0.0)} | {parts.get('rest', 0.0)} "
        f"| {parts.get('model', 0.0)} | {parts.get('client', 0.0)} "
        f"| {_cores_text(f)} | {bound(f, cores)} | {errors} |"
    )


def _cores_text(f: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in sorted(f["cores"].items()))


def table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| round | shape | runs/s | first token p50 / p99 ms | gap - interval p50 / p99 ms "
        "| server CPU ms/run (x all-in-one) | Switchboard process(es) | PostgreSQL | Redis "
        "| Envoy | launcher + edge-health | model | client | cores by process | bound by "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rounds"]:
        base = server_ms(r["all_in_one"])
        if "direct" in r:
            lines.append(
                _row_line(r["round"], "the model, direct", r["direct"], base, results["cores"])
            )
        lines.append(
            _row_line(r["round"], "all-in-one (SQLite)", r["all_in_one"], base, results["cores"])
        )
        for count in results["processes"]:
            f = r["processes"][str(count)]
            lines.append(_row_line(r["round"], f"{count} process(es)", f, base, results["cores"]))
        for count, f in r.get("matched", {}).items():
            label = f"{count} processes, {int(count) * results['row']['conversations']} conv."
            lines.append(_row_line(r["round"], label, f, base, results["cores"]))
    return lines


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def goals(results: dict[str, Any]) -> list[str]:
    rounds = results["rounds"]
    lines = []
    counts = [str(c) for c in results["processes"]]
    if "1" in counts:
        ratios = [server_ms(r["processes"]["1"]) / server_ms(r["all_in_one"]) for r in rounds]
        ratio = _mean(ratios)
        lines.append(
            f"- Cost: the scaled-out shape's server CPU per run (every process: the "
            f"Switchboard process, PostgreSQL, Redis, Envoy, the launcher and edge-health) at "
            f"most {COST_GOAL:g}x the all-in-one's, one process, same rounds: "
            f"{verdict(ratio <= COST_GOAL)}, {ratio:.2f}x (rounds: "
            f"{', '.join(f'{x:.2f}x' for x in ratios)})."
        )
    if "1" in counts and "2" in counts:
        ratios = [server_ms(r["processes"]["2"]) / server_ms(r["processes"]["1"]) for r in rounds]
        ratio = _mean(ratios)
        lines.append(
            f"- Scale on {results['cores']} cores, read from cost: CPU per run with two "
            f"processes at most {SCALE_GOAL:g}x that with one: {verdict(ratio <= SCALE_GOAL)}, "
            f"{ratio:.2f}x (rounds: {', '.join(f'{x:.2f}x' for x in ratios)})."
        )
    if "1" in counts and "4" in counts:
        ratios = [
            by_part(r["processes"]["4"])["processes"] / by_part(r["processes"]["1"])["processes"]
            for r in rounds
        ]
        ratio = _mean(ratios)
        over = " (more processes than cores, on purpose)" if results["cores"] < 4 else ""
        lines.append(
            f"- Flat per-process cost: the Switchboard processes' CPU per run together with "
            f"4 processes{over} at most {FLAT_GOAL:g}x that with 1, same row, same rounds: "
            f"{verdict(ratio <= FLAT_GOAL)}, {ratio:.2f}x (rounds: "
            f"{', '.join(f'{x:.2f}x' for x in ratios)})."
        )
    if "1" in counts and all("2" in r.get("matched", {}) for r in rounds):
        ratios = [server_ms(r["matched"]["2"]) / server_ms(r["processes"]["1"]) for r in rounds]
        lines.append(
            f"- The same, each process as loaded as the single one (two processes at "
            f"{2 * results['row']['conversations']} conversations against one at "
            f"{results['row']['conversations']}): {_mean(ratios):.2f}x (rounds: "
            f"{', '.join(f'{x:.2f}x' for x in ratios)}). What two processes cost each other "
            "is this ratio; the row above adds what a process costs per run at half the load "
            "(fewer runs share each write, each frame, each wake-up)."
        )
    lines.extend(_streaming_goal(results))
    lines.append(_many_cores_goal(results))
    return lines


def _streaming_goal(results: dict[str, Any]) -> list[str]:
    """Issue 80's streaming goal, read from the all-in-one rows: one process on the paced
    row, against the model's limit (its pace) and the model server's CPU per token."""
    rounds, row = results["rounds"], results["row"]
    limit = paced_limit(Row(row["interval_ms"], row["conversations"], row["tokens"]))
    shares = [r["all_in_one"]["runs_per_s"] / limit for r in rounds]
    # Per token, both divide by the same token count: the ratio of their CPU per run.
    ratios = [
        server_ms(r["all_in_one"]) / max(by_part(r["all_in_one"]).get("model", 0.0), 1e-9)
        for r in rounds
    ]
    share, ratio = _mean(shares), _mean(ratios)
    return [
        f"- Streaming within one process: the all-in-one completes at least "
        f"{STREAM_SHARE_GOAL:g} of the model's limit on the paced row ({limit:.0f} runs/s): "
        f"{verdict(share >= STREAM_SHARE_GOAL)}, {share:.2f} (rounds: "
        f"{', '.join(f'{x:.2f}' for x in shares)}).",
        f"- Its CPU per streamed token at most {STREAM_TOKEN_GOAL:g}x the model server's: "
        f"{verdict(ratio <= STREAM_TOKEN_GOAL)}, {ratio:.1f}x (rounds: "
        f"{', '.join(f'{x:.1f}x' for x in ratios)}). Where the rest goes: docs/decisions.md, "
        "decision 74.",
    ]


def _many_cores_goal(results: dict[str, Any]) -> str:
    """Issue 80's many-core goal: measured only where every count has a core of its own."""
    counts = [int(c) for c in results["processes"]]
    if results["cores"] < 16 or 1 not in counts or not all(n in counts for n in MANY_COUNTS):
        return (
            f"- Many cores: runs/s with N processes at least {MANY_GOAL:g} x N one process's at "
            f"N = {' and '.join(str(n) for n in MANY_COUNTS)}, first token p99 under "
            f"{MANY_P99_MS / 1000:g} s: not measured here ({results['cores']} cores; it needs "
            "16: `python bench/scale.py --row 20:800 --processes 1,2,4,8`)."
        )
    rounds = results["rounds"]
    one = _mean([r["processes"]["1"]["runs_per_s"] for r in rounds])
    parts = []
    met = True
    for n in MANY_COUNTS:
        rate = _mean([r["processes"][str(n)]["runs_per_s"] for r in rounds])
        p99 = max(r["processes"][str(n)]["first_p99_ms"] for r in rounds)
        ok = rate >= MANY_GOAL * n * one and p99 < MANY_P99_MS
        met = met and ok
        parts.append(f"N = {n}: {rate / max(one, 1e-9):.2f}x one process's, p99 {p99:.0f} ms")
    return (
        f"- Many cores: runs/s with N processes at least {MANY_GOAL:g} x N one process's, "
        f"first token p99 under {MANY_P99_MS / 1000:g} s: {verdict(met)} ({'; '.join(parts)})."
    )


def projection(results: dict[str, Any]) -> list[str]:
    """What N processes carry, from each part's CPU per run (the largest count measured,
    its rounds averaged): a process, Redis (one thread), PostgreSQL and Envoy (as many
    cores as they are given)."""
    count = str(max(results["processes"]))
    # Each process as loaded as a deployment's would be: the matched row where there is one.
    matched = all(count in r.get("matched", {}) for r in results["rounds"])
    rows = [r["matched" if matched else "processes"][count] for r in results["rounds"]]
    parts = {
        part: _mean([by_part(f).get(part, 0.0) for f in rows])
        for part in ("processes", "postgres", "redis", "envoy", "rest")
    }
    if not parts["processes"]:
        return []
    per_process = HEADROOM * 1000 / parts["processes"]
    redis = HEADROOM * 1000 / max(parts["redis"], 1e-9)
    shared = parts["postgres"] + parts["envoy"] + parts["rest"]
    lines = [
        f"Each part's CPU per run with {count} process(es)"
        f"{' each as loaded as one alone' if matched else ''} (the rounds' mean): a Switchboard "
        f"process {parts['processes']:.1f} ms, PostgreSQL {parts['postgres']:.1f}, Redis "
        f"{parts['redis']:.1f}, Envoy {parts['envoy']:.1f}, the launcher and edge-health "
        f"{parts['rest']:.1f}. At {HEADROOM:g} of a core each: one process carries "
        f"{per_process:.0f} runs/s; Redis, one thread, {redis:.0f} runs/s; each core given to "
        f"PostgreSQL {HEADROOM * 1000 / max(parts['postgres'], 1e-9):.0f} runs/s, to Envoy "
        f"{HEADROOM * 1000 / max(parts['envoy'], 1e-9):.0f} runs/s.",
        "",
        "| processes N | projected runs/s | cores: processes + PostgreSQL + Envoy + Redis "
        "(+ the rest) | bound by |",
        "|---|---|---|---|",
    ]
    for n in (1, 2, 4, 8, 16, 32, 64):
        rate = min(n * per_process, redis)
        by = "the processes" if n * per_process <= redis else "Redis (one thread)"
        cores = rate * (parts["processes"] + shared + parts["redis"]) / 1000 / HEADROOM
        lines.append(
            f"| {n} | {rate:.0f} | {cores:.1f} = {rate * parts['processes'] / 1000 / HEADROOM:.1f}"
            f" + {rate * parts['postgres'] / 1000 / HEADROOM:.1f} + "
            f"{rate * parts['envoy'] / 1000 / HEADROOM:.1f} + "
            f"{rate * parts['redis'] / 1000 / HEADROOM:.1f} "
            f"(+ {rate * parts['rest'] / 1000 / HEADROOM:.1f}) | {by} |"
        )
    return lines


def sizing(results: dict[str, Any]) -> list[str]:
    """The sizing model (``bench/sizing.py``) fed by this run's counts, every round's."""
    points = [
        Point(
            processes=int(count),
            process_ms=parts.get("processes", 0.0),
            postgres_ms=parts.get("postgres", 0.0),
            redis_ms=parts.get("redis", 0.0),
            envoy_ms=parts.get("envoy", 0.0),
        )
        for r in results["rounds"]
        for count, figures in r["processes"].items()
        for parts in [by_part(figures)]
        if parts.get("processes")
    ]
    if not points:
        return []
    model = SizingModel.from_points(points, TALK_SESSION_MS, "this run's counts")
    return ["Sizing on paper (`bench/sizing.py`'s model):", "", *model.lines()]


def render(results: dict[str, Any], command: str, plan: Plan) -> str:
    row = plan.row
    apart = f"{row.interval_ms} ms apart" if row.interval_ms else "unpaced"
    pace = (
        f" (the model's pace allows {paced_limit(row):.0f} runs/s: a run takes tokens x interval)"
        if row.interval_ms
        else ""
    )
    lines = [
        SECTION,
        "",
        *provenance(command, took_s=results.get("seconds")),
        host_speed_line(results["host"]),
        f"- the row: {row.conversations} conversations, {row.tokens} tokens {apart}{pace}; "
        f"{results['models']} model process(es) on one port, {results['clients']} client "
        f"process(es) on one window; every part on the same {results['cores']} cores",
        "- `all-in-one`: `switchboard serve --dev` on SQLite (the first-hour shape), the client "
        "straight to it; `N processes`: `switchboard mesh --processes N` (each process serves "
        "every service, PostgreSQL, Redis and Envoy shared), the client through Envoy"
        + (
            " with the routing header Switchboard's clients send (`switchboard-affinity`: a "
            "conversation's SendMessage and WatchRun reach one process)"
            if plan.affinity
            else " without the routing header (`--no-affinity`: Envoy's Maglev picks a "
            "process at random per call, and a WatchRun elsewhere follows the run over Redis)"
        )
        + f"; {settings_text(SERVER_SETTINGS)} reach every process",
        "- CPU from /proc over the measured window, every process of each part (PostgreSQL "
        "with its backends); server CPU: every part but the model and the client. Bound by: "
        f"a one-thread part at {BUSY:g} of a core or more, else the host when every part together "
        f"kept {HOST_BUSY:g} of its cores busy",
        f"- each case: {plan.warmup_s:g} s warm-up, {plan.seconds:g} s measured; per round the "
        "model direct, the all-in-one, then the counts"
        + (
            ", then each count above one at that many times the conversations"
            if plan.matched
            else ""
        )
        + "; the counts' order reversed every other round",
        *(
            [
                f"- {results['cores']} cores: a count above {results['cores']} runs "
                "oversubscribed (`switchboard mesh --oversubscribe`: its processes take turns "
                "on the cores), so its CPU per run says what processes cost each other, not "
                "what they serve; runs/s at 4, 8 and more processes is the projection at the "
                "end, and on a machine with many cores `python bench/scale.py --row 20:800 "
                "--processes 1,2,4,8` measures it"
            ]
            if results["cores"] < 8
            else []
        ),
        "",
        *table(results),
        "",
        *goals(results),
        "",
        *projection(results),
        "",
        *sizing(results),
    ]
    return "\n".join(lines)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--row",
        default="20:100",
        metavar="INTERVAL_MS:C[:TOKENS]",
        help="the paced row (default 20:100; on many cores e.g. 20:800)",
    )
    parser.add_argument(
        "--processes",
        default="1,2",
        metavar="N,N",
        help="whole-run process counts (default 1,2); a count above the usable cores runs "
        "oversubscribed (the mesh's --oversubscribe), for CPU per run, not throughput",
    )
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 2, quick 1)")
    parser.add_argument(
        "--no-affinity",
        action="store_true",
        help="the client's calls without the routing header (a process at random per call)",
    )
    parser.add_argument(
        "--no-matched",
        action="store_true",
        help="not each count above one at that many times the conversations (a many-core "
        "run's counts would need thousands of conversations)",
    )


def main() -> int:
    return section_main(__doc__, drive, quick="one round of short windows", options=options)


if __name__ == "__main__":
    raise SystemExit(main())
