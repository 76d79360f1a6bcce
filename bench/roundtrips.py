"""Round trips per run on the scaled-out shape: what one run asks of PostgreSQL and Redis.

    python bench/roundtrips.py            one process, 40 runs (about a minute); prints it
    python bench/roundtrips.py --quick    10 runs
    python bench/roundtrips.py --write    ... and put the section into BENCHMARKS.md

Counted, not timed (so the machine's speed does not move them): ``switchboard serve
--dev`` on a throwaway PostgreSQL cluster (``tests/infra/postgres.py``) and a private
``redis-server``, one account, one conversation, and runs of the echo handler one after
another (SendMessage, then WatchRun to the run's end). Around them, and around an idle
window as long beside them (the leases' renewals, health, the relays: what a process does
with no run), the bench reads:

- **write transactions**: PostgreSQL's transaction ids handed out (``txid_current_snapshot``'s
  xmax; a transaction gets one when it first writes, and the bench's own reads get none);
- **transactions**: ``pg_stat_database``'s commits and rollbacks of the database (every
  statement in autocommit counts as one; its statistics are flushed within a second);
- **rows** inserted, updated and deleted, by table (``pg_stat_user_tables``);
- **Redis commands**, by command (``INFO commandstats``; the commands a script runs count
  one each, beside the ``EVALSHA`` that ran it);
- **the process's CPU** (``/proc``), reported for the idle window: what every process of a
  mesh pays whatever its load (its pollers, leases and health).

Each figure is (during the runs - the idle window's) / runs. Issue 80's goal: at most 4
write transactions per run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

import redis.asyncio as aioredis
from grpc import aio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench.fixtures import create_conversations, create_workspace, register
from bench.harness import (
    command_line,
    process_cpu_s,
    provenance,
    report,
    say,
    section_main,
    serve,
    verdict,
)
from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from tests.infra.postgres import running_postgres
from tests.infra.redis import RedisServer, find_redis_server

TITLE: Final = "## Round trips per run (PostgreSQL and Redis)"
#: Issue 80's goal for the scaled-out shape.
WRITE_GOAL: Final = 4.0
#: PostgreSQL flushes a backend's statistics at most about once a second.
STATS_FLUSH_S: Final = 1.5
#: ... and an idle backend's within about ten.
STATS_SETTLE_S: Final = 12.0
#: The tables a run writes: their counters settle once the runs' connections flushed.
RUN_TABLES: Final = ("conversations", "event_outbox", "idempotency_keys", "messages", "runs")
DATABASE: Final = "postgres"
#: Transaction ids handed out so far (reading it hands out none).
_XMAX: Final = "SELECT txid_snapshot_xmax(txid_current_snapshot())"


@dataclasses.dataclass(frozen=True)
class Plan:
    runs: int = 40
    warmup: int = 5


@dataclasses.dataclass(frozen=True)
class Reading:
    at: float
    xmax: int
    transactions: int
    rows: dict[str, tuple[int, int, int]]
    commands: dict[str, int]
    #: The ``serve`` process's CPU so far.
    cpu_s: float


async def settled(engine: AsyncEngine, client: aioredis.Redis, pid: int) -> Reading:
    """A reading once PostgreSQL's statistics have caught up: a pooled connection that
    goes idle flushes its counters up to ``STATS_SETTLE_S`` later (PostgreSQL 15's
    idle interval), so they are read until two readings a ``STATS_FLUSH_S`` apart agree
    on the rows of the tables a run writes (the leases' go on changing meanwhile), or
    that long has passed."""
    last = await read(engine, client, pid)
    deadline = time.monotonic() + STATS_SETTLE_S
    while time.monotonic() < deadline:
        await asyncio.sleep(STATS_FLUSH_S)  # the statistics' own flush period
        now = await read(engine, client, pid)
        if _runs_rows(now) == _runs_rows(last):
            return last
        last = now
    return last


def _runs_rows(reading: Reading) -> list[tuple[int, int, int]]:
    return [reading.rows.get(table, (0, 0, 0)) for table in RUN_TABLES]


async def read(engine: AsyncEngine, client: aioredis.Redis, pid: int) -> Reading:
    async with engine.connect() as db:
        xmax = (await db.execute(text(_XMAX))).scalar()
        transactions = (
            await db.execute(
                text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"),
                {"d": DATABASE},
            )
        ).scalar()
        tables = (
            await db.execute(
                text("SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables")
            )
        ).all()
    stats: Any = await client.info("commandstats")
    return Reading(
        at=time.monotonic(),
        xmax=int(xmax or 0),
        transactions=int(transactions or 0),
        rows={str(row[0]): (int(row[1]), int(row[2]), int(row[3])) for row in tables},
        commands={
            name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()
        },
        cpu_s=process_cpu_s(pid),
    )


def rates(before: Reading, after: Reading) -> dict[str, Any]:
    """What happened between two readings, per second."""
    seconds = max(after.at - before.at, 1e-6)
    rows: dict[str, list[float]] = {}
    for table, now in after.rows.items():
        then = before.rows.get(table, (0, 0, 0))
        changed = [(a - b) / seconds for a, b in zip(now, then, strict=True)]
        if any(changed):
            rows[table] = changed
    return {
        "seconds": seconds,
        # The reading's own query (its connection's transaction) is one of them.
        "transactions": (after.transactions - before.transactions - 1) / seconds,
        "write_transactions": (after.xmax - before.xmax) / seconds,
        "cpu_ms": (after.cpu_s - before.cpu_s) * 1000 / seconds,
        "rows": rows,
        "commands": {
            name: (count - before.commands.get(name, 0)) / seconds
            for name, count in after.commands.items()
            if count != before.commands.get(name, 0)
        },
    }


def per_run(busy: Mapping[str, Any], idle: Mapping[str, Any], runs: int) -> dict[str, Any]:
    """The busy window's counts less the idle window's rate over as long, per run."""
    seconds = busy["seconds"]

    def net(busy_rate: float, idle_rate: float) -> float:
        return float(round((busy_rate - idle_rate) * seconds / runs, 2))

    rows = {
        table: [net(b, i) for b, i in zip(changed, idle["rows"].get(table, [0, 0, 0]), strict=True)]
        for table, changed in busy["rows"].items()
    }
    commands = {
        name: net(rate, idle["commands"].get(name, 0.0)) for name, rate in busy["commands"].items()
    }
    return {
        "write_transactions": net(busy["write_transactions"], idle["write_transactions"]),
        "transactions": net(busy["transactions"], idle["transactions"]),
        "rows": {t: r for t, r in sorted(rows.items()) if any(r)},
        # What the idle window's noise leaves of a command no run sends: under a tenth.
        "commands": dict(
            sorted(((n, c) for n, c in commands.items() if c >= 0.1), key=lambda x: -x[1])
        ),
        "idle_write_transactions_per_s": round(idle["write_transactions"], 2),
        "idle_transactions_per_s": round(idle["transactions"], 2),
        "idle_cpu_ms_per_s": round(idle["cpu_ms"], 1),
        "idle_commands_per_s": round(sum(idle["commands"].values()), 1),
    }


async def one_run(stub: Any, md: Any, conv: str) -> None:
    sent = await stub.SendMessage(
        dispatcher_pb2.SendMessageRequest(
            conversation=conv,
            message=context_pb2.Message(parts=[context_pb2.ContentPart(text="one two three")]),
            handler="handlers/echo",
        ),
        metadata=md,
        timeout=30,
    )
    watch = stub.WatchRun(
        dispatcher_pb2.WatchRunRequest(name=sent.run.name, after_sequence=0),
        metadata=md,
        timeout=30,
    )
    async for _frame in watch:
        pass  # the stream ends with the run


async def measure(plan: Plan, directory: Path) -> dict[str, Any]:
    executable = find_redis_server()
    if executable is None:
        raise SystemExit("redis-server is not installed (scripts/install-deps.sh)")
    (directory / "redis").mkdir()
    redis_server = RedisServer(executable, directory / "redis")
    redis_server.start()
    try:
        with running_postgres() as postgres:
            url = postgres.url(DATABASE)
            settings = {"SWITCHBOARD_REDIS_URL": redis_server.url}
            with serve(directory, url, settings) as server:
                return await _measure(plan, server.address, server.pid, url, redis_server.url)
    finally:
        redis_server.stop()


async def _measure(plan: Plan, address: str, pid: int, url: str, redis_url: str) -> dict[str, Any]:
    engine = create_async_engine(url)
    client = aioredis.from_url(redis_url)
    try:
        async with aio.insecure_channel(address) as channel:
            account = await register(channel, "roundtrips@example.com")
            workspace = await create_workspace(channel, account, "roundtrips")
            (conversation,) = await create_conversations(channel, account, [workspace])
            stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
            for _ in range(plan.warmup):
                await one_run(stub, account.metadata, conversation)
            start = await settled(engine, client, pid)
            for _ in range(plan.runs):
                await one_run(stub, account.metadata, conversation)
            busy = rates(start, await settled(engine, client, pid))
            idle_start = await read(engine, client, pid)
            await asyncio.sleep(busy["seconds"])  # the idle window, as long as the busy one
            idle = rates(idle_start, await settled(engine, client, pid))
    finally:
        await engine.dispose()
        await client.aclose()
    return per_run(busy, idle, plan.runs)


def render(results: Mapping[str, Any], command: str, plan: Plan) -> str:
    f = results["figures"]
    lines = [
        TITLE,
        "",
        *provenance(command, took_s=results.get("seconds")),
        f"- shape: one `switchboard serve --dev` on PostgreSQL and Redis (what each process "
        f"of `switchboard mesh --processes N` is), {plan.runs} echo runs one after another "
        f"(SendMessage, then WatchRun to the end); each figure is per run, less what an idle "
        f"window as long did ({f['idle_write_transactions_per_s']} write transactions and "
        f"{f['idle_commands_per_s']} Redis commands a second: leases, health, relays)",
        "",
        f"- PostgreSQL write transactions per run: **{f['write_transactions']}** (goal: at "
        f"most {WRITE_GOAL:g}): {verdict(f['write_transactions'] <= WRITE_GOAL)}",
        f"- PostgreSQL transactions per run, reads in autocommit included: {f['transactions']}",
        f"- the process idle (what every process of a mesh pays whatever its load: its "
        f"pollers, leases and health): {f['idle_cpu_ms_per_s']} ms of CPU a second, "
        f"{f['idle_transactions_per_s']} PostgreSQL transactions a second "
        f"({f['idle_write_transactions_per_s']} writing)",
        "",
        "| table | inserted | updated | deleted |",
        "|---|---|---|---|",
        *(
            f"| {table} | {ins:g} | {upd:g} | {dele:g} |"
            for table, (ins, upd, dele) in f["rows"].items()
        ),
        "",
        "Redis commands per run (a script's own commands count beside its `evalsha`): "
        + ", ".join(f"{name} {count:g}" for name, count in f["commands"].items()),
    ]
    return "\n".join(lines)


async def drive(args: argparse.Namespace) -> int:
    plan = Plan(runs=10, warmup=3) if args.quick else Plan()
    results: dict[str, Any] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="switchboard-roundtrips-") as scratch:
        results["figures"] = await measure(plan, Path(scratch))
    results["seconds"] = round(time.monotonic() - started)
    say(f"done in {results['seconds']} s")
    report(results, render(results, command_line("bench/roundtrips.py"), plan), args)
    return 0


def main() -> int:
    return section_main(__doc__, drive, quick="10 runs")


if __name__ == "__main__":
    raise SystemExit(main())
