package switchboard

import (
	"context"
	"errors"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	authv1 "switchboard.dev/go/gen/switchboard/api/auth/v1"
)

// DefaultRefreshAhead is how long before its expiry an access token is
// replaced, at most: the refresh happens on the first call in that window.
const DefaultRefreshAhead = time.Minute

// minLifetime guards against a client clock running ahead of the server's:
// a token that looks already expired on arrival would otherwise be refreshed
// on every call.
const minLifetime = 10 * time.Second

// refreshTimeout bounds one RefreshToken call. It does not follow the caller's
// context: other calls may be waiting on the same refresh, and a refresh
// abandoned midway may have spent the refresh token without us learning its
// successor.
const refreshTimeout = 15 * time.Second

// RefreshFunc exchanges a refresh token for a new pair (AuthService.RefreshToken).
type RefreshFunc func(ctx context.Context, refreshToken string) (*authv1.TokenPair, error)

// publicMethods are called without credentials: they are how one gets some.
var publicMethods = map[string]bool{
	authv1.AuthService_Register_FullMethodName:     true,
	authv1.AuthService_Login_FullMethodName:        true,
	authv1.AuthService_RefreshToken_FullMethodName: true,
	authv1.AuthService_GetJwks_FullMethodName:      true,
}

func isPublic(method string) bool {
	return publicMethods[method] || strings.HasPrefix(method, "/grpc.health.v1.Health/")
}

// Credentials is what a client authenticates with: a session's rotating
// tokens, or an API key. It is a credentials.PerRPCCredentials, so it also
// works with a grpc.ClientConn you build yourself
// (grpc.WithPerRPCCredentials). Safe for concurrent use.
//
// A session's access token is refreshed shortly before it expires, by one
// RefreshToken call however many RPCs need it at that moment: refresh tokens
// rotate, and presenting a spent one again revokes the whole session.
type Credentials struct {
	apiKey       string
	refresh      RefreshFunc
	ahead        time.Duration
	onTokens     func(*authv1.TokenPair)
	requireTLS   bool
	now          func() time.Time
	refreshLimit time.Duration

	mu        sync.Mutex
	pair      *authv1.TokenPair
	expireAt  time.Time // local clock
	refreshAt time.Time // local clock
	flight    *flight
	signedOut error
}

type flight struct {
	done  chan struct{}
	token string
	err   error
}

// APIKeyCredentials authenticates every call with an API key (`sbk_...`).
func APIKeyCredentials(key string) *Credentials {
	return &Credentials{apiKey: key, requireTLS: true, now: time.Now}
}

// SessionCredentials authenticates with a session's TokenPair (from Login,
// Register or a pair saved earlier) and refreshes it through refresh.
// onTokens, if not nil, sees every new pair: save its refresh token if the
// session should survive the program, since the previous one is spent.
func SessionCredentials(pair *authv1.TokenPair, refresh RefreshFunc, onTokens func(*authv1.TokenPair)) *Credentials {
	c := &Credentials{
		refresh:      refresh,
		ahead:        DefaultRefreshAhead,
		onTokens:     onTokens,
		requireTLS:   true,
		now:          time.Now,
		refreshLimit: refreshTimeout,
	}
	c.setLocked(pair)
	return c
}

// setLocked installs a new pair and schedules its refresh: ahead of expiry by
// the configured margin, or by half the token's lifetime if that is shorter.
func (c *Credentials) setLocked(pair *authv1.TokenPair) {
	now := c.now()
	c.pair = proto.Clone(pair).(*authv1.TokenPair)
	lifetime := pair.GetAccessTokenExpireTime().AsTime().Sub(now)
	if lifetime < minLifetime {
		lifetime = minLifetime
	}
	ahead := c.ahead
	if ahead > lifetime/2 {
		ahead = lifetime / 2
	}
	c.expireAt = now.Add(lifetime)
	c.refreshAt = c.expireAt.Add(-ahead)
}

// Tokens is a copy of the current pair (nil for an API key).
func (c *Credentials) Tokens() *authv1.TokenPair {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pair == nil {
		return nil
	}
	return proto.Clone(c.pair).(*authv1.TokenPair)
}

// WithRefreshAhead changes how long before expiry the access token is
// replaced (at most half its lifetime). It returns c.
func (c *Credentials) WithRefreshAhead(d time.Duration) *Credentials {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ahead = d
	if c.pair != nil {
		c.setLocked(c.pair)
	}
	return c
}

// IsAPIKey reports whether these credentials are an API key.
func (c *Credentials) IsAPIKey() bool { return c.apiKey != "" }

// Token returns a credential to send now: the API key, or an access token
// that is not about to expire (refreshing it first if it is).
func (c *Credentials) Token(ctx context.Context) (string, error) {
	if c.apiKey != "" {
		return c.apiKey, nil
	}
	c.mu.Lock()
	if c.signedOut != nil {
		err := c.signedOut
		c.mu.Unlock()
		return "", err
	}
	now := c.now()
	current := c.pair.GetAccessToken()
	if now.Before(c.refreshAt) {
		c.mu.Unlock()
		return current, nil
	}
	stillValid := now.Before(c.expireAt)
	f := c.startLocked()
	c.mu.Unlock()
	token, err := c.wait(ctx, f)
	if err != nil && stillValid && !errors.Is(err, ErrSignedOut) && ctx.Err() == nil {
		// The refresh failed for now (server away), but the current token is
		// still good: use it; the next call tries again.
		return current, nil
	}
	return token, err
}

// Invalidate is called after the server refused stale with UNAUTHENTICATED:
// it returns a token to retry with, refreshing unless another call already
// replaced stale. An API key cannot be refreshed: the error is errNoRefresh.
func (c *Credentials) Invalidate(ctx context.Context, stale string) (string, error) {
	if c.apiKey != "" {
		return "", errNoRefresh
	}
	c.mu.Lock()
	if c.signedOut != nil {
		err := c.signedOut
		c.mu.Unlock()
		return "", err
	}
	if c.pair.GetAccessToken() != stale {
		token := c.pair.GetAccessToken()
		c.mu.Unlock()
		return token, nil
	}
	f := c.startLocked()
	c.mu.Unlock()
	return c.wait(ctx, f)
}

var errNoRefresh = errors.New("switchboard: these credentials cannot be refreshed")

// startLocked joins the refresh in flight or starts one.
func (c *Credentials) startLocked() *flight {
	if c.flight != nil {
		return c.flight
	}
	f := &flight{done: make(chan struct{})}
	c.flight = f
	spent := c.pair.GetRefreshToken()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), c.refreshLimit)
		pair, err := c.refresh(ctx, spent)
		cancel()
		c.mu.Lock()
		c.flight = nil
		switch {
		case err == nil:
			c.setLocked(pair)
			f.token = pair.GetAccessToken()
		case refused(err):
			c.signedOut = &SignedOutError{Err: err}
			f.err = c.signedOut
		default:
			// Try again soon, not on every call while the server is away.
			now := c.now()
			retry := c.expireAt.Sub(now) / 2
			if retry > 5*time.Second {
				retry = 5 * time.Second
			}
			c.refreshAt = now.Add(retry)
			f.err = err
		}
		c.mu.Unlock()
		if err == nil && c.onTokens != nil {
			c.onTokens(proto.Clone(pair).(*authv1.TokenPair))
		}
		close(f.done)
	}()
	return f
}

// refused: the server answered the RefreshToken call and said no, so the
// session is over (as opposed to not reaching the server).
func refused(err error) bool {
	switch status.Code(err) {
	case codes.Unauthenticated, codes.InvalidArgument, codes.PermissionDenied,
		codes.NotFound, codes.FailedPrecondition:
		return true
	}
	return false
}

func (c *Credentials) wait(ctx context.Context, f *flight) (string, error) {
	select {
	case <-f.done:
		return f.token, f.err
	case <-ctx.Done():
		return "", status.FromContextError(ctx.Err()).Err()
	}
}

// GetRequestMetadata implements credentials.PerRPCCredentials. Calls that
// obtain credentials (Login, Register, RefreshToken, GetJwks) go without:
// a RefreshToken call must not wait for the refresh it is.
func (c *Credentials) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	if info, ok := credentials.RequestInfoFromContext(ctx); ok && isPublic(info.Method) {
		return nil, nil
	}
	token, err := c.Token(ctx)
	if err != nil || token == "" {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + token}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials: bearer
// credentials are only sent over TLS unless AllowInsecure was called.
func (c *Credentials) RequireTransportSecurity() bool { return c.requireTLS }

// AllowInsecure lets these credentials travel over a plaintext connection
// (a server on loopback during development). It returns c.
func (c *Credentials) AllowInsecure() *Credentials {
	c.requireTLS = false
	return c
}

var _ credentials.PerRPCCredentials = (*Credentials)(nil)
