"""Workspace membership, as the policy module reads it.

The context service owns creating workspaces and managing members;
this store is the read side every service's policy check uses, plus the
writes the context service and tests need. One query per check: membership
changes (a member removed) must apply to the very next call.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError

from switchboard.platform.errors import DependencyUnavailable
from switchboard.platform.security.policy import Role
from switchboard.platform.store.db import Database, log_failure
from switchboard.platform.store.models import WorkspaceMemberRow, WorkspaceRow
from switchboard.platform.values.names import now

log = logging.getLogger("switchboard.membership")


# Plain SQL through ``Database.fetch``: this runs before every workspace RPC.
_ROLE_OF_INCLUDING_DELETED = (
    "SELECT m.role FROM workspace_members m JOIN workspaces w ON w.id = m.workspace_id "
    "WHERE m.workspace_id = :workspace AND m.user_id = :user"
)
_ROLE_OF = _ROLE_OF_INCLUDING_DELETED + " AND w.deleted_at IS NULL"


class MembershipStore:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._sessions = database.sessions

    async def role_of(
        self, workspace_id: str, user_id: str, *, include_deleted: bool = False
    ) -> Role | None:
        sql = _ROLE_OF if not include_deleted else _ROLE_OF_INCLUDING_DELETED
        try:
            rows = await self._database.fetch(sql, {"workspace": workspace_id, "user": user_id})
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            # A pool or database timeout is an outage, not a bug: UNAVAILABLE, retryable.
            log_failure(log, "membership lookup failed", exc)
            raise DependencyUnavailable("the access check is unavailable; retry") from None
        role = rows[0][0] if rows else None
        return Role[role.upper()] if role is not None else None

    async def create_workspace(self, workspace_id: str, display_name: str, owner_id: str) -> None:
        when = now()
        async with self._sessions.begin() as db:
            db.add(
                WorkspaceRow(
                    id=workspace_id,
                    display_name=display_name,
                    created_at=when,
                    updated_at=when,
                    deleted_at=None,
                    version=1,
                )
            )
            await db.flush()
            db.add(
                WorkspaceMemberRow(
                    workspace_id=workspace_id,
                    user_id=owner_id,
                    role=Role.OWNER.name.lower(),
                    created_at=when,
                )
            )

    async def set_member(self, workspace_id: str, user_id: str, role: Role) -> None:
        when = now()
        async with self._sessions.begin() as db:
            row = await db.get(WorkspaceMemberRow, (workspace_id, user_id))
            if row is None:
                db.add(
                    WorkspaceMemberRow(
                        workspace_id=workspace_id,
                        user_id=user_id,
                        role=role.name.lower(),
                        created_at=when,
                    )
                )
            else:
                row.role = role.name.lower()

    async def remove_member(self, workspace_id: str, user_id: str) -> bool:
        """Remove a membership; False if there was none."""
        async with self._sessions.begin() as db:
            row = await db.get(WorkspaceMemberRow, (workspace_id, user_id))
            if row is None:
                return False
            await db.delete(row)
            return True
