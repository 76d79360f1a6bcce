"""bench/micro.py's write after idleness, and the line bench/dispatcher.py reports it on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bench.dispatcher import _idle_line
from bench.micro import write_after_idle
from switchboard.platform.store.db import open_database
from switchboard.platform.store.models import EventOutboxRow

pytestmark = pytest.mark.unit


async def test_each_gap_gets_the_median_cpu_of_real_writes_that_leave_nothing(
    tmp_path: Path,
) -> None:
    figures = await write_after_idle(tmp_path, gaps_ms=(0, 1), rounds=2, samples=3)
    assert set(figures) == {"0", "1"}
    assert all(us > 0 for us in figures.values())
    # Each write inserted a row and deleted it in the same transaction: nothing stays.
    database = await open_database(
        f"sqlite+aiosqlite:///{tmp_path}/idle.db", timeout_s=10, migrate=False
    )
    try:
        left = await database.run(
            lambda session: session.scalar(select(func.count()).select_from(EventOutboxRow)),
            write=False,
        )
    finally:
        await database.close()
    assert left == 0


def _row(pause_s: float, cpu_ms: float) -> dict[str, Any]:
    return {"pause_s": pause_s, "server_cpu_ms_per_call": cpu_ms}


def test_the_line_compares_paced_with_capacity_and_each_gap_with_back_to_back() -> None:
    line = _idle_line([_row(0.0, 10.0), _row(5.0, 24.0)], {"0": 400, "5": 880, "50": 1100})
    assert "paced / at capacity: 2.40x" in line
    assert "costs 400 µs of CPU back to back" in line
    assert "880 µs 5 ms after the last (2.2x)" in line
    assert "1100 µs 50 ms after the last (2.8x)" in line


def test_without_both_rows_the_line_gives_only_the_writes() -> None:
    line = _idle_line([_row(5.0, 24.0)], {"0": 400, "5": 880})
    assert "paced / at capacity" not in line
    assert "880 µs 5 ms after the last (2.2x)" in line
