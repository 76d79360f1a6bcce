package switchboard_test

import (
	"context"
	"fmt"
	"log"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"

	commonv1 "switchboard.dev/go/gen/switchboard/api/common/v1"
	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	eventsv1 "switchboard.dev/go/gen/switchboard/api/events/v1"
	"switchboard.dev/go/switchboard"
)

// Sign in, ask, and follow the conversation from then on. (Compiled, not run:
// it needs a server; tests/e2e/test_go_client.py runs the quickstart instead.)
func Example() {
	ctx := context.Background()
	client, err := switchboard.Dial("127.0.0.1:50051", switchboard.WithInsecure())
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	if _, err := client.Login(ctx, "you@example.com", "correct horse battery staple"); err != nil {
		log.Fatal(err)
	}
	conversation := "workspaces/w/conversations/c"
	answer, err := client.Ask(ctx, &dispatcherv1.SendMessageRequest{
		Conversation: conversation,
		Message: &contextv1.Message{Parts: []*contextv1.ContentPart{
			{Part: &contextv1.ContentPart_Text{Text: "Hello"}},
		}},
	}, func(u *dispatcherv1.RunUpdate) error {
		fmt.Print(u.GetDelta().GetText()) // the answer as it streams
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
	if why := switchboard.RunError(answer.Run); why != nil {
		log.Printf("the run ended %v: %v", answer.Run.GetState(), switchboard.Reason(why))
	}

	var cursor string // persist it to resume after a restart of this program
	err = client.FollowEvents(ctx, switchboard.FollowOptions{
		Scopes:      []*eventsv1.Scope{switchboard.ConversationScope(conversation)},
		AfterCursor: cursor,
		OnCursor:    func(c string) { cursor = c },
	}, func(e *eventsv1.Event) error {
		fmt.Println(e.GetType(), e.GetId())
		return nil
	})
	log.Fatal(err)
}

// Branch on the reason of an error, and list the request fields it names.
func ExampleReason() {
	var client *switchboard.Client // dialled and signed in
	_, err := client.Context.CreateWorkspace(context.Background(), &contextv1.CreateWorkspaceRequest{
		WorkspaceId: "Not An Id!",
	})
	switch switchboard.Reason(err) {
	case commonv1.ErrorReason_ERROR_REASON_INVALID_ARGUMENT:
		for _, v := range switchboard.FieldViolations(err) {
			fmt.Println(v.GetField(), v.GetDescription())
		}
	case commonv1.ErrorReason_ERROR_REASON_UNAUTHENTICATED:
		// sign in again
	}
	// The same with grpc-go alone: the details are genproto's errdetails types.
	for _, detail := range status.Convert(err).Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			fmt.Println(info.GetReason(), info.GetMetadata()["request_id"])
		}
	}
}
