"""Search by mode with filters and scores (SearchContext, SearchMemoryItems) and a
context window's retrieval, end to end on SQLite and on a real PostgreSQL server.

These run without an embeddings endpoint (full-text, and the NOT_CONFIGURED
fallback); chunks of messages and documents are written through the chunk store
as the indexer writes them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from sqlalchemy import update

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.semantic.indexing.chunkstore import ChunkStore
from switchboard.context.semantic.ports import ChunkRecord, SourceKind
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import FileRow, MemoryItemRow
from tests.conftest import CALL_DEADLINE_S, make_settings, started
from tests.kits.contextkit import (
    Caller,
    Stub,
    World,
    append,
    create_conversation,
    ctx_world,
    refused,
    remember,
    struct,
    stub_fixture,
    text_message,
    violations,
)
from tests.kits.modulekit import module_channel_fixture, module_database_url_fixture

# One server per backend for the module (starting one per test was most of the module's
# time); each test searches a workspace of its own, whose users are its own too.
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FULL_TEXT = pb.SEARCH_MODE_FULL_TEXT
SEMANTIC = pb.SEARCH_MODE_SEMANTIC
HYBRID = pb.SEARCH_MODE_HYBRID
RETRIEVED = pb.CONTEXT_ITEM_REASON_RETRIEVED
OVER_BUDGET = pb.CONTEXT_ITEM_REASON_OVER_BUDGET


module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(module_database_url: str) -> AsyncIterator[SwitchboardServer]:
    async with started(make_settings(database_url=module_database_url)) as server:
        yield server


channel, stub = module_channel_fixture, stub_fixture


@pytest_asyncio.fixture(loop_scope="module")
async def world(mesh: SwitchboardServer, stub: Stub) -> World:
    """A workspace of this test's own, with users of its own in each role."""
    return await ctx_world(mesh, stub)


async def search_context(
    stub: Stub,
    caller: Caller,
    parent: str,
    query: str,
    *,
    mode: int = 0,
    filter: str = "",
    page_size: int = 0,
    page_token: str = "",
) -> pb.SearchContextResponse:
    response: pb.SearchContextResponse = await stub.SearchContext(
        pb.SearchContextRequest(
            parent=parent,
            query=query,
            mode=mode,  # type: ignore[arg-type]
            filter=filter,
            page_size=page_size,
            page_token=page_token,
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response


async def search_memory(
    stub: Stub, caller: Caller, parent: str, query: str, *, mode: int = 0, filter: str = ""
) -> pb.SearchMemoryItemsResponse:
    response: pb.SearchMemoryItemsResponse = await stub.SearchMemoryItems(
        pb.SearchMemoryItemsRequest(
            parent=parent,
            query=query,
            mode=mode,  # type: ignore[arg-type]
            filter=filter,
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response


def source_names(results: Any) -> list[str]:
    names = []
    for result in results:
        which = result.WhichOneof("source")
        if which == "memory_item":
            names.append(result.memory_item.name)
        elif which == "message":
            names.append(result.message.name)
        else:
            names.append(f"{result.document_chunk.file}#{result.document_chunk.chunk_index}")
    return names


async def index_message(mesh: Any, message: pb.Message, text: str) -> None:
    """The message's chunk, as the indexer writes it (full-text only: no endpoint)."""
    parts = message.name.split("/")
    await chunks(mesh).replace_source(
        "message",
        message.name,
        [
            record(
                parts[1],
                "message",
                message.name,
                text,
                label="user",
                conversation_id=parts[3],
            )
        ],
        None,
        "",
        0,
    )


def chunks(mesh: Any) -> ChunkStore:
    return ChunkStore(mesh.shared.database)


def record(
    workspace_id: str,
    kind: SourceKind,
    source: str,
    text: str,
    *,
    index: int = 0,
    start: int = 0,
    label: str = "",
    conversation_id: str | None = None,
) -> ChunkRecord:
    return ChunkRecord(
        owner=f"workspaces/{workspace_id}",
        source_kind=kind,
        source=source,
        chunk_index=index,
        start_offset=start,
        end_offset=start + len(text),
        text=text,
        created_at=dt.datetime.now(dt.UTC),
        label=label,
        conversation_id=conversation_id,
        workspace_id=workspace_id,
    )


async def add_document(mesh: Any, workspace_id: str, file_id: str, passages: list[str]) -> str:
    """A ready document file of the workspace and its chunks (one per passage)."""
    text = "\n".join(passages)
    stamp = dt.datetime.now(dt.UTC)
    async with mesh.shared.database.sessions() as db, db.begin():
        db.add(
            FileRow(
                id=file_id,
                workspace_id=workspace_id,
                display_name=f"{file_id}.txt",
                media_type="text/plain",
                size_bytes=len(text),
                sha256=hashlib.sha256(text.encode()).hexdigest(),
                kind="document",
                text_state="ready",
                text=text,
                created_at=stamp,
                updated_at=stamp,
            )
        )
    name = f"workspaces/{workspace_id}/files/{file_id}"
    records, start = [], 0
    for index, passage in enumerate(passages):
        records.append(
            record(
                workspace_id,
                "document",
                name,
                passage,
                index=index,
                start=start,
                label="text/plain",
            )
        )
        start += len(passage) + 1
    await chunks(mesh).replace_source("document", name, records, None, "", 0)
    return name


# -- modes and fallbacks --------------------------------------------------------------------


async def test_without_embeddings_search_is_full_text_and_semantic_falls_back(
    stub: Stub, world: World
) -> None:
    first = await remember(stub, world.editor, world.name, "the otter sleeps on the riverbank")
    second = await remember(stub, world.editor, world.name, "an otter eats fish")
    default = await search_memory(stub, world.viewer, world.name, "otter riverbank")
    assert default.mode == FULL_TEXT
    assert default.fallback_reason == pb.SEARCH_FALLBACK_REASON_UNSPECIFIED
    assert default.fallback_detail == ""
    assert [r.memory_item.name for r in default.results] == [first.name, second.name]
    assert [r.scores.full_text_rank for r in default.results] == [1, 2]
    assert not default.results[0].scores.HasField("semantic_rank")
    for mode in (SEMANTIC, HYBRID):
        asked = await search_memory(stub, world.viewer, world.name, "otter riverbank", mode=mode)
        assert asked.mode == FULL_TEXT
        assert asked.fallback_reason == pb.SEARCH_FALLBACK_REASON_NOT_CONFIGURED
        assert "not configured" not in asked.fallback_detail or asked.fallback_detail
        assert [r.memory_item.name for r in asked.results] == [first.name, second.name]
        assert [r.score for r in asked.results] == [r.score for r in default.results]
        context = await search_context(stub, world.viewer, world.name, "otter", mode=mode)
        assert context.mode == FULL_TEXT
        assert context.fallback_reason == pb.SEARCH_FALLBACK_REASON_NOT_CONFIGURED


# -- filters --------------------------------------------------------------------------------


async def test_every_memory_filter_field(mesh: Any, stub: Stub, world: World) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    other = await create_conversation(stub, world.editor, world.name)
    fact = await stub.CreateMemoryItem(
        pb.CreateMemoryItemRequest(
            parent=conversation.name,
            memory_item=pb.MemoryItem(
                kind=pb.MEMORY_KIND_FACT,
                content="heron facts",
                metadata=struct(topic="birds", stars=3, done=True),
            ),
        ),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    note = await remember(stub, world.editor, conversation.name, "heron note", pb.MEMORY_KIND_NOTE)
    elsewhere = await remember(stub, world.editor, other.name, "heron elsewhere")
    fact_name = fact.memory_item.name
    # Age the note by a day, as time would have.
    async with mesh.shared.database.sessions() as db, db.begin():
        await db.execute(
            update(MemoryItemRow)
            .where(MemoryItemRow.id == note.name.rsplit("/", 1)[1])
            .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        )
    cutoff = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def found(filter: str, parent: str = conversation.name) -> set[str]:
        memory = await search_memory(stub, world.viewer, parent, "heron", filter=filter)
        return {r.memory_item.name for r in memory.results}

    async def found_context(filter: str) -> set[str]:
        context = await search_context(stub, world.viewer, world.name, "heron", filter=filter)
        return set(source_names(context.results))

    assert await found("") == {fact_name, note.name}
    assert await found("kind = fact") == {fact_name}
    assert await found('kind != "fact"') == {note.name}
    assert await found(f"create_time > {cutoff}") == {fact_name}
    assert await found(f"create_time <= {cutoff}") == {note.name}
    assert await found("metadata.topic = birds") == {fact_name}
    assert await found("metadata.stars = 3 AND metadata.done = true") == {fact_name}
    assert await found("metadata.stars = 4") == set()
    assert await found("metadata.topic != birds") == {note.name}
    assert await found("source = memory") == {fact_name, note.name}
    assert await found("source = message") == set()
    assert await found(f"conversation = {other.name}") == set()
    assert await found(f"conversation = {other.name}", other.name) == {elsewhere.name}
    # SearchContext over the workspace: every conversation's memory.
    assert await found_context("") == {fact_name, note.name, elsewhere.name}
    assert await found_context(f"conversation = {other.name}") == {elsewhere.name}
    assert await found_context(f"conversation != {other.name}") == {fact_name, note.name}
    assert await found_context("kind = note") == {note.name}
    assert await found_context("source = document") == set()


async def test_context_search_finds_messages_and_document_passages(
    mesh: Any, stub: Stub, world: World
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    message = await append(stub, world.editor, conversation.name, "the kestrel hovered")
    await index_message(mesh, message, "the kestrel hovered")
    memory = await remember(stub, world.editor, world.name, "kestrel memory")
    document = await add_document(
        mesh, world.id, "field-guide", ["pigeons are common", "a kestrel hunts voles"]
    )
    everything = await search_context(stub, world.viewer, world.name, "kestrel")
    assert set(source_names(everything.results)) == {
        message.name,
        memory.name,
        f"{document}#1",
    }
    [passage] = [r for r in everything.results if r.HasField("document_chunk")]
    chunk = passage.document_chunk
    assert (chunk.file, chunk.display_name, chunk.chunk_index) == (document, "field-guide.txt", 1)
    assert (chunk.start_offset, chunk.end_offset) == (19, 19 + len("a kestrel hunts voles"))
    assert chunk.text == "a kestrel hunts voles"
    assert all(r.scores.HasField("full_text_rank") for r in everything.results)
    assert sorted(r.scores.full_text_rank for r in everything.results) == [1, 2, 3]

    async def found(filter: str, parent: str = world.name) -> list[str]:
        return source_names(
            (await search_context(stub, world.viewer, parent, "kestrel", filter=filter)).results
        )

    assert await found("source = message") == [message.name]
    assert await found("role = user") == [message.name]
    assert await found("role = assistant") == []
    assert await found(f"file = {document}") == [f"{document}#1"]
    assert set(await found(f"file != {document}")) == {message.name, memory.name}
    assert set(await found("source != memory")) == {message.name, f"{document}#1"}
    # In the conversation: its messages, and the workspace's memory and documents.
    assert set(await found("", conversation.name)) == {message.name, memory.name, f"{document}#1"}
    # A deleted conversation's messages are gone, whatever the chunk store holds.
    await stub.DeleteConversation(
        pb.DeleteConversationRequest(name=conversation.name),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert set(await found("")) == {memory.name, f"{document}#1"}
    await refused(
        search_context(stub, world.viewer, conversation.name, "kestrel", filter="source = message"),
        NOT_FOUND,
    )


async def test_a_message_is_found_by_its_words_as_soon_as_it_is_stored(
    mesh: Any, stub: Stub, world: World
) -> None:
    """Issue 79: FULL_TEXT found a conversation's messages only once the semantic index
    held their passages (``index_messages`` on and the indexer done). A message's words
    are indexed with it, whatever the semantic index holds."""
    conversation = await create_conversation(stub, world.editor, world.name)
    other = await create_conversation(stub, world.editor, world.name)
    asked = text_message("the osprey dived into the lake")
    asked.metadata.update({"topic": "birds"})
    question = await append(stub, world.editor, conversation.name, message=asked)
    answer = await append(
        stub, world.editor, conversation.name, "an osprey eats fish", role=pb.MESSAGE_ROLE_ASSISTANT
    )
    elsewhere = await append(stub, world.editor, other.name, "an osprey elsewhere")
    # The semantic index holds nothing of the workspace (messages are not indexed there).
    assert (await chunks(mesh).counts(world.name, "")).total == 0

    async def found(
        filter: str = "", parent: str = conversation.name, query: str = "osprey", mode: int = 0
    ) -> set[str]:
        response = await search_context(stub, world.viewer, parent, query, filter=filter, mode=mode)
        names = source_names(response.results)
        assert len(names) == len(set(names))  # each message once
        return set(names)

    both = {question.name, answer.name}
    assert await found(mode=FULL_TEXT) == both
    assert await found(mode=HYBRID) == both  # runs in FULL_TEXT without an endpoint
    assert await found(query="dives") == {question.name}  # stemmed, as memory items are
    assert await found(parent=world.name) == {*both, elsewhere.name}
    assert await found("role = user") == {question.name}
    assert await found("role != user") == {answer.name}
    assert await found("metadata.topic = birds", world.name) == {question.name}
    assert await found("metadata.topic != birds", world.name) == {answer.name, elsewhere.name}
    assert await found(f"conversation = {other.name}", world.name) == {elsewhere.name}
    assert await found(f"conversation != {other.name}", world.name) == both
    assert await found("source = message AND create_time > 2000-01-01T00:00:00Z") == both
    assert await found("create_time < 2000-01-01T00:00:00Z") == set()
    assert await found("source = memory") == set()
    assert await found("source = document") == set()
    # Passages the indexer wrote as well (index_messages): still one result per message.
    await index_message(mesh, question, "the osprey dived into the lake")
    assert await found() == both
    # A deleted conversation's messages are left out.
    await stub.DeleteConversation(
        pb.DeleteConversationRequest(name=other.name),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert await found(parent=world.name) == both


async def test_paging_by_position(stub: Stub, world: World) -> None:
    made = [await remember(stub, world.editor, world.name, f"lark number {i}") for i in range(5)]
    pages, token = [], ""
    while True:
        page = await search_context(
            stub, world.viewer, world.name, "lark", page_size=2, page_token=token
        )
        pages.append(source_names(page.results))
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(n for p in pages for n in p) == sorted(m.name for m in made)
    # A token is for the search it came from: another filter refuses it.
    first = await search_context(stub, world.viewer, world.name, "lark", page_size=2)
    error = await refused(
        search_context(
            stub,
            world.viewer,
            world.name,
            "lark",
            page_size=2,
            page_token=first.next_page_token,
            filter="kind = fact",
        ),
        INVALID,
    )
    assert violations(error) == ["page_token"]


# -- bad input and access -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filter", "words"),
    [
        ("foo = 1", "unknown field `foo`"),
        ("kind < fact", "operator `<` is not allowed on `kind`"),
        ("create_time > yesterday", "not an RFC 3339 time"),
        ("kind = thought", "unknown memory kind `thought`"),
        ("conversation = workspaces/elsewhere/conversations/c1", "not in the workspace"),
    ],
)
async def test_a_bad_filter_is_invalid_on_filter(
    stub: Stub, world: World, filter: str, words: str
) -> None:
    for call in (
        search_context(stub, world.viewer, world.name, "x", filter=filter),
        search_memory(stub, world.viewer, world.name, "x", filter=filter),
    ):
        error = await refused(call, INVALID)
        assert violations(error) == ["filter"]
        assert words in (error.details() or "")


async def test_query_limits_and_mode(stub: Stub, world: World) -> None:
    for query in ("", "   ", "q" * 1001):
        error = await refused(search_context(stub, world.viewer, world.name, query), INVALID)
        assert violations(error) == ["query"]
    at_the_limit = await search_context(stub, world.viewer, world.name, "q" * 1000)
    assert list(at_the_limit.results) == []
    error = await refused(search_context(stub, world.viewer, world.name, "x", mode=9), INVALID)
    assert violations(error) == ["mode"]
    error = await refused(
        search_memory(stub, world.viewer, world.name, "x", filter="role = user"), INVALID
    )
    assert violations(error) == ["filter"]


async def test_roles_and_other_workspaces(mesh: Any, stub: Stub, world: World) -> None:
    other = await ctx_world(mesh, stub, "Other")
    mine = await remember(stub, world.editor, world.name, "shared secret puffin")
    theirs = await remember(stub, other.editor, other.name, "shared secret puffin")
    await add_document(mesh, other.id, "puffins", ["shared secret puffin"])
    found = await search_context(stub, world.viewer, world.name, "puffin")
    assert source_names(found.results) == [mine.name]
    found = await search_context(stub, other.viewer, other.name, "puffin")
    assert set(source_names(found.results)) == {
        theirs.name,
        f"workspaces/{other.id}/files/puffins#0",
    }
    await refused(search_context(stub, world.outsider, world.name, "puffin"), NOT_FOUND)
    await refused(search_memory(stub, world.outsider, world.name, "puffin"), NOT_FOUND)
    # Naming another workspace's conversation or file in a filter is refused, not searched.
    error = await refused(
        search_context(
            stub,
            world.viewer,
            world.name,
            "puffin",
            filter=f"file = workspaces/{other.id}/files/puffins",
        ),
        INVALID,
    )
    assert violations(error) == ["filter"]


# -- window retrieval -------------------------------------------------------------------------


async def get_window(
    stub: Stub,
    caller: Caller,
    conversation: str,
    budget: int,
    retrieval: pb.RetrievalOptions | None = None,
    query: str = "",
) -> pb.ContextWindow:
    response = await stub.GetContextWindow(
        pb.GetContextWindowRequest(
            conversation=conversation, token_budget=budget, retrieval=retrieval, query=query
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.window


async def test_window_retrieval_marks_results_retrieved_within_budget(
    mesh: Any, stub: Stub, world: World
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    old = await append(stub, world.editor, conversation.name, "the glacier trip was in March")
    await index_message(mesh, old, "the glacier trip was in March")
    for index in range(30):
        await append(
            stub, world.editor, conversation.name, f"filler message {index} " + "words " * 12
        )
    document = await add_document(mesh, world.id, "trip", ["glacier packing list: crampons"])
    await append(stub, world.editor, conversation.name, "when was the glacier trip?")
    options = pb.RetrievalOptions(top_k=5, token_budget=200, mode=FULL_TEXT)
    window = await get_window(stub, world.viewer, conversation.name, 400, options)
    assert window.retrieval_mode == FULL_TEXT
    assert window.retrieval_fallback_reason == pb.SEARCH_FALLBACK_REASON_UNSPECIFIED
    retrieved = [i for i in window.included if i.reason == RETRIEVED]
    assert set(source_names(i.retrieved for i in retrieved)) == {old.name, f"{document}#0"}
    assert sum(i.token_count for i in retrieved) <= 200
    assert all(i.token_count > 0 for i in retrieved)
    # The question itself is a recent message, not retrieved; the old message did not
    # fit as a recent one, and comes back retrieved.
    shown = [i.message.name for i in window.included if i.HasField("message")]
    assert old.name not in shown
    assert shown[-1].endswith(window.included[-1].message.name)
    assert window.total_tokens <= 400
    # A retrieval budget too small for anything leaves them out as OVER_BUDGET.
    tight = await get_window(
        stub, world.viewer, conversation.name, 400, pb.RetrievalOptions(top_k=5, token_budget=1)
    )
    assert not [i for i in tight.included if i.reason == RETRIEVED]
    left_out = [i for i in tight.excluded if i.HasField("retrieved")]
    assert set(source_names(i.retrieved for i in left_out)) == {old.name, f"{document}#0"}
    assert {i.reason for i in left_out} == {OVER_BUDGET}
    # The retrieval's filter narrows what is retrieved.
    documents_only = await get_window(
        stub,
        world.viewer,
        conversation.name,
        400,
        pb.RetrievalOptions(top_k=5, token_budget=200, filter="source = document"),
    )
    assert source_names(i.retrieved for i in documents_only.included if i.reason == RETRIEVED) == [
        f"{document}#0"
    ]
    # Without retrieval, nothing is retrieved and no mode is said.
    plain = await get_window(stub, world.viewer, conversation.name, 400)
    assert not [i for i in plain.included if i.reason == RETRIEVED]
    assert plain.retrieval_mode == pb.SEARCH_MODE_UNSPECIFIED


async def test_window_retrieval_never_repeats_memory_and_is_never_stale(
    stub: Stub, world: World
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    await append(stub, world.editor, conversation.name, "tell me about the badger")
    relevant = await remember(stub, world.editor, world.name, "the badger digs setts")
    options = pb.RetrievalOptions(top_k=5, token_budget=100)
    window = await get_window(stub, world.viewer, conversation.name, 1000, options)
    names = [i.memory_item.name for i in window.included if i.HasField("memory_item")]
    names += [i.retrieved.memory_item.name for i in window.included if i.HasField("retrieved")]
    # Already relevant: shown once, as relevant.
    assert names == [relevant.name]
    # A memory item written after a retrieving window shows in the next one (no cache).
    document_like = await remember(
        stub, world.editor, f"{conversation.name}", "badger sightings log", pb.MEMORY_KIND_NOTE
    )
    again = await get_window(stub, world.viewer, conversation.name, 1000, options)
    every = [i.memory_item.name for i in again.included if i.HasField("memory_item")]
    every += [i.retrieved.memory_item.name for i in again.included if i.HasField("retrieved")]
    assert document_like.name in every
    assert len(every) == len(set(every))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (pb.RetrievalOptions(top_k=0, token_budget=10), "retrieval.top_k"),
        (pb.RetrievalOptions(top_k=21, token_budget=10), "retrieval.top_k"),
        (pb.RetrievalOptions(top_k=3, token_budget=0), "retrieval.token_budget"),
        (pb.RetrievalOptions(top_k=3, token_budget=1001), "retrieval.token_budget"),
        (pb.RetrievalOptions(top_k=3, token_budget=10, mode=7), "retrieval.mode"),  # type: ignore[arg-type]
        (pb.RetrievalOptions(top_k=3, token_budget=10, filter="nope = 1"), "retrieval.filter"),
    ],
)
async def test_window_retrieval_options_are_checked(
    stub: Stub, world: World, options: pb.RetrievalOptions, field: str
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    error = await refused(get_window(stub, world.viewer, conversation.name, 1000, options), INVALID)
    assert violations(error) == [field]
