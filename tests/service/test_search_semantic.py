"""Semantic and hybrid search end to end, on SQLite (sqlite-vec) and PostgreSQL
(pgvector): items indexed by the real indexer, queries embedded by an embedder
that knows a few synonyms, fallbacks when it cannot embed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context import build
from switchboard.context.semantic.ports import (
    Embedded,
    EmbeddingModel,
    EmbeddingsBudgetExhausted,
    EmbeddingsUnavailable,
)
from switchboard.platform.store.vectors import VectorSupport
from tests.service.contextkit import (
    TIMEOUT_S,
    append,
    create_conversation,
    ctx_world,
    refused,
    remember,
    rpc,
)
from tests.service.semantickit import (
    WordEmbedder,
    by_source,
    chunk_rows,
    get_index,
    semantic_mesh,
    set_index,
    settled,
)
from tests.service.test_search import search_context, search_memory, source_names

pytestmark = pytest.mark.asyncio

MODEL = "concepts"
DIMS = 32
FULL_TEXT = pb.SEARCH_MODE_FULL_TEXT
SEMANTIC = pb.SEARCH_MODE_SEMANTIC
HYBRID = pb.SEARCH_MODE_HYBRID
_WORD = re.compile(r"\w+")
# Words of one meaning share a dimension: a paraphrase lands near its original.
_CONCEPTS = [
    {"car", "automobile", "vehicle", "cars"},
    {"tyres", "tires", "wheels"},
    {"payment", "settlement", "remittance", "paid"},
    {"winter", "snow", "frost"},
]


@dataclass
class ConceptEmbedder(WordEmbedder):
    """``WordEmbedder`` whose synonyms share a dimension; ``broke`` raises a budget's
    refusal instead of embedding."""

    dims: int = DIMS
    broke: bool = False
    #: Set: every call waits until it is cleared (an endpoint that never answers).
    hang: asyncio.Event | None = None

    async def embed(self, owner: str, texts: Sequence[str], model: EmbeddingModel) -> Embedded:
        if self.hang is not None:
            await self.hang.wait()
        if self.down:
            raise EmbeddingsUnavailable("the connection was refused")
        if self.broke:
            raise EmbeddingsBudgetExhausted()
        self.calls += 1
        dims = model.dimensions or self.dims
        vectors = []
        for text in texts:
            vector = [0.0] * dims
            for word in _WORD.findall(text.lower()):
                slot = next((i for i, group in enumerate(_CONCEPTS) if word in group), None)
                if slot is None:
                    digest = hashlib.sha256(word.encode()).digest()
                    slot = len(_CONCEPTS) + int.from_bytes(digest[:4], "big") % (
                        dims - len(_CONCEPTS)
                    )
                vector[slot] += 1.0
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            vectors.append(
                [v / norm for v in vector] if any(vector) else [1.0] + [0.0] * (dims - 1)
            )
        return Embedded(vectors=vectors, input_tokens=sum(len(t.split()) for t in texts))


async def indexed_world(stub: Any, mesh: Any, domain: Any, name: str = "World") -> Any:
    world = await ctx_world(mesh, stub, name)
    await set_index(stub, world.owner, world.name, embedding_model=MODEL, dimensions=DIMS)
    return world


async def ready(stub: Any, domain: Any, world: Any, timeout_s: float = 30.0) -> None:
    """Every item indexed: the indexer settled and GetSemanticIndex says READY."""
    async with asyncio.timeout(timeout_s):
        while True:
            await settled(domain)
            index = await get_index(stub, world.viewer, world.name)
            if index.state == pb.SEMANTIC_INDEX_STATE_READY:
                return
            # Not yet: the indexer's next round says when to look again.
            domain.indexer.progressed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await domain.indexer.progressed.wait()


async def test_a_paraphrase_is_found_by_meaning_and_missed_by_words(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    async with semantic_mesh(monkeypatch, database_url, ConceptEmbedder()) as (mesh, stub, domain):
        world = await indexed_world(stub, mesh, domain)
        note = await remember(
            stub, world.editor, world.name, "The car needs new tyres before winter"
        )
        await remember(stub, world.editor, world.name, "Lunch is at noon on Fridays")
        await ready(stub, domain, world)
        words = await search_memory(
            stub, world.viewer, world.name, "automobile tires", mode=FULL_TEXT
        )
        assert list(words.results) == []
        meaning = await search_memory(
            stub, world.viewer, world.name, "automobile tires", mode=SEMANTIC
        )
        assert meaning.mode == SEMANTIC
        assert meaning.fallback_reason == pb.SEARCH_FALLBACK_REASON_UNSPECIFIED
        assert meaning.results[0].memory_item.name == note.name
        scores = meaning.results[0].scores
        assert scores.semantic_rank == 1
        assert 0.5 < scores.similarity <= 1.0
        assert not scores.HasField("full_text_rank")
        # Unspecified is hybrid once the index is configured.
        default = await search_context(stub, world.viewer, world.name, "automobile tires")
        assert default.mode == HYBRID
        assert source_names(default.results)[0] == note.name


async def test_hybrid_ranks_an_exact_keyword_match_first(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    async with semantic_mesh(monkeypatch, database_url, ConceptEmbedder()) as (mesh, stub, domain):
        world = await indexed_world(stub, mesh, domain)
        exact = await remember(stub, world.editor, world.name, "invoice zx81 payment received")
        # Near the query in meaning, but sharing none of its words.
        for text in (
            "settlement remittance",
            "the settlement and the remittance",
            "remittance paid in full",
        ):
            await remember(stub, world.editor, world.name, text)
        await ready(stub, domain, world)
        hybrid = await search_context(stub, world.viewer, world.name, "zx81 payment", mode=HYBRID)
        assert hybrid.mode == HYBRID
        first = hybrid.results[0]
        assert first.memory_item.name == exact.name
        assert first.scores.full_text_rank == 1
        assert first.scores.HasField("semantic_rank")
        assert first.score == pytest.approx(1 / 61 + 1 / (60 + first.scores.semantic_rank))
        assert len(hybrid.results) == 4
        scores = [r.score for r in hybrid.results]
        assert scores == sorted(scores, reverse=True)


async def test_another_workspaces_items_never_appear(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    async with semantic_mesh(monkeypatch, database_url, ConceptEmbedder()) as (mesh, stub, domain):
        mine = await indexed_world(stub, mesh, domain, "Mine")
        theirs = await indexed_world(stub, mesh, domain, "Theirs")
        text = "the vehicle wheels squeak in frost"
        own = await remember(stub, mine.editor, mine.name, text)
        other = await remember(stub, theirs.editor, theirs.name, text)
        conversation = await create_conversation(stub, theirs.editor, theirs.name)
        await append(stub, theirs.editor, conversation.name, text)
        await ready(stub, domain, mine)
        await ready(stub, domain, theirs)
        for mode in (SEMANTIC, HYBRID):
            found = await search_context(stub, mine.viewer, mine.name, "car tires snow", mode=mode)
            assert found.mode == mode
            assert source_names(found.results) == [own.name]
            memory = await search_memory(stub, mine.viewer, mine.name, "car tires", mode=mode)
            assert [r.memory_item.name for r in memory.results] == [own.name]
            found = await search_context(stub, theirs.viewer, theirs.name, "car tires", mode=mode)
            assert other.name in source_names(found.results)
            assert own.name not in source_names(found.results)
            await refused(
                search_context(stub, mine.outsider, mine.name, "car", mode=mode),
                grpc.StatusCode.NOT_FOUND,
            )


async def test_a_deleted_item_is_never_returned_even_with_its_chunks_left(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    async with semantic_mesh(monkeypatch, database_url, ConceptEmbedder()) as (mesh, stub, domain):
        world = await indexed_world(stub, mesh, domain)
        conversation = await create_conversation(stub, world.editor, world.name)
        kept = await remember(stub, world.editor, world.name, "car tyres for winter")
        gone = await remember(stub, world.editor, conversation.name, "car tyres in the snow")
        await ready(stub, domain, world)
        # The indexer stops (as if it were behind): the deletion leaves the chunk there.
        await domain.indexer.close()
        await rpc(stub.DeleteMemoryItem, pb.DeleteMemoryItemRequest(name=gone.name), world.editor)
        assert gone.name in by_source(await chunk_rows(domain))
        for mode in (SEMANTIC, HYBRID):
            found = await search_context(stub, world.viewer, world.name, "automobile", mode=mode)
            assert source_names(found.results) == [kept.name]
        # Nor is a workspace search's result from a conversation's memory.
        await remember(stub, world.editor, conversation.name, "vehicle wheels")
        memory = await search_memory(stub, world.viewer, world.name, "automobile", mode=SEMANTIC)
        assert [r.memory_item.name for r in memory.results] == [kept.name]


async def test_an_endpoint_down_or_no_budget_falls_back_to_full_text(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    embedder = ConceptEmbedder()
    async with semantic_mesh(monkeypatch, database_url, embedder) as (mesh, stub, domain):
        world = await indexed_world(stub, mesh, domain)
        note = await remember(stub, world.editor, world.name, "car tyres for winter")
        await ready(stub, domain, world)
        words = await search_memory(stub, world.viewer, world.name, "car tyres", mode=FULL_TEXT)
        for attribute, reason in (
            ("down", pb.SEARCH_FALLBACK_REASON_EMBEDDINGS_UNAVAILABLE),
            ("broke", pb.SEARCH_FALLBACK_REASON_BUDGET_EXHAUSTED),
        ):
            setattr(embedder, attribute, True)
            for mode in (pb.SEARCH_MODE_UNSPECIFIED, SEMANTIC, HYBRID):
                found = await search_memory(stub, world.viewer, world.name, "car tyres", mode=mode)
                assert found.mode == FULL_TEXT
                assert found.fallback_reason == reason
                assert found.fallback_detail
                assert list(found.results) == list(words.results)
                context = await search_context(stub, world.viewer, world.name, "car", mode=mode)
                assert (context.mode, context.fallback_reason) == (FULL_TEXT, reason)
                assert source_names(context.results) == [note.name]
            setattr(embedder, attribute, False)
        embedder.down = True
        found = await search_memory(stub, world.viewer, world.name, "car", mode=SEMANTIC)
        assert "could not be embedded" in found.fallback_detail
        assert "refused" in found.fallback_detail


async def test_window_retrieval_by_meaning(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    async with semantic_mesh(monkeypatch, database_url, ConceptEmbedder()) as (mesh, stub, domain):
        world = await indexed_world(stub, mesh, domain)
        note = await remember(
            stub, world.editor, world.name, "The car needs new tyres before winter"
        )
        conversation = await create_conversation(stub, world.editor, world.name)
        await append(stub, world.editor, conversation.name, "what about my automobile tires?")
        await ready(stub, domain, world)
        response = await stub.GetContextWindow(
            pb.GetContextWindowRequest(
                conversation=conversation.name,
                token_budget=500,
                retrieval=pb.RetrievalOptions(top_k=3, token_budget=100),
            ),
            metadata=world.viewer.md,
            timeout=TIMEOUT_S,
        )
        window = response.window
        assert window.retrieval_mode == HYBRID
        retrieved = [i for i in window.included if i.reason == pb.CONTEXT_ITEM_REASON_RETRIEVED]
        assert source_names(i.retrieved for i in retrieved)[0] == note.name
        assert retrieved[0].retrieved.scores.HasField("semantic_rank")
        assert sum(i.token_count for i in retrieved) <= 100


async def test_without_a_vector_engine_search_says_so(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    # A database without pgvector or sqlite-vec, as the start-up detection reports it.
    async def no_engine(database: object) -> VectorSupport:
        return VectorSupport(False, reason="no vector engine in this database")

    monkeypatch.setattr(build, "vector_support", no_engine)
    async with semantic_mesh(monkeypatch, database_url, ConceptEmbedder()) as (mesh, stub, domain):
        world = await indexed_world(stub, mesh, domain)
        note = await remember(stub, world.editor, world.name, "car tyres for winter")
        default = await search_memory(stub, world.viewer, world.name, "car")
        assert (default.mode, default.fallback_reason) == (
            FULL_TEXT,
            pb.SEARCH_FALLBACK_REASON_UNSPECIFIED,
        )
        for mode in (SEMANTIC, HYBRID):
            found = await search_context(stub, world.viewer, world.name, "car", mode=mode)
            assert (found.mode, found.fallback_reason) == (
                FULL_TEXT,
                pb.SEARCH_FALLBACK_REASON_NO_VECTOR_ENGINE,
            )
            assert source_names(found.results) == [note.name]


async def test_an_endpoint_that_never_answers_falls_back_in_time(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    embedder = ConceptEmbedder()
    async with semantic_mesh(
        monkeypatch, database_url, embedder, context_embeddings_timeout_s=0.3
    ) as (mesh, stub, domain):
        world = await indexed_world(stub, mesh, domain)
        note = await remember(stub, world.editor, world.name, "car tyres for winter")
        await ready(stub, domain, world)
        embedder.hang = asyncio.Event()
        try:
            found = await search_context(stub, world.viewer, world.name, "car", mode=HYBRID)
        finally:
            embedder.hang.set()
        assert (found.mode, found.fallback_reason) == (
            FULL_TEXT,
            pb.SEARCH_FALLBACK_REASON_EMBEDDINGS_UNAVAILABLE,
        )
        assert "timed out" in found.fallback_detail
        assert source_names(found.results) == [note.name]
