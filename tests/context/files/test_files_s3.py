"""Files on the scaled-out shape: `switchboard serve` processes on one PostgreSQL, one
Redis and one S3-compatible store (a real SeaweedFS), all started by the suite.

- One replica: a streamed upload and a resumable one whose connection drops and which
  resumes on a new one, downloads of the same bytes, the checksum, and a wrong checksum
  that stores nothing.
- A replica killed (SIGKILL) in the middle of a resumable upload, an append in flight:
  the other replica takes it over from GetUpload's committed size and finishes it.
- A replica killed in the middle of a streamed upload, with parts already in the store:
  the client is refused (UNAVAILABLE), no file row exists, no blob is readable, and
  what the dead replica left (an incomplete multipart upload) is invisible and
  collected; the same upload sent again to the survivor is stored whole.

What is in the bucket is read straight from the S3 server: that nothing half-written
exists is what is proved, not what any response says.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import pytest
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.context.files.blobs.s3 import PART_SIZE, S3BlobStore
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess, scaled_env
from tests.infra.redis import RedisServer
from tests.infra.seaweedfs import SeaweedServer
from tests.kits.authkit import PASSWORD, bearer, reason, unique_email

pytestmark = pytest.mark.e2e

MiB: Final = 1024 * 1024
#: Every call's deadline.
CALL_TIMEOUT_S: Final = 30.0
#: How long the test waits for the store to show a streamed upload's first part.
PART_WAIT_S: Final = 30.0


@pytest.fixture
def env(
    tmp_path: Path,
    postgres_url: str,
    redis_server: RedisServer,
    seaweedfs: SeaweedServer,
    s3_bucket: str,
) -> dict[str, str]:
    # Not dev mode (scaled_env gives real secrets), so the S3 credentials are required.
    return {
        **scaled_env(tmp_path, postgres_url, redis_server.url),
        "SWITCHBOARD_CONTEXT_BLOB_STORE": "s3",
        "SWITCHBOARD_CONTEXT_S3_ENDPOINT": seaweedfs.endpoint,
        "SWITCHBOARD_CONTEXT_S3_BUCKET": s3_bucket,
        "SWITCHBOARD_CONTEXT_S3_ACCESS_KEY_ID": seaweedfs.access_key,
        "SWITCHBOARD_CONTEXT_S3_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        "SWITCHBOARD_CONTEXT_S3_TIMEOUT_S": "10",
    }


@contextmanager
def replicas(env: dict[str, str], count: int) -> Iterator[list[ServeProcess]]:
    """``count`` replicas started one after another (the first migrates the schema),
    each killed on the way out whatever happened."""
    with ExitStack() as stack:
        started = []
        for i in range(count):
            process = ServeProcess(env={**env, "SWITCHBOARD_INSTANCE_ID": f"files-{i}"})
            stack.enter_context(process)
            started.append(process)
        yield started


@dataclass(frozen=True)
class Session:
    """A signed-in user's context stub on one replica."""

    channel: aio.Channel
    stub: context_pb2_grpc.ContextServiceAsyncStub
    md: tuple[tuple[str, str], ...]


async def sign_up(server: ServeProcess) -> str:
    """A new user's access token (valid on every replica: they share the signing key)."""
    async with aio.insecure_channel(server.address) as channel:
        response = await auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(email=unique_email("files"), password=PASSWORD),
            timeout=CALL_TIMEOUT_S,
        )
    return response.tokens.access_token


class Sessions:
    """Channels to replicas as one user; closed at the end."""

    def __init__(self, token: str) -> None:
        self._md = bearer(token)
        self._channels: list[aio.Channel] = []

    def to(self, server: ServeProcess) -> Session:
        channel = aio.insecure_channel(server.address)
        self._channels.append(channel)
        return Session(channel, context_pb2_grpc.ContextServiceStub(channel), self._md)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content(size: int) -> bytes:
    """Bytes no sniffer recognizes: they keep their declared octet-stream type."""
    return (b"SBTEST" + os.urandom(size))[:size]


def described(data: bytes, name: str = "data.bin") -> pb.File:
    return pb.File(display_name=name, media_type="application/octet-stream", size_bytes=len(data))


async def create_workspace(session: Session) -> str:
    response = await session.stub.CreateWorkspace(
        pb.CreateWorkspaceRequest(workspace=pb.Workspace(display_name="Files")),
        metadata=session.md,
        timeout=CALL_TIMEOUT_S,
    )
    return response.workspace.name


async def upload_stream(session: Session, parent: str, data: bytes, checksum: str) -> pb.File:
    async def frames() -> AsyncIterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(header=pb.UploadFileHeader(parent=parent, file=described(data)))
        for offset in range(0, len(data), MiB):
            yield pb.UploadFileRequest(chunk=data[offset : offset + MiB])
        yield pb.UploadFileRequest(sha256=checksum)

    response = await session.stub.UploadFile(frames(), metadata=session.md, timeout=CALL_TIMEOUT_S)
    return response.file


async def start_upload(session: Session, parent: str, data: bytes) -> str:
    response = await session.stub.StartUpload(
        pb.StartUploadRequest(parent=parent, file=described(data)),
        metadata=session.md,
        timeout=CALL_TIMEOUT_S,
    )
    return response.upload.name


async def append(session: Session, upload: str, offset: int, data: bytes) -> int:
    response = await session.stub.AppendUpload(
        pb.AppendUploadRequest(name=upload, offset=offset, data=data),
        metadata=session.md,
        timeout=CALL_TIMEOUT_S,
    )
    return response.upload.committed_size


async def committed(session: Session, upload: str) -> int:
    response = await session.stub.GetUpload(
        pb.GetUploadRequest(name=upload), metadata=session.md, timeout=CALL_TIMEOUT_S
    )
    return response.upload.committed_size


async def append_from(session: Session, upload: str, data: bytes, offset: int) -> None:
    while offset < len(data):
        offset = await append(session, upload, offset, data[offset : offset + MiB])


async def finish(session: Session, upload: str, checksum: str) -> pb.File:
    response = await session.stub.FinishUpload(
        pb.FinishUploadRequest(name=upload, sha256=checksum),
        metadata=session.md,
        timeout=CALL_TIMEOUT_S,
    )
    return response.file


async def download(session: Session, name: str) -> bytes:
    frames = [
        frame.data
        async for frame in session.stub.DownloadFile(
            pb.DownloadFileRequest(name=name), metadata=session.md, timeout=CALL_TIMEOUT_S
        )
    ]
    return b"".join(frames)


async def listing(session: Session, parent: str) -> pb.ListFilesResponse:
    response: pb.ListFilesResponse = await session.stub.ListFiles(
        pb.ListFilesRequest(parent=parent, page_size=100),
        metadata=session.md,
        timeout=CALL_TIMEOUT_S,
    )
    return response


def bucket_keys(server: SeaweedServer, bucket: str, prefix: str = "") -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def multipart_parts(server: SeaweedServer, bucket: str) -> int:
    """Parts stored so far by every incomplete multipart upload in the bucket."""
    client = server.client()
    parts = 0
    for item in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        listed = client.list_parts(Bucket=bucket, Key=item["Key"], UploadId=item["UploadId"])
        parts += len(listed.get("Parts", []))
    return parts


class _Nothing:
    """A ReferencedCheck of a database that names nothing: only what is abandoned is
    asked about here (no file rows exist in the bucket's workspace)."""

    async def blobs(self, hashes: list[str]) -> set[str]:
        return set()

    async def uploads(self, uploads: list[str]) -> set[str]:
        return set()


async def test_uploads_resume_and_download_on_postgres_and_s3(
    env: dict[str, str], seaweedfs: SeaweedServer, s3_bucket: str
) -> None:
    with replicas(env, 1) as (server,):
        sessions = Sessions(await sign_up(server))
        try:
            session = sessions.to(server)
            parent = await create_workspace(session)

            streamed = content(PART_SIZE + 3 * MiB + 7)
            stored = await upload_stream(session, parent, streamed, sha(streamed))
            assert (stored.sha256, stored.size_bytes) == (sha(streamed), len(streamed))
            assert await download(session, stored.name) == streamed

            with pytest.raises(aio.AioRpcError) as wrong:
                await upload_stream(session, parent, content(1000), "0" * 64)
            assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason(wrong.value) == "ERROR_REASON_CHECKSUM_MISMATCH"

            resumable = content(4 * MiB + 123)
            upload = await start_upload(session, parent, resumable)
            await append(session, upload, 0, resumable[:MiB])
            await append(session, upload, MiB, resumable[MiB : 2 * MiB])
            # The connection drops; a new one asks where the upload is and resumes.
            await session.channel.close(None)
            again = sessions.to(server)
            offset = await committed(again, upload)
            assert offset == 2 * MiB
            await append_from(again, upload, resumable, offset)
            with pytest.raises(aio.AioRpcError) as mismatch:
                await finish(again, upload, sha(b"not these bytes"))
            assert reason(mismatch.value) == "ERROR_REASON_CHECKSUM_MISMATCH"
            finished = await finish(again, upload, sha(resumable))
            assert finished.sha256 == sha(resumable)
            assert await download(again, finished.name) == resumable

            found = await listing(again, parent)
            assert sorted(f.name for f in found.files) == sorted([stored.name, finished.name])
            assert found.workspace_usage_bytes == len(streamed) + len(resumable)
        finally:
            await sessions.close()
    # In the bucket: the two blobs under their hashes, nothing staged, nothing else.
    assert bucket_keys(seaweedfs, s3_bucket) == sorted(
        [f"blobs/{sha(streamed)}", f"blobs/{sha(resumable)}"]
    )
    assert multipart_parts(seaweedfs, s3_bucket) == 0


async def test_a_replica_killed_mid_resumable_upload_is_finished_by_another(
    env: dict[str, str], seaweedfs: SeaweedServer, s3_bucket: str
) -> None:
    data = content(6 * MiB + 99)
    with replicas(env, 2) as (doomed, survivor):
        sessions = Sessions(await sign_up(doomed))
        try:
            on_doomed = sessions.to(doomed)
            parent = await create_workspace(on_doomed)
            upload = await start_upload(on_doomed, parent, data)
            for offset in range(0, 3 * MiB, MiB):
                await append(on_doomed, upload, offset, data[offset : offset + MiB])
            # The next append is in flight when the replica dies: its chunk is in the
            # store, its row advanced or not; GetUpload on the survivor says which.
            in_flight = asyncio.ensure_future(
                append(on_doomed, upload, 3 * MiB, data[3 * MiB : 4 * MiB])
            )
            chunk_key = f"staging/{upload.rsplit('/', 1)[1]}/{3 * MiB:020d}"
            deadline = time.monotonic() + PART_WAIT_S
            while chunk_key not in bucket_keys(seaweedfs, s3_bucket, "staging/"):
                assert time.monotonic() < deadline, "the chunk never reached the store"
                await asyncio.sleep(0.01)
            assert doomed.proc is not None
            doomed.proc.kill()
            doomed.proc.wait(timeout=CALL_DEADLINE_S)
            # Answered before the kill, or cut off by it: nothing else.
            (answer,) = await asyncio.gather(in_flight, return_exceptions=True)
            if isinstance(answer, aio.AioRpcError):
                assert answer.code() == grpc.StatusCode.UNAVAILABLE
            else:
                assert answer == 4 * MiB
            on_survivor = sessions.to(survivor)
            offset = await committed(on_survivor, upload)
            assert offset in (3 * MiB, 4 * MiB)
            await append_from(on_survivor, upload, data, offset)
            finished = await finish(on_survivor, upload, sha(data))
            assert await download(on_survivor, finished.name) == data
            found = await listing(on_survivor, parent)
            assert [f.name for f in found.files] == [finished.name]
        finally:
            await sessions.close()
    assert bucket_keys(seaweedfs, s3_bucket) == [f"blobs/{sha(data)}"]


async def test_a_replica_killed_mid_streamed_upload_leaves_nothing_served(
    env: dict[str, str], seaweedfs: SeaweedServer, s3_bucket: str
) -> None:
    data = content(PART_SIZE + 4 * MiB)
    sent_first_part = asyncio.Event()
    never = asyncio.Event()
    with replicas(env, 2) as (doomed, survivor):
        sessions = Sessions(await sign_up(doomed))
        try:
            on_doomed = sessions.to(doomed)
            parent = await create_workspace(on_doomed)

            async def frames() -> AsyncIterator[pb.UploadFileRequest]:
                yield pb.UploadFileRequest(
                    header=pb.UploadFileHeader(parent=parent, file=described(data))
                )
                for offset in range(0, PART_SIZE + 2 * MiB, MiB):
                    yield pb.UploadFileRequest(chunk=data[offset : offset + MiB])
                sent_first_part.set()
                await never.wait()  # the rest never comes: the replica dies first

            call = on_doomed.stub.UploadFile(
                frames(), metadata=on_doomed.md, timeout=CALL_TIMEOUT_S
            )
            outcome = asyncio.ensure_future(call)
            await asyncio.wait_for(sent_first_part.wait(), CALL_TIMEOUT_S)
            # The replica has uploaded a part of its multipart upload to the store.
            deadline = time.monotonic() + PART_WAIT_S
            while multipart_parts(seaweedfs, s3_bucket) == 0:
                assert time.monotonic() < deadline, "no part reached the store"
                await asyncio.sleep(0.05)
            assert doomed.proc is not None
            doomed.proc.kill()
            doomed.proc.wait(timeout=CALL_DEADLINE_S)
            with pytest.raises(aio.AioRpcError) as refused:
                await outcome
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            # Nothing half-written is served: no file, no blob, nothing readable.
            on_survivor = sessions.to(survivor)
            found = await listing(on_survivor, parent)
            assert list(found.files) == []
            assert found.workspace_usage_bytes == 0
            assert bucket_keys(seaweedfs, s3_bucket, "blobs/") == []
            assert bucket_keys(seaweedfs, s3_bucket, "streams/") == []
            # What the dead replica left is an incomplete multipart upload, which no
            # reader can see; the collector aborts it once it is old enough.
            store = S3BlobStore(
                endpoint=seaweedfs.endpoint,
                bucket=s3_bucket,
                region="us-east-1",
                access_key_id=seaweedfs.access_key,
                secret_access_key=seaweedfs.secret_key,
                timeout_s=10.0,
            )
            try:
                assert await store.collect(_Nothing(), grace_s=3600) == 0
                assert await store.collect(_Nothing(), grace_s=0) == 1
            finally:
                await store.close()
            assert multipart_parts(seaweedfs, s3_bucket) == 0

            # The client sends the upload again, to the survivor: stored whole.
            stored = await upload_stream(on_survivor, parent, data, sha(data))
            assert await download(on_survivor, stored.name) == data
        finally:
            never.set()
            await sessions.close()
    assert bucket_keys(seaweedfs, s3_bucket) == [f"blobs/{sha(data)}"]
