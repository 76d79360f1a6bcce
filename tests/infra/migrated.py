"""Databases already at the newest schema, for tests that start servers or stores on one.

Every server a test starts migrates its database; from nothing that is every
migration's statements (about 0.2 s on SQLite, more under load), for each of the
suite's thousand-odd servers. So the schema is built once per process, in a
template, and each test gets a copy: a SQLite file copied, a PostgreSQL database
made with ``CREATE DATABASE ... TEMPLATE`` (``postgres.py``). A server opening a
copy finds nothing to migrate. The migrations themselves are tested on empty
databases (``empty_database_url``, tests/platform/store/test_db.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from switchboard.platform.store.db import Database

_TEMPLATE_DIR = Path(tempfile.mkdtemp(prefix="switchboard-migrated-"))
_TEMPLATE = _TEMPLATE_DIR / "migrated.db"
_made = threading.Lock()


def migrate_now(url: str) -> None:
    """Migrate the database at ``url`` to the newest schema, from any thread or loop (in a
    thread of its own: the caller may be a test whose event loop is running)."""

    async def make() -> None:
        database = Database(url, timeout_s=60.0)
        try:
            await database.migrate()
        finally:
            await database.close()  # the last connection: SQLite's WAL is folded in

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, make()).result()


def sqlite_copy(path: Path) -> Path:
    """``path``: a new SQLite file at the newest schema, without rows."""
    with _made:
        if not _TEMPLATE.exists():
            building = _TEMPLATE_DIR / f"building-{os.getpid()}.db"
            migrate_now(f"sqlite+aiosqlite:///{building}")
            building.rename(_TEMPLATE)  # only a whole template is ever copied
    shutil.copyfile(_TEMPLATE, path)
    return path
