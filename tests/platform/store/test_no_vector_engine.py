"""A deployment's PostgreSQL without pgvector, for real: a server of Debian's own
PostgreSQL (``/usr/lib/postgresql/<major>/bin``, no pgvector), not the suite's
pgserver PostgreSQL 16 (which has it). The context service starts on it with an
embeddings endpoint configured, says once that semantic search is off and why, and
keeps working full-text only.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.platform.store.vectors import FULL_TEXT_ONLY
from tests.context.semantic.retrieval.test_search import search_memory
from tests.fakes.embeddings_server import FakeEmbeddings
from tests.infra.postgres import (
    PostgresServer,
    PostgresUnavailable,
    _admin,
    debian_bin_dir,
    running_postgres,
)
from tests.kits.contextkit import ctx_world, mask, remember, rpc
from tests.kits.semantickit import deployed_mesh, get_index, set_index, settled

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

MODEL = "sb-hash-64"
FULL_TEXT = pb.SEARCH_MODE_FULL_TEXT
SEMANTIC = pb.SEARCH_MODE_SEMANTIC
SEMANTIC_LOG = "switchboard.context.semantic"
NO_PGVECTOR = "the PostgreSQL server has no pgvector extension"


@pytest.fixture(scope="module")
def debian_postgres() -> Iterator[PostgresServer]:
    """A throwaway cluster of Debian's PostgreSQL, on a free port, for this module."""
    try:
        with running_postgres(debian_bin_dir()) as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
async def no_vector_url(debian_postgres: PostgresServer) -> AsyncIterator[str]:
    """A fresh, empty database on that server (the service migrates it), dropped afterwards."""
    name = f"test_{uuid.uuid4().hex}"
    await _admin(debian_postgres, f'CREATE DATABASE "{name}"')
    try:
        yield debian_postgres.url(name)
    finally:
        await _admin(debian_postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_without_pgvector_the_service_says_so_once_and_searches_full_text(
    no_vector_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # Configured as a deployment is: an endpoint, reachable on loopback.
    async with (
        FakeEmbeddings() as fake,
        deployed_mesh(no_vector_url, fake) as (
            server,
            stub,
            domain,
        ),
    ):
        world = await ctx_world(server, stub)
        await set_index(stub, world.owner, world.name, embedding_model=MODEL, dimensions=64)
        index = await get_index(stub, world.viewer, world.name)
        assert index.state == pb.SEMANTIC_INDEX_STATE_DISABLED

        # Memory writes work: create, update, delete.
        tea = await remember(stub, world.editor, world.name, "The user prefers jasmine tea")
        gone = await remember(stub, world.editor, world.name, "Scratch note to delete")
        edited = pb.MemoryItem(name=tea.name, content="The user prefers oolong tea")
        updated = await rpc(
            stub.UpdateMemoryItem,
            pb.UpdateMemoryItemRequest(memory_item=edited, update_mask=mask("content")),
            world.editor,
        )
        assert updated.memory_item.content == "The user prefers oolong tea"
        await rpc(stub.DeleteMemoryItem, pb.DeleteMemoryItemRequest(name=gone.name), world.editor)
        await settled(domain)

        semantic = await search_memory(stub, world.viewer, world.name, "oolong tea", mode=SEMANTIC)
        assert (semantic.mode, semantic.fallback_reason) == (
            FULL_TEXT,
            pb.SEARCH_FALLBACK_REASON_NO_VECTOR_ENGINE,
        )
        assert "no vector engine" in semantic.fallback_detail
        assert [r.memory_item.name for r in semantic.results] == [tea.name]

        default = await search_memory(stub, world.viewer, world.name, "oolong tea")
        assert (default.mode, default.fallback_reason) == (
            FULL_TEXT,
            pb.SEARCH_FALLBACK_REASON_UNSPECIFIED,
        )
        assert default.fallback_detail == ""
        assert [r.memory_item.name for r in default.results] == [tea.name]
        deleted = await search_memory(stub, world.viewer, world.name, "scratch")
        assert list(deleted.results) == []

        index = await get_index(stub, world.viewer, world.name)
        assert index.state == pb.SEMANTIC_INDEX_STATE_DISABLED
        # Nothing was sent to the endpoint: with no engine there is nothing to embed for.
        assert fake.requests == []

    said = [
        record
        for record in caplog.records
        if record.name == SEMANTIC_LOG and record.getMessage().endswith(FULL_TEXT_ONLY)
    ]
    assert [r.getMessage() for r in said] == [
        f"{NO_PGVECTOR} (install pgvector 0.6 or later on the server: "
        f"https://github.com/pgvector/pgvector); {FULL_TEXT_ONLY}"
    ]
    assert said[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if "semantic search is on" in r.getMessage()]
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
