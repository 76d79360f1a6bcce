package switchboard

import (
	"context"
	"slices"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
)

// A phone call (docs/telephony.md) is an assistant's Talk session over a SIP
// line: inbound, when someone dials one of the server's numbers, or outbound,
// placed by PlaceCall (or a schedule) from one of the server's trunks. Its
// record (dispatcherv1.Call, workspaces/{w}/calls/{c}) goes DIALING (outbound),
// RINGING, ANSWERED, ENDED, and is kept after it ended with its duration, end
// reason and SIP status. Each change is also a CALL_CHANGED event of the
// workspace (FollowEvents).

// callPageSize is the server's largest ListCalls page.
const callPageSize = 100

// callPoll spaces WaitCall's reads: a call changes a few times in its life,
// most of them a person's act (picking up, hanging up), so a read every 2 s at
// most sees each soon enough and costs the server little. The client's own
// backoff (up to 15 s by default) is for a server that is away.
var callPoll = Backoff{Initial: 100 * time.Millisecond, Max: 2 * time.Second, Multiplier: 2, Jitter: 0.2}

// PlaceCallOptions are the call PlaceCall places.
type PlaceCallOptions struct {
	// Trunk is one of the server's SIP trunks (SWITCHBOARD_SIP_TRUNKS) that
	// calls out for the workspace and ToNumber.
	Trunk string
	// ToNumber is the number to call, E.164: "+" and 8 to 15 digits.
	ToNumber string
	// Assistant answers the call (workspaces/{w}/assistants/{a}, in the same
	// workspace, with a voice).
	Assistant string
	// OpeningMessage is what the assistant says first once the line is picked
	// up, as the call's first turn (1 to 16,000 characters).
	OpeningMessage string
	// RingTimeout is how long it may ring before it is given up (408): the
	// server's 30 s if 0; 5 s to 120 s.
	RingTimeout time.Duration
	// RequestID is the idempotency key; a new one if empty. Pass the same one
	// to try again after an error and never place a second call.
	RequestID string
}

// PlaceCall places a phone call from workspace (workspaces/{w}) and returns
// at once with the call DIALING; GetCall, WaitCall or the CALL_CHANGED events
// follow it as it rings, is answered and ends. The request carries an
// idempotency key and transient failures are retried with it: the server
// answers a repeated key with the first call, so a retry never places a second
// one. A field the server refuses (a trunk that does not call for the
// workspace or that number included) is INVALID_ARGUMENT with a violation
// naming it (FieldViolations); a server without SIP is FAILED_PRECONDITION; the
// workspace's limit of calls at once, RESOURCE_EXHAUSTED.
func (c *Client) PlaceCall(ctx context.Context, workspace string, opts PlaceCallOptions) (*dispatcherv1.Call, error) {
	request := keyed(&dispatcherv1.PlaceCallRequest{
		Parent: workspace, Trunk: opts.Trunk, ToNumber: opts.ToNumber, Assistant: opts.Assistant,
		OpeningMessage: opts.OpeningMessage, RequestId: opts.RequestID,
	})
	if opts.RingTimeout != 0 {
		request.RingTimeout = durationpb.New(opts.RingTimeout)
	}
	var placed *dispatcherv1.PlaceCallResponse
	err := c.Retry(ctx, func(ctx context.Context) error {
		var err error
		placed, err = c.Dispatcher.PlaceCall(ctx, request)
		return err
	})
	if err != nil {
		return nil, err
	}
	return placed.GetCall(), nil
}

// GetCall reads a phone call (workspaces/{w}/calls/{c}), inbound or outbound,
// live (its Duration so far) or ended; one that does not exist is NOT_FOUND.
// Retried on transient failures.
func (c *Client) GetCall(ctx context.Context, name string) (*dispatcherv1.Call, error) {
	var got *dispatcherv1.GetCallResponse
	err := c.Retry(ctx, func(ctx context.Context) error {
		var err error
		got, err = c.Dispatcher.GetCall(ctx, &dispatcherv1.GetCallRequest{Name: name})
		return err
	})
	if err != nil {
		return nil, err
	}
	return got.GetCall(), nil
}

// ListCalls lists workspace's phone calls, newest first, every page;
// liveOnly keeps those not ENDED. Each page is a read, retried on transient
// failures like any.
func (c *Client) ListCalls(ctx context.Context, workspace string, liveOnly bool) ([]*dispatcherv1.Call, error) {
	request := &dispatcherv1.ListCallsRequest{Parent: workspace, PageSize: callPageSize, LiveOnly: liveOnly}
	var found []*dispatcherv1.Call
	for {
		var page *dispatcherv1.ListCallsResponse
		err := c.Retry(ctx, func(ctx context.Context) error {
			var err error
			page, err = c.Dispatcher.ListCalls(ctx, request)
			return err
		})
		if err != nil {
			return nil, err
		}
		found = append(found, page.GetCalls()...)
		request.PageToken = page.GetNextPageToken()
		if request.PageToken == "" {
			return found, nil
		}
	}
}

// EndCall hangs up a live phone call, wherever the server carries it; an
// ended call is returned as it is. The answer may still show the call live:
// the line takes a moment to go down over SIP (WaitCall with
// CALL_STATE_ENDED waits for it; its EndReason is then "ended by users/...").
// Retried on transient failures: ending a call twice ends it once, and the
// second answer is the ended call.
func (c *Client) EndCall(ctx context.Context, name string) (*dispatcherv1.Call, error) {
	var ended *dispatcherv1.EndCallResponse
	err := c.Retry(ctx, func(ctx context.Context) error {
		var err error
		ended, err = c.Dispatcher.EndCall(ctx, &dispatcherv1.EndCallRequest{Name: name})
		return err
	})
	if err != nil {
		return nil, err
	}
	return ended.GetCall(), nil
}

// WaitCall reads the call (GetCall; from 0.1 s to 2 s apart) until it is in one of states or ENDED (after which it never changes, so a
// call that was busy or not answered comes back ENDED from a wait for
// ANSWERED: check its State), or ctx is done (then ctx's error). A call
// changes a few times in its life, so polling costs little; FollowEvents
// with CALL_CHANGED sees each change as it happens instead.
func (c *Client) WaitCall(ctx context.Context, name string, states ...dispatcherv1.CallState) (*dispatcherv1.Call, error) {
	for attempt := 0; ; attempt++ {
		call, err := c.GetCall(ctx, name)
		if err != nil {
			return nil, err
		}
		if call.GetState() == dispatcherv1.CallState_CALL_STATE_ENDED || slices.Contains(states, call.GetState()) {
			return call, nil
		}
		if err := sleep(ctx, callPoll.Delay(attempt, nil)); err != nil {
			return nil, err
		}
	}
}
