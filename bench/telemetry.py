"""Tracing overhead (issue 20): tracing off, on at 1% and on at 100%, in one run.

    python bench/telemetry.py                the full run (about 4 minutes); prints the report
    python bench/telemetry.py --seconds 1    short cases, to try it out
    python bench/telemetry.py --write        ... and put the report into BENCHMARKS.md
    python bench/telemetry.py --json         one JSON line, figures and report (bench/run.py)

Two cases, each in three tracing modes; every case has a fresh server process,
started with only the standard ``OTEL_*`` variables of its mode in its
environment (``MODES``; off: none at all, so no endpoint):

1. Authenticated unary: ``bench/target.py switchboard-auth`` (the real assembly,
   GetJwks behind a bearer token with cached verification: bench/run.py's
   ``jwks-auth`` case) under ``bench/load.py jwks-auth`` (closed loop, callers on
   one channel, 200 warm-up calls): QPS, p50, p99, and the server's CPU per call.
2. SendMessage to the first delta: a real ``switchboard serve --dev`` process
   and bench/dispatcher.py's paced loop (``runs_case``: one client loop per
   conversation, SendMessage to the built-in ``echo`` handler, WatchRun to the
   end, a think time, again); latency from just before SendMessage to the first
   ``delta`` update, every run checked afterwards.

Spans are exported over OTLP/gRPC to a real receiver in its own process
(``python bench/telemetry.py receiver``: tests/infra/otlp.py's ``OtlpReceiver``,
the collector's TraceService and MetricsService from ``opentelemetry-proto`` on
a free port), which counts what arrives, so each case reports the spans its server exported:
none with tracing off, about 1% of the calls at 1%, all of them at 100%. The
load generators are not instrumented: each call arrives without a trace context
and the server's sampler decides at the root, as for a call from outside.

Cases are interleaved round by round (the order of the modes rotates every
round), the median round shown; ratios are taken against tracing off in the
same round, and their median over the rounds is the one compared with the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.*, tests.*

from bench.dispatcher import MESSAGE, PER_WORKSPACE, SERVER_SETTINGS, runs_case
from bench.harness import (
    HERE,
    Child,
    CpuMeter,
    command_line,
    errors_text,
    host_speed_line,
    median,
    middle,
    overrides,
    provenance,
    report,
    say,
    section_main,
    session,
    settings_text,
    verdict,
)
from tests.infra.otlp import OtlpReceiver

SECTION: Final = "## Tracing overhead (issue 20)"
#: The unary server and load: bench/run.py's "GetJwks, authenticated, cached verification".
UNARY_TARGET: Final = "switchboard-auth"
UNARY_RPC: Final = "jwks-auth"
#: bench/load.py's warm-up calls before it measures (they reach the server too).
UNARY_WARMUP_CALLS: Final = 200
#: The issue's budget: QPS with tracing at 1% / QPS with tracing off.
QPS_RATIO_BUDGET: Final = 0.90
#: The receiver's answer is final once its counts stayed the same this long (a server
#: exports what it holds as it exits, and each export returns once it was received).
SETTLE_S: Final = 0.5
#: ... and the server has at most this long to deliver its last spans.
SETTLE_LIMIT_S: Final = 20.0


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    #: The sampling ratio the receiver's counts are checked against.
    ratio: float
    #: ``OTEL_*`` variables beside the endpoint (none at all when off).
    env: tuple[tuple[str, str], ...]

    def environment(self, endpoint: str) -> dict[str, str]:
        if not self.env:
            return {}
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            **dict(self.env),
        }


MODES: Final = (
    Mode("off", "off", 0.0, ()),
    Mode(
        "1%",
        "on, 1%",
        0.01,
        (("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.01")),
    ),
    Mode("100%", "on, 100%", 1.0, (("OTEL_TRACES_SAMPLER", "always_on"),)),
)


@dataclass(frozen=True)
class Plan:
    rounds: int = 3
    #: Measured seconds per case (both cases).
    seconds: float = 4.0
    #: Unary: callers on one channel (bench/run.py's default).
    callers: int = 16
    #: SendMessage: conversations, each one client loop with a think time of
    #: ``pause_s / 2`` to ``3 * pause_s / 2``: about 48 runs/s offered, a third of
    #: the capacity (about 140 runs/s) that bench/dispatcher.py measures.
    conversations: int = 50
    pause_s: float = 1.0
    #: Covers the staggered starts (0 to 2 * pause_s) of bench/dispatcher.py's loop.
    warmup_s: float = 2.0
    #: At most this long waiting for other jobs to leave the cores before each
    #: SendMessage case (bench/dispatcher.py's ``wait_quiet``; then measured anyway).
    #: None by default, to keep the section within about 4 minutes: the CPU that
    #: others used during each case is reported either way.
    quiet_wait_s: float = 0.0


# ---------------------------------------------------------------------------------
# The OTLP receiver (its own process).


class Tally:
    """What the receiver was sent, cumulative: spans, server spans by RPC, trace ids."""

    def __init__(self, otlp: OtlpReceiver) -> None:
        self.otlp = otlp
        self.seen = 0
        self.traces: set[str] = set()
        self.server_spans: Counter[str] = Counter()

    def counts(self) -> dict[str, Any]:
        spans = self.otlp.spans
        for span in spans[self.seen :]:
            self.traces.add(span.trace_id)
            if span.kind == "SERVER":
                self.server_spans[span.name.rpartition("/")[2]] += 1
        self.seen = len(spans)
        return {
            "requests": self.otlp.exports[0],
            "spans": self.seen,
            "traces": len(self.traces),
            "server_spans": dict(self.server_spans),
        }


def receiver_main() -> None:
    """Serve tests/infra/otlp.py's receiver on a free port; print the port; answer
    ``count`` on stdin (one JSON line) until stdin closes."""
    with OtlpReceiver() as otlp:
        print(otlp.port, flush=True)
        tally = Tally(otlp)
        for line in sys.stdin:
            if line.strip() == "count":
                print(json.dumps(tally.counts()), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)


class Receiver:
    """The receiver's process, and what it counted since a case began."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.endpoint = f"http://127.0.0.1:{port}"

    @classmethod
    async def start(cls) -> Receiver:
        child = await Child.start("receiver", str(HERE / "telemetry.py"), "receiver")
        return cls(child, int(await child.line(60)))

    async def counts(self) -> dict[str, Any]:
        await self.child.send("count")
        return {**await self.child.answer(30), "cpu_s": self.child.cpu_s()}

    async def since(self, before: dict[str, Any]) -> dict[str, Any]:
        """What arrived since ``before``, once nothing more has arrived for SETTLE_S."""
        began = time.monotonic()
        last = await self.counts()
        while time.monotonic() - began < SETTLE_LIMIT_S:
            await asyncio.sleep(SETTLE_S)  # waiting for the exporter's last batch
            now = await self.counts()
            if now["spans"] == last["spans"]:
                break
            last = now
        names = Counter(last["server_spans"])
        names.subtract(before["server_spans"])
        return {
            "spans": last["spans"] - before["spans"],
            "traces": last["traces"] - before["traces"],
            "export_requests": last["requests"] - before["requests"],
            "server_spans": {k: v for k, v in names.items() if v},
            "receiver_cpu_s": round(self.child.cpu_s() - before["cpu_s"], 2),
        }

    async def close(self) -> None:
        await self.child.close()


@contextlib.contextmanager
def tracing(mode: Mode, receiver: Receiver) -> Iterator[dict[str, str]]:
    """This process's environment, which the cases' processes inherit, set for ``mode``:
    every ``OTEL_*`` variable removed, then the mode's set; restored afterwards."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.upper().startswith("OTEL_")]:
        del os.environ[name]
    env = mode.environment(receiver.endpoint)
    os.environ.update(env)
    try:
        yield env
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---------------------------------------------------------------------------------
# The cases.


async def unary_case(plan: Plan, mode: Mode, receiver: Receiver) -> dict[str, Any]:
    """A fresh ``bench/target.py switchboard-auth``; ``bench/load.py jwks-auth`` against it."""
    before = await receiver.counts()
    with tracing(mode, receiver):
        server = await Child.start("server", str(HERE / "target.py"), UNARY_TARGET)
        try:
            port, token = (await server.line(120)).split()
            cpu = CpuMeter(server.pid)
            cpu.start()
            load = await asyncio.create_subprocess_exec(
                sys.executable,
                str(HERE / "load.py"),
                f"127.0.0.1:{port}",
                token,
                UNARY_RPC,
                str(plan.callers),
                str(plan.seconds),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(load.communicate(), plan.seconds + 120)
            cpu.stop()
            if load.returncode:
                raise RuntimeError(f"bench/load.py exited with status {load.returncode}")
        finally:
            await server.close()
    figures: dict[str, Any] = json.loads(out)
    served = int(figures["calls"]) + UNARY_WARMUP_CALLS
    figures["served"] = served
    # Over the load process's life (warm-up included): CPU per call, not cores.
    figures["server_cpu_us_per_call"] = round(
        cpu.figures(served)["server_cpu_ms_per_call"] * 1000, 1
    )
    figures["received"] = await receiver.since(before)
    return figures


async def send_case(plan: Plan, mode: Mode, receiver: Receiver, directory: Path) -> dict[str, Any]:
    """bench/dispatcher.py's paced SendMessage + WatchRun loops on a fresh server."""
    before = await receiver.counts()
    with tracing(mode, receiver):
        figures = await runs_case(
            directory,
            conversations=plan.conversations,
            warmup_s=plan.warmup_s,
            seconds=plan.seconds,
            channels=4,
            quiet_wait_s=plan.quiet_wait_s,
            pause_s=plan.pause_s,
        )
    figures["received"] = await receiver.since(before)
    return figures


def _served(case: str, f: dict[str, Any]) -> int:
    """Calls of the measured RPC the server answered (warm-up included)."""
    return int(f["served"]) if case == "unary" else int(f["check"]["runs_sent"])


_RPC: Final = {"unary": "GetJwks", "send": "SendMessage"}


def _brief(case: str, f: dict[str, Any]) -> str:
    r = f["received"]
    spans = f"{r['server_spans'].get(_RPC[case], 0)} {_RPC[case]} spans / {_served(case, f)} calls"
    if case == "unary":
        return (
            f"{f['qps']:.0f} QPS, p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.2f} ms, "
            f"server {f['server_cpu_us_per_call']:.0f} µs CPU per call; received {spans}, "
            f"{r['spans']} spans in {r['traces']} traces"
        )
    d = f["first_delta"]
    return (
        f"{f['runs_per_s']:.1f} runs/s; first delta p50 {d['p50_ms']:.1f} ms, p99 "
        f"{d['p99_ms']:.1f} ms over {d['calls']} runs; server {f['server_cores']:.2f} cores, "
        f"others {f['other_cores']:.2f}; errors {f['errors'] or 0}; not succeeded "
        f"{f['check']['not_succeeded']}; received {spans}, {r['spans']} spans in "
        f"{r['traces']} traces"
    )


async def drive(plan: Plan) -> dict[str, Any]:
    results: dict[str, Any] = {"rounds": []}
    receiver = await Receiver.start()
    try:
        async with session(results, "switchboard-telemetry-bench-") as directory:
            for round_no in range(plan.rounds):
                results["rounds"].append(await _round(plan, round_no, receiver, directory))
    finally:
        await receiver.close()
    return results


async def _round(
    plan: Plan, round_no: int, receiver: Receiver, directory: Path
) -> dict[str, dict[str, Any]]:
    """Both cases in every mode, the order of the modes rotated by ``round_no``."""
    shift = round_no % len(MODES)
    order = (*MODES[shift:], *MODES[:shift])
    one: dict[str, dict[str, Any]] = {"unary": {}, "send": {}}
    for mode in order:
        one["unary"][mode.key] = f = await unary_case(plan, mode, receiver)
        say(f"round {round_no + 1}: unary, tracing {mode.label}: {_brief('unary', f)}")
    for mode in order:
        one["send"][mode.key] = f = await send_case(plan, mode, receiver, directory)
        say(f"round {round_no + 1}: SendMessage, tracing {mode.label}: {_brief('send', f)}")
    return one


# ---------------------------------------------------------------------------------
# The report.


def _median_round(rounds: Sequence[dict[str, Any]], case: str, key: str, metric: Any) -> int:
    """Index of the median round of ``case`` in mode ``key`` by ``metric``."""
    return middle(range(len(rounds)), key=lambda i: metric(rounds[i][case][key]))


def _ratios(rounds: Sequence[dict[str, Any]], case: str, key: str, metric: Any) -> list[float]:
    """Round by round: ``metric`` in mode ``key`` / ``metric`` with tracing off."""
    return [metric(r[case][key]) / max(metric(r[case]["off"]), 1e-9) for r in rounds]


def _rounds(n: int) -> str:
    return f"{n} round{'s' if n != 1 else ''}"


def _receiver_cpu(rounds: Sequence[dict[str, Any]], case: str) -> str:
    """The receiver's CPU seconds per case, median of the rounds, by mode."""
    cpu = {
        m.key: median(r[case][m.key]["received"]["receiver_cpu_s"] for r in rounds) for m in MODES
    }
    return (
        "- the OTLP receiver's CPU per case (median of the rounds; it shares the cores): "
        + "; ".join(f"{m.label} {cpu[m.key]:.2f} s" for m in MODES)
    )


def _list(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _spans(case: str, mode: Mode, f: dict[str, Any]) -> str:
    r = f["received"]
    calls = _served(case, f)
    rpc_spans = r["server_spans"].get(_RPC[case], 0)
    share = f" ({rpc_spans / calls:.1%})" if calls and mode.ratio else ""
    return f"{rpc_spans} / {calls}{share} | {r['spans']} | {r['traces']}"


def _unary_section(results: dict[str, Any], plan: Plan) -> list[str]:
    rounds = results["rounds"]
    rows = []
    for mode in MODES:
        i = _median_round(rounds, "unary", mode.key, lambda f: f["qps"])
        f = rounds[i]["unary"][mode.key]
        vs = f["qps"] / rounds[i]["unary"]["off"]["qps"]
        rows.append(
            f"| {mode.label} | {i + 1} | {f['calls']:.0f} | **{f['qps']:.0f}** | {vs:.2f} "
            f"| {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {f['server_cpu_us_per_call']:.0f} "
            f"| {_spans('unary', mode, f)} |"
        )
    qps = _ratios(rounds, "unary", "1%", lambda f: f["qps"])
    full = _ratios(rounds, "unary", "100%", lambda f: f["qps"])
    ratio = median(qps)
    cpu = {
        m.key: median(r["unary"][m.key]["server_cpu_us_per_call"] for r in rounds) for m in MODES
    }
    return [
        "### Authenticated unary: GetJwks with a bearer token",
        "",
        f"`bench/target.py {UNARY_TARGET}` (the assembly, GetJwks behind a bearer token with "
        "cached verification: the first section's authenticated case) under `bench/load.py "
        f"{UNARY_RPC}`: {plan.callers} callers on one channel, closed loop, {plan.seconds:g} s "
        f"after {UNARY_WARMUP_CALLS} warm-up calls, a fresh server per case. Per mode, the "
        "median round by QPS. Server CPU per call: the server process's CPU time while the "
        "load ran (its span exporter included) over the calls it answered, warm-up included. "
        "Spans: GetJwks server spans received / GetJwks calls answered; every span the "
        "server exported; distinct trace ids.",
        "",
        "| tracing | round | calls | QPS | QPS vs off | p50 ms | p99 ms "
        "| server CPU µs per call | GetJwks spans / calls | spans | traces |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"- 1% / off QPS: **{ratio:.2f}** (budget ≥ {QPS_RATIO_BUDGET:.2f}): "
        f"{verdict(ratio >= QPS_RATIO_BUDGET)}; "
        f"every round: {_list(qps)}",
        f"- 100% / off QPS: {median(full):.2f}; every round: {_list(full)}",
        f"- server CPU per call, median of the rounds: off {cpu['off']:.0f} µs, 1% "
        f"{cpu['1%']:.0f} µs (+{cpu['1%'] - cpu['off']:.0f}), 100% {cpu['100%']:.0f} µs "
        f"(+{cpu['100%'] - cpu['off']:.0f})",
        _receiver_cpu(rounds, "unary"),
        "",
    ]


def _send_section(results: dict[str, Any], plan: Plan) -> list[str]:
    rounds = results["rounds"]
    rows = []
    for mode in MODES:
        i = _median_round(rounds, "send", mode.key, lambda f: f["first_delta"]["p99_ms"])
        f = rounds[i]["send"][mode.key]
        d, s, c = f["first_delta"], f["send"], f["check"]
        rows.append(
            f"| {mode.label} | {i + 1} | {d['calls']} | {d['p50_ms']:.1f} | **{d['p99_ms']:.1f}** "
            f"| {d['max_ms']:.1f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} "
            f"| {f['runs_per_s']:.1f} | {f['server_cpu_ms_per_call']:.1f} "
            f"| {f['server_cores']:.2f} / {f['client_cores']:.2f} / {f['other_cores']:.2f} "
            f"| {errors_text(f['errors'])} "
            f"| {c['runs_listed'] - c['not_succeeded']}/{c['runs_sent']} "
            f"| {_spans('send', mode, f)} |"
        )
    p50 = {
        m.key: _ratios(rounds, "send", m.key, lambda f: f["first_delta"]["p50_ms"]) for m in MODES
    }
    p99 = {
        m.key: _ratios(rounds, "send", m.key, lambda f: f["first_delta"]["p99_ms"]) for m in MODES
    }
    cpu = {m.key: median(r["send"][m.key]["server_cpu_ms_per_call"] for r in rounds) for m in MODES}
    think = f"{plan.pause_s / 2:g}-{plan.pause_s * 3 / 2:g} s"
    return [
        "### SendMessage to the first delta",
        "",
        "A real `switchboard serve --dev` process with bench/dispatcher.py's settings "
        f"(the message rate limits lifted; {PER_WORKSPACE} conversations per workspace) and "
        f"its paced loop: {plan.conversations} conversations, each one client loop "
        "(over 4 HTTP/2 connections): SendMessage to the built-in `echo` handler "
        f"({len(MESSAGE.split())} words), WatchRun read to the run's end, a think time "
        f"of {think}, again; {plan.seconds:g} s measured after {plan.warmup_s:g} s of warm-up, "
        "a fresh server per case. Latency from just before SendMessage to the first `delta` "
        "update on the WatchRun stream; per mode, the median round by its p99. Server CPU "
        "per run: the server's CPU over the measured time / the runs that ended in it. "
        "Spans: SendMessage server spans received / SendMessage calls answered (warm-up "
        "included; WatchRun and the set-up calls are traced as well, each its own root).",
        "",
        "| tracing | round | runs | first delta p50 ms | p99 ms | max ms "
        "| SendMessage p50 / p99 ms | runs/s | server CPU ms per run "
        "| CPU server / client / others | errors | runs succeeded | SendMessage spans / calls "
        "| spans | traces |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"- first delta p50 vs off, median of the rounds: 1% "
        f"**{median(p50['1%']):.2f}**, 100% {median(p50['100%']):.2f} "
        f"(every round: 1% {_list(p50['1%'])}; 100% {_list(p50['100%'])})",
        f"- first delta p99 vs off, median of the rounds: 1% "
        f"**{median(p99['1%']):.2f}**, 100% {median(p99['100%']):.2f} "
        f"(every round: 1% {_list(p99['1%'])}; 100% {_list(p99['100%'])})",
        f"- server CPU per run, median of the rounds: off {cpu['off']:.1f} ms, 1% "
        f"{cpu['1%']:.1f} ms, 100% {cpu['100%']:.1f} ms",
        _receiver_cpu(rounds, "send"),
        "",
    ]


def render(results: dict[str, Any], plan: Plan, command: str) -> str:
    """The BENCHMARKS.md section."""
    modes = "; ".join(
        f"{m.label}: "
        + (
            ", ".join(f"`{k}={v}`" for k, v in m.environment("http://127.0.0.1:PORT").items())
            if m.env
            else "no `OTEL_*` variable (no endpoint: tracing is not set up)"
        )
        for m in MODES
    )
    off_spans = [
        r[c]["off"]["received"]["spans"] for r in results["rounds"] for c in ("unary", "send")
    ]
    return "\n".join(
        [
            SECTION,
            "",
            *provenance(command),
            f"- duration: {results['seconds']} s, {_rounds(plan.rounds)}",
            "- shape: every case a fresh server process, started with its mode's `OTEL_*` "
            "variables and nothing else changed, and its load in another process; the OTLP "
            "receiver (`python bench/telemetry.py receiver`: tests/infra/otlp.py's, the "
            "collector's TraceService and MetricsService from `opentelemetry-proto`, counting "
            "what arrives) in a third; everything on loopback, sharing the cores. The load is not "
            "instrumented: each call arrives without a trace context, so the server's sampler "
            "decides at the root. Cases interleaved round by round, the order of the modes "
            f"rotating every round; {_rounds(plan.rounds)}; ratios against tracing off in the "
            "same round, their median over the rounds compared with the budget.",
            f"- tracing modes: {modes}",
            f"- SendMessage server settings: {settings_text(SERVER_SETTINGS)}",
            "- spans received with tracing off, every case: "
            + ("**0**" if not any(off_spans) else f"**{sum(off_spans)}** (tracing was not off)"),
            host_speed_line(results["host"]),
            "",
            *_unary_section(results, plan),
            *_send_section(results, plan),
        ]
    )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, help="measured seconds per case")
    parser.add_argument("--rounds", type=int, help="rounds (3 by default)")


async def section(args: argparse.Namespace) -> None:
    plan = dataclasses.replace(Plan(), **overrides(args, ("seconds", "rounds")))
    results = await drive(plan)
    report(results, render(results, plan, command_line("bench/telemetry.py")), args)


def main() -> int:
    return section_main(__doc__, section, options=options, roles={"receiver": receiver_main})


if __name__ == "__main__":
    raise SystemExit(main())
