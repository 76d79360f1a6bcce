"""No process a test started outlives the test session, and no test writes the
checkout's default database.

Every process the suite starts inherits ``SB_TESTS_RUN`` (set before the first test,
one value per pytest process, so two xdist workers never judge each other's), however
it was started and whatever it forked, unless a test hands it an environment made from
nothing. When the session ends, after every fixture has stopped what it started, any
process still carrying this session's value is a leak: it is named, killed, and the
session fails on it. A test that starts a process stops it, whatever its outcome.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

MARK = "SB_TESTS_RUN"
#: The checkout (a server started without SWITCHBOARD_DATABASE_URL from here writes its
#: default database, and in dev mode its key, into it: a reader's `make run` state).
#: (``SB_TESTS_CHECKOUT`` names another directory: the check's own test.)
ROOT = Path(os.environ.get("SB_TESTS_CHECKOUT") or Path(__file__).resolve().parents[2])
DEFAULT_FILES = (
    "switchboard.db",
    "switchboard.db-wal",
    "switchboard.db-shm",
    "switchboard.db.lock",
    "switchboard.dev-signing-key.pem",
)
#: How long processes that were just told to stop get to end before they count
#: (``SB_TESTS_LEFTOVER_GRACE_S`` overrides it: the check's own test needs no wait).
GRACE_S = float(os.environ.get("SB_TESTS_LEFTOVER_GRACE_S", "15"))


def marked(token: str) -> dict[int, str]:
    """Live processes carrying ``MARK=token`` (not this one): pid -> command line."""
    needle = f"{MARK}={token}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            if needle not in environ.split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # ended; its parent has not reaped it yet
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        found[int(entry.name)] = command.strip()[:300]
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Autouse and session-wide, so set up before (and finished after) every fixture
    that starts a server: what it finds at the end, nothing else will stop."""
    token = f"{uuid.uuid4().hex}-{os.getpid()}"
    os.environ[MARK] = token
    there = {name for name in DEFAULT_FILES if (ROOT / name).exists()}
    yield
    written = sorted(name for name in DEFAULT_FILES if (ROOT / name).exists())
    written = [name for name in written if name not in there]
    for name in written:
        (ROOT / name).unlink(missing_ok=True)
    deadline = time.monotonic() + GRACE_S
    left = marked(token)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)  # polling for processes told to stop to end, with a deadline
        left = marked(token)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    problems = []
    if left:
        lines = "\n".join(f"  {pid}: {command}" for pid, command in sorted(left.items()))
        problems.append(f"processes started by tests were still running at the end:\n{lines}")
    if written:
        problems.append(
            f"tests wrote the checkout's default database files (removed): {', '.join(written)};"
            " give each server a database of its own (SWITCHBOARD_DATABASE_URL)"
        )
    if problems:
        pytest.fail("\n".join(problems))
