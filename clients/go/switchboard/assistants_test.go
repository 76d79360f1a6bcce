package switchboard

import (
	"context"
	"fmt"
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
	handlerv1 "switchboard.dev/go/gen/switchboard/api/handler/v1"
)

const revisedAssistant = "workspaces/w/assistants/a"

// scriptedRevisions records what the client asks of the revision RPCs and
// answers from a fixed history: ListAssistantRevisions two revisions a page,
// after refusing the first call with UNAVAILABLE; GetAssistant the revision
// asked for, after refusing the first call too. The real server is tested
// with the example program (tests/e2e/test_go_revisions.py).
type scriptedRevisions struct {
	dispatcherv1.UnimplementedDispatcherServiceServer

	mu        sync.Mutex
	revisions []*dispatcherv1.AssistantRevision // newest first
	listed    []*dispatcherv1.ListAssistantRevisionsRequest
	got       []*dispatcherv1.GetAssistantRequest
	rollbacks []*dispatcherv1.RollbackAssistantRequest
}

func (s *scriptedRevisions) ListAssistantRevisions(_ context.Context, req *dispatcherv1.ListAssistantRevisionsRequest) (*dispatcherv1.ListAssistantRevisionsResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.listed = append(s.listed, proto.Clone(req).(*dispatcherv1.ListAssistantRevisionsRequest))
	if len(s.listed) == 1 {
		return nil, status.Error(codes.Unavailable, "the server went away")
	}
	at := 0
	if req.GetPageToken() != "" {
		at, _ = strconv.Atoi(req.GetPageToken())
	}
	end := min(at+2, len(s.revisions))
	response := &dispatcherv1.ListAssistantRevisionsResponse{Revisions: s.revisions[at:end]}
	if end < len(s.revisions) {
		response.NextPageToken = strconv.Itoa(end)
	}
	return response, nil
}

func (s *scriptedRevisions) GetAssistant(_ context.Context, req *dispatcherv1.GetAssistantRequest) (*dispatcherv1.GetAssistantResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got = append(s.got, req)
	if len(s.got) == 1 {
		return nil, status.Error(codes.Unavailable, "the server went away")
	}
	for _, kept := range s.revisions {
		if kept.GetRevision() == req.GetRevision() || (req.GetRevision() == 0 && kept == s.revisions[0]) {
			return &dispatcherv1.GetAssistantResponse{Assistant: kept.GetAssistant()}, nil
		}
	}
	return nil, status.Errorf(codes.NotFound, "%s keeps no revision %d", req.GetName(), req.GetRevision())
}

func (s *scriptedRevisions) RollbackAssistant(_ context.Context, req *dispatcherv1.RollbackAssistantRequest) (*dispatcherv1.RollbackAssistantResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rollbacks = append(s.rollbacks, req)
	if len(s.rollbacks) == 1 {
		// A write is not repeated by the client: this failure must reach the caller.
		return nil, status.Error(codes.Unavailable, "the server went away")
	}
	restored := proto.Clone(s.revisions[len(s.revisions)-int(req.GetRevision())].GetAssistant()).(*dispatcherv1.Assistant)
	restored.Revision = int64(len(s.revisions) + 1)
	return &dispatcherv1.RollbackAssistantResponse{Assistant: restored}, nil
}

// revisionHistory is n revisions of one assistant, newest first, its
// instructions saying which.
func revisionHistory(n int) []*dispatcherv1.AssistantRevision {
	var history []*dispatcherv1.AssistantRevision
	for revision := int64(n); revision >= 1; revision-- {
		history = append(history, &dispatcherv1.AssistantRevision{
			Name:     fmt.Sprintf("%s/revisions/%d", revisedAssistant, revision),
			Revision: revision,
			Assistant: &dispatcherv1.Assistant{
				Name: revisedAssistant, Revision: revision, Instructions: fmt.Sprintf("revision %d", revision),
			},
		})
	}
	return history
}

func scriptedRevisionsClient(t *testing.T, server *scriptedRevisions) *Client {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := grpc.NewServer()
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

func TestAssistantRevisionsTakesEveryPageNewestFirstAndRetriesATransientFailure(t *testing.T) {
	server := &scriptedRevisions{revisions: revisionHistory(5)}
	client := scriptedRevisionsClient(t, server)

	revisions, err := client.AssistantRevisions(within(t), revisedAssistant)
	if err != nil {
		t.Fatal(err)
	}
	var numbers []int64
	for _, revision := range revisions {
		numbers = append(numbers, revision.GetRevision())
	}
	if want := []int64{5, 4, 3, 2, 1}; !slices.Equal(numbers, want) {
		t.Errorf("listed revisions %v, want %v", numbers, want)
	}
	// The refused call, its retry, then a page each.
	if len(server.listed) != 4 {
		t.Fatalf("%d ListAssistantRevisions calls, want 4", len(server.listed))
	}
	var tokens []string
	for _, req := range server.listed {
		if req.GetParent() != revisedAssistant || req.GetPageSize() != 50 {
			t.Errorf("ListAssistantRevisions asked %v", req)
		}
		tokens = append(tokens, req.GetPageToken())
	}
	if want := []string{"", "", "2", "4"}; !slices.Equal(tokens, want) {
		t.Errorf("pages asked with tokens %q, want %q", tokens, want)
	}
}

func TestAssistantAtReadsTheRevisionAskedForAndRetriesATransientFailure(t *testing.T) {
	server := &scriptedRevisions{revisions: revisionHistory(3)}
	client := scriptedRevisionsClient(t, server)
	ctx := within(t)

	first, err := client.AssistantAt(ctx, revisedAssistant, 1)
	if err != nil {
		t.Fatal(err)
	}
	if first.GetRevision() != 1 || first.GetInstructions() != "revision 1" {
		t.Errorf("revision 1 read as %v", first)
	}
	current, err := client.AssistantAt(ctx, revisedAssistant, 0)
	if err != nil || current.GetRevision() != 3 {
		t.Errorf("the current revision read as %v, %v", current, err)
	}
	if len(server.got) != 3 || server.got[1].GetRevision() != 1 || server.got[2].GetRevision() != 0 {
		t.Errorf("GetAssistant asked %v", server.got)
	}
	_, err = client.AssistantAt(ctx, revisedAssistant, 9)
	if status.Code(err) != codes.NotFound {
		t.Errorf("a revision not kept: %v, want NOT_FOUND", err)
	}
}

func TestRollbackAssistantSendsTheRevisionAndEtagAndIsNotRepeated(t *testing.T) {
	server := &scriptedRevisions{revisions: revisionHistory(3)}
	client := scriptedRevisionsClient(t, server)
	ctx := within(t)

	if _, err := client.RollbackAssistant(ctx, revisedAssistant, 1, `"3"`); status.Code(err) != codes.Unavailable {
		t.Fatalf("the refused rollback returned %v, want UNAVAILABLE", err)
	}
	if len(server.rollbacks) != 1 {
		t.Fatalf("a rollback was sent %d times; a write without a key is sent once", len(server.rollbacks))
	}
	rolled, err := client.RollbackAssistant(ctx, revisedAssistant, 1, `"3"`)
	if err != nil {
		t.Fatal(err)
	}
	if rolled.GetRevision() != 4 || rolled.GetInstructions() != "revision 1" {
		t.Errorf("rolled back to %v", rolled)
	}
	sent := server.rollbacks[1]
	if sent.GetName() != revisedAssistant || sent.GetRevision() != 1 || sent.GetEtag() != `"3"` {
		t.Errorf("RollbackAssistant sent %v", sent)
	}
}

func TestAssistantChangesNamesTheConfigurationFieldsThatDiffer(t *testing.T) {
	at := func(revision int64) *dispatcherv1.Assistant {
		return &dispatcherv1.Assistant{
			Name: revisedAssistant, Etag: strconv.Quote(strconv.FormatInt(revision, 10)), Revision: revision,
			DisplayName: "Helper", Instructions: "Be brief.", Handler: "handlers/echo",
			Model:        &handlerv1.ModelSettings{Model: "small"},
			MemoryPolicy: &contextv1.MemoryPolicy{Mode: contextv1.MemoryFormingMode_MEMORY_FORMING_MODE_USER},
			Delegates:    []*dispatcherv1.AssistantDelegate{{Assistant: "workspaces/w/assistants/b"}},
		}
	}
	from, to := at(1), at(2)
	to.WorkspaceDefault = true // the workspace's choice, not the assistant's configuration
	if changed := AssistantChanges(from, to); len(changed) != 0 {
		t.Errorf("two readings of one configuration differ in %v", changed)
	}

	to.Instructions = "Be thorough."
	to.Model.Model = "large"
	to.Delegates = append(to.Delegates, &dispatcherv1.AssistantDelegate{Assistant: "workspaces/w/assistants/c"})
	to.MemoryPolicy = nil
	want := []string{"instructions", "model", "delegates", "memory_policy"}
	if changed := AssistantChanges(from, to); !slices.Equal(changed, want) {
		t.Errorf("changed %v, want %v", changed, want)
	}
	if changed := AssistantChanges(to, from); !slices.Equal(changed, want) {
		t.Errorf("the other way round: changed %v, want %v", changed, want)
	}
	// Unset and set to its default are the same configuration.
	if changed := AssistantChanges(&dispatcherv1.Assistant{}, &dispatcherv1.Assistant{Model: &handlerv1.ModelSettings{}}); len(changed) != 0 {
		t.Errorf("an empty model set differs in %v", changed)
	}
}
