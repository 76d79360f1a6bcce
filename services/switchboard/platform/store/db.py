"""The database: one async engine per process, SQLite or PostgreSQL.

Stores get sessions from ``Database.sessions``; nothing else creates engines.
The two supported backends are the embedded default (SQLite through
aiosqlite) and the scaled-out one (PostgreSQL through asyncpg); any other URL
is refused at start, so a typo cannot silently select a driver we never test.

Every network wait is bounded by ``timeout_s``: connecting, each statement,
waiting for a pooled connection, and ``ping``. A database that stops
answering turns into an error, never into a hung RPC.

SQLite notes. Python's sqlite3 driver (before 3.16) only opens a transaction
before INSERT/UPDATE/DELETE, so SELECTs and DDL run outside it; we switch that
off and emit BEGIN ourselves (the recipe in SQLAlchemy's SQLite docs) so
transactions and migrations are really atomic. The BEGIN is ``IMMEDIATE`` by
default: a deferred transaction that reads and then writes fails at once with
"database is locked" when another connection wrote in between (the busy
timeout does not apply to that upgrade), while an immediate one waits for the
write lock up to the busy timeout. That is the behaviour store code written
for PostgreSQL expects. Read-only work may opt into ``DEFERRED`` with the
``SQLITE_BEGIN`` execution option to run concurrently with a writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import aiosqlite
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from opentelemetry.trace import Span, SpanKind, StatusCode, get_current_span
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, NullPool, QueuePool

from switchboard.platform.config import POSTGRES_DRIVER, SQLITE_DRIVER, ConfigError
from switchboard.platform.errors import DatabaseUnavailable as DatabaseUnavailable  # noqa: PLC0414 - re-exported
from switchboard.platform.observe import telemetry
from switchboard.platform.store.prepared import Prepared
from switchboard.platform.store.sqlitevec import register_sqlite_vec

log = logging.getLogger(__name__)

SETTING_NAME: Final = "SWITCHBOARD_DATABASE_URL"
MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

# Execution option naming how a SQLite transaction begins: "IMMEDIATE" (the
# default, takes the write lock up front) or "DEFERRED" (for read-only work).
# Ignored on PostgreSQL. Use as
# ``await session.connection(execution_options={SQLITE_BEGIN: "DEFERRED"})``
# before the session's first statement.
SQLITE_BEGIN: Final = "switchboard_sqlite_begin"
_SQLITE_BEGIN_MODES: Final = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})

# Threads (and pooled connections) that run ``Database.run`` work on a SQLite
# file: one for the group commit, one for the reads beside it. More only take
# turns at the interpreter lock: more server CPU per run and a later paced first
# delta (decisions 35 has the figures).
SQLITE_THREADS: Final = 2
#: Most writes committed together (bounds one group's time in the thread).
GROUP_COMMIT_MAX: Final = 128
#: Distinct statements ``fetch`` keeps compiled (its callers pass a few constants).
_FETCHED_MAX: Final = 64
#: Errors after which a group's transaction cannot be trusted (locked, I/O, disk full).
_GROUP_FATAL: Final = (OperationalError,)
#: ``Session.info`` keys of a group commit's work: its ``Group``, and the callbacks the
#: work asked for (``after_commit``), kept only if it succeeds.
_GROUP: Final = "switchboard.group"
_AFTER: Final = "switchboard.after_commit"

_T = TypeVar("_T")

# Pool for PostgreSQL. Each process holds at most POOL_SIZE + MAX_OVERFLOW
# connections; with one process per service and a few replicas that stays well
# under PostgreSQL's default max_connections of 100.
POOL_SIZE: Final = 5
MAX_OVERFLOW: Final = 5
# Recycle before common idle cuts (load balancers, pgbouncer) drop the socket.
POOL_RECYCLE_S: Final = 1800
#: A PostgreSQL connection idle this long is pinged before it is handed out; one given
#: back more recently is not (``_ping_if_idle``).
PING_AFTER_IDLE_S: Final = 1.0

#: Health probe period while the database answers (an outage seen by a call
#: probes at once, so this only bounds how long an idle process takes to notice).
HEALTH_INTERVAL_S: Final = 10.0
#: Health probe period while it does not, and the least time between two probes.
HEALTH_RETRY_S: Final = 0.5

# Alembic keeps the running migration in module-level proxies (alembic.context,
# alembic.op), so two migrations interleaving on one event loop would clobber
# each other. One lock per loop serializes them within the process; env.py's
# database lock serializes processes.
_alembic_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


# SQLite primary result codes that say "not now" rather than "wrong": busy or
# locked past the busy timeout, I/O, full disk, cannot open, out of memory,
# interrupted, a read-only file (permissions, a full WAL directory).
_SQLITE_OUTAGE_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
# PostgreSQL SQLSTATE classes that say "not now": 08 connection exception,
# 53 insufficient resources (too many connections, disk full), 57 operator
# intervention (shutting down, starting up, statement timeout), 58 system
# error (I/O); and the retryable transaction rollbacks (serialization failure,
# deadlock) and lock_not_available.
_PG_OUTAGE_CLASSES: Final = frozenset({"08", "53", "57", "58"})
_PG_OUTAGE_STATES: Final = frozenset({"40001", "40P01", "55P03"})
# Deep enough for SQLAlchemy -> adapter -> driver -> socket error chains.
_MAX_CHAIN: Final = 8


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot serve now, rather than that the work is wrong.

    The one classification of database failures (requests answer UNAVAILABLE
    with retry, health probes the database, background work retries later).
    It follows the explicit causes (``raise ... from``, SQLAlchemy's ``orig``),
    never ``__context__``: an error raised while handling an outage is not one.
    Drivers disagree on wrapping: asyncpg's lost-connection and shutdown errors
    reach us as a bare ``DBAPIError`` whose ``orig`` holds the asyncpg error,
    so the SQLSTATE decides, not the wrapper's class. A SQLite error is judged
    by its result code ("database is locked" is BUSY), so "no such table"
    stays a bug.
    """
    seen: set[int] = set()
    operational = False
    node: BaseException | None = exc
    while node is not None and id(node) not in seen and len(seen) < _MAX_CHAIN:
        seen.add(id(node))
        verdict = _judge(node)
        if verdict is not None:
            return verdict
        operational = operational or isinstance(node, OperationalError | InterfaceError)
        orig = getattr(node, "orig", None)
        node = orig if isinstance(orig, BaseException) else node.__cause__
    # Nothing more specific: PEP 249's OperationalError and InterfaceError are
    # the database's or the connection's trouble, not the statement's.
    return operational


def log_failure(logger: logging.Logger, message: str, exc: BaseException) -> None:
    """Log a failed database call without letting an outage flood the logs.

    A failure that is not an outage is a bug: logged at ERROR with its stack.
    An outage is one DEBUG line per call: the database health monitor
    (``DatabaseHealth``, which every failed call reaches) says once that the
    database does not answer and once that it is back, and during an outage
    every request would otherwise add a traceback.
    """
    if is_outage(exc):
        logger.debug(message, extra={"error": type(exc).__name__})
    else:
        logger.error(message, exc_info=(type(exc), exc, exc.__traceback__))


def _judge(exc: BaseException) -> bool | None:
    """True or False when ``exc`` alone decides; None to look at its cause."""
    if isinstance(exc, DatabaseUnavailable | PoolTimeout | DisconnectionError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OSError | TimeoutError):  # ConnectionError is an OSError
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and (code & 0xFF) in _SQLITE_OUTAGE_CODES
    if type(exc).__module__.startswith("asyncpg"):
        sqlstate = getattr(exc, "sqlstate", None)
        if isinstance(sqlstate, str) and len(sqlstate) == 5:
            return sqlstate[:2] in _PG_OUTAGE_CLASSES or sqlstate in _PG_OUTAGE_STATES
        # Client-side errors carry no SQLSTATE; of those only "connection is
        # closed" (and "... was closed in the middle of operation") is an outage.
        return "closed" in str(exc)
    return None


def _alembic_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _alembic_locks.get(loop)
    if lock is None:
        lock = _alembic_locks[loop] = asyncio.Lock()
    return lock


class Revisions(NamedTuple):
    head: str
    known: frozenset[str]


@functools.cache
def _revisions() -> Revisions:
    """This code's newest revision and every revision it knows. Read once per process:
    Alembic builds the map by executing each revision's script, and the packaged
    scripts do not change while it runs."""
    scripts = ScriptDirectory.from_config(alembic_config())
    head = scripts.get_current_head()
    if head is None:
        raise RuntimeError("the packaged migrations have no head revision")
    return Revisions(head, frozenset(revision.revision for revision in scripts.walk_revisions()))


def alembic_config() -> Config:
    """The Alembic configuration of the packaged migrations (no alembic.ini needed).

    The migrations ship inside the package so an installed wheel can migrate
    its own database. ``env.py`` expects the connection to migrate in
    ``config.attributes["connection"]`` (see ``Database.migrate``); for
    offline SQL generation (``sql=True``) set the ``sqlalchemy.url`` main
    option instead.
    """
    config = Config()
    # ConfigParser interpolates "%"; escape it in case the install path has one.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    return config


def parse_database_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # Do not echo the value: it may hold a password.
        raise ValueError(f"{SETTING_NAME} is not a valid database URL") from None
    if parsed.drivername not in (SQLITE_DRIVER, POSTGRES_DRIVER):
        raise ValueError(
            f"{SETTING_NAME} has unsupported scheme {parsed.drivername!r}; use "
            f"{SQLITE_DRIVER}:///path/to/file.db or "
            f"{POSTGRES_DRIVER}://user:password@host:5432/database"
        )
    return parsed


def is_sqlite_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


class DatabaseHealth:
    """Whether the database answers now; NOT_SERVING during an outage, back by itself.

    Every database failure is shown to ``observe`` (from any thread); an outage
    (``is_outage``) makes the monitor probe at once, so a stopped server is
    noticed on the first failed call rather than a period later. The probe,
    a trivial statement on a connection of its own (not from the pool, so a
    saturated pool is not taken for an outage), decides: only a failed probe
    turns the state to down, so one lock timeout or dropped connection does
    not flap it. While down it probes every ``retry_s`` until the database
    answers. Listeners (``on_state_change``) hear each transition.
    """

    def __init__(
        self,
        probe: Callable[[], Awaitable[None]],
        *,
        interval_s: float = HEALTH_INTERVAL_S,
        retry_s: float = HEALTH_RETRY_S,
    ) -> None:
        self._probe = probe
        self._interval_s = interval_s
        self._retry_s = retry_s
        self.serving = True
        self._listeners: list[Callable[[bool], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def on_state_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(serving)`` on every transition."""
        self._listeners.append(listener)

    def start(self) -> None:
        """Probe in the background until ``close``."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="database-health")

    def observe(self, exc: BaseException) -> None:
        """Note a failed database call; an outage makes the monitor probe now. Any thread."""
        loop, wake = self._loop, self._wake
        if loop is None or not self.serving or not is_outage(exc):
            return
        try:
            if asyncio.get_running_loop() is loop:
                wake.set()
                return
        except RuntimeError:  # a driver or worker thread
            pass
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(wake.set)

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def _run(self) -> None:
        wake = self._wake
        while True:
            if self.serving:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval_s):
                        await wake.wait()
            wake.clear()
            try:
                await self._probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever stops the probe is "down"
                self._set(False, type(exc).__name__)
            else:
                self._set(True, "")
            # The least gap between probes (and the retry period while down):
            # a burst of failing calls must not turn into a burst of probes.
            await asyncio.sleep(self._retry_s)

    def _set(self, serving: bool, error: str) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        if serving:
            log.warning("the database answers again")
        else:
            log.error("the database does not answer", extra={"error": error})
        for listener in self._listeners:
            try:
                listener(serving)
            except Exception:  # a broken listener must not stop the monitor
                log.exception("database health listener failed")


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Stop a background task and wait until it has."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Group:
    """One group commit (``Database._group_write``), as the works in it see it.

    ``after`` runs on the event loop once the group's transaction committed, before
    any of its callers resumes and before the next group starts: in the order the
    works ran, which (one writer at a time) is the order their writes committed in.
    ``notes`` is for what a component does once per group (the event log's readback).
    """

    __slots__ = ("after", "notes")

    def __init__(self) -> None:
        self.after: list[Callable[[], None]] = []
        self.notes: dict[str, Any] = {}


def group_of(session: Session) -> Group | None:
    """The group commit ``session``'s work runs in; None outside one (PostgreSQL,
    in-memory SQLite, a session of one's own)."""
    group: Group | None = session.info.get(_GROUP)
    return group


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Call ``callback`` on the loop once ``session``'s work committed (``Group``);
    never if it rolls back. Only in a group commit's work (``group_of``)."""
    session.info[_AFTER].append(callback)


class Database:
    """One async engine and its session factory; open at start, close at shutdown."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        parsed = parse_database_url(url)
        self._timeout_s = timeout_s
        # Safe to log: the password is masked.
        self.display_url = parsed.render_as_string(hide_password=True)
        if parsed.drivername == SQLITE_DRIVER:
            self.engine: AsyncEngine = _sqlite_engine(parsed, timeout_s)
        else:
            self.engine = _postgres_engine(parsed, timeout_s)
        # expire_on_commit=False: stores return rows after committing, and an
        # expired attribute would otherwise trigger lazy IO outside the session.
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )
        # Sessions that only read (per-call credential and membership checks):
        # on SQLite they must not queue behind the single writer. Never write
        # through these: a deferred transaction that later writes can fail
        # with "database is locked" instead of waiting.
        self.readers: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine.execution_options(**{SQLITE_BEGIN: "DEFERRED"}), expire_on_commit=False
        )
        # ``fetch`` on PostgreSQL: one read-only statement without BEGIN and ROLLBACK, its
        # own snapshot, as on SQLite; the transaction gave it nothing but two round trips
        # (two thirds of a per-call check's). A work given to ``run`` keeps its
        # transaction whatever it does: it may lock rows or SET LOCAL.
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # SQLite files: a synchronous engine whose transactions run whole in a
        # worker thread (see ``run``). Not for ":memory:", which a second
        # engine could not see.
        self._sync_engine: Engine | None = None
        self._sync_readers: sessionmaker[Session] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._probe_executor: ThreadPoolExecutor | None = None
        # How long the loop waits for work in a SQLite thread; the thread's own
        # waits end sooner, at the busy timeout.
        self._thread_wait_s = timeout_s * 3
        if parsed.drivername == SQLITE_DRIVER and not is_sqlite_memory(parsed):
            self._sync_engine = _sync_sqlite_engine(parsed, timeout_s)
            self._sync_readers = sessionmaker(
                self._sync_engine.execution_options(**{SQLITE_BEGIN: "DEFERRED"}),
                expire_on_commit=False,
            )
            self._executor = ThreadPoolExecutor(SQLITE_THREADS, thread_name_prefix="sqlite")
            # Health probes get a thread of their own: never queued behind the stores' work.
            self._probe_executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite-probe")
        self._write_queue: deque[tuple[Callable[[Session], Any], asyncio.Future[Any]]] = deque()
        self._writer: asyncio.Task[None] | None = None
        #: Told when a group commit failed: it may have committed all the same (its
        #: thread outlived the wait), without its ``after`` callbacks.
        self._group_failures: list[Callable[[], None]] = []
        # ``fetch``: one stdlib connection per worker thread, closed with the database.
        self._sqlite_path = parsed.database or ""
        # The health probe's (a SQLite file's): opened read-write, never created.
        self._sqlite_uri = ""
        if self._probe_executor is not None:
            self._sqlite_uri = f"{Path(self._sqlite_path).resolve().as_uri()}?mode=rw"
        self._thread_connections = threading.local()
        #: ``fetch``'s statements on PostgreSQL, by their SQL (callers pass constants).
        self._fetched: dict[str, Prepared] = {}
        self._raw_connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        # Health probes connect on their own (PostgreSQL): a pool that is
        # saturated, or holds connections a restarted server dropped, must not
        # read as an outage, and an outage must not wait for the pool.
        self._probe_engine: AsyncEngine | None = None
        if parsed.drivername == POSTGRES_DRIVER:
            self._probe_engine = create_async_engine(
                parsed,
                poolclass=NullPool,
                connect_args={"timeout": timeout_s, "command_timeout": timeout_s},
            )
        self.health = DatabaseHealth(self._probe)
        # None when tracing is off (decided once): no span then, not even a check.
        self._tracer = telemetry.tracer("switchboard.db")
        for engine in (self.engine.sync_engine, self._sync_engine):
            if engine is not None:
                event.listen(engine, "handle_error", self._observe_error)

    def _observe_error(self, context: ExceptionContext) -> None:
        self.health.observe(context.original_exception)

    def pool_status(self) -> tuple[int, int, int]:
        """Pooled connections now: (checked out, idle, most), over every pool of ours.

        The health probe's connections are not pooled and not counted. A pool
        without a bound (overflow -1) counts its size as its most.
        """
        checked_out = idle = most = 0
        for engine in (self.engine.sync_engine, self._sync_engine):
            pool = engine.pool if engine is not None else None
            if not isinstance(pool, QueuePool):  # AsyncAdaptedQueuePool is one too
                continue
            checked_out += pool.checkedout()
            idle += pool.checkedin()
            most += pool.size() + max(0, pool._max_overflow)
        return checked_out, idle, most

    @property
    def group_commit(self) -> bool:
        """Whether writes run in group commits (a SQLite file): see ``Group``."""
        return self._executor is not None

    def on_group_failure(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` on the loop when a group commit fails (see ``Group``)."""
        self._group_failures.append(listener)

    @property
    def dialect_name(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    async def run(
        self, work: Callable[[Session], _T], *, write: bool, snapshot: bool = False
    ) -> _T:
        """Run ``work(session)`` as one transaction (committed if it returns) and return its result.

        ``work`` is synchronous ORM/Core code. On a SQLite file the whole
        transaction runs in one worker thread with the stdlib driver: one hop
        off the event loop instead of one per statement, cursor and fetch
        through aiosqlite, which made each short transaction cost about four
        times as much. On PostgreSQL (asyncpg is natively async) and in-memory
        SQLite it runs through ``AsyncSession.run_sync``. ``write=False`` opens
        a read transaction (SQLite DEFERRED); ``snapshot`` makes every statement
        of a PostgreSQL read see one snapshot (REPEATABLE READ), as a SQLite read
        transaction does anyway. The wait is bounded: a lock wait ends at the
        busy timeout, and the whole call at three times the database timeout.
        """
        span = None if self._tracer is None else self._span("db.transaction", work, write)
        try:
            return await self._run(work, write=write, snapshot=snapshot)
        except Exception as exc:
            # Timeouts and lock waits never reach the engine's error hook.
            self.health.observe(exc)
            if span is not None:
                span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
        finally:
            if span is not None:
                span.end()

    def _span(self, name: str, work: Callable[..., Any] | str, write: bool) -> Span | None:
        """A span for one transaction (its wait for the group commit included) or
        one statement, inside a traced call or run only: background loops (the
        outbox relay, lease renewals) would each start a trace of their own."""
        if self._tracer is None or not get_current_span().get_span_context().is_valid:
            return None
        what = work if isinstance(work, str) else getattr(work, "__qualname__", "")
        return self._tracer.start_span(
            name,
            kind=SpanKind.CLIENT,
            attributes={
                "db.system": self.dialect_name,
                # Which store's work, e.g. "RunStore.save.work": bounded, never the SQL.
                "switchboard.db.work": what.replace(".<locals>", ""),
                "switchboard.db.write": write,
            },
        )

    async def _run(self, work: Callable[[Session], _T], *, write: bool, snapshot: bool) -> _T:
        executor, readers = self._executor, self._sync_readers
        if executor is not None and readers is not None:

            def transaction() -> _T:
                with readers() as session:
                    result = work(session)
                    session.commit()
                    return result

            if write:
                # Bounded by its group's own time in the thread (``_write_loop``), not
                # by how long it queued: a write behind others is not an outage.
                return await self._group_write(work)
            return await self._thread_call(executor, transaction)
        async with (self.sessions if write else self.readers)() as session:
            if snapshot and self.dialect_name == "postgresql":
                await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            result = await session.run_sync(work)
            await session.commit()
            return result

    async def _group_write(self, work: Callable[[Session], _T]) -> _T:
        """Run ``work`` in the next group commit (SQLite files; see decisions 22).

        SQLite has one writer at a time. Writers queue here, first come first
        served, and one writer task takes everything queued so far into one
        transaction: each work in its own savepoint (a work that raises rolls
        back alone and its caller gets the exception), then one COMMIT, one
        fsync and one thread hop for all of them. Every result is returned
        only after that commit, so a caller sees exactly what serial
        transactions would give it, durability included. Writers neither
        occupy every worker thread (starving the reads behind them) nor spin
        in SQLite's busy-wait backoff. Other processes are still ordered by
        the busy timeout.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._write_queue.append((work, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name="sqlite-group-commit"
            )
        result: _T = await future
        return result

    async def _write_loop(self) -> None:
        while self._write_queue:
            batch: list[tuple[Callable[[Session], Any], asyncio.Future[Any]]] = []
            while self._write_queue and len(batch) < GROUP_COMMIT_MAX:
                item = self._write_queue.popleft()
                if not item[1].done():  # its caller gave up before it started
                    batch.append(item)
            executor = self._executor
            if not batch:
                continue
            if executor is None:
                _settle(batch, error=OperationalError("", {}, RuntimeError("database closed")))
                continue
            group = Group()
            try:
                outcomes = await self._thread_call(
                    executor, self._commit_group, [work for work, _ in batch], group
                )
            except asyncio.CancelledError as exc:
                self._group_failed()
                _settle(batch, error=exc)
                raise
            except Exception as exc:  # noqa: BLE001 - BEGIN or COMMIT failed: the whole group did
                self._group_failed()
                _settle(batch, error=exc)
                continue
            for callback in group.after:
                try:
                    callback()
                except Exception:  # one callback must not keep the callers from their results
                    log.exception("a group commit's after-commit callback failed")
            _settle(batch, outcomes=outcomes)

    def _group_failed(self) -> None:
        for listener in self._group_failures:
            try:
                listener()
            except Exception:
                log.exception("a group commit failure listener failed")

    def _commit_group(
        self, works: list[Callable[[Session], Any]], group: Group
    ) -> list[tuple[bool, Any]]:
        """One transaction, a savepoint per work; runs in a worker thread."""
        engine = self._sync_engine
        if engine is None:
            raise OperationalError("", {}, RuntimeError("database closed"))
        if len(works) == 1:
            # Alone in its group (a quiet moment): the transaction is the
            # work's own, so no savepoint is needed to roll it back alone.
            with (
                engine.connect() as connection,
                Session(
                    bind=connection, expire_on_commit=False, info={_GROUP: group, _AFTER: []}
                ) as session,
            ):
                return [_attempt(session, works[0], group)]
        outcomes: list[tuple[bool, Any]] = []
        with engine.connect() as connection, connection.begin():
            for work in works:
                with Session(
                    bind=connection,
                    join_transaction_mode="create_savepoint",
                    expire_on_commit=False,
                    info={_GROUP: group, _AFTER: []},
                ) as session:
                    outcomes.append(_attempt(session, work, group))
        return outcomes

    async def checkpoint(self) -> None:
        """SQLite: copy the WAL into the database file and empty it (an erasure's last
        step: old versions of erased rows live in WAL frames until then). PostgreSQL:
        nothing (its WAL is the operator's, with its backups: docs/privacy.md)."""
        if self.dialect_name != "sqlite":
            return

        def work(session: Session) -> bool:
            # (busy, frames in the WAL, frames checkpointed): busy 0 once it is all in.
            row = session.execute(text("PRAGMA wal_checkpoint(TRUNCATE)")).first()
            return row is None or int(row[0]) == 0

        if not await self.run(work, write=False):
            # A reader held an older snapshot past the busy timeout: the caller retries.
            raise DatabaseUnavailable("the database is busy; the checkpoint is retried")

    async def fetch(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Rows of one read-only statement (``:name`` parameters), for hot paths.

        Per-call checks (membership, versions) run on every RPC, where an ORM
        session's bookkeeping costs more than the query. On a SQLite file the
        statement runs on the worker thread's own stdlib connection in
        autocommit mode: one statement is its own consistent snapshot, so no
        BEGIN/COMMIT round trips. Values come back as the driver returns them
        (SQLite returns times as text: select none that need converting).
        """
        executor = self._executor
        span = None if self._tracer is None else self._span("db.query", "fetch", False)
        try:
            if executor is not None:
                return await self._thread_call(executor, self._fetch_sqlite, sql, params)
            if self.dialect_name == "postgresql":
                # On the driver (``prepared.py``), without a session: a third of the
                # Python of an ORM session's execute, on every RPC's check.
                statement = self._fetched.get(sql)
                if statement is None:
                    statement = Prepared(text(sql), name="fetch")
                    if len(self._fetched) < _FETCHED_MAX:
                        self._fetched[sql] = statement
                async with self._autocommit.connect() as connection:
                    return await connection.run_sync(partial(statement.rows, params=params))
            async with self.readers() as session:
                rows = (await session.execute(text(sql), params)).all()
                return [tuple(row) for row in rows]
        except Exception as exc:
            self.health.observe(exc)
            if span is not None:
                span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
        finally:
            if span is not None:
                span.end()

    def _fetch_sqlite(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        connection: sqlite3.Connection | None = getattr(self._thread_connections, "value", None)
        if connection is None:
            connection = sqlite3.connect(
                self._sqlite_path,
                timeout=self._timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            self._thread_connections.value = connection
            with self._connections_lock:
                self._raw_connections.append(connection)
        try:
            return connection.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            # The same exception type as every other database error here.
            raise OperationalError(sql, params, exc) from exc

    async def ping(self) -> None:
        """Run ``SELECT 1``; raise ``TimeoutError`` if the database does not answer in time.

        On a SQLite file it runs in a worker thread, where SQLite's busy
        timeout ends any wait (see ``_in_thread``).
        """
        executor = self._executor
        bound = self._timeout_s if executor is None else self._thread_wait_s
        try:
            if executor is not None:
                await self._in_thread(executor, self._ping_sqlite)
                return
            async with asyncio.timeout(self._timeout_s), self.engine.connect() as connection:
                # A health check must not queue behind SQLite's writer.
                await connection.execution_options(**{SQLITE_BEGIN: "DEFERRED"})
                await connection.execute(text("SELECT 1"))
        except TimeoutError:
            raise TimeoutError(
                f"database {self.display_url} did not answer within {bound}s"
            ) from None

    def _ping_sqlite(self) -> None:
        engine = self._sync_engine
        if engine is None:
            raise OperationalError("", {}, RuntimeError("database closed"))
        # Connecting runs the file's hooks (WAL, busy timeout); DEFERRED: not behind the writer.
        with engine.connect().execution_options(**{SQLITE_BEGIN: "DEFERRED"}) as connection:
            connection.exec_driver_sql("SELECT 1")

    async def _probe(self) -> None:
        """One health probe: a statement that needs the server (or the file) to answer."""
        if self._probe_executor is not None:
            await self._in_thread(self._probe_executor, self._probe_sqlite)
            return
        engine = self._probe_engine or self.engine
        # SQLite answers "SELECT 1" without reading the file; the schema does not.
        sql = "SELECT 1" if self._probe_engine is not None else "SELECT count(*) FROM sqlite_master"
        async with asyncio.timeout(self._timeout_s), engine.connect() as connection:
            await connection.execution_options(**{SQLITE_BEGIN: "DEFERRED"})
            await connection.execute(text(sql))

    def _probe_sqlite(self) -> None:
        """Read the schema on a connection of its own; runs in the probe thread.

        Not the pool's: a saturated pool is no outage. ``mode=rw``: a file that
        is gone cannot be opened (an outage) rather than created anew, empty.
        """
        connection = sqlite3.connect(
            self._sqlite_uri, uri=True, timeout=self._timeout_s, isolation_level=None
        )
        try:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchall()
        finally:
            connection.close()

    async def _in_thread(self, executor: ThreadPoolExecutor, work: Callable[[], None]) -> None:
        """Run SQLite ``work`` in ``executor``; the loop waits at most ``_thread_wait_s``.

        Nothing here cancels SQLite work: cancelling an aiosqlite statement
        makes SQLAlchemy discard its connection, and a second cancellation
        while it does (the probe's own timeout after ``close`` stopped the
        probe) is what can leave a close behind that outlives the event loop
        (see ``_AiosqliteConnection``). In a thread the busy timeout ends a
        wait for a lock; the loop merely stops waiting, and ``close`` waits
        for the thread.
        """
        await self._thread_call(executor, work)

    async def _thread_call(
        self, executor: ThreadPoolExecutor, work: Callable[..., _T], *args: Any
    ) -> _T:
        """``work(*args)`` in ``executor``; given up on (TimeoutError) only once the work
        itself has run ``_thread_wait_s`` by the clock of the thread running it.

        A loop timer around the wait measured the wrong thing: the time the work
        queued for a thread, and the time the loop was too busy to see it finish (a
        long garbage collection, a saturated host: the SQLite threads then wait for
        the interpreter lock too). Either made a write that was merely late, or had
        even committed, fail as an outage: 171 "event log write failed" in one CI
        run, and then every later write of that log colliding with the rows it had
        not heard of. So the timer only prompts a look at the work's own clock.

        A caller cancelled while the work waits for a thread unqueues it; once
        running it finishes in its thread (see ``_in_thread``).
        """
        limit = self._thread_wait_s
        started: list[float] = []

        def timed() -> _T:
            started.append(time.monotonic())
            return work(*args)

        submitted = executor.submit(timed)
        waiting = asyncio.wrap_future(submitted)
        try:
            while True:
                # asyncio.wait, not wait_for or asyncio.timeout: it never cancels
                # the work, and on 3.11 wait_for drops a cancellation that arrives as
                # the work finishes (``close`` then waited forever).
                await asyncio.wait((waiting,), timeout=limit)
                if submitted.done():  # finished, though the loop may not have seen it yet
                    return await waiting
                ran = time.monotonic() - started[0] if started else 0.0
                # Against the whole bound, not this round's wait: a second round waits
                # only the rest, and comparing with that could fail a write before its
                # bound, naming the rest as the bound ("within 0.00525s", seen in the suite).
                if ran >= self._thread_wait_s:
                    raise TimeoutError(
                        f"database {self.display_url} did not answer within "
                        f"{self._thread_wait_s:g}s"
                    )
                limit = self._thread_wait_s - ran  # queued, or started late: the rest
        except asyncio.CancelledError:
            waiting.cancel()  # unqueued if it has not started; a running one finishes
            raise

    async def migrate(self) -> None:
        """Upgrade the schema to the newest revision; a no-op when already there.

        Alembic is synchronous, so it runs through ``run_sync`` on an async
        connection: its statements still go through the async driver and the
        event loop is never blocked. Concurrent callers are serialized: in
        one process by a lock, across processes (mesh replicas starting
        together) by a database lock taken in ``env.py``. No overall deadline:
        a long migration is legitimate. On PostgreSQL each statement, and the
        wait for another process's migration, is bounded by the command
        timeout; raise SWITCHBOARD_DATABASE_TIMEOUT_S for a migration with
        slow statements.
        """
        # Most starts find the schema current (every replica, every restart): one read of
        # the version table then, not Alembic's walk of every revision script under its lock.
        if await self._schema_heads() == [_revisions().head]:
            return
        await self._run_alembic(lambda config: command.upgrade(config, "head"))

    async def check_schema(self) -> None:
        """Refuse a schema older than this code's (``SWITCHBOARD_DATABASE_AUTO_MIGRATE=false``).

        A schema *newer* than the code is accepted: during a rolling upgrade the
        new version migrates first and old replicas keep serving (migrations
        only add), and a rollback starts old code on the new schema.
        """
        found = await self._schema_heads()
        head, known = _revisions()
        if any(current is None or (current in known and current != head) for current in found):
            at = ", ".join(current or "empty" for current in found)
            raise ConfigError(
                f"the database schema is at {at}, older than this version's {head}; run "
                "`switchboard migrate` (or set SWITCHBOARD_DATABASE_AUTO_MIGRATE=true)"
            )
        if any(current is not None and current not in known for current in found):
            log.warning(
                "the database schema is newer than this version (%s); serving anyway",
                ", ".join(str(current) for current in found),
            )

    async def downgrade(self, revision: str) -> None:
        """Downgrade the schema to ``revision`` (``"base"`` drops every table)."""
        await self._run_alembic(lambda config: command.downgrade(config, revision))

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.health.close()
        if self._probe_executor is not None:
            # A probe still running ends by itself, at the busy timeout at most.
            await asyncio.to_thread(self._probe_executor.shutdown, wait=True)
        if self._executor is not None:
            # Work already queued finishes (its callers may still await it); no new work.
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True)
        if self._sync_engine is not None:
            await asyncio.to_thread(self._sync_engine.dispose)
        with self._connections_lock:
            raw, self._raw_connections = self._raw_connections, []
        for connection in raw:
            connection.close()
        # SQLite closes in aiosqlite's threads, each after the statement it runs
        # (bounded by the busy timeout): the same bound as other thread work.
        bound = self._timeout_s if self._probe_engine is not None else self._thread_wait_s
        try:
            async with asyncio.timeout(bound):
                await self.engine.dispose()
                if self._probe_engine is not None:
                    await self._probe_engine.dispose()
        except TimeoutError:
            # A server that no longer answers must not hang shutdown; the
            # sockets die with the process.
            log.warning(
                "database connections did not close within %ss",
                bound,
                extra={"database": self.display_url},
            )

    async def _schema_heads(self) -> list[str | None]:
        """The revisions the database's schema is at (``[None]`` when it has none)."""
        found: list[str | None] = []

        def read(connection: Connection) -> None:
            migration = MigrationContext.configure(connection)
            found.extend(migration.get_current_heads() or [None])

        async with _alembic_lock(), self.engine.connect() as connection:
            await connection.run_sync(read)
        return found

    async def _run_alembic(self, operation: Callable[[Config], None]) -> None:
        def run(connection: Connection) -> None:
            config = alembic_config()
            config.attributes["connection"] = connection
            operation(config)

        async with _alembic_lock(), self.engine.connect() as connection:
            await connection.run_sync(run)
            # env.py commits its own transaction; this covers anything Alembic
            # autobegun after it (reading the version table, for instance).
            await connection.commit()


async def open_database(url: str, *, timeout_s: float, migrate: bool) -> Database:
    """Open the database, check it answers, and migrate it when asked."""
    database = Database(url, timeout_s=timeout_s)
    try:
        await database.ping()
        if migrate:
            await database.migrate()
        else:
            await database.check_schema()
        database.health.start()
    except BaseException:
        await database.close()
        raise
    log.info(
        "database opened",
        extra={"database": database.display_url, "migrated": migrate},
    )
    return database


def _sqlite_engine(url: URL, timeout_s: float) -> AsyncEngine:
    # Before the first connection: only connections opened afterwards get vec0. A
    # failure is reported by ``vectors.vector_support``, not here.
    register_sqlite_vec()
    memory = is_sqlite_memory(url)
    options: dict[str, Any] = {
        # Hand transaction control to SQLAlchemy (see the module docstring).
        "connect_args": {"isolation_level": None, "timeout": timeout_s},
    }
    options["pool_timeout"] = timeout_s
    if memory:
        # One connection, or every checkout would see its own empty database;
        # a pool of exactly one (not StaticPool, which hands the same
        # connection to concurrent users) makes concurrent sessions take turns.
        options.update(poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0)
    engine = create_async_engine(url, **options)
    # Only aiosqlite 0.22.1 and later have ``stop``, the one SQLAlchemy force-closes with.
    if hasattr(aiosqlite.Connection, "stop"):
        event.listen(engine.sync_engine, "do_connect", _use_stoppable_connections)
    _install_sqlite_hooks(engine.sync_engine, timeout_s, memory=memory)
    return engine


class _AiosqliteConnection(aiosqlite.Connection):
    """aiosqlite's connection, whose worker thread may be told to stop more than once.

    SQLAlchemy ends a connection whose statement was cancelled (a call's
    timeout, a client gone, a task stopped) with a graceful close in a task of
    its own; when its wait for that close is cancelled too, it also stops the
    connection at once. The graceful close (aiosqlite 0.22) then asks for a
    second stop and waits for it, but the worker thread ended at the first:
    if that close was itself cancelled while queued (an event loop shutting
    down cancels every task), nothing ever ends it and the loop's shutdown
    hangs. Here every stop waits for the one the thread runs, each caller
    through a view of its own: cancelling one wait does not cancel another.
    """

    def __init__(self, connector: Callable[[], sqlite3.Connection], iter_chunk_size: int) -> None:
        super().__init__(connector, iter_chunk_size)
        # As SQLAlchemy does with the ones it makes: a connection never closed
        # must not keep the process alive.
        self._thread.daemon = True
        self._stop_asked = False
        self._stopped: asyncio.Future[Any] | None = None

    def stop(self) -> asyncio.Future[Any] | None:
        if not self._stop_asked:
            self._stop_asked = True
            self._stopped = super().stop()
        stopped = self._stopped
        return None if stopped is None else asyncio.shield(stopped)


def _use_stoppable_connections(
    _dialect: Any, _record: ConnectionPoolEntry, _cargs: list[Any], cparams: dict[str, Any]
) -> None:
    """Make the async SQLite engine connect with ``_AiosqliteConnection``.

    SQLAlchemy's aiosqlite adapter calls ``async_creator_fn`` with the
    arguments it computed from the URL and ``connect_args``, as it would call
    ``aiosqlite.connect``, and awaits what it returns.
    """
    cparams["async_creator_fn"] = _connect_aiosqlite


def _connect_aiosqlite(database: str, **kwargs: Any) -> _AiosqliteConnection:
    """``aiosqlite.connect`` with the connection class above (awaiting it connects)."""
    return _AiosqliteConnection(partial(sqlite3.connect, database, **kwargs), iter_chunk_size=64)


def _attempt(session: Session, work: Callable[[Session], Any], group: Group) -> tuple[bool, Any]:
    """Run and commit ``work``: (True, its result), or (False, its own error) rolled back.

    Errors that may have ended the group's transaction itself (locked, I/O,
    disk full) are raised: everything in the group fails and may be retried.
    The work's ``after_commit`` callbacks join the group's if it succeeds.
    """
    try:
        result = work(session)
        session.commit()
    except _GROUP_FATAL:
        raise
    except Exception as exc:  # noqa: BLE001 - the work's own error, to its caller
        session.rollback()
        return False, exc
    group.after.extend(session.info[_AFTER])
    return True, result


def _settle(
    batch: list[tuple[Callable[[Session], Any], asyncio.Future[Any]]],
    *,
    outcomes: list[tuple[bool, Any]] | None = None,
    error: BaseException | None = None,
) -> None:
    """Hand each caller of a group its result, its own error, or the group's."""
    for index, (_, future) in enumerate(batch):
        if future.done():  # the caller gave up (its timeout); nothing to hand over
            continue
        if outcomes is None:
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error or RuntimeError("group commit failed"))
            continue
        ok, value = outcomes[index]
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _sync_sqlite_engine(url: URL, timeout_s: float) -> Engine:
    """A synchronous engine on the same file, for ``Database.run`` (see there)."""
    engine = create_engine(
        url.set(drivername="sqlite"),
        connect_args={"isolation_level": None, "timeout": timeout_s, "check_same_thread": False},
        poolclass=QueuePool,
        pool_size=SQLITE_THREADS,
        max_overflow=0,
        pool_timeout=timeout_s,
    )
    _install_sqlite_hooks(engine, timeout_s, memory=False)
    _driver_savepoints(engine)
    return engine


def _driver_sql(connection: Connection, sql: str) -> None:
    """One statement straight on the stdlib connection, its errors as SQLAlchemy's."""
    try:
        connection.connection.driver_connection.execute(sql)  # type: ignore[union-attr]
    except sqlite3.Error as exc:
        raise OperationalError(sql, None, exc) from exc


def _driver_savepoints(engine: Engine) -> None:
    """SAVEPOINT, RELEASE and ROLLBACK TO on the driver, not as compiled statements.

    A group commit opens a savepoint per write (decisions 22): SQLAlchemy
    compiles its savepoint clause anew each time and runs it through the
    statement events, which cost ten times what the driver's own statement does
    (decisions 39 has the figures), a tenth of a run's database time. The names are
    SQLAlchemy's own (``sa_savepoint_N``), so quoting is not needed.
    """
    dialect = engine.dialect

    def savepoint(connection: Connection, name: str) -> None:
        _driver_sql(connection, f"SAVEPOINT {name}")

    def release(connection: Connection, name: str) -> None:
        _driver_sql(connection, f"RELEASE SAVEPOINT {name}")

    def rollback_to(connection: Connection, name: str) -> None:
        _driver_sql(connection, f"ROLLBACK TO SAVEPOINT {name}")

    # The engine's own dialect instance: only this engine's connections take this path.
    dialect.do_savepoint = savepoint  # type: ignore[method-assign]
    dialect.do_release_savepoint = release  # type: ignore[method-assign]
    dialect.do_rollback_to_savepoint = rollback_to  # type: ignore[method-assign]


def _enable_wal(cursor: Any, timeout_s: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the file.

    Switching the journal mode answers "database is locked" at once, without the
    busy handler, when other connections are opening the same new file (processes
    starting together): measured, 1 in 40 starts of 6 processes. It is retried
    until the busy timeout instead. This runs in a driver thread, never on the loop.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:
            # By name: through aiosqlite's adapter the class is not sqlite3's own.
            locked = type(exc).__name__ == "OperationalError" and "locked" in str(exc)
            if not locked or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _install_sqlite_hooks(engine: Engine, timeout_s: float, *, memory: bool) -> None:
    busy_timeout_ms = max(1, round(timeout_s * 1000))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            # Off by default in SQLite; our schema relies on ON DELETE CASCADE.
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            # What a delete or an update removes is overwritten with zeros, not left in
            # the file's free space: an erased person's words leave the disk too, once
            # the WAL is checkpointed (docs/privacy.md).
            cursor.execute("PRAGMA secure_delete=ON")
            if not memory:
                # Readers no longer block the writer (and vice versa).
                _enable_wal(cursor, timeout_s)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = str(connection.get_execution_options().get(SQLITE_BEGIN, "IMMEDIATE")).upper()
        if mode not in _SQLITE_BEGIN_MODES:
            raise ValueError(f"{SQLITE_BEGIN} must be one of {sorted(_SQLITE_BEGIN_MODES)}")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _postgres_engine(url: URL, timeout_s: float) -> AsyncEngine:
    engine = create_async_engine(
        url,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_timeout=timeout_s,
        pool_recycle=POOL_RECYCLE_S,
        # Pinged on checkout only after PING_AFTER_IDLE_S (``_ping_if_idle``),
        # not every time: SQLAlchemy's pre-ping is a round trip per transaction.
        pool_pre_ping=False,
        connect_args={
            "timeout": timeout_s,  # asyncpg: connect (TCP + TLS + auth)
            "command_timeout": timeout_s,  # asyncpg: default bound on every statement
            "server_settings": {"application_name": "switchboard"},
        },
    )
    dialect = engine.sync_engine.dialect

    def check_on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        _refuse_inside_transaction(dbapi_connection)
        _ping_if_idle(dialect, dbapi_connection, record)

    event.listen(engine.sync_engine, "checkout", check_on_checkout)
    event.listen(engine.sync_engine, "checkin", _note_checkin)
    return engine


def _note_checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info["checked_in"] = time.monotonic()


def _ping_if_idle(dialect: Any, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    """A connection the server closed (restart, failover, an idle timeout) is replaced
    on checkout instead of failing the caller's first statement: pinged, as
    SQLAlchemy's ``pool_pre_ping`` does, but only once it sat unused for
    ``PING_AFTER_IDLE_S``. Under load connections go out again within milliseconds,
    and a ping each time was a round trip per transaction (about 3 ms of a run's
    CPU on the whole-run shape, bench/scale.py). A connection the server dropped
    while it was in use fails that statement, and the pool then replaces every
    connection older than the failure (SQLAlchemy's disconnect handling)."""
    checked_in = record.info.get("checked_in")
    if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE_S:
        return  # a new connection, or one just given back in working order
    try:
        alive = dialect.do_ping(dbapi_connection)
    except Exception as exc:
        raise DisconnectionError("the connection did not answer a ping") from exc
    if alive is False:
        raise DisconnectionError("the connection did not answer a ping")


def _refuse_inside_transaction(dbapi_connection: Any) -> None:
    """A connection given back inside a transaction is discarded, not handed out.

    A task cancelled as its session ended (the rollback cut short: a CancelRun,
    a client gone) can give its connection back with asyncpg's transaction still
    open, which SQLAlchemy's own rollback does not know of; the next session on
    it failed with asyncpg's "nested transaction has a different isolation
    level", a failure of a caller that did nothing wrong. DisconnectionError
    makes the pool close it and check out another (a pessimistic disconnect
    check, as SQLAlchemy documents it).
    """
    driver = dbapi_connection.driver_connection
    if driver.is_in_transaction() or getattr(driver, "_top_xact", None) is not None:
        log.warning("a database connection was given back inside a transaction; replaced")
        raise DisconnectionError("the connection was given back inside a transaction")
