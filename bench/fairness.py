"""Fairness between workspaces: one floods, the other's first token holds.

    python bench/fairness.py            the full run (about 80 s); prints the report
    python bench/fairness.py --quick    shorter phases (about 45 s)
    python bench/fairness.py --write    ... and put the report into BENCHMARKS.md
    python bench/fairness.py --json     one JSON line, figures and report (bench/run.py)

The issue's goal: workspace A enqueues 2,000 messages at once while workspace B sends
one message a second; B's first-token p99 stays within 2x of its p99 with A idle.

The model is ``tests/fakes/openai_server.py``'s echo in its own process (as
``bench/streaming.py`` runs it), ``TOKENS`` words one chunk each, ``INTERVAL_MS`` apart,
so a run takes real time (about half a second). The server is a fresh
``switchboard serve --dev`` (embedded SQLite) with the ``llm`` handler on that model and
the dispatcher's own capacity settings (``SWITCHBOARD_DISPATCHER_MAX_RUNNING``,
``..._MAX_RUNNING_PER_WORKSPACE``) at their defaults; only the bounds that would refuse
A's 2,000 messages are lifted (``SETTINGS``). A and B are separate accounts.

B is a client process of its own (``python bench/fairness.py client SPEC``): one message
a second, each in the next of B's conversations, SendMessage then WatchRun to the first
text (the first token: from just before the send) and on to the run's end. Phase 1: A
idle. Phase 2: at its start this process sends A's 2,000 messages (``FLOOD_CALLS`` at a
time, over ``A_CONVERSATIONS`` conversations: a conversation runs one run at a time),
without watching them. The phases are equally long and B's pace is the same in both.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from grpc import aio

from bench.fixtures import Account, create_conversations, create_workspace, register
from bench.harness import (
    SERVED,
    CpuMeter,
    Window,
    bearer,
    clients,
    command_line,
    dedicated_channel,
    gather_limited,
    host_speed_line,
    ms,
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
from bench.streaming import model_server
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.dispatcher.runs.core.store import TERMINAL

SECTION: Final = "## Fairness between workspaces"
MODEL: Final = "bench-model"
#: Words of every message, echoed back one per chunk, this far apart: a run of about 0.5 s.
TOKENS: Final = 16
INTERVAL_MS: Final = 33
FLOOD: Final = 2_000
#: A's conversations: its messages are spread over them, and at most one run of each
#: runs at a time, so this bounds how many of A's runs could run at once.
A_CONVERSATIONS: Final = 100
#: A's SendMessage calls in flight at once while it floods.
FLOOD_CALLS: Final = 64
#: Admission's turns as a multi-tenant deployment sets them
#: (``SWITCHBOARD_DISPATCHER_MAX_ADMITTING_PER_WORKSPACE``; the default, 64, favours one busy
#: workspace's throughput: docs/budgets.md, "Fairness between workspaces").
ADMITTING: Final = 4
#: B's messages before phase 1, not counted.
WARMUP_MESSAGES: Final = 3
#: The issue's goal: B's first-token p99 with A flooding, at most this times A idle.
GOAL_RATIO: Final = 2.0
SETTINGS: Final[dict[str, str]] = {
    "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
    "SWITCHBOARD_LLM_MODEL": MODEL,
    "SWITCHBOARD_LLM_MAX_RETRIES": "0",
    "SWITCHBOARD_DISPATCHER_MAX_QUEUED": "10000",
    "SWITCHBOARD_DISPATCHER_MAX_QUEUED_PER_WORKSPACE": "5000",
    "SWITCHBOARD_DISPATCHER_MAX_ACTIVE_RUNS_PER_WORKSPACE": "5000",
    "SWITCHBOARD_DISPATCHER_MAX_ADMITTING_PER_WORKSPACE": str(ADMITTING),
    "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_USER": "10000000",
    "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_WORKSPACE": "10000000",
    "SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "10000000",
}


@dataclass(frozen=True)
class Sizes:
    warmup_s: float
    phase_s: float
    quiet_wait_s: float


FULL: Final = Sizes(warmup_s=3.0, phase_s=30.0, quiet_wait_s=15.0)
QUICK: Final = Sizes(warmup_s=2.0, phase_s=15.0, quiet_wait_s=5.0)


def text() -> str:
    return " ".join(f"w{i}" for i in range(TOKENS))


# ---------------------------------------------------------------------------------
# B: the measuring client, its own process.


async def client_b(spec: dict[str, Any]) -> dict[str, Any]:
    """One message a second over both phases; each message's first token, by phase."""
    metadata = bearer(spec["token"])
    names: list[str] = spec["conversations"]
    # The phases on the wall clock the driver shares: it floods when phase 2 begins.
    begin = spec["begin"]
    phase_s = spec["phase_s"]
    first: dict[int, list[float]] = {0: [], 1: [], 2: []}
    #: How long SendMessage itself took (admission), by phase.
    sent_s: dict[int, list[float]] = {0: [], 1: [], 2: []}
    errors: collections.Counter[str] = collections.Counter()
    window = Window()
    async with dedicated_channel(spec["address"]) as channel:
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)

        async def one(index: int, phase: int) -> None:
            started = time.perf_counter()
            request = pb.SendMessageRequest(
                conversation=names[index % len(names)],
                handler="handlers/llm",
                message=cpb.Message(parts=[cpb.ContentPart(text=text())]),
            )
            try:
                sent = await stub.SendMessage(request, metadata=metadata, timeout=60)
                sent_s[phase].append(time.perf_counter() - started)
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
                        if update.state_change.run.state != pb.RUN_STATE_SUCCEEDED:
                            errors[pb.RunState.Name(update.state_change.run.state)] += 1
                        break
            except aio.AioRpcError as err:
                errors[f"{err.code().name}"] += 1

        # Warm-up, not counted: the first runs open the model's connections.
        for index in range(WARMUP_MESSAGES):
            await one(index, 0)
        window.start(max(0.0, begin - time.time()), 2 * phase_s)
        await window.warm_up()
        tasks = []
        index = 0
        # One message a second, on the second: a slow answer does not delay the next.
        while window.open():
            at = window.begin + index
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            if not window.open():
                break
            phase = 1 if index < phase_s else 2
            tasks.append(asyncio.create_task(one(WARMUP_MESSAGES + index, phase)))
            index += 1
        await asyncio.gather(*tasks)
    return {
        "phases": {
            str(phase): {
                "messages": len(samples),
                "p50_ms": ms(samples, 0.5),
                "p99_ms": ms(samples, 0.99),
                "max_ms": round(max(samples, default=float("nan")) * 1000, 3),
                "send_p50_ms": ms(sent_s[phase], 0.5),
                "send_p99_ms": ms(sent_s[phase], 0.99),
            }
            for phase, samples in first.items()
            if phase
        },
        "errors": dict(errors),
    }


# ---------------------------------------------------------------------------------
# A: the flood, from this process.


async def flood(address: str, account: Account, conversations: list[str]) -> dict[str, Any]:
    """A's messages, ``FLOOD_CALLS`` at a time; how long they took to be accepted."""
    refused: collections.Counter[str] = collections.Counter()
    async with dedicated_channel(address) as channel:
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)

        async def send(index: int) -> None:
            request = pb.SendMessageRequest(
                conversation=conversations[index % len(conversations)],
                handler="handlers/llm",
                message=cpb.Message(parts=[cpb.ContentPart(text=text())]),
            )
            try:
                await stub.SendMessage(request, metadata=account.metadata, timeout=120)
            except aio.AioRpcError as err:
                refused[err.code().name] += 1

        started = time.perf_counter()
        await gather_limited([functools.partial(send, i) for i in range(FLOOD)], FLOOD_CALLS)
        took = time.perf_counter() - started
    return {"accepted": FLOOD - sum(refused.values()), "refused": dict(refused), "took_s": took}


async def succeeded(address: str, account: Account, workspace: str) -> int:
    """A's runs that have ended well so far."""
    async with dedicated_channel(address) as channel:
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        response = await stub.ListRuns(
            pb.ListRunsRequest(parent=workspace, states=[pb.RUN_STATE_SUCCEEDED], page_size=1),
            metadata=account.metadata,
            timeout=60,
        )
        return int(response.total_size)


# ---------------------------------------------------------------------------------
# The driver.


async def drive(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    results: dict[str, Any] = {"sizes": dataclasses.asdict(sizes)}
    async with session(results, "switchboard-fairness-bench-") as directory:
        with model_server(INTERVAL_MS) as model:
            url = f"sqlite+aiosqlite:///{directory / 'fairness.db'}"
            settings = {**SETTINGS, "SWITCHBOARD_LLM_BASE_URL": model.url}
            with serve(directory, url, settings) as server:
                async with dedicated_channel(server.address) as channel:
                    a = await register(channel, "flood@example.com")
                    b = await register(channel, "steady@example.com")
                    a_workspace = await create_workspace(channel, a, "flood", "A")
                    b_workspace = await create_workspace(channel, b, "steady", "B")
                    a_conversations = await create_conversations(
                        channel, a, [a_workspace] * A_CONVERSATIONS
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
                say(f"phase 2: A sends {FLOOD} messages")
                cpu = CpuMeter(server.pid, model.pid)
                cpu.start()
                flooded = await flood(server.address, a, a_conversations)
                say(f"  accepted in {flooded['took_s']:.1f} s")
                measured = await measuring
                cpu.stop()
                ended = await succeeded(server.address, a, a_workspace)
    results.update(
        {
            "b": measured,
            "a": {**flooded, "succeeded_during_phase_2": ended},
            "server_cores": cpu.cores(0),
            "quiet_wait_s": waited,
            "other_cores": round(cpu.others() / max(cpu.wall, 1e-9), 2),
        }
    )
    report(results, render(results, command_line("bench/fairness.py"), sizes), args)
    return 0


def render(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    idle, busy = results["b"]["phases"]["1"], results["b"]["phases"]["2"]
    a = results["a"]
    ratio = busy["p99_ms"] / max(idle["p99_ms"], 1e-9)
    errors = ", ".join(f"{k} {v}" for k, v in sorted(results["b"]["errors"].items())) or "0"
    refused = ", ".join(f"{k} {v}" for k, v in sorted(a["refused"].items())) or "none"
    return "\n".join(
        [
            SECTION,
            "",
            *provenance(command, took_s=results.get("seconds")),
            host_speed_line(results["host"]),
            f"- shape: {SERVED}, the `llm` handler on `tests/fakes/openai_server.py`'s echo "
            f"in its own process ({TOKENS} tokens a run, {INTERVAL_MS} ms apart: a run of about "
            f"{TOKENS * INTERVAL_MS / 1000:.1f} s); the dispatcher's running limits at their "
            f"defaults (64 in the process, 16 per workspace); {settings_text(SETTINGS)}",
            f"- B: its own client process, one message a second (a conversation each), "
            f"SendMessage then WatchRun; first token from just before the send. Two phases of "
            f"{sizes.phase_s:g} s (after {WARMUP_MESSAGES} messages not counted): A idle, then "
            f"A sends {FLOOD:,} messages at the start of the phase ({FLOOD_CALLS} calls in "
            f"flight, over {A_CONVERSATIONS} conversations) and does not watch them; the "
            f"server admits {ADMITTING} of a workspace's messages at a time "
            "(`SWITCHBOARD_DISPATCHER_MAX_ADMITTING_PER_WORKSPACE`, set for this bench)",
            "",
            "| phase | B's messages | first token p50 ms | p99 ms | max ms | of which "
            "SendMessage p50 / p99 ms |",
            "|---|---|---|---|---|---|",
            *(
                f"| {label} | {f['messages']} | {f['p50_ms']} | {f['p99_ms']} | {f['max_ms']} | "
                f"{f['send_p50_ms']} / {f['send_p99_ms']} |"
                for label, f in (("A idle", idle), ("A flooding", busy))
            ),
            "",
            f"- A: {a['accepted']:,} of {FLOOD:,} messages accepted in {a['took_s']:.1f} s "
            f"(refused: {refused}); {a['succeeded_during_phase_2']:,} of its runs ended during "
            f"phase 2; B's failed runs or calls: {errors}; server "
            f"{results['server_cores']} cores, others {results['other_cores']} during phase 2; "
            f"waited {results['quiet_wait_s']:g} s for a quiet machine first",
            f"- goal, B's first-token p99 with A flooding at most {GOAL_RATIO:g}x its p99 with "
            f"A idle: {verdict(ratio <= GOAL_RATIO)} ({ratio:.2f}x)",
        ]
    )


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="shorter phases",
        roles={"client": clients({"b": client_b})},
    )


if __name__ == "__main__":
    raise SystemExit(main())
