"""Files: a workspace's stored content, its uploads, reads, and maintenance.

A file is a row (``files``: what it is, who stored it, its text) naming a blob
by SHA-256 in the blob store (``blobs/port.py``). Storing one always goes blob
first, row second: the bytes are staged, checked against the client's
SHA-256, published under their hash, sniffed against the declared media type,
and only then is the row inserted (with its FILE_CHANGED event, in one
transaction). A crash in between leaves a blob no row names, which the
maintenance task collects after a grace period; a reader never sees a file
whose bytes are not whole.

Three ways in, one set of checks: the client stream (UploadFile), the
resumable steps (StartUpload, AppendUpload, FinishUpload), and ``store_bytes``
for bytes the server already holds (inline message parts, fetched URLs, tool
results). Every one is bounded: the file size, the workspace's storage quota
(uploads in progress count at their declared size), uploads in flight per
workspace, an upload's lifetime.

Documents get their text at upload (``reading/extract.py``; a PDF in a child process bounded
in time and memory, ``reading/pdfworker.py``); audio files get a
transcript in the background when a ``Transcriber`` is configured (PENDING
until then, picked up again after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Protocol

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.common import (
    Common,
    Domain,
    metadata_bytes,
    request_key,
    stored,
    write,
)
from switchboard.context.files.blobs.port import (
    BlobMismatch,
    BlobNotFound,
    BlobStore,
    BlobUnavailable,
    BlobWriter,
    Published,
)
from switchboard.context.files.mapping import (
    KINDS,
    file_event,
    file_proto,
    upload_proto,
)
from switchboard.context.files.reading.extract import Extracted, extract, extractable
from switchboard.context.files.reading.pdfworker import PdfExtractor
from switchboard.context.files.reading.sniff import HEAD_BYTES, Sniffed, check, normalize
from switchboard.context.files.reading.transcriber import Transcriber
from switchboard.context.files.store import FileRecord, FileStore, UploadRecord
from switchboard.platform.background import cancel_all
from switchboard.platform.errors import (
    ChecksumMismatch,
    DependencyUnavailable,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    RequestTooLarge,
    UploadExpired,
    UploadOffsetMismatch,
    Violations,
)
from switchboard.platform.security.policy import Permission, Policy, Principal
from switchboard.platform.store import pagination
from switchboard.platform.store.pagination import from_micros, micros
from switchboard.platform.store.storage import Idempotency
from switchboard.platform.values import names
from switchboard.platform.values.names import new_id, now
from switchboard.platform.values.resources import FileName, UploadName, WorkspaceName

log = logging.getLogger("switchboard.context.files")

MiB: Final = 1024 * 1024
#: Largest chunk of an upload frame, an append, or a download frame.
MAX_CHUNK: Final = MiB
MAX_DISPLAY_NAME_CHARS: Final = 255
MAX_SOURCE_URI_CHARS: Final = 2048
#: How often maintenance runs where the context service is served.
MAINTAIN_EVERY_S: Final = 60.0
#: Pending transcriptions picked up at once, at most.
_PICKUP: Final = 1000
#: A file pending this long is taken for one whose transcription was lost (a replica
#: died mid-way) and is transcribed again here.
STALE_PENDING: Final = dt.timedelta(minutes=10)
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
#: A workspace's bare id (``add`` takes a workspace's name or its id).
_ID: Final = re.compile(names.ID)
_SYSTEM: Final = events_pb2.Actor(name="system")


@dataclass(frozen=True)
class FileLimits:
    """Every size, count and time of files (settings ``context_files_*``)."""

    max_bytes: int = 1024 * MiB
    quota_bytes: int = 10 * 1024 * MiB
    max_uploads: int = 100
    upload_expiry_s: int = 86_400
    max_inline_bytes: int = 4 * MiB
    max_text_chars: int = 1_000_000
    max_pdf_pages: int = 500
    max_transcribe_bytes: int = 25 * MiB
    transcribe_concurrency: int = 2
    orphan_grace_s: int = 3600
    purge_after_s: int = 30 * 86_400
    #: Reading one PDF's text: its wall time, its child process's address space,
    #: and how many PDFs a process reads at once (pdfworker.py).
    extract_timeout_s: float = 60.0
    extract_memory_bytes: int = 1024 * MiB
    extract_concurrency: int = 2


@dataclass(frozen=True)
class _Declared:
    display_name: str
    media_type: str
    size: int
    meta: bytes


def _actor(principal: Principal) -> events_pb2.Actor:
    return events_pb2.Actor(
        name=principal.user_name, credential=principal.session_name or principal.api_key_name
    )


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(f"{field} {description}", [FieldViolation(field, description)])


def _workspace_id(name: str, field: str) -> str:
    return WorkspaceName.parse(name, field).workspace


def _checksum(value: str, field: str) -> str:
    if not _SHA256.fullmatch(value):
        raise _invalid(field, "must be the SHA-256 of the content, 64 lowercase hex digits")
    return value


@contextlib.contextmanager
def _blob_errors() -> Iterator[None]:
    try:
        yield
    except BlobUnavailable:
        raise DependencyUnavailable("the file store is unavailable; retry") from None


class _Referenced:
    """What the database holds, for the blob store's collector."""

    def __init__(self, store: FileStore) -> None:
        self._store = store

    async def blobs(self, hashes: list[str]) -> set[str]:
        return await self._store.referenced_blobs(hashes)

    async def uploads(self, uploads: list[str]) -> set[str]:
        return await self._store.live_uploads(uploads)


class ExportDownloads(Protocol):
    """What DownloadFile asks of data exports (``context/privacy/exports.py``)."""

    def download(
        self, request: pb.DownloadFileRequest
    ) -> AsyncIterator[pb.DownloadFileResponse]: ...


class Files(Domain):
    """Stored files: uploads, reads, deletes, text, and their maintenance."""

    def __init__(
        self,
        common: Common,
        store: FileStore,
        blobs: BlobStore,
        *,
        limits: FileLimits,
        policy: Policy | None = None,
        transcriber: Transcriber | None = None,
    ) -> None:
        super().__init__(common)
        self._store = store
        self.blobs = blobs
        #: Data exports, whose archives DownloadFile reads too (set by the domain).
        self.exports: ExportDownloads | None = None
        self.file_limits = limits
        self._policy = policy
        self._transcriber = transcriber
        self._tasks: set[asyncio.Task[Any]] = set()
        # Files being transcribed here, and how many may be at once (each holds its bytes).
        self._transcribing: set[str] = set()
        self._transcribers = asyncio.Semaphore(limits.transcribe_concurrency)
        self._maintenance: asyncio.Task[None] | None = None
        self._pdf = PdfExtractor(
            timeout_s=limits.extract_timeout_s,
            memory_bytes=limits.extract_memory_bytes,
            concurrency=limits.extract_concurrency,
        )
        self._closed = False

    # -- the API other parts of the mesh use --------------------------------------------

    async def store_bytes(
        self,
        creator: str,
        workspace: str,
        *,
        display_name: str,
        media_type: str,
        data: bytes,
        source_uri: str = "",
        metadata: struct_pb2.Struct | None = None,
    ) -> pb.File:
        """Store ``data`` as a file of ``workspace`` (``workspaces/{w}``, or its bare id)
        with every check of an upload (inline size, media type, quota); ``creator`` is
        who stored it (``users/u``, ``handlers/h``). The caller has authorized the write."""
        workspace_id = workspace.removeprefix("workspaces/")
        if not _ID.fullmatch(workspace_id):
            raise names.invalid_name(workspace, "workspace", f"{WorkspaceName.form} or its id")
        limit = self.file_limits.max_inline_bytes
        if len(data) > limit:
            raise RequestTooLarge(f"the file is larger than {limit} bytes")
        if not data:
            raise _invalid("data", "is empty")
        if len(source_uri) > MAX_SOURCE_URI_CHARS:
            raise _invalid("source_uri", f"is longer than {MAX_SOURCE_URI_CHARS} characters")
        declared = self._declared(
            pb.File(
                display_name=display_name,
                media_type=media_type,
                size_bytes=len(data),
                metadata=metadata,
            ),
            "file",
        )
        sniffed = self._sniff(declared, data[:HEAD_BYTES], "file", whole=len(data) <= HEAD_BYTES)
        await stored(self._store.check_room(workspace_id, len(data), self._quota))
        writer = self.blobs.open_writer()
        published: Published | None = None
        try:
            with _blob_errors():
                for start in range(0, len(data), MAX_CHUNK):
                    await writer.write(data[start : start + MAX_CHUNK])
                digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
                published = await writer.publish(digest)
        finally:
            if published is None:
                await writer.discard()
        return await self._admit(
            workspace_id,
            declared,
            sniffed,
            published,
            actor=events_pb2.Actor(name=creator),
            creator=creator,
            source_uri=source_uri,
        )

    async def resolve(self, workspace: str, name: str) -> pb.File:
        """The live file ``name`` of ``workspace`` (``workspaces/{w}``), BASIC view;
        NotFound when it is in another workspace or deleted."""
        return file_proto(await self._file(name, "name", workspace=workspace))

    async def texts(self, names_: Iterable[str]) -> dict[str, tuple[str, int]]:
        """The text and its token count of those of the files ``names_`` whose text is READY."""
        wanted: dict[str, str] = {}
        for name in names_:
            file = FileName.parse_or_none(name)
            if file is not None:
                wanted[file.file] = file.workspace
        if not wanted:
            return {}
        rows = await stored(self._store.files(list(wanted)))
        return {
            str(FileName(row.workspace_id, row.id)): (row.text, row.text_tokens)
            for row in rows
            if row.text_state == "ready" and wanted.get(row.id) == row.workspace_id
        }

    async def read_all(self, name: str, *, limit: int) -> bytes:
        """The whole content of the live file ``name``; RequestTooLarge beyond ``limit`` bytes."""
        row = await self._file(name, "name")
        if row.size_bytes > limit:
            raise RequestTooLarge(f"{name} is larger than {limit} bytes")
        return b"".join([chunk async for chunk in self._read(row, 0, 0)])

    async def read(self, name: str, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        """The live file ``name``'s bytes from ``offset``, at most ``limit`` (0: all), in
        chunks of at most 1 MiB."""
        row = await self._file(name, "name")
        async for chunk in self._read(row, offset, limit):
            yield chunk

    # -- uploads: one client stream -------------------------------------------------------

    async def upload_stream(
        self, principal: Principal, frames: AsyncIterator[pb.UploadFileRequest]
    ) -> pb.File:
        """UploadFile: a header, chunks in order, the SHA-256. The parent is in the first
        frame, so the workspace is authorized here (the editor role, like every write)."""
        first = await anext(frames, None)
        if first is None or first.WhichOneof("frame") != "header":
            raise _invalid("header", "must be the first frame")
        header = first.header
        workspace_id = _workspace_id(header.parent, "header.parent")
        if self._policy is not None:
            await self._policy.authorize(
                principal, header.parent, Permission.WRITE, "header.parent"
            )
        await self.common.spend_write(principal)
        declared = self._declared(header.file, "header.file")
        key = request_key(principal, "UploadFile", header)
        if key is not None:
            earlier = await stored(self._store.earlier_file(key))
            if earlier is not None:
                return file_proto(earlier)
        await stored(self._store.check_room(workspace_id, declared.size, self._quota))
        writer = self.blobs.open_writer()
        published: Published | None = None
        try:
            with _blob_errors():
                checksum, sniffed = await self._receive(frames, declared, writer)
                try:
                    published = await writer.publish(checksum)
                except BlobMismatch as mismatch:
                    raise _checksum_mismatch(mismatch) from None
        finally:
            if published is None:
                await writer.discard()
        return await self._admit(
            workspace_id,
            declared,
            sniffed,
            published,
            actor=_actor(principal),
            creator=principal.user_name,
            idempotency=key,
        )

    async def _receive(
        self,
        frames: AsyncIterator[pb.UploadFileRequest],
        declared: _Declared,
        writer: BlobWriter,
    ) -> tuple[str, Sniffed]:
        """Write the chunk frames; the checksum frame and the content's checked type."""
        head = bytearray()
        sniffed: Sniffed | None = None
        checksum = ""
        async for frame in frames:
            which = frame.WhichOneof("frame")
            if checksum:
                raise _invalid("sha256", "must be the last frame")
            if which == "sha256":
                checksum = _checksum(frame.sha256, "sha256")
                continue
            if which != "chunk":
                raise (
                    _invalid("header", "must be sent once, as the first frame")
                    if which == "header"
                    else _invalid("frame", "is empty: set header, chunk or sha256")
                )
            chunk = frame.chunk
            _check_chunk(chunk, "chunk", writer.size, declared.size)
            if sniffed is None and len(head) < HEAD_BYTES:
                head += chunk[: HEAD_BYTES - len(head)]
                if len(head) >= HEAD_BYTES:
                    # Refused at the first 8 KiB, not after a gigabyte.
                    sniffed = self._sniff(declared, bytes(head), "header.file")
            await writer.write(chunk)
        if not checksum:
            raise _invalid("sha256", "is required as the last frame")
        if writer.size != declared.size:
            raise _invalid(
                "header.file.size_bytes", f"is {declared.size}, but {writer.size} bytes were sent"
            )
        if sniffed is None:
            sniffed = self._sniff(declared, bytes(head), "header.file", whole=True)
        return checksum, sniffed

    # -- uploads: resumable steps ---------------------------------------------------------

    @write
    async def start_upload(self, principal: Principal, request: pb.StartUploadRequest) -> pb.Upload:
        workspace_id = _workspace_id(request.parent, "parent")
        declared = self._declared(request.file, "file")
        stamp = now()
        record = UploadRecord(
            id=new_id(),
            workspace_id=workspace_id,
            display_name=declared.display_name,
            media_type=declared.media_type,
            size_bytes=declared.size,
            meta=declared.meta,
            committed_size=0,
            creator=principal.user_name,
            created_at=stamp,
            expires_at=stamp + dt.timedelta(seconds=self.file_limits.upload_expiry_s),
            file_id=None,
        )
        made = await stored(
            self._store.create_upload(
                record,
                request_key(principal, "StartUpload", request),
                quota=self._quota,
                max_uploads=self.file_limits.max_uploads,
            )
        )
        return upload_proto(made)

    async def append_upload(
        self, principal: Principal, request: pb.AppendUploadRequest
    ) -> pb.Upload:
        workspace_id, upload_id = self._upload_name(request.name)
        if request.offset < 0:
            raise _invalid("offset", "must not be negative")
        upload = await self._live_upload(request.name, workspace_id, upload_id)
        if upload.committed_size != request.offset:
            raise _offset_mismatch(upload)
        _check_chunk(request.data, "data", request.offset, upload.size_bytes)
        end = request.offset + len(request.data)
        if request.offset == 0 and (len(request.data) >= HEAD_BYTES or end == upload.size_bytes):
            # The content's head is here: a lying media type is refused before the rest.
            self._sniff(
                _Declared(upload.display_name, upload.media_type, upload.size_bytes, b""),
                request.data[:HEAD_BYTES],
                "file",
                whole=end == upload.size_bytes,
            )
        with _blob_errors():
            await self.blobs.stage(upload_id, request.offset, request.data)
        advanced, moved = await stored(
            self._store.advance_upload(workspace_id, upload_id, request.offset, len(request.data))
        )
        if advanced is None:
            raise NotFound(f"{request.name} not found")
        if not moved:
            # A concurrent append (or expiry) won: report where the upload stands.
            await self._live_upload(request.name, workspace_id, upload_id)
            raise _offset_mismatch(advanced)
        return upload_proto(advanced)

    async def get_upload(self, name: str) -> pb.Upload:
        workspace_id, upload_id = self._upload_name(name)
        row = await stored(self._store.get_upload(workspace_id, upload_id))
        if row is None:
            raise NotFound(f"{name} not found")
        if row.file_id is None:
            await self._check_expiry(row)
        return upload_proto(row)

    @write
    async def finish_upload(self, principal: Principal, request: pb.FinishUploadRequest) -> pb.File:
        workspace_id, upload_id = self._upload_name(request.name)
        checksum = _checksum(request.sha256, "sha256")
        row = await stored(self._store.get_upload(workspace_id, upload_id))
        if row is None:
            raise NotFound(f"{request.name} not found")
        if row.file_id is not None:
            # A retry whose first answer was lost: the file it stored.
            return file_proto(await self._stored_file(FileName(workspace_id, row.file_id)))
        await self._check_expiry(row)
        if row.committed_size != row.size_bytes:
            raise FailedPrecondition(
                f"the upload has {row.committed_size} of its {row.size_bytes} bytes; append "
                "the rest first",
                metadata={"committed_size": str(row.committed_size)},
            )
        declared = _Declared(row.display_name, row.media_type, row.size_bytes, row.meta)
        try:
            with _blob_errors():
                # The staged bytes stay until the file's row is stored: FinishUpload
                # calls at once each publish the same blob, and the first row stored
                # is the file every one of them answers.
                published = await self.blobs.commit(upload_id, row.size_bytes, checksum)
        except BlobMismatch as mismatch:
            raise _checksum_mismatch(mismatch) from None
        except BlobNotFound:
            # The staging is gone: a concurrent FinishUpload stored the file and
            # discarded it (its file), or the upload was cancelled or expired.
            again = await stored(self._store.get_upload(workspace_id, upload_id))
            if again is not None and again.file_id is not None:
                return file_proto(await self._stored_file(FileName(workspace_id, again.file_id)))
            raise FailedPrecondition(
                f"{request.name}'s bytes were discarded (cancelled or expired); GetUpload "
                "says which"
            ) from None
        head = b"".join([c async for c in self._blob_read(published.sha256, 0, HEAD_BYTES)])
        try:
            sniffed = self._sniff(declared, head, "file", whole=published.size <= HEAD_BYTES)
        except InvalidArgument:
            # The content contradicts the declared type: no checksum can fix that.
            await self._store.delete_upload(workspace_id, upload_id)
            await self._discard_staging(upload_id)
            raise
        stored_file = await self._admit(
            workspace_id,
            declared,
            sniffed,
            published,
            actor=_actor(principal),
            creator=row.creator,
            upload_id=upload_id,
        )
        await self._discard_staging(upload_id)
        return stored_file

    @write
    async def cancel_upload(self, principal: Principal, name: str) -> None:
        workspace_id, upload_id = self._upload_name(name)
        if not await stored(self._store.delete_upload(workspace_id, upload_id)):
            raise NotFound(f"{name} not found")
        with _blob_errors():
            await self.blobs.discard(upload_id)

    # -- files ----------------------------------------------------------------------------

    async def get(self, request: pb.GetFileRequest) -> pb.File:
        if request.view not in (pb.FILE_VIEW_UNSPECIFIED, pb.FILE_VIEW_BASIC, pb.FILE_VIEW_FULL):
            raise _invalid("view", "is not a file view")
        row = await self._file(request.name, "name")
        return file_proto(row, full=request.view == pb.FILE_VIEW_FULL)

    async def list(self, request: pb.ListFilesRequest) -> pb.ListFilesResponse:
        workspace_id = _workspace_id(request.parent, "parent")
        kinds: list[str] = []
        for index, kind in enumerate(request.kinds):
            if kind not in KINDS:
                raise _invalid(f"kinds[{index}]", "is not a file kind")
            kinds.append(KINDS[kind])
        pages = self.common.pages
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        token = pagination.fingerprint("files", workspace_id, sorted(kinds))
        before = None
        if request.page_token:
            stamp, last = pages.decode(
                request.page_token, token, (pagination.MICROS, pagination.ID)
            )
            before = (from_micros(stamp), str(last))
        rows, usage = await stored(
            self._store.list_files(workspace_id, before, size + 1, kinds=kinds)
        )
        response = pb.ListFilesResponse(
            files=[file_proto(row) for row in rows[:size]], workspace_usage_bytes=usage
        )
        if len(rows) > size:
            last_row = rows[size - 1]
            response.next_page_token = pages.encode(
                [micros(last_row.created_at), last_row.id], token
            )
        return response

    async def download(
        self, request: pb.DownloadFileRequest
    ) -> AsyncIterator[pb.DownloadFileResponse]:
        """DownloadFile: the file first, then its bytes in chunks of at most 1 MiB (a data
        export's archive too: ``users/{user}/exports/{export}``)."""
        violations = Violations()
        if request.read_offset < 0:
            violations.add("read_offset", "must not be negative")
        if request.read_limit < 0:
            violations.add("read_limit", "must not be negative")
        violations.check()
        if self.exports is not None and request.name.startswith("users/"):
            async for frame in self.exports.download(request):
                yield frame
            return
        row = await self._file(request.name, "name")
        if request.read_offset > row.size_bytes:
            # AIP-193: well formed, but the file is shorter (its end itself reads nothing).
            description = f"is beyond the file's size ({row.size_bytes})"
            raise OutOfRange(
                f"read_offset {description}",
                [FieldViolation("read_offset", description)],
                metadata={"size_bytes": str(row.size_bytes)},
            )
        yield pb.DownloadFileResponse(file=file_proto(row), offset=request.read_offset)
        offset = request.read_offset
        async for chunk in self._read(row, request.read_offset, request.read_limit):
            yield pb.DownloadFileResponse(data=chunk, offset=offset)
            offset += len(chunk)

    @write
    async def delete(self, principal: Principal, name: str) -> None:
        file = FileName.parse(name, "name")
        staged = self.common.staged(
            lambda done: (
                [file_event(_actor(principal), events_pb2.CHANGE_KIND_DELETED, done)]
                if done is not None
                else None
            )
        )
        row = await stored(self._store.delete_file(file.workspace, file.file, staged))
        if row is None:
            raise NotFound(f"{name} not found")
        await self.common.announce(staged)

    # -- background work ------------------------------------------------------------------

    async def start(self, *, maintain: bool) -> None:
        """Start maintenance and pick up interrupted transcriptions (where ContextService
        is served)."""
        if not maintain:
            return
        self._maintenance = asyncio.create_task(self._maintain(), name="files-maintenance")

    async def close(self) -> None:
        self._closed = True
        maintenance = [self._maintenance] if self._maintenance is not None else []
        await cancel_all([*self._tasks, *maintenance])
        await self._pdf.close()
        await self.blobs.close()

    async def maintain_once(self, *, collect: bool = True) -> int:
        """Discard expired uploads' staging, forget old upload and deleted file rows, and
        (with ``collect``) collect orphaned blobs; returns how many blobs and stagings
        were removed."""
        stamp = now()
        expiry = dt.timedelta(seconds=self.file_limits.upload_expiry_s)
        with _blob_errors():
            for upload_id in await self._store.expired_uploads(stamp - expiry):
                await self.blobs.discard(upload_id)
            await self._store.forget_uploads(stamp - expiry)
            await self._store.purge_files(
                stamp - dt.timedelta(seconds=self.file_limits.purge_after_s)
            )
            if not collect:
                return 0
            return await self.blobs.collect(
                _Referenced(self._store), grace_s=self.file_limits.orphan_grace_s
            )

    async def _maintain(self) -> None:
        # Listing every blob is the costly part: a few times per grace period is enough.
        collect_every = max(MAINTAIN_EVERY_S, self.file_limits.orphan_grace_s / 4)
        collected_at = -collect_every
        loop = asyncio.get_running_loop()
        stale_before: dt.datetime | None = None  # at start: every pending file
        while not self._closed:
            try:
                await self._pick_up(stale_before)
                due = loop.time() - collected_at >= collect_every
                await self.maintain_once(collect=due)
                if due:
                    collected_at = loop.time()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("files maintenance failed; retrying later", exc_info=True)
            stale_before = now() - STALE_PENDING
            await asyncio.sleep(MAINTAIN_EVERY_S)

    async def _pick_up(self, before: dt.datetime | None) -> None:
        """Transcribe files left pending (by a crash, or a replica that went away)."""
        if self._transcriber is None:
            for row in await self._store.pending_files(_PICKUP, now() - STALE_PENDING):
                await self._set_text(row, Extracted(error="no transcription endpoint is set"))
            return
        for row in await self._store.pending_files(_PICKUP, before):
            self._spawn(row, self._transcriber)

    def _spawn(self, row: FileRecord, transcriber: Transcriber) -> None:
        if row.id in self._transcribing:
            return
        self._transcribing.add(row.id)
        task = asyncio.create_task(self._transcribe(row, transcriber), name=f"transcribe-{row.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._transcribing.discard(row.id))

    async def _transcribe(self, row: FileRecord, transcriber: Transcriber) -> None:
        limit = self.file_limits.max_transcribe_bytes
        if row.size_bytes > limit:
            await self._set_text(
                row, Extracted(error=f"the audio is larger than {limit} bytes to transcribe")
            )
            return
        try:
            async with self._transcribers:
                data = b"".join([c async for c in self._blob_read(row.sha256, 0, 0)])
                text = await transcriber.transcribe(
                    data, media_type=row.media_type, filename=row.display_name
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("transcription failed", extra={"file": row.id}, exc_info=True)
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            await self._set_text(
                row,
                Extracted(error=f"transcription failed: {reason or type(exc).__name__}"),
            )
            return
        await self._set_text(row, Extracted(text=text[: self.file_limits.max_text_chars]))

    async def _set_text(self, row: FileRecord, extracted: Extracted) -> None:
        tokens = await asyncio.to_thread(self.common.counter.count, extracted.text)
        staged = self.common.staged(
            lambda done: (
                [file_event(_SYSTEM, events_pb2.CHANGE_KIND_UPDATED, done)]
                if done is not None
                else None
            )
        )
        await self._store.set_text(
            row.id,
            state="failed" if extracted.error else "ready",
            text=extracted.text,
            tokens=tokens,
            error=extracted.error,
            staged=staged,
        )
        await self.common.announce(staged)

    # -- shared steps ---------------------------------------------------------------------

    @property
    def _quota(self) -> int:
        return self.file_limits.quota_bytes

    def _declared(self, file: pb.File, prefix: str) -> _Declared:
        violations = Violations()
        display_name = file.display_name
        field = f"{prefix}.display_name"
        if not display_name.strip():
            violations.add(field, "is required")
        elif len(display_name) > MAX_DISPLAY_NAME_CHARS:
            violations.add(field, f"is longer than {MAX_DISPLAY_NAME_CHARS} characters")
        elif _CONTROL.search(display_name):
            violations.add(field, "must not contain control characters")
        media_type = ""
        try:
            media_type = normalize(file.media_type, f"{prefix}.media_type")
        except InvalidArgument as bad:
            violations.items.extend(bad.violations)
        if file.size_bytes <= 0:
            violations.add(f"{prefix}.size_bytes", "must be the content's exact size, at least 1")
        violations.check()
        if file.size_bytes > self.file_limits.max_bytes:
            raise RequestTooLarge(
                f"{prefix}.size_bytes is over the largest file size "
                f"({self.file_limits.max_bytes} bytes)"
            )
        meta = b""
        if file.HasField("metadata"):
            meta = metadata_bytes(
                file.metadata, f"{prefix}.metadata", self.limits.max_metadata_bytes
            )
        return _Declared(display_name, media_type, file.size_bytes, meta)

    def _sniff(
        self, declared: _Declared, head: bytes, prefix: str, *, whole: bool = False
    ) -> Sniffed:
        return check(declared.media_type, head, whole=whole, field=f"{prefix}.media_type")

    def _upload_name(self, name: str) -> tuple[str, str]:
        upload = UploadName.parse(name, "name")
        return upload.workspace, upload.upload

    async def _live_upload(self, name: str, workspace_id: str, upload_id: str) -> UploadRecord:
        row = await stored(self._store.get_upload(workspace_id, upload_id))
        if row is None:
            raise NotFound(f"{name} not found")
        if row.file_id is not None:
            raise FailedPrecondition(
                f"{name} is finished; it stored {FileName(workspace_id, row.file_id)}"
            )
        await self._check_expiry(row)
        return row

    async def _discard_staging(self, upload_id: str) -> None:
        """Drop a finished upload's staged bytes; collection removes what this cannot
        (a finished upload is not live)."""
        try:
            await self.blobs.discard(upload_id)
        except BlobUnavailable:
            log.warning("could not discard a finished upload's staging (collection will)")

    async def _check_expiry(self, row: UploadRecord) -> None:
        if row.expires_at > now():
            return
        with contextlib.suppress(BlobUnavailable):
            await self.blobs.discard(row.id)
        raise UploadExpired(
            f"{UploadName(row.workspace_id, row.id)} expired unfinished and was discarded; "
            "start a new upload"
        )

    async def _file(self, name: str, field: str, *, workspace: str = "") -> FileRecord:
        file = FileName.parse(name, field)
        if workspace and workspace.removeprefix("workspaces/") != file.workspace:
            raise NotFound(f"{name} not found")
        return await self._stored_file(file)

    async def _stored_file(self, file: FileName) -> FileRecord:
        row = await stored(self._store.get_file(file.workspace, file.file))
        if row is None:
            raise NotFound(f"{file} not found")
        return row

    async def _read(self, row: FileRecord, offset: int, limit: int) -> AsyncIterator[bytes]:
        async for chunk in self._blob_read(row.sha256, offset, limit):
            yield chunk

    async def _blob_read(self, sha256: str, offset: int, limit: int) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.blobs.read(sha256, offset, limit):
                yield chunk
        except BlobNotFound:
            raise NotFound("the file's content is gone (it was deleted)") from None
        except BlobUnavailable:
            raise DependencyUnavailable("the file store is unavailable; retry") from None

    async def _admit(
        self,
        workspace_id: str,
        declared: _Declared,
        sniffed: Sniffed,
        published: Published,
        *,
        actor: events_pb2.Actor,
        creator: str,
        source_uri: str = "",
        upload_id: str = "",
        idempotency: Idempotency | None = None,
    ) -> pb.File:
        """Insert the row of a published blob: its text extracted, or pending for audio."""
        text_state, extracted = "none", Extracted()
        if sniffed.kind == pb.FILE_KIND_DOCUMENT and extractable(sniffed.media_type):
            extracted = await self._extract(published.sha256, sniffed.media_type)
            text_state = "failed" if extracted.error else "ready"
        elif sniffed.kind == pb.FILE_KIND_AUDIO and self._transcriber is not None:
            text_state = "pending"
        tokens = 0
        if extracted.text:
            tokens = await asyncio.to_thread(self.common.counter.count, extracted.text)
        stamp = now()
        record = FileRecord(
            id=new_id(),
            workspace_id=workspace_id,
            display_name=declared.display_name,
            media_type=sniffed.media_type,
            size_bytes=published.size,
            sha256=published.sha256,
            kind=KINDS[sniffed.kind],
            text_state=text_state,
            text=extracted.text,
            text_tokens=tokens,
            text_error=extracted.error,
            meta=declared.meta,
            creator=creator,
            source_uri=source_uri,
            created_at=stamp,
            updated_at=stamp,
            deleted_at=None,
            version=1,
        )
        staged = self.common.staged(
            lambda made: (
                [file_event(actor, events_pb2.CHANGE_KIND_CREATED, made[0])] if made[1] else None
            ),
            idempotency.key if idempotency is not None else "",
        )
        row, created = await stored(
            self._store.create_file(
                record,
                quota=self._quota,
                upload_id=upload_id,
                idempotency=idempotency,
                staged=staged,
            )
        )
        await self.common.announce(staged)
        if created and row.text_state == "pending" and self._transcriber and not self._closed:
            self._spawn(row, self._transcriber)
        return file_proto(row)

    async def _extract(self, sha256: str, media_type: str) -> Extracted:
        limits = self.file_limits
        if media_type == "application/pdf":
            return await self._extract_pdf(sha256)
        # Text needs at most 4 bytes a character: decoding that much is bounded.
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=MAX_CHUNK)  # noqa: SIM115
        try:
            async for chunk in self._blob_read(sha256, 0, limits.max_text_chars * 4 + 1):
                await asyncio.to_thread(spool.write, chunk)
            await asyncio.to_thread(spool.seek, 0)
            return await asyncio.to_thread(
                extract,
                spool,
                media_type,
                max_chars=limits.max_text_chars,
                max_pages=limits.max_pdf_pages,
            )
        finally:
            await asyncio.to_thread(spool.close)

    async def _extract_pdf(self, sha256: str) -> Extracted:
        """A PDF's text, read whole from a file on disk by a bounded child process."""
        limits = self.file_limits
        folder = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="switchboard-pdf-"))
        try:
            source = folder / "document.pdf"
            handle = await asyncio.to_thread(source.open, "wb")
            try:
                async for chunk in self._blob_read(sha256, 0, 0):
                    await asyncio.to_thread(handle.write, chunk)
            finally:
                await asyncio.to_thread(handle.close)
            extracted = await self._pdf.extract(
                source, max_chars=limits.max_text_chars, max_pages=limits.max_pdf_pages
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)
        if extracted.error:
            log.info("a PDF's text was not extracted: %s", extracted.error)
        return extracted


def _check_chunk(chunk: bytes, field: str, offset: int, size: int) -> None:
    if not chunk:
        raise _invalid(field, "is empty")
    if len(chunk) > MAX_CHUNK:
        raise _invalid(field, "is larger than 1 MiB")
    if offset + len(chunk) > size:
        raise _invalid(field, f"overruns the declared size_bytes ({size}) at offset {offset}")


def _checksum_mismatch(mismatch: BlobMismatch) -> ChecksumMismatch:
    return ChecksumMismatch(
        f"the content received ({mismatch.size} bytes) does not have the SHA-256 given; "
        "nothing was stored",
        [FieldViolation("sha256", "does not match the content received")],
    )


def _offset_mismatch(upload: UploadRecord) -> UploadOffsetMismatch:
    return UploadOffsetMismatch(
        f"the upload's committed size is {upload.committed_size}; append from there",
        metadata={"committed_size": str(upload.committed_size)},
    )
