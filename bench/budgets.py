"""Budgets benchmark: what a reservation costs per model call.

    python bench/budgets.py                the full run (about 4 minutes); prints the report
    python bench/budgets.py --quick        a few seconds per case, to try it out (< 2 min)
    python bench/budgets.py --write        ... and put the report into BENCHMARKS.md
    python bench/budgets.py --json         one JSON line, figures and report (bench/run.py)
    python bench/budgets.py --profile      ... plus py-spy on the server in an extra,
                                           unmeasured case with the budget

The same job twice, in interleaved rounds (the order flips every round, so drift on a
shared machine hits both alike): C closed loops of SendMessage (the ``llm`` handler) then
WatchRun to the run's end (``bench/streaming.py``'s measuring client), against a fresh
``switchboard serve --dev`` per case (embedded SQLite) with a price table, on
``tests/fakes/openai_server.py``'s echo model in its own process, unpaced (the server's
CPU, not the model's pace, bounds runs/s). ``none``: the workspaces have no budget.
``budget``: each has a daily cost budget whose cap is never reached, so every run is
admitted against it (its window read), reserves its model call's worst case (one
conditional UPDATE and a hold row) and settles it (the hold deleted, the usage added).

Per case: runs/s and the server's CPU per run (its CPU over the measured window / runs
ended in it; one model call per run). Reported: the median of each over the rounds, the
runs/s ratio, and the CPU difference per model call (the median of the rounds' paired
differences). Beside them, in this process on its own SQLite file, the ledger's calls
alone (``Ledger.full``, ``reserve``, ``settle``), CPU per call over many: the floor of
what a budget adds, without the noise of two shared cores.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench import pyspy
from bench.fixtures import Account, create_conversations, create_workspace, register
from bench.harness import (
    HERE,
    command_line,
    dedicated_channel,
    host_speed_line,
    median,
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
from bench.streaming import SERVER_SETTINGS, Model, model_server
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.dispatcher.budgets.ledger import Amount, Hold, Ledger
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import BudgetRow, WorkspaceRow
from tests.infra.postgres import PostgresUnavailable, running_postgres

SECTION: Final = "## Budgets: the reservation's cost per model call"
#: Dollars per million tokens, in both variants (only the budget differs).
PRICES: Final = {"bench-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
SETTINGS: Final = {**SERVER_SETTINGS, "SWITCHBOARD_LLM_PRICES": json.dumps(PRICES)}
#: A cap no run of the bench comes near: every reservation fits (a thousand dollars).
CAP_MICROS: Final = 1_000_000_000
#: Conversations per workspace (each workspace gets its own budget).
PER_WORKSPACE: Final = 8
VARIANTS: Final = ("none", "budget")
#: The issue's goals.
CPU_GOAL_MS: Final = 0.3
RUNS_RATIO_GOAL: Final = 0.95
#: The streaming bench's measuring client (its ``client`` role).
CLIENT: Final = str(HERE / "streaming.py")


@dataclass(frozen=True)
class Sizes:
    conversations: int
    tokens: int
    rounds: int
    warmup_s: float
    seconds: float
    quiet_wait_s: float
    ledger_calls: int


FULL: Final = Sizes(
    conversations=16,
    tokens=16,
    rounds=5,
    warmup_s=3.0,
    seconds=10.0,
    quiet_wait_s=10.0,
    ledger_calls=2000,
)
QUICK: Final = Sizes(
    conversations=16,
    tokens=16,
    rounds=2,
    warmup_s=2.0,
    seconds=4.0,
    quiet_wait_s=3.0,
    ledger_calls=300,
)


# ---------------------------------------------------------------------------------
# The served cases.


async def _prepare(address: str, conversations: int, budgeted: bool) -> tuple[Account, list[str]]:
    """An account, its workspaces (each with a budget when ``budgeted``) and conversations."""
    async with dedicated_channel(address) as channel:
        account = await register(channel, "budgets@example.com")
        workspaces = [
            await create_workspace(channel, account, f"budget-{w:03d}", f"Budget {w}")
            for w in range((conversations + PER_WORKSPACE - 1) // PER_WORKSPACE)
        ]
        if budgeted:
            stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
            for workspace in workspaces:
                await stub.CreateBudget(
                    pb.CreateBudgetRequest(
                        parent=workspace,
                        budget_id="daily",
                        budget=pb.Budget(
                            display_name="Daily",
                            scope=workspace,
                            period=pb.BUDGET_PERIOD_DAY,
                            cost_limit_micros=CAP_MICROS,
                        ),
                    ),
                    metadata=account.metadata,
                    timeout=30,
                )
        parents = [workspaces[i // PER_WORKSPACE] for i in range(conversations)]
        return account, await create_conversations(channel, account, parents)


async def _spent(address: str, account: Account, workspaces: int) -> int:
    """What the budgets say was spent (a check that the budgeted case reserved at all)."""
    total = 0
    async with dedicated_channel(address) as channel:
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        for w in range(workspaces):
            try:
                budget = await stub.GetBudget(
                    pb.GetBudgetRequest(name=f"workspaces/budget-{w:03d}/budgets/daily"),
                    metadata=account.metadata,
                    timeout=30,
                )
            except aio.AioRpcError:
                return -1
            total += budget.budget.usage.cost_micros
    return total


async def case(
    sizes: Sizes,
    directory: Path,
    model: Model,
    variant: str,
    profile: dict[str, Any] | None = None,
) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{directory / f'budgets-{time.monotonic_ns()}.db'}"
    settings = {**SETTINGS, "SWITCHBOARD_LLM_BASE_URL": model.url}
    with serve(directory, url, settings) as server:
        account, names = await _prepare(server.address, sizes.conversations, variant == "budget")
        waited = await wait_quiet(sizes.quiet_wait_s)
        figures: dict[str, Any] = await asyncio.to_thread(
            run_client,
            CLIENT,
            {
                "mode": "switchboard",
                "interval_ms": 0,
                "tokens": sizes.tokens,
                "warmup_s": sizes.warmup_s,
                "seconds": sizes.seconds,
                "address": server.address,
                "token": account.token,
                "server_pid": server.pid,
                "model_pid": model.pid,
                "conversations_names": names,
                "profile": profile,
            },
        )
        workspaces = (sizes.conversations + PER_WORKSPACE - 1) // PER_WORKSPACE
        figures["spent_micros"] = (
            await _spent(server.address, account, workspaces) if variant == "budget" else 0
        )
    figures["quiet_wait_s"] = waited
    return figures


# ---------------------------------------------------------------------------------
# The ledger alone, in this process.


async def ledger_alone(url: str, calls: int) -> dict[str, float]:
    """CPU µs per call of what a budgeted run adds to the database's work: the admission's
    check of the window (``full``), the reservation and the settlement; and the lookup of
    the budgets that apply (``applicable``), made with or without one."""
    now = dt.datetime.now(dt.UTC)
    database = Database(url, timeout_s=30.0)
    try:
        await database.migrate()
        async with database.sessions() as db:
            db.add(WorkspaceRow(id="acme", created_at=now, updated_at=now))
            await db.commit()  # first: the budget's row refers to it
            db.add(
                BudgetRow(
                    workspace_id="acme",
                    id="daily",
                    scope_kind="workspace",
                    scope_id="",
                    data=pb.Budget(
                        period=pb.BUDGET_PERIOD_DAY, cost_limit_micros=CAP_MICROS
                    ).SerializeToString(),
                    created_at=now,
                    updated_at=now,
                )
            )
            await db.commit()
        ledger = Ledger(database)
        budgets = await ledger.applicable("acme")
        ask, used = Amount(264, 32, 100), Amount(232, 32, 100)
        spent = {"applicable": 0.0, "full": 0.0, "reserve": 0.0, "settle": 0.0}
        for _ in range(calls // 10):  # warm-up: statements compiled and cached
            hold = await ledger.reserve(budgets, "run", ask)
            assert isinstance(hold, Hold)
            await ledger.settle(hold, used)
        for index in range(calls):
            started = time.process_time()
            await ledger.applicable("acme")
            checked = time.process_time()
            await ledger.full(budgets)
            admitted = time.process_time()
            hold = await ledger.reserve(budgets, f"run-{index}", ask)
            reserved = time.process_time()
            assert isinstance(hold, Hold)
            await ledger.settle(hold, used)
            settled = time.process_time()
            spent["applicable"] += checked - started
            spent["full"] += admitted - checked
            spent["reserve"] += reserved - admitted
            spent["settle"] += settled - reserved
    finally:
        await database.close()
    return {name: round(seconds * 1e6 / calls, 1) for name, seconds in spent.items()}


async def ledger_on_sqlite(calls: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="switchboard-ledger-bench-") as scratch:
        return await ledger_alone(f"sqlite+aiosqlite:///{scratch}/ledger.db", calls)


async def ledger_on_postgres(calls: int) -> dict[str, float] | None:
    """The same on a throwaway PostgreSQL cluster (the test suite's; None without one).
    Only this process's CPU counts: the PostgreSQL server's own is not in it."""
    try:
        with running_postgres() as server:
            return await ledger_alone(server.url("postgres"), calls)
    except PostgresUnavailable as exc:
        say(f"ledger on PostgreSQL not measured: {exc}")
        return None


# ---------------------------------------------------------------------------------
# The driver.


async def drive(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    py_spy = pyspy.find(args)
    results: dict[str, Any] = {"rounds": []}
    async with session(results, "switchboard-budgets-bench-") as directory:
        results["ledger"] = await ledger_on_sqlite(sizes.ledger_calls)
        say(f"ledger alone, SQLite: {results['ledger']} µs of CPU per call")
        results["ledger_postgres"] = await ledger_on_postgres(sizes.ledger_calls)
        say(f"ledger alone, PostgreSQL: {results['ledger_postgres']} µs of CPU per call")
        with model_server(0) as model:
            for round_no in range(sizes.rounds):
                order = VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]
                measured = {}
                for variant in order:
                    measured[variant] = await case(sizes, directory, model, variant)
                    f = measured[variant]
                    say(
                        f"round {round_no + 1} {variant}: {f['runs_per_s']} runs/s, "
                        f"{f['server_ms_per_run']} ms/run, {f['server_cores']} cores, "
                        f"spent {f['spent_micros']}, errors {f['errors'] or 0}"
                    )
                results["rounds"].append(measured)
            if py_spy is not None:
                out = directory / "profile-budget.txt"
                plan = pyspy.plan(py_spy, sizes.seconds, out)
                await case(sizes, directory, model, "budget", plan)
                results["profile"] = {
                    "libraries": pyspy.libraries(out),
                    "functions": pyspy.functions(out),
                }
                await pyspy.keep(args, directory, "profile-*.txt")
    results["summary"] = summarize(results["rounds"])
    text = render(results, command_line("bench/budgets.py"), sizes)
    report(results, text, args)
    return 0


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, float]:
    def of(variant: str, key: str) -> list[float]:
        return [float(r[variant][key]) for r in rounds]

    none_runs, budget_runs = median(of("none", "runs_per_s")), median(of("budget", "runs_per_s"))
    none_ms = median(of("none", "server_ms_per_run"))
    budget_ms = median(of("budget", "server_ms_per_run"))
    paired = median(
        r["budget"]["server_ms_per_run"] - r["none"]["server_ms_per_run"] for r in rounds
    )
    return {
        "none_runs_per_s": round(none_runs, 1),
        "budget_runs_per_s": round(budget_runs, 1),
        "runs_ratio": round(budget_runs / max(none_runs, 1e-9), 3),
        "none_ms_per_run": round(none_ms, 3),
        "budget_ms_per_run": round(budget_ms, 3),
        "cpu_ms_per_call": round(paired, 3),
    }


def render(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    s = results["summary"]
    lines = [
        SECTION,
        "",
        *provenance(command, took_s=results.get("seconds")),
        host_speed_line(results["host"]),
        f"- the job: {sizes.conversations} closed loops of SendMessage (`handlers/llm`) then "
        f"WatchRun to the end (`bench/streaming.py`'s client), {sizes.tokens}-token answers "
        "from `tests/fakes/openai_server.py`'s echo model, unpaced, in its own process; a "
        f"fresh `switchboard serve --dev` per case (embedded SQLite), {settings_text(SETTINGS)}",
        f"- `none`: no budget; `budget`: a daily cost budget on each workspace "
        f"({PER_WORKSPACE} conversations each) with a cap never reached, so every run is "
        "checked at admission, reserves its model call's worst case and settles it",
        f"- {sizes.rounds} interleaved rounds (the order flips each round), {sizes.warmup_s:g} s "
        f"warm-up and {sizes.seconds:g} s measured per case; medians over the rounds, the CPU "
        "difference is the median of the rounds' paired differences",
        "",
        "| round | variant | runs/s | server CPU ms/run | server cores | other cores | "
        "spent µ$ | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, measured in enumerate(results["rounds"], 1):
        for variant in VARIANTS:
            f = measured[variant]
            errors = ", ".join(f"{k} {v}" for k, v in sorted(f["errors"].items())) or "0"
            lines.append(
                f"| {number} | {variant} | {f['runs_per_s']} | {f['server_ms_per_run']} | "
                f"{f['server_cores']} | {f['other_cores']} | {f['spent_micros']} | {errors} |"
            )
    lines += [
        "",
        f"- runs/s, budget / none: {s['budget_runs_per_s']} / {s['none_runs_per_s']} = "
        f"**{s['runs_ratio']:.3f}** (goal: at least {RUNS_RATIO_GOAL:g}): "
        f"{verdict(s['runs_ratio'] >= RUNS_RATIO_GOAL)}",
        f"- server CPU per model call, budget - none: **{s['cpu_ms_per_call']:+.3f} ms** "
        f"({s['budget_ms_per_run']} against {s['none_ms_per_run']} ms per run; goal: at most "
        f"{CPU_GOAL_MS:g} ms): {verdict(s['cpu_ms_per_call'] <= CPU_GOAL_MS)}",
        *_ledger_lines(results, sizes),
    ]
    profile = results.get("profile")
    if profile:
        lines += [
            "",
            f"Where the server's time goes with the budget ({pyspy.RECORD}):",
            "",
            *pyspy.library_table(profile["libraries"]),
        ]
    return "\n".join(lines)


def _ledger_lines(results: dict[str, Any], sizes: Sizes) -> list[str]:
    lines = []
    for label, ledger in (
        ("SQLite (a file, as `serve --dev`)", results["ledger"]),
        (
            "PostgreSQL (the suite's throwaway cluster; its server's CPU not counted)",
            results.get("ledger_postgres"),
        ),
    ):
        if not ledger:
            continue
        adds = ledger["full"] + ledger["reserve"] + ledger["settle"]
        lines.append(
            f"- the ledger alone, in this process on {label}, {sizes.ledger_calls} runs' worth, "
            f"CPU µs per call (database threads included): the window checked at admission "
            f"(`full`) {ledger['full']}, `reserve` {ledger['reserve']}, `settle` "
            f"{ledger['settle']}: **{adds / 1000:.2f} ms** a budgeted model call adds; the "
            f"lookup of the budgets that apply (`applicable`, made with or without one) "
            f"{ledger['applicable']}"
        )
    return lines


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default: 5, quick: 2)")
    pyspy.flags(parser, "an extra, unmeasured case with the budget")


def main() -> int:
    return section_main(__doc__, drive, quick="a few seconds per case", options=options)


if __name__ == "__main__":
    raise SystemExit(main())
