package switchboard

import (
	"testing"

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	handlerv1 "switchboard.dev/go/gen/switchboard/api/handler/v1"
)

func stateChange(sequence int64, state dispatcherv1.RunState) *dispatcherv1.RunUpdate {
	return &dispatcherv1.RunUpdate{Sequence: sequence, Update: &dispatcherv1.RunUpdate_StateChange{
		StateChange: &dispatcherv1.RunStateChange{Run: &dispatcherv1.Run{State: state}},
	}}
}

func delta(sequence int64, text string) *dispatcherv1.RunUpdate {
	return &dispatcherv1.RunUpdate{Sequence: sequence, Update: &dispatcherv1.RunUpdate_Delta{
		Delta: &handlerv1.TextDelta{Text: text},
	}}
}

func result(sequence int64, text string) *dispatcherv1.RunUpdate {
	return &dispatcherv1.RunUpdate{Sequence: sequence, Update: &dispatcherv1.RunUpdate_Result{
		Result: &handlerv1.HandleResult{Parts: []*contextv1.ContentPart{{Part: &contextv1.ContentPart_Text{Text: text}}}},
	}}
}

const block = int64(1) << 32

func TestTranscriptJoinsDeltasThenTakesTheResult(t *testing.T) {
	var tr Transcript
	tr.Add(stateChange(1, dispatcherv1.RunState_RUN_STATE_QUEUED))
	tr.Add(stateChange(2, dispatcherv1.RunState_RUN_STATE_RUNNING))
	tr.Add(delta(3, "hello"))
	tr.Add(delta(4, " there"))
	if tr.Text() != "hello there" {
		t.Errorf("text %q", tr.Text())
	}
	tr.Add(result(5, "hello there!"))
	tr.Add(stateChange(6, dispatcherv1.RunState_RUN_STATE_SUCCEEDED))
	if tr.Text() != "hello there!" || tr.Run.GetState() != dispatcherv1.RunState_RUN_STATE_SUCCEEDED {
		t.Errorf("text %q state %v", tr.Text(), tr.Run.GetState())
	}
}

func TestTranscriptStartsOverWhenARequeuedRunRunsAgain(t *testing.T) {
	var tr Transcript
	tr.Add(stateChange(1, dispatcherv1.RunState_RUN_STATE_RUNNING))
	tr.Add(delta(2, "half an ans"))
	// Requeued after a restart: the new attempt numbers from the next block.
	tr.Add(stateChange(block+1, dispatcherv1.RunState_RUN_STATE_QUEUED))
	if tr.Text() != "" {
		t.Errorf("the stopped attempt's text survived a requeue: %q", tr.Text())
	}
	tr.Add(stateChange(block+2, dispatcherv1.RunState_RUN_STATE_RUNNING))
	tr.Add(delta(block+3, "a whole answer"))
	if tr.Text() != "a whole answer" {
		t.Errorf("text %q", tr.Text())
	}
}

func TestTranscriptNeverSplicesAttemptsEvenIfTheRequeueWasMissed(t *testing.T) {
	var tr Transcript
	tr.Add(delta(2, "old"))
	// Resumed from a snapshot: the QUEUED change of the new attempt was not seen.
	tr.Add(stateChange(block+2, dispatcherv1.RunState_RUN_STATE_RUNNING))
	if tr.Text() != "old" {
		t.Errorf("a state change alone dropped the partial answer: %q", tr.Text())
	}
	tr.Add(delta(block+3, "new"))
	if tr.Text() != "new" {
		t.Errorf("text %q spliced from two attempts", tr.Text())
	}
}

func TestTerminalStates(t *testing.T) {
	for state, want := range map[dispatcherv1.RunState]bool{
		dispatcherv1.RunState_RUN_STATE_QUEUED:            false,
		dispatcherv1.RunState_RUN_STATE_RUNNING:           false,
		dispatcherv1.RunState_RUN_STATE_REQUIRES_ACTION:   false,
		dispatcherv1.RunState_RUN_STATE_SUCCEEDED:         true,
		dispatcherv1.RunState_RUN_STATE_FAILED:            true,
		dispatcherv1.RunState_RUN_STATE_CANCELLED:         true,
		dispatcherv1.RunState_RUN_STATE_DEADLINE_EXCEEDED: true,
	} {
		if Terminal(state) != want {
			t.Errorf("Terminal(%v) = %v", state, !want)
		}
	}
}

func merged(first, last int64, text string) *dispatcherv1.RunUpdate {
	update := delta(last, text)
	update.FirstSequence = first
	return update
}

func TestMergedDeltasFollowAndARealGapIsStillSeen(t *testing.T) {
	var tr Transcript
	last := int64(0)
	for _, update := range []*dispatcherv1.RunUpdate{
		stateChange(1, dispatcherv1.RunState_RUN_STATE_QUEUED),
		stateChange(2, dispatcherv1.RunState_RUN_STATE_RUNNING),
		merged(3, 6, "three words here"),
		delta(7, " and"),
		merged(8, 9, " more"),
	} {
		if missing := Missing(last, update); missing != 0 {
			t.Errorf("update %d after %d: %d missing", update.GetSequence(), last, missing)
		}
		tr.Add(update)
		last = update.GetSequence()
	}
	if tr.Text() != "three words here and more" {
		t.Errorf("text %q", tr.Text())
	}
	if FirstSequence(merged(3, 6, "")) != 3 || FirstSequence(delta(7, "")) != 7 {
		t.Error("FirstSequence does not read first_sequence")
	}
	// 10 and 11 never came: one by one or merged, the gap is seen.
	if Missing(9, delta(12, "!")) != 2 || Missing(9, merged(12, 14, "!")) != 2 {
		t.Error("a gap before an update was not seen")
	}
	// A snapshot stands for what it skips; a newer attempt numbers anew.
	if Missing(9, stateChange(30, dispatcherv1.RunState_RUN_STATE_RUNNING)) != 0 || Missing(9, delta(block+5, "x")) != 0 {
		t.Error("a snapshot or a newer attempt counted as a gap")
	}
}
