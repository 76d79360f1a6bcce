package switchboard

import (
	"fmt"
	"testing"

	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	eventsv1 "switchboard.dev/go/gen/switchboard/api/events/v1"
	handlerv1 "switchboard.dev/go/gen/switchboard/api/handler/v1"
)

func event(id, cursor string) *eventsv1.Event { return &eventsv1.Event{Id: id, Cursor: cursor} }

func TestTrackerMovesToEachHandledEventAndEachFrameCursor(t *testing.T) {
	tracker := newCursorTracker("5-0", 8)
	if tracker.advance("5-0") {
		t.Error("the same cursor is not a move")
	}
	first := event("a", "6-0")
	if !tracker.fresh(first) {
		t.Fatal("a new event is not fresh")
	}
	tracker.delivered(first)
	if tracker.cursor != "6-0" {
		t.Errorf("cursor %q after an event at 6-0", tracker.cursor)
	}
	if !tracker.advance("9-0") || tracker.cursor != "9-0" {
		t.Errorf("a heartbeat cursor does not move the position: %q", tracker.cursor)
	}
	if tracker.advance("") || tracker.cursor != "9-0" {
		t.Error("an empty cursor moved the position")
	}
}

func TestTrackerDropsEventsItDeliveredAndForgetsOnlyBeyondItsWindow(t *testing.T) {
	tracker := newCursorTracker("", 3)
	for i := range 3 {
		tracker.delivered(event(fmt.Sprint(i), fmt.Sprint(i)))
	}
	for i := range 3 {
		if tracker.fresh(event(fmt.Sprint(i), "")) {
			t.Errorf("event %d delivered twice", i)
		}
	}
	tracker.delivered(event("3", "3"))
	if !tracker.fresh(event("0", "")) {
		t.Error("the window keeps more ids than it should (unbounded memory)")
	}
	if tracker.fresh(event("3", "")) || tracker.fresh(event("1", "")) {
		t.Error("a recent id was forgotten")
	}
}

func deltaEvent(id string, run string, first, last int64) *eventsv1.Event {
	update := &dispatcherv1.RunUpdate{Run: run, Sequence: last, FirstSequence: first,
		Update: &dispatcherv1.RunUpdate_Delta{Delta: &handlerv1.TextDelta{Text: id}}}
	return &eventsv1.Event{Id: id, Cursor: id, Type: eventsv1.EventType_EVENT_TYPE_RUN_UPDATED,
		Payload: &eventsv1.Event_RunUpdated{RunUpdated: &eventsv1.RunUpdated{Update: update}}}
}

func TestTrackerDropsDeltasAMergedOneAlreadyCovered(t *testing.T) {
	tracker := newCursorTracker("", 8)
	tracker.delivered(deltaEvent("e5", "r", 3, 5))
	// Resumed on another replica: the deltas come again one by one, under ids
	// this follower never saw (e5 stood for 3, 4 and 5).
	for _, sequence := range []int64{3, 4, 5} {
		if tracker.fresh(deltaEvent(fmt.Sprint("again", sequence), "r", 0, sequence)) {
			t.Errorf("delta %d delivered twice", sequence)
		}
	}
	if !tracker.fresh(deltaEvent("e6", "r", 0, 6)) || !tracker.fresh(deltaEvent("o4", "other", 0, 4)) {
		t.Error("a new delta, or another run's, was dropped")
	}
}
