"""Event delivery benchmarks: fan-out latency, broadcast to 10,000, memory, coalescing.

    python bench/events.py                 the full run (about 4 minutes); prints the report
    python bench/events.py --quick         small sizes and short phases, to try it out
    python bench/events.py --write         ... and put the report into BENCHMARKS.md
    python bench/events.py --json          one JSON line: the figures and the report (bench/run.py)
    python bench/events.py --only capacity ...   some scenarios: fanout100 fanout1k
                                                  broadcast10k gc capacity

The server is ``bench/target.py switchboard-events`` in its own process; it
publishes through ``deps.bus.publish`` on command, stamping ``event.time`` at
publish. Subscribers are ``EventService/Subscribe`` streams held by worker
processes (``python bench/events.py worker SPEC``, grpc.aio, a few HTTP/2
connections each). A worker reports readiness once every one of its streams has
delivered its first frame (the heartbeat that marks the subscription live), so
publishing starts only when every subscriber is registered. Latency is receipt
wall clock minus ``event.time``, on the same machine. Each event carries
``TAG:i`` as its id, so every subscriber checks that it saw each published
event of its scopes exactly once and in order; anything missing is reported.

Server memory per subscriber is the growth of the server's VmRSS
(/proc/PID/status) from before the first subscriber to all of them connected
and idle, divided by their number.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from grpc import aio

from switchboard.api.events.v1 import events_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench.harness import (
    HERE,
    LINE_LIMIT,
    QUIET_GC_THRESHOLD,
    Child,
    CpuMeter,
    answer,
    bearer,
    command_line,
    dedicated_channel,
    histogram_percentile,
    merge_counts,
    provenance,
    quiet_gc,
    report,
    section_main,
    share,
)

Connection = TypeVar("Connection")
SECTION: Final = "## Event delivery"
SUBSCRIBE: Final = "/switchboard.api.events.v1.EventService/Subscribe"
BENCH: Final = "workspaces/bench"
CONVERSATION: Final = "workspaces/other/conversations/c1"

#: Latency histogram: 10 µs buckets below 100 ms, then 1 ms buckets up to 120 s.
FINE: Final = 10_000
BUCKETS: Final = FINE + 120_000
#: Subscribe calls a worker has in flight before their first frame.
CONNECTING: Final = 256
#: The server's collector thresholds in the "gc-" runs (CPython's default: 700, 10, 10).
#: CPython's own collector thresholds, to show what Switchboard's (a setting) save.
SERVER_GC_TRIAL: Final = (700, 10, 10)
#: How long the capacity runs wait for the backlog after publishing ends.
RESULT_DRAIN_S: Final = 10.0


def upper_s(bucket: int) -> float:
    """The upper edge of a histogram bucket, in seconds."""
    if bucket < FINE:
        return (bucket + 1) / 100_000
    return (bucket - FINE + 101) / 1000


# ---------------------------------------------------------------------------------
# Worker: one process holding many Subscribe streams.


class Subscriber:
    __slots__ = ("dead", "got", "group", "last", "live", "seen")

    def __init__(self, group: str) -> None:
        self.group = group
        #: Per tag: one past the newest index received (by text: how many distinct ones).
        self.seen: dict[str, int] = {}
        #: By text: per tag, the indexes received; the newest message sequence received.
        self.got: dict[str, set[int]] = {}
        self.last = 0
        #: Its first frame arrived (the heartbeat that marks a subscription live).
        self.live = False
        self.dead = False


class Subscribers(abc.ABC, Generic[Connection]):
    """A worker process: holds the streams over its connections, records every event,
    answers the driver's commands. Subclasses say how a stream is opened and read."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.metadata = bearer(spec["token"])
        self.by_text = spec.get("key") == "text"
        self.groups: dict[str, list[Subscriber]] = {
            name: [Subscriber(name) for _ in range(group["count"])]
            for name, group in spec["groups"].items()
        }
        self.total = sum(len(subs) for subs in self.groups.values())
        #: Subscribe calls in flight before their first frame.
        self.gate = asyncio.Semaphore(CONNECTING)
        # Measurements since the last report.
        self.hists: dict[str, list[int]] = {}
        self.bins: dict[int, int] = {}
        self.heartbeats: dict[int, int] = {}  # per second of receipt
        self.frames = 0
        self.gaps = 0
        self.dups = 0
        self.errors: dict[str, int] = {}
        # Readiness.
        self.ready = 0
        self.failed = 0
        self.first_not_heartbeat = 0
        self.settled = asyncio.Event()
        # Completion waits: per tag, the count to reach and who reached it.
        self.targets: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.needed: dict[str, int] = {}
        self.waiters: dict[str, asyncio.Event] = {}
        # Collector pauses of this process: they delay receipt, so they are reported.
        self.gc_pauses: list[float] = []
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pauses.append(time.perf_counter() - self._gc_started)

    # -- what a subclass provides ----------------------------------------------------

    @abc.abstractmethod
    async def connect(self) -> list[Connection]:
        """The worker's ``spec['channels']`` connections to the server."""

    @abc.abstractmethod
    async def follow(
        self, connection: Connection, request: events_pb2.SubscribeRequest, sub: Subscriber
    ) -> str:
        """Read ``sub``'s stream, handing each frame to ``received``; how it ended."""

    @abc.abstractmethod
    async def disconnect(self, connections: list[Connection]) -> None: ...

    # -- the hot path ----------------------------------------------------------------

    def received(self, sub: Subscriber, batch: events_pb2.EventBatch | None) -> None:
        """One frame of ``sub``'s stream: a batch of events, or a heartbeat (None)."""
        if not sub.live:
            sub.live = True
            self.gate.release()
            self.first_not_heartbeat += batch is not None
            self.ready += 1
            self._settle()
        if batch is not None:
            self.record(sub, batch.events)
        else:
            second = int(time.time())
            self.heartbeats[second] = self.heartbeats.get(second, 0) + 1

    def record(self, sub: Subscriber, events: Sequence[events_pb2.Event]) -> None:
        now = time.time()
        self.frames += 1
        slot = int(now * 10)
        self.bins[slot] = self.bins.get(slot, 0) + len(events)
        if self.by_text:
            self.record_messages(sub, events, now)
            return
        seen, targets = sub.seen, self.targets
        for event in events:
            tag, _, number = event.id.partition(":")
            index = int(number)
            stamp = event.time
            self.count(tag, now - stamp.seconds - stamp.nanos * 1e-9)
            expected = seen.get(tag, 0)
            if index != expected:
                if index < expected:
                    self.dups += 1
                    continue
                self.gaps += index - expected
            seen[tag] = index + 1
            target = targets.get(tag)
            if target is not None and expected < target <= index + 1:
                self.reached(tag)

    def count(self, tag: str, latency: float) -> None:
        """One delivery of ``tag`` in the latency histogram."""
        bucket = int(latency * 100_000)
        if bucket >= FINE:
            bucket = min(FINE + int(latency * 1000) - 100, BUCKETS - 1)
        elif bucket < 0:
            bucket = 0
        hist = self.hists.get(tag)
        if hist is None:
            hist = self.hists[tag] = [0] * BUCKETS
        hist[bucket] += 1

    def record_messages(
        self, sub: Subscriber, events: Sequence[events_pb2.Event], now: float
    ) -> None:
        """``spec["key"] == "text"``: MessageCreated events of bench/writers.py, whose text is
        ``TAG:i:SENT``. Concurrent appends may be stored in any order, so each index must
        arrive once, and the messages in the order the server numbered them."""
        targets = self.targets
        for event in events:
            message = event.message_created.message
            tag, number, sent = message.parts[0].text.split(":")
            self.count(tag, now - float(sent))
            if message.sequence <= sub.last:
                self.gaps += 1  # out of order
            sub.last = max(sub.last, message.sequence)
            got = sub.got.setdefault(tag, set())
            if int(number) in got:
                self.dups += 1
                continue
            got.add(int(number))
            sub.seen[tag] = len(got)
            if targets.get(tag) == len(got):
                self.reached(tag)

    def reached(self, tag: str) -> None:
        """One more subscriber has every event of ``tag`` that ``wait`` waits for."""
        self.done[tag] += 1
        if self.done[tag] >= self.needed[tag]:
            self.waiters[tag].set()

    # -- streams ---------------------------------------------------------------------

    async def _subscribe(
        self, connection: Connection, request: events_pb2.SubscribeRequest, sub: Subscriber
    ) -> None:
        await self.gate.acquire()
        outcome = await self.follow(connection, request, sub)
        # The stream ended (an error, or the server closed it): this subscriber is gone.
        if not sub.live:
            self.gate.release()
            self.failed += 1
            self._settle()
        sub.dead = True
        self.errors[outcome] = self.errors.get(outcome, 0) + 1
        for waiter in self.waiters.values():
            waiter.set()

    def _settle(self) -> None:
        if self.ready + self.failed >= self.total:
            self.settled.set()

    # -- commands ----------------------------------------------------------------------

    async def wait(
        self, tag: str, count: int, groups: list[str], timeout_s: float
    ) -> dict[str, Any]:
        """Until every subscriber of ``groups`` has seen ``count`` events of ``tag``."""
        relevant = [sub for name in groups for sub in self.groups.get(name, ())]
        self.targets[tag] = count
        self.needed[tag] = len(relevant)
        self.done[tag] = sum(sub.seen.get(tag, 0) >= count for sub in relevant)
        waiter = self.waiters[tag] = asyncio.Event()
        if self.done[tag] >= len(relevant):
            waiter.set()
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout_s
        while self.done[tag] + sum(sub.dead for sub in relevant) < len(relevant):
            try:
                async with asyncio.timeout(deadline - loop.time()):
                    await waiter.wait()
            except TimeoutError:
                break
            waiter.clear()
        received = [min(sub.seen.get(tag, 0), count) for sub in relevant]
        return {
            "expected": len(relevant),
            "complete": self.done[tag],
            "dead": sum(sub.dead for sub in relevant),
            "received": sum(received),
            "waited_s": round(loop.time() - started, 3),
        }

    def report(self) -> dict[str, Any]:
        """Everything measured since the previous report (then forgotten)."""
        times = os.times()
        answer = {
            "hists": {
                tag: [[b, n] for b, n in enumerate(hist) if n] for tag, hist in self.hists.items()
            },
            "bins": sorted(self.bins.items()),
            "heartbeats": sorted(self.heartbeats.items()),
            "frames": self.frames,
            "gaps": self.gaps,
            "dups": self.dups,
            "errors": self.errors,
            "cpu_s": times.user + times.system,
            "gc_max_ms": round(max(self.gc_pauses, default=0.0) * 1000, 3),
            "gc_total_ms": round(sum(self.gc_pauses) * 1000, 3),
        }
        self.gc_pauses = []
        self.hists, self.bins, self.heartbeats, self.errors = {}, {}, {}, {}
        self.frames = self.gaps = self.dups = 0
        return answer

    async def run(self) -> None:
        """Open every stream; once each is live (or failed), say so, then serve commands."""
        started = time.monotonic()
        connections = await self.connect()
        tasks: list[asyncio.Task[None]] = []
        for name, group in self.spec["groups"].items():
            request = events_pb2.SubscribeRequest(scopes=[_scope(s) for s in group["scopes"]])
            for sub in self.groups[name]:
                connection = connections[len(tasks) % len(connections)]
                tasks.append(asyncio.create_task(self._subscribe(connection, request, sub)))
        try:
            if self.total == 0:
                self.settled.set()
            await self.settled.wait()
            # One process here stands for thousands of clients holding one stream each:
            # keep its collector from pausing it (and inflating the latency it measures).
            quiet_gc()
            self.gc_pauses = []
            answer(
                {
                    "ready": self.ready,
                    "failed": self.failed,
                    "errors": self.errors,
                    "first_not_heartbeat": self.first_not_heartbeat,
                    "connect_s": round(time.monotonic() - started, 3),
                }
            )
            await self.serve_commands()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.disconnect(connections)

    async def serve_commands(self) -> None:
        """The driver's commands (``wait``, ``report``), one JSON line each, until stdin ends."""
        loop = asyncio.get_running_loop()
        commands = asyncio.StreamReader(limit=LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
        while line := await commands.readline():
            command = json.loads(line)
            if command["op"] == "wait":
                answer(
                    await self.wait(
                        command["tag"], command["count"], command["groups"], command["timeout"]
                    )
                )
            elif command["op"] == "report":
                answer(self.report())
            else:
                answer({"error": f"unknown command {command!r}"})


Subscribe = aio.UnaryStreamMultiCallable[events_pb2.SubscribeRequest, events_pb2.SubscribeResponse]


class Worker(Subscribers[tuple[aio.Channel, Subscribe]]):
    """Subscribe streams over grpc.aio channels."""

    async def connect(self) -> list[tuple[aio.Channel, Subscribe]]:
        connections = []
        for _ in range(self.spec["channels"]):
            opened = dedicated_channel(self.spec["address"])
            subscribe = opened.unary_stream(
                SUBSCRIBE,
                request_serializer=events_pb2.SubscribeRequest.SerializeToString,
                response_deserializer=events_pb2.SubscribeResponse.FromString,
            )
            connections.append((opened, subscribe))
        return connections

    async def follow(
        self,
        connection: tuple[aio.Channel, Subscribe],
        request: events_pb2.SubscribeRequest,
        sub: Subscriber,
    ) -> str:
        try:
            async for frame in connection[1](request, metadata=self.metadata):
                self.received(sub, frame.batch if frame.WhichOneof("frame") == "batch" else None)
        except aio.AioRpcError as err:
            return err.code().name
        return "ended"

    async def disconnect(self, connections: list[tuple[aio.Channel, Subscribe]]) -> None:
        for opened, _ in connections:
            await opened.close(None)


def _scope(name: str) -> events_pb2.Scope:
    if name.count("/") == 3:
        return events_pb2.Scope(conversation=name)
    return events_pb2.Scope(workspace=name)


# ---------------------------------------------------------------------------------
# Driver.


@dataclass(frozen=True)
class Publish:
    tag: str
    rate: float
    seconds: float
    scope: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Phase:
    name: str
    publishes: tuple[Publish, ...]
    drain_s: float = 30.0
    #: Skipped at the start of the publishing window when measuring throughput.
    warm_s: float = 1.0


@dataclass(frozen=True)
class Scenario:
    name: str
    #: group -> (subscribers, scopes each follows)
    groups: dict[str, tuple[int, tuple[str, ...]]]
    phases: tuple[Phase, ...]
    overrides: tuple[str, ...] = ()
    connect_timeout_s: float = 180.0


@dataclass
class Options:
    workers: int = 2
    channels: int = 4
    verbose: bool = True

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)


async def run_phase(
    server: Child, workers: list[Child], phase: Phase, options: Options
) -> dict[str, Any]:
    options.say(f"  phase {phase.name}: publishing")
    cpu = CpuMeter(server.pid, *(w.pid for w in workers))
    cpu.start()
    for p in phase.publishes:
        await server.send(f"publish {p.tag} {p.rate:g} {p.seconds:g} {p.scope}")
    dones: dict[str, dict[str, Any]] = {}
    longest = max(p.seconds for p in phase.publishes)
    while len(dones) < len(phase.publishes):
        message = await server.answer(longest + 120)
        dones[message["done"]] = message
    cpu.stop()
    waits: dict[str, list[dict[str, Any]]] = {}
    for p in phase.publishes:
        command = {
            "op": "wait",
            "tag": p.tag,
            "count": dones[p.tag]["count"],
            "groups": list(p.groups),
            "timeout": phase.drain_s,
        }
        waits[p.tag] = list(
            await asyncio.gather(*(w.ask(command, phase.drain_s + 60) for w in workers))
        )
    reports = await asyncio.gather(*(w.ask({"op": "report"}, 60) for w in workers))
    result = _phase_totals(cpu, reports)
    bins = added(slots for report in reports for slots in report["bins"])
    for p in phase.publishes:
        result[p.tag] = figures = _delivery(p.tag, dones[p.tag], waits[p.tag], reports)
        if len(phase.publishes) == 1:
            figures.update(_rates(figures, dones[p.tag], bins, phase.warm_s))
        options.say(f"    {p.tag}: {json.dumps(figures)}")
    options.say(
        f"    cpu: server {result['server_cpu']:.2f}, workers {result['workers_cpu']:.2f}, "
        f"others {result['other_cpu']:.2f} cores; "
        f"gaps {result['gaps']}, dups {result['dups']}, stream ends {result['stream_errors']}, "
        f"heartbeats {result['heartbeats']} (peak {result['heartbeat_peak_per_s']}/s), "
        f"workers' gc max {result['workers_gc_max_ms']} ms"
    )
    return result


def added(pairs: Iterable[Sequence[int]]) -> dict[int, int]:
    """(key, count) pairs from several workers, counts of the same key added."""
    total: dict[int, int] = {}
    for key, n in pairs:
        total[key] = total.get(key, 0) + n
    return total


def _phase_totals(cpu: CpuMeter, reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The phase's CPU (while publishing ran) and what every worker saw, all tags."""
    wall = max(cpu.wall, 1e-9)
    server_cpu = cpu.used[0] / wall
    worker_cpu = sum(cpu.used[1:]) / wall
    # Everything else on the machine meanwhile (this driver included).
    other_cpu = cpu.machine / wall - server_cpu - worker_cpu
    beats = added(second for report in reports for second in report["heartbeats"])
    return {
        "server_cpu": round(server_cpu, 3),
        "workers_cpu": round(worker_cpu, 3),
        "other_cpu": round(max(other_cpu, 0.0), 3),
        "frames": sum(r["frames"] for r in reports),
        "gaps": sum(r["gaps"] for r in reports),
        "dups": sum(r["dups"] for r in reports),
        "stream_errors": merge_counts(r["errors"] for r in reports),
        "workers_gc_max_ms": max(r["gc_max_ms"] for r in reports),
        "workers_gc_total_ms": round(sum(r["gc_total_ms"] for r in reports), 3),
        # Heartbeats received since the previous phase; a peak is a synchronized wave.
        "heartbeats": sum(beats.values()),
        "heartbeat_peak_per_s": max(beats.values(), default=0),
        "heartbeat_seconds": sorted(beats.items()),
    }


def _delivery(
    tag: str,
    done: dict[str, Any],
    waits: Sequence[dict[str, Any]],
    reports: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """One publish's figures: the server's answer, the workers' waits and histograms."""
    hist = added(bucket for report in reports for bucket in report["hists"].get(tag, ()))
    receivers = sum(w["expected"] for w in waits)
    return {
        "published": done["count"],
        "publish_s": round(done["end"] - done["start"], 3),
        "publish_lag_max_ms": done["lag_max_ms"],
        "queued_p50_ms": done["queued_p50_ms"],
        "queued_p99_ms": done["queued_p99_ms"],
        "server_gc_max_ms": done["gc_max_ms"],
        "server_gc_total_ms": done["gc_total_ms"],
        "server_gc_cpu_max_ms": done["gc_cpu_max_ms"],
        "server_gc_cpu_total_ms": done["gc_cpu_total_ms"],
        "server_gc_count_by_generation": done["gc_count_by_generation"],
        "server_gc_max_ms_by_generation": done["gc_max_ms_by_generation"],
        "receivers": receivers,
        "complete": sum(w["complete"] for w in waits),
        "dead": sum(w["dead"] for w in waits),
        "expected_deliveries": done["count"] * receivers,
        "delivered": sum(hist.values()),
        "missing": done["count"] * receivers - sum(w["received"] for w in waits),
        "p50_ms": round(histogram_percentile(hist, 0.50, upper_s) * 1000, 2),
        "p99_ms": round(histogram_percentile(hist, 0.99, upper_s) * 1000, 2),
        "max_ms": round(histogram_percentile(hist, 1.0, upper_s) * 1000, 2),
        "drain_wait_s": max(w["waited_s"] for w in waits),
    }


def _rates(
    figures: dict[str, Any], done: dict[str, Any], bins: dict[int, int], warm_s: float
) -> dict[str, float]:
    """Deliveries per second offered, and received while publishing ran after the warm-up
    (``bins``: deliveries per 100 ms of receipt)."""
    rates = {
        "offered_per_s": round(
            figures["expected_deliveries"] / max(done["end"] - done["start"], 1e-9), 1
        )
    }
    first = math.ceil((done["start"] + warm_s) * 10)
    last = math.floor(done["end"] * 10)
    if last > first:
        in_window = sum(n for slot, n in bins.items() if first <= slot < last)
        rates["delivered_per_s"] = round(in_window / ((last - first) / 10), 1)
    return rates


async def run_scenario(scenario: Scenario, options: Options) -> dict[str, Any]:
    total = sum(count for count, _ in scenario.groups.values())
    options.say(f"scenario {scenario.name}: {total} subscribers {' '.join(scenario.overrides)}")
    server = await Child.start(
        "server", str(HERE / "target.py"), "switchboard-events", *scenario.overrides
    )
    workers: list[Child] = []
    try:
        port, token = (await server.line(60)).split()
        await server.send("stats")
        await server.answer(10)
        rss_before = server.rss_kib()
        parts = max(1, min(options.workers, total))
        started = time.monotonic()
        for index in range(parts):
            spec = {
                "address": f"127.0.0.1:{port}",
                "token": token,
                "channels": options.channels,
                "groups": {
                    name: {"count": share(count, parts, index), "scopes": list(scopes)}
                    for name, (count, scopes) in scenario.groups.items()
                },
            }
            workers.append(
                await Child.start(f"worker {index}", __file__, "worker", json.dumps(spec))
            )
        readies = await asyncio.gather(*(w.answer(scenario.connect_timeout_s) for w in workers))
        connect_s = time.monotonic() - started
        failed = sum(r["failed"] for r in readies)
        if failed:
            errors = merge_counts(r["errors"] for r in readies)
            raise RuntimeError(f"{failed} subscriptions failed to open: {errors}")
        await server.send("stats")
        live = (await server.answer(30))["subscribers"]
        rss_idle = server.rss_kib()
        result: dict[str, Any] = {
            "subscribers": total,
            "live_in_fanout": live,
            "first_frame_not_heartbeat": sum(r["first_not_heartbeat"] for r in readies),
            "connect_s": round(connect_s, 2),
            "server_rss_before_kib": rss_before,
            "server_rss_idle_kib": rss_idle,
            "kib_per_subscriber": round((rss_idle - rss_before) / total, 2),
            "overrides": list(scenario.overrides),
        }
        options.say(f"  {json.dumps(result)}")
        for phase in scenario.phases:
            result[phase.name] = await run_phase(server, workers, phase, options)
        return result
    finally:
        for worker in workers:
            await worker.close()
        await server.close()


def scenarios(quick: bool, capacity_rate: float) -> list[Scenario]:
    small, medium, large, cap = (50, 200, 1_000, 200) if quick else (100, 1_000, 10_000, 1_000)
    steady = 3.0 if quick else 30.0  # p99 over 30 s takes in several full collections
    seconds = 3.0 if quick else 15.0
    short = 3.0 if quick else 10.0
    ws = BENCH
    conv_receivers = 10
    fanout1k = Scenario(
        "fanout1k",
        {"ws": (medium, (ws,))},
        (Phase("steady", (Publish("s2", 10, steady, ws, ("ws",)),)),),
    )
    broadcast10k = Scenario(
        "broadcast10k",
        {
            "ws": (large - conv_receivers, (ws,)),
            "conv": (conv_receivers, (ws, CONVERSATION)),
        },
        (
            Phase("broadcast", (Publish("b", 1, seconds, ws, ("ws", "conv")),)),
            Phase("conversation", (Publish("c", 10, short, CONVERSATION, ("conv",)),)),
            Phase(
                "mixed",
                (
                    Publish("b2", 1, short, ws, ("ws", "conv")),
                    Publish("c2", 10, short, CONVERSATION, ("conv",)),
                ),
            ),
        ),
        connect_timeout_s=300.0,
    )
    # The same runs on CPython's default collector thresholds: what its pauses cost.
    tuned = ("gc_threshold=" + ",".join(str(n) for n in SERVER_GC_TRIAL),)
    return [
        Scenario(
            "fanout100",
            {"ws": (small, (ws,))},
            (Phase("steady", (Publish("s1", 10, steady, ws, ("ws",)),)),),
        ),
        fanout1k,
        dataclasses.replace(fanout1k, name="gc-fanout1k", overrides=tuned),
        broadcast10k,
        dataclasses.replace(broadcast10k, name="gc-broadcast10k", overrides=tuned),
        *(
            Scenario(
                f"capacity-batch{batch}",
                {"ws": (cap, (ws,))},
                (
                    Phase(
                        "saturated",
                        (
                            Publish(
                                f"k{batch}", capacity_rate, 8.0 if not quick else 4.0, ws, ("ws",)
                            ),
                        ),
                        drain_s=RESULT_DRAIN_S,
                        warm_s=2.0 if not quick else 1.0,
                    ),
                ),
                overrides=(
                    "events_subscriber_buffer=100000",
                    *(("events_max_batch=1",) if batch == 1 else ()),
                ),
            )
            for batch in (1, 256)
        ),
    ]


def _broadcast_cases(n: int) -> list[tuple[str, str, str, str]]:
    """(label, phase, tag, p99 budget) of the 10,000-subscriber scenario's rows."""
    return [
        (f"{n} connected: broadcast, 1 event/s to all", "broadcast", "b", "< 1500"),
        (
            f"{n} connected: one conversation (10 subscribers), 10 events/s, others idle",
            "conversation",
            "c",
            "< 50",
        ),
        (f"{n} connected, both at once: the broadcast", "mixed", "b2", "< 1500"),
        (f"{n} connected, both at once: the conversation", "mixed", "c2", "< 50"),
    ]


def _cpu(phase: dict[str, Any]) -> str:
    return f"{phase['server_cpu']:.2f} / {phase['workers_cpu']:.2f} / {phase['other_cpu']:.2f}"


def render(results: dict[str, Any], command: str, options: Options) -> str:
    """The BENCHMARKS.md section."""
    lines = [
        SECTION,
        "",
        *provenance(command),
        "- shape: the server (`bench/target.py switchboard-events`: embedded SQLite log, "
        "default settings except the subscription limits) in one process; subscribers "
        f"(`EventService/Subscribe`, grpc.aio) in {options.workers} worker processes with "
        f"{options.channels} connections each, all on loopback and sharing the cores. Events "
        "are ~400-byte MessageCreated envelopes published in the server process through "
        "`EventBus.publish` (which stores them in the log before delivery); latency is "
        "receipt wall clock minus `event.time` (stamped at publish). Publishing starts once "
        "every subscriber has had its first frame (the heartbeat marking it live). The "
        "subscriber processes freeze their heap once connected and raise their own "
        f"collector thresholds to {QUIET_GC_THRESHOLD}: each stands for thousands of "
        "clients, and its pauses would otherwise count as delivery latency.",
        "- CPU columns: cores used while publishing ran by the server, by the subscriber "
        "processes, and by everything else on the machine (other jobs share it).",
        "",
    ]
    lines += _latency_section(results)
    lines += _memory_section(results, options)
    lines += _gc_section(results)
    lines += _capacity_section(results)
    return "\n".join(lines)


def _latency_section(results: dict[str, Any]) -> list[str]:
    cases: list[tuple[str, dict[str, Any], dict[str, Any], str]] = []
    if "fanout100" in results:
        r = results["fanout100"]
        cases.append(
            (f"{r['subscribers']} subscribers, 10 events/s", r["steady"]["s1"], r["steady"], "< 25")
        )
    if "fanout1k" in results:
        r = results["fanout1k"]
        cases.append(
            (
                f"{r['subscribers']} subscribers, 10 events/s",
                r["steady"]["s2"],
                r["steady"],
                "< 100",
            )
        )
    if "broadcast10k" in results:
        r = results["broadcast10k"]
        for label, name, tag, budget in _broadcast_cases(r["subscribers"]):
            cases.append((label, r[name][tag], r[name], budget))
    if not cases:
        return []
    rows = []
    for label, f, phase, budget in cases:
        rate = f.get("delivered_per_s")
        rows.append(
            f"| {label} | {f['published']} | {f['delivered']}/{f['expected_deliveries']} "
            f"| {'-' if rate is None else f'{rate:.0f}'} | {f['p50_ms']:.1f} "
            f"| **{f['p99_ms']:.1f}** | {f['max_ms']:.1f} | {budget} "
            f"| {f['queued_p50_ms']:.1f} / {f['queued_p99_ms']:.1f} "
            f"| {f['server_gc_max_ms']:.0f} "
            f"| {_cpu(phase)} | {f['missing'] + phase['gaps'] + phase['dups']} |"
        )
    return [
        "### Delivery latency, publish to receipt",
        "",
        "| case | events published | deliveries received/expected | delivered/s "
        "| p50 ms | p99 ms | max ms | p99 budget ms "
        "| in the server: publish to queued, p50 / p99 ms "
        "| server's longest GC pause ms | CPU server / subscribers / others | lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "delivered/s: deliveries received while publishing ran, after its first second. "
        "In the server: from `event.time` to the event being stored in the log and queued "
        "for every subscriber (a bus listener after the fan-out), so the rest of the "
        "latency is the Subscribe writers, gRPC and the subscriber processes. lost: events "
        "a subscriber never received, or received twice or out of order (each subscriber "
        "checks every event id of its scopes).",
        "",
    ]


def _memory_section(results: dict[str, Any], options: Options) -> list[str]:
    memory = [
        (r["subscribers"], r)
        for name, r in results.items()
        if name in ("fanout100", "fanout1k", "broadcast10k")
    ]
    if not memory:
        return []
    lines = [
        "### Server memory per idle subscriber",
        "",
        "| subscribers | connections | all connected in s | server VmRSS before MiB "
        "| all connected, idle MiB | KiB per subscriber |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in memory:
        lines.append(
            f"| {n} | {min(options.workers, n) * options.channels} | {r['connect_s']:.1f} "
            f"| {r['server_rss_before_kib'] / 1024:.1f} "
            f"| {r['server_rss_idle_kib'] / 1024:.1f} "
            f"| **{r['kib_per_subscriber']:.1f}** |"
        )
    opened = sum(r["subscribers"] for r in results.values())
    odd_first = sum(r["first_frame_not_heartbeat"] for r in results.values())
    unmatched = sum(r["subscribers"] != r["live_in_fanout"] for r in results.values())
    return [
        *lines,
        "",
        "VmRSS growth from before the first subscriber to all of them connected and idle, "
        "divided by their number (one Subscribe stream each, over the connections listed). "
        f"Of the {opened} subscriptions opened in this run, {odd_first} had a first frame "
        "other than the heartbeat; in "
        f"{unmatched} of {len(results)} runs the server's fan-out did not hold exactly the "
        "subscriptions the workers had open.",
        "",
    ]


def _gc_section(results: dict[str, Any]) -> list[str]:
    rows: list[str] = []
    n1k = results.get("fanout1k", {}).get("subscribers", 0)
    for name, cases in (
        ("fanout1k", [(f"{n1k} subscribers, 10 events/s", "steady", "s2", "< 100")]),
        ("broadcast10k", _broadcast_cases(results.get("broadcast10k", {}).get("subscribers", 0))),
    ):
        if name not in results or f"gc-{name}" not in results:
            continue
        for label, phase, tag, budget in cases:
            for collector, r in (
                ("CPython default", results[f"gc-{name}"]),
                ("Switchboard default", results[name]),
            ):
                f = r[phase][tag]
                counts = "/".join(str(n) for n in f["server_gc_count_by_generation"])
                rows.append(
                    f"| {label} | {collector} | {f['p50_ms']:.1f} | **{f['p99_ms']:.1f}** "
                    f"| {budget} | {f['server_gc_max_ms']:.0f} "
                    f"| {f['server_gc_cpu_total_ms'] / max(f['publish_s'], 1e-9):.0f} "
                    f"| {counts} | {r[phase]['server_cpu']:.2f} |"
                )
    if not rows:
        return []
    return [
        "### What the server's garbage collector costs",
        "",
        "The same cases with the server on CPython's collector thresholds "
        f"{SERVER_GC_TRIAL} and on Switchboard's default (`SWITCHBOARD_GC_THRESHOLD`, "
        "100000,50,1000, applied with `gc.freeze()` after start-up by `switchboard serve` "
        "and by the benchmark target). Each subscription keeps a few dozen long-lived "
        "objects (asyncio tasks and events, gRPC call state, queues), so full collections "
        "walk hundreds of thousands of objects; frequent collections are triggered by "
        "the per-frame allocations of a fan-out.",
        "",
        "| case | server collector | p50 ms | p99 ms | p99 budget ms "
        "| longest GC pause ms | GC CPU ms per s | collections gen0/1/2 | server CPU |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _capacity_section(results: dict[str, Any]) -> list[str]:
    if "capacity-batch1" not in results or "capacity-batch256" not in results:
        return []
    one = results["capacity-batch1"]["saturated"]
    many = results["capacity-batch256"]["saturated"]
    f1, f256 = one["k1"], many["k256"]
    ratio = f256.get("delivered_per_s", 0) / max(f1.get("delivered_per_s", 0), 1e-9)
    n = results["capacity-batch1"]["subscribers"]
    rate = f1["published"] / max(f1["publish_s"], 1e-9)
    lines = [
        "### Coalescing: fan-out capacity at a saturating publish rate",
        "",
        f"{n} subscribers of one workspace; {f1['published']} events published at "
        f"{rate:.0f}/s (offered: {f1['offered_per_s']:.0f} deliveries/s); "
        "`events_subscriber_buffer` raised to 100,000 so the backlog does not end "
        "subscriptions. delivered/s: deliveries received while publishing ran, after "
        "the warm-up; what was still queued when publishing ended is delivered after it "
        f"(given {RESULT_DRAIN_S:g} s more).",
        "",
        "| events_max_batch | delivered/s | events per frame | p50 ms | p99 ms "
        "| deliveries received/expected when the wait ended | subscribers with every event "
        "| CPU server / subscribers / others | lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for batch, f, phase in ((1, f1, one), (256, f256, many)):
        per_frame = f["delivered"] / max(phase["frames"], 1)
        lines.append(
            f"| {batch}{' (default)' if batch == 256 else ''} "
            f"| **{f.get('delivered_per_s', 0):.0f}** | {per_frame:.1f} "
            f"| {f['p50_ms']:.0f} | {f['p99_ms']:.0f} "
            f"| {f['delivered']}/{f['expected_deliveries']} "
            f"| {f['complete']}/{f['receivers']} "
            f"| {_cpu(phase)} | {phase['gaps'] + phase['dups']} |"
        )
    return [*lines, "", f"- capacity with coalescing / without: **{ratio:.1f}x**", ""]


async def drive(args: argparse.Namespace) -> int:
    options = Options(workers=args.workers, channels=args.channels)
    chosen = [
        dataclasses.replace(s, overrides=(*s.overrides, *args.server_setting))
        for s in scenarios(args.quick, args.capacity_rate)
        if _wanted(s.name, args.only)
    ]
    results: dict[str, Any] = {}
    started = time.monotonic()
    for scenario in chosen:
        results[scenario.name] = await run_scenario(scenario, options)
    options.say(f"done in {time.monotonic() - started:.0f} s")
    text = render(results, command_line("bench/events.py"), options)
    report(results, text, args)
    return 0


def _wanted(name: str, only: Sequence[str] | None) -> bool:
    if not only:
        return True
    return any(name == o or name.startswith(f"{o}-") for o in only)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="subscriber processes")
    parser.add_argument("--channels", type=int, default=4, help="connections per worker")
    parser.add_argument(
        "--capacity-rate", type=float, default=1000.0, help="events/s in the capacity runs"
    )
    parser.add_argument(
        "--server-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a server setting for every scenario (or gc_threshold=G0,G1,G2); repeatable",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["fanout100", "fanout1k", "broadcast10k", "gc", "capacity"],
        help="run only these scenarios",
    )


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="small sizes, short phases",
        options=options,
        roles={"worker": lambda spec: Worker(spec).run()},
    )


if __name__ == "__main__":
    raise SystemExit(main())
