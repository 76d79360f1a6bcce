// Command calls places and follows phone calls through a Switchboard server
// with SIP (docs/telephony.md): it places a call from one of the server's
// trunks, answered by an assistant that speaks first, waits for it to be
// answered or end, lists a workspace's calls, reads one, and hangs one up.
//
//	go run ./examples/calls -addr 127.0.0.1:50051 -plaintext -email you@example.com list -live workspaces/w
//	go run ./examples/calls ... place -trunk carrier -to +15551230001 -assistant workspaces/w/assistants/a \
//	    -opening "Tell Ann her agenda for today." -wait workspaces/w
//	go run ./examples/calls ... show workspaces/w/calls/c
//	go run ./examples/calls ... wait -state answered workspaces/w/calls/c
//	go run ./examples/calls ... end -wait workspaces/w/calls/c
//
// It writes one JSON object per line on stdout ("kind": "signed_in", then
// "call", "listed", "placed", "ended"), and exits 0 when done, 1 on an error
// (an "error" line says which step failed, its code, reason and field
// violations), 2 on bad usage. The password comes from -password or
// SB_PASSWORD; -register creates the account first.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	"switchboard.dev/go/switchboard"
)

const usage = `usage: calls -email E [-password P] [-register] COMMAND ...
commands:
  list [-live] WORKSPACE
  place -trunk T -to NUMBER -assistant A -opening TEXT [-ring 30s] [-request-id ID] [-wait] WORKSPACE
  show CALL
  wait [-state answered] CALL
  end [-wait] CALL
WORKSPACE is workspaces/{w}; CALL is workspaces/{w}/calls/{c}. A wait ends when the
call reaches the state or ENDED (it never changes after that).`

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address")
	plaintext := flag.Bool("plaintext", false, "no TLS (a server on loopback)")
	email := flag.String("email", "", "account email")
	password := flag.String("password", os.Getenv("SB_PASSWORD"), "password (or SB_PASSWORD)")
	register := flag.Bool("register", false, "register the account first")
	// Longer than the longest ring timeout (120 s), so that a wait ends with the call.
	timeout := flag.Duration("timeout", 3*time.Minute, "give up after this long")
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
	"list": list, "place": place, "show": show, "wait": wait, "end": end,
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
	set := flag.NewFlagSet("list", flag.ExitOnError)
	live := set.Bool("live", false, "only the calls not ENDED")
	workspace := parse(set, args, 1)[0]
	calls, err := client.ListCalls(ctx, workspace, *live)
	if err != nil {
		fail("list", err)
	}
	for _, call := range calls {
		emit(map[string]any{"kind": "call", "call": asJSON(call)})
	}
	emit(map[string]any{"kind": "listed", "count": len(calls)})
}

func place(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("place", flag.ExitOnError)
	var opts switchboard.PlaceCallOptions
	set.StringVar(&opts.Trunk, "trunk", "", "the server's SIP trunk to call out on")
	set.StringVar(&opts.ToNumber, "to", "", "the number to call (E.164: +15551230001)")
	set.StringVar(&opts.Assistant, "assistant", "", "workspaces/{w}/assistants/{a}: who answers (it needs a voice)")
	set.StringVar(&opts.OpeningMessage, "opening", "", "what the assistant says first")
	set.DurationVar(&opts.RingTimeout, "ring", 0, "how long it may ring (the server's 30 s if 0)")
	set.StringVar(&opts.RequestID, "request-id", "", "idempotency key (a new one if empty)")
	follow := set.Bool("wait", false, "then wait until it is answered or ends")
	workspace := parse(set, args, 1)[0]
	call, err := client.PlaceCall(ctx, workspace, opts)
	if err != nil {
		fail("place", err)
	}
	emit(map[string]any{"kind": "placed", "call": asJSON(call)})
	if *follow {
		waitFor(ctx, client, call.GetName(), dispatcherv1.CallState_CALL_STATE_ANSWERED)
	}
}

func show(ctx context.Context, client *switchboard.Client, args []string) {
	name := parse(flag.NewFlagSet("show", flag.ExitOnError), args, 1)[0]
	call, err := client.GetCall(ctx, name)
	if err != nil {
		fail("show", err)
	}
	emit(map[string]any{"kind": "call", "call": asJSON(call)})
}

func wait(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("wait", flag.ExitOnError)
	state := set.String("state", "answered", "dialing, ringing, answered or ended")
	name := parse(set, args, 1)[0]
	value, ok := dispatcherv1.CallState_value["CALL_STATE_"+strings.ToUpper(*state)]
	if !ok || value == 0 {
		usageError("-state", *state)
	}
	waitFor(ctx, client, name, dispatcherv1.CallState(value))
}

func end(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("end", flag.ExitOnError)
	follow := set.Bool("wait", false, "then wait until the line is down")
	name := parse(set, args, 1)[0]
	call, err := client.EndCall(ctx, name)
	if err != nil {
		fail("end", err)
	}
	emit(map[string]any{"kind": "ended", "call": asJSON(call)})
	if *follow {
		waitFor(ctx, client, name, dispatcherv1.CallState_CALL_STATE_ENDED)
	}
}

func waitFor(ctx context.Context, client *switchboard.Client, name string, state dispatcherv1.CallState) {
	call, err := client.WaitCall(ctx, name, state)
	if err != nil {
		fail("wait", err)
	}
	emit(map[string]any{"kind": "call", "call": asJSON(call)})
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
	if violations := switchboard.FieldViolations(err); len(violations) > 0 {
		fields := make([]string, 0, len(violations))
		for _, violation := range violations {
			fields = append(fields, violation.GetField())
		}
		line["fields"] = fields
	}
	emit(line)
	os.Exit(1)
}
