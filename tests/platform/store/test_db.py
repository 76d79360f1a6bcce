"""The database layer: migrations match the models, on SQLite and on PostgreSQL.

The drift test is the guard for every later schema change: editing
``models.py`` without adding a migration fails here, on both backends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import glob
import logging
import os
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from google.rpc import error_details_pb2
from sqlalchemy import Connection, delete, event, inspect, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session

from switchboard.deploy import machine
from switchboard.platform.config import ConfigError
from switchboard.platform.errors import Code
from switchboard.platform.events.loglock import DatabaseInUse, lock_sqlite_file
from switchboard.platform.rpc.status import to_status_proto
from switchboard.platform.store import db as db_module
from switchboard.platform.store.db import (
    SQLITE_BEGIN,
    Database,
    DatabaseUnavailable,
    alembic_config,
    is_outage,
    open_database,
)
from switchboard.platform.store.models import SEARCH_TABLES, Base, SessionRow, UserRow, modelled
from switchboard.platform.store.prepared import Prepared
from switchboard.platform.store.storage import transaction
from tests.conftest import CALL_DEADLINE_S, TEST_DATABASE_TIMEOUT_S
from tests.infra import postgres as postgres_infra
from tests.infra.postgres import PostgresServer

pytestmark = pytest.mark.unit

MODEL_TABLES = frozenset(Base.metadata.tables)
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=dt.UTC)


@pytest.fixture
async def db(empty_database_url: str) -> AsyncIterator[Database]:
    """An empty database (not migrated), on each backend."""
    database = Database(empty_database_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    try:
        yield database
    finally:
        await database.close()


async def table_names(database: Database) -> set[str]:
    """The tables the models describe (the search tables of 0003 left out)."""
    async with database.engine.connect() as connection:
        names: list[str] = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    return set(names) - SEARCH_TABLES


async def current_revision(database: Database) -> str | None:
    def read(sync: Connection) -> str | None:
        return MigrationContext.configure(sync).get_current_revision()

    async with database.engine.connect() as connection:
        return await connection.run_sync(read)


async def schema_snapshot(database: Database) -> dict[str, Any]:
    """Everything a migration could change, in comparable form."""

    def read(sync: Connection) -> dict[str, Any]:
        inspector = inspect(sync)
        snapshot: dict[str, Any] = {}
        for table in sorted(inspector.get_table_names()):
            snapshot[table] = {
                "columns": [
                    (column["name"], str(column["type"]), column["nullable"])
                    for column in inspector.get_columns(table)
                ],
                "indexes": sorted(index["name"] or "" for index in inspector.get_indexes(table)),
                "foreign_keys": sorted(
                    fk["name"] or "" for fk in inspector.get_foreign_keys(table)
                ),
            }
        return snapshot

    async with database.engine.connect() as connection:
        return await connection.run_sync(read)


def user(user_id: str = "u1", *, created_at: dt.datetime = NOW) -> UserRow:
    return UserRow(
        id=user_id,
        email=f"{user_id}@example.com",
        created_at=created_at,
        updated_at=created_at,
    )


def session_row(session_id: str, user_id: str) -> SessionRow:
    return SessionRow(
        id=session_id,
        user_id=user_id,
        auth_method="password",
        created_at=NOW,
        last_seen_at=NOW,
        expires_at=NOW + dt.timedelta(days=1),
    )


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


# Migrations


async def test_migrate_creates_every_model_table(db: Database) -> None:
    assert await table_names(db) == set()

    await db.migrate()

    assert await table_names(db) == MODEL_TABLES | {"alembic_version"}
    assert await current_revision(db) == head_revision() == "0029"


async def test_migrating_twice_is_a_no_op_and_keeps_data(db: Database) -> None:
    await db.migrate()
    before = await schema_snapshot(db)
    async with db.sessions() as session, session.begin():
        session.add(user())

    await db.migrate()

    assert await schema_snapshot(db) == before
    async with db.sessions() as session:
        assert (await session.scalars(select(UserRow.id))).all() == ["u1"]


async def test_downgrade_to_base_then_upgrade_again(db: Database) -> None:
    await db.migrate()
    migrated = await schema_snapshot(db)

    await db.downgrade("base")

    assert await table_names(db) == {"alembic_version"}
    assert await current_revision(db) is None

    await db.migrate()

    assert await schema_snapshot(db) == migrated
    assert await current_revision(db) == head_revision()


async def test_without_auto_migrate_an_older_schema_is_refused(db: Database) -> None:
    # Empty, then one revision behind: a process would fail on its first query.
    with pytest.raises(ConfigError, match=r"schema is at empty.*switchboard migrate"):
        await db.check_schema()
    await db.migrate()
    await db.downgrade("-1")
    with pytest.raises(ConfigError, match="older than this version's"):
        await db.check_schema()
    await db.migrate()
    await db.check_schema()


async def test_without_auto_migrate_a_newer_schema_is_served(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling upgrade migrates first; replicas of the previous version keep serving."""
    await db.migrate()
    async with db.engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    await db.check_schema()
    assert "newer than this version (9999)" in caplog.text


async def test_migrated_schema_matches_the_models(db: Database) -> None:
    """Drift check: a model change without a migration fails here."""
    await db.migrate()

    def diff(sync: Connection) -> list[Any]:
        context = MigrationContext.configure(
            sync, opts={"compare_type": True, "include_name": modelled}
        )
        return list(compare_metadata(context, Base.metadata))

    async with db.engine.connect() as connection:
        differences = await connection.run_sync(diff)
    assert differences == []


async def test_drift_check_notices_a_missing_migration(db: Database) -> None:
    """The drift check itself works: a table the migrations lack is reported."""
    await db.migrate()
    await db.downgrade("base")
    async with db.engine.begin() as connection:
        await connection.exec_driver_sql("CREATE TABLE stray (id INTEGER PRIMARY KEY)")

    def diff(sync: Connection) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(sync), Base.metadata))

    async with db.engine.connect() as connection:
        differences = await connection.run_sync(diff)
    kinds = {entry[0] for entry in differences if isinstance(entry, tuple)}
    assert {"add_table", "remove_table"} <= kinds


async def test_concurrent_migrations_in_one_process(empty_database_url: str) -> None:
    """Alembic's state is process-global; overlapping migrate() calls must not mix it up."""
    databases = [Database(empty_database_url, timeout_s=TEST_DATABASE_TIMEOUT_S) for _ in range(3)]
    try:
        await asyncio.gather(*(database.migrate() for database in databases))
        assert await table_names(databases[0]) == MODEL_TABLES | {"alembic_version"}
        assert await current_revision(databases[0]) == head_revision()
    finally:
        for database in databases:
            await database.close()


# Each process connects, reports "ready", and migrates when the test says "go",
# so the migrations really overlap instead of trailing each other's imports.
MIGRATE_WHEN_TOLD = """
import asyncio, sys
from switchboard.platform.store.db import Database

async def main() -> None:
    database = Database(sys.argv[1], timeout_s=30)
    try:
        await database.ping()
        print("ready", flush=True)
        sys.stdin.readline()
        await database.migrate()
    finally:
        await database.close()

asyncio.run(main())
"""


async def test_processes_migrating_at_once_are_serialized(empty_database_url: str) -> None:
    """Mesh processes start together, each auto-migrating; exactly one creates the tables."""
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            MIGRATE_WHEN_TOLD,
            empty_database_url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    try:
        async with asyncio.timeout(60):
            for process in processes:
                assert process.stdout is not None
                line = await process.stdout.readline()
                if line != b"ready\n":
                    assert process.stderr is not None
                    raise AssertionError(f"not ready: {(await process.stderr.read()).decode()}")
            for process in processes:
                assert process.stdin is not None
                process.stdin.write(b"go\n")
            outputs = await asyncio.gather(*(process.communicate() for process in processes))
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    for process, (_out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err.decode()
    database = Database(empty_database_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    try:
        assert await table_names(database) == MODEL_TABLES | {"alembic_version"}
        assert await current_revision(database) == head_revision()
    finally:
        await database.close()


def test_offline_mode_renders_sql_for_review(capsys: pytest.CaptureFixture[str]) -> None:
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", "postgresql+asyncpg://localhost/switchboard")

    command.upgrade(config, "head", sql=True)

    sql = capsys.readouterr().out
    assert "CREATE TABLE users" in sql
    assert "TIMESTAMP WITH TIME ZONE" in sql
    assert "UPDATE alembic_version" in sql or "INSERT INTO alembic_version" in sql
    # A data migration that reads stored rows says what the rendered SQL cannot do.
    assert "UPDATE runs SET state_time = created_at WHERE state_time IS NULL" in sql
    assert "switchboard migrate fills runs.assistant_id" in sql


def test_migrations_ship_inside_the_package() -> None:
    location = Path(alembic_config().get_main_option("script_location") or "")
    assert location.is_dir()
    assert (location / "env.py").is_file()
    assert (location / "script.py.mako").is_file()
    assert Path(__file__).resolve().parents[3] / "services" in location.parents


# Behaviour of the engine


async def test_utc_datetimes_round_trip_as_aware_utc(db: Database) -> None:
    await db.migrate()
    plus_five = dt.timezone(dt.timedelta(hours=5, minutes=30))
    created = NOW.astimezone(plus_five)  # same instant, other zone
    async with db.sessions() as session, session.begin():
        session.add(user(created_at=created))

    async with db.sessions() as session:
        stored = (await session.scalars(select(UserRow.created_at))).one()

    assert stored == NOW
    assert stored.utcoffset() == dt.timedelta(0)
    assert stored.microsecond == NOW.microsecond


async def test_naive_datetimes_are_refused(db: Database) -> None:
    await db.migrate()
    async with db.sessions() as session:
        session.add(user(created_at=NOW.replace(tzinfo=None)))
        with pytest.raises(StatementError, match="naive datetimes"):
            await session.flush()


async def test_foreign_keys_are_enforced_and_cascade(db: Database) -> None:
    await db.migrate()
    async with db.sessions() as session:
        session.add(session_row("s1", user_id="nobody"))
        with pytest.raises(IntegrityError):
            await session.flush()

    async with db.sessions() as session, session.begin():
        session.add(user("u1"))
        await session.flush()
        session.add(session_row("s1", user_id="u1"))
    async with db.sessions() as session, session.begin():
        await session.execute(delete(UserRow).where(UserRow.id == "u1"))
    async with db.sessions() as session:
        assert (await session.scalars(select(SessionRow.id))).all() == []


async def test_sqlite_connection_pragmas(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}", timeout_s=2.5)
    try:
        async with database.engine.connect() as connection:
            pragmas = {
                name: (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("foreign_keys", "journal_mode", "busy_timeout")
            }
    finally:
        await database.close()
    assert pragmas == {"foreign_keys": 1, "journal_mode": "wal", "busy_timeout": 2500}


async def test_sqlite_in_memory_is_one_shared_database() -> None:
    database = await open_database(
        "sqlite+aiosqlite://", timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True
    )
    try:
        async with database.sessions() as session, session.begin():
            session.add(user())
        # A second session (another checkout) sees the same in-memory database.
        async with database.sessions() as session:
            assert (await session.scalars(select(UserRow.id))).all() == ["u1"]
        async with database.engine.connect() as connection:
            fk = (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar()
        assert fk == 1
    finally:
        await database.close()


async def test_sqlite_transactions_are_atomic(tmp_path: Path) -> None:
    """SQLAlchemy, not the sqlite3 driver, opens transactions: a rollback undoes everything."""
    database = await open_database(
        f"sqlite+aiosqlite:///{tmp_path / 'tx.db'}", timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True
    )
    try:
        async with database.engine.connect() as connection:
            await connection.execute(text("DELETE FROM users"))  # opens the transaction
            await connection.exec_driver_sql("CREATE TABLE scratch (id INTEGER)")
            await connection.rollback()
        assert "scratch" not in await table_names(database)
    finally:
        await database.close()


async def test_sqlite_savepoints_on_the_driver_roll_back_alone_and_fail_the_group(
    tmp_path: Path,
) -> None:
    """The group commit's savepoints run on the driver (not compiled statements): a
    rolled-back savepoint undoes only its own writes, and one the driver refuses
    is SQLAlchemy's OperationalError, which fails the whole group."""
    database = await open_database(
        f"sqlite+aiosqlite:///{tmp_path / 'sp.db'}", timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True
    )
    try:
        engine = database._sync_engine
        assert engine is not None
        through_sqlalchemy: list[str] = []

        @event.listens_for(engine, "before_cursor_execute")
        def _seen(_c: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            through_sqlalchemy.append(statement.split(maxsplit=1)[0].upper())

        with engine.connect() as connection, connection.begin():
            connection.exec_driver_sql("CREATE TABLE scratch (id INTEGER)")
            kept = connection.begin_nested()
            connection.exec_driver_sql("INSERT INTO scratch VALUES (1)")
            kept.commit()
            dropped = connection.begin_nested()
            connection.exec_driver_sql("INSERT INTO scratch VALUES (2)")
            dropped.rollback()
            rows = connection.exec_driver_sql("SELECT id FROM scratch").scalars().all()
            assert rows == [1]
            broken = connection.begin_nested()
            # Released behind SQLAlchemy's back: its own RELEASE then has nothing to release.
            driver = connection.connection.driver_connection
            assert driver is not None
            driver.execute("RELEASE SAVEPOINT sa_savepoint_3")
            with pytest.raises(OperationalError, match="no such savepoint"):
                broken.commit()
        # Nothing of the savepoints went through statement compilation and its events.
        assert "SAVEPOINT" not in through_sqlalchemy
        assert "RELEASE" not in through_sqlalchemy
        assert "ROLLBACK" not in through_sqlalchemy
    finally:
        await database.close()


async def test_sqlite_deferred_begin_can_be_chosen_for_reads(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'rw.db'}"
    database = await open_database(url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    try:
        async with database.engine.connect() as writer:
            await writer.execute(text("DELETE FROM users"))  # holds the write lock (IMMEDIATE)
            async with database.sessions() as session:
                # A deferred reader is not blocked by the open write transaction.
                await session.connection(execution_options={SQLITE_BEGIN: "DEFERRED"})
                assert (await session.scalars(select(UserRow.id))).all() == []
            await writer.rollback()
    finally:
        await database.close()


async def test_ping_and_dialect_name(empty_database_url: str) -> None:
    database = Database(empty_database_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    try:
        await database.ping()
        assert database.dialect_name == empty_database_url.split("+", 1)[0]
        assert await table_names(database) == set()  # never migrated
    finally:
        await database.close()


async def test_opening_without_migrating_refuses_an_empty_database(empty_database_url: str) -> None:
    with pytest.raises(ConfigError, match="switchboard migrate"):
        await open_database(empty_database_url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=False)


async def test_ping_is_bounded_by_the_timeout() -> None:
    """A server that accepts the connection but never answers becomes a TimeoutError."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    database = Database(f"postgresql+asyncpg://u:p@127.0.0.1:{port}/db", timeout_s=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"did not answer within 0\.3s"):
            await database.ping()
        elapsed = time.monotonic() - started
    finally:
        await database.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert accepted, "the client never connected"
    assert elapsed < 3


async def test_open_database_never_logs_the_password(
    postgres_server: PostgresServer,
    postgres_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Trust auth accepts any password, so a real one can ride along in the URL.
    url = postgres_url.replace(
        f"//{postgres_server.user}@", f"//{postgres_server.user}:hunter2-secret@"
    )
    assert "hunter2-secret" in url
    caplog.set_level(logging.DEBUG)
    database = await open_database(url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    try:
        await database.ping()
    finally:
        await database.close()
    assert "database opened" in caplog.text
    assert "hunter2-secret" not in caplog.text
    assert all("hunter2-secret" not in repr(record.__dict__) for record in caplog.records)
    assert "hunter2-secret" not in database.display_url


@pytest.mark.parametrize(
    "url",
    [
        "mysql+aiomysql://root:hunter2@localhost/db",
        "postgresql://root:hunter2@localhost/db",  # sync driver
        "postgresql+psycopg://root:hunter2@localhost/db",
        "sqlite:///switchboard.db",  # sync driver
        "not a url",
        "",
    ],
)
def test_other_url_schemes_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="SWITCHBOARD_DATABASE_URL") as caught:
        Database(url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    assert "hunter2" not in str(caught.value)


def test_missing_postgres_binaries_fail_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a server the PostgreSQL fixtures fail (with the fix), never skip."""
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(glob, "glob", lambda _pattern: [])
    monkeypatch.setattr(machine, "pgserver_bin_dir", lambda: None)
    with pytest.raises(postgres_infra.PostgresUnavailable, match="apt-get install postgresql"):
        postgres_infra.find_bin_dir()


async def test_concurrent_writes_commit_in_groups_and_a_failing_one_fails_alone(
    db: Database,
) -> None:
    """Group commit (SQLite files; plain transactions elsewhere): every write that
    returns is committed, in the order the writes were queued, and one that raises
    rolls back alone: its neighbours in the same group still commit."""
    await db.migrate()
    commits = 0
    engine = db._sync_engine

    if engine is not None:

        @event.listens_for(engine, "commit")
        def _count(_connection: Connection) -> None:
            nonlocal commits
            commits += 1

    def insert(index: int) -> Any:
        def work(session: Any) -> str:
            session.add(user(f"u{index:03d}"))
            session.flush()
            if index % 7 == 3:
                # Its own row again: an IntegrityError after it already wrote.
                session.add(user(f"u{index:03d}"))
                session.flush()
            return f"u{index:03d}"

        return work

    results = await asyncio.gather(
        *(db.run(insert(i), write=True) for i in range(60)), return_exceptions=True
    )

    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [i for i in range(60) if i % 7 == 3]
    assert all(isinstance(results[i], IntegrityError) for i in failed)
    stored = await db.run(lambda s: sorted(s.scalars(select(UserRow.id))), write=False)
    assert stored == [f"u{i:03d}" for i in range(60) if i % 7 != 3]
    if engine is not None:
        # Sixty writers did not need sixty commits.
        assert 1 <= commits < 60


# -- outages ----------------------------------------------------------------------------------
# Real failures of real servers, not constructed exceptions: the classification
# must match what the drivers actually raise (asyncpg's lost connection reaches
# us as a bare DBAPIError, which was once answered INTERNAL).


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A cluster of this module's own: these tests stop and restart it."""
    with postgres_infra.running_postgres() as server:
        yield server


@pytest.fixture
async def stoppable(own_postgres: PostgresServer) -> AsyncIterator[Database]:
    """A migrated database on ``own_postgres``, which is running again afterwards."""
    database = await open_database(own_postgres.url("postgres"), timeout_s=3.0, migrate=True)
    try:
        yield database
    finally:
        await database.close()
        if not await answers(own_postgres):
            await asyncio.to_thread(postgres_infra.start_postgres, own_postgres)


async def answers(server: PostgresServer) -> bool:
    try:
        connection = await asyncpg.connect(server.dsn(), timeout=CALL_DEADLINE_S)
    except (OSError, asyncpg.PostgresError):
        return False
    await connection.close()
    return True


def sleeping(seconds: int) -> Callable[[Session], None]:
    def work(session: Session) -> None:
        session.execute(text(f"SELECT pg_sleep({seconds})"))

    return work


async def until_sleeping(server: PostgresServer) -> list[int]:
    """The pids of backends running ``sleeping``, once there is one."""
    admin = await asyncpg.connect(server.dsn(), timeout=CALL_DEADLINE_S)
    try:
        deadline = time.monotonic() + CALL_DEADLINE_S
        while time.monotonic() < deadline:
            rows = await admin.fetch(
                "SELECT pid FROM pg_stat_activity "
                "WHERE query LIKE 'SELECT pg_sleep%' AND pid <> pg_backend_pid()"
            )
            if rows:
                return [row["pid"] for row in rows]
            await asyncio.sleep(0.02)
    finally:
        await admin.close()
    pytest.fail("the statement never started")


STORE_LOG = logging.getLogger("tests.store")


async def _select_one(database: Database) -> object:
    """A trivial read through the stores' transaction runner."""
    return await transaction(
        database, lambda s: s.scalar(text("SELECT 1")), write=False, log=STORE_LOG
    )


async def test_a_connection_terminated_mid_statement_is_an_outage(
    own_postgres: PostgresServer, stoppable: Database
) -> None:
    """An administrator ending the backend (57P01) and the connection closed under a
    statement: store transactions raise DatabaseUnavailable (UNAVAILABLE), not the
    driver's error (which reached clients as INTERNAL)."""
    call = asyncio.create_task(transaction(stoppable, sleeping(30), write=False, log=STORE_LOG))
    pids = await until_sleeping(own_postgres)
    admin = await asyncpg.connect(own_postgres.dsn(), timeout=CALL_DEADLINE_S)
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", pids)
    finally:
        await admin.close()
    with pytest.raises(DatabaseUnavailable) as caught:
        await call
    raw = caught.value.__cause__
    assert isinstance(raw, DBAPIError)
    assert is_outage(raw)
    # The next call gets a fresh connection: nothing is left broken.
    assert await _select_one(stoppable) == 1


async def test_postgres_stopping_under_a_statement_and_while_down_is_an_outage(
    own_postgres: PostgresServer, stoppable: Database
) -> None:
    """``pg_ctl stop -m immediate`` under a running statement, calls while it is down,
    and recovery without reopening anything once it is back."""
    in_flight = asyncio.create_task(stoppable.run(sleeping(30), write=False))
    await until_sleeping(own_postgres)
    await asyncio.to_thread(postgres_infra.stop_postgres, own_postgres)
    with pytest.raises(Exception) as mid_statement:  # noqa: PT011 - the driver's choice, judged below
        await in_flight
    assert is_outage(mid_statement.value), repr(mid_statement.value)
    with pytest.raises(DatabaseUnavailable) as while_down:
        await transaction(stoppable, sleeping(0), write=True, log=STORE_LOG)
    assert is_outage(while_down.value.__cause__ or while_down.value)
    with pytest.raises(DatabaseUnavailable):
        await _select_one(stoppable)
    await asyncio.to_thread(postgres_infra.start_postgres, own_postgres)
    assert await _select_one(stoppable) == 1


async def test_database_health_goes_down_with_the_server_and_comes_back_by_itself(
    own_postgres: PostgresServer, stoppable: Database
) -> None:
    seen: list[bool] = []
    stoppable.health.on_state_change(seen.append)
    assert stoppable.health.serving
    await asyncio.to_thread(postgres_infra.stop_postgres, own_postgres)
    # A failing call is enough for the monitor to look at once.
    with pytest.raises(DatabaseUnavailable):
        await transaction(stoppable, sleeping(0), write=False, log=STORE_LOG)
    await until(lambda: not stoppable.health.serving)
    await asyncio.to_thread(postgres_infra.start_postgres, own_postgres)
    # Nothing calls now: the monitor's own probes notice the recovery.
    await until(lambda: stoppable.health.serving)
    assert seen == [False, True]


async def until(condition: Callable[[], bool], timeout_s: float = CALL_DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("the condition did not hold in time")
        await asyncio.sleep(0.02)


async def test_a_locked_sqlite_file_is_an_outage_and_a_missing_table_a_bug(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked.db"
    database = await open_database(f"sqlite+aiosqlite:///{path}", timeout_s=0.2, migrate=True)
    # SQLAlchemy discards a connection whose statement was cancelled mid-flight.
    invalidated: list[object] = []
    event.listen(database.engine.sync_engine, "invalidate", lambda *args: invalidated.append(args))
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")  # another writer holds the file
        with pytest.raises(DatabaseUnavailable) as caught:
            await transaction(
                database, lambda s: s.add(user("locked-out")), write=True, log=STORE_LOG
            )
        assert "locked" in str(caught.value.__cause__)
        other.execute("ROLLBACK")
        with pytest.raises(OperationalError) as bug:
            await transaction(
                database,
                lambda s: s.execute(text("SELECT * FROM nope")),
                write=False,
                log=STORE_LOG,
            )
        assert not is_outage(bug.value)
    finally:
        other.close()
        await database.close()
    # The failed write woke the health monitor, whose probe ``close`` stopped: no
    # statement was cancelled (it used to be, in aiosqlite, and under load the
    # close of that connection could outlive the loop and hang its shutdown),
    # and nothing is left running.
    assert not invalidated
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_statement_cancelled_twice_while_its_connection_closes_leaves_no_task_behind(
    empty_database_url: str,
) -> None:
    """A statement cancelled mid-flight (a client gone) and again while SQLAlchemy
    closes its connection (the server stopping), then the event loop shutting down:
    every task ends. The flaky hang: with aiosqlite the second cancellation
    force-stopped the connection's worker thread while the graceful close was still
    queued on it, and that close, cancelled in turn by the loop's shutdown, waited
    forever for a thread that no longer ran."""
    database = Database(empty_database_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    sqlite = database.dialect_name == "sqlite"
    in_flight, release = threading.Event(), threading.Event()
    invalidated: list[object] = []

    def block() -> int:
        # Runs in aiosqlite's worker thread: holds it, as a slow statement would.
        in_flight.set()
        release.wait(TEST_DATABASE_TIMEOUT_S)
        return 1

    @event.listens_for(database.engine.sync_engine, "connect")
    def _block_function(dbapi_connection: Any, _record: object) -> None:
        if sqlite:
            dbapi_connection.create_function("block", 0, block)

    @event.listens_for(database.engine.sync_engine, "before_cursor_execute")
    def _started(_connection: object, _cursor: object, statement: str, *_args: object) -> None:
        if "pg_sleep" in statement:  # sent to the server, which sleeps
            in_flight.set()

    @event.listens_for(database.engine.sync_engine, "invalidate")
    def _invalidated(_dbapi: object, _record: object, exception: object) -> None:
        invalidated.append(exception)

    async def statement() -> None:
        async with database.engine.connect() as connection:
            await connection.execute(text("SELECT block()" if sqlite else "SELECT pg_sleep(30)"))

    call = asyncio.create_task(statement())
    leftovers: set[asyncio.Task[Any]] = set()
    try:
        await until(in_flight.is_set)
        call.cancel()  # the caller gives up mid-statement...
        await until(lambda: bool(invalidated))  # ...and SQLAlchemy closes the connection
        call.cancel()  # the server stops while that close waits
        await asyncio.wait([call])
        assert call.cancelled()
        await database.close()
        # What asyncio.run and pytest's runner do at the end: cancel what is left, wait.
        leftovers = asyncio.all_tasks() - {asyncio.current_task()}
        for task in leftovers:
            task.cancel()
        release.set()
        _done, pending = (
            await asyncio.wait(leftovers, timeout=CALL_DEADLINE_S) if leftovers else (set(), set())
        )
        assert not pending, f"tasks that never end: {pending}"
    finally:
        release.set()
        for task in {call} | leftovers:
            task.cancel()  # a stuck one ends at a second cancellation: no hung teardown
        await database.close()


def test_errors_of_the_work_itself_are_not_outages() -> None:
    assert not is_outage(ValueError("bad"))
    assert not is_outage(IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE")))
    assert not is_outage(KeyError("x"))
    assert is_outage(ConnectionResetError())
    assert is_outage(TimeoutError())


# -- one process per SQLite file --------------------------------------------------------------


def test_a_sqlite_file_is_served_by_one_process_at_a_time(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'one.db'}"
    with lock_sqlite_file(url):
        with pytest.raises(DatabaseInUse) as caught, lock_sqlite_file(url):
            pass
        assert f"process {os.getpid()}" in str(caught.value)
        assert str(tmp_path / "one.db") in str(caught.value)
    with lock_sqlite_file(url):  # released with its holder
        pass


@pytest.mark.parametrize(
    "url", ["sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:", "postgresql+asyncpg://u@h/db"]
)
def test_memory_and_postgres_take_no_file_lock(url: str) -> None:
    with lock_sqlite_file(url), lock_sqlite_file(url):
        pass


def test_an_outage_answers_unavailable_with_a_retry_hint() -> None:
    status = to_status_proto(DatabaseUnavailable(), "req-1")
    assert status.code == Code.UNAVAILABLE
    retries = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retries) == 1
    retry = error_details_pb2.RetryInfo()
    retries[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 1000


def test_an_outage_is_logged_as_one_line_without_its_stack_and_a_bug_with_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from switchboard.platform.store.db import log_failure

    logger = logging.getLogger("switchboard.test.failures")
    caplog.set_level(logging.DEBUG, logger="switchboard.test.failures")
    log_failure(logger, "lookup failed", ConnectionRefusedError("no server"))
    log_failure(logger, "lookup failed", ValueError("a bug"))
    assert [(r.levelno, r.exc_info is not None) for r in caplog.records] == [
        (logging.DEBUG, False),
        (logging.ERROR, True),
    ]


def test_pgserver_is_preferred_and_copied_where_the_postgres_user_can_reach_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pgserver's PostgreSQL (it has pgvector) comes first; installed under a directory
    others cannot enter (a venv in root's home), it is copied once to a readable place."""
    assert machine.postgres_bin_dir() == machine.pgserver_bin_dir()
    closed = tmp_path / "home"
    install = closed / "site-packages" / "pgserver" / "pginstall"
    (install / "bin").mkdir(parents=True)
    (install / "lib").mkdir()
    for tool in ("initdb", "pg_ctl", "postgres"):
        (install / "bin" / tool).write_text("#!/bin/sh\n")
        (install / "bin" / tool).chmod(0o700)
    (install / "lib" / "vector.so").write_text("")
    (install / "lib" / "vector.so").chmod(0o600)
    closed.chmod(0o700)
    tmp_path.chmod(0o755)
    monkeypatch.setattr(machine, "PGSERVER_COPY_ROOT", tmp_path / "cache")
    copy = machine._reachable(install)
    assert copy.parent == tmp_path / "cache"
    assert machine._reachable(install) == copy  # once
    assert (copy / "bin" / "postgres").stat().st_mode & 0o005 == 0o005
    assert (copy / "lib" / "vector.so").stat().st_mode & 0o004
    assert (copy / "lib").stat().st_mode & 0o755 == 0o755
    closed.chmod(0o755)


def test_an_existing_cluster_keeps_the_major_version_that_made_it() -> None:
    """pgserver's 16 comes first for a new cluster; one made by another major version
    gets that version's binaries, or an error naming it (never a server that refuses it)."""
    newest = machine.postgres_bin_dir()
    assert machine.server_major(newest) == "16"
    assert machine.postgres_bin_dir("16") == newest
    with pytest.raises(machine.MeshError, match=r"made by PostgreSQL 99.*postgresql-99"):
        machine.postgres_bin_dir("99")


async def test_a_connection_left_inside_a_transaction_is_not_handed_out_again(
    postgres_url: str,
) -> None:
    """A task cancelled as its session ended (its rollback cut short) can give its
    connection back still inside a transaction that SQLAlchemy no longer knows of;
    the next session on it failed with asyncpg's "nested transaction has a
    different isolation level" (an UNAVAILABLE for a caller that did nothing
    wrong). Such a connection is discarded when it is checked out."""
    database = await open_database(postgres_url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    try:
        async with database.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            # Begun on the driver, as a snapshot read's transaction is, and never ended.
            await driver.transaction(isolation="repeatable_read").start()
        for _ in range(3):
            assert await database.run(lambda db: db.scalar(text("SELECT 1")), write=False) == 1
            assert (
                await database.run(
                    lambda db: db.scalar(text("SELECT 2")), write=False, snapshot=True
                )
                == 2
            )
    finally:
        await database.close()


async def _backend_pid(database: Database) -> int:
    pid = await database.run(lambda db: db.scalar(text("SELECT pg_backend_pid()")), write=False)
    assert isinstance(pid, int)
    return pid


async def test_a_connection_the_server_closed_while_idle_is_replaced_on_checkout(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool pings a connection that sat unused (PostgreSQL restarted, a proxy's idle
    timeout): one the server closed meanwhile is replaced, and the caller's statement
    runs on a new one instead of failing."""
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 0.0)  # every checkout is "idle"
    database = await open_database(postgres_url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    killer = await open_database(postgres_url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=False)
    try:
        victim = await _backend_pid(database)
        await killer.run(
            lambda db: db.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": victim}),
            write=False,
        )
        # The pool holds the terminated connection; the next call gets a live one.
        assert await _backend_pid(database) != victim
    finally:
        await killer.close()
        await database.close()


async def test_a_connection_given_back_just_now_is_not_pinged(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load a connection goes out again within milliseconds of coming back: no
    round trip for a ping before each transaction (pre-ping's cost). One that sat
    longer than ``PING_AFTER_IDLE_S`` is pinged."""
    database = await open_database(postgres_url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    pings = 0
    dialect = database.engine.sync_engine.dialect
    real = dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        nonlocal pings
        pings += 1
        return bool(real(dbapi_connection))

    monkeypatch.setattr(dialect, "do_ping", counted)
    try:
        for _ in range(5):
            await _backend_pid(database)
        assert pings == 0
        monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 0.0)
        await _backend_pid(database)
        assert pings == 1
    finally:
        await database.close()


async def test_a_connection_found_dead_by_a_driver_statement_is_not_given_out_again(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement run on the driver (``Prepared``: every RPC's membership check through
    ``Database.fetch``) that finds its connection closed invalidates it and the pool's
    older ones, as ``Connection.execute`` does. It was checked back in as if alive, just
    used, so never pinged: after a restart the access checks failed UNAVAILABLE until
    the pool happened to rest a second (the CI's database-outage test)."""
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 3600.0)  # never pinged
    database = await open_database(postgres_url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    killer = await open_database(postgres_url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=False)
    try:
        ((victim,),) = await database.fetch("SELECT pg_backend_pid()", {})
        await killer.run(
            lambda db: db.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": victim}),
            write=False,
        )
        with pytest.raises(DBAPIError) as caught:
            await database.fetch("SELECT pg_backend_pid()", {})
        assert caught.value.connection_invalidated
        assert is_outage(caught.value)
        ((after,),) = await database.fetch("SELECT pg_backend_pid()", {})
        assert after != victim
        assert await _backend_pid(database) != victim
    finally:
        await killer.close()
        await database.close()


def _in_transaction(db: Session) -> bool:
    db.execute(text("SELECT 1"))  # the driver begins at the first statement
    driver = db.connection().connection.driver_connection
    assert driver is not None
    return bool(driver.is_in_transaction())


async def test_a_per_call_check_on_postgresql_runs_without_begin_and_rollback(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fetch`` (one read-only statement: membership and version checks, on every RPC)
    runs without a transaction block: BEGIN and ROLLBACK were two of its three round
    trips. A work given to ``run`` keeps its transaction, a read's too: it may lock rows
    or SET LOCAL for the transaction."""
    database = await open_database(postgres_url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    try:
        seen: list[bool] = []
        real = Prepared.rows

        def rows(statement: Prepared, db: Connection, params: Any = None) -> list[Any]:
            found = real(statement, db, params)
            driver = db.connection.driver_connection
            assert driver is not None
            seen.append(bool(driver.is_in_transaction()))
            return found

        monkeypatch.setattr(Prepared, "rows", rows)
        assert await database.fetch("SELECT 1", {}) == [(1,)]
        assert seen == [False]
        assert await database.run(_in_transaction, write=False) is True
        assert await database.run(_in_transaction, write=False, snapshot=True) is True
        assert await database.run(_in_transaction, write=True) is True
    finally:
        await database.close()
