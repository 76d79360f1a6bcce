package switchboard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	commonv1 "switchboard.dev/go/gen/switchboard/api/common/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
)

const callsWorkspace = "workspaces/w"

// scriptedCalls records what the client asks of the call RPCs and answers as
// the server would: each RPC refuses its first call with UNAVAILABLE (a
// server going away), except where a test sets refuse to the error every call
// gets. ListCalls pages through calls by page_size; GetCall answers the states
// of states in turn, the last one from then on. The real server with a real
// SIP phone is tested through the Python client (tests/client/test_client_calls.py);
// the Go client against a real server without SIP in tests/e2e/test_go_calls.py.
type scriptedCalls struct {
	dispatcherv1.UnimplementedDispatcherServiceServer

	mu     sync.Mutex
	refuse error
	calls  []*dispatcherv1.Call // newest first
	states []dispatcherv1.CallState
	placed []*dispatcherv1.PlaceCallRequest
	listed []*dispatcherv1.ListCallsRequest
	got    []*dispatcherv1.GetCallRequest
	ended  []*dispatcherv1.EndCallRequest
}

var errAway = status.Error(codes.Unavailable, "the server went away")

// answer is the error the nth call of an RPC gets (1 for the first), if any.
func (s *scriptedCalls) answer(n int) error {
	if s.refuse != nil {
		return s.refuse
	}
	if n == 1 {
		return errAway
	}
	return nil
}

func (s *scriptedCalls) PlaceCall(_ context.Context, req *dispatcherv1.PlaceCallRequest) (*dispatcherv1.PlaceCallResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.placed = append(s.placed, proto.Clone(req).(*dispatcherv1.PlaceCallRequest))
	if err := s.answer(len(s.placed)); err != nil {
		return nil, err
	}
	return &dispatcherv1.PlaceCallResponse{Call: &dispatcherv1.Call{
		Name: callsWorkspace + "/calls/" + req.GetRequestId(), State: dispatcherv1.CallState_CALL_STATE_DIALING,
		Direction: dispatcherv1.CallDirection_CALL_DIRECTION_OUTBOUND, Trunk: req.GetTrunk(), ToNumber: req.GetToNumber(),
	}}, nil
}

func (s *scriptedCalls) ListCalls(_ context.Context, req *dispatcherv1.ListCallsRequest) (*dispatcherv1.ListCallsResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.listed = append(s.listed, proto.Clone(req).(*dispatcherv1.ListCallsRequest))
	if err := s.answer(len(s.listed)); err != nil {
		return nil, err
	}
	at := 0
	if req.GetPageToken() != "" {
		at, _ = strconv.Atoi(req.GetPageToken())
	}
	end := min(at+int(req.GetPageSize()), len(s.calls))
	response := &dispatcherv1.ListCallsResponse{Calls: s.calls[at:end]}
	if end < len(s.calls) {
		response.NextPageToken = strconv.Itoa(end)
	}
	return response, nil
}

func (s *scriptedCalls) GetCall(_ context.Context, req *dispatcherv1.GetCallRequest) (*dispatcherv1.GetCallResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got = append(s.got, req)
	if err := s.answer(len(s.got)); err != nil {
		return nil, err
	}
	// The refused first read shows no state.
	state := s.states[min(len(s.got)-2, len(s.states)-1)]
	return &dispatcherv1.GetCallResponse{Call: &dispatcherv1.Call{Name: req.GetName(), State: state}}, nil
}

func (s *scriptedCalls) EndCall(_ context.Context, req *dispatcherv1.EndCallRequest) (*dispatcherv1.EndCallResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ended = append(s.ended, req)
	if err := s.answer(len(s.ended)); err != nil {
		return nil, err
	}
	return &dispatcherv1.EndCallResponse{Call: &dispatcherv1.Call{
		Name: req.GetName(), State: dispatcherv1.CallState_CALL_STATE_ENDED, EndReason: "ended by users/u",
	}}, nil
}

func scriptedCallsClient(t *testing.T, server *scriptedCalls) *Client {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := grpc.NewServer()
	dispatcherv1.RegisterDispatcherServiceServer(served, server)
	go func() { _ = served.Serve(listener) }()
	t.Cleanup(served.Stop)
	fast := Backoff{Initial: 10 * time.Millisecond, Max: 50 * time.Millisecond}
	client, err := Dial(listener.Addr().String(), WithInsecure(), WithBackoff(fast))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func callsContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestPlaceCallSendsTheCallAndKeepsItsKeyAcrossARetry(t *testing.T) {
	server := &scriptedCalls{}
	client := scriptedCallsClient(t, server)
	call, err := client.PlaceCall(callsContext(t), callsWorkspace, PlaceCallOptions{
		Trunk: "carrier", ToNumber: "+15551230001", Assistant: callsWorkspace + "/assistants/a",
		OpeningMessage: "Tell Ann her agenda for today.", RingTimeout: 20 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(server.placed) != 2 {
		t.Fatalf("%d attempts, want 2 (the first refused)", len(server.placed))
	}
	first, second := server.placed[0], server.placed[1]
	if first.GetRequestId() == "" || first.GetRequestId() != second.GetRequestId() {
		t.Errorf("request ids %q then %q: one key for every attempt", first.GetRequestId(), second.GetRequestId())
	}
	want := &dispatcherv1.PlaceCallRequest{
		Parent: callsWorkspace, Trunk: "carrier", ToNumber: "+15551230001", Assistant: callsWorkspace + "/assistants/a",
		OpeningMessage: "Tell Ann her agenda for today.", RequestId: first.GetRequestId(),
	}
	if got := proto.Clone(second).(*dispatcherv1.PlaceCallRequest); got.GetRingTimeout().AsDuration() != 20*time.Second {
		t.Errorf("ring timeout %v", got.GetRingTimeout())
	} else if got.RingTimeout = nil; !proto.Equal(got, want) {
		t.Errorf("sent %v, want %v", got, want)
	}
	if call.GetState() != dispatcherv1.CallState_CALL_STATE_DIALING || call.GetName() != callsWorkspace+"/calls/"+first.GetRequestId() {
		t.Errorf("call %v", call)
	}

	// A key given is sent as it is; no ring timeout given sends none (the server's 30 s).
	if _, err := client.PlaceCall(callsContext(t), callsWorkspace, PlaceCallOptions{Trunk: "carrier", RequestID: "mine"}); err != nil {
		t.Fatal(err)
	}
	if last := server.placed[len(server.placed)-1]; last.GetRequestId() != "mine" || last.RingTimeout != nil {
		t.Errorf("sent %v", last)
	}
}

func TestARefusedCallIsReturnedAtOnceWithItsFields(t *testing.T) {
	refusal, err := status.New(codes.InvalidArgument, "the call cannot be placed as asked").WithDetails(
		&errdetails.ErrorInfo{Reason: "ERROR_REASON_INVALID_ARGUMENT", Domain: Domain},
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: "to_number", Description: "an E.164 number is needed"},
		}},
	)
	if err != nil {
		t.Fatal(err)
	}
	server := &scriptedCalls{refuse: refusal.Err()}
	client := scriptedCallsClient(t, server)
	_, err = client.PlaceCall(callsContext(t), callsWorkspace, PlaceCallOptions{Trunk: "carrier", ToNumber: "555"})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("error %v", err)
	}
	if violations := FieldViolations(err); len(violations) != 1 || violations[0].GetField() != "to_number" {
		t.Errorf("violations %v", violations)
	}
	if len(server.placed) != 1 {
		t.Errorf("%d attempts of a refused call, want 1", len(server.placed))
	}
}

func TestGetCallOfACallThatDoesNotExistIsNotFound(t *testing.T) {
	missing, err := status.New(codes.NotFound, "workspaces/w/calls/x not found").WithDetails(
		&errdetails.ErrorInfo{Reason: "ERROR_REASON_NOT_FOUND", Domain: Domain},
	)
	if err != nil {
		t.Fatal(err)
	}
	server := &scriptedCalls{refuse: missing.Err()}
	client := scriptedCallsClient(t, server)
	_, err = client.GetCall(callsContext(t), callsWorkspace+"/calls/x")
	if status.Code(err) != codes.NotFound || Reason(err) != commonv1.ErrorReason_ERROR_REASON_NOT_FOUND {
		t.Fatalf("error %v (reason %v)", err, Reason(err))
	}
	if len(server.got) != 1 {
		t.Errorf("%d reads, want 1: NOT_FOUND is the server's answer, not retried", len(server.got))
	}
}

func TestListCallsReadsEveryPageRetriedAndLiveOnly(t *testing.T) {
	server := &scriptedCalls{}
	for i := 250; i > 0; i-- {
		server.calls = append(server.calls, &dispatcherv1.Call{Name: fmt.Sprintf("%s/calls/c%03d", callsWorkspace, i)})
	}
	client := scriptedCallsClient(t, server)
	calls, err := client.ListCalls(callsContext(t), callsWorkspace, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(calls) != 250 || calls[0].GetName() != callsWorkspace+"/calls/c250" || calls[249].GetName() != callsWorkspace+"/calls/c001" {
		t.Fatalf("%d calls, from %v to %v", len(calls), calls[0], calls[len(calls)-1])
	}
	// The refused first page, then three.
	if len(server.listed) != 4 {
		t.Fatalf("%d requests, want 4", len(server.listed))
	}
	tokens := []string{"", "", "100", "200"}
	for i, req := range server.listed {
		if req.GetParent() != callsWorkspace || !req.GetLiveOnly() || req.GetPageSize() != callPageSize || req.GetPageToken() != tokens[i] {
			t.Errorf("request %d: %v", i, req)
		}
	}
}

func TestEndCallIsRetriedAndWaitCallReadsUntilTheState(t *testing.T) {
	server := &scriptedCalls{states: []dispatcherv1.CallState{
		dispatcherv1.CallState_CALL_STATE_DIALING,
		dispatcherv1.CallState_CALL_STATE_RINGING,
		dispatcherv1.CallState_CALL_STATE_ANSWERED,
		dispatcherv1.CallState_CALL_STATE_ENDED,
	}}
	client := scriptedCallsClient(t, server)
	name := callsWorkspace + "/calls/c"
	ctx := callsContext(t)
	answered, err := client.WaitCall(ctx, name, dispatcherv1.CallState_CALL_STATE_ANSWERED)
	if err != nil {
		t.Fatal(err)
	}
	// The refused read, DIALING, RINGING, ANSWERED.
	if answered.GetState() != dispatcherv1.CallState_CALL_STATE_ANSWERED || len(server.got) != 4 {
		t.Fatalf("%v after %d reads", answered.GetState(), len(server.got))
	}

	ended, err := client.EndCall(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if len(server.ended) != 2 || ended.GetState() != dispatcherv1.CallState_CALL_STATE_ENDED {
		t.Errorf("%v after %d attempts, want ENDED after 2 (the first refused)", ended.GetState(), len(server.ended))
	}

	// ENDED ends a wait for any other state: the call never changes again.
	done, err := client.WaitCall(ctx, name, dispatcherv1.CallState_CALL_STATE_RINGING)
	if err != nil || done.GetState() != dispatcherv1.CallState_CALL_STATE_ENDED {
		t.Fatalf("%v, %v", done, err)
	}
}

func TestWaitCallStopsWithItsContext(t *testing.T) {
	server := &scriptedCalls{states: []dispatcherv1.CallState{dispatcherv1.CallState_CALL_STATE_RINGING}}
	client := scriptedCallsClient(t, server)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err := client.WaitCall(ctx, callsWorkspace+"/calls/c", dispatcherv1.CallState_CALL_STATE_ANSWERED)
	if !errors.Is(err, context.DeadlineExceeded) && status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("error %v, want the context's deadline", err)
	}
	if len(server.got) < 2 {
		t.Errorf("%d reads: the call was read until the deadline", len(server.got))
	}
}
