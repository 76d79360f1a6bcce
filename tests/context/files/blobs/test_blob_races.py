"""Publishing against collecting, across replicas, on both blob stores (the directory and
S3 on a real SeaweedFS).

Two store objects over one directory or one bucket are two replicas: nothing in
memory is shared between them, only the store itself. The collector of one replica
finds a blob that no file names and that nobody touched for the grace period, looks
at it a last time, and deletes it; in the moment between that look and the delete,
the other replica publishes the same bytes again (someone uploads that content anew,
and the file's row is on its way). The interleaving is made, not hoped for: the
collector's delete is held until the other replica's publish has landed, then let go.
Whatever the interleaving, a publish that returned has its blob in the store, whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from switchboard.context.files.blobs.directory import DirectoryBlobStore
from switchboard.context.files.blobs.port import BlobStore, Published
from switchboard.context.files.blobs.s3 import CHUNK_SIZE, PART_SIZE, S3BlobStore
from tests.context.files.blobs.test_blobstores import Known, read_all, s3_store
from tests.infra.seaweedfs import SeaweedServer

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

#: Rounds of the losing interleaving per store, alternating the two ways to publish.
ROUNDS = 12
#: How long a wait for the other replica's publish to land may take.
DEADLINE_S = 30.0


Held = contextlib.AbstractContextManager[None]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Replicas:
    """Two replicas' stores over one backend, and what the test needs to know of it."""

    collector: BlobStore
    publisher: BlobStore
    #: The grace period the collector is given.
    grace_s: float
    #: Make a blob look untouched for longer than the grace period.
    age: Callable[[list[str]], Awaitable[None]]
    #: Whether a blob was published after it was aged (the publish has landed).
    landed: Callable[[str], bool]
    #: Hold the collector's delete of one blob: ``hold(sha, before_delete)``.
    hold: Callable[[str, Callable[[], None]], Held]


@contextlib.contextmanager
def held_unlink(blob: Path, before: Callable[[], None]) -> Iterator[None]:
    """Run ``before`` in the collector's thread when it is about to unlink ``blob``."""
    original = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == blob:
            before()
        original(self, missing_ok=missing_ok)

    Path.unlink = unlink  # type: ignore[method-assign]
    try:
        yield
    finally:
        Path.unlink = original  # type: ignore[method-assign]


@contextlib.contextmanager
def held_delete(store: S3BlobStore, digest: str, before: Callable[[], None]) -> Iterator[None]:
    """Run ``before`` (in a thread) when ``store`` is about to delete the blob ``digest``."""
    original = store.delete

    async def delete(sha256: str) -> None:
        if sha256 == digest:
            await asyncio.to_thread(before)
        await original(sha256)

    store.delete = delete  # type: ignore[method-assign]
    try:
        yield
    finally:
        store.delete = original  # type: ignore[method-assign]


@pytest.fixture(params=["directory", "s3"])
async def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Replicas]:
    if request.param == "directory":
        root = tmp_path / "shared-files"
        first, second = DirectoryBlobStore(root), DirectoryBlobStore(root)
        old = time.time() - 7200

        async def age(digests: list[str]) -> None:
            for digest in digests:
                os.utime(first.path(digest), (old, old))

        def landed(digest: str) -> bool:
            try:
                return first.path(digest).stat().st_mtime > old + 1
            except FileNotFoundError:
                return False

        def hold(digest: str, before: Callable[[], None]) -> Held:
            return held_unlink(first.path(digest), before)

        try:
            yield Replicas(first, second, 3600, age, landed, hold)
        finally:
            await first.close()
            await second.close()
        return
    server: SeaweedServer = request.getfixturevalue("seaweedfs")
    bucket: str = request.getfixturevalue("s3_bucket")
    collector, publisher = s3_store(server, bucket), s3_store(server, bucket)
    client = server.client()
    aged_at: list[float] = []

    async def age_s3(digests: list[str]) -> None:
        # S3 keeps the server's time of the last write (to the second), which no client
        # may set: the blobs age by the clock, past a grace period of one second.
        # (A wait for the clock itself, not for another actor.)
        aged_at.append(time.time())
        await asyncio.sleep(2.2)

    def landed_s3(digest: str) -> bool:
        try:
            head: dict[str, Any] = dict(client.head_object(Bucket=bucket, Key=f"blobs/{digest}"))
        except client.exceptions.ClientError:
            return False
        return bool(head["LastModified"].timestamp() > aged_at[-1] + 1)

    def hold_s3(digest: str, before: Callable[[], None]) -> Held:
        return held_delete(collector, digest, before)

    try:
        yield Replicas(collector, publisher, 1, age_s3, landed_s3, hold_s3)
    finally:
        await collector.close()
        await publisher.close()


async def publish_stream(store: BlobStore, data: bytes) -> Published:
    writer = store.open_writer()
    for offset in range(0, len(data), CHUNK_SIZE):
        await writer.write(data[offset : offset + CHUNK_SIZE])
    return await writer.publish(sha(data))


async def publish_staged(store: BlobStore, upload: str, data: bytes) -> Published:
    for offset in range(0, len(data), CHUNK_SIZE):
        await store.stage(upload, offset, data[offset : offset + CHUNK_SIZE])
    return await store.commit(upload, len(data), sha(data))


def wait_until(condition: Callable[[], bool], what: str, failed: Callable[[], bool]) -> None:
    """Block (the collector's thread) until ``condition``; ``failed`` ends it early."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if failed():
            return
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


async def test_a_blob_published_again_while_it_is_collected_is_kept(replicas: Replicas) -> None:
    contents = [f"round {n} ".encode() + os.urandom(64) for n in range(ROUNDS)]
    if replicas.grace_s <= 1:
        # On S3, also a blob over one part: the multipart publish and the server-side copy.
        contents[0] += os.urandom(PART_SIZE)
    digests = [sha(data) for data in contents]
    # Long ago, on the collector's replica: content that a deleted file named.
    for data in contents:
        await publish_stream(replicas.collector, data)
    await replicas.age(digests)
    for number, data in enumerate(contents):
        # Every other blob is named by a file this round: only this one is a candidate.
        others = {digest for digest in digests if digest != sha(data)}
        await race(replicas, number, data, others, streamed=number % 2 == 0)


async def race(
    replicas: Replicas, number: int, data: bytes, others: set[str], *, streamed: bool
) -> None:
    """One round: the other replica publishes ``data`` again between the collector's
    last look at its blob and the delete."""
    loop = asyncio.get_running_loop()
    digest = sha(data)
    running: list[asyncio.Future[Published]] = []

    def before_delete() -> None:
        # The collector has looked at the blob for the last time; the other replica's
        # publish (a stream, or a resumable upload's commit) lands now.
        coro = (
            publish_stream(replicas.publisher, data)
            if streamed
            else publish_staged(replicas.publisher, f"again-{number}", data)
        )
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        running.append(asyncio.wrap_future(future, loop=loop))
        wait_until(
            lambda: replicas.landed(digest),
            f"the other replica's publish of round {number} landed",
            future.done,
        )

    with replicas.hold(digest, before_delete):
        await replicas.collector.collect(Known(blobs=others), grace_s=replicas.grace_s)
    assert running, f"round {number}: the collector never came to delete the blob"
    published = await asyncio.wait_for(running[0], DEADLINE_S)
    assert published.sha256 == digest
    # The publish returned: its blob is there, whole, for the row about to name it.
    assert await replicas.publisher.exists(digest), f"round {number}: the blob was lost"
    assert await read_all(replicas.collector, digest) == data
