"""Budgets across hops, the formats: the ``x-switchboard-budget`` metadata and the budget
extension's object both ways (dispatcher/handlers/handed.py), the usage an A2A agent reports
(integration/kinds/a2a.py ``usage_of`` and the relay), the front door's reading of the
extension and its report of an ended task's usage (a2a/mapping.py), and how a hop splits
what is left of a total-token cap (spending.py ``_rest``)."""

from __future__ import annotations

from typing import Any

import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format

from switchboard.a2a import mapping
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.budgets.ledger import Amount
from switchboard.dispatcher.budgets.spending import _rest
from switchboard.dispatcher.handlers.handed import (
    BUDGET_EXTENSION,
    HEADER,
    MAX_VALUE,
    Handed,
    extension_value,
    header_value,
    parse_extension,
    parse_header,
)
from switchboard.integration.kinds.a2a import _Relay, usage_of
from switchboard.platform.errors import InvalidArgument

pytestmark = pytest.mark.unit


def test_the_header_names_only_the_caps_that_apply_in_order_and_reads_back() -> None:
    handed = Handed(cost_micros=1500, total_tokens=9000)
    assert header_value(handed) == "cost_micros=1500;total_tokens=9000"
    assert parse_header(header_value(handed)) == handed
    every = Handed(1, 2, 3, 4)
    assert header_value(every) == "cost_micros=1;input_tokens=2;output_tokens=3;total_tokens=4"
    assert parse_header(" output_tokens = 7 ; ") == Handed(output_tokens=7)
    assert parse_header("cost_micros=0") == Handed(cost_micros=0)
    assert Handed(cost_micros=0).empty()
    assert not Handed(cost_micros=1, input_tokens=5).empty()
    assert not Handed()


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("", HEADER),
        ("cost_micros", HEADER),
        ("dollars=5", HEADER),
        ("cost_micros=-1", f"{HEADER}.cost_micros"),
        ("cost_micros=1.5", f"{HEADER}.cost_micros"),
        ("cost_micros=٣", f"{HEADER}.cost_micros"),  # a digit, but not an ASCII one
        (f"cost_micros={MAX_VALUE + 1}", f"{HEADER}.cost_micros"),
        ("cost_micros=1;cost_micros=2", f"{HEADER}.cost_micros"),
        ("cost_micros=1;" * 40, HEADER),
    ],
)
def test_a_malformed_header_is_invalid_argument_naming_the_field(value: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_header(value)
    assert [v.field for v in caught.value.violations] == [field]


def test_the_extension_object_reads_back_and_is_checked() -> None:
    handed = Handed(cost_micros=2000, input_tokens=100)
    value = extension_value(handed)
    assert value == {"cost_micros": 2000, "input_tokens": 100}
    # Through a Struct, as it travels: numbers become doubles.
    struct = a2a.Message().metadata
    struct.update({BUDGET_EXTENSION: value})
    travelled = json_format.MessageToDict(struct)[BUDGET_EXTENSION]
    assert parse_extension(travelled, "m") == handed
    for bad, field in [
        ([1], "m"),
        ({}, "m"),
        ({"cost": 1}, "m"),
        ({"cost_micros": -1.0}, "m.cost_micros"),
        ({"cost_micros": 0.5}, "m.cost_micros"),
        ({"cost_micros": True}, "m.cost_micros"),
        ({"cost_micros": None}, "m.cost_micros"),
        ({"cost_micros": float("inf")}, "m.cost_micros"),
        ({"cost_micros": 1e300}, "m.cost_micros"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            parse_extension(bad, "m")
        assert [v.field for v in caught.value.violations] == [field], bad


def test_the_front_door_reads_the_extension_from_the_message_metadata() -> None:
    message = a2a.Message(message_id="m1", role=a2a.ROLE_USER, parts=[a2a.Part(text="hi")])
    assert mapping.handed_in(message) is None
    message.metadata.update({BUDGET_EXTENSION: {"cost_micros": 300, "total_tokens": 50}})
    assert mapping.handed_in(message) == Handed(cost_micros=300, total_tokens=50)
    message.metadata.update({BUDGET_EXTENSION: {"cost_micros": -3}})
    with pytest.raises(InvalidArgument) as caught:
        mapping.handed_in(message)
    assert [v.field for v in caught.value.violations] == [
        f"message.metadata[{BUDGET_EXTENSION!r}].cost_micros"
    ]


def _run(state: int, **usage: Any) -> pb.Run:
    run = pb.Run(name="workspaces/w1/conversations/c1/runs/r1", state=state)  # type: ignore[arg-type]
    for name, value in usage.items():
        setattr(run.usage, name, value)
    return run


def test_an_ended_task_reports_its_usage_and_a_running_one_does_not() -> None:
    ended = _run(pb.RUN_STATE_SUCCEEDED, input_tokens=12, output_tokens=30, cost_micros=72)
    task = mapping.task(ended, "", "answer")
    report = {"input_tokens": 12, "output_tokens": 30, "cost_micros": 72}
    assert json_format.MessageToDict(task.metadata)["usage"] == report
    event = mapping.status_event(ended, (4, 1))
    assert json_format.MessageToDict(event.status_update.metadata)["usage"] == report
    running = _run(pb.RUN_STATE_RUNNING, input_tokens=12)
    assert "usage" not in mapping.task(running, "", None).metadata.fields
    # What the front door reports, the caller reads.
    reported = usage_of(json_format.MessageToDict(task.metadata))
    assert (reported.input_tokens, reported.output_tokens, reported.cost_micros) == (12, 30, 72)


def test_usage_is_read_from_the_standard_places_and_bounded() -> None:
    def read(metadata: dict[str, Any]) -> tuple[int, int, int]:
        usage = usage_of(metadata)
        return usage.input_tokens, usage.output_tokens, usage.cost_micros

    assert read({}) == (0, 0, 0)
    assert read({"usage": {"input_tokens": 3, "output_tokens": 4, "cost_micros": 5}}) == (3, 4, 5)
    assert read({"usage": {"prompt_tokens": 3.0, "completion_tokens": 4}}) == (3, 4, 0)
    assert read({BUDGET_EXTENSION: {"usage": {"cost_micros": 9}}}) == (0, 0, 9)
    assert read({"usage": {"input_tokens": -1, "output_tokens": "7", "cost_micros": 1e30}}) == (
        0,
        0,
        0,
    )
    assert read({"usage": {"input_tokens": 2**40}}) == (0, 0, 0)  # beyond int32 tokens
    assert read({"usage": "lots"}) == (0, 0, 0)


def test_the_relay_charges_the_last_usage_the_task_reported() -> None:
    relay = _Relay()
    working = a2a.StreamResponse(
        status_update=a2a.TaskStatusUpdateEvent(
            task_id="t1", context_id="c1", status=a2a.TaskStatus(state=a2a.TASK_STATE_WORKING)
        )
    )
    working.status_update.metadata.update({"usage": {"cost_micros": 10}})
    done = a2a.StreamResponse(
        task=a2a.Task(
            id="t1",
            context_id="c1",
            status=a2a.TaskStatus(state=a2a.TASK_STATE_COMPLETED),
            artifacts=[a2a.Artifact(artifact_id="a", parts=[a2a.Part(text="ok")])],
        )
    )
    done.task.metadata.update({"usage": {"input_tokens": 5, "output_tokens": 6, "cost_micros": 40}})
    relay.take(working)
    relay.take(done)
    result = relay.result("agent")
    assert (result.usage.input_tokens, result.usage.output_tokens) == (5, 6)
    assert result.usage.cost_micros == 40
    assert result.usage.estimated_cost_usd == pytest.approx(40e-6)


def test_a_hop_holds_all_that_is_left_within_a_total_cap() -> None:
    assert _rest({"cost_micros": 700}) == Amount(700, 0, 0)
    assert _rest({"total_tokens": 90}) == Amount(0, 90, 0)
    assert _rest({"input_tokens": 30, "total_tokens": 90}) == Amount(0, 30, 60)
    assert _rest({"output_tokens": 30, "total_tokens": 90}) == Amount(0, 60, 30)
    assert _rest({"input_tokens": 80, "output_tokens": 80, "total_tokens": 90}) == Amount(0, 10, 80)
    assert _rest({"input_tokens": 5, "output_tokens": 6}) == Amount(0, 5, 6)
