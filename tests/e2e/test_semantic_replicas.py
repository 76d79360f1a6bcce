"""The semantic indexer on the scaled-out shape: two `switchboard serve` replicas
serving ContextService on one PostgreSQL (with pgvector) and one Redis, lease 3 s.

A stream of messages in a workspace that indexes them is written through both
replicas. While jobs are pending, the replica holding the indexer's lease is
SIGKILLed (no drain, no shutdown code: its lease and its claims stay in the
database until they expire). The survivor takes the lease over, retakes the dead
replica's claimed jobs once their claims expire, and goes on indexing what the
stream still writes. At the end every message has exactly its passages, each
once (the passages the chunker cuts from its current text, no more, no fewer),
no job is left, and the survivor holds the lease.

Without an embeddings endpoint the passages are full-text only (``embedding``
empty): the crash properties under test (the cursor's compare-and-set, claims
with expiry, replace-whole-source writes) are the same with embeddings.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Final

import pytest
from grpc import aio
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.context.semantic.chunking import chunk_text
from switchboard.platform.store.models import SemanticCursorRow, SemanticJobRow
from tests.e2e.procs import scaled_env
from tests.e2e.replicas import Replica, sign_up
from tests.infra.redis import RedisServer
from tests.service.contextkit import Caller, context_stub, create_workspace, mask

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

LEASE_S: Final = 3.0
CHUNK_CHARS: Final = 200
MESSAGES: Final = 120
CALL_TIMEOUT_S: Final = 10.0
SETTLE_S: Final = 45.0
REPLICAS: Final = ("indexer-1", "indexer-2")


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    return {
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


def message_text(n: int) -> str:
    """Long enough for several passages: each message is a document of its own."""
    return " ".join(
        f"Message {n} sentence {i} about the harbour crane schedule." for i in range(12)
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
    env: dict[str, str], postgres_url: str
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
            index = cpb.SemanticIndex(name=f"{workspace.name}/semanticIndex", index_messages=True)
            await stubs[0].UpdateSemanticIndex(
                cpb.UpdateSemanticIndexRequest(
                    semantic_index=index, update_mask=mask("index_messages")
                ),
                metadata=owner.md,
                timeout=CALL_TIMEOUT_S,
            )
            chat = (
                await stubs[0].CreateConversation(
                    cpb.CreateConversationRequest(
                        parent=workspace.name, conversation=cpb.Conversation(title="stream")
                    ),
                    metadata=owner.md,
                    timeout=CALL_TIMEOUT_S,
                )
            ).conversation
            await until(lambda: _held(database), 20, "no replica took the indexer's lease")

            written: dict[str, str] = {}
            killed: Replica | None = None

            async def write(n: int) -> None:
                alive = [s for s, r in zip(stubs, replicas, strict=True) if r.up]
                stub = alive[n % len(alive)]
                for attempt in range(3):
                    try:
                        response = await stub.AppendMessage(
                            cpb.AppendMessageRequest(
                                parent=chat.name,
                                message=cpb.Message(
                                    role=cpb.MESSAGE_ROLE_USER,
                                    parts=[cpb.ContentPart(text=message_text(n))],
                                ),
                                request_id=f"m-{n}",
                            ),
                            metadata=owner.md,
                            timeout=CALL_TIMEOUT_S,
                        )
                        written[response.message.name] = message_text(n)
                        return
                    except aio.AioRpcError:
                        if attempt == 2:
                            raise
                        stub = next(s for s, r in zip(stubs, replicas, strict=True) if r.up)

            for n in range(MESSAGES):
                await write(n)
                if killed is None and n >= MESSAGES // 3 and await pending(database) > 0:
                    name = await holder(database)
                    killed = next(r for r in replicas if r.name == name)
                    killed.kill()
            assert killed is not None, "the lease holder was never killed mid-indexing"
            survivor = next(r for r in replicas if r is not killed)

            async def done() -> bool:
                return await pending(database) == 0 and await holder(database) == survivor.name

            await until(done, SETTLE_S, "indexing did not finish on the survivor")
            # The last writes may still be in the log ahead of the cursor: wait for them.
            await until(
                lambda: _all_indexed(database, set(written)), SETTLE_S, "messages unindexed"
            )

            async with database.connect() as db:
                rows = (
                    await db.execute(
                        text(
                            "SELECT source, chunk_index, start_offset, end_offset, text, "
                            "embedding FROM semantic_chunks WHERE source_kind = 'message'"
                        )
                    )
                ).all()
            seen = Counter((row.source, row.chunk_index) for row in rows)
            assert max(seen.values()) == 1, "a passage is stored twice"
            by_source: dict[str, list[tuple[int, int, int, str]]] = {}
            for row in rows:
                by_source.setdefault(row.source, []).append(
                    (row.chunk_index, row.start_offset, row.end_offset, row.text)
                )
                assert row.embedding == ""
            assert set(by_source) == set(written)
            for name, body in written.items():
                expected = [
                    (c.index, c.start, c.end, c.text)
                    for c in chunk_text(body, size=CHUNK_CHARS, overlap=40, max_chunks=512)
                ]
                assert sorted(by_source[name]) == expected, name
            assert await pending(database) == 0
        finally:
            for replica in replicas:
                await replica.close()
            await database.dispose()


async def _held(database: AsyncEngine) -> bool:
    return bool(await holder(database))


async def _all_indexed(database: AsyncEngine, names: set[str]) -> bool:
    async with database.connect() as db:
        found = set(
            (
                await db.execute(
                    text(
                        "SELECT DISTINCT source FROM semantic_chunks WHERE source_kind = 'message'"
                    )
                )
            ).scalars()
        )
    return names <= found and await pending(database) == 0
