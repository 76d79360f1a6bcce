"""Auth persistence: every SQL statement about users, sessions, refresh tokens and API keys.

Races that matter for security are settled by the database, not by Python:
redeeming a refresh token is a conditional UPDATE (``used_at IS NULL``) so two
concurrent redemptions cannot both succeed; the loser is treated as reuse.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from switchboard.platform.db import Database
from switchboard.platform.errors import AlreadyExists
from switchboard.platform.models import (
    ApiKeyRow,
    FederatedIdentityRow,
    RefreshTokenRow,
    SessionRow,
    UserRow,
)
from switchboard.platform.outbox import Staged, staged_in


def new_id() -> str:
    return secrets.token_hex(16)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class SessionStatus:
    user_id: str
    expires_at: dt.datetime
    revoked: bool


@dataclass(frozen=True)
class Redemption:
    """The outcome of presenting a refresh token."""

    outcome: str  # "rotated", "reused", "invalid"
    session: SessionRow | None = None


T = TypeVar("T")
R = TypeVar("R", SessionRow, ApiKeyRow)


@dataclass(frozen=True)
class Page(Generic[T]):
    items: Sequence[T]
    next_page_token: str


@dataclass(frozen=True)
class NewUser:
    """A user to create (``AuthStore.new_user``), with its federated identity if any."""

    row: UserRow
    #: (issuer, subject) of the identity it is created for.
    identity: tuple[str, str] | None = None


async def _add_user(db: AsyncSession, new: NewUser) -> None:
    """Insert ``new`` in ``db``'s transaction; AlreadyExists if its email or identity is taken."""
    user = new.row
    try:
        db.add(user)
        await db.flush()
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
            await db.flush()
    except IntegrityError:
        what = "email" if new.identity is None else "email or identity"
        raise AlreadyExists(f"an account with this {what} already exists") from None


#: Where a page of sessions or API keys starts: after (created_at, id), newest first.
Keyset = tuple[dt.datetime, str]


class AuthStore:
    """SQL for the auth service; takes and returns ORM rows (never proto).

    A write with events takes them as ``staged`` (``platform/outbox.py``):
    they are built from the write's result and written in its transaction.
    """

    def __init__(self, database: Database) -> None:
        self._sessions = database.sessions
        self._readers = database.readers

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
        now = utcnow()
        row = UserRow(
            id=new_id(),
            email=email,
            display_name=display_name,
            password_hash=password_hash,
            created_at=now,
            updated_at=now,
            version=1,
        )
        return NewUser(row, identity)

    async def create_user(
        self,
        email: str,
        display_name: str,
        password_hash: str | None,
        *,
        identity: tuple[str, str] | None = None,
    ) -> UserRow:
        """A new user; with ``identity`` (issuer, subject), linked to that federated identity."""
        new = self.new_user(email, display_name, password_hash, identity=identity)
        async with self._sessions.begin() as db:
            await _add_user(db, new)
        return new.row

    async def user_by_email(self, email: str) -> UserRow | None:
        async with self._readers() as db:
            return (
                await db.execute(select(UserRow).where(UserRow.email == email))
            ).scalar_one_or_none()

    async def user_by_id(self, user_id: str) -> UserRow | None:
        async with self._readers() as db:
            return await db.get(UserRow, user_id)

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        async with self._sessions.begin() as db:
            await db.execute(
                update(UserRow).where(UserRow.id == user_id).values(password_hash=password_hash)
            )

    async def update_display_name(
        self, user_id: str, display_name: str, expected_version: int | None
    ) -> UserRow | None:
        """The updated user; None if ``expected_version`` no longer matches."""
        async with self._sessions.begin() as db:
            query = update(UserRow).where(UserRow.id == user_id)
            if expected_version is not None:
                query = query.where(UserRow.version == expected_version)
            result = await db.execute(
                query.values(
                    display_name=display_name,
                    updated_at=utcnow(),
                    version=UserRow.version + 1,
                )
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
        return await self.user_by_id(user_id)

    async def federated_identities(self, user_id: str) -> list[FederatedIdentityRow]:
        async with self._readers() as db:
            rows = await db.execute(
                select(FederatedIdentityRow)
                .where(FederatedIdentityRow.user_id == user_id)
                .order_by(FederatedIdentityRow.created_at)
            )
            return list(rows.scalars())

    async def user_by_federated_identity(self, issuer: str, subject: str) -> UserRow | None:
        async with self._readers() as db:
            row = (
                await db.execute(
                    select(UserRow)
                    .join(FederatedIdentityRow, FederatedIdentityRow.user_id == UserRow.id)
                    .where(
                        FederatedIdentityRow.issuer == issuer,
                        FederatedIdentityRow.subject == subject,
                    )
                )
            ).scalar_one_or_none()
            return row

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
        staged: Staged[Any] | None = None,
    ) -> tuple[SessionRow, list[str]]:
        """A new session with its first refresh token, and the ids of sessions
        evicted (revoked) to keep the user within ``max_sessions`` live ones.

        With ``new_user`` (whose id is ``user_id``), the user is created in the
        same transaction: a failure anywhere leaves no account behind that the
        client was never told of (its retry would meet ALREADY_EXISTS).
        """
        now = utcnow()
        session = SessionRow(
            id=new_id(),
            user_id=user_id,
            auth_method=auth_method,
            created_at=now,
            last_seen_at=now,
            expires_at=expires_at,
            revoked_at=None,
            revoke_reason="",
            user_agent=user_agent,
            device_name=device_name,
            client_address=client_address,
        )
        async with self._sessions.begin() as db:
            if new_user is not None:
                await _add_user(db, new_user)
            live = (
                await db.execute(
                    select(SessionRow.id)
                    .where(
                        SessionRow.user_id == user_id,
                        SessionRow.revoked_at.is_(None),
                        SessionRow.expires_at > now,
                    )
                    .order_by(SessionRow.last_seen_at.desc(), SessionRow.id)
                )
            ).scalars()
            evicted = list(live)[max_sessions - 1 :]
            if evicted:
                await db.execute(
                    update(SessionRow)
                    .where(SessionRow.id.in_(evicted))
                    .values(revoked_at=now, revoke_reason="session_limit")
                )
            db.add(session)
            await db.flush()
            db.add(
                RefreshTokenRow(
                    digest=refresh_digest,
                    session_id=session.id,
                    created_at=now,
                    expires_at=expires_at,
                    used_at=None,
                )
            )
            return await staged_in(db, staged, (session, evicted))

    async def redeem_refresh_token(
        self,
        digest: str,
        new_digest: str,
        now: dt.datetime,
        staged: Staged[Redemption] | None = None,
    ) -> Redemption:
        """Exchange a refresh token for a new one in the same session.

        Presenting a token that was already exchanged is reuse: the whole
        session (the token family) is revoked, in the same transaction as the
        detection and its ``staged`` events, so the answer that reports the
        revocation never goes out without it.
        """
        async with self._sessions.begin() as db:
            result = await self._redeem(db, digest, new_digest, now)
            if result.outcome == "reused" and result.session is not None:
                await db.execute(
                    update(SessionRow)
                    .where(SessionRow.id == result.session.id, SessionRow.revoked_at.is_(None))
                    .values(revoked_at=now, revoke_reason="refresh_reuse")
                )
            return await staged_in(db, staged, result)

    @staticmethod
    async def _redeem(
        db: AsyncSession, digest: str, new_digest: str, now: dt.datetime
    ) -> Redemption:
        token = await db.get(RefreshTokenRow, digest)
        if token is None:
            return Redemption("invalid")
        session = await db.get(SessionRow, token.session_id)
        if session is None:
            return Redemption("invalid")
        if token.used_at is not None:
            return Redemption("reused", session)
        if session.revoked_at is not None or session.expires_at <= now:
            return Redemption("invalid", session)
        if token.expires_at <= now:
            return Redemption("invalid", session)
        claimed = await db.execute(
            update(RefreshTokenRow)
            .where(RefreshTokenRow.digest == digest, RefreshTokenRow.used_at.is_(None))
            .values(used_at=now)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            # Another request redeemed it between our read and this write.
            return Redemption("reused", session)
        db.add(
            RefreshTokenRow(
                digest=new_digest,
                session_id=session.id,
                created_at=now,
                expires_at=session.expires_at,
                used_at=None,
            )
        )
        session.last_seen_at = now
        return Redemption("rotated", session)

    async def session_status(self, session_id: str) -> SessionStatus | None:
        async with self._readers() as db:
            row = (
                await db.execute(
                    select(SessionRow.user_id, SessionRow.expires_at, SessionRow.revoked_at).where(
                        SessionRow.id == session_id
                    )
                )
            ).one_or_none()
        if row is None:
            return None
        return SessionStatus(row.user_id, row.expires_at, row.revoked_at is not None)

    async def session(self, user_id: str, session_id: str) -> SessionRow | None:
        async with self._readers() as db:
            row = await db.get(SessionRow, session_id)
        return row if row is not None and row.user_id == user_id else None

    async def list_sessions(
        self, user_id: str, *, show_inactive: bool, limit: int, after: Keyset | None
    ) -> list[SessionRow]:
        now = utcnow()
        query = select(SessionRow).where(SessionRow.user_id == user_id)
        if not show_inactive:
            query = query.where(SessionRow.revoked_at.is_(None), SessionRow.expires_at > now)
        return await self._page(query, SessionRow, limit, after)

    async def revoke_session(
        self, user_id: str, session_id: str, reason: str, staged: Staged[Any] | None = None
    ) -> SessionRow | None:
        """Revoke one of the user's sessions (idempotent); None if it is not theirs."""
        now = utcnow()
        async with self._sessions.begin() as db:
            row = await db.get(SessionRow, session_id)
            if row is None or row.user_id != user_id:
                return None
            if row.revoked_at is None:
                row.revoked_at = now
                row.revoke_reason = reason
            return await staged_in(db, staged, row)

    async def revoke_all_sessions(
        self, user_id: str, keep_session_id: str, reason: str, staged: Staged[Any] | None = None
    ) -> list[str]:
        now = utcnow()
        async with self._sessions.begin() as db:
            ids = list(
                (
                    await db.execute(
                        select(SessionRow.id).where(
                            SessionRow.user_id == user_id,
                            SessionRow.revoked_at.is_(None),
                            SessionRow.id != keep_session_id,
                        )
                    )
                ).scalars()
            )
            if ids:
                await db.execute(
                    update(SessionRow)
                    .where(SessionRow.id.in_(ids))
                    .values(revoked_at=now, revoke_reason=reason)
                )
            return await staged_in(db, staged, ids)

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
        staged: Staged[Any] | None = None,
    ) -> ApiKeyRow | None:
        """The new key; None if the user already has ``max_keys`` live keys."""
        now = utcnow()
        row = ApiKeyRow(
            id=key_id,
            user_id=user_id,
            display_name=display_name,
            digest=digest,
            scopes=scopes,
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
            last_used_at=None,
        )
        async with self._sessions.begin() as db:
            live = (
                await db.execute(
                    select(func.count())
                    .select_from(ApiKeyRow)
                    .where(
                        ApiKeyRow.user_id == user_id,
                        ApiKeyRow.revoked_at.is_(None),
                        (ApiKeyRow.expires_at.is_(None)) | (ApiKeyRow.expires_at > now),
                    )
                )
            ).scalar_one()
            if live >= max_keys:
                return None
            db.add(row)
            return await staged_in(db, staged, row)

    async def api_key(self, key_id: str) -> ApiKeyRow | None:
        async with self._readers() as db:
            return await db.get(ApiKeyRow, key_id)

    async def list_api_keys(
        self, user_id: str, *, show_inactive: bool, limit: int, after: Keyset | None
    ) -> list[ApiKeyRow]:
        now = utcnow()
        query = select(ApiKeyRow).where(ApiKeyRow.user_id == user_id)
        if not show_inactive:
            query = query.where(
                ApiKeyRow.revoked_at.is_(None),
                (ApiKeyRow.expires_at.is_(None)) | (ApiKeyRow.expires_at > now),
            )
        return await self._page(query, ApiKeyRow, limit, after)

    async def revoke_api_key(
        self, user_id: str, key_id: str, staged: Staged[Any] | None = None
    ) -> ApiKeyRow | None:
        async with self._sessions.begin() as db:
            row = await db.get(ApiKeyRow, key_id)
            if row is None or row.user_id != user_id:
                return None
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return await staged_in(db, staged, row)

    async def touch_api_key(self, key_id: str, when: dt.datetime) -> None:
        async with self._sessions.begin() as db:
            await db.execute(
                update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=when)
            )

    # Paging: newest first, keyset on (created_at, id) so pages are stable under inserts.

    async def _page(
        self, query: Select[R], model: type[R], limit: int, after: Keyset | None
    ) -> list[R]:
        if after is not None:
            when, last_id = after
            query = query.where(
                or_(model.created_at < when, and_(model.created_at == when, model.id < last_id))
            )
        query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit)
        async with self._readers() as db:
            return list((await db.execute(query)).scalars())
