"""Deleting an account (DeleteMyAccount, ``switchboard erase-user``; docs/privacy.md).

The account's own part is done here, in one transaction: every session and API key
revoked, the sign-in identities forgotten, the user made a tombstone (its id stays,
so nothing else is ever named by it; no email, name or password), the workspaces it
owned alone handed over as the person chose, its memberships removed, and the erasure
written for the other services, with the events that tell every process (the
revocations, the membership changes, ACCOUNT_DELETED). After the commit the
revocations are announced at once (``CredentialAuthenticator.announce``), so no
process and no open stream keeps accepting the credentials.

The services erase the rest in the background (``platform/events/erasure/worker.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.auth import mapping
from switchboard.auth.store import AuthStore, DeletedAccount, MemberChange
from switchboard.platform.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from switchboard.platform.security.policy import Principal
from switchboard.platform.store.outbox import Outbox, Staged
from switchboard.platform.values.resources import (
    ApiKeyName,
    MemberName,
    SessionName,
    UserName,
    WorkspaceName,
)

#: Workspaces one request may name.
MAX_OWNED_WORKSPACES: Final = 100
_ROLES: Final = {
    "owner": context_pb2.WORKSPACE_ROLE_OWNER,
    "editor": context_pb2.WORKSPACE_ROLE_EDITOR,
    "viewer": context_pb2.WORKSPACE_ROLE_VIEWER,
}
_DELETE = auth_pb2.OWNED_WORKSPACE_ACTION_DELETE
_HAND_OVER = auth_pb2.OWNED_WORKSPACE_ACTION_HAND_OVER


#: Tells every process that ``kind:ident`` was revoked (``CredentialAuthenticator.announce``).
Announce = Callable[[str, str], Awaitable[None]]
#: Publishes a committed write's staged events (``EventBus.publish_staged``).
Publish = Callable[[Sequence[events_pb2.Event]], Awaitable[None]]


async def _later(*_: object) -> None:
    """Nothing now: the outbox relays of the serving processes publish the events."""


class AccountDeletion:
    """Deleting an account: in a serving process (``announce`` and ``publish`` at once),
    or from ``switchboard erase-user`` (the events reach the processes through the
    outbox, whose relay any of them runs)."""

    def __init__(
        self,
        store: AuthStore,
        outbox: Outbox | None,
        *,
        announce: Announce = _later,
        publish: Publish = _later,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._announce = announce
        self._publish = publish

    async def delete_my_account(
        self, principal: Principal, request: auth_pb2.DeleteMyAccountRequest
    ) -> auth_pb2.DeleteMyAccountResponse:
        """The caller deletes their own account (a session's, confirmed by the email)."""
        if principal.api_key_id or not principal.session_id:
            raise FailedPrecondition(
                "deleting an account needs a signed-in session, not an API key or a server's token"
            )
        user = await self._store.user_by_id(principal.user_id)
        if user is None:
            raise Unauthenticated("the account behind this credential no longer exists")
        if request.confirm_email.strip().lower() != user.email:
            raise InvalidArgument(
                "confirm_email must be the account's email",
                [FieldViolation("confirm_email", "must be the email of the account deleted")],
            )
        return auth_pb2.DeleteMyAccountResponse(
            erasure=await self.erase(principal.user_id, request.workspaces)
        )

    async def erase(
        self, user_id: str, workspaces: Sequence[auth_pb2.OwnedWorkspace]
    ) -> auth_pb2.Erasure:
        """Delete the account and begin its erasure (an operator's, or the person's)."""
        user = await self._store.user_by_id(user_id)
        if user is None:
            raise NotFound(f"{UserName(user_id)} not found")
        deleting, hand_over = await self._plan(user_id, workspaces)
        plan = auth_pb2.DeleteMyAccountRequest(
            workspaces=[
                auth_pb2.OwnedWorkspace(workspace=str(WorkspaceName(w)), action=_DELETE)
                for w in deleting
            ]
        )
        staged: Staged[DeletedAccount] = Staged(self._outbox, lambda done: _events(user_id, done))
        done = await self._store.delete_account(
            user_id,
            plan=plan.SerializeToString(deterministic=True),
            hand_over=hand_over,
            staged=staged,
        )
        # Committed: every process drops the credentials now (the events above do it
        # too, whatever crashes before these messages).
        await self._announce("user", user_id)
        for key in done.api_keys:
            await self._announce("apikey", key)
        await self._publish(staged.events)
        return mapping.erasure(done.erasure)

    async def _plan(
        self, user_id: str, workspaces: Sequence[auth_pb2.OwnedWorkspace]
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """The workspaces to delete and to hand over: every one the user owns with no
        other owner must be named, and only those."""
        violations: list[FieldViolation] = []
        if len(workspaces) > MAX_OWNED_WORKSPACES:
            raise InvalidArgument(
                f"workspaces names at most {MAX_OWNED_WORKSPACES}",
                [FieldViolation("workspaces", f"at most {MAX_OWNED_WORKSPACES} entries")],
            )
        alone = {
            m.workspace_id
            for m in await self._store.memberships(user_id)
            if m.role == "owner" and m.owners == 1
        }
        deleting: list[str] = []
        hand_over: list[tuple[str, str]] = []
        seen: set[str] = set()
        for i, entry in enumerate(workspaces):
            field = f"workspaces[{i}]"
            parsed = WorkspaceName.parse_or_none(entry.workspace)
            if parsed is None:
                violations.append(
                    FieldViolation(f"{field}.workspace", "must be workspaces/{workspace}")
                )
                continue
            workspace = parsed.workspace
            if workspace in seen:
                violations.append(FieldViolation(f"{field}.workspace", "named twice"))
                continue
            seen.add(workspace)
            if workspace not in alone:
                violations.append(
                    FieldViolation(
                        f"{field}.workspace",
                        "not a workspace this account owns with no other owner",
                    )
                )
                continue
            chosen = await self._choice(user_id, workspace, entry, field)
            if isinstance(chosen, FieldViolation):
                violations.append(chosen)
            elif chosen:
                hand_over.append((workspace, chosen))
            else:
                deleting.append(workspace)
        if violations:
            raise InvalidArgument("workspaces is invalid", violations)
        unnamed = sorted(alone - seen)
        if unnamed:
            raise FailedPrecondition(
                "the account owns workspaces with no other owner; name each in workspaces "
                "(DELETE, or HAND_OVER to a member): "
                + ", ".join(str(WorkspaceName(w)) for w in unnamed)
            )
        return deleting, hand_over

    async def _choice(
        self, user_id: str, workspace: str, entry: auth_pb2.OwnedWorkspace, field: str
    ) -> FieldViolation | str:
        """The new owner of a workspace handed over ("" to delete it), or what is wrong."""
        if entry.action == _DELETE:
            if entry.new_owner:
                return FieldViolation(f"{field}.new_owner", "only for HAND_OVER")
            return ""
        if entry.action != _HAND_OVER:
            return FieldViolation(f"{field}.action", "must be DELETE or HAND_OVER")
        owner = UserName.parse_or_none(entry.new_owner)
        if owner is None or owner.user == user_id:
            return FieldViolation(f"{field}.new_owner", "must be users/{user}, another member")
        if not await self._store.members_of(workspace, [owner.user]):
            return FieldViolation(f"{field}.new_owner", "not a member of the workspace")
        return owner.user


def _events(user_id: str, done: DeletedAccount) -> list[events_pb2.Event]:
    user = str(UserName(user_id))
    actor = events_pb2.Actor(name=user)
    found: list[events_pb2.Event] = [
        events_pb2.Event(
            type=events_pb2.EVENT_TYPE_SECURITY,
            actor=actor,
            user=user,
            security=events_pb2.SecurityEvent(
                kind=events_pb2.SECURITY_EVENT_KIND_SESSION_REVOKED,
                session=str(SessionName(user_id, session)),
            ),
        )
        for session in done.sessions
    ]
    found += [
        events_pb2.Event(
            type=events_pb2.EVENT_TYPE_SECURITY,
            actor=actor,
            user=user,
            security=events_pb2.SecurityEvent(
                kind=events_pb2.SECURITY_EVENT_KIND_API_KEY_REVOKED,
                api_key=str(ApiKeyName(user_id, key)),
            ),
        )
        for key in done.api_keys
    ]
    found += [_member(actor, change, events_pb2.CHANGE_KIND_UPDATED) for change in done.handed_over]
    found += [_member(actor, change, events_pb2.CHANGE_KIND_DELETED) for change in done.left]
    found.append(
        events_pb2.Event(
            type=events_pb2.EVENT_TYPE_SECURITY,
            actor=actor,
            user=user,
            security=events_pb2.SecurityEvent(kind=events_pb2.SECURITY_EVENT_KIND_ACCOUNT_DELETED),
        )
    )
    return found


def _member(
    actor: events_pb2.Actor, change: MemberChange, kind: events_pb2.ChangeKind.ValueType
) -> events_pb2.Event:
    member = context_pb2.WorkspaceMember(
        name=str(MemberName(change.workspace_id, change.user_id)),
        user=str(UserName(change.user_id)),
        role=_ROLES.get(change.role, context_pb2.WORKSPACE_ROLE_UNSPECIFIED),
    )
    member.update_time.FromDatetime(change.at)
    return events_pb2.Event(
        type=events_pb2.EVENT_TYPE_MEMBER_CHANGED,
        actor=actor,
        workspace=str(WorkspaceName(change.workspace_id)),
        user=member.user,
        member_changed=events_pb2.MemberChanged(change=kind, member=member),
    )
