"""Workspaces and their members: validation, limits, events.

The guard (``platform/security/authn.py``) has already checked the caller's role in
the workspace a request names before anything here runs; what it cannot
decide (removing another member needs the owner role) is decided here.
"""

from __future__ import annotations

from typing import Any, Final

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.common import (
    Common,
    Domain,
    check_text,
    member_event,
    request_key,
    stored,
    workspace_event,
    write,
)
from switchboard.context.mapping import ROLES, member_proto, workspace_proto
from switchboard.context.workspaces.store import WorkspaceStore
from switchboard.platform.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
from switchboard.platform.security.policy import Principal, Role
from switchboard.platform.store import pagination
from switchboard.platform.store.pagination import from_micros, micros
from switchboard.platform.values import names
from switchboard.platform.values.fieldmask import update_paths
from switchboard.platform.values.memorypolicy import check_policy
from switchboard.platform.values.names import checked_etag, new_id
from switchboard.platform.values.resources import MemberName, UserName, WorkspaceName

#: A workspace id a client chooses.
CLIENT_ID: Final = names.WORKSPACE_ID


class Workspaces(Domain):
    def __init__(self, common: Common, store: WorkspaceStore) -> None:
        super().__init__(common)
        self._store = store

    def _check_fields(
        self, workspace: pb.Workspace, paths: set[str], violations: Violations
    ) -> None:
        if "display_name" in paths:
            if not workspace.display_name.strip():
                violations.add("workspace.display_name", "is required")
            check_text(
                workspace.display_name,
                "workspace.display_name",
                self.limits.max_title_chars,
                violations,
            )
        if "description" in paths:
            check_text(
                workspace.description,
                "workspace.description",
                self.limits.max_description_chars,
                violations,
            )

    @write
    async def create(
        self, principal: Principal, request: pb.CreateWorkspaceRequest
    ) -> pb.Workspace:
        violations = Violations()
        workspace = request.workspace
        if request.workspace_id and not CLIENT_ID.fullmatch(request.workspace_id):
            violations.add("workspace_id", names.WORKSPACE_ID_RULE.must)
        self._check_fields(workspace, {"display_name", "description"}, violations)
        violations.check()
        key = request_key(principal, "CreateWorkspace", request)
        staged = self.common.staged(
            lambda made: (
                [workspace_event(principal, events_pb2.CHANGE_KIND_CREATED, made[0])]
                if made[1]
                else None
            ),
            key.key if key else "",
        )
        row, _ = await stored(
            self._store.create_workspace(
                request.workspace_id or f"w{new_id()[:20]}",
                workspace.display_name.strip(),
                workspace.description,
                principal.user_id,
                key,
                self.limits.max_owned_workspaces,
                staged,
            )
        )
        await self.common.announce(staged)
        return workspace_proto(row, "owner")

    async def get(self, role: Role | None, name: str) -> pb.Workspace:
        workspace_id = WorkspaceName.parse(name, "name").workspace
        row = await self._store.get_workspace(workspace_id)
        if row is None:
            raise NotFound(f"{name} not found")
        return workspace_proto(row, role.name.lower() if role else None)

    async def list(
        self, principal: Principal, request: pb.ListWorkspacesRequest
    ) -> pb.ListWorkspacesResponse:
        pages = self.common.pages
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        token = pagination.fingerprint("workspaces", principal.user_id, request.show_deleted)
        after = None
        if request.page_token:
            stamp, last = pages.decode(
                request.page_token, token, (pagination.MICROS, pagination.ID)
            )
            after = (from_micros(stamp), str(last))
        rows = await self._store.list_workspaces(
            principal.user_id, after, size + 1, show_deleted=request.show_deleted
        )
        response = pb.ListWorkspacesResponse(
            workspaces=[workspace_proto(row, role) for row, role in rows[:size]]
        )
        if len(rows) > size:
            last_row = rows[size - 1][0]
            response.next_page_token = pages.encode(
                [micros(last_row.created_at), last_row.id], token
            )
        return response

    @write
    async def update(
        self, principal: Principal, request: pb.UpdateWorkspaceRequest
    ) -> pb.Workspace:
        workspace = request.workspace
        workspace_id = WorkspaceName.parse(workspace.name, "workspace.name").workspace
        paths = update_paths(
            request.update_mask,
            workspace,
            ("display_name", "description", "memory_policy"),
            "update_mask",
        )
        violations = Violations()
        self._check_fields(workspace, set(paths), violations)
        if "memory_policy" in paths:
            check_policy(
                workspace.memory_policy,
                "workspace.memory_policy",
                violations,
                max_items=self.limits.max_memory_items,
            )
        violations.check()
        changes: dict[str, Any] = {}
        if "display_name" in paths:
            changes["display_name"] = workspace.display_name.strip()
        if "description" in paths:
            changes["description"] = workspace.description
        if "memory_policy" in paths:
            # An unset policy is stored as none (off), not as an empty message's bytes.
            changes["memory_policy"] = (
                workspace.memory_policy.SerializeToString()
                if workspace.HasField("memory_policy")
                else b""
            )
        staged = self.common.staged(
            lambda done: [workspace_event(principal, events_pb2.CHANGE_KIND_UPDATED, done)]
        )
        row = await stored(
            self._store.update_workspace(
                workspace_id, checked_etag(workspace.etag, "workspace.etag"), changes, staged
            )
        )
        await self.common.announce(staged)
        return workspace_proto(row, "owner")

    @write
    async def set_deleted(
        self, principal: Principal, name: str, etag: str, *, deleted: bool
    ) -> pb.Workspace:
        workspace_id = WorkspaceName.parse(name, "name").workspace
        change = events_pb2.CHANGE_KIND_DELETED if deleted else events_pb2.CHANGE_KIND_UPDATED
        staged = self.common.staged(lambda done: [workspace_event(principal, change, done)])
        row = await stored(
            self._store.set_workspace_deleted(
                workspace_id, checked_etag(etag, "etag"), deleted=deleted, staged=staged
            )
        )
        await self.common.announce(staged)
        return workspace_proto(row, "owner")


def _role(value: pb.WorkspaceRole.ValueType, field: str) -> str:
    role = ROLES.get(value)
    if role is None:
        raise InvalidArgument(
            f"{field} is required", [FieldViolation(field, "must be viewer, editor or owner")]
        )
    return role.name.lower()


class Members(Domain):
    def __init__(self, common: Common, store: WorkspaceStore) -> None:
        super().__init__(common)
        self._store = store

    @write
    async def add(
        self, principal: Principal, request: pb.AddWorkspaceMemberRequest
    ) -> pb.WorkspaceMember:
        workspace_id = WorkspaceName.parse(request.parent, "parent").workspace
        user_id = UserName.parse(request.user, "user").user
        role = _role(request.role, "role")
        staged = self.common.staged(
            lambda done: [member_event(principal, events_pb2.CHANGE_KIND_CREATED, done)]
        )
        row = await stored(
            self._store.add_member(
                workspace_id, user_id, role, self.limits.max_members, staged=staged
            )
        )
        await self.common.announce(staged)
        return member_proto(row)

    @write
    async def update(
        self, principal: Principal, request: pb.UpdateWorkspaceMemberRequest
    ) -> pb.WorkspaceMember:
        member = MemberName.parse(request.member.name, "member.name")
        paths = update_paths(request.update_mask, request.member, ("role",), "update_mask")
        if "role" not in paths:
            raise InvalidArgument(
                "update_mask must name role",
                [FieldViolation("update_mask.paths", "must name role")],
            )
        role = _role(request.member.role, "member.role")
        staged = self.common.staged(
            lambda done: [member_event(principal, events_pb2.CHANGE_KIND_UPDATED, done)]
        )
        row = await stored(
            self._store.update_member(member.workspace, member.user, role, staged=staged)
        )
        await self.common.announce(staged)
        return member_proto(row)

    @write
    async def remove(
        self, principal: Principal, role: Role | None, name: str, *, erase: bool = False
    ) -> None:
        """Remove a member; with ``erase``, erase what they wrote here too (docs/privacy.md)."""
        member = MemberName.parse(name, "name")
        # Any member may leave; removing someone else is an owner's decision.
        if member.user != principal.user_id and role != Role.OWNER:
            raise PermissionDenied("removing another member needs the owner role in the workspace")
        staged = self.common.staged(
            lambda done: [member_event(principal, events_pb2.CHANGE_KIND_DELETED, done)]
        )
        await stored(
            self._store.remove_member(member.workspace, member.user, staged=staged, erase=erase)
        )
        await self.common.announce(staged)

    async def list(
        self, request: pb.ListWorkspaceMembersRequest
    ) -> pb.ListWorkspaceMembersResponse:
        workspace_id = WorkspaceName.parse(request.parent, "parent").workspace
        pages = self.common.pages
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        token = pagination.fingerprint("members", workspace_id)
        after = ""
        if request.page_token:
            after = str(pages.decode(request.page_token, token, (pagination.ID,))[0])
        rows = await self._store.list_members(workspace_id, after, size + 1)
        response = pb.ListWorkspaceMembersResponse(members=[member_proto(r) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = pages.encode([rows[size - 1].user_id], token)
        return response
