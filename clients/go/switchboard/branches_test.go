package switchboard

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
)

const (
	branchedConversation = "workspaces/w/conversations/c"
	branchedQuestion     = branchedConversation + "/messages/m1"
	branchedAnswer       = branchedConversation + "/messages/m2"
)

// scriptedBranches records what the client asks of the branch RPCs and
// answers each kind of call with UNAVAILABLE the first time (a server going
// away), then as a server would: ListMessages from a fixed branch, two
// messages a page. The real server is tested with the example program
// (tests/e2e/test_go_branches.py).
type scriptedBranches struct {
	contextv1.UnimplementedContextServiceServer
	dispatcherv1.UnimplementedDispatcherServiceServer

	mu          sync.Mutex
	active      int32
	onBranch    map[int32][]*contextv1.Message
	sent        []*dispatcherv1.SendMessageRequest
	regenerated []*dispatcherv1.RegenerateMessageRequest
	routes      []string // the affinity header of each RegenerateMessage call
	switched    []*contextv1.SwitchBranchRequest
	deleted     []*contextv1.DeleteMessageRequest
	listed      []*contextv1.ListMessagesRequest
	forked      []*contextv1.ForkConversationRequest
	forkRoutes  []string // the affinity header of each ForkConversation call
}

// refusedFirst says whether this is the first call of its kind (then refused).
func refusedFirst(calls int) error {
	if calls == 1 {
		return status.Error(codes.Unavailable, "the server went away")
	}
	return nil
}

func (s *scriptedBranches) SendMessage(_ context.Context, req *dispatcherv1.SendMessageRequest) (*dispatcherv1.SendMessageResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sent = append(s.sent, proto.Clone(req).(*dispatcherv1.SendMessageRequest))
	if err := refusedFirst(len(s.sent)); err != nil {
		return nil, err
	}
	edited := proto.Clone(req.GetMessage()).(*contextv1.Message)
	edited.Name, edited.Branch = branchedConversation+"/messages/m3", 2
	edited.Siblings, edited.SiblingPosition = []string{req.GetReplaces(), edited.Name}, 2
	return &dispatcherv1.SendMessageResponse{
		Run:     &dispatcherv1.Run{Name: branchedConversation + "/runs/r2", Branch: 2},
		Message: edited,
	}, nil
}

func (s *scriptedBranches) RegenerateMessage(ctx context.Context, req *dispatcherv1.RegenerateMessageRequest) (*dispatcherv1.RegenerateMessageResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.regenerated = append(s.regenerated, proto.Clone(req).(*dispatcherv1.RegenerateMessageRequest))
	incoming, _ := metadata.FromIncomingContext(ctx)
	s.routes = append(s.routes, incoming.Get(AffinityHeader)...)
	if err := refusedFirst(len(s.regenerated)); err != nil {
		return nil, err
	}
	return &dispatcherv1.RegenerateMessageResponse{
		Run:     &dispatcherv1.Run{Name: branchedConversation + "/runs/r3", Branch: 3},
		Message: &contextv1.Message{Name: branchedQuestion},
	}, nil
}

func (s *scriptedBranches) SwitchBranch(_ context.Context, req *contextv1.SwitchBranchRequest) (*contextv1.SwitchBranchResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.switched = append(s.switched, proto.Clone(req).(*contextv1.SwitchBranchRequest))
	if err := refusedFirst(len(s.switched)); err != nil {
		return nil, err
	}
	s.active = req.GetBranch()
	if req.GetMessage() != "" {
		s.active = 1 // every message of this script is on the first branch
	}
	return &contextv1.SwitchBranchResponse{Conversation: &contextv1.Conversation{
		Name: req.GetConversation(), ActiveBranch: s.active, BranchCount: 3,
	}}, nil
}

func (s *scriptedBranches) DeleteMessage(_ context.Context, req *contextv1.DeleteMessageRequest) (*contextv1.DeleteMessageResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deleted = append(s.deleted, proto.Clone(req).(*contextv1.DeleteMessageRequest))
	if err := refusedFirst(len(s.deleted)); err != nil {
		return nil, err
	}
	gone := []string{req.GetName()}
	if req.GetWithLater() {
		gone = append(gone, branchedAnswer)
	}
	return &contextv1.DeleteMessageResponse{Deleted: gone, Conversation: &contextv1.Conversation{Name: branchedConversation}}, nil
}

func (s *scriptedBranches) ListMessages(_ context.Context, req *contextv1.ListMessagesRequest) (*contextv1.ListMessagesResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.listed = append(s.listed, proto.Clone(req).(*contextv1.ListMessagesRequest))
	if err := refusedFirst(len(s.listed)); err != nil {
		return nil, err
	}
	branch, at := req.GetBranch(), 0
	if token := req.GetPageToken(); token != "" {
		// As the server's, a token holds the branch the first page read and is
		// good only for a request like the one it came from.
		var asked int32
		if _, err := fmt.Sscanf(token, "%d/%d/%d", &asked, &branch, &at); err != nil || asked != req.GetBranch() {
			return nil, status.Error(codes.InvalidArgument, "page_token is not valid for this request")
		}
	} else if branch == 0 {
		branch = s.active
		// Another client switches while this one pages: the active branch moves.
		s.active = 1
	}
	messages := s.onBranch[branch]
	end := min(at+2, len(messages))
	response := &contextv1.ListMessagesResponse{Messages: messages[at:end], Branch: branch}
	if end < len(messages) {
		response.NextPageToken = fmt.Sprintf("%d/%d/%d", req.GetBranch(), branch, end)
	}
	return response, nil
}

func (s *scriptedBranches) ForkConversation(ctx context.Context, req *contextv1.ForkConversationRequest) (*contextv1.ForkConversationResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.forked = append(s.forked, proto.Clone(req).(*contextv1.ForkConversationRequest))
	incoming, _ := metadata.FromIncomingContext(ctx)
	s.forkRoutes = append(s.forkRoutes, incoming.Get(AffinityHeader)...)
	if err := refusedFirst(len(s.forked)); err != nil {
		return nil, err
	}
	return &contextv1.ForkConversationResponse{Conversation: &contextv1.Conversation{
		Name: "workspaces/w/conversations/fork", Title: req.GetConversation().GetTitle(),
		ForkedFrom: req.GetMessage(), MessageCount: 2,
	}}, nil
}

func scriptedBranchesClient(t *testing.T, server *scriptedBranches) *Client {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := grpc.NewServer()
	contextv1.RegisterContextServiceServer(served, server)
	dispatcherv1.RegisterDispatcherServiceServer(served, server)
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

// branchOf is n messages of branch, the first of them with two versions (the
// others, alone at their places, come without siblings, as the server sends them).
func branchOf(branch int32, n int) []*contextv1.Message {
	var messages []*contextv1.Message
	for i := range n {
		name := fmt.Sprintf("%s/messages/b%d-%d", branchedConversation, branch, i)
		message := &contextv1.Message{Name: name, Branch: branch}
		if i == 0 {
			message.Siblings = []string{branchedQuestion, name}
			message.SiblingPosition = 2
		}
		messages = append(messages, message)
	}
	return messages
}

func TestEditMessageSendsAReplacementOnceKeyedAcrossARetry(t *testing.T) {
	server := &scriptedBranches{}
	client := scriptedBranchesClient(t, server)
	timeout := durationpb.New(time.Minute)

	edited, err := client.EditMessage(within(t), branchedQuestion, "How warm is it?",
		func(request *dispatcherv1.SendMessageRequest) {
			request.Assistant = "workspaces/w/assistants/a"
			request.Timeout = timeout
			// An option may not make the edit another message's.
			request.Replaces, request.Conversation = branchedAnswer, "workspaces/w/conversations/other"
		})
	if err != nil {
		t.Fatal(err)
	}
	if edited.GetMessage().GetSiblingPosition() != 2 || edited.GetRun().GetBranch() != 2 {
		t.Errorf("the edit answered %v", edited)
	}
	// The refused call and its retry, with the same key: one new version.
	if len(server.sent) != 2 {
		t.Fatalf("%d SendMessage calls, want 2", len(server.sent))
	}
	first, retry := server.sent[0], server.sent[1]
	if first.GetRequestId() == "" || retry.GetRequestId() != first.GetRequestId() {
		t.Errorf("request ids %q then %q: a retry must repeat the first", first.GetRequestId(), retry.GetRequestId())
	}
	if first.GetConversation() != branchedConversation || first.GetReplaces() != branchedQuestion {
		t.Errorf("sent to %q replacing %q", first.GetConversation(), first.GetReplaces())
	}
	if first.GetAssistant() != "workspaces/w/assistants/a" || !proto.Equal(first.GetTimeout(), timeout) {
		t.Errorf("the options were not applied: %v", first)
	}
	message := first.GetMessage()
	if message.GetRole() != contextv1.MessageRole_MESSAGE_ROLE_USER || len(message.GetParts()) != 1 ||
		message.GetParts()[0].GetText() != "How warm is it?" {
		t.Errorf("sent message %v", message)
	}
}

func TestEditMessageRefusesANameOfNoMessageBeforeCalling(t *testing.T) {
	server := &scriptedBranches{}
	client := scriptedBranchesClient(t, server)
	for _, name := range []string{"", branchedConversation, "workspaces/w/files/f", "m1"} {
		_, err := client.EditMessage(within(t), name, "text")
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("editing %q: %v, want INVALID_ARGUMENT", name, err)
		}
		violations := FieldViolations(err)
		if len(violations) != 1 || violations[0].GetField() != "replaces" {
			t.Errorf("editing %q: field violations %v, want one on replaces", name, violations)
		}
	}
	if len(server.sent) != 0 {
		t.Errorf("%d SendMessage calls for names of no message", len(server.sent))
	}
}

func TestRegenerateIsKeyedRetriedAndRoutedToTheAnswersConversation(t *testing.T) {
	server := &scriptedBranches{}
	client := scriptedBranchesClient(t, server)

	again, err := client.Regenerate(within(t), branchedAnswer)
	if err != nil {
		t.Fatal(err)
	}
	if again.GetRun().GetBranch() != 3 || again.GetMessage().GetName() != branchedQuestion {
		t.Errorf("regenerated %v", again)
	}
	if len(server.regenerated) != 2 {
		t.Fatalf("%d RegenerateMessage calls, want 2", len(server.regenerated))
	}
	first, retry := server.regenerated[0], server.regenerated[1]
	if first.GetMessage() != branchedAnswer || first.GetRequestId() == "" || retry.GetRequestId() != first.GetRequestId() {
		t.Errorf("sent %v then %v: the answer, with one key across the retry", first, retry)
	}
	if want := []string{branchedConversation, branchedConversation}; !slices.Equal(server.routes, want) {
		t.Errorf("routed by %q, want %q", server.routes, want)
	}
}

func TestSwitchBranchByMessageOrNumberIsRetried(t *testing.T) {
	server := &scriptedBranches{}
	client := scriptedBranchesClient(t, server)
	ctx := within(t)

	to2, err := client.SwitchToBranch(ctx, branchedConversation, 2)
	if err != nil {
		t.Fatal(err)
	}
	if to2.GetActiveBranch() != 2 || to2.GetName() != branchedConversation {
		t.Errorf("switched to %v", to2)
	}
	back, err := client.SwitchBranch(ctx, branchedConversation, branchedQuestion)
	if err != nil {
		t.Fatal(err)
	}
	if back.GetActiveBranch() != 1 {
		t.Errorf("switched back to %v", back)
	}
	want := []*contextv1.SwitchBranchRequest{
		{Conversation: branchedConversation, Branch: 2},
		{Conversation: branchedConversation, Branch: 2},
		{Conversation: branchedConversation, Message: branchedQuestion},
	}
	if len(server.switched) != len(want) {
		t.Fatalf("SwitchBranch asked %v, want %v", server.switched, want)
	}
	for i := range want {
		if !proto.Equal(server.switched[i], want[i]) {
			t.Errorf("SwitchBranch call %d asked %v, want %v", i, server.switched[i], want[i])
		}
	}
}

func TestDeleteMessageSendsWithLaterAndIsNotRepeated(t *testing.T) {
	server := &scriptedBranches{}
	client := scriptedBranchesClient(t, server)
	ctx := within(t)

	if _, err := client.DeleteMessage(ctx, branchedQuestion, true); status.Code(err) != codes.Unavailable {
		t.Fatalf("the refused deletion returned %v, want UNAVAILABLE", err)
	}
	if len(server.deleted) != 1 {
		t.Fatalf("a deletion was sent %d times; one without a key is sent once", len(server.deleted))
	}
	deleted, err := client.DeleteMessage(ctx, branchedQuestion, true)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{branchedQuestion, branchedAnswer}; !slices.Equal(deleted.GetDeleted(), want) {
		t.Errorf("deleted %q, want %q", deleted.GetDeleted(), want)
	}
	alone, err := client.DeleteMessage(ctx, branchedAnswer, false)
	if err != nil || !slices.Equal(alone.GetDeleted(), []string{branchedAnswer}) {
		t.Errorf("deleted alone %v, %v", alone, err)
	}
	sent := server.deleted
	if !sent[1].GetWithLater() || sent[1].GetName() != branchedQuestion || sent[2].GetWithLater() {
		t.Errorf("DeleteMessage asked %v", sent)
	}
}

func TestBranchMessagesTakesEveryPageOfTheBranchTheFirstPageRead(t *testing.T) {
	server := &scriptedBranches{active: 2, onBranch: map[int32][]*contextv1.Message{
		1: branchOf(1, 3), 2: branchOf(2, 5),
	}}
	client := scriptedBranchesClient(t, server)

	messages, read, err := client.BranchMessages(within(t), branchedConversation, 0)
	if err != nil {
		t.Fatal(err)
	}
	if read != 2 {
		t.Errorf("read branch %d, want the active one, 2", read)
	}
	var names []string
	for _, message := range messages {
		names = append(names, message.GetName())
	}
	var want []string
	for _, message := range branchOf(2, 5) {
		want = append(want, message.GetName())
	}
	if !slices.Equal(names, want) {
		t.Errorf("read %q, want %q", names, want)
	}
	if SiblingPosition(messages[0]) != "2 / 2" || messages[0].GetSiblings()[0] != branchedQuestion {
		t.Errorf("the first message came without its siblings: %v", messages[0])
	}
	if SiblingPosition(messages[1]) != "" || Sibling(messages[1], -1) != "" {
		t.Errorf("a message alone at its place shows a switcher: %v", messages[1])
	}
	// The refused call, its retry, then a page each, every one asking for the
	// active branch: the tokens keep the later pages on the branch the first
	// read, although the active one moved.
	var asked []string
	for _, req := range server.listed {
		if req.GetParent() != branchedConversation || req.GetPageSize() != branchPageSize {
			t.Errorf("ListMessages asked %v", req)
		}
		asked = append(asked, fmt.Sprintf("%d@%s", req.GetBranch(), req.GetPageToken()))
	}
	if want := []string{"0@", "0@", "0@0/2/2", "0@0/2/4"}; !slices.Equal(asked, want) {
		t.Errorf("pages asked (branch@token) %q, want %q", asked, want)
	}

	first, read, err := client.BranchMessages(within(t), branchedConversation, 1)
	if err != nil || read != 1 || len(first) != 3 {
		t.Errorf("branch 1 read as %d messages of branch %d, %v", len(first), read, err)
	}
}

func TestForkIsKeyedRetriedAndRoutedToTheSourceConversation(t *testing.T) {
	server := &scriptedBranches{}
	client := scriptedBranchesClient(t, server)

	forked, err := client.Fork(within(t), branchedAnswer, "Another way")
	if err != nil {
		t.Fatal(err)
	}
	if forked.GetName() != "workspaces/w/conversations/fork" || forked.GetForkedFrom() != branchedAnswer ||
		forked.GetTitle() != "Another way" {
		t.Errorf("forked %v", forked)
	}
	// The refused call and its retry, with the same key: one fork.
	if len(server.forked) != 2 {
		t.Fatalf("%d ForkConversation calls, want 2", len(server.forked))
	}
	first, retry := server.forked[0], server.forked[1]
	if first.GetRequestId() == "" || retry.GetRequestId() != first.GetRequestId() {
		t.Errorf("request ids %q then %q: a retry must repeat the first", first.GetRequestId(), retry.GetRequestId())
	}
	want := &contextv1.ForkConversationRequest{
		Message: branchedAnswer, Conversation: &contextv1.Conversation{Title: "Another way"}, RequestId: first.GetRequestId(),
	}
	if !proto.Equal(first, want) {
		t.Errorf("ForkConversation asked %v, want %v", first, want)
	}
	// The source's process holds the history the fork shares.
	if want := []string{branchedConversation, branchedConversation}; !slices.Equal(server.forkRoutes, want) {
		t.Errorf("routed by %q, want %q", server.forkRoutes, want)
	}

	again, err := client.Fork(within(t), branchedQuestion, "")
	if err != nil || again.GetForkedFrom() != branchedQuestion {
		t.Errorf("forked again as %v, %v", again, err)
	}
	if len(server.forked) != 3 || server.forked[2].GetRequestId() == first.GetRequestId() {
		t.Errorf("a second fork reused the first one's key: %v", server.forked)
	}
}

func TestForkRefusesANameOfNoMessageBeforeCalling(t *testing.T) {
	server := &scriptedBranches{}
	client := scriptedBranchesClient(t, server)
	for _, name := range []string{"", branchedConversation, "workspaces/w/files/f", "m1"} {
		_, err := client.Fork(within(t), name, "title")
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("forking at %q: %v, want INVALID_ARGUMENT", name, err)
		}
		violations := FieldViolations(err)
		if len(violations) != 1 || violations[0].GetField() != "message" {
			t.Errorf("forking at %q: field violations %v, want one on message", name, violations)
		}
	}
	if len(server.forked) != 0 {
		t.Errorf("%d ForkConversation calls for names of no message", len(server.forked))
	}
}

func TestSiblingPositionAndSiblingFollowTheSwitcher(t *testing.T) {
	three := []string{"a", "b", "c"}
	middle := &contextv1.Message{Name: "b", Siblings: three, SiblingPosition: 2}
	if got := SiblingPosition(middle); got != "2 / 3" {
		t.Errorf("SiblingPosition = %q, want 2 / 3", got)
	}
	if before, after := Sibling(middle, -1), Sibling(middle, 1); before != "a" || after != "c" {
		t.Errorf("the siblings of b: %q and %q", before, after)
	}
	if far := Sibling(middle, 2); far != "" {
		t.Errorf("two after b: %q, want none", far)
	}
	last := &contextv1.Message{Name: "c", Siblings: three, SiblingPosition: 3}
	if Sibling(last, 1) != "" || Sibling(last, -2) != "a" {
		t.Errorf("around c: %q, %q", Sibling(last, 1), Sibling(last, -2))
	}
	// A position the siblings do not bear out: the message's own place counts.
	astray := &contextv1.Message{Name: "a", Siblings: three, SiblingPosition: 3}
	if Sibling(astray, 1) != "b" {
		t.Errorf("after a: %q, want b", Sibling(astray, 1))
	}
	alone := &contextv1.Message{Name: "x", Siblings: []string{"x"}, SiblingPosition: 1}
	// The server sends a message with no other version without siblings, at 0.
	for _, message := range []*contextv1.Message{alone, {Name: "y"}, {Name: "z", SiblingPosition: 1}} {
		if SiblingPosition(message) != "" || Sibling(message, 1) != "" || Sibling(message, -1) != "" {
			t.Errorf("a message with no other version shows a switcher: %v", message)
		}
	}
}
