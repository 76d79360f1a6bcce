// Command branches edits, regenerates, switches and deletes the messages of a
// Switchboard conversation, and forks it: an edit or a regenerated answer is a
// new version beside the old one, on a new branch that becomes the active one,
// and a message with more than one version shows where it stands among them
// ("2 / 2"), as a "< 2 / 2 >" switcher does. A fork is a new conversation that
// shares the history up to a message and goes on alone.
//
//	go run ./examples/branches -addr 127.0.0.1:50051 -plaintext -email you@example.com tour -conversation workspaces/w/conversations/c "Hello" "Hello again"
//	go run ./examples/branches ... send -conversation workspaces/w/conversations/c "Hello"
//	go run ./examples/branches ... edit workspaces/w/conversations/c/messages/m "Hello again"
//	go run ./examples/branches ... regenerate workspaces/w/conversations/c/messages/a
//	go run ./examples/branches ... show [-branch N] workspaces/w/conversations/c
//	go run ./examples/branches ... switch -message workspaces/w/conversations/c/messages/m workspaces/w/conversations/c
//	go run ./examples/branches ... delete [-with-later] workspaces/w/conversations/c/messages/m
//	go run ./examples/branches ... fork workspaces/w/conversations/c/messages/a "Another way"
//
// tour does it all in one go: it sends TEXT, edits it to EDITED, regenerates
// the edit's answer, shows the active branch (the edit and the new answer are
// each "2 / 2"), switches back to the first version, deletes its answer and
// shows that branch again.
//
// It writes one JSON object per line on stdout ("kind": "signed_in", then
// "sent", "edited", "regenerated", "answered", "branch", "switched",
// "deleted", "forked"), and exits 0 when done, 1 on an error (an "error" line says
// which step failed and why), 2 on bad usage. The password comes from
// -password or SB_PASSWORD; -register creates the account first.
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

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	"switchboard.dev/go/switchboard"
)

const usage = `usage: branches -email E [-password P] [-register] COMMAND ...
commands:
  tour -conversation C [-assistant A] TEXT EDITED
  send -conversation C [-assistant A] TEXT
  edit [-assistant A] MESSAGE TEXT
  regenerate ANSWER
  show [-branch N] CONVERSATION
  switch (-message M | -branch N) CONVERSATION
  delete [-with-later] MESSAGE
  fork MESSAGE TITLE
C and CONVERSATION are workspaces/{w}/conversations/{c}; MESSAGE, ANSWER and M
are messages of it, .../messages/{m}; a branch of 0 is the active one. A fork
shares the history up to MESSAGE, included, on the branch it was appended on.`

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address")
	plaintext := flag.Bool("plaintext", false, "no TLS (a server on loopback)")
	email := flag.String("email", "", "account email")
	password := flag.String("password", os.Getenv("SB_PASSWORD"), "password (or SB_PASSWORD)")
	register := flag.Bool("register", false, "register the account first")
	timeout := flag.Duration("timeout", 2*time.Minute, "give up after this long")
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
	"tour": tour, "send": send, "edit": edit, "regenerate": regenerate, "show": show,
	"switch": switchTo, "delete": remove, "fork": fork,
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

func tour(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("tour", flag.ExitOnError)
	conversation := set.String("conversation", "", "workspaces/{w}/conversations/{c}")
	assistant := set.String("assistant", "", "the assistant to answer with; empty: the workspace's")
	rest := parse(set, args, 2)
	if *conversation == "" {
		usageError("-conversation", "")
	}
	text, edited := rest[0], rest[1]

	first, firstAnswer := sendAndWait(ctx, client, *conversation, *assistant, text)
	_, secondAnswer := editAndWait(ctx, client, first.GetName(), *assistant, edited)
	regenerateAndWait(ctx, client, secondAnswer.GetOutputMessage())
	// The edit and the new answer each stand second of two.
	showBranch(ctx, client, *conversation, 0)
	// Picking the first version in its switcher makes its branch active again.
	switched, err := client.SwitchBranch(ctx, *conversation, first.GetName())
	if err != nil {
		fail("switch", err)
	}
	emitSwitched(switched)
	showBranch(ctx, client, *conversation, 0)
	deleted, err := client.DeleteMessage(ctx, firstAnswer.GetOutputMessage(), false)
	if err != nil {
		fail("delete", err)
	}
	emitDeleted(deleted)
	showBranch(ctx, client, *conversation, 0)
}

func send(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("send", flag.ExitOnError)
	conversation := set.String("conversation", "", "workspaces/{w}/conversations/{c}")
	assistant := set.String("assistant", "", "the assistant to answer with; empty: the workspace's")
	text := parse(set, args, 1)[0]
	if *conversation == "" {
		usageError("-conversation", "")
	}
	sendAndWait(ctx, client, *conversation, *assistant, text)
}

func edit(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("edit", flag.ExitOnError)
	assistant := set.String("assistant", "", "the assistant to answer with; empty: the workspace's")
	rest := parse(set, args, 2)
	editAndWait(ctx, client, rest[0], *assistant, rest[1])
}

func regenerate(ctx context.Context, client *switchboard.Client, args []string) {
	answer := parse(flag.NewFlagSet("regenerate", flag.ExitOnError), args, 1)[0]
	regenerateAndWait(ctx, client, answer)
}

func show(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("show", flag.ExitOnError)
	branch := set.Int("branch", 0, "the branch to read; 0: the active one")
	conversation := parse(set, args, 1)[0]
	if *branch < 0 {
		usageError("-branch", fmt.Sprint(*branch))
	}
	showBranch(ctx, client, conversation, int32(*branch))
}

func switchTo(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("switch", flag.ExitOnError)
	message := set.String("message", "", "a message: the branch through it that changed last")
	branch := set.Int("branch", 0, "a branch's number, from 1")
	conversation := parse(set, args, 1)[0]
	var switched *contextv1.Conversation
	var err error
	switch {
	case *message != "" && *branch == 0:
		switched, err = client.SwitchBranch(ctx, conversation, *message)
	case *message == "" && *branch > 0:
		switched, err = client.SwitchToBranch(ctx, conversation, int32(*branch))
	default:
		usageError("-message/-branch", fmt.Sprintf("%s/%d", *message, *branch))
	}
	if err != nil {
		fail("switch", err)
	}
	emitSwitched(switched)
}

func remove(ctx context.Context, client *switchboard.Client, args []string) {
	set := flag.NewFlagSet("delete", flag.ExitOnError)
	withLater := set.Bool("with-later", false, "also delete the messages after it on the active branch")
	message := parse(set, args, 1)[0]
	deleted, err := client.DeleteMessage(ctx, message, *withLater)
	if err != nil {
		fail("delete", err)
	}
	emitDeleted(deleted)
}

func fork(ctx context.Context, client *switchboard.Client, args []string) {
	rest := parse(flag.NewFlagSet("fork", flag.ExitOnError), args, 2)
	forked, err := client.Fork(ctx, rest[0], rest[1])
	if err != nil {
		fail("fork", err)
	}
	emit(map[string]any{
		"kind": "forked", "conversation": forked.GetName(), "title": forked.GetTitle(),
		"forked_from": forked.GetForkedFrom(), "message_count": forked.GetMessageCount(),
	})
}

func answeredBy(assistant string) switchboard.EditOption {
	return func(request *dispatcherv1.SendMessageRequest) { request.Assistant = assistant }
}

// sendAndWait sends text and waits for its answer: the stored user message,
// and the run as it ended.
func sendAndWait(ctx context.Context, client *switchboard.Client, conversation, assistant, text string) (*contextv1.Message, *dispatcherv1.Run) {
	request := &dispatcherv1.SendMessageRequest{
		Conversation: conversation,
		Message: &contextv1.Message{
			Role:  contextv1.MessageRole_MESSAGE_ROLE_USER,
			Parts: []*contextv1.ContentPart{{Part: &contextv1.ContentPart_Text{Text: text}}},
		},
	}
	answeredBy(assistant)(request)
	sent, err := client.SendMessage(ctx, request)
	if err != nil {
		fail("send", err)
	}
	emit(map[string]any{"kind": "sent", "message": brief(sent.GetMessage()), "run": sent.GetRun().GetName()})
	return sent.GetMessage(), await(ctx, client, "send", sent.GetRun().GetName())
}

func editAndWait(ctx context.Context, client *switchboard.Client, message, assistant, text string) (*contextv1.Message, *dispatcherv1.Run) {
	edited, err := client.EditMessage(ctx, message, text, answeredBy(assistant))
	if err != nil {
		fail("edit", err)
	}
	emit(map[string]any{
		"kind": "edited", "replaces": message, "message": brief(edited.GetMessage()),
		"run": edited.GetRun().GetName(), "branch": edited.GetRun().GetBranch(),
	})
	return edited.GetMessage(), await(ctx, client, "edit", edited.GetRun().GetName())
}

func regenerateAndWait(ctx context.Context, client *switchboard.Client, answer string) *dispatcherv1.Run {
	again, err := client.Regenerate(ctx, answer)
	if err != nil {
		fail("regenerate", err)
	}
	emit(map[string]any{
		"kind": "regenerated", "replaces": answer, "message": brief(again.GetMessage()),
		"run": again.GetRun().GetName(), "branch": again.GetRun().GetBranch(),
	})
	return await(ctx, client, "regenerate", again.GetRun().GetName())
}

// await watches run to its end and prints its answer; a run that did not
// succeed is an error of step.
func await(ctx context.Context, client *switchboard.Client, step, run string) *dispatcherv1.Run {
	var transcript switchboard.Transcript
	ended, err := client.WatchRun(ctx, run, switchboard.WatchOptions{}, func(update *dispatcherv1.RunUpdate) error {
		transcript.Add(update)
		return nil
	})
	if err != nil {
		fail(step, err)
	}
	if ended.GetState() != dispatcherv1.RunState_RUN_STATE_SUCCEEDED {
		why := switchboard.RunError(ended)
		if why == nil {
			why = fmt.Errorf("%s ended %s", run, ended.GetState())
		}
		fail(step, why)
	}
	emit(map[string]any{
		"kind": "answered", "run": ended.GetName(), "state": ended.GetState().String(),
		"branch": ended.GetBranch(), "answer": ended.GetOutputMessage(), "text": transcript.Text(),
	})
	return ended
}

func showBranch(ctx context.Context, client *switchboard.Client, conversation string, branch int32) {
	messages, read, err := client.BranchMessages(ctx, conversation, branch)
	if err != nil {
		fail("show", err)
	}
	shown := make([]map[string]any, 0, len(messages))
	for _, message := range messages {
		shown = append(shown, brief(message))
	}
	emit(map[string]any{"kind": "branch", "conversation": conversation, "branch": read, "messages": shown})
}

// brief is a message as a switcher shows it: its text, and where it stands
// among its versions ("2 / 3"; "" when it has no other).
func brief(message *contextv1.Message) map[string]any {
	var text strings.Builder
	for _, part := range message.GetParts() {
		text.WriteString(part.GetText())
	}
	siblings := message.GetSiblings()
	if siblings == nil {
		siblings = []string{}
	}
	return map[string]any{
		"name": message.GetName(), "role": message.GetRole().String(), "text": text.String(),
		"branch": message.GetBranch(), "position": switchboard.SiblingPosition(message),
		"siblings": siblings, "previous": switchboard.Sibling(message, -1), "next": switchboard.Sibling(message, 1),
	}
}

func emitSwitched(conversation *contextv1.Conversation) {
	emit(map[string]any{
		"kind": "switched", "conversation": conversation.GetName(),
		"active_branch": conversation.GetActiveBranch(), "branch_count": conversation.GetBranchCount(),
	})
}

func emitDeleted(deleted *contextv1.DeleteMessageResponse) {
	emit(map[string]any{
		"kind": "deleted", "deleted": deleted.GetDeleted(),
		"active_branch": deleted.GetConversation().GetActiveBranch(),
	})
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
