"""bench/harness.py: the one percentile every section reports, and the report writer."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.harness import (
    BENCHMARKS,
    PREAMBLE,
    Window,
    clients,
    histogram_percentile,
    median,
    middle,
    ms,
    overrides,
    percentile,
    rank,
    replace_sections,
    section_main,
    summary,
    write_sections,
)
from bench.run import render

pytestmark = pytest.mark.unit


def test_percentiles_are_nearest_rank() -> None:
    samples = [float(n) for n in range(100, 0, -1)]  # 1..100, unsorted
    assert percentile(samples, 0.50) == 50.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile(samples, 1.0) == 100.0
    tens = [float(n) for n in range(1, 11)]
    assert percentile(tens, 0.50) == 5.0  # the 5th of 10, not between the 5th and the 6th
    assert percentile(tens, 0.90) == 9.0
    assert percentile(tens, 0.99) == 10.0
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


@pytest.mark.parametrize("percent", [50, 95, 99])
def test_the_rank_is_exact_where_floating_point_is_not(percent: int) -> None:
    for count in range(1, 3001):
        assert rank(count, percent / 100) == -(-percent * count // 100), count


def test_ms_is_the_percentile_of_seconds_in_milliseconds() -> None:
    assert ms([0.001, 0.002, 0.0031234], 0.99) == 3.123


def test_a_histogram_gives_the_upper_edge_of_the_bucket_holding_the_rank() -> None:
    counts = {0: 50, 3: 49, 10: 1}
    upper = float
    assert histogram_percentile(counts, 0.50, lambda b: upper(b + 1)) == 1.0
    assert histogram_percentile(counts, 0.99, lambda b: upper(b + 1)) == 4.0
    assert histogram_percentile(counts, 1.0, lambda b: upper(b + 1)) == 11.0
    expanded = [float(b + 1) for b, n in counts.items() for _ in range(n)]
    for fraction in (0.5, 0.9, 0.99, 1.0):
        assert histogram_percentile(counts, fraction, lambda b: b + 1.0) == percentile(
            expanded, fraction
        )
    assert math.isnan(histogram_percentile({}, 0.5, float))


def test_summary_of_seconds() -> None:
    figures = summary([0.004, 0.001, 0.002, 0.003], (0.5, 0.95, 0.99))
    assert figures == {
        "calls": 4,
        "p50_ms": 2.0,
        "p95_ms": 4.0,
        "p99_ms": 4.0,
        "max_ms": 4.0,
        "mean_ms": 2.5,
    }
    assert summary([])["calls"] == 0


def test_the_median_round_and_the_median_of_rounds() -> None:
    assert middle([{"qps": 3.0}, {"qps": 1.0}, {"qps": 2.0}], key=lambda r: r["qps"]) == {
        "qps": 2.0
    }
    assert middle([4.0, 1.0, 3.0, 2.0], key=float) == 3.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert math.isnan(median([]))


OLD = """# Benchmarks

Written by an older bench/run.py.

## Unary call overhead of the server assembly

- old figures

## Event delivery

- old events

### Delivery latency, publish to receipt

| old | table |

## What the hardening of issue 15 costs (A/B, 2026-11-23)

Written by hand; no script has this heading.
"""


def test_a_section_replaces_the_one_with_its_heading_and_keeps_the_rest() -> None:
    fresh = (
        "## Event delivery\n\n- new events\n\n### Delivery latency, publish to receipt\n\n| new |"
    )
    updated = replace_sections(OLD, fresh)
    assert updated.startswith(PREAMBLE + "\n## Unary call overhead")
    assert "older bench/run.py" not in updated
    assert "- old figures" in updated
    assert "old events" not in updated
    assert "| old | table |" not in updated
    assert (
        "- new events\n\n### Delivery latency, publish to receipt\n\n| new |\n\n## What" in updated
    )
    assert updated.endswith("Written by hand; no script has this heading.\n")
    assert replace_sections(updated, fresh) == updated


def test_several_sections_at_once_and_a_new_one_appended() -> None:
    text = "## Unary call overhead of the server assembly\n\n- new\n\n## Tool runs\n\n- tools\n"
    updated = replace_sections(OLD, text)
    headings = [line for line in updated.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Unary call overhead of the server assembly",
        "## Event delivery",
        "## What the hardening of issue 15 costs (A/B, 2026-11-23)",
        "## Tool runs",
    ]
    assert "- old figures" not in updated
    assert updated.endswith("## Tool runs\n\n- tools\n")


def test_a_section_starts_with_its_heading() -> None:
    with pytest.raises(ValueError, match="heading"):
        replace_sections(OLD, "- figures without a heading\n\n## Tool runs\n")


def test_write_sections_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    write_sections("## Tool runs\n\n- tools", path)
    write_sections("## Dispatcher\n\n- runs", path)
    assert path.read_text() == PREAMBLE + "\n## Tool runs\n\n- tools\n\n## Dispatcher\n\n- runs\n"


def test_run_py_renders_its_three_sections() -> None:
    def figures(qps: float) -> dict[str, float]:
        return {"calls": qps * 5, "qps": qps, "p50_ms": 5.0, "p99_ms": 12.5}

    labels = [
        "grpc.aio, health only, no interceptor",
        "GetJwks, public (no credential)",
        "GetJwks, public, bearer header sent but unchecked",
        "GetJwks, authenticated, cached verification",
        "GetJwks, authenticated, no caches (EdDSA verify + session read per call)",
    ]
    rows = [
        (label, figures(qps))
        for label, qps in zip(labels, [2000, 1600, 1500, 1200, 400], strict=True)
    ]
    login = {**figures(30.0), "health_p50_ms": 2.0, "health_p99_ms": 9.0}
    inprocess = {"cached_authenticate_us": 4.2, "verify_us": 61.0}
    args = argparse.Namespace(seconds=5.0, concurrency=16, rounds=3)
    text = render(rows, login, inprocess, args)
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## Unary call overhead of the server assembly",
        "## Per-call authentication",
        "## Logins under load",
    ]
    assert "| case | calls | QPS | vs bare | p50 ms | p99 ms |" in text
    assert "| GetJwks, public (no credential) | 8000 | 1600 | 0.80 | 5.00 | 12.50 |" in text
    assert "- authenticated with cached verification / public: **0.75**" in text
    assert "| 30.0 | 5.0 | 12.5 | 2.00 | 9.00 |" in text
    assert "- command: `python bench/run.py --seconds 5 --concurrency 16 --rounds 3`" in text
    assert replace_sections("", text).count("\n## ") == 3


def test_a_section_script_runs_one_of_its_processes_or_its_section(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    driven: list[argparse.Namespace] = []

    async def drive(args: argparse.Namespace) -> int:
        driven.append(args)
        return 0

    async def doubled(spec: dict[str, Any]) -> dict[str, Any]:
        return {"n": spec["n"] * 2}

    children: list[int] = []
    roles: dict[str, Callable[..., object]] = {
        "client": clients({"double": doubled}),
        "child": children.append,
    }

    def rows(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rows")

    monkeypatch.setattr(sys, "argv", ["bench/x.py", "client", '{"mode": "double", "n": 21}'])
    assert section_main("Doc.", drive, quick="short", roles=roles) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 42}
    monkeypatch.setattr(sys, "argv", ["bench/x.py", "child", "7"])
    assert section_main("Doc.", drive, roles=roles) == 0
    assert children == [7]
    assert driven == []
    monkeypatch.setattr(sys, "argv", ["bench/x.py", "--quick", "--rows", "1,2"])
    assert section_main("Doc.", drive, quick="short", options=rows, roles=roles) == 0
    [args] = driven
    assert (args.quick, args.rows, args.write, args.json) == (True, "1,2", False, False)


def test_options_given_on_the_command_line_override_a_plan() -> None:
    args = argparse.Namespace(seconds=2.0, rounds=None, paths=["a", "b"])
    assert overrides(args, ("seconds", "rounds", "paths")) == {"seconds": 2.0, "paths": ("a", "b")}


def test_a_window_holds_the_measured_time_only() -> None:
    window = Window()
    assert 0.0 not in window
    window.start(warmup_s=10.0, seconds=5.0)
    assert window.begin not in Window()
    assert window.begin in window
    assert window.begin - 1 not in window
    assert window.deadline not in window
    assert window.open()


def test_the_current_figures_list_each_areas_goals_above_the_sections() -> None:
    scale = (
        "## Scale\n\n- when: 2026-11-29 07:03 UTC\n- command: `python bench/scale.py` (333 s)\n"
        "- machine: 2 cores\n\n| a | b |\n\n- Cost: at most 1.3x: **missed**, 1.85x.\n"
        "- Flat: at most 1.1x: met, 1.02x (a | b).\n- a note that states no goal\n"
    )
    history = "## Issue 38: the dispatcher section before and after\n\n- goal: met\n"
    dated = "## Budgets (A/B, 2026-11-26)\n\n- goal: **missed**\n"
    updated = replace_sections(OLD, scale + "\n" + history + "\n" + dated)
    head = updated.split("\n## ", 1)[0]
    assert head.startswith(PREAMBLE + "\nCurrent figures, area by area")
    assert "**[Scale](#scale)**: 2026-11-29 07:03 UTC, `python bench/scale.py` (333 s)" in head
    assert "| Cost: at most 1.3x: **missed**, 1.85x. | **missed** |" in head
    # A pipe in a goal's text stays inside its cell.
    assert "| Flat: at most 1.1x: met, 1.02x (a \\| b). | met |" in head
    assert "states no goal" not in head
    assert "machine" not in head
    # The dated history is not current.
    assert "Issue 38" not in head
    assert "A/B" not in head
    assert replace_sections(updated, "") == updated


def test_benchmarks_md_shows_its_current_figures() -> None:
    text = BENCHMARKS.read_text()
    assert replace_sections(text, "") == text, "write_sections('') brings it up to date"
