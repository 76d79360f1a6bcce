// Package switchboard is a Go client for the Switchboard mesh: it dials the
// server, signs in and keeps the access token fresh, sends messages and
// streams their runs, and follows the event log, resuming every stream where
// it broke off.
//
// The generated stubs stay available (Client.Auth, Client.Context,
// Client.Dispatcher, Client.Events); calls made through them carry the
// client's credentials too. Errors are gRPC statuses with google.rpc details:
// see Reason and FieldViolations.
//
// What is retried: transport failures (a refused connection, a stream cut by
// a server going down: a status without a switchboard ErrorInfo and code
// UNAVAILABLE, CANCELLED, INTERNAL, UNKNOWN, ABORTED or DEADLINE_EXCEEDED),
// and the server's own answers with code UNAVAILABLE or reason UNAVAILABLE,
// DEPENDENCY_UNAVAILABLE, SUBSCRIBER_TOO_SLOW or DEADLINE_EXCEEDED. Anything
// else the server decided is returned at once.
package switchboard

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	authv1 "switchboard.dev/go/gen/switchboard/api/auth/v1"
	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	eventsv1 "switchboard.dev/go/gen/switchboard/api/events/v1"
)

// DefaultCallTimeout bounds a unary call made without a deadline of its own.
const DefaultCallTimeout = 30 * time.Second

// DefaultIdleTimeout is how long a stream may stay silent before it is taken
// for dead and resumed. Servers send a heartbeat every 15 s by default.
const DefaultIdleTimeout = 60 * time.Second

// Client is a connection to a Switchboard server with the credentials it
// calls with. Safe for concurrent use; Close it when done.
type Client struct {
	Auth       authv1.AuthServiceClient
	Context    contextv1.ContextServiceClient
	Dispatcher dispatcherv1.DispatcherServiceClient
	Events     eventsv1.EventServiceClient

	conn *grpc.ClientConn
	opts options

	mu    sync.Mutex
	creds *Credentials
}

type options struct {
	tls          *tls.Config
	insecure     bool
	dial         []grpc.DialOption
	callTimeout  time.Duration
	idleTimeout  time.Duration
	refreshAhead time.Duration
	onTokens     func(*authv1.TokenPair)
	clientInfo   *authv1.ClientInfo
	backoff      Backoff
}

// Option configures Dial.
type Option func(*options)

// WithInsecure dials without TLS (a server on loopback during development).
// Credentials then travel in clear.
func WithInsecure() Option { return func(o *options) { o.insecure = true } }

// WithTLSConfig dials with this TLS configuration (default: the system's
// roots, the target's host name).
func WithTLSConfig(config *tls.Config) Option { return func(o *options) { o.tls = config } }

// WithDialOptions adds grpc.DialOptions (interceptors, a resolver, ...).
func WithDialOptions(dial ...grpc.DialOption) Option {
	return func(o *options) { o.dial = append(o.dial, dial...) }
}

// WithCallTimeout bounds each unary call that has no deadline of its own.
func WithCallTimeout(d time.Duration) Option { return func(o *options) { o.callTimeout = d } }

// WithIdleTimeout sets how long a stream may go without a frame (heartbeats
// included) before it is abandoned and resumed.
func WithIdleTimeout(d time.Duration) Option { return func(o *options) { o.idleTimeout = d } }

// WithRefreshAhead sets how long before expiry an access token is replaced.
func WithRefreshAhead(d time.Duration) Option { return func(o *options) { o.refreshAhead = d } }

// WithTokenObserver is called with every TokenPair the client receives (sign
// in and each refresh), one call at a time but not always on the caller's
// goroutine. Refresh tokens rotate: persist the newest one.
func WithTokenObserver(f func(*authv1.TokenPair)) Option {
	return func(o *options) { o.onTokens = f }
}

// WithClientInfo is what the client reports about itself when it signs in.
func WithClientInfo(info *authv1.ClientInfo) Option {
	return func(o *options) { o.clientInfo = info }
}

// WithBackoff sets how resuming streams and retried calls space out attempts.
func WithBackoff(b Backoff) Option { return func(o *options) { o.backoff = b } }

// Dial creates a client for target ("host:port"). It does not connect yet:
// the first call does, and a server that is down shows up as UNAVAILABLE
// errors that the resuming helpers retry.
func Dial(target string, opts ...Option) (*Client, error) {
	c := &Client{opts: options{
		callTimeout:  DefaultCallTimeout,
		idleTimeout:  DefaultIdleTimeout,
		refreshAhead: DefaultRefreshAhead,
		clientInfo:   &authv1.ClientInfo{UserAgent: "switchboard-go"},
		backoff:      DefaultBackoff,
	}}
	for _, opt := range opts {
		opt(&c.opts)
	}
	transport := credentials.NewTLS(c.opts.tls)
	if c.opts.insecure {
		transport = insecure.NewCredentials()
	}
	dial := append([]grpc.DialOption{
		grpc.WithTransportCredentials(transport),
		// grpc-go's reconnect backoff grows to 120 s: a server back after a restart
		// would be left alone that long. Capped at 3 s, as the Python client's; a
		// caller's WithDialOptions come later and override it.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: grpcbackoff.Config{
				BaseDelay:  250 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   3 * time.Second,
			},
			MinConnectTimeout: 20 * time.Second,
		}),
		grpc.WithChainUnaryInterceptor(c.unary),
		grpc.WithChainStreamInterceptor(c.stream),
	}, c.opts.dial...)
	conn, err := grpc.NewClient(target, dial...)
	if err != nil {
		return nil, err
	}
	c.conn = conn
	c.Auth = authv1.NewAuthServiceClient(conn)
	c.Context = contextv1.NewContextServiceClient(conn)
	c.Dispatcher = dispatcherv1.NewDispatcherServiceClient(conn)
	c.Events = eventsv1.NewEventServiceClient(conn)
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Conn is the underlying connection, for stubs of other services.
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// Credentials are what the client calls with now (nil before signing in).
func (c *Client) Credentials() *Credentials {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.creds
}

// UseCredentials replaces the client's credentials.
func (c *Client) UseCredentials(creds *Credentials) {
	c.mu.Lock()
	c.creds = creds
	c.mu.Unlock()
}

// UseAPIKey makes every call authenticate with an API key.
func (c *Client) UseAPIKey(key string) {
	c.UseCredentials(APIKeyCredentials(key))
}

// UseTokens resumes a session from a TokenPair saved earlier.
func (c *Client) UseTokens(pair *authv1.TokenPair) {
	refresh := func(ctx context.Context, token string) (*authv1.TokenPair, error) {
		response, err := c.Auth.RefreshToken(ctx, &authv1.RefreshTokenRequest{RefreshToken: token})
		if err != nil {
			return nil, err
		}
		return response.GetTokens(), nil
	}
	creds := SessionCredentials(pair, refresh, c.opts.onTokens).WithRefreshAhead(c.opts.refreshAhead)
	c.UseCredentials(creds)
}

// Login signs in with an email and password; later calls use the new session.
func (c *Client) Login(ctx context.Context, email, password string) (*authv1.LoginResponse, error) {
	response, err := c.Auth.Login(ctx, &authv1.LoginRequest{
		Credential: &authv1.LoginRequest_Password{Password: &authv1.PasswordCredential{
			Email: email, Password: password,
		}},
		ClientInfo: c.opts.clientInfo,
	})
	if err != nil {
		return nil, err
	}
	c.signedIn(response.GetTokens())
	return response, nil
}

// Register creates a user and signs in as it.
func (c *Client) Register(ctx context.Context, email, password, displayName string) (*authv1.RegisterResponse, error) {
	response, err := c.Auth.Register(ctx, &authv1.RegisterRequest{
		Email: email, Password: password, DisplayName: displayName, ClientInfo: c.opts.clientInfo,
	})
	if err != nil {
		return nil, err
	}
	c.signedIn(response.GetTokens())
	return response, nil
}

func (c *Client) signedIn(pair *authv1.TokenPair) {
	c.UseTokens(pair)
	if c.opts.onTokens != nil {
		c.opts.onTokens(pair)
	}
}

// Logout ends the session and forgets its tokens.
func (c *Client) Logout(ctx context.Context) error {
	_, err := c.Auth.Logout(ctx, &authv1.LogoutRequest{})
	c.UseCredentials(nil)
	return err
}

// tokenSlot lets a stream's opener learn which token the interceptor sent, to
// name it in Invalidate if the server refuses it.
type tokenSlot struct{}

func withTokenSlot(ctx context.Context, slot *string) context.Context {
	return context.WithValue(ctx, tokenSlot{}, slot)
}

func bearer(ctx context.Context, token string) context.Context {
	if token == "" {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

// unary adds the routing header (AffinityHeader) when the request names a
// conversation, a deadline if the call has none, the credentials, and retries
// once with a refreshed token if the server says UNAUTHENTICATED (the call was
// refused before it did anything, so the retry is safe for any method).
func (c *Client) unary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
	invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	ctx = WithAffinity(ctx, Affinity(req))
	if _, ok := ctx.Deadline(); !ok && c.opts.callTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.opts.callTimeout)
		defer cancel()
	}
	creds := c.Credentials()
	if creds == nil || isPublic(method) {
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	token, err := creds.Token(ctx)
	if err != nil {
		return err
	}
	err = invoker(bearer(ctx, token), method, req, reply, cc, opts...)
	if status.Code(err) != codes.Unauthenticated || creds.IsAPIKey() {
		return err
	}
	fresh, refreshErr := creds.Invalidate(ctx, token)
	if refreshErr != nil {
		if errors.Is(refreshErr, ErrSignedOut) {
			return refreshErr
		}
		return err
	}
	return invoker(bearer(ctx, fresh), method, req, reply, cc, opts...)
}

func (c *Client) stream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
	method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	creds := c.Credentials()
	if creds == nil || isPublic(method) {
		return streamer(ctx, desc, cc, method, opts...)
	}
	token, err := creds.Token(ctx)
	if err != nil {
		return nil, err
	}
	if slot, ok := ctx.Value(tokenSlot{}).(*string); ok {
		*slot = token
	}
	return streamer(bearer(ctx, token), desc, cc, method, opts...)
}

// reauthenticate handles UNAUTHENTICATED on a stream: a refreshed token to
// resume with, or the error to give up with.
func (c *Client) reauthenticate(ctx context.Context, used string, cause error) error {
	creds := c.Credentials()
	if creds == nil {
		return cause
	}
	if _, err := creds.Invalidate(ctx, used); err != nil {
		if errors.Is(err, ErrSignedOut) {
			return err
		}
		return cause
	}
	return nil
}

// NewRequestID returns a fresh idempotency key for request_id fields.
func NewRequestID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("switchboard: no randomness: %v", err))
	}
	return "go-" + hex.EncodeToString(b[:])
}

// maxCallAttempts bounds Retry: a server away for longer than the backoff
// spans (about a minute by default) is reported, not waited for forever.
const maxCallAttempts = 10

// Retry calls attempt until it succeeds, fails with an error that is not
// transient (see the package doc), runs out of attempts (10), or ctx is done;
// it waits with the client's backoff in between. Only for calls that are safe
// to repeat: reads, or writes carrying a request_id (an idempotency key: the
// server answers a repeated id with the first result).
func (c *Client) Retry(ctx context.Context, attempt func(context.Context) error) error {
	backoff := c.opts.backoff
	for n := 0; ; n++ {
		err := attempt(ctx)
		if err == nil || !transient(err) || ctx.Err() != nil || n+1 >= maxCallAttempts {
			return err
		}
		if err := sleep(ctx, backoff.Delay(n, nil)); err != nil {
			return err
		}
	}
}
