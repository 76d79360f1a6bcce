package switchboard

import (
	"fmt"
	"testing"

	eventsv1 "switchboard.dev/go/gen/switchboard/api/events/v1"
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
