package switchboard

import (
	"errors"
	"fmt"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	commonv1 "switchboard.dev/go/gen/switchboard/api/common/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
)

func richError(t *testing.T, code codes.Code, reason string, details ...*errdetails.BadRequest) error {
	t.Helper()
	st, err := status.New(code, "refused").WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: Domain})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range details {
		if st, err = st.WithDetails(d); err != nil {
			t.Fatal(err)
		}
	}
	return st.Err()
}

func TestReasonAndFieldViolationsOfAnError(t *testing.T) {
	err := richError(t, codes.InvalidArgument, "ERROR_REASON_INVALID_ARGUMENT", &errdetails.BadRequest{
		FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: "email", Description: "is required"}},
	})
	if got := Reason(err); got != commonv1.ErrorReason_ERROR_REASON_INVALID_ARGUMENT {
		t.Errorf("reason %v", got)
	}
	violations := FieldViolations(err)
	if len(violations) != 1 || violations[0].GetField() != "email" {
		t.Errorf("violations %v", violations)
	}
	// Wrapped errors keep their status.
	if got := Reason(fmt.Errorf("creating a user: %w", err)); got != commonv1.ErrorReason_ERROR_REASON_INVALID_ARGUMENT {
		t.Errorf("reason of a wrapped error %v", got)
	}
}

func TestReasonIgnoresOtherDomainsAndPlainErrors(t *testing.T) {
	st, _ := status.New(codes.NotFound, "x").WithDetails(&errdetails.ErrorInfo{Reason: "ERROR_REASON_NOT_FOUND", Domain: "example.com"})
	for _, err := range []error{st.Err(), status.Error(codes.Unavailable, "down"), errors.New("plain"), nil} {
		if got := Reason(err); got != commonv1.ErrorReason_ERROR_REASON_UNSPECIFIED {
			t.Errorf("Reason(%v) = %v", err, got)
		}
	}
}

// Run.error is a google.rpc.Status from genproto (google.rpc is not generated
// a second time), so status.FromProto reads its details directly.
func TestRunErrorDecodesRunErrorWithFromProto(t *testing.T) {
	info, err := anypb.New(&errdetails.ErrorInfo{Reason: "ERROR_REASON_RUN_INTERRUPTED", Domain: Domain})
	if err != nil {
		t.Fatal(err)
	}
	run := &dispatcherv1.Run{Error: &spb.Status{Code: int32(codes.Aborted), Message: "stopped", Details: []*anypb.Any{info}}}
	runErr := RunError(run)
	if status.Code(runErr) != codes.Aborted || Reason(runErr) != commonv1.ErrorReason_ERROR_REASON_RUN_INTERRUPTED {
		t.Errorf("RunError = %v (reason %v)", runErr, Reason(runErr))
	}
	details := status.FromProto(run.GetError()).Details()
	if _, ok := details[0].(*errdetails.ErrorInfo); !ok {
		t.Errorf("detail is %T, not *errdetails.ErrorInfo", details[0])
	}
	// A run failed at a tool call whose outcome a crash left unknown (FAIL_RUN).
	info, err = anypb.New(&errdetails.ErrorInfo{Reason: "ERROR_REASON_TOOL_OUTCOME_UNKNOWN", Domain: Domain})
	if err != nil {
		t.Fatal(err)
	}
	failed := &dispatcherv1.Run{Error: &spb.Status{Code: int32(codes.Aborted), Message: "failed at an unknown outcome", Details: []*anypb.Any{info}}}
	if Reason(RunError(failed)) != commonv1.ErrorReason_ERROR_REASON_TOOL_OUTCOME_UNKNOWN {
		t.Errorf("reason of a run failed at an unknown outcome = %v", Reason(RunError(failed)))
	}
	if RunError(&dispatcherv1.Run{}) != nil {
		t.Error("a run without an error has one")
	}
}

func TestTransientErrors(t *testing.T) {
	cases := []struct {
		err  error
		want bool
	}{
		{status.Error(codes.Unavailable, "connection refused"), true},
		{status.Error(codes.Canceled, "stream reset by a server going down"), true},
		{richError(t, codes.Unavailable, "ERROR_REASON_UNAVAILABLE"), true},
		{richError(t, codes.ResourceExhausted, "ERROR_REASON_SUBSCRIBER_TOO_SLOW"), true},
		{richError(t, codes.ResourceExhausted, "ERROR_REASON_QUOTA_EXCEEDED"), false},
		{richError(t, codes.NotFound, "ERROR_REASON_NOT_FOUND"), false},
		{richError(t, codes.OutOfRange, "ERROR_REASON_CURSOR_EXPIRED"), false},
		// A download resumed past the file's end: the file will not grow.
		{richError(t, codes.OutOfRange, "ERROR_REASON_OUT_OF_RANGE"), false},
		{richError(t, codes.Internal, "ERROR_REASON_INTERNAL"), false},
		// A run's decided end after a crash: calling again cannot change it.
		{richError(t, codes.FailedPrecondition, "ERROR_REASON_RUN_NOT_RESUMABLE"), false},
		{richError(t, codes.Aborted, "ERROR_REASON_TOOL_OUTCOME_UNKNOWN"), false},
		// Steering a run that has ended: it stays ended, send a new message instead.
		{richError(t, codes.FailedPrecondition, "ERROR_REASON_RUN_ENDED"), false},
		{status.Error(codes.InvalidArgument, "bad"), false},
		{errors.New("not a status"), false},
	}
	for _, c := range cases {
		if got := transient(c.err); got != c.want {
			t.Errorf("transient(%v) = %v", c.err, got)
		}
	}
}

func TestSignedOutErrorIsErrSignedOutAndKeepsItsStatus(t *testing.T) {
	cause := richError(t, codes.Unauthenticated, "ERROR_REASON_SESSION_REVOKED")
	err := error(&SignedOutError{Err: cause})
	if !errors.Is(err, ErrSignedOut) {
		t.Error("not ErrSignedOut")
	}
	if status.Code(err) != codes.Unauthenticated || Reason(err) != commonv1.ErrorReason_ERROR_REASON_SESSION_REVOKED {
		t.Errorf("code %v reason %v", status.Code(err), Reason(err))
	}
}
