"""What every service's store shares: one transaction with its errors mapped,
and request_id idempotency keys.

Stores own their SQL; this module owns how a transaction's failure reaches a
client (a race is ABORTED-like Conflict, an outage UNAVAILABLE, never a stack
trace) and how a create request's ``request_id`` makes retries safe. The keys
of every service live in one table (``idempotency_keys``, "<user>/<method>/<id>")
and are purged by the context service's maintenance after ``IDEMPOTENCY_TTL``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from google.protobuf.message import Message as ProtoMessage
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from switchboard.platform.errors import (
    Conflict,
    EtagMismatch,
    FieldViolation,
    InvalidArgument,
)
from switchboard.platform.store.db import Database, DatabaseUnavailable, is_outage
from switchboard.platform.store.models import IdempotencyRow, table_of
from switchboard.platform.store.prepared import Prepared
from switchboard.platform.values import names

_T = TypeVar("_T")

#: Idempotency keys are kept this long; a retry after that creates anew.
IDEMPOTENCY_TTL: Final = dt.timedelta(hours=24)

# ``claim`` runs in every create with a request_id (each run's answer has one):
# statements compiled once and run on the driver (``prepared.py``).
_KEYS: Final = table_of(IdempotencyRow)
_KEY: Final = Prepared(
    select(_KEYS.c.fingerprint, _KEYS.c.resource, _KEYS.c.created_at).where(
        _KEYS.c.key == bindparam("key")
    ),
    name="idempotency key",
)
_DROP_KEY: Final = Prepared(_KEYS.delete().where(_KEYS.c.key == bindparam("key")))
_ADD_KEY: Final = Prepared(_KEYS.insert(), columns=("key", "fingerprint", "resource", "created_at"))


async def transaction(
    database: Database,
    work: Callable[[Session], _T],
    *,
    write: bool,
    snapshot: bool = False,
    log: logging.Logger,
) -> _T:
    """One transaction of synchronous ORM code (``Database.run``), errors mapped."""
    try:
        return await database.run(work, write=write, snapshot=snapshot)
    except IntegrityError as exc:
        # Two writers raced for one key (PostgreSQL; SQLite serializes writers).
        raise Conflict("a concurrent request wrote the same resource; retry") from exc
    except Exception as exc:
        if not is_outage(exc):
            raise
        # SQLite "database is locked" past the busy timeout, a statement or
        # pool timeout, a lost connection, a server shutting down: the
        # database is unavailable or overloaded, not the request wrong.
        log.warning("database call failed: %s", type(exc).__name__)
        raise DatabaseUnavailable() from exc


async def retrying(operation: Callable[[], Awaitable[_T]]) -> _T:
    """Run a create once more if a concurrent twin won its idempotency key.

    Only PostgreSQL can get here (SQLite writers are serialized): the second
    run finds the winner's key and returns its result.
    """
    try:
        return await operation()
    except Conflict:
        return await operation()


@dataclass(frozen=True)
class Idempotency:
    """A create request's idempotency key and the fingerprint of its request."""

    key: str
    fingerprint: str


def idempotency(user_id: str, method: str, request: ProtoMessage) -> Idempotency | None:
    """The key of ``request``'s ``request_id`` (None without one); INVALID_ARGUMENT if malformed."""
    request_id: str = getattr(request, "request_id", "")
    if not request_id:
        return None
    if not names.REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument(
            "request_id is malformed",
            [FieldViolation("request_id", "must be 1-64 letters, digits, '-' or '_'")],
        )
    return Idempotency(
        key=f"{user_id}/{method}/{request_id}",
        fingerprint=hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest(),
    )


def earlier(db: Session, key: Idempotency) -> str | None:
    """The resource an earlier request with this key created, if its key is still kept.

    The same key with a different request is the caller's mistake: INVALID_ARGUMENT.
    """
    row = db.get(IdempotencyRow, key.key)
    return _resource(row.fingerprint, row.resource, row.created_at, key) if row else None


def claim(db: Session, key: Idempotency | None, resource: str) -> str | None:
    """Record ``key`` for ``resource``; the earlier resource instead if it was used."""
    if key is None:
        return None
    # One read decides: a second one could see a concurrent twin's key, just
    # committed, and take it for an expired one.
    connection = db.connection()
    existing = _KEY.first(connection, {"key": key.key})
    if existing is not None:
        found = _resource(existing[0], existing[1], existing[2], key)
        if found is not None:
            return found
        # Expired: this request creates anew.
        _DROP_KEY.execute(connection, {"key": key.key})
    _ADD_KEY.execute(
        connection,
        {
            "key": key.key,
            "fingerprint": key.fingerprint,
            "resource": resource,
            "created_at": names.now(),
        },
    )
    return None


def _resource(
    fingerprint: str, resource: str, created_at: dt.datetime, key: Idempotency
) -> str | None:
    if created_at <= names.now() - IDEMPOTENCY_TTL:
        return None
    if fingerprint != key.fingerprint:
        raise InvalidArgument(
            "request_id was already used for a different request",
            [FieldViolation("request_id", "was already used for a different request")],
        )
    return resource


def check_etag(etag: str, version: int, what: str = "resource") -> None:
    """Raise ABORTED unless ``etag`` (if given; the domain checked its form) names
    ``version`` of the ``what`` a store is about to change."""
    if etag and names.etag_version(etag) != version:
        raise EtagMismatch(f"the {what} changed since the etag was read; read it again")
