"""Tool runs: what a run's tool step adds to the tool's own time; the first delta before/after.

    python bench/tools.py                the full run (about 3 minutes); prints the report
    python bench/tools.py --quick        small counts (< 1 min)
    python bench/tools.py --write        ... and put the report into BENCHMARKS.md
    python bench/tools.py --json         one JSON line, figures and report (bench/run.py)
    python bench/tools.py --profile      ... plus py-spy on the server (extra, unmeasured
                                         tool runs; --py-spy PATH, --profile-dir DIR)
    python bench/tools.py --first-delta-ab BEFORE AFTER [--pairs N] [--keep DIR]
                                         instead: bench/dispatcher.py's paced first-delta
                                         case on two source trees (git worktrees),
                                         alternating; a section of its own (--write)

The server is a real ``switchboard serve --dev --port 0`` process started by
``bench/harness.py``'s ``serve`` (embedded SQLite, in-memory cache and event
log, JSON access log to a file) with the defaults except the loopback egress,
the model provider and the rate limits one account would hit
(``SERVER_SETTINGS``). The user, workspace, conversations, the MCP integration
and the assistant are created through the RPCs.

The model is ``tests/fakes/openai_server.py``'s ``FakeOpenAI`` (the Chat
Completions protocol, streamed; the hosted API cannot be reached here) in this
process, subclassed to note, per run, when each request arrived and when each
streamed answer's last byte (``data: [DONE]`` and the final chunk) was written.
It answers a message ``Bench run <tag>: use the tool`` with one call of the
tool, and the request that carries the tool's result (or a message ``...:
answer directly``) with a short text. The tool is ``sleep`` of an MCP server in
a process of its own (``python bench/tools.py mcp``: the ``mcp`` SDK's
low-level server, streamable HTTP, uvicorn), which sleeps ``TOOL_MS`` and
returns the monotonic times it started and returned in its text; the model
reads them from the ``tool`` message. Every process reads the machine's one
CLOCK_MONOTONIC, so the times compare.

Per tool run (one conversation each, so every run has the same history):

* tool result -> next model request: from the tool's return in the MCP server
  to the arrival of the second model request (the MCP response, the hub, the
  tool runner, the llm handler building and sending the request);
* added latency over the tool's own time: (second request's arrival - first
  answer's last byte) - (tool's return - tool's start): everything between the
  model's two requests except the tool itself.

Baselines in the same run, interleaved round by round: the same tool called
directly with the ``mcp`` SDK's ``ClientSession`` from this process, and
through ``InvokeTool``; their round trip minus the tool's own time. And runs
without the tool step (the model answers at once) for the end-to-end time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import mcp_types as types
import uvicorn
from google.protobuf import struct_pb2
from grpc import aio
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.shared.exceptions import MCPError

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.api.integration.v1 import integration_pb2_grpc
from switchboard.dispatcher.runs.core.store import TERMINAL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.*, tests.*

from bench import pyspy
from bench.dispatcher import FIRST_DELTA_P99_BUDGET_MS, RUNS_HEADER, runs_case, runs_row
from bench.dispatcher import FULL as DISPATCHER_FULL
from bench.dispatcher import QUICK as DISPATCHER_QUICK
from bench.fixtures import (
    Account,
    create_conversations,
    create_integration,
    create_workspace,
    register,
)
from bench.harness import (
    QUIET_CORES,
    SERVED,
    CpuMeter,
    command_line,
    dedicated_channel,
    errors_text,
    host_speed_line,
    median,
    ms,
    provenance,
    python,
    quiet_gc,
    report,
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
from tests.fakes.openai_server import FakeOpenAI, Received, Reply

ROOT: Final = Path(__file__).resolve().parents[1]
SECTION: Final = "## Tool runs"
AB_SECTION: Final = "## The first delta before and after tool runs (issue 17)"
#: The tool's own time, in ms (a sleep: it holds no core).
TOOL_MS: Final = 20.0
#: The MCP integration's id and the tool: the model calls ``bench__sleep``.
INTEGRATION_ID: Final = "bench"
TOOL: Final = "sleep"
FUNCTION: Final = f"{INTEGRATION_ID}__{TOOL}"
MODEL: Final = "bench-model"
#: Seconds py-spy records the server in --profile's extra tool runs.
PROFILE_SECONDS: Final = 10.0
#: p99 budget of the latency a run adds to its tool's own time (the issue's), in ms.
ADDED_P99_BUDGET_MS: Final = 10.0
#: One account drives everything: the limits it would hit are lifted. The model
#: is not retried: a failed request shows as a failed run.
SERVER_SETTINGS: Final[dict[str, str]] = {
    "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
    "SWITCHBOARD_LLM_MODEL": MODEL,
    "SWITCHBOARD_LLM_MAX_RETRIES": "0",
    "SWITCHBOARD_INTEGRATION_TOOL_CALLS_PER_MINUTE": "1000000",
    "SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "10000000",
    "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_USER": "10000000",
    "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_WORKSPACE": "10000000",
}
_TAG: Final = re.compile(r"Bench run ([a-z0-9]+): (use the tool|answer directly)")
_SAID: Final = re.compile(r"slept for ([a-z0-9]+); started ([0-9.]+); returned ([0-9.]+)")


@dataclass(frozen=True)
class Sizes:
    levels: tuple[int, ...]
    rounds: int
    #: Per round and level: tool runs, runs without the tool, direct calls, InvokeTool calls.
    tool_runs: int
    plain_runs: int
    calls: int
    warmup_runs: int
    warmup_calls: int
    quiet_wait_s: float


FULL: Final = Sizes(
    levels=(1, 4),
    rounds=5,
    tool_runs=150,
    plain_runs=50,
    calls=150,
    warmup_runs=20,
    warmup_calls=50,
    quiet_wait_s=60.0,
)
QUICK: Final = Sizes(
    levels=(1, 4),
    rounds=2,
    tool_runs=30,
    plain_runs=10,
    calls=30,
    warmup_runs=6,
    warmup_calls=10,
    quiet_wait_s=0.0,  # no waiting for a quiet machine: a try-out
)


# ---------------------------------------------------------------------------------
# The tool: an MCP server process with one tool of known duration.

SLEEP: Final = types.Tool(
    name=TOOL,
    description="Sleeps `ms` milliseconds; says when it started and returned.",
    input_schema={
        "type": "object",
        "properties": {"ms": {"type": "number"}, "tag": {"type": "string"}},
        "required": ["ms", "tag"],
    },
)


async def _list_tools(
    ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[SLEEP])


async def _call_tool(
    ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    started = time.monotonic()
    if params.name != TOOL:
        raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown tool: {params.name}")
    args = params.arguments or {}
    await anyio.sleep(float(args["ms"]) / 1000)
    returned = time.monotonic()
    text = f"slept for {args['tag']}; started {started:.6f}; returned {returned:.6f}"
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])


class _Announcing(uvicorn.Server):
    """Says which port it serves once it accepts connections."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        assert sockets is not None
        print(f"listening on {sockets[0].getsockname()[1]}", flush=True)


def mcp_main() -> None:
    server: Server[Any] = Server(
        "switchboard-bench", on_list_tools=_list_tools, on_call_tool=_call_tool
    )
    app = server.streamable_http_app(host="127.0.0.1")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    _Announcing(config).run(sockets=[sock])


@dataclass(frozen=True)
class McpProcess:
    url: str
    pid: int


@contextlib.contextmanager
def mcp_server() -> Iterator[McpProcess]:
    """``python bench/tools.py mcp`` on a free port; terminated on exit."""
    with running(python(__file__, "mcp"), by="terminate") as process:
        assert process.stdout is not None
        line = process.stdout.readline()  # EOF if it dies: then the match fails
        match = re.fullmatch(r"listening on (\d+)\n", line)
        if match is None:
            raise RuntimeError(f"the bench MCP server did not start: {line!r}")
        yield McpProcess(f"http://127.0.0.1:{match.group(1)}/mcp", process.pid)


def tool_times(text: str) -> tuple[str, float, float] | None:
    """``(tag, started, returned)`` from the tool's text, or ``None``."""
    said = _SAID.search(text)
    if said is None:
        return None
    return said.group(1), float(said.group(2)), float(said.group(3))


# ---------------------------------------------------------------------------------
# The model: FakeOpenAI, stamping requests and answers by run.


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def tag_of(body: Any) -> tuple[str, str]:
    """``(tag, what)`` of a request: ``what`` is ``tool``, ``plain`` or ``result``."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        return "", "unknown"
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "tool":
        said = tool_times(_content(last))
        return (said[0] if said else "", "result")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            found = _TAG.search(_content(message))
            if found is not None:
                return found.group(1), "tool" if found.group(2) == "use the tool" else "plain"
            break
    return "", "unknown"


@dataclass
class StampedModel(FakeOpenAI):
    """The fake model, noting by run tag when each request arrived, when each
    streamed answer's last byte was written, and the times the tool reported."""

    arrived: dict[str, list[float]] = field(default_factory=dict)
    answered: dict[str, list[float]] = field(default_factory=dict)
    tool_said: dict[str, tuple[float, float]] = field(default_factory=dict)
    unexpected: int = 0

    def __post_init__(self) -> None:
        self.on_request = self._arrival
        self.default = self._reply

    def _arrival(self, request: Received) -> None:
        self.arrived.setdefault(tag_of(request.body)[0], []).append(time.monotonic())

    def _reply(self, body: dict[str, Any]) -> Reply:
        tag, what = tag_of(body)
        if what == "tool":
            return Reply.tool_calls([(FUNCTION, {"ms": TOOL_MS, "tag": tag}, f"call_{tag}")])
        if what == "result":
            said = tool_times(_content(body["messages"][-1]))
            if said is not None:
                self.tool_said[tag] = (said[1], said[2])
        elif what != "plain":
            self.unexpected += 1
        return Reply.text(f"All done for {tag or 'nobody'}.")

    async def _stream(
        self,
        reply: Reply,
        body: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        kept = await super()._stream(reply, body, reader, writer)
        # The last chunk is written and drained: the answer's last byte is out.
        self.answered.setdefault(tag_of(body)[0], []).append(time.monotonic())
        return kept

    def take(self, tag: str) -> tuple[list[float], list[float], tuple[float, float] | None]:
        """What was noted for one run (forgotten here)."""
        return (
            self.arrived.pop(tag, []),
            self.answered.pop(tag, []),
            self.tool_said.pop(tag, None),
        )


# ---------------------------------------------------------------------------------
# Set-up through the RPCs.


@dataclass(frozen=True)
class World:
    account: Account
    workspace: str
    integration: str
    assistant: str


async def prepare(channel: aio.Channel, mcp: McpProcess) -> World:
    account = await register(channel, "tools@example.com")
    workspace = await create_workspace(channel, account, "bench")
    integration = await create_integration(
        channel,
        account,
        workspace,
        INTEGRATION_ID,
        kind=ipb.INTEGRATION_KIND_MCP_SERVER,
        display_name="Bench MCP server",
        endpoint=mcp.url,
    )
    created = await dispatcher_pb2_grpc.DispatcherServiceStub(channel).CreateAssistant(
        pb.CreateAssistantRequest(
            parent=workspace,
            assistant_id="sleeper",
            assistant=pb.Assistant(
                display_name="Sleeper",
                instructions="Use the tool when asked to.",
                tools=[pb.AssistantTools(integration=integration, tools=[TOOL])],
            ),
        ),
        metadata=account.metadata,
        timeout=30,
    )
    return World(account, workspace, integration, created.assistant.name)


async def new_conversations(connection: aio.Channel, world: World, count: int) -> list[str]:
    parents = [world.workspace] * count
    return await create_conversations(connection, world.account, parents, "Run {}")


# ---------------------------------------------------------------------------------
# The measured loops.


@dataclass
class Case:
    """One kind of work at one level, pooled over the rounds."""

    meter: CpuMeter
    samples: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    rounds: list[dict[str, float]] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    model_requests: int = 0

    def figures(self, key: str) -> dict[str, Any]:
        meter = self.meter
        server, mcp = meter.used
        done = max(len(self.samples[key]), 1)
        wall = max(meter.wall, 1e-9)
        return {
            **{name: summary(values, (0.5, 0.95, 0.99)) for name, values in self.samples.items()},
            "per_s": round(len(self.samples[key]) / wall, 1),
            "errors": dict(self.errors),
            "model_requests_per_run": round(self.model_requests / done, 2),
            "server_cpu_ms": round(server * 1000 / done, 2),
            "mcp_cpu_ms": round(mcp * 1000 / done, 2),
            "client_cpu_ms": round(meter.client * 1000 / done, 2),
            "other_cores": round(meter.others() / wall, 2),
            "rounds": self.rounds,
        }


class ToolLoad:
    """Runs with and without the tool step, and the two baselines, at one level."""

    def __init__(
        self,
        channel: aio.Channel,
        session: ClientSession,
        model: StampedModel,
        world: World,
        pids: tuple[int, int],
    ) -> None:
        self.session = session
        self.model = model
        self.world = world
        self.pids = pids
        self.metadata = world.account.metadata
        self.dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        self.integrations = integration_pb2_grpc.IntegrationServiceStub(channel)
        self.serial = itertools.count(1)

    # -- one of each -----------------------------------------------------------

    async def run(self, conversation: str, tool: bool, case: Case, prefix: str) -> None:
        tag = f"{prefix}{next(self.serial):06d}"
        what = "use the tool" if tool else "answer directly"
        request = pb.SendMessageRequest(
            conversation=conversation,
            message=cpb.Message(parts=[cpb.ContentPart(text=f"Bench run {tag}: {what}.")]),
            assistant=self.world.assistant,
        )
        began = time.monotonic()
        try:
            sent = await self.dispatcher.SendMessage(request, metadata=self.metadata, timeout=60)
        except aio.AioRpcError as err:
            case.errors[f"SendMessage {err.code().name}"] += 1
            return
        state: int = pb.RUN_STATE_UNSPECIFIED
        hub_s = 0.0
        try:
            async for frame in self.dispatcher.WatchRun(
                pb.WatchRunRequest(name=sent.run.name, after_sequence=0),
                metadata=self.metadata,
                timeout=120,
            ):
                if frame.WhichOneof("frame") != "update":
                    continue
                update = frame.update
                kind = update.WhichOneof("update")
                if kind == "tool_result":
                    hub_s = update.tool_result.duration.ToNanoseconds() / 1e9
                elif kind == "state_change" and update.state_change.run.state in TERMINAL:
                    state = update.state_change.run.state
        except aio.AioRpcError as err:
            case.errors[f"WatchRun {err.code().name}"] += 1
        ended = time.monotonic()
        arrived, answered, said = self.model.take(tag)
        case.model_requests += len(arrived)
        if state != pb.RUN_STATE_SUCCEEDED:
            case.errors[pb.RunState.Name(state)] += 1  # type: ignore[arg-type]
            return
        case.samples["end_to_end"].append(ended - began)
        if not tool:
            return
        if len(arrived) != 2 or not answered or said is None:
            case.errors["model did not see the tool's result"] += 1
            return
        started, returned = said
        own = returned - started
        case.samples["tool_to_next_request"].append(arrived[1] - returned)
        case.samples["added"].append(arrived[1] - answered[0] - own)
        case.samples["answer_to_tool_start"].append(started - answered[0])
        case.samples["own"].append(own)
        case.samples["hub_over_own"].append(hub_s - own)
        case.samples["outside_hub"].append(arrived[1] - answered[0] - hub_s)

    async def direct(self, case: Case, prefix: str) -> None:
        tag = f"{prefix}{next(self.serial):06d}"
        began = time.monotonic()
        try:
            result = await self.session.call_tool(
                TOOL, {"ms": TOOL_MS, "tag": tag}, read_timeout_seconds=30
            )
        except (MCPError, TimeoutError) as exc:
            case.errors[type(exc).__name__] += 1
            return
        took = time.monotonic() - began
        block = result.content[0] if result.content else None
        text = block.text if isinstance(block, types.TextContent) else ""
        self._call_done(case, took, text, tag)

    async def invoke(self, case: Case, prefix: str) -> None:
        tag = f"{prefix}{next(self.serial):06d}"
        arguments = struct_pb2.Struct()
        arguments.update({"ms": TOOL_MS, "tag": tag})
        request = ipb.InvokeToolRequest(
            name=f"{self.world.integration}/tools/{TOOL}", arguments=arguments
        )
        began = time.monotonic()
        try:
            response = await self.integrations.InvokeTool(
                request, metadata=self.metadata, timeout=30
            )
        except aio.AioRpcError as err:
            case.errors[err.code().name] += 1
            return
        self._call_done(case, time.monotonic() - began, response.text, tag)

    @staticmethod
    def _call_done(case: Case, took: float, text: str, tag: str) -> None:
        said = tool_times(text)
        if said is None or said[0] != tag:
            case.errors["unexpected answer"] += 1
            return
        own = said[2] - said[1]
        case.samples["round_trip"].append(took)
        case.samples["over_own"].append(took - own)
        case.samples["own"].append(own)

    # -- phases ----------------------------------------------------------------

    async def phase(
        self,
        case: Case | None,
        work: Callable[[Case], Awaitable[None]],
        count: int,
        callers: int,
        key: str = "",
    ) -> None:
        """``count`` pieces of ``work``, ``callers`` at a time (closed loops); the
        round's percentiles of ``case.samples[key]``. No case: a warm-up."""
        target = case or Case(CpuMeter(*self.pids))
        left = iter(range(count))
        before = len(target.samples[key])

        async def caller() -> None:
            for _ in left:
                await work(target)

        with target.meter.measure():
            await asyncio.gather(*(caller() for _ in range(callers)))
        if case is not None:
            fresh = case.samples[key][before:]
            case.rounds.append(
                {"calls": len(fresh), "p50_ms": ms(fresh, 0.5), "p99_ms": ms(fresh, 0.99)}
            )

    async def level(self, channel: aio.Channel, callers: int, sizes: Sizes) -> dict[str, Any]:
        per_round = sizes.tool_runs + sizes.plain_runs
        pool = iter(
            await new_conversations(
                channel, self.world, sizes.rounds * per_round + 2 * sizes.warmup_runs
            )
        )
        tool, plain = Case(CpuMeter(*self.pids)), Case(CpuMeter(*self.pids))
        direct, invoke = Case(CpuMeter(*self.pids)), Case(CpuMeter(*self.pids))
        prefix = f"l{callers}"

        def runs(with_tool: bool) -> Callable[[Case], Awaitable[None]]:
            return lambda case: self.run(next(pool), with_tool, case, prefix)

        def calls(way: Callable[[Case, str], Awaitable[None]]) -> Callable[[Case], Awaitable[None]]:
            return lambda case: way(case, prefix)

        # Connections, caches, the session: the first of each are not measured.
        for work, count in (
            (runs(True), sizes.warmup_runs),
            (runs(False), sizes.warmup_runs),
            (calls(self.direct), sizes.warmup_calls),
            (calls(self.invoke), sizes.warmup_calls),
        ):
            await self.phase(None, work, count, callers)
        quiet_gc()
        phases: list[tuple[Case, Callable[[Case], Awaitable[None]], int, str]] = [
            (tool, runs(True), sizes.tool_runs, "added"),
            (plain, runs(False), sizes.plain_runs, "end_to_end"),
            (direct, calls(self.direct), sizes.calls, "over_own"),
            (invoke, calls(self.invoke), sizes.calls, "over_own"),
        ]
        for round_no in range(sizes.rounds):
            # Each round starts with a different kind, so drift hits them alike.
            shift = round_no % len(phases)
            for case, work, count, key in phases[shift:] + phases[:shift]:
                await self.phase(case, work, count, callers, key)
            say(f"  {callers} at once, round {round_no + 1}: {_brief_round(tool, direct, invoke)}")
        return {
            "callers": callers,
            "tool": tool.figures("added"),
            "plain": plain.figures("end_to_end"),
            "direct": direct.figures("round_trip"),
            "invoke": invoke.figures("round_trip"),
        }

    async def profiled(
        self, channel: aio.Channel, profile: dict[str, Any], server_pid: int
    ) -> dict[str, Any]:
        """Tool runs, one at a time, with py-spy recording the server meanwhile."""
        seconds = float(profile["seconds"])
        pool = iter(await new_conversations(channel, self.world, int(seconds * 40) + 40))
        case = Case(CpuMeter(*self.pids))
        async with pyspy.recording(profile, server_pid):
            deadline = time.monotonic() + seconds + 1
            with case.meter.measure():
                for conversation in pool:
                    if time.monotonic() >= deadline:
                        break
                    await self.run(conversation, True, case, "p")
        figures = case.figures("added")
        return {
            "runs": figures["added"]["calls"],
            "runs_per_s": figures["per_s"],
            "server_cpu_ms": figures["server_cpu_ms"],
            "added_p50_ms": figures["added"]["p50_ms"],
        }


def _brief_round(tool: Case, direct: Case, invoke: Case) -> str:
    last = tool.rounds[-1] if tool.rounds else {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return (
        f"added p50 {last['p50_ms']:.2f} ms, p99 {last['p99_ms']:.2f} ms; direct over own p50 "
        f"{ms(direct.samples['over_own'], 0.5):.2f} ms; InvokeTool over own p50 "
        f"{ms(invoke.samples['over_own'], 0.5):.2f} ms; errors "
        f"{dict(tool.errors + direct.errors + invoke.errors) or 0}"
    )


async def tools_scenario(
    sizes: Sizes, directory: Path, profile: dict[str, Any] | None
) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{directory / 'tools.db'}"
    model = StampedModel()
    async with model:
        settings = {**SERVER_SETTINGS, "SWITCHBOARD_LLM_BASE_URL": model.url}
        with mcp_server() as mcp, serve(directory, url, settings) as server:
            async with (
                dedicated_channel(server.address) as connection,
                streamable_http_client(mcp.url) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                world = await prepare(connection, mcp)
                load = ToolLoad(connection, session, model, world, (server.pid, mcp.pid))
                levels = []
                for callers in sizes.levels:
                    waited = await wait_quiet(sizes.quiet_wait_s)
                    say(f"tools: {callers} conversation(s) at once, {sizes.rounds} rounds")
                    figures = await load.level(connection, callers, sizes)
                    levels.append({**figures, "quiet_wait_s": waited})
                profiled = None
                if profile is not None:
                    say(f"profile: tool runs, one at a time, py-spy for {profile['seconds']:g} s")
                    profiled = await load.profiled(connection, profile, server.pid)
        unexpected = model.unexpected
    answer: dict[str, Any] = {"levels": levels, "unexpected_requests": unexpected}
    if profile is not None and profiled is not None:
        out = Path(profile["out"])
        answer["profile"] = {
            **profiled,
            "seconds": profile["seconds"],
            "groups": pyspy.libraries(out),
            "functions": pyspy.functions(out),
        }
    return answer


# ---------------------------------------------------------------------------------
# The first delta before and after: bench/dispatcher.py's paced case on two trees.


@contextlib.contextmanager
def source_tree(tree: Path) -> Iterator[None]:
    """Child processes (the server, the measuring client) import Switchboard from ``tree``.

    ``switchboard`` is a namespace package over ``services`` and ``gen``; the
    tree's come first on the path, ahead of the virtualenv's editable install.
    """
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(tree / "services"), str(tree / "gen")])
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def _imports_from(tree: Path) -> str:
    """Where a child process finds the dispatcher (a check that the path works)."""
    with source_tree(tree):
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "import switchboard.dispatcher.service as m, switchboard.cli as c; "
                "print(m.__file__); print(c.__file__)",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=tempfile.gettempdir(),
        )
    files = done.stdout.split()
    if not all(Path(f).is_relative_to(tree) for f in files):
        raise RuntimeError(f"{tree}: a child process imports Switchboard from {files}")
    return files[0]


def _commit(tree: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tree), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "subject": _clip(git("log", "-1", "--format=%s"), 70),
        "dirty": "yes" if git("status", "--porcelain", "--", "services", "gen") else "no",
    }


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


async def first_delta_ab(
    trees: Sequence[Path], pairs: int, quick: bool, directory: Path
) -> dict[str, Any]:
    """The paced case on each tree, ``pairs`` times (the servers' logs in ``directory``)."""
    sizes = DISPATCHER_QUICK if quick else DISPATCHER_FULL
    labels = ("before", "after")
    info = {
        label: {**_commit(tree), "tree": str(tree), "imports": _imports_from(tree)}
        for label, tree in zip(labels, trees, strict=True)
    }
    cases = []
    for pair in range(pairs):
        order = list(zip(labels, trees, strict=True))
        if pair % 2:
            order.reverse()  # neither tree always goes first
        for label, tree in order:
            say(
                f"first delta, pair {pair + 1}: {label} ({info[label]['commit']}), "
                f"{sizes.latency_conversations} conversations, pause "
                f"{sizes.paced_pause_s:g} s"
            )
            with source_tree(tree):
                figures = await runs_case(
                    directory,
                    conversations=sizes.latency_conversations,
                    warmup_s=sizes.paced_warmup_s,
                    seconds=sizes.paced_seconds,
                    channels=4,
                    quiet_wait_s=sizes.quiet_wait_s,
                    pause_s=sizes.paced_pause_s,
                )
            d = figures["first_delta"]
            say(
                f"  first delta p50 {d['p50_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms over "
                f"{d['calls']} runs; server {figures['server_cpu_ms_per_call']:.1f} ms "
                f"per run; others {figures['other_cores']:.2f} cores"
            )
            cases.append({**figures, "pair": pair + 1, "label": label})
    return {
        "trees": info,
        "cases": cases,
        "pairs": pairs,
        "warmup_s": sizes.paced_warmup_s,
        "seconds": sizes.paced_seconds,
        "pause_s": sizes.paced_pause_s,
    }


# ---------------------------------------------------------------------------------
# The report.


def _triple(s: dict[str, float]) -> str:
    return f"{s['p50_ms']:.2f} / {s['p95_ms']:.2f} / {s['p99_ms']:.2f}"


def render(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    lines = [
        SECTION,
        "",
        *provenance(command),
        f"- source: {results['source']}",
        f"- shape: {SERVED} with the defaults except "
        f"{settings_text(SERVER_SETTINGS)} and `SWITCHBOARD_LLM_BASE_URL` pointing at the "
        "model; the model (`tests/fakes/openai_server.py`'s `FakeOpenAI`, Chat Completions "
        "streamed over HTTP/1.1 keep-alive) and the measuring client (grpc.aio, one channel; "
        "the `mcp` SDK's `ClientSession`) in the benchmark process; the MCP server (`python "
        "bench/tools.py mcp`: the `mcp` SDK's low-level server, streamable HTTP with SSE "
        f"responses, uvicorn) in a process of its own. Its one tool, `{TOOL}`, sleeps "
        f"{TOOL_MS:g} ms and says in its text the monotonic times it started and returned; "
        "the model reads them from the `tool` message, and notes when each request arrived "
        "(its body read) and when each streamed answer's last byte (`data: [DONE]`, the "
        "final chunk) was written. All of it on loopback, on the machine's one "
        "CLOCK_MONOTONIC, sharing the cores.",
        host_speed_line(results["host"]),
        "",
    ]
    lines += _tools_section(results["tools"], sizes)
    return "\n".join(lines)


def _tools_section(r: dict[str, Any], sizes: Sizes) -> list[str]:
    levels = r["levels"]
    waited = ", ".join(f"{level['quiet_wait_s']:g}" for level in levels)
    return [
        "### A run with one tool call",
        "",
        *_step_lines(sizes, levels),
        *_baseline_lines(levels),
        *_end_to_end_lines(levels),
        f"Budget: the added latency under {ADDED_P99_BUDGET_MS:g} ms at p99 on 2 cores.",
        "",
        *(line for level in levels for line in _verdicts(level)),
        f"- model requests that were not a bench run's: {r['unexpected_requests']}; waited "
        f"for a quiet machine before each level: {waited} s",
        "",
        *(_profile_lines(r["profile"]) if r.get("profile") else []),
    ]


def _step_lines(sizes: Sizes, levels: Sequence[dict[str, Any]]) -> list[str]:
    """The tool step's own table: where its time goes."""
    rows = []
    for level in levels:
        t = level["tool"]
        rows.append(
            f"| {level['callers']} | {t['added']['calls']} | {_triple(t['tool_to_next_request'])} "
            f"| {t['added']['p50_ms']:.2f} / {t['added']['p95_ms']:.2f} / "
            f"**{t['added']['p99_ms']:.2f}** | {t['added']['max_ms']:.2f} "
            f"| {t['answer_to_tool_start']['p50_ms']:.2f} / "
            f"{t['answer_to_tool_start']['p99_ms']:.2f} "
            f"| {t['hub_over_own']['p50_ms']:.2f} / {t['hub_over_own']['p99_ms']:.2f} "
            f"| {t['outside_hub']['p50_ms']:.2f} / {t['outside_hub']['p99_ms']:.2f} "
            f"| {t['own']['p50_ms']:.2f} | {errors_text(t['errors'])} |"
        )
    return [
        f"Each run: a new conversation, SendMessage with the assistant (which enables the "
        f"one tool), then WatchRun read to the terminal state. The model answers the first "
        f"request with one call of `{FUNCTION}` (its arguments streamed in pieces, "
        "`finish_reason: tool_calls`); the dispatcher calls the tool through the hub and "
        "sends the result back as a `tool` message in a second request, answered with a "
        "4-word text. Closed loops: N conversations at once, each starting its next run "
        f"when its last one ended. After {sizes.warmup_runs} unmeasured runs of each kind "
        f"and {sizes.warmup_calls} calls of each baseline, {sizes.rounds} rounds of "
        f"{sizes.tool_runs} tool runs, {sizes.plain_runs} runs without the tool, "
        f"{sizes.calls} direct calls and {sizes.calls} InvokeTool calls, each round "
        "starting with the next kind; percentiles over all the rounds.",
        "",
        "- tool result -> next request: from the tool's return in the MCP server to the "
        "second model request's arrival;",
        "- added: (second request's arrival - first answer's last byte) - the tool's own "
        "time (its return - its start): the tool step's whole cost to the run but the tool;",
        "- answer end -> tool start: from the first answer's last byte to the tool's start "
        "(the dispatcher reading the call, the hub, the MCP request);",
        "- hub's call - own: the `tool_result` update's `duration` (the tool runner's "
        "measure of its call into the hub: the run user's authorization, the hub's checks, "
        "the MCP round trip, the result's mapping) minus the tool's own time;",
        "- outside the hub's call: added - (hub's call - own), per run: the dispatcher and "
        "the llm handler alone (reading the end of the model's answer, the tool runner, the "
        "second request built and sent).",
        "",
        "The model's notes are taken on the benchmark process's event loop, which also reads "
        "the WatchRun streams: with several conversations at once its own delays count too.",
        "",
        "| conversations at once | tool runs | tool result -> next request p50 / p95 / p99 ms "
        "| added p50 / p95 / p99 ms | added max ms "
        "| answer end -> tool start p50 / p99 ms | hub's call - own p50 / p99 ms "
        "| outside the hub's call p50 / p99 ms | tool's own time p50 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _baseline_lines(levels: Sequence[dict[str, Any]]) -> list[str]:
    """The same tool called directly and through InvokeTool: what the runs compare with."""
    rows = []
    for level in levels:
        added = level["tool"]["added"]
        for label, f in (
            ("direct: `mcp` SDK `call_tool`", level["direct"]),
            ("InvokeTool (Switchboard's hub)", level["invoke"]),
        ):
            rows.append(
                f"| {level['callers']} | {label} | {f['round_trip']['calls']} "
                f"| {_triple(f['round_trip'])} | {_triple(f['over_own'])} "
                f"| {added['p50_ms'] / f['over_own']['p50_ms']:.2f} / "
                f"{added['p99_ms'] / f['over_own']['p99_ms']:.2f} "
                f"| {f['server_cpu_ms']:.2f} | {f['mcp_cpu_ms']:.2f} | {f['client_cpu_ms']:.2f} "
                f"| {f['other_cores']:.2f} | {errors_text(f['errors'])} |"
            )
    return [
        "Baselines, interleaved with the runs: the same tool with the same arguments, called "
        "directly from the benchmark process on one `mcp` SDK `ClientSession` (streamable "
        "HTTP) and through InvokeTool (gRPC, authenticated; the hub's own SDK session), "
        "the same number at once. Over own: the round trip minus the tool's own time. "
        "Ratio: the runs' added latency over this baseline's, at p50 and p99. CPU ms per "
        "call: Switchboard, the MCP server, the benchmark process; other cores: the rest of "
        "the machine meanwhile.",
        "",
        "| conversations at once | path | calls | round trip p50 / p95 / p99 ms "
        "| over own p50 / p95 / p99 ms | runs' added / this, p50 / p99 | Switchboard CPU ms "
        "| MCP server CPU ms | benchmark CPU ms | other cores | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _end_to_end_lines(levels: Sequence[dict[str, Any]]) -> list[str]:
    """Runs with the tool step against runs without it."""
    rows = []
    for level in levels:
        for label, f in (
            ("with the tool step", level["tool"]),
            ("without (the model answers at once)", level["plain"]),
        ):
            e = f["end_to_end"]
            rows.append(
                f"| {level['callers']} | {label} | {e['calls']} | {_triple(e)} "
                f"| {f['per_s']:.1f} | {f['model_requests_per_run']:.2f} "
                f"| {f['server_cpu_ms']:.2f} | {f['mcp_cpu_ms']:.2f} | {f['client_cpu_ms']:.2f} "
                f"| {f['other_cores']:.2f} | {errors_text(f['errors'])} |"
            )
    return [
        "End to end: from just before SendMessage to the terminal state on WatchRun, runs "
        "with the tool step against runs whose model answers at once (same assistant, tools "
        "offered, one request). CPU ms per run; model requests per run as the model counted "
        "them.",
        "",
        "| conversations at once | run | runs | SendMessage -> terminal p50 / p95 / p99 ms "
        "| runs/s | model requests per run | Switchboard CPU ms | MCP server CPU ms "
        "| benchmark CPU ms | other cores | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _verdicts(level: dict[str, Any]) -> list[str]:
    """One level against the budget, and where its added p50 goes."""
    t, p, d, i = level["tool"], level["plain"], level["direct"], level["invoke"]
    added = t["added"]["p99_ms"]
    gap = t["end_to_end"]["p50_ms"] - p["end_to_end"]["p50_ms"]
    return [
        f"- {level['callers']} conversation(s) at once: added latency p99 **{added:.2f} ms** "
        f"({verdict(added < ADDED_P99_BUDGET_MS)}); by round (p99): "
        + ", ".join(f"{x['p99_ms']:.2f}" for x in t["rounds"])
        + f"; the run's added latency / direct MCP call's, p50: "
        f"{t['added']['p50_ms'] / d['over_own']['p50_ms']:.2f}, / InvokeTool's: "
        f"{t['added']['p50_ms'] / i['over_own']['p50_ms']:.2f}; end to end, with the tool "
        f"step - without, p50: {gap:+.2f} ms ({TOOL_MS:g} ms of it the tool)",
        f"  - where the added p50 ({t['added']['p50_ms']:.2f} ms) goes: the hub's call "
        f"over the tool's own time {t['hub_over_own']['p50_ms']:.2f} ms (a direct SDK "
        f"call's: {d['over_own']['p50_ms']:.2f} ms), the dispatcher and llm handler "
        f"outside it {t['outside_hub']['p50_ms']:.2f} ms (p50s of each part, so they need "
        "not add up); the tool step's Switchboard CPU (runs with it - without): "
        f"{t['server_cpu_ms'] - p['server_cpu_ms']:.1f} ms per run",
    ]


def _profile_lines(p: dict[str, Any]) -> list[str]:
    groups, functions = p["groups"], p["functions"]
    return [
        "#### Where the server's time goes in tool runs (py-spy)",
        "",
        f"{pyspy.RECORD} on the serve process for {p['seconds']:g} s during an extra, "
        f"unmeasured series of tool runs, one at a time ({p['runs']} runs, "
        f"{p['runs_per_s']:.1f} runs/s, {p['server_cpu_ms']:.1f} ms of Switchboard CPU per "
        f"run, added p50 {p['added_p50_ms']:.2f} ms meanwhile): {groups['total']} busy "
        "samples of the thread holding the GIL. By library: own, the innermost frame; "
        "inclusive, anywhere on the stack (percent of the busy samples).",
        "",
        *pyspy.library_table(groups),
        "",
        *pyspy.function_table(
            "inclusive % | Switchboard function",
            functions.get("inclusive", [])[:15],
            groups["total"],
        ),
        "",
    ]


def render_ab(results: dict[str, Any], command: str) -> str:
    r = results["ab"]
    trees = r["trees"]
    rows = []
    for case in r["cases"]:
        busy = " (others busy)" if case["other_cores"] >= QUIET_CORES else ""
        label = f"{case['pair']}: {case['label']} ({trees[case['label']]['commit']}){busy}"
        rows.append(runs_row(label, case))

    def of(label: str, key: str, quiet: bool = False) -> float:
        """The median over the pairs of one tree's figure (``cpu``: server CPU per run)."""
        return median(
            c["first_delta"][key] if key != "cpu" else c["server_cpu_ms_per_call"]
            for c in r["cases"]
            if c["label"] == label and (not quiet or c["other_cores"] < QUIET_CORES)
        )

    def ratios(key: str) -> str:
        pairs: dict[int, dict[str, float]] = collections.defaultdict(dict)
        for c in r["cases"]:
            pairs[c["pair"]][c["label"]] = c["first_delta"][key]
        return ", ".join(
            f"{p['after'] / p['before']:.2f}" for _, p in sorted(pairs.items()) if len(p) == 2
        )

    before, after = of("before", "p99_ms"), of("after", "p99_ms")
    quiet_before, quiet_after = of("before", "p99_ms", True), of("after", "p99_ms", True)
    verdicts = [
        f"{label}: **{of(label, 'p99_ms'):.1f} ms** "
        f"({verdict(of(label, 'p99_ms') < FIRST_DELTA_P99_BUDGET_MS)})"
        for label in ("before", "after")
    ]
    busy = sum(c["other_cores"] >= QUIET_CORES for c in r["cases"])
    pause = r["pause_s"]
    return "\n".join(
        [
            AB_SECTION,
            "",
            *provenance(command),
            f"- trees: before `{trees['before']['commit']}` ({trees['before']['subject']}), "
            f"after `{trees['after']['commit']}` ({trees['after']['subject']}); uncommitted "
            f"changes in services/ or gen/: {trees['before']['dirty']} / "
            f"{trees['after']['dirty']}. Each a git worktree put first on `PYTHONPATH` of the "
            "server and the measuring client, with the same virtualenv (checked: a child "
            f"process imports `{Path(trees['before']['imports']).name}` from its tree).",
            host_speed_line(results["host"]),
            "",
            "`bench/dispatcher.py`'s paced first-delta case (its Dispatcher section describes "
            "the loop): 100 conversations, each SendMessage (the built-in `echo` handler) then "
            f"WatchRun to the end, a think time of {pause / 2:g}-{pause * 3 / 2:g} s between "
            f"runs; {r['seconds']:g} s measured after {r['warmup_s']:g} s, a fresh server per "
            f"case; {r['pairs']} pair(s), alternating which tree goes first. The runs use no "
            "tools: this is what the tool-run work (the tool runner, assistants, the run "
            "lifecycle, the RunJob) costs a run that does not use it.",
            "",
            RUNS_HEADER[0].replace("| conversations |", "| pair: tree |", 1),
            *RUNS_HEADER[1:],
            *rows,
            "",
            f"- first delta p99, median of the pairs, budget under "
            f"{FIRST_DELTA_P99_BUDGET_MS:g} ms on 2 cores: " + "; ".join(verdicts),
            f"- after / before, medians, p99: **{after / before:.2f}**; p50: "
            f"{of('after', 'p50_ms') / of('before', 'p50_ms'):.2f}; server CPU per "
            f"run: {of('before', 'cpu'):.1f} -> {of('after', 'cpu'):.1f} ms "
            f"({of('after', 'cpu') / of('before', 'cpu'):.2f})",
            f"- after / before by pair, p99: {ratios('p99_ms')}; p50: {ratios('p50_ms')}",
            f"- cases measured while other jobs used {QUIET_CORES:g} cores or more (others "
            f"busy): {busy} of {len(r['cases'])}; without them, median p99 before / after: "
            f"{quiet_before:.1f} / {quiet_after:.1f} ms ({quiet_after / quiet_before:.2f})",
            "- waited for a quiet machine before the cases: "
            + ", ".join(f"{c.get('quiet_wait_s', 0.0):g}" for c in r["cases"])
            + " s",
            "",
        ]
    )


def _source() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--", "services", "gen")
    return f"commit `{git('rev-parse', '--short', 'HEAD')}`" + (
        " with uncommitted changes in services/ or gen/" if dirty else ""
    )


async def drive(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    results: dict[str, Any] = {}
    if args.first_delta_ab:
        async with session(results, "switchboard-tools-ab-") as directory:
            results["ab"] = await first_delta_ab(
                args.first_delta_ab, args.pairs, args.quick, Path(args.keep or directory)
            )
        report(results, render_ab(results, command_line("bench/tools.py")), args)
        return 0
    results["source"] = _source()
    py_spy = pyspy.find(args)
    async with session(results, "switchboard-tools-bench-") as directory:
        out = directory / "profile-tools.txt"
        profile = pyspy.plan(py_spy, PROFILE_SECONDS, out)
        results["tools"] = await tools_scenario(sizes, directory, profile)
        if profile is not None:
            await pyspy.keep(args, directory, out.name)
    report(results, render(results, command_line("bench/tools.py"), sizes), args)
    return 0


def _made(directory: str) -> str:
    """``--keep``'s directory, made if missing (none: ``""``)."""
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
    return directory


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--first-delta-ab",
        nargs=2,
        type=lambda tree: Path(tree).resolve(),
        metavar=("BEFORE", "AFTER"),
        help="instead: bench/dispatcher.py's paced first-delta case on these two source trees",
    )
    parser.add_argument("--pairs", type=int, default=3, help="--first-delta-ab: pairs of cases")
    parser.add_argument(
        "--keep",
        type=_made,
        default="",
        help="--first-delta-ab: keep the servers' logs in this directory",
    )
    pyspy.flags(parser, "extra tool runs")


def main() -> int:
    return section_main(
        __doc__, drive, quick="small counts", options=options, roles={"mcp": mcp_main}
    )


if __name__ == "__main__":
    raise SystemExit(main())
