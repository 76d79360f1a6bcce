"""Merging the deltas ready together (``feed.merge_deltas`` for WatchRun,
``subscriptions.merge_deltas`` for Subscribe): consecutive text deltas of one run
become one update naming its range; a non-delta update, another run, a gap in the
sequences and the bounds end a merge; the shared updates are never changed."""

from __future__ import annotations

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.runs.core.active import feed
from switchboard.dispatcher.runs.reading.queries import _InOrder
from switchboard.events import subscriptions
from switchboard.platform.events import deltas
from switchboard.platform.events.eventlog import Logged

pytestmark = pytest.mark.unit

RUN = "workspaces/w/conversations/c/runs/r"


def _delta(sequence: int, text: str = "", run: str = RUN) -> pb.RunUpdate:
    update = pb.RunUpdate(run=run, sequence=sequence)
    update.delta.text = text or f"t{sequence} "
    update.time.FromNanoseconds(sequence * 1000)
    return update


def _state(sequence: int) -> pb.RunUpdate:
    update = pb.RunUpdate(run=RUN, sequence=sequence)
    update.state_change.run.state = pb.RUN_STATE_RUNNING
    return update


def _ranges(updates: list[pb.RunUpdate]) -> list[tuple[int, int]]:
    return [(u.first_sequence or u.sequence, u.sequence) for u in updates]


def test_consecutive_deltas_merge_between_the_other_updates() -> None:
    updates = [_state(1), _delta(2), _delta(3), _delta(4), _state(5), _delta(6), _delta(7)]
    before = [u.SerializeToString() for u in updates]

    merged = feed.merge_deltas(updates)

    assert _ranges(merged) == [(1, 1), (2, 4), (5, 5), (6, 7)]
    assert merged[1].delta.text == "t2 t3 t4 "
    assert merged[1].time == updates[3].time
    assert merged[1].run == RUN
    assert merged[0] is updates[0]
    assert [u.SerializeToString() for u in updates] == before


def test_a_delta_alone_is_itself_with_no_range() -> None:
    updates = [_state(1), _delta(2), _state(3)]
    merged = feed.merge_deltas(updates)
    assert all(a is b for a, b in zip(merged, updates, strict=True))
    assert merged[1].first_sequence == 0


def test_a_gap_is_never_hidden_in_a_merge() -> None:
    # Another replica's run: 3 and 6 were lost on the way; the logged 8 waited for them.
    order = _InOrder(2)
    for early in (4, 5, 7):
        assert order.take(_delta(early)) == []
    assert order.take(_state(8)) == []
    assert _ranges(feed.merge_deltas(order.flush())) == [(4, 5), (7, 7), (8, 8)]


def test_a_merge_stops_at_its_bounds() -> None:
    big = "x" * (deltas.MAX_MERGED_CHARS // 2)
    merged = feed.merge_deltas([_delta(1, big), _delta(2, big), _delta(3, "y")])
    assert _ranges(merged) == [(1, 2), (3, 3)]
    many = [_delta(s) for s in range(1, deltas.MAX_MERGED_UPDATES + 3)]
    assert _ranges(feed.merge_deltas(many)) == [
        (1, deltas.MAX_MERGED_UPDATES),
        (deltas.MAX_MERGED_UPDATES + 1, deltas.MAX_MERGED_UPDATES + 2),
    ]


def _event(position: tuple[int, ...], update: pb.RunUpdate) -> Logged:
    event = events_pb2.Event(id=f"e{position[-1]}", type=events_pb2.EVENT_TYPE_RUN_UPDATED)
    event.run_updated.update.CopyFrom(update)
    return Logged(position, event)


def test_subscribe_merges_consecutive_deltas_of_one_run_keeping_the_last_id_and_cursor() -> None:
    other = "workspaces/w/conversations/c/runs/other"
    items = [
        _event((1, 0), _state(1)),
        _event((1, 0, 1), _delta(2)),
        _event((1, 0, 2), _delta(3)),
        _event((1, 0, 3), _delta(4, run=other)),
        _event((1, 0, 4), _delta(4)),
        _event((1, 0, 5), _delta(6)),  # 5 is missing: not hidden
    ]
    before = [item.data for item in items]

    merged = subscriptions.merge_deltas(items)

    assert [item.event.id for item in merged] == ["e0", "e2", "e3", "e4", "e5"]
    assert [item.cursor for item in merged] == [
        items[0].cursor,
        items[2].cursor,
        items[3].cursor,
        items[4].cursor,
        items[5].cursor,
    ]
    joined = events_pb2.Event.FromString(merged[1].data).run_updated.update
    assert (joined.first_sequence, joined.sequence, joined.delta.text) == (2, 3, "t2 t3 ")
    assert merged[1].event.cursor == items[2].cursor
    assert merged[2] is items[3]
    assert [item.data for item in items] == before
