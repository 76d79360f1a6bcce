// Command quickstart signs in to a Switchboard server, creates a workspace and
// a conversation, sends a message and prints the answer as it streams (with
// -steer, steering the run while it goes and watching what became of the
// steer; with -assistant and -tree, the child runs its delegates answered in,
// each followed to its end and the whole tree listed), then follows the conversation's events, resuming after every
// disconnect.
//
// It writes one JSON object per line on stdout, one for each thing it saw
// (pipe it to jq), and exits 0 when done, 1 on an error (an "error" line
// says which step failed and why), 2 on bad usage.
//
//	go run ./examples/quickstart -addr 127.0.0.1:50051 -plaintext \
//	    -email you@example.com -register -message "Hello there"
//
// The password comes from -password or SB_PASSWORD; an API key
// (-api-key or SB_API_KEY) replaces email and password.
// (SB_, not SWITCHBOARD_: the server refuses SWITCHBOARD_ variables it does
// not know, and a shell that runs both would hand it these.)
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"

	authv1 "switchboard.dev/go/gen/switchboard/api/auth/v1"
	commonv1 "switchboard.dev/go/gen/switchboard/api/common/v1"
	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	eventsv1 "switchboard.dev/go/gen/switchboard/api/events/v1"
	"switchboard.dev/go/switchboard"
)

type params map[string]string

func (p params) String() string { return fmt.Sprint(map[string]string(p)) }

func (p params) Set(value string) error {
	key, val, ok := strings.Cut(value, "=")
	if !ok || key == "" {
		return errors.New("want key=value")
	}
	p[key] = val
	return nil
}

type config struct {
	addr, ca, serverName                string
	plaintext                           bool
	email, password, apiKey             string
	register                            bool
	tokensFile                          string
	workspace, workspaceID              string
	conversation                        string
	message, handler, assistant         string
	tree                                bool
	steer                               string
	params                              params
	runTimeout                          time.Duration
	follow                              bool
	afterCursor                         string
	maxEvents                           int
	followFor                           time.Duration
	idleTimeout, minBackoff, maxBackoff time.Duration
}

func parseFlags() config {
	c := config{params: params{}}
	flag.StringVar(&c.addr, "addr", "127.0.0.1:50051", "server address, host:port")
	flag.BoolVar(&c.plaintext, "plaintext", false, "no TLS (a local development server)")
	flag.StringVar(&c.ca, "ca", "", "PEM file of the CA that signed the server's certificate (default: the system's)")
	flag.StringVar(&c.serverName, "server-name", "", "name to verify the server's certificate against")
	flag.StringVar(&c.email, "email", "", "sign in with this email (password from -password or SB_PASSWORD)")
	flag.StringVar(&c.password, "password", "", "password (default: $SB_PASSWORD)")
	flag.BoolVar(&c.register, "register", false, "create the user first (signs in if it exists)")
	flag.StringVar(&c.tokensFile, "tokens-file", "", "keep the session in this file: resumed from it if present, rewritten at every refresh")
	flag.StringVar(&c.apiKey, "api-key", "", "call with an API key instead of signing in (default: $SB_API_KEY)")
	flag.StringVar(&c.workspace, "workspace", "", "use this workspace, workspaces/{w} (default: create one)")
	flag.StringVar(&c.workspaceID, "workspace-id", "", "id for the workspace to create (default: the server picks)")
	flag.StringVar(&c.conversation, "conversation", "", "use this conversation, workspaces/{w}/conversations/{c} (default: create one)")
	flag.StringVar(&c.message, "message", "Hello from Go", "the message to send")
	flag.StringVar(&c.handler, "handler", "", "force a handler, handlers/{h} (default: the router picks)")
	flag.StringVar(&c.assistant, "assistant", "", "send to this assistant, workspaces/{w}/assistants/{a}")
	flag.BoolVar(&c.tree, "tree", false, "after the run, watch each child run it started (its delegates' answers) and print the run tree")
	flag.StringVar(&c.steer, "steer", "", "steer the run with this message as soon as it is sent (SteerRun), and watch the steer's run too")
	flag.Var(c.params, "param", "handler parameter key=value (repeatable; numbers, true and false are typed)")
	flag.DurationVar(&c.runTimeout, "run-timeout", 5*time.Minute, "give up watching the run after this long")
	flag.BoolVar(&c.follow, "follow", true, "after the answer, follow the conversation's events")
	flag.StringVar(&c.afterCursor, "after-cursor", "", "follow from after this cursor (default: from now)")
	flag.IntVar(&c.maxEvents, "max-events", 0, "stop after this many events (0: until interrupted)")
	flag.DurationVar(&c.followFor, "follow-for", 0, "stop following after this long (0: until interrupted)")
	flag.DurationVar(&c.idleTimeout, "idle-timeout", switchboard.DefaultIdleTimeout, "resume a stream silent for this long")
	flag.DurationVar(&c.minBackoff, "min-backoff", switchboard.DefaultBackoff.Initial, "first wait before resuming a broken stream")
	flag.DurationVar(&c.maxBackoff, "max-backoff", switchboard.DefaultBackoff.Max, "longest wait before resuming a broken stream")
	flag.Parse()
	// From the environment, not as flag defaults: -h would print them.
	if c.password == "" {
		c.password = os.Getenv("SB_PASSWORD")
	}
	if c.apiKey == "" {
		c.apiKey = os.Getenv("SB_API_KEY")
	}
	if flag.NArg() != 0 || (c.apiKey == "" && c.tokensFile == "" && (c.email == "" || c.password == "")) {
		fmt.Fprintln(os.Stderr, "usage: quickstart [flags]; needs -email and a password, an API key, or -tokens-file")
		flag.PrintDefaults()
		os.Exit(2)
	}
	return c
}

// out writes the JSON lines; token refreshes report from another goroutine.
type out struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (o *out) emit(kind string, fields map[string]any) {
	line := map[string]any{"kind": kind}
	for k, v := range fields {
		line[k] = v
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	_ = o.enc.Encode(line) // stdout gone: nothing better to do
}

// failure describes an error the way a program would branch on it: its code,
// its switchboard reason and the request fields it names.
func failure(step string, err error) map[string]any {
	fields := map[string]any{"step": step, "error": err.Error(), "code": status.Code(err).String()}
	if reason := switchboard.Reason(err); reason != commonv1.ErrorReason_ERROR_REASON_UNSPECIFIED {
		fields["reason"] = reason.String()
	}
	var violations []map[string]string
	for _, v := range switchboard.FieldViolations(err) {
		violations = append(violations, map[string]string{"field": v.GetField(), "description": v.GetDescription()})
	}
	if violations != nil {
		fields["violations"] = violations
	}
	if errors.Is(err, switchboard.ErrSignedOut) {
		fields["signed_out"] = true
	}
	return fields
}

func main() {
	cfg := parseFlags()
	o := &out{enc: json.NewEncoder(os.Stdout)}
	// Interrupting (Ctrl-C, SIGTERM) ends the program cleanly, mid-stream too.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if step, err := run(ctx, cfg, o); err != nil {
		o.emit("error", failure(step, err))
		os.Exit(1)
	}
	o.emit("done", nil)
}

func dialOptions(cfg config, o *out) ([]switchboard.Option, error) {
	opts := []switchboard.Option{
		switchboard.WithClientInfo(&authv1.ClientInfo{UserAgent: "switchboard-go-quickstart"}),
		switchboard.WithIdleTimeout(cfg.idleTimeout),
		switchboard.WithBackoff(switchboard.Backoff{
			Initial: cfg.minBackoff, Max: cfg.maxBackoff,
			Multiplier: switchboard.DefaultBackoff.Multiplier, Jitter: switchboard.DefaultBackoff.Jitter,
		}),
		switchboard.WithTokenObserver(func(pair *authv1.TokenPair) {
			// Refresh tokens rotate: the previous one is spent now, so the
			// newest pair is what a later run must resume with.
			if cfg.tokensFile != "" {
				if err := saveTokens(cfg.tokensFile, pair); err != nil {
					o.emit("warning", map[string]any{"error": "saving the session: " + err.Error()})
				}
			}
			// Never print the secrets; only that a new pair came.
			o.emit("new_tokens", map[string]any{
				"access_token_expire_time": pair.GetAccessTokenExpireTime().AsTime().Format(time.RFC3339),
			})
		}),
	}
	if cfg.plaintext {
		return append(opts, switchboard.WithInsecure()), nil
	}
	config := &tls.Config{ServerName: cfg.serverName, MinVersion: tls.VersionTLS12}
	if cfg.ca != "" {
		pem, err := os.ReadFile(cfg.ca)
		if err != nil {
			return nil, err
		}
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no certificate in %s", cfg.ca)
		}
	}
	return append(opts, switchboard.WithTLSConfig(config)), nil
}

func run(ctx context.Context, cfg config, o *out) (string, error) {
	opts, err := dialOptions(cfg, o)
	if err != nil {
		return "dial", err
	}
	client, err := switchboard.Dial(cfg.addr, opts...)
	if err != nil {
		return "dial", err
	}
	defer client.Close()

	if err := signIn(ctx, client, cfg, o); err != nil {
		return "sign_in", err
	}
	conversation, err := setUp(ctx, client, cfg, o)
	if err != nil {
		return "set_up", err
	}
	if step, err := ask(ctx, client, cfg, conversation, o); err != nil {
		return step, err
	}
	if cfg.follow {
		if err := follow(ctx, client, cfg, conversation, o); err != nil {
			return "follow", err
		}
	}
	return "", nil
}

// saveTokens writes the session where only its owner can read it, replacing
// the file in one step so that a crash never leaves half a refresh token.
func saveTokens(path string, pair *authv1.TokenPair) error {
	data, err := protojson.Marshal(pair)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func loadTokens(path string) (*authv1.TokenPair, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pair := &authv1.TokenPair{}
	return pair, protojson.Unmarshal(data, pair)
}

func signIn(ctx context.Context, client *switchboard.Client, cfg config, o *out) error {
	if cfg.tokensFile != "" && cfg.apiKey == "" {
		pair, err := loadTokens(cfg.tokensFile)
		switch {
		case err == nil:
			// A saved access token may have expired or been refused since: the
			// client refreshes it (ahead of expiry, or once UNAUTHENTICATED).
			client.UseTokens(pair)
			me, err := client.Auth.GetPrincipal(ctx, &authv1.GetPrincipalRequest{})
			if err != nil {
				return err
			}
			o.emit("signed_in", map[string]any{
				"user": me.GetPrincipal().GetUser(), "session": me.GetPrincipal().GetSession(), "method": "saved_session",
			})
			return nil
		case !errors.Is(err, os.ErrNotExist):
			return err
		case cfg.email == "" || cfg.password == "":
			return fmt.Errorf("no saved session in %s, and no -email and password to start one", cfg.tokensFile)
		}
	}
	if cfg.apiKey != "" {
		client.UseAPIKey(cfg.apiKey)
		me, err := client.Auth.GetPrincipal(ctx, &authv1.GetPrincipalRequest{})
		if err != nil {
			return err
		}
		o.emit("signed_in", map[string]any{"user": me.GetPrincipal().GetUser(), "method": "api_key"})
		return nil
	}
	if cfg.register {
		registered, err := client.Register(ctx, cfg.email, cfg.password, "")
		if err == nil {
			o.emit("signed_in", map[string]any{
				"user": registered.GetUser().GetName(), "session": registered.GetSession().GetName(), "method": "register",
			})
			return nil
		}
		if status.Code(err) != codes.AlreadyExists {
			return err
		}
	}
	login, err := client.Login(ctx, cfg.email, cfg.password)
	if err != nil {
		return err
	}
	o.emit("signed_in", map[string]any{
		"user": login.GetUser().GetName(), "session": login.GetSession().GetName(), "method": "password",
	})
	return nil
}

// setUp creates the workspace and conversation unless given. Creates carry a
// request id, so a retry after a lost answer does not make a second one.
func setUp(ctx context.Context, client *switchboard.Client, cfg config, o *out) (string, error) {
	workspace := cfg.workspace
	if workspace == "" && cfg.conversation == "" {
		request := &contextv1.CreateWorkspaceRequest{
			Workspace:   &contextv1.Workspace{DisplayName: "Go quickstart"},
			WorkspaceId: cfg.workspaceID,
			RequestId:   switchboard.NewRequestID(),
		}
		var created *contextv1.CreateWorkspaceResponse
		err := client.Retry(ctx, func(ctx context.Context) (err error) {
			created, err = client.Context.CreateWorkspace(ctx, request)
			return err
		})
		if err != nil {
			return "", err
		}
		workspace = created.GetWorkspace().GetName()
		o.emit("workspace", map[string]any{"name": workspace})
	}
	conversation := cfg.conversation
	if conversation == "" {
		request := &contextv1.CreateConversationRequest{
			Parent:       workspace,
			Conversation: &contextv1.Conversation{Title: "Go quickstart"},
			RequestId:    switchboard.NewRequestID(),
		}
		var created *contextv1.CreateConversationResponse
		err := client.Retry(ctx, func(ctx context.Context) (err error) {
			created, err = client.Context.CreateConversation(ctx, request)
			return err
		})
		if err != nil {
			return "", err
		}
		conversation = created.GetConversation().GetName()
		o.emit("conversation", map[string]any{"name": conversation})
	}
	return conversation, nil
}

// typed reads a -param value as the JSON-ish type it looks like.
func typed(value string) *structpb.Value {
	if n, err := strconv.ParseFloat(value, 64); err == nil {
		return structpb.NewNumberValue(n)
	}
	if b, err := strconv.ParseBool(value); err == nil {
		return structpb.NewBoolValue(b)
	}
	return structpb.NewStringValue(value)
}

// ask sends the message, steers its run with -steer, and watches the run (and
// then the steer's) to the end; the step that failed, if one did.
func ask(ctx context.Context, client *switchboard.Client, cfg config, conversation string, o *out) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, cfg.runTimeout)
	defer cancel()
	request := &dispatcherv1.SendMessageRequest{
		Conversation: conversation,
		Message: &contextv1.Message{Parts: []*contextv1.ContentPart{
			{Part: &contextv1.ContentPart_Text{Text: cfg.message}},
		}},
		Handler:   cfg.handler,
		Assistant: cfg.assistant,
		RequestId: switchboard.NewRequestID(),
	}
	if len(cfg.params) > 0 {
		request.Parameters = &structpb.Struct{Fields: map[string]*structpb.Value{}}
		for k, v := range cfg.params {
			request.Parameters.Fields[k] = typed(v)
		}
	}
	sent, err := client.SendMessage(ctx, request)
	if err != nil {
		return "ask", err
	}
	name := sent.GetRun().GetName()
	o.emit("sent", map[string]any{
		"run": name, "message": sent.GetMessage().GetName(), "request_id": request.GetRequestId(),
	})
	var steer string
	if cfg.steer != "" {
		steered, err := client.SteerRun(ctx, &dispatcherv1.SteerRunRequest{
			Run: name,
			Message: &contextv1.Message{Parts: []*contextv1.ContentPart{
				{Part: &contextv1.ContentPart_Text{Text: cfg.steer}},
			}},
		})
		if err != nil {
			return "steer", err
		}
		steer = steered.GetRun().GetName()
		o.emit("steered", map[string]any{
			"run": steer, "message": steered.GetMessage().GetName(),
			"target": steered.GetRun().GetSteer().GetTarget(),
			"state":  steered.GetRun().GetState().String(), "steer_state": steered.GetRun().GetSteer().GetState().String(),
		})
	}
	children, err := watch(ctx, client, name, "run_done", o)
	if err != nil {
		return "ask", err
	}
	if cfg.tree {
		if err := tree(ctx, client, name, children, o); err != nil {
			return "tree", err
		}
	}
	if steer != "" {
		if _, err := watch(ctx, client, steer, "steer_done", o); err != nil {
			return "steer", err
		}
	}
	return "", nil
}

// tree follows each child run the parent's updates named (children, in the
// order they started) to its end, as a line of kind child_done, then prints
// the run tree as GetRun and ListRuns by parent show it, as a line of kind tree.
func tree(ctx context.Context, client *switchboard.Client, parent string, children []string, o *out) error {
	for _, child := range children {
		if _, err := watch(ctx, client, child, "child_done", o); err != nil {
			return err
		}
	}
	got, err := client.Tree(ctx, parent)
	if err != nil {
		return err
	}
	var runs []map[string]any
	for _, run := range got.Walk() {
		runs = append(runs, map[string]any{
			"run": run.GetName(), "parent": run.GetParent(), "parent_tool_call": run.GetParentToolCall(),
			"depth": run.GetDepth(), "state": run.GetState().String(), "assistant": run.GetAssistant(),
		})
	}
	o.emit("tree", map[string]any{"runs": runs})
	return nil
}

// watch prints a run's updates as they stream and then how it ended, as a
// line of kind done; the child runs its updates named, in the order they started.
func watch(ctx context.Context, client *switchboard.Client, name, done string, o *out) ([]string, error) {
	var transcript switchboard.Transcript
	var children []string
	run, err := client.WatchRun(ctx, name, switchboard.WatchOptions{
		OnChild: func(child *dispatcherv1.ChildRun) {
			if !switchboard.Terminal(child.GetState()) {
				children = append(children, child.GetRun())
			}
		},
		OnRetry: func(err error, delay time.Duration, after int64) {
			o.emit("watch_retry", map[string]any{
				"code": status.Code(err).String(), "error": err.Error(),
				"after_sequence": after, "delay_ms": delay.Milliseconds(),
			})
		},
	}, func(update *dispatcherv1.RunUpdate) error {
		transcript.Add(update)
		// A merged delta covers first_sequence .. sequence (the deltas ready together).
		line := map[string]any{"sequence": update.GetSequence(), "first_sequence": switchboard.FirstSequence(update)}
		switch u := update.GetUpdate().(type) {
		case *dispatcherv1.RunUpdate_StateChange:
			line["update"], line["state"] = "state_change", u.StateChange.GetRun().GetState().String()
		case *dispatcherv1.RunUpdate_Delta:
			line["update"], line["text"] = "delta", u.Delta.GetText()
		case *dispatcherv1.RunUpdate_Progress:
			line["update"], line["stage"] = "progress", u.Progress.GetStage()
		case *dispatcherv1.RunUpdate_Result:
			line["update"] = "result"
		case *dispatcherv1.RunUpdate_ToolCall:
			line["update"], line["tool"] = "tool_call", u.ToolCall.GetTool()
		case *dispatcherv1.RunUpdate_ToolResult:
			line["update"] = "tool_result"
		case *dispatcherv1.RunUpdate_Steer:
			line["update"], line["steer_state"] = "steer", u.Steer.GetState().String()
			line["steer_run"] = u.Steer.GetSteerRun()
		case *dispatcherv1.RunUpdate_ChildRun:
			line["update"], line["child"] = "child_run", u.ChildRun.GetRun()
			line["tool_call_id"], line["child_state"] = u.ChildRun.GetToolCallId(), u.ChildRun.GetState().String()
			line["assistant"] = u.ChildRun.GetAssistant()
			if childErr := switchboard.ChildError(u.ChildRun); childErr != nil {
				line["code"] = status.Code(childErr).String()
			}
		}
		line["run"] = update.GetRun()
		o.emit("run_update", line)
		return nil
	})
	if err != nil {
		return nil, err
	}
	ended := map[string]any{
		"run": run.GetName(), "state": run.GetState().String(), "answer": transcript.Text(),
		"output_message": run.GetOutputMessage(), "parent": run.GetParent(), "depth": run.GetDepth(),
	}
	if steer := run.GetSteer(); steer != nil {
		ended["steer_state"], ended["steer_step"] = steer.GetState().String(), steer.GetStep()
	}
	// Run.error is a google.rpc.Status: status.FromProto reads its details.
	if runErr := switchboard.RunError(run); runErr != nil {
		ended["code"] = status.Code(runErr).String()
		ended["reason"] = switchboard.Reason(runErr).String()
		ended["error"] = status.Convert(runErr).Message()
	}
	o.emit(done, ended)
	return children, nil
}

var errEnough = errors.New("enough events")

func follow(ctx context.Context, client *switchboard.Client, cfg config, conversation string, o *out) error {
	if cfg.followFor > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.followFor)
		defer cancel()
	}
	seen := 0
	err := client.FollowEvents(ctx, switchboard.FollowOptions{
		Scopes:      []*eventsv1.Scope{switchboard.ConversationScope(conversation)},
		AfterCursor: cfg.afterCursor,
		OnSubscribed: func(after, live string) {
			o.emit("subscribed", map[string]any{"after_cursor": after, "cursor": live})
		},
		OnCursor: func(cursor string) {
			o.emit("cursor", map[string]any{"cursor": cursor})
		},
		OnRetry: func(err error, delay time.Duration, after string) {
			o.emit("follow_retry", map[string]any{
				"code": status.Code(err).String(), "error": err.Error(),
				"after_cursor": after, "delay_ms": delay.Milliseconds(),
			})
		},
	}, func(event *eventsv1.Event) error {
		line := map[string]any{"id": event.GetId(), "type": event.GetType().String(), "cursor": event.GetCursor()}
		switch p := event.GetPayload().(type) {
		case *eventsv1.Event_MessageCreated:
			line["message"] = p.MessageCreated.GetMessage().GetName()
			var text strings.Builder
			for _, part := range p.MessageCreated.GetMessage().GetParts() {
				text.WriteString(part.GetText())
			}
			line["text"] = text.String()
		case *eventsv1.Event_RunUpdated:
			line["run"] = p.RunUpdated.GetUpdate().GetRun()
			line["sequence"] = p.RunUpdated.GetUpdate().GetSequence()
		}
		o.emit("event", line)
		seen++
		if cfg.maxEvents > 0 && seen >= cfg.maxEvents {
			return errEnough
		}
		return nil
	})
	// Stopping is the normal end of following: enough events, the time given,
	// or an interrupt.
	if errors.Is(err, errEnough) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return nil
	}
	return err
}
