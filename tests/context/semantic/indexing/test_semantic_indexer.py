"""The semantic indexer on real databases (SQLite and PostgreSQL): what reaches the
index from the event log, exactly once, with the current text and model; waiting
for the endpoint; re-embedding; a cursor behind the log's horizon; the index's
settings and their access rules."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from sqlalchemy import delete, update

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.semantic.indexing.chunking import chunk_text
from switchboard.platform.store.models import ConversationRow, SemanticCursorRow
from tests.conftest import CALL_DEADLINE_S
from tests.context.files.test_files import upload
from tests.fakes.embeddings_server import FakeEmbeddings
from tests.kits.chunkwrites import gated_writes
from tests.kits.contextkit import (
    append,
    create_conversation,
    ctx_world,
    mask,
    refused,
    remember,
    rpc,
    search,
    violations,
)
from tests.kits.semantickit import (
    by_source,
    chunk_rows,
    get_index,
    semantic_mesh,
    set_index,
    settled,
)

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

MODEL = "sb-hash-64"
OTHER = "sb-hash-32"
DEFAULT = "sb-hash-16"
KEY_1 = f"{MODEL}/8/2"
#: How often a test looks again at a state the indexer moves.
POLL_S = 0.05


@pytest.fixture
async def embeddings() -> AsyncIterator[FakeEmbeddings]:
    async with FakeEmbeddings() as fake:
        yield fake


def embedded_texts(fake: FakeEmbeddings) -> list[str]:
    return [text for batch in fake.batches for text in batch]


async def test_memory_changes_reach_the_index_once_with_current_text(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    embedder = embeddings
    async with semantic_mesh(monkeypatch, database_url, embedder) as (mesh, stub, domain):
        world = await ctx_world(mesh, stub)
        index = await set_index(stub, world.owner, world.name, embedding_model=MODEL, dimensions=8)
        assert index.effective_model == f"{MODEL}/8"
        kept = await remember(stub, world.editor, world.name, "The deploy key rotates on Fridays")
        changed = await remember(stub, world.editor, world.name, "Lunch is at noon")
        gone = await remember(stub, world.editor, world.name, "A note to forget")
        changed.content = "Lunch moved to one o'clock"
        await rpc(
            stub.UpdateMemoryItem,
            pb.UpdateMemoryItemRequest(memory_item=changed, update_mask=mask("content")),
            world.editor,
        )
        await rpc(stub.DeleteMemoryItem, pb.DeleteMemoryItemRequest(name=gone.name), world.editor)
        await settled(domain)

        chunks = by_source(await chunk_rows(domain))
        assert set(chunks) == {kept.name, changed.name}
        assert [(c.text, c.embedding, c.owner) for c in chunks[changed.name]] == [
            ("Lunch moved to one o'clock", KEY_1, world.name)
        ]
        assert [c.text for c in chunks[kept.name]] == [kept.content]
        status = await get_index(stub, world.viewer, world.name)
        assert status.state == pb.SEMANTIC_INDEX_STATE_READY
        assert (status.indexed_count, status.pending_count, status.last_error) == (2, 0, "")

        # A repeated event (the same content written again) embeds nothing again.
        calls = len(embedder.requests)
        kept.metadata.update({"touched": True})
        await rpc(
            stub.UpdateMemoryItem,
            pb.UpdateMemoryItemRequest(memory_item=kept, update_mask=mask("metadata")),
            world.editor,
        )
        await settled(domain)
        assert len(embedder.requests) == calls
        assert len(by_source(await chunk_rows(domain))[kept.name]) == 1


async def test_messages_are_indexed_only_while_the_workspace_asks(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    embedder = embeddings
    async with semantic_mesh(monkeypatch, database_url, embedder) as (mesh, stub, domain):
        world = await ctx_world(mesh, stub)
        await set_index(stub, world.owner, world.name, embedding_model=MODEL, dimensions=8)
        chat = await create_conversation(stub, world.editor, world.name)
        before = await append(stub, world.editor, chat.name, "The staging database is in Oslo")
        await settled(domain)
        assert not [c for c in await chunk_rows(domain) if c.source_kind == "message"]

        # Switching it on enqueues the messages there are; new ones follow.
        await set_index(stub, world.owner, world.name, index_messages=True)
        after = await append(stub, world.editor, chat.name, "Production runs in Frankfurt")
        await settled(domain)
        messages = by_source([c for c in await chunk_rows(domain) if c.source_kind == "message"])
        assert set(messages) == {before.name, after.name}
        assert [c.text for c in messages[after.name]] == ["Production runs in Frankfurt"]
        assert {c.embedding for c in messages[before.name]} == {KEY_1}
        # A deleted message's passages go with it (the indexer reads its tombstone).
        gone = await append(stub, world.editor, chat.name, "The vault code is 4711")
        await settled(domain)
        assert gone.name in by_source(await chunk_rows(domain))
        await rpc(stub.DeleteMessage, pb.DeleteMessageRequest(name=gone.name), world.editor)
        await settled(domain)
        assert gone.name not in by_source(await chunk_rows(domain))

        # Off again: their passages go.
        await set_index(stub, world.owner, world.name, index_messages=False)
        await settled(domain)
        assert not [c for c in await chunk_rows(domain) if c.source_kind == "message"]

        # A deleted conversation's passages go, and come back with it.
        await set_index(stub, world.owner, world.name, index_messages=True)
        note = await remember(stub, world.editor, chat.name, "Ask Ana about the Oslo move")
        await settled(domain)
        assert note.name in by_source(await chunk_rows(domain))
        await rpc(
            stub.DeleteConversation, pb.DeleteConversationRequest(name=chat.name), world.editor
        )
        await settled(domain)
        assert await chunk_rows(domain) == []
        await rpc(
            stub.UndeleteConversation, pb.UndeleteConversationRequest(name=chat.name), world.editor
        )
        await settled(domain)
        assert set(by_source(await chunk_rows(domain))) == {before.name, after.name, note.name}


async def test_a_document_is_indexed_in_chunks_with_positions_even_without_embeddings(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    paragraphs = [
        f"Section {n}. " + " ".join(f"word{n}x{i}" for i in range(60)) + "." for n in range(12)
    ]
    text = "\n\n".join(paragraphs)
    async with semantic_mesh(monkeypatch, database_url, None, context_semantic_chunk_chars=400) as (
        mesh,
        stub,
        domain,
    ):
        world = await ctx_world(mesh, stub)
        stored = await upload(
            stub,
            world.editor,
            world.name,
            text.encode(),
            media_type="text/plain",
            display_name="notes.txt",
        )
        await settled(domain)
        chunks = by_source(await chunk_rows(domain))[stored.name]
        expected = chunk_text(text, size=400, overlap=200, max_chunks=512)
        assert len(chunks) == len(expected) > 5
        for row, piece in zip(chunks, expected, strict=True):
            assert (row.start, row.end, row.text) == (piece.start, piece.end, piece.text)
            assert text[row.start : row.end] == row.text
            assert row.embedding == ""  # full-text only: no endpoint
            assert len(row.text) <= 400
        assert chunks[0].start == 0
        assert chunks[-1].end == len(text)
        # Consecutive chunks overlap and leave no gap.
        for left, right in itertools.pairwise(chunks):
            assert right.start < left.end
        status = await get_index(stub, world.viewer, world.name)
        assert status.state == pb.SEMANTIC_INDEX_STATE_DISABLED

        await rpc(stub.DeleteFile, pb.DeleteFileRequest(name=stored.name), world.editor)
        await settled(domain)
        assert await chunk_rows(domain) == []


async def test_a_worker_stopped_between_embedding_and_writing_indexes_nothing_twice(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    embedder = embeddings
    writes = gated_writes(monkeypatch)
    async with semantic_mesh(monkeypatch, database_url, embedder) as (mesh, stub, domain):
        indexer = domain.indexer
        indexer.limits = replace(indexer.limits, claim_s=2.0)
        world = await ctx_world(mesh, stub)
        await set_index(stub, world.owner, world.name, embedding_model=MODEL, dimensions=8)
        stopped = asyncio.Event()

        def crash() -> None:
            if not stopped.is_set():
                stopped.set()
                raise RuntimeError("worker stopped before its write")

        writes.before = crash
        items = [
            await remember(stub, world.editor, world.name, f"Fact number {n} about the fleet")
            for n in range(5)
        ]
        await settled(domain)
        assert stopped.is_set()
        chunks = by_source(await chunk_rows(domain))
        assert set(chunks) == {item.name for item in items}
        for item in items:
            assert [(c.chunk_index, c.text, c.embedding) for c in chunks[item.name]] == [
                (0, item.content, KEY_1)
            ]
        # The stopped batch was embedded again once its claim expired; nothing else was.
        texts = embedded_texts(embedder)
        embedded = {item.content: texts.count(item.content) for item in items}
        assert set(embedded.values()) <= {1, 2}


async def test_an_endpoint_down_makes_the_index_wait_and_it_resumes_by_itself(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    embedder = embeddings
    await embeddings.close()  # the port refuses connections
    async with semantic_mesh(monkeypatch, database_url, embedder) as (mesh, stub, domain):
        domain.indexer.limits = replace(
            domain.indexer.limits, backoff_base_s=0.05, backoff_max_s=0.2
        )
        world = await ctx_world(mesh, stub)
        await set_index(stub, world.owner, world.name, embedding_model=MODEL, dimensions=8)
        item = await remember(stub, world.editor, world.name, "The VPN certificate expires soon")
        async with asyncio.timeout(CALL_DEADLINE_S):
            while (status := await get_index(stub, world.viewer, world.name)).state != (  # noqa: ASYNC110 - a stored state, under a deadline
                pb.SEMANTIC_INDEX_STATE_WAITING
            ):
                await asyncio.sleep(POLL_S)
        assert status.last_error
        assert (status.pending_count, status.indexed_count) == (1, 0)
        await embedder.start()  # the same port answers again
        await settled(domain)
        status = await get_index(stub, world.viewer, world.name)
        assert (status.state, status.last_error) == (pb.SEMANTIC_INDEX_STATE_READY, "")
        assert [c.source for c in await chunk_rows(domain)] == [item.name]

        # Vectors of the wrong size are refused the same way.
        embedder.corrupt_next("dimension", 1000)
        await set_index(stub, world.owner, world.name, embedding_model=OTHER)
        async with asyncio.timeout(CALL_DEADLINE_S):
            while not (status := await get_index(stub, world.viewer, world.name)).last_error:  # noqa: ASYNC110 - a stored state, under a deadline
                await asyncio.sleep(POLL_S)
        assert status.state == pb.SEMANTIC_INDEX_STATE_WAITING
        assert "dimension" in status.last_error
        # The passages under the old model stay (search keeps them) until replaced.
        assert [c.embedding for c in await chunk_rows(domain)] == [KEY_1]


async def test_a_model_change_re_embeds_everything_while_search_answers(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    embedder = embeddings
    writes = gated_writes(monkeypatch)
    async with semantic_mesh(monkeypatch, database_url, embedder) as (mesh, stub, domain):
        world = await ctx_world(mesh, stub)
        await set_index(stub, world.owner, world.name, embedding_model=MODEL, dimensions=8)
        items = [
            await remember(stub, world.editor, world.name, f"Release train {n} leaves at dawn")
            for n in range(20)
        ]
        await settled(domain)
        assert {c.embedding for c in await chunk_rows(domain)} == {KEY_1}

        release = asyncio.Event()

        async def held() -> None:
            await release.wait()

        writes.before = held
        index = await set_index(stub, world.owner, world.name, embedding_model=OTHER)
        assert index.pending_count == len(items)
        assert index.state == pb.SEMANTIC_INDEX_STATE_INDEXING
        # Mid re-embed, search answers.
        assert len(
            await search(stub, world.viewer, world.name, "release train", page_size=50)
        ) == len(items)
        release.set()
        await settled(domain)
        chunks = await chunk_rows(domain)
        assert len(chunks) == len(items)
        assert {c.embedding for c in chunks} == {f"{OTHER}/8/3"}
        status = await get_index(stub, world.viewer, world.name)
        assert (status.state, status.indexed_count) == (pb.SEMANTIC_INDEX_STATE_READY, len(items))


async def test_a_cursor_behind_the_horizon_loses_nothing(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    embedder = embeddings
    async with semantic_mesh(monkeypatch, database_url, embedder, events_retention=100) as (
        mesh,
        stub,
        domain,
    ):
        world = await ctx_world(mesh, stub)
        await set_index(stub, world.owner, world.name, embedding_model=MODEL, dimensions=8)
        first = await remember(stub, world.editor, world.name, "Indexed before the gap")
        await settled(domain)
        await domain.indexer.close()
        during = [
            await remember(stub, world.editor, world.name, f"Written while away {n}")
            for n in range(3)
        ]
        first.content = "Changed while away"
        await rpc(
            stub.UpdateMemoryItem,
            pb.UpdateMemoryItemRequest(memory_item=first, update_mask=mask("content")),
            world.editor,
        )
        # Enough events after them for the log to trim them (it trims every 1000).
        bus = mesh.shared.bus
        for _ in range(3):
            await bus.publish_many(
                [
                    events_pb2.Event(type=events_pb2.EVENT_TYPE_SECURITY, user=world.owner.name)
                    for _ in range(400)
                ]
            )
        feeder = domain.indexer.feeder
        cursor = await feeder.store.take_lease("probe", feeder.lease_until())
        await feeder.store.release_lease("probe")
        assert cursor is not None
        from switchboard.platform.errors import CursorExpired
        from switchboard.platform.events.eventlog import parse_cursor

        position = parse_cursor(cursor)
        assert position is not None
        with pytest.raises(CursorExpired):
            await bus.check_cursor(position)
        await domain.indexer.start()
        await settled(domain)
        chunks = by_source(await chunk_rows(domain))
        assert set(chunks) == {first.name, *(item.name for item in during)}
        assert [c.text for c in chunks[first.name]] == ["Changed while away"]


async def test_index_settings_follow_workspace_roles_and_are_checked(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    async with semantic_mesh(monkeypatch, database_url, embeddings) as (mesh, stub, domain):
        world = await ctx_world(mesh, stub)
        index = await get_index(stub, world.viewer, world.name)
        assert (index.name, index.embedding_model, index.dimensions, index.index_messages) == (
            f"{world.name}/semanticIndex",
            "",
            0,
            False,
        )
        assert index.state == pb.SEMANTIC_INDEX_STATE_DISABLED  # no model, no default
        assert index.etag == '"0"'

        update = pb.UpdateSemanticIndexRequest(
            semantic_index=pb.SemanticIndex(
                name=f"{world.name}/semanticIndex", embedding_model=MODEL
            ),
            update_mask=mask("embedding_model"),
        )
        await refused(
            rpc(stub.UpdateSemanticIndex, update, world.editor), grpc.StatusCode.PERMISSION_DENIED
        )
        await refused(
            rpc(
                stub.GetSemanticIndex,
                pb.GetSemanticIndexRequest(name=f"{world.name}/semanticIndex"),
                world.outsider,
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        await refused(
            rpc(stub.UpdateSemanticIndex, update, world.outsider), grpc.StatusCode.NOT_FOUND
        )

        bad = pb.UpdateSemanticIndexRequest(
            semantic_index=pb.SemanticIndex(
                name=f"{world.name}/semanticIndex", embedding_model="bad model!", dimensions=2001
            ),
            update_mask=mask("embedding_model", "dimensions"),
        )
        error = await refused(
            rpc(stub.UpdateSemanticIndex, bad, world.owner), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert set(violations(error)) >= {
            "semantic_index.embedding_model",
            "semantic_index.dimensions",
        }

        stored = (await rpc(stub.UpdateSemanticIndex, update, world.owner)).semantic_index
        assert (stored.etag, stored.embedding_model) == ('"1"', MODEL)
        stale = pb.UpdateSemanticIndexRequest(
            semantic_index=pb.SemanticIndex(
                name=f"{world.name}/semanticIndex", index_messages=True, etag='"0"'
            ),
            update_mask=mask("index_messages"),
        )
        await refused(rpc(stub.UpdateSemanticIndex, stale, world.owner), grpc.StatusCode.ABORTED)
        del domain, update


async def test_the_cursor_advances_only_by_compare_and_set(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    """A feeder whose lease was taken over writes nothing (its feed is refused)."""
    async with semantic_mesh(monkeypatch, database_url, embeddings) as (mesh, stub, domain):
        await ctx_world(mesh, stub)
        await settled(domain)
        store = domain.indexer.store

        def moved(db: object) -> None:
            db.execute(update(SemanticCursorRow).values(holder="another", lease_until=None))  # type: ignore[attr-defined]

        await store._database.run(moved, write=True)
        fed = await domain.indexer.feeder.store.advance(
            "me",
            "",
            "1-0",
            domain.indexer.feeder.lease_until(),
            store.feeding(lambda _: [], []),
        )
        assert fed is None


@pytest.mark.parametrize("configured", [False, True])
async def test_whether_semantic_search_is_on_is_said_once_at_start(
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    configured: bool,
    embeddings: FakeEmbeddings,
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.context.semantic")
    embedder = embeddings if configured else None
    async with semantic_mesh(monkeypatch, database_url, embedder) as (mesh, stub, _domain):
        world = await ctx_world(mesh, stub)
        await remember(stub, world.editor, world.name, "Something to index")
    said = [
        record.getMessage()
        for record in caplog.records
        if record.name == "switchboard.context.semantic"
        and "semantic search is" in record.getMessage()
    ]
    assert len(said) == 1, said
    if configured:
        assert said[0].startswith("semantic search is on (")
        assert ("sqlite-vec" if "sqlite" in database_url else "pgvector") in said[0]
    else:
        assert said[0].startswith("no embeddings endpoint is configured")


async def test_a_users_own_memory_is_indexed_under_the_servers_default_model(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    async with semantic_mesh(
        monkeypatch,
        database_url,
        embeddings,
        context_embeddings_model=DEFAULT,
        context_embeddings_dimensions=8,
    ) as (mesh, stub, domain):
        world = await ctx_world(mesh, stub)
        mine = await remember(stub, world.viewer, world.viewer.name, "I prefer tea to coffee")
        await settled(domain)
        [chunk] = await chunk_rows(domain)
        assert (chunk.source, chunk.owner, chunk.embedding) == (
            mine.name,
            world.viewer.name,
            f"{DEFAULT}/8/1",
        )
        index = await get_index(stub, world.viewer, world.name)
        assert index.effective_model == f"{DEFAULT}/8"
        assert index.state == pb.SEMANTIC_INDEX_STATE_READY


async def test_passages_indexed_without_embeddings_get_vectors_once_they_are_configured(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    async with semantic_mesh(monkeypatch, database_url, None) as (mesh, stub, domain):
        world = await ctx_world(mesh, stub)
        stored = await upload(
            stub,
            world.editor,
            world.name,
            b"The harbour crane is serviced every March.",
            media_type="text/plain",
            display_name="crane.txt",
        )
        note = await remember(stub, world.editor, world.name, "Cranes need a permit")
        await settled(domain)
        assert [(c.source, c.embedding) for c in await chunk_rows(domain)] == [(stored.name, "")]
    # The same database, now with an endpoint and a default model: the replica that
    # takes the lease reconciles what was indexed without them.
    async with semantic_mesh(
        monkeypatch,
        database_url,
        embeddings,
        context_embeddings_model=DEFAULT,
        context_embeddings_dimensions=8,
    ) as (mesh, stub, domain):
        await settled(domain)
        chunks = by_source(await chunk_rows(domain))
        assert set(chunks) == {stored.name, note.name}
        assert {c.embedding for rows in chunks.values() for c in rows} == {f"{DEFAULT}/8/1"}


async def test_passages_of_a_conversation_purged_without_an_event_are_removed(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    async with semantic_mesh(monkeypatch, database_url, embeddings) as (mesh, stub, domain):
        world = await ctx_world(mesh, stub)
        await set_index(
            stub, world.owner, world.name, embedding_model=MODEL, dimensions=8, index_messages=True
        )
        chat = await create_conversation(stub, world.editor, world.name)
        await append(stub, world.editor, chat.name, "Rotate the keys on Friday")
        await remember(stub, world.editor, chat.name, "Keys rotate weekly")
        kept = await remember(stub, world.editor, world.name, "The office opens at nine")
        await settled(domain)
        assert len(await chunk_rows(domain)) == 3

        # A purge deletes the row outright and says nothing in the log.
        await domain.indexer.close()

        def purge(db: Any) -> None:
            db.execute(
                delete(ConversationRow).where(ConversationRow.id == chat.name.rsplit("/", 1)[1])
            )

        await domain.indexer.store._database.run(purge, write=True)
        await domain.indexer.start()
        await settled(domain)
        assert [c.source for c in await chunk_rows(domain)] == [kept.name]


async def test_the_effective_model_names_the_dimensions_the_model_answered_with(
    monkeypatch: pytest.MonkeyPatch, database_url: str, embeddings: FakeEmbeddings
) -> None:
    """An index that asks no dimensions (0: the model's own) says how many the model's
    vectors have once it answered, and a process that has embedded nothing yet reads
    them from the stored vectors."""
    async with semantic_mesh(monkeypatch, database_url, embeddings) as (mesh, stub, domain):
        world = await ctx_world(mesh, stub)
        index = await set_index(stub, world.owner, world.name, embedding_model=MODEL)
        # Nothing embedded yet: the count is not known.
        assert index.effective_model == f"{MODEL}/0"
        await remember(stub, world.editor, world.name, "The deploy key rotates on Fridays")
        await settled(domain)
        status = await get_index(stub, world.viewer, world.name)
        assert status.indexed_count == 1
        # sb-hash-64 answers 64 numbers a vector when none are asked.
        assert status.effective_model == f"{MODEL}/64"
    # The same database in a process whose embeddings client has learned nothing.
    async with semantic_mesh(monkeypatch, database_url, embeddings) as (mesh, stub, domain):
        requests = len(embeddings.requests)
        again = await domain.semantic.get(f"{world.name}/semanticIndex")
        assert again.effective_model == f"{MODEL}/64"
        assert len(embeddings.requests) == requests  # read, not asked of the endpoint
