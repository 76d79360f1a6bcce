"""Delegation (issue 71, docs/delegation.md): what a child run costs, and whether trees
of children starve other workspaces.

    python bench/delegation.py            the full run (about 3 minutes); prints the report
    python bench/delegation.py --quick    fewer rounds, shorter phases (about 90 s)
    python bench/delegation.py --write    ... and put the report into BENCHMARKS.md
    python bench/delegation.py --json     one JSON line, figures and report (bench/run.py)
    python bench/delegation.py --parents N --children K
                                          the starvation check's tree (100 x 10 unless given)

The issue's goals: "A child run costs no more than a run sent by a client (measure: a
parent with one echo child against two client-sent runs, CPU per run, interleaved); ten
concurrent children per parent at 100 parents do not starve other workspaces
(bench/fairness.py's measure)."

The model is ``tests/fakes/openai_server.py``'s echo in its own process
(``python bench/delegation.py model INTERVAL_MS``): a message of ``call ask_echoer
{"input": ...}`` lines, with the tool offered, is answered with those tool calls; any
other message is echoed back one word per chunk; after tool results it answers
``TOKENS`` words. So every model step is ``TOKENS`` tokens. The server is a fresh
``switchboard serve --dev`` (embedded SQLite) per part with the ``llm`` handler on that
model; two assistants: ``echoer`` (no tools) and ``planner`` (``delegates: [echoer]``).

**Cost** (the model unpaced): rounds of three interleaved cases on one server, each first,
middle and last in turn. *Parent + child*: ``UNITS`` messages to the planner, each asking
the echoer once, ``IN_FLIGHT`` at a time, each SendMessage then WatchRun to the parent's
end; a unit is two runs and three model steps (the parent's call, the child's answer, the
parent's answer). *The parent alone*: the same, but the call's question is blank, which
the delegate tool refuses before any child starts (an error result): one run, the same two
model steps and the same tool call. *Client-sent*: ``UNITS`` pairs of messages to the
echoer, one after the other (as a parent and its child run), each run watched to its end;
a unit is two runs and two model steps. Every message goes to a conversation created
before the case (a child's conversation is created by the delegation, inside the measured
time). Server CPU (from /proc, the whole process) over each case, per unit and per run.
The issue's measure is parent + child against two client-sent runs, per run; the child's
own cost is parent + child less the parent alone, against one client-sent run.

**Starvation** (the model paced, ``INTERVAL_MS`` a token: a step of about half a
second), as ``bench/fairness.py`` measures: workspace B, its own client process, sends
one message a second (a conversation each) and reads its first token and the run's end;
phase 1 with A idle, phase 2 with A sending ``PARENTS`` messages to its planner at once,
each asking ``CHILDREN`` echoers in one step (``SWITCHBOARD_DISPATCHER_MAX_CHILDREN_PER_RUN``
set so they all go at once). A and B are separate accounts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from grpc import aio

from bench import fairness
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
    median,
    ms,
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
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.dispatcher.runs.core.store import TERMINAL
from tests.fakes.openai_server import FakeOpenAI, Reply, echo_reply

SECTION: Final = "## Delegation"
MODEL: Final = "bench-model"
#: Words of every model step.
TOKENS: Final = 16
#: The paced model of the starvation check (bench/fairness.py's pace).
INTERVAL_MS: Final = 33
DELEGATE: Final = "echoer"
PLANNER: Final = "planner"
#: The cost check: units a case sends per round, and how many at once.
IN_FLIGHT: Final = 4
#: The starvation check: messages to A's planner in flight at once while it sends.
SEND_CALLS: Final = 64
#: Admission's turns as bench/fairness.py sets them (a multi-tenant deployment's).
ADMITTING: Final = fairness.ADMITTING
WARMUP_MESSAGES: Final = 3
#: The issue's goals: a child costs no more than a client-sent run (the ratio of server
#: CPU per run, delegated / client-sent, at most this, given the rounds' spread), and B's
#: first-token p99 with A's trees at most this times its p99 with A idle (fairness.py's).
COST_GOAL: Final = 1.0
STARVE_GOAL: Final = 2.0
#: The server's settings as bench/fairness.py sets them (its admission turns included).
SETTINGS: Final = fairness.SETTINGS


@dataclass(frozen=True)
class Sizes:
    rounds: int
    units: int
    warmup_units: int
    parents: int
    children: int
    warmup_s: float
    phase_s: float
    quiet_wait_s: float


FULL: Final = Sizes(
    rounds=6,
    units=60,
    warmup_units=8,
    parents=100,
    children=10,
    warmup_s=3.0,
    phase_s=40.0,
    quiet_wait_s=15.0,
)
QUICK: Final = Sizes(
    rounds=3,
    units=16,
    warmup_units=4,
    parents=100,
    children=10,
    warmup_s=2.0,
    phase_s=15.0,
    quiet_wait_s=5.0,
)


def words(count: int = TOKENS) -> str:
    return " ".join(f"w{i}" for i in range(count))


def asking(children: int) -> str:
    """A message the planner's model answers with ``children`` calls of its delegate."""
    question = json.dumps({"input": words()})
    return "\n".join(f"call ask_{DELEGATE} {question}" for _ in range(children))


def tree_settings(children: int) -> dict[str, str]:
    return {
        **SETTINGS,
        "SWITCHBOARD_DISPATCHER_MAX_CHILDREN_PER_RUN": str(children),
        "SWITCHBOARD_DISPATCHER_MAX_CHILDREN_PER_TREE": str(max(32, children)),
        "SWITCHBOARD_DISPATCHER_MAX_TOOL_CALLS_PER_STEP": str(max(16, children)),
    }


# ---------------------------------------------------------------------------------
# The model: FakeOpenAI's echo, in its own process.


async def model_main(interval_ms: int) -> None:
    """Serve the echo model (``interval_ms`` between chunks) on a free port; print it;
    serve until stdin closes."""
    interval = interval_ms / 1000

    def reply(body: dict[str, Any]) -> Reply:
        # After its delegates answered, the planner says ``TOKENS`` words (the echo
        # model would repeat every answer, ten of them in the starvation check).
        answer = (
            Reply.text(words()) if body["messages"][-1].get("role") == "tool" else echo_reply(body)
        )
        return dataclasses.replace(answer, interval_s=interval)

    fake = FakeOpenAI(default=reply)
    # Thousands of request bodies, never read here, would only grow the process.
    fake.requests = _Forgotten()
    await fake.start()
    print(fake.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await fake.close()


class _Forgotten(list[Any]):
    """A list that keeps nothing."""

    def append(self, _item: Any) -> None:
        return None


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
# What both parts set up.


async def assistants(channel: aio.Channel, account: Account, workspace: str) -> tuple[str, str]:
    """The echoer and the planner that delegates to it; their names."""
    stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
    made = []
    for assistant_id, delegates in ((DELEGATE, ()), (PLANNER, (DELEGATE,))):
        response = await stub.CreateAssistant(
            pb.CreateAssistantRequest(
                parent=workspace,
                assistant_id=assistant_id,
                assistant=pb.Assistant(
                    display_name=assistant_id.title(),
                    description=f"The {assistant_id}.",
                    instructions=f"You are the {assistant_id}.",
                    delegates=[
                        pb.AssistantDelegate(assistant=f"{workspace}/assistants/{d}")
                        for d in delegates
                    ],
                ),
            ),
            metadata=account.metadata,
            timeout=30,
        )
        made.append(response.assistant.name)
    return made[0], made[1]


@dataclass
class Outcome:
    """What one watched run (and, for a parent, its children) came to."""

    ended: float
    state: pb.RunState.ValueType
    children: int = 0


async def send_and_watch(
    stub: dispatcher_pb2_grpc.DispatcherServiceAsyncStub,
    metadata: tuple[tuple[str, str]],
    conversation: str,
    assistant: str,
    text: str,
) -> Outcome:
    """SendMessage, then WatchRun to the run's end; the children its updates named."""
    sent = await stub.SendMessage(
        pb.SendMessageRequest(
            conversation=conversation,
            assistant=assistant,
            message=cpb.Message(parts=[cpb.ContentPart(text=text)]),
        ),
        metadata=metadata,
        timeout=60,
    )
    children: set[str] = set()
    async for frame in stub.WatchRun(
        pb.WatchRunRequest(name=sent.run.name), metadata=metadata, timeout=120
    ):
        if frame.WhichOneof("frame") != "update":
            continue
        update = frame.update
        kind = update.WhichOneof("update")
        if kind == "child_run" and update.child_run.state == pb.RUN_STATE_SUCCEEDED:
            children.add(update.child_run.run)
        elif kind == "state_change" and update.state_change.run.state in TERMINAL:
            return Outcome(time.perf_counter(), update.state_change.run.state, len(children))
    raise RuntimeError(f"{sent.run.name}: the watch ended before the run did")


# ---------------------------------------------------------------------------------
# Part 1: what a child costs.


@dataclass(frozen=True)
class Case:
    """One case of the cost check: what a unit sends, and what it is."""

    label: str
    #: The assistant each message goes to (``DELEGATE`` or ``PLANNER``).
    assistant: str
    text: str
    #: Messages a unit sends, one after the other (a conversation each).
    messages: int
    #: Runs a unit makes (a parent's child counted).
    runs: int


CASES: Final = {
    "delegated": Case("parent + child", PLANNER, asking(1), messages=1, runs=2),
    # The planner's run with the same model steps and the same delegate call, but a blank
    # question, which the delegate tool refuses before any child starts (an error result):
    # the parent's share of "delegated".
    "alone": Case(
        "the parent alone (its call's question blank: refused, no child)",
        PLANNER,
        f"call ask_{DELEGATE} {json.dumps({'input': ' '})}",
        messages=1,
        runs=1,
    ),
    "client": Case("two client-sent runs", DELEGATE, words(), messages=2, runs=2),
}


async def cost_case(
    address: str,
    account: Account,
    case: Case,
    names: dict[str, str],
    conversations: list[str],
    units: int,
) -> dict[str, Any]:
    """``units`` units of ``case``, ``IN_FLIGHT`` at a time."""
    errors: collections.Counter[str] = collections.Counter()
    children = 0
    async with dedicated_channel(address) as channel:
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)

        async def unit(index: int) -> None:
            nonlocal children
            try:
                # One after the other, as a parent's run and its child's go: the same runs
                # in flight in every case, so SQLite's group commit (most of a run's CPU
                # here) shares its commits among as many writers in each.
                outcomes = [
                    await send_and_watch(
                        stub,
                        account.metadata,
                        conversations[case.messages * index + k],
                        names[case.assistant],
                        case.text,
                    )
                    for k in range(case.messages)
                ]
                for outcome in outcomes:
                    children += outcome.children
                    if outcome.state != pb.RUN_STATE_SUCCEEDED:
                        errors[pb.RunState.Name(outcome.state)] += 1
            except aio.AioRpcError as err:
                errors[err.code().name] += 1

        started = time.perf_counter()
        await gather_limited([functools.partial(unit, i) for i in range(units)], IN_FLIGHT)
        took = time.perf_counter() - started
    return {"errors": dict(errors), "children": children, "took_s": took}


async def cost(sizes: Sizes, directory: Path) -> dict[str, Any]:
    """The interleaved rounds; per round and case, the server's CPU per unit and run."""
    rounds: list[dict[str, Any]] = []
    with model_server(0) as model:
        url = f"sqlite+aiosqlite:///{directory / 'cost.db'}"
        settings = {**SETTINGS, "SWITCHBOARD_LLM_BASE_URL": model.url}
        with serve(directory, url, settings) as server:
            async with dedicated_channel(server.address) as channel:
                account = await register(channel, "cost@example.com")
                workspace = await create_workspace(channel, account, "cost", "Cost")
                echoer, planner = await assistants(channel, account, workspace)
            names = {DELEGATE: echoer, PLANNER: planner}

            async def measured(key: str, units: int) -> tuple[dict[str, Any], CpuMeter]:
                case = CASES[key]
                async with dedicated_channel(server.address) as channel:
                    made = await create_conversations(
                        channel, account, [workspace] * (units * case.messages)
                    )
                meter = CpuMeter(server.pid, model.pid)
                with meter.measure():
                    done = await cost_case(server.address, account, case, names, made, units)
                return done, meter

            # Warm-up, not counted: every path once, the model's connections opened.
            for key in CASES:
                await measured(key, sizes.warmup_units)
            waited = await wait_quiet(sizes.quiet_wait_s)
            keys = list(CASES)
            for round_no in range(sizes.rounds):
                # Each case first, middle and last in turn: drift hits them alike.
                order = keys[round_no % 3 :] + keys[: round_no % 3]
                figures: dict[str, Any] = {}
                for key in order:
                    done, meter = await measured(key, sizes.units)
                    runs = CASES[key].runs * sizes.units
                    figures[key] = {
                        **done,
                        "runs": runs,
                        "cpu_ms_per_unit": round(meter.used[0] * 1000 / sizes.units, 2),
                        "cpu_ms_per_run": round(meter.used[0] * 1000 / runs, 2),
                        "model_cpu_ms_per_run": round(meter.used[1] * 1000 / runs, 2),
                        "server_cores": meter.cores(0),
                        "other_cores": round(meter.others() / max(meter.wall, 1e-9), 2),
                    }
                delegated, alone, client = (figures[k] for k in keys)
                figures["ratio"] = round(delegated["cpu_ms_per_run"] / client["cpu_ms_per_run"], 3)
                figures["child_ms"] = round(
                    delegated["cpu_ms_per_unit"] - alone["cpu_ms_per_unit"], 2
                )
                figures["child_ratio"] = round(figures["child_ms"] / client["cpu_ms_per_run"], 3)
                say(
                    f"round {round_no + 1}: ms/run delegated {delegated['cpu_ms_per_run']}, "
                    f"alone {alone['cpu_ms_per_run']}, client-sent {client['cpu_ms_per_run']}; "
                    f"ratio {figures['ratio']}; the child {figures['child_ms']} ms, "
                    f"{figures['child_ratio']} of a client-sent run"
                )
                rounds.append(figures)
    return {"rounds": rounds, "quiet_wait_s": waited}


# ---------------------------------------------------------------------------------
# Part 2: do A's trees starve B? B is a client process of its own.


async def client_b(spec: dict[str, Any]) -> dict[str, Any]:
    """One message a second over both phases, as bench/fairness.py's B sends them; each
    message's first token and end, by phase."""
    metadata = bearer(spec["token"])
    names: list[str] = spec["conversations"]
    begin, phase_s = spec["begin"], spec["phase_s"]
    first: dict[int, list[float]] = {0: [], 1: [], 2: []}
    whole: dict[int, list[float]] = {0: [], 1: [], 2: []}
    errors: collections.Counter[str] = collections.Counter()
    window = Window()
    async with dedicated_channel(spec["address"]) as channel:
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)

        async def one(index: int, phase: int) -> None:
            started = time.perf_counter()
            request = pb.SendMessageRequest(
                conversation=names[index % len(names)],
                handler="handlers/llm",
                message=cpb.Message(parts=[cpb.ContentPart(text=words())]),
            )
            try:
                sent = await stub.SendMessage(request, metadata=metadata, timeout=60)
                seen = False
                async for frame in stub.WatchRun(
                    pb.WatchRunRequest(name=sent.run.name), metadata=metadata, timeout=120
                ):
                    if frame.WhichOneof("frame") != "update":
                        continue
                    update = frame.update
                    kind = update.WhichOneof("update")
                    if kind == "delta" and not seen:
                        seen = True
                        first[phase].append(time.perf_counter() - started)
                    elif kind == "state_change" and update.state_change.run.state in TERMINAL:
                        whole[phase].append(time.perf_counter() - started)
                        if update.state_change.run.state != pb.RUN_STATE_SUCCEEDED:
                            errors[pb.RunState.Name(update.state_change.run.state)] += 1
                        break
            except aio.AioRpcError as err:
                errors[err.code().name] += 1

        for index in range(WARMUP_MESSAGES):  # not counted: the model's connections open
            await one(index, 0)
        window.start(max(0.0, begin - time.time()), 2 * phase_s)
        await window.warm_up()
        tasks = []
        index = 0
        while window.open():  # one message a second, on the second
            await asyncio.sleep(max(0.0, window.begin + index - time.perf_counter()))
            if not window.open():
                break
            phase = 1 if index < phase_s else 2
            tasks.append(asyncio.create_task(one(WARMUP_MESSAGES + index, phase)))
            index += 1
        await asyncio.gather(*tasks)
    return {
        "phases": {
            str(phase): {
                "messages": len(first[phase]),
                "first_p50_ms": ms(first[phase], 0.5),
                "first_p99_ms": ms(first[phase], 0.99),
                "first_max_ms": round(max(first[phase], default=float("nan")) * 1000, 3),
                "run_p50_ms": ms(whole[phase], 0.5),
                "run_p99_ms": ms(whole[phase], 0.99),
            }
            for phase in (1, 2)
        },
        "errors": dict(errors),
    }


async def trees(
    address: str, account: Account, planner: str, conversations: list[str], children: int
) -> dict[str, Any]:
    """A's messages to its planner, each asking ``children`` echoers; not watched."""
    refused: collections.Counter[str] = collections.Counter()
    async with dedicated_channel(address) as channel:
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)

        async def send(conversation: str) -> None:
            request = pb.SendMessageRequest(
                conversation=conversation,
                assistant=planner,
                message=cpb.Message(parts=[cpb.ContentPart(text=asking(children))]),
            )
            try:
                await stub.SendMessage(request, metadata=account.metadata, timeout=120)
            except aio.AioRpcError as err:
                refused[err.code().name] += 1

        started = time.perf_counter()
        await gather_limited([functools.partial(send, c) for c in conversations], SEND_CALLS)
        took = time.perf_counter() - started
    return {"refused": dict(refused), "took_s": took}


async def counted(address: str, account: Account, workspace: str) -> dict[str, int]:
    """A's runs by what they are: parents and children, and how many of each ended well."""
    async with dedicated_channel(address) as channel:
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)

        async def total(states: list[pb.RunState.ValueType]) -> int:
            response = await stub.ListRuns(
                pb.ListRunsRequest(parent=workspace, states=states, page_size=1),
                metadata=account.metadata,
                timeout=60,
            )
            return int(response.total_size)

        return {
            "runs": await total([]),
            "succeeded": await total([pb.RUN_STATE_SUCCEEDED]),
            "failed": await total(
                [pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED, pb.RUN_STATE_DEADLINE_EXCEEDED]
            ),
        }


async def starvation(sizes: Sizes, directory: Path) -> dict[str, Any]:
    with model_server(INTERVAL_MS) as model:
        url = f"sqlite+aiosqlite:///{directory / 'starve.db'}"
        settings = {**tree_settings(sizes.children), "SWITCHBOARD_LLM_BASE_URL": model.url}
        with serve(directory, url, settings) as server:
            async with dedicated_channel(server.address) as channel:
                a = await register(channel, "trees@example.com")
                b = await register(channel, "steady@example.com")
                a_workspace = await create_workspace(channel, a, "trees", "A")
                b_workspace = await create_workspace(channel, b, "steady", "B")
                _echoer, planner = await assistants(channel, a, a_workspace)
                a_conversations = await create_conversations(
                    channel, a, [a_workspace] * sizes.parents
                )
                b_conversations = await create_conversations(
                    channel, b, [b_workspace] * int(2 * sizes.phase_s + WARMUP_MESSAGES + 2)
                )
            waited = await wait_quiet(sizes.quiet_wait_s)
            begin = time.time() + sizes.warmup_s + 3.0  # the client's start and warm-up
            spec = {
                "mode": "b",
                "address": server.address,
                "token": b.token,
                "conversations": b_conversations,
                "begin": begin,
                "phase_s": sizes.phase_s,
            }
            measuring = asyncio.create_task(asyncio.to_thread(run_client, __file__, spec))
            say(f"phase 1 (A idle): {sizes.phase_s:g} s")
            await asyncio.sleep(max(0.0, begin + sizes.phase_s - time.time()))
            say(f"phase 2: A sends {sizes.parents} messages, each asking {sizes.children}")
            cpu = CpuMeter(server.pid, model.pid)
            cpu.start()
            sent = await trees(server.address, a, planner, a_conversations, sizes.children)
            say(f"  accepted in {sent['took_s']:.1f} s")
            measured = await measuring
            cpu.stop()
            a_runs = await counted(server.address, a, a_workspace)
    return {
        "b": measured,
        "a": {**sent, **a_runs},
        "server_cores": cpu.cores(0),
        "model_cores": cpu.cores(1),
        "other_cores": round(cpu.others() / max(cpu.wall, 1e-9), 2),
        "quiet_wait_s": waited,
    }


# ---------------------------------------------------------------------------------
# The driver and the report.


async def drive(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    sizes = dataclasses.replace(
        sizes,
        parents=args.parents or sizes.parents,
        children=args.children or sizes.children,
    )
    results: dict[str, Any] = {"sizes": dataclasses.asdict(sizes)}
    async with session(results, "switchboard-delegation-bench-") as directory:
        say(f"cost: {sizes.rounds} rounds of {sizes.units} units per case")
        results["cost"] = await cost(sizes, directory)
        say(f"starvation: {sizes.parents} parents x {sizes.children} children")
        results["starvation"] = await starvation(sizes, directory)
    report(results, render(results, command_line("bench/delegation.py"), sizes), args)
    return 0


def render(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    return "\n".join(
        [
            SECTION,
            "",
            *provenance(command, took_s=results.get("seconds")),
            host_speed_line(results["host"]),
            f"- shape: {SERVED}, a fresh one for each part, the `llm` handler on "
            f"`tests/fakes/openai_server.py`'s echo in its own process ({TOKENS} tokens a model "
            f"step); assistants `{PLANNER}` (delegates: `{DELEGATE}`) and `{DELEGATE}`; "
            f"{settings_text(SETTINGS)}",
            "",
            *_cost(results["cost"], sizes),
            "",
            *_starvation(results["starvation"], sizes),
        ]
    )


def _cost(cost: dict[str, Any], sizes: Sizes) -> list[str]:
    rounds = cost["rounds"]

    def per(key: str, figure: str) -> list[float]:
        return [float(r[key][figure]) for r in rounds]

    def row(key: str) -> str:
        runs, units = per(key, "cpu_ms_per_run"), per(key, "cpu_ms_per_unit")
        return (
            f"| {CASES[key].label} | {CASES[key].runs} | {median(units):.2f} | "
            f"{median(runs):.2f} | {min(runs):.2f} / {max(runs):.2f} | "
            f"{median(per(key, 'model_cpu_ms_per_run')):.2f} |"
        )

    ratio = median(per("delegated", "cpu_ms_per_run")) / median(per("client", "cpu_ms_per_run"))
    ratios = [float(r["ratio"]) for r in rounds]
    child = [float(r["child_ms"]) for r in rounds]
    child_ratios = [float(r["child_ratio"]) for r in rounds]
    child_ratio = median(child) / median(per("client", "cpu_ms_per_run"))
    errors = errors_text(
        collections.Counter(
            {f"{key} {k}": v for r in rounds for key in CASES for k, v in r[key]["errors"].items()}
        )
    )
    children = sum(r["delegated"]["children"] for r in rounds)
    strays = sum(r["alone"]["children"] + r["client"]["children"] for r in rounds)
    others = max(r[key]["other_cores"] for r in rounds for key in CASES)
    return [
        "### What a child run costs",
        "",
        f"{sizes.rounds} interleaved rounds on one server (each case first, middle and last "
        f"in turn), the model unpaced, after {sizes.warmup_units} units of each case not "
        f"counted; {sizes.units} units per case and round, {IN_FLIGHT} at a time, every run "
        "watched to its end by the client (a child by its parent). *Parent + child*: a "
        "message to the planner whose model asks the echoer once: two runs, three model "
        "steps (the call, the child's answer, the parent's answer), the child's conversation "
        "created by the delegation inside the measured time. *The parent alone*: the same "
        "message but its question blank, which the delegate tool refuses before a child "
        "starts: the same two model steps and tool call, an error result, no child. *Two "
        "client-sent runs*: two messages to the echoer, one after the other (as a parent's and "
        "its child's runs go: the same runs in flight as the other cases), conversations created "
        "before. Server CPU of the whole process over each case, per unit and per run.",
        "",
        "| case | runs a unit | server CPU ms per unit | per run, median | rounds' min / "
        "max per run | model's CPU ms per run |",
        "|---|---|---|---|---|---|",
        *(row(key) for key in CASES),
        "",
        f"- the issue's measure, parent + child / two client-sent runs, per run: "
        f"**{ratio:.2f}** (per round: {', '.join(f'{r:.2f}' for r in ratios)}). The parent "
        "does what a client-sent run does not, a second model step and a tool step; the "
        "parent alone shows that share",
        f"- the child itself, parent + child minus the parent alone: **{median(child):.2f} ms** "
        f"(rounds: {min(child):.2f} to {max(child):.2f}), **{child_ratio:.2f}** of a "
        f"client-sent run (per round: {', '.join(f'{r:.2f}' for r in child_ratios)})",
        f"- children that answered: {children} of {sizes.rounds * sizes.units} (other cases: "
        f"{strays}); failed runs or calls: {errors}; others used up to {others} cores during "
        f"a case; waited {cost['quiet_wait_s']:g} s for a quiet machine first",
        f"- goal, a child run costs no more than a run sent by a client (the child's share at "
        f"most {COST_GOAL:g}x a client-sent run): {verdict(child_ratio <= COST_GOAL)} "
        f"({child_ratio:.2f}x)",
    ]


def _starvation(starve: dict[str, Any], sizes: Sizes) -> list[str]:
    idle, busy = starve["b"]["phases"]["1"], starve["b"]["phases"]["2"]
    a = starve["a"]
    ratio = busy["first_p99_ms"] / max(idle["first_p99_ms"], 1e-9)
    refused = errors_text(a["refused"])
    full = sizes.parents == 100 and sizes.children == 10
    scale = (
        "the issue's 100 parents x 10 children"
        if full
        else f"**scaled down** from the issue's 100 x 10 to {sizes.parents} parents x "
        f"{sizes.children} children"
    )
    return [
        "### Trees of children and another workspace",
        "",
        f"bench/fairness.py's measure: B, its own client process, one message a second (a "
        f"conversation each, the `llm` handler), SendMessage then WatchRun; first token and "
        f"the run's end from just before the send. The model paced, {INTERVAL_MS} ms a token "
        f"(a step of about {TOKENS * INTERVAL_MS / 1000:.1f} s). Two phases of "
        f"{sizes.phase_s:g} s (after {WARMUP_MESSAGES} messages not counted): A idle, then A "
        f"sends {sizes.parents} messages to its planner at the start of the phase "
        f"({SEND_CALLS} calls in flight, a conversation each, not watched), each answered "
        f"with {sizes.children} calls of `ask_{DELEGATE}` in one step: {scale}, "
        f"{sizes.parents * (sizes.children + 1):,} runs. "
        f"`SWITCHBOARD_DISPATCHER_MAX_CHILDREN_PER_RUN={sizes.children}` (all of a parent's "
        "children at once); the running limits at their defaults (64 in the process, 16 per "
        f"workspace); admission's turns {ADMITTING} per workspace.",
        "",
        "| phase | B's messages | first token p50 ms | p99 ms | max ms | run p50 ms | run p99 ms |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {label} | {f['messages']} | {f['first_p50_ms']} | {f['first_p99_ms']} | "
            f"{f['first_max_ms']} | {f['run_p50_ms']} | {f['run_p99_ms']} |"
            for label, f in (("A idle", idle), ("A's trees running", busy))
        ),
        "",
        f"- A: {sizes.parents} messages accepted in {a['took_s']:.1f} s (refused: "
        f"{refused}); at the end of phase 2 A had {a['runs']:,} runs (parents and children), "
        f"{a['succeeded']:,} ended well and {a['failed']:,} did not; B's failed runs or "
        f"calls: {errors_text(starve['b']['errors'])}; server {starve['server_cores']} cores, "
        f"model {starve['model_cores']}, others {starve['other_cores']} during phase 2; "
        f"waited {starve['quiet_wait_s']:g} s for a quiet machine first",
        f"- goal, B's first-token p99 with A's trees running at most {STARVE_GOAL:g}x its "
        f"p99 with A idle: {verdict(ratio <= STARVE_GOAL)} ({ratio:.2f}x)",
    ]


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parents", type=int, default=0, help="parents in the starvation check")
    parser.add_argument("--children", type=int, default=0, help="children each parent asks")


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="fewer rounds, shorter phases",
        options=options,
        roles={
            "client": clients({"b": client_b}),
            "model": lambda interval_ms: model_main(int(interval_ms)),
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
