package switchboard

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	commonv1 "switchboard.dev/go/gen/switchboard/api/common/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	handlerv1 "switchboard.dev/go/gen/switchboard/api/handler/v1"
)

// scriptedTree serves a tree of runs: top asks middle-a and middle-b, middle-a
// asks leaf. ListRuns answers one run a page (so paging is exercised) after
// refusing the first call with UNAVAILABLE; WatchRun streams top's updates,
// naming its two children. The real server is tested with the example program
// (tests/e2e/test_go_client.py).
type scriptedTree struct {
	dispatcherv1.UnimplementedDispatcherServiceServer

	mu       sync.Mutex
	runs     map[string]*dispatcherv1.Run
	failed   bool
	requests []*dispatcherv1.ListRunsRequest
}

const (
	topRun     = "workspaces/w/conversations/c/runs/top"
	middleARun = "workspaces/w/conversations/ca/runs/middle-a"
	middleBRun = "workspaces/w/conversations/cb/runs/middle-b"
	leafRun    = "workspaces/w/conversations/cl/runs/leaf"
)

func newScriptedTree() *scriptedTree {
	run := func(name, parent, call string, depth int32) *dispatcherv1.Run {
		return &dispatcherv1.Run{Name: name, Parent: parent, ParentToolCall: call, Depth: depth,
			State: dispatcherv1.RunState_RUN_STATE_SUCCEEDED}
	}
	return &scriptedTree{runs: map[string]*dispatcherv1.Run{
		topRun:     run(topRun, "", "", 0),
		middleARun: run(middleARun, topRun, "call-a", 1),
		middleBRun: run(middleBRun, topRun, "call-b", 1),
		leafRun:    run(leafRun, middleARun, "call-leaf", 2),
	}}
}

func (s *scriptedTree) GetRun(_ context.Context, req *dispatcherv1.GetRunRequest) (*dispatcherv1.GetRunResponse, error) {
	run, ok := s.runs[req.GetName()]
	if !ok {
		return nil, status.Error(codes.NotFound, "no such run")
	}
	return &dispatcherv1.GetRunResponse{Run: run}, nil
}

func (s *scriptedTree) ListRuns(_ context.Context, req *dispatcherv1.ListRunsRequest) (*dispatcherv1.ListRunsResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, req)
	if !s.failed {
		s.failed = true
		return nil, status.Error(codes.Unavailable, "the server went away")
	}
	var children []*dispatcherv1.Run
	for _, run := range s.runs {
		if run.GetParent() == req.GetParentRun() && req.GetParentRun() != "" {
			children = append(children, run)
		}
	}
	slices.SortFunc(children, func(a, b *dispatcherv1.Run) int {
		// Newest first, as the server orders them: b asked after a.
		return -compareNames(a.GetName(), b.GetName())
	})
	at := 0
	if req.GetPageToken() != "" {
		at, _ = strconv.Atoi(req.GetPageToken())
	}
	response := &dispatcherv1.ListRunsResponse{TotalSize: int32(len(children))}
	if at < len(children) {
		response.Runs = children[at : at+1]
		if at+1 < len(children) {
			response.NextPageToken = strconv.Itoa(at + 1)
		}
	}
	return response, nil
}

func compareNames(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func childUpdate(sequence int64, name, call string, state dispatcherv1.RunState) *dispatcherv1.RunUpdate {
	child := &dispatcherv1.ChildRun{Run: name, Assistant: "workspaces/w/assistants/" + call, ToolCallId: call, State: state}
	if Terminal(state) {
		child.Usage = &handlerv1.Usage{OutputTokens: 7}
	}
	return &dispatcherv1.RunUpdate{Run: topRun, Sequence: sequence, Update: &dispatcherv1.RunUpdate_ChildRun{ChildRun: child}}
}

func (s *scriptedTree) WatchRun(req *dispatcherv1.WatchRunRequest, stream grpc.ServerStreamingServer[dispatcherv1.WatchRunResponse]) error {
	updates := []*dispatcherv1.RunUpdate{
		stateChange(1, dispatcherv1.RunState_RUN_STATE_RUNNING),
		childUpdate(2, middleARun, "call-a", dispatcherv1.RunState_RUN_STATE_QUEUED),
		childUpdate(3, middleBRun, "call-b", dispatcherv1.RunState_RUN_STATE_RUNNING),
		childUpdate(4, middleBRun, "call-b", dispatcherv1.RunState_RUN_STATE_SUCCEEDED),
		childUpdate(5, middleARun, "call-a", dispatcherv1.RunState_RUN_STATE_SUCCEEDED),
		delta(6, "both answered"),
		stateChange(7, dispatcherv1.RunState_RUN_STATE_SUCCEEDED),
	}
	for _, update := range updates {
		if update.GetSequence() <= req.GetAfterSequence() {
			continue
		}
		update.Run = req.GetName()
		if err := stream.Send(&dispatcherv1.WatchRunResponse{Frame: &dispatcherv1.WatchRunResponse_Update{Update: update}}); err != nil {
			return err
		}
	}
	return nil
}

func TestChildrenListsEveryPageByParentRunOverTheRunsWorkspace(t *testing.T) {
	server := newScriptedTree()
	client := scripted(t, server)

	children, err := client.Children(within(t), topRun)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, child := range children {
		names = append(names, child.GetName())
		if child.GetParent() != topRun || child.GetDepth() != 1 {
			t.Errorf("child %s: parent %q depth %d", child.GetName(), child.GetParent(), child.GetDepth())
		}
	}
	if want := []string{middleBRun, middleARun}; !slices.Equal(names, want) {
		t.Errorf("children %v, want %v (every page, newest first)", names, want)
	}
	// The refused call, then a page each: every one over the workspace, by parent run.
	if len(server.requests) != 3 {
		t.Fatalf("%d ListRuns calls, want the refused one, its retry and the second page", len(server.requests))
	}
	for _, req := range server.requests {
		if req.GetParent() != "workspaces/w" || req.GetParentRun() != topRun {
			t.Errorf("ListRuns parent %q parent_run %q", req.GetParent(), req.GetParentRun())
		}
	}
	if server.requests[2].GetPageToken() != "1" {
		t.Errorf("the second page was asked with token %q", server.requests[2].GetPageToken())
	}

	none, err := client.Children(within(t), leafRun)
	if err != nil || len(none) != 0 {
		t.Errorf("a leaf's children: %v, %v", none, err)
	}
}

func TestChildrenRefusesANameThatIsNotARunsBeforeSending(t *testing.T) {
	server := newScriptedTree()
	client := scripted(t, server)
	for _, bad := range []string{"", "runs/r", "workspaces/w/conversations/c", "workspaces/w/conversations/c/runs/",
		"workspaces//conversations/c/runs/r", "workspaces/w/x/c/runs/r"} {
		if _, err := client.Children(within(t), bad); err == nil {
			t.Errorf("Children(%q) was not refused", bad)
		}
		if _, err := client.Tree(within(t), bad); err == nil {
			t.Errorf("Tree(%q) was not refused", bad)
		}
	}
	if len(server.requests) != 0 {
		t.Errorf("%d ListRuns calls for names that are not runs'", len(server.requests))
	}
}

func TestTreeWalksEveryRunEachBeforeItsChildren(t *testing.T) {
	client := scripted(t, newScriptedTree())
	tree, err := client.Tree(within(t), topRun)
	if err != nil {
		t.Fatal(err)
	}
	var walked []string
	for _, run := range tree.Walk() {
		walked = append(walked, fmt.Sprintf("%s@%d", run.GetName(), run.GetDepth()))
	}
	want := []string{topRun + "@0", middleBRun + "@1", middleARun + "@1", leafRun + "@2"}
	if !slices.Equal(walked, want) {
		t.Errorf("walked %v, want %v", walked, want)
	}
	if len(tree.Children) != 2 || len(tree.Children[1].Children) != 1 || tree.Children[1].Children[0].Run.GetParentToolCall() != "call-leaf" {
		t.Errorf("tree shape %v", tree)
	}

	if _, err := client.Tree(within(t), "workspaces/w/conversations/c/runs/gone"); status.Code(err) != codes.NotFound {
		t.Errorf("a run that does not exist: %v, want NOT_FOUND", err)
	}
}

func TestWatchRunHandsEachChildToOnChildBeforeTheHandler(t *testing.T) {
	client := scripted(t, newScriptedTree())
	var order []string
	run, err := client.WatchRun(within(t), topRun, WatchOptions{
		OnChild: func(child *dispatcherv1.ChildRun) {
			order = append(order, fmt.Sprintf("child %s %s %v", child.GetToolCallId(), child.GetState(), child.GetUsage().GetOutputTokens()))
		},
	}, func(update *dispatcherv1.RunUpdate) error {
		order = append(order, fmt.Sprintf("update %d", update.GetSequence()))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if run.GetState() != dispatcherv1.RunState_RUN_STATE_SUCCEEDED {
		t.Errorf("state %v", run.GetState())
	}
	want := []string{
		"update 1",
		"child call-a RUN_STATE_QUEUED 0", "update 2",
		"child call-b RUN_STATE_RUNNING 0", "update 3",
		"child call-b RUN_STATE_SUCCEEDED 7", "update 4",
		"child call-a RUN_STATE_SUCCEEDED 7", "update 5",
		"update 6", "update 7",
	}
	if !slices.Equal(order, want) {
		t.Errorf("seen\n%v\nwant\n%v", order, want)
	}
}

func TestChildErrorSaysWhyAChildDidNotSucceed(t *testing.T) {
	info, err := status.New(codes.ResourceExhausted, "over budget").WithDetails(&errdetails.ErrorInfo{
		Reason: commonv1.ErrorReason_ERROR_REASON_BUDGET_EXHAUSTED.String(), Domain: Domain,
	})
	if err != nil {
		t.Fatal(err)
	}
	child := func(state dispatcherv1.RunState, e *spb.Status) *dispatcherv1.ChildRun {
		return &dispatcherv1.ChildRun{Run: middleARun, State: state, Error: e}
	}
	for _, going := range []dispatcherv1.RunState{dispatcherv1.RunState_RUN_STATE_QUEUED,
		dispatcherv1.RunState_RUN_STATE_RUNNING, dispatcherv1.RunState_RUN_STATE_SUCCEEDED} {
		if err := ChildError(child(going, nil)); err != nil {
			t.Errorf("%v: %v, want none", going, err)
		}
	}
	failed := ChildError(child(dispatcherv1.RunState_RUN_STATE_FAILED, info.Proto()))
	if status.Code(failed) != codes.ResourceExhausted || Reason(failed) != commonv1.ErrorReason_ERROR_REASON_BUDGET_EXHAUSTED {
		t.Errorf("failed: %v (reason %v)", failed, Reason(failed))
	}
	if got := status.Code(ChildError(child(dispatcherv1.RunState_RUN_STATE_CANCELLED, nil))); got != codes.Canceled {
		t.Errorf("cancelled without an error: %v", got)
	}
	if got := status.Code(ChildError(child(dispatcherv1.RunState_RUN_STATE_DEADLINE_EXCEEDED, nil))); got != codes.DeadlineExceeded {
		t.Errorf("past its deadline without an error: %v", got)
	}
}
