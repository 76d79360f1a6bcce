// Command files uploads a file to a Switchboard workspace and downloads it
// again: the Go client's UploadPath (one client stream, the SHA-256 computed
// while sending) and DownloadFile (resumed at the offset reached after a break,
// checked against the file's SHA-256).
//
//	go run ./examples/files -addr 127.0.0.1:50051 -plaintext \
//	    -email you@example.com -register -file report.pdf -out copy.pdf
//
// It writes one JSON object per line on stdout, its "kind" "uploaded", then "downloaded", and
// exits 0 when done, 1 on an error (an "error" line says which step failed and
// why), 2 on bad usage. The password comes from -password or SB_PASSWORD.
// Without -workspace it creates one.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc/status"

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	"switchboard.dev/go/switchboard"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address")
	plaintext := flag.Bool("plaintext", false, "no TLS (a server on loopback)")
	email := flag.String("email", "", "account email")
	password := flag.String("password", os.Getenv("SB_PASSWORD"), "password (or SB_PASSWORD)")
	register := flag.Bool("register", false, "register the account first")
	workspace := flag.String("workspace", "", "workspace (workspaces/w); empty: create one")
	path := flag.String("file", "", "the file to upload")
	out := flag.String("out", "", "where to write the downloaded copy")
	mediaType := flag.String("media-type", "", "declared media type (default: from the extension)")
	timeout := flag.Duration("timeout", 5*time.Minute, "give up after this long")
	flag.Parse()
	if *email == "" || *password == "" || *path == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "usage: files -email E -password P -file PATH -out PATH [-register] [-workspace W]")
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
	if *register {
		_, err = client.Register(ctx, *email, *password, "")
	} else {
		_, err = client.Login(ctx, *email, *password)
	}
	if err != nil {
		fail("sign in", err)
	}
	if *workspace == "" {
		created, err := client.Context.CreateWorkspace(ctx, &contextv1.CreateWorkspaceRequest{
			Workspace: &contextv1.Workspace{DisplayName: "Files"},
			RequestId: switchboard.NewRequestID(),
		})
		if err != nil {
			fail("create workspace", err)
		}
		*workspace = created.GetWorkspace().GetName()
	}
	stored, err := client.UploadPath(ctx, *workspace, *path, switchboard.UploadOptions{MediaType: *mediaType})
	if err != nil {
		fail("upload", err)
	}
	emit(map[string]any{"kind": "uploaded", "name": stored.GetName(), "display_name": stored.GetDisplayName(),
		"media_type": stored.GetMediaType(), "size_bytes": stored.GetSizeBytes(), "sha256": stored.GetSha256(),
		"file_kind": stored.GetKind().String()})
	f, err := os.Create(*out)
	if err != nil {
		fail("create output", err)
	}
	got, err := client.DownloadFile(ctx, stored.GetName(), f)
	if closeErr := f.Close(); err == nil {
		err = closeErr
	}
	if err != nil {
		fail("download", err)
	}
	emit(map[string]any{"kind": "downloaded", "name": got.GetName(), "size_bytes": got.GetSizeBytes(),
		"sha256": got.GetSha256(), "path": *out})
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
