"""The store search of issue 83 (``tests/kits/storesearch.py``) finds a marker in each
store a user's words reach, on the embedded default and on the scaled-out stores
(PostgreSQL, Redis, S3): the message and its full-text index, the memory item and its
index, the uploaded file's blob (a directory or a bucket), the semantic index's vector
table, with Redis the event stream and the cached context window, and the raw database
files apart. Erasure tests read its empty answer as "nowhere": these show that the
answer is empty only when the marker really is nowhere, not for want of looking."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.files.settings import FileSettings
from switchboard.context.semantic.indexing.chunkstore import vector_table
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, make_settings, started
from tests.fakes.embeddings_server import CONCEPT_MODEL, FakeEmbeddings
from tests.infra.redis import RedisServer
from tests.infra.seaweedfs import SeaweedServer
from tests.kits.contextkit import (
    Chat,
    append,
    create_workspace,
    new_caller,
    new_chat,
    remember,
    window,
)
from tests.kits.semantickit import deployed_mesh, get_index, set_index, settled
from tests.kits.storesearch import find_marker, new_marker, search_stores

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

BUDGET = 4000


@dataclass(frozen=True)
class Served:
    server: SwitchboardServer
    channel: aio.Channel
    redis: RedisServer | None

    @property
    def sqlite(self) -> bool:
        return self.server.shared.database.dialect_name == "sqlite"


@pytest.fixture(params=["sqlite", "postgres+redis+s3"])
def backend(request: pytest.FixtureRequest) -> tuple[Settings, RedisServer | None]:
    """The embedded default, or the scaled-out stores: PostgreSQL, Redis and an S3
    bucket on SeaweedFS (looked up only then, so a SQLite-only run starts none)."""
    if request.param == "sqlite":
        return make_settings(), None
    url: str = request.getfixturevalue("migrated_postgres_url")
    redis: RedisServer = request.getfixturevalue("redis_server")
    seaweedfs: SeaweedServer = request.getfixturevalue("seaweedfs")
    bucket: str = request.getfixturevalue("s3_bucket")
    settings = make_settings(
        database_url=url,
        redis_url=redis.url,
        context_blob_store="s3",
        context_s3_endpoint=seaweedfs.endpoint,
        context_s3_bucket=bucket,
        context_s3_access_key_id=seaweedfs.access_key,
        context_s3_secret_access_key=seaweedfs.secret_key,
    )
    return settings, redis


@pytest.fixture
async def served(backend: tuple[Settings, RedisServer | None]) -> AsyncIterator[Served]:
    settings, redis = backend
    async with started(settings) as server, aio.insecure_channel(server.address) as channel:
        yield Served(server, channel, redis)


async def upload_text(chat: Chat, data: bytes) -> pb.File:
    frames = [
        pb.UploadFileRequest(
            header=pb.UploadFileHeader(
                parent=chat.workspace,
                file=pb.File(
                    display_name="notes.txt", media_type="text/plain", size_bytes=len(data)
                ),
            )
        ),
        pb.UploadFileRequest(chunk=data),
        pb.UploadFileRequest(sha256=hashlib.sha256(data).hexdigest()),
    ]

    async def stream() -> AsyncIterator[pb.UploadFileRequest]:
        for frame in frames:
            yield frame

    response = await chat.stub.UploadFile(
        stream(), metadata=chat.caller.md, timeout=CALL_DEADLINE_S
    )
    return response.file


def starting(found: Sequence[str], prefix: str) -> list[str]:
    return [place for place in found if place.startswith(prefix)]


async def test_a_marker_is_found_in_every_store_it_was_written_to(served: Served) -> None:
    chat = await new_chat(served.server, served.channel)
    said, remembered, filed = new_marker(), new_marker(), new_marker()
    await append(chat.stub, chat.caller, chat.conversation, f"my code word is {said} indeed")
    await remember(chat.stub, chat.caller, chat.workspace, f"the user likes {remembered}")
    data = f"notes\n{filed}\nend\n".encode()
    await upload_text(chat, data)
    # Cached by the server (in Redis when it has one).
    shown = await window(chat.stub, chat.caller, chat.conversation, BUDGET)
    assert said in str(shown)

    message = await search_stores(served.server, said)
    memory = await search_stores(served.server, remembered)
    blob = await search_stores(served.server, filed)

    assert starting(message.stores, "sql messages.data row id=")
    assert starting(memory.stores, "sql memory_items.content row id=")
    sha = hashlib.sha256(data).hexdigest()
    if served.sqlite:
        assert f"blob blobs/{sha[:2]}/{sha}" in blob.stores
        # The full-text index is asked for the term itself, beside its content table.
        assert starting(message.stores, "sql fts5 index messages_fts rowid=")
        assert starting(message.stores, "sql messages_fts_content.c0 row id=")
        assert starting(memory.stores, "sql fts5 index memory_fts rowid=")
        # The database's pages on disk hold the words as written (file or WAL).
        assert message.raw
        assert memory.raw
        assert all(place.startswith(("sqlite file ", "sqlite wal ")) for place in message.raw)
    else:
        bucket = served.server.shared.section(FileSettings).context_s3_bucket
        assert f"blob s3://{bucket}/blobs/{sha}" in blob.stores
        assert starting(message.stores, "sql tsvector messages.search (english) row id=")
        assert starting(memory.stores, "sql tsvector memory_items.search (english) row id=")
        # The tables' files (after a CHECKPOINT) hold the rows as written.
        assert [place for place in message.raw if "(public.messages)" in place]
        assert [place for place in memory.raw if "(public.memory_items)" in place]
        stream = served.server.settings.events_stream_key
        assert starting(message.stores, f"redis stream {stream} entry ")
        assert starting(memory.stores, f"redis stream {stream} entry ")
        # The window cached in Redis holds the message as shown.
        windows = starting(message.stores, "redis key ctxwin:")
        assert [place for place in windows if place.endswith(" (string)")]
    # find_marker gives the places of both lists, the raw files' only when asked for
    # (the server works on meanwhile: its outbox drains, so the lists are not compared).
    raw = "sqlite " if served.sqlite else "postgresql "
    places = await find_marker(served.server, said)
    live = await find_marker(served.server, said, raw_files=False)
    assert starting(places, "sql messages.data row id=")
    assert starting(live, "sql messages.data row id=")
    assert starting(places, raw)
    assert not starting(live, raw)


async def test_a_marker_never_written_is_found_nowhere(served: Served) -> None:
    chat = await new_chat(served.server, served.channel)
    await append(chat.stub, chat.caller, chat.conversation, f"words with {new_marker()} in them")
    await window(chat.stub, chat.caller, chat.conversation, BUDGET)

    found = await search_stores(served.server, new_marker())

    assert found.everywhere() == []
    # Not for want of looking: each store was searched.
    kinds = {line.split(":", 1)[0] for line in found.searched}
    assert {"sql sqlite" if served.sqlite else "sql postgresql", "blobs"} <= kinds
    assert ("redis" in kinds) == (served.redis is not None)
    assert "raw" in kinds


async def test_vector_tables_are_searched(database_url: str) -> None:
    """The semantic index's vector table (sqlite-vec's vec0 and its shadow tables, or a
    pgvector table) is read like any other: its owner column names the workspace."""
    workspace_id = new_marker()
    async with (
        FakeEmbeddings() as fake,
        deployed_mesh(database_url, fake) as (server, stub, domain),
    ):
        caller = await new_caller(server)
        workspace = await create_workspace(stub, caller, "Indexed", workspace_id=workspace_id)
        await set_index(stub, caller, workspace.name, embedding_model=CONCEPT_MODEL, dimensions=64)
        await remember(stub, caller, workspace.name, "the user prefers tea over coffee")
        async with asyncio.timeout(CALL_DEADLINE_S):
            while True:
                await settled(domain)
                index = await get_index(stub, caller, workspace.name)
                if index.state == pb.SEMANTIC_INDEX_STATE_READY:
                    break
                await asyncio.sleep(0.05)  # polling a stored state, under a deadline

        found = await search_stores(server, workspace_id)

    table = vector_table(64)
    assert starting(found.stores, f"sql {table}.owner row chunk_id=")
    if database_url.startswith("sqlite"):
        # vec0 keeps its partition key in a shadow table of its own as well.
        assert starting(found.stores, f"sql {table}_chunks.")
