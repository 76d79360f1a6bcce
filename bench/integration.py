"""Integration hub benchmarks: InvokeTool against the MCP server called directly; webhooks.

    python bench/integration.py                the full run (about 4 minutes); prints the report
    python bench/integration.py --quick        short phases and small counts (< 1 min)
    python bench/integration.py --write        ... and put the report into BENCHMARKS.md
    python bench/integration.py --json         one JSON line, figures and report (bench/run.py)
    python bench/integration.py --only mcp     some scenarios: mcp webhooks
    python bench/integration.py --mcp-server everything
                                               the MCP server: sdk (default) or everything
    python bench/integration.py --profile      ... plus py-spy on the server (an extra,
                                               unmeasured InvokeTool run; --py-spy PATH)

The server is a real ``switchboard serve --dev --port 0`` process started by
``bench/harness.py``'s ``serve`` (embedded SQLite, in-memory cache and event
log, JSON access log to a file) with the defaults except
``SWITCHBOARD_EGRESS_ALLOW_LOOPBACK=true`` (the MCP server and the webhook
receiver are on loopback) and the rate limits one account would hit
(``SERVER_SETTINGS``). The user, workspaces, conversations and integrations are
created through the RPCs.

1. MCP: one MCP server process on loopback, streamable HTTP: by default
   ``tests/infra/mcpserver.py`` (written with the ``mcp`` SDK, served by
   uvicorn), whose ``echo`` is the cheaper of the two (see ``MCP_SERVERS``);
   ``--mcp-server everything`` takes ``@modelcontextprotocol/server-everything``
   (Node, pinned in tests/mcp) instead. One MCP integration points at it. A
   client process (``python bench/integration.py client SPEC``) holds both an
   ``mcp`` SDK ``ClientSession`` (the official client, streamable HTTP, its
   default HTTP client) on the same server and a gRPC channel to Switchboard,
   and alternates, round by round, closed loops of (a) ``call_tool("echo")``
   on that session, the baseline, and (b) ``InvokeTool`` of the same tool
   through Switchboard (which calls it through its own SDK session), with the
   same number of concurrent callers (1, then 8), in the same run. Added
   latency is (b) - (a) at p50 and at p99 of all the rounds' calls.
2. Webhooks: a receiver process (``python bench/integration.py receiver``:
   uvicorn with a bare ASGI app, every request verified with the
   ``standardwebhooks`` library before it is counted) and webhook integrations
   subscribed to ``MESSAGE_CREATED``. (a) Throughput: a client appends N
   messages as fast as it can (8 writers); deliveries/s is N times the
   endpoints over the time from the first append to the last first arrival.
   (b) Steady rate: the client appends at a fixed rate (open loop, on a
   schedule); latency is from AppendMessage's return to the delivery's
   arrival at the receiver (both processes read the machine's one monotonic
   clock).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import mcp_types as types
from google.protobuf import struct_pb2
from grpc import aio
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.api.integration.v1 import integration_pb2 as pb
from switchboard.api.integration.v1 import integration_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.*, tests.*

from bench import pyspy
from bench.fixtures import (
    create_conversations,
    create_integration,
    create_workspace,
    register,
)
from bench.harness import (
    SERVED,
    CpuMeter,
    bearer,
    clients,
    command_line,
    dedicated_channel,
    errors_text,
    host_speed_line,
    machine_cpu_s,
    ms,
    process_cpu_s,
    provenance,
    python,
    quiet_gc,
    report,
    run_client,
    say,
    section_main,
    serve,
    session,
    settings_text,
    spawn,
    stop,
    summary,
    verdict,
    wait_quiet,
)

ROOT: Final = Path(__file__).resolve().parents[1]
SECTION: Final = "## Integration hub"
#: One account drives everything: the limits it would hit are lifted.
SERVER_SETTINGS: Final[dict[str, str]] = {
    "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
    "SWITCHBOARD_INTEGRATION_TOOL_CALLS_PER_MINUTE": "1000000",
    "SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "10000000",
}
#: The argument of every echo call (the same for both paths).
MESSAGE: Final = "Can you check the status of the database migration for the platform team?"
#: p50 budget of the latency InvokeTool adds to a direct call (the issue's), in ms.
ADDED_P50_BUDGET_MS: Final = 2.0
#: The MCP servers the scenario can run against: what their echo answers to MESSAGE.
MCP_SERVERS: Final[dict[str, str]] = {
    # Measured while this was written (the direct SDK client, one caller, a
    # quiet machine): p50 2.2-2.4 ms per echo, against 3.3-4.2 ms for
    # server-everything, with about the same CPU (1.1-2.0 ms per call on
    # either side); with 8 callers both answer in about 12 ms at p50. The
    # lower single-caller latency makes it the baseline that hides the least.
    "sdk": MESSAGE,
    "everything": f"Echo: {MESSAGE}",
}
EVERYTHING_MAIN: Final = (
    ROOT / "tests/mcp/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
)
#: Writers appending at once in the throughput cases.
WRITERS: Final = 8
#: How the receiver process gets the webhook secret.
RECEIVER_SECRET: Final = "BENCH_WEBHOOK_SECRET"  # noqa: S105 - a variable's name
#: The receiver stops waiting for deliveries when none arrived for this long.
STALLED_S: Final = 60.0
#: Conversations the steady-rate appends go round.
STEADY_CONVERSATIONS: Final = 4


@dataclass(frozen=True)
class Sizes:
    callers: tuple[int, ...]
    mcp_rounds: int
    mcp_seconds: float
    mcp_warmup_calls: int
    #: Throughput cases: (messages, endpoints subscribed to them).
    bursts: tuple[tuple[int, int], ...]
    steady_rate: float
    steady_seconds: float
    steady_warmup_s: float
    quiet_wait_s: float
    profile_seconds: float


FULL: Final = Sizes(
    callers=(1, 8),
    mcp_rounds=4,
    mcp_seconds=3.0,
    mcp_warmup_calls=200,
    bursts=((250, 1), (1000, 1), (250, 4)),
    steady_rate=50.0,
    steady_seconds=30.0,
    steady_warmup_s=3.0,
    quiet_wait_s=20.0,
    profile_seconds=10.0,
)
QUICK: Final = Sizes(
    callers=(1, 8),
    mcp_rounds=2,
    mcp_seconds=1.5,
    mcp_warmup_calls=50,
    bursts=((100, 1), (300, 1), (75, 4)),
    steady_rate=50.0,
    steady_seconds=6.0,
    steady_warmup_s=1.0,
    quiet_wait_s=0.0,  # no waiting for a quiet machine: a try-out
    profile_seconds=5.0,
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class McpServer:
    url: str
    pid: int
    description: str


@contextlib.contextmanager
def mcp_server(kind: str, directory: Path) -> Iterator[McpServer]:
    """The MCP server process, on a free port; killed on exit."""
    if kind == "sdk":
        from tests.infra.mcpserver import McpTestServer

        with McpTestServer() as sdk:
            assert sdk.proc is not None
            yield McpServer(
                sdk.url,
                sdk.proc.pid,
                "`tests/infra/mcpserver.py` (the `mcp` SDK's low-level server, streamable "
                "HTTP with SSE responses, uvicorn)",
            )
        return
    if not EVERYTHING_MAIN.is_file():
        raise RuntimeError("server-everything is not installed: run `make tools`")
    version = json.loads((EVERYTHING_MAIN.parents[1] / "package.json").read_text())["version"]
    log = directory / "everything.log"
    for _ in range(3):  # a port picked here may be taken before node binds it
        port = _free_port()
        with log.open("wb") as sink:
            process = spawn(
                ["node", str(EVERYTHING_MAIN), "streamableHttp"],
                cwd=EVERYTHING_MAIN.parents[1],
                env={**os.environ, "PORT": str(port)},
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and process.poll() is None:
                if f"listening on port {port}" in log.read_text(errors="replace"):
                    yield McpServer(
                        f"http://127.0.0.1:{port}/mcp",
                        process.pid,
                        f"`@modelcontextprotocol/server-everything` {version} (Node "
                        f"{_node_version()}, streamable HTTP)",
                    )
                    return
                time.sleep(0.05)  # polling its log for the listening line
        finally:
            stop(process, by="kill", timeout_s=10)
    raise RuntimeError(f"server-everything did not start: {log.read_text(errors='replace')}")


def _node_version() -> str:
    done = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


# ---------------------------------------------------------------------------------
# Scenario 1: InvokeTool against the MCP server called directly.


async def mcp_scenario(
    sizes: Sizes, directory: Path, kind: str, profile: dict[str, Any] | None
) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{directory / 'mcp.db'}"
    with mcp_server(kind, directory) as mcp, serve(directory, url, SERVER_SETTINGS) as server:
        async with dedicated_channel(server.address) as connection:
            account = await register(connection, "mcp@example.com")
            workspace = await create_workspace(connection, account, "bench")
            integration = await create_integration(
                connection,
                account,
                workspace,
                "mcp",
                kind=pb.INTEGRATION_KIND_MCP_SERVER,
                display_name="Bench MCP server",
                endpoint=mcp.url,
            )
            tools = await integration_pb2_grpc.IntegrationServiceStub(connection).ListTools(
                pb.ListToolsRequest(parent=integration, page_size=200),
                metadata=account.metadata,
                timeout=30,
            )
        listed = [tool.name.rsplit("/", 1)[1] for tool in tools.tools]
        if "echo" not in listed:
            raise RuntimeError(f"the MCP server lists no echo tool: {listed}")
        waited = await wait_quiet(sizes.quiet_wait_s)
        say(
            f"mcp: {kind} server, callers {list(sizes.callers)}, {sizes.mcp_rounds} rounds of "
            f"{sizes.mcp_seconds:g} s per case"
        )
        figures = run_client(
            __file__,
            {
                "mode": "mcp",
                "address": server.address,
                "token": account.token,
                "server_pid": server.pid,
                "mcp_pid": mcp.pid,
                "mcp_url": mcp.url,
                "tool": f"{integration}/tools/echo",
                "expected": MCP_SERVERS[kind],
                "callers": list(sizes.callers),
                "rounds": sizes.mcp_rounds,
                "seconds": sizes.mcp_seconds,
                "warmup_calls": sizes.mcp_warmup_calls,
                "profile": profile,
            },
        )
    for level in figures["levels"]:
        say(f"  {_brief_level(level)}")
    return {
        **figures,
        "server": mcp.description,
        "kind": kind,
        "tools_listed": len(listed),
        "quiet_wait_s": waited,
    }


class Case:
    """One path's calls over every round (pooled), and each round's figures."""

    def __init__(self, server_pid: int, mcp_pid: int) -> None:
        self.meter = CpuMeter(server_pid, mcp_pid)
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.wrong = 0
        self.rounds: list[dict[str, float]] = []

    def figures(self) -> dict[str, Any]:
        meter = self.meter
        server, mcp = meter.used
        calls = max(len(self.latencies), 1)
        wall = max(meter.wall, 1e-9)
        return {
            **summary(self.latencies),
            "calls_per_s": round(len(self.latencies) / wall, 1),
            "errors": dict(self.errors),
            "wrong_answers": self.wrong,
            "server_cpu_ms_per_call": round(server * 1000 / calls, 3),
            "mcp_cpu_ms_per_call": round(mcp * 1000 / calls, 3),
            "client_cpu_ms_per_call": round(meter.client * 1000 / calls, 3),
            "other_cores": round(meter.others() / wall, 2),
            "rounds": self.rounds,
        }


class McpLoad:
    """Closed loops of the direct SDK call and of InvokeTool, alternated round by round."""

    def __init__(
        self, spec: dict[str, Any], session: ClientSession, connection: aio.Channel
    ) -> None:
        self.spec = spec
        self.session = session
        self.metadata = bearer(spec["token"])
        self.stub = integration_pb2_grpc.IntegrationServiceStub(connection)
        arguments = struct_pb2.Struct()
        arguments.update({"message": MESSAGE})
        self.request = pb.InvokeToolRequest(name=spec["tool"], arguments=arguments)
        self.read = pb.GetIntegrationRequest(name=spec["tool"].split("/tools/", 1)[0])
        self.expected: str = spec["expected"]

    async def direct(self) -> str:
        result = await self.session.call_tool("echo", {"message": MESSAGE}, read_timeout_seconds=30)
        if not isinstance(result, types.CallToolResult) or result.is_error:
            return f"unexpected answer: {type(result).__name__}"
        block = result.content[0] if result.content else None
        return block.text if isinstance(block, types.TextContent) else "no text"

    async def invoke(self) -> str:
        response = await self.stub.InvokeTool(self.request, metadata=self.metadata, timeout=30)
        return "tool error" if response.is_error else response.text

    async def floor(self) -> str:
        """An authenticated read of the integration: what any Switchboard call costs."""
        response = await self.stub.GetIntegration(self.read, metadata=self.metadata, timeout=30)
        return self.expected if response.integration.name == self.read.name else "other"

    async def phase(
        self, case: Case, call: Callable[[], Awaitable[str]], callers: int, seconds: float
    ) -> None:
        latencies: list[float] = []

        async def caller(deadline: float) -> None:
            while (start := time.perf_counter()) < deadline:
                try:
                    text = await call()
                except aio.AioRpcError as err:
                    case.errors[err.code().name] += 1
                    continue
                except (MCPError, TimeoutError) as exc:
                    case.errors[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - start)
                case.wrong += text != self.expected

        with case.meter.measure():
            deadline = time.perf_counter() + seconds
            await asyncio.gather(*(caller(deadline) for _ in range(callers)))
        case.latencies += latencies
        case.rounds.append(
            {"calls": len(latencies), "p50_ms": ms(latencies, 0.5), "p99_ms": ms(latencies, 0.99)}
        )

    async def warm(self, callers: int) -> None:
        """Connections, caches, the session: the first calls of each path are not timed."""
        for call in (self.direct, self.invoke, self.floor):
            per_caller = max(1, self.spec["warmup_calls"] // callers)

            async def loop(call: Callable[[], Awaitable[str]] = call, n: int = per_caller) -> None:
                for _ in range(n):
                    if await call() != self.expected:
                        raise RuntimeError("a warm-up call answered something else")

            await asyncio.gather(*(loop() for _ in range(callers)))

    async def level(self, callers: int) -> dict[str, Any]:
        pids = (self.spec["server_pid"], self.spec["mcp_pid"])
        direct, invoke, floor = Case(*pids), Case(*pids), Case(*pids)
        await self.warm(callers)
        quiet_gc()
        for round_no in range(self.spec["rounds"]):
            order = [(direct, self.direct), (invoke, self.invoke)]
            if round_no % 2:
                order.reverse()  # neither path always goes first
            for case, call in [*order, (floor, self.floor)]:
                await self.phase(case, call, callers, self.spec["seconds"])
        d, i = direct.figures(), invoke.figures()
        return {
            "callers": callers,
            "direct": d,
            "invoke": i,
            "floor": floor.figures(),
            "added_p50_ms": round(i["p50_ms"] - d["p50_ms"], 3),
            "added_p99_ms": round(i["p99_ms"] - d["p99_ms"], 3),
            "added_p50_by_round_ms": [
                round(b["p50_ms"] - a["p50_ms"], 3)
                for a, b in zip(direct.rounds, invoke.rounds, strict=True)
            ],
        }

    async def profiled(self) -> dict[str, Any]:
        """An extra InvokeTool run, the most callers, with py-spy on the server."""
        profile = self.spec["profile"]
        callers = max(self.spec["callers"])
        case = Case(self.spec["server_pid"], self.spec["mcp_pid"])
        async with pyspy.recording(profile, self.spec["server_pid"]):
            await self.phase(case, self.invoke, callers, profile["seconds"] + 2)
        return {"callers": callers, **case.figures()}

    async def run(self) -> dict[str, Any]:
        levels = [await self.level(callers) for callers in self.spec["callers"]]
        answer: dict[str, Any] = {"levels": levels}
        if self.spec.get("profile"):
            answer["profiled"] = await self.profiled()
        return answer


async def client_mcp(spec: dict[str, Any]) -> dict[str, Any]:
    async with (
        streamable_http_client(spec["mcp_url"]) as (read, write),
        ClientSession(read, write) as session,
        dedicated_channel(spec["address"]) as connection,
    ):
        await session.initialize()
        return await McpLoad(spec, session, connection).run()


# ---------------------------------------------------------------------------------
# Scenario 2: webhook deliveries.


class Receiver:
    """``bench/integration.py receiver`` as a process: port on its first line, then commands.

    Commands are JSON lines on its stdin; each is answered by one JSON line.
    """

    def __init__(self, secret: str) -> None:
        # The secret by environment, not on a command line others can list.
        self.process = spawn(
            python(__file__, "receiver"), env={**os.environ, RECEIVER_SECRET: secret}
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())
        self.pid = self.process.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{path}"

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        answer: dict[str, Any] = json.loads(self.process.stdout.readline())
        return answer

    def close(self) -> None:
        stop(self.process)


@contextlib.contextmanager
def receiver(secret: str) -> Iterator[Receiver]:
    process = Receiver(secret)
    try:
        yield process
    finally:
        process.close()


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def webhook_scenario(sizes: Sizes, directory: Path) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{directory / 'webhooks.db'}"
    secret = new_secret()
    cases = []
    with receiver(secret) as hooks, serve(directory, url, SERVER_SETTINGS) as server:
        async with dedicated_channel(server.address) as connection:
            account = await register(connection, "webhooks@example.com")
            plans = [
                *(("burst", endpoints, count, WRITERS) for count, endpoints in sizes.bursts),
                ("steady", 1, 0, STEADY_CONVERSATIONS),
            ]
            prepared = []
            for index, (mode, endpoints, count, conversations) in enumerate(plans):
                workspace = await create_workspace(connection, account, f"hooks-{index}")
                paths = [f"w{index}-{e}" for e in range(endpoints)]
                for path in paths:
                    await create_integration(
                        connection,
                        account,
                        workspace,
                        path,
                        kind=pb.INTEGRATION_KIND_WEBHOOK,
                        display_name=f"Receiver {path}",
                        endpoint=hooks.url(path),
                        credential=secret,
                        event_types=["MESSAGE_CREATED"],
                    )
                names = await create_conversations(connection, account, [workspace] * conversations)
                prepared.append((mode, paths, count, names))
        for mode, paths, burst_count, names in prepared:
            waited = await wait_quiet(sizes.quiet_wait_s)
            if mode == "burst":
                count = burst_count
                say(f"webhooks: {count} messages as fast as they append, {len(paths)} endpoint(s)")
                spec = {"mode": "burst", "count": count, "writers": WRITERS}
            else:
                count = round(sizes.steady_rate * sizes.steady_seconds)
                say(
                    f"webhooks: {sizes.steady_rate:g} messages/s for {sizes.steady_seconds:g} s, "
                    f"{len(paths)} endpoint(s)"
                )
                spec = {
                    "mode": "steady",
                    "rate": sizes.steady_rate,
                    "count": count,
                    "warmup_s": sizes.steady_warmup_s,
                }
            before = hooks.ask({"cmd": "cpu"})["cpu_s"]
            server_before = process_cpu_s(server.pid)
            machine_before = machine_cpu_s()
            appended = run_client(
                __file__,
                {**spec, "address": server.address, "token": account.token, "conversations": names},
            )
            if len(appended["appended"]) < count:
                raise RuntimeError(f"appends failed: {appended['errors']}")
            arrived = hooks.ask(
                {"cmd": "wait", "paths": paths, "count": count, "stalled_s": STALLED_S}
            )
            figures = delivery_figures(
                mode,
                appended,
                arrived,
                receiver_cpu_s=arrived["cpu_s"] - before,
                server_cpu_s=process_cpu_s(server.pid) - server_before,
                machine_cpu_s=machine_cpu_s() - machine_before,
            )
            figures.update(endpoints=len(paths), quiet_wait_s=waited)
            say(f"  {_brief_hooks(figures)}")
            cases.append(figures)
    return {"cases": cases, "rate": sizes.steady_rate, "seconds": sizes.steady_seconds}


def delivery_figures(
    mode: str,
    appended: dict[str, Any],
    arrived: dict[str, Any],
    *,
    receiver_cpu_s: float,
    server_cpu_s: float,
    machine_cpu_s: float,
) -> dict[str, Any]:
    """What the appends and the arrivals say: rate, latency, and the checks."""
    times: dict[str, list[float]] = appended["appended"]  # message -> [start, returned]
    first: dict[tuple[str, str], float] = {}
    out_of_order = 0
    last_seq: dict[tuple[str, str], int] = {}
    for path, message, sequence, at in arrived["arrivals"]:
        key = (path, message)
        if key in first:
            continue
        first[key] = at
        conversation = message.rsplit("/messages/", 1)[0]
        out_of_order += sequence <= last_seq.get((path, conversation), 0)
        last_seq[(path, conversation)] = sequence
    paths = {path for path, _ in first}
    expected = {(path, message) for path in arrived["paths"] for message in times}
    unknown = len(set(first) - expected)
    deliveries = len(set(first) & expected)
    t0 = min((start for start, _ in times.values()), default=0.0)
    appends_end = max((returned for _, returned in times.values()), default=t0)
    last = max(first.values(), default=t0)
    wall = max(last - t0, 1e-9)
    figures: dict[str, Any] = {
        "mode": mode,
        "messages": len(times),
        "expected": len(expected),
        "delivered": deliveries,
        "missing": len(expected) - deliveries,
        "unknown": unknown,
        "duplicates": arrived["requests"] - len(first) - arrived["bad"],
        "bad_signatures": arrived["bad"],
        "out_of_order": out_of_order,
        "append_errors": appended["errors"],
        "appends_s": round(appends_end - t0, 2),
        "appends_per_s": round(len(times) / max(appends_end - t0, 1e-9), 1),
        "delivered_s": round(wall, 2),
        "deliveries_per_s": round(deliveries / wall, 1),
        "lag_after_appends_s": round(last - appends_end, 2),
        "drain_per_s": round(
            sum(at > appends_end for at in first.values()) / max(last - appends_end, 1e-9), 1
        ),
        "server_cpu_ms_per_delivery": round(server_cpu_s * 1000 / max(deliveries, 1), 2),
        "receiver_cpu_ms_per_delivery": round(receiver_cpu_s * 1000 / max(deliveries, 1), 2),
        "server_cores": round(server_cpu_s / wall, 2),
        "receiver_cores": round(receiver_cpu_s / wall, 2),
        "machine_cores": round(machine_cpu_s / wall, 2),
        "endpoints_seen": len(paths),
    }
    if mode == "steady":
        warm_from = t0 + appended["warmup_s"]
        after_return = []
        after_start = []
        for (_, message), at in first.items():
            if message not in times:
                continue
            start, returned = times[message]
            if start >= warm_from:
                after_return.append(at - returned)
                after_start.append(at - start)
        append_latency = [returned - start for start, returned in times.values()]
        figures.update(
            latency=summary(after_return),
            from_call=summary(after_start),
            append=summary(append_latency),
            late_sends=appended["late"],
            offered_per_s=appended["rate"],
        )
    return figures


# -- the receiver process ------------------------------------------------------------


class ReceiverApp:
    """A bare ASGI app: verify with standardwebhooks, note the first arrival, answer 204."""

    def __init__(self, secret: str) -> None:
        self.hook = Webhook(secret)
        self.arrivals: list[tuple[str, str, int, float]] = []
        self.seen: set[tuple[str, str]] = set()
        self.per_path: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self.bad = 0
        self.changed = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        # Arrival: the whole request is here (verification is the receiver's own cost).
        at = time.monotonic()
        body = b"".join(chunks)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests += 1
        status = 204
        try:
            parsed = self.hook.verify(body, headers)
        except WebhookVerificationError:
            self.bad += 1
            status = 401
        else:
            message = parsed["data"]["messageCreated"]["message"]
            path = scope["path"].rsplit("/", 1)[1]
            self.arrivals.append((path, message["name"], int(message["sequence"]), at))
            if (path, message["name"]) not in self.seen:
                self.seen.add((path, message["name"]))
                self.per_path[path] += 1
                self.changed.set()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def count(self, paths: Sequence[str]) -> int:
        return sum(self.per_path[path] for path in paths)


async def receiver_main(secret: str) -> None:
    import uvicorn

    app = ReceiverApp(secret)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving
            return
        await asyncio.sleep(0.01)  # polling uvicorn's start flag
    print(server.servers[0].sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        if command["cmd"] == "wait":
            wanted = command["count"] * len(command["paths"])
            # Until every delivery arrived, or none arrived for stalled_s.
            while app.count(command["paths"]) < wanted:
                app.changed.clear()
                try:
                    async with asyncio.timeout(command["stalled_s"]):
                        await app.changed.wait()
                except TimeoutError:
                    break
            paths = set(command["paths"])
            answer = {
                "paths": command["paths"],
                "arrivals": [a for a in app.arrivals if a[0] in paths],
                "requests": sum(1 for a in app.arrivals if a[0] in paths) + app.bad,
                "bad": app.bad,
            }
        else:
            answer = {}
        answer["cpu_s"] = time.process_time()
        print(json.dumps(answer), flush=True)
    server.should_exit = True
    await serving


# -- the appending client ------------------------------------------------------------


class Appender:
    """AppendMessage calls, timed on the machine's monotonic clock (the receiver's too)."""

    def __init__(self, spec: dict[str, Any], connection: aio.Channel) -> None:
        self.spec = spec
        self.metadata = bearer(spec["token"])
        self.stub = context_pb2_grpc.ContextServiceStub(connection)
        self.names: list[str] = spec["conversations"]
        self.times: dict[str, list[float]] = {}
        self.errors: collections.Counter[str] = collections.Counter()

    async def append(self, n: int) -> None:
        conversation = self.names[n % len(self.names)]
        request = cpb.AppendMessageRequest(
            parent=conversation,
            message=cpb.Message(
                role=cpb.MESSAGE_ROLE_USER, parts=[cpb.ContentPart(text=f"{MESSAGE} ({n})")]
            ),
        )
        # time.monotonic is CLOCK_MONOTONIC: one clock for every process of the machine.
        start = time.monotonic()
        try:
            response = await self.stub.AppendMessage(request, metadata=self.metadata, timeout=60)
        except aio.AioRpcError as err:
            self.errors[err.code().name] += 1
            return
        self.times[response.message.name] = [start, time.monotonic()]

    async def burst(self) -> dict[str, Any]:
        count, writers = self.spec["count"], self.spec["writers"]
        taken = iter(range(count))

        async def writer() -> None:
            for n in taken:
                await self.append(n)

        await asyncio.gather(*(writer() for _ in range(writers)))
        return {"appended": self.times, "errors": dict(self.errors)}

    async def steady(self) -> dict[str, Any]:
        """Open loop: message i is sent at ``i / rate`` whatever became of the earlier ones."""
        rate, count = self.spec["rate"], self.spec["count"]
        began = time.monotonic()
        late = 0
        tasks = []
        for n in range(count):
            due = began + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule
            elif delay < -0.005:
                late += 1
            tasks.append(asyncio.create_task(self.append(n)))
        await asyncio.gather(*tasks)
        return {
            "appended": self.times,
            "errors": dict(self.errors),
            "late": late,
            "rate": rate,
            "warmup_s": self.spec["warmup_s"],
        }


async def client_append(spec: dict[str, Any]) -> dict[str, Any]:
    async with dedicated_channel(spec["address"]) as connection:
        appender = Appender(spec, connection)
        quiet_gc()
        return await (appender.burst() if spec["mode"] == "burst" else appender.steady())


# ---------------------------------------------------------------------------------
# The report.


def _brief_level(level: dict[str, Any]) -> str:
    d, i = level["direct"], level["invoke"]
    return (
        f"{level['callers']} caller(s): direct p50 {d['p50_ms']:.2f} / p99 {d['p99_ms']:.2f} ms "
        f"({d['calls_per_s']:.0f}/s), InvokeTool p50 {i['p50_ms']:.2f} / p99 {i['p99_ms']:.2f} "
        f"ms ({i['calls_per_s']:.0f}/s); added p50 {level['added_p50_ms']:+.2f} ms, p99 "
        f"{level['added_p99_ms']:+.2f} ms; errors {d['errors'] or 0} / {i['errors'] or 0}, "
        f"wrong {d['wrong_answers']} / {i['wrong_answers']}"
    )


def _brief_hooks(f: dict[str, Any]) -> str:
    text = (
        f"{f['delivered']}/{f['expected']} delivered in {f['delivered_s']:.1f} s "
        f"({f['deliveries_per_s']:.0f}/s; appends {f['appends_per_s']:.0f}/s), duplicates "
        f"{f['duplicates']}, bad signatures {f['bad_signatures']}, out of order "
        f"{f['out_of_order']}"
    )
    if "latency" in f:
        lat = f["latency"]
        text += f"; latency p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms"
    return text


def render(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    lines = [
        SECTION,
        "",
        *provenance(command),
        f"- shape: {SERVED} with the defaults except "
        f"{settings_text(SERVER_SETTINGS)}; the MCP server or the webhook receiver and the "
        "measuring client (`bench/integration.py client`) each in a process of their own, "
        "all on loopback, sharing the cores. CPU figures come from /proc.",
        host_speed_line(results["host"]),
        "",
    ]
    if "mcp" in results:
        lines += _mcp_section(results["mcp"], sizes)
    if "webhooks" in results:
        lines += _webhook_section(results["webhooks"], sizes)
    return "\n".join(lines)


def _mcp_section(r: dict[str, Any], sizes: Sizes) -> list[str]:
    rows = []
    verdicts = []
    for level in r["levels"]:
        for label, key in (
            ("direct: `mcp` SDK ClientSession", "direct"),
            ("InvokeTool", "invoke"),
            ("floor: GetIntegration", "floor"),
        ):
            f = level[key]
            rows.append(
                f"| {level['callers']} | {label} | {f['calls']} | {f['p50_ms']:.2f} "
                f"| {f['p99_ms']:.2f} | {f['max_ms']:.2f} | {f['calls_per_s']:.0f} "
                f"| {f['server_cpu_ms_per_call']:.2f} | {f['mcp_cpu_ms_per_call']:.2f} "
                f"| {f['client_cpu_ms_per_call']:.2f} | {f['other_cores']:.2f} "
                f"| {errors_text(f['errors'])} |"
            )
        added = level["added_p50_ms"]
        met = verdict(added <= ADDED_P50_BUDGET_MS)
        verdicts.append(
            f"- {level['callers']} caller(s): added latency p50 **{added:+.2f} ms** ({met}), "
            f"p99 **{level['added_p99_ms']:+.2f} ms**; by round (p50): "
            + ", ".join(f"{x:+.2f}" for x in level["added_p50_by_round_ms"])
            + f"; InvokeTool calls/s / direct calls/s: "
            f"{level['invoke']['calls_per_s'] / max(level['direct']['calls_per_s'], 1e-9):.2f}; "
            f"the floor alone: p50 {level['floor']['p50_ms']:.2f} ms"
        )
    wrong = sum(level[k]["wrong_answers"] for level in r["levels"] for k in ("direct", "invoke"))
    lines = [
        "### InvokeTool on an MCP tool against calling the MCP server directly",
        "",
        f"MCP server: {r['server']}, one process on loopback; its `echo` tool with a "
        f"{len(MESSAGE)}-character message. One MCP integration (`MCP_SERVER`, "
        f"{r['tools_listed']} tools listed) points at it. The client process holds an `mcp` SDK "
        "`ClientSession` on the same server (streamable HTTP, the SDK's own HTTP client) and a "
        "gRPC channel to Switchboard with a bearer access token, and runs closed loops with "
        "the same number of concurrent callers on each path: direct, `call_tool('echo')` on "
        "the one session; InvokeTool of `.../tools/echo` (Switchboard checks the credential "
        "and the caller's role, spends the workspace's tool-call rate, reads the "
        "integration, validates the arguments against the tool's JSON Schema, calls the tool "
        "through its own SDK session inside the integration's circuit breaker, and records a "
        f"TOOL_INVOKED audit event). After {sizes.mcp_warmup_calls} warm-up calls per path, "
        f"{sizes.mcp_rounds} rounds of {sizes.mcp_seconds:g} s per path, alternating which "
        "path goes first; p50/p99 over all the rounds' calls. Each round ends with the "
        "floor: GetIntegration of the same integration by the same callers (credential, "
        "role, one SQLite read, access log: what any authenticated Switchboard call costs, "
        "with no tool call). CPU ms per call: the "
        "Switchboard server, the MCP server and the client over the calls; other cores: "
        "the rest of the machine meanwhile (other jobs: tails mean little when it is not "
        "near 0).",
        "",
        "| callers | path | calls | p50 ms | p99 ms | max ms | calls/s | Switchboard CPU ms "
        "| MCP server CPU ms | client CPU ms | other cores | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *verdicts,
        f"- budget: at most {ADDED_P50_BUDGET_MS:g} ms added at p50; answers that were not "
        f"the echo: {wrong}",
        f"- waited for a quiet machine before the run: {r['quiet_wait_s']:g} s",
        "",
    ]
    if r.get("profiled"):
        lines += _profile_lines(r, sizes)
    return lines


def _profile_lines(r: dict[str, Any], sizes: Sizes) -> list[str]:
    p = r["profiled"]
    groups, functions = r["profile_groups"], r["profile_functions"]
    total = groups["total"]
    return [
        "#### Where the server's time goes in InvokeTool (py-spy)",
        "",
        f"{pyspy.RECORD} on the serve process for {sizes.profile_seconds:g} s during an "
        f"extra, unmeasured InvokeTool run with {p['callers']} callers "
        f"({p['calls_per_s']:.0f} calls/s meanwhile, {p['server_cpu_ms_per_call']:.2f} ms "
        f"of Switchboard CPU per call): {total} busy samples of the thread holding the GIL "
        "(blocked ones left out). By library: own, the innermost frame; inclusive, anywhere "
        "on the stack (percent of the busy samples).",
        "",
        *pyspy.library_table(groups),
        "",
        *pyspy.function_table(
            "own % | function (innermost frame)", functions.get("own", [])[:15], total
        ),
        "",
        *pyspy.function_table(
            "inclusive % | Switchboard function", functions.get("inclusive", [])[:12], total
        ),
        "",
    ]


def _webhook_section(r: dict[str, Any], sizes: Sizes) -> list[str]:
    rows = []
    latency_rows = []
    for f in r["cases"]:
        label = (
            f"{f['messages']} as fast as they append, {f['endpoints']} endpoint(s)"
            if f["mode"] == "burst"
            else f"{f['offered_per_s']:g}/s, {f['endpoints']} endpoint(s)"
        )
        drain = f"{f['drain_per_s']:.0f}" if f["mode"] == "burst" else "-"
        rows.append(
            f"| {label} | {f['messages']} | {f['delivered']}/{f['expected']} "
            f"| {f['appends_per_s']:.0f} | {f['delivered_s']:.1f} "
            f"| **{f['deliveries_per_s']:.0f}** | {f['lag_after_appends_s']:.2f} "
            f"| {drain} "
            f"| {f['server_cpu_ms_per_delivery']:.2f} | {f['receiver_cpu_ms_per_delivery']:.2f} "
            f"| {f['server_cores']:.2f} / {f['receiver_cores']:.2f} / {f['machine_cores']:.2f} "
            f"| {f['duplicates']} | {f['bad_signatures']} | {f['out_of_order']} "
            f"| {errors_text(f['append_errors'])} |"
        )
        if "latency" in f:
            lat, call, app = f["latency"], f["from_call"], f["append"]
            latency_rows.append(
                f"| {label} | {lat['calls']} | {lat['p50_ms']:.1f} | **{lat['p99_ms']:.1f}** "
                f"| {lat['max_ms']:.1f} | {call['p50_ms']:.1f} / {call['p99_ms']:.1f} "
                f"| {app['p50_ms']:.1f} / {app['p99_ms']:.1f} | {f['late_sends']} |"
            )
    waited = ", ".join(f"{f['quiet_wait_s']:g}" for f in r["cases"])
    return [
        "### Webhook deliveries",
        "",
        "A receiver process on loopback (uvicorn, a bare ASGI app) verifies every request "
        "with the `standardwebhooks` library before it counts it, notes its arrival and "
        "answers 204. Each case has a workspace of its own whose webhook integrations "
        "(all signing with one secret) subscribe to `MESSAGE_CREATED`; the client appends "
        "messages to conversations of that workspace (AppendMessage over gRPC). Deliveries "
        "to one endpoint go out one at a time, in log order (integration/webhooks/delivery.py), so "
        "one endpoint's rate is bounded by the round trip of a delivery; several endpoints "
        "show the engine's parallelism. Throughput: "
        f"{WRITERS} writers append as fast as AppendMessage answers; deliveries/s is the "
        "deliveries over the time from the first append to the last first arrival; lag: from "
        "the last append's return to the last arrival; drain/s: the deliveries that arrived "
        "after the last append returned, over that lag (the sender alone, no appends "
        "meanwhile). Server CPU per delivery includes the appends. One server for all the "
        "cases, which run one after another in the order shown, each after the previous one "
        "was wholly delivered (finished deliveries stay in the table: "
        "`webhook_deliveries` grows from case to case).",
        "",
        "| case | messages | delivered | appends/s | s | deliveries/s | lag s | drain/s "
        "| server CPU ms per delivery | receiver CPU ms per delivery "
        "| cores: server / receiver / machine | duplicates | bad signatures "
        "| out of order | append errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Steady rate: {r['rate']:g} messages/s for {r['seconds']:g} s, one endpoint, sent on "
        f"a fixed schedule (open loop) round robin over {STEADY_CONVERSATIONS} "
        f"conversations; latencies of the messages after the first "
        f"{sizes.steady_warmup_s:g} s. Delivery latency: from AppendMessage's return in the "
        "client to the request's arrival at the receiver (one monotonic clock: "
        "CLOCK_MONOTONIC of the same machine). Late sends: messages sent more than 5 ms after "
        "their time.",
        "",
        "| case | deliveries | latency p50 ms | p99 ms | max ms "
        "| from before AppendMessage p50 / p99 ms | AppendMessage p50 / p99 ms | late sends |",
        "|---|---|---|---|---|---|---|---|",
        *latency_rows,
        "",
        "out of order: arrivals whose message sequence did not increase within its "
        "conversation and endpoint; duplicates: requests beyond one per delivery (at least "
        "once allows them). Waited for a quiet machine before the cases: "
        f"{waited} s.",
        "",
    ]


async def drive(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    wanted = set(args.only or ("mcp", "webhooks"))
    py_spy = pyspy.find(args)
    results: dict[str, Any] = {}
    async with session(results, "switchboard-integration-bench-") as directory:
        if "mcp" in wanted:
            out = directory / "profile-invoke.txt"
            profile = pyspy.plan(py_spy, sizes.profile_seconds, out)
            results["mcp"] = await mcp_scenario(sizes, directory, args.mcp_server, profile)
            if profile is not None:
                results["mcp"]["profile_groups"] = pyspy.libraries(out)
                results["mcp"]["profile_functions"] = pyspy.functions(out)
                await pyspy.keep(args, directory, out.name)
        if "webhooks" in wanted:
            results["webhooks"] = await webhook_scenario(sizes, directory)
    text = render(results, command_line("bench/integration.py"), sizes)
    report(results, text, args)
    return 0


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", choices=["mcp", "webhooks"], help="these scenarios")
    parser.add_argument(
        "--mcp-server", choices=sorted(MCP_SERVERS), default="sdk", help="the MCP server"
    )
    pyspy.flags(parser, "an extra InvokeTool run")


def main() -> int:
    client = clients({"mcp": client_mcp, "burst": client_append, "steady": client_append})
    return section_main(
        __doc__,
        drive,
        quick="short phases, small counts",
        options=options,
        roles={"client": client, "receiver": lambda: receiver_main(os.environ[RECEIVER_SECRET])},
    )


if __name__ == "__main__":
    raise SystemExit(main())
