"""Search through the real embeddings client (configured by settings, as deployed)
and the test kit's local embeddings server over HTTP (``sb-concept-384``: synonyms
share a concept), on SQLite (sqlite-vec) and PostgreSQL (pgvector), items indexed by
the real indexer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.domain import ContextDomain
from tests.context.semantic.retrieval.test_search import search_context, search_memory, source_names
from tests.context.semantic.retrieval.test_search_semantic import ready
from tests.fakes.embeddings_server import FakeEmbeddings
from tests.kits.contextkit import Stub, ctx_world, remember
from tests.kits.semantickit import deployed_mesh, set_index

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

MODEL = "sb-concept-384"
FULL_TEXT = pb.SEARCH_MODE_FULL_TEXT
SEMANTIC = pb.SEARCH_MODE_SEMANTIC
HYBRID = pb.SEARCH_MODE_HYBRID


@asynccontextmanager
async def http_mesh(
    database_url: str,
) -> AsyncIterator[tuple[FakeEmbeddings, Stub, ContextDomain, Any]]:
    """A server configured as a deployment is, against the local embeddings server."""
    async with (
        FakeEmbeddings() as fake,
        deployed_mesh(database_url, fake) as (server, stub, domain),
    ):
        yield fake, stub, domain, server


async def test_over_http_a_paraphrase_is_found_hybrid_ranks_keywords_and_an_outage_falls_back(
    database_url: str,
) -> None:
    async with http_mesh(database_url) as (fake, stub, domain, mesh):
        world = await ctx_world(mesh, stub)
        other = await ctx_world(mesh, stub, "Other")
        for each in (world, other):
            await set_index(stub, each.owner, each.name, embedding_model=MODEL, dimensions=64)
        tea = await remember(stub, world.editor, world.name, "The user prefers tea over coffee")
        await remember(stub, world.editor, world.name, "The deploy failed on Friday")
        invoice = await remember(stub, world.editor, world.name, "Invoice QX-7731 was paid")
        # Nearer in meaning to the query than the invoice, but without its words.
        await remember(stub, world.editor, world.name, "billing charge for the bill")
        # The same note in another workspace never shows here.
        await remember(stub, other.editor, other.name, "The user prefers tea over coffee")
        await ready(stub, domain, world)
        await ready(stub, domain, other)

        question = "What drink does the customer like?"
        words = await search_memory(stub, world.viewer, world.name, question, mode=FULL_TEXT)
        assert list(words.results) == []
        meaning = await search_context(stub, world.viewer, world.name, question, mode=SEMANTIC)
        assert meaning.mode == SEMANTIC
        assert source_names(meaning.results)[0] == tea.name
        assert meaning.results[0].scores.similarity > 0.5
        assert all(name.startswith(world.name + "/") for name in source_names(meaning.results))

        hybrid = await search_context(stub, world.viewer, world.name, "QX-7731 payment")
        assert hybrid.mode == HYBRID
        assert source_names(hybrid.results)[0] == invoice.name
        assert hybrid.results[0].scores.full_text_rank == 1

        # The endpoint goes away: full-text, with the reason, never an error.
        await fake.close()
        down = await search_context(stub, world.viewer, world.name, "tea", mode=HYBRID)
        assert (down.mode, down.fallback_reason) == (
            FULL_TEXT,
            pb.SEARCH_FALLBACK_REASON_EMBEDDINGS_UNAVAILABLE,
        )
        assert down.fallback_detail
        assert source_names(down.results) == [tea.name]
