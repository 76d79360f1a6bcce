"""A real PostgreSQL server for the test suite, started and stopped by the suite itself.

Store tests run against PostgreSQL as well as SQLite because the two differ in
exactly the places stores get wrong (time zones, constraint errors, locking).
A throwaway cluster is created per test session in a temporary directory,
tuned for speed rather than durability, and each test gets its own database.

The server binaries are those ``switchboard mesh`` uses (``postgres_bin_dir``):
the ``pgserver`` wheel's PostgreSQL 16 with pgvector first (a dev dependency, so
the semantic index's HNSW tests run on a real pgvector), else the system's
(Debian: ``apt-get install postgresql``, which ``.ci/run`` does, and which also
makes the ``postgres`` user below). When none is found the fixtures fail instead
of skipping: a skipped backend would let store bugs through unnoticed.
``debian_bin_dir`` finds Debian's own server, which has no pgvector, for the
tests of a deployment's database without the vector engine.

initdb refuses to run as root, and CI runs tests as root, so under root the
cluster belongs to the ``postgres`` system user and every server command runs
through ``runuser``.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from switchboard.deploy.machine import MeshError, postgres_bin_dir
from tests.infra import processlogs
from tests.infra.migrated import migrate_now, sqlite_copy

SUPERUSER = "postgres"
HOST = "127.0.0.1"
START_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 5
#: Where Debian's postgresql-<major> packages put each major version's server.
DEBIAN_ROOT = "/usr/lib/postgresql"
SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")

# Durability is worthless for a cluster that is deleted after the run.
SERVER_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "max_connections": "200",
    "log_min_messages": "warning",
}


class PostgresUnavailable(RuntimeError):
    """The test PostgreSQL server could not be started."""


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway cluster: superuser ``postgres``, trust auth on loopback."""

    host: str
    port: int
    user: str
    bin_dir: Path
    data_dir: Path
    socket_dir: Path
    startup_s: float

    def url(self, database: str, *, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """A plain libpq DSN (psql, asyncpg.connect): no SQLAlchemy driver suffix."""
        return self.url(database, driver="postgresql")


def find_bin_dir() -> Path:
    """The directory holding initdb, pg_ctl and postgres: the search ``switchboard mesh`` uses."""
    try:
        return postgres_bin_dir()
    except MeshError as exc:
        raise PostgresUnavailable(
            f"{exc}. Store tests run on PostgreSQL too and are never skipped."
        ) from None


def _version(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path))


def debian_bin_dir() -> Path:
    """The newest of Debian's PostgreSQL server installs (``/usr/lib/postgresql/<major>/bin``,
    the layout ``postgres_bin_dir`` looks in last), whatever else is installed.

    Debian's packages carry no pgvector (unless ``postgresql-<major>-pgvector`` is
    added): a server of them is a deployment's database without the vector engine.
    ``scripts/install-deps.sh`` installs them, so CI has them; missing, the caller fails.
    """
    found = sorted(glob.glob(f"{DEBIAN_ROOT}/*/bin"), key=_version, reverse=True)
    for path in found:
        candidate = Path(path)
        if all((candidate / tool).is_file() for tool in SERVER_TOOLS):
            return candidate
    raise PostgresUnavailable(
        f"Debian's PostgreSQL server binaries ({DEBIAN_ROOT}/*/bin with "
        f"{', '.join(SERVER_TOOLS)}) are not installed: apt-get install postgresql "
        "(scripts/install-deps.sh does)"
    )


def _run_as_prefix() -> list[str]:
    """The command prefix that runs server tools as a non-root user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise PostgresUnavailable(
            "tests run as root, initdb refuses root, and there is no 'postgres' system user "
            "to run it as (Debian's postgresql package creates one)"
        ) from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("tests run as root but runuser (util-linux) is missing")
    return [runuser, "-u", SUPERUSER, "--"]


def _free_port() -> int:
    # Another process may take the port before postgres binds it; the caller
    # retries on a bind failure.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _run(command: Sequence[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        # Stable English messages whatever the machine's locale.
        env={**os.environ, "LC_ALL": "C", "LANG": "C"},
    )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _pg_ctl_start(
    bin_dir: Path, data_dir: Path, port: int, prefix: list[str]
) -> subprocess.CompletedProcess[str]:
    """``pg_ctl start`` on ``port``, logging next to the data directory.

    pg_ctl -w polls the server's own readiness report until it accepts
    connections, bounded by -t: no fixed sleep.
    """
    root = data_dir.parent
    return _run(
        [
            *prefix,
            str(bin_dir / "pg_ctl"),
            "--pgdata",
            str(data_dir),
            "--log",
            str(root / "postgres.log"),
            "--wait",
            "--timeout",
            str(START_TIMEOUT_S),
            "--options",
            f"-p {port}",
            "start",
        ],
        cwd=root,
        timeout=START_TIMEOUT_S + 10,
    )


def _start(bin_dir: Path, root: Path, prefix: list[str]) -> PostgresServer:
    started = time.monotonic()
    data_dir = root / "data"
    socket_dir = root / "sockets"
    socket_dir.mkdir()
    if prefix:
        owner = pwd.getpwnam(SUPERUSER)
        for path in (root, socket_dir):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    init = _run(
        [
            *prefix,
            str(bin_dir / "initdb"),
            "--pgdata",
            str(data_dir),
            "--username",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=trust",  # pg_hba's host lines cover loopback only
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ],
        cwd=root,
        timeout=START_TIMEOUT_S,
    )
    if init.returncode != 0:
        raise PostgresUnavailable(f"initdb failed ({init.returncode}):\n{init.stdout}{init.stderr}")
    settings = {
        **SERVER_SETTINGS,
        "listen_addresses": f"'{HOST}'",
        "unix_socket_directories": f"'{socket_dir}'",
    }
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write("\n# switchboard test cluster\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    log_file = root / "postgres.log"
    # The server writes it as the postgres user (under root), so in its own directory; a
    # failing test's copy is made from there (tests/infra/processlogs.py).
    processlogs.keep(log_file, "postgres")
    failures: list[str] = []
    for _ in range(PORT_ATTEMPTS):
        port = _free_port()
        start = _pg_ctl_start(bin_dir, data_dir, port, prefix)
        if start.returncode == 0:
            return PostgresServer(
                host=HOST,
                port=port,
                user=SUPERUSER,
                bin_dir=bin_dir,
                data_dir=data_dir,
                socket_dir=socket_dir,
                startup_s=time.monotonic() - started,
            )
        log = _tail(log_file)
        failures.append(f"port {port}: {start.stdout}{start.stderr}\n{log}")
        if "could not bind" not in log and "Address already in use" not in log:
            break  # not a port collision: retrying would not help
    raise PostgresUnavailable("PostgreSQL did not start:\n" + "\n---\n".join(failures))


def _stop(server: PostgresServer, prefix: list[str]) -> None:
    # Immediate: the cluster is discarded, so there is nothing to flush.
    _run(
        [
            *prefix,
            str(server.bin_dir / "pg_ctl"),
            "--pgdata",
            str(server.data_dir),
            "--mode",
            "immediate",
            "--wait",
            "stop",
        ],
        cwd=server.data_dir.parent,
        timeout=COMMAND_TIMEOUT_S,
    )


def stop_postgres(server: PostgresServer) -> None:
    """Stop ``server`` at once (``pg_ctl stop -m immediate``), as a crash would; waits for it."""
    _stop(server, _run_as_prefix())


def start_postgres(server: PostgresServer) -> None:
    """Start a stopped ``server`` again, on the same port and data directory; waits until ready."""
    start = _pg_ctl_start(server.bin_dir, server.data_dir, server.port, _run_as_prefix())
    if start.returncode != 0:
        log = _tail(server.data_dir.parent / "postgres.log")
        output = f"{start.stdout}{start.stderr}"
        raise PostgresUnavailable(f"PostgreSQL did not restart: {output}\n{log}")


@contextlib.contextmanager
def running_postgres(bin_dir: Path | None = None) -> Iterator[PostgresServer]:
    """Start a throwaway cluster of ``bin_dir``'s server (by default ``find_bin_dir``'s)
    on a free port; stop it and delete its files on exit."""
    if bin_dir is None:
        bin_dir = find_bin_dir()
    prefix = _run_as_prefix()
    # Not pytest's tmp_path: that lives under a 0700 directory the postgres
    # user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="switchboard-pg-"))
    server: PostgresServer | None = None
    try:
        server = _start(bin_dir, root, prefix)
        yield server
    finally:
        try:
            if server is not None:
                _stop(server, prefix)
        finally:
            processlogs.set_aside(root / "postgres.log")
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole session, started on first use."""
    try:
        with running_postgres() as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


async def _admin(server: PostgresServer, sql: str) -> None:
    """Run one statement on the maintenance database, outside a transaction.

    CREATE/DROP DATABASE cannot run in a transaction, hence AUTOCOMMIT; NullPool
    because each test has its own event loop and a pooled connection must not
    outlive it.
    """
    engine = create_async_engine(
        server.url("postgres"),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"timeout": COMMAND_TIMEOUT_S, "command_timeout": COMMAND_TIMEOUT_S},
    )
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql(sql)
    finally:
        await engine.dispose()


async def create_database(server: PostgresServer, template: str | None = None) -> str:
    """A new database's name: empty, or a copy of ``template``."""
    name = f"test_{uuid.uuid4().hex}"
    copy = f' TEMPLATE "{template}"' if template else ""
    await _admin(server, f'CREATE DATABASE "{name}"{copy}')
    return name


async def drop_database(server: PostgresServer, name: str) -> None:
    # FORCE: a test or process that leaked a connection must not leak the database.
    await _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def throwaway_database(
    server: PostgresServer, template: str | None = None
) -> AsyncIterator[str]:
    """The URL of a new database (``create_database``) for the block, dropped after it."""
    name = await create_database(server, template)
    try:
        yield server.url(name)
    finally:
        await drop_database(server, name)


@pytest.fixture
async def postgres_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A SQLAlchemy URL (postgresql+asyncpg) of a fresh, empty database, dropped afterwards."""
    async with throwaway_database(postgres_server) as url:
        yield url


#: The database every migrated test database is copied from (``migrated_postgres_url``).
MIGRATED_TEMPLATE = "switchboard_migrated"


@pytest.fixture(scope="session")
def migrated_template(postgres_server: PostgresServer) -> str:
    """A database at the newest schema, migrated once per session (per xdist worker: each
    has its own cluster). Nothing connects to it afterwards, so it can be a template."""

    # In a thread of its own: a session fixture may be set up while a test's loop runs.
    create = _admin(postgres_server, f'CREATE DATABASE "{MIGRATED_TEMPLATE}"')
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, create).result()
    migrate_now(postgres_server.url(MIGRATED_TEMPLATE))
    return MIGRATED_TEMPLATE


@pytest.fixture
async def migrated_postgres_url(
    postgres_server: PostgresServer, migrated_template: str
) -> AsyncIterator[str]:
    """Like ``postgres_url``, but a copy of the migrated template: the schema is at head
    (a server or store opening it finds nothing to migrate), the tables are empty."""
    async with throwaway_database(postgres_server, migrated_template) as url:
        yield url


@pytest.fixture
async def postgres_engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on ``postgres_url``'s database, for a test that reads what the servers
    it started wrote (no pool: nothing is held between the test's reads)."""
    engine = create_async_engine(postgres_url, poolclass=NullPool)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of a database without rows, once per backend, already at the newest schema:
    a copy of a SQLite file, a PostgreSQL database copied from a template (``CREATE
    DATABASE ... TEMPLATE``), each migrated once per session. Migrating every case's
    database from nothing took about 1-2 s of the setup of each PostgreSQL case and a
    few tenths of a second of each SQLite one. Migrations themselves are tested on
    ``empty_database_url``."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{sqlite_copy(tmp_path / 'switchboard.db')}"
    # Looked up lazily so SQLite-only runs never start PostgreSQL.
    url: str = request.getfixturevalue("migrated_postgres_url")
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database (no schema), once per backend: for the migrations' tests."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'switchboard.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
