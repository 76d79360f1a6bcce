package switchboard

import (
	"context"
	"math"
	"math/rand/v2"
	"time"
)

// Backoff spaces out reconnection attempts: Initial, then Multiplier times
// longer each attempt, never more than Max, each delay moved by up to
// ±Jitter of itself at random so that many clients cut off by the same
// server restart do not all come back in the same instant.
type Backoff struct {
	Initial    time.Duration
	Max        time.Duration
	Multiplier float64
	Jitter     float64 // 0 to 1
}

// DefaultBackoff is what resuming streams use unless told otherwise.
var DefaultBackoff = Backoff{
	Initial:    200 * time.Millisecond,
	Max:        15 * time.Second,
	Multiplier: 2,
	Jitter:     0.2,
}

func (b Backoff) orDefault() Backoff {
	if b.Initial <= 0 {
		b.Initial = DefaultBackoff.Initial
	}
	if b.Max <= 0 {
		b.Max = DefaultBackoff.Max
	}
	if b.Max < b.Initial {
		b.Max = b.Initial
	}
	if b.Multiplier < 1 {
		b.Multiplier = DefaultBackoff.Multiplier
	}
	if b.Jitter < 0 || b.Jitter > 1 {
		b.Jitter = DefaultBackoff.Jitter
	}
	return b
}

// Delay is how long to wait before retry number attempt (0 for the first
// retry). random returns values in [0, 1); nil means math/rand.
func (b Backoff) Delay(attempt int, random func() float64) time.Duration {
	b = b.orDefault()
	if random == nil {
		random = rand.Float64
	}
	if attempt < 0 {
		attempt = 0
	}
	// Computed in float64 and capped before converting: Multiplier^attempt
	// overflows a Duration long before attempt stops growing.
	base := float64(b.Initial) * math.Pow(b.Multiplier, float64(attempt))
	if base > float64(b.Max) || math.IsInf(base, 0) || math.IsNaN(base) {
		base = float64(b.Max)
	}
	delay := base * (1 + b.Jitter*(2*random()-1))
	if delay > float64(b.Max) {
		delay = float64(b.Max)
	}
	if delay < 0 {
		delay = 0
	}
	return time.Duration(delay)
}

// sleep waits d or until ctx is done, whichever comes first.
func sleep(ctx context.Context, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return nil
	}
}
