"""A run's update stamps never go backwards, whoever stamps them and whatever the clock does."""

from __future__ import annotations

import time

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher import mapping
from switchboard.dispatcher.runs.core.active.feed import Feed

pytestmark = pytest.mark.unit

RUN = "workspaces/acme/conversations/c1/runs/r1"
SECOND = 1_000_000_000


def _clock(monkeypatch: pytest.MonkeyPatch, readings: list[int]) -> None:
    """The wall clock reads ``readings`` in turn (ns since the epoch)."""
    it = iter(readings)
    monkeypatch.setattr(time, "time_ns", lambda: next(it))


def test_a_wall_clock_stepping_back_does_not_stamp_an_update_before_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clock(monkeypatch, [100 * SECOND, 99 * SECOND, 101 * SECOND])
    feed = Feed(RUN, max_updates=10)
    stamps = [feed.append(pb.RunUpdate()).time.ToNanoseconds() for _ in range(3)]
    assert stamps == [100 * SECOND, 100 * SECOND, 101 * SECOND]


def test_a_run_taken_over_is_stamped_after_its_stored_state_on_a_clock_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clock(monkeypatch, [50 * SECOND, 200 * SECOND])
    feed = Feed(RUN, max_updates=10, first=5, not_before_ns=60 * SECOND)
    first, second = feed.append(pb.RunUpdate()), feed.append(pb.RunUpdate())
    assert (first.sequence, first.time.ToNanoseconds()) == (5, 60 * SECOND)
    assert (second.sequence, second.time.ToNanoseconds()) == (6, 200 * SECOND)


def test_a_snapshot_is_stamped_when_the_run_reached_its_state_not_when_it_was_read() -> None:
    run = pb.Run(name=RUN, state=pb.RUN_STATE_RUNNING, last_sequence=2)
    run.create_time.FromNanoseconds(10 * SECOND)
    run.start_time.FromNanoseconds(11 * SECOND)
    assert mapping.snapshot(run).time.ToNanoseconds() == 11 * SECOND
    run.end_time.FromNanoseconds(12 * SECOND)
    assert mapping.snapshot(run).time.ToNanoseconds() == 12 * SECOND
    # Never after the update the watcher is sent next.
    assert mapping.snapshot(run, not_after_ns=11 * SECOND + 5).time.ToNanoseconds() == (
        11 * SECOND + 5
    )
