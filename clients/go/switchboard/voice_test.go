package switchboard

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
	handlerv1 "switchboard.dev/go/gen/switchboard/api/handler/v1"
)

// scriptedTalk keeps the Talk contract's numbering and resume rule, and drops
// the stream exactly where a test says (the real server cannot be made to):
// after so many numbered frames written, or so many audio frames read. The
// real server is tested with the example program (tests/e2e/test_go_client.py).
type scriptedTalk struct {
	dispatcherv1.UnimplementedDispatcherServiceServer

	mu            sync.Mutex
	log           []*dispatcherv1.TalkResponse
	turns         int64
	speaking      []byte
	open          bool
	calls         []string
	dropNumbered  int // abort after writing this many numbered frames (0: never)
	dropAudio     int // abort after reading this many audio frames (0: never)
	overlap       int // replay this many frames the client already had
	stallNumbered int // go silent, the stream open, after this many numbered frames
	audioFrameLen []int
}

const sessionName = "workspaces/w/conversations/c/voiceSessions/s1"

var errDrop = status.Error(codes.Unavailable, "scripted drop")

func (s *scriptedTalk) Talk(stream dispatcherv1.DispatcherService_TalkServer) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	s.mu.Lock()
	var replay []*dispatcherv1.TalkResponse
	if resume := first.GetResume(); resume != nil {
		s.calls = append(s.calls, fmt.Sprintf("resume:%d", resume.GetAfterSequence()))
		s.speaking, s.open = nil, false // the turn being spoken is discarded
		at := len(s.log)
		for i, frame := range s.log {
			if frame.GetSequence() > resume.GetAfterSequence() {
				at = i
				break
			}
		}
		replay = append(replay, s.log[max(at-s.overlap, 0):]...)
		s.overlap = 0
	} else {
		s.calls = append(s.calls, "start")
	}
	hello := &dispatcherv1.TalkResponse{Frame: &dispatcherv1.TalkResponse_Session{Session: &dispatcherv1.VoiceSession{
		Name: sessionName, TurnCount: s.turns,
		OutputFormat: &dispatcherv1.AudioFormat{SampleRateHz: 24_000},
	}}}
	s.mu.Unlock()
	if err := stream.Send(hello); err != nil {
		return err
	}
	for _, frame := range replay {
		if err := stream.Send(frame); err != nil {
			return err
		}
	}
	written, audio := 0, 0
	for {
		request, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		s.mu.Lock()
		var frames []*dispatcherv1.TalkResponse
		switch f := request.GetFrame().(type) {
		case *dispatcherv1.TalkRequest_Audio:
			audio++
			s.audioFrameLen = append(s.audioFrameLen, len(f.Audio.GetData()))
			if s.open {
				s.speaking = append(s.speaking, f.Audio.GetData()...)
			}
			if s.dropAudio > 0 && audio >= s.dropAudio {
				s.dropAudio = 0
				s.mu.Unlock()
				return errDrop
			}
		case *dispatcherv1.TalkRequest_Text:
			frames = s.answer("typed " + f.Text)
		case *dispatcherv1.TalkRequest_Control:
			switch f.Control.GetAction() {
			case dispatcherv1.TalkAction_TALK_ACTION_START_TURN:
				s.speaking, s.open = nil, true
			case dispatcherv1.TalkAction_TALK_ACTION_END_TURN:
				if s.open {
					heard := len(s.speaking)
					s.speaking, s.open = nil, false
					frames = s.answer(fmt.Sprintf("heard %d bytes", heard))
				}
			case dispatcherv1.TalkAction_TALK_ACTION_END_SESSION:
				s.mu.Unlock()
				return nil
			}
		}
		s.mu.Unlock()
		for _, frame := range frames {
			if err := stream.Send(frame); err != nil {
				return err
			}
			written++
			s.mu.Lock()
			drop := s.dropNumbered > 0 && written >= s.dropNumbered
			if drop {
				s.dropNumbered = 0
			}
			stall := s.stallNumbered > 0 && written >= s.stallNumbered
			if stall {
				s.stallNumbered = 0
			}
			s.mu.Unlock()
			if drop {
				return errDrop
			}
			if stall {
				<-stream.Context().Done() // until the client gives up on the stream
				return stream.Context().Err()
			}
		}
	}
}

// answer is a turn's final transcript and its run, numbered and logged; s.mu held.
func (s *scriptedTalk) answer(said string) []*dispatcherv1.TalkResponse {
	s.turns++
	base := s.turns << TurnBits
	run := fmt.Sprintf("workspaces/w/conversations/c/runs/r%d", s.turns)
	frames := []*dispatcherv1.TalkResponse{{Sequence: base, Frame: &dispatcherv1.TalkResponse_Transcript{
		Transcript: &dispatcherv1.Transcript{Turn: s.turns, Text: said, Final: true, Run: run},
	}}}
	updates := []*dispatcherv1.RunUpdate{
		stateChange(0, dispatcherv1.RunState_RUN_STATE_QUEUED),
		{Update: &dispatcherv1.RunUpdate_Delta{Delta: &handlerv1.TextDelta{Text: "you said: " + said}}},
		{Update: &dispatcherv1.RunUpdate_Speech{Speech: &dispatcherv1.SpeechChunk{Audio: []byte{1, 0, 2, 0}}}},
		{Update: &dispatcherv1.RunUpdate_Speech{Speech: &dispatcherv1.SpeechChunk{Audio: []byte{3, 0}}}},
		stateChange(0, dispatcherv1.RunState_RUN_STATE_SUCCEEDED),
	}
	for i, update := range updates {
		update.Run, update.Sequence = run, int64(i+1)
		frames = append(frames, &dispatcherv1.TalkResponse{Sequence: base + int64(i+1), Frame: &dispatcherv1.TalkResponse_Update{Update: update}})
	}
	s.log = append(s.log, frames...)
	return frames
}

func scripted(t *testing.T, talk dispatcherv1.DispatcherServiceServer, opts ...Option) *Client {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	dispatcherv1.RegisterDispatcherServiceServer(server, talk)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	fast := Backoff{Initial: 10 * time.Millisecond, Max: 50 * time.Millisecond}
	opts = append([]Option{WithInsecure(), WithBackoff(fast), WithIdleTimeout(5 * time.Second)}, opts...)
	client, err := Dial(listener.Addr().String(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func clientTurns() TalkOptions {
	return TalkOptions{TurnDetection: dispatcherv1.TurnDetection_TURN_DETECTION_CLIENT}
}

func within(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestASpokenTurnComesBackAsAReplyInFramesUnderTheLimit(t *testing.T) {
	server := &scriptedTalk{}
	client := scripted(t, server)
	session, err := client.Talk(within(t), "workspaces/w/conversations/c", clientTurns())
	if err != nil {
		t.Fatal(err)
	}
	defer session.Close()
	pcm := make([]byte, 150_000)
	if err := session.StartTurn(); err != nil {
		t.Fatal(err)
	}
	if err := session.SendAudio(pcm); err != nil {
		t.Fatal(err)
	}
	if err := session.EndTurn(); err != nil {
		t.Fatal(err)
	}
	reply, err := session.Reply(nil)
	if err != nil {
		t.Fatal(err)
	}
	if reply.Transcript != "heard 150000 bytes" || reply.Text != "you said: heard 150000 bytes" {
		t.Errorf("reply %+v", reply)
	}
	if !bytes.Equal(reply.Speech, []byte{1, 0, 2, 0, 3, 0}) || reply.Run.GetState() != dispatcherv1.RunState_RUN_STATE_SUCCEEDED {
		t.Errorf("speech %v, run %v", reply.Speech, reply.Run)
	}
	server.mu.Lock()
	defer server.mu.Unlock()
	if fmt.Sprint(server.audioFrameLen) != fmt.Sprint([]int{MaxAudioFrame, MaxAudioFrame, 150_000 - 2*MaxAudioFrame}) {
		t.Errorf("audio frames %v", server.audioFrameLen)
	}
}

func TestADropMidAnswerResumesWithNoFrameRepeatedOrLost(t *testing.T) {
	server := &scriptedTalk{dropNumbered: 3, overlap: 2}
	client := scripted(t, server)
	var resumes []Resumed
	opts := clientTurns()
	opts.OnResume = func(r Resumed) { resumes = append(resumes, r) }
	session, err := client.Talk(within(t), "workspaces/w/conversations/c", opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := session.Say("hello"); err != nil {
		t.Fatal(err)
	}
	if err := session.End(); err != nil {
		t.Fatal(err)
	}
	var numbered []int64
	sessions := 0
	for {
		frame, err := session.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if frame.GetSession() != nil {
			sessions++
		}
		if frame.GetSequence() != 0 {
			numbered = append(numbered, frame.GetSequence())
		}
	}
	_ = session.Close()
	server.mu.Lock()
	defer server.mu.Unlock()
	var logged []int64
	for _, frame := range server.log {
		logged = append(logged, frame.GetSequence())
	}
	if fmt.Sprint(numbered) != fmt.Sprint(logged) {
		t.Errorf("received %v, the server numbered %v", numbered, logged)
	}
	if sessions != 1 || session.Resumes() != 1 || len(resumes) != 1 {
		t.Errorf("%d session frames, %d resumes, %d heard", sessions, session.Resumes(), len(resumes))
	}
	want := fmt.Sprintf("[start resume:%d]", int64(1)<<TurnBits+2)
	if fmt.Sprint(server.calls) != want {
		t.Errorf("calls %v, want %s", server.calls, want)
	}
}

func TestATurnBeingSpokenWhenTheStreamDropsIsSentAgain(t *testing.T) {
	server := &scriptedTalk{dropAudio: 2}
	client := scripted(t, server)
	opts := clientTurns()
	opts.MaxFrameBytes = 8_000
	session, err := client.Talk(within(t), "workspaces/w/conversations/c", opts)
	if err != nil {
		t.Fatal(err)
	}
	defer session.Close()
	if err := session.StartTurn(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		if err := session.SendAudio(bytes.Repeat([]byte{byte(i), 0}, 4_000)); err != nil {
			t.Fatal(err)
		}
	}
	if err := session.EndTurn(); err != nil {
		t.Fatal(err)
	}
	reply, err := session.Reply(nil)
	if err != nil {
		t.Fatal(err)
	}
	if reply.Transcript != "heard 40000 bytes" {
		t.Errorf("transcript %q: audio lost or sent twice", reply.Transcript)
	}
	lost := session.LostTurns()
	if len(lost) != 1 || !lost[0].Resent || len(lost[0].Audio) < 16_000 {
		t.Errorf("lost turns %+v", lost)
	}
}

func TestASilentStreamIsTakenForDeadAndResumed(t *testing.T) {
	server := &scriptedTalk{stallNumbered: 4}
	client := scripted(t, server, WithIdleTimeout(500*time.Millisecond))
	var retried []error
	opts := clientTurns()
	opts.OnRetry = func(err error, _ time.Duration, _ int64) { retried = append(retried, err) }
	session, err := client.Talk(within(t), "workspaces/w/conversations/c", opts)
	if err != nil {
		t.Fatal(err)
	}
	defer session.Close()
	if err := session.Say("hello"); err != nil {
		t.Fatal(err)
	}
	reply, err := session.Reply(nil)
	if err != nil {
		t.Fatal(err)
	}
	if reply.Transcript != "typed hello" || !bytes.Equal(reply.Speech, []byte{1, 0, 2, 0, 3, 0}) {
		t.Errorf("reply %+v", reply)
	}
	if session.Resumes() != 1 || len(retried) != 1 || status.Code(retried[0]) != codes.Unavailable {
		t.Errorf("%d resumes after %v", session.Resumes(), retried)
	}
	server.mu.Lock()
	defer server.mu.Unlock()
	if want := fmt.Sprintf("[start resume:%d]", int64(1)<<TurnBits+3); fmt.Sprint(server.calls) != want {
		t.Errorf("calls %v, want %s", server.calls, want)
	}
}

func TestLedgerCountsAnswersNotTurnNumbers(t *testing.T) {
	l := ledger{clientTurns: true, answered: 1, maxBytes: 10}
	for _, text := range []string{"silence", "refused", "two", "three"} {
		l.text(text)
	}
	empty := &dispatcherv1.TalkResponse{Frame: &dispatcherv1.TalkResponse_Event{Event: &dispatcherv1.TalkEvent{
		Kind: dispatcherv1.TalkEventKind_TALK_EVENT_KIND_TURN_EMPTY, Turn: 2}}}
	failed := &dispatcherv1.TalkResponse{Frame: &dispatcherv1.TalkResponse_Error{}}
	final := &dispatcherv1.TalkResponse{Sequence: 2 << TurnBits, Frame: &dispatcherv1.TalkResponse_Transcript{
		Transcript: &dispatcherv1.Transcript{Turn: 2, Final: true}}}
	for _, frame := range []*dispatcherv1.TalkResponse{empty, failed, final} {
		if !l.take(frame) {
			t.Fatal("a new frame taken for a replay")
		}
	}
	if l.take(final) {
		t.Error("a replayed frame taken again")
	}
	if lost := l.resumed(&dispatcherv1.VoiceSession{TurnCount: 3}); len(lost) != 0 {
		t.Errorf("lost %v", lost)
	}
	l.startTurn()
	l.audio(bytes.Repeat([]byte{7}, 8))
	l.audio(bytes.Repeat([]byte{8}, 8))
	lost := l.resumed(&dispatcherv1.VoiceSession{TurnCount: 2})
	if len(lost) != 2 || lost[0].text != "three" || len(lost[1].audio) != 10 || !lost[1].truncated || lost[1].ended {
		t.Errorf("lost %+v", lost)
	}
}

func TestWAVRoundTripsAndResamples(t *testing.T) {
	pcm := make([]byte, 2*22_050)
	for i := range len(pcm) / 2 {
		pcm[2*i] = byte(i)
	}
	var out bytes.Buffer
	if err := WriteWAV(&out, pcm, 22_050); err != nil {
		t.Fatal(err)
	}
	got, rate, err := ReadWAV(bytes.NewReader(out.Bytes()))
	if err != nil || rate != 22_050 || !bytes.Equal(got, pcm) {
		t.Fatalf("read back %d bytes at %d: %v", len(got), rate, err)
	}
	if n := len(Resample(pcm, 22_050, 16_000)); n != 2*16_000 {
		t.Errorf("resampled to %d bytes", n)
	}
	if _, _, err := ReadWAV(bytes.NewReader([]byte("RIFF....WAVEjunk"))); err == nil {
		t.Error("junk read as a WAV")
	}
}

func TestTheStartFrameCarriesTheTurnDetector(t *testing.T) {
	start, err := talkStart("workspaces/w/conversations/c", TalkOptions{
		TurnDetector:  dispatcherv1.TurnDetector_TURN_DETECTOR_SMART_TURN,
		TurnEagerness: dispatcherv1.TurnEagerness_TURN_EAGERNESS_HIGH,
	})
	if err != nil {
		t.Fatal(err)
	}
	if start.GetTurnDetector() != dispatcherv1.TurnDetector_TURN_DETECTOR_SMART_TURN ||
		start.GetTurnEagerness() != dispatcherv1.TurnEagerness_TURN_EAGERNESS_HIGH {
		t.Fatalf("start frame: %v", start)
	}
	unset, err := talkStart("workspaces/w/conversations/c", TalkOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Unset: the assistant's own settings apply.
	if unset.GetTurnDetector() != dispatcherv1.TurnDetector_TURN_DETECTOR_UNSPECIFIED {
		t.Fatalf("unset detector: %v", unset.GetTurnDetector())
	}
}
