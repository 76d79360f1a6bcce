"""A person's data, exported (ExportMyData, GetDataExport, DownloadFile; docs/privacy.md).

ExportMyData stores a RUNNING export and wakes this process's writer; any process
serving ContextService claims RUNNING exports for a lease (a crash mid-archive leaves
it to be claimed again, and written from the start). The archive is a ZIP written to a
temporary file, then published to the blob store under its SHA-256 like any file's
bytes; the export is SUCCEEDED with its size and hash, and expires after the TTL
(its bytes are then deleted once nothing else names them). A person may ask for
``per_day`` exports a day; one that would pass ``max_bytes`` ends FAILED with
RESOURCE_EXHAUSTED.

What the archive holds: ``account.json`` (name, email, display name, created),
``memberships.json``, ``conversations/{workspace}/{conversation}.json`` (the messages
they wrote and the answers to their runs), ``memory.json`` (their memory and the items
they created), ``usage.json`` (per run: tokens and cost, never content), ``files/``
(the files they uploaded, as uploaded) and ``README.txt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Final

from google.protobuf import json_format
from google.rpc import status_pb2

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.files.blobs.port import BlobNotFound, BlobStore, BlobUnavailable
from switchboard.context.mapping import timestamp
from switchboard.context.privacy.exportstore import (
    FAILED,
    RUNNING,
    SUCCEEDED,
    ExportRecord,
    ExportStore,
)
from switchboard.platform import background
from switchboard.platform.errors import (
    DependencyUnavailable,
    FailedPrecondition,
    FieldViolation,
    NotFound,
    OutOfRange,
    QuotaExceeded,
)
from switchboard.platform.security.policy import Principal
from switchboard.platform.store.storage import idempotency
from switchboard.platform.values.names import now
from switchboard.platform.values.resources import DataExportName, UserName

log = logging.getLogger(__name__)

MEDIA_TYPE: Final = "application/zip"
#: How long one process holds an export it writes; another takes it after.
LEASE: Final = dt.timedelta(minutes=10)
#: The bytes read or written at once while the archive is built and published.
CHUNK: Final = 1024 * 1024
#: How often expired archives are looked for.
EXPIRE_EVERY_S: Final = 60.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")

Read = Callable[[str, int, int], AsyncIterator[bytes]]

README: Final = """This archive holds your data in Switchboard, as it was when it was written.

account.json        your account: name, email, display name, when it was created
memberships.json    the workspaces you are a member of, and your role in each
conversations/      per workspace and conversation, the messages you wrote and the answers
                    to your requests (runs), as JSON (Switchboard's Message format)
memory.json         the memory kept about you, and the memory items you created
usage.json          per request (run): the model, tokens and cost; never its words
files/              the files you uploaded, as you uploaded them

See docs/privacy.md in Switchboard's documentation for what is kept and why.
"""


@dataclass(frozen=True)
class ExportLimits:
    max_bytes: int = 1024 * 1024 * 1024
    ttl: dt.timedelta = dt.timedelta(days=7)
    per_day: int = 5


class TooLarge(Exception):
    """The archive would pass ``max_bytes``."""


class DataExports:
    def __init__(
        self,
        store: ExportStore,
        blobs: BlobStore,
        limits: ExportLimits,
        *,
        claimer: str,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self.limits = limits
        self._claimer = claimer
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the calls ------------------------------------------------------------------------

    async def export_my_data(
        self, principal: Principal, request: pb.ExportMyDataRequest
    ) -> pb.ExportMyDataResponse:
        key = idempotency(principal.user_id, "ExportMyData", request)
        begun = await self._store.begin(
            principal.user_id,
            since=now() - dt.timedelta(days=1),
            per_day=self.limits.per_day,
            key=key,
        )
        if begun is None:
            raise QuotaExceeded(
                f"at most {self.limits.per_day} data exports a day; try again tomorrow",
                subject="data exports per day",
            )
        record, new = begun
        if new:
            self._wake.set()
        return pb.ExportMyDataResponse(export=export_proto(record))

    async def get(self, request: pb.GetDataExportRequest) -> pb.GetDataExportResponse:
        return pb.GetDataExportResponse(export=export_proto(await self._record(request.name)))

    async def download(
        self, request: pb.DownloadFileRequest
    ) -> AsyncIterator[pb.DownloadFileResponse]:
        """DownloadFile of an export: its archive as a file (first frame), then its bytes."""
        record = await self._record(request.name)
        if record.state != SUCCEEDED:
            raise FailedPrecondition(
                f"{request.name} is {record.state}; download it once it has succeeded"
            )
        if not record.sha256:
            raise NotFound(f"{request.name} expired; ask for a new export")
        if request.read_offset > record.size_bytes:
            description = f"is beyond the file's size ({record.size_bytes})"
            raise OutOfRange(
                f"read_offset {description}",
                [FieldViolation("read_offset", description)],
                metadata={"size_bytes": str(record.size_bytes)},
            )
        yield pb.DownloadFileResponse(file=_as_file(record), offset=request.read_offset)
        offset = request.read_offset
        try:
            async for chunk in self._blobs.read(
                record.sha256, request.read_offset, request.read_limit
            ):
                yield pb.DownloadFileResponse(data=chunk, offset=offset)
                offset += len(chunk)
        except BlobNotFound:
            raise NotFound(f"{request.name} expired; ask for a new export") from None
        except BlobUnavailable:
            raise DependencyUnavailable("the file store is unavailable; retry") from None

    async def _record(self, name: str) -> ExportRecord:
        parsed = DataExportName.parse(name, "name")
        record = await self._store.get(parsed.user, parsed.export)
        if record is None:
            raise NotFound(f"{name} not found")
        return record

    # -- the writer -----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="data-exports")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        notes = background.FailureNotes(log)
        expired_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            try:
                while await self.run_once():
                    pass
                if loop.time() - expired_at >= EXPIRE_EVERY_S:
                    await self.expire()
                    expired_at = loop.time()
                notes.succeeded()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - claims expire; retried
                notes.failed("data export round failed", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXPIRE_EVERY_S):
                    await self._wake.wait()

    async def run_once(self) -> bool:
        """Write one RUNNING export; False when none is waiting."""
        record = await self._store.claim(self._claimer, LEASE)
        if record is None:
            return False
        try:
            size, sha256 = await self._write(record)
        except TooLarge:
            await self._store.finish(
                record.id,
                self._claimer,
                state=FAILED,
                error=_status(
                    8,  # RESOURCE_EXHAUSTED
                    f"the archive would pass {self.limits.max_bytes} bytes "
                    "(SWITCHBOARD_CONTEXT_EXPORT_MAX_BYTES)",
                ),
                ttl=self.limits.ttl,
            )
            return True
        except _Gone:
            await self._store.finish(
                record.id,
                self._claimer,
                state=FAILED,
                error=_status(5, "the account is gone"),  # NOT_FOUND
                ttl=self.limits.ttl,
            )
            return True
        done = await self._store.finish(
            record.id,
            self._claimer,
            state=SUCCEEDED,
            size_bytes=size,
            sha256=sha256,
            ttl=self.limits.ttl,
        )
        log.info("data export written", extra={"export": record.id, "bytes": size, "kept": done})
        return True

    async def expire(self) -> int:
        """Delete the bytes of archives past their expiry that nothing else names."""
        hashes = await self._store.expire(now())
        await self._drop_unnamed(hashes)
        return len(hashes)

    async def remove_of(self, user_id: str) -> None:
        """An erasure: the person's exports and their archives' bytes."""
        await self._drop_unnamed(await self._store.remove_of(user_id))

    async def _drop_unnamed(self, hashes: Sequence[str]) -> None:
        """Delete the bytes of ``hashes`` that no file or other export names."""
        kept = await self._store.named_hashes(hashes)
        for sha256 in sorted(set(hashes) - kept):
            await self._blobs.delete(sha256)

    async def _write(self, record: ExportRecord) -> tuple[int, str]:
        with tempfile.TemporaryDirectory(prefix="switchboard-export-") as folder:
            path = os.path.join(folder, "export.zip")
            archive = await asyncio.to_thread(
                zipfile.ZipFile, path, "w", zipfile.ZIP_DEFLATED, True
            )
            written = _Archive(archive, self.limits.max_bytes)
            try:
                await self._fill(record.user_id, written)
            finally:
                await asyncio.to_thread(archive.close)
            size = await asyncio.to_thread(os.path.getsize, path)
            if size > self.limits.max_bytes:
                raise TooLarge
            return size, await self._publish(path)

    async def _fill(self, user_id: str, archive: _Archive) -> None:
        user_name = str(UserName(user_id))
        account = await self._store.account(user_id)
        if account is None:
            raise _Gone
        await archive.json(
            "account.json",
            {
                "name": user_name,
                "email": account.email,
                "display_name": account.display_name,
                "create_time": account.created_at.isoformat(),
            },
        )
        memberships = await self._store.memberships(user_id)
        await archive.json(
            "memberships.json",
            [
                {
                    "workspace": f"workspaces/{m.workspace_id}",
                    "display_name": m.display_name,
                    "role": m.role,
                    "since": m.since.isoformat(),
                }
                for m in memberships
            ],
        )
        await self._conversations(user_name, archive)
        await archive.json("memory.json", await self._store.memory(user_id, user_name))
        await archive.json(
            "usage.json",
            [
                {
                    "run": (
                        f"workspaces/{u.workspace_id}/conversations/{u.conversation_id}"
                        f"/runs/{u.run_id}"
                    ),
                    "create_time": u.created_at.isoformat(),
                    "model": u.model,
                    "input_tokens": u.input_tokens,
                    "output_tokens": u.output_tokens,
                    "cost_micros": u.cost_micros,
                }
                for u in await self._store.usage(user_name)
            ],
        )
        for upload in await self._store.uploads(user_name):
            name = _UNSAFE.sub("_", upload.display_name)[:100] or "file"
            entry = f"files/{upload.workspace_id}/{upload.id}-{name}"
            with contextlib.suppress(BlobNotFound):
                await archive.stream(entry, self._blobs.read(upload.sha256, 0, 0))
        await archive.text("README.txt", README)

    async def _conversations(self, user_name: str, archive: _Archive) -> None:
        while await self._store.fill_authors():
            pass  # messages from before the author column: filled once, then found by it
        gathered: dict[tuple[str, str], tuple[str, list[dict[str, Any]]]] = {}
        for workspace_id, conversation_id, title, message in await self._store.messages(user_name):
            entry = gathered.setdefault((workspace_id, conversation_id), (title, []))
            entry[1].append(json_format.MessageToDict(message))
        for (workspace_id, conversation_id), (title, messages) in sorted(gathered.items()):
            await archive.json(
                f"conversations/{workspace_id}/{conversation_id}.json",
                {
                    "conversation": f"workspaces/{workspace_id}/conversations/{conversation_id}",
                    "title": title,
                    "messages": messages,
                },
            )

    async def _publish(self, path: str) -> str:
        writer = self._blobs.open_writer()
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as archive:  # noqa: ASYNC230 - read in a thread below
                while True:
                    chunk = await asyncio.to_thread(archive.read, CHUNK)
                    if not chunk:
                        break
                    digest.update(chunk)
                    await writer.write(chunk)
            published = await writer.publish(digest.hexdigest())
        except BaseException:
            await writer.discard()
            raise
        return published.sha256


class _Gone(Exception):
    """The account was deleted meanwhile."""


class _Archive:
    """A ZIP being written in a thread, counting its bytes against a limit."""

    def __init__(self, archive: zipfile.ZipFile, max_bytes: int) -> None:
        self._archive = archive
        self._left = max_bytes

    def _count(self, size: int) -> None:
        self._left -= size
        if self._left < 0:
            raise TooLarge

    async def text(self, name: str, content: str) -> None:
        data = content.encode()
        self._count(len(data))
        await asyncio.to_thread(self._archive.writestr, name, data)

    async def json(self, name: str, value: object) -> None:
        await self.text(name, json.dumps(value, indent=2, ensure_ascii=False) + "\n")

    async def stream(self, name: str, chunks: AsyncIterator[bytes]) -> None:
        info = zipfile.ZipInfo(name, date_time=_zip_time())
        info.compress_type = zipfile.ZIP_STORED  # an upload is compressed already, or small
        handle: IO[bytes] = await asyncio.to_thread(self._archive.open, info, "w", force_zip64=True)
        try:
            async for chunk in chunks:
                self._count(len(chunk))
                await asyncio.to_thread(handle.write, chunk)
        finally:
            await asyncio.to_thread(handle.close)


def _zip_time() -> tuple[int, int, int, int, int, int]:
    stamp = now()
    return (stamp.year, stamp.month, stamp.day, stamp.hour, stamp.minute, stamp.second)


def _status(code: int, message: str) -> bytes:
    data: bytes = status_pb2.Status(code=code, message=message).SerializeToString()
    return data


def export_proto(record: ExportRecord) -> pb.DataExport:
    export = pb.DataExport(
        name=str(DataExportName(record.user_id, record.id)),
        state={
            RUNNING: pb.DATA_EXPORT_STATE_RUNNING,
            SUCCEEDED: pb.DATA_EXPORT_STATE_SUCCEEDED,
            FAILED: pb.DATA_EXPORT_STATE_FAILED,
        }.get(record.state, pb.DATA_EXPORT_STATE_UNSPECIFIED),
        create_time=timestamp(record.created_at),
        done_time=timestamp(record.done_at),
        expire_time=timestamp(record.expire_at),
        size_bytes=record.size_bytes,
        media_type=MEDIA_TYPE if record.state == SUCCEEDED else "",
        sha256=record.sha256,
    )
    if record.error:
        export.error.ParseFromString(record.error)
    return export


def _as_file(record: ExportRecord) -> pb.File:
    return pb.File(
        name=str(DataExportName(record.user_id, record.id)),
        display_name=f"switchboard-export-{record.id}.zip",
        media_type=MEDIA_TYPE,
        size_bytes=record.size_bytes,
        sha256=record.sha256,
        create_time=timestamp(record.created_at),
    )
