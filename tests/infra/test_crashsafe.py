"""A worker that dies mid-file: the parallel run still ends, with the crash named."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
#: Far above the second the run takes: only a run that stopped moving reaches it.
HANG_S = 90

CRASHING = """
import os
def test_before(): pass
def test_crash(): os.abort()
def test_after(): pass
"""


def _run(tmp_path: Path, workers: int, *plugin: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_1_fine.py").write_text("def test_fine(): pass\n")
    (tmp_path / "test_2_crash.py").write_text(CRASHING)
    (tmp_path / "test_3_later.py").write_text("def test_one(): pass\ndef test_two(): pass\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "pytest", "-n", str(workers), "--dist", "loadfile"]
    argv += ["--no-loadscope-reorder", *plugin]
    argv += ["-p", "no:cacheprovider", "-p", "no:randomly", "-q", str(tmp_path)]
    return subprocess.run(
        argv, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crashed_worker_ends_the_run_with_the_crash_named_and_the_rest_run(
    tmp_path: Path, workers: int
) -> None:
    # Files in the Makefile's order. One worker finishes the first file and dies in the
    # second: xdist 3.8.0's own scheduler (``-p`` left out) hands the finished file to the
    # replacement as an empty batch, or the rest as one test held back, and the run never
    # ends (the subprocess times out).
    done = _run(tmp_path, workers, "-p", "tests.infra.crashsafe")
    out = done.stdout
    assert "1 failed, 5 passed" in out, out
    assert re.search(r"worker 'gw\d' crashed while running 'test_2_crash.py::test_crash'", out), out
