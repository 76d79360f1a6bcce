"""Helpers for the semantic indexer's tests: a server whose context domain embeds
through a given embedder, waiting for the indexer to settle, and the index's rows."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from grpc import aio
from sqlalchemy import func, select

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context import build
from switchboard.context.domain import ContextDomain
from switchboard.context.semantic.ports import (
    Embedded,
    EmbeddingModel,
    EmbeddingsUnavailable,
)
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import (
    EventLogRow,
    EventOutboxRow,
    SemanticChunkRow,
    SemanticCursorRow,
    SemanticJobRow,
)
from tests.conftest import built, make_settings
from tests.service.contextkit import Caller, Stub, context_stub, mask, rpc

_WORD = re.compile(r"\w+")


@dataclass
class WordEmbedder:
    """An ``Embedder`` in the process: each word hashed into a dimension, normalized.

    ``down`` makes every call fail as an unreachable endpoint would; ``calls``
    and ``texts`` count what was asked of it.
    """

    dims: int = 16
    down: bool = False
    #: Answer vectors of this size whatever was asked (a misconfigured endpoint).
    wrong_dims: int = 0
    calls: int = 0
    texts: list[str] = field(default_factory=list)

    @property
    def configured(self) -> bool:
        return True

    async def embed(self, owner: str, texts: Sequence[str], model: EmbeddingModel) -> Embedded:
        if self.down:
            raise EmbeddingsUnavailable("the connection failed")
        self.calls += 1
        self.texts.extend(texts)
        dims = self.wrong_dims or model.dimensions or self.dims
        vectors = []
        for text in texts:
            vector = [0.0] * dims
            for word in _WORD.findall(text.lower()):
                slot = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % dims
                vector[slot] += 1.0
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            vectors.append([v / norm if norm else 0.0 for v in vector])
            if not any(vector):
                vectors[-1][0] = 1.0
        return Embedded(vectors=vectors, input_tokens=sum(len(t.split()) for t in texts))


@asynccontextmanager
async def semantic_mesh(
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    embedder: WordEmbedder | None,
    **overrides: object,
) -> AsyncIterator[tuple[SwitchboardServer, Stub, ContextDomain]]:
    """A server whose context domain embeds with ``embedder`` (None: no endpoint)."""
    monkeypatch.setattr(build, "context_embedder", lambda settings, shared: embedder)
    values: dict[str, object] = {"context_semantic_poll_s": 0.2}
    values.update(overrides)
    server, _port = await create_server(make_settings(database_url=database_url, **values))
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            yield server, context_stub(channel), built(server, ContextDomain)
    finally:
        await server.shutdown(grace=0)


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


async def settled(domain: ContextDomain, timeout_s: float = 30.0) -> None:
    """Wait until the indexer has read the log to its head and done every job."""
    indexer = domain.indexer
    async with asyncio.timeout(timeout_s):
        while True:
            indexer.progressed.clear()
            if await quiet(domain):
                return
            # Woken by the indexer's next round; the bound covers work another
            # part of the process did without a round of this indexer.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await indexer.progressed.wait()


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
