package switchboard

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	authv1 "switchboard.dev/go/gen/switchboard/api/auth/v1"
)

// fakeAuth stands in for AuthService.RefreshToken: it rotates refresh tokens
// and, like the server, refuses a spent one.
type fakeAuth struct {
	mu      sync.Mutex
	clock   *fakeClock
	serial  int
	valid   string
	calls   atomic.Int32
	gate    chan struct{} // if not nil, each refresh waits for it
	started chan struct{} // closed when the first refresh begins
	once    sync.Once
	failure error // if not nil, each refresh fails with it
}

type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func (f *fakeAuth) pair() *authv1.TokenPair {
	f.serial++
	f.valid = fmt.Sprintf("refresh-%d", f.serial)
	return &authv1.TokenPair{
		AccessToken:           fmt.Sprintf("access-%d", f.serial),
		AccessTokenExpireTime: timestamppb.New(f.clock.Now().Add(15 * time.Minute)),
		RefreshToken:          f.valid,
		TokenType:             "Bearer",
	}
}

func (f *fakeAuth) refresh(ctx context.Context, token string) (*authv1.TokenPair, error) {
	f.calls.Add(1)
	f.once.Do(func() { close(f.started) })
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failure != nil {
		return nil, f.failure
	}
	if token != f.valid {
		return nil, status.Error(codes.Unauthenticated, "refresh token reuse detected")
	}
	return f.pair(), nil
}

func newSession(t *testing.T) (*Credentials, *fakeAuth, *[]*authv1.TokenPair) {
	t.Helper()
	clock := &fakeClock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	auth := &fakeAuth{clock: clock, started: make(chan struct{})}
	var seen []*authv1.TokenPair
	var mu sync.Mutex
	creds := SessionCredentials(auth.pair(), auth.refresh, func(p *authv1.TokenPair) {
		mu.Lock()
		seen = append(seen, p)
		mu.Unlock()
	})
	creds.now = clock.Now
	creds.WithRefreshAhead(time.Minute)
	return creds, auth, &seen
}

func TestAFreshTokenIsUsedAsIs(t *testing.T) {
	creds, auth, _ := newSession(t)
	auth.clock.Advance(13 * time.Minute)
	token, err := creds.Token(context.Background())
	if err != nil || token != "access-1" || auth.calls.Load() != 0 {
		t.Errorf("token %q err %v refreshes %d", token, err, auth.calls.Load())
	}
}

func TestTheTokenIsRefreshedOnceBeforeItExpiresHoweverManyCallsNeedIt(t *testing.T) {
	creds, auth, seen := newSession(t)
	auth.gate = make(chan struct{})
	auth.clock.Advance(14*time.Minute + 30*time.Second) // inside the last minute
	const callers = 50
	tokens := make(chan string, callers)
	var wg sync.WaitGroup
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			token, err := creds.Token(context.Background())
			if err != nil {
				t.Error(err)
			}
			tokens <- token
		}()
	}
	// Let the refresh finish only once it has been asked for; callers that
	// come later still find it in flight or its result in place.
	<-auth.started
	close(auth.gate)
	wg.Wait()
	close(tokens)
	for token := range tokens {
		if token != "access-2" {
			t.Errorf("a caller got %q", token)
		}
	}
	if auth.calls.Load() != 1 {
		t.Errorf("%d refreshes, want 1 (a second would present a spent token)", auth.calls.Load())
	}
	if len(*seen) != 1 || (*seen)[0].GetRefreshToken() != "refresh-2" || creds.Tokens().GetRefreshToken() != "refresh-2" {
		t.Errorf("the observer saw %v; current %v", *seen, creds.Tokens())
	}
}

func TestInvalidateRefreshesOnlyTheTokenThatWasRefused(t *testing.T) {
	creds, auth, _ := newSession(t)
	fresh, err := creds.Invalidate(context.Background(), "access-1")
	if err != nil || fresh != "access-2" {
		t.Fatalf("fresh %q err %v", fresh, err)
	}
	// A second call that failed with the same old token: already replaced.
	again, err := creds.Invalidate(context.Background(), "access-1")
	if err != nil || again != "access-2" || auth.calls.Load() != 1 {
		t.Errorf("again %q err %v refreshes %d", again, err, auth.calls.Load())
	}
}

func TestARefusedRefreshSignsOutForGood(t *testing.T) {
	creds, auth, _ := newSession(t)
	auth.failure = status.Error(codes.Unauthenticated, "session revoked")
	_, err := creds.Invalidate(context.Background(), "access-1")
	var signedOut *SignedOutError
	if !errors.Is(err, ErrSignedOut) || !errors.As(err, &signedOut) || status.Code(err) != codes.Unauthenticated {
		t.Fatalf("err %v", err)
	}
	if _, err := creds.Token(context.Background()); !errors.Is(err, ErrSignedOut) {
		t.Errorf("Token after sign-out: %v", err)
	}
	if auth.calls.Load() != 1 {
		t.Errorf("%d refreshes after being signed out", auth.calls.Load())
	}
}

func TestAnUnreachableServerKeepsTheStillValidToken(t *testing.T) {
	creds, auth, _ := newSession(t)
	auth.failure = status.Error(codes.Unavailable, "connection refused")
	auth.clock.Advance(14*time.Minute + 30*time.Second)
	token, err := creds.Token(context.Background())
	if err != nil || token != "access-1" {
		t.Fatalf("token %q err %v", token, err)
	}
	// Not retried on every call while the server is away.
	if _, err := creds.Token(context.Background()); err != nil || auth.calls.Load() != 1 {
		t.Errorf("err %v refreshes %d", err, auth.calls.Load())
	}
	auth.failure = nil
	auth.clock.Advance(10 * time.Second)
	if token, err := creds.Token(context.Background()); err != nil || token != "access-2" {
		t.Errorf("after the server came back: %q %v", token, err)
	}
}

func TestAnExpiredTokenIsNotSentWhenTheRefreshFails(t *testing.T) {
	creds, auth, _ := newSession(t)
	auth.failure = status.Error(codes.Unavailable, "connection refused")
	auth.clock.Advance(16 * time.Minute)
	if token, err := creds.Token(context.Background()); err == nil || token != "" {
		t.Errorf("token %q err %v", token, err)
	}
}

func TestAWaitingCallerCanGiveUpWithoutAbandoningTheRefresh(t *testing.T) {
	creds, auth, _ := newSession(t)
	auth.gate = make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := creds.Invalidate(ctx, "access-1"); status.Code(err) != codes.Canceled {
		t.Fatalf("err %v", err)
	}
	close(auth.gate)
	// The refresh went on without the caller: its result is not lost.
	token, err := creds.Invalidate(context.Background(), "access-1")
	if err != nil || token != "access-2" || auth.calls.Load() != 1 {
		t.Errorf("token %q err %v refreshes %d", token, err, auth.calls.Load())
	}
}

func TestRequestMetadata(t *testing.T) {
	creds, _, _ := newSession(t)
	md, err := creds.GetRequestMetadata(context.Background())
	if err != nil || md["authorization"] != "Bearer access-1" {
		t.Errorf("md %v err %v", md, err)
	}
	key, err := APIKeyCredentials("sbk_x").GetRequestMetadata(context.Background())
	if err != nil || key["authorization"] != "Bearer sbk_x" {
		t.Errorf("md %v err %v", key, err)
	}
	if !creds.RequireTransportSecurity() || creds.AllowInsecure().RequireTransportSecurity() {
		t.Error("transport security requirement not as configured")
	}
}
