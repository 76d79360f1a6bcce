"""The real `switchboard serve` process: start-up, refusal, and SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from tests.e2e.procs import START_TIMEOUT_S, ServeProcess
from tests.service.authkit import PASSWORD, bearer

pytestmark = pytest.mark.e2e


def test_serve_logs_bound_address_and_stops_gracefully_on_sigterm() -> None:
    with ServeProcess("--dev") as serve:
        listening = serve.log[-1]
        assert listening["address"] == serve.address
        assert len(listening["services"]) == 5
        with grpc.insecure_channel(serve.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
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


def test_serve_refuses_default_secret_outside_dev_mode() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 2
    assert "SWITCHBOARD_SECRET_KEY is required outside dev mode" in done.stderr


def test_serve_runs_outside_dev_mode_with_a_real_secret_and_keys(tmp_path: Path) -> None:
    keygen = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "keygen", str(tmp_path / "k1.pem")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert keygen.returncode == 0, keygen.stderr
    assert (tmp_path / "k1.pem").stat().st_mode & 0o077 == 0  # owner-only
    env = {"SWITCHBOARD_SECRET_KEY": "s" * 40, "SWITCHBOARD_SIGNING_KEYS": str(tmp_path / "k1.pem")}
    with ServeProcess(env=env) as serve:
        assert not [e for e in serve.log if e.get("level") == "WARNING"]
        assert serve.terminate() == 0


def test_serve_refuses_to_run_without_signing_keys_outside_dev_mode() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "SWITCHBOARD_SECRET_KEY": "s" * 40},
        check=False,
    )
    assert done.returncode == 2
    assert "SWITCHBOARD_SIGNING_KEYS is required outside dev mode" in done.stderr


def test_serve_refuses_an_unreadable_signing_key(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a key")
    done = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "SWITCHBOARD_SECRET_KEY": "s" * 40,
            "SWITCHBOARD_SIGNING_KEYS": str(tmp_path / "bad.pem"),
            "SWITCHBOARD_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/db.sqlite",
        },
        check=False,
    )
    assert done.returncode == 2
    assert "is not an unencrypted Ed25519 PEM" in done.stderr
    assert "not a key" not in done.stderr


def test_serve_reports_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "switchboard.cli", "serve", "--dev", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    assert "cannot listen on 127.0.0.1:" in done.stderr


def test_serve_a_subset_of_services() -> None:
    with ServeProcess("--dev", "--services", "auth,events") as serve:
        assert serve.log[-1]["services"] == [
            "switchboard.api.auth.v1.AuthService",
            "switchboard.api.events.v1.EventService",
        ]
        assert serve.terminate() == 0


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
        second = subprocess.Popen(
            [sys.executable, "-m", "switchboard.cli", "serve", "--dev", "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**first.env, **env},
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
        assert str(database) in refusals[0]
        assert f"process {first.proc.pid}" in refusals[0]
        assert "Traceback" not in stderr

        with grpc.insecure_channel(first.address) as channel:
            auth = auth_pb2_grpc.AuthServiceStub(channel)
            email = f"first-{first.proc.pid}@example.com"
            registered = auth.Register(
                auth_pb2.RegisterRequest(email=email, password=PASSWORD), timeout=30
            )
            # A write with its event (a security event to the user's scope)...
            auth.CreateApiKey(
                auth_pb2.CreateApiKeyRequest(display_name="after the refusal"),
                metadata=bearer(registered.tokens.access_token),
                timeout=30,
            )
            events = events_pb2_grpc.EventServiceStub(channel).ListEvents(
                events_pb2.ListEventsRequest(scopes=[events_pb2.Scope(user=registered.user.name)]),
                metadata=bearer(registered.tokens.access_token),
                timeout=30,
            )
            assert events.events, "the write's event was not published"
            # ...and the account is whole: signing in works.
            auth.Login(
                auth_pb2.LoginRequest(
                    password=auth_pb2.PasswordCredential(email=email, password=PASSWORD)
                ),
                timeout=30,
            )
        assert first.terminate() == 0
    # Released with its holder: the file can be served again.
    with ServeProcess("--dev", env=env) as again:
        assert again.terminate() == 0
