"""Auth persistence: every SQL statement about users, sessions, refresh tokens and API keys.

No ORM row leaves this module: reads and writes return frozen records
(``UserRecord``, ``SessionRecord``, ...) or plain values, and nothing here
builds a resource name or raises a request-field error. Every transaction
goes through the database's runner (``Database.run``): writes join the group
commit, and a write's events are staged (``platform/store/outbox.py``) in its own
transaction.

Races that matter for security are settled by the database, not by Python:
redeeming a refresh token is a conditional UPDATE (``used_at IS NULL``) so two
concurrent redemptions cannot both succeed; the loser is treated as reuse.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sqlalchemy import Select, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from switchboard.platform.errors import AlreadyExists
from switchboard.platform.events.erasure.store import ErasureRecord, add_erasure
from switchboard.platform.security.credentials.records import pins, stored_pins
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import (
    ApiKeyRow,
    FederatedIdentityRow,
    RefreshTokenRow,
    SessionRow,
    UserRow,
    WorkspaceMemberRow,
    WorkspaceRow,
)
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import transaction
from switchboard.platform.values.names import new_id, now

log = logging.getLogger("switchboard.auth.store")

_T = TypeVar("_T")
_R = TypeVar("_R", SessionRow, ApiKeyRow)
_Rec = TypeVar("_Rec")

#: Where a page of sessions or API keys starts: after (created_at, id), newest first.
Keyset = tuple[dt.datetime, str]


@dataclass(frozen=True)
class UserRecord:
    id: str
    email: str
    display_name: str
    #: None for users who only ever signed in through a federated issuer.
    password_hash: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int


#: The email of a deleted account's tombstone is its id at this domain (RFC 2606's
#: ``invalid``: it can never receive mail or be registered).
ERASED_EMAIL_DOMAIN = "@erased.invalid"


@dataclass(frozen=True)
class Membership:
    workspace_id: str
    role: str
    #: How many owners the workspace has (the user among them if they own it).
    owners: int


@dataclass(frozen=True)
class MemberChange:
    workspace_id: str
    user_id: str
    role: str
    at: dt.datetime


@dataclass(frozen=True)
class DeletedAccount:
    erasure: ErasureRecord
    #: The sessions and API keys it revoked.
    sessions: list[str]
    api_keys: list[str]
    #: The members made owners of workspaces handed over, and the memberships removed.
    handed_over: list[MemberChange]
    left: list[MemberChange]


@dataclass(frozen=True)
class IdentityRecord:
    """A federated identity (issuer, subject) linked to a user."""

    issuer: str
    subject: str


@dataclass(frozen=True)
class SessionRecord:
    id: str
    user_id: str
    auth_method: str
    created_at: dt.datetime
    last_seen_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    user_agent: str
    device_name: str
    client_address: str


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    user_id: str
    display_name: str
    #: The keyed hash of the secret (``security/credentials/opaque.py``); the secret is
    #: never stored.
    digest: str
    scopes: tuple[str, ...]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None
    #: The assistants it pins, each ``(name, revision)``.
    assistant_pins: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Redemption:
    """The outcome of presenting a refresh token."""

    outcome: Literal["rotated", "reused", "invalid"]
    session: SessionRecord | None = None


@dataclass(frozen=True)
class NewUser:
    """A user to create (``AuthStore.new_user``), with its federated identity if any."""

    user: UserRecord
    #: (issuer, subject) of the identity it is created for.
    identity: tuple[str, str] | None = None


def _user(row: UserRow) -> UserRecord:
    return UserRecord(
        id=row.id,
        email=row.email,
        display_name=row.display_name,
        password_hash=row.password_hash,
        created_at=row.created_at,
        updated_at=row.updated_at,
        version=row.version,
    )


def _session(row: SessionRow) -> SessionRecord:
    return SessionRecord(
        id=row.id,
        user_id=row.user_id,
        auth_method=row.auth_method,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        user_agent=row.user_agent,
        device_name=row.device_name,
        client_address=row.client_address,
    )


def _api_key(row: ApiKeyRow) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row.id,
        user_id=row.user_id,
        display_name=row.display_name,
        digest=row.digest,
        scopes=tuple(row.scopes.split()),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
        assistant_pins=pins(row.assistant_pins),
    )


def _add_user(db: Session, new: NewUser) -> None:
    """Insert ``new`` in ``db``'s transaction; AlreadyExists if its email or identity is taken."""
    user = new.user
    try:
        db.add(
            UserRow(
                id=user.id,
                email=user.email,
                display_name=user.display_name,
                password_hash=user.password_hash,
                created_at=user.created_at,
                updated_at=user.updated_at,
                version=user.version,
            )
        )
        db.flush()
        if new.identity is not None:
            issuer, subject = new.identity
            db.add(
                FederatedIdentityRow(
                    id=new_id(),
                    user_id=user.id,
                    issuer=issuer,
                    subject=subject,
                    created_at=user.created_at,
                )
            )
            db.flush()
    except IntegrityError:
        what = "email" if new.identity is None else "email or identity"
        raise AlreadyExists(f"an account with this {what} already exists") from None


def _live_key(when: dt.datetime) -> Any:
    return and_(
        ApiKeyRow.revoked_at.is_(None),
        (ApiKeyRow.expires_at.is_(None)) | (ApiKeyRow.expires_at > when),
    )


class AuthStore:
    """SQL for the auth service; takes and returns plain records (never ORM rows, never proto).

    A write with events takes them as ``staged`` (``platform/store/outbox.py``):
    they are built from the write's result and written in its transaction.
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    # Users.

    @staticmethod
    def new_user(
        email: str,
        display_name: str,
        password_hash: str | None,
        *,
        identity: tuple[str, str] | None = None,
    ) -> NewUser:
        """A user not stored yet: ``create_user`` stores it alone, ``create_session``
        with its first session."""
        stamp = now()
        user = UserRecord(
            id=new_id(),
            email=email,
            display_name=display_name,
            password_hash=password_hash,
            created_at=stamp,
            updated_at=stamp,
            version=1,
        )
        return NewUser(user, identity)

    async def create_user(
        self,
        email: str,
        display_name: str,
        password_hash: str | None,
        *,
        identity: tuple[str, str] | None = None,
    ) -> UserRecord:
        """A new user; with ``identity`` (issuer, subject), linked to that federated identity."""
        new = self.new_user(email, display_name, password_hash, identity=identity)

        def tx(db: Session) -> None:
            _add_user(db, new)

        await self._run(tx, write=True)
        return new.user

    async def user_by_email(self, email: str) -> UserRecord | None:
        def tx(db: Session) -> UserRecord | None:
            row = db.execute(select(UserRow).where(UserRow.email == email)).scalar_one_or_none()
            return _user(row) if row is not None else None

        return await self._run(tx, write=False)

    async def user_by_id(self, user_id: str) -> UserRecord | None:
        def tx(db: Session) -> UserRecord | None:
            row = db.get(UserRow, user_id)
            return _user(row) if row is not None else None

        return await self._run(tx, write=False)

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        def tx(db: Session) -> None:
            db.execute(
                update(UserRow).where(UserRow.id == user_id).values(password_hash=password_hash)
            )

        await self._run(tx, write=True)

    async def update_display_name(
        self, user_id: str, display_name: str, expected_version: int | None
    ) -> UserRecord | None:
        """The updated user; None if ``expected_version`` no longer matches."""

        def tx(db: Session) -> UserRecord | None:
            query = update(UserRow).where(UserRow.id == user_id)
            if expected_version is not None:
                query = query.where(UserRow.version == expected_version)
            result = db.execute(
                query.values(
                    display_name=display_name, updated_at=now(), version=UserRow.version + 1
                )
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            row = db.get(UserRow, user_id)
            return _user(row) if row is not None else None

        return await self._run(tx, write=True)

    # Deleting an account (docs/privacy.md).

    async def memberships(self, user_id: str) -> list[Membership]:
        """Every live workspace the user is a member of, with its owners' count."""

        def tx(db: Session) -> list[Membership]:
            owners = (
                select(func.count())
                .where(
                    WorkspaceMemberRow.workspace_id == WorkspaceRow.id,
                    WorkspaceMemberRow.role == "owner",
                )
                .correlate(WorkspaceRow)
                .scalar_subquery()
            )
            rows = db.execute(
                select(WorkspaceRow.id, WorkspaceMemberRow.role, owners)
                .join(WorkspaceMemberRow, WorkspaceMemberRow.workspace_id == WorkspaceRow.id)
                .where(WorkspaceMemberRow.user_id == user_id, WorkspaceRow.deleted_at.is_(None))
            ).all()
            return [Membership(str(w), str(role), int(n)) for w, role, n in rows]

        return await self._run(tx, write=False)

    async def members_of(self, workspace_id: str, user_ids: Sequence[str]) -> set[str]:
        """Which of ``user_ids`` are members of the workspace."""

        def tx(db: Session) -> set[str]:
            return set(
                db.execute(
                    select(WorkspaceMemberRow.user_id).where(
                        WorkspaceMemberRow.workspace_id == workspace_id,
                        WorkspaceMemberRow.user_id.in_(list(user_ids)),
                    )
                ).scalars()
            )

        return await self._run(tx, write=False)

    async def delete_account(
        self,
        user_id: str,
        *,
        plan: bytes,
        hand_over: Sequence[tuple[str, str]],
        staged: Staged[DeletedAccount],
    ) -> DeletedAccount:
        """In one transaction: every session and API key revoked, the sign-in
        identities and the client details of its sessions forgotten, the account made a
        tombstone (no email, name or password), each ``(workspace, new owner)`` handed
        over, its memberships removed, and its erasure written for the services."""
        stamp = now()

        def tx(db: Session) -> DeletedAccount:
            sessions = list(
                db.execute(
                    select(SessionRow.id).where(
                        SessionRow.user_id == user_id, SessionRow.revoked_at.is_(None)
                    )
                ).scalars()
            )
            db.execute(
                update(SessionRow)
                .where(SessionRow.user_id == user_id, SessionRow.revoked_at.is_(None))
                .values(revoked_at=stamp, revoke_reason="account_deleted")
            )
            db.execute(
                update(SessionRow)
                .where(SessionRow.user_id == user_id)
                .values(user_agent="", device_name="", client_address="")
            )
            keys = list(
                db.execute(
                    select(ApiKeyRow.id).where(
                        ApiKeyRow.user_id == user_id, ApiKeyRow.revoked_at.is_(None)
                    )
                ).scalars()
            )
            db.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.user_id == user_id)
                .values(revoked_at=func.coalesce(ApiKeyRow.revoked_at, stamp), display_name="")
            )
            db.execute(delete(FederatedIdentityRow).where(FederatedIdentityRow.user_id == user_id))
            db.execute(
                update(UserRow)
                .where(UserRow.id == user_id)
                .values(
                    email=f"{user_id}{ERASED_EMAIL_DOMAIN}",
                    display_name="",
                    password_hash=None,
                    erased_at=stamp,
                    updated_at=stamp,
                    version=UserRow.version + 1,
                )
            )
            handed: list[MemberChange] = []
            for workspace_id, new_owner in hand_over:
                db.execute(
                    update(WorkspaceMemberRow)
                    .where(
                        WorkspaceMemberRow.workspace_id == workspace_id,
                        WorkspaceMemberRow.user_id == new_owner,
                    )
                    .values(role="owner", updated_at=stamp)
                )
                handed.append(MemberChange(workspace_id, new_owner, "owner", stamp))
            left = [
                MemberChange(workspace_id, user_id, role, stamp)
                for workspace_id, role in db.execute(
                    select(WorkspaceMemberRow.workspace_id, WorkspaceMemberRow.role).where(
                        WorkspaceMemberRow.user_id == user_id
                    )
                )
            ]
            db.execute(delete(WorkspaceMemberRow).where(WorkspaceMemberRow.user_id == user_id))
            erasure = add_erasure(db, user_id, plan, ())  # everywhere
            return DeletedAccount(erasure, sessions, keys, handed, left)

        return await self._run(staging(staged, tx), write=True)

    async def federated_identities(self, user_id: str) -> list[IdentityRecord]:
        def tx(db: Session) -> list[IdentityRecord]:
            rows = db.execute(
                select(FederatedIdentityRow.issuer, FederatedIdentityRow.subject)
                .where(FederatedIdentityRow.user_id == user_id)
                .order_by(FederatedIdentityRow.created_at)
            )
            return [IdentityRecord(row.issuer, row.subject) for row in rows]

        return await self._run(tx, write=False)

    async def user_by_federated_identity(self, issuer: str, subject: str) -> UserRecord | None:
        def tx(db: Session) -> UserRecord | None:
            row = db.execute(
                select(UserRow)
                .join(FederatedIdentityRow, FederatedIdentityRow.user_id == UserRow.id)
                .where(
                    FederatedIdentityRow.issuer == issuer,
                    FederatedIdentityRow.subject == subject,
                )
            ).scalar_one_or_none()
            return _user(row) if row is not None else None

        return await self._run(tx, write=False)

    # Sessions and refresh tokens.

    async def create_session(
        self,
        *,
        user_id: str,
        auth_method: str,
        user_agent: str,
        device_name: str,
        client_address: str,
        expires_at: dt.datetime,
        refresh_digest: str,
        max_sessions: int,
        new_user: NewUser | None = None,
        staged: Staged[tuple[SessionRecord, list[str]]] | None = None,
    ) -> tuple[SessionRecord, list[str]]:
        """A new session with its first refresh token, and the ids of sessions
        evicted (revoked) to keep the user within ``max_sessions`` live ones.

        With ``new_user`` (whose id is ``user_id``), the user is created in the
        same transaction: a failure anywhere leaves no account behind that the
        client was never told of (its retry would meet ALREADY_EXISTS).
        """
        stamp = now()

        def tx(db: Session) -> tuple[SessionRecord, list[str]]:
            if new_user is not None:
                _add_user(db, new_user)
            live = db.execute(
                select(SessionRow.id)
                .where(
                    SessionRow.user_id == user_id,
                    SessionRow.revoked_at.is_(None),
                    SessionRow.expires_at > stamp,
                )
                .order_by(SessionRow.last_seen_at.desc(), SessionRow.id)
            ).scalars()
            evicted = list(live)[max_sessions - 1 :]
            if evicted:
                db.execute(
                    update(SessionRow)
                    .where(SessionRow.id.in_(evicted))
                    .values(revoked_at=stamp, revoke_reason="session_limit")
                )
            session = SessionRow(
                id=new_id(),
                user_id=user_id,
                auth_method=auth_method,
                created_at=stamp,
                last_seen_at=stamp,
                expires_at=expires_at,
                revoked_at=None,
                revoke_reason="",
                user_agent=user_agent,
                device_name=device_name,
                client_address=client_address,
            )
            db.add(session)
            db.flush()
            db.add(
                RefreshTokenRow(
                    digest=refresh_digest,
                    session_id=session.id,
                    created_at=stamp,
                    expires_at=expires_at,
                    used_at=None,
                )
            )
            return _session(session), evicted

        return await self._run(staging(staged, tx), write=True)

    async def redeem_refresh_token(
        self,
        digest: str,
        new_digest: str,
        when: dt.datetime,
        staged: Staged[Redemption] | None = None,
    ) -> Redemption:
        """Exchange a refresh token for a new one in the same session.

        Presenting a token that was already exchanged is reuse: the whole
        session (the token family) is revoked, in the same transaction as the
        detection and its ``staged`` events, so the answer that reports the
        revocation never goes out without it.
        """

        def tx(db: Session) -> Redemption:
            result = _redeem(db, digest, new_digest, when)
            if result.outcome == "reused" and result.session is not None:
                db.execute(
                    update(SessionRow)
                    .where(SessionRow.id == result.session.id, SessionRow.revoked_at.is_(None))
                    .values(revoked_at=when, revoke_reason="refresh_reuse")
                )
            return result

        return await self._run(staging(staged, tx), write=True)

    async def list_sessions(
        self, user_id: str, *, show_inactive: bool, limit: int, after: Keyset | None
    ) -> list[SessionRecord]:
        query = select(SessionRow).where(SessionRow.user_id == user_id)
        if not show_inactive:
            query = query.where(SessionRow.revoked_at.is_(None), SessionRow.expires_at > now())
        return await self._page(query, SessionRow, limit, after, _session)

    async def revoke_session(
        self,
        user_id: str,
        session_id: str,
        reason: str,
        staged: Staged[SessionRecord | None] | None = None,
    ) -> SessionRecord | None:
        """Revoke one of the user's sessions (idempotent); None if it is not theirs."""
        stamp = now()

        def tx(db: Session) -> SessionRecord | None:
            row = db.get(SessionRow, session_id)
            if row is None or row.user_id != user_id:
                return None
            if row.revoked_at is None:
                row.revoked_at = stamp
                row.revoke_reason = reason
            return _session(row)

        return await self._run(staging(staged, tx), write=True)

    async def revoke_all_sessions(
        self,
        user_id: str,
        keep_session_id: str,
        reason: str,
        staged: Staged[list[str]] | None = None,
    ) -> list[str]:
        """Revoke every live session of the user but ``keep_session_id``; their ids."""
        stamp = now()

        def tx(db: Session) -> list[str]:
            ids = list(
                db.execute(
                    select(SessionRow.id).where(
                        SessionRow.user_id == user_id,
                        SessionRow.revoked_at.is_(None),
                        SessionRow.id != keep_session_id,
                    )
                ).scalars()
            )
            if ids:
                db.execute(
                    update(SessionRow)
                    .where(SessionRow.id.in_(ids))
                    .values(revoked_at=stamp, revoke_reason=reason)
                )
            return ids

        return await self._run(staging(staged, tx), write=True)

    # API keys.

    async def create_api_key(
        self,
        *,
        key_id: str,
        user_id: str,
        display_name: str,
        digest: str,
        scopes: str,
        expires_at: dt.datetime | None,
        max_keys: int,
        staged: Staged[ApiKeyRecord | None] | None = None,
        assistant_pins: Sequence[tuple[str, int]] = (),
    ) -> ApiKeyRecord | None:
        """The new key; None if the user already has ``max_keys`` live keys."""
        stamp = now()

        def tx(db: Session) -> ApiKeyRecord | None:
            live = db.execute(
                select(func.count())
                .select_from(ApiKeyRow)
                .where(ApiKeyRow.user_id == user_id, _live_key(stamp))
            ).scalar_one()
            if live >= max_keys:
                return None
            row = ApiKeyRow(
                id=key_id,
                user_id=user_id,
                display_name=display_name,
                digest=digest,
                scopes=scopes,
                created_at=stamp,
                expires_at=expires_at,
                revoked_at=None,
                last_used_at=None,
                assistant_pins=stored_pins(assistant_pins),
            )
            db.add(row)
            return _api_key(row)

        return await self._run(staging(staged, tx), write=True)

    async def list_api_keys(
        self, user_id: str, *, show_inactive: bool, limit: int, after: Keyset | None
    ) -> list[ApiKeyRecord]:
        query = select(ApiKeyRow).where(ApiKeyRow.user_id == user_id)
        if not show_inactive:
            query = query.where(_live_key(now()))
        return await self._page(query, ApiKeyRow, limit, after, _api_key)

    async def revoke_api_key(
        self, user_id: str, key_id: str, staged: Staged[ApiKeyRecord | None] | None = None
    ) -> ApiKeyRecord | None:
        """Revoke one of the user's API keys (idempotent); None if it is not theirs."""

        def tx(db: Session) -> ApiKeyRecord | None:
            row = db.get(ApiKeyRow, key_id)
            if row is None or row.user_id != user_id:
                return None
            if row.revoked_at is None:
                row.revoked_at = now()
            return _api_key(row)

        return await self._run(staging(staged, tx), write=True)

    # Paging: newest first, keyset on (created_at, id) so pages are stable under inserts.

    async def _page(
        self,
        query: Select[_R],
        model: type[_R],
        limit: int,
        after: Keyset | None,
        record: Callable[[_R], _Rec],
    ) -> list[_Rec]:
        if after is not None:
            when, last_id = after
            query = query.where(
                or_(model.created_at < when, and_(model.created_at == when, model.id < last_id))
            )
        query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit)

        def tx(db: Session) -> list[_Rec]:
            return [record(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)


def _redeem(db: Session, digest: str, new_digest: str, when: dt.datetime) -> Redemption:
    token = db.get(RefreshTokenRow, digest)
    if token is None:
        return Redemption("invalid")
    session = db.get(SessionRow, token.session_id)
    if session is None:
        return Redemption("invalid")
    if token.used_at is not None:
        return Redemption("reused", _session(session))
    if session.revoked_at is not None or session.expires_at <= when:
        return Redemption("invalid", _session(session))
    if token.expires_at <= when:
        return Redemption("invalid", _session(session))
    claimed = db.execute(
        update(RefreshTokenRow)
        .where(RefreshTokenRow.digest == digest, RefreshTokenRow.used_at.is_(None))
        .values(used_at=when)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        # Another request redeemed it between our read and this write.
        return Redemption("reused", _session(session))
    db.add(
        RefreshTokenRow(
            digest=new_digest,
            session_id=session.id,
            created_at=when,
            expires_at=session.expires_at,
            used_at=None,
        )
    )
    session.last_seen_at = when
    return Redemption("rotated", _session(session))
