package switchboard

import (
	"context"
	"fmt"
	"slices"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
)

// A conversation's messages form a tree (context.v1 Message.siblings): editing a
// user message or regenerating an answer puts the new version beside the old
// one, on a new branch that becomes the conversation's active one
// (Conversation.ActiveBranch, of Conversation.BranchCount; branches are
// numbered from 1). A message with other versions names every version at
// its place (Message.Siblings, itself included, oldest first) and its
// position among them (Message.SiblingPosition, from 1), and shows a
// "< 2 / 3 >" switcher; one alone at its place has no Siblings, position 0.
// Switching to a sibling makes the branch through it that changed last the
// active one. Reads, windows and appends that name no branch follow the
// active one. A fork (Fork) is a new conversation that shares another's
// history up to a message.

// branchPageSize is how many messages BranchMessages asks for a page: each
// carries its parts whole.
const branchPageSize = 100

// EditOption sets more of the SendMessageRequest an edit is sent as: the
// assistant or handler to answer with, parameters, a timeout, a concurrency
// policy. The conversation, the message and Replaces are EditMessage's.
type EditOption func(*dispatcherv1.SendMessageRequest)

// EditMessage sends text as a new version of the user message named message
// (workspaces/{w}/conversations/{c}/messages/{m}; SendMessage with Replaces):
// the new message is the old one's sibling on a new branch that starts just
// before it, that branch becomes the conversation's active one, and the run
// the response names answers there. Only the message's author may edit it
// (PERMISSION_DENIED otherwise). As for SendMessage, the request carries an
// idempotency key and transient failures are retried with it, so a retry
// never makes a second version.
func (c *Client) EditMessage(ctx context.Context, message, text string, opts ...EditOption) (*dispatcherv1.SendMessageResponse, error) {
	conversation := Affinity(message)
	if conversation == "" || conversation == message {
		return nil, badName("replaces", message)
	}
	request := &dispatcherv1.SendMessageRequest{
		Conversation: conversation,
		Message: &contextv1.Message{
			Role:  contextv1.MessageRole_MESSAGE_ROLE_USER,
			Parts: []*contextv1.ContentPart{{Part: &contextv1.ContentPart_Text{Text: text}}},
		},
	}
	for _, opt := range opts {
		opt(request)
	}
	// Set after the options, which may not make the edit another message.
	request.Conversation, request.Replaces = conversation, message
	return c.SendMessage(ctx, request)
}

// Regenerate asks again for the answer named answer (a message a run wrote):
// a new run answers the same user message on a new branch beside it, which
// becomes the active one. The response names the run and the user message it
// answers; the run's OutputMessage, once it ends, is the new answer, a
// sibling of the old one. The request carries an idempotency key and
// transient failures are retried with it, so a retry never starts a second
// run.
func (c *Client) Regenerate(ctx context.Context, answer string) (*dispatcherv1.RegenerateMessageResponse, error) {
	request := keyed(&dispatcherv1.RegenerateMessageRequest{Message: answer})
	// The request names its conversation only in a field routing does not read.
	ctx = WithAffinity(ctx, Affinity(answer))
	var response *dispatcherv1.RegenerateMessageResponse
	err := c.Retry(ctx, func(ctx context.Context) error {
		var err error
		response, err = c.Dispatcher.RegenerateMessage(ctx, request)
		return err
	})
	return response, err
}

// SwitchBranch makes the branch through message that changed last the
// conversation's active one: what picking a sibling in a "< 2 / 3 >" switcher
// does. The answer is the conversation, with its new ActiveBranch. Retried on
// transient failures: it sets which branch is active, so making the same
// switch twice ends where once does.
func (c *Client) SwitchBranch(ctx context.Context, conversation, message string) (*contextv1.Conversation, error) {
	return c.switchBranch(ctx, &contextv1.SwitchBranchRequest{Conversation: conversation, Message: message})
}

// SwitchToBranch makes branch n (from 1) the conversation's active one; a
// branch the conversation does not have is refused. Retried as SwitchBranch.
func (c *Client) SwitchToBranch(ctx context.Context, conversation string, n int32) (*contextv1.Conversation, error) {
	return c.switchBranch(ctx, &contextv1.SwitchBranchRequest{Conversation: conversation, Branch: n})
}

func (c *Client) switchBranch(ctx context.Context, request *contextv1.SwitchBranchRequest) (*contextv1.Conversation, error) {
	var response *contextv1.SwitchBranchResponse
	err := c.Retry(ctx, func(ctx context.Context) error {
		var err error
		response, err = c.Context.SwitchBranch(ctx, request)
		return err
	})
	if err != nil {
		return nil, err
	}
	return response.GetConversation(), nil
}

// DeleteMessage deletes the message named name and, withLater, every message
// after it on the active branch (the answers below it). The response lists
// the names deleted, in order, and the conversation after it; the event log
// keeps a MESSAGE_DELETED tombstone for each. Editors may delete answers and
// their own messages; someone else's user message takes the owner. Not
// retried: a repeat of a deletion that went through is NOT_FOUND.
func (c *Client) DeleteMessage(ctx context.Context, name string, withLater bool) (*contextv1.DeleteMessageResponse, error) {
	return c.Context.DeleteMessage(ctx, &contextv1.DeleteMessageRequest{Name: name, WithLater: withLater})
}

// BranchMessages reads a branch of conversation (0: the active one) in order,
// every page, each message with its Siblings and SiblingPosition filled; it
// also returns which branch it read. The pages after the first read the
// branch the first one did (their page token holds it), so a switch made
// meanwhile does not splice two branches together. Each page is a read,
// retried on transient failures like any.
func (c *Client) BranchMessages(ctx context.Context, conversation string, branch int32) ([]*contextv1.Message, int32, error) {
	// Every page asks what the first did, branch 0 included: a page token is
	// only good for the request it came from.
	request := &contextv1.ListMessagesRequest{Parent: conversation, PageSize: branchPageSize, Branch: branch}
	var found []*contextv1.Message
	read := branch
	for {
		var page *contextv1.ListMessagesResponse
		err := c.Retry(ctx, func(ctx context.Context) error {
			var err error
			page, err = c.Context.ListMessages(ctx, request)
			return err
		})
		if err != nil {
			return nil, 0, err
		}
		found = append(found, page.GetMessages()...)
		if read == 0 {
			read = page.GetBranch()
		}
		request.PageToken = page.GetNextPageToken()
		if request.PageToken == "" {
			return found, read, nil
		}
	}
}

// Fork starts a new conversation titled title that shares the history of the
// message named message (workspaces/{w}/conversations/{c}/messages/{m}) up
// to it, included, on the branch it was appended on, and goes on alone from
// there (ForkConversation): the answer is the new conversation, in the same
// workspace, its ForkedFrom the message. Nothing is copied: the fork's reads
// show the shared messages under their own names, the source's, then its
// own; the shared ones are edited, regenerated and deleted in the source.
// Editors and owners may fork, viewers not (PERMISSION_DENIED). The request
// carries an idempotency key and transient failures are retried with it, so
// a retry never makes a second fork.
func (c *Client) Fork(ctx context.Context, message, title string) (*contextv1.Conversation, error) {
	if conversation := Affinity(message); conversation == "" || conversation == message {
		return nil, badName("message", message)
	}
	request := keyed(&contextv1.ForkConversationRequest{
		Message: message, Conversation: &contextv1.Conversation{Title: title},
	})
	var response *contextv1.ForkConversationResponse
	err := c.Retry(ctx, func(ctx context.Context) error {
		var err error
		response, err = c.Context.ForkConversation(ctx, request)
		return err
	})
	if err != nil {
		return nil, err
	}
	return response.GetConversation(), nil
}

// SiblingPosition is where message stands among the versions at its place,
// as a switcher shows it: "2 / 3"; "" when it is the only one.
func SiblingPosition(message *contextv1.Message) string {
	if len(message.GetSiblings()) < 2 {
		return ""
	}
	return fmt.Sprintf("%d / %d", message.GetSiblingPosition(), len(message.GetSiblings()))
}

// Sibling is the name of the version step places from message among its
// siblings (-1: the one before, 1: the one after), for SwitchBranch; "" when
// there is none that far.
func Sibling(message *contextv1.Message, step int) string {
	siblings := message.GetSiblings()
	at := int(message.GetSiblingPosition()) - 1
	if at < 0 || at >= len(siblings) || siblings[at] != message.GetName() {
		// A position the siblings do not bear out: find the message itself.
		at = slices.Index(siblings, message.GetName())
	}
	if at < 0 || at+step < 0 || at+step >= len(siblings) {
		return ""
	}
	return siblings[at+step]
}

// badName is the INVALID_ARGUMENT, with its field violation, of a name that
// names no message of a conversation: found here, before any call.
func badName(field, name string) error {
	refused := status.New(codes.InvalidArgument, fmt.Sprintf("%s: %q names no message of a conversation", field, name))
	detailed, err := refused.WithDetails(&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{
		Field: field, Description: "want workspaces/{w}/conversations/{c}/messages/{m}",
	}}})
	if err != nil {
		return refused.Err()
	}
	return detailed.Err()
}
