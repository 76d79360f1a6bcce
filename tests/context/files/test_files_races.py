"""Files under concurrency, in one process over real gRPC: several FinishUpload calls on
one complete upload at once (a client retrying while its first call is still running,
or two tabs finishing the same upload), on the directory store and on S3 (a real
SeaweedFS), on SQLite and PostgreSQL. Each answers the one stored file, never
UNAVAILABLE: a request that lost a race is not an outage. And two replicas sharing the
database and the store: one's maintenance collects an orphaned blob while a user
stores the same bytes through the other, which keeps them.

(The blob stores' own race between publishing and collecting: test_blob_races.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.domain import ContextDomain
from switchboard.context.files.blobs.directory import DirectoryBlobStore
from switchboard.context.files.blobs.s3 import S3BlobStore
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, built, make_settings
from tests.context.files.blobs.test_blob_races import held_delete, held_unlink, wait_until
from tests.context.files.blobs.test_files_s3 import s3_values
from tests.infra.redis import RedisServer
from tests.infra.seaweedfs import SeaweedServer
from tests.kits.contextkit import (
    EventTap,
    Stub,
    World,
    context_stub,
    ctx_world,
    events_fixture,
    rpc,
    stub_fixture,
    world_fixture,
)
from tests.kits.filekit import pdf

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

MiB = 1024 * 1024
#: How many FinishUpload calls race on one upload.
FINISHERS = 8

stub, world, events = stub_fixture, world_fixture, events_fixture


@pytest.fixture(params=["directory", "s3"])
def settings(request: pytest.FixtureRequest, database_url: str) -> Settings:
    if request.param == "directory":
        return make_settings(database_url=database_url)
    server: SeaweedServer = request.getfixturevalue("seaweedfs")
    bucket: str = request.getfixturevalue("s3_bucket")
    return make_settings(database_url=database_url, **s3_values(server, bucket))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def complete_upload(stub: Stub, world: World, data: bytes, media_type: str) -> str:
    """A resumable upload with every byte appended, not yet finished: its name."""
    started = await rpc(
        stub.StartUpload,
        pb.StartUploadRequest(
            parent=world.workspace.name,
            file=pb.File(display_name="race.bin", media_type=media_type, size_bytes=len(data)),
        ),
        world.editor,
    )
    name = started.upload.name
    for offset in range(0, len(data), MiB):
        await rpc(
            stub.AppendUpload,
            pb.AppendUploadRequest(name=name, offset=offset, data=data[offset : offset + MiB]),
            world.editor,
        )
    return name


async def finish_at_once(stub: Stub, world: World, name: str, data: bytes) -> list[object]:
    """FINISHERS FinishUpload calls started together: each one's answer or error."""
    request = pb.FinishUploadRequest(name=name, sha256=sha(data))
    calls = [rpc(stub.FinishUpload, request, world.editor) for _ in range(FINISHERS)]
    answers: list[object] = []
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        answers.append(outcome.file if isinstance(outcome, pb.FinishUploadResponse) else outcome)
    return answers


@pytest.mark.parametrize(
    ("size", "media_type"),
    [
        (3 * MiB + 17, "application/octet-stream"),
        (0, "application/pdf"),  # a document: every finisher extracts its text
    ],
)
async def test_concurrent_finishes_all_answer_the_one_stored_file(
    stub: Stub, world: World, events: EventTap, size: int, media_type: str
) -> None:
    data = (b"SBTEST" + os.urandom(size))[:size] if size else pdf()
    name = await complete_upload(stub, world, data, media_type)
    events.take()
    answers = await finish_at_once(stub, world, name, data)
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert not errors, [
        (e.code().name, e.details()) if isinstance(e, aio.AioRpcError) else repr(e) for e in errors
    ]
    files = [a for a in answers if isinstance(a, pb.File)]
    # One file, the same one for every caller: name, etag and content.
    assert len({(f.name, f.etag) for f in files}) == 1, files
    stored = files[0]
    assert (stored.size_bytes, stored.sha256) == (len(data), sha(data))
    listing = await rpc(
        stub.ListFiles, pb.ListFilesRequest(parent=world.workspace.name), world.viewer
    )
    assert [f.name for f in listing.files] == [stored.name]
    created = [
        e.file_changed.file.name
        for e in events.take()
        if e.type == events_pb2.EVENT_TYPE_FILE_CHANGED
        and e.file_changed.change == events_pb2.CHANGE_KIND_CREATED
    ]
    assert created == [stored.name]
    body = b"".join(
        [
            frame.data
            async for frame in stub.DownloadFile(
                pb.DownloadFileRequest(name=stored.name),
                metadata=world.viewer.md,
                timeout=CALL_DEADLINE_S,
            )
        ]
    )
    assert body == data
    # A retry after all of that answers the same file too.
    again = await rpc(
        stub.FinishUpload, pb.FinishUploadRequest(name=name, sha256=sha(data)), world.editor
    )
    assert (again.file.name, again.file.etag) == (stored.name, stored.etag)


# -- two replicas: one collects while the other stores the same content again ---------------


@asynccontextmanager
async def two_replicas(
    values: dict[str, object], key_file: Path
) -> AsyncIterator[tuple[SwitchboardServer, Stub, SwitchboardServer, Stub]]:
    """Two servers sharing the database and the blob store (and the signing key)."""
    first, _ = await create_server(make_settings(signing_keys=(str(key_file),), **values))
    second, _ = await create_server(make_settings(signing_keys=(str(key_file),), **values))
    await first.start()
    await second.start()
    try:
        async with (
            aio.insecure_channel(first.address) as one,
            aio.insecure_channel(second.address) as two,
        ):
            yield first, context_stub(one), second, context_stub(two)
    finally:
        await first.shutdown(grace=0)
        await second.shutdown(grace=0)


@pytest.mark.parametrize("kind", ["directory", "s3"])
async def test_content_stored_again_while_another_replica_collects_it_is_kept(
    request: pytest.FixtureRequest,
    migrated_postgres_url: str,
    redis_server: RedisServer,
    tmp_path: Path,
    kind: str,
) -> None:
    """A file is deleted and its blob left to be collected; as one replica's maintenance
    deletes the blob, a user uploads the same bytes through the other replica. The new
    file's bytes are there, from either replica."""
    key_file = tmp_path / "k1.pem"
    key_file.write_bytes(private_key_pem(SigningKey.generate("k1")))
    # Replicas share PostgreSQL (SQLite is one process's) and, for their events, Redis.
    values: dict[str, object] = {
        "database_url": migrated_postgres_url,
        "redis_url": redis_server.url,
    }
    if kind == "directory":
        values["context_files_dir"] = str(tmp_path / "shared-files")
    else:
        server: SeaweedServer = request.getfixturevalue("seaweedfs")
        values.update(s3_values(server, request.getfixturevalue("s3_bucket")))
    data = b"SBTEST" + os.urandom(40_000)
    digest = sha(data)
    async with two_replicas(values, key_file) as (first, stub_a, _second, stub_b):
        world = await ctx_world(first, stub_a)
        gone = await upload_once(stub_a, world, data)
        await rpc(stub_a.DeleteFile, pb.DeleteFileRequest(name=gone.name), world.editor)
        collecting = built(first, ContextDomain).files
        store = collecting.blobs
        landed: Callable[[], bool]
        hold: Callable[[Callable[[], None]], contextlib.AbstractContextManager[None]]
        if isinstance(store, DirectoryBlobStore):
            old = time.time() - 7200
            os.utime(store.path(digest), (old, old))
            collecting.file_limits = replace(collecting.file_limits, orphan_grace_s=3600)

            def landed() -> bool:
                return bool(store.path(digest).stat().st_mtime > old + 1)

            def hold(before: Callable[[], None]) -> contextlib.AbstractContextManager[None]:
                return held_unlink(store.path(digest), before)

        else:
            assert isinstance(store, S3BlobStore)
            # S3 keeps the server's time of a write, to the second: the blob ages by the
            # clock past a grace of one second. (A wait for the clock, not for an actor.)
            aged = time.time()
            await asyncio.sleep(2.2)
            collecting.file_limits = replace(collecting.file_limits, orphan_grace_s=1)
            client = request.getfixturevalue("seaweedfs").client()
            bucket = str(values["context_s3_bucket"])

            def landed() -> bool:
                head = client.head_object(Bucket=bucket, Key=f"blobs/{digest}")
                return bool(head["LastModified"].timestamp() > aged + 1)

            def hold(before: Callable[[], None]) -> contextlib.AbstractContextManager[None]:
                return held_delete(store, digest, before)

        loop = asyncio.get_running_loop()
        stored: list[asyncio.Future[pb.File]] = []

        def before() -> None:
            # The collector looked at the blob a last time; the other replica stores the
            # same bytes now, before the delete.
            future = asyncio.run_coroutine_threadsafe(upload_once(stub_b, world, data), loop)
            stored.append(asyncio.wrap_future(future, loop=loop))
            wait_until(landed, "the other replica's upload landed", future.done)

        held = hold(before)
        with held:
            await collecting.maintain_once()
        assert stored, "the collector never came to delete the blob"
        again = await asyncio.wait_for(stored[0], CALL_DEADLINE_S)
        assert again.sha256 == digest
        for stub in (stub_a, stub_b):
            body = b"".join(
                [
                    frame.data
                    async for frame in stub.DownloadFile(
                        pb.DownloadFileRequest(name=again.name),
                        metadata=world.viewer.md,
                        timeout=CALL_DEADLINE_S,
                    )
                ]
            )
            assert body == data


async def upload_once(stub: Stub, world: World, data: bytes) -> pb.File:
    async def frames() -> AsyncIterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(
            header=pb.UploadFileHeader(
                parent=world.workspace.name,
                file=pb.File(
                    display_name="again.bin",
                    media_type="application/octet-stream",
                    size_bytes=len(data),
                ),
            )
        )
        yield pb.UploadFileRequest(chunk=data)
        yield pb.UploadFileRequest(sha256=sha(data))

    response = await stub.UploadFile(frames(), metadata=world.editor.md, timeout=CALL_DEADLINE_S)
    return response.file
