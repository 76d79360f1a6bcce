"""Search and retrieval keep working where a source's metadata held NaN.

Before requests holding such numbers were refused, a memory item with metadata
``{"n": NaN, "big": Infinity}`` was stored, and the indexer wrote its passage's
metadata with ``json.dumps`` as ``{"big":Infinity,"n":NaN,...}``: not JSON to SQLite
or PostgreSQL, so every metadata-filtered search of the workspace answered INTERNAL
(SearchContext in every mode, SearchMemoryItems by meaning, GetContextWindow's
retrieval). Here both leftovers of such a server are made as it made them, on SQLite
and PostgreSQL, with the real indexer on the local embeddings server:

* passages already written that way, repaired by migration 0018 when the new server
  starts (the database as an older server left it: its rows, at revision 0016);
* a stored memory item whose metadata holds NaN, indexed again: its passage's
  metadata is written with ``null``.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from google.protobuf import struct_pb2
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.auth.accounts import Accounts, ClientContext
from switchboard.auth.store import AuthStore
from switchboard.platform.security.policy import AuthMethod
from switchboard.platform.store.db import Database, alembic_config
from switchboard.platform.store.models import MemoryItemRow, SemanticChunkRow
from tests.conftest import CALL_DEADLINE_S, built
from tests.context.semantic.retrieval.test_search import (
    get_window,
    search_context,
    search_memory,
    source_names,
)
from tests.context.semantic.retrieval.test_search_semantic import indexed_world, ready
from tests.fakes.embeddings_server import FakeEmbeddings
from tests.kits.contextkit import Caller, World, create_conversation, mask, rpc
from tests.kits.semantickit import deployed_mesh

pytestmark = pytest.mark.service

#: The migration that repairs what such a server wrote.
REPAIR = "0018"
FULL_TEXT = pb.SEARCH_MODE_FULL_TEXT
SEMANTIC = pb.SEARCH_MODE_SEMANTIC
HYBRID = pb.SEARCH_MODE_HYBRID
#: The revision an older server left the database at: the one before the repair.
BEFORE = str(ScriptDirectory.from_config(alembic_config()).get_revision(REPAIR).down_revision)
#: What an older server wrote beside a passage whose source's metadata held NaN.
OLD_META = '{"big":Infinity,"n":NaN,"small":-Infinity,"topic":"heron"}'


def nan_metadata() -> bytes:
    meta = struct_pb2.Struct()
    meta.update({"topic": "heron", "n": math.nan, "big": math.inf})
    return meta.SerializeToString()


async def remember(stub: Any, world: World, parent: str, content: str) -> pb.MemoryItem:
    meta = struct_pb2.Struct()
    meta.update({"topic": "heron", "n": 1})
    item = pb.MemoryItem(kind=pb.MEMORY_KIND_FACT, content=content, metadata=meta)
    created: pb.CreateMemoryItemResponse = await rpc(
        stub.CreateMemoryItem,
        pb.CreateMemoryItemRequest(parent=parent, memory_item=item),
        world.editor,
    )
    return created.memory_item


async def every_search_works(
    stub: Any, world: World, conversation: str, item: pb.MemoryItem
) -> None:
    """Each filtered search of the issue finds ``item`` (a memory of another conversation
    than ``conversation``), and none answers INTERNAL."""
    name = item.name
    parent = name.rsplit("/memories/", 1)[0]
    for mode in (FULL_TEXT, SEMANTIC, HYBRID):
        found = await search_context(
            stub,
            world.viewer,
            world.name,
            "heron facts",
            mode=mode,
            filter="metadata.topic = heron",
        )
        assert name in source_names(found.results), (mode, found)
        others = await search_context(
            stub, world.viewer, world.name, "heron facts", mode=mode, filter="metadata.big != 5"
        )
        assert name in source_names(others.results), (mode, others)
    for mode in (SEMANTIC, HYBRID):
        memory = await search_memory(
            stub,
            world.viewer,
            parent,
            "heron facts",
            mode=mode,
            filter="metadata.topic = heron",
        )
        assert name in [r.memory_item.name for r in memory.results], (mode, memory)
    # A window retrieves by the same filtered search (in its own conversation, where
    # the item is not: what matters is that it is served, by meaning).
    window = await get_window(
        stub,
        world.viewer,
        conversation,
        2000,
        pb.RetrievalOptions(top_k=5, token_budget=500, filter="metadata.topic = heron"),
        query="heron facts",
    )
    assert window.retrieval_mode == HYBRID
    assert window.retrieval_fallback_reason == pb.SEARCH_FALLBACK_REASON_UNSPECIFIED


async def signed_in_again(mesh: Any, world: World) -> World:
    """``world`` with fresh tokens from ``mesh``, a server started anew (dev mode signs
    with a key of each start's own)."""

    async def again(caller: Caller) -> Caller:
        user = await AuthStore(mesh.shared.database).user_by_id(caller.id)
        assert user is not None
        session = await built(mesh, Accounts).start_session(
            user, AuthMethod.PASSWORD, ClientContext(address="127.0.0.1")
        )
        return Caller(caller.id, session.tokens.access_token)

    return replace(
        world,
        owner=await again(world.owner),
        editor=await again(world.editor),
        viewer=await again(world.viewer),
    )


async def chunk_metas(database: Database, source: str) -> list[Any]:
    def work(db: Session) -> list[str]:
        return list(
            db.scalars(select(SemanticChunkRow.meta).where(SemanticChunkRow.source == source))
        )

    def refuse(name: str) -> None:
        pytest.fail(f"{name} in a passage's metadata")

    # Read strictly: a NaN would fail here as it failed in SQL.
    metas = await database.run(work, write=False)
    return [json.loads(meta, parse_constant=refuse) for meta in metas]


async def test_passages_an_older_server_wrote_with_nan_are_repaired_at_start(
    database_url: str,
) -> None:
    async with FakeEmbeddings() as fake:
        async with deployed_mesh(database_url, fake) as (mesh, stub, domain):
            world = await indexed_world(stub, mesh)
            conversation = await create_conversation(stub, world.editor, world.name)
            # Another conversation's: retrieved into this one's window, not included as its own.
            other = await create_conversation(stub, world.editor, world.name)
            item = await remember(stub, world, other.name, "heron facts for the trip")
            await ready(stub, domain, world)

        # The database as an older server left it: its schema at the revision before
        # the repair (every later revision undone too, as a real downgrade does), and
        # its passage's metadata not JSON.
        database = Database(database_url, timeout_s=CALL_DEADLINE_S)
        try:
            await database.downgrade(BEFORE)

            def as_old(db: Session) -> None:
                db.execute(
                    update(SemanticChunkRow)
                    .where(SemanticChunkRow.source == item.name)
                    .values(meta=OLD_META)
                )

            await database.run(as_old, write=True)
        finally:
            await database.close()

        async with deployed_mesh(database_url, fake) as (mesh, stub, domain):
            world = await signed_in_again(mesh, world)
            assert await chunk_metas(domain.indexer.store._database, item.name) == [
                {"big": None, "n": None, "small": None, "topic": "heron"}
            ]
            await every_search_works(stub, world, conversation.name, item)


async def test_a_stored_item_whose_metadata_holds_nan_is_indexed_with_null(
    database_url: str,
) -> None:
    async with FakeEmbeddings() as fake, deployed_mesh(database_url, fake) as (mesh, stub, domain):
        world = await indexed_world(stub, mesh)
        conversation = await create_conversation(stub, world.editor, world.name)
        other = await create_conversation(stub, world.editor, world.name)
        item = await remember(stub, world, other.name, "heron facts for the trip")
        await ready(stub, domain, world)

        def stored_as_old(db: Session) -> None:
            db.execute(
                update(MemoryItemRow)
                .where(MemoryItemRow.id == item.name.rsplit("/", 1)[1])
                .values(meta=nan_metadata())
            )

        database = domain.indexer.store._database
        await database.run(stored_as_old, write=True)
        # An edit of its content indexes it again, from the row as stored.
        edited = pb.MemoryItem(name=item.name, content="heron facts for the spring trip")
        await rpc(
            stub.UpdateMemoryItem,
            pb.UpdateMemoryItemRequest(memory_item=edited, update_mask=mask("content")),
            world.editor,
        )
        await ready(stub, domain, world)
        metas = await chunk_metas(database, item.name)
        assert metas
        assert all(meta == {"big": None, "n": None, "topic": "heron"} for meta in metas)
        await every_search_works(stub, world, conversation.name, item)
