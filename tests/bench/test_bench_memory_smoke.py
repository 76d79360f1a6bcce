"""bench/memory.py end to end at its smallest: real `switchboard serve --dev` processes,
the forming worker and the scripted model. It catches the bench drifting from the
worker (its prompts, its events) before a measured run would; it asserts what the
scripted model makes certain, never a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
#: The whole bench at this size takes well under a minute; this only guards a hang.
BOUND_S = 600


def test_the_bench_forms_every_stated_fact_and_finds_each_current_one() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "memory.py"),
            "--quick",
            "--json",
            "--people",
            "1",
            "--conversations",
            "3",
            "--pairs",
            "8",
        ],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=BOUND_S,
        cwd=ROOT,
    )
    results = json.loads(done.stdout)["results"]
    quality = results["quality"]
    assert quality["errors"] == {}
    assert quality["unsettled_sessions"] == 0
    forming = quality["by_way"]["forming"]
    # The scripted model reads every statement of the set: the window holds each
    # current fact, never a superseded one, never a retracted one.
    assert forming["current"]["right"] == forming["current"]["questions"] > 0
    assert forming["current"]["stale"] == 0
    retracted = forming["retracted"]  # the seed's first person retracts two facts
    assert retracted["right"] == retracted["questions"] > 0
    assert quality["decisions"].get("ADD", 0) > 0
    lag = results["lag"]
    assert lag["one"]["decided"] == lag["one"]["exchanges"] > 0
    assert lag["former"]["decided"] == lag["former"]["exchanges"] == 3
    assert lag["former"]["errors"] == {} == lag["plain"]["errors"]
    assert lag["tokens_per_exchange"]["prompt"] > 0
    first = results["first-token"]
    assert first["former"]["runs"] == first["plain"]["runs"] > 0
    assert first["errors"] == {}
