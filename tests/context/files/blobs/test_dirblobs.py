"""The directory blob store: staging, publishing, reading, orphan collection."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from switchboard.context.files.blobs.directory import CHUNK, DirectoryBlobStore
from switchboard.context.files.blobs.port import BlobMismatch, BlobNotFound, Published

pytestmark = pytest.mark.unit


class Known:
    """A ReferencedCheck over fixed sets (what the database would answer)."""

    def __init__(
        self, blobs: frozenset[str] = frozenset(), uploads: frozenset[str] = frozenset()
    ) -> None:
        self._blobs = blobs
        self._uploads = uploads

    async def blobs(self, hashes: list[str]) -> set[str]:
        return {h for h in hashes if h in self._blobs}

    async def uploads(self, uploads: list[str]) -> set[str]:
        return {u for u in uploads if u in self._uploads}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[DirectoryBlobStore]:
    made = DirectoryBlobStore(tmp_path / "files")
    try:
        yield made
    finally:
        await made.close()


async def read_all(store: DirectoryBlobStore, sha: str, offset: int = 0, limit: int = 0) -> bytes:
    return b"".join([chunk async for chunk in store.read(sha, offset, limit)])


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_resumable_stage_and_commit(store: DirectoryBlobStore) -> None:
    data = os.urandom(CHUNK + 1000)
    await store.stage("up-1", 0, data[:CHUNK])
    # A retried append of the same bytes at the same offset changes nothing.
    await store.stage("up-1", 0, data[:CHUNK])
    await store.stage("up-1", CHUNK, data[CHUNK:])
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(BlobMismatch) as wrong:
        await store.commit("up-1", len(data), "0" * 64)
    assert wrong.value.sha256 == sha
    assert wrong.value.size == len(data)
    published = await store.commit("up-1", len(data), sha)
    assert (published.sha256, published.size) == (sha, len(data))
    assert await store.exists(sha)
    assert await read_all(store, sha) == data
    chunks = [chunk async for chunk in store.read(sha)]
    assert all(len(chunk) <= CHUNK for chunk in chunks)
    assert await read_all(store, sha, 10, 20) == data[10:30]
    assert await read_all(store, sha, len(data) - 5) == data[-5:]
    # The staging stays (a second FinishUpload publishes the same blob) until discarded;
    # the blob does not go with it.
    assert await store.commit("up-1", len(data), sha) == published
    await store.discard("up-1")
    with pytest.raises(BlobNotFound):
        await store.commit("up-1", len(data), sha)
    assert await read_all(store, sha) == data
    # Nothing of the publishes is left behind in staging, and no marker of a collector.
    assert list((store.root / "staging").iterdir()) == []
    assert list((store.root / "collecting").iterdir()) == []


async def test_commit_of_a_short_upload_keeps_its_staging(store: DirectoryBlobStore) -> None:
    await store.stage("up-2", 0, b"hello")
    with pytest.raises(BlobMismatch) as short:
        await store.commit("up-2", 10, hashlib.sha256(b"hello").hexdigest())
    assert short.value.size == 5
    await store.stage("up-2", 5, b"world")
    published = await store.commit("up-2", 10, hashlib.sha256(b"helloworld").hexdigest())
    assert await read_all(store, published.sha256) == b"helloworld"


async def test_streamed_writer_publishes_or_discards(store: DirectoryBlobStore) -> None:
    writer = store.open_writer()
    await writer.write(b"abc")
    await writer.write(b"def")
    assert writer.size == 6
    published = await writer.publish(hashlib.sha256(b"abcdef").hexdigest())
    assert await read_all(store, published.sha256) == b"abcdef"
    bad = store.open_writer()
    await bad.write(b"xyz")
    with pytest.raises(BlobMismatch):
        await bad.publish("0" * 64)
    await bad.discard()
    assert list((store.root / "staging").iterdir()) == []
    empty = store.open_writer()
    published = await empty.publish(hashlib.sha256(b"").hexdigest())
    assert await read_all(store, published.sha256) == b""


async def test_missing_blobs_and_deletes(store: DirectoryBlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await read_all(store, "a" * 64)
    with pytest.raises(BlobNotFound):
        await read_all(store, "../../etc/passwd")
    assert not await store.exists("a" * 64)
    await store.delete("a" * 64)
    await store.discard("never-staged")


async def test_collect_removes_only_old_unreferenced(store: DirectoryBlobStore) -> None:
    kept = (await _publish(store, b"kept")).sha256
    orphan = (await _publish(store, b"orphan")).sha256
    fresh = (await _publish(store, b"fresh orphan")).sha256
    await store.stage("live", 0, b"x")
    await store.stage("dead", 0, b"y")
    for path in (store.path(kept), store.path(orphan)):
        age(path, 7200)
    for name in ("live", "dead"):
        age(store.root / "staging" / name, 7200)
    removed = await store.collect(Known(frozenset({kept}), frozenset({"live"})), grace_s=3600)
    assert removed == 2
    assert await store.exists(kept)
    assert await store.exists(fresh)
    assert not await store.exists(orphan)
    assert sorted(p.name for p in (store.root / "staging").iterdir()) == ["live"]
    # Publishing the same content again renews it: an old orphan is saved.
    age(store.path(fresh), 7200)
    await _publish(store, b"fresh orphan")
    assert (
        await store.collect(Known(uploads=frozenset({"live"})), grace_s=3600) == 1
    )  # `kept`, now unnamed
    assert await store.exists(fresh)


async def _publish(store: DirectoryBlobStore, data: bytes) -> Published:
    writer = store.open_writer()
    await writer.write(data)
    return await writer.publish(hashlib.sha256(data).hexdigest())
