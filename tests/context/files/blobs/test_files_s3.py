"""Files through the context service with the S3 blob store on a real SeaweedFS, in one
process on SQLite and PostgreSQL: the bytes land in the bucket under their hash and
nowhere else, uploads of both kinds round-trip, a mismatch leaves the bucket as it was,
and a store that cannot be reached is UNAVAILABLE (never UNKNOWN), with nothing stored.
(Several processes sharing PostgreSQL and the bucket: tests/context/files/test_files_s3.py.)"""

from __future__ import annotations

import hashlib
import os
import socket

import grpc
import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.mesh import create_server
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.infra.seaweedfs import SeaweedServer
from tests.kits.authkit import reason
from tests.kits.contextkit import (
    Stub,
    World,
    context_stub,
    ctx_world,
    refused,
    rpc,
    stub_fixture,
    world_fixture,
)

pytestmark = pytest.mark.service

MiB = 1024 * 1024

stub, world = stub_fixture, world_fixture


def s3_values(server: SeaweedServer, bucket: str) -> dict[str, object]:
    return {
        "context_blob_store": "s3",
        "context_s3_endpoint": server.endpoint,
        "context_s3_bucket": bucket,
        "context_s3_access_key_id": server.access_key,
        "context_s3_secret_access_key": server.secret_key,
        "context_s3_timeout_s": 5.0,
    }


@pytest.fixture
def settings(database_url: str, seaweedfs: SeaweedServer, s3_bucket: str) -> Settings:
    return make_settings(database_url=database_url, **s3_values(seaweedfs, s3_bucket))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def keys(server: SeaweedServer, bucket: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listed.get("Contents", []))


async def upload_stream(stub: Stub, world: World, data: bytes, checksum: str) -> pb.File:
    async def frames() -> object:
        yield pb.UploadFileRequest(
            header=pb.UploadFileHeader(
                parent=world.name,
                file=pb.File(
                    display_name="s.bin",
                    media_type="application/octet-stream",
                    size_bytes=len(data),
                ),
            )
        )
        for offset in range(0, len(data), MiB):
            yield pb.UploadFileRequest(chunk=data[offset : offset + MiB])
        yield pb.UploadFileRequest(sha256=checksum)

    response = await stub.UploadFile(frames(), metadata=world.editor.md, timeout=CALL_DEADLINE_S)  # type: ignore[arg-type]
    return response.file


async def download(stub: Stub, world: World, name: str) -> bytes:
    chunks = [
        frame.data
        async for frame in stub.DownloadFile(
            pb.DownloadFileRequest(name=name), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
        )
    ]
    return b"".join(chunks)


def content(size: int) -> bytes:
    return (b"SBTEST" + os.urandom(size))[:size]


async def test_uploads_land_in_the_bucket_under_their_hash(
    stub: Stub, world: World, seaweedfs: SeaweedServer, s3_bucket: str
) -> None:
    streamed = content(9 * MiB + 17)  # more than one multipart part
    wrong = await refused(
        upload_stream(stub, world, streamed, "0" * 64), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert reason(wrong) == "ERROR_REASON_CHECKSUM_MISMATCH"
    assert keys(seaweedfs, s3_bucket) == []
    assert not seaweedfs.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    stored = await upload_stream(stub, world, streamed, sha(streamed))
    assert stored.sha256 == sha(streamed)
    assert await download(stub, world, stored.name) == streamed

    resumable = content(2 * MiB + 3)
    started = await rpc(
        stub.StartUpload,
        pb.StartUploadRequest(
            parent=world.name,
            file=pb.File(
                display_name="r.bin",
                media_type="application/octet-stream",
                size_bytes=len(resumable),
            ),
        ),
        world.editor,
    )
    for offset in range(0, len(resumable), MiB):
        await rpc(
            stub.AppendUpload,
            pb.AppendUploadRequest(
                name=started.upload.name, offset=offset, data=resumable[offset : offset + MiB]
            ),
            world.editor,
        )
    upload_id = started.upload.name.rsplit("/", 1)[1]
    assert [key for key in keys(seaweedfs, s3_bucket) if key.startswith("staging/")] == [
        f"staging/{upload_id}/{offset:020d}" for offset in (0, MiB, 2 * MiB)
    ]
    finished = await rpc(
        stub.FinishUpload,
        pb.FinishUploadRequest(name=started.upload.name, sha256=sha(resumable)),
        world.editor,
    )
    assert await download(stub, world, finished.file.name) == resumable
    # The blobs under their hashes, the staging gone with the publish.
    assert keys(seaweedfs, s3_bucket) == sorted(
        [f"blobs/{sha(streamed)}", f"blobs/{sha(resumable)}"]
    )


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_an_unreachable_store_is_unavailable_and_stores_nothing(
    database_url: str,
) -> None:
    settings = make_settings(
        database_url=database_url,
        context_blob_store="s3",
        context_s3_endpoint=f"http://127.0.0.1:{closed_port()}",
        context_s3_bucket="nowhere",
        context_s3_access_key_id="key",
        context_s3_secret_access_key="secret",
        context_s3_timeout_s=1.0,
    )
    server, _port = await create_server(settings)
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            stub = context_stub(channel)
            world = await ctx_world(server, stub)
            data = content(1000)
            error = await refused(
                upload_stream(stub, world, data, sha(data)), grpc.StatusCode.UNAVAILABLE
            )
            assert "file store" in (error.details() or "")
            started = await rpc(
                stub.StartUpload,
                pb.StartUploadRequest(
                    parent=world.name,
                    file=pb.File(
                        display_name="r.bin",
                        media_type="application/octet-stream",
                        size_bytes=len(data),
                    ),
                ),
                world.editor,
            )
            await refused(
                rpc(
                    stub.AppendUpload,
                    pb.AppendUploadRequest(name=started.upload.name, offset=0, data=data),
                    world.editor,
                ),
                grpc.StatusCode.UNAVAILABLE,
            )
            where = await rpc(
                stub.GetUpload, pb.GetUploadRequest(name=started.upload.name), world.editor
            )
            assert where.upload.committed_size == 0
            listed = await rpc(stub.ListFiles, pb.ListFilesRequest(parent=world.name), world.viewer)
            assert list(listed.files) == []
    finally:
        await server.shutdown(grace=0)
