package switchboard

import (
	"errors"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	commonv1 "switchboard.dev/go/gen/switchboard/api/common/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
)

// Domain is the ErrorInfo domain of every error the mesh returns.
const Domain = "switchboard.dev"

// ErrSignedOut is matched (errors.Is) by every error that means the session is
// over: its refresh token was refused, so only a new sign-in helps.
var ErrSignedOut = errors.New("switchboard: signed out")

// SignedOutError is returned once a RefreshToken call was refused (the session
// was revoked or expired, or its refresh token was already spent). Err is the
// refusal; Reason(err) tells which.
type SignedOutError struct {
	Err error
}

func (e *SignedOutError) Error() string {
	return "switchboard: signed out: " + e.Err.Error()
}

// Unwrap lets errors.Is find ErrSignedOut and status.FromError find the gRPC status.
func (e *SignedOutError) Unwrap() []error { return []error{ErrSignedOut, e.Err} }

// ErrorInfo returns the switchboard ErrorInfo carried by a gRPC error (from
// google.rpc.Status details), or nil if there is none.
func ErrorInfo(err error) *errdetails.ErrorInfo {
	st, ok := status.FromError(err)
	if !ok || st == nil {
		return nil
	}
	return errorInfoOf(st)
}

func errorInfoOf(st *status.Status) *errdetails.ErrorInfo {
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.GetDomain() == Domain {
			return info
		}
	}
	return nil
}

// Reason is the machine-readable cause of a failed call, the value clients
// branch on; ERROR_REASON_UNSPECIFIED when err carries no switchboard ErrorInfo
// (for example a transport failure) or names a reason this client does not know.
func Reason(err error) commonv1.ErrorReason {
	info := ErrorInfo(err)
	if info == nil {
		return commonv1.ErrorReason_ERROR_REASON_UNSPECIFIED
	}
	return commonv1.ErrorReason(commonv1.ErrorReason_value[info.GetReason()])
}

// FieldViolations lists the BadRequest field violations of an INVALID_ARGUMENT
// error: which request field was wrong and why.
func FieldViolations(err error) []*errdetails.BadRequest_FieldViolation {
	st, ok := status.FromError(err)
	if !ok || st == nil {
		return nil
	}
	var out []*errdetails.BadRequest_FieldViolation
	for _, detail := range st.Details() {
		if bad, ok := detail.(*errdetails.BadRequest); ok {
			out = append(out, bad.GetFieldViolations()...)
		}
	}
	return out
}

// RetryDelay is the google.rpc.RetryInfo delay of an error (rate limits), if any.
func RetryDelay(err error) (time.Duration, bool) {
	st, ok := status.FromError(err)
	if !ok || st == nil {
		return 0, false
	}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.RetryInfo); ok && info.GetRetryDelay() != nil {
			return info.GetRetryDelay().AsDuration(), true
		}
	}
	return 0, false
}

// RunError is why a run did not succeed (Run.error, a google.rpc.Status) as a
// Go error that Reason and status.FromError understand; nil for a run without one.
func RunError(run *dispatcherv1.Run) error {
	if run.GetError() == nil || run.GetError().GetCode() == int32(codes.OK) {
		return nil
	}
	return status.FromProto(run.GetError()).Err()
}

// transient reports whether a failed call may succeed if made again unchanged:
// the server or the path to it was away, or it asked to be retried. Errors the
// server decided (a switchboard ErrorInfo) are final unless their reason says
// otherwise; transport failures (no ErrorInfo: a refused connection, a stream
// reset by a server going down) are not.
func transient(err error) bool {
	st, ok := status.FromError(err)
	if !ok {
		return false
	}
	info := errorInfoOf(st)
	if info == nil {
		switch st.Code() {
		case codes.Unavailable, codes.Canceled, codes.Internal, codes.Unknown, codes.Aborted,
			codes.DeadlineExceeded:
			return true
		}
		return false
	}
	switch commonv1.ErrorReason(commonv1.ErrorReason_value[info.GetReason()]) {
	case commonv1.ErrorReason_ERROR_REASON_UNAVAILABLE,
		commonv1.ErrorReason_ERROR_REASON_DEPENDENCY_UNAVAILABLE,
		commonv1.ErrorReason_ERROR_REASON_SUBSCRIBER_TOO_SLOW,
		commonv1.ErrorReason_ERROR_REASON_DEADLINE_EXCEEDED:
		return true
	}
	return st.Code() == codes.Unavailable
}
