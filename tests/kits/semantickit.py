"""Helpers for the semantic indexer's tests: a server whose context domain embeds
through the real client on the local embeddings server, waiting for the indexer to
settle, and the index's rows."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from grpc import aio
from sqlalchemy import func, select

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context import build
from switchboard.context.domain import ContextDomain
from switchboard.context.semantic.embedder import OpenAIEmbedder
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.egress import EgressPolicy
from switchboard.platform.store.models import (
    EventLogRow,
    EventOutboxRow,
    SemanticChunkRow,
    SemanticCursorRow,
    SemanticJobRow,
)
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, built, make_settings, started
from tests.fakes.embeddings_server import FakeEmbeddings
from tests.kits.contextkit import Caller, Stub, context_stub, mask, rpc

_WORD = re.compile(r"\w+")


#: A started server, a context stub to it, and its context domain.
Served = tuple[SwitchboardServer, Stub, ContextDomain]


def client(fake: FakeEmbeddings) -> OpenAIEmbedder:
    """The real embeddings client on the local server, with a quick breaker and no
    retries of its own (the indexer's backoff is under test)."""
    return OpenAIEmbedder(
        fake.url,
        api_key="",
        policy=EgressPolicy(allow_loopback=True),
        attempts=1,
        timeout_s=CALL_DEADLINE_S,
        breaker_reset_s=0.2,
    )


@asynccontextmanager
async def semantic_mesh(
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    embeddings: FakeEmbeddings | None,
    **overrides: object,
) -> AsyncIterator[Served]:
    """A server whose context domain embeds through the local embeddings server
    ``embeddings`` (None: no endpoint)."""
    embedder = client(embeddings) if embeddings is not None else None
    monkeypatch.setattr(build, "context_embedder", lambda settings, shared: embedder)
    values: dict[str, object] = {"context_semantic_poll_s": 0.2}
    values.update(overrides)
    try:
        async with _serving(make_settings(database_url=database_url, **values)) as served:
            yield served
    finally:
        if embedder is not None:
            await embedder.close()


@asynccontextmanager
async def deployed_mesh(
    database_url: str, fake: FakeEmbeddings, **overrides: object
) -> AsyncIterator[Served]:
    """A server configured as a deployment is (``SWITCHBOARD_CONTEXT_EMBEDDINGS_URL``
    naming the local embeddings server ``fake``, loopback allowed by the egress
    policy): the real build wires the real client and its budget charger."""
    values: dict[str, object] = {
        "database_url": database_url,
        "context_embeddings_url": fake.url,
        "context_embeddings_attempts": 1,
        "context_embeddings_timeout_s": CALL_DEADLINE_S,
        "context_semantic_poll_s": 0.2,
        "egress_allow_loopback": True,
    }
    values.update(overrides)
    async with _serving(make_settings(**values)) as served:
        yield served


@asynccontextmanager
async def _serving(settings: Settings) -> AsyncIterator[Served]:
    async with started(settings) as server, aio.insecure_channel(server.address) as channel:
        yield server, context_stub(channel), built(server, ContextDomain)


async def quiet(domain: ContextDomain) -> bool:
    """No event waits to be logged, the indexer has read the log to its stored head
    (the embedded log's table: this process may not have been handed its own latest
    event yet), and no job waits; read in one snapshot."""

    def work(db: Any) -> tuple[int, int, int, str | None]:
        outbox = int(db.scalar(select(func.count()).select_from(EventOutboxRow)) or 0)
        head = int(db.scalar(select(func.max(EventLogRow.seq))) or 0)
        jobs = int(db.scalar(select(func.count()).select_from(SemanticJobRow)) or 0)
        cursor = db.scalar(select(SemanticCursorRow.cursor))
        return outbox, head, jobs, cursor

    # The replica feeding may be ahead of the stored cursor (no job since). Read
    # before the snapshot: how far it fed was committed by then.
    fed = domain.indexer.fed
    database = domain.indexer.store._database
    outbox, head, jobs, cursor = await database.run(work, write=False, snapshot=True)
    # This process must have taken the lease (its reconcile is done by then).
    return outbox == 0 and jobs == 0 and fed is not None and fed == f"{head}-0" and bool(cursor)


async def settled(domain: ContextDomain, timeout_s: float = CALL_DEADLINE_S) -> None:
    """Wait until the indexer has read the log to its head and done every job."""
    async with asyncio.timeout(timeout_s):
        while not await quiet(domain):  # noqa: ASYNC110 - a stored state, under a deadline
            await asyncio.sleep(0.05)


@dataclass(frozen=True)
class ChunkRow:
    source_kind: str
    source: str
    chunk_index: int
    start: int
    end: int
    text: str
    embedding: str
    owner: str


async def chunk_rows(domain: ContextDomain) -> list[ChunkRow]:
    def work(db: Any) -> list[ChunkRow]:
        rows = db.execute(
            select(
                SemanticChunkRow.source_kind,
                SemanticChunkRow.source,
                SemanticChunkRow.chunk_index,
                SemanticChunkRow.start_offset,
                SemanticChunkRow.end_offset,
                SemanticChunkRow.text,
                SemanticChunkRow.embedding,
                SemanticChunkRow.owner,
            ).order_by(SemanticChunkRow.source, SemanticChunkRow.chunk_index)
        ).all()
        return [ChunkRow(*row) for row in rows]

    return await domain.indexer.store._database.run(work, write=False)


def by_source(rows: Sequence[ChunkRow]) -> dict[str, list[ChunkRow]]:
    found: dict[str, list[ChunkRow]] = {}
    for row in rows:
        found.setdefault(row.source, []).append(row)
    return found


async def set_index(stub: Stub, caller: Caller, workspace: str, **values: Any) -> pb.SemanticIndex:
    index = pb.SemanticIndex(name=f"{workspace}/semanticIndex", **values)
    response = await rpc(
        stub.UpdateSemanticIndex,
        pb.UpdateSemanticIndexRequest(semantic_index=index, update_mask=mask(*values)),
        caller,
    )
    return response.semantic_index


async def get_index(stub: Stub, caller: Caller, workspace: str) -> pb.SemanticIndex:
    response = await rpc(
        stub.GetSemanticIndex,
        pb.GetSemanticIndexRequest(name=f"{workspace}/semanticIndex"),
        caller,
    )
    return response.semantic_index
