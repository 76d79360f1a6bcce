package switchboard

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"mime"
	"os"
	"path/filepath"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
)

// ChunkSize is the largest chunk an upload frame carries and a download frame
// brings (1 MiB, the contract's limit).
const ChunkSize = 1 << 20

// maxDownloadResumes bounds how often a download reopens without receiving a
// byte in between.
const maxDownloadResumes = 8

// UploadOptions describe the file UploadFile stores.
type UploadOptions struct {
	// DisplayName is the file's name as people see it ("report.pdf"); required.
	DisplayName string
	// MediaType is the declared type; empty: what the name's extension says,
	// else application/octet-stream. The server checks it against the content.
	MediaType string
	// RequestID is the idempotency key of the upload; empty: a fresh one.
	RequestID string
	// Metadata is free-form client metadata kept with the file.
	Metadata *structpb.Struct
}

// UploadFile stores size bytes read from content as a file of workspace
// ("workspaces/w"), over one UploadFile client stream: a header, chunks of
// ChunkSize, then the SHA-256 computed while sending. A stream that breaks is
// an error (nothing is stored); send again. content must yield exactly size
// bytes.
func (c *Client) UploadFile(ctx context.Context, workspace string, content io.Reader, size int64, opts UploadOptions) (*contextv1.File, error) {
	if opts.DisplayName == "" {
		return nil, errors.New("switchboard: UploadFile needs a DisplayName")
	}
	if size < 0 {
		return nil, errors.New("switchboard: UploadFile needs the content's size")
	}
	mediaType := opts.MediaType
	if mediaType == "" {
		mediaType = mime.TypeByExtension(filepath.Ext(opts.DisplayName))
	}
	if mediaType == "" {
		mediaType = "application/octet-stream"
	}
	requestID := opts.RequestID
	if requestID == "" {
		requestID = NewRequestID()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // a failed send abandons the stream, and the server discards what it got
	stream, err := c.Context.UploadFile(ctx)
	if err != nil {
		return nil, err
	}
	header := &contextv1.UploadFileRequest{Frame: &contextv1.UploadFileRequest_Header{Header: &contextv1.UploadFileHeader{
		Parent:    workspace,
		RequestId: requestID,
		File: &contextv1.File{
			DisplayName: opts.DisplayName,
			MediaType:   mediaType,
			SizeBytes:   size,
			Metadata:    opts.Metadata,
		},
	}}}
	if err := stream.Send(header); err != nil {
		return nil, closeAndExplain(stream.CloseAndRecv, err)
	}
	digest := sha256.New()
	var sent int64
	for sent < size {
		// A fresh buffer per frame: a sent message must not change under grpc-go.
		chunk := make([]byte, min(ChunkSize, size-sent))
		n, err := io.ReadFull(content, chunk)
		if err != nil {
			return nil, fmt.Errorf("switchboard: reading the content at %d of %d bytes: %w", sent+int64(n), size, err)
		}
		digest.Write(chunk)
		sent += int64(n)
		if err := stream.Send(&contextv1.UploadFileRequest{Frame: &contextv1.UploadFileRequest_Chunk{Chunk: chunk}}); err != nil {
			return nil, closeAndExplain(stream.CloseAndRecv, err)
		}
	}
	sum := hex.EncodeToString(digest.Sum(nil))
	if err := stream.Send(&contextv1.UploadFileRequest{Frame: &contextv1.UploadFileRequest_Sha256{Sha256: sum}}); err != nil {
		return nil, closeAndExplain(stream.CloseAndRecv, err)
	}
	reply, err := stream.CloseAndRecv()
	if err != nil {
		return nil, err
	}
	return reply.GetFile(), nil
}

// UploadPath stores the file at path (DisplayName defaults to its base name).
func (c *Client) UploadPath(ctx context.Context, workspace, path string, opts UploadOptions) (*contextv1.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if opts.DisplayName == "" {
		opts.DisplayName = filepath.Base(path)
	}
	return c.UploadFile(ctx, workspace, f, info.Size(), opts)
}

// closeAndExplain: Send reports io.EOF when the server ended the stream; its
// status (the reason it refused) comes from CloseAndRecv.
func closeAndExplain(closeAndRecv func() (*contextv1.UploadFileResponse, error), sendErr error) error {
	if !errors.Is(sendErr, io.EOF) {
		return sendErr
	}
	if _, err := closeAndRecv(); err != nil {
		return err
	}
	return sendErr
}

// DownloadFile writes the content of file name ("workspaces/w/files/f") to w
// and returns its metadata. A stream that breaks with a transient error is
// reopened at the offset reached (read_offset), so nothing is written twice;
// the whole is checked against the file's size and SHA-256 (codes.DataLoss if
// it does not match).
func (c *Client) DownloadFile(ctx context.Context, name string, w io.Writer) (*contextv1.File, error) {
	state := &download{digest: sha256.New()}
	failures := 0
	authRetried := false
	for {
		before := state.written
		used, err := c.downloadOnce(ctx, name, w, state)
		if err == nil {
			break
		}
		if cause, ok := callbackError(err); ok {
			return nil, cause
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if state.written > before {
			failures, authRetried = 0, false
		}
		if status.Code(err) == codes.Unauthenticated && !authRetried {
			authRetried = true
			if refused := c.reauthenticate(ctx, used, err); refused != nil {
				return nil, refused
			}
			continue
		}
		if !transient(err) || failures >= maxDownloadResumes {
			return nil, err
		}
		if err := sleep(ctx, c.opts.backoff.Delay(failures, nil)); err != nil {
			return nil, err
		}
		failures++
	}
	file := state.file
	if file == nil {
		return nil, status.Error(codes.DataLoss, "switchboard: the download sent no metadata")
	}
	if state.written != file.GetSizeBytes() || hex.EncodeToString(state.digest.Sum(nil)) != file.GetSha256() {
		return nil, status.Errorf(codes.DataLoss, "switchboard: %s: %d bytes received do not match the file's size (%d) and SHA-256",
			name, state.written, file.GetSizeBytes())
	}
	return file, nil
}

type download struct {
	file    *contextv1.File
	digest  hash.Hash
	written int64
}

// downloadOnce is one DownloadFile stream from state.written; the token it was
// opened with, and why it stopped (nil: the end of the file).
func (c *Client) downloadOnce(ctx context.Context, name string, w io.Writer, state *download) (string, error) {
	var used string
	attempt, cancel := context.WithCancel(withTokenSlot(ctx, &used))
	defer cancel()
	dog := startWatchdog(c.opts.idleTimeout, cancel)
	defer dog.stop()
	stream, err := c.Context.DownloadFile(attempt, &contextv1.DownloadFileRequest{Name: name, ReadOffset: state.written})
	if err != nil {
		return used, dog.explain(err)
	}
	for {
		frame, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return used, nil
		}
		if err != nil {
			return used, dog.explain(err)
		}
		dog.kick()
		if frame.GetFile() != nil && state.file == nil {
			state.file = frame.GetFile()
		}
		data := frame.GetData()
		if len(data) == 0 {
			continue
		}
		if frame.GetOffset() != state.written {
			return used, &handlerError{status.Errorf(codes.DataLoss, "switchboard: %s: a chunk at offset %d, expected %d",
				name, frame.GetOffset(), state.written)}
		}
		if _, err := w.Write(data); err != nil {
			return used, &handlerError{err}
		}
		state.digest.Write(data)
		state.written += int64(len(data))
	}
}
