"""Workspace membership, as the policy module reads it.

The context service owns creating workspaces and managing members;
``MembershipStore`` is the read side, plus the writes the context service and
tests need. ``CachedMemberships`` puts it behind a per-process cache for the
unary calls' policy check (every workspace RPC makes one; a run makes three),
kept exact the way the authenticator keeps its session cache
(``authenticator.py``):

- An entry is trusted only while the cache layer is *fresh* (``Cache.fresh``:
  this process's Redis subscription has confirmed, within the lease, that it has
  seen every invalidation); otherwise every check reads the database.
- The process that changes a membership or a workspace drops that workspace's
  entries itself, before its call returns, and publishes the workspace's id on
  ``MEMBERSHIP_CHANNEL`` (after the commit: the bus hands it the change's events
  as it publishes them, ``EventBus.on_publishing``); a publish Redis cannot take
  waits out the lease, so no other process trusts a stale entry past it.
- The change's event (MEMBER_CHANGED, WORKSPACE_CHANGED, written in its
  transaction) drops the entries in every process too, whatever crashed between
  the commit and the message (``on_event``).
- An invalidation racing a database read keeps the stale read out: each one bumps
  a generation, and a read is cached only if the generation did not move.

Open streams do not use it: their re-checks (``accesswatch.py``) run because
something said access changed, and read the database.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from sqlalchemy.exc import SQLAlchemyError

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.cache import Cache
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


MEMBERSHIP_CHANNEL: Final = "switchboard:access:memberships"
#: Events that may change who is a member of a workspace, or whether it is live.
_CHANGES: Final = frozenset(
    {events_pb2.EVENT_TYPE_MEMBER_CHANGED, events_pb2.EVENT_TYPE_WORKSPACE_CHANGED}
)
_WORKSPACES: Final = "workspaces/"


def _workspace_of(event: events_pb2.Event) -> str:
    """The id of the workspace a membership or workspace event concerns ("" if none)."""
    if event.type not in _CHANGES:
        return ""
    name = event.workspace
    if not name.startswith(_WORKSPACES):
        return ""
    return name[len(_WORKSPACES) :].partition("/")[0]


class CachedMemberships:
    """``MembershipStore.role_of`` from memory while that is exact (module doc)."""

    def __init__(self, store: MembershipStore, cache: Cache, *, size: int) -> None:
        self._store = store
        self._cache = cache
        self._size = size
        #: workspace id -> user id -> role (None: not a member, or the workspace is gone).
        self._roles: dict[str, dict[str, Role | None]] = {}
        self._count = 0
        self._generation = 0
        cache.subscribe(MEMBERSHIP_CHANNEL, self._on_message, self._on_resync)

    async def role_of(
        self, workspace_id: str, user_id: str, *, include_deleted: bool = False
    ) -> Role | None:
        if include_deleted or self._size <= 0 or not self._cache.fresh():
            return await self._store.role_of(workspace_id, user_id, include_deleted=include_deleted)
        members = self._roles.get(workspace_id)
        if members is not None and user_id in members:
            return members[user_id]
        generation = self._generation
        role = await self._store.role_of(workspace_id, user_id)
        if generation == self._generation and self._cache.fresh():
            self._put(workspace_id, user_id, role)
        return role

    def _put(self, workspace_id: str, user_id: str, role: Role | None) -> None:
        while self._count >= self._size and self._roles:
            # The workspace cached longest ago goes, with all of its entries.
            oldest = next(iter(self._roles))
            self._count -= len(self._roles.pop(oldest))
        members = self._roles.setdefault(workspace_id, {})
        if user_id not in members:
            self._count += 1
        members[user_id] = role

    def _drop(self, workspace_id: str) -> None:
        self._generation += 1
        members = self._roles.pop(workspace_id, None)
        if members is not None:
            self._count -= len(members)

    def _on_message(self, message: str) -> None:
        self._drop(message)

    def _on_resync(self) -> None:
        self._generation += 1
        self._roles.clear()
        self._count = 0

    def on_event(self, event: events_pb2.Event) -> None:
        """A delivered event (``EventBus.listen``): a membership or workspace change drops
        the workspace's entries here, whatever happened to its message."""
        if workspace_id := _workspace_of(event):
            self._drop(workspace_id)

    async def publishing(self, events: Sequence[events_pb2.Event]) -> None:
        """Events this process is publishing after their write committed
        (``EventBus.on_publishing``): for each workspace whose members or life they
        change, drop its entries here and tell every other process."""
        changed = dict.fromkeys(w for event in events if (w := _workspace_of(event)))
        for workspace_id in changed:
            self._drop(workspace_id)
            await self._cache.publish(MEMBERSHIP_CHANNEL, workspace_id)
