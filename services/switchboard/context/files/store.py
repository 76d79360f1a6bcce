"""Persistence of files and resumable uploads (SQL only; see ``context/storebase.py``).

Writes that count against a workspace's storage (starting an upload, storing a
file) lock the workspace row first (``FOR UPDATE`` on PostgreSQL, an IMMEDIATE
transaction on SQLite), so two uploads cannot both fit in the last of a quota.
An upload's committed size moves only under its own row lock, and only from
the offset the append was checked against.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from switchboard.context.records import Missing
from switchboard.context.storebase import StoreBase, keyset
from switchboard.platform.errors import NotFound, QuotaExceeded
from switchboard.platform.store.models import DataExportRow, FileRow, UploadRow, WorkspaceRow
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import Idempotency, claim, earlier, retrying
from switchboard.platform.values.names import now

#: Rows one maintenance statement handles.
BATCH: Final = 500


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    workspace_id: str
    display_name: str
    media_type: str
    size_bytes: int
    sha256: str
    kind: str
    text_state: str
    text: str
    text_tokens: int
    text_error: str
    meta: bytes
    creator: str
    source_uri: str
    created_at: dt.datetime
    updated_at: dt.datetime
    deleted_at: dt.datetime | None
    version: int


@dataclass(frozen=True, slots=True)
class UploadRecord:
    id: str
    workspace_id: str
    display_name: str
    media_type: str
    size_bytes: int
    meta: bytes
    committed_size: int
    creator: str
    created_at: dt.datetime
    expires_at: dt.datetime
    file_id: str | None


_FILE_FIELDS: Final = tuple(FileRecord.__dataclass_fields__)
_UPLOAD_FIELDS: Final = tuple(UploadRecord.__dataclass_fields__)


def file_record(row: FileRow) -> FileRecord:
    return FileRecord(**{field: getattr(row, field) for field in _FILE_FIELDS})


def upload_record(row: UploadRow) -> UploadRecord:
    return UploadRecord(**{field: getattr(row, field) for field in _UPLOAD_FIELDS})


class FileStore(StoreBase):
    # -- the quota ------------------------------------------------------------------------

    def _usage(self, db: Session, workspace_id: str) -> int:
        total = db.execute(
            select(func.coalesce(func.sum(FileRow.size_bytes), 0)).where(
                FileRow.workspace_id == workspace_id, FileRow.deleted_at.is_(None)
            )
        ).scalar_one()
        return int(total)

    def _pending(self, db: Session, workspace_id: str, *, besides: str = "") -> tuple[int, int]:
        """Live unfinished uploads of the workspace (other than ``besides``): count, bytes."""
        count, total = db.execute(
            select(func.count(), func.coalesce(func.sum(UploadRow.size_bytes), 0)).where(
                UploadRow.workspace_id == workspace_id,
                UploadRow.expires_at > now(),
                UploadRow.file_id.is_(None),
                UploadRow.id != besides,
            )
        ).one()
        return int(count), int(total)

    def _check_quota(
        self, db: Session, workspace_id: str, size: int, quota: int, besides: str
    ) -> None:
        used = self._usage(db, workspace_id) + self._pending(db, workspace_id, besides=besides)[1]
        if used + size > quota:
            raise QuotaExceeded(
                f"the workspace's files would take {used + size} bytes; its storage quota is "
                f"{quota} bytes (uploads in progress count at their declared size)",
                subject="file storage per workspace",
            )

    async def usage(self, workspace_id: str) -> int:
        """Bytes the workspace's live files take."""
        return await self._run(lambda db: self._usage(db, workspace_id), write=False)

    async def check_room(self, workspace_id: str, size: int, quota: int) -> None:
        """QuotaExceeded unless ``size`` more bytes fit (a streamed upload, before its bytes)."""

        def tx(db: Session) -> None:
            workspace = db.get(WorkspaceRow, workspace_id)
            if workspace is None or workspace.deleted_at is not None:
                raise Missing("workspace", workspace_id)
            self._check_quota(db, workspace_id, size, quota, "")

        await self._run(tx, write=False)

    # -- uploads --------------------------------------------------------------------------

    async def create_upload(
        self,
        record: UploadRecord,
        idempotency: Idempotency | None,
        *,
        quota: int,
        max_uploads: int,
    ) -> UploadRecord:
        """The new upload, or the one an earlier request with the same key started."""

        def tx(db: Session) -> UploadRecord:
            self._workspace_for_update(db, record.workspace_id)
            found = claim(db, idempotency, record.id)
            if found is not None:
                row = db.get(UploadRow, found)
                if row is None:
                    raise NotFound("the upload started by this request_id is gone")
                return upload_record(row)
            if self._pending(db, record.workspace_id)[0] >= max_uploads:
                raise QuotaExceeded(
                    f"a workspace may have at most {max_uploads} uploads in progress",
                    subject="uploads in progress per workspace",
                )
            self._check_quota(db, record.workspace_id, record.size_bytes, quota, "")
            row = UploadRow(**{field: getattr(record, field) for field in _UPLOAD_FIELDS})
            db.add(row)
            return record

        return await retrying(lambda: self._run(tx, write=True))

    def _upload(
        self, db: Session, workspace_id: str, upload_id: str, *, lock: bool
    ) -> UploadRow | None:
        query = select(UploadRow).where(UploadRow.id == upload_id)
        row = db.execute(self._lock(query) if lock else query).scalar_one_or_none()
        if row is None or row.workspace_id != workspace_id:
            return None
        return row

    async def get_upload(self, workspace_id: str, upload_id: str) -> UploadRecord | None:
        def tx(db: Session) -> UploadRecord | None:
            row = self._upload(db, workspace_id, upload_id, lock=False)
            return None if row is None else upload_record(row)

        return await self._run(tx, write=False)

    async def advance_upload(
        self, workspace_id: str, upload_id: str, offset: int, size: int
    ) -> tuple[UploadRecord | None, bool]:
        """Move the committed size from ``offset`` to ``offset + size``: the upload and
        True, or as it is and False when its committed size is not ``offset`` (or it
        expired or finished meanwhile); None if it is gone."""

        def tx(db: Session) -> tuple[UploadRecord | None, bool]:
            row = self._upload(db, workspace_id, upload_id, lock=True)
            if row is None:
                return None, False
            if row.committed_size != offset or row.file_id is not None or row.expires_at <= now():
                return upload_record(row), False
            row.committed_size = offset + size
            return upload_record(row), True

        return await self._run(tx, write=True)

    async def delete_upload(self, workspace_id: str, upload_id: str) -> bool:
        def tx(db: Session) -> bool:
            row = self._upload(db, workspace_id, upload_id, lock=True)
            if row is None:
                return False
            db.delete(row)
            return True

        return await self._run(tx, write=True)

    # -- files ----------------------------------------------------------------------------

    async def earlier_file(self, idempotency: Idempotency) -> FileRecord | None:
        """The file an earlier request with this key stored, if the key is kept."""

        def tx(db: Session) -> FileRecord | None:
            found = earlier(db, idempotency)
            if found is None:
                return None
            row = db.get(FileRow, found)
            if row is None or row.deleted_at is not None:
                raise NotFound("the file stored by this request_id is gone")
            return file_record(row)

        return await self._run(tx, write=False)

    async def create_file(
        self,
        record: FileRecord,
        *,
        quota: int,
        upload_id: str = "",
        idempotency: Idempotency | None = None,
        staged: Staged[Any] | None = None,
    ) -> tuple[FileRecord, bool]:
        """Store the file's row (its blob is already published): the file and True,
        or the one an earlier request (a key, a finished upload) stored and False."""

        def tx(db: Session) -> tuple[FileRecord, bool]:
            self._workspace_for_update(db, record.workspace_id)
            upload = None
            if upload_id:
                upload = self._upload(db, record.workspace_id, upload_id, lock=True)
                if upload is None:
                    raise NotFound("the upload is gone (cancelled or expired)")
                if upload.file_id is not None:
                    return self._file_of(db, upload.file_id), False
            found = claim(db, idempotency, record.id)
            if found is not None:
                return self._file_of(db, found), False
            self._check_quota(db, record.workspace_id, record.size_bytes, quota, upload_id)
            db.add(FileRow(**{field: getattr(record, field) for field in _FILE_FIELDS}))
            if upload is not None:
                upload.file_id = record.id
                upload.committed_size = record.size_bytes
            return record, True

        return await retrying(lambda: self._run(staging(staged, tx), write=True))

    def _file_of(self, db: Session, file_id: str) -> FileRecord:
        row = db.get(FileRow, file_id)
        if row is None or row.deleted_at is not None:
            raise NotFound("the file this request stored earlier is gone")
        return file_record(row)

    async def get_file(self, workspace_id: str, file_id: str) -> FileRecord | None:
        """The live file, or None (deleted, or in another workspace)."""

        def tx(db: Session) -> FileRecord | None:
            row = db.get(FileRow, file_id)
            if row is None or row.workspace_id != workspace_id or row.deleted_at is not None:
                return None
            return file_record(row)

        return await self._run(tx, write=False)

    async def files(self, file_ids: Sequence[str]) -> list[FileRecord]:
        """The live files among ``file_ids``."""
        query = select(FileRow).where(FileRow.id.in_(list(file_ids)), FileRow.deleted_at.is_(None))
        return await self._run(
            lambda db: [file_record(row) for row in db.execute(query).scalars()], write=False
        )

    async def list_files(
        self,
        workspace_id: str,
        before: tuple[dt.datetime, str] | None,
        limit: int,
        *,
        kinds: Sequence[str],
    ) -> tuple[list[FileRecord], int]:
        """The workspace's live files, newest first, and the bytes they all take."""
        query = select(FileRow).where(
            FileRow.workspace_id == workspace_id, FileRow.deleted_at.is_(None)
        )
        if kinds:
            query = query.where(FileRow.kind.in_(list(kinds)))
        query = keyset(query, FileRow.created_at, FileRow.id, before, newest_first=True).limit(
            limit
        )

        def tx(db: Session) -> tuple[list[FileRecord], int]:
            rows = [file_record(row) for row in db.execute(query).scalars()]
            return rows, self._usage(db, workspace_id)

        return await self._run(tx, write=False, snapshot=True)

    async def delete_file(
        self, workspace_id: str, file_id: str, staged: Staged[Any] | None = None
    ) -> FileRecord | None:
        """Mark the file deleted (None if there is no live one)."""

        def tx(db: Session) -> FileRecord | None:
            row = db.execute(self._lock(select(FileRow).where(FileRow.id == file_id)))
            found = row.scalar_one_or_none()
            if found is None or found.workspace_id != workspace_id or found.deleted_at is not None:
                return None
            stamp = now()
            found.deleted_at = stamp
            found.updated_at = stamp
            found.version += 1
            return file_record(found)

        return await self._run(staging(staged, tx), write=True)

    async def set_text(
        self,
        file_id: str,
        *,
        state: str,
        text: str,
        tokens: int,
        error: str,
        staged: Staged[Any] | None = None,
    ) -> FileRecord | None:
        """Record a pending file's text (None if it is no longer pending or is deleted)."""

        def tx(db: Session) -> FileRecord | None:
            row = db.execute(self._lock(select(FileRow).where(FileRow.id == file_id)))
            found = row.scalar_one_or_none()
            if found is None or found.deleted_at is not None or found.text_state != "pending":
                return None
            found.text_state = state
            found.text = text
            found.text_tokens = tokens
            found.text_error = error
            found.updated_at = now()
            found.version += 1
            return file_record(found)

        return await self._run(staging(staged, tx), write=True)

    async def pending_files(self, limit: int, before: dt.datetime | None) -> list[FileRecord]:
        """Live files whose text is still pending (a transcription a crash interrupted),
        stored before ``before`` (None: all)."""
        query = select(FileRow).where(FileRow.text_state == "pending", FileRow.deleted_at.is_(None))
        if before is not None:
            query = query.where(FileRow.updated_at < before)
        query = query.order_by(FileRow.updated_at).limit(limit)
        return await self._run(
            lambda db: [file_record(row) for row in db.execute(query).scalars()], write=False
        )

    # -- maintenance ----------------------------------------------------------------------

    async def referenced_blobs(self, hashes: Sequence[str]) -> set[str]:
        """Those of ``hashes`` that a live file or a data export's archive names."""
        query = (
            select(FileRow.sha256)
            .where(FileRow.sha256.in_(list(hashes)), FileRow.deleted_at.is_(None))
            .distinct()
        )
        exports = select(DataExportRow.sha256).where(DataExportRow.sha256.in_(list(hashes)))
        return await self._run(
            lambda db: set(db.execute(query).scalars()) | set(db.execute(exports).scalars()),
            write=False,
        )

    async def live_uploads(self, upload_ids: Sequence[str]) -> set[str]:
        """Those of ``upload_ids`` that are unfinished uploads not past their expiry."""
        query = select(UploadRow.id).where(
            UploadRow.id.in_(list(upload_ids)),
            UploadRow.expires_at > now(),
            UploadRow.file_id.is_(None),
        )
        return await self._run(lambda db: set(db.execute(query).scalars()), write=False)

    async def expired_uploads(self, since: dt.datetime) -> list[str]:
        """Unfinished uploads that expired after ``since`` (their staging may remain)."""
        query = (
            select(UploadRow.id)
            .where(
                UploadRow.expires_at <= now(),
                UploadRow.expires_at > since,
                UploadRow.file_id.is_(None),
            )
            .limit(BATCH)
        )
        return await self._run(lambda db: list(db.execute(query).scalars()), write=False)

    async def forget_uploads(self, before: dt.datetime) -> int:
        """Delete upload rows that expired before ``before``."""
        statement = delete(UploadRow).where(UploadRow.expires_at <= before)
        return await self._run(
            lambda db: int(db.execute(statement).rowcount or 0),  # type: ignore[attr-defined]
            write=True,
        )

    async def purge_files(self, before: dt.datetime) -> int:
        """Delete the rows of files deleted before ``before``."""
        statement = delete(FileRow).where(FileRow.deleted_at <= before)
        return await self._run(
            lambda db: int(db.execute(statement).rowcount or 0),  # type: ignore[attr-defined]
            write=True,
        )
