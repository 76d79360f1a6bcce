"""A failed test's process logs are kept under the artifacts folder, named by the test's id
(tests/infra/processlogs.py); a passing test leaves nothing behind.

Each case runs a small pytest session of its own in a subprocess (as test_leftovers does),
whose tests start real processes through the suite's helpers: `switchboard serve`
(ServeProcess), redis-server (RedisServer) and a Python process writing a long log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.processlogs import WORKER_TAIL_BYTES, folder_name

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

SERVES_THEN_FAILS = """
from tests.e2e.procs import ServeProcess

def test_serves_then_fails():
    with ServeProcess("--dev") as server:
        assert server.port == -1, "fails on purpose"
"""

#: The session's log files are in the system's temporary directory (the case's TMPDIR).
REDIS_THEN_PASSES = """
import glob, os, tempfile
from tests.infra.redis import RedisServer, find_redis_server

def _logs():
    pattern = os.path.join(tempfile.gettempdir(), "switchboard-process-logs-*", "redis-*.log")
    return glob.glob(pattern)

def test_starts_redis_and_passes():
    server = RedisServer(find_redis_server())
    server.start()
    try:
        assert len(_logs()) == 1
    finally:
        server.stop()

def test_the_first_tests_log_is_gone_once_it_is_over():
    assert _logs() == []
"""

REDIS_THEN_FAILS = """
from tests.infra.redis import RedisServer, find_redis_server

def test_starts_redis_then_fails():
    server = RedisServer(find_redis_server())
    server.start()
    try:
        assert not server.running, "fails on purpose"
    finally:
        server.stop()
"""

#: A session-scoped Redis and a session-scoped process whose log is longer than the tail
#: kept of a worker's server; function-scoped Redis servers that fail a test's setup or
#: teardown. The last test passes, so the session's servers stop in a passing teardown.
WORKER_SERVERS = """
import subprocess, sys
import pytest
from tests.infra import processlogs
from tests.infra.redis import RedisServer, find_redis_server

@pytest.fixture(scope="session")
def shared_redis():
    server = RedisServer(find_redis_server())
    server.start()
    yield server
    server.stop()

@pytest.fixture(scope="session")
def chatty():
    log = processlogs.log_file("chatty")
    line = "x" * 99 + "\\n"
    code = f"import sys; sys.stdout.write({line!r} * {LINES}); print('the last line')"
    with log.open("w") as out:
        subprocess.run([sys.executable, "-c", code], stdout=out, check=True)
    return log

@pytest.fixture
def redis_then_setup_fails():
    server = RedisServer(find_redis_server())
    server.start()
    try:
        raise RuntimeError("setup fails on purpose")
    finally:
        server.stop()

@pytest.fixture
def redis_then_teardown_fails():
    server = RedisServer(find_redis_server())
    server.start()
    yield server
    server.kill()
    raise RuntimeError("teardown fails on purpose")

def test_uses_the_workers_servers_and_passes(shared_redis, chatty):
    assert shared_redis.running

def test_uses_the_workers_servers_and_fails(shared_redis, chatty):
    assert not shared_redis.running, "fails on purpose"

def test_setup_fails(shared_redis, chatty, redis_then_setup_fails):
    pass

def test_teardown_fails(shared_redis, chatty, redis_then_teardown_fails):
    pass

def test_the_last_one_passes(shared_redis):
    # The session's servers stop in its teardown: their logs are this test's then.
    assert shared_redis.running
"""


def _session(
    tmp_path: Path, body: str, *, artifacts: Path | None
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "SWITCHBOARD_TEST_ARTIFACTS"}
    env.update(PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    if artifacts is not None:
        env["SWITCHBOARD_TEST_ARTIFACTS"] = str(artifacts)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.infra.processlogs",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-c",
            os.devnull,
            "--rootdir",
            str(tmp_path),
            "-rA",
            str(tmp_path / "test_inner.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env=env,
    )


def _messages(log: Path) -> list[str]:
    """The messages of the server's JSON lines (the first line names the command)."""
    first, *lines = log.read_text().splitlines()
    assert first.startswith("--- serve "), first
    return [json.loads(line).get("message", "") for line in lines]


def test_a_failing_tests_server_log_is_kept_in_a_folder_named_by_its_id(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    done = _session(tmp_path, SERVES_THEN_FAILS, artifacts=artifacts)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed" in done.stdout, done.stdout
    folder = artifacts / "failures" / "test_inner.py__test_serves_then_fails"
    logs = sorted(folder.glob("serve-*.log"))
    assert len(logs) == 1, f"{sorted(p.name for p in folder.rglob('*'))}\n{done.stdout}"
    assert "switchboard listening" in _messages(logs[0])
    # The report's section names the folder, and the run's summary names it again.
    assert f"kept in {folder}" in done.stdout, done.stdout
    assert f"test_inner.py::test_serves_then_fails: {folder}" in done.stdout, done.stdout


def test_a_passing_test_leaves_nothing_and_its_log_is_removed_when_it_ends(
    tmp_path: Path,
) -> None:
    artifacts = tmp_path / "artifacts"
    done = _session(tmp_path, REDIS_THEN_PASSES, artifacts=artifacts)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout, done.stdout
    assert not (artifacts / "failures").exists()
    assert "kept in" not in done.stdout
    # The log's own directory went with the session (TMPDIR is the case's).
    assert not any((tmp_path / "tmp").glob("switchboard-process-logs-*/*"))


def test_the_workers_server_logs_are_kept_with_a_failure_as_a_tail(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    lines = WORKER_TAIL_BYTES // 100 + 5000
    done = _session(tmp_path, WORKER_SERVERS.replace("{LINES}", str(lines)), artifacts=artifacts)
    assert done.returncode == 1, done.stdout + done.stderr
    for count in ("1 failed", "3 passed", "2 errors"):
        assert count in done.stdout, done.stdout
    failures = artifacts / "failures"
    kept = sorted(path.name for path in failures.iterdir())
    assert kept == [
        "test_inner.py__test_setup_fails",
        "test_inner.py__test_teardown_fails",
        "test_inner.py__test_uses_the_workers_servers_and_fails",
    ], kept
    worker = failures / "test_inner.py__test_uses_the_workers_servers_and_fails" / "worker"
    (redis,) = worker.glob("redis-*.log")
    assert "Ready to accept connections" in redis.read_text()
    (chatty,) = worker.glob("chatty-*.log")
    text = chatty.read_bytes()
    first, rest = text.split(b"\n", 1)
    assert len(rest) == WORKER_TAIL_BYTES
    assert first.startswith(b"[the first ")
    assert first.endswith(f" bytes of {chatty.name} are left out]".encode())
    assert rest.endswith(b"the last line\n")
    # A test's own Redis, whichever phase failed; the worker's servers beside it.
    for name in ("test_setup_fails", "test_teardown_fails"):
        folder = failures / f"test_inner.py__{name}"
        (own,) = folder.glob("redis-*.log")
        assert "Ready to accept connections" in own.read_text()
        assert sorted(path.name.split("-")[0] for path in (folder / "worker").iterdir()) == [
            "chatty",
            "redis",
        ]
        assert f"kept in {folder}" in done.stdout, done.stdout


def test_without_the_variable_the_folder_is_in_the_temporary_directory(tmp_path: Path) -> None:
    done = _session(tmp_path, REDIS_THEN_FAILS, artifacts=None)
    assert done.returncode == 1, done.stdout + done.stderr
    folder = (
        tmp_path
        / "tmp"
        / "switchboard-test-artifacts"
        / "failures"
        / "test_inner.py__test_starts_redis_then_fails"
    )
    (log,) = folder.glob("redis-*.log")
    assert "Ready to accept connections" in log.read_text(), done.stdout
    assert f"kept in {folder}" in done.stdout, done.stdout


def test_a_test_id_becomes_one_directory_name() -> None:
    assert folder_name("tests/e2e/test_mesh.py::test_kill[replica-a]") == (
        "tests_e2e_test_mesh.py__test_kill_replica-a"
    )
    long = "tests/e2e/test_x.py::test_y[" + "a/" * 200 + "]"
    other = long.replace("a/", "b/", 1)
    assert len(folder_name(long)) <= 133
    assert folder_name(long) != folder_name(other)
    assert "/" not in folder_name(long)
