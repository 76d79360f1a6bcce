"""The semantic indexer on the scaled-out shape: two `switchboard serve` replicas
serving ContextService on one PostgreSQL (with pgvector) and one Redis, lease 3 s,
embedding through the local OpenAI-compatible embeddings server (real HTTP,
``sb-hash-64``, a little slow on purpose so indexing is under way at the kill).

A stream of memory items (long enough for several passages each, some edited
after they were written) goes through both replicas. While jobs are pending, the
replica holding the indexer's lease is SIGKILLed (no drain, no shutdown code: its
lease and its claims stay in the database until they expire). The survivor takes
the lease over, retakes the dead replica's claimed jobs once their claims expire,
and goes on indexing what the stream still writes. At the end every memory item
has exactly its passages, each once (those the chunker cuts from its current
text), each embedded with the current model key and with one vector, and no job
is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVar

import pytest
from grpc import aio
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.context.semantic.indexing.chunking import chunk_text
from switchboard.platform.store.models import SemanticCursorRow, SemanticJobRow
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import scaled_env
from tests.e2e.replicas import Replica, sign_up
from tests.fakes.embeddings_server import FakeEmbeddings
from tests.infra.redis import RedisServer
from tests.kits.contextkit import Caller, Stub, context_stub, create_workspace, mask

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

LEASE_S: Final = 3.0
CHUNK_CHARS: Final = 200
ITEMS: Final = 90
EDITED: Final = 10
MODEL: Final = "sb-hash-64"
KEY: Final = f"{MODEL}/64/1"
SETTLE_S: Final = 45.0
REPLICAS: Final = ("indexer-1", "indexer-2")
_R = TypeVar("_R")


@pytest.fixture
async def embeddings() -> AsyncIterator[FakeEmbeddings]:
    async with FakeEmbeddings(delay_s=0.05) as fake:
        yield fake


@pytest.fixture
def env(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer, embeddings: FakeEmbeddings
) -> dict[str, str]:
    return {
        "SWITCHBOARD_CONTEXT_EMBEDDINGS_URL": embeddings.url,
        "SWITCHBOARD_CONTEXT_EMBEDDINGS_MODEL": MODEL,
        "SWITCHBOARD_CONTEXT_EMBEDDINGS_DIMENSIONS": "64",
        **scaled_env(tmp_path, postgres_url, redis_server.url),
        "SWITCHBOARD_CONTEXT_SEMANTIC_LEASE_S": str(LEASE_S),
        "SWITCHBOARD_CONTEXT_SEMANTIC_POLL_S": "0.2",
        "SWITCHBOARD_CONTEXT_SEMANTIC_CHUNK_CHARS": str(CHUNK_CHARS),
        "SWITCHBOARD_CONTEXT_SEMANTIC_CHUNK_OVERLAP": "40",
        "SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "100000",
        "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_USER": "100000",
        "SWITCHBOARD_SHUTDOWN_GRACE_S": "2",
        "PYTHONFAULTHANDLER": "1",
    }


def note(n: int, version: int = 1) -> str:
    """Long enough for several passages."""
    return " ".join(
        f"Note {n} version {version} sentence {i} about the harbour crane schedule."
        for i in range(8)
    )


async def holder(database: AsyncEngine) -> str:
    async with database.connect() as db:
        row = (
            await db.execute(select(SemanticCursorRow.holder, SemanticCursorRow.lease_until))
        ).first()
    return row.holder if row is not None else ""


async def pending(database: AsyncEngine) -> int:
    async with database.connect() as db:
        return int(
            (await db.execute(select(func.count()).select_from(SemanticJobRow))).scalar_one()
        )


async def until(check: object, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while True:
        if await check():  # type: ignore[operator]
            return
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)  # polling a stored state, under a deadline


async def test_a_replica_killed_while_indexing_leaves_nothing_unindexed_or_doubled(
    env: dict[str, str], postgres_url: str, embeddings: FakeEmbeddings
) -> None:
    database = create_async_engine(postgres_url, poolclass=NullPool)
    with contextlib.ExitStack() as stack:
        replicas = [Replica(name, env, stack) for name in REPLICAS]
        try:
            for replica in replicas:
                await replica.start()
            first = replicas[0]
            assert first.process is not None
            owner: Caller = await sign_up(first.process.address, "indexer")
            stubs = [context_stub(replica.channel) for replica in replicas]  # type: ignore[arg-type]
            workspace = await create_workspace(stubs[0], owner, "Indexed")
            await until(lambda: _held(database), 20, "no replica took the indexer's lease")

            written: dict[str, str] = {}
            items: list[cpb.MemoryItem] = []
            killed: Replica | None = None

            def alive() -> list[Stub]:
                return [s for s, r in zip(stubs, replicas, strict=True) if r.up]

            async def call(n: int, send: Callable[[Stub], Awaitable[_R]]) -> _R:
                for attempt in range(3):
                    up = alive()
                    try:
                        return await send(up[(n + attempt) % len(up)])
                    except aio.AioRpcError:
                        if attempt == 2:
                            raise
                raise AssertionError("unreachable")

            async def create(n: int) -> None:
                async def send(stub: Stub) -> cpb.MemoryItem:
                    response = await stub.CreateMemoryItem(
                        cpb.CreateMemoryItemRequest(
                            parent=workspace.name,
                            memory_item=cpb.MemoryItem(kind=cpb.MEMORY_KIND_FACT, content=note(n)),
                        ),
                        metadata=owner.md,
                        timeout=CALL_DEADLINE_S,
                    )
                    return response.memory_item

                item = await call(n, send)
                items.append(item)
                written[item.name] = item.content

            async def edit(n: int, item: cpb.MemoryItem) -> None:
                changed = cpb.MemoryItem(name=item.name, content=note(n, 2))

                async def send(stub: Stub) -> cpb.MemoryItem:
                    response = await stub.UpdateMemoryItem(
                        cpb.UpdateMemoryItemRequest(
                            memory_item=changed, update_mask=mask("content")
                        ),
                        metadata=owner.md,
                        timeout=CALL_DEADLINE_S,
                    )
                    return response.memory_item

                written[item.name] = (await call(n, send)).content

            for n in range(ITEMS):
                await create(n)
                if n % 9 == 8 and len(items) > EDITED:
                    await edit(n, items[n - EDITED])
                if killed is None and n >= ITEMS // 3 and await pending(database) > 0:
                    name = await holder(database)
                    killed = next(r for r in replicas if r.name == name)
                    killed.kill()
            assert killed is not None, "the lease holder was never killed mid-indexing"
            survivor = next(r for r in replicas if r is not killed)

            async def done() -> bool:
                return (
                    await _all_indexed(database, await _stored(database))
                    and await holder(database) == survivor.name
                )

            await until(done, SETTLE_S, "indexing did not finish on the survivor")

            async with database.connect() as db:
                rows = (
                    await db.execute(
                        text(
                            "SELECT id, source, chunk_index, start_offset, end_offset, text, "
                            "embedding FROM semantic_chunks WHERE source_kind = 'memory'"
                        )
                    )
                ).all()
                vectors = Counter(
                    (await db.execute(text("SELECT chunk_id FROM semantic_vec_64"))).scalars()
                )
            # Every item stored (one a retried create made twice included), as it is now.
            stored = await _stored(database)
            assert {name: stored[name] for name in written} == written
            written = stored
            seen = Counter((row.source, row.chunk_index) for row in rows)
            assert max(seen.values()) == 1, "a passage is stored twice"
            assert {row.embedding for row in rows} == {KEY}
            assert vectors == Counter(row.id for row in rows), (
                "a passage's vector is missing or doubled"
            )
            by_source: dict[str, list[tuple[int, int, int, str]]] = {}
            for row in rows:
                by_source.setdefault(row.source, []).append(
                    (row.chunk_index, row.start_offset, row.end_offset, row.text)
                )
            assert set(by_source) == set(written)
            for name, body in written.items():
                expected = [
                    (c.index, c.start, c.end, c.text)
                    for c in chunk_text(body, size=CHUNK_CHARS, overlap=40, max_chunks=512)
                ]
                assert sorted(by_source[name]) == expected, name
            assert await pending(database) == 0
            assert embeddings.requests, "nothing was embedded through the endpoint"
        finally:
            for replica in replicas:
                await replica.close()
            await database.dispose()


async def _stored(database: AsyncEngine) -> dict[str, str]:
    """Every memory item's name and current content."""
    async with database.connect() as db:
        rows = (await db.execute(text("SELECT scope, id, content FROM memory_items"))).all()
    return {f"{row.scope}/memories/{row.id}": row.content for row in rows}


async def _held(database: AsyncEngine) -> bool:
    return bool(await holder(database))


async def _all_indexed(database: AsyncEngine, written: dict[str, str]) -> bool:
    """Every item's current text is indexed under the model key and no job waits."""
    async with database.connect() as db:
        rows = (
            await db.execute(
                text(
                    "SELECT source, text, embedding FROM semantic_chunks "
                    "WHERE source_kind = 'memory' AND chunk_index = 0"
                )
            )
        ).all()
    firsts = {row.source: (row.text, row.embedding) for row in rows}
    for name, body in written.items():
        first = chunk_text(body, size=CHUNK_CHARS, overlap=40, max_chunks=1)[0].text
        if firsts.get(name) != (first, KEY):
            return False
    return await pending(database) == 0
