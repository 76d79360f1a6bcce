package switchboard

import (
	"context"
	"errors"
	"io"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	eventsv1 "switchboard.dev/go/gen/switchboard/api/events/v1"
)

// FollowOptions say what FollowEvents follows and who hears about its progress.
type FollowOptions struct {
	// Scopes to follow (at least one); see ConversationScope and friends.
	Scopes []*eventsv1.Scope
	// Types, if not empty, keeps only these event types.
	Types []eventsv1.EventType
	// AfterCursor resumes after a cursor saved earlier; empty starts at the
	// live tail (what happens from now on).
	AfterCursor string
	// OneByOne turns merged deltas off: by default a run's consecutive text
	// deltas delivered together come as one RUN_UPDATED event, the last one's,
	// whose update covers FirstSequence(update) .. update.Sequence.
	OneByOne bool

	// OnSubscribed hears of each (re)subscription once the server has it live:
	// the cursor asked to resume after, and where delivery starts.
	OnSubscribed func(afterCursor, liveCursor string)
	// OnCursor hears of every position reached (a batch's or a heartbeat's
	// cursor): save it to resume after a restart of the program itself.
	OnCursor func(cursor string)
	// OnRetry hears of each broken stream before the wait to resume it.
	OnRetry func(err error, delay time.Duration, afterCursor string)
}

// UserScope follows everything about a user, `users/{user}` (only that user may).
func UserScope(user string) *eventsv1.Scope {
	return &eventsv1.Scope{Scope: &eventsv1.Scope_User{User: user}}
}

// WorkspaceScope follows everything in a workspace, `workspaces/{w}`.
func WorkspaceScope(workspace string) *eventsv1.Scope {
	return &eventsv1.Scope{Scope: &eventsv1.Scope_Workspace{Workspace: workspace}}
}

// ConversationScope follows a conversation, `workspaces/{w}/conversations/{c}`.
func ConversationScope(conversation string) *eventsv1.Scope {
	return &eventsv1.Scope{Scope: &eventsv1.Scope_Conversation{Conversation: conversation}}
}

// FollowEvents subscribes to the scopes and calls handle with each event, in
// log order, each exactly once, until ctx is done (it returns ctx.Err()),
// handle returns an error (returned as is), or the server refuses the
// subscription for good (NOT_FOUND after losing access, OUT_OF_RANGE for a
// cursor older than the log keeps, a refused refresh: ErrSignedOut).
//
// When the stream breaks (the server restarts, a connection drops, the
// subscriber fell behind, a silent stream) it resubscribes after the last
// cursor reached, with capped exponential backoff and jitter, so nothing is
// skipped; events are also deduplicated by id. An UNAUTHENTICATED end (the
// access token expired under the stream) refreshes the token and resumes.
func (c *Client) FollowEvents(ctx context.Context, opts FollowOptions, handle func(*eventsv1.Event) error) error {
	tracker := newCursorTracker(opts.AfterCursor, dedupeWindow)
	failures := 0
	authRetried := false
	for {
		progressed, used, err := c.followOnce(ctx, opts, tracker, handle)
		if cause, ok := callbackError(err); ok {
			return cause
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if progressed {
			failures, authRetried = 0, false
		}
		if err == nil {
			err = errStreamEnded
		}
		if status.Code(err) == codes.Unauthenticated && !authRetried {
			authRetried = true
			if refused := c.reauthenticate(ctx, used, err); refused != nil {
				return refused
			}
			continue
		}
		if !transient(err) {
			return err
		}
		delay := c.opts.backoff.Delay(failures, nil)
		failures++
		if opts.OnRetry != nil {
			opts.OnRetry(err, delay, tracker.cursor)
		}
		if err := sleep(ctx, delay); err != nil {
			return err
		}
	}
}

// followOnce is one Subscribe stream: whether any frame came, the token it
// was opened with, and why it ended (nil: the server closed it with OK).
func (c *Client) followOnce(ctx context.Context, opts FollowOptions, tracker *cursorTracker,
	handle func(*eventsv1.Event) error) (bool, string, error) {
	var used string
	attempt, cancel := context.WithCancel(withTokenSlot(ctx, &used))
	defer cancel()
	dog := startWatchdog(c.opts.idleTimeout, cancel)
	defer dog.stop()
	after := tracker.cursor
	stream, err := c.Events.Subscribe(attempt, &eventsv1.SubscribeRequest{
		Scopes: opts.Scopes, Types: opts.Types, AfterCursor: after, MergeDeltas: !opts.OneByOne,
	})
	if err != nil {
		return false, used, dog.explain(err)
	}
	progressed := false
	for {
		frame, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return progressed, used, nil
		}
		if err != nil {
			return progressed, used, dog.explain(err)
		}
		dog.kick()
		if heartbeat := frame.GetHeartbeat(); heartbeat != nil {
			if !progressed && opts.OnSubscribed != nil {
				// The first frame of every Subscribe is a heartbeat: live from here.
				opts.OnSubscribed(after, heartbeat.GetCursor())
			}
			progressed = true
			tracker.advance(heartbeat.GetCursor())
			if tracker.cursor != tracker.reported && opts.OnCursor != nil {
				opts.OnCursor(tracker.cursor)
			}
			tracker.reported = tracker.cursor
			continue
		}
		progressed = true
		batch := frame.GetBatch()
		for _, event := range batch.GetEvents() {
			if !tracker.fresh(event) {
				continue
			}
			if err := handle(event); err != nil {
				return progressed, used, &handlerError{err}
			}
			tracker.delivered(event)
		}
		tracker.advance(batch.GetCursor())
		if tracker.cursor != tracker.reported && opts.OnCursor != nil {
			opts.OnCursor(tracker.cursor)
		}
		tracker.reported = tracker.cursor
	}
}

// dedupeWindow is how many recent event ids FollowEvents remembers. The
// server never sends one twice across a resume; this is a second guard that
// costs bounded memory on a stream that runs for months.
const dedupeWindow = 4096

// cursorTracker is a follower's position in the log and the ids it delivered
// lately. The position only moves to places whose events were all handed
// over: an event's own cursor once it was handled, a batch's after all of
// its events, a heartbeat's (nothing to deliver before it).
//
// One event id stands for several deltas once they are merged, so a run's
// deltas are also remembered by sequence: one at or before the last delta of
// its run delivered was delivered already, alone or merged (a resume on
// another replica sends the deltas after the cursor's event again, one by
// one, under ids this follower never saw). A run's deltas come in order among
// themselves.
type cursorTracker struct {
	cursor   string
	reported string // the last cursor OnCursor heard of
	seen     map[string]struct{}
	order    []string // ring of the ids in seen, oldest at next
	next     int
	deltas   map[string]int64 // each run's last delta sequence delivered
	runs     []string         // ring of the runs in deltas, oldest at nextRun
	nextRun  int
}

func newCursorTracker(cursor string, window int) *cursorTracker {
	return &cursorTracker{
		cursor: cursor, reported: cursor, seen: make(map[string]struct{}, window), order: make([]string, window),
		deltas: make(map[string]int64), runs: make([]string, window),
	}
}

// fresh reports whether event was not delivered yet.
func (t *cursorTracker) fresh(event *eventsv1.Event) bool {
	if update := deltaOf(event); update != nil && update.GetSequence() <= t.deltas[update.GetRun()] {
		return false
	}
	_, dup := t.seen[event.GetId()]
	return !dup
}

// deltaOf is the run update of a text-delta RUN_UPDATED event, else nil.
func deltaOf(event *eventsv1.Event) *dispatcherv1.RunUpdate {
	if event.GetType() != eventsv1.EventType_EVENT_TYPE_RUN_UPDATED {
		return nil
	}
	update := event.GetRunUpdated().GetUpdate()
	if update.GetDelta() == nil {
		return nil
	}
	return update
}

// delivered records a handled event.
func (t *cursorTracker) delivered(event *eventsv1.Event) {
	if update := deltaOf(event); update != nil {
		run := update.GetRun()
		if _, known := t.deltas[run]; !known {
			if old := t.runs[t.nextRun]; old != "" {
				delete(t.deltas, old)
			}
			t.runs[t.nextRun] = run
			t.nextRun = (t.nextRun + 1) % len(t.runs)
		}
		t.deltas[run] = update.GetSequence()
	}
	if old := t.order[t.next]; old != "" {
		delete(t.seen, old)
	}
	t.order[t.next] = event.GetId()
	t.next = (t.next + 1) % len(t.order)
	t.seen[event.GetId()] = struct{}{}
	t.advance(event.GetCursor())
}

// advance moves to cursor; it reports whether the position changed. Cursors
// are opaque: the server's frames are in log order, so the latest one wins.
func (t *cursorTracker) advance(cursor string) bool {
	if cursor == "" || cursor == t.cursor {
		return false
	}
	t.cursor = cursor
	return true
}
