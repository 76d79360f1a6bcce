"""bench/delegation.py's arithmetic and report: the child's share is parent + child less
the parent alone, the goals read from the medians, a scaled-down tree says so, and the
planner's message asks its delegate as many times as the tree has children."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from bench.delegation import CASES, FULL, asking, render
from tests.fakes.openai_server import echo_reply

pytestmark = pytest.mark.unit


def case(per_unit: float, runs: int) -> dict[str, Any]:
    return {
        "errors": {},
        "children": 0,
        "cpu_ms_per_unit": per_unit,
        "cpu_ms_per_run": per_unit / runs,
        "model_cpu_ms_per_run": 0.5,
        "other_cores": 0.1,
    }


def one_round(delegated: float, alone: float, client: float) -> dict[str, Any]:
    figures = {
        "delegated": {**case(delegated, 2), "children": 60},
        "alone": case(alone, 1),
        "client": case(client, 2),
    }
    return {
        **figures,
        "ratio": (delegated / 2) / (client / 2),
        "child_ms": delegated - alone,
        "child_ratio": (delegated - alone) / (client / 2),
    }


def results(rounds: list[dict[str, Any]], first_p99: tuple[float, float]) -> dict[str, Any]:
    phase = {"messages": 40, "first_p50_ms": 20.0, "first_max_ms": 50.0, "run_p99_ms": 600.0}
    return {
        "host": [{"loop_ms": 27.0, "hop_us": 26.0}] * 2,
        "seconds": 300,
        "cost": {"rounds": rounds, "quiet_wait_s": 2.0},
        "starvation": {
            "b": {
                "phases": {
                    "1": {**phase, "first_p99_ms": first_p99[0], "run_p50_ms": 530.0},
                    "2": {**phase, "first_p99_ms": first_p99[1], "run_p50_ms": 540.0},
                },
                "errors": {},
            },
            "a": {"refused": {}, "took_s": 0.4, "runs": 1100, "succeeded": 900, "failed": 0},
            "server_cores": 0.9,
            "model_cores": 0.2,
            "other_cores": 0.3,
            "quiet_wait_s": 2.0,
        },
    }


def test_the_childs_share_is_the_pair_less_the_parent_alone() -> None:
    # A pair of 40 ms, its parent alone 25 ms: the child 15 ms, against a client-sent run
    # of 15 ms (a pair of 30): 1.00x, met; the per-run ratio is 20 / 15.
    rounds = [one_round(40.0, 25.0, 30.0), one_round(44.0, 25.0, 30.0), one_round(40.0, 27.0, 30.0)]
    text = render(results(rounds, (40.0, 60.0)), "python bench/delegation.py", FULL)
    assert "per run: **1.33**" in text
    assert "parent + child minus the parent alone: **15.00 ms**" in text
    assert "(the child's share at most 1x a client-sent run): met (1.00x)" in text
    assert "at most 2x its p99 with A idle: met (1.50x)" in text
    assert "the issue's 100 parents x 10 children, 1,100 runs" in text


def test_a_missed_goal_and_a_scaled_down_tree_say_so() -> None:
    rounds = [one_round(50.0, 25.0, 30.0)] * 3
    smaller = dataclasses.replace(FULL, parents=40)
    text = render(results(rounds, (40.0, 100.0)), "python bench/delegation.py", smaller)
    assert "client-sent run): **missed** (1.67x)" in text
    assert "idle: **missed** (2.50x)" in text
    assert "**scaled down** from the issue's 100 x 10 to 40 parents x 10 children" in text


def test_the_planner_asks_once_per_child_and_the_echoer_echoes() -> None:
    tools = [{"type": "function", "function": {"name": "ask_echoer"}}]
    body = {"messages": [{"role": "user", "content": asking(10)}], "tools": tools}
    reply = echo_reply(body)
    assert [call.name for call in reply.calls] == ["ask_echoer"] * 10
    assert CASES["delegated"].runs == 2
    assert CASES["alone"].text == 'call ask_echoer {"input": " "}'
