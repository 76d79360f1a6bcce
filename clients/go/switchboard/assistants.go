package switchboard

import (
	"context"

	"google.golang.org/protobuf/reflect/protoreflect"

	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
)

// An assistant's configuration has revisions (docs/assistants.md): 1 when it
// is created, one more with each change of it (Assistant.Revision is the
// current one). Every revision is kept whole and never changes; a rollback
// makes an earlier one's configuration current as a new revision. A message
// may be answered with a revision other than the current one
// (SendMessageRequest.AssistantRevision, recorded as Run.AssistantRevision):
// how a change is tried before everything uses it.

// AssistantRevisions lists assistant's (workspaces/{w}/assistants/{a})
// revisions, newest first, every page. Each page is a read, retried on
// transient failures like any.
func (c *Client) AssistantRevisions(ctx context.Context, assistant string) ([]*dispatcherv1.AssistantRevision, error) {
	var found []*dispatcherv1.AssistantRevision
	// The server's largest page: each revision holds a whole configuration.
	request := &dispatcherv1.ListAssistantRevisionsRequest{Parent: assistant, PageSize: 50}
	for {
		var page *dispatcherv1.ListAssistantRevisionsResponse
		err := c.Retry(ctx, func(ctx context.Context) error {
			var err error
			page, err = c.Dispatcher.ListAssistantRevisions(ctx, request)
			return err
		})
		if err != nil {
			return nil, err
		}
		found = append(found, page.GetRevisions()...)
		request.PageToken = page.GetNextPageToken()
		if request.PageToken == "" {
			return found, nil
		}
	}
}

// AssistantAt reads assistant as revision configured it; 0 reads the current
// configuration. An earlier revision comes without an etag (it cannot be
// updated: RollbackAssistant makes it current again) and with its own time as
// UpdateTime; a revision the assistant does not keep is NOT_FOUND. Retried on
// transient failures.
func (c *Client) AssistantAt(ctx context.Context, assistant string, revision int64) (*dispatcherv1.Assistant, error) {
	var got *dispatcherv1.GetAssistantResponse
	err := c.Retry(ctx, func(ctx context.Context) error {
		var err error
		got, err = c.Dispatcher.GetAssistant(ctx, &dispatcherv1.GetAssistantRequest{Name: assistant, Revision: revision})
		return err
	})
	if err != nil {
		return nil, err
	}
	return got.GetAssistant(), nil
}

// RollbackAssistant makes revision's configuration of assistant current again
// (owners only): the answer is the assistant at a new revision, whose
// AssistantRevision has origin ROLLED_BACK and RestoredRevision revision, or
// as it was if its configuration already was that one. etag, if not empty, is
// the assistant's as read: a stale one is ABORTED with reason ETAG_MISMATCH,
// so no change made meanwhile is undone unseen. A configuration that no
// longer holds (a delegate or integration it names is gone) is
// FAILED_PRECONDITION. Not retried: it is a write without an idempotency key.
func (c *Client) RollbackAssistant(ctx context.Context, assistant string, revision int64, etag string) (*dispatcherv1.Assistant, error) {
	rolled, err := c.Dispatcher.RollbackAssistant(ctx, &dispatcherv1.RollbackAssistantRequest{
		Name: assistant, Revision: revision, Etag: etag,
	})
	if err != nil {
		return nil, err
	}
	return rolled.GetAssistant(), nil
}

// notConfiguration are the Assistant fields no revision changes: those the
// server sets (its name, etag, times and revision number) and
// workspace_default, the workspace's routing choice rather than the
// assistant's configuration.
var notConfiguration = map[protoreflect.Name]bool{
	"name": true, "etag": true, "create_time": true, "update_time": true, "revision": true,
	"workspace_default": true,
}

// AssistantChanges lists the configuration fields (their proto names, in the
// order the contract declares them) whose values differ between two readings of an
// assistant, such as two of its revisions. A field unset on one side and set
// to its default on the other is no change.
func AssistantChanges(from, to *dispatcherv1.Assistant) []string {
	var changed []string
	a, b := from.ProtoReflect(), to.ProtoReflect()
	fields := a.Descriptor().Fields()
	for i := range fields.Len() {
		field := fields.Get(i)
		if notConfiguration[field.Name()] {
			continue
		}
		if !a.Get(field).Equal(b.Get(field)) {
			changed = append(changed, string(field.Name()))
		}
	}
	return changed
}
