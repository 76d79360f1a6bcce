"""The rows a credential check reads: a session's status and an API key's state.

Every process authenticates, so every process reads these; the auth service
owns their lifecycle (``auth/store.py`` creates, rotates and revokes them).
Reading them here keeps the credential kernel free of the auth service.
Failures are not mapped: the authenticator maps them itself, with one DEBUG
line per failed call during an outage rather than a warning.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from switchboard.platform.store.db import Database
from switchboard.platform.store.models import ApiKeyRow, SessionRow


@dataclass(frozen=True)
class SessionStatus:
    user_id: str
    expires_at: dt.datetime
    revoked: bool


@dataclass(frozen=True)
class ApiKeyState:
    user_id: str
    #: The keyed hash of the secret (``opaque.py``); the secret is never stored.
    digest: str
    scopes: tuple[str, ...]
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None
    #: The assistants the key pins, each ``(name, revision)`` (``pins``).
    assistant_pins: tuple[tuple[str, int], ...] = ()


def pins(stored: str) -> tuple[tuple[str, int], ...]:
    """``api_keys.assistant_pins`` read: space-separated ``{assistant}@{revision}``."""
    found = []
    for entry in stored.split():
        name, _, revision = entry.rpartition("@")
        if name and revision.isdigit():
            found.append((name, int(revision)))
    return tuple(found)


def stored_pins(given: Sequence[tuple[str, int]]) -> str:
    """What ``pins`` reads back."""
    return " ".join(f"{name}@{revision}" for name, revision in given)


class CredentialRecords:
    """Reads of sessions and API keys for the per-call credential check."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def session_status(self, session_id: str) -> SessionStatus | None:
        def tx(db: Session) -> SessionStatus | None:
            row = db.execute(
                select(SessionRow.user_id, SessionRow.expires_at, SessionRow.revoked_at).where(
                    SessionRow.id == session_id
                )
            ).one_or_none()
            if row is None:
                return None
            return SessionStatus(row.user_id, row.expires_at, row.revoked_at is not None)

        return await self._database.run(tx, write=False)

    async def api_key(self, key_id: str) -> ApiKeyState | None:
        def tx(db: Session) -> ApiKeyState | None:
            row = db.get(ApiKeyRow, key_id)
            if row is None:
                return None
            return ApiKeyState(
                user_id=row.user_id,
                digest=row.digest,
                scopes=tuple(row.scopes.split()),
                expires_at=row.expires_at,
                revoked_at=row.revoked_at,
                last_used_at=row.last_used_at,
                assistant_pins=pins(row.assistant_pins),
            )

        return await self._database.run(tx, write=False)

    async def touch_api_key(self, key_id: str, when: dt.datetime) -> None:
        """Record that the key was used (a hint for people, written at most once a minute)."""

        def tx(db: Session) -> None:
            db.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=when))

        await self._database.run(tx, write=True)
