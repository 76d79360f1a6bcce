// Command revisions shows and restores the revisions of a Switchboard
// assistant's configuration: it lists them newest first, reads one, shows
// which fields differ between two, answers a message with an earlier one (how
// a change is tried, or undone for one conversation, before it is rolled
// back for all), and rolls the assistant back to one.
//
//	go run ./examples/revisions -addr 127.0.0.1:50051 -plaintext -email you@example.com list workspaces/w/assistants/a
//	go run ./examples/revisions ... show -revision 1 workspaces/w/assistants/a
//	go run ./examples/revisions ... diff -from 1 -to 3 workspaces/w/assistants/a
//	go run ./examples/revisions ... send -revision 1 -conversation workspaces/w/conversations/c workspaces/w/assistants/a "Hello"
//	go run ./examples/revisions ... rollback -revision 1 -etag '"3"' workspaces/w/assistants/a
//
// It writes one JSON object per line on stdout ("kind": "signed_in", then
// "revision", "listed", "assistant", "diff", "sent", "answered"), and exits
// 0 when done, 1 on an error (an "error" line says which step failed and
// why), 2 on bad usage. The password comes from -password or SB_PASSWORD;
// -register creates the account first.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	"switchboard.dev/go/switchboard"
)

const usage = `usage: revisions -email E [-password P] [-register] COMMAND ASSISTANT
commands:
  list ASSISTANT
  show [-revision N] ASSISTANT
  diff -from N [-to M] ASSISTANT
  send -revision N -conversation C ASSISTANT TEXT
  rollback -revision N [-etag E] ASSISTANT
ASSISTANT is workspaces/{w}/assistants/{a}; a revision of 0 is the current one.`

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address")
	plaintext := flag.Bool("plaintext", false, "no TLS (a server on loopback)")
	email := flag.String("email", "", "account email")
	password := flag.String("password", os.Getenv("SB_PASSWORD"), "password (or SB_PASSWORD)")
	register := flag.Bool("register", false, "register the account first")
	timeout := flag.Duration("timeout", time.Minute, "give up after this long")
	flag.Usage = func() { fmt.Fprintln(os.Stderr, usage); flag.PrintDefaults() }
	flag.Parse()
	if *email == "" || *password == "" || flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	command, args := flag.Arg(0), flag.Args()[1:]
	run, ok := commands[command]
	if !ok {
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
	emit(map[string]any{"kind": "signed_in", "user": user})
	run(ctx, client, args)
}

var commands = map[string]func(context.Context, *switchboard.Client, []string){
	"list": list, "show": show, "diff": diff, "send": send, "rollback": rollback,
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

func list(ctx context.Context, client *switchboard.Client, args []string) {
	assistant := parse(flag.NewFlagSet("list", flag.ExitOnError), args, 1)[0]
	revisions, err := client.AssistantRevisions(ctx, assistant)
	if err != nil {
		fail("list", err)
	}
	for _, revision := range revisions {
		emit(map[string]any{"kind": "revision", "revision": asJSON(revision)})
	}
	emit(map[string]any{"kind": "listed", "count": len(revisions)})
}

func show(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("show", flag.ExitOnError)
	revision := set.Int64("revision", 0, "the revision to read; 0: the current one")
	assistant := parse(set, args, 1)[0]
	read, err := client.AssistantAt(ctx, assistant, *revision)
	if err != nil {
		fail("show", err)
	}
	emit(map[string]any{"kind": "assistant", "assistant": asJSON(read)})
}

func diff(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("diff", flag.ExitOnError)
	from := set.Int64("from", 0, "the earlier revision")
	to := set.Int64("to", 0, "the later revision; 0: the current one")
	assistant := parse(set, args, 1)[0]
	if *from <= 0 {
		usageError("-from", fmt.Sprint(*from))
	}
	before, err := client.AssistantAt(ctx, assistant, *from)
	if err != nil {
		fail("diff", err)
	}
	after, err := client.AssistantAt(ctx, assistant, *to)
	if err != nil {
		fail("diff", err)
	}
	// Each side's value as the JSON mapping writes it; a field at its default
	// is absent there, shown as null.
	was, is := fieldsOf(before), fieldsOf(after)
	fields := before.ProtoReflect().Descriptor().Fields()
	changes := []map[string]any{}
	for _, name := range switchboard.AssistantChanges(before, after) {
		key := fields.ByName(protoreflect.Name(name)).JSONName()
		changes = append(changes, map[string]any{"field": name, "from": was[key], "to": is[key]})
	}
	emit(map[string]any{
		"kind": "diff", "from": before.GetRevision(), "to": after.GetRevision(), "changes": changes,
	})
}

func send(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("send", flag.ExitOnError)
	revision := set.Int64("revision", 0, "answer with this revision of the assistant; 0: the current one")
	conversation := set.String("conversation", "", "workspaces/{w}/conversations/{c}, in the assistant's workspace")
	rest := parse(set, args, 2)
	if *conversation == "" {
		usageError("-conversation", "")
	}
	request := &dispatcherv1.SendMessageRequest{
		Conversation:      *conversation,
		Assistant:         rest[0],
		AssistantRevision: *revision,
		Message: &contextv1.Message{
			Role:  contextv1.MessageRole_MESSAGE_ROLE_USER,
			Parts: []*contextv1.ContentPart{{Part: &contextv1.ContentPart_Text{Text: rest[1]}}},
		},
	}
	sent := false
	answer, err := client.Ask(ctx, request, func(update *dispatcherv1.RunUpdate) error {
		// The run as admitted, with the revision it was fixed to, before its answer.
		if change := update.GetStateChange(); change != nil && !sent {
			sent = true
			emit(map[string]any{"kind": "sent", "run": asJSON(change.GetRun())})
		}
		return nil
	})
	if err != nil {
		fail("send", err)
	}
	emit(map[string]any{"kind": "answered", "run": asJSON(answer.Run), "text": answer.Text})
}

func rollback(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("rollback", flag.ExitOnError)
	revision := set.Int64("revision", 0, "the revision whose configuration becomes current")
	etag := set.String("etag", "", "the assistant's etag as read (a stale one is refused)")
	assistant := parse(set, args, 1)[0]
	if *revision <= 0 {
		usageError("-revision", fmt.Sprint(*revision))
	}
	rolled, err := client.RollbackAssistant(ctx, assistant, *revision, *etag)
	if err != nil {
		fail("rollback", err)
	}
	emit(map[string]any{"kind": "assistant", "assistant": asJSON(rolled)})
}

func fieldsOf(assistant *dispatcherv1.Assistant) map[string]json.RawMessage {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(asJSON(assistant), &fields); err != nil {
		fail("encode", err)
	}
	return fields
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
