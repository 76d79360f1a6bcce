"""Semantic and hybrid search end to end, on SQLite (sqlite-vec) and PostgreSQL
(pgvector): the server configured as a deployment is (``SWITCHBOARD_CONTEXT_EMBEDDINGS_URL``),
embedding through the real client on the test kit's local embeddings server over HTTP
(``sb-concept-384``: words of one meaning share a concept), items indexed by the real
indexer, and the fallbacks when a query cannot be embedded (the endpoint down or slow,
a budget with no room, no vector engine).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.context import build
from switchboard.context.domain import ContextDomain
from switchboard.platform.store.vectors import VectorSupport
from tests.conftest import CALL_DEADLINE_S
from tests.context.semantic.retrieval.test_search import search_context, search_memory, source_names
from tests.fakes.embeddings_server import CONCEPT_MODEL, FakeEmbeddings
from tests.kits.contextkit import (
    Stub,
    append,
    create_conversation,
    ctx_world,
    refused,
    remember,
    rpc,
)
from tests.kits.modulekit import module_database_url_fixture
from tests.kits.semantickit import (
    by_source,
    chunk_rows,
    deployed_mesh,
    get_index,
    set_index,
    settled,
)

# The tests that leave the server and its embeddings endpoint as they found them share
# one of each per backend (starting them per test was most of those tests' time), each
# in workspaces of its own; a test that stops the indexer or the endpoint, or that needs
# other settings, starts its own.
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

MODEL = CONCEPT_MODEL
DIMS = 64
FULL_TEXT = pb.SEARCH_MODE_FULL_TEXT
SEMANTIC = pb.SEARCH_MODE_SEMANTIC
HYBRID = pb.SEARCH_MODE_HYBRID
NOTE = "The user prefers tea over coffee"
QUESTION = "What drink does the customer like?"


@asynccontextmanager
async def semantic_mesh(
    database_url: str, **overrides: object
) -> AsyncIterator[tuple[FakeEmbeddings, Any, Stub, ContextDomain]]:
    """A server embedding through the local embeddings server, configured by settings."""
    async with (
        FakeEmbeddings() as fake,
        deployed_mesh(database_url, fake, **overrides) as (
            server,
            stub,
            domain,
        ),
    ):
        yield fake, server, stub, domain


module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_mesh(
    module_database_url: str,
) -> AsyncIterator[tuple[FakeEmbeddings, Any, Stub, ContextDomain]]:
    async with semantic_mesh(module_database_url) as served:
        yield served


async def indexed_world(stub: Any, mesh: Any, name: str = "World") -> Any:
    world = await ctx_world(mesh, stub, name)
    await set_index(stub, world.owner, world.name, embedding_model=MODEL, dimensions=DIMS)
    return world


async def ready(stub: Any, domain: Any, world: Any, timeout_s: float = CALL_DEADLINE_S) -> None:
    """Every item indexed: the indexer settled and GetSemanticIndex says READY."""
    async with asyncio.timeout(timeout_s):
        while True:
            await settled(domain)
            index = await get_index(stub, world.viewer, world.name)
            if index.state == pb.SEMANTIC_INDEX_STATE_READY:
                return
            await asyncio.sleep(0.05)  # not yet: polling a stored state, under a deadline


async def test_a_paraphrase_is_found_by_meaning_and_missed_by_words(
    shared_mesh: tuple[FakeEmbeddings, Any, Stub, ContextDomain],
) -> None:
    _fake, mesh, stub, domain = shared_mesh
    world = await indexed_world(stub, mesh)
    note = await remember(stub, world.editor, world.name, NOTE)
    await remember(stub, world.editor, world.name, "Lunch is at noon")
    await ready(stub, domain, world)
    words = await search_memory(stub, world.viewer, world.name, QUESTION, mode=FULL_TEXT)
    assert list(words.results) == []
    meaning = await search_memory(stub, world.viewer, world.name, QUESTION, mode=SEMANTIC)
    assert meaning.mode == SEMANTIC
    assert meaning.fallback_reason == pb.SEARCH_FALLBACK_REASON_UNSPECIFIED
    assert meaning.results[0].memory_item.name == note.name
    scores = meaning.results[0].scores
    assert scores.semantic_rank == 1
    assert 0.5 < scores.similarity <= 1.0
    assert not scores.HasField("full_text_rank")
    # Unspecified is hybrid once the index is configured.
    default = await search_context(stub, world.viewer, world.name, QUESTION)
    assert default.mode == HYBRID
    assert source_names(default.results)[0] == note.name


async def test_hybrid_ranks_an_exact_keyword_match_first(
    shared_mesh: tuple[FakeEmbeddings, Any, Stub, ContextDomain],
) -> None:
    _fake, mesh, stub, domain = shared_mesh
    world = await indexed_world(stub, mesh)
    exact = await remember(stub, world.editor, world.name, "invoice zx81 payment received")
    # Near the query in meaning (the invoice concept), but sharing none of its words.
    for text in ("the bill was paid", "billing charge for the bill", "pay the bill in full"):
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
    shared_mesh: tuple[FakeEmbeddings, Any, Stub, ContextDomain],
) -> None:
    _fake, mesh, stub, domain = shared_mesh
    mine = await indexed_world(stub, mesh, "Mine")
    theirs = await indexed_world(stub, mesh, "Theirs")
    own = await remember(stub, mine.editor, mine.name, NOTE)
    other = await remember(stub, theirs.editor, theirs.name, NOTE)
    conversation = await create_conversation(stub, theirs.editor, theirs.name)
    await append(stub, theirs.editor, conversation.name, NOTE)
    await ready(stub, domain, mine)
    await ready(stub, domain, theirs)
    for mode in (SEMANTIC, HYBRID):
        found = await search_context(stub, mine.viewer, mine.name, QUESTION, mode=mode)
        assert found.mode == mode
        assert source_names(found.results) == [own.name]
        memory = await search_memory(stub, mine.viewer, mine.name, "tea drinks", mode=mode)
        assert [r.memory_item.name for r in memory.results] == [own.name]
        found = await search_context(stub, theirs.viewer, theirs.name, QUESTION, mode=mode)
        assert other.name in source_names(found.results)
        assert own.name not in source_names(found.results)
        await refused(
            search_context(stub, mine.outsider, mine.name, "tea", mode=mode),
            grpc.StatusCode.NOT_FOUND,
        )


async def test_a_deleted_item_is_never_returned_even_with_its_chunks_left(
    database_url: str,
) -> None:
    async with semantic_mesh(database_url) as (_fake, mesh, stub, domain):
        world = await indexed_world(stub, mesh)
        conversation = await create_conversation(stub, world.editor, world.name)
        kept = await remember(stub, world.editor, world.name, "she drives a car to work")
        gone = await remember(stub, world.editor, conversation.name, "a vehicle for the city")
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


async def test_pages_by_meaning_are_the_whole_ranking_cut_and_survive_deleted_leaders(
    database_url: str,
) -> None:
    # A page by meaning asks the index only about as deep as the page: walking the pages
    # gives the one long ranking, and when the leaders are gone (deleted, their passages
    # still there for the indexer) the page is still full, from a deeper ask.
    async with semantic_mesh(database_url) as (_fake, mesh, stub, domain):
        world = await indexed_world(stub, mesh)
        for i in range(40):
            # Ever more words beside the one the query shares: ever less alike.
            words = " ".join(f"filler{i}w{j}" for j in range(i + 1))
            await remember(stub, world.editor, world.name, f"tea {words}")
        await ready(stub, domain, world)
        whole = await search_context(
            stub, world.viewer, world.name, "tea", mode=SEMANTIC, page_size=50
        )
        ranked = source_names(whole.results)
        assert len(ranked) == 40
        assert not whole.next_page_token
        walked: list[str] = []
        token = ""
        while True:
            page = await search_context(
                stub, world.viewer, world.name, "tea", mode=SEMANTIC, page_size=5, page_token=token
            )
            assert page.mode == SEMANTIC
            walked += source_names(page.results)
            token = page.next_page_token
            if not token:
                break
        assert walked == ranked
        await domain.indexer.close()
        for name in ranked[:18]:
            await rpc(stub.DeleteMemoryItem, pb.DeleteMemoryItemRequest(name=name), world.editor)
        first = await search_context(
            stub, world.viewer, world.name, "tea", mode=SEMANTIC, page_size=5
        )
        assert source_names(first.results) == ranked[18:23]
        assert first.next_page_token
        memory = await search_memory(stub, world.viewer, world.name, "tea", mode=SEMANTIC)
        assert [r.memory_item.name for r in memory.results] == ranked[18:28]


async def test_an_endpoint_down_or_a_budget_without_room_falls_back_to_full_text(
    database_url: str,
) -> None:
    async with semantic_mesh(database_url) as (fake, mesh, stub, domain):
        world = await indexed_world(stub, mesh)
        note = await remember(stub, world.editor, world.name, "tea and coffee for the office")
        await ready(stub, domain, world)
        words = await search_memory(stub, world.viewer, world.name, "coffee", mode=FULL_TEXT)
        assert [r.memory_item.name for r in words.results] == [note.name]

        async def falls_back(reason: int, detail: str) -> None:
            for mode in (pb.SEARCH_MODE_UNSPECIFIED, SEMANTIC, HYBRID):
                found = await search_memory(stub, world.viewer, world.name, "coffee", mode=mode)
                assert (found.mode, found.fallback_reason) == (FULL_TEXT, reason)
                assert detail in found.fallback_detail
                assert list(found.results) == list(words.results)
                context = await search_context(
                    stub, world.viewer, world.name, "tea for everyone", mode=mode
                )
                assert (context.mode, context.fallback_reason) == (FULL_TEXT, reason)
                assert source_names(context.results) == [note.name]

        # A budget of the whole workspace with no room for the query's embedding: the
        # query is refused before it is sent (the ledger's reservation, as for a model call).
        async with aio.insecure_channel(mesh.address) as channel:
            budgets = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
            tiny = await budgets.CreateBudget(
                dpb.CreateBudgetRequest(
                    parent=world.name,
                    budget_id="tiny",
                    budget=dpb.Budget(
                        display_name="Tiny",
                        scope=world.name,
                        period=dpb.BUDGET_PERIOD_DAY,
                        input_token_limit=1,
                    ),
                ),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
            sent = len(fake.requests)
            await falls_back(pb.SEARCH_FALLBACK_REASON_BUDGET_EXHAUSTED, "no room")
            assert len(fake.requests) == sent
            await budgets.DeleteBudget(
                dpb.DeleteBudgetRequest(name=tiny.budget.name),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
        # The budget gone, the endpoint goes away.
        await fake.close()
        await falls_back(pb.SEARCH_FALLBACK_REASON_EMBEDDINGS_UNAVAILABLE, "could not be embedded")


async def test_window_retrieval_by_meaning(
    shared_mesh: tuple[FakeEmbeddings, Any, Stub, ContextDomain],
) -> None:
    _fake, mesh, stub, domain = shared_mesh
    world = await indexed_world(stub, mesh)
    note = await remember(stub, world.editor, world.name, NOTE)
    conversation = await create_conversation(stub, world.editor, world.name)
    await append(stub, world.editor, conversation.name, QUESTION)
    await ready(stub, domain, world)
    response = await stub.GetContextWindow(
        pb.GetContextWindowRequest(
            conversation=conversation.name,
            token_budget=500,
            retrieval=pb.RetrievalOptions(top_k=3, token_budget=100),
        ),
        metadata=world.viewer.md,
        timeout=CALL_DEADLINE_S,
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
    # The start-up detection's answer for a database without an engine (a real
    # PostgreSQL without pgvector: tests/platform/store/test_no_vector_engine.py); here on
    # both backends, for SearchContext in each mode that needs vectors.
    async def no_engine(database: object) -> VectorSupport:
        return VectorSupport(False, reason="no vector engine in this database")

    monkeypatch.setattr(build, "vector_support", no_engine)
    async with semantic_mesh(database_url) as (fake, mesh, stub, _domain):
        world = await indexed_world(stub, mesh)
        note = await remember(stub, world.editor, world.name, "tea for the office")
        default = await search_memory(stub, world.viewer, world.name, "tea")
        assert (default.mode, default.fallback_reason) == (
            FULL_TEXT,
            pb.SEARCH_FALLBACK_REASON_UNSPECIFIED,
        )
        for mode in (SEMANTIC, HYBRID):
            found = await search_context(stub, world.viewer, world.name, "tea", mode=mode)
            assert (found.mode, found.fallback_reason) == (
                FULL_TEXT,
                pb.SEARCH_FALLBACK_REASON_NO_VECTOR_ENGINE,
            )
            assert source_names(found.results) == [note.name]
        assert fake.requests == []


async def test_an_endpoint_that_never_answers_falls_back_in_time(database_url: str) -> None:
    async with semantic_mesh(database_url, context_embeddings_timeout_s=0.3) as (
        fake,
        mesh,
        stub,
        domain,
    ):
        world = await indexed_world(stub, mesh)
        note = await remember(stub, world.editor, world.name, "tea for the office")
        await ready(stub, domain, world)
        fake.delay_s = 30.0  # far past the query's wait
        found = await search_context(stub, world.viewer, world.name, "tea", mode=HYBRID)
        assert (found.mode, found.fallback_reason) == (
            FULL_TEXT,
            pb.SEARCH_FALLBACK_REASON_EMBEDDINGS_UNAVAILABLE,
        )
        assert "timed out" in found.fallback_detail
        assert source_names(found.results) == [note.name]
