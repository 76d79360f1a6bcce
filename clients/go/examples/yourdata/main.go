// Command yourdata takes a person's data out of Switchboard and then deletes
// their account (docs/privacy.md): it asks for an export (ExportMyData), waits
// for the archive (GetDataExport), downloads it (DownloadFile of the export's
// name, checked against its SHA-256) and lists the ZIP's entries; then it
// deletes the account, naming each workspace the account owns with no other
// owner (deleted, or handed over to a member), and shows that the tokens it
// had are refused from then on.
//
//	go run ./examples/yourdata -addr 127.0.0.1:50051 -plaintext -email you@example.com tour -out my-data.zip
//	go run ./examples/yourdata ... export [-out my-data.zip]
//	go run ./examples/yourdata ... delete [-hand-over workspaces/w=users/u ...]
//
// tour exports, then deletes. A workspace owned alone that -hand-over does
// not name is deleted with everything in it.
//
// It writes one JSON object per line on stdout ("kind": "signed_in", then
// "export_started", "export_ready", "downloaded", "owned_alone", "deleted",
// "refused"), and exits 0 when done, 1 on an error (an "error" line says which
// step failed and why), 2 on bad usage. The password comes from -password or
// SB_PASSWORD; -register creates the account first.
package main

import (
	"archive/zip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	authv1 "switchboard.dev/go/gen/switchboard/api/auth/v1"
	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	"switchboard.dev/go/switchboard"
)

const usage = `usage: yourdata -email E [-password P] [-register] COMMAND ...
commands:
  tour [-out PATH] [-hand-over W=U ...]   export, then delete the account
  export [-out PATH]                      write the archive of your data to PATH
  delete [-hand-over W=U ...]             delete the account
W is workspaces/{w}, a workspace you own with no other owner; U is users/{u},
a member of it who becomes its owner. Every other workspace you own alone is
deleted with everything in it. PATH defaults to a new file in the temporary
directory.`

// The first polls come quick (a small account's archive is ready at once),
// later ones every few seconds (a large one takes a while).
const (
	firstPoll = 100 * time.Millisecond
	maxPoll   = 3 * time.Second
	pageSize  = 100
)

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address")
	plaintext := flag.Bool("plaintext", false, "no TLS (a server on loopback)")
	email := flag.String("email", "", "account email")
	password := flag.String("password", os.Getenv("SB_PASSWORD"), "password (or SB_PASSWORD)")
	register := flag.Bool("register", false, "register the account first")
	timeout := flag.Duration("timeout", 5*time.Minute, "give up after this long")
	flag.Usage = func() { fmt.Fprintln(os.Stderr, usage); flag.PrintDefaults() }
	flag.Parse()
	if *email == "" || *password == "" || flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	command, args := flag.Arg(0), flag.Args()[1:]
	if command != "tour" && command != "export" && command != "delete" {
		flag.Usage()
		os.Exit(2)
	}
	set := flag.NewFlagSet(command, flag.ExitOnError)
	set.Usage = func() { fmt.Fprintln(os.Stderr, usage) }
	out := set.String("out", "", "where to write the archive")
	handOver := map[string]string{}
	set.Func("hand-over", "workspaces/{w}=users/{u}: hand the workspace over to that member", func(value string) error {
		workspace, user, ok := strings.Cut(value, "=")
		if !ok || !strings.HasPrefix(workspace, "workspaces/") || !strings.HasPrefix(user, "users/") {
			return fmt.Errorf("%q is not workspaces/{w}=users/{u}", value)
		}
		handOver[workspace] = user
		return nil
	})
	if err := set.Parse(args); err != nil || set.NArg() != 0 {
		set.Usage()
		os.Exit(2)
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var opts []switchboard.Option
	if *plaintext {
		opts = append(opts, switchboard.WithInsecure())
	}
	client, err := switchboard.Dial(*addr, opts...)
	if err != nil {
		fail("dial", err)
	}
	defer client.Close()
	var user string
	if *register {
		registered, err := client.Register(ctx, *email, *password, "")
		if err != nil {
			fail("sign in", err)
		}
		user = registered.GetUser().GetName()
	} else {
		signedIn, err := client.Login(ctx, *email, *password)
		if err != nil {
			fail("sign in", err)
		}
		user = signedIn.GetUser().GetName()
	}
	emit(map[string]any{"kind": "signed_in", "user": user})

	if command != "delete" {
		exportData(ctx, client, *out)
	}
	if command != "export" {
		deleteAccount(ctx, client, user, *email, handOver)
	}
}

// exportData starts an export, waits for it and downloads the archive to out.
func exportData(ctx context.Context, client *switchboard.Client, out string) {
	var started *contextv1.DataExport
	request := &contextv1.ExportMyDataRequest{RequestId: switchboard.NewRequestID()}
	// Keyed: a retry after a lost answer returns the export the first call started.
	err := client.Retry(ctx, func(ctx context.Context) error {
		response, err := client.Context.ExportMyData(ctx, request)
		started = response.GetExport()
		return err
	})
	if err != nil {
		fail("export", err)
	}
	emit(map[string]any{"kind": "export_started", "export": started.GetName(), "state": started.GetState().String()})

	ready := awaitExport(ctx, client, started.GetName())
	emit(map[string]any{
		"kind": "export_ready", "export": ready.GetName(), "state": ready.GetState().String(),
		"size_bytes": ready.GetSizeBytes(), "sha256": ready.GetSha256(), "media_type": ready.GetMediaType(),
		"expire_time": ready.GetExpireTime().AsTime().Format(time.RFC3339),
	})

	path, entries := download(ctx, client, ready, out)
	emit(map[string]any{
		"kind": "downloaded", "path": path, "size_bytes": ready.GetSizeBytes(), "sha256": ready.GetSha256(),
		"entries": entries,
	})
}

// awaitExport polls GetDataExport until the export succeeded; a failed one
// is an error (its own status says why).
func awaitExport(ctx context.Context, client *switchboard.Client, name string) *contextv1.DataExport {
	delay := firstPoll
	for {
		var export *contextv1.DataExport
		err := client.Retry(ctx, func(ctx context.Context) error {
			response, err := client.Context.GetDataExport(ctx, &contextv1.GetDataExportRequest{Name: name})
			export = response.GetExport()
			return err
		})
		if err != nil {
			fail("wait", err)
		}
		switch export.GetState() {
		case contextv1.DataExportState_DATA_EXPORT_STATE_SUCCEEDED:
			return export
		case contextv1.DataExportState_DATA_EXPORT_STATE_FAILED:
			why := status.ErrorProto(export.GetError())
			if why == nil {
				why = status.Errorf(codes.Unknown, "%s failed and said not why", name)
			}
			fail("wait", why)
		}
		select {
		case <-ctx.Done():
			fail("wait", fmt.Errorf("%s was not written in time: %w", name, ctx.Err()))
		case <-time.After(delay):
		}
		delay = min(2*delay, maxPoll)
	}
}

// download writes the archive to out (a new temporary file if empty), checks
// it against the export's size and SHA-256, and lists its entries.
func download(ctx context.Context, client *switchboard.Client, export *contextv1.DataExport, out string) (string, []map[string]any) {
	var file *os.File
	var err error
	if out == "" {
		file, err = os.CreateTemp("", "switchboard-export-*.zip")
	} else {
		file, err = os.Create(out)
	}
	if err != nil {
		fail("download", err)
	}
	path := file.Name()
	digest := sha256.New()
	// DownloadFile checks the bytes against the stream's own metadata; hashing
	// what reaches the file checks them against the export too.
	got, err := client.DownloadFile(ctx, export.GetName(), io.MultiWriter(file, digest))
	if closeErr := file.Close(); err == nil {
		err = closeErr
	}
	if err != nil {
		fail("download", err)
	}
	written := hex.EncodeToString(digest.Sum(nil))
	if written != export.GetSha256() || got.GetSizeBytes() != export.GetSizeBytes() {
		fail("download", status.Errorf(codes.DataLoss, "%s: %d bytes with SHA-256 %s, the export says %d and %s",
			export.GetName(), got.GetSizeBytes(), written, export.GetSizeBytes(), export.GetSha256()))
	}
	archive, err := zip.OpenReader(path)
	if err != nil {
		fail("read archive", err)
	}
	defer archive.Close()
	entries := make([]map[string]any, 0, len(archive.File))
	for _, entry := range archive.File {
		entries = append(entries, map[string]any{"name": entry.Name, "size_bytes": entry.UncompressedSize64})
	}
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	return path, entries
}

// deleteAccount deletes the account, with every workspace it owns alone
// deleted or handed over, then shows that its tokens are refused.
func deleteAccount(ctx context.Context, client *switchboard.Client, user, email string, handOver map[string]string) {
	alone, err := ownedAlone(ctx, client, user)
	if err != nil {
		fail("owned alone", err)
	}
	emit(map[string]any{"kind": "owned_alone", "workspaces": alone})
	named := make([]*authv1.OwnedWorkspace, 0, len(alone)+len(handOver))
	for _, workspace := range alone {
		if _, ok := handOver[workspace]; !ok {
			named = append(named, &authv1.OwnedWorkspace{
				Workspace: workspace, Action: authv1.OwnedWorkspaceAction_OWNED_WORKSPACE_ACTION_DELETE,
			})
		}
	}
	// Sorted, so that a refusal's field paths (workspaces[i]) do not depend on map order.
	handed := make([]string, 0, len(handOver))
	for workspace := range handOver {
		handed = append(handed, workspace)
	}
	sort.Strings(handed)
	for _, workspace := range handed {
		named = append(named, &authv1.OwnedWorkspace{
			Workspace: workspace, Action: authv1.OwnedWorkspaceAction_OWNED_WORKSPACE_ACTION_HAND_OVER,
			NewOwner: handOver[workspace],
		})
	}
	kept := client.Credentials().Tokens()
	// Not retried: a second DeleteMyAccount after a lost answer finds the
	// account gone (its token refused), which says as much as the answer.
	response, err := client.Auth.DeleteMyAccount(ctx, &authv1.DeleteMyAccountRequest{ConfirmEmail: email, Workspaces: named})
	if err != nil {
		fail("delete", err)
	}
	// Every credential of the account is refused from now on: sign out here too.
	client.UseCredentials(nil)
	erasure := response.GetErasure()
	choices := make([]map[string]any, 0, len(named))
	for _, entry := range named {
		choices = append(choices, map[string]any{
			"workspace": entry.GetWorkspace(), "action": entry.GetAction().String(), "new_owner": entry.GetNewOwner(),
		})
	}
	pending := erasure.GetPendingParts()
	if pending == nil {
		pending = []string{}
	}
	emit(map[string]any{
		"kind": "deleted", "erasure": erasure.GetName(), "user": erasure.GetUser(),
		"state": erasure.GetState().String(), "pending_parts": pending, "workspaces": choices,
	})

	// The tokens the client had, presented by hand: both refused.
	withAccess := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+kept.GetAccessToken())
	_, accessErr := client.Auth.GetPrincipal(withAccess, &authv1.GetPrincipalRequest{})
	_, refreshErr := client.Auth.RefreshToken(ctx, &authv1.RefreshTokenRequest{RefreshToken: kept.GetRefreshToken()})
	if accessErr == nil || refreshErr == nil {
		fail("refused", errors.New("a token of the deleted account was still accepted"))
	}
	emit(map[string]any{
		"kind": "refused", "access_token": status.Code(accessErr).String(),
		"refresh_token": status.Code(refreshErr).String(), "error": accessErr.Error(),
	})
}

// ownedAlone lists the caller's workspaces where they are the only owner.
func ownedAlone(ctx context.Context, client *switchboard.Client, user string) ([]string, error) {
	alone := []string{}
	token := ""
	for {
		page, err := client.Context.ListWorkspaces(ctx, &contextv1.ListWorkspacesRequest{PageSize: pageSize, PageToken: token})
		if err != nil {
			return nil, err
		}
		for _, workspace := range page.GetWorkspaces() {
			owners, err := ownersOf(ctx, client, workspace.GetName())
			if err != nil {
				return nil, err
			}
			if len(owners) == 1 && owners[user] {
				alone = append(alone, workspace.GetName())
			}
		}
		if token = page.GetNextPageToken(); token == "" {
			return alone, nil
		}
	}
}

func ownersOf(ctx context.Context, client *switchboard.Client, workspace string) (map[string]bool, error) {
	owners := map[string]bool{}
	token := ""
	for {
		page, err := client.Context.ListWorkspaceMembers(ctx, &contextv1.ListWorkspaceMembersRequest{
			Parent: workspace, PageSize: pageSize, PageToken: token,
		})
		if err != nil {
			return nil, err
		}
		for _, member := range page.GetMembers() {
			if member.GetRole() == contextv1.WorkspaceRole_WORKSPACE_ROLE_OWNER {
				owners[member.GetUser()] = true
			}
		}
		if token = page.GetNextPageToken(); token == "" {
			return owners, nil
		}
	}
}

func emit(line map[string]any) {
	encoded, _ := json.Marshal(line)
	fmt.Println(string(encoded))
}

func fail(step string, err error) {
	line := map[string]any{"kind": "error", "step": step, "error": err.Error(), "code": status.Code(err).String()}
	if reason := switchboard.Reason(err); reason != 0 {
		line["reason"] = reason.String()
	}
	emit(line)
	os.Exit(1)
}
