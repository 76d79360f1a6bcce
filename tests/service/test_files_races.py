"""Files under concurrency, in one process over real gRPC: several FinishUpload calls on
one complete upload at once (a client retrying while its first call is still running,
or two tabs finishing the same upload), on the directory store and on S3 (a real
SeaweedFS), on SQLite and PostgreSQL. Each answers the one stored file, never
UNAVAILABLE: a request that lost a race is not an outage.

(The blob stores' own race between publishing and collecting: test_blob_races.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.settings import Settings
from tests.conftest import make_settings
from tests.infra.seaweedfs import SeaweedServer
from tests.service.contextkit import (
    EventTap,
    Stub,
    World,
    events_fixture,
    rpc,
    stub_fixture,
    world_fixture,
)
from tests.service.filekit import pdf
from tests.service.test_files_s3 import s3_values

pytestmark = pytest.mark.asyncio

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
        (e.code().name, e.details()) if isinstance(e, aio.AioRpcError) else repr(e)
        for e in errors
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
                pb.DownloadFileRequest(name=stored.name), metadata=world.viewer.md, timeout=20
            )
        ]
    )
    assert body == data
    # A retry after all of that answers the same file too.
    again = await rpc(
        stub.FinishUpload, pb.FinishUploadRequest(name=name, sha256=sha(data)), world.editor
    )
    assert (again.file.name, again.file.etag) == (stored.name, stored.etag)
