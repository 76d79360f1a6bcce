"""Uploading and downloading files: ``Client.upload_file`` and ``Client.download_file``.

An upload goes one of two ways (docs/python-client.md, "Files"):

- **streamed** (the default): one ``UploadFile`` client stream, a header, chunks of
  1 MiB, then the SHA-256 computed while sending. A broken stream is an error: nothing
  is stored, and the caller sends again.
- **resumable**: ``StartUpload``, ``AppendUpload`` chunk by chunk at the committed
  size, ``FinishUpload`` with the SHA-256. A chunk that fails with ``UNAVAILABLE`` (or a
  transport error, or an offset the server no longer expects) is not the end: the
  upload asks ``GetUpload`` where the server is and goes on from there, after a backoff,
  until it has failed ``max_resumes`` times in a row without progress.

A download streams ``DownloadFile`` into a file; a stream that breaks is reopened
with ``read_offset`` at the bytes written, and the whole is checked against the
file's SHA-256.

Files are read and written on a worker thread, a chunk at a time, so neither the
event loop nor memory grows with a file's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import mimetypes
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

import grpc

from switchboard.api.context.v1 import context_pb2
from switchboard.client.backoff import Backoff
from switchboard.client.errors import (
    DataLoss,
    SwitchboardError,
    UploadOffsetMismatch,
    from_rpc_error,
)
from switchboard.client.transport.streams import resumable

if TYPE_CHECKING:
    from switchboard.api.context.v1.context_pb2_grpc import ContextServiceAsyncStub

log = logging.getLogger("switchboard.client")

#: The largest chunk the server takes in one frame or AppendUpload (and sends).
CHUNK_BYTES: Final = 1024 * 1024
DEFAULT_MEDIA_TYPE: Final = "application/octet-stream"

#: What an upload reads: a path, the bytes themselves, or a binary file object
#: (seekable: its size is sent first, and a resumable upload rereads from an offset).
Source = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]
#: Where a download writes: a path (created or truncated) or a writable binary file.
Destination = str | os.PathLike[str] | IO[bytes]


@dataclass(frozen=True)
class TransferPolicy:
    """How uploads and downloads ride out failures."""

    backoff: Backoff = field(default_factory=Backoff)
    #: Failures in a row without a byte of progress before the last one is raised.
    max_resumes: int = 8

    def __post_init__(self) -> None:
        if self.max_resumes < 0:
            raise ValueError("max_resumes must not be negative")


class _Reader:
    """A source read chunk by chunk from an offset, on a worker thread."""

    def __init__(self, source: Source) -> None:
        self._owned: IO[bytes] | None = None
        self._data: memoryview | None = None
        self._file: IO[bytes] | None = None
        self.name = ""
        if isinstance(source, bytes | bytearray | memoryview):
            self._data = memoryview(source).cast("B")
            self.size = len(self._data)
            return
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            self.name = path.name
            self._owned = self._file = path.open("rb")
        else:
            self._file = source
            self.name = Path(str(getattr(source, "name", ""))).name
        if not self._file.seekable():
            self.close()
            raise ValueError("a file object to upload must be seekable (its size is sent first)")
        self._start = self._file.tell()
        self.size = self._file.seek(0, io.SEEK_END) - self._start

    async def read(self, offset: int, limit: int = CHUNK_BYTES) -> bytes:
        if self._data is not None:
            return bytes(self._data[offset : offset + limit])
        file = self._file
        if file is None:
            raise ValueError("the source is closed")
        start = self._start + offset

        def read() -> bytes:
            file.seek(start)
            return file.read(limit)

        return await asyncio.to_thread(read)

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None


def _file_header(
    reader: _Reader, display_name: str | None, media_type: str | None
) -> context_pb2.File:
    name = display_name or reader.name
    if not name:
        raise ValueError("display_name is required when uploading bytes or a nameless file")
    guessed, _ = mimetypes.guess_type(name)
    return context_pb2.File(
        display_name=name,
        media_type=media_type or guessed or DEFAULT_MEDIA_TYPE,
        size_bytes=reader.size,
    )


async def upload_streamed(
    context: ContextServiceAsyncStub,
    workspace: str,
    source: Source,
    *,
    display_name: str | None,
    media_type: str | None,
    request_id: str,
    timeout_s: float | None,
) -> context_pb2.File:
    """One UploadFile client stream; the stored file."""
    reader = _Reader(source)
    try:
        header = context_pb2.UploadFileHeader(
            parent=workspace,
            file=_file_header(reader, display_name, media_type),
            request_id=request_id,
        )

        async def frames() -> AsyncIterator[context_pb2.UploadFileRequest]:
            yield context_pb2.UploadFileRequest(header=header)
            digest = hashlib.sha256()
            offset = 0
            while offset < reader.size:
                chunk = await reader.read(offset)
                if not chunk:
                    raise ValueError(f"the source ended at {offset} of {reader.size} bytes")
                digest.update(chunk)
                offset += len(chunk)
                yield context_pb2.UploadFileRequest(chunk=chunk)
            yield context_pb2.UploadFileRequest(sha256=digest.hexdigest())

        try:
            response = await context.UploadFile(frames(), timeout=timeout_s)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return response.file
    finally:
        reader.close()


class _Hashes:
    """SHA-256 of the source's first n bytes, for the n an upload may resume at.

    Resuming goes back at most one chunk (the append whose answer was lost may or may
    not have been kept), so the states at the last two chunk boundaries are kept; any
    other offset is hashed again from the start.
    """

    def __init__(self, reader: _Reader) -> None:
        self._reader = reader
        self._states = {0: hashlib.sha256()}

    async def at(self, offset: int) -> hashlib._Hash:
        state = self._states.get(offset)
        if state is not None:
            return state.copy()
        digest, done = hashlib.sha256(), 0
        while done < offset:
            chunk = await self._reader.read(done, min(CHUNK_BYTES, offset - done))
            if not chunk:
                raise ValueError(f"the source ended at {done} of {offset} bytes")
            digest.update(chunk)
            done += len(chunk)
        return digest

    def keep(self, offset: int, state: hashlib._Hash) -> None:
        self._states = {
            **{o: s for o, s in self._states.items() if o >= offset - CHUNK_BYTES},
            offset: state.copy(),
        }


async def upload_resumable(
    context: ContextServiceAsyncStub,
    workspace: str,
    source: Source,
    *,
    display_name: str | None,
    media_type: str | None,
    request_id: str,
    policy: TransferPolicy,
) -> context_pb2.File:
    """StartUpload, AppendUpload from the committed size, FinishUpload; the stored file."""
    reader = _Reader(source)
    try:
        file = _file_header(reader, display_name, media_type)
        started = await context.StartUpload(
            context_pb2.StartUploadRequest(parent=workspace, file=file, request_id=request_id)
        )
        name = started.upload.name
        hashes = _Hashes(reader)
        offset = started.upload.committed_size
        digest = await hashes.at(offset)
        failures = 0
        while offset < reader.size:
            chunk = await reader.read(offset)
            if not chunk:
                raise ValueError(f"the source ended at {offset} of {reader.size} bytes")
            try:
                appended = await context.AppendUpload(
                    context_pb2.AppendUploadRequest(name=name, offset=offset, data=chunk)
                )
            except SwitchboardError as error:
                committed = await _where_to_resume(context, name, error, failures, policy)
                failures += 1
                digest = await hashes.at(committed)
                offset = committed
                continue
            committed = appended.upload.committed_size
            if committed == offset + len(chunk):
                digest.update(chunk)
            else:
                digest = await hashes.at(committed)
            offset = committed
            hashes.keep(offset, digest)
            failures = 0
        finished = await context.FinishUpload(
            context_pb2.FinishUploadRequest(name=name, sha256=digest.hexdigest())
        )
        return finished.file
    finally:
        reader.close()


async def _where_to_resume(
    context: ContextServiceAsyncStub,
    name: str,
    error: SwitchboardError,
    failures: int,
    policy: TransferPolicy,
) -> int:
    """The committed size to continue from after ``error``, or ``error`` raised."""
    if failures >= policy.max_resumes:
        raise error
    if isinstance(error, UploadOffsetMismatch):
        with contextlib.suppress(KeyError, ValueError):
            return int(error.metadata["committed_size"])
    elif not resumable(error):
        raise error
    delay = policy.backoff.delay(failures, at_least_s=error.retry_delay_s)
    log.info("upload %s: resuming in %.2f s after %s", name, delay, error)
    await asyncio.sleep(delay)
    # GetUpload has no side effects: the client retries it by itself while the
    # server is away, within the call's deadline.
    got = await context.GetUpload(context_pb2.GetUploadRequest(name=name))
    return got.upload.committed_size


@dataclass
class _Received:
    """What a download has written so far."""

    out: IO[bytes]
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    written: int = 0
    metadata: context_pb2.File | None = None

    async def take(self, name: str, frame: context_pb2.DownloadFileResponse) -> None:
        if frame.HasField("file") and self.metadata is None:
            self.metadata = frame.file
        if not frame.data:
            return
        if frame.offset != self.written:
            raise DataLoss(f"{name}: a chunk at offset {frame.offset}, expected {self.written}")
        await asyncio.to_thread(self.out.write, frame.data)
        self.digest.update(frame.data)
        self.written += len(frame.data)

    def check(self, name: str) -> context_pb2.File:
        metadata = self.metadata
        if metadata is None:
            raise DataLoss(f"{name}: the stream sent no metadata")
        if self.written != metadata.size_bytes or self.digest.hexdigest() != metadata.sha256:
            raise DataLoss(
                f"{name}: received {self.written} bytes that do not match the file's size "
                f"({metadata.size_bytes}) and SHA-256"
            )
        return metadata


async def download(
    context: ContextServiceAsyncStub,
    name: str,
    destination: Destination,
    *,
    policy: TransferPolicy,
) -> context_pb2.File:
    """DownloadFile into ``destination``, reopened at the offset reached after a break;
    the file's metadata. ``DataLoss`` if the bytes do not have the file's SHA-256."""
    owned: IO[bytes] | None = None
    out: IO[bytes]
    if isinstance(destination, str | os.PathLike):
        owned = out = await asyncio.to_thread(Path(destination).open, "wb")
    else:
        out = destination
    try:
        received = _Received(out)
        failures = 0
        while True:
            before = received.written
            call = context.DownloadFile(
                context_pb2.DownloadFileRequest(name=name, read_offset=received.written)
            )
            try:
                async for frame in call:
                    await received.take(name, frame)
                break
            except grpc.RpcError as raw:
                error = from_rpc_error(raw)
                failures = 0 if received.written > before else failures
                if failures >= policy.max_resumes or not resumable(error):
                    raise error from None
                delay = policy.backoff.delay(failures, at_least_s=error.retry_delay_s)
                failures += 1
                log.info("download %s: resuming at %d after %s", name, received.written, error)
                await asyncio.sleep(delay)
            finally:
                call.cancel()
        await asyncio.to_thread(out.flush)
    finally:
        if owned is not None:
            await asyncio.to_thread(owned.close)
    return received.check(name)
