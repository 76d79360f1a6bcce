package switchboard

import (
	"context"
	"testing"

	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	eventsv1 "switchboard.dev/go/gen/switchboard/api/events/v1"
)

const (
	affinityConversation = "workspaces/w1/conversations/c1"
	affinityRun          = affinityConversation + "/runs/r1"
)

func TestAffinityIsTheConversationARequestNames(t *testing.T) {
	named := []any{
		affinityConversation,
		affinityRun,
		&dispatcherv1.SendMessageRequest{Conversation: affinityConversation, RequestId: "x"},
		&dispatcherv1.WatchRunRequest{Name: affinityRun, AfterSequence: 3},
		&dispatcherv1.CancelRunRequest{Name: affinityRun},
		&dispatcherv1.SteerRunRequest{Run: affinityRun},
		&dispatcherv1.ListRunsRequest{Parent: affinityConversation},
		&contextv1.GetConversationRequest{Name: affinityConversation},
		&dispatcherv1.ConverseRequest{Action: &dispatcherv1.ConverseRequest_SendMessage{
			SendMessage: &dispatcherv1.SendMessageRequest{Conversation: affinityConversation}}},
		&dispatcherv1.TalkRequest{Frame: &dispatcherv1.TalkRequest_Start{
			Start: &dispatcherv1.TalkStart{Conversation: affinityConversation}}},
		&dispatcherv1.TalkRequest{Frame: &dispatcherv1.TalkRequest_Resume{
			Resume: &dispatcherv1.TalkResume{Session: affinityConversation + "/voiceSessions/s1"}}},
	}
	for _, req := range named {
		if got := Affinity(req); got != affinityConversation {
			t.Errorf("Affinity(%v) = %q, want %q", req, got, affinityConversation)
		}
	}
	parameters, err := structpb.NewStruct(map[string]any{"see": affinityConversation})
	if err != nil {
		t.Fatal(err)
	}
	none := []any{
		"", "workspaces/w1", "workspaces//conversations/c1", "workspaces/w1/files/f1", nil, 42,
		&contextv1.CreateConversationRequest{Parent: "workspaces/w1"},
		&eventsv1.SubscribeRequest{Scopes: []*eventsv1.Scope{
			{Scope: &eventsv1.Scope_Conversation{Conversation: affinityConversation}}}},
		// A value elsewhere in the request is the user's, never a route.
		&dispatcherv1.SendMessageRequest{Parameters: parameters},
	}
	for _, req := range none {
		if got := Affinity(req); got != "" {
			t.Errorf("Affinity(%v) = %q, want none", req, got)
		}
	}
}

func TestWithAffinityKeepsTheCallersOwnHeader(t *testing.T) {
	ctx := WithAffinity(context.Background(), affinityConversation)
	ctx = WithAffinity(ctx, "workspaces/w2/conversations/c2")
	md, _ := metadata.FromOutgoingContext(ctx)
	if got := md.Get(AffinityHeader); len(got) != 1 || got[0] != affinityConversation {
		t.Errorf("header %v, want [%s]", got, affinityConversation)
	}
	if _, ok := metadata.FromOutgoingContext(WithAffinity(context.Background(), "")); ok {
		t.Error("an empty key added a header")
	}
}
