"""Dispatcher benchmarks: time to the first delta, sustained runs/s, SendMessage QPS.

    python bench/dispatcher.py                the full run (about 5 minutes); prints the report
    python bench/dispatcher.py --quick        a few seconds per case, to try it out (< 2 min)
    python bench/dispatcher.py --write        ... and put the report into BENCHMARKS.md
    python bench/dispatcher.py --json         one JSON line, figures and report (bench/run.py)
    python bench/dispatcher.py --only qps     some scenarios: latency throughput qps
    python bench/dispatcher.py --profile      ... plus py-spy on the server (an extra, unmeasured
                                              run of some cases; needs py-spy, --py-spy PATH)

The server is a real ``switchboard serve --dev --port 0`` process (``python -m
switchboard.cli``: embedded SQLite, in-memory cache and event log, JSON access
log to a file), started fresh for every case by ``bench/harness.py``'s
``serve``. Its settings are the defaults except the per-user and per-workspace
message rate limits and the per-user context write limit, lifted because one
account drives every conversation, and, for the SendMessage QPS case, the queue
bounds (see ``SERVER_SETTINGS`` / ``QPS_SETTINGS``). The user, the workspaces
and the conversations are created through the RPCs; conversations are spread
over workspaces of at most ``PER_WORKSPACE`` each, so the per-workspace running
limit (16 by default) never binds and the global one (64) does.

Every measured call comes from a separate client process (``python
bench/dispatcher.py client SPEC``, grpc.aio) over loopback; both share the cores.

1. Latency: each conversation runs one client loop: SendMessage (the built-in
   ``echo`` handler), then WatchRun on the returned run with ``after_sequence=0``,
   read to its end; the next message only once the run reached a terminal state.
   Latency to the first delta is from just before SendMessage is called to the
   first ``delta`` update received on the WatchRun stream.
2. Throughput: the same loop with fewer conversations; runs that reached a
   terminal state per second. Afterwards every run of every conversation is
   listed (ListRuns) and counted by state: each must be SUCCEEDED.
3. SendMessage QPS: 16 callers on one channel in a closed loop, sending
   round-robin over 200 conversations, against a bare ``grpc.aio`` server in
   its own process (``python bench/dispatcher.py bare``: one unary echo RPC,
   generic handler, bytes in and out, no interceptors) fed the same request
   bytes; the cases are interleaved round by round and the median round shown.
   The runs that SendMessage starts execute on the same server meanwhile; how
   many were still waiting when the load stopped is counted (ListRuns), and the
   backlog is left to drain before the server stops, every run checked.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.dispatcher.runs.core.store import TERMINAL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench import pyspy
from bench.fixtures import Account, create_conversations, create_workspace, register
from bench.harness import (
    SERVED,
    CpuMeter,
    Window,
    bearer,
    clients,
    command_line,
    dedicated_channel,
    errors_text,
    gather_limited,
    host_speed_line,
    middle,
    provenance,
    python,
    quiet_gc,
    report,
    run_client,
    running,
    say,
    section_main,
    serve,
    session,
    settings_text,
    summary,
    verdict,
    wait_quiet,
)
from bench.micro import write_after_idle

SECTION: Final = "## Dispatcher"
ECHO_METHOD: Final = "/bench.v1.Echo/Echo"
#: The message every run answers (13 words: 13 deltas plus the echo's trailer).
MESSAGE: Final = "Can you check the status of the database migration for the platform team?"
#: Conversations per workspace: below the per-workspace running limit (16 by default).
PER_WORKSPACE: Final = 10
#: One account drives every conversation: its rate limits are lifted, as for many users.
SERVER_SETTINGS: Final[dict[str, str]] = {
    "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_USER": "10000000",
    "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_WORKSPACE": "10000000",
    "SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "10000000",
}
#: SendMessage QPS: sends outpace the runs, so the queue bounds are lifted too
#: (otherwise the case measures RESOURCE_EXHAUSTED answers once the queue fills).
QUEUE_SETTINGS: Final[dict[str, str]] = {
    "SWITCHBOARD_DISPATCHER_MAX_QUEUED": "1000000",
    "SWITCHBOARD_DISPATCHER_MAX_QUEUED_PER_WORKSPACE": "1000000",
}
QPS_SETTINGS: Final[dict[str, str]] = {**SERVER_SETTINGS, **QUEUE_SETTINGS}
#: p99 budget of the first delta with 100 conversations active (the issue's).
FIRST_DELTA_P99_BUDGET_MS: Final = 50.0
#: SendMessage QPS / bare echo QPS (the issue's budget).
QPS_RATIO_BUDGET: Final = 0.5
#: Seconds a backlog of runs may take to drain before the check gives up.
DRAIN_TIMEOUT_S: Final = 600.0


@dataclass(frozen=True)
class Sizes:
    latency_conversations: int
    latency_warmup_s: float
    latency_seconds: float
    paced_pause_s: float
    paced_warmup_s: float
    paced_seconds: float
    quiet_wait_s: float
    throughput_conversations: tuple[int, ...]
    throughput_warmup_s: float
    throughput_seconds: float
    qps_conversations: int
    qps_callers: int
    qps_warmup_calls: int
    qps_seconds: float
    qps_rounds: int
    profile_seconds: float


FULL: Final = Sizes(
    latency_conversations=100,
    latency_warmup_s=5.0,
    latency_seconds=20.0,
    paced_pause_s=5.0,
    paced_warmup_s=10.0,
    paced_seconds=30.0,
    quiet_wait_s=60.0,
    throughput_conversations=(32, 64),
    throughput_warmup_s=3.0,
    throughput_seconds=15.0,
    qps_conversations=200,
    qps_callers=16,
    qps_warmup_calls=200,
    qps_seconds=5.0,
    qps_rounds=3,
    profile_seconds=10.0,
)
QUICK: Final = Sizes(
    latency_conversations=100,
    latency_warmup_s=1.0,
    latency_seconds=3.0,
    paced_pause_s=2.0,
    paced_warmup_s=3.0,
    paced_seconds=4.0,
    quiet_wait_s=10.0,
    throughput_conversations=(32,),
    throughput_warmup_s=1.0,
    throughput_seconds=3.0,
    qps_conversations=200,
    qps_callers=16,
    qps_warmup_calls=50,
    qps_seconds=2.0,
    qps_rounds=1,
    profile_seconds=5.0,
)


def _request(conversation: str) -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        conversation=conversation,
        message=cpb.Message(parts=[cpb.ContentPart(text=MESSAGE)]),
    )


# ---------------------------------------------------------------------------------
# The bare server: grpc.aio, one unary echo RPC, no interceptors.


async def _echo(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def bare_main() -> None:
    """Serve the echo on a free port; print it; serve until stdin closes."""
    server = aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.v1.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


@contextlib.contextmanager
def bare_server() -> Iterator[tuple[int, int]]:
    """``bare_main`` in its own process: (port, pid)."""
    with running(python(__file__, "bare")) as process:
        assert process.stdout is not None
        yield int(process.stdout.readline()), process.pid


# ---------------------------------------------------------------------------------
# Set-up and checks through the RPCs (the driver process).


async def make_conversations(channel: aio.Channel, account: Account, count: int) -> list[str]:
    """``count`` conversations over workspaces of at most PER_WORKSPACE each."""
    workspaces = [
        await create_workspace(channel, account, f"bench-{w:03d}", f"Bench {w}")
        for w in range((count + PER_WORKSPACE - 1) // PER_WORKSPACE)
    ]
    parents = [workspaces[i // PER_WORKSPACE] for i in range(count)]
    return await create_conversations(channel, account, parents)


async def settle(
    address: str, account: Account, last_runs: dict[str, str], sent: dict[str, int]
) -> dict[str, Any]:
    """Wait until each conversation's last run ended; then count every run by state."""
    async with dedicated_channel(address) as connection:
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(connection)
        began = time.monotonic()
        pending = dict(last_runs)
        while pending:
            if time.monotonic() - began > DRAIN_TIMEOUT_S:
                break
            answers = await gather_limited(
                [
                    functools.partial(
                        stub.GetRun, pb.GetRunRequest(name=n), metadata=account.metadata, timeout=30
                    )
                    for n in pending.values()
                ]
            )
            for conversation, got in zip(list(pending), answers, strict=True):
                if got.run.state in TERMINAL:
                    del pending[conversation]
            if pending:
                await asyncio.sleep(0.25)  # polling the last runs while the backlog drains
        drain_s = time.monotonic() - began
        by_state: collections.Counter[str] = collections.Counter()

        async def count(conversation: str) -> collections.Counter[str]:
            found: collections.Counter[str] = collections.Counter()
            token = ""
            while True:
                page = await stub.ListRuns(
                    pb.ListRunsRequest(parent=conversation, page_size=100, page_token=token),
                    metadata=account.metadata,
                    timeout=60,
                )
                found.update(pb.RunState.Name(run.state) for run in page.runs)
                token = page.next_page_token
                if not token:
                    return found

        for found in await gather_limited([functools.partial(count, c) for c in sent]):
            by_state.update(found)
    runs = sum(by_state.values())
    return {
        "drain_s": round(drain_s, 2),
        "not_drained": len(pending),
        "runs_listed": runs,
        "runs_sent": sum(sent.values()),
        "by_state": dict(by_state),
        "not_succeeded": runs - by_state.get("RUN_STATE_SUCCEEDED", 0),
    }


# ---------------------------------------------------------------------------------
# Scenario drivers.


async def runs_case(
    directory: Path,
    *,
    conversations: int,
    warmup_s: float,
    seconds: float,
    channels: int,
    quiet_wait_s: float,
    pause_s: float = 0.0,
    profile: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A fresh server; ``conversations`` closed loops of SendMessage + WatchRun; the check."""
    spec = {
        "mode": "runs",
        "channels": channels,
        "warmup_s": warmup_s,
        "seconds": seconds,
        "pause_s": pause_s,
        "profile": profile,
    }
    return await _checked(directory, SERVER_SETTINGS, "runs", conversations, quiet_wait_s, spec)


async def _checked(
    directory: Path,
    settings: dict[str, str],
    name: str,
    conversations: int,
    quiet_wait_s: float,
    spec: dict[str, Any],
) -> dict[str, Any]:
    """On a fresh server with ``conversations`` of one account, the client process as
    ``spec`` says once the machine is quiet; then every run it started, checked."""
    url = f"sqlite+aiosqlite:///{directory / f'{name}-{time.monotonic_ns()}.db'}"
    with serve(directory, url, settings) as server:
        async with dedicated_channel(server.address) as connection:
            account = await register(connection, f"{name}@example.com")
            names = await make_conversations(connection, account, conversations)
        waited = await wait_quiet(quiet_wait_s)
        figures = run_client(
            __file__,
            {
                **spec,
                "address": server.address,
                "token": account.token,
                "server_pid": server.pid,
                "conversations": names,
            },
            timeout_s=3600,
        )
        figures["quiet_wait_s"] = waited
        figures["check"] = await settle(
            server.address, account, figures.pop("last_runs"), figures.pop("sent")
        )
    return figures


async def latency_scenario(sizes: Sizes, directory: Path) -> list[dict[str, Any]]:
    n = sizes.latency_conversations
    rows = []
    for pause, warmup, seconds in (
        (0.0, sizes.latency_warmup_s, sizes.latency_seconds),
        (sizes.paced_pause_s, sizes.paced_warmup_s, sizes.paced_seconds),
    ):
        say(
            f"latency: {n} conversations, pause {pause:g} s, {warmup:g} s warm-up, "
            f"{seconds:g} s measured"
        )
        figures = await runs_case(
            directory,
            conversations=n,
            warmup_s=warmup,
            seconds=seconds,
            channels=4,
            quiet_wait_s=sizes.quiet_wait_s,
            pause_s=pause,
        )
        say(f"  {_brief_runs(figures)}")
        rows.append(figures)
    return rows


async def throughput_scenario(sizes: Sizes, directory: Path) -> list[dict[str, Any]]:
    cases = []
    for n in sizes.throughput_conversations:
        say(f"throughput: {n} conversations, {sizes.throughput_seconds:g} s measured")
        figures = await runs_case(
            directory,
            conversations=n,
            warmup_s=sizes.throughput_warmup_s,
            seconds=sizes.throughput_seconds,
            channels=max(1, min(4, n // 16)),
            quiet_wait_s=sizes.quiet_wait_s,
        )
        say(f"  {_brief_runs(figures)}")
        cases.append(figures)
    return cases


async def qps_send_case(
    sizes: Sizes, directory: Path, profile: dict[str, Any] | None = None
) -> dict[str, Any]:
    spec = {
        "mode": "qps",
        "target": "send",
        "callers": sizes.qps_callers,
        "warmup_calls": sizes.qps_warmup_calls,
        "seconds": sizes.qps_seconds,
        "profile": profile,
    }
    return await _checked(
        directory, QPS_SETTINGS, "qps", sizes.qps_conversations, sizes.quiet_wait_s, spec
    )


async def _no_run_qps(
    sizes: Sizes, target: str, address: str, token: str, pid: int
) -> dict[str, Any]:
    """A QPS case that starts no runs (the bare echo, or the authenticated floor)."""
    waited = await wait_quiet(sizes.quiet_wait_s)
    figures = run_client(
        __file__,
        {
            "mode": "qps",
            "target": target,
            "address": address,
            "token": token,
            "server_pid": pid,
            "conversations": ["workspaces/bench-000/conversations/c"],
            "callers": sizes.qps_callers,
            "warmup_calls": sizes.qps_warmup_calls,
            "seconds": sizes.qps_seconds,
            "profile": None,
        },
        timeout_s=3600,
    )
    figures["quiet_wait_s"] = waited
    return figures


async def qps_floor_case(sizes: Sizes, directory: Path) -> dict[str, Any]:
    """An authenticated call that stores nothing (ListHandlers): the interceptor chain's cost."""
    url = f"sqlite+aiosqlite:///{directory / f'floor-{time.monotonic_ns()}.db'}"
    with serve(directory, url, QPS_SETTINGS) as server:
        async with dedicated_channel(server.address) as connection:
            account = await register(connection, "floor@example.com")
            await make_conversations(connection, account, 1)
        return await _no_run_qps(sizes, "floor", server.address, account.token, server.pid)


async def qps_bare_case(sizes: Sizes) -> dict[str, Any]:
    with bare_server() as (port, pid):
        return await _no_run_qps(sizes, "bare", f"127.0.0.1:{port}", "", pid)


async def qps_scenario(sizes: Sizes, directory: Path) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    for round_no in range(sizes.qps_rounds):
        bare = await qps_bare_case(sizes)
        say(f"qps round {round_no + 1}: bare echo: {_brief_qps(bare)}")
        floor = await qps_floor_case(sizes, directory)
        say(f"qps round {round_no + 1}: authenticated ListHandlers: {_brief_qps(floor)}")
        send = await qps_send_case(sizes, directory)
        say(
            f"qps round {round_no + 1}: SendMessage: {_brief_qps(send)}; "
            f"check {json.dumps(send['check'])}"
        )
        rounds.append(
            {"bare": bare, "floor": floor, "send": send, "ratio": send["qps"] / bare["qps"]}
        )
    return {"rounds": rounds}


async def profile_scenario(
    sizes: Sizes, directory: Path, py_spy: str, wanted: set[str]
) -> dict[str, Any]:
    """Extra, unmeasured runs of the cases with py-spy recording the server."""
    profiles: dict[str, Any] = {}
    seconds = sizes.profile_seconds
    if "qps" in wanted:
        out = directory / "profile-qps.txt"
        say(f"profile: SendMessage QPS, py-spy for {seconds:g} s")
        slow = Sizes(**{**sizes.__dict__, "qps_seconds": seconds + 2})
        figures = await qps_send_case(
            slow, directory, {"py_spy": py_spy, "seconds": seconds, "out": str(out)}
        )
        profiles["qps"] = {"figures": figures, **pyspy.functions(out)}
    if "latency" in wanted or "throughput" in wanted:
        out = directory / "profile-runs.txt"
        n = sizes.latency_conversations
        say(f"profile: {n} conversations (the latency case), py-spy for {seconds:g} s")
        figures = await runs_case(
            directory,
            conversations=n,
            warmup_s=sizes.latency_warmup_s,
            seconds=seconds + 2,
            channels=4,
            quiet_wait_s=sizes.quiet_wait_s,
            profile={"py_spy": py_spy, "seconds": seconds, "out": str(out)},
        )
        profiles["runs"] = {"figures": figures, **pyspy.functions(out)}
    return profiles


# ---------------------------------------------------------------------------------
# Client process: the measured calls.


def _server_meter(pid: int) -> CpuMeter:
    """The server's CPU, and its main thread's (its event loop) apart: the thread's id is
    the process id."""
    return CpuMeter(pid, (pid, pid))


def _cpu_figures(cpu: CpuMeter, calls: int) -> dict[str, float]:
    return {**cpu.figures(calls), "server_main_thread_cores": cpu.cores(1)}


class RunLoad:
    """One closed loop per conversation: SendMessage, WatchRun to the end, again."""

    def __init__(self, spec: dict[str, Any], channels: Sequence[aio.Channel]) -> None:
        self.spec = spec
        self.metadata = bearer(spec["token"])
        self.names: list[str] = spec["conversations"]
        self.stubs = [dispatcher_pb2_grpc.DispatcherServiceStub(c) for c in channels]
        self.window = Window()
        # Runs started in the measured window: seconds from just before SendMessage.
        self.send_s: list[float] = []
        self.first_delta_s: list[float] = []
        self.end_s: list[float] = []
        self.updates = 0
        self.no_delta = 0
        self.ended_in_window = 0
        self.states: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.sent: dict[str, int] = dict.fromkeys(self.names, 0)
        self.last_runs: dict[str, str] = {}

    async def one(self, stub: dispatcher_pb2_grpc.DispatcherServiceAsyncStub, name: str) -> None:
        started = time.perf_counter()
        try:
            response = await stub.SendMessage(_request(name), metadata=self.metadata, timeout=60)
        except aio.AioRpcError as err:
            self.errors[f"SendMessage {err.code().name}"] += 1
            await asyncio.sleep(0.05)  # backing off after a refused send
            return
        sent = time.perf_counter()
        run = response.run.name
        self.sent[name] += 1
        self.last_runs[name] = run
        first = 0.0
        ended = 0.0
        state: int = pb.RUN_STATE_UNSPECIFIED
        updates = 0
        try:
            async for frame in stub.WatchRun(
                # Merged deltas, as the clients ask: a watcher behind takes fewer frames.
                pb.WatchRunRequest(name=run, after_sequence=0, merge_deltas=True),
                metadata=self.metadata,
                timeout=300,
            ):
                if frame.WhichOneof("frame") != "update":
                    continue
                update = frame.update
                updates += 1
                kind = update.WhichOneof("update")
                if kind == "delta":
                    if not first:
                        first = time.perf_counter()
                elif kind == "state_change" and update.state_change.run.state in TERMINAL:
                    ended = time.perf_counter()
                    state = update.state_change.run.state
        except aio.AioRpcError as err:
            self.errors[f"WatchRun {err.code().name}"] += 1
            state = await self._poll(stub, run)
            ended = time.perf_counter()
        if not ended:  # the stream ended without a terminal state
            self.errors["WatchRun ended early"] += 1
            state = await self._poll(stub, run)
            ended = time.perf_counter()
        self.states[pb.RunState.Name(state)] += 1  # type: ignore[arg-type]
        if ended in self.window:
            self.ended_in_window += 1
        if started in self.window:
            self.updates += updates
            self.send_s.append(sent - started)
            self.end_s.append(ended - started)
            if first:
                self.first_delta_s.append(first - started)
            else:
                self.no_delta += 1

    async def _poll(self, stub: dispatcher_pb2_grpc.DispatcherServiceAsyncStub, run: str) -> int:
        while True:
            got = await stub.GetRun(pb.GetRunRequest(name=run), metadata=self.metadata, timeout=30)
            if got.run.state in TERMINAL:
                return got.run.state
            await asyncio.sleep(0.05)  # polling a run whose stream failed

    async def loop(self, index: int, name: str) -> None:
        stub = self.stubs[index % len(self.stubs)]
        pause = self.spec["pause_s"]
        rng = random.Random(index)  # noqa: S311 - think times, reproducible
        if pause:
            await asyncio.sleep(rng.uniform(0, 2 * pause))  # staggered starts
        while self.window.open():
            await self.one(stub, name)
            if pause:
                await asyncio.sleep(rng.uniform(pause / 2, pause * 3 / 2))  # think time

    async def run(self) -> dict[str, Any]:
        self.window.start(self.spec["warmup_s"], self.spec["seconds"])
        tasks = [asyncio.create_task(self.loop(i, n)) for i, n in enumerate(self.names)]
        await self.window.warm_up()
        cpu = _server_meter(self.spec["server_pid"])
        cpu.start()
        async with pyspy.recording(self.spec["profile"], self.spec["server_pid"]):
            await self.window.measured()
            cpu.stop()
            await asyncio.gather(*tasks)
        runs = len(self.end_s)
        return {
            "conversations": len(self.names),
            "pause_s": self.spec["pause_s"],
            "seconds": self.spec["seconds"],
            "runs_started": runs,
            "runs_ended_in_window": self.ended_in_window,
            "runs_per_s": round(self.ended_in_window / self.spec["seconds"], 1),
            "send": summary(self.send_s),
            "first_delta": summary(self.first_delta_s),
            "end": summary(self.end_s),
            "no_delta": self.no_delta,
            "updates_per_run": round(self.updates / max(runs, 1), 1),
            "states_seen": dict(self.states),
            "errors": dict(self.errors),
            **_cpu_figures(cpu, self.ended_in_window),
            "sent": self.sent,
            "last_runs": self.last_runs,
        }


async def client_runs(spec: dict[str, Any]) -> dict[str, Any]:
    channels = [dedicated_channel(spec["address"]) for _ in range(spec["channels"])]
    try:
        return await RunLoad(spec, channels).run()
    finally:
        for channel in channels:
            await channel.close(None)


class QpsLoad:
    """Callers in a closed loop on one channel: SendMessage round robin, or the bare echo."""

    def __init__(self, spec: dict[str, Any], connection: aio.Channel) -> None:
        self.spec = spec
        self.metadata = bearer(spec["token"])
        self.names: list[str] = spec["conversations"]
        self.requests = [_request(n) for n in self.names]
        self.payloads = [r.SerializeToString() for r in self.requests]
        self.stub = dispatcher_pb2_grpc.DispatcherServiceStub(connection)
        self.echo = connection.unary_unary(
            ECHO_METHOD, request_serializer=None, response_deserializer=None
        )
        self.bare = spec["target"] == "bare"
        self.floor = spec["target"] == "floor"
        self.next = 0
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.sent: dict[str, int] = dict.fromkeys(self.names, 0)
        self.last_runs: dict[str, str] = {}

    async def once(self) -> None:
        index = self.next % len(self.names)
        self.next += 1
        if self.bare:
            await self.echo(self.payloads[index], timeout=30)
            return
        if self.floor:
            await self.stub.ListHandlers(
                pb.ListHandlersRequest(parent="workspaces/bench-000", page_size=1),
                metadata=self.metadata,
                timeout=30,
            )
            return
        response = await self.stub.SendMessage(
            self.requests[index], metadata=self.metadata, timeout=30
        )
        name = self.names[index]
        self.sent[name] += 1
        self.last_runs[name] = response.run.name

    async def caller(self, deadline: float) -> None:
        while (start := time.perf_counter()) < deadline:
            try:
                await self.once()
            except aio.AioRpcError as err:
                self.errors[err.code().name] += 1
                continue
            self.latencies.append(time.perf_counter() - start)

    async def backlog(self) -> dict[str, float]:
        """Runs still waiting or running, by ListRuns over every conversation."""

        async def count(name: str, state: pb.RunState.ValueType) -> int:
            found, token = 0, ""
            while True:
                page = await self.stub.ListRuns(
                    pb.ListRunsRequest(
                        parent=name, page_size=100, page_token=token, states=[state]
                    ),
                    metadata=self.metadata,
                    timeout=60,
                )
                found += len(page.runs)
                token = page.next_page_token
                if not token:
                    return found

        began = time.perf_counter()
        queued = await gather_limited(
            [functools.partial(count, n, pb.RUN_STATE_QUEUED) for n in self.names]
        )
        running = await gather_limited(
            [functools.partial(count, n, pb.RUN_STATE_RUNNING) for n in self.names]
        )
        return {
            "queued_at_end": sum(queued),
            "running_at_end": sum(running),
            "backlog_count_s": round(time.perf_counter() - began, 2),
        }

    async def run(self) -> dict[str, Any]:
        for _ in range(self.spec["warmup_calls"]):  # connection, caches, allocator
            await self.once()
        quiet_gc()
        cpu = _server_meter(self.spec["server_pid"])
        cpu.start()
        async with pyspy.recording(self.spec["profile"], self.spec["server_pid"]):
            began = time.perf_counter()
            deadline = began + self.spec["seconds"]
            await asyncio.gather(*(self.caller(deadline) for _ in range(self.spec["callers"])))
            elapsed = time.perf_counter() - began
            cpu.stop()
        figures: dict[str, Any] = {
            **summary(self.latencies),
            "qps": round(len(self.latencies) / elapsed, 1),
            "errors": dict(self.errors),
            **_cpu_figures(cpu, len(self.latencies)),
        }
        if not self.bare and not self.floor:
            figures.update(await self.backlog())
            figures["sent"] = self.sent
            figures["last_runs"] = self.last_runs
        return figures


async def client_qps(spec: dict[str, Any]) -> dict[str, Any]:
    async with dedicated_channel(spec["address"]) as connection:
        return await QpsLoad(spec, connection).run()


# ---------------------------------------------------------------------------------
# The report.


def _brief_runs(f: dict[str, Any]) -> str:
    d = f["first_delta"]
    return (
        f"{f['runs_per_s']:.1f} runs/s; first delta p50 {d['p50_ms']:.1f} ms, p99 "
        f"{d['p99_ms']:.1f} ms, max {d['max_ms']:.1f} ms over {d['calls']} runs; errors "
        f"{f['errors'] or 0}; server {f['server_cores']:.2f} cores, client "
        f"{f['client_cores']:.2f}; check {json.dumps(f['check'])}"
    )


def _brief_qps(f: dict[str, Any]) -> str:
    return (
        f"{f['qps']:.0f} QPS, p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.2f} ms, errors "
        f"{f['errors'] or 0}, server {f['server_cores']:.2f} cores, client "
        f"{f['client_cores']:.2f}"
    )


def _cores(f: dict[str, Any]) -> str:
    return (
        f"{f['server_cores']:.2f} ({f['server_main_thread_cores']:.2f}) "
        f"/ {f['client_cores']:.2f} / {f['other_cores']:.2f}"
    )


def _check(c: dict[str, Any]) -> str:
    states = ", ".join(
        f"{k.removeprefix('RUN_STATE_').lower()} {v}" for k, v in sorted(c["by_state"].items())
    )
    text = f"{c['runs_listed']}/{c['runs_sent']} listed: {states or 'none'}"
    if c["not_drained"]:
        text += f"; {c['not_drained']} conversations still busy after {DRAIN_TIMEOUT_S:g} s"
    return text


def render(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    lines = [
        SECTION,
        "",
        *provenance(command),
        f"- shape: {SERVED}, fresh for every case, and the measuring "
        "client (`bench/dispatcher.py client`, grpc.aio) in separate processes on loopback, "
        "sharing the cores. One account drives every conversation, so the server runs with "
        f"the defaults except {settings_text(SERVER_SETTINGS)}. Conversations are spread over "
        f"workspaces of {PER_WORKSPACE}, so the per-workspace running limit (16) never binds; "
        "the global one (64 runs at once) is the default. Every run is the built-in `echo` "
        f"handler answering the same {len(MESSAGE.split())}-word message ({len(MESSAGE)} "
        "characters): one delta per word plus its trailer, then the result.",
        "- CPU columns: cores used over the measured time by the server (in brackets: its main "
        "thread alone, which runs the event loop: servicers, runs, the gRPC completion queue; "
        "most of the rest is its 2 SQLite threads), by the client, and by everything else on "
        "the machine (other jobs share it: tails are only meaningful when that is near 0). "
        "Server CPU per run or call: the server's CPU over the measured time divided by the "
        "runs that ended (or the calls answered) in it.",
        host_speed_line(results["host"]),
        "",
    ]
    if "latency" in results:
        lines += _latency_section(results["latency"], sizes, results.get("write_after_idle_us"))
    if "throughput" in results:
        lines += _throughput_section(results["throughput"], sizes)
    if "qps" in results:
        lines += _qps_section(results["qps"], sizes)
    if results.get("profile"):
        lines += _profile_section(results["profile"], sizes)
    return "\n".join(lines)


def runs_row(label: str, f: dict[str, Any]) -> str:
    """A row of ``RUNS_HEADER``: the runs case ``f``."""
    d, s, e = f["first_delta"], f["send"], f["end"]
    return (
        f"| {label} | {d['calls']} | {d['p50_ms']:.1f} | **{d['p99_ms']:.1f}** "
        f"| {d['max_ms']:.1f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} "
        f"| {e['p50_ms']:.1f} / {e['p99_ms']:.1f} | **{f['runs_per_s']:.1f}** "
        f"| {f['server_cpu_ms_per_call']:.1f} | {_cores(f)} | {errors_text(f['errors'])} "
        f"| {_check(f['check'])} |"
    )


RUNS_HEADER: Final = (
    "| conversations | runs | first delta p50 ms | p99 ms | max ms "
    "| SendMessage p50 / p99 ms | terminal state p50 / p99 ms | runs/s "
    "| server CPU ms per run | CPU server / client / others | errors | every run afterwards |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
)


def _pause(f: dict[str, Any]) -> str:
    pause = f["pause_s"]
    if not pause:
        return "no pause"
    return f"pause {pause / 2:g}-{pause * 3 / 2:g} s"


def _waits(cases: Sequence[dict[str, Any]]) -> str:
    waited = [c.get("quiet_wait_s", 0.0) for c in cases]
    return (
        f"- waited for a quiet machine before the rows: {', '.join(f'{w:g}' for w in waited)} s "
        f"(at most the limit; then measured anyway)"
    )


def _idle_line(rows: Sequence[dict[str, Any]], idle_us: dict[str, float]) -> str:
    """Why a run below capacity costs more CPU: the same write after the host idled."""
    per_run = {bool(f["pause_s"]): f["server_cpu_ms_per_call"] for f in rows}
    ratio = ""
    if per_run.get(True) and per_run.get(False):
        ratio = f"server CPU per run, paced / at capacity: {per_run[True] / per_run[False]:.2f}x; "
    back_to_back = idle_us["0"]
    after = ", ".join(
        f"{us:g} µs {gap} ms after the last ({us / back_to_back:.1f}x)"
        for gap, us in idle_us.items()
        if gap != "0"
    )
    return (
        f"- {ratio}the same small write through `Database.run` (an outbox row inserted and "
        f"deleted, in the SQLite thread; `bench/micro.py`'s `write_after_idle`, in this run) "
        f"costs {back_to_back:g} µs of CPU back to back, {after}: below capacity a run's "
        "steps start on a cold host, so each costs more than the same step at capacity"
    )


def _latency_section(
    rows: list[dict[str, Any]], sizes: Sizes, idle_us: dict[str, float] | None = None
) -> list[str]:
    n = rows[0]["conversations"]
    verdicts = []
    for f in rows:
        d = f["first_delta"]
        met = verdict(d["p99_ms"] < FIRST_DELTA_P99_BUDGET_MS)
        verdicts.append(f"{_pause(f)}: **{d['p99_ms']:.1f} ms**, {met}")
    return [
        f"### SendMessage to the first delta, {n} conversations at once",
        "",
        f"{n} conversations, each with one client loop (over 4 HTTP/2 connections): "
        "SendMessage, then WatchRun on the returned run (`after_sequence=0`) read to its "
        "end; the next message only once the run reached a terminal state. Latency is from "
        "just before SendMessage is called to the first `delta` update on the WatchRun "
        "stream, for the runs started in the measured time; runs/s counts the runs that "
        "reached a terminal state in it. Afterwards every run of every conversation is "
        "listed (ListRuns) and counted by state. Two rows, a fresh server each: with no "
        f"pause ({sizes.latency_seconds:g} s measured after {sizes.latency_warmup_s:g} s of "
        "warm-up), every conversation sends again as soon as its run ends, so the server "
        "runs at capacity and a run waits about (conversations in flight) / (runs/s); with "
        "a think time drawn uniformly from the range shown between a run's end and the next "
        f"message ({sizes.paced_seconds:g} s measured after {sizes.paced_warmup_s:g} s), "
        "the same conversations offer a load below capacity.",
        "",
        *RUNS_HEADER,
        *(runs_row(f"{n}, {_pause(f)}", f) for f in rows),
        "",
        f"- first delta p99, budget under {FIRST_DELTA_P99_BUDGET_MS:g} ms on 2 cores: "
        + "; ".join(verdicts),
        "- updates per run read by the client: "
        + ", ".join(f"{f['updates_per_run']:g}" for f in rows),
        *([_idle_line(rows, idle_us)] if idle_us else []),
        _waits(rows),
        "",
    ]


def _throughput_section(cases: list[dict[str, Any]], sizes: Sizes) -> list[str]:
    failed = sum(c["check"]["not_succeeded"] for c in cases)
    missing = sum(c["check"]["runs_sent"] - c["check"]["runs_listed"] for c in cases)
    return [
        "### Sustained runs per second",
        "",
        "The same loop with no pause and fewer conversations, "
        f"{sizes.throughput_seconds:g} s measured after {sizes.throughput_warmup_s:g} s of "
        "warm-up, a fresh server per row.",
        "",
        *RUNS_HEADER,
        *(runs_row(str(c["conversations"]), c) for c in cases),
        "",
        f"- runs that did not succeed: **{failed}**; runs sent but not listed: {missing}",
        _waits(cases),
        "",
    ]


def _qps_section(r: dict[str, Any], sizes: Sizes) -> list[str]:
    rounds = r["rounds"]
    median = middle(rounds, key=lambda x: x["ratio"])
    bare, send = median["bare"], median["send"]
    rows = []
    for i, one in enumerate(rounds, start=1):
        mark = " (median)" if one is median else ""
        cases = [("bare grpc.aio echo", one["bare"])]
        if "floor" in one:
            cases.append(("authenticated ListHandlers (stores nothing)", one["floor"]))
        cases.append(("SendMessage", one["send"]))
        for label, f in cases:
            backlog = (
                f"{f['queued_at_end']} / {f['running_at_end']}" if "queued_at_end" in f else "-"
            )
            drained = f"{f['check']['drain_s']:.1f}" if "check" in f else "-"
            checked = _check(f["check"]) if "check" in f else "-"
            rows.append(
                f"| {i}{mark} | {label} | {f['calls']} | **{f['qps']:.0f}** "
                f"| {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {f['server_cpu_ms_per_call']:.2f} "
                f"| {_cores(f)} | {errors_text(f['errors'])} | {backlog} | {drained} | {checked} |"
            )
    ratio = median["ratio"]
    return [
        "### SendMessage QPS against a bare grpc.aio echo",
        "",
        f"{sizes.qps_callers} callers on one channel, closed loop, {sizes.qps_seconds:g} s "
        f"per case after {sizes.qps_warmup_calls} warm-up calls, {sizes.qps_rounds} "
        "interleaved rounds (a fresh server each), the median round (by ratio) marked. "
        "Bare: a grpc.aio server in its own process with one unary echo RPC (a generic "
        "handler, bytes in and out, no interceptors, no health or reflection), sent the same "
        "serialized SendMessageRequest bytes. SendMessage: authenticated (bearer access "
        f"token), round robin over {sizes.qps_conversations} conversations; each call stores "
        "the user message and queues a run that executes on the same server meanwhile. The "
        f"server also runs with {settings_text(QUEUE_SETTINGS)} "
        "so sends are not refused once the queue fills (RESOURCE_EXHAUSTED would be counted "
        "as errors). Backlog: runs QUEUED / RUNNING when the load stopped (ListRuns over "
        "every conversation); the server was then left to drain it, and every run was "
        "checked. Between them, the floor: an authenticated, authorized call that stores "
        "nothing and starts no run (`ListHandlers` of one workspace, same callers, a fresh "
        "server): what the interceptor chain alone (credential check, membership read, "
        "access log, metrics) leaves of the bare echo's rate.",
        "",
        "| round | case | calls | QPS | p50 ms | p99 ms | server CPU ms per call "
        "| CPU server / client / others | errors | backlog queued / running | drained in s "
        "| every run afterwards |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"- SendMessage / bare echo, median round: **{ratio:.2f}** ({send['qps']:.0f} / "
        f"{bare['qps']:.0f} QPS); budget: at least {QPS_RATIO_BUDGET:g}: "
        f"{verdict(ratio >= QPS_RATIO_BUDGET)}",
        "- all rounds: " + ", ".join(f"{one['ratio']:.2f}" for one in rounds),
        *(
            [
                "- the floor (authenticated ListHandlers / bare echo), all rounds: "
                + ", ".join(f"{one['floor']['qps'] / one['bare']['qps']:.2f}" for one in rounds)
            ]
            if all("floor" in one for one in rounds)
            else []
        ),
        _waits([f for one in rounds for f in (one["bare"], one["send"])]),
        "",
    ]


def _profile_section(profiles: dict[str, Any], sizes: Sizes) -> list[str]:
    lines = [
        "### Where the server's time goes (py-spy)",
        "",
        f"{pyspy.RECORD} on the serve process for "
        f"{sizes.profile_seconds:g} s during extra runs of the cases above (not the measured "
        "ones): 100 samples/s of the thread holding the GIL (the one core the interpreter "
        "has), the main thread (the event "
        "loop: servicers, the dispatcher's runs, gRPC's completion queue) and the 2 SQLite "
        "threads (`Database.run`: each transaction's ORM work and commit). Samples blocked in "
        "a queue or in epoll are left out. Own: samples whose innermost frame is the "
        "function (`Handle._run` innermost is C code called from the event loop, mostly "
        "gRPC's Cython layer; SQLite's C library shows as the DB-API call above it); "
        "inclusive: samples with the function anywhere on the stack (Switchboard frames and "
        "SQLAlchemy's session); percentages of all the busy samples.",
        "",
    ]
    titles = {
        "qps": "SendMessage QPS (16 callers, runs executing meanwhile)",
        "runs": f"{sizes.latency_conversations} conversations, SendMessage + WatchRun loops",
    }
    for key, title in titles.items():
        p = profiles.get(key)
        if not p:
            continue
        if "error" in p:
            lines += [f"- {title}: {p['error']}", ""]
            continue
        total = max(p["main_samples"] + p["other_samples"], 1)
        per_s = sizes.profile_seconds * 100
        f = p["figures"]
        rate = f"{f['qps']:.0f} SendMessage/s" if "qps" in f else f"{f['runs_per_s']:.0f} runs/s"
        lines += [
            f"#### {title}",
            "",
            f"{rate} meanwhile. Busy samples: main thread {p['main_samples']} "
            f"({p['main_samples'] / per_s:.0%} of the time), SQLite and other threads "
            f"{p['other_samples']} ({p['other_samples'] / per_s:.0%} of a thread); blocked, "
            f"left out: {p['waiting_samples']}.",
            "",
            "| own % | function (file) | | inclusive % | function (file) |",
            "|---|---|---|---|---|",
        ]
        own, inclusive = p["own"], p["inclusive"]
        for i in range(max(len(own), len(inclusive))):
            left = f"{own[i][1] * 100 / total:.1f} | `{own[i][0]}`" if i < len(own) else " | "
            right = (
                f"{inclusive[i][1] * 100 / total:.1f} | `{inclusive[i][0]}`"
                if i < len(inclusive)
                else " | "
            )
            lines.append(f"| {left} | | {right} |")
        lines.append("")
    return lines


async def drive(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = Sizes(**{**sizes.__dict__, "qps_rounds": args.rounds})
    wanted = set(args.only or ("latency", "throughput", "qps"))
    py_spy = pyspy.find(args)
    results: dict[str, Any] = {}
    async with session(results, "switchboard-dispatch-bench-") as directory:
        if "latency" in wanted:
            results["latency"] = await latency_scenario(sizes, directory)
            results["write_after_idle_us"] = await write_after_idle(directory)
        if "throughput" in wanted:
            results["throughput"] = await throughput_scenario(sizes, directory)
        if "qps" in wanted:
            results["qps"] = await qps_scenario(sizes, directory)
        if py_spy is not None:
            results["profile"] = await profile_scenario(sizes, directory, py_spy, wanted)
            await pyspy.keep(args, directory, "profile-*.txt")
    text = render(results, command_line("bench/dispatcher.py"), sizes)
    report(results, text, args)
    return 0


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=0, help="SendMessage QPS rounds")
    parser.add_argument(
        "--only", nargs="+", choices=["latency", "throughput", "qps"], help="these scenarios"
    )
    pyspy.flags(parser, "extra, unmeasured runs")


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="a few seconds per case",
        options=options,
        roles={"client": clients({"runs": client_runs, "qps": client_qps}), "bare": bare_main},
    )


if __name__ == "__main__":
    raise SystemExit(main())
