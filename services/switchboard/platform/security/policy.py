"""Who may touch what: principals, scopes, workspace roles, one policy for every service.

Every authorization question in the mesh is answered here, so the rules cannot
differ between services:

- A principal's *scopes* bound what it may do at all (an API key created with
  ``read`` cannot write anywhere, whatever its owner's roles).
- A *workspace role* (viewer < editor < owner) decides what it may do inside a
  workspace and everything under it.
- A principal who is not a member of a workspace gets NOT_FOUND for it and
  for every resource under it, exactly as if it did not exist, so names cannot
  be enumerated. A member lacking the role gets PERMISSION_DENIED: members may
  know the workspace exists.
- ``users/{user}/...`` resources belong to that user alone (NOT_FOUND for others).

This module does not import grpc and runs no SQL itself: membership comes from
a ``MembershipReader``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Protocol

from switchboard.platform.errors import (
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from switchboard.platform.values.resources import (
    ApiKeyName,
    SessionName,
    UserName,
    WorkspaceName,
    owner,
)


class Scope(enum.StrEnum):
    """Coarse capabilities carried by tokens and API keys."""

    READ = "read"
    WRITE = "write"
    # Account management: sessions, API keys, the user record.
    MANAGE = "manage"


ALL_SCOPES: Final = frozenset(Scope)
#: A call that needs a caller and has none: how to be one.
REQUIRED: Final = (
    "authentication required: send 'authorization: Bearer <access token or API key>' "
    "(Register or Login gives an access token)"
)


class AuthMethod(enum.StrEnum):
    PASSWORD = "password"  # noqa: S105 - a method name, not a secret
    OIDC = "oidc"
    API_KEY = "api_key"


class Role(enum.IntEnum):
    """Workspace roles, ordered: each includes the rights of the ones below."""

    VIEWER = 1
    EDITOR = 2
    OWNER = 3


class Permission(enum.Enum):
    """What an RPC does to the resource it names; maps to a scope and a minimum role."""

    READ = (Scope.READ, Role.VIEWER)
    # A change any member may make to their own membership (leaving a workspace).
    SELF = (Scope.WRITE, Role.VIEWER)
    WRITE = (Scope.WRITE, Role.EDITOR)
    ADMIN = (Scope.WRITE, Role.OWNER)
    MANAGE = (Scope.MANAGE, Role.OWNER)

    @property
    def scope(self) -> Scope:
        return self.value[0]

    @property
    def min_role(self) -> Role:
        return self.value[1]


#: A token a server mints to act for a person in another service
#: (``rpc/outbound/peers.delegated_session``) names in its ``sid``, instead of a session:
#: the API key the call came with (``key:{id}``), or nothing of theirs (``bg:{user}``:
#: a schedule's tick, memory forming). Sign-in sessions never hold a colon.
DELEGATED_KEY: Final = "key:"
DELEGATED_BACKGROUND: Final = "bg:"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    user_id: str
    auth_method: AuthMethod
    scopes: frozenset[Scope]
    session_id: str = ""
    api_key_id: str = ""
    expires_at: int = 0
    #: For a call made with an API key: the assistants it pins at a revision, each
    #: ``(workspaces/{w}/assistants/{a}, revision)`` (ApiKey.assistant_pins).
    assistant_pins: tuple[tuple[str, int], ...] = ()

    @classmethod
    def acting_for(cls, user_id: str) -> Principal:
        """The server acting for a user, as no request of theirs does (a schedule's tick,
        memory forming, a phone call): read and write, no session or key, so their right
        to the object is checked as for any call of theirs."""
        return cls(
            user_id=user_id,
            auth_method=AuthMethod.PASSWORD,
            scopes=frozenset({Scope.READ, Scope.WRITE}),
        )

    def pinned(self, assistant: str) -> int:
        """The revision this caller's API key pins ``assistant`` at; 0 for none."""
        return next((n for name, n in self.assistant_pins if name == assistant), 0)

    @property
    def user_name(self) -> str:
        return str(UserName(self.user_id))

    @property
    def session_name(self) -> str:
        return str(SessionName(self.user_id, self.session_id)) if self.session_id else ""

    @property
    def api_key_name(self) -> str:
        return str(ApiKeyName(self.user_id, self.api_key_id)) if self.api_key_id else ""

    def require_scope(self, scope: Scope) -> None:
        if scope not in self.scopes:
            raise PermissionDenied(f"the credential lacks the {scope.value!r} scope")


class MembershipReader(Protocol):
    async def role_of(
        self, workspace_id: str, user_id: str, *, include_deleted: bool = False
    ) -> Role | None:
        """The user's role in a live (or, if asked, soft-deleted) workspace, or None."""
        ...


@dataclass(frozen=True)
class Owner:
    """Whose resource a name denotes: a workspace's or a user's."""

    kind: str  # "workspace" or "user"
    id: str


def owner_of(name: str, field_path: str) -> Owner:
    """Parse the owning workspace or user out of a resource name, or InvalidArgument
    (malformed before any lookup: ``resources.owner``)."""
    found = owner(name, field_path)
    if isinstance(found, WorkspaceName):
        return Owner("workspace", found.workspace)
    return Owner("user", found.user)


class Policy:
    """The single answer to "may this principal do this to that"."""

    def __init__(self, memberships: MembershipReader) -> None:
        self._memberships = memberships

    async def authorize(
        self,
        principal: Principal | None,
        name: str,
        permission: Permission,
        field_path: str,
        *,
        include_deleted: bool = False,
    ) -> Role | None:
        """Allow ``permission`` on the resource ``name`` or raise.

        Returns the caller's workspace role (None for user-owned resources).
        """
        if principal is None:
            raise Unauthenticated(REQUIRED)
        owner = owner_of(name, field_path)
        if owner.kind == "user":
            if owner.id != principal.user_id:
                raise NotFound(f"{name} not found")
            principal.require_scope(permission.scope)
            return None
        role = await self._memberships.role_of(
            owner.id, principal.user_id, include_deleted=include_deleted
        )
        if role is None:
            # Not a member: indistinguishable from a workspace that does not exist.
            raise NotFound(f"{name} not found")
        principal.require_scope(permission.scope)
        if role < permission.min_role:
            raise PermissionDenied(
                f"this needs the {permission.min_role.name.lower()} role in the workspace"
            )
        return role
