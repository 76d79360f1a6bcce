package switchboard

import (
	"context"
	"time"

	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	eventsv1 "switchboard.dev/go/gen/switchboard/api/events/v1"
)

// Memory items are facts with time (docs/memory.md): an item is current until
// it is retired (its InvalidTime set: superseded by a newer item, retracted,
// merged, expired, or retired by a person), and a retired item stays in its
// history until someone forgets it (ForgetMemory deletes it for good). Items
// live under users/{user}, workspaces/{w} or a conversation of it.

// ListMemoryOptions say which of a scope's items ListMemory takes.
type ListMemoryOptions struct {
	// Validity: CURRENT (the default), RETIRED or ALL.
	Validity contextv1.MemoryValidity
	// ValidAt, if not zero, takes the items true at that time instead
	// (Validity is then ignored).
	ValidAt time.Time
	// Workspace (workspaces/{w}), in a user's scope: only the items formed in
	// that workspace, and those people wrote.
	Workspace string
	// Kinds, if not empty, keeps only these kinds.
	Kinds []contextv1.MemoryKind
	// PinnedOnly keeps only pinned items.
	PinnedOnly bool
	// Limit caps how many are returned (every page up to it); 1000 if 0.
	Limit int
}

// ListMemory lists parent's memory items, newest first, every page up to
// opts.Limit. Each page is a read, retried on transient failures like any.
func (c *Client) ListMemory(ctx context.Context, parent string, opts ListMemoryOptions) ([]*contextv1.MemoryItem, error) {
	limit := opts.Limit
	if limit <= 0 {
		limit = 1000
	}
	request := &contextv1.ListMemoryItemsRequest{
		Parent: parent, Validity: opts.Validity, Workspace: opts.Workspace, Kinds: opts.Kinds,
		PinnedOnly: opts.PinnedOnly,
	}
	if !opts.ValidAt.IsZero() {
		request.ValidAt = timestamppb.New(opts.ValidAt)
	}
	var found []*contextv1.MemoryItem
	for len(found) < limit {
		request.PageSize = int32(min(100, limit-len(found)))
		var page *contextv1.ListMemoryItemsResponse
		err := c.Retry(ctx, func(ctx context.Context) error {
			var err error
			page, err = c.Context.ListMemoryItems(ctx, request)
			return err
		})
		if err != nil {
			return nil, err
		}
		found = append(found, page.GetMemoryItems()...)
		request.PageToken = page.GetNextPageToken()
		if request.PageToken == "" {
			break
		}
	}
	return found[:min(len(found), limit)], nil
}

// GetMemory reads a memory item ({parent}/memories/{memory}); with history,
// the response's History lists every version of it and of the items it
// superseded, oldest first. Retried on transient failures.
func (c *Client) GetMemory(ctx context.Context, name string, history bool) (*contextv1.GetMemoryItemResponse, error) {
	var got *contextv1.GetMemoryItemResponse
	err := c.Retry(ctx, func(ctx context.Context) error {
		var err error
		got, err = c.Context.GetMemoryItem(ctx, &contextv1.GetMemoryItemRequest{Name: name, IncludeHistory: history})
		return err
	})
	return got, err
}

// Remember creates item under parent (users/{user}, workspaces/{w} or a
// conversation of it). An item whose Supersedes names another of the same
// parent replaces it: that one is retired at the new item's ValidTime in the
// same transaction. id, if not empty, is the item's id: a create repeated with
// it is ALREADY_EXISTS, so a create retried after an unknown outcome is
// applied once (it is not retried here).
func (c *Client) Remember(ctx context.Context, parent string, item *contextv1.MemoryItem, id string) (*contextv1.MemoryItem, error) {
	created, err := c.Context.CreateMemoryItem(ctx, &contextv1.CreateMemoryItemRequest{
		Parent: parent, MemoryItem: item, MemoryItemId: id,
	})
	if err != nil {
		return nil, err
	}
	return created.GetMemoryItem(), nil
}

func (c *Client) updateMemory(ctx context.Context, item *contextv1.MemoryItem, paths ...string) (*contextv1.MemoryItem, error) {
	updated, err := c.Context.UpdateMemoryItem(ctx, &contextv1.UpdateMemoryItemRequest{
		MemoryItem: item, UpdateMask: &fieldmaskpb.FieldMask{Paths: paths},
	})
	if err != nil {
		return nil, err
	}
	return updated.GetMemoryItem(), nil
}

// CorrectMemory replaces an item's content, a new version in its history.
// etag (the item's as read) makes it change only that version: a stale one is
// ABORTED with reason ETAG_MISMATCH, so no edit is overwritten unseen; empty
// changes the latest.
func (c *Client) CorrectMemory(ctx context.Context, name, etag, content string) (*contextv1.MemoryItem, error) {
	return c.updateMemory(ctx, &contextv1.MemoryItem{Name: name, Etag: etag, Content: content}, "content")
}

// RetireMemory marks an item no longer true since at (now by this machine's
// clock if zero; a time in the future is refused), with reason in words (at
// most 200 characters). It leaves the context window and the current list and
// stays in the retired one and in its history.
func (c *Client) RetireMemory(ctx context.Context, name, etag, reason string, at time.Time) (*contextv1.MemoryItem, error) {
	if at.IsZero() {
		at = time.Now()
	}
	item := &contextv1.MemoryItem{Name: name, Etag: etag, InvalidTime: timestamppb.New(at), InvalidReason: reason}
	return c.updateMemory(ctx, item, "invalid_time", "invalid_reason")
}

// RestoreMemory makes a retired item current again, unless a newer item
// superseded it (FAILED_PRECONDITION).
func (c *Client) RestoreMemory(ctx context.Context, name, etag string) (*contextv1.MemoryItem, error) {
	return c.updateMemory(ctx, &contextv1.MemoryItem{Name: name, Etag: etag}, "invalid_time", "invalid_reason")
}

// ForgetMemory deletes an item for good, and its history with it: the items
// it superseded (theirs too), every version and embedding of them. An item
// that superseded it stays, current. RetireMemory keeps the record that it
// was once true.
func (c *Client) ForgetMemory(ctx context.Context, name string) error {
	_, err := c.Context.DeleteMemoryItem(ctx, &contextv1.DeleteMemoryItemRequest{Name: name})
	return err
}

// SetAssistantMemoryPolicy sets whether and how an assistant
// (workspaces/{w}/assistants/{a}) forms memory from its conversations; nil (or
// a policy whose Mode is UNSPECIFIED) takes the workspace's. etag, if not
// empty, is the assistant's as read (a stale one is ETAG_MISMATCH). A policy
// out of range is INVALID_ARGUMENT naming the field, and nothing changes.
func (c *Client) SetAssistantMemoryPolicy(ctx context.Context, assistant, etag string,
	policy *contextv1.MemoryPolicy) (*dispatcherv1.Assistant, error) {
	updated, err := c.Dispatcher.UpdateAssistant(ctx, &dispatcherv1.UpdateAssistantRequest{
		Assistant:  &dispatcherv1.Assistant{Name: assistant, Etag: etag, MemoryPolicy: policy},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"memory_policy"}},
	})
	if err != nil {
		return nil, err
	}
	return updated.GetAssistant(), nil
}

// SetWorkspaceMemoryPolicy sets the memory policy of a workspace's assistants
// that set none (owners only); nil turns forming off for them.
func (c *Client) SetWorkspaceMemoryPolicy(ctx context.Context, workspace string,
	policy *contextv1.MemoryPolicy) (*contextv1.Workspace, error) {
	updated, err := c.Context.UpdateWorkspace(ctx, &contextv1.UpdateWorkspaceRequest{
		Workspace:  &contextv1.Workspace{Name: workspace, MemoryPolicy: policy},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"memory_policy"}},
	})
	if err != nil {
		return nil, err
	}
	return updated.GetWorkspace(), nil
}

// FollowMemoryDecisions follows what memory forming and consolidation decide
// in opts.Scopes (decisions about a user's memory come on the user's scope,
// about a workspace's on the workspace's): each
// MEMORY_DECIDED event with its MemoryDecided payload (an item added, one
// replaced or retired, nothing, or an exchange whose forming failed or paused
// at a budget's cap). It is FollowEvents with Types set to MEMORY_DECIDED, so
// it resumes across breaks the same way, each decision once, and returns as
// FollowEvents does.
func (c *Client) FollowMemoryDecisions(ctx context.Context, opts FollowOptions,
	handle func(event *eventsv1.Event, decided *eventsv1.MemoryDecided) error) error {
	opts.Types = []eventsv1.EventType{eventsv1.EventType_EVENT_TYPE_MEMORY_DECIDED}
	return c.FollowEvents(ctx, opts, func(event *eventsv1.Event) error {
		decided := event.GetMemoryDecided()
		if event.GetType() != eventsv1.EventType_EVENT_TYPE_MEMORY_DECIDED || decided == nil {
			// The server sends only the types asked for; a payload this build
			// does not know is skipped, not handed over empty.
			return nil
		}
		return handle(event, decided)
	})
}
