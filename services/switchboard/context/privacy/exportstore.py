"""SQL of data exports (ExportMyData, docs/privacy.md): their rows, and what an archive
reads of a person (their account, memberships, messages, memory, usage, files)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.privacy.store import PrivacyStore, creator_forms, persons_messages
from switchboard.platform.store import storage
from switchboard.platform.store.models import (
    DataExportRow,
    FileRow,
    MemoryItemRow,
    RunRow,
    UserRow,
    WorkspaceMemberRow,
    WorkspaceRow,
)
from switchboard.platform.store.storage import Idempotency
from switchboard.platform.values.names import new_id, now

RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"


@dataclass(frozen=True)
class ExportRecord:
    id: str
    user_id: str
    state: str
    created_at: dt.datetime
    done_at: dt.datetime | None
    expire_at: dt.datetime | None
    size_bytes: int
    sha256: str
    error: bytes


@dataclass(frozen=True)
class Account:
    email: str
    display_name: str
    created_at: dt.datetime


@dataclass(frozen=True)
class Membership:
    workspace_id: str
    display_name: str
    role: str
    since: dt.datetime


@dataclass(frozen=True)
class Usage:
    run_id: str
    workspace_id: str
    conversation_id: str
    created_at: dt.datetime
    model: str
    input_tokens: int
    output_tokens: int
    cost_micros: int


@dataclass(frozen=True)
class Upload:
    workspace_id: str
    id: str
    display_name: str
    media_type: str
    size_bytes: int
    sha256: str


class ExportStore(PrivacyStore):
    # -- the exports --------------------------------------------------------------------

    async def begin(
        self, user_id: str, *, since: dt.datetime, per_day: int, key: Idempotency | None
    ) -> tuple[ExportRecord, bool] | None:
        """A new RUNNING export, or the one already running (or the one ``key`` made):
        ``(export, new)``; None past ``per_day`` exports since ``since``."""

        def tx(db: Session) -> tuple[ExportRecord, bool] | None:
            if key is not None:
                earlier = storage.earlier(db, key)
                if earlier is not None:
                    row = db.get(DataExportRow, earlier)
                    if row is not None:
                        return _record(row), False
            running = db.execute(
                select(DataExportRow).where(
                    DataExportRow.user_id == user_id, DataExportRow.state == RUNNING
                )
            ).scalar_one_or_none()
            if running is not None:
                return _record(running), False
            count = db.execute(
                select(func.count()).where(
                    DataExportRow.user_id == user_id, DataExportRow.created_at >= since
                )
            ).scalar_one()
            if count >= per_day:
                return None
            row = DataExportRow(
                id=new_id(),
                user_id=user_id,
                state=RUNNING,
                created_at=now(),
                done_at=None,
                expire_at=None,
                size_bytes=0,
                sha256="",
                error=b"",
                claimer="",
                claimed_until=None,
            )
            db.add(row)
            db.flush()
            storage.claim(db, key, row.id)
            return _record(row), True

        return await self._run(tx, write=True)

    async def get(self, user_id: str, export_id: str) -> ExportRecord | None:
        def tx(db: Session) -> ExportRecord | None:
            row = db.get(DataExportRow, export_id)
            return _record(row) if row is not None and row.user_id == user_id else None

        return await self._run(tx, write=False)

    async def claim(self, claimer: str, lease: dt.timedelta) -> ExportRecord | None:
        """Take one RUNNING export no live claim holds."""

        def tx(db: Session) -> ExportRecord | None:
            stamp = now()
            free = or_(DataExportRow.claimed_until.is_(None), DataExportRow.claimed_until < stamp)
            found = db.execute(
                select(DataExportRow.id)
                .where(DataExportRow.state == RUNNING, free)
                .order_by(DataExportRow.created_at)
                .limit(1)
            ).scalar_one_or_none()
            if found is None:
                return None
            taken = db.execute(
                update(DataExportRow)
                .where(DataExportRow.id == found, DataExportRow.state == RUNNING, free)
                .values(claimer=claimer, claimed_until=stamp + lease)
            )
            if not getattr(taken, "rowcount", 0):
                return None
            row = db.get(DataExportRow, found)
            return _record(row) if row is not None else None

        return await self._run(tx, write=True)

    async def finish(
        self,
        export_id: str,
        claimer: str,
        *,
        state: str,
        size_bytes: int = 0,
        sha256: str = "",
        error: bytes = b"",
        ttl: dt.timedelta,
    ) -> bool:
        """Record the export's end (if ``claimer`` still holds it)."""

        def tx(db: Session) -> bool:
            stamp = now()
            done = db.execute(
                update(DataExportRow)
                .where(
                    DataExportRow.id == export_id,
                    DataExportRow.claimer == claimer,
                    DataExportRow.state == RUNNING,
                )
                .values(
                    state=state,
                    done_at=stamp,
                    expire_at=stamp + ttl if state == SUCCEEDED else None,
                    size_bytes=size_bytes,
                    sha256=sha256,
                    error=error,
                    claimed_until=None,
                )
            )
            return bool(getattr(done, "rowcount", 0))

        return await self._run(tx, write=True)

    async def expire(self, before: dt.datetime) -> list[str]:
        """Forget the archives of exports that expired before ``before``: the content
        hashes they named (their bytes go once nothing else names them)."""

        def tx(db: Session) -> list[str]:
            rows = db.execute(
                select(DataExportRow.id, DataExportRow.sha256).where(
                    DataExportRow.expire_at < before, DataExportRow.sha256 != ""
                )
            ).all()
            if rows:
                db.execute(
                    update(DataExportRow)
                    .where(DataExportRow.id.in_([r[0] for r in rows]))
                    .values(sha256="", size_bytes=0)
                )
            return [str(r[1]) for r in rows]

        return await self._run(tx, write=True)

    async def remove_of(self, user_id: str) -> list[str]:
        """Delete a person's exports (an erasure); the content hashes their archives had."""

        def tx(db: Session) -> list[str]:
            hashes = [
                str(h)
                for h in db.execute(
                    select(DataExportRow.sha256).where(
                        DataExportRow.user_id == user_id, DataExportRow.sha256 != ""
                    )
                ).scalars()
            ]
            db.execute(delete(DataExportRow).where(DataExportRow.user_id == user_id))
            return hashes

        return await self._run(tx, write=True)

    # -- what an archive reads ----------------------------------------------------------

    async def account(self, user_id: str) -> Account | None:
        def tx(db: Session) -> Account | None:
            row = db.get(UserRow, user_id)
            if row is None or row.erased_at is not None:
                return None
            return Account(row.email, row.display_name, row.created_at)

        return await self._run(tx, write=False)

    async def memberships(self, user_id: str) -> list[Membership]:
        def tx(db: Session) -> list[Membership]:
            rows = db.execute(
                select(
                    WorkspaceRow.id,
                    WorkspaceRow.display_name,
                    WorkspaceMemberRow.role,
                    WorkspaceMemberRow.created_at,
                )
                .join(WorkspaceMemberRow, WorkspaceMemberRow.workspace_id == WorkspaceRow.id)
                .where(WorkspaceMemberRow.user_id == user_id, WorkspaceRow.deleted_at.is_(None))
                .order_by(WorkspaceRow.id)
            ).all()
            return [Membership(str(w), str(n), str(r), c) for w, n, r, c in rows]

        return await self._run(tx, write=False)

    async def messages(self, user_name: str) -> list[tuple[str, str, str, pb.Message]]:
        """The messages of the person's in live conversations, wherever they are:
        ``(workspace id, conversation id, title, message)`` (``fill_authors`` first)."""

        def tx(db: Session) -> list[tuple[str, str, str, pb.Message]]:
            return [
                (m.workspace_id, m.conversation_id, m.title, pb.Message.FromString(m.data))
                for m in persons_messages(db, user_name)
                if not m.deleted
            ]

        return await self._run(tx, write=False)

    async def memory(self, user_id: str, user_name: str) -> list[dict[str, object]]:
        def tx(db: Session) -> list[dict[str, object]]:
            rows = db.execute(
                select(MemoryItemRow)
                .where(
                    or_(
                        MemoryItemRow.user_id == user_id,
                        MemoryItemRow.creator.in_(creator_forms(user_name)),
                    )
                )
                .order_by(MemoryItemRow.created_at, MemoryItemRow.id)
            ).scalars()
            return [
                {
                    "name": f"{row.scope}/memories/{row.id}",
                    "kind": row.kind,
                    "content": row.content,
                    "pinned": row.pinned,
                    "create_time": row.created_at.isoformat(),
                    "update_time": row.updated_at.isoformat(),
                    "expire_time": row.expires_at.isoformat() if row.expires_at else None,
                }
                for row in rows
            ]

        return await self._run(tx, write=False)

    async def usage(self, user_name: str) -> list[Usage]:
        def tx(db: Session) -> list[Usage]:
            rows = db.execute(
                select(
                    RunRow.id,
                    RunRow.workspace_id,
                    RunRow.conversation_id,
                    RunRow.created_at,
                    RunRow.model,
                    RunRow.input_tokens,
                    RunRow.output_tokens,
                    RunRow.cost_micros,
                )
                .where(RunRow.creator.in_(creator_forms(user_name)))
                .order_by(RunRow.created_at)
            ).all()
            return [Usage(*row) for row in rows]

        return await self._run(tx, write=False)

    async def uploads(self, user_name: str) -> list[Upload]:
        def tx(db: Session) -> list[Upload]:
            rows = db.execute(
                select(
                    FileRow.workspace_id,
                    FileRow.id,
                    FileRow.display_name,
                    FileRow.media_type,
                    FileRow.size_bytes,
                    FileRow.sha256,
                )
                .where(FileRow.creator.in_(creator_forms(user_name)), FileRow.deleted_at.is_(None))
                .order_by(FileRow.created_at)
            ).all()
            return [Upload(*row) for row in rows]

        return await self._run(tx, write=False)


def _record(row: DataExportRow) -> ExportRecord:
    return ExportRecord(
        row.id,
        row.user_id,
        row.state,
        row.created_at,
        row.done_at,
        row.expire_at,
        row.size_bytes,
        row.sha256,
        row.error,
    )
