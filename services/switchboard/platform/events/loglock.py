"""Who may serve events on a database: one process alone, or all through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from switchboard.platform.config import POSTGRES_DRIVER, SQLITE_DRIVER, ConfigError
from switchboard.platform.store.db import (
    HEALTH_RETRY_S,
    SETTING_NAME,
    is_sqlite_memory,
    parse_database_url,
    stop_task,
)

log = logging.getLogger(__name__)


class DatabaseInUse(ConfigError):
    """Another process serves this database: a SQLite file (``lock_sqlite_file``), or a
    PostgreSQL database with an event log this process cannot share (``EventLogLock``)."""


@contextlib.contextmanager
def lock_sqlite_file(url: str) -> Iterator[None]:
    """Hold ``<file>.lock`` exclusively while serving a SQLite file; DatabaseInUse if taken.

    A SQLite file belongs to one serving process: two would each number the
    embedded event log from what they remember, recover each other's runs,
    and keep caches the other never invalidates. Refusing at start is the only
    state that is never half right. The lock is an advisory ``flock`` on a
    sidecar file (the database file itself is SQLite's to lock): released by
    the kernel when the process dies, however it dies, so a crash never
    leaves a stale lock; the holder's pid is written in it for the message.
    Only serving takes it: ``switchboard migrate`` does not (SQLite's own
    locks order it against a running server). PostgreSQL and ":memory:"
    take nothing.
    """
    parsed = parse_database_url(url)
    if parsed.drivername != SQLITE_DRIVER or is_sqlite_memory(parsed):
        yield
        return
    path = Path(parsed.database or "").resolve()
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"{SETTING_NAME}: cannot create the lock file {lock_path}: {exc.strerror}"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise DatabaseInUse(
                f"the SQLite database {path} is in use by {who} (lock {lock_path}); "
                "one process per SQLite file: stop the other one, or use PostgreSQL "
                "and Redis for several processes"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # Closing the descriptor releases the lock; the file stays (deleting
        # it would race with a process that just opened it).
        os.close(fd)


#: Key of the PostgreSQL advisory lock that says who serves events on a database
#: (a fixed int64 derived from a name, so every version agrees on it).
EVENT_LOG_LOCK_KEY: Final = int.from_bytes(
    hashlib.sha256(b"switchboard.embedded-event-log").digest()[:8], "big", signed=True
)
_INSTANCE_FIX: Final = "give every dispatcher process its own SWITCHBOARD_INSTANCE_ID"


def instance_lock_key(instance_id: str) -> int:
    """The advisory lock key of one dispatcher instance id (see ``EventLogLock``)."""
    digest = hashlib.sha256(f"switchboard.dispatcher-instance:{instance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


#: How often the lock's connection is checked; a closed socket is noticed at once.
EVENT_LOG_LOCK_CHECK_S: Final = 1.0
_REDIS_FIX: Final = (
    "several processes on one PostgreSQL database share events only through Redis: "
    "set SWITCHBOARD_REDIS_URL on every process"
)
_HOLDER_SQL: Final = text(
    "SELECT a.application_name, host(a.client_addr), l.mode"
    " FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid::bigint = :high AND l.objid::bigint = :low"
    " AND l.pid <> pg_backend_pid()"
    " ORDER BY l.mode LIMIT 1"
)


class EventLogLock:
    """Who serves events on a PostgreSQL database: one process alone, or all through Redis.

    The embedded event log (no SWITCHBOARD_REDIS_URL) keeps its head, ring and
    subscribers in its process: two such processes on one database number
    events apart (each one's writes then fail on the other's positions) and
    never see each other's events, and a process with Redis next to one
    without splits the events between two logs. So a process with the
    embedded log holds a session-level advisory lock exclusively, a process
    with Redis holds it shared: any number of Redis processes run together,
    and anything else is refused at start (``DatabaseInUse``, naming the
    holder), never half working.

    A dispatcher process also holds its instance id exclusively (``instance``):
    a replica owns its runs by that id, so a second live process with the same
    id (two terminals on one host, whose name is the default id) would take the
    first's running runs for its own leftovers and fail or requeue them.

    The lock lives as long as its connection, one of its own held for the
    process lifetime. When that connection is lost (a restarted server, a
    terminated backend), the lock is taken again on a new connection as soon
    as the database answers; if another process took it meanwhile, this one
    must not go on serving beside it: ``on_lost`` is called (the server stops,
    as on SIGTERM) and the keeper ends. SQLite files have their own lock
    (``lock_sqlite_file``): a no-op there. ``switchboard migrate`` takes nothing.
    """

    def __init__(
        self,
        url: str,
        *,
        embedded: bool,
        timeout_s: float,
        on_lost: Callable[[], None],
        instance: str = "",
        check_s: float = EVENT_LOG_LOCK_CHECK_S,
        retry_s: float = HEALTH_RETRY_S,
    ) -> None:
        parsed = parse_database_url(url)
        self._embedded = embedded
        self._timeout_s = timeout_s
        self._on_lost = on_lost
        self._instance = instance
        self._check_s = check_s
        self._retry_s = retry_s
        self._display_url = parsed.render_as_string(hide_password=True)
        self._engine: AsyncEngine | None = None
        if parsed.drivername == POSTGRES_DRIVER:
            # Shown to a refused process as the holder (pg_stat_activity).
            name = f"switchboard pid={os.getpid()} host={socket.gethostname()}"
            self._engine = create_async_engine(
                parsed,
                poolclass=NullPool,
                # No transaction stays open on a connection held for hours.
                isolation_level="AUTOCOMMIT",
                connect_args={
                    "timeout": timeout_s,
                    "command_timeout": timeout_s,
                    "server_settings": {"application_name": name[:63]},
                },
            )
        self._connection: AsyncConnection | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Whether this process holds the lock now (False while taking it again).
        self.held = False

    async def acquire(self) -> None:
        """Take the lock and keep it; DatabaseInUse if another process's mode excludes ours."""
        if self._engine is None:
            return
        await self._take(self._engine)
        self._task = asyncio.get_running_loop().create_task(self._keep(), name="event-log-lock")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        await self._drop()
        if self._engine is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout_s):
                    await self._engine.dispose()

    async def _take(self, engine: AsyncEngine) -> None:
        function = "pg_try_advisory_lock" if self._embedded else "pg_try_advisory_lock_shared"
        async with asyncio.timeout(self._timeout_s):
            connection = await engine.connect()
            try:
                taken = await connection.scalar(
                    text(f"SELECT {function}(:key)"), {"key": EVENT_LOG_LOCK_KEY}
                )
                refusal = None if taken else await self._refusal(connection)
                if refusal is None and self._instance:
                    refusal = await self._take_instance(connection)
                raw = await connection.get_raw_connection()
            except BaseException:
                await _close_quietly(connection)
                raise
            if refusal is not None:
                await _close_quietly(connection)
                raise DatabaseInUse(refusal)
        driver = raw.driver_connection
        if driver is not None:
            # asyncpg tells when the socket closes: no wait for the next check.
            driver.add_termination_listener(lambda *_: self._wake.set())
        self._connection = connection
        self.held = True

    async def _take_instance(self, connection: AsyncConnection) -> str | None:
        """Hold this dispatcher's instance id; the refusal if another process holds it."""
        key = instance_lock_key(self._instance)
        if await connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}):
            return None
        who, _ = await self._holder(connection, key)
        return (
            f"another dispatcher process on {self._display_url} uses "
            f"SWITCHBOARD_INSTANCE_ID={self._instance!r}: {who}; {_INSTANCE_FIX}"
        )

    @staticmethod
    async def _holder(connection: AsyncConnection, key: int) -> tuple[str, str | None]:
        """Who holds advisory lock ``key`` (as a phrase), and in which mode."""
        row = (
            await connection.execute(
                _HOLDER_SQL, {"high": (key >> 32) & 0xFFFFFFFF, "low": key & 0xFFFFFFFF}
            )
        ).first()
        if row is None:
            return "another process", None
        name, address, mode = row
        found = re.fullmatch(r"switchboard pid=(\d+) host=(.*)", name or "")
        who = f"process {found[1]} on {found[2]}" if found else "another process"
        if address:
            who += f" (client {address})"
        return who, mode

    async def _refusal(self, connection: AsyncConnection) -> str:
        who, mode = await self._holder(connection, EVENT_LOG_LOCK_KEY)
        embedded_holder = self._embedded if mode is None else mode == "ExclusiveLock"
        kind = "without Redis (the embedded event log)" if embedded_holder else "with Redis"
        mixed = ", and this process has none" if self._embedded and not embedded_holder else ""
        return (
            f"the PostgreSQL database {self._display_url} is in use by {who} {kind}{mixed}; "
            f"{_REDIS_FIX}"
        )

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self.held = False
        if connection is not None:
            # Closing the session releases the lock.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout_s):
                    await _close_quietly(connection)

    async def _keep(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_s):
                    await self._wake.wait()
            self._wake.clear()
            connection, engine = self._connection, self._engine
            if engine is None:
                return
            try:
                if connection is not None:
                    async with asyncio.timeout(self._timeout_s):
                        await connection.execute(text("SELECT 1"))
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means the session may be gone
                log.error(  # noqa: TRY400 - an outage, no stack
                    "lost the connection holding the event log lock; taking it again",
                    extra={"error": type(exc).__name__},
                )
            await self._drop()
            while True:
                await asyncio.sleep(self._retry_s)
                try:
                    await self._take(engine)
                except asyncio.CancelledError:
                    raise
                except DatabaseInUse as exc:
                    log.error("cannot serve on: %s", exc)  # noqa: TRY400 - not a bug
                    self._on_lost()
                    return
                except Exception:  # noqa: BLE001, S112 - still down: retry
                    continue
                log.warning("the event log lock is held again")
                break


async def _close_quietly(connection: AsyncConnection) -> None:
    """Close a connection that may already be dead (its error says nothing new)."""
    with contextlib.suppress(Exception):
        await connection.close()
