package switchboard

import (
	"context"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	commonv1 "switchboard.dev/go/gen/switchboard/api/common/v1"
	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
)

// scriptedSteer answers SteerRun with the errors it is given, in order, then
// with a steer's run; it keeps every request it got. The real server is tested
// with the example program (tests/e2e/test_go_client.py).
type scriptedSteer struct {
	dispatcherv1.UnimplementedDispatcherServiceServer

	mu       sync.Mutex
	failures []error
	requests []*dispatcherv1.SteerRunRequest
}

func (s *scriptedSteer) SteerRun(_ context.Context, req *dispatcherv1.SteerRunRequest) (*dispatcherv1.SteerRunResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, req)
	if len(s.failures) > 0 {
		err := s.failures[0]
		s.failures = s.failures[1:]
		return nil, err
	}
	return &dispatcherv1.SteerRunResponse{
		Run: &dispatcherv1.Run{
			Name:  "workspaces/w/conversations/c/runs/steer",
			State: dispatcherv1.RunState_RUN_STATE_QUEUED,
			Steer: &dispatcherv1.Steer{Target: req.GetRun(), State: dispatcherv1.SteerState_STEER_STATE_ACCEPTED},
		},
		Message: req.GetMessage(),
	}, nil
}

func steerOf(text string) *dispatcherv1.SteerRunRequest {
	return &dispatcherv1.SteerRunRequest{
		Run: "workspaces/w/conversations/c/runs/target",
		Message: &contextv1.Message{Parts: []*contextv1.ContentPart{
			{Part: &contextv1.ContentPart_Text{Text: text}},
		}},
	}
}

func TestSteerRunKeysTheSteerAndRetriesATransientFailureWithTheSameKey(t *testing.T) {
	server := &scriptedSteer{failures: []error{status.Error(codes.Unavailable, "the server went away")}}
	client := scripted(t, server)
	req := steerOf("use the other account")

	steered, err := client.SteerRun(within(t), req)
	if err != nil {
		t.Fatal(err)
	}
	if got := steered.GetRun().GetSteer(); got.GetTarget() != req.GetRun() ||
		got.GetState() != dispatcherv1.SteerState_STEER_STATE_ACCEPTED {
		t.Errorf("steer %v", got)
	}
	if len(server.requests) != 2 {
		t.Fatalf("%d SteerRun calls, want the refused one and its retry", len(server.requests))
	}
	first, retry := server.requests[0].GetRequestId(), server.requests[1].GetRequestId()
	if first == "" || first != retry {
		t.Errorf("request ids %q then %q: a retry must send the same key", first, retry)
	}
	if req.GetRequestId() != "" {
		t.Errorf("the caller's request was changed: request_id %q", req.GetRequestId())
	}
	if text := server.requests[1].GetMessage().GetParts()[0].GetText(); text != "use the other account" {
		t.Errorf("message %q", text)
	}

	// A key the caller chose is sent as it is.
	req.RequestId = "my-steer-1"
	if _, err := client.SteerRun(within(t), req); err != nil {
		t.Fatal(err)
	}
	if got := server.requests[2].GetRequestId(); got != "my-steer-1" {
		t.Errorf("request id %q, want the caller's", got)
	}
}

func TestSteerRunReturnsARunThatEndedAtOnce(t *testing.T) {
	ended := richError(t, codes.FailedPrecondition, "ERROR_REASON_RUN_ENDED")
	server := &scriptedSteer{failures: []error{ended}}
	client := scripted(t, server)

	_, err := client.SteerRun(within(t), steerOf("too late"))
	if Reason(err) != commonv1.ErrorReason_ERROR_REASON_RUN_ENDED || status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("error %v, want FAILED_PRECONDITION with reason RUN_ENDED", err)
	}
	if len(server.requests) != 1 {
		t.Errorf("%d SteerRun calls: the server's own refusal is not retried", len(server.requests))
	}
}
