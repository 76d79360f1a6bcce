"""Calls' ports in PJSIP's conference bridge are lent from call to call, never deleted
while the library runs (``pjsip.Ports``): PJSIP 2.15.1's bridge removes a port at its next
tick and reads it then, and pjsua2 freed the port at once, so a port deleted with its call
was read after its memory was freed (CI's segfault, one run of the whole suite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

PROC = Path(__file__).with_name("portchurn_proc.py")
REPO = Path(__file__).resolve().parents[4]
ROUNDS = 400


def test_ports_lent_and_given_back_fast_never_crash_the_bridge() -> None:
    # glibc fills freed memory with this byte: a port read after it was freed reads
    # garbage pointers and the process dies (deleting the ports instead, as before, died
    # in most runs of 1,500 rounds of three ports).
    env = {
        **os.environ,
        "MALLOC_PERTURB_": "165",
        "PYTHONPATH": os.pathsep.join(str(REPO / part) for part in ("services", "gen", ".")),
    }
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", str(PROC), str(ROUNDS)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("survived")]
    survived, made, heard = line.split()[1], int(line.split()[3]), line.split()[5]
    assert survived == str(ROUNDS)
    assert heard == "True"  # the ports were in the bridge, hearing each other
    assert made < ROUNDS  # lent again and again: three ports a round otherwise
