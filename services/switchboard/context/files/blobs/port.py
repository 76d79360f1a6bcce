"""The blob store port: content-addressed bytes behind one interface, two adapters.

The context service owns a file's metadata, roles and text; the bytes live in
a blob store addressed by their SHA-256 (lowercase hex). Two adapters
implement this port, in this package: a directory beside the database on one
machine, and an S3-compatible object store scaled out.

Nothing a reader can see is ever half-written: bytes are staged under names no
reader uses, and a blob appears under its hash only whole and checked (a
rename on a directory, a completed multipart upload or copy on S3). The
database decides what exists: a blob no file row names is an orphan (a crash
between publishing a blob and storing its row, or a deleted file), and
``collect`` removes orphans older than a grace period, which publishing the
same content again resets (publishing always rewrites).

Publishing and collecting meet across replicas, which share the store and
nothing else: a collector may have looked at a blob for the last time, found it
old and unnamed, when another replica publishes the same bytes again for a
file whose row is on its way. Each adapter closes that with a marker in the
store itself: before its last look at a blob the collector leaves a marker
naming it, and removes it after the delete; after landing a blob, a publish
looks for such markers, waits until they are gone, and lands the blob again if
it was deleted meanwhile. One of the two always sees the other (each writes
before it reads, and the stores are strongly consistent), so a publish that
returned has its blob in the store: the collector either saw it renewed, or
the publisher saw the collector and put it back before returning.

Staging comes in two shapes:

- **Resumable** (StartUpload, AppendUpload, FinishUpload): ``stage`` writes one
  chunk at an offset and is durable when it returns, so another replica can
  take the upload over; ``commit`` checks the whole and publishes it, and keeps
  the staged bytes until the caller ``discard``s them once the file's row is
  stored: two FinishUpload calls at once both publish (the same bytes, the
  same blob), and an upload whose finisher died before its row can be
  finished again.
- **Streamed** (UploadFile): ``open_writer`` returns a writer that hashes as it
  goes; the caller publishes or discards it once the client's checksum arrives.

Errors: an adapter raises ``BlobUnavailable`` when its backend cannot be
reached (the domain turns it into UNAVAILABLE), ``BlobMismatch`` when staged
bytes do not have the size or SHA-256 asked for, and ``BlobNotFound`` for a
hash or staging name it does not hold. Adapters never raise request errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


class BlobError(Exception):
    """Root of the blob store's own errors (never shown to clients as text)."""


class BlobUnavailable(BlobError):
    """The backend could not be reached or failed; retrying may succeed."""


class BlobMismatch(BlobError):
    """Staged bytes do not have the size or checksum they were committed with."""

    def __init__(self, *, size: int, sha256: str) -> None:
        super().__init__("staged content does not match")
        self.size = size
        self.sha256 = sha256


class BlobNotFound(BlobError):
    """No blob with that hash, or no staged upload with that name."""


@dataclass(frozen=True)
class Published:
    """A blob now readable under its hash."""

    sha256: str
    size: int


class BlobWriter(Protocol):
    """A streamed upload being staged; hashes and counts what it is given."""

    @property
    def size(self) -> int:
        """Bytes written so far."""
        ...

    async def write(self, data: bytes) -> None:
        """Append ``data``; raises BlobUnavailable."""
        ...

    async def publish(self, sha256: str) -> Published:
        """Publish the staged bytes under their hash if it is ``sha256``.

        Raises BlobMismatch (and discards the staged bytes) if it is not.
        """
        ...

    async def discard(self) -> None:
        """Drop the staged bytes; safe to call more than once, and after publish."""
        ...


class BlobStore(Protocol):
    """Content-addressed bytes."""

    #: "directory" or "s3", for logs, health and metrics.
    kind: str

    async def stage(self, upload: str, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the staged upload ``upload`` (an id made
        of ``[a-z0-9-]``), durable when this returns.

        The caller (the database) has checked that ``offset`` is the committed
        size; writing the same offset again (a retried append whose answer was
        lost) replaces that chunk. Raises BlobUnavailable.
        """
        ...

    async def commit(self, upload: str, size: int, sha256: str) -> Published:
        """Publish the staged upload's first ``size`` bytes under ``sha256``.

        Raises BlobMismatch if they are not ``size`` bytes with that SHA-256
        (the client may still fix its checksum or append the rest),
        BlobNotFound if nothing is staged under that name. The staged bytes are
        kept either way: the caller discards them once the file's row is stored,
        so a concurrent or retried commit of the same upload publishes the same
        blob again instead of failing.
        """
        ...

    async def discard(self, upload: str) -> None:
        """Drop a staged upload; nothing if there is none."""
        ...

    def open_writer(self) -> BlobWriter:
        """A writer for a streamed upload (UploadFile)."""
        ...

    def read(self, sha256: str, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset``, at most ``limit`` (0: to the end), in
        chunks of at most 1 MiB. Memory stays flat whatever the size. Raises
        BlobNotFound, BlobUnavailable."""
        ...

    async def exists(self, sha256: str) -> bool:
        """Whether a blob is published under ``sha256``."""
        ...

    async def delete(self, sha256: str) -> None:
        """Remove a published blob; nothing if there is none."""
        ...

    async def collect(self, referenced: ReferencedCheck, *, grace_s: float) -> int:
        """Remove blobs that ``referenced`` says no file names and staged uploads
        that ``referenced`` does not know, each untouched for ``grace_s``
        seconds; returns how many were removed. Safe against publishes of the
        same content on any replica at the same time (see the module doc)."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


class ReferencedCheck(Protocol):
    """What the database holds, asked in batches by ``BlobStore.collect``."""

    async def blobs(self, hashes: list[str]) -> set[str]:
        """Those of ``hashes`` that some file row names."""
        ...

    async def uploads(self, uploads: list[str]) -> set[str]:
        """Those of ``uploads`` that are live uploads."""
        ...


async def settle(
    being_collected: Callable[[], Awaitable[bool]],
    landed: Callable[[], Awaitable[bool]],
    land: Callable[[], Awaitable[None]],
    *,
    poll_s: tuple[float, float],
) -> None:
    """A publish's side of the collector's markers (see the module doc), once its blob
    has landed: wait while ``being_collected()`` (a live collector's marker names the
    blob), looking again after ``poll_s[0]`` seconds, twice that each time up to
    ``poll_s[1]``; then, unless the blob has ``landed()`` (that collector deleted it),
    ``land()`` it again and look again. Each adapter says how to look and to land."""
    delay, longest = poll_s
    while True:
        if await being_collected():
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)
            continue
        if await landed():
            return
        await land()
