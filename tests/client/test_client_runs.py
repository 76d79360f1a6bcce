"""switchboard.client.runs: a run's answer assembled from its updates."""

from __future__ import annotations

import pytest

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.client.runs import ATTEMPT_BITS, AnswerBuilder, is_terminal, missing

pytestmark = pytest.mark.unit


def _state(sequence: int, state: int) -> pb.RunUpdate:
    update = pb.RunUpdate(run="r", sequence=sequence)
    update.state_change.run.state = state  # type: ignore[assignment]
    return update


def _delta(sequence: int, text: str) -> pb.RunUpdate:
    return pb.RunUpdate(run="r", sequence=sequence, delta=handler_pb2.TextDelta(text=text))


def _result(sequence: int, text: str) -> pb.RunUpdate:
    return pb.RunUpdate(
        run="r",
        sequence=sequence,
        result=handler_pb2.HandleResult(parts=[context_pb2.ContentPart(text=text)]),
    )


def _half_an_answer() -> list[pb.RunUpdate]:
    """A run queued, started, and half an answer in: what a restart cuts short."""
    return [
        _state(1, pb.RUN_STATE_QUEUED),
        _state(2, pb.RUN_STATE_RUNNING),
        _delta(3, "half an ans"),
    ]


def test_deltas_join_until_the_result_which_wins() -> None:
    builder = AnswerBuilder()
    for update in [
        _state(1, pb.RUN_STATE_QUEUED),
        _state(2, pb.RUN_STATE_RUNNING),
        _delta(3, "hello"),
        _delta(4, " there"),
    ]:
        builder.add(update)
    assert builder.text == "hello there"
    builder.add(_result(5, "hello there, in full"))
    builder.add(_state(6, pb.RUN_STATE_SUCCEEDED))
    assert builder.text == "hello there, in full"
    assert builder.run is not None
    assert builder.run.state == pb.RUN_STATE_SUCCEEDED


def test_a_requeued_run_starts_its_answer_over() -> None:
    builder = AnswerBuilder()
    block = 2**32
    for update in [
        *_half_an_answer(),
        _state(block + 1, pb.RUN_STATE_QUEUED),  # recovered with `requeue`
        _state(block + 2, pb.RUN_STATE_RUNNING),
        _delta(block + 3, "a whole answer"),
    ]:
        builder.add(update)
    assert builder.text == "a whole answer"


def test_a_watch_resumed_after_a_restart_starts_over_at_the_newer_block() -> None:
    """A watcher that resumes on the restarted server gets the run as it stands (a
    RUNNING snapshot in the new block), not the QUEUED change the new attempt began with."""
    builder = AnswerBuilder()
    block = 2**32
    for update in [
        *_half_an_answer(),
        _state(block, pb.RUN_STATE_RUNNING),  # the snapshot
        _delta(block + 1, "a whole answer"),
    ]:
        builder.add(update)
    assert builder.text == "a whole answer"


def test_only_a_final_state_change_ends_a_run() -> None:
    assert is_terminal(_state(9, pb.RUN_STATE_FAILED))
    assert is_terminal(_state(9, pb.RUN_STATE_SUCCEEDED))
    assert not is_terminal(_state(9, pb.RUN_STATE_REQUIRES_ACTION))
    assert not is_terminal(_state(9, pb.RUN_STATE_RUNNING))
    assert not is_terminal(_delta(9, "x"))


def _merged(first: int, last: int, text: str) -> pb.RunUpdate:
    update = _delta(last, text)
    update.first_sequence = first
    return update


def test_merged_deltas_follow_and_a_real_gap_is_still_seen() -> None:
    updates = [
        _state(1, pb.RUN_STATE_QUEUED),
        _state(2, pb.RUN_STATE_RUNNING),
        _merged(3, 6, "three words here"),
        _delta(7, " and"),
        _merged(8, 9, " more"),
    ]
    last, builder = 0, AnswerBuilder()
    for update in updates:
        assert missing(last, update) == 0
        builder.add(update)
        last = update.sequence
    assert builder.text == "three words here and more"
    # Sequences 10 and 11 never came: one by one or merged, the gap is counted.
    assert missing(9, _delta(12, "!")) == 2
    assert missing(9, _merged(12, 14, "!")) == 2
    # A merged delta covering what was seen (first_sequence right after it) is no gap,
    # a snapshot state change stands for what it skips, a newer attempt numbers anew.
    assert missing(9, _merged(10, 20, "x")) == 0
    assert missing(9, _state(30, pb.RUN_STATE_RUNNING)) == 0
    assert missing(9, _delta((1 << ATTEMPT_BITS) + 5, "x")) == 0


def test_a_queued_behind_update_changes_what_the_run_says_it_waits_behind() -> None:
    builder = AnswerBuilder()
    builder.add(_state(1, pb.RUN_STATE_QUEUED))
    assert builder.run is not None
    assert not builder.run.HasField("queued_behind")
    waiting = pb.RunUpdate(run="r", sequence=2)
    waiting.queued_behind.run = "workspaces/w/conversations/c/runs/ahead"
    waiting.queued_behind.state = pb.RUN_STATE_REQUIRES_ACTION
    waiting.queued_behind.reason = "waiting for a person's approval of 1 tool call"
    builder.add(waiting)
    assert builder.run.queued_behind.run == "workspaces/w/conversations/c/runs/ahead"
    assert builder.run.queued_behind.state == pb.RUN_STATE_REQUIRES_ACTION
    # An empty note: it waits behind nothing now.
    builder.add(pb.RunUpdate(run="r", sequence=3, queued_behind=pb.QueuedBehind()))
    assert not builder.run.HasField("queued_behind")
    builder.add(_state(4, pb.RUN_STATE_RUNNING))
    assert builder.run.state == pb.RUN_STATE_RUNNING
