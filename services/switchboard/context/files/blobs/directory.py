"""The blob store as a directory on one machine (the embedded default).

Layout under the root::

    blobs/<aa>/<sha256>       published blobs, ``aa`` the hash's first two digits
    staging/<upload>          a resumable upload's bytes (``stage``)
    staging/w-<random>        a streamed upload being written (``open_writer``)
    staging/k-<random>        a publish's own link to its bytes, until it is settled
    collecting/<sha256>.<id>  a collector about to delete that blob

A blob appears only whole: its bytes are written under a staging name, fsynced,
and a fresh link to them is renamed to their hash (with a new modification
time: the collector's grace counts from the newest publish); the directory is
fsynced so the rename survives a power cut. A commit links the staged upload
rather than moving it: the upload's bytes stay until the caller discards them.
Every file operation runs on this store's own small thread pool, in chunks of at
most 1 MiB, so neither the event loop nor memory grows with a file's size.

Several processes may share the directory (replicas on one machine, or on a
shared volume), so publishing and collecting cannot rely on a lock in memory.
The collector leaves a marker under ``collecting/`` before its last look at a
blob and removes it after the delete; a publish, once its blob has landed,
waits while a marker for its hash is there and then lands the blob again from
its own link if it is gone (``_settle``). Either the collector's look sees the
publish (a fresh modification time: it keeps the blob) or the publisher sees the
marker: a publish that returned has its blob. Markers are files created and
listed in one directory, so the processes must see each other's directory
changes at once: a local filesystem, or a network one without cached listings.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

from switchboard.context.files.blobs.port import (
    BlobMismatch,
    BlobNotFound,
    BlobUnavailable,
    Published,
    ReferencedCheck,
    settle,
)

#: Largest piece read or hashed at once.
CHUNK: Final = 1024 * 1024
#: Names ``collect`` asks the database about at once.
_BATCH: Final = 500
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_STAGED: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")
#: A collector never deletes a blob later than this after leaving its marker (it
#: gives up on that blob instead), so a marker older than MARKER_LIFE_S belongs to
#: a collector that died, and publishes stop waiting for it.
COLLECT_LIMIT_S: Final = 30.0
MARKER_LIFE_S: Final = 120.0
#: How often a publish looks again while a collector's marker names its blob.
_SETTLE_POLL_S: Final = (0.005, 0.25)

_T = TypeVar("_T")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_hash(sha256: str) -> None:
    if not _SHA256.fullmatch(sha256):
        raise BlobNotFound(sha256)


class DirectoryBlobStore:
    """Content-addressed blobs in a local directory."""

    kind = "directory"

    def __init__(self, root: Path, *, threads: int = 4, ephemeral: bool = False) -> None:
        """``ephemeral``: ``root`` is this process's own temporary directory, removed on close."""
        self.root = root
        self._ephemeral = ephemeral
        self._blobs = root / "blobs"
        self._staging = root / "staging"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        self._collecting = root / "collecting"
        self._collecting.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="blobs")

    async def _io(self, work: Callable[[], _T]) -> _T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)
        except OSError as exc:
            raise BlobUnavailable(f"blob directory: {exc.strerror or type(exc).__name__}") from exc

    def path(self, sha256: str) -> Path:
        """Where the blob ``sha256`` lives (tests look at the directory itself)."""
        return self._blobs / sha256[:2] / sha256

    def _staged(self, upload: str) -> Path:
        if not _STAGED.fullmatch(upload):
            raise BlobNotFound(upload)
        return self._staging / upload

    def _publish(self, source: Path, sha256: str, *, consume: bool) -> Path:
        """Land the fsynced, checked ``source`` under its hash: the publish's own link
        to the bytes, which ``_settle`` needs and then removes. ``consume``: the
        source is the caller's (a streamed upload's file), not an upload's staging."""
        keep = self._staging / f"k-{secrets.token_hex(16)}"
        try:
            os.link(source, keep)
        except FileNotFoundError:
            # Another commit of the same upload finished and discarded it meanwhile.
            raise BlobNotFound(source.name) from None
        try:
            # Fresh (the inode is shared): neither the link nor the blob is taken for
            # old by a collection running now.
            os.utime(keep)
            if consume:
                os.unlink(source)
            self._land(keep, sha256)
        except BaseException:
            keep.unlink(missing_ok=True)
            raise
        return keep

    def _land(self, keep: Path, sha256: str) -> None:
        """Rename a fresh link to ``keep``'s bytes to the hash (replacing what is there)."""
        target = self.path(sha256)
        target.parent.mkdir(exist_ok=True)
        link = self._staging / f"t-{secrets.token_hex(16)}"
        os.link(keep, link)
        try:
            os.utime(link)
            os.replace(link, target)
        finally:
            # A rename onto another name of the same inode (a concurrent publish of
            # the same staging) leaves both names.
            link.unlink(missing_ok=True)
        _fsync_dir(target.parent)

    def _collected_now(self, sha256: str, keep: Path) -> bool:
        """Whether a collector's marker names ``sha256`` (and is not a dead one's)."""
        # Touched while waiting: a long wait must not let the link age into an orphan.
        os.utime(keep)
        prefix = f"{sha256}."
        alive = time.time() - MARKER_LIFE_S
        with os.scandir(self._collecting) as entries:
            for entry in entries:
                if entry.name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime > alive:
                            return True
        return False

    async def _settle(self, sha256: str, keep: Path) -> None:
        """After a publish landed: wait while a collector is at its blob, and land it
        again from ``keep`` if that collector deleted it (``blobs.settle``)."""
        try:
            await settle(
                lambda: self._io(functools.partial(self._collected_now, sha256, keep)),
                lambda: self._io(self.path(sha256).is_file),
                lambda: self._io(functools.partial(self._land, keep, sha256)),
                poll_s=_SETTLE_POLL_S,
            )
        finally:
            await asyncio.shield(self._io(functools.partial(keep.unlink, missing_ok=True)))

    # -- resumable uploads ------------------------------------------------------------

    async def stage(self, upload: str, offset: int, data: bytes) -> None:
        path = self._staged(upload)

        def work() -> None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                # Written in place, never truncated: a retried append of the same
                # bytes at the same offset (its answer lost) leaves the file as it was.
                view = memoryview(data)
                written = 0
                while written < len(view):
                    written += os.pwrite(fd, view[written:], offset + written)
                os.fsync(fd)
            finally:
                os.close(fd)

        await self._io(work)

    async def commit(self, upload: str, size: int, sha256: str) -> Published:
        path = self._staged(upload)

        def work() -> Path:
            digest = hashlib.sha256()
            counted = 0
            try:
                handle = path.open("r+b")
            except FileNotFoundError:
                raise BlobNotFound(upload) from None
            with handle:
                while counted < size:
                    chunk = handle.read(min(CHUNK, size - counted))
                    if not chunk:
                        break
                    digest.update(chunk)
                    counted += len(chunk)
                found = digest.hexdigest()
                if counted != size or found != sha256:
                    raise BlobMismatch(size=counted, sha256=found)
                # Anything staged past the size is not the file's. (Once published,
                # the staging and the blob are one inode of exactly ``size`` bytes,
                # so a second commit's truncate changes nothing.)
                handle.truncate(size)
                handle.flush()
                os.fsync(handle.fileno())
            return self._publish(path, sha256, consume=False)

        keep = await self._io(work)
        await self._settle(sha256, keep)
        return Published(sha256=sha256, size=size)

    async def discard(self, upload: str) -> None:
        path = self._staged(upload)
        await self._io(lambda: path.unlink(missing_ok=True))

    # -- streamed uploads ---------------------------------------------------------------

    def open_writer(self) -> DirectoryBlobWriter:
        return DirectoryBlobWriter(self, self._staging / f"w-{secrets.token_hex(16)}")

    # -- published blobs ----------------------------------------------------------------

    async def read(self, sha256: str, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        _check_hash(sha256)
        path = self.path(sha256)

        def open_blob() -> int:
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise BlobNotFound(sha256) from None

        fd = await self._io(open_blob)
        try:
            position = offset
            remaining = limit if limit > 0 else -1
            while remaining != 0:
                want = CHUNK if remaining < 0 else min(CHUNK, remaining)
                chunk = await self._io(functools.partial(os.pread, fd, want, position))
                if not chunk:
                    return
                position += len(chunk)
                if remaining > 0:
                    remaining -= len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def exists(self, sha256: str) -> bool:
        if not _SHA256.fullmatch(sha256):
            return False
        path = self.path(sha256)
        return await self._io(path.is_file)

    async def delete(self, sha256: str) -> None:
        if not _SHA256.fullmatch(sha256):
            return
        path = self.path(sha256)
        await self._io(lambda: path.unlink(missing_ok=True))

    async def collect(self, referenced: ReferencedCheck, *, grace_s: float) -> int:
        cutoff = time.time() - grace_s
        removed = 0
        blobs = await self._io(lambda: _old_files(self._blobs, cutoff, nested=True))
        for start in range(0, len(blobs), _BATCH):
            batch = blobs[start : start + _BATCH]
            kept = await referenced.blobs([path.name for path in batch])
            for path in batch:
                if path.name not in kept:
                    removed += await self._io(functools.partial(self._collect_blob, path, cutoff))
        staged = await self._io(lambda: _old_files(self._staging, cutoff, nested=False))
        for start in range(0, len(staged), _BATCH):
            batch = staged[start : start + _BATCH]
            live = await referenced.uploads([path.name for path in batch])
            doomed = [path for path in batch if path.name not in live]
            removed += await self._io(functools.partial(self._unlink_old, doomed, cutoff))
        # Markers of collectors that died mid-way (they name blobs, not content).
        markers = await self._io(lambda: _old_files(self._collecting, cutoff, nested=False))
        await self._io(functools.partial(self._unlink_old, markers, cutoff))
        return removed

    def _collect_blob(self, path: Path, cutoff: float) -> int:
        """Delete the blob at ``path`` if it is still untouched since ``cutoff``, under
        a marker that publishes of the same hash wait for."""
        marker = self._collecting / f"{path.name}.{secrets.token_hex(8)}"
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        made = time.monotonic()
        try:
            # The last look, after the marker: a publish that landed before it shows
            # here; one that lands after it sees the marker.
            try:
                if path.stat().st_mtime >= cutoff:
                    return 0  # published again since it was listed
            except FileNotFoundError:
                return 0
            if time.monotonic() - made > COLLECT_LIMIT_S:
                return 0  # publishes may have stopped waiting for this marker
            try:
                path.unlink()
            except FileNotFoundError:
                return 0
            return 1
        finally:
            marker.unlink(missing_ok=True)

    def _unlink_old(self, paths: list[Path], cutoff: float) -> int:
        removed = 0
        for path in paths:
            try:
                # Written again since it was listed: not an orphan.
                if path.stat().st_mtime >= cutoff:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._ephemeral:
            await asyncio.to_thread(shutil.rmtree, self.root, True)


def _old_files(root: Path, cutoff: float, *, nested: bool) -> list[Path]:
    """Files under ``root`` (one directory level down with ``nested``) not
    modified since ``cutoff``."""
    found: list[Path] = []
    folders = [entry for entry in root.iterdir() if entry.is_dir()] if nested else [root]
    for folder in folders:
        with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if entry.is_file() and entry.stat().st_mtime < cutoff:
                        found.append(Path(entry.path))
                except FileNotFoundError:
                    continue
    return found


class DirectoryBlobWriter:
    """A streamed upload written to a staging file, hashed as it goes."""

    def __init__(self, store: DirectoryBlobStore, path: Path) -> None:
        self._store = store
        self._path = path
        self._fd = -1
        self._digest = hashlib.sha256()
        self._size = 0
        self._done = False
        # The chunk being hashed and written while the next one is received: one in
        # flight overlaps the thread's work (no interpreter lock held) with the event
        # loop's, which raised a streamed upload's rate by about a third.
        self._pending: asyncio.Future[None] | None = None

    @property
    def size(self) -> int:
        """Bytes accepted so far (the last chunk may still be being written)."""
        return self._size

    async def _settle(self) -> None:
        """Wait for the chunk in flight; its failure is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    def _open(self) -> None:
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    async def write(self, data: bytes) -> None:
        if self._done:
            raise BlobUnavailable("the writer was published or discarded")

        def work() -> None:
            self._open()
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.write(self._fd, view[written:])
            self._digest.update(data)

        await self._settle()
        self._pending = asyncio.ensure_future(self._store._io(work))
        self._size += len(data)

    async def publish(self, sha256: str) -> Published:
        if self._done:
            raise BlobUnavailable("the writer was published or discarded")
        try:
            await self._settle()
        except BaseException:
            await self.discard()
            raise
        found = self._digest.hexdigest()
        if found != sha256:
            await self.discard()
            raise BlobMismatch(size=self._size, sha256=found)

        def work() -> Path:
            self._open()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            return self._store._publish(self._path, sha256, consume=True)

        try:
            keep = await self._store._io(work)
        except BaseException:
            await self.discard()
            raise
        self._done = True
        await self._store._settle(sha256, keep)
        return Published(sha256=sha256, size=self._size)

    def _drop(self) -> None:
        """Close and remove the staging file (in a pool thread)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        try:
            self._path.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    async def discard(self) -> None:
        self._done = True
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                await asyncio.shield(pending)
            except asyncio.CancelledError:
                # The chunk in flight still uses the file: it is dropped when that
                # write ends, whatever becomes of this task.
                def after(done: asyncio.Future[None]) -> None:
                    if not done.cancelled():
                        done.exception()  # retrieved: the bytes are dropped either way
                    self._store._pool.submit(self._drop)

                pending.add_done_callback(after)
                raise
            except BlobUnavailable:
                pass  # the bytes are being dropped either way
        with contextlib.suppress(BlobUnavailable):
            await self._store._io(self._drop)
