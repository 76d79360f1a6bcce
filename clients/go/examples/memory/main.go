// Command memory shows and keeps what a Switchboard assistant remembers about
// you (or about a workspace): it lists the memory of a scope by validity,
// shows an item with its history, remembers, corrects, retires and forgets
// items, sets a memory policy, and follows what memory forming decides.
//
//	go run ./examples/memory -addr 127.0.0.1:50051 -plaintext -email you@example.com list
//	go run ./examples/memory ... list -validity retired
//	go run ./examples/memory ... list -at 2026-03-01T00:00:00Z -workspace workspaces/w
//	go run ./examples/memory ... remember -supersedes users/u/memories/m "lives in Berlin"
//	go run ./examples/memory ... history users/u/memories/m
//	go run ./examples/memory ... correct users/u/memories/m "lives in Berlin, Kreuzberg"
//	go run ./examples/memory ... retire users/u/memories/m "moved away"
//	go run ./examples/memory ... forget users/u/memories/m
//	go run ./examples/memory ... policy -mode user workspaces/w/assistants/a
//	go run ./examples/memory ... decisions -count 5
//
// The scope is -scope (users/{u}, workspaces/{w} or a conversation of it),
// the signed-in user's own by default. It writes one JSON object per line on
// stdout ("kind": "signed_in", then "item", "version", "forgotten", "policy",
// "decision"...), and exits 0 when done, 1 on an error (an "error" line says
// which step failed and why), 2 on bad usage. The password comes from
// -password or SB_PASSWORD; -register creates the account first.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	eventsv1 "switchboard.dev/go/gen/switchboard/api/events/v1"
	"switchboard.dev/go/switchboard"
)

const usage = `usage: memory -email E [-password P] [-register] [-scope S] COMMAND
commands:
  list [-validity current|retired|all] [-at RFC3339] [-workspace W]
  remember [-kind fact|preference|plan|note] [-supersedes NAME] [-valid-time RFC3339] [-id ID] TEXT
  history NAME
  correct [-etag E] NAME TEXT
  retire [-etag E] NAME REASON
  forget NAME
  policy [-mode off|user|workspace|user_and_workspace|inherit] [-idle-minutes N] TARGET
  decisions [-count N]`

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address")
	plaintext := flag.Bool("plaintext", false, "no TLS (a server on loopback)")
	email := flag.String("email", "", "account email")
	password := flag.String("password", os.Getenv("SB_PASSWORD"), "password (or SB_PASSWORD)")
	register := flag.Bool("register", false, "register the account first")
	scope := flag.String("scope", "", "users/{u}, workspaces/{w} or a conversation; your own by default")
	timeout := flag.Duration("timeout", time.Minute, "give up after this long")
	flag.Usage = func() { fmt.Fprintln(os.Stderr, usage); flag.PrintDefaults() }
	flag.Parse()
	if *email == "" || *password == "" || flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var opts []switchboard.Option
	if *plaintext {
		opts = append(opts, switchboard.WithInsecure())
	}
	client, err := switchboard.Dial(*addr, opts...)
	if err != nil {
		fail("dial", err)
	}
	defer client.Close()
	var user string
	if *register {
		registered, err := client.Register(ctx, *email, *password, "")
		if err != nil {
			fail("sign in", err)
		}
		user = registered.GetUser().GetName()
	} else {
		signedIn, err := client.Login(ctx, *email, *password)
		if err != nil {
			fail("sign in", err)
		}
		user = signedIn.GetUser().GetName()
	}
	signedInUser = user
	if *scope == "" {
		*scope = user
	}
	emit(map[string]any{"kind": "signed_in", "user": user, "scope": *scope})
	command, args := flag.Arg(0), flag.Args()[1:]
	run, ok := commands[command]
	if !ok {
		flag.Usage()
		os.Exit(2)
	}
	run(ctx, client, *scope, args)
}

// signedInUser is users/{u} of the account signed in.
var signedInUser string

var commands = map[string]func(context.Context, *switchboard.Client, string, []string){
	"list": list, "remember": remember, "history": history, "correct": correct, "retire": retire,
	"forget": forget, "policy": policy, "decisions": decisions,
}

// parse reads a command's own flags; want is how many arguments must follow.
func parse(set *flag.FlagSet, args []string, want int) []string {
	set.Usage = func() { fmt.Fprintln(os.Stderr, usage) }
	if err := set.Parse(args); err != nil || set.NArg() != want {
		set.Usage()
		os.Exit(2)
	}
	return set.Args()
}

func list(ctx context.Context, client *switchboard.Client, scope string, args []string) {
	set := flag.NewFlagSet("list", flag.ExitOnError)
	validity := set.String("validity", "current", "current, retired or all")
	at := set.String("at", "", "the items true at this time (RFC 3339)")
	workspace := set.String("workspace", "", "in a user's scope: only what was formed in this workspace")
	parse(set, args, 0)
	opts := switchboard.ListMemoryOptions{Workspace: *workspace}
	value, ok := contextv1.MemoryValidity_value["MEMORY_VALIDITY_"+strings.ToUpper(*validity)]
	if !ok {
		usageError("-validity", *validity)
	}
	opts.Validity = contextv1.MemoryValidity(value)
	if *at != "" {
		opts.ValidAt = when("-at", *at)
	}
	items, err := client.ListMemory(ctx, scope, opts)
	if err != nil {
		fail("list", err)
	}
	for _, item := range items {
		emit(map[string]any{"kind": "item", "item": asJSON(item)})
	}
	emit(map[string]any{"kind": "listed", "count": len(items)})
}

func remember(ctx context.Context, client *switchboard.Client, scope string, args []string) {
	set := flag.NewFlagSet("remember", flag.ExitOnError)
	kind := set.String("kind", "fact", "fact, preference, plan or note")
	supersedes := set.String("supersedes", "", "the item this one replaces (retired at its valid time)")
	validTime := set.String("valid-time", "", "when it became true (RFC 3339); now if empty")
	id := set.String("id", "", "the item's id: a retried create is applied once")
	text := parse(set, args, 1)[0]
	value, ok := contextv1.MemoryKind_value["MEMORY_KIND_"+strings.ToUpper(*kind)]
	if !ok {
		usageError("-kind", *kind)
	}
	item := &contextv1.MemoryItem{Kind: contextv1.MemoryKind(value), Content: text, Supersedes: *supersedes}
	if *validTime != "" {
		item.ValidTime = timestamppb.New(when("-valid-time", *validTime))
	}
	created, err := client.Remember(ctx, scope, item, *id)
	if err != nil {
		fail("remember", err)
	}
	emit(map[string]any{"kind": "item", "item": asJSON(created)})
}

func history(ctx context.Context, client *switchboard.Client, _ string, args []string) {
	name := parse(flag.NewFlagSet("history", flag.ExitOnError), args, 1)[0]
	got, err := client.GetMemory(ctx, name, true)
	if err != nil {
		fail("history", err)
	}
	emit(map[string]any{"kind": "item", "item": asJSON(got.GetMemoryItem())})
	for _, version := range got.GetHistory() {
		emit(map[string]any{"kind": "version", "version": asJSON(version)})
	}
}

func correct(ctx context.Context, client *switchboard.Client, _ string, args []string) {
	set := flag.NewFlagSet("correct", flag.ExitOnError)
	etag := set.String("etag", "", "the etag of the version read (a stale one is refused)")
	rest := parse(set, args, 2)
	changed, err := client.CorrectMemory(ctx, rest[0], *etag, rest[1])
	if err != nil {
		fail("correct", err)
	}
	emit(map[string]any{"kind": "item", "item": asJSON(changed)})
}

func retire(ctx context.Context, client *switchboard.Client, _ string, args []string) {
	set := flag.NewFlagSet("retire", flag.ExitOnError)
	etag := set.String("etag", "", "the etag of the version read (a stale one is refused)")
	rest := parse(set, args, 2)
	retired, err := client.RetireMemory(ctx, rest[0], *etag, rest[1], time.Time{})
	if err != nil {
		fail("retire", err)
	}
	emit(map[string]any{"kind": "item", "item": asJSON(retired)})
}

func forget(ctx context.Context, client *switchboard.Client, _ string, args []string) {
	name := parse(flag.NewFlagSet("forget", flag.ExitOnError), args, 1)[0]
	if err := client.ForgetMemory(ctx, name); err != nil {
		fail("forget", err)
	}
	emit(map[string]any{"kind": "forgotten", "name": name})
}

func policy(ctx context.Context, client *switchboard.Client, _ string, args []string) {
	set := flag.NewFlagSet("policy", flag.ExitOnError)
	mode := set.String("mode", "user", "off, user, workspace, user_and_workspace, or inherit")
	idle := set.Int("idle-minutes", 0, "form after this many idle minutes; 0: after each run")
	target := parse(set, args, 1)[0]
	var chosen *contextv1.MemoryPolicy
	if *mode != "inherit" {
		value, ok := contextv1.MemoryFormingMode_value["MEMORY_FORMING_MODE_"+strings.ToUpper(*mode)]
		if !ok {
			usageError("-mode", *mode)
		}
		chosen = &contextv1.MemoryPolicy{Mode: contextv1.MemoryFormingMode(value), IdleMinutes: int32(*idle)}
	}
	var updated proto.Message
	var err error
	if strings.Contains(target, "/assistants/") {
		updated, err = client.SetAssistantMemoryPolicy(ctx, target, "", chosen)
	} else {
		updated, err = client.SetWorkspaceMemoryPolicy(ctx, target, chosen)
	}
	if err != nil {
		fail("policy", err)
	}
	emit(map[string]any{"kind": "policy", "target": target, "set": asJSON(updated)})
}

func decisions(ctx context.Context, client *switchboard.Client, scope string, args []string) {
	set := flag.NewFlagSet("decisions", flag.ExitOnError)
	count := set.Int("count", 0, "stop after this many decisions (0: until -timeout)")
	parse(set, args, 0)
	// Decisions about the user's memory come on the user's scope, about a
	// workspace's (or a conversation's) on that one's: both are followed.
	followed := []*eventsv1.Scope{switchboard.UserScope(signedInUser)}
	switch {
	case strings.Contains(scope, "/conversations/"):
		followed = append(followed, switchboard.ConversationScope(scope))
	case strings.HasPrefix(scope, "workspaces/"):
		followed = append(followed, switchboard.WorkspaceScope(scope))
	}
	seen := 0
	errEnough := errors.New("enough")
	err := client.FollowMemoryDecisions(ctx, switchboard.FollowOptions{
		Scopes:       followed,
		OnSubscribed: func(_, live string) { emit(map[string]any{"kind": "live", "cursor": live}) },
	}, func(event *eventsv1.Event, decided *eventsv1.MemoryDecided) error {
		emit(map[string]any{"kind": "decision", "cursor": event.GetCursor(), "decision": asJSON(decided)})
		seen++
		if *count > 0 && seen >= *count {
			return errEnough
		}
		return nil
	})
	if err != nil && !errors.Is(err, errEnough) {
		fail("decisions", err)
	}
}

func when(flagName, value string) time.Time {
	at, err := time.Parse(time.RFC3339, value)
	if err != nil {
		usageError(flagName, value)
	}
	return at
}

func asJSON(message proto.Message) json.RawMessage {
	encoded, err := protojson.Marshal(message)
	if err != nil {
		fail("encode", err)
	}
	return encoded
}

func emit(line map[string]any) {
	encoded, _ := json.Marshal(line)
	fmt.Println(string(encoded))
}

func usageError(flagName, value string) {
	fmt.Fprintf(os.Stderr, "%s: %q is not a value it takes\n%s\n", flagName, value, usage)
	os.Exit(2)
}

func fail(step string, err error) {
	line := map[string]any{"kind": "error", "step": step, "error": err.Error(), "code": status.Code(err).String()}
	if reason := switchboard.Reason(err); reason != 0 {
		line["reason"] = reason.String()
	}
	emit(line)
	os.Exit(1)
}
