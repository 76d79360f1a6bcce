"""The blob store port's contract, held by every adapter: the directory beside the
database and the S3 store on a real SeaweedFS server.

Each test runs once per adapter. What only one adapter has (S3's bucket creation,
abandoned multipart uploads, a backend that stops answering) is tested below the
shared part, against the same real server.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from switchboard.context.files.blobs.directory import DirectoryBlobStore
from switchboard.context.files.blobs.port import (
    BlobMismatch,
    BlobNotFound,
    BlobStore,
    BlobUnavailable,
    Published,
)
from switchboard.context.files.blobs.s3 import CHUNK_SIZE, PART_SIZE, S3BlobStore
from tests.conftest import CALL_DEADLINE_S
from tests.infra.seaweedfs import SeaweedServer

pytestmark = pytest.mark.service

MiB = 1024 * 1024
#: Reads are windows of this much on S3 here (16 MiB by default): small enough that
#: the tests cross window boundaries without moving tens of MiB.
READ_WINDOW = 3 * MiB


class Known:
    """A ReferencedCheck over fixed sets: what the database would answer."""

    def __init__(self, blobs: set[str] | None = None, uploads: set[str] | None = None) -> None:
        self._blobs = blobs or set()
        self._uploads = uploads or set()
        self.asked_blobs: list[str] = []
        self.asked_uploads: list[str] = []

    async def blobs(self, hashes: list[str]) -> set[str]:
        self.asked_blobs += hashes
        return {sha for sha in hashes if sha in self._blobs}

    async def uploads(self, uploads: list[str]) -> set[str]:
        self.asked_uploads += uploads
        return {upload for upload in uploads if upload in self._uploads}


def s3_store(
    server: SeaweedServer, bucket: str, *, timeout_s: float = CALL_DEADLINE_S
) -> S3BlobStore:
    return S3BlobStore(
        endpoint=server.endpoint,
        bucket=bucket,
        region="us-east-1",
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        timeout_s=timeout_s,
        read_window=READ_WINDOW,
    )


@pytest.fixture(params=["directory", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    made: BlobStore
    if request.param == "directory":
        made = DirectoryBlobStore(tmp_path / "files")
    else:
        server: SeaweedServer = request.getfixturevalue("seaweedfs")
        made = s3_store(server, request.getfixturevalue("s3_bucket"))
    try:
        yield made
    finally:
        await made.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def read_all(store: BlobStore, digest: str, offset: int = 0, limit: int = 0) -> bytes:
    return b"".join([chunk async for chunk in store.read(digest, offset, limit)])


async def stage_all(store: BlobStore, upload: str, data: bytes, chunk: int = CHUNK_SIZE) -> None:
    for offset in range(0, len(data), chunk):
        await store.stage(upload, offset, data[offset : offset + chunk])


async def publish(store: BlobStore, data: bytes) -> Published:
    writer = store.open_writer()
    for offset in range(0, len(data), CHUNK_SIZE):
        await writer.write(data[offset : offset + CHUNK_SIZE])
    return await writer.publish(sha(data))


async def leftovers(store: BlobStore) -> int:
    """What collecting everything unreferenced would remove: staged bytes nobody owns."""
    return await store.collect(Known(), grace_s=0)


@pytest.mark.parametrize("size", [1, CHUNK_SIZE + 7, PART_SIZE + 2 * CHUNK_SIZE + 11])
async def test_staged_upload_commits_and_reads_back(store: BlobStore, size: int) -> None:
    # Small, a few chunks, and more than one multipart part on S3.
    data = os.urandom(size)
    await stage_all(store, "up-1", data)
    published = await store.commit("up-1", size, sha(data))
    assert published == Published(sha256=sha(data), size=size)
    assert await store.exists(sha(data))
    chunks = [chunk async for chunk in store.read(sha(data))]
    assert b"".join(chunks) == data
    assert all(0 < len(chunk) <= CHUNK_SIZE for chunk in chunks)
    # The staging stays until the caller discards it (the file's row is stored): a
    # second commit of the same upload (two FinishUpload calls at once, a retry after
    # a crash before the row) publishes the same blob again.
    assert await store.commit("up-1", size, sha(data)) == published
    assert await read_all(store, sha(data)) == data
    await store.discard("up-1")
    with pytest.raises(BlobNotFound):
        await store.commit("up-1", size, sha(data))
    assert await read_all(store, sha(data)) == data
    assert await leftovers(store) == 1  # the blob itself, named by no row here


async def test_a_retried_stage_at_the_same_offset_changes_nothing(store: BlobStore) -> None:
    data = os.urandom(2 * CHUNK_SIZE + 5)
    await store.stage("up-2", 0, data[:CHUNK_SIZE])
    await store.stage("up-2", CHUNK_SIZE, data[CHUNK_SIZE : 2 * CHUNK_SIZE])
    # The answer to this append was lost; the client sends it again.
    await store.stage("up-2", CHUNK_SIZE, data[CHUNK_SIZE : 2 * CHUNK_SIZE])
    await store.stage("up-2", 2 * CHUNK_SIZE, data[2 * CHUNK_SIZE :])
    await store.commit("up-2", len(data), sha(data))
    assert await read_all(store, sha(data)) == data


async def test_a_wrong_checksum_publishes_nothing_and_keeps_the_staging(
    store: BlobStore,
) -> None:
    data = os.urandom(PART_SIZE + CHUNK_SIZE)
    await stage_all(store, "up-3", data)
    claimed = sha(b"something else")
    with pytest.raises(BlobMismatch) as wrong:
        await store.commit("up-3", len(data), claimed)
    assert (wrong.value.size, wrong.value.sha256) == (len(data), sha(data))
    assert not await store.exists(claimed)
    assert not await store.exists(sha(data))
    with pytest.raises(BlobNotFound):
        await read_all(store, claimed)
    # Not even a hash-shaped name: a mismatch all the same.
    with pytest.raises(BlobMismatch):
        await store.commit("up-3", len(data), "not-a-hash")
    # The client fixes its checksum: the staged bytes are still there.
    await store.commit("up-3", len(data), sha(data))
    assert await read_all(store, sha(data)) == data


async def test_a_wrong_size_publishes_nothing_and_the_rest_can_follow(store: BlobStore) -> None:
    await store.stage("up-4", 0, b"hello")
    with pytest.raises(BlobMismatch) as short:
        await store.commit("up-4", 10, sha(b"helloworld"))
    assert (short.value.size, short.value.sha256) == (5, sha(b"hello"))
    assert not await store.exists(sha(b"helloworld"))
    await store.stage("up-4", 5, b"world")
    published = await store.commit("up-4", 10, sha(b"helloworld"))
    assert await read_all(store, published.sha256) == b"helloworld"


async def test_commit_and_discard_of_nothing_staged(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await store.commit("never-staged", 0, sha(b""))
    await store.discard("never-staged")
    await store.stage("up-5", 0, b"abc")
    await store.discard("up-5")
    with pytest.raises(BlobNotFound):
        await store.commit("up-5", 3, sha(b"abc"))


@pytest.mark.parametrize("size", [0, 5, PART_SIZE + 3 * CHUNK_SIZE + 1])
async def test_streamed_writer_publishes(store: BlobStore, size: int) -> None:
    data = os.urandom(size)
    writer = store.open_writer()
    for offset in range(0, size, CHUNK_SIZE):
        await writer.write(data[offset : offset + CHUNK_SIZE])
    assert writer.size == size
    published = await writer.publish(sha(data))
    assert published == Published(sha256=sha(data), size=size)
    assert await read_all(store, sha(data)) == data
    await writer.discard()  # after publish: nothing happens to the blob
    assert await read_all(store, sha(data)) == data
    with pytest.raises(BlobUnavailable):
        await writer.write(b"more")
    # Only the blob is left: no staging of the stream.
    assert await leftovers(store) == 1


@pytest.mark.parametrize("size", [5, PART_SIZE + CHUNK_SIZE])
async def test_streamed_writer_with_a_wrong_checksum_leaves_nothing(
    store: BlobStore, size: int
) -> None:
    data = os.urandom(size)
    writer = store.open_writer()
    for offset in range(0, size, CHUNK_SIZE):
        await writer.write(data[offset : offset + CHUNK_SIZE])
    with pytest.raises(BlobMismatch) as wrong:
        await writer.publish("0" * 64)
    assert (wrong.value.size, wrong.value.sha256) == (size, sha(data))
    assert not await store.exists(sha(data))
    assert not await store.exists("0" * 64)
    await writer.discard()
    assert await leftovers(store) == 0


async def test_streamed_writer_discarded_midway_leaves_nothing(store: BlobStore) -> None:
    data = os.urandom(PART_SIZE + CHUNK_SIZE)
    writer = store.open_writer()
    for offset in range(0, len(data), CHUNK_SIZE):
        await writer.write(data[offset : offset + CHUNK_SIZE])
    await writer.discard()
    await writer.discard()
    assert not await store.exists(sha(data))
    assert await leftovers(store) == 0


async def test_ranged_reads(store: BlobStore) -> None:
    data = os.urandom(2 * READ_WINDOW + 12345)
    digest = (await publish(store, data)).sha256
    size = len(data)
    for offset, limit in [
        (0, 0),
        (10, 20),
        (CHUNK_SIZE - 1, 2),
        (READ_WINDOW - 3, 7),  # across a window boundary on S3
        (READ_WINDOW, READ_WINDOW),
        (size - 5, 0),
        (size - 5, 100),  # a limit past the end stops at the end
        (1, size),
    ]:
        chunks = [chunk async for chunk in store.read(digest, offset, limit)]
        expected = data[offset : offset + limit] if limit else data[offset:]
        assert b"".join(chunks) == expected, (offset, limit)
        assert all(len(chunk) <= CHUNK_SIZE for chunk in chunks)
    assert await read_all(store, digest, size) == b""
    assert await read_all(store, digest, size + 10) == b""
    empty = (await publish(store, b"")).sha256
    assert await read_all(store, empty) == b""


async def test_missing_blobs_exists_and_delete(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await read_all(store, "a" * 64)
    with pytest.raises(BlobNotFound):
        await read_all(store, "../../etc/passwd")
    assert not await store.exists("a" * 64)
    assert not await store.exists("../x")
    await store.delete("a" * 64)
    digest = (await publish(store, b"to delete")).sha256
    assert await store.exists(digest)
    await store.delete(digest)
    assert not await store.exists(digest)
    with pytest.raises(BlobNotFound):
        await read_all(store, digest)


async def test_collect_removes_only_unreferenced_and_old(store: BlobStore) -> None:
    kept = (await publish(store, b"kept")).sha256
    orphan = (await publish(store, b"orphan")).sha256
    await store.stage("live", 0, b"x")
    await store.stage("dead", 0, b"y")
    await store.stage("dead", 1, b"z")
    referenced = Known(blobs={kept}, uploads={"live"})
    # Within the grace period nothing is touched, referenced or not.
    assert await store.collect(referenced, grace_s=3600) == 0
    assert await store.exists(orphan)
    # Past it, what the database does not know goes; what it knows stays.
    assert await store.collect(referenced, grace_s=0) == 2
    assert await store.exists(kept)
    assert not await store.exists(orphan)
    assert {kept, orphan} <= set(referenced.asked_blobs)
    assert {"live", "dead"} <= set(referenced.asked_uploads)
    with pytest.raises(BlobNotFound):
        await store.commit("dead", 2, sha(b"yz"))
    published = await store.commit("live", 1, sha(b"x"))
    assert await read_all(store, published.sha256) == b"x"


# -- the S3 store's own ------------------------------------------------------------------


async def test_s3_store_creates_its_bucket(seaweedfs: SeaweedServer) -> None:
    bucket = f"created-{os.urandom(6).hex()}"
    store = s3_store(seaweedfs, bucket)
    try:
        digest = (await publish(store, b"first")).sha256
        assert await read_all(store, digest) == b"first"
        # A second store (another replica) finds it there.
        other = s3_store(seaweedfs, bucket)
        try:
            assert await read_all(other, digest) == b"first"
        finally:
            await other.close()
    finally:
        await store.close()
        seaweedfs.delete_bucket(bucket)


async def test_s3_commit_of_one_replica_finishes_another_replicas_upload(
    seaweedfs: SeaweedServer, s3_bucket: str
) -> None:
    data = os.urandom(3 * CHUNK_SIZE)
    first = s3_store(seaweedfs, s3_bucket)
    await stage_all(first, "shared", data[: 2 * CHUNK_SIZE])
    await first.close()
    second = s3_store(seaweedfs, s3_bucket)
    try:
        await second.stage("shared", 2 * CHUNK_SIZE, data[2 * CHUNK_SIZE :])
        await second.commit("shared", len(data), sha(data))
        assert await read_all(second, sha(data)) == data
    finally:
        await second.close()


async def test_s3_collect_aborts_abandoned_multipart_uploads(
    seaweedfs: SeaweedServer, s3_bucket: str
) -> None:
    # What a replica killed mid-commit or mid-stream leaves: an incomplete multipart
    # upload, invisible to readers.
    client = seaweedfs.client()
    started = client.create_multipart_upload(Bucket=s3_bucket, Key="streams/abandoned")
    client.upload_part(
        Bucket=s3_bucket,
        Key="streams/abandoned",
        UploadId=started["UploadId"],
        PartNumber=1,
        Body=os.urandom(PART_SIZE),
    )
    store = s3_store(seaweedfs, s3_bucket)
    try:
        assert await store.collect(Known(), grace_s=3600) == 0
        assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
        assert await store.collect(Known(), grace_s=0) == 1
        assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
        assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    finally:
        await store.close()


async def test_s3_streamed_blob_over_one_copy_is_copied_in_parts(
    seaweedfs: SeaweedServer, s3_bucket: str
) -> None:
    # One CopyObject copies at most 5 GiB; past that the copy goes in ranged parts. The
    # same path, with a limit of 5 MiB (the smallest part S3 takes).
    store = S3BlobStore(
        endpoint=seaweedfs.endpoint,
        bucket=s3_bucket,
        region="us-east-1",
        access_key_id=seaweedfs.access_key,
        secret_access_key=seaweedfs.secret_key,
        timeout_s=CALL_DEADLINE_S,
        max_copy_size=5 * MiB,
    )
    try:
        data = os.urandom(PART_SIZE + 5 * MiB + 3)
        published = await publish(store, data)
        assert await read_all(store, published.sha256) == data
        assert await leftovers(store) == 1  # the blob alone
    finally:
        await store.close()


async def test_a_closed_s3_store_is_unavailable(seaweedfs: SeaweedServer, s3_bucket: str) -> None:
    store = s3_store(seaweedfs, s3_bucket)
    digest = (await publish(store, b"closed")).sha256
    await store.close()
    await store.close()
    with pytest.raises(BlobUnavailable):
        await store.exists(digest)


async def test_s3_store_outage_is_unavailable_in_bounded_time(
    private_seaweedfs: SeaweedServer,
) -> None:
    server = private_seaweedfs
    store = s3_store(server, "outage", timeout_s=1.0)
    # The same bucket through a store whose tries end sooner: what is bounded is the
    # same (each try ends at its timeout, a few tries in all), in less of the test's time.
    hung = s3_store(server, "outage", timeout_s=0.25)
    try:
        digest = (await publish(store, b"before the outage")).sha256
        # Hung: the sockets accept, nothing answers; the read timeout ends each try.
        server.pause()
        attempts: list[Callable[[], Awaitable[object]]] = [
            lambda: hung.stage("up", 0, b"x"),
            lambda: read_all(hung, digest),
            lambda: hung.exists(digest),
        ]
        for attempt in attempts:
            started = time.monotonic()
            with pytest.raises(BlobUnavailable):
                await attempt()
            assert time.monotonic() - started < 20
        server.resume()
        assert await read_all(store, digest) == b"before the outage"
        # Gone: connections are refused.
        server.kill()
        started = time.monotonic()
        with pytest.raises(BlobUnavailable):
            await read_all(store, digest)
        writer = store.open_writer()
        await writer.write(b"abc")
        with pytest.raises(BlobUnavailable):
            await writer.publish(sha(b"abc"))
        await writer.discard()
        assert time.monotonic() - started < 20
    finally:
        await hung.close()
        await store.close()


async def test_s3_store_with_wrong_credentials_is_unavailable(
    seaweedfs: SeaweedServer, s3_bucket: str
) -> None:
    store = S3BlobStore(
        endpoint=seaweedfs.endpoint,
        bucket=s3_bucket,
        region="us-east-1",
        access_key_id=seaweedfs.access_key,
        secret_access_key="not-the-secret",
        timeout_s=CALL_DEADLINE_S,
    )
    try:
        with pytest.raises(BlobUnavailable):
            await store.stage("up", 0, b"x")
    finally:
        await store.close()
