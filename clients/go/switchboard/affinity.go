package switchboard

import (
	"context"
	"strings"

	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// AffinityHeader is the routing header: the conversation a call is about. Envoy
// in front of several Switchboard processes picks the process by a hash of it,
// so a conversation's calls reach the process where its runs live. The servers
// never read it: a call without it is served the same, with more work behind it.
// The client sets it on every unary call whose request names a conversation or
// a run of it, and on the streams it opens itself (WatchRun, Talk); on a stream
// of a generated stub, add it with WithAffinity.
const AffinityHeader = "switchboard-affinity"

// affinityFields may hold a conversation's name or a name under it.
var affinityFields = map[protoreflect.Name]bool{
	"conversation": true, "name": true, "run": true, "parent": true, "session": true,
	"message": true,
}

// Affinity is the conversation ("workspaces/{w}/conversations/{c}") that req
// names: req itself when it is a resource name (a run's gives its
// conversation's), else the first of a request message's conversation, name,
// run, parent, session or message fields that names one, or those of the message its
// oneof holds (a Converse action, a Talk start or resume); "" if none.
func Affinity(req any) string {
	switch r := req.(type) {
	case string:
		parts := strings.SplitN(r, "/", 5)
		if len(parts) >= 4 && parts[0] == "workspaces" && parts[1] != "" &&
			parts[2] == "conversations" && parts[3] != "" {
			return strings.Join(parts[:4], "/")
		}
		return ""
	case proto.Message:
		found := ""
		r.ProtoReflect().Range(func(field protoreflect.FieldDescriptor, value protoreflect.Value) bool {
			switch {
			case field.Kind() == protoreflect.StringKind && !field.IsList() && affinityFields[field.Name()]:
				found = Affinity(value.String())
			case field.ContainingOneof() != nil && field.Message() != nil:
				found = Affinity(value.Message().Interface())
			}
			return found == ""
		})
		return found
	}
	return ""
}

// WithAffinity routes the calls made with ctx by key (a conversation's name),
// unless ctx already carries a routing header or key is "".
func WithAffinity(ctx context.Context, key string) context.Context {
	if key == "" {
		return ctx
	}
	if md, ok := metadata.FromOutgoingContext(ctx); ok && len(md.Get(AffinityHeader)) > 0 {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, AffinityHeader, key)
}
