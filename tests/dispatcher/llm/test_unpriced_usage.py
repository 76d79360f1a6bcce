"""Unpriced model calls are counted, not inferred from a zero cost (issue 67 follow-up):
the llm handler's tally, a run's usage summed over its journaled attempts, and the
usage an A2A task reports back to the run that called it (docs/budgets.md, "Usage")."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from switchboard.a2a import mapping
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.llm.usage import Price, Tally, estimate_tokens
from switchboard.dispatcher.tools.journal import add_usage
from switchboard.integration.kinds.a2a import usage_of

pytestmark = pytest.mark.unit


def call(tally: Tally, price: Price | None, tokens: tuple[int, int] = (1000, 500)) -> int:
    """One reported model call at ``price``; its cost."""
    return tally.add(reported=tokens, price=price, messages=(), tools=None, text="", calls=())[2]


def test_a_call_priced_at_0_is_free_and_a_call_without_a_price_is_unpriced() -> None:
    tally = Tally(estimate_tokens)
    assert call(tally, Price(0, 0)) == 0
    assert tally.usage("p/free").unpriced_calls == 0
    assert call(tally, None) == 0
    assert call(tally, Price(1.0, 2.0)) == 2000
    assert call(tally, None) == 0
    usage = tally.usage("p/mixed")
    # A mix: the priced call's cost, and the two calls it leaves out.
    assert (usage.cost_micros, usage.unpriced_calls) == (2000, 2)
    assert (usage.input_tokens, usage.output_tokens) == (4000, 2000)


def test_a_runs_attempts_add_their_unpriced_calls() -> None:
    total = hpb.Usage(model="p/m", cost_micros=5, unpriced_calls=1)
    add_usage(total, hpb.Usage(cost_micros=7, unpriced_calls=2))
    add_usage(total, hpb.Usage(cost_micros=1))
    assert (total.cost_micros, total.unpriced_calls) == (13, 3)


def test_an_a2a_task_reports_its_unpriced_calls_to_its_caller() -> None:
    run = pb.Run(name="workspaces/w1/conversations/c1/runs/r1", state=pb.RUN_STATE_SUCCEEDED)
    run.usage.MergeFrom(hpb.Usage(input_tokens=12, output_tokens=30, unpriced_calls=2))
    task = mapping.task(run, "", "answer")
    reported = json_format.MessageToDict(task.metadata)
    assert reported["usage"] == {
        "input_tokens": 12,
        "output_tokens": 30,
        "cost_micros": 0,
        "unpriced_calls": 2,
    }
    read = usage_of(reported)
    assert (read.input_tokens, read.cost_micros, read.unpriced_calls) == (12, 0, 2)
    # A run of a free model reports none, and reads as priced.
    run.usage.unpriced_calls = 0
    free = json_format.MessageToDict(mapping.task(run, "", "answer").metadata)
    assert "unpriced_calls" not in free["usage"]
    assert usage_of(free).unpriced_calls == 0
    # What is not a count is left out, as for the other fields.
    assert usage_of({"usage": {"unpriced_calls": -1}}).unpriced_calls == 0
    assert usage_of({"usage": {"unpriced_calls": "2"}}).unpriced_calls == 0
