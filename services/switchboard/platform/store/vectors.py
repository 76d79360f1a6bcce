"""The vector engines: sqlite-vec in every SQLite connection, pgvector on PostgreSQL.

SQLite. Python's ``sqlite3`` here is built without ``enable_load_extension``,
but it links the system ``libsqlite3``, so sqlite-vec is registered with that
library's ``sqlite3_auto_extension``: every connection opened afterwards in
this process (the stdlib driver's and aiosqlite's alike) has ``vec0`` and the
``vec_*`` functions. ``sqlitevec.register_sqlite_vec`` does it once per process
and is called when a SQLite ``Database`` is made, before its first connection.

PostgreSQL. pgvector is a server extension a deployment brings (or not);
``vector_support`` finds it, creating it in the database if the server has it
and the role may.

Either way a database without the engine keeps working: ``vector_support``
says why not (``VectorSupport.reason``, worded to be logged once at start)
and the caller runs full-text only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from switchboard.platform.store.db import Database
from switchboard.platform.store.sqlitevec import register_sqlite_vec

log = logging.getLogger(__name__)

#: What follows every reason: what the service does without the engine.
FULL_TEXT_ONLY: Final = "semantic search is off and search is full-text only"


@dataclass(frozen=True)
class VectorSupport:
    """Whether a database can hold and search vectors, and if not, why."""

    available: bool
    #: ``sqlite-vec v0.1.9`` or ``pgvector 0.6.2``; "" when not available.
    engine: str = ""
    #: One sentence for the start log when not available ("" otherwise).
    reason: str = ""


def _sqlite_support(db: Session) -> VectorSupport:
    try:
        version = db.execute(text("SELECT vec_version()")).scalar_one()
    except DBAPIError:
        why = register_sqlite_vec() or (
            "this SQLite connection has no vec0 (Python's sqlite3 does not use the "
            "system libsqlite3 that sqlite-vec was registered with)"
        )
        return VectorSupport(False, reason=f"sqlite-vec is not available: {why}; {FULL_TEXT_ONLY}")
    return VectorSupport(True, engine=f"sqlite-vec {version}")


# Serializes CREATE EXTENSION across replicas starting together (two would race for
# pg_extension's unique name).
_EXTENSION_LOCK: Final = 0x5EC7_0056


def _postgres_support(db: Session) -> VectorSupport:
    version = db.execute(
        text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    ).scalar_one_or_none()
    if version is not None:
        return VectorSupport(True, engine=f"pgvector {version}")
    available = db.execute(
        text("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
    ).scalar_one_or_none()
    if available is None:
        return VectorSupport(
            False,
            reason=(
                "the PostgreSQL server has no pgvector extension (install pgvector 0.6 or "
                f"later on the server: https://github.com/pgvector/pgvector); {FULL_TEXT_ONLY}"
            ),
        )
    try:
        with db.begin_nested():
            db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _EXTENSION_LOCK})
            db.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
    except DBAPIError as exc:
        state = getattr(exc.orig, "sqlstate", None) or type(exc.orig).__name__
        return VectorSupport(
            False,
            reason=(
                "the server has pgvector but this database does not, and CREATE EXTENSION "
                f"vector failed ({state}; a superuser or the database owner can run it); "
                f"{FULL_TEXT_ONLY}"
            ),
        )
    return VectorSupport(True, engine=f"pgvector {available}")


async def vector_support(database: Database) -> VectorSupport:
    """Whether ``database`` has a vector engine (creating pgvector in it if it can).

    Database outages propagate (the caller retries at its next start step);
    a missing engine is an answer, never an error.
    """
    if database.dialect_name == "sqlite":
        return await database.run(_sqlite_support, write=False)
    return await database.run(_postgres_support, write=True)
