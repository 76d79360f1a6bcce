// Command talk holds a voice session with a Switchboard assistant: it sends a
// WAV file's speech as one turn (or a typed turn), prints the transcript and
// the answer as they stream, and writes the answer's speech to a WAV file. The
// session resumes by itself if the connection drops meanwhile.
//
//	go run ./examples/talk -addr 127.0.0.1:50051 -plaintext \
//	    -email you@example.com -register -wav question.wav -out answer.wav
//
// It writes one JSON object per line on stdout: "signed_in", "workspace",
// "assistant", "conversation", "session", "sent", a "frame" for every frame
// received (its sequence and kind), "transcript", "retry" and "resumed" when
// the stream broke, "answer" (the run's state, its text, the speech's length),
// "wrote", then "done"; exits 0 when done, 1 on an error (an "error" line says
// which step failed and why), 2 on bad usage. The password comes from
// -password or SB_PASSWORD. Without -assistant it creates one that answers
// with -handler (echo) and speaks (voice settings with -language); without
// -workspace or -conversation it creates them.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	commonv1 "switchboard.dev/go/gen/switchboard/api/common/v1"
	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	"switchboard.dev/go/switchboard"
)

type config struct {
	addr                   string
	plaintext              bool
	email, password        string
	register               bool
	workspace, assistant   string
	conversation           string
	handler, language      string
	wav, say, out          string
	rate                   int
	timeout                time.Duration
	minBackoff, maxBackoff time.Duration
	idleTimeout            time.Duration
}

func parseFlags() config {
	var c config
	flag.StringVar(&c.addr, "addr", "127.0.0.1:50051", "server address, host:port")
	flag.BoolVar(&c.plaintext, "plaintext", false, "no TLS (a server on loopback)")
	flag.StringVar(&c.email, "email", "", "account email")
	flag.StringVar(&c.password, "password", os.Getenv("SB_PASSWORD"), "password (or SB_PASSWORD)")
	flag.BoolVar(&c.register, "register", false, "register the account first (signs in if it exists)")
	flag.StringVar(&c.workspace, "workspace", "", "workspace (workspaces/w); empty: create one")
	flag.StringVar(&c.assistant, "assistant", "", "assistant with voice settings; empty: create one")
	flag.StringVar(&c.conversation, "conversation", "", "conversation; empty: create one")
	flag.StringVar(&c.handler, "handler", "handlers/echo", "handler of the assistant created")
	flag.StringVar(&c.language, "language", "en", "language of the assistant created")
	flag.StringVar(&c.wav, "wav", "", "a WAV (16-bit PCM) to send as one spoken turn")
	flag.StringVar(&c.say, "say", "", "a typed turn instead of -wav")
	flag.StringVar(&c.out, "out", "", "where to write the answer's speech (WAV); empty: nowhere")
	flag.IntVar(&c.rate, "rate", 16_000, "the rate audio is sent at (8000, 16000, 24000, 48000)")
	flag.DurationVar(&c.timeout, "timeout", 5*time.Minute, "give up after this long")
	flag.DurationVar(&c.minBackoff, "min-backoff", 0, "first wait before resuming (default: the client's)")
	flag.DurationVar(&c.maxBackoff, "max-backoff", 0, "longest wait before resuming (default: the client's)")
	flag.DurationVar(&c.idleTimeout, "idle-timeout", 0, "silence after which the stream is resumed (default: the client's)")
	flag.Parse()
	if c.email == "" || c.password == "" || (c.wav == "") == (c.say == "") {
		fmt.Fprintln(os.Stderr, "usage: talk -email E -password P (-wav FILE | -say TEXT) [-out FILE] [-register] [-assistant A]")
		os.Exit(2)
	}
	return c
}

type out struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (o *out) emit(kind string, fields map[string]any) {
	line := map[string]any{"kind": kind}
	for k, v := range fields {
		line[k] = v
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	_ = o.enc.Encode(line) // stdout gone: nothing better to do
}

func failure(step string, err error) map[string]any {
	fields := map[string]any{"step": step, "error": err.Error(), "code": status.Code(err).String()}
	if reason := switchboard.Reason(err); reason != commonv1.ErrorReason_ERROR_REASON_UNSPECIFIED {
		fields["reason"] = reason.String()
	}
	return fields
}

func main() {
	cfg := parseFlags()
	o := &out{enc: json.NewEncoder(os.Stdout)}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	if step, err := run(ctx, cfg, o); err != nil {
		o.emit("error", failure(step, err))
		os.Exit(1)
	}
	o.emit("done", nil)
}

func run(ctx context.Context, cfg config, o *out) (string, error) {
	opts := []switchboard.Option{}
	if cfg.plaintext {
		opts = append(opts, switchboard.WithInsecure())
	}
	if cfg.minBackoff > 0 || cfg.maxBackoff > 0 {
		opts = append(opts, switchboard.WithBackoff(switchboard.Backoff{Initial: cfg.minBackoff, Max: cfg.maxBackoff}))
	}
	if cfg.idleTimeout > 0 {
		opts = append(opts, switchboard.WithIdleTimeout(cfg.idleTimeout))
	}
	client, err := switchboard.Dial(cfg.addr, opts...)
	if err != nil {
		return "dial", err
	}
	defer client.Close()
	if err := signIn(ctx, client, cfg, o); err != nil {
		return "sign_in", err
	}
	if err := setUp(ctx, client, &cfg, o); err != nil {
		return "set_up", err
	}
	var pcm []byte
	if cfg.wav != "" {
		if pcm, err = readSpeech(cfg.wav, cfg.rate); err != nil {
			return "read_wav", err
		}
	}

	session, err := client.Talk(ctx, cfg.conversation, switchboard.TalkOptions{
		Assistant:     cfg.assistant,
		InputRate:     int32(cfg.rate),
		TurnDetection: dispatcherv1.TurnDetection_TURN_DETECTION_CLIENT, // the file is one turn
		OnRetry: func(err error, delay time.Duration, after int64) {
			o.emit("retry", map[string]any{"error": err.Error(), "code": status.Code(err).String(),
				"delay_ms": delay.Milliseconds(), "after_sequence": after})
		},
		OnResume: func(r switchboard.Resumed) {
			o.emit("resumed", map[string]any{"after_sequence": r.AfterSequence, "lost_turns": len(r.Lost)})
		},
	})
	if err != nil {
		return "talk", err
	}
	defer session.Close()
	o.emit("session", map[string]any{"name": session.Name(),
		"output_rate": session.Session().GetOutputFormat().GetSampleRateHz()})

	if cfg.say != "" {
		err = session.Say(cfg.say)
	} else {
		err = sendTurn(session, pcm)
	}
	if err != nil {
		return "send", err
	}
	o.emit("sent", map[string]any{"audio_bytes": len(pcm), "audio_ms": len(pcm) * 1000 / (2 * cfg.rate), "text": cfg.say})

	reply, err := session.Reply(func(frame *dispatcherv1.TalkResponse) { report(o, frame) })
	if err != nil {
		return "reply", err
	}
	answer := map[string]any{"turn": reply.Turn, "transcript": reply.Transcript, "text": reply.Text,
		"speech_bytes": len(reply.Speech), "speech_ms": len(reply.Speech) * 1000 / (2 * int(reply.Rate)),
		"rate": reply.Rate, "interrupted": reply.Interrupted, "last_sequence": session.LastSequence(),
		"resumes": session.Resumes()}
	if reply.Run != nil {
		answer["run"], answer["state"] = reply.Run.GetName(), reply.Run.GetState().String()
	}
	o.emit("answer", answer)
	if cfg.out != "" {
		if err := writeSpeech(cfg.out, reply); err != nil {
			return "write_wav", err
		}
		o.emit("wrote", map[string]any{"path": cfg.out, "bytes": len(reply.Speech)})
	}
	if err := session.End(); err != nil {
		return "end", err
	}
	return "", nil
}

// sendTurn sends pcm as one turn: start, the audio, end.
func sendTurn(session *switchboard.TalkSession, pcm []byte) error {
	if err := session.StartTurn(); err != nil {
		return err
	}
	if err := session.SendAudio(pcm); err != nil {
		return err
	}
	return session.EndTurn()
}

// report prints each frame received: its number and what it is.
func report(o *out, frame *dispatcherv1.TalkResponse) {
	line := map[string]any{"sequence": frame.GetSequence(), "turn": switchboard.TurnOf(frame.GetSequence())}
	switch f := frame.GetFrame().(type) {
	case *dispatcherv1.TalkResponse_Transcript:
		line["frame"] = "transcript"
		o.emit("transcript", map[string]any{"turn": f.Transcript.GetTurn(), "text": f.Transcript.GetText(),
			"final": f.Transcript.GetFinal(), "message": f.Transcript.GetMessage(), "run": f.Transcript.GetRun(),
			"recording": f.Transcript.GetRecording()})
	case *dispatcherv1.TalkResponse_Update:
		line["frame"] = "update"
		line["run"] = f.Update.GetRun()
		line["run_sequence"] = f.Update.GetSequence()
		switch u := f.Update.GetUpdate().(type) {
		case *dispatcherv1.RunUpdate_StateChange:
			line["update"], line["state"] = "state_change", u.StateChange.GetRun().GetState().String()
		case *dispatcherv1.RunUpdate_Delta:
			line["update"], line["text"] = "delta", u.Delta.GetText()
		case *dispatcherv1.RunUpdate_Speech:
			line["update"], line["bytes"] = "speech", len(u.Speech.GetAudio())
		default:
			line["update"] = fmt.Sprintf("%T", u)
		}
	case *dispatcherv1.TalkResponse_Event:
		line["frame"], line["event"] = "event", f.Event.GetKind().String()
	case *dispatcherv1.TalkResponse_Session:
		line["frame"] = "session"
	case *dispatcherv1.TalkResponse_Error:
		line["frame"], line["error"] = "error", f.Error.GetMessage()
	}
	o.emit("frame", line)
}

func readSpeech(path string, rate int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	pcm, found, err := switchboard.ReadWAV(f)
	if err != nil {
		return nil, err
	}
	return switchboard.Resample(pcm, found, rate), nil
}

func writeSpeech(path string, reply *switchboard.Reply) error {
	var wav bytes.Buffer
	if err := switchboard.WriteWAV(&wav, reply.Speech, int(reply.Rate)); err != nil {
		return err
	}
	return os.WriteFile(path, wav.Bytes(), 0o644)
}

func signIn(ctx context.Context, client *switchboard.Client, cfg config, o *out) error {
	if cfg.register {
		_, err := client.Register(ctx, cfg.email, cfg.password, "")
		if err == nil {
			o.emit("signed_in", map[string]any{"method": "register"})
			return nil
		}
		if status.Code(err) != codes.AlreadyExists {
			return err
		}
	}
	if _, err := client.Login(ctx, cfg.email, cfg.password); err != nil {
		return err
	}
	o.emit("signed_in", map[string]any{"method": "login"})
	return nil
}

func setUp(ctx context.Context, client *switchboard.Client, cfg *config, o *out) error {
	if cfg.workspace == "" {
		created, err := client.Context.CreateWorkspace(ctx, &contextv1.CreateWorkspaceRequest{
			Workspace: &contextv1.Workspace{DisplayName: "Voice"},
			RequestId: switchboard.NewRequestID(),
		})
		if err != nil {
			return err
		}
		cfg.workspace = created.GetWorkspace().GetName()
		o.emit("workspace", map[string]any{"name": cfg.workspace})
	}
	if cfg.assistant == "" {
		created, err := client.Dispatcher.CreateAssistant(ctx, &dispatcherv1.CreateAssistantRequest{
			Parent: cfg.workspace,
			Assistant: &dispatcherv1.Assistant{
				DisplayName: "Voice", Handler: cfg.handler,
				Voice: &dispatcherv1.VoiceSettings{Language: cfg.language},
			},
			RequestId: switchboard.NewRequestID(),
		})
		if err != nil {
			return err
		}
		cfg.assistant = created.GetAssistant().GetName()
		o.emit("assistant", map[string]any{"name": cfg.assistant})
	}
	if cfg.conversation == "" {
		created, err := client.Context.CreateConversation(ctx, &contextv1.CreateConversationRequest{
			Parent:       cfg.workspace,
			Conversation: &contextv1.Conversation{Title: "Voice"},
			RequestId:    switchboard.NewRequestID(),
		})
		if err != nil {
			return err
		}
		cfg.conversation = created.GetConversation().GetName()
		o.emit("conversation", map[string]any{"name": cfg.conversation})
	}
	return nil
}
