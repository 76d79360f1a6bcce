"""bench/sizing.py's model: lines fitted to the measured counts, what N processes carry
and which part binds first, and the figures read from the scale bench's tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.scale import sizing
from bench.sizing import HEADROOM, Line, Model, Point, fit, model_from_benchmarks, points_from

pytestmark = pytest.mark.unit


def test_a_line_is_fitted_through_the_counts_and_never_falls() -> None:
    line = fit([(1, 30.0), (2, 33.0), (4, 39.0), (8, 51.0)])
    assert line.base == pytest.approx(30.0)
    assert line.per_process == pytest.approx(3.0)
    assert line.at(64) == pytest.approx(30.0 + 3.0 * 63)
    # One count says nothing of growth: flat through the mean.
    assert fit([(2, 10.0), (2, 12.0)]) == Line(11.0, 0.0)
    # A cost that falls with more processes is noise: flat, through the mean.
    falling = fit([(1, 10.0), (8, 9.0)])
    assert falling.per_process == 0.0
    assert falling.base == pytest.approx(9.5)


def _model(per_process_ms: float, redis_ms: float = 1.0, postgres_ms: float = 2.0) -> Model:
    return Model(
        process=Line(40.0, per_process_ms),
        postgres=Line(postgres_ms, 0.0),
        redis=Line(redis_ms, 0.0),
        envoy=Line(1.0, 0.0),
        session_ms=20.0,
        source="a test",
    )


def test_the_processes_bind_until_the_logs_shard_does() -> None:
    model = _model(0.0)
    eight = model.row(8)
    assert eight.runs_s == pytest.approx(8 * HEADROOM * 1000 / 40.0)
    assert eight.bound == "the processes"
    assert eight.sessions == pytest.approx(8 * HEADROOM * 1000 / 20.0)
    assert eight.postgres_cores == pytest.approx(eight.runs_s * 2.0 / 1000 / HEADROOM)
    # 64 processes would carry 1,280 runs/s; the log's one thread at 1 ms a run, 800.
    many = model.row(64)
    assert many.runs_s == pytest.approx(HEADROOM * 1000 / 1.0)
    assert many.bound == "the log's Redis shard (one thread)"
    assert many.redis_shards == 1


def test_hearing_every_other_process_caps_the_whole_and_shared_nothing_lifts_it() -> None:
    model = _model(4.0, redis_ms=0.1)
    broadcast = [model.row(n).runs_s for n in (8, 64, 256)]
    # N * 800 / (40 + 4 (N - 1)): approaching 800 / 4 = 200 runs/s, whatever N.
    assert all(rate < 200 for rate in broadcast)
    assert model.row(8, shared_nothing=True).runs_s == pytest.approx(160.0)
    assert model.row(64, shared_nothing=True).runs_s > 5 * broadcast[1]
    assert "at most about 200 runs/s" in model.lines()[2]


def test_postgresql_binds_past_one_primarys_cores() -> None:
    model = _model(0.0, redis_ms=0.001, postgres_ms=100.0)
    assert model.row(256).bound == "PostgreSQL (64 cores)"


TABLE = """
## Scale on 16 cores: whole-run processes behind the edge

| round | shape | runs/s | first token p50 / p99 ms | gap - interval p50 / p99 ms | server CPU ms/run (x all-in-one) | Switchboard process(es) | PostgreSQL | Redis | Envoy | launcher + edge-health | model | client | cores by process | bound by | errors |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| 1 | the model, direct | 394.0 | 1 / 2 | 0 / 1 | (no server) | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 1.7 | 19.6 | x | y | 0 |
| 1 | 1 process(es) | 34.5 | 1 / 2 | 0 / 1 | 40.1 (0.94x) | 31.0 | 1.5 | 1.4 | 2.0 | 0.7 | 3.0 | 7.2 | x | y | 0 |
| 1 | 8 process(es) | 145.5 | 1 / 2 | 0 / 1 | 66.5 (1.55x) | 59.0 | 6.4 | 1.6 | 2.0 | 0.6 | 2.7 | 2.7 | x | y | 0 |

## Delegation
| 1 | 4 process(es) | 1 | 1 | 1 | 1 | 99.0 | 9 | 9 | 9 | 9 |
"""  # noqa: E501 - a table as the bench writes it


def test_the_points_are_the_process_rows_of_the_named_section(tmp_path: Path) -> None:
    heading = "## Scale on 16 cores: whole-run processes behind the edge"
    points = points_from(TABLE, heading)
    assert points == [Point(1, 31.0, 1.5, 1.4, 2.0), Point(8, 59.0, 6.4, 1.6, 2.0)]
    written = tmp_path / "BENCHMARKS.md"
    written.write_text(TABLE)
    model = model_from_benchmarks(written)
    assert model.process == Line(31.0, 4.0)
    assert "Scale on 16 cores" in model.source


def test_the_scale_bench_prints_the_model_from_its_own_counts() -> None:
    def shape(process_ms: float) -> dict[str, object]:
        return {"ms_per_run": {"switchboard-1": process_ms, "postgres": 2.0, "redis": 1.0}}

    results = {"rounds": [{"processes": {"1": shape(30.0), "2": shape(33.0)}}]}
    lines = sizing(results)
    assert lines[0].startswith("Sizing on paper")
    assert "a Switchboard process 30.0 + 3.00 (N - 1) ms" in lines[2]
    assert any(line.startswith("| as measured (b fitted) | 64 |") for line in lines)
