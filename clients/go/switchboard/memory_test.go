package switchboard

import (
	"context"
	"errors"
	"net"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	eventsv1 "switchboard.dev/go/gen/switchboard/api/events/v1"
)

// scriptedMemory records what the client asks of the memory RPCs and answers
// from a fixed list: ListMemoryItems one item a page, after refusing the first
// call with UNAVAILABLE; Subscribe one batch with a decision. The real server
// is tested with the example program (tests/e2e/test_go_memory.py).
type scriptedMemory struct {
	contextv1.UnimplementedContextServiceServer
	dispatcherv1.UnimplementedDispatcherServiceServer
	eventsv1.UnimplementedEventServiceServer

	mu         sync.Mutex
	items      []*contextv1.MemoryItem
	failed     bool
	lists      []*contextv1.ListMemoryItemsRequest
	updates    []*contextv1.UpdateMemoryItemRequest
	assistants []*dispatcherv1.UpdateAssistantRequest
	workspaces []*contextv1.UpdateWorkspaceRequest
	subscribed []*eventsv1.SubscribeRequest
	deleted    []string
}

func (s *scriptedMemory) ListMemoryItems(_ context.Context, req *contextv1.ListMemoryItemsRequest) (*contextv1.ListMemoryItemsResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lists = append(s.lists, proto.Clone(req).(*contextv1.ListMemoryItemsRequest))
	if !s.failed {
		s.failed = true
		return nil, status.Error(codes.Unavailable, "the server went away")
	}
	at := 0
	if req.GetPageToken() != "" {
		at, _ = strconv.Atoi(req.GetPageToken())
	}
	response := &contextv1.ListMemoryItemsResponse{}
	if at < len(s.items) {
		response.MemoryItems = s.items[at : at+1]
		if at+1 < len(s.items) {
			response.NextPageToken = strconv.Itoa(at + 1)
		}
	}
	return response, nil
}

func (s *scriptedMemory) GetMemoryItem(_ context.Context, req *contextv1.GetMemoryItemRequest) (*contextv1.GetMemoryItemResponse, error) {
	response := &contextv1.GetMemoryItemResponse{MemoryItem: &contextv1.MemoryItem{Name: req.GetName()}}
	if req.GetIncludeHistory() {
		response.History = []*contextv1.MemoryItemVersion{
			{MemoryItem: req.GetName(), Version: 1, Change: contextv1.MemoryChange_MEMORY_CHANGE_CREATED},
		}
	}
	return response, nil
}

func (s *scriptedMemory) UpdateMemoryItem(_ context.Context, req *contextv1.UpdateMemoryItemRequest) (*contextv1.UpdateMemoryItemResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.updates = append(s.updates, req)
	return &contextv1.UpdateMemoryItemResponse{MemoryItem: req.GetMemoryItem()}, nil
}

func (s *scriptedMemory) DeleteMemoryItem(_ context.Context, req *contextv1.DeleteMemoryItemRequest) (*contextv1.DeleteMemoryItemResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deleted = append(s.deleted, req.GetName())
	return &contextv1.DeleteMemoryItemResponse{}, nil
}

func (s *scriptedMemory) UpdateAssistant(_ context.Context, req *dispatcherv1.UpdateAssistantRequest) (*dispatcherv1.UpdateAssistantResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.assistants = append(s.assistants, req)
	return &dispatcherv1.UpdateAssistantResponse{Assistant: req.GetAssistant()}, nil
}

func (s *scriptedMemory) UpdateWorkspace(_ context.Context, req *contextv1.UpdateWorkspaceRequest) (*contextv1.UpdateWorkspaceResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.workspaces = append(s.workspaces, req)
	return &contextv1.UpdateWorkspaceResponse{Workspace: req.GetWorkspace()}, nil
}

func decidedEvent(id string, action eventsv1.MemoryDecisionAction, item, replaces string) *eventsv1.Event {
	return &eventsv1.Event{Id: id, Cursor: id, Type: eventsv1.EventType_EVENT_TYPE_MEMORY_DECIDED,
		Payload: &eventsv1.Event_MemoryDecided{MemoryDecided: &eventsv1.MemoryDecided{
			Action: action, MemoryItem: item, Replaces: replaces,
			Outcome: eventsv1.MemoryFormingOutcome_MEMORY_FORMING_OUTCOME_APPLIED,
		}}}
}

func (s *scriptedMemory) Subscribe(req *eventsv1.SubscribeRequest, stream grpc.ServerStreamingServer[eventsv1.SubscribeResponse]) error {
	s.mu.Lock()
	s.subscribed = append(s.subscribed, req)
	s.mu.Unlock()
	frames := []*eventsv1.SubscribeResponse{
		{Frame: &eventsv1.SubscribeResponse_Heartbeat{Heartbeat: &eventsv1.Heartbeat{Cursor: "1-0"}}},
		{Frame: &eventsv1.SubscribeResponse_Batch{Batch: &eventsv1.EventBatch{Cursor: "3-0", Events: []*eventsv1.Event{
			decidedEvent("2-0", eventsv1.MemoryDecisionAction_MEMORY_DECISION_ACTION_ADD, "users/u/memories/berlin", ""),
			// A type this client was not asked for, as a server of a newer
			// contract might send: not handed over.
			{Id: "2-1", Cursor: "2-1", Type: eventsv1.EventType_EVENT_TYPE_MESSAGE_CREATED},
			decidedEvent("3-0", eventsv1.MemoryDecisionAction_MEMORY_DECISION_ACTION_UPDATE,
				"users/u/memories/kreuzberg", "users/u/memories/berlin"),
		}}}},
	}
	for _, frame := range frames {
		if err := stream.Send(frame); err != nil {
			return err
		}
	}
	<-stream.Context().Done()
	return nil
}

func scriptedMemoryClient(t *testing.T, server *scriptedMemory) *Client {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := grpc.NewServer()
	contextv1.RegisterContextServiceServer(served, server)
	dispatcherv1.RegisterDispatcherServiceServer(served, server)
	eventsv1.RegisterEventServiceServer(served, server)
	go func() { _ = served.Serve(listener) }()
	t.Cleanup(served.Stop)
	fast := Backoff{Initial: 10 * time.Millisecond, Max: 50 * time.Millisecond}
	client, err := Dial(listener.Addr().String(), WithInsecure(), WithBackoff(fast), WithIdleTimeout(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func memoryItems(names ...string) []*contextv1.MemoryItem {
	var items []*contextv1.MemoryItem
	for _, name := range names {
		items = append(items, &contextv1.MemoryItem{Name: name})
	}
	return items
}

func TestListMemoryTakesEveryPageWithItsFiltersAndRetriesATransientFailure(t *testing.T) {
	server := &scriptedMemory{items: memoryItems("users/u/memories/a", "users/u/memories/b", "users/u/memories/c")}
	client := scriptedMemoryClient(t, server)
	at := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)

	items, err := client.ListMemory(within(t), "users/u", ListMemoryOptions{
		Validity: contextv1.MemoryValidity_MEMORY_VALIDITY_RETIRED, ValidAt: at, Workspace: "workspaces/w",
		Kinds: []contextv1.MemoryKind{contextv1.MemoryKind_MEMORY_KIND_FACT},
	})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, item := range items {
		names = append(names, item.GetName())
	}
	if want := []string{"users/u/memories/a", "users/u/memories/b", "users/u/memories/c"}; !slices.Equal(names, want) {
		t.Errorf("listed %v, want %v", names, want)
	}
	// The refused call, its retry, then a page each.
	if len(server.lists) != 4 {
		t.Fatalf("%d ListMemoryItems calls, want 4", len(server.lists))
	}
	for _, req := range server.lists {
		if req.GetParent() != "users/u" || req.GetWorkspace() != "workspaces/w" ||
			req.GetValidity() != contextv1.MemoryValidity_MEMORY_VALIDITY_RETIRED ||
			!req.GetValidAt().AsTime().Equal(at) || len(req.GetKinds()) != 1 {
			t.Errorf("ListMemoryItems asked %v", req)
		}
	}
	if tokens := []string{server.lists[2].GetPageToken(), server.lists[3].GetPageToken()}; !slices.Equal(tokens, []string{"1", "2"}) {
		t.Errorf("pages asked with tokens %v", tokens)
	}

	server.failed = false
	limited, err := client.ListMemory(within(t), "users/u", ListMemoryOptions{Limit: 2})
	if err != nil || len(limited) != 2 {
		t.Fatalf("with a limit of 2: %d items, %v", len(limited), err)
	}
	last := server.lists[len(server.lists)-1]
	if last.GetPageSize() != 1 || last.GetValidAt() != nil {
		t.Errorf("the last page asked for %d items (valid_at %v); one was left", last.GetPageSize(), last.GetValidAt())
	}
}

func TestMemoryEditsSendTheFieldsTheyChangeWithTheEtag(t *testing.T) {
	server := &scriptedMemory{}
	client := scriptedMemoryClient(t, server)
	const name = "workspaces/w/memories/m"
	ctx := within(t)

	if _, err := client.CorrectMemory(ctx, name, `"3"`, "closes at seven"); err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	if _, err := client.RetireMemory(ctx, name, `"4"`, "moved", time.Time{}); err != nil {
		t.Fatal(err)
	}
	then := time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)
	if _, err := client.RetireMemory(ctx, name, "", "", then); err != nil {
		t.Fatal(err)
	}
	if _, err := client.RestoreMemory(ctx, name, `"5"`); err != nil {
		t.Fatal(err)
	}
	if len(server.updates) != 4 {
		t.Fatalf("%d updates", len(server.updates))
	}
	correct, retire, retireThen, restore := server.updates[0], server.updates[1], server.updates[2], server.updates[3]
	if item := correct.GetMemoryItem(); item.GetContent() != "closes at seven" || item.GetEtag() != `"3"` ||
		!slices.Equal(correct.GetUpdateMask().GetPaths(), []string{"content"}) {
		t.Errorf("correct sent %v", correct)
	}
	retiredAt := retire.GetMemoryItem().GetInvalidTime().AsTime()
	if retiredAt.Before(before.Add(-time.Second)) || retiredAt.After(time.Now()) ||
		retire.GetMemoryItem().GetInvalidReason() != "moved" || retire.GetMemoryItem().GetEtag() != `"4"` ||
		!slices.Equal(retire.GetUpdateMask().GetPaths(), []string{"invalid_time", "invalid_reason"}) {
		t.Errorf("retire sent %v", retire)
	}
	if !retireThen.GetMemoryItem().GetInvalidTime().AsTime().Equal(then) {
		t.Errorf("retire at a time sent %v", retireThen)
	}
	if item := restore.GetMemoryItem(); item.GetInvalidTime() != nil || item.GetInvalidReason() != "" ||
		!slices.Equal(restore.GetUpdateMask().GetPaths(), []string{"invalid_time", "invalid_reason"}) {
		t.Errorf("restore sent %v (the fields it clears must be in the mask, unset)", restore)
	}

	got, err := client.GetMemory(ctx, name, true)
	if err != nil || len(got.GetHistory()) != 1 {
		t.Errorf("GetMemory with history: %v, %v", got, err)
	}
	if err := client.ForgetMemory(ctx, name); err != nil || !slices.Equal(server.deleted, []string{name}) {
		t.Errorf("forget: %v, deleted %v", err, server.deleted)
	}
}

func TestMemoryPoliciesAreSetWithAMaskOfTheirOwn(t *testing.T) {
	server := &scriptedMemory{}
	client := scriptedMemoryClient(t, server)
	policy := &contextv1.MemoryPolicy{Mode: contextv1.MemoryFormingMode_MEMORY_FORMING_MODE_USER, IdleMinutes: 15}
	assistant, err := client.SetAssistantMemoryPolicy(within(t), "workspaces/w/assistants/a", `"2"`, policy)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(assistant.GetMemoryPolicy(), policy) {
		t.Errorf("assistant policy %v", assistant.GetMemoryPolicy())
	}
	sent := server.assistants[0]
	if sent.GetAssistant().GetEtag() != `"2"` || !slices.Equal(sent.GetUpdateMask().GetPaths(), []string{"memory_policy"}) {
		t.Errorf("UpdateAssistant sent %v", sent)
	}
	if _, err := client.SetWorkspaceMemoryPolicy(within(t), "workspaces/w", nil); err != nil {
		t.Fatal(err)
	}
	cleared := server.workspaces[0]
	if cleared.GetWorkspace().GetMemoryPolicy() != nil || !slices.Equal(cleared.GetUpdateMask().GetPaths(), []string{"memory_policy"}) {
		t.Errorf("UpdateWorkspace sent %v", cleared)
	}
}

func TestFollowMemoryDecisionsAsksForThemAndHandsOverEachPayload(t *testing.T) {
	server := &scriptedMemory{}
	client := scriptedMemoryClient(t, server)
	var decided []*eventsv1.MemoryDecided
	done := errors.New("seen both")
	err := client.FollowMemoryDecisions(within(t), FollowOptions{Scopes: []*eventsv1.Scope{UserScope("users/u")}},
		func(event *eventsv1.Event, decision *eventsv1.MemoryDecided) error {
			decided = append(decided, decision)
			if len(decided) == 2 {
				return done
			}
			return nil
		})
	if !errors.Is(err, done) {
		t.Fatalf("FollowMemoryDecisions returned %v", err)
	}
	if decided[0].GetAction() != eventsv1.MemoryDecisionAction_MEMORY_DECISION_ACTION_ADD ||
		decided[1].GetReplaces() != "users/u/memories/berlin" {
		t.Errorf("decisions %v", decided)
	}
	types := server.subscribed[0].GetTypes()
	if !slices.Equal(types, []eventsv1.EventType{eventsv1.EventType_EVENT_TYPE_MEMORY_DECIDED}) {
		t.Errorf("subscribed to %v", types)
	}
}
