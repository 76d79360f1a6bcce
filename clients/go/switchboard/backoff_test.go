package switchboard

import (
	"testing"
	"time"
)

func TestBackoffGrowsToItsCap(t *testing.T) {
	b := Backoff{Initial: 100 * time.Millisecond, Max: time.Second, Multiplier: 2, Jitter: 0}
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for attempt, ms := range want {
		if got := b.Delay(attempt, nil); got != ms*time.Millisecond {
			t.Errorf("attempt %d: %v, want %v", attempt, got, ms*time.Millisecond)
		}
	}
	// Far beyond where Multiplier^attempt overflows a Duration.
	if got := b.Delay(10_000, nil); got != time.Second {
		t.Errorf("attempt 10000: %v, want the cap", got)
	}
}

func TestBackoffJitterStaysInItsBandAndUnderTheCap(t *testing.T) {
	b := Backoff{Initial: time.Second, Max: 4 * time.Second, Multiplier: 2, Jitter: 0.25}
	for _, r := range []float64{0, 0.25, 0.5, 0.999999} {
		random := func() float64 { return r }
		if got, low, high := b.Delay(0, random), 750*time.Millisecond, 1250*time.Millisecond; got < low || got > high {
			t.Errorf("r=%v: first delay %v outside [%v, %v]", r, got, low, high)
		}
		if got := b.Delay(5, random); got > 4*time.Second || got < 3*time.Second {
			t.Errorf("r=%v: capped delay %v outside [3s, 4s]", r, got)
		}
	}
	if b.Delay(0, func() float64 { return 0 }) == b.Delay(0, func() float64 { return 0.999 }) {
		t.Error("jitter does not move the delay")
	}
}

func TestBackoffZeroValueUsesTheDefaults(t *testing.T) {
	var b Backoff
	if got := b.Delay(0, func() float64 { return 0.5 }); got != DefaultBackoff.Initial {
		t.Errorf("first delay %v, want %v", got, DefaultBackoff.Initial)
	}
	if got := b.Delay(100, func() float64 { return 0.5 }); got != DefaultBackoff.Max {
		t.Errorf("late delay %v, want %v", got, DefaultBackoff.Max)
	}
}
