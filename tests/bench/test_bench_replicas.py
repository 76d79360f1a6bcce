"""bench/streaming.py's scaled-out part: CPU of process trees, the spread of calls over the
dispatcher replicas read from the launcher's log, process kinds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.streaming import TreeCpu, by_kind, calls_by_replica, complaints, kind_of

pytestmark = pytest.mark.unit

#: CPU seconds the child burns once it is told to, then says so.
BURN_S = 0.2
BURNER = f"""
import sys, time
print("ready", flush=True)
sys.stdin.readline()
until = time.process_time() + {BURN_S}
while time.process_time() < until:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


def test_a_tree_counts_its_children_and_stops_at_another_tree() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        alone = TreeCpu({"me": [os.getpid()]})
        split = TreeCpu({"me": [os.getpid()], "child": [child.pid]})
        alone.start()
        split.start()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "burnt\n"
        alone.stop()
        split.stop()
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    # The child's CPU is in its parent's tree, unless it is a tree's root of its own; this
    # process only waited for it meanwhile.
    assert alone.used["me"] >= BURN_S * 0.9
    assert split.used["child"] >= BURN_S * 0.9
    assert split.used["me"] < BURN_S / 2


def test_the_spread_counts_each_replica_s_access_lines_only(tmp_path: Path) -> None:
    method = "method=/switchboard.api.dispatcher.v1.DispatcherService"
    log = tmp_path / "mesh.log"
    log.write_text(
        "\n".join(
            [
                f"dispatcher-1 | INFO switchboard.dispatcher run queued {method}/SendMessage run=r",
                f"dispatcher-1 | INFO switchboard.access rpc finished {method}/SendMessage code=OK",
                f"dispatcher-1 | INFO switchboard.access rpc finished {method}/WatchRun code=OK",
                f"dispatcher-2 | INFO switchboard.access rpc finished {method}/WatchRun code=OK",
                f"dispatcher-2 | INFO switchboard.access rpc finished {method}/GetRun code=OK",
                f"context      | INFO switchboard.access rpc finished {method}/WatchRun code=OK",
                "mesh         | ready: Switchboard at 127.0.0.1:8080",
            ]
        )
    )
    assert calls_by_replica(log, ("SendMessage", "WatchRun")) == {
        "dispatcher-1": {"SendMessage": 1, "WatchRun": 1},
        "dispatcher-2": {"SendMessage": 0, "WatchRun": 1},
    }


def test_replicas_add_up_by_kind() -> None:
    assert kind_of("dispatcher-2") == "dispatcher"
    assert kind_of("edge-health") == "edge-health"
    assert by_kind(
        {"dispatcher-1": 1.0, "dispatcher-2": 2.0, "edge-health": 0.5, "launcher": 0.25}
    ) == {"dispatcher": 3.0, "rest": 0.75}


def test_complaints_are_what_was_logged_once_the_mesh_was_ready(tmp_path: Path) -> None:
    log = tmp_path / "mesh.log"
    log.write_text(
        "\n".join(
            [
                "context      | 2026-11-26 10:41:45,273 WARNING switchboard.context.files "
                "files are kept in a directory",
                "mesh         | ready: Switchboard at 127.0.0.1:8080",
                "context      | 2026-11-26 10:42:14,880 WARNING switchboard.context.store "
                "database call failed: TimeoutError request_id=1 method=/x",
                "context      | 2026-11-26 10:42:15,880 WARNING switchboard.context.store "
                "database call failed: TimeoutError request_id=2 method=/x",
                "dispatcher-2 | 2026-11-26 10:42:16,000 INFO    switchboard.access rpc finished",
            ]
        )
    )
    assert complaints(log) == {
        "context: switchboard.context.store database call failed: TimeoutError": 2
    }
