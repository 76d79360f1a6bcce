"""Semantic memory benchmark: the vector index at 100k items, indexing, and the write path.

    python bench/semantic.py               the full run (about 10 minutes); prints the report
    python bench/semantic.py --quick       10k items, short phases, to try it out (< 2 min)
    python bench/semantic.py --write       ... and put the report into BENCHMARKS.md
    python bench/semantic.py --json        one JSON line, figures and report (bench/run.py)
    python bench/semantic.py --only index  some parts: index indexing writes
    python bench/semantic.py --no-postgres SQLite only

Every embedding comes from ``tests/fakes/embeddings_server.py``'s deterministic hashing
model (``sb-hash-384``): over HTTP from its own process when the server embeds (indexing,
a search's query), or the same function called in this process when the bench loads the
100k items (its ``embed``: an HTTP round trip per batch would only slow the load).

``index``: on SQLite (a file; sqlite-vec's ``vec0``) and on PostgreSQL (the suite's
throwaway cluster, ``tests/infra/postgres.py``, with pgvector's HNSW index), one workspace
holds N memory items (``bench/context.py``'s work-chat vocabulary). A first ``switchboard
serve --dev`` creates the account and the workspace through the RPCs and stops; this
process then writes the items (memory rows in bulk, their chunks and vectors through the
chunk store, 1,000 per transaction) on that database. Measured, with Q queries drawn
from the same vocabulary (questions, not stored text):

- the engine: ``ChunkStore.nearest`` (the index; pgvector at the default ``ef_search``
  and at a higher one) and ``ChunkStore.exact_nearest`` (a full scan), k=10, one at a
  time in this process: p50/p99, and recall@10 of ``nearest`` against ``exact_nearest``;
- end to end: ``SearchMemoryItems(mode=SEMANTIC, page_size=10)`` through gRPC from a
  client process, one at a time, against a second ``switchboard serve --dev`` on the
  loaded database with the embeddings endpoint configured: the query's embedding over
  HTTP, the nearest chunks, the items read and checked, the answer. p50/p99.

``indexing``: a fresh served process per database with the embeddings endpoint set; M
memory items created through CreateMemoryItem (16 in flight), while the indexer (event
log -> jobs -> embeddings over HTTP -> chunk store) runs in the same process as it does
in production; GetSemanticIndex is read until every item is embedded. Reported: items/s
from the first write to the last item indexed.

``writes``: the write path with and without the semantic index, in interleaved rounds (the
order flips every round, so drift on a shared machine hits both alike), a fresh
``switchboard serve --dev`` (SQLite) per case: ``off`` has no embeddings endpoint;
``on`` has one, the workspace indexes its messages too (``index_messages``), and the
indexer embeds what the load writes while it runs. A client process runs C closed loops
of CreateMemoryItem, then C of AppendMessage (one conversation each). Reported: p50/p99
and calls/s of each, and on/off ratios (median over the rounds, with their range).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from google.protobuf import field_mask_pb2
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.*, tests.*

from bench.context import Corpus
from bench.fixtures import Account, create_conversations, create_workspace, register
from bench.harness import (
    ROOT,
    CpuMeter,
    clients,
    command_line,
    dedicated_channel,
    errors_text,
    gather_limited,
    host_speed_line,
    median,
    provenance,
    python,
    quiet_gc,
    report,
    run_client,
    say,
    section_main,
    serve,
    session,
    spawn,
    stop,
    summary,
    verdict,
    wait_quiet,
)
from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.context.v1 import context_pb2_grpc

SECTION: Final = "## Semantic memory: the vector index, indexing and the write path"
WORKSPACE: Final = "semantic"
#: The test kit's hashing model (``tests/fakes/embeddings_server.py``): words' seeded vectors.
MODEL: Final = "sb-hash-384"
DIMENSIONS: Final = 384
K: Final = 10
#: The issue's goals.
P99_GOAL_MS: Final = {"postgresql": 20.0, "sqlite": 50.0}
RECALL_GOAL: Final = 0.95
#: Memory rows written per transaction while loading.
LOAD_BATCH: Final = 1000
#: Writers of the steady-state inserts (``replace_source`` with the index in place).
STEADY_WRITERS: Final = 16
#: Settings every served process gets: one account writes as fast as it can, into one scope.
BASE_SETTINGS: Final[dict[str, str]] = {
    "SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "10000000",
    "SWITCHBOARD_CONTEXT_MAX_MEMORY_ITEMS": "10000000",
    "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
}
PARTS: Final = ("index", "indexing", "writes")
VARIANTS: Final = ("off", "on")


@dataclass(frozen=True)
class Sizes:
    items: int
    queries: int
    #: Queries also answered by the exact scan (the first ones): recall is over these.
    exact_queries: int
    #: A second pgvector ``hnsw.ef_search`` measured besides the default.
    ef_search_more: int
    indexing_items: int
    rounds: int
    writers: int
    warmup_s: float
    seconds: float
    quiet_wait_s: float


FULL: Final = Sizes(
    items=100_000,
    queries=100,
    exact_queries=50,
    ef_search_more=200,
    indexing_items=1_000,
    rounds=4,
    writers=8,
    warmup_s=2.0,
    seconds=5.0,
    quiet_wait_s=5.0,
)
QUICK: Final = Sizes(
    items=10_000,
    queries=40,
    exact_queries=20,
    ef_search_more=200,
    indexing_items=300,
    rounds=2,
    writers=8,
    warmup_s=1.0,
    seconds=2.0,
    quiet_wait_s=2.0,
)


# ---------------------------------------------------------------------------------
# The embeddings: the test kit's deterministic server, and its function in process.


@dataclass(frozen=True)
class Embeddings:
    url: str
    pid: int


@contextlib.contextmanager
def embeddings_server() -> Iterator[Embeddings]:
    """The test kit's local embeddings server in its own process, on a free port."""
    argv = python("-m", "tests.fakes.embeddings_server", "--port", "0", "--quiet")
    process = spawn(argv, cwd=ROOT)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"the embeddings server said {url!r}")
        yield Embeddings(url, process.pid)
    finally:
        stop(process, by="terminate")


def embedded_settings(embeddings: Embeddings) -> dict[str, str]:
    return {
        **BASE_SETTINGS,
        "SWITCHBOARD_CONTEXT_EMBEDDINGS_URL": embeddings.url,
        "SWITCHBOARD_CONTEXT_EMBEDDINGS_MODEL": MODEL,
        "SWITCHBOARD_CONTEXT_EMBEDDINGS_DIMENSIONS": str(DIMENSIONS),
    }


def hashed_vectors(texts: Sequence[str]) -> list[list[float]]:
    """What the embeddings server answers for ``texts``: its own function, in process."""
    from tests.fakes.embeddings_server import embed

    return [embed(MODEL, text, DIMENSIONS) for text in texts]


# ---------------------------------------------------------------------------------
# The corpus.


def memory_texts(count: int, seed: int) -> list[tuple[str, str]]:
    """(kind, content) of ``count`` memory items, the kind as the store spells it."""
    kinds: dict[int, str] = {
        pb.MEMORY_KIND_FACT: "fact",
        pb.MEMORY_KIND_PREFERENCE: "preference",
        pb.MEMORY_KIND_NOTE: "note",
    }
    corpus = Corpus(seed)
    out = []
    for _ in range(count):
        kind, content = corpus.memory()
        out.append((kinds[int(kind)], content))
    return out


def query_texts(count: int, seed: int) -> list[str]:
    corpus = Corpus(seed)
    return [corpus.query() for _ in range(count)]


# ---------------------------------------------------------------------------------
# Databases.


@dataclass(frozen=True)
class Backend:
    """A database engine to measure: fresh databases on it (``url``) and what it is."""

    name: str
    description: str
    directory: Path
    admin_url: str = ""

    async def url(self, label: str) -> str:
        """A fresh, empty database named after ``label``."""
        if not self.admin_url:
            return f"sqlite+aiosqlite:///{self.directory / f'{label}.db'}"
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy.pool import NullPool

        engine = create_async_engine(
            self.admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        try:
            async with engine.connect() as connection:
                await connection.exec_driver_sql(f'CREATE DATABASE "{label}"')
        finally:
            await engine.dispose()
        return self.admin_url.rsplit("/", 1)[0] + f"/{label}"


@contextlib.asynccontextmanager
async def backends(directory: Path, with_postgres: bool) -> AsyncIterator[list[Backend]]:
    """SQLite files in ``directory`` and, if asked, databases on a throwaway PostgreSQL
    cluster (the test suite's, with pgvector; durable settings, ``bench/context.py``)."""
    import sqlite3

    from bench.context import postgres

    found = [Backend("sqlite", f"SQLite {sqlite3.sqlite_version}, a file", directory)]
    if not with_postgres:
        yield found
        return
    async with postgres() as (url, description):
        if url is None:
            say(description)
            yield found
            return
        yield [*found, Backend("postgresql", description, directory, admin_url=url)]


async def setup_workspace(
    directory: Path, url: str, settings: dict[str, str], email: str
) -> Account:
    """A served process creates the account and the workspace (and migrates), then stops."""
    with serve(directory, url, settings) as server:
        async with dedicated_channel(server.address) as channel:
            account = await register(channel, email)
            await create_workspace(channel, account, WORKSPACE, "Semantic bench")
    return account


async def login(address: str, email: str) -> str:
    """An access token from this server for the account ``email``."""
    from bench.fixtures import PASSWORD
    from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc

    async with dedicated_channel(address) as channel:
        response = await auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(
                password=auth_pb2.PasswordCredential(email=email, password=PASSWORD)
            ),
            timeout=60,
        )
    token: str = response.tokens.access_token
    return token


# ---------------------------------------------------------------------------------
# Loading N items in this process.


async def load(url: str, account: Account, count: int) -> dict[str, Any]:
    """``count`` memory items in the workspace, with their chunks and vectors."""
    from switchboard.context.semantic.indexing.chunkstore import ChunkStore
    from switchboard.context.semantic.ports import EmbeddingModel
    from switchboard.platform.store.db import Database
    from switchboard.platform.store.models import MemoryItemRow

    database = Database(url, timeout_s=600.0)
    store = ChunkStore(database)
    sqlite = database.dialect_name == "sqlite"
    engine = await _vector_table(database, store)
    model_key = EmbeddingModel(MODEL, DIMENSIONS).key(1)
    texts = memory_texts(count, seed=56)
    # Vectors computed in other processes while this one writes (the cores overlap).
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=2)
    pending = [
        pool.submit(hashed_vectors, [content for _, content in texts[first : first + LOAD_BATCH]])
        for first in range(0, count, LOAD_BATCH)
    ]
    started = time.monotonic()
    spent = {"vectors_wait_s": 0.0, "memory_s": 0.0, "chunks_s": 0.0}
    # The last items go in one by one with the index in place: the steady state.
    bulk = count - max(LOAD_BATCH, count // 50) // LOAD_BATCH * LOAD_BATCH
    steady_chunks: list[tuple[Any, list[float]]] = []
    try:
        for first in range(0, count, LOAD_BATCH):
            batch = texts[first : first + LOAD_BATCH]
            rows = _memory_rows(batch, first, account, sqlite=sqlite)
            clock = time.monotonic()
            vectors = await asyncio.wrap_future(pending[first // LOAD_BATCH])
            spent["vectors_wait_s"] += time.monotonic() - clock
            clock = time.monotonic()
            await database.run(
                functools.partial(_insert_memory, MemoryItemRow, rows, sqlite), write=True
            )
            spent["memory_s"] += time.monotonic() - clock
            chunks = _chunk_records(rows)
            if first + len(batch) <= bulk:
                clock = time.monotonic()
                await database.run(
                    functools.partial(_insert_chunks, store, chunks, vectors, model_key),
                    write=True,
                )
                spent["chunks_s"] += time.monotonic() - clock
            else:
                steady_chunks += list(zip(chunks, vectors, strict=True))
            if (first // LOAD_BATCH) % 10 == 9:
                say(f"  loaded {first + len(batch)} items ({time.monotonic() - started:.0f} s)")
        if not sqlite:
            clock = time.monotonic()
            await database.run(functools.partial(_build_hnsw, store), write=True)
            spent["hnsw_build_s"] = time.monotonic() - clock
        clock = time.monotonic()
        await _replace_each(store, steady_chunks, model_key)
        steady_s = time.monotonic() - clock
    finally:
        pool.shutdown(cancel_futures=True)
        await database.close()
    took = time.monotonic() - started
    return {
        "engine": engine,
        "items": count,
        "load_s": round(took, 1),
        "load_items_per_s": round(count / took),
        "bulk_chunks_per_s": round(bulk / max(spent["chunks_s"], 1e-9)),
        "steady": count - bulk,
        "steady_per_s": round((count - bulk) / max(steady_s, 1e-9)),
        **{k: round(v, 1) for k, v in spent.items()},
    }


async def _vector_table(database: Any, store: Any) -> str:
    """The vector table, without its HNSW index on PostgreSQL: one is built faster over
    the loaded rows than grown row by row."""
    from switchboard.platform.store.vectors import vector_support

    support = await vector_support(database)  # creates pgvector in the database
    if not support.available:
        raise RuntimeError(support.reason)
    await store.ensure_dimensions(DIMENSIONS)
    if database.dialect_name != "sqlite":
        await database.run(_drop_hnsw, write=True)
    return support.engine


def _memory_rows(
    batch: Sequence[tuple[str, str]], first: int, account: Account, *, sqlite: bool
) -> list[dict[str, Any]]:
    """The memory_items rows of ``batch`` (items ``first``... of the load)."""
    from switchboard.platform.values.names import new_id

    owner = f"workspaces/{WORKSPACE}"
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = []
    for offset, (kind, content) in enumerate(batch):
        index = first + offset
        stamp = base + dt.timedelta(seconds=index)
        rows.append(
            {
                "id": new_id(),
                "scope": owner,
                "workspace_id": WORKSPACE,
                "conversation_id": None,
                "user_id": None,
                "kind": kind,
                "content": content,
                "pinned": False,
                "meta": b"",
                "sources": "",
                "creator": account.user,
                "created_at": stamp,
                "updated_at": stamp,
                "expires_at": None,
                "token_count": len(content.split()),
                "version": 1,
                "fts_rowid": index + 1 if sqlite else None,
            }
        )
    return rows


def _chunk_records(rows: Sequence[dict[str, Any]]) -> list[Any]:
    """One chunk per memory row, as the indexer cuts an item shorter than a chunk."""
    from switchboard.context.semantic.ports import ChunkRecord

    owner = f"workspaces/{WORKSPACE}"
    return [
        ChunkRecord(
            owner=owner,
            source_kind="memory",
            source=f"{owner}/memories/{row['id']}",
            chunk_index=0,
            start_offset=0,
            end_offset=len(row["content"]),
            text=row["content"],
            created_at=row["created_at"],
            label=row["kind"],
            workspace_id=WORKSPACE,
        )
        for row in rows
    ]


async def _replace_each(store: Any, chunks: list[tuple[Any, list[float]]], key: str) -> None:
    """Each chunk as the indexer writes it: ``replace_source``, a source per transaction,
    ``STEADY_WRITERS`` at once."""
    queue = list(reversed(chunks))

    async def writer() -> None:
        while queue:
            chunk, vector = queue.pop()
            await store.replace_source("memory", chunk.source, [chunk], [vector], key, DIMENSIONS)

    await asyncio.gather(*(writer() for _ in range(STEADY_WRITERS)))


def _insert_chunks(
    store: Any, chunks: list[Any], vectors: list[list[float]], key: str, db: Any
) -> None:
    """The chunk store's own inserts (rows, full-text, vectors), a batch per transaction."""
    ids = store._insert_chunks(db, chunks, key)
    store._insert_vectors(db, DIMENSIONS, ids, chunks, vectors)


def _drop_hnsw(db: Any) -> None:
    from sqlalchemy import text

    from switchboard.context.semantic.indexing.chunkstore import vector_table

    db.execute(text(f"DROP INDEX IF EXISTS ix_{vector_table(DIMENSIONS)}_hnsw"))


def _build_hnsw(store: Any, db: Any) -> None:
    """The index again, by the chunk store's own DDL, with room to build it in memory."""
    from sqlalchemy import text

    from switchboard.context.semantic.indexing.chunkstore import vector_table

    db.execute(text("SET LOCAL maintenance_work_mem = '1GB'"))
    db.execute(text("SET LOCAL max_parallel_maintenance_workers = 2"))
    store._create_table(db, DIMENSIONS)
    db.execute(text(f"ANALYZE {vector_table(DIMENSIONS)}"))
    db.execute(text("ANALYZE semantic_chunks"))


def _insert_memory(table: Any, rows: list[dict[str, Any]], sqlite: bool, db: Any) -> None:
    from sqlalchemy import insert, text

    db.execute(insert(table), rows)
    if sqlite:
        db.execute(
            text("INSERT INTO memory_fts(rowid, content) VALUES (:fts_rowid, :content)"),
            [{"fts_rowid": r["fts_rowid"], "content": r["content"]} for r in rows],
        )


# ---------------------------------------------------------------------------------
# The engine, in this process.


async def engine_queries(
    url: str, queries: Sequence[str], exact_count: int, ef_more: int
) -> dict[str, Any]:
    """``nearest`` (on PostgreSQL at the default ``ef_search`` and others) and
    ``exact_nearest`` (the first ``exact_count`` queries: a full scan is slow), one query
    at a time: latencies, and recall@K of the index over those queries. Also ``nearest``
    at the ``candidates`` setting's count, as a HYBRID search asks it (a SEMANTIC one
    asks first only about as deep as its page)."""
    from switchboard.context.semantic.indexing.chunkstore import ChunkStore
    from switchboard.context.semantic.ports import EmbeddingModel, SearchFilter
    from switchboard.context.semantic.settings import SemanticSettings
    from switchboard.platform.store.db import Database

    fields = SemanticSettings.model_fields
    default_ef = fields["context_semantic_ef_search"].default
    candidates = fields["context_semantic_candidates"].default
    database = Database(url, timeout_s=60.0)
    store = ChunkStore(database)
    key = EmbeddingModel(MODEL, DIMENSIONS).key(1)
    owners = [f"workspaces/{WORKSPACE}"]
    everything = SearchFilter(sources=frozenset({"memory"}))
    vectors = hashed_vectors(queries)
    sqlite = database.dialect_name == "sqlite"
    settings = [default_ef] if sqlite else [default_ef, 40, ef_more]  # 40: pgvector's own
    out: dict[str, Any] = {}

    def nearest(vector: list[float], ef: int, k: int = K, where: SearchFilter = everything) -> Any:
        return store.nearest(owners, vector, DIMENSIONS, key, k, where, ef_search=ef)

    def exact(vector: list[float]) -> Any:
        return store.exact_nearest(owners, vector, DIMENSIONS, key, K, everything)

    try:
        for vector in vectors[-5:]:  # warm-up: statements prepared, pages cached
            await nearest(vector, default_ef)
            await exact(vector)
        exact_s, truth = await _timed([functools.partial(exact, v) for v in vectors[:exact_count]])
        out["exact"] = summary(exact_s)
        for ef in settings:
            index_s, found = await _timed([functools.partial(nearest, v, ef) for v in vectors])
            label = "vec0" if sqlite else f"ef_search={ef}"
            out[label] = {
                **summary(index_s),
                "ef_search": ef,
                "default": ef == default_ef,
                "recall": recall(found[:exact_count], truth),
            }
        asked_s, _ = await _timed(
            [functools.partial(nearest, v, default_ef, candidates) for v in vectors]
        )
        out["candidates"] = {**summary(asked_s), "k": candidates}
        # SearchMemoryItems on a workspace: its own memory, no conversation's.
        own = SearchFilter(sources=frozenset({"memory"}), without_conversation=True)
        asked_s, _ = await _timed(
            [functools.partial(nearest, v, default_ef, candidates, own) for v in vectors]
        )
        out["workspace_memory"] = {**summary(asked_s), "k": candidates}
        # A fifth of the items (their kind): the index's candidates are filtered after it.
        preferences = SearchFilter(labels=frozenset({"preference"}))
        filtered_s, _ = await _timed(
            [
                functools.partial(
                    store.nearest, owners, v, DIMENSIONS, key, K, preferences, ef_search=default_ef
                )
                for v in vectors
            ]
        )
        out["filtered"] = summary(filtered_s)
    finally:
        await database.close()
    return out


async def _timed(calls: Sequence[Any]) -> tuple[list[float], list[list[int]]]:
    times, found = [], []
    for call in calls:
        started = time.perf_counter()
        hits = await call()
        times.append(time.perf_counter() - started)
        found.append([hit.chunk_id for hit in hits])
    return times, found


def recall(found: Sequence[Sequence[int]], truth: Sequence[Sequence[int]]) -> float:
    """Mean over the queries of |found ∩ truth| / |truth| (truth: the exact top K)."""
    shares = [
        len(set(got) & set(want)) / len(want)
        for got, want in zip(found, truth, strict=True)
        if want
    ]
    return round(sum(shares) / max(len(shares), 1), 4)


# ---------------------------------------------------------------------------------
# The parts (this process drives, the served process and the clients measure).


async def index_part(
    sizes: Sizes, directory: Path, backend: str, url: str, embeddings: Embeddings
) -> dict[str, Any]:
    settings = embedded_settings(embeddings)
    account = await setup_workspace(directory, url, settings, f"index-{backend}@example.com")
    say(f"index ({backend}): loading {sizes.items} items")
    loaded = await load(url, account, sizes.items)
    say(f"index ({backend}): loaded {json.dumps(loaded)}")
    queries = query_texts(sizes.queries, seed=7)
    await wait_quiet(sizes.quiet_wait_s)
    engine = await engine_queries(url, queries, sizes.exact_queries, sizes.ef_search_more)
    say(f"index ({backend}): engine {json.dumps(engine)}")
    with serve(directory, url, settings) as server:
        # A server without a configured key signs with its own: log in to this one.
        token = await login(server.address, f"index-{backend}@example.com")
        await wait_quiet(sizes.quiet_wait_s)
        served = await asyncio.to_thread(
            run_client,
            __file__,
            {
                "mode": "search",
                "address": server.address,
                "token": token,
                "server_pid": server.pid,
                "parent": f"workspaces/{WORKSPACE}",
                "queries": queries,
            },
        )
    say(f"index ({backend}): served {json.dumps(served)}")
    return {"backend": backend, "load": loaded, "engine": engine, "served": served}


async def indexing_part(
    sizes: Sizes, directory: Path, backend: str, url: str, embeddings: Embeddings
) -> dict[str, Any]:
    settings = embedded_settings(embeddings)
    with serve(directory, url, settings) as server:
        async with dedicated_channel(server.address) as channel:
            account = await register(channel, f"indexing-{backend}@example.com")
            workspace = await create_workspace(channel, account, WORKSPACE, "Indexing bench")
            stub = context_pb2_grpc.ContextServiceStub(channel)
            texts = memory_texts(sizes.indexing_items, seed=11)
            await wait_quiet(sizes.quiet_wait_s)
            meter = CpuMeter(server.pid, embeddings.pid)
            meter.start()
            started = time.monotonic()

            async def create(kind: str, content: str) -> None:
                await stub.CreateMemoryItem(
                    pb.CreateMemoryItemRequest(
                        parent=workspace,
                        memory_item=pb.MemoryItem(kind=KIND_PROTOS[kind], content=content),
                    ),
                    metadata=account.metadata,
                    timeout=60,
                )

            await gather_limited([functools.partial(create, k, c) for k, c in texts])
            written = time.monotonic() - started
            index = await _indexed(stub, account, workspace, sizes.indexing_items)
            took = time.monotonic() - started
            meter.stop()
    return {
        "backend": backend,
        "items": sizes.indexing_items,
        "write_s": round(written, 2),
        "indexed_s": round(took, 2),
        "items_per_s": round(sizes.indexing_items / took, 1),
        "server_cores": meter.cores(0),
        "embeddings_cores": meter.cores(1),
        "indexed_count": index.indexed_count,
        "pending_count": index.pending_count,
    }


KIND_PROTOS: Final = {
    "fact": pb.MEMORY_KIND_FACT,
    "preference": pb.MEMORY_KIND_PREFERENCE,
    "note": pb.MEMORY_KIND_NOTE,
}
#: How long the indexer may take to catch up after the last write.
INDEXED_TIMEOUT_S: Final = 600.0


async def _indexed(
    stub: context_pb2_grpc.ContextServiceAsyncStub, account: Account, workspace: str, count: int
) -> pb.SemanticIndex:
    """GetSemanticIndex, read every 100 ms until ``count`` passages are embedded."""
    deadline = time.monotonic() + INDEXED_TIMEOUT_S
    while True:
        index = (
            await stub.GetSemanticIndex(
                pb.GetSemanticIndexRequest(name=f"{workspace}/semanticIndex"),
                metadata=account.metadata,
                timeout=30,
            )
        ).semantic_index
        if index.indexed_count >= count and index.pending_count == 0:
            return index
        if index.state == pb.SEMANTIC_INDEX_STATE_DISABLED:
            raise RuntimeError(f"the semantic index is off: {index}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not indexed within {INDEXED_TIMEOUT_S:g} s: {index}")
        await asyncio.sleep(0.1)  # polling what the indexer reports, the only signal


async def writes_case(
    sizes: Sizes, directory: Path, variant: str, embeddings: Embeddings
) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{directory / f'writes-{time.monotonic_ns()}.db'}"
    settings = embedded_settings(embeddings) if variant == "on" else BASE_SETTINGS
    with serve(directory, url, settings) as server:
        async with dedicated_channel(server.address) as channel:
            account = await register(channel, f"writes-{variant}@example.com")
            workspace = await create_workspace(channel, account, WORKSPACE, "Writes bench")
            stub = context_pb2_grpc.ContextServiceStub(channel)
            if variant == "on":
                await stub.UpdateSemanticIndex(
                    pb.UpdateSemanticIndexRequest(
                        semantic_index=pb.SemanticIndex(
                            name=f"{workspace}/semanticIndex", index_messages=True
                        ),
                        update_mask=field_mask_pb2.FieldMask(paths=["index_messages"]),
                    ),
                    metadata=account.metadata,
                    timeout=30,
                )
            conversations = await create_conversations(
                channel, account, [workspace] * sizes.writers, "Writer {}"
            )
            waited = await wait_quiet(sizes.quiet_wait_s)
            figures = await asyncio.to_thread(
                run_client,
                __file__,
                {
                    "mode": "writes",
                    "address": server.address,
                    "token": account.token,
                    "server_pid": server.pid,
                    "workspace": workspace,
                    "conversations": conversations,
                    "warmup_s": sizes.warmup_s,
                    "seconds": sizes.seconds,
                },
            )
            if variant == "on":
                index = (
                    await stub.GetSemanticIndex(
                        pb.GetSemanticIndexRequest(name=f"{workspace}/semanticIndex"),
                        metadata=account.metadata,
                        timeout=30,
                    )
                ).semantic_index
                figures["indexed_count"] = index.indexed_count
                figures["pending_count"] = index.pending_count
    figures["quiet_wait_s"] = waited
    return figures


# ---------------------------------------------------------------------------------
# The client process: the measured calls.


async def search_client(spec: dict[str, Any]) -> dict[str, Any]:
    """SearchMemoryItems(SEMANTIC), one query at a time."""
    quiet_gc()
    metadata = (("authorization", f"Bearer {spec['token']}"),)
    errors: collections.Counter[str] = collections.Counter()
    fallbacks: collections.Counter[str] = collections.Counter()
    times: list[float] = []
    results = 0
    async with dedicated_channel(spec["address"]) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)

        async def one(query: str) -> pb.SearchMemoryItemsResponse | None:
            try:
                return await stub.SearchMemoryItems(
                    pb.SearchMemoryItemsRequest(
                        parent=spec["parent"],
                        query=query,
                        page_size=K,
                        mode=pb.SEARCH_MODE_SEMANTIC,
                    ),
                    metadata=metadata,
                    timeout=30,
                )
            except aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                return None

        warm = [f"warm-up question {i} about the deploy pipeline" for i in range(20)]
        for query in warm:
            await one(query)
        meter = CpuMeter(spec["server_pid"])
        meter.start()
        for query in spec["queries"]:
            started = time.perf_counter()
            response = await one(query)
            times.append(time.perf_counter() - started)
            if response is not None:
                results += len(response.results)
                if response.fallback_reason:
                    fallbacks[pb.SearchFallbackReason.Name(response.fallback_reason)] += 1
        meter.stop()
    return {
        **summary(times),
        "results_per_query": round(results / max(len(times), 1), 2),
        "errors": dict(errors),
        "fallbacks": dict(fallbacks),
        "server_ms_per_call": round(meter.used[0] * 1000 / max(len(times), 1), 3),
    }


async def writes_client(spec: dict[str, Any]) -> dict[str, Any]:
    """C closed loops of CreateMemoryItem, then C of AppendMessage (one conversation each)."""
    metadata = (("authorization", f"Bearer {spec['token']}"),)
    corpus = Corpus(seed=99)
    out = {}
    async with dedicated_channel(spec["address"]) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)

        def create(index: int) -> Any:
            kind, content = corpus.memory()
            return stub.CreateMemoryItem(
                pb.CreateMemoryItemRequest(
                    parent=spec["workspace"],
                    memory_item=pb.MemoryItem(kind=kind, content=content),  # type: ignore[arg-type]
                ),
                metadata=metadata,
                timeout=30,
            )

        def append(index: int) -> Any:
            role, text = corpus.message(index)
            return stub.AppendMessage(
                pb.AppendMessageRequest(
                    parent=spec["conversations"][index % len(spec["conversations"])],
                    message=pb.Message(role=role, parts=[pb.ContentPart(text=text)]),  # type: ignore[arg-type]
                ),
                metadata=metadata,
                timeout=30,
            )

        for name, call in (("create", create), ("append", append)):
            out[name] = await _closed_loops(spec, call)
    return out


async def _closed_loops(spec: dict[str, Any], call: Any) -> dict[str, Any]:
    loops = len(spec["conversations"])
    times: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    begin = time.perf_counter() + spec["warmup_s"]
    deadline = begin + spec["seconds"]
    meter = CpuMeter(spec["server_pid"])

    async def loop(number: int) -> None:
        index = number
        while (now := time.perf_counter()) < deadline:
            try:
                await call(index)
            except aio.AioRpcError as exc:
                errors[exc.code().name] += 1
            if now >= begin:
                times.append(time.perf_counter() - now)
            index += loops

    quiet_gc()
    tasks = [asyncio.create_task(loop(n)) for n in range(loops)]
    await asyncio.sleep(max(0.0, begin - time.perf_counter()))  # the warm-up
    meter.start()
    await asyncio.gather(*tasks)
    meter.stop()
    return {
        **summary(times),
        "per_s": round(len(times) / spec["seconds"], 1),
        "errors": dict(errors),
        "server_ms_per_call": round(meter.used[0] * 1000 / max(len(times), 1), 3),
        "server_cores": meter.cores(0),
        "other_cores": round(meter.others() / max(meter.wall, 1e-9), 2),
    }


# ---------------------------------------------------------------------------------
# The driver.


async def drive(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.items:
        sizes = dataclasses.replace(sizes, items=args.items)
    parts = set(args.only or PARTS)
    results: dict[str, Any] = {"index": [], "indexing": [], "writes": []}
    async with session(results, "switchboard-semantic-bench-") as directory:
        with embeddings_server() as embeddings:
            if "writes" in parts:
                for round_no in range(sizes.rounds):
                    order = VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]
                    measured = {}
                    for variant in order:
                        measured[variant] = await writes_case(sizes, directory, variant, embeddings)
                        f = measured[variant]
                        say(
                            f"writes round {round_no + 1} {variant}: create "
                            f"{f['create']['p50_ms']}/{f['create']['p99_ms']} ms "
                            f"{f['create']['per_s']}/s, append {f['append']['p50_ms']}/"
                            f"{f['append']['p99_ms']} ms {f['append']['per_s']}/s"
                        )
                    results["writes"].append(measured)
            async with backends(directory, not args.no_postgres) as found:
                for backend in found:
                    results.setdefault("databases", {})[backend.name] = backend.description
                    if "indexing" in parts:
                        url = await backend.url("indexing")
                        one = await indexing_part(sizes, directory, backend.name, url, embeddings)
                        say(f"indexing ({backend.name}): {json.dumps(one)}")
                        results["indexing"].append(one)
                    if "index" in parts:
                        url = await backend.url("index")
                        results["index"].append(
                            await index_part(sizes, directory, backend.name, url, embeddings)
                        )
    text = render(results, command_line("bench/semantic.py"), sizes)
    report(results, text, args)
    return 0


# ---------------------------------------------------------------------------------
# The report.


def summarize_writes(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per call (create, append) and figure: on/off of each round, median and range."""
    out: dict[str, dict[str, Any]] = {}
    for call in ("create", "append"):
        figures: dict[str, Any] = {}
        for key in ("p50_ms", "p99_ms", "per_s", "server_ms_per_call"):
            ratios = [r["on"][call][key] / max(r["off"][call][key], 1e-9) for r in rounds]
            figures[key] = {
                "off": round(median(r["off"][call][key] for r in rounds), 3),
                "on": round(median(r["on"][call][key] for r in rounds), 3),
                "ratio": round(median(ratios), 3),
                "low": round(min(ratios), 3),
                "high": round(max(ratios), 3),
            }
        out[call] = figures
    return out


def _index_lines(results: dict[str, Any], sizes: Sizes) -> list[str]:
    if not results["index"]:
        return []
    lines = [
        "",
        f"### The index at {sizes.items:,} items",
        "",
        f"{sizes.queries} queries one at a time, k={K}; recall@{K} of `nearest` against "
        f"`exact_nearest` (a full scan) over the first {sizes.exact_queries}. The engine rows "
        "are the chunk store's calls in the bench's process; the last row is the whole "
        "served search.",
        "",
        "| database | chunks written /s | call | p50 ms | p99 ms | recall@10 | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for one in results["index"]:
        backend, engine, served = one["backend"], one["engine"], one["served"]
        semantic = not served["fallbacks"] and not served["errors"]
        goal = P99_GOAL_MS[backend]
        load = one["load"]
        built = f"; HNSW built in {load['hnsw_build_s']:.0f} s" if "hnsw_build_s" in load else ""
        first = (
            f"{load['engine']}: {load['bulk_chunks_per_s']} in bulk{built}; "
            f"{load['steady_per_s']} one by one (`replace_source`, {STEADY_WRITERS} at once, "
            "the index in place)"
        )
        for label, f in engine.items():
            if label in ("exact", "candidates", "workspace_memory", "filtered"):
                continue
            met = f["p99_ms"] < goal and f["recall"] >= RECALL_GOAL
            default = ", the default" if f["default"] and backend != "sqlite" else ""
            lines.append(
                f"| {backend} | {first} | `nearest` k={K} ({label}{default}) | {f['p50_ms']} | "
                f"{f['p99_ms']} | {f['recall']} | p99 < {goal:g} ms, recall >= "
                f"{RECALL_GOAL:g}: {verdict(met)} |"
            )
            first = ""
        f = engine["filtered"]
        lines.append(
            f"| {backend} | | `nearest` k={K}, filtered to a fifth (`kind = preference`) | "
            f"{f['p50_ms']} | {f['p99_ms']} | | |"
        )
        f = engine["candidates"]
        lines.append(
            f"| {backend} | | `nearest` k={f['k']} (the candidates setting: as a HYBRID search "
            f"asks it) | {f['p50_ms']} | {f['p99_ms']} | | |"
        )
        f = engine["workspace_memory"]
        lines.append(
            f"| {backend} | | `nearest` k={f['k']}, no conversation's passages (a HYBRID "
            f"SearchMemoryItems on a workspace; a SEMANTIC one asks 22 for its first page) | "
            f"{f['p50_ms']} | {f['p99_ms']} | | |"
        )
        f = engine["exact"]
        lines.append(
            f"| {backend} | | `exact_nearest` k={K} (full scan) | {f['p50_ms']} | "
            f"{f['p99_ms']} | 1 | |"
        )
        lines.append(
            f"| {backend} | | SearchMemoryItems(SEMANTIC) through gRPC, the query embedded over "
            f"HTTP; {served['results_per_query']} results per query, errors "
            f"{errors_text(served['errors'])}, fallbacks {errors_text(served['fallbacks'])} | "
            f"{served['p50_ms']} | {served['p99_ms']} | | p99 < {goal:g} ms, semantic: "
            f"{verdict(served['p99_ms'] < goal and semantic)} |"
        )
    return lines


def _indexing_lines(results: dict[str, Any]) -> list[str]:
    if not results["indexing"]:
        return []
    lines = [
        "",
        "### Indexing throughput",
        "",
        "| database | items | writes took s | all indexed after s | items/s | server cores | "
        "embeddings server cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for one in results["indexing"]:
        lines.append(
            f"| {one['backend']} | {one['items']} | {one['write_s']} | {one['indexed_s']} | "
            f"**{one['items_per_s']}** | {one['server_cores']} | {one['embeddings_cores']} |"
        )
    return lines


def _writes_lines(results: dict[str, Any], sizes: Sizes) -> list[str]:
    if not results["writes"]:
        return []
    lines = [
        "",
        "### The write path with and without the index (SQLite)",
        "",
        f"{sizes.writers} closed loops, {sizes.warmup_s:g} s warm-up and {sizes.seconds:g} s "
        f"measured per call and case, {sizes.rounds} interleaved rounds.",
        "",
        "| round | variant | create p50 / p99 ms | create/s | append p50 / p99 ms | append/s | "
        "errors | indexed / pending after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, measured in enumerate(results["writes"], 1):
        for variant in VARIANTS:
            f = measured[variant]
            c, a = f["create"], f["append"]
            errors = errors_text(
                collections.Counter(c["errors"]) + collections.Counter(a["errors"])
            )
            after = f"{f['indexed_count']} / {f['pending_count']}" if variant == "on" else "-"
            lines.append(
                f"| {number} | {variant} | {c['p50_ms']} / {c['p99_ms']} | {c['per_s']} | "
                f"{a['p50_ms']} / {a['p99_ms']} | {a['per_s']} | {errors} | {after} |"
            )
    s = summarize_writes(results["writes"])
    results["writes_summary"] = s
    lines += [
        "",
        "On / off, the median of the rounds' ratios [lowest, highest]:",
        "",
        "| call | p50 | p99 | calls/s | server CPU per call |",
        "|---|---|---|---|---|",
    ]
    for call, label in (("create", "CreateMemoryItem"), ("append", "AppendMessage")):
        f = s[call]
        cells = [
            f"{f[key]['ratio']:.2f} [{f[key]['low']:.2f}, {f[key]['high']:.2f}]"
            for key in ("p50_ms", "p99_ms", "per_s", "server_ms_per_call")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def render(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    databases = "; ".join(f"{k}: {v}" for k, v in results.get("databases", {}).items())
    lines = [
        SECTION,
        "",
        *provenance(command, took_s=results.get("seconds")),
        host_speed_line(results["host"]),
        f"- embeddings: `tests/fakes/embeddings_server.py`'s deterministic hashing model "
        f"`{MODEL}`, {DIMENSIONS} dimensions, in its own process (the bulk load calls the "
        "same function in the bench's process)",
        f"- databases: {databases or 'none measured'}",
        "- text: `bench/context.py`'s work-chat vocabulary; queries are questions built from "
        "it, never stored text",
        *_index_lines(results, sizes),
        *_indexing_lines(results),
        *_writes_lines(results, sizes),
    ]
    return "\n".join(lines)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", choices=PARTS, help="some parts only")
    parser.add_argument("--items", type=int, default=0, help="items in the index part")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="10k items, short phases (< 2 min)",
        options=options,
        roles={"client": clients({"search": search_client, "writes": writes_client})},
    )


if __name__ == "__main__":
    raise SystemExit(main())
