"""bench/scale.py's arithmetic: several clients' figures merged on one window, every process
put in its part, the part that bound a row named, and the goals read within each round."""

from __future__ import annotations

from typing import Any

import pytest

from bench.scale import _merged as merged
from bench.scale import bound, by_part, goals, paced_limit, part_of, projection, server_ms
from bench.streaming import Row

pytestmark = pytest.mark.unit


def _client(runs: int, tokens: int, first: list[float], errors: dict[str, int]) -> dict[str, Any]:
    return {
        "runs_ended": runs,
        "tokens": tokens,
        "first_s": first,
        "gap_s": [0.001] * len(first),
        "errors": errors,
        "short_answers": 0,
    }


def test_clients_on_one_window_add_up_and_their_samples_merge() -> None:
    answers = [
        _client(30, 960, [0.1] * 30, {}),
        _client(10, 320, [0.9] * 10, {"SendMessage UNAVAILABLE": 2}),
    ]
    used = {"switchboard-1": 2.0, "switchboard-2": 2.0, "postgres": 0.4, "client-1": 0.5}
    figures = merged(answers, used, seconds=10.0, waited=0.0)
    assert figures["runs_ended"] == 40
    assert figures["runs_per_s"] == 4.0
    assert figures["tokens"] == 1280
    # p99 over both clients' samples: the slow client's first tokens are the tail.
    assert figures["first_p50_ms"] == 100.0
    assert figures["first_p99_ms"] == 900.0
    assert figures["errors"] == {"SendMessage UNAVAILABLE": 2}
    assert figures["ms_per_run"]["switchboard-1"] == 50.0  # 2 s of CPU over 40 runs
    assert figures["cores"]["postgres"] == 0.04
    parts = by_part(figures)
    assert parts["processes"] == 100.0  # both processes, one part
    assert parts["client"] == 12.5
    # Server CPU leaves the client (and the model) out.
    assert server_ms(figures) == 110.0


def test_every_process_has_its_part() -> None:
    assert [part_of(n) for n in ("switchboard-3", "server", "postgres", "redis", "envoy")] == [
        "processes",
        "server",
        "postgres",
        "redis",
        "envoy",
    ]
    assert part_of("client-2") == "client"
    assert part_of("edge-health") == part_of("launcher") == "rest"


def test_the_bound_is_a_busy_one_thread_part_else_the_host_else_the_pace() -> None:
    busy = {"cores": {"switchboard-1": 0.97, "postgres": 0.2, "model": 0.1}}
    assert bound(busy, 2).startswith("switchboard-1 (0.97 of a core)")
    # PostgreSQL has processes of its own: at a core it is not one thread's limit.
    shared = {"cores": {"switchboard-1": 0.6, "switchboard-2": 0.6, "postgres": 0.5}}
    assert bound(shared, 2).startswith("the host's 2 cores (1.70 busy")
    idle = {"cores": {"switchboard-1": 0.3, "model": 0.1}}
    assert bound(idle, 16).startswith("nothing at a core (0.40 of 16 cores busy)")


def _shape(process_ms: float, runs_per_s: float = 10.0) -> dict[str, Any]:
    return {
        "ms_per_run": {"switchboard-1": process_ms, "postgres": 2.0, "redis": 2.0, "envoy": 1.0},
        "runs_per_s": runs_per_s,
    }


#: The paced row (156 runs/s allowed) and an all-in-one on it.
_ROW = {"interval_ms": 20, "conversations": 100, "tokens": 32}
_ALL_IN_ONE = {"ms_per_run": {"server": 20.0, "model": 4.0}, "runs_per_s": 50.0}


def test_goals_are_read_within_each_round() -> None:
    rounds = [
        {
            "all_in_one": _ALL_IN_ONE,
            "processes": {"1": _shape(21.0), "2": _shape(24.0)},
            "matched": {"2": _shape(22.0)},
        }
    ]
    results = {"processes": (1, 2), "rounds": rounds, "cores": 2, "row": _ROW}
    lines = goals(results)
    # 26 / 20 = 1.30: the cost goal holds at its bound; 29 / 26 = 1.12 misses 1.1.
    assert "met, 1.30x" in lines[0]
    assert "**missed**, 1.12x" in lines[1]
    assert "1.04x" in lines[2]
    table = projection(results)
    # From the matched row: a process carries 800 / 22 = 36 runs/s; Redis 800 / 2 = 400.
    assert "one process carries 36 runs/s; Redis, one thread, 400 runs/s" in table[0]
    assert any(line.startswith("| 16 | 400 |") and "Redis" in line for line in table)


def test_the_paced_model_allows_conversations_over_a_runs_length() -> None:
    assert paced_limit(Row(20, 800)) == 1250.0
    assert paced_limit(Row(20, 100, 64)) == 78.125


def test_the_flat_cost_goal_compares_the_processes_alone_at_four_and_one() -> None:
    def shape(process_ms: float) -> dict[str, Any]:
        return {"ms_per_run": {"switchboard-1": process_ms, "postgres": 9.0, "redis": 9.0}}

    rounds = [
        {
            "all_in_one": _ALL_IN_ONE,
            "processes": {"1": shape(30.0), "4": shape(36.0)},
        }
    ]
    results = {"processes": (1, 4), "rounds": rounds, "cores": 2, "row": _ROW}
    flat = [line for line in goals(results) if line.startswith("- Flat per-process cost")]
    # 36 / 30 = 1.2: the shared parts' costs (PostgreSQL, Redis) do not count here.
    assert len(flat) == 1
    assert "**missed**, 1.20x" in flat[0]
    assert "more processes than cores, on purpose" in flat[0]


def test_the_streaming_goal_reads_the_all_in_one_against_the_models_pace_and_cpu() -> None:
    rounds = [
        {
            "all_in_one": {"ms_per_run": {"server": 20.0, "model": 4.0}, "runs_per_s": 50.0},
            "processes": {"1": _shape(30.0)},
        },
        {
            "all_in_one": {"ms_per_run": {"server": 12.0, "model": 4.0}, "runs_per_s": 90.0},
            "processes": {"1": _shape(30.0)},
        },
    ]
    results = {"processes": (1,), "rounds": rounds, "cores": 2, "row": _ROW}
    lines = goals(results)
    share = next(line for line in lines if line.startswith("- Streaming within one process"))
    token = next(line for line in lines if line.startswith("- Its CPU per streamed token"))
    # 50 and 90 of the 156.25 runs/s the pace allows: 0.32 and 0.58, 0.45 on average.
    assert "(156 runs/s): **missed**, 0.45 (rounds: 0.32, 0.58)" in share
    # Per token both divide by 32: 20 / 4 and 12 / 4.
    assert "**missed**, 4.0x (rounds: 5.0x, 3.0x)" in token


def test_the_many_core_goal_is_measured_only_with_a_core_per_process() -> None:
    def at(rate: float, p99: float) -> dict[str, Any]:
        return {**_shape(30.0, rate), "first_p99_ms": p99}

    processes = {"1": at(30.0, 200.0), "4": at(96.0, 400.0), "8": at(170.0, 900.0)}
    rounds = [{"all_in_one": _ALL_IN_ONE, "processes": processes}]
    results: dict[str, Any] = {"processes": (1, 4, 8), "rounds": rounds, "cores": 2, "row": _ROW}
    many = next(line for line in goals(results) if line.startswith("- Many cores"))
    assert "not measured here (2 cores; it needs 16" in many
    results["cores"] = 16
    many = next(line for line in goals(results) if line.startswith("- Many cores"))
    # 96 >= 0.75 x 4 x 30 = 90, but 170 < 0.75 x 8 x 30 = 180.
    assert "**missed** (N = 4: 3.20x one process's, p99 400 ms; N = 8: 5.67x" in many
    processes["8"] = at(190.0, 1200.0)
    many = next(line for line in goals(results) if line.startswith("- Many cores"))
    assert "**missed**" in many  # fast enough, but the first token's p99 is over a second
    processes["8"] = at(190.0, 900.0)
    many = next(line for line in goals(results) if line.startswith("- Many cores"))
    assert many.split(": ", 2)[2].startswith("met (N = 4")
