"""The session-end check (tests/infra/leftovers.py) fails a session that leaves a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

LEAKY = """
import subprocess, sys, pathlib

def test_starts_a_process_and_forgets_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (pathlib.Path({pidfile!r})).write_text(str(proc.pid))
"""

TIDY = """
import subprocess, sys

def test_starts_a_process_and_stops_it():
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as proc:
        proc.kill()
"""


WRITES_THE_DEFAULT_DATABASE = """
import os, pathlib

def test_serves_from_the_checkout_without_a_database_of_its_own():
    (pathlib.Path(os.environ["SB_TESTS_CHECKOUT"]) / "switchboard.db").write_bytes(b"")
"""


def _session(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(body)
    (tmp_path / "checkout").mkdir(exist_ok=True)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.infra.leftovers",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-c",
            os.devnull,
            "--rootdir",
            str(tmp_path),
            "-q",
            str(tmp_path / "test_inner.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "SB_TESTS_LEFTOVER_GRACE_S": "0.5",
            "SB_TESTS_CHECKOUT": str(tmp_path / "checkout"),
        },
    )


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_process_left_running_fails_the_session_and_is_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    done = _session(tmp_path, LEAKY.format(pidfile=str(pidfile)))
    assert done.returncode != 0, done.stdout
    assert "still running at the end" in done.stdout
    assert "time.sleep(600)" in done.stdout
    # Killed by the check: gone, or a zombie until init reaps the orphan.
    assert not running(int(pidfile.read_text()))


def test_a_session_that_stops_what_it_starts_passes(tmp_path: Path) -> None:
    done = _session(tmp_path, TIDY)
    assert done.returncode == 0, done.stdout


def test_a_session_that_writes_the_checkouts_default_database_fails_and_it_is_removed(
    tmp_path: Path,
) -> None:
    done = _session(tmp_path, WRITES_THE_DEFAULT_DATABASE)
    assert done.returncode != 0, done.stdout
    assert "wrote the checkout's default database files (removed): switchboard.db" in done.stdout
    assert not (tmp_path / "checkout" / "switchboard.db").exists()
