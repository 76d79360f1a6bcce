"""Persistence of workspaces and their members (see ``storebase.py`` for the rules)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from switchboard.context.records import (
    Exists,
    MemberRecord,
    Missing,
    WorkspaceRecord,
)
from switchboard.context.storebase import (
    StoreBase,
    apply_changes,
    counted,
    keyset,
    member_record,
    require_room,
    set_deleted,
    workspace_record,
)
from switchboard.platform.errors import FailedPrecondition
from switchboard.platform.events.erasure.store import add_erasure
from switchboard.platform.store.models import UserRow, WorkspaceMemberRow, WorkspaceRow
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import Idempotency, check_etag, claim, retrying
from switchboard.platform.values.names import now


class WorkspaceStore(StoreBase):
    async def create_workspace(
        self,
        workspace_id: str,
        display_name: str,
        description: str,
        owner_id: str,
        idempotency: Idempotency | None,
        max_owned: int,
        staged: Staged[Any] | None = None,
    ) -> tuple[WorkspaceRecord, bool]:
        """The new workspace (its owner a member) and True; a replay: the earlier one, False."""

        def tx(db: Session) -> tuple[WorkspaceRecord, bool]:
            earlier = claim(db, idempotency, workspace_id)
            if earlier is not None:
                found = db.get(WorkspaceRow, earlier)
                if found is None:
                    raise Missing("workspace", earlier)
                return workspace_record(found), False
            require_room(
                db,
                counted(
                    WorkspaceMemberRow,
                    WorkspaceMemberRow.user_id == owner_id,
                    WorkspaceMemberRow.role == "owner",
                ),
                max_owned,
                f"a user may own at most {max_owned} workspaces",
                "workspaces per owner",
            )
            if db.get(WorkspaceRow, workspace_id) is not None:
                raise Exists("workspace", workspace_id)
            stamp = now()
            row = WorkspaceRow(
                id=workspace_id,
                display_name=display_name,
                description=description,
                created_at=stamp,
                updated_at=stamp,
                deleted_at=None,
                version=1,
            )
            db.add(row)
            db.flush()
            db.add(
                WorkspaceMemberRow(
                    workspace_id=workspace_id,
                    user_id=owner_id,
                    role="owner",
                    created_at=stamp,
                    updated_at=stamp,
                )
            )
            return workspace_record(row), True

        return await retrying(lambda: self._run(staging(staged, tx), write=True))

    async def get_workspace(self, workspace_id: str) -> WorkspaceRecord | None:
        def tx(db: Session) -> WorkspaceRecord | None:
            row = db.get(WorkspaceRow, workspace_id)
            return workspace_record(row) if row is not None else None

        return await self._run(tx, write=False)

    async def list_workspaces(
        self,
        user_id: str,
        after: tuple[dt.datetime, str] | None,
        limit: int,
        *,
        show_deleted: bool,
    ) -> list[tuple[WorkspaceRecord, str]]:
        """The user's workspaces with the user's role in each, oldest first."""
        query = (
            select(WorkspaceRow, WorkspaceMemberRow.role)
            .join(WorkspaceMemberRow, WorkspaceMemberRow.workspace_id == WorkspaceRow.id)
            .where(WorkspaceMemberRow.user_id == user_id)
        )
        if show_deleted:
            # Deleted workspaces are visible to their owners only (to restore them).
            query = query.where(
                or_(WorkspaceRow.deleted_at.is_(None), WorkspaceMemberRow.role == "owner")
            )
        else:
            query = query.where(WorkspaceRow.deleted_at.is_(None))
        query = keyset(query, WorkspaceRow.created_at, WorkspaceRow.id, after).limit(limit)

        def tx(db: Session) -> list[tuple[WorkspaceRecord, str]]:
            return [(workspace_record(row), role) for row, role in db.execute(query).all()]

        return await self._run(tx, write=False)

    async def update_workspace(
        self,
        workspace_id: str,
        etag: str,
        changes: dict[str, Any],
        staged: Staged[Any] | None = None,
    ) -> WorkspaceRecord:
        def tx(db: Session) -> WorkspaceRecord:
            row = self._workspace_for_update(db, workspace_id)
            check_etag(etag, row.version)
            apply_changes(row, changes)
            return workspace_record(row)

        return await self._run(staging(staged, tx), write=True)

    async def set_workspace_deleted(
        self,
        workspace_id: str,
        etag: str,
        *,
        deleted: bool,
        staged: Staged[Any] | None = None,
    ) -> WorkspaceRecord:
        def tx(db: Session) -> WorkspaceRecord:
            row = self._workspace_for_update(db, workspace_id, include_deleted=True)
            check_etag(etag, row.version)
            set_deleted(row, deleted, "workspace", workspace_id)
            return workspace_record(row)

        return await self._run(staging(staged, tx), write=True)

    # -- members -----------------------------------------------------------------------

    async def add_member(
        self,
        workspace_id: str,
        user_id: str,
        role: str,
        max_members: int,
        staged: Staged[Any] | None = None,
    ) -> MemberRecord:
        def tx(db: Session) -> MemberRecord:
            self._workspace_for_update(db, workspace_id)
            if db.get(UserRow, user_id) is None:
                raise Missing("user", user_id)
            if db.get(WorkspaceMemberRow, (workspace_id, user_id)) is not None:
                raise Exists("member", workspace_id, user_id)
            require_room(
                db,
                counted(WorkspaceMemberRow, WorkspaceMemberRow.workspace_id == workspace_id),
                max_members,
                f"a workspace may have at most {max_members} members",
                "members per workspace",
            )
            stamp = now()
            row = WorkspaceMemberRow(
                workspace_id=workspace_id,
                user_id=user_id,
                role=role,
                created_at=stamp,
                updated_at=stamp,
            )
            db.add(row)
            return member_record(row)

        return await self._run(staging(staged, tx), write=True)

    async def update_member(
        self, workspace_id: str, user_id: str, role: str, staged: Staged[Any] | None = None
    ) -> MemberRecord:
        def tx(db: Session) -> MemberRecord:
            self._workspace_for_update(db, workspace_id)
            row = _member(db, workspace_id, user_id)
            if row.role == "owner" and role != "owner":
                _keep_an_owner(db, workspace_id)
            row.role = role
            row.updated_at = now()
            return member_record(row)

        return await self._run(staging(staged, tx), write=True)

    async def remove_member(
        self,
        workspace_id: str,
        user_id: str,
        staged: Staged[Any] | None = None,
        *,
        erase: bool = False,
    ) -> MemberRecord:
        """Remove the membership; with ``erase``, write (in this transaction) the erasure
        of what the member wrote in the workspace (``platform/events/erasure``)."""

        def tx(db: Session) -> MemberRecord:
            self._workspace_for_update(db, workspace_id)
            row = _member(db, workspace_id, user_id)
            if row.role == "owner":
                _keep_an_owner(db, workspace_id)
            db.delete(row)
            if erase:
                add_erasure(db, user_id, b"", [workspace_id])
            return member_record(row)

        return await self._run(staging(staged, tx), write=True)

    async def list_members(
        self, workspace_id: str, after_user: str, limit: int
    ) -> list[MemberRecord]:
        query = select(WorkspaceMemberRow).where(WorkspaceMemberRow.workspace_id == workspace_id)
        if after_user:
            query = query.where(WorkspaceMemberRow.user_id > after_user)
        query = query.order_by(WorkspaceMemberRow.user_id).limit(limit)

        def tx(db: Session) -> list[MemberRecord]:
            return [member_record(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)


def _member(db: Session, workspace_id: str, user_id: str) -> WorkspaceMemberRow:
    row = db.get(WorkspaceMemberRow, (workspace_id, user_id))
    if row is None:
        raise Missing("member", workspace_id, user_id)
    return row


def _keep_an_owner(db: Session, workspace_id: str) -> None:
    owners = db.execute(
        counted(
            WorkspaceMemberRow,
            WorkspaceMemberRow.workspace_id == workspace_id,
            WorkspaceMemberRow.role == "owner",
        )
    ).scalar_one()
    if owners <= 1:
        raise FailedPrecondition("a workspace must keep an owner; make another member owner first")
