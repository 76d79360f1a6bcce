"""Semantic index engines: nearest-neighbour queries on 100k chunks, pgvector HNSW and sqlite-vec.

    python bench/semantic.py                100k chunks on each backend; prints the report
    python bench/semantic.py --quick        10k chunks, fewer queries (about 1 min)
    python bench/semantic.py --write        ... and put the report into BENCHMARKS.md
    python bench/semantic.py --json         one JSON line: the figures and the report
    python bench/semantic.py --no-postgres  SQLite only
    python bench/semantic.py --no-sqlite    PostgreSQL only

The engine, not the RPC: ``ChunkStore.nearest`` (``context/semantic/chunkstore.py``)
called in this process on a migrated database, one query at a time, timed around
the call (the thread hop and the transaction included). The RPC end to end,
embedding included, is measured by the search benchmarks.

Data: memory-item chunks of one workspace, 384 dimensions, deterministic: 200
topics, 25 subtopics each (seeded Gaussian unit vectors), each chunk its topic
+ 0.7 x a subtopic + Gaussian noise of norm 0.5, normalized: real embeddings
cluster by topic and subtopic, so a chunk has a few clearly near neighbours
(uniform random vectors, or one level of clusters, make every neighbour about
equally far, which no ANN index and no real corpus looks like). Queries are drawn
the same way from other seeds. Recall@10 is ``nearest`` against ``exact_nearest``
(a full scan) on the same queries.

Loading: the chunks go in through ``replace_source``, one source per transaction,
16 at a time. On PostgreSQL the HNSW index is dropped for the bulk and rebuilt
after it (timed: "index build", with maintenance_work_mem 512MB), as a deployment
back-filling an index would; the last 5% are then written with the index in
place, which is the steady-state insert throughput reported. PostgreSQL runs with durable settings
(``bench/context.py``'s ``postgres()``); SQLite is a WAL file, synchronous=NORMAL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import random
import sys
import time
from array import array
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.*, tests.*

from sqlalchemy import text
from sqlalchemy.orm import Session

from bench.context import postgres
from bench.harness import (
    command_line,
    host_speed_line,
    provenance,
    report,
    say,
    section_main,
    session,
    summary,
    verdict,
)
from switchboard.context.semantic.chunkstore import ChunkStore, vector_table
from switchboard.context.semantic.ports import ChunkRecord, SearchFilter
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import WorkspaceRow
from switchboard.platform.store.vectors import vector_support

SECTION: Final = "## Semantic index engines"
DIMS: Final = 384
CLUSTERS: Final = 200
#: Subtopics per topic, their weight and the noise's (norms relative to the topic's).
SUBTOPICS: Final = 25
SUB_WEIGHT: Final = 0.7
NOISE: Final = 0.5
OWNER: Final = "workspaces/bench"
KEY: Final = f"bench-model/{DIMS}/1"
K: Final = 10
#: Goals of the issue: p99 of a semantic query, ms; recall@10.
P99_GOAL_MS: Final = {"postgresql": 20.0, "sqlite": 50.0}
RECALL_GOAL: Final = 0.95
CONCURRENCY: Final = 16
#: ``hnsw.ef_search`` (the setting's default, ``SWITCHBOARD_CONTEXT_SEMANTIC_EF_SEARCH``).
EF_SEARCH: Final = 100
T0: Final = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
EVERYTHING: Final = SearchFilter()


def _unit(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(value * value for value in values)) or 1.0
    return [value / norm for value in values]


def _gaussian_unit(seed: int) -> list[float]:
    rng = random.Random(seed)  # noqa: S311 - deterministic data, not secrets
    return _unit([rng.gauss(0, 1) for _ in range(DIMS)])


_TOPICS: Final = [_gaussian_unit(1_000_000 + t) for t in range(CLUSTERS)]
_SUBTOPICS: Final = [_gaussian_unit(2_000_000 + s) for s in range(CLUSTERS * SUBTOPICS)]


def vector(seed: int) -> array[float]:
    """The deterministic vector ``seed``: a topic, one of its subtopics, and noise, normalized."""
    rng = random.Random(seed)  # noqa: S311 - deterministic data, not secrets
    subtopic = rng.randrange(CLUSTERS * SUBTOPICS)
    topic, sub = _TOPICS[subtopic // SUBTOPICS], _SUBTOPICS[subtopic]
    scale = NOISE / math.sqrt(DIMS)
    return array(
        "f",
        _unit([t + SUB_WEIGHT * u + rng.gauss(0, scale) for t, u in zip(topic, sub, strict=True)]),
    )


def record(index: int) -> ChunkRecord:
    text_ = f"memory item {index} about topic {index % CLUSTERS}"
    return ChunkRecord(
        owner=OWNER,
        source_kind="memory",
        source=f"workspaces/bench/memoryItems/m{index}",
        chunk_index=0,
        start_offset=0,
        end_offset=len(text_),
        text=text_,
        created_at=T0 + dt.timedelta(seconds=index),
        label="fact" if index % 10 else "preference",
        workspace_id="bench",
    )


async def load(store: ChunkStore, indexes: Sequence[int]) -> float:
    """Write ``indexes``' chunks (one source per transaction, ``CONCURRENCY`` at once); s."""
    queue = list(reversed(indexes))

    async def writer() -> None:
        while queue:
            index = queue.pop()
            chunk = record(index)
            await store.replace_source("memory", chunk.source, [chunk], [vector(index)], KEY, DIMS)

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(CONCURRENCY)))
    return time.perf_counter() - started


async def measure(database: Database, chunks: int, queries: int) -> dict[str, Any]:
    store = ChunkStore(database)
    support = await vector_support(database)
    if not support.available:
        return {"error": support.reason}

    def seed(db: Session) -> None:
        db.add(WorkspaceRow(id="bench", created_at=T0, updated_at=T0))

    await database.run(seed, write=True)
    await store.ensure_dimensions(DIMS)
    postgres_ = database.dialect_name == "postgresql"
    table = vector_table(DIMS)
    if postgres_:
        await _sql(database, f"DROP INDEX ix_{table}_hnsw")
    steady = max(1, chunks // 20)
    say(f"{database.dialect_name}: loading {chunks - steady} chunks")
    bulk_s = await load(store, range(chunks - steady))
    build_s = 0.0
    if postgres_:
        say("building the HNSW index")
        started = time.perf_counter()
        await _sql(
            database,
            # The graph of 100k x 384 (about 200 MB) in memory, as a back-fill would be run.
            "SET LOCAL maintenance_work_mem = '512MB'",
            f"CREATE INDEX ix_{table}_hnsw ON {table} USING hnsw (embedding vector_cosine_ops)",
        )
        build_s = time.perf_counter() - started
        await _sql(database, f"ANALYZE {table}")
        await _sql(database, "ANALYZE semantic_chunks")
    say(f"writing the last {steady} with the index in place")
    steady_s = await load(store, range(chunks - steady, chunks))
    say(f"{queries} queries")
    probes = [list(vector(10_000_000 + q)) for q in range(queries)]
    for probe in probes[:20]:  # warm the caches
        await store.nearest([OWNER], probe, DIMS, KEY, K, EVERYTHING, EF_SEARCH)
    latencies: list[float] = []
    found: list[list[int]] = []
    for probe in probes:
        started = time.perf_counter()
        hits = await store.nearest([OWNER], probe, DIMS, KEY, K, EVERYTHING, EF_SEARCH)
        latencies.append(time.perf_counter() - started)
        found.append([hit.chunk_id for hit in hits])
    filtered = SearchFilter(labels=frozenset({"preference"}))  # a tenth of the chunks
    filtered_latencies: list[float] = []
    for probe in probes[: queries // 2]:
        started = time.perf_counter()
        await store.nearest([OWNER], probe, DIMS, KEY, K, filtered, EF_SEARCH)
        filtered_latencies.append(time.perf_counter() - started)
    say("exact answers for recall")
    recalls: list[float] = []
    exact_latencies: list[float] = []
    for probe, got in zip(probes[: min(queries, 200)], found, strict=False):
        started = time.perf_counter()
        exact = await store.exact_nearest([OWNER], probe, DIMS, KEY, K, EVERYTHING)
        exact_latencies.append(time.perf_counter() - started)
        truth = {hit.chunk_id for hit in exact}
        recalls.append(len(truth & set(got)) / max(1, len(truth)))
    return {
        "engine": support.engine,
        "chunks": chunks,
        "queries": queries,
        "query_ms": summary(latencies),
        "filtered_query_ms": summary(filtered_latencies),
        "exact_query_ms": summary(exact_latencies),
        "recall_at_10": round(sum(recalls) / len(recalls), 4),
        "bulk_per_s": round((chunks - steady) / bulk_s),
        "steady_per_s": round(steady / steady_s),
        "index_build_s": round(build_s, 1),
    }


async def _sql(database: Database, *statements: str) -> None:
    def work(db: Session) -> None:
        for statement in statements:
            db.execute(text(statement))

    await database.run(work, write=True)


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[Database]:
    # The HNSW build is one statement of a minute or more on a loaded 2-core host.
    database = Database(url, timeout_s=900.0)
    try:
        await database.migrate()
        yield database
    finally:
        await database.close()


async def drive(args: argparse.Namespace) -> int:
    chunks, queries = (10_000, 200) if args.quick else (100_000, 1000)
    results: dict[str, Any] = {"backends": {}}
    async with session(results, "switchboard-bench-semantic-") as directory:
        if not args.no_sqlite:
            async with opened(f"sqlite+aiosqlite:///{directory / 'semantic.db'}") as database:
                results["backends"]["sqlite"] = await measure(database, chunks, queries)
        if not args.no_postgres:
            async with postgres() as (url, description):
                results["postgres"] = description
                if url is None:
                    results["backends"]["postgresql"] = {"error": description}
                else:
                    async with opened(url) as database:
                        results["backends"]["postgresql"] = await measure(database, chunks, queries)
    report(results, render(results, command_line("bench/semantic.py")), args)
    return 0


def render(results: dict[str, Any], command: str) -> str:
    lines = [
        SECTION,
        "",
        *provenance(command, took_s=results.get("seconds")),
        host_speed_line(results["host"]),
        f"- data: one workspace's memory chunks, {DIMS} dimensions, {CLUSTERS} seeded topics "
        f"x {SUBTOPICS} subtopics (bench/semantic.py's docstring); k = 10; "
        f"`hnsw.ef_search` {EF_SEARCH} (PostgreSQL); one query at a time, in process",
    ]
    if "postgres" in results:
        lines.append(f"- PostgreSQL: {results['postgres']}")
    lines += [
        "",
        "| backend | engine | chunks | query p50 / p99 ms | goal p99 | filtered (10%) "
        "p50 / p99 ms | exact scan p50 ms | recall@10 (goal 0.95) | insert/s bulk | "
        "insert/s with index | index build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, figures in results["backends"].items():
        if "error" in figures:
            lines.append(f"| {name} | {figures['error']} |||||||||")
            continue
        query, filtered = figures["query_ms"], figures["filtered_query_ms"]
        goal = P99_GOAL_MS[name]
        lines.append(
            f"| {name} | {figures['engine']} | {figures['chunks']} | "
            f"{query['p50_ms']:.2f} / {query['p99_ms']:.2f} | < {goal:g} "
            f"({verdict(query['p99_ms'] < goal)}) | "
            f"{filtered['p50_ms']:.2f} / {filtered['p99_ms']:.2f} | "
            f"{figures['exact_query_ms']['p50_ms']:.1f} | {figures['recall_at_10']:.3f} "
            f"({verdict(figures['recall_at_10'] >= RECALL_GOAL)}) | {figures['bulk_per_s']} | "
            f"{figures['steady_per_s']} | {figures['index_build_s'] or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
        parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")

    return section_main(__doc__, drive, quick="10k chunks, 200 queries", options=options)


if __name__ == "__main__":
    sys.exit(main())
