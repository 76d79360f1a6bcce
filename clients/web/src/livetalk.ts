// Live voice, in the composer, for a conversation whose assistant has a voice: a Talk
// session carried by a WebRTC peer connection (DispatcherService.ConnectTalk), since a
// browser cannot hold Talk's bidirectional stream through grpc-web.
//
//   Live pressed   -> the microphone (getUserMedia, echo cancelled: the answer plays aloud
//                     while it listens), an RTCPeerConnection with its track and a data
//                     channel "talk"; the offer once ICE gathering is complete (the server
//                     does not trickle), ConnectTalk{offer, start}; the answer set
//   connected      -> the server starts the session: turns end by its voice activity
//                     detection, the transcript comes on the channel (partial, then
//                     final), the run's text too (its card follows it as well), and the
//                     answer's speech is the peer's inbound track, played as it comes
//   speaking over  -> the server interrupts the answer (barge-in): SPEECH_INTERRUPTED on
//   the answer        the channel and the track goes quiet; Stop sends INTERRUPT itself
//   End            -> END_SESSION on the channel, then the peer closed
//   dropped        -> (the connection failed, or the channel closed unasked) once, a new
//                     peer with ConnectTalk{resume: {session, after_sequence}} naming the
//                     last numbered frame received: nothing repeated, nothing lost
//
// What the page heard is counted off the inbound track (samples, and the level of those
// that carry sound), and the microphone's level is shown; both are data-* attributes.
import { createRegistry, fromJson } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { type Api } from "./api";
import { h } from "./dom";
import { type Problem, codeName, local, problem } from "./errors";
import { file_google_rpc_error_details } from "./gen/google/rpc/error_details_pb";
import {
  type Run,
  type RunUpdate,
  TalkEventKind,
  type TalkResponse,
  TalkResponseSchema,
} from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import type { Page } from "./page";
import { microphoneProblem } from "./recorder";
import { TERMINAL, stateName } from "./runs";
import { speechSummary } from "./talk";

/** How long ICE gathering may take before the offer goes with what was gathered. */
const GATHER_MS = 5_000;
/** A connection "disconnected" this long is taken as dropped (it may come back sooner). */
const DISCONNECTED_MS = 3_000;
/** How long End waits for the server to close the peer before closing it here. */
const END_MS = 5_000;
/** How long a resume may keep being refused while the dropped peer is let go. */
const RESUME_MS = 40_000;
/** The inbound track's blocks louder than this (RMS) count as sound, not silence. */
const VOICED = 0.01;
/** Each attempt at a run numbers its updates in its own block of 2^32 sequences. */
const ATTEMPT_BITS = 32n;
/** How often the microphone's level is read. */
const LEVEL_MS = 100;
/** Turns shown (the oldest go). */
const TURNS_SHOWN = 20;
/** What a frame's google.rpc.Status details may hold (a cancelled run's `error`). */
const DETAILS = createRegistry(file_google_rpc_error_details);

export type LiveState = "idle" | "connecting" | "live" | "reconnecting" | "ending" | "ended" | "failed";

/** Where a session goes: what the composer has chosen. */
export interface LiveTarget {
  conversation: string;
  /** The assistant that answers (`workspaces/{w}/assistants/{a}`), "" for the default. */
  assistant: string;
}

export interface LiveHost {
  target(): LiveTarget;
  /** A run of the session started: its card follows it (as SendMessage's would). */
  started(conversation: string, run: Run): void;
  /** The session started or ended (push-to-talk steps aside meanwhile). */
  activeChanged(active: boolean): void;
}

/** One turn as shown: what was heard, and the answer's text as it streams. */
interface Turn {
  element: HTMLElement;
  heard: HTMLElement;
  answer: HTMLElement;
  run: string;
  /** The run's attempt its answer comes from (-1 before any update). */
  attempt: bigint;
}

// Where the console's script came from: the capture worklet is beside it (capture.js).
const SCRIPT_URL = (document.currentScript as HTMLScriptElement | null)?.src || window.location.href;
const WORKLET_URL = new URL("capture.js", SCRIPT_URL).href;

/** Whether this browser can carry a live session (push-to-talk works without). */
export function liveSupported(): boolean {
  return typeof RTCPeerConnection === "function" && !!navigator.mediaDevices?.getUserMedia;
}

export class LiveTalk {
  readonly element: HTMLElement;
  state: LiveState = "idle";
  private readonly button = h(
    "button",
    { type: "button", class: "live-button", "data-testid": "live", "aria-describedby": "live-hint", title: "A spoken conversation: the assistant listens, answers aloud, and can be interrupted" },
    "Live",
  );
  private readonly stopButton = h("button", { type: "button", class: "danger", "data-testid": "live-stop", hidden: true }, "Stop speaking");
  private readonly endButton = h("button", { type: "button", "data-testid": "live-end", hidden: true }, "End");
  private readonly level = h("meter", { "data-testid": "live-level", "aria-label": "microphone level", min: 0, max: 1, low: 0.02, value: 0, hidden: true });
  private readonly status = h("span", { class: "muted", "data-testid": "live-status", role: "status", "aria-live": "polite" });
  private readonly hint = h("span", { id: "live-hint", class: "muted talk-hint" }, "Live: speak freely, pause to let it answer, speak over it to interrupt");
  /** What happened to the connection (a drop, the resume), kept while the session goes. */
  private readonly note = h("p", { class: "muted live-note", "data-testid": "live-note", role: "status", hidden: true });
  private readonly turnList = h("ol", { class: "live-turns", "data-testid": "live-turns", hidden: true });
  private readonly turns = new Map<string, Turn>();
  /** The turn being spoken (its partial transcript), before its final one names a run. */
  private speaking: Turn | null = null;
  private context: AudioContext | null = null;
  private microphone: MediaStream | null = null;
  private pc: RTCPeerConnection | null = null;
  private channel: RTCDataChannel | null = null;
  private target: LiveTarget | null = null;
  private session = "";
  private lastSequence = 0n;
  private resumes = 0;
  /** END_SESSION sent (or the session over): a channel closing is no drop. */
  private ending = false;
  private levelTimer: ReturnType<typeof setInterval> | undefined;
  private disconnectTimer: ReturnType<typeof setTimeout> | undefined;
  /** What was heard on the inbound track. */
  private heard = { samples: 0, voiced: 0, squares: 0, peak: 0, rate: 48_000 };
  private micPeak = 0;
  /** The inbound track's player and counter (the worklet's node once it loaded). */
  private inbound: { element: HTMLAudioElement; source: MediaStreamAudioSourceNode; node: AudioWorkletNode | null } | null = null;
  private runsFollowed = new Set<string>();
  private interruptions = 0;
  /** The run whose answer is being spoken ("" while none is): Stop shows meanwhile. */
  private speakingRun = "";
  /** Partial transcripts received (the words shown while they are spoken). */
  private partials = 0;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly host: LiveHost,
  ) {
    this.button.addEventListener("click", () => void this.start());
    this.stopButton.addEventListener("click", () => this.interrupt());
    this.endButton.addEventListener("click", () => void this.end("ended by the listener"));
    this.element = h(
      "div",
      { class: "talk live", "data-testid": "live-control", "data-state": "idle", hidden: true },
      // End before Stop: Stop comes and goes with each answer, and a control that moved
      // under the pointer when an answer began would take a click meant for End.
      h("div", { class: "row" }, this.button, this.level, this.endButton, this.stopButton, this.status),
      this.hint,
      this.note,
      this.turnList,
    );
    this.render();
  }

  get active(): boolean {
    return this.state === "connecting" || this.state === "live" || this.state === "reconnecting" || this.state === "ending";
  }

  /** Shown when the composer's target can speak and this browser has WebRTC. */
  available(voice: boolean): void {
    this.element.hidden = !(voice && liveSupported()) && !this.active;
  }

  /** Another conversation opened, or the session ended: the live session ends too. */
  reset(): void {
    if (this.active) void this.end("the listener left the conversation");
    this.turns.clear();
    this.speaking = null;
    this.turnList.replaceChildren();
    this.turnList.hidden = true;
  }

  // -- Starting ------------------------------------------------------------------------

  private async start(): Promise<void> {
    if (this.active) return;
    // Created (or resumed) inside the click: browsers let audio play only after a gesture.
    this.context ??= new AudioContext();
    if (this.context.state === "suspended") void this.context.resume();
    this.page.clearProblem("live");
    this.target = this.host.target();
    this.session = "";
    this.lastSequence = 0n;
    this.resumes = 0;
    this.ending = false;
    this.interruptions = 0;
    this.partials = 0;
    this.speakingRun = "";
    this.heard = { samples: 0, voiced: 0, squares: 0, peak: 0, rate: this.context.sampleRate };
    this.micPeak = 0;
    this.runsFollowed.clear();
    this.turns.clear();
    this.speaking = null;
    this.turnList.replaceChildren();
    this.say("");
    this.setState("connecting");
    this.status.textContent = "Opening the microphone…";
    try {
      this.microphone = await this.openMicrophone();
    } catch (error) {
      this.fail(isProblem(error) ? error : microphoneProblem(error));
      return;
    }
    if (this.state !== "connecting") return this.release();
    this.meter(this.context, this.microphone);
    const target = this.target;
    const refused = await this.connect((offer) =>
      this.api.dispatcher.connectTalk({
        offer,
        session: { case: "start", value: { conversation: target.conversation, assistant: target.assistant, bargeIn: true, partialTranscripts: true } },
      }),
    );
    if (refused) this.fail(refused);
  }

  private async openMicrophone(): Promise<MediaStream> {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw { ...local("FAILED_PRECONDITION", "this page has no access to microphones"), summary: "Browsers give microphones only to pages served over HTTPS (or from localhost)." };
    }
    // Echo cancelled: the answer plays aloud while the microphone listens, and the
    // assistant must not hear itself (it would interrupt itself). The rest as it comes:
    // a recogniser does better with the raw voice than with what noise suppression and
    // gain control leave of it.
    return await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
    });
  }

  /** A peer connection for the microphone, its offer sent by `call`; the refusal, if
   *  it was refused (null when connected, or when the session was ended meanwhile). */
  private async connect(call: (offer: string) => Promise<{ answer: string; session: string }>): Promise<Problem | null> {
    const microphone = this.microphone;
    if (microphone === null) return null;
    let iceServers: RTCIceServer[];
    try {
      iceServers = await this.iceServers();
    } catch (error) {
      return refusal(error);
    }
    if (this.microphone !== microphone) return null;
    const pc = new RTCPeerConnection({ iceServers });
    this.pc = pc;
    for (const track of microphone.getAudioTracks()) pc.addTrack(track, microphone);
    const channel = pc.createDataChannel("talk", { ordered: true });
    this.channel = channel;
    channel.onmessage = (event: MessageEvent<unknown>) => {
      if (this.channel === channel && typeof event.data === "string") this.frame(event.data);
    };
    channel.onclose = () => {
      if (this.channel === channel) this.dropped("the session's channel closed");
    };
    pc.ontrack = (event) => {
      if (this.pc === pc) this.listen(event.streams[0] ?? new MediaStream([event.track]));
    };
    pc.onconnectionstatechange = () => {
      if (this.pc === pc) this.connectionChanged(pc);
    };
    this.status.textContent = this.resumes ? "Reconnecting…" : "Connecting…";
    let answered: { answer: string; session: string } | undefined;
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await gathered(pc);
      if (this.pc !== pc) return null;
      answered = await call(pc.localDescription?.sdp ?? "");
      if (this.pc !== pc) return null;
      await pc.setRemoteDescription({ type: "answer", sdp: answered.answer });
    } catch (error) {
      if (this.pc !== pc) return null;
      this.closePeer();
      return refusal(error);
    }
    if (answered.session) this.session = answered.session;
    this.render();
    return null;
  }

  /** The microphone's level, read a few times a second (AnalyserNode). */
  private meter(context: AudioContext, microphone: MediaStream): void {
    const analyser = context.createAnalyser();
    analyser.fftSize = 2048;
    context.createMediaStreamSource(microphone).connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    clearInterval(this.levelTimer);
    this.levelTimer = setInterval(() => {
      analyser.getFloatTimeDomainData(samples);
      let sum = 0;
      for (const s of samples) sum += s * s;
      const level = Math.sqrt(sum / samples.length);
      this.micPeak = Math.max(this.micPeak, level);
      this.level.value = Math.min(1, level * 4);
      this.level.dataset.level = level.toFixed(4);
      this.element.dataset.micPeak = this.micPeak.toFixed(4);
    }, LEVEL_MS);
  }

  // -- The answer's audio --------------------------------------------------------------

  /** The inbound track: played by an <audio> element (what the browser's echo canceller
   *  hears as the far end) and counted off the graph by the capture worklet. */
  private listen(stream: MediaStream): void {
    const context = this.context;
    if (context === null) return;
    this.unlisten();
    const element = new Audio();
    element.srcObject = stream;
    element.autoplay = true;
    element.dataset.testid = "live-audio";
    void element.play().catch(() => {
      // Autoplay refused (no gesture counted): the next click on the page lets it play.
      this.status.textContent = "The browser did not let the answer play: click anywhere on the page to hear it.";
      document.addEventListener("click", () => void element.play().catch(() => undefined), { once: true });
    });
    const source = context.createMediaStreamSource(stream);
    void loadWorklet(context).then(
      () => {
        const inbound = this.inbound;
        if (inbound?.source !== source) return;
        const node = new AudioWorkletNode(context, "switchboard-capture", {
          numberOfInputs: 1,
          numberOfOutputs: 1,
          outputChannelCount: [1],
          channelCount: 1,
          channelCountMode: "explicit",
        });
        node.port.onmessage = (event: MessageEvent<Float32Array | { last: Float32Array }>) => {
          const block = event.data instanceof Float32Array ? event.data : event.data.last;
          this.count(block);
        };
        source.connect(node);
        // Pulled by the output (it writes silence): a node nothing listens to may not run.
        node.connect(context.destination);
        inbound.node = node;
      },
      () => {
        // No worklet: the answer still plays; only the page's count of it is missing.
        this.element.dataset.audioCount = "unavailable";
      },
    );
    this.inbound = { element, source, node: null };
  }

  private count(block: Float32Array): void {
    if (block.length === 0) return;
    let sum = 0;
    for (const s of block) sum += s * s;
    const level = Math.sqrt(sum / block.length);
    this.heard.samples += block.length;
    if (level > VOICED) {
      this.heard.voiced += block.length;
      this.heard.squares += sum;
    }
    this.heard.peak = Math.max(this.heard.peak, level);
    this.renderAudio();
  }

  private unlisten(): void {
    const inbound = this.inbound;
    this.inbound = null;
    if (inbound === null) return;
    inbound.source.disconnect();
    if (inbound.node) {
      inbound.node.port.onmessage = null;
      inbound.node.disconnect();
    }
    inbound.element.pause();
    inbound.element.srcObject = null;
  }

  // -- Frames on the channel -----------------------------------------------------------

  private frame(text: string): void {
    let raw: unknown;
    try {
      raw = JSON.parse(text);
    } catch {
      return;
    }
    if (typeof raw !== "object" || raw === null) return;
    const error = (raw as { error?: { code?: number; message?: string } }).error;
    if (error !== undefined) {
      // A turn or a control failed; the session goes on. (Read by hand: a Status's
      // details are Any, which the console has no registry to read.)
      const code = typeof error.code === "number" && error.code > 0 ? codeName(error.code as Code) : "UNKNOWN";
      this.page.showProblem({ ...local(code, error.message ?? "the session reported an error"), wire: true }, "live-session", this.button);
      return;
    }
    let frame: TalkResponse;
    try {
      frame = fromJson(TalkResponseSchema, raw as never, { ignoreUnknownFields: true, registry: DETAILS });
    } catch (error) {
      // Newer than this console (a detail it has no type for): skipped, said once here.
      console.warn("a live session's frame could not be read", Object.keys(raw), error);
      return;
    }
    if (frame.sequence > this.lastSequence) this.lastSequence = frame.sequence;
    const value = frame.frame;
    switch (value.case) {
      case "session":
        this.session = value.value.name;
        this.setState("live");
        this.status.textContent = "Live: listening.";
        if (this.resumes) this.say(`Reconnected after a dropped connection: the session resumed after frame ${this.element.dataset.resumedAfter ?? "0"}.`);
        break;
      case "transcript": {
        const t = value.value;
        const turn = t.final && t.run ? this.turnOf(t.run) : (this.speaking ??= this.newTurn(""));
        if (t.final && this.speaking && this.speaking !== turn) {
          this.speaking.element.remove();
        }
        if (t.final) this.speaking = null;
        turn.heard.textContent = t.text || (t.final ? "(nothing recognised)" : "…");
        turn.heard.dataset.final = String(t.final);
        if (!t.final) this.partials += 1;
        turn.element.dataset.final = String(t.final);
        if (t.final) {
          turn.element.dataset.message = t.message;
          this.element.dataset.lastTranscript = t.text;
          this.status.textContent = "Answering…";
        }
        break;
      }
      case "update":
        this.update(value.value);
        break;
      case "event":
        switch (value.value.kind) {
          case TalkEventKind.SPEECH_STARTED:
            this.status.textContent = "Hearing you…";
            break;
          case TalkEventKind.SPEECH_STOPPED:
            this.status.textContent = "Transcribing…";
            break;
          case TalkEventKind.SPEECH_INTERRUPTED: {
            this.interruptions += 1;
            if (this.speakingRun === value.value.run) this.speakingRun = "";
            this.element.dataset.interruptedRun = value.value.run;
            const turn = this.turns.get(value.value.run);
            if (turn && turn.element.dataset.interrupted !== "true") {
              turn.element.dataset.interrupted = "true";
              turn.answer.after(h("span", { class: "muted", "data-testid": "live-interrupted" }, " (interrupted)"));
            }
            this.status.textContent = "Interrupted: listening.";
            break;
          }
          case TalkEventKind.TURN_EMPTY:
            this.speaking?.element.remove();
            this.speaking = null;
            this.status.textContent = "Nothing was heard in that turn: listening.";
            break;
          default:
            break;
        }
        break;
      default:
        break;
    }
    this.render();
  }

  private update(update: RunUpdate): void {
    const turn = this.turnOf(update.run);
    // Each attempt at a run numbers its updates in its own block of 2^32: a run recovered
    // after a restart (its session resumed on the new server) starts its answer over.
    const attempt = update.sequence >> ATTEMPT_BITS;
    if (attempt > turn.attempt) {
      if (turn.attempt >= 0n) turn.answer.textContent = "";
      turn.attempt = attempt;
    }
    const value = update.update;
    switch (value.case) {
      case "delta":
        turn.answer.textContent = (turn.answer.textContent ?? "") + value.value.text;
        break;
      case "stateChange": {
        const run = value.value.run;
        if (!run) break;
        turn.element.dataset.runState = stateName(run.state);
        if (!this.runsFollowed.has(run.name) && this.target) {
          this.runsFollowed.add(run.name);
          this.host.started(this.target.conversation, run);
        }
        if (TERMINAL.has(run.state) && this.speakingRun === run.name) this.speakingRun = "";
        break;
      }
      case "speech":
        this.speakingRun = update.run;
        turn.element.dataset.speechUpdates = String(Number(turn.element.dataset.speechUpdates ?? "0") + 1);
        this.status.textContent = "Speaking…";
        break;
      default:
        break;
    }
  }

  private turnOf(run: string): Turn {
    const known = this.turns.get(run);
    if (known) return known;
    // The turn spoken last, named now by its run; else one the server started (a resume
    // replaying an answer whose transcript came before the drop).
    const turn = this.speaking ?? this.newTurn(run);
    turn.run = run;
    turn.element.dataset.run = run;
    this.turns.set(run, turn);
    return turn;
  }

  private newTurn(run: string): Turn {
    const heard = h("q", { "data-testid": "live-heard", "data-final": "false" });
    const answer = h("span", { "data-testid": "live-answer" });
    const element = h(
      "li",
      { class: "live-turn", "data-testid": "live-turn", "data-run": run },
      h("p", {}, h("strong", {}, "You: "), heard),
      h("p", {}, h("strong", {}, "Answer: "), answer),
    );
    this.turnList.append(element);
    while (this.turnList.children.length > TURNS_SHOWN) this.turnList.firstElementChild?.remove();
    this.turnList.hidden = false;
    return { element, heard, answer, run, attempt: -1n };
  }

  // -- Controls ------------------------------------------------------------------------

  private send(value: object): boolean {
    const channel = this.channel;
    if (channel === null || channel.readyState !== "open") return false;
    channel.send(JSON.stringify(value));
    return true;
  }

  /** Stop: the answer's speech stops and its run is cancelled (the server knows what the
   *  track sent whole, which is what was heard). */
  private interrupt(): void {
    if (this.send({ control: { action: "TALK_ACTION_INTERRUPT" } })) this.status.textContent = "Stopping the answer…";
  }

  /** End: END_SESSION, then the peer is closed (by the server, or here after a while). */
  async end(why: string): Promise<void> {
    if (!this.active) return;
    const channel = this.channel;
    this.ending = true;
    this.setState("ending");
    this.status.textContent = "Ending…";
    if (this.send({ control: { action: "TALK_ACTION_END_SESSION" } }) && channel !== null) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, END_MS);
        channel.addEventListener("close", () => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    this.release();
    this.setState("ended");
    this.status.textContent = `Ended (${why}).`;
  }

  // -- Drops and resuming --------------------------------------------------------------

  private connectionChanged(pc: RTCPeerConnection): void {
    const state = pc.connectionState;
    this.element.dataset.connection = state;
    clearTimeout(this.disconnectTimer);
    if (state === "failed") this.dropped("the connection failed");
    else if (state === "disconnected") {
      // Often back within a moment (a network change); gone if it stays so.
      this.disconnectTimer = setTimeout(() => {
        if (this.pc === pc && pc.connectionState === "disconnected") this.dropped("the connection was lost");
      }, DISCONNECTED_MS);
    }
  }

  /** The connection dropped: once, the session is resumed on a new peer. */
  private dropped(why: string): void {
    if (this.ending || !this.active || this.state === "reconnecting") return;
    this.closePeer();
    if (this.resumes > 0 || !this.session) {
      this.release();
      this.setState("failed");
      this.status.textContent = "";
      this.say(`The connection dropped (${why})${this.resumes ? " again" : ""}: the session ended here. Press Live to start another.`);
      return;
    }
    void this.resume(why);
  }

  /** The deployment's STUN and TURN servers (GetIceServers), each TURN credential minted
   *  for this user: asked before every offer, since a minted one expires. */
  private async iceServers(): Promise<RTCIceServer[]> {
    const given = await this.api.dispatcher.getIceServers({});
    return given.iceServers.map((server) =>
      server.username ? { urls: server.urls, username: server.username, credential: server.credential } : { urls: server.urls },
    );
  }

  private async resume(why: string): Promise<void> {
    this.resumes += 1;
    this.setState("reconnecting");
    this.status.textContent = "Reconnecting…";
    this.say(`The connection dropped (${why}): reconnecting to the session…`);
    const session = this.session;
    const deadline = performance.now() + RESUME_MS;
    let wait = 250;
    for (;;) {
      const after = this.lastSequence;
      this.element.dataset.resumedAfter = String(after);
      const p = await this.connect((offer) =>
        this.api.dispatcher.connectTalk({ offer, session: { case: "resume", value: { session, afterSequence: after } } }),
      );
      if (this.state !== "reconnecting") return;
      if (p === null) {
        // Live again once the session's first frame comes on the new channel.
        this.element.dataset.resumed = session;
        return;
      }
      // The dropped peer is still being let go (FAILED_PRECONDITION: carried by another
      // peer), or the server is coming back: asked again for a while.
      const again = (p.code === "FAILED_PRECONDITION" && p.metadata.session === session) || p.code === "UNAVAILABLE";
      if (!again || performance.now() + wait > deadline) {
        this.say("The connection dropped and the session could not be resumed: the server's answer is below.");
        this.fail(p);
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, wait));
      wait = Math.min(wait * 2, 4_000);
      if (this.state !== "reconnecting") return;
    }
  }

  // -- Ending --------------------------------------------------------------------------

  /** A refusal or failure: shown beside Live, everything let go. */
  private fail(p: Problem): Problem {
    this.release();
    this.setState("failed");
    this.status.textContent = "";
    this.page.showProblem(p, "live", this.button);
    return p;
  }

  private closePeer(): void {
    const pc = this.pc;
    const channel = this.channel;
    this.pc = null;
    this.channel = null;
    clearTimeout(this.disconnectTimer);
    if (channel) {
      channel.onmessage = null;
      channel.onclose = null;
    }
    this.unlisten();
    pc?.close();
  }

  /** Lets everything go: the peer, the microphone (its indicator goes off), the meter. */
  private release(): void {
    this.closePeer();
    clearInterval(this.levelTimer);
    this.levelTimer = undefined;
    for (const track of this.microphone?.getTracks() ?? []) track.stop();
    this.microphone = null;
    this.level.value = 0;
  }

  // -- Showing -------------------------------------------------------------------------

  private say(text: string): void {
    this.note.textContent = text;
    this.note.hidden = !text;
  }

  private setState(state: LiveState): void {
    const was = this.active;
    this.state = state;
    this.render();
    if (was !== this.active) this.host.activeChanged(this.active);
  }

  private render(): void {
    const active = this.active;
    const d = this.element.dataset;
    d.state = this.state;
    d.session = this.session;
    d.lastSequence = String(this.lastSequence);
    d.resumes = String(this.resumes);
    d.interruptions = String(this.interruptions);
    d.partials = String(this.partials);
    this.button.hidden = active;
    this.level.hidden = !active;
    this.endButton.hidden = !active;
    this.stopButton.hidden = this.state !== "live" || !this.speakingRun;
    this.hint.hidden = active;
    this.renderAudio();
  }

  private renderAudio(): void {
    const d = this.element.dataset;
    const heard = this.heard;
    d.audioSamples = String(heard.samples);
    d.audioMs = String(Math.round((1000 * heard.samples) / heard.rate));
    d.voicedMs = String(Math.round((1000 * heard.voiced) / heard.rate));
    d.audioRms = (heard.voiced ? Math.sqrt(heard.squares / heard.voiced) : 0).toFixed(4);
    d.audioPeak = heard.peak.toFixed(4);
  }
}

/** Resolves once the peer has gathered its ICE candidates (or after GATHER_MS: the offer
 *  then goes with those it has). */
function gathered(pc: RTCPeerConnection): Promise<void> {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, GATHER_MS);
    pc.addEventListener("icegatheringstatechange", check);
    function check(): void {
      if (pc.iceGatheringState === "complete") done();
    }
    function done(): void {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    }
  });
}

const worklets = new WeakMap<BaseAudioContext, Promise<void>>();

function loadWorklet(context: AudioContext): Promise<void> {
  let loading = worklets.get(context);
  if (loading === undefined) {
    loading = context.audioWorklet.addModule(WORKLET_URL);
    worklets.set(context, loading);
  }
  return loading;
}

/** ConnectTalk's refusal as the console says it (a voice missing, a limit, a field). */
function refusal(error: unknown): Problem {
  if (isProblem(error)) return error;
  const p = problem(error);
  const voice = speechSummary(p);
  if (voice !== undefined) return { ...p, summary: voice };
  if (p.code === "RESOURCE_EXHAUSTED") {
    // The caller's own peers (QuotaFailure subject webrtc/peers/{user}), or the server's.
    const mine = p.violations.some((v) => v.field.startsWith("webrtc/peers/"));
    return {
      ...p,
      summary: mine
        ? "Too many live sessions are open: end one (another tab, another device) and press Live again."
        : "The server carries as many live sessions as it can: try again in a while.",
    };
  }
  if (p.code === "FAILED_PRECONDITION" && p.metadata.session) {
    return { ...p, summary: "This session is still carried by another connection: end it there first." };
  }
  return p;
}

function isProblem(value: unknown): value is Problem {
  return typeof value === "object" && value !== null && "code" in value && "violations" in value && "wire" in value;
}
