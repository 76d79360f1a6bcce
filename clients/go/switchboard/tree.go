package switchboard

import (
	"context"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
)

// A run may have child runs: an assistant with delegates asks them through tool
// calls, and each call is a run of the delegate in a conversation of its own
// (docs/delegation.md). A child's Run carries Parent, ParentToolCall and Depth;
// its parent's updates name it (RunUpdate.ChildRun) when it starts and when it
// ends; WatchRun on its name follows it like any run.

// RunWorkspace is workspaces/{w} of a run's name
// (workspaces/{w}/conversations/{c}/runs/{r}), or an error if name is not one.
func RunWorkspace(name string) (string, error) {
	parts := strings.Split(name, "/")
	if len(parts) != 6 || parts[0] != "workspaces" || parts[2] != "conversations" || parts[4] != "runs" ||
		parts[1] == "" || parts[3] == "" || parts[5] == "" {
		return "", fmt.Errorf("switchboard: %q is not a run's name (workspaces/{w}/conversations/{c}/runs/{r})", name)
	}
	return "workspaces/" + parts[1], nil
}

// Children lists the child runs of run (a run's name): the runs its delegate
// tool calls started, newest first, every page. It is ListRuns with ParentRun
// over the run's workspace (the children live in conversations of their own).
// Each page is a read, retried on transient failures like any; a name that is
// not a run's is refused before anything is sent.
func (c *Client) Children(ctx context.Context, run string) ([]*dispatcherv1.Run, error) {
	workspace, err := RunWorkspace(run)
	if err != nil {
		return nil, err
	}
	var found []*dispatcherv1.Run
	token := ""
	for {
		var page *dispatcherv1.ListRunsResponse
		err := c.Retry(ctx, func(ctx context.Context) error {
			var err error
			page, err = c.Dispatcher.ListRuns(ctx, &dispatcherv1.ListRunsRequest{
				Parent: workspace, ParentRun: run, PageSize: 100, PageToken: token,
			})
			return err
		})
		if err != nil {
			return nil, err
		}
		found = append(found, page.GetRuns()...)
		token = page.GetNextPageToken()
		if token == "" {
			return found, nil
		}
	}
}

// RunTree is a run with the runs its delegate tool calls started, each with its own.
type RunTree struct {
	Run      *dispatcherv1.Run
	Children []*RunTree // newest first, as Children lists them
}

// Walk lists every run of the tree, each before its children.
func (t *RunTree) Walk() []*dispatcherv1.Run {
	found := []*dispatcherv1.Run{t.Run}
	for _, child := range t.Children {
		found = append(found, child.Walk()...)
	}
	return found
}

// Tree is run (a run's name) with its children, theirs below them, and so on:
// one GetRun, then one Children per run of the tree. The server bounds a
// tree's depth and size (SWITCHBOARD_DISPATCHER_MAX_DELEGATION_DEPTH and
// _MAX_CHILDREN_PER_TREE), which bounds the calls.
func (c *Client) Tree(ctx context.Context, run string) (*RunTree, error) {
	if _, err := RunWorkspace(run); err != nil {
		return nil, err
	}
	root, err := c.getRun(ctx, run)
	if err != nil {
		return nil, err
	}
	return c.subtree(ctx, root)
}

func (c *Client) subtree(ctx context.Context, run *dispatcherv1.Run) (*RunTree, error) {
	below, err := c.Children(ctx, run.GetName())
	if err != nil {
		return nil, err
	}
	tree := &RunTree{Run: run}
	for _, child := range below {
		sub, err := c.subtree(ctx, child)
		if err != nil {
			return nil, err
		}
		tree.Children = append(tree.Children, sub)
	}
	return tree, nil
}

// GetRun is the run as it stands now (a child's Parent, ParentToolCall and
// Depth included), retried on transient failures.
func (c *Client) GetRun(ctx context.Context, name string) (*dispatcherv1.Run, error) {
	return c.getRun(ctx, name)
}

// ChildError says why a child run named on its parent's stream did not
// succeed: nil while it goes and when it succeeded; its error as a status
// (status.FromError, Reason and FieldViolations read it) when it ended
// otherwise, or one with the code its state implies when the server sent none.
func ChildError(child *dispatcherv1.ChildRun) error {
	state := child.GetState()
	if !Terminal(state) || state == dispatcherv1.RunState_RUN_STATE_SUCCEEDED {
		return nil
	}
	if e := child.GetError(); e != nil && e.GetCode() != int32(codes.OK) {
		return status.FromProto(e).Err()
	}
	switch state {
	case dispatcherv1.RunState_RUN_STATE_CANCELLED:
		return status.Errorf(codes.Canceled, "the child run ended %v", state)
	case dispatcherv1.RunState_RUN_STATE_DEADLINE_EXCEEDED:
		return status.Errorf(codes.DeadlineExceeded, "the child run ended %v", state)
	}
	return status.Errorf(codes.Unknown, "the child run ended %v", state)
}
