package switchboard

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	commonv1 "switchboard.dev/go/gen/switchboard/api/common/v1"
	dispatcherv1 "switchboard.dev/go/gen/switchboard/api/dispatcher/v1"
)

// MaxAudioFrame is the largest audio frame a server takes by default
// (SWITCHBOARD_VOICE_MAX_FRAME_BYTES); SendAudio cuts audio into frames of
// at most this (or TalkOptions.MaxFrameBytes).
const MaxAudioFrame = 64 << 10

// TurnBits: a voice session numbers a turn's frames from turn << TurnBits
// (its final transcript), plus the run's update sequence for its updates.
const TurnBits = 40

// maxBufferedFrames bounds the frames received and not yet taken by Recv: past
// it the application is not reading, and the session fails instead of growing.
const maxBufferedFrames = 10_000

// maxTurnBytes bounds the audio kept of one unanswered turn, to resend it
// after a drop: ten minutes at 48 kHz, past the server's longest turn.
const maxTurnBytes = 600 * 48_000 * 2

// maxPendingTurns bounds the unanswered turns kept; the oldest are forgotten.
const maxPendingTurns = 64

// closeGrace is how long Close waits for the server to close after END_SESSION.
const closeGrace = 2 * time.Second

// TurnOf is the turn a numbered TalkResponse belongs to (0 for unnumbered frames).
func TurnOf(sequence int64) int64 { return sequence >> TurnBits }

// TalkOptions describe a voice session.
type TalkOptions struct {
	// Assistant answering, "workspaces/w/assistants/a"; empty: the workspace's default.
	Assistant string
	// InputRate is the sample rate of the audio sent: 8000, 16000 (the
	// default), 24000 or 48000 Hz, 16-bit mono PCM.
	InputRate int32
	// OutputRate is the sample rate of the speech received; 24000 Hz by default.
	OutputRate int32
	// TurnDetection: CLIENT (only EndTurn ends a turn) or SERVER_VAD (the default).
	TurnDetection dispatcherv1.TurnDetection
	// Silence that ends a turn with SERVER_VAD (200 ms to 5 s; 0: the server's 700 ms).
	Silence time.Duration
	// BargeIn lets the user's speech interrupt the assistant's.
	BargeIn bool
	// TurnDetector decides when a turn is over with SERVER_VAD: SILENCE, or
	// SMART_TURN (the end-of-turn model, the silence as its fallback); 0: the
	// assistant's own setting (docs/voice.md).
	TurnDetector dispatcherv1.TurnDetector
	// TurnEagerness of SMART_TURN: LOW, MEDIUM or HIGH; 0: the assistant's.
	TurnEagerness dispatcherv1.TurnEagerness
	// PartialTranscripts asks for transcripts while the user speaks.
	PartialTranscripts bool
	// ConcurrencyPolicy of each turn's message (0: INTERRUPT).
	ConcurrencyPolicy dispatcherv1.ConcurrencyPolicy
	// MaxFrameBytes is the server's audio frame limit (0: MaxAudioFrame).
	MaxFrameBytes int
	// KeepLostTurns: after a resume, report the turns the server did not have
	// (LostTurns, OnResume) without sending them again; Resend does.
	KeepLostTurns bool
	// OnResume, if set, hears of each resume (on the session's own goroutine:
	// it must not block on the session).
	OnResume func(Resumed)
	// OnRetry, if set, hears of each broken stream before the wait to resume it.
	OnRetry func(err error, delay time.Duration, afterSequence int64)
}

// LostTurn is a turn the server did not have when the session resumed: the
// audio sent of it (Truncated if longer than kept), or a typed turn's Text.
// Ended: its end had been sent (else the user was still speaking). Resent:
// the session sent it again by itself.
type LostTurn struct {
	Audio     []byte
	Text      string
	Ended     bool
	Truncated bool
	Resent    bool
}

// Resumed describes a resume: the session as the server resumed it, the
// position it continued after, and the turns it did not have.
type Resumed struct {
	Session       *dispatcherv1.VoiceSession
	AfterSequence int64
	Lost          []LostTurn
}

// TalkSession is a voice session (DispatcherService.Talk) that resumes by
// itself: when the stream breaks (UNAVAILABLE, a reset, a proxy's idle timeout,
// silence longer than WithIdleTimeout) it reopens with TalkResume after the
// last numbered frame it received, with the client's backoff, and drops any
// replayed frame at or before it, so Recv returns no numbered frame twice and
// none lost. The server discards a turn the user was still speaking at the
// drop and one whose end it never got; the session keeps every turn until it
// is answered, and sends those the server lacks again on the resumed stream
// (unless TalkOptions.KeepLostTurns), reporting them in LostTurns.
//
// Send methods may be called from one goroutine while another calls Recv.
// Close it when done.
type TalkSession struct {
	client *Client
	opts   TalkOptions
	start  *dispatcherv1.TalkStart
	ctx    context.Context
	cancel context.CancelFunc

	sendMu sync.Mutex // one writer at a time: frames stay in order

	mu          sync.Mutex
	changed     chan struct{} // closed and replaced when the state changes
	name        string
	session     *dispatcherv1.VoiceSession
	stream      dispatcherv1.DispatcherService_TalkClient
	stop        context.CancelFunc // cancels the current stream
	generation  int
	connected   bool
	failure     error // why the session is over (io.EOF: it ended as asked)
	ending      bool
	ledger      ledger
	queue       []*dispatcherv1.TalkResponse
	lastSeq     int64
	resumes     int
	lost        []LostTurn
	readerDone  chan struct{}
	recvEnded   bool
	reauthed    bool
	used        string
	failures    int
	lastFailure error
}

// Talk starts a voice session on conversation ("workspaces/w/conversations/c").
// It returns once the server sent the session (Session), or the reason it
// refused (SPEECH_NOT_CONFIGURED, INVALID_ARGUMENT, ...). The session lives
// until Close, End, or ctx is done.
func (c *Client) Talk(ctx context.Context, conversation string, opts TalkOptions) (*TalkSession, error) {
	start, err := talkStart(conversation, opts)
	if err != nil {
		return nil, err
	}
	return c.openTalk(ctx, start, "", 0, opts)
}

// ResumeTalk continues a voice session another TalkSession (or process) left,
// after the last numbered frame it received (its LastSequence), within the
// server's resume window (else FAILED_PRECONDITION, SESSION_ENDED).
func (c *Client) ResumeTalk(ctx context.Context, session string, afterSequence int64, opts TalkOptions) (*TalkSession, error) {
	if afterSequence < 0 {
		return nil, errors.New("switchboard: afterSequence must not be negative")
	}
	return c.openTalk(ctx, nil, session, afterSequence, opts)
}

func talkStart(conversation string, opts TalkOptions) (*dispatcherv1.TalkStart, error) {
	input, output := opts.InputRate, opts.OutputRate
	if input == 0 {
		input = 16_000
	}
	if output == 0 {
		output = 24_000
	}
	for _, rate := range []int32{input, output} {
		switch rate {
		case 8_000, 16_000, 24_000, 48_000:
		default:
			return nil, fmt.Errorf("switchboard: %d Hz is not a voice rate (8000, 16000, 24000 or 48000)", rate)
		}
	}
	detection := opts.TurnDetection
	if detection == dispatcherv1.TurnDetection_TURN_DETECTION_UNSPECIFIED {
		detection = dispatcherv1.TurnDetection_TURN_DETECTION_SERVER_VAD
	}
	start := &dispatcherv1.TalkStart{
		Conversation:       conversation,
		Assistant:          opts.Assistant,
		InputFormat:        &dispatcherv1.AudioFormat{Encoding: dispatcherv1.AudioEncoding_AUDIO_ENCODING_PCM16, SampleRateHz: input},
		OutputFormat:       &dispatcherv1.AudioFormat{Encoding: dispatcherv1.AudioEncoding_AUDIO_ENCODING_PCM16, SampleRateHz: output},
		TurnDetection:      detection,
		BargeIn:            opts.BargeIn,
		PartialTranscripts: opts.PartialTranscripts,
		ConcurrencyPolicy:  opts.ConcurrencyPolicy,
		TurnDetector:       opts.TurnDetector,
		TurnEagerness:      opts.TurnEagerness,
	}
	if opts.Silence > 0 {
		start.Silence = durationpb.New(opts.Silence)
	}
	return start, nil
}

func (c *Client) openTalk(ctx context.Context, start *dispatcherv1.TalkStart, name string, after int64, opts TalkOptions) (*TalkSession, error) {
	if opts.MaxFrameBytes <= 0 {
		opts.MaxFrameBytes = MaxAudioFrame
	}
	opts.MaxFrameBytes -= opts.MaxFrameBytes % 2
	if opts.MaxFrameBytes == 0 {
		return nil, errors.New("switchboard: MaxFrameBytes must hold a sample")
	}
	detection := opts.TurnDetection
	if start != nil {
		detection = start.GetTurnDetection()
	}
	if detection == dispatcherv1.TurnDetection_TURN_DETECTION_UNSPECIFIED {
		detection = dispatcherv1.TurnDetection_TURN_DETECTION_SERVER_VAD
	}
	sessionCtx, cancel := context.WithCancel(ctx)
	s := &TalkSession{
		client:     c,
		opts:       opts,
		start:      start,
		ctx:        sessionCtx,
		cancel:     cancel,
		changed:    make(chan struct{}),
		name:       name,
		lastSeq:    after,
		readerDone: make(chan struct{}),
		ledger: ledger{
			clientTurns: detection == dispatcherv1.TurnDetection_TURN_DETECTION_CLIENT,
			received:    after,
			maxBytes:    maxTurnBytes,
		},
	}
	for {
		err := s.connect()
		if err == nil {
			break
		}
		if err := s.recover(err); err != nil {
			cancel()
			return nil, err
		}
	}
	go s.read()
	return s, nil
}

// Name is the session's resource name, ".../voiceSessions/s".
func (s *TalkSession) Name() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.name
}

// Session is the session as the server last described it (start or resume).
func (s *TalkSession) Session() *dispatcherv1.VoiceSession {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.session
}

// LastSequence is the last numbered frame Recv returned (resume after it).
func (s *TalkSession) LastSequence() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastSeq
}

// Resumes is how many times the session was resumed.
func (s *TalkSession) Resumes() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.resumes
}

// LostTurns are the turns resumes found the server without, oldest first.
func (s *TalkSession) LostTurns() []LostTurn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]LostTurn(nil), s.lost...)
}

// -- sending ---------------------------------------------------------------------

// SendAudio sends audio of the user's turn (16-bit little-endian mono PCM at
// the input rate) in frames of at most MaxFrameBytes. With CLIENT turn
// detection, audio outside StartTurn ... EndTurn is ignored by the server.
// While the stream is resuming it waits.
func (s *TalkSession) SendAudio(pcm []byte) error {
	if len(pcm)%2 != 0 {
		return errors.New("switchboard: PCM16 audio is whole 2-byte samples")
	}
	for at := 0; at < len(pcm); at += s.opts.MaxFrameBytes {
		// A copy per frame: a sent message must not change under grpc-go.
		chunk := append([]byte(nil), pcm[at:min(at+s.opts.MaxFrameBytes, len(pcm))]...)
		request := &dispatcherv1.TalkRequest{Frame: &dispatcherv1.TalkRequest_Audio{Audio: &dispatcherv1.AudioChunk{Data: chunk}}}
		if err := s.write(request, func(l *ledger) { l.audio(chunk) }); err != nil {
			return err
		}
	}
	return nil
}

// StartTurn says the user starts speaking (needed with CLIENT turn detection).
func (s *TalkSession) StartTurn() error {
	return s.write(control(dispatcherv1.TalkAction_TALK_ACTION_START_TURN, 0), (*ledger).startTurn)
}

// EndTurn says the user's turn is over: it is transcribed, stored and answered.
func (s *TalkSession) EndTurn() error {
	return s.write(control(dispatcherv1.TalkAction_TALK_ACTION_END_TURN, 0), (*ledger).endTurn)
}

// Interrupt stops the assistant's speech now and cancels its run.
// heardThrough is the sequence of the last speech frame the user heard (0:
// the last one sent); the stored answer marks the text after it unspoken.
func (s *TalkSession) Interrupt(heardThrough int64) error {
	return s.write(control(dispatcherv1.TalkAction_TALK_ACTION_INTERRUPT, heardThrough), nil)
}

// Say sends a typed turn, stored and answered like a spoken one.
func (s *TalkSession) Say(text string) error {
	if text == "" {
		return errors.New("switchboard: Say needs text")
	}
	request := &dispatcherv1.TalkRequest{Frame: &dispatcherv1.TalkRequest_Text{Text: text}}
	return s.write(request, func(l *ledger) { l.text(text) })
}

// Resend sends a lost turn (LostTurns, not Resent) again.
func (s *TalkSession) Resend(turn LostTurn) error {
	if turn.Text != "" {
		return s.Say(turn.Text)
	}
	if err := s.StartTurn(); err != nil {
		return err
	}
	if err := s.SendAudio(turn.Audio); err != nil {
		return err
	}
	if turn.Ended {
		return s.EndTurn()
	}
	return nil
}

// End ends the session: the server finishes sending what it owes and closes;
// Recv returns io.EOF after it.
func (s *TalkSession) End() error {
	s.mu.Lock()
	ending := s.ending
	s.mu.Unlock()
	if ending {
		return nil
	}
	if err := s.write(control(dispatcherv1.TalkAction_TALK_ACTION_END_SESSION, 0), nil); err != nil {
		return err
	}
	s.mu.Lock()
	s.ending = true
	stream := s.stream
	s.mu.Unlock()
	if stream != nil {
		s.sendMu.Lock()
		_ = stream.CloseSend()
		s.sendMu.Unlock()
	}
	return nil
}

// Close ends the session: END_SESSION if it is still open, a moment for the
// server to close, then the stream is cancelled and what it still sends is
// dropped.
func (s *TalkSession) Close() error {
	s.mu.Lock()
	open := s.failure == nil && !s.ending
	s.mu.Unlock()
	if open {
		done := make(chan struct{})
		go func() {
			_ = s.End()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(closeGrace):
		}
	}
	select {
	case <-s.readerDone:
	case <-time.After(closeGrace):
	}
	s.cancel()
	<-s.readerDone
	s.mu.Lock()
	if s.failure == nil {
		s.failure = io.EOF
	}
	s.mu.Unlock()
	return nil
}

func control(action dispatcherv1.TalkAction, heardThrough int64) *dispatcherv1.TalkRequest {
	return &dispatcherv1.TalkRequest{Frame: &dispatcherv1.TalkRequest_Control{Control: &dispatcherv1.TalkControl{
		Action: action, HeardThroughSequence: heardThrough,
	}}}
}

// write sends request on the current stream. What a turn is made of is noted
// in the ledger before it is sent: if the stream breaks under the send, the
// resume finds the turn missing and resends (or reports) it, so it is not
// sent again here. A control that is no part of a turn (interrupt, end) is
// sent again on the resumed stream.
func (s *TalkSession) write(request *dispatcherv1.TalkRequest, note func(*ledger)) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	for {
		stream, generation, err := s.waitConnected()
		if err != nil {
			return err
		}
		s.mu.Lock()
		if s.ending {
			s.mu.Unlock()
			return status.Error(codes.FailedPrecondition, "switchboard: the voice session was ended (End was called)")
		}
		if note != nil {
			note(&s.ledger)
		}
		s.mu.Unlock()
		if err := stream.Send(request); err == nil {
			return nil
		}
		// io.EOF: the stream is over; the reader learns why and resumes.
		if err := s.waitPast(generation); err != nil {
			return err
		}
		if note != nil {
			return nil
		}
	}
}

// waitConnected returns the current stream once one is open, or why none will be.
func (s *TalkSession) waitConnected() (dispatcherv1.DispatcherService_TalkClient, int, error) {
	for {
		s.mu.Lock()
		if s.failure != nil {
			err := s.failure
			s.mu.Unlock()
			if errors.Is(err, io.EOF) {
				return nil, 0, status.Error(codes.FailedPrecondition, "switchboard: the voice session has ended")
			}
			return nil, 0, err
		}
		if s.connected {
			stream, generation := s.stream, s.generation
			s.mu.Unlock()
			return stream, generation, nil
		}
		changed := s.changed
		s.mu.Unlock()
		select {
		case <-changed:
		case <-s.ctx.Done():
			return nil, 0, s.ctx.Err()
		}
	}
}

// waitPast waits until a stream newer than generation is open.
func (s *TalkSession) waitPast(generation int) error {
	for {
		s.mu.Lock()
		if s.generation != generation && s.connected {
			s.mu.Unlock()
			return nil
		}
		if s.failure != nil {
			s.mu.Unlock()
			_, _, err := s.waitConnected()
			return err
		}
		changed := s.changed
		s.mu.Unlock()
		select {
		case <-changed:
		case <-s.ctx.Done():
			return s.ctx.Err()
		}
	}
}

// notify wakes everyone waiting on a state change; s.mu must be held.
func (s *TalkSession) notify() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// -- receiving -------------------------------------------------------------------

// Recv returns the next frame from the server: transcripts, run updates,
// events, per-turn errors, and a session frame after each resume (LostTurns
// then says what the server did not have). Heartbeats and the first session
// frame (Session) are not returned. io.EOF once the session ended as asked
// (End); the error that ended it otherwise.
func (s *TalkSession) Recv() (*dispatcherv1.TalkResponse, error) {
	for {
		s.mu.Lock()
		if len(s.queue) > 0 {
			frame := s.queue[0]
			s.queue[0] = nil
			s.queue = s.queue[1:]
			if frame.GetSequence() != 0 {
				s.lastSeq = frame.GetSequence()
			}
			s.mu.Unlock()
			return frame, nil
		}
		if s.failure != nil && s.readerFinished() {
			err := s.failure
			s.mu.Unlock()
			return nil, err
		}
		changed := s.changed
		s.mu.Unlock()
		select {
		case <-changed:
		case <-s.readerDone:
		}
	}
}

func (s *TalkSession) readerFinished() bool {
	select {
	case <-s.readerDone:
		return true
	default:
		return false
	}
}

// Reply reads frames until the next turn's answer is over: the transcript,
// the answer's text and its speech (onFrame, if not nil, sees every frame on
// the way). An error frame (the turn failed) is returned as its error; the
// session stays open.
func (s *TalkSession) Reply(onFrame func(*dispatcherv1.TalkResponse)) (*Reply, error) {
	rate := s.Session().GetOutputFormat().GetSampleRateHz()
	builder := &ReplyBuilder{Rate: rate}
	for {
		frame, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return nil, status.Error(codes.FailedPrecondition, "switchboard: the voice session ended before the turn's answer did")
		}
		if err != nil {
			return nil, err
		}
		if onFrame != nil {
			onFrame(frame)
		}
		if failed := frame.GetError(); failed != nil {
			return nil, status.FromProto(failed).Err()
		}
		if reply := builder.Add(frame); reply != nil {
			return reply, nil
		}
	}
}

// -- the reader: one stream after another ----------------------------------------

// connect opens a stream, sends start or resume, and reads the session frame;
// after a resume it sends the turns the server lacks again, before any other
// writer goes on.
func (s *TalkSession) connect() error {
	var used string
	attempt, stop := context.WithCancel(withTokenSlot(s.ctx, &used))
	dog := startWatchdog(s.client.opts.idleTimeout, stop)
	defer dog.stop()
	fail := func(err error) error {
		stop()
		return dog.explain(err)
	}
	s.mu.Lock()
	name, after, resuming := s.name, s.ledger.received, s.name != ""
	s.mu.Unlock()
	// Its requests come after it opens: the routing header is ours to add.
	key := Affinity(name)
	if key == "" {
		key = Affinity(s.start.GetConversation())
	}
	stream, err := s.client.Dispatcher.Talk(WithAffinity(attempt, key))
	s.mu.Lock()
	s.used = used
	s.mu.Unlock()
	if err != nil {
		return fail(err)
	}
	first := &dispatcherv1.TalkRequest{Frame: &dispatcherv1.TalkRequest_Start{Start: s.start}}
	if resuming {
		first = &dispatcherv1.TalkRequest{Frame: &dispatcherv1.TalkRequest_Resume{Resume: &dispatcherv1.TalkResume{
			Session: name, AfterSequence: after,
		}}}
	}
	if err := stream.Send(first); err != nil && !errors.Is(err, io.EOF) {
		return fail(err)
	}
	frame, err := stream.Recv()
	if errors.Is(err, io.EOF) {
		return fail(errStreamEnded)
	}
	if err != nil {
		return fail(err)
	}
	session := frame.GetSession()
	if session == nil {
		return fail(status.Errorf(codes.Unavailable, "switchboard: the voice session began with %T, not a session", frame.GetFrame()))
	}
	var lost []*turn
	s.mu.Lock()
	if resuming {
		lost = s.ledger.resumed(session)
	} else {
		s.ledger.answered = session.GetTurnCount()
	}
	ending := s.ending
	s.mu.Unlock()
	if resuming && !s.opts.KeepLostTurns {
		for _, t := range lost {
			for _, request := range t.requests(s.opts.MaxFrameBytes) {
				if err := stream.Send(request); err != nil {
					return fail(err)
				}
			}
		}
		s.mu.Lock()
		s.ledger.restore(lost)
		s.mu.Unlock()
	}
	if resuming && ending {
		// END_SESSION may not have reached the broken stream: say it again.
		if err := stream.Send(control(dispatcherv1.TalkAction_TALK_ACTION_END_SESSION, 0)); err != nil {
			return fail(err)
		}
		_ = stream.CloseSend()
	}
	reported := make([]LostTurn, 0, len(lost))
	for _, t := range lost {
		reported = append(reported, t.report(!s.opts.KeepLostTurns))
	}
	s.mu.Lock()
	s.session, s.name = session, session.GetName()
	s.stream, s.stop = stream, stop
	s.generation++
	s.connected = true
	s.failures, s.reauthed = 0, false
	if resuming {
		s.resumes++
		s.lost = append(s.lost, reported...)
		s.queue = append(s.queue, frame)
	}
	position := s.ledger.received
	s.notify()
	s.mu.Unlock()
	if resuming && s.opts.OnResume != nil {
		s.opts.OnResume(Resumed{Session: session, AfterSequence: position, Lost: reported})
	}
	return nil
}

// read receives frames until the session ends, resuming broken streams.
func (s *TalkSession) read() {
	defer close(s.readerDone)
	var outcome error
	for {
		err := s.receive()
		if err == nil {
			outcome = io.EOF
			break
		}
		s.drop()
		for err != nil {
			if failed := s.recover(err); failed != nil {
				outcome = failed
				break
			}
			err = s.connect()
		}
		if outcome != nil {
			break
		}
	}
	s.mu.Lock()
	s.connected = false
	if s.failure == nil {
		s.failure = outcome
	}
	s.notify()
	s.mu.Unlock()
}

// receive reads the current stream to its end: nil when it ended as asked
// (after End), else why it broke.
func (s *TalkSession) receive() error {
	s.mu.Lock()
	stream, stop := s.stream, s.stop
	s.mu.Unlock()
	dog := startWatchdog(s.client.opts.idleTimeout, stop)
	defer dog.stop()
	for {
		frame, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			s.mu.Lock()
			ending := s.ending
			s.mu.Unlock()
			if ending {
				return nil
			}
			// A replica draining for shutdown, a proxy's limit: resumed.
			return errStreamEnded
		}
		if err != nil {
			return dog.explain(err)
		}
		dog.kick()
		s.mu.Lock()
		s.failures = 0
		fresh := s.ledger.take(frame)
		if fresh && frame.GetHeartbeat() == nil && frame.GetSession() == nil {
			if len(s.queue) >= maxBufferedFrames {
				s.mu.Unlock()
				return &handlerError{status.Errorf(codes.ResourceExhausted,
					"switchboard: %d frames of the voice session wait to be read: call Recv while it is open", maxBufferedFrames)}
			}
			s.queue = append(s.queue, frame)
			s.notify()
		}
		s.mu.Unlock()
	}
}

// recover decides after err: nil to connect again (after the backoff), or the
// error that ends the session.
func (s *TalkSession) recover(err error) error {
	if cause, ok := callbackError(err); ok {
		return cause
	}
	if s.ctx.Err() != nil {
		return s.ctx.Err()
	}
	s.mu.Lock()
	s.lastFailure = err
	ending, started, used, reauthed, failures := s.ending, s.name != "", s.used, s.reauthed, s.failures
	s.mu.Unlock()
	if ending && Reason(err) == commonv1.ErrorReason_ERROR_REASON_SESSION_ENDED {
		return io.EOF // ended as asked while the connection was down
	}
	if status.Code(err) == codes.Unauthenticated && !reauthed {
		s.mu.Lock()
		s.reauthed = true
		s.mu.Unlock()
		return s.client.reauthenticate(s.ctx, used, err)
	}
	if !transient(err) || (!started && ErrorInfo(err) != nil) {
		// Not started, and the server said why: starting again would not help.
		return err
	}
	delay := s.client.opts.backoff.Delay(failures, nil)
	if asked, ok := RetryDelay(err); ok && asked > delay {
		delay = asked
	}
	s.mu.Lock()
	s.failures++
	after := s.ledger.received
	s.mu.Unlock()
	if s.opts.OnRetry != nil {
		s.opts.OnRetry(err, delay, after)
	}
	return sleep(s.ctx, delay)
}

func (s *TalkSession) drop() {
	s.mu.Lock()
	s.connected = false
	stop := s.stop
	s.notify()
	s.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// -- the ledger: the position, and the turns not answered yet --------------------

type turn struct {
	audio     []byte
	text      string
	ended     bool
	heard     bool // server detection heard speech in it (else it is no turn)
	truncated bool
}

func (t *turn) report(resent bool) LostTurn {
	return LostTurn{Audio: append([]byte(nil), t.audio...), Text: t.text, Ended: t.ended, Truncated: t.truncated, Resent: resent}
}

// requests are the frames that send the turn again.
func (t *turn) requests(frameBytes int) []*dispatcherv1.TalkRequest {
	if t.text != "" {
		return []*dispatcherv1.TalkRequest{{Frame: &dispatcherv1.TalkRequest_Text{Text: t.text}}}
	}
	out := []*dispatcherv1.TalkRequest{control(dispatcherv1.TalkAction_TALK_ACTION_START_TURN, 0)}
	for at := 0; at < len(t.audio); at += frameBytes {
		chunk := append([]byte(nil), t.audio[at:min(at+frameBytes, len(t.audio))]...)
		out = append(out, &dispatcherv1.TalkRequest{Frame: &dispatcherv1.TalkRequest_Audio{Audio: &dispatcherv1.AudioChunk{Data: chunk}}})
	}
	if t.ended {
		out = append(out, control(dispatcherv1.TalkAction_TALK_ACTION_END_TURN, 0))
	}
	return out
}

// ledger is a session's position and its user's unanswered turns (no I/O).
// A turn is kept from when it is sent until the server answers it (its final
// transcript, TURN_EMPTY, or an error frame: one answer per ended turn, in
// order). On a resume the server has taken TurnCount turns, of which answered
// had their final transcript: the oldest TurnCount - answered unanswered turns
// are still coming, the rest are lost. Counts, not the events' turn numbers: an
// empty turn gives its number up to the next.
type ledger struct {
	clientTurns bool
	received    int64
	answered    int64
	maxBytes    int
	open        *turn
	pending     []*turn
}

func (l *ledger) audio(pcm []byte) {
	if l.open == nil {
		if l.clientTurns {
			return // outside a turn the server ignores audio: nothing to lose
		}
		l.open = &turn{}
	}
	room := l.maxBytes - len(l.open.audio)
	if len(pcm) > room {
		l.open.truncated = true
		pcm = pcm[:max(room, 0)]
	}
	l.open.audio = append(l.open.audio, pcm...)
}

func (l *ledger) startTurn() {
	if l.open == nil {
		l.open = &turn{}
	}
	l.open.heard = true
}

// endTurn: every end is answered once (a turn, or TURN_EMPTY when nothing was
// open), so an end with no turn is kept too, as an empty turn.
func (l *ledger) endTurn() {
	t := l.open
	l.open = nil
	if t == nil || !(t.heard || l.clientTurns) {
		t = &turn{}
	}
	t.ended = true
	l.remember(t)
}

func (l *ledger) text(text string) { l.remember(&turn{text: text, ended: true}) }

func (l *ledger) remember(t *turn) {
	l.pending = append(l.pending, t)
	if len(l.pending) > maxPendingTurns {
		l.pending = l.pending[len(l.pending)-maxPendingTurns:]
	}
}

// take notes a frame; false for a replay of a numbered frame already taken.
func (l *ledger) take(frame *dispatcherv1.TalkResponse) bool {
	if seq := frame.GetSequence(); seq != 0 {
		if seq <= l.received {
			return false
		}
		l.received = seq
	}
	switch f := frame.GetFrame().(type) {
	case *dispatcherv1.TalkResponse_Transcript:
		if f.Transcript.GetFinal() {
			l.answered = max(l.answered, f.Transcript.GetTurn())
			l.answerOne()
		}
	case *dispatcherv1.TalkResponse_Error:
		l.answerOne()
	case *dispatcherv1.TalkResponse_Event:
		switch f.Event.GetKind() {
		case dispatcherv1.TalkEventKind_TALK_EVENT_KIND_TURN_EMPTY:
			l.answerOne()
		case dispatcherv1.TalkEventKind_TALK_EVENT_KIND_SPEECH_STARTED:
			if l.open == nil {
				l.open = &turn{}
			}
			l.open.heard = true
		case dispatcherv1.TalkEventKind_TALK_EVENT_KIND_SPEECH_STOPPED:
			l.endTurn() // the detector ended it: the server's now, awaiting its answer
		}
	}
	return true
}

func (l *ledger) answerOne() {
	if len(l.pending) > 0 {
		l.pending[0] = nil
		l.pending = l.pending[1:]
	}
}

// resumed takes out the turns the resumed session does not have, in order;
// the open turn is always among them (the server discards the turn being
// spoken when the connection drops).
func (l *ledger) resumed(session *dispatcherv1.VoiceSession) []*turn {
	coming := int(max(session.GetTurnCount()-l.answered, 0))
	coming = min(coming, len(l.pending))
	var lost []*turn
	for _, t := range l.pending[coming:] {
		if len(t.audio) > 0 || t.text != "" { // an end with nothing before it is no turn
			lost = append(lost, t)
		}
	}
	l.pending = append([]*turn(nil), l.pending[:coming]...)
	if l.open != nil && (l.open.heard || l.clientTurns) {
		lost = append(lost, l.open)
	}
	l.open = nil
	return lost
}

// restore: the turns were sent again, in order; unanswered again.
func (l *ledger) restore(turns []*turn) {
	for _, t := range turns {
		if t.ended {
			l.remember(t)
		} else {
			l.open = t
		}
	}
}

// -- what a turn came to -----------------------------------------------------------

// Reply is one turn and its answer: what the user said, what the assistant
// wrote and spoke. Run is nil for an empty turn (no words, nothing stored); a
// run cancelled by barge-in or Interrupt is Interrupted, Speech holding what
// was sent before.
type Reply struct {
	Turn        int64
	Transcript  string
	Message     string
	Recording   string
	Run         *dispatcherv1.Run
	Text        string
	Speech      []byte // 16-bit mono PCM at Rate
	Rate        int32
	Interrupted bool
}

// ReplyBuilder assembles one turn's Reply from a session's frames: the first
// turn whose final transcript (or TURN_EMPTY) it is given, unless Turn is set.
type ReplyBuilder struct {
	Turn int64
	Rate int32

	transcript  *dispatcherv1.Transcript
	answer      Transcript
	speech      []byte
	interrupted bool
	done        *Reply
}

// Add takes the next frame; the Reply once the turn's answer is over.
func (b *ReplyBuilder) Add(frame *dispatcherv1.TalkResponse) *Reply {
	if b.done != nil {
		return b.done
	}
	switch f := frame.GetFrame().(type) {
	case *dispatcherv1.TalkResponse_Transcript:
		t := f.Transcript
		if t.GetFinal() && b.transcript == nil && (b.Turn == 0 || b.Turn == t.GetTurn()) {
			b.Turn, b.transcript = t.GetTurn(), t
		}
	case *dispatcherv1.TalkResponse_Event:
		e := f.Event
		if b.transcript == nil && e.GetKind() == dispatcherv1.TalkEventKind_TALK_EVENT_KIND_TURN_EMPTY &&
			(b.Turn == 0 || b.Turn == e.GetTurn()) {
			b.Turn = e.GetTurn()
			b.done = b.build(nil)
		} else if b.transcript != nil && e.GetTurn() == b.Turn &&
			e.GetKind() == dispatcherv1.TalkEventKind_TALK_EVENT_KIND_SPEECH_INTERRUPTED {
			b.interrupted = true
		}
	case *dispatcherv1.TalkResponse_Update:
		if b.transcript == nil || TurnOf(frame.GetSequence()) != b.Turn {
			return nil
		}
		u := f.Update
		b.answer.Add(u)
		if speech := u.GetSpeech(); speech != nil {
			b.speech = append(b.speech, speech.GetAudio()...)
			if rate := speech.GetFormat().GetSampleRateHz(); rate != 0 {
				b.Rate = rate
			}
		}
		if change := u.GetStateChange(); change != nil && Terminal(change.GetRun().GetState()) {
			b.done = b.build(change.GetRun())
		}
	}
	return b.done
}

func (b *ReplyBuilder) build(run *dispatcherv1.Run) *Reply {
	rate := b.Rate
	if rate == 0 {
		rate = 24_000
	}
	return &Reply{
		Turn:        b.Turn,
		Transcript:  b.transcript.GetText(),
		Message:     b.transcript.GetMessage(),
		Recording:   b.transcript.GetRecording(),
		Run:         run,
		Text:        b.answer.Text(),
		Speech:      b.speech,
		Rate:        rate,
		Interrupted: b.interrupted || run.GetState() == dispatcherv1.RunState_RUN_STATE_CANCELLED,
	}
}
