"""Writers under fan-out: AppendMessage while 1,000 subscribers follow the conversation.

    python bench/writers.py            the full run (about 8 minutes); prints the report
    python bench/writers.py --quick    200 subscribers, short phases, one round
    python bench/writers.py --write    ... and put the report into BENCHMARKS.md
    python bench/writers.py --json     one JSON line: the figures and the report (bench/run.py)
    python bench/writers.py --paths web --rates 50 --rounds 1 --envoy-workers 2
                                       one case, Envoy with 2 workers as deploy/ runs it
    python bench/writers.py --paths web --rates 50 --rounds 1 --writer-direct
                                       the subscribers through Envoy, the writer direct:
                                       what their path costs the writer, without its own hop

The server is ``bench/target.py switchboard-events`` (the whole assembly on the
embedded defaults, its subscription limits raised) with an Envoy in front of it
(bench/edge.py's: the config ``switchboard envoy`` renders, one worker thread).
One conversation; SUBSCRIBERS ``EventService/Subscribe`` streams on it in two
subscriber processes (bench/events.py's grpc.aio worker directly, or bench/edge.py's
grpc-web ``WebWorker`` through Envoy's TLS listener); one writer process calls
``ContextService/AppendMessage`` on the same path as its subscribers (grpc.aio
directly, or grpc-web through Envoy) at RATE per second on a fixed schedule (open
loop: a slow answer does not hold back the next send).

Each message's text is ``TAG:i:SENT`` (SENT: the writer's wall clock just before
the call), so every subscriber checks that it received each message exactly once
(and in the order the server numbered them: concurrent appends may be stored
in either order), and delivery latency is receipt minus SENT: the whole path, the
write included. The baseline, in the same round and on the same path: the same
writer with no subscriber. Paths alternate, their order rotating every round; the
figures are per round, the verdicts on the median.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from grpc import aio

from switchboard.api.context.v1 import context_pb2, context_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.*, tests.*

from bench.edge import (
    SERVER_ENV,
    Edge,
    H2Client,
    edge_up,
    frame,
    h2_unary,
    web_headers,
)
from bench.events import added, upper_s
from bench.fixtures import Account, create_conversations
from bench.harness import (
    Child,
    CpuMeter,
    answer,
    bearer,
    command_line,
    histogram_percentile,
    median,
    merge_counts,
    overrides,
    provenance,
    report,
    say,
    section_main,
    settings_text,
    share,
    summary,
    verdict,
)

SECTION: Final = "## Writers under fan-out"
APPEND: Final = "/switchboard.api.context.v1.ContextService/AppendMessage"
DEADLINE_S: Final = 30.0
#: Writes per minute the one bench user may make (the default, 6,000, is one path's rounds).
SERVER_SETTINGS: Final = ("context_max_writes_per_minute=1000000",)
#: Budgets (issue 22): the writer's p99 with the subscribers, and delivery's p99.
APPEND_P99_MS: Final = 50.0
DELIVERY_P99_MS: Final = 250.0
CPU_KEYS: Final = ("server_cpu", "workers_cpu", "envoy_cpu", "writer_cpu")


@dataclass(frozen=True)
class Route:
    key: str
    label: str
    #: The writer and the subscriber worker: grpc (grpc.aio) or web (grpc-web on H2Client).
    kind: str
    via: str


PATHS: Final = (
    Route("direct", "direct, native gRPC (grpc.aio)", "grpc", "server"),
    Route("web", "Envoy, grpc-web (TLS, ALPN h2; H2Client)", "web", "tls"),
)


@dataclass(frozen=True)
class Plan:
    subscribers: int = 1_000
    #: Appends per second with the subscribers; the last is the budgets' case.
    rates: tuple[float, ...] = (10.0, 50.0)
    seconds: float = 10.0
    rounds: int = 3
    workers: int = 2
    channels: int = 4
    paths: tuple[str, ...] = tuple(route.key for route in PATHS)
    #: Envoy's worker threads (``--concurrency``; deploy/ runs 2).
    envoy_workers: int = 1
    #: The writer calls the server directly on every path: what the subscribers'
    #: path costs the writer, without the writer's own hop through Envoy.
    writer_direct: bool = False

    @classmethod
    def quick(cls) -> Plan:
        return cls(subscribers=200, seconds=3.0, rounds=1)


# ---------------------------------------------------------------------------------
# The writer process: AppendMessage on a fixed schedule.


Append = Callable[[context_pb2.AppendMessageRequest], Awaitable[None]]


@contextlib.asynccontextmanager
async def grpc_appender(spec: dict[str, Any]) -> AsyncIterator[Append]:
    async with aio.insecure_channel(spec["address"]) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)
        metadata = bearer(spec["token"])

        async def append(request: context_pb2.AppendMessageRequest) -> None:
            await stub.AppendMessage(request, metadata=metadata, timeout=DEADLINE_S)

        yield append


@contextlib.asynccontextmanager
async def web_appender(spec: dict[str, Any]) -> AsyncIterator[Append]:
    """grpc-web over one HTTP/2 connection to Envoy's TLS listener, as a browser."""
    client = await H2Client(spec["url"], spec["cafile"]).open()
    headers = web_headers(spec["token"])

    async def append(request: context_pb2.AppendMessageRequest) -> None:
        body = frame(request.SerializeToString())
        replies, status = await h2_unary(client, APPEND, headers, body, "AppendMessage", DEADLINE_S)
        if status != "0" or len(replies) != 1:
            raise RuntimeError(f"grpc-status {status}")

    try:
        yield append
    finally:
        await client.close()


async def write(append: Append, parent: str, tag: str, rate: float, seconds: float) -> None:
    """``round(rate * seconds)`` appends on a fixed schedule; answers their figures."""
    count = max(1, round(rate * seconds))
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def one(index: int) -> None:
        started = time.perf_counter()
        text = f"{tag}:{index}:{time.time():.6f}"
        request = context_pb2.AppendMessageRequest(
            parent=parent,
            message=context_pb2.Message(
                role=context_pb2.MESSAGE_ROLE_USER, parts=[context_pb2.ContentPart(text=text)]
            ),
        )
        try:
            await append(request)
        except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
            name = exc.code().name if isinstance(exc, aio.AioRpcError) else type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            return
        latencies.append(time.perf_counter() - started)

    calls: list[asyncio.Task[None]] = []
    start_wall, start, lag = time.time(), loop.time(), 0.0
    for index in range(count):
        delay = start + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # the send schedule, not synchronization
        else:
            lag = max(lag, -delay)
        calls.append(asyncio.create_task(one(index)))
    await asyncio.gather(*calls)
    answer(
        {
            "done": tag,
            "count": count,
            "start": start_wall,
            "end": time.time(),
            "lag_max_ms": round(lag * 1000, 3),
            "append": summary(latencies),
            "errors": errors,
        }
    )


async def writer(spec: dict[str, Any]) -> None:
    """The writer process: connects, says "ready", then one ``write`` per command line."""
    opened = grpc_appender(spec) if spec["kind"] == "grpc" else web_appender(spec)
    async with opened as append:
        answer({"ready": True})
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            await write(append, spec["parent"], command["tag"], command["rate"], command["seconds"])


# ---------------------------------------------------------------------------------
# Driver.


class Run:
    """One path's writer and (once connected) its subscriber processes."""

    def __init__(self, edge: Edge, path: Route, plan: Plan, parent: str) -> None:
        self.edge = edge
        self.path = path
        self.plan = plan
        self.parent = parent
        self.writer: Child | None = None
        self.workers: list[Child] = []

    def _spec(self) -> dict[str, Any]:
        return {
            "kind": self.path.kind,
            "mode": self.path.kind,
            "address": self.edge.address(self.path.via),
            "url": self.edge.url(self.path.via),
            "cafile": str(self.edge.envoy.cert_file),
            "token": self.edge.token,
            "parent": self.parent,
        }

    def writer_spec(self) -> dict[str, Any]:
        spec = self._spec()
        if self.plan.writer_direct:
            spec.update(kind="grpc", mode="grpc", address=self.edge.address("server"))
        return spec

    async def start_writer(self) -> None:
        self.writer = await Child.start(
            f"{self.path.key} writer", __file__, "writer", json.dumps(self.writer_spec())
        )
        await self.writer.answer(60)

    async def connect(self) -> float:
        """Every subscriber live (its first frame arrived); seconds it took."""
        total, parts = self.plan.subscribers, self.plan.workers
        started = time.monotonic()
        worker = str(Path(__file__).with_name("edge.py"))
        for index in range(parts):
            spec = {
                **self._spec(),
                "channels": self.plan.channels,
                "key": "text",
                "groups": {"c": {"count": share(total, parts, index), "scopes": [self.parent]}},
            }
            self.workers.append(
                await Child.start(
                    f"{self.path.key} worker {index}", worker, "worker", json.dumps(spec)
                )
            )
        readies = await asyncio.gather(*(w.answer(300) for w in self.workers))
        failed = sum(r["failed"] for r in readies)
        if failed:
            errors = merge_counts(r["errors"] for r in readies)
            raise RuntimeError(f"{self.path.key}: {failed} subscriptions failed to open: {errors}")
        await self.edge.server.send("stats")
        live = (await self.edge.server.answer(30))["subscribers"]
        if live != total:
            raise RuntimeError(
                f"{self.path.key}: the server holds {live} subscriptions, not {total}"
            )
        return time.monotonic() - started

    async def phase(self, tag: str, rate: float) -> dict[str, Any]:
        """One write at ``rate``; its figures, and (with subscribers) the deliveries'."""
        assert self.writer is not None
        cpu = CpuMeter(
            self.edge.server.pid,
            self.edge.envoy_pid,
            self.writer.pid,
            *(w.pid for w in self.workers),
        )
        with cpu.measure():
            await self.writer.send(
                json.dumps({"tag": tag, "rate": rate, "seconds": self.plan.seconds})
            )
            done = await self.writer.answer(self.plan.seconds + 120)
        wall = max(cpu.wall, 1e-9)
        result: dict[str, Any] = {
            "rate": rate,
            "subscribers": self.plan.subscribers if self.workers else 0,
            "count": done["count"],
            "lag_max_ms": done["lag_max_ms"],
            "append": done["append"],
            "errors": done["errors"],
            "server_cpu": round(cpu.used[0] / wall, 3),
            "envoy_cpu": round(cpu.used[1] / wall, 3),
            "writer_cpu": round(cpu.used[2] / wall, 3),
            "workers_cpu": round(sum(cpu.used[3:]) / wall, 3),
            "server_cpu_s": round(cpu.used[0], 3),
        }
        if self.workers:
            result.update(await self._deliveries(tag, done["count"]))
            result["server_us_per_delivery"] = round(
                cpu.used[0] * 1e6 / max(result["delivered"], 1), 1
            )
        say(f"  {self.path.key} {tag}: {json.dumps(result)}")
        return result

    async def _deliveries(self, tag: str, count: int) -> dict[str, Any]:
        wait = {"op": "wait", "tag": tag, "count": count, "groups": ["c"], "timeout": 60.0}
        waits = await asyncio.gather(*(w.ask(wait, 120) for w in self.workers))
        reports = await asyncio.gather(*(w.ask({"op": "report"}, 60) for w in self.workers))
        hist = added(bucket for report in reports for bucket in report["hists"].get(tag, ()))
        receivers = sum(w["expected"] for w in waits)
        delivered = sum(hist.values())
        frames = sum(r["frames"] for r in reports)
        missing = count * receivers - sum(w["received"] for w in waits)
        return {
            "expected": count * receivers,
            "delivered": delivered,
            "lost": missing + sum(r["gaps"] + r["dups"] for r in reports),
            "events_per_frame": round(delivered / max(frames, 1), 2),
            "stream_ends": merge_counts(r["errors"] for r in reports),
            "delivery_p50_ms": round(histogram_percentile(hist, 0.5, upper_s) * 1000, 1),
            "delivery_p99_ms": round(histogram_percentile(hist, 0.99, upper_s) * 1000, 1),
            "delivery_max_ms": round(histogram_percentile(hist, 1.0, upper_s) * 1000, 1),
        }

    async def close(self) -> None:
        for child in (*self.workers, *([self.writer] if self.writer else [])):
            await child.close()
        self.workers = []


async def one_path(edge: Edge, path: Route, plan: Plan, round_no: int) -> dict[str, Any]:
    """Alone (the baseline), then with the subscribers at each rate."""
    account = Account(edge.token, "")
    async with aio.insecure_channel(edge.address("server")) as channel:
        (parent,) = await create_conversations(
            channel, account, ["workspaces/bench"], title=f"{path.key} {round_no}"
        )
    run = Run(edge, path, plan, parent)
    try:
        await run.start_writer()
        top = plan.rates[-1]
        result: dict[str, Any] = {"alone": await run.phase(f"a{round_no}", top)}
        result["connect_s"] = round(await run.connect(), 2)
        for rate in plan.rates:
            result[f"{rate:g}"] = await run.phase(f"r{round_no}x{rate:g}", rate)
        return result
    finally:
        await run.close()


async def drive(plan: Plan) -> dict[str, Any]:
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in plan.paths}
    async with edge_up(
        "switchboard-events", SERVER_ENV, *SERVER_SETTINGS, envoy_workers=plan.envoy_workers
    ) as edge:
        chosen = [route for route in PATHS if route.key in plan.paths]
        for round_no in range(plan.rounds):
            shift = round_no % len(chosen)
            for path in (*chosen[shift:], *chosen[:shift]):
                say(f"round {round_no + 1}: {path.key}, {plan.subscribers} subscribers")
                runs[path.key].append(await one_path(edge, path, plan, round_no))
    return {"runs": runs, "seconds": round(time.monotonic() - started)}


# ---------------------------------------------------------------------------------
# The report.


def _row(path: Route, round_no: int, case: str, f: dict[str, Any]) -> str:
    a = f["append"]
    cpu = " / ".join(f"{f[key]:.2f}" for key in CPU_KEYS)
    if f["subscribers"]:
        delivery = (
            f"{f['delivered']}/{f['expected']} | {f['lost']} | {f['events_per_frame']:.1f} "
            f"| {f['delivery_p50_ms']:.1f} | **{f['delivery_p99_ms']:.1f}** "
            f"| {f['delivery_max_ms']:.1f} | {f['server_us_per_delivery']:.1f}"
        )
    else:
        delivery = "- | - | - | - | - | - | -"
    errors = sum(f["errors"].values())
    return (
        f"| {round_no + 1} | {path.label} | {case} | {a['calls']} | {errors} | {a['p50_ms']:.1f} "
        f"| **{a['p99_ms']:.1f}** | {a['max_ms']:.1f} | {delivery} | {cpu} |"
    )


def _workers(plan: Plan) -> str:
    return (
        "one worker thread" if plan.envoy_workers == 1 else f"{plan.envoy_workers} worker threads"
    )


def _writer_path(plan: Plan) -> str:
    return (
        "directly on the server, whatever the subscribers' path,"
        if plan.writer_direct
        else "on the same path"
    )


def render(results: dict[str, Any], plan: Plan, command: str) -> str:
    runs = results["runs"]
    rows: list[str] = []
    chosen = [route for route in PATHS if route.key in runs]
    for path in chosen:
        for round_no, run in enumerate(runs[path.key]):
            rows.append(_row(path, round_no, f"alone, {plan.rates[-1]:g}/s", run["alone"]))
            for rate in plan.rates:
                case = f"{plan.subscribers} subscribers, {rate:g}/s"
                rows.append(_row(path, round_no, case, run[f"{rate:g}"]))
    top = f"{plan.rates[-1]:g}"
    verdicts = []
    for path in chosen:
        loaded = [run[top] for run in runs[path.key]]
        alone = [run["alone"]["append"]["p99_ms"] for run in runs[path.key]]
        append_p99 = median(r["append"]["p99_ms"] for r in loaded)
        delivery_p99 = median(r["delivery_p99_ms"] for r in loaded)
        lost = sum(r["lost"] + sum(r["errors"].values()) for r in loaded)
        verdicts.append(
            f"- {path.label}, {plan.subscribers} subscribers x {top} appends/s, median of "
            f"{len(loaded)} rounds: AppendMessage p99 **{append_p99:.1f} ms** (budget under "
            f"{APPEND_P99_MS:g} ms: {verdict(append_p99 < APPEND_P99_MS)}; alone in the same "
            f"rounds: {', '.join(f'{v:.1f}' for v in alone)} ms); delivery p99 "
            f"**{delivery_p99:.1f} ms** (budget under {DELIVERY_P99_MS:g} ms: "
            f"{verdict(delivery_p99 < DELIVERY_P99_MS)}); lost or failed: {lost}"
        )
    return "\n".join(
        [
            SECTION,
            "",
            *provenance(command, took_s=results["seconds"]),
            "- shape: `bench/target.py switchboard-events` (the whole assembly on the embedded "
            f"defaults, with {settings_text(SERVER_ENV)} and `{SERVER_SETTINGS[0]}`) and an "
            f"Envoy in front of it (bench/edge.py's, {_workers(plan)}); one conversation per "
            f"path and round, {plan.subscribers} Subscribe streams on it in {plan.workers} "
            f"subscriber processes ({plan.channels} connections each), and one writer process "
            f"calling AppendMessage {_writer_path(plan)} at a fixed rate for "
            f"{plan.seconds:g} s (open loop). Each message's text carries the writer's send "
            "time: delivery latency is receipt minus send, the write included, and every "
            "subscriber checks every message (exactly once, in the server's sequence "
            "order). The baseline, same path and round: the writer with no subscriber. "
            "Paths alternate, their order rotating every round. Everything on loopback, "
            "sharing the two cores.",
            "- CPU columns: cores used while the writer ran by the server, the subscriber "
            "processes, Envoy and the writer. Server µs per delivery: the server's CPU over "
            "the deliveries received (it falls as coalescing puts more events in a frame).",
            "",
            "| round | path | case | appends | failed | AppendMessage p50 ms | p99 ms | max ms "
            "| deliveries received/expected | lost | events per frame | delivery p50 ms "
            "| p99 ms | max ms | server µs per delivery "
            "| CPU server / subscribers / Envoy / writer |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            *verdicts,
            "",
        ]
    )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subscribers", type=int, help="subscribers of the conversation")
    parser.add_argument("--rounds", type=int, help="rounds (each path once per round)")
    parser.add_argument("--seconds", type=float, help="how long each write runs")
    parser.add_argument(
        "--paths", nargs="+", choices=[route.key for route in PATHS], help="only these paths"
    )
    parser.add_argument("--rates", nargs="+", type=float, help="appends/s with subscribers")
    parser.add_argument("--envoy-workers", type=int, help="Envoy's worker threads (default 1)")
    parser.add_argument(
        "--writer-direct",
        action="store_true",
        default=None,
        help="the writer calls the server directly on every path (the subscribers' path alone)",
    )


async def section(args: argparse.Namespace) -> None:
    names = ("subscribers", "rounds", "seconds", "paths", "rates", "envoy_workers", "writer_direct")
    plan = dataclasses.replace(Plan.quick() if args.quick else Plan(), **overrides(args, names))
    results = await drive(plan)
    report(results, render(results, plan, command_line("bench/writers.py")), args)


def main() -> int:
    return section_main(
        __doc__,
        section,
        quick="200 subscribers, short phases, one round",
        options=options,
        roles={"writer": writer},
    )


if __name__ == "__main__":
    raise SystemExit(main())
