package switchboard

import (
	"context"
	"errors"
	"io"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	commonv1 "switchboard.dev/go/gen/switchboard/api/common/v1"
	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
)

// Terminal reports whether a run in this state is over for good.
func Terminal(state dispatcherv1.RunState) bool {
	switch state {
	case dispatcherv1.RunState_RUN_STATE_SUCCEEDED, dispatcherv1.RunState_RUN_STATE_FAILED,
		dispatcherv1.RunState_RUN_STATE_CANCELLED, dispatcherv1.RunState_RUN_STATE_DEADLINE_EXCEEDED:
		return true
	}
	return false
}

// SendMessage stores a user message and starts a run. A request without a
// request_id gets one, so that the call can be retried after a transient
// failure without starting a second run: the server answers a repeated id
// with the first run.
func (c *Client) SendMessage(ctx context.Context, req *dispatcherv1.SendMessageRequest) (*dispatcherv1.SendMessageResponse, error) {
	req = keyed(req)
	var response *dispatcherv1.SendMessageResponse
	err := c.Retry(ctx, func(ctx context.Context) error {
		var err error
		response, err = c.Dispatcher.SendMessage(ctx, req)
		return err
	})
	return response, err
}

// SteerRun hands a user message to a run that is going (QUEUED, RUNNING or
// REQUIRES_ACTION) without cancelling it. The answer is the stored message and
// the steer's own run, QUEUED with Run.Steer.State ACCEPTED: watch that run
// (WatchRun) to learn what became of the message. It ends SUCCEEDED with
// STEER_STATE_CONSUMED (and the Step whose model call first saw it) once the
// target took it before a model call; if the target ended first it is
// REQUEUED, and runs and answers the message itself. A steer is never lost
// and never answered twice. A run that has already ended is refused with
// FAILED_PRECONDITION, reason ERROR_REASON_RUN_ENDED, and nothing is stored.
//
// As for SendMessage, a request without a request_id gets one and transient
// failures are retried with it: the server answers a repeated id with the
// first steer, so a retry never steers twice.
func (c *Client) SteerRun(ctx context.Context, req *dispatcherv1.SteerRunRequest) (*dispatcherv1.SteerRunResponse, error) {
	req = keyed(req)
	var response *dispatcherv1.SteerRunResponse
	err := c.Retry(ctx, func(ctx context.Context) error {
		var err error
		response, err = c.Dispatcher.SteerRun(ctx, req)
		return err
	})
	return response, err
}

// keyed is req with an idempotency key: req itself when its request_id is set,
// else a copy with a new one (the caller's request is never changed).
func keyed[R proto.Message](req R) R {
	message := req.ProtoReflect()
	field := message.Descriptor().Fields().ByName("request_id")
	if message.Get(field).String() != "" {
		return req
	}
	clone := proto.Clone(req).(R)
	clone.ProtoReflect().Set(field, protoreflect.ValueOfString(NewRequestID()))
	return clone
}

// WatchOptions tune WatchRun.
type WatchOptions struct {
	// AfterSequence resumes after this update; 0 replays the run from its start.
	AfterSequence int64
	// OneByOne turns merged deltas off: by default the watch asks for the text
	// deltas ready together as one update (WatchRunRequest.merge_deltas), which
	// covers FirstSequence(update) .. update.Sequence.
	OneByOne bool
	// OnRetry, if set, hears of each broken stream before the wait to resume it.
	OnRetry func(err error, delay time.Duration, afterSequence int64)
	// OnGap, if set, hears of sequences that never came (Missing: a delta of
	// another replica's run lost on the way) before the update after them.
	OnGap func(lastSeen int64, update *dispatcherv1.RunUpdate, missing int64)
	// OnChild, if set, hears of each child run the updates name, before the
	// update goes to the handler: when the child starts (QUEUED or RUNNING),
	// pauses and goes on, and when it ends (with its usage, and ChildError says
	// why it did not succeed). Grandchildren and further down are named too;
	// child.GetParent() is the run that asked each. Follow one with WatchRun on
	// child.GetRun().
	OnChild func(child *dispatcherv1.ChildRun)
}

// FirstSequence is the first sequence update covers: a merged delta's
// first_sequence, else its own sequence (the last it covers).
func FirstSequence(update *dispatcherv1.RunUpdate) int64 {
	if first := update.GetFirstSequence(); first != 0 {
		return first
	}
	return update.GetSequence()
}

// Missing is how many sequences are missing between last (the last seen, 0
// for none) and update: 0 when it follows, merged or not; 0 when it opens a
// newer attempt's block (a recovered run numbers on from there) and for a
// state change, which carries the whole run (a snapshot standing for the
// updates no longer kept).
func Missing(last int64, update *dispatcherv1.RunUpdate) int64 {
	first := FirstSequence(update)
	if first <= last+1 || update.GetStateChange() != nil || attemptOf(first) > attemptOf(last) {
		return 0
	}
	return first - last - 1
}

// WatchRun streams a run's updates to handle, in order and each once, until
// the run reaches a terminal state, which it returns. When the stream breaks
// (the server restarts, the network drops) it resumes after the last sequence
// handled, with backoff, until ctx is done. An error from handle ends the
// watch and is returned as is.
//
// Sequences are increasing but not gapless across a recovery: a run taken
// over after its server stopped continues in a later block (see the
// RunUpdate.sequence contract), and a requeued run starts over with a QUEUED
// state change. Transcript assembles the answer with that in mind.
func (c *Client) WatchRun(ctx context.Context, name string, opts WatchOptions, handle func(*dispatcherv1.RunUpdate) error) (*dispatcherv1.Run, error) {
	last := opts.AfterSequence
	failures := 0
	authRetried := false
	for {
		run, progressed, used, err := c.watchOnce(ctx, name, &last, opts, handle)
		if run != nil {
			return run, nil
		}
		if cause, ok := callbackError(err); ok {
			return nil, cause
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if progressed {
			failures, authRetried = 0, false
		}
		if err == nil {
			// The stream ended without the run's end: ask for the stored run,
			// which tells whether it ended where this stream could not see.
			got, getErr := c.getRun(ctx, name)
			if getErr == nil && Terminal(got.GetState()) {
				return got, nil
			}
			err = errStreamEnded
		}
		if status.Code(err) == codes.Unauthenticated && !authRetried {
			authRetried = true
			if refused := c.reauthenticate(ctx, used, err); refused != nil {
				return nil, refused
			}
			continue
		}
		// CURSOR_EXPIRED: the server no longer keeps updates that far back;
		// asked again, it starts from a snapshot of the run.
		if !transient(err) && Reason(err) != commonv1.ErrorReason_ERROR_REASON_CURSOR_EXPIRED {
			return nil, err
		}
		delay := c.opts.backoff.Delay(failures, nil)
		failures++
		if opts.OnRetry != nil {
			opts.OnRetry(err, delay, last)
		}
		if err := sleep(ctx, delay); err != nil {
			return nil, err
		}
	}
}

// watchOnce is one WatchRun stream: the terminal run if it got there, whether
// any frame came, the token it was opened with, and why it stopped.
func (c *Client) watchOnce(ctx context.Context, name string, last *int64, opts WatchOptions,
	handle func(*dispatcherv1.RunUpdate) error) (*dispatcherv1.Run, bool, string, error) {
	var used string
	attempt, cancel := context.WithCancel(withTokenSlot(ctx, &used))
	defer cancel()
	dog := startWatchdog(c.opts.idleTimeout, cancel)
	defer dog.stop()
	// A stream's request is sent after it opens, past the interceptor's reach.
	stream, err := c.Dispatcher.WatchRun(WithAffinity(attempt, Affinity(name)), &dispatcherv1.WatchRunRequest{
		Name: name, AfterSequence: *last, MergeDeltas: !opts.OneByOne,
	})
	if err != nil {
		return nil, false, used, dog.explain(err)
	}
	progressed := false
	for {
		frame, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil, progressed, used, nil
		}
		if err != nil {
			return nil, progressed, used, dog.explain(err)
		}
		dog.kick()
		progressed = true
		update := frame.GetUpdate()
		if update == nil || update.GetSequence() <= *last {
			continue // a heartbeat, or an update already handled before a resume
		}
		if missing := Missing(*last, update); missing > 0 && opts.OnGap != nil {
			opts.OnGap(*last, update, missing)
		}
		if child := update.GetChildRun(); child != nil && opts.OnChild != nil {
			opts.OnChild(child)
		}
		if err := handle(update); err != nil {
			return nil, progressed, used, &handlerError{err}
		}
		*last = update.GetSequence()
		if change := update.GetStateChange(); change != nil && Terminal(change.GetRun().GetState()) {
			return change.GetRun(), progressed, used, nil
		}
	}
}

func (c *Client) getRun(ctx context.Context, name string) (*dispatcherv1.Run, error) {
	var run *dispatcherv1.Run
	err := c.Retry(ctx, func(ctx context.Context) error {
		response, err := c.Dispatcher.GetRun(ctx, &dispatcherv1.GetRunRequest{Name: name})
		run = response.GetRun()
		return err
	})
	return run, err
}

// Answer is a finished run and what it said.
type Answer struct {
	Run     *dispatcherv1.Run  // in a terminal state
	Message *contextv1.Message // the stored user message
	Text    string             // the answer (see Transcript.Text)
}

// Ask sends a message and watches its run to the end (SendMessage, then
// WatchRun with resume). handle, if not nil, sees every update as it comes.
// A run that ends without succeeding is not an error of Ask: check
// Answer.Run.State, and RunError(Answer.Run) for why.
func (c *Client) Ask(ctx context.Context, req *dispatcherv1.SendMessageRequest, handle func(*dispatcherv1.RunUpdate) error) (*Answer, error) {
	sent, err := c.SendMessage(ctx, req)
	if err != nil {
		return nil, err
	}
	var transcript Transcript
	run, err := c.WatchRun(ctx, sent.GetRun().GetName(), WatchOptions{}, func(update *dispatcherv1.RunUpdate) error {
		transcript.Add(update)
		if handle != nil {
			return handle(update)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &Answer{Run: run, Message: sent.GetMessage(), Text: transcript.Text()}, nil
}

// attemptOf is the recovery block of a sequence: each attempt at a run numbers
// its updates from k * 2^32 + 1.
func attemptOf(sequence int64) int64 { return sequence >> 32 }

// Transcript assembles a run's answer from its updates: the deltas as they
// stream, replaced by the final result's text when it comes. Text from an
// earlier attempt is dropped when the run starts over (requeued after its
// server stopped: a QUEUED state change, or text from a later sequence
// block), so an answer is never spliced from two attempts.
type Transcript struct {
	Run *dispatcherv1.Run // as of the latest state change

	text     strings.Builder
	attempt  int64
	result   string
	hasFinal bool
}

// Add takes the next update.
func (t *Transcript) Add(update *dispatcherv1.RunUpdate) {
	attempt := attemptOf(update.GetSequence())
	switch u := update.GetUpdate().(type) {
	case *dispatcherv1.RunUpdate_Delta:
		t.from(attempt)
		t.text.WriteString(u.Delta.GetText())
	case *dispatcherv1.RunUpdate_Result:
		t.from(attempt)
		var b strings.Builder
		for _, part := range u.Result.GetParts() {
			b.WriteString(part.GetText())
		}
		t.result, t.hasFinal = b.String(), true
	case *dispatcherv1.RunUpdate_StateChange:
		run := u.StateChange.GetRun()
		if run.GetState() == dispatcherv1.RunState_RUN_STATE_QUEUED && t.Run != nil &&
			t.Run.GetState() != dispatcherv1.RunState_RUN_STATE_QUEUED {
			t.restart()
			t.attempt = attempt
		}
		t.Run = run
	}
}

// from notes that answer text comes from attempt; a later attempt than the
// text so far starts the answer over (a partial answer of a stopped attempt
// stays until then: a run that is failed after a restart keeps it).
func (t *Transcript) from(attempt int64) {
	if attempt > t.attempt {
		t.restart()
		t.attempt = attempt
	}
}

func (t *Transcript) restart() {
	t.text.Reset()
	t.result, t.hasFinal = "", false
}

// Text is the answer so far: the final result's text once it came, else the
// deltas of the current attempt.
func (t *Transcript) Text() string {
	if t.hasFinal {
		return t.result
	}
	return t.text.String()
}
