"""switchboard.client.events: where a follower stands, from the frames it received."""

from __future__ import annotations

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.client.events import CursorTracker, event_type, scope

pytestmark = pytest.mark.unit


def _event(n: int, event_id: str | None = None) -> events_pb2.Event:
    return events_pb2.Event(
        id=event_id if event_id is not None else f"e{n}",
        cursor=f"{n}-0",
        type=events_pb2.EVENT_TYPE_MESSAGE_CREATED,
    )


def _batch(events: list[events_pb2.Event], cursor: str) -> events_pb2.SubscribeResponse:
    return events_pb2.SubscribeResponse(batch=events_pb2.EventBatch(events=events, cursor=cursor))


def _heartbeat(cursor: str) -> events_pb2.SubscribeResponse:
    return events_pb2.SubscribeResponse(heartbeat=events_pb2.Heartbeat(cursor=cursor))


def test_the_cursor_moves_only_as_events_are_handed_out() -> None:
    tracker = CursorTracker("3-0")
    deliveries = tracker.accept(_batch([_event(4), _event(6), _event(7)], cursor="9-0"))
    assert [d.event.id for d in deliveries] == ["e4", "e6", "e7"]
    assert tracker.cursor == "3-0"  # received is not handed out
    tracker.delivered(deliveries[0])
    assert tracker.cursor == "4-0"
    tracker.delivered(deliveries[1])
    assert tracker.cursor == "6-0"
    # The last of a batch moves to the batch's cursor: positions 8 and 9 were
    # other scopes' or types', and resuming needs not scan them again.
    tracker.delivered(deliveries[2])
    assert tracker.cursor == "9-0"


def test_heartbeats_and_empty_batches_move_the_cursor_at_once() -> None:
    tracker = CursorTracker()
    assert tracker.accept(_heartbeat("12-0")) == []
    assert tracker.cursor == "12-0"
    assert tracker.accept(_batch([], cursor="15-0")) == []
    assert tracker.cursor == "15-0"
    # A heartbeat without a cursor (none known yet) keeps the position.
    tracker.accept(_heartbeat(""))
    assert tracker.cursor == "15-0"


def test_a_republished_event_is_not_handed_out_twice() -> None:
    tracker = CursorTracker()
    for delivery in tracker.accept(_batch([_event(1), _event(2)], cursor="2-0")):
        tracker.delivered(delivery)
    # The same event ids again at later positions (republished after a crash).
    again = tracker.accept(_batch([_event(2, "e1"), _event(3)], cursor="3-0"))
    assert [d.event.id for d in again] == ["e3"]
    assert tracker.duplicates == 1
    tracker.delivered(again[0])
    assert tracker.cursor == "3-0"
    # A batch of nothing but duplicates still moves the position past them.
    assert tracker.accept(_batch([_event(4, "e3")], cursor="4-0")) == []
    assert tracker.cursor == "4-0"


def test_the_dedupe_memory_is_bounded() -> None:
    tracker = CursorTracker(dedupe_window=3)
    for n in range(1, 6):
        for delivery in tracker.accept(_batch([_event(n)], cursor=f"{n}-0")):
            tracker.delivered(delivery)
    # e1 and e2 fell out of the window; e5 is still remembered.
    assert [d.event.id for d in tracker.accept(_batch([_event(6, "e1")], cursor="6-0"))] == ["e1"]
    assert tracker.accept(_batch([_event(7, "e5")], cursor="7-0")) == []


def test_events_without_an_id_are_always_handed_out() -> None:
    tracker = CursorTracker()
    deliveries = tracker.accept(_batch([_event(1, ""), _event(2, "")], cursor="2-0"))
    assert len(deliveries) == 2


def test_scopes_from_resource_names() -> None:
    assert scope("users/u1") == events_pb2.Scope(user="users/u1")
    assert scope("workspaces/acme") == events_pb2.Scope(workspace="workspaces/acme")
    assert scope("workspaces/acme/conversations/c1") == events_pb2.Scope(
        conversation="workspaces/acme/conversations/c1"
    )
    given = events_pb2.Scope(workspace="workspaces/x")
    assert scope(given) is given
    for wrong in ["acme", "workspaces/", "workspaces/a/runs/r", "users/u/sessions/s", ""]:
        with pytest.raises(ValueError, match="not a user, workspace or conversation"):
            scope(wrong)


def test_event_types_by_number_or_name() -> None:
    created = events_pb2.EVENT_TYPE_MESSAGE_CREATED
    assert event_type(created) == created
    assert event_type("MESSAGE_CREATED") == created
    assert event_type("EVENT_TYPE_MESSAGE_CREATED") == created
    with pytest.raises(ValueError, match="NOPE"):
        event_type("NOPE")


def _delta_event(n: int, first: int, last: int, run: str = "r") -> events_pb2.Event:
    update = dispatcher_pb2.RunUpdate(run=run, sequence=last, first_sequence=first)
    update.delta.text = f"{first}-{last} "
    return events_pb2.Event(
        id=f"e{n}",
        cursor=f"1-0-{n}",
        type=events_pb2.EVENT_TYPE_RUN_UPDATED,
        run_updated=events_pb2.RunUpdated(update=update),
    )


def test_deltas_delivered_merged_are_not_delivered_again_one_by_one() -> None:
    tracker = CursorTracker()
    for delivery in tracker.accept(_batch([_delta_event(5, 3, 5)], cursor="1-0-5")):
        tracker.delivered(delivery)
    # Resumed on another replica: the deltas after the cursor's logged event come
    # again one by one, with ids this follower never saw (5's stood for 3 and 4).
    again = [_delta_event(n, 0, n) for n in (3, 4, 5, 6)]
    again.append(_delta_event(7, 0, 4, run="other"))
    delivered = tracker.accept(_batch(again, cursor="1-0-7"))
    assert [d.event.id for d in delivered] == ["e6", "e7"]
    assert tracker.duplicates == 3
