"""The real `switchboard serve` process: start-up, refusal, and SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import TypeVar

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard import cli as switchboard_cli
from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.platform.events.loglock import EVENT_LOG_LOCK_KEY
from tests.conftest import CALL_DEADLINE_S
from tests.e2e import servekit_batch
from tests.e2e.procs import START_TIMEOUT_S, ServeProcess, shared_secrets
from tests.e2e.starts import serving, together
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, bearer, unique_email
from tests.platform.rpc.test_health import SERVED

_T = TypeVar("_T")

#: A test here starts up to four processes, each importing the whole server: minutes
#: on two busy cores.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_serve_logs_bound_address_and_stops_gracefully_on_sigterm() -> None:
    with ServeProcess("--dev") as serve:
        listening = serve.log[-1]
        assert listening["address"] == serve.address
        assert listening["services"] == SERVED
        with grpc.insecure_channel(serve.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=CALL_DEADLINE_S)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            assert serve.proc is not None
            serve.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        serve.wait_for("stopped")
        assert serve.proc.wait(timeout=30) == 0


def test_repeated_sigterm_during_shutdown_still_exits_cleanly() -> None:
    with ServeProcess("--dev") as serve:
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        serve.wait_for("stopped")
        serve.proc.send_signal(signal.SIGTERM)  # during shutdown's last steps
        # After the event loop has closed: asyncio would have restored the
        # default disposition here, and this signal would kill the process.
        serve.wait_for("exiting")
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(timeout=30) == 0


def test_serve_warns_loudly_in_dev_mode() -> None:
    with ServeProcess("--dev") as serve:
        warnings = [e for e in serve.log if e.get("level") == "WARNING"]
        assert any("DEV MODE" in str(e["message"]) for e in warnings)
        assert serve.terminate() == 0


# The commands that end at once (refused) are each test's own process, run ahead beside the
# one before (servekit_batch): run in turn, each would wait on the other's imports.


def _plan(
    test: pytest.Function, directory: Callable[[], Path], held: ExitStack
) -> servekit_batch.Command | None:
    """The real command of each test below that runs one to its end (``ran``)."""
    serve = ("serve", "--port", "0")
    name = test.originalname
    if name == "test_serve_refuses_default_secret_outside_dev_mode":
        return servekit_batch.Command(serve, env={"PATH": "/usr/bin:/bin"})
    if name == "test_serve_refuses_to_run_without_signing_keys_outside_dev_mode":
        env = {"PATH": "/usr/bin:/bin", "SWITCHBOARD_SECRET_KEY": "s" * 40}
        return servekit_batch.Command(serve, env=env)
    if name == "test_serve_refuses_an_unreadable_signing_key":
        where = directory()
        (where / "bad.pem").write_text("not a key")
        env = {
            "PATH": "/usr/bin:/bin",
            "SWITCHBOARD_SECRET_KEY": "s" * 40,
            "SWITCHBOARD_SIGNING_KEYS": str(where / "bad.pem"),
            "SWITCHBOARD_DATABASE_URL": f"sqlite+aiosqlite:///{where}/db.sqlite",
        }
        return servekit_batch.Command(serve, env=env)
    if name == "test_serve_reports_a_port_in_use":
        where = directory()
        # Its own database: the default one is ./switchboard.db, in the checkout.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env["SWITCHBOARD_DATABASE_URL"] = f"sqlite+aiosqlite:///{where}/switchboard.db"
        # Held until the module ends, so beyond the command's end.
        taken = held.enter_context(socket.socket())
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        return servekit_batch.Command(("serve", "--dev", "--port", port), env=env, cwd=where)
    return None


at_once, ran = servekit_batch.fixtures(_plan)


def test_serve_refuses_default_secret_outside_dev_mode(
    ran: subprocess.CompletedProcess[str],
) -> None:
    assert ran.returncode == 2
    assert "SWITCHBOARD_SECRET_KEY is required outside dev mode" in ran.stderr


def test_serve_runs_outside_dev_mode_with_a_real_secret_and_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command's entry point in this process: tests/e2e/test_cli.py runs its process.
    assert switchboard_cli.main(["keygen", str(tmp_path / "k1.pem")]) == 0, capsys.readouterr()
    assert (tmp_path / "k1.pem").stat().st_mode & 0o077 == 0  # owner-only
    env = {"SWITCHBOARD_SECRET_KEY": "s" * 40, "SWITCHBOARD_SIGNING_KEYS": str(tmp_path / "k1.pem")}
    with ServeProcess(env=env) as serve:
        assert not [e for e in serve.log if e.get("level") == "WARNING"]
        assert serve.terminate() == 0


def test_serve_refuses_to_run_without_signing_keys_outside_dev_mode(
    ran: subprocess.CompletedProcess[str],
) -> None:
    assert ran.returncode == 2
    assert "SWITCHBOARD_SIGNING_KEYS is required outside dev mode" in ran.stderr


def test_serve_refuses_an_unreadable_signing_key(ran: subprocess.CompletedProcess[str]) -> None:
    assert ran.returncode == 2
    assert "is not an unencrypted Ed25519 PEM" in ran.stderr
    assert "not a key" not in ran.stderr


def test_serve_reports_a_port_in_use(ran: subprocess.CompletedProcess[str]) -> None:
    port = ran.args[ran.args.index("--port") + 1]  # a port the module holds (``_plan``)
    assert ran.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in ran.stderr
    assert "GRPC_VERBOSITY" not in ran.stderr


def test_serve_a_subset_of_services() -> None:
    with ServeProcess("--dev", "--services", "auth,events") as serve:
        assert serve.log[-1]["services"] == [
            "switchboard.api.auth.v1.AuthService",
            "switchboard.api.events.v1.EventService",
        ]
        assert serve.terminate() == 0


def _write_and_see_its_event(write_to: str, read_from: str) -> None:
    """Register, then a write with its event (a security event to the user's scope) through
    ``write_to``; the event is listed through ``read_from``, and signing in works."""
    with grpc.insecure_channel(write_to) as channel, grpc.insecure_channel(read_from) as reader:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        email = unique_email("serve")
        registered = auth.Register(
            auth_pb2.RegisterRequest(email=email, password=PASSWORD), timeout=CALL_DEADLINE_S
        )
        auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(display_name="after the refusal"),
            metadata=bearer(registered.tokens.access_token),
            timeout=CALL_DEADLINE_S,
        )
        events = events_pb2_grpc.EventServiceStub(reader).ListEvents(
            events_pb2.ListEventsRequest(scopes=[events_pb2.Scope(user=registered.user.name)]),
            metadata=bearer(registered.tokens.access_token),
            timeout=CALL_DEADLINE_S,
        )
        assert events.events, "the write's event was not published"
        # The account is whole (a half-committed Register once failed this).
        auth.Login(
            auth_pb2.LoginRequest(
                password=auth_pb2.PasswordCredential(email=email, password=PASSWORD)
            ),
            timeout=CALL_DEADLINE_S,
        )


def _refused(env: dict[str, str], *flags: str) -> str:
    """Start `switchboard serve` with ``env``; assert it exits 2 at start, return its one
    refusal line."""
    second = subprocess.Popen(
        [sys.executable, "-m", "switchboard.cli", "serve", *flags, "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        _, stderr = second.communicate(timeout=START_TIMEOUT_S)
    finally:
        if second.poll() is None:  # it started: the defect
            second.kill()
            second.wait(timeout=30)
    assert second.returncode == 2, stderr
    refusals = [line for line in stderr.splitlines() if "cannot start" in line]
    assert len(refusals) == 1, stderr
    assert "Traceback" not in stderr
    return refusals[0]


def test_a_second_server_on_the_same_sqlite_file_is_refused_and_the_first_works_on(
    tmp_path: Path,
) -> None:
    """One process per SQLite file: a second `switchboard serve` on it exits 2 at start with
    one line naming the file and the holder, before touching the database; the first one's
    writes and their events keep working (they once failed until restart)."""
    database = tmp_path / "switchboard.db"
    env = {"SWITCHBOARD_DATABASE_URL": f"sqlite+aiosqlite:///{database}"}
    with ServeProcess("--dev", env=env) as first:
        assert first.proc is not None
        refusal = _refused({**first.env, **env}, "--dev")
        assert str(database) in refusal
        assert f"process {first.proc.pid}" in refusal

        _write_and_see_its_event(first.address, first.address)
        assert first.terminate() == 0
    # Released with its holder: the file can be served again.
    with ServeProcess("--dev", env=env) as again:
        assert again.terminate() == 0


@pytest.fixture
def shared_keys(tmp_path: Path) -> dict[str, str]:
    """Settings that let processes accept each other's tokens (not dev mode's own keys)."""
    return shared_secrets(tmp_path)


def test_a_second_server_on_one_postgresql_database_without_redis_is_refused(
    shared_keys: dict[str, str], postgres_url: str, redis_server: RedisServer
) -> None:
    """Without Redis the event log is per process: a second `switchboard serve` on the same
    PostgreSQL database exits 2 at start naming the holder and the fix, and so does one
    with Redis beside it (its events would go to another log); the first one's writes and
    events keep working. With SWITCHBOARD_REDIS_URL on every process, both serve, and an
    event written through one is listed through the other."""
    env = {**shared_keys, "SWITCHBOARD_DATABASE_URL": postgres_url}
    with ServeProcess(env=env) as first:
        assert first.proc is not None
        extras: list[dict[str, str]] = [{}, {"SWITCHBOARD_REDIS_URL": redis_server.url}]
        refusals = together(*(partial(_refused, {**first.env, **extra}) for extra in extras))
        for refusal in refusals:
            assert "set SWITCHBOARD_REDIS_URL on every process" in refusal
            assert f"process {first.proc.pid} on " in refusal
            assert "without Redis" in refusal
            assert postgres_url.rsplit("/", 1)[1] in refusal
        _write_and_see_its_event(first.address, first.address)
        assert first.terminate() == 0

    with_redis = {**env, "SWITCHBOARD_REDIS_URL": redis_server.url}
    with ExitStack() as stack:
        a, b = ServeProcess(env=with_redis), ServeProcess(env=with_redis)
        serving(stack, a, b)
        # An embedded-log process is refused beside them (while they serve a write).
        without = {k: v for k, v in a.env.items() if k != "SWITCHBOARD_REDIS_URL"}
        beside = together(
            partial(_write_and_see_its_event, a.address, b.address), partial(_refused, without)
        )[1]
        assert isinstance(beside, str)
        assert "with Redis, and this process has none" in beside
        assert a.terminate() == 0
        assert b.terminate() == 0


def test_two_dispatchers_with_one_instance_id_are_refused(
    shared_keys: dict[str, str], postgres_url: str, redis_server: RedisServer
) -> None:
    """A dispatcher replica owns its runs by instance id (the host name by default, so two
    terminals on one machine share it): a second live process with the same id would take
    the first's running runs for its own leftovers. It is refused at start, naming the id
    and the holder; another id on the same database and Redis serves beside the first."""
    env = {
        **shared_keys,
        "SWITCHBOARD_DATABASE_URL": postgres_url,
        "SWITCHBOARD_REDIS_URL": redis_server.url,
        "SWITCHBOARD_INSTANCE_ID": "replica-a",
    }
    with ServeProcess(env=env) as first, ExitStack() as stack:
        assert first.proc is not None
        # A process that serves no dispatcher owns no runs: it may share the id.
        events_only = ServeProcess("--services", "auth,events", env=env)
        other = ServeProcess(env={**env, "SWITCHBOARD_INSTANCE_ID": "replica-b"})
        for server in (events_only, other):
            stack.callback(server.__exit__, None, None, None)
        refusing = partial(_refused, first.env)
        refusal = together(refusing, events_only.start, other.start)[0]
        assert isinstance(refusal, str)
        assert "SWITCHBOARD_INSTANCE_ID='replica-a'" in refusal
        assert f"process {first.proc.pid} on " in refusal
        together(
            partial(_write_and_see_its_event, first.address, events_only.address),
            partial(_write_and_see_its_event, other.address, first.address),
        )
        assert events_only.terminate() == 0
        assert other.terminate() == 0
        assert first.terminate() == 0


async def _lock_sessions(dsn: str, *, granted: bool) -> list[int]:
    """Backend pids holding (or waiting for) the event log lock."""
    connection = await asyncpg.connect(dsn, timeout=30)
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted = $3"
            " AND objsubid = 1 AND classid::bigint = $1 AND objid::bigint = $2",
            (EVENT_LOG_LOCK_KEY >> 32) & 0xFFFFFFFF,
            EVENT_LOG_LOCK_KEY & 0xFFFFFFFF,
            granted,
        )
    finally:
        await connection.close()
    return [row["pid"] for row in rows]


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not await condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def _terminate(dsn: str, pid: int) -> None:
    connection = await asyncpg.connect(dsn, timeout=30)
    try:
        assert await connection.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await connection.close()


async def test_a_lost_event_log_lock_is_taken_again_or_the_server_stops(
    shared_keys: dict[str, str], postgres_url: str
) -> None:
    """The lock's connection lost (its backend terminated): the server takes the lock again
    and a second server is still refused; lost while another process took it, the server
    stops (as on SIGTERM) rather than serve events beside it."""
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")
    env = {**shared_keys, "SWITCHBOARD_DATABASE_URL": postgres_url}
    with ServeProcess(env=env) as first:
        assert first.proc is not None
        (holder,) = await _lock_sessions(dsn, granted=True)
        await _terminate(dsn, holder)

        async def taken_again() -> bool:
            return (await _lock_sessions(dsn, granted=True)) not in ([], [holder])

        await _until(taken_again, "the lock was not taken again")
        (holder,) = await _lock_sessions(dsn, granted=True)
        assert f"process {first.proc.pid} on " in await asyncio.to_thread(_refused, first.env)
        await asyncio.to_thread(_write_and_see_its_event, first.address, first.address)

        # Another process waits for the lock and gets it the moment the backend goes.
        thief = await asyncpg.connect(dsn, timeout=30)
        try:
            taking = asyncio.create_task(
                thief.fetchval("SELECT pg_advisory_lock($1)", EVENT_LOG_LOCK_KEY, timeout=60)
            )

            async def waiting() -> bool:
                return bool(await _lock_sessions(dsn, granted=False))

            await _until(waiting, "the other session does not wait for the lock")
            await _terminate(dsn, holder)
            await asyncio.wait_for(taking, 30)
            await asyncio.to_thread(first.wait_for, "exiting")
            assert await asyncio.to_thread(first.proc.wait, 30) == 0
            messages = [str(entry.get("message")) for entry in first.log]
            assert any(
                m.startswith("cannot serve on: the PostgreSQL database") for m in messages
            ), messages
        finally:
            await thief.close()
