"""A search by meaning says when the index is behind (issue 67 follow-up): items written
but not yet embedded are not found by meaning, and the response says how many wait
(``pending_index_count``, ``index_lag_detail``), as does a window's retrieval
(``retrieval_pending_index_count``). The server is configured as a deployment is,
embedding through the real client on the local embeddings server; the indexer's worker
is held between embedding and writing (by the chunk store's batch write:
``tests/kits/chunkwrites.py``), so the items stay pending for as long as the test looks,
without sleeping."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.domain import ContextDomain
from tests.context.semantic.retrieval.test_search import get_window, search_context, search_memory
from tests.context.semantic.retrieval.test_search_semantic import (
    FULL_TEXT,
    HYBRID,
    NOTE,
    QUESTION,
    SEMANTIC,
    indexed_world,
    ready,
    semantic_mesh,
)
from tests.kits.chunkwrites import gated_writes
from tests.kits.contextkit import Stub, create_conversation, remember
from tests.kits.semantickit import get_index

pytestmark = [pytest.mark.service, pytest.mark.asyncio]


async def pending_reaches(
    stub: Stub, domain: ContextDomain, world: Any, count: int, timeout_s: float = 30.0
) -> None:
    """Wait until the index counts ``count`` sources waiting (the feeder has read the
    writes' events; the held worker cannot finish them)."""
    async with asyncio.timeout(timeout_s):
        while (await get_index(stub, world.viewer, world.name)).pending_count != count:  # noqa: ASYNC110 - a stored state, under a deadline
            await asyncio.sleep(0.05)


async def test_a_search_by_meaning_says_how_many_items_are_not_yet_indexed(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    writes = gated_writes(monkeypatch)
    async with semantic_mesh(database_url) as (_fake, mesh, stub, domain):
        world = await indexed_world(stub, mesh)
        conversation = await create_conversation(stub, world.editor, world.name)
        release = asyncio.Event()

        async def held() -> None:
            await release.wait()

        writes.before = held
        try:
            note = await remember(stub, world.editor, world.name, NOTE)
            for text in ("Lunch is at noon", "The office closes on Fridays"):
                await remember(stub, world.editor, world.name, text)
            await pending_reaches(stub, domain, world, 3)

            for mode in (SEMANTIC, HYBRID):
                found = await search_context(stub, world.viewer, world.name, QUESTION, mode=mode)
                assert found.mode == mode
                assert found.fallback_reason == pb.SEARCH_FALLBACK_REASON_UNSPECIFIED
                assert (found.pending_index_count, found.index_lag_detail) == (
                    3,
                    "3 items not yet indexed",
                )
                memory = await search_memory(stub, world.viewer, world.name, QUESTION, mode=mode)
                assert (memory.mode, memory.pending_index_count) == (mode, 3)
                assert memory.index_lag_detail == "3 items not yet indexed"
                assert memory.fallback_detail == ""
            # Not found by meaning yet: that is what the count explains.
            meaning = await search_context(stub, world.viewer, world.name, QUESTION, mode=SEMANTIC)
            assert note.name not in [r.memory_item.name for r in meaning.results]
            # A search by words never says it (its own lag is not this field's).
            for words in (
                await search_context(stub, world.viewer, world.name, "lunch", mode=FULL_TEXT),
                await search_memory(stub, world.viewer, world.name, "lunch", mode=FULL_TEXT),
            ):
                assert words.mode == FULL_TEXT
                assert (words.pending_index_count, words.index_lag_detail) == (0, "")
            # A window's retrieval by meaning says it too; by words it does not.
            options = pb.RetrievalOptions(top_k=5, token_budget=200, mode=HYBRID)
            window = await get_window(
                stub, world.viewer, conversation.name, 400, options, query=QUESTION
            )
            assert (window.retrieval_mode, window.retrieval_pending_index_count) == (HYBRID, 3)
            options = pb.RetrievalOptions(top_k=5, token_budget=200, mode=FULL_TEXT)
            window = await get_window(
                stub, world.viewer, conversation.name, 400, options, query=QUESTION
            )
            assert window.retrieval_pending_index_count == 0
        finally:
            release.set()

        await ready(stub, domain, world)
        found = await search_context(stub, world.viewer, world.name, QUESTION, mode=SEMANTIC)
        assert found.results[0].memory_item.name == note.name
        assert (found.pending_index_count, found.index_lag_detail) == (0, "")
        memory = await search_memory(stub, world.viewer, world.name, QUESTION, mode=HYBRID)
        assert (memory.pending_index_count, memory.index_lag_detail) == (0, "")
        options = pb.RetrievalOptions(top_k=5, token_budget=200, mode=SEMANTIC)
        window = await get_window(stub, world.viewer, conversation.name, 400, options, QUESTION)
        assert window.retrieval_pending_index_count == 0


async def test_one_item_waiting_is_said_in_the_singular(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    writes = gated_writes(monkeypatch)
    async with semantic_mesh(database_url) as (_fake, mesh, stub, domain):
        world = await indexed_world(stub, mesh)
        release = asyncio.Event()

        async def held() -> None:
            await release.wait()

        writes.before = held
        try:
            await remember(stub, world.editor, world.name, NOTE)
            await pending_reaches(stub, domain, world, 1)
            found = await search_context(stub, world.viewer, world.name, QUESTION)
            assert found.mode == HYBRID
            assert (found.pending_index_count, found.index_lag_detail) == (
                1,
                "1 item not yet indexed",
            )
        finally:
            release.set()
