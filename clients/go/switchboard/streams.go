package switchboard

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// watchdog cancels a stream attempt that has received nothing for idle: a
// connection can die without either end noticing (a NAT dropping it, a host
// gone), and the server's heartbeats make silence a reliable sign.
type watchdog struct {
	idle  time.Duration
	timer *time.Timer
	fired atomic.Bool
}

func startWatchdog(idle time.Duration, cancel context.CancelFunc) *watchdog {
	w := &watchdog{idle: idle}
	w.timer = time.AfterFunc(idle, func() {
		w.fired.Store(true)
		cancel()
	})
	return w
}

func (w *watchdog) kick() { w.timer.Reset(w.idle) }

func (w *watchdog) stop() { w.timer.Stop() }

// explain turns the cancellation the watchdog caused into the transient
// error it stands for.
func (w *watchdog) explain(err error) error {
	if w.fired.Load() {
		return status.Errorf(codes.Unavailable, "switchboard: no frame from the server for %s", w.idle)
	}
	return err
}

// handlerError carries an error returned by the caller's callback, which ends
// a resuming loop as it is instead of being retried.
type handlerError struct{ err error }

func (e *handlerError) Error() string { return e.err.Error() }
func (e *handlerError) Unwrap() error { return e.err }

func callbackError(err error) (error, bool) {
	var h *handlerError
	if errors.As(err, &h) {
		return h.err, true
	}
	return nil, false
}

// errStreamEnded: the server closed a stream that should have gone on
// (a replica draining for shutdown, a proxy's limit).
var errStreamEnded = status.Error(codes.Unavailable, "switchboard: the stream ended early")
