// Push-to-talk, in the composer, for a conversation whose assistant has a voice. A browser
// cannot stream a request over grpc-web, so a turn is recorded first and then sent:
//
//   Talk pressed     -> the microphone (recorder.ts), recording
//   Talk released    -> the recording as a 16 kHz WAV, uploaded with the resumable steps
//   (or clicked again)  (files.ts), then SendMessage with that one file part and
//                       `speech {transcribe, speak, output_format PCM16 24 kHz}`: the
//                       stored message comes back with the transcript as its text
//   the answer       -> its run's WatchRun (the run card's): text deltas in the card, the
//                       `speech` updates played as they arrive (player.ts)
//   Stop, or Talk    -> the audio silenced at once, CancelRun with heard_through_sequence
//   while it speaks     = the last speech update played
//
// Held down (the pointer, or Space/Enter), Talk records until it is let go; a short click
// starts recording and the next one sends. Escape while recording drops the recording.
import { type Api, requestId } from "./api";
import { h } from "./dom";
import { type Problem, local, problem } from "./errors";
import { formatSize, uploadFile } from "./files";
import { type Message, MessageRole } from "./gen/switchboard/api/context/v1/context_pb";
import { AudioEncoding, type Run, type RunUpdate, type SendMessageResponse } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import type { Page } from "./page";
import { SpeechPlayer } from "./player";
import { MIN_RECORDING_MS, Recorder } from "./recorder";
import { SPEECH_RATE } from "./audio";
import type { RunListener, RunView } from "./runs";

/** Held at least this long, Talk records while held; shorter is a click (start / send). */
const HOLD_MS = 350;
/** Below this level (RMS) all the way through, the microphone gave silence. */
const SILENCE = 1e-4;

export type TalkState = "idle" | "starting" | "recording" | "sending" | "answering";

/** Where a turn goes: what the composer has chosen. */
export interface TalkTarget {
  workspace: string;
  conversation: string;
  /** `workspaces/{w}/assistants/{a}`, "" for the workspace default. */
  assistant: string;
  /** `handlers/{h}`, "" for the assistant's own. */
  handler: string;
}

export interface TalkHost {
  target(): TalkTarget;
  /** SendMessage answered (as the composer's Send). */
  sent(conversation: string, answer: SendMessageResponse): void;
  /** Follows the run's updates (its card's WatchRun); undefined when it has no card
   *  (its conversation is no longer open). */
  listen(run: string, listener: RunListener): RunView | undefined;
}

/** What the console says about a refusal of a spoken turn, beside the code and reason. */
export function speechSummary(p: Problem): string | undefined {
  switch (p.reason) {
    case "ERROR_REASON_SPEECH_NOT_CONFIGURED":
      return p.metadata.assistant
        ? "This assistant has no voice settings: an owner of the workspace gives it a voice in its editor."
        : "This server has no speech engine: it needs SWITCHBOARD_VOICE_URL.";
    case "ERROR_REASON_SPEECH_UNAVAILABLE":
      return `The speech engine is not answering.${p.retryAfterS !== undefined ? ` Try again in ${Math.max(1, Math.ceil(p.retryAfterS))} s.` : ""}`;
    case "ERROR_REASON_SPEECH_REFUSED":
      return "The speech engine refused the recording or the voice; sending it again will not help.";
    default:
      // The engine heard no words (a refusal of the recording itself, on its one part).
      if (p.code === "INVALID_ARGUMENT" && p.violations.some((v) => v.field.startsWith("message.parts"))) {
        return "The recording was not accepted as speech: hold Talk while you speak, close to the microphone.";
      }
      return undefined;
  }
}

export class TalkControl {
  readonly element: HTMLElement;
  state: TalkState = "idle";
  private readonly button = h(
    "button",
    {
      type: "button",
      class: "talk-button",
      "data-testid": "talk",
      "aria-pressed": "false",
      "aria-describedby": "talk-hint",
    },
    "Talk",
  );
  private readonly stopButton = h("button", { type: "button", class: "danger", "data-testid": "talk-stop", hidden: true }, "Stop speaking");
  private readonly level = h("meter", { "data-testid": "talk-level", "aria-label": "microphone level", min: 0, max: 1, low: 0.02, value: 0, hidden: true });
  private readonly status = h("span", { class: "muted", "data-testid": "talk-status", role: "status", "aria-live": "polite" });
  private readonly transcript = h("p", { class: "talk-transcript", "data-testid": "talk-transcript", hidden: true });
  private readonly hint = h("span", { id: "talk-hint", class: "muted talk-hint" }, "Hold to talk, or click to start and again to send");
  private context: AudioContext | null = null;
  private recorder: Recorder | null = null;
  private player: SpeechPlayer | null = null;
  private view: RunView | undefined;
  private run = "";
  private unlisten: (() => void) | null = null;
  /** When the current press began (the pointer or a key), and whether it started recording. */
  private pressedAt = 0;
  private pressStarted = false;
  /** Where the recording goes: the conversation open when it started. */
  private target: TalkTarget | null = null;
  private recordedMs = 0;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly host: TalkHost,
  ) {
    this.button.addEventListener("pointerdown", (event) => {
      if (event.button !== 0) return;
      this.button.setPointerCapture(event.pointerId);
      this.down();
    });
    this.button.addEventListener("pointerup", (event) => {
      if (event.button === 0) this.up();
    });
    this.button.addEventListener("pointercancel", () => this.up());
    this.button.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && this.state === "recording") {
        event.preventDefault();
        this.discard();
        return;
      }
      if (event.key !== " " && event.key !== "Enter") return;
      // Not the button's own click (which Enter and Space also make), nor a page scroll.
      event.preventDefault();
      if (!event.repeat) this.down();
    });
    this.button.addEventListener("keyup", (event) => {
      if (event.key !== " " && event.key !== "Enter") return;
      event.preventDefault();
      this.up();
    });
    // Clicks are handled as presses above; this one is the browser's echo of them.
    this.button.addEventListener("click", (event) => event.preventDefault());
    this.stopButton.addEventListener("click", () => void this.interrupt("stopped by the listener"));
    this.element = h(
      "div",
      { class: "talk", "data-testid": "talk-control", "data-state": "idle", hidden: true },
      h("div", { class: "row" }, this.button, this.level, this.stopButton, this.status),
      this.hint,
      this.transcript,
    );
    this.render();
  }

  /** Shown when the composer's target can speak (its assistant has `voice`). */
  available(voice: boolean): void {
    this.element.hidden = !voice;
    if (!voice && this.state === "recording") this.discard();
  }

  /** Another conversation opened, or the session ended: nothing recorded goes, nothing
   *  plays on (the run, if it still speaks, is cancelled with what was heard). */
  reset(): void {
    if (this.state === "recording" || this.state === "starting") this.discard();
    void this.interrupt("the listener left the conversation");
  }

  // -- Pressing --------------------------------------------------------------------------

  private down(): void {
    this.pressedAt = performance.now();
    this.pressStarted = false;
    if (this.state === "recording") {
      // The second click of click-to-talk: send.
      void this.finish();
      return;
    }
    if (this.state !== "idle" && this.state !== "answering") return;
    this.pressStarted = true;
    void this.start();
  }

  private up(): void {
    const held = performance.now() - this.pressedAt;
    // Held down: let go means send. A click leaves it recording until the next one.
    if (this.pressStarted && held >= HOLD_MS && this.state === "recording") void this.finish();
    this.pressStarted = false;
  }

  private async start(): Promise<void> {
    // Talking over the answer stops it, as Stop does.
    if (this.player?.active) void this.interrupt("the listener spoke over the answer");
    // Created (or resumed) inside the press: browsers let audio play only after a gesture.
    this.context ??= new AudioContext();
    if (this.context.state === "suspended") void this.context.resume();
    this.page.clearProblem("talk");
    this.target = this.host.target();
    this.transcript.hidden = true;
    this.recordedMs = 0;
    this.setState("starting");
    try {
      this.recorder = await Recorder.open(this.context, {
        level: (rms, ms) => {
          this.level.value = Math.min(1, rms * 4);
          this.recordedMs = ms;
          this.element.dataset.recordedMs = String(Math.round(ms));
          this.status.textContent = `Recording… ${(ms / 1000).toFixed(1)} s`;
        },
        full: () => void this.finish(),
      });
    } catch (error) {
      this.setState("idle");
      this.page.showProblem(isProblem(error) ? error : problem(error), "talk", this.button);
      return;
    }
    if (this.state !== "starting") {
      // Dropped (Escape, the control hidden) while the browser asked for the microphone.
      this.recorder.abort();
      this.recorder = null;
      return;
    }
    this.element.dataset.capture = this.recorder.path;
    this.setState("recording");
  }

  /** Drops the recording (Escape): nothing is sent. */
  private discard(): void {
    this.recorder?.abort();
    this.recorder = null;
    this.setState("idle");
    this.status.textContent = "Recording dropped.";
  }

  // -- Sending ---------------------------------------------------------------------------

  private async finish(): Promise<void> {
    const recorder = this.recorder;
    const target = this.target;
    if (recorder === null || target === null || this.state !== "recording") return;
    this.recorder = null;
    this.setState("sending");
    this.status.textContent = "Preparing the recording…";
    const recording = await recorder.stop();
    this.element.dataset.recordedMs = String(Math.round(recording.durationMs));
    if (recording.durationMs < MIN_RECORDING_MS) {
      this.setState("idle");
      return this.page.showProblem(
        { ...local("INVALID_ARGUMENT", `the recording is ${Math.round(recording.durationMs)} ms long`), summary: "Too short to send: hold Talk while you speak, or click it, speak, and click it again." },
        "talk",
        this.button,
      );
    }
    if (recording.peak < SILENCE) {
      this.setState("idle");
      return this.page.showProblem(
        { ...local("FAILED_PRECONDITION", "the microphone gave only silence"), summary: "Nothing was heard: check that the right microphone is chosen and not muted." },
        "talk",
        this.button,
      );
    }
    let answer: SendMessageResponse | undefined;
    await this.page.busy(
      "talk",
      async () => {
        const name = `recording-${new Date().toISOString().replace(/[:.]/g, "-")}.wav`;
        const file = new File([recording.wav], name, { type: "audio/wav" });
        this.status.textContent = `Uploading the recording (${formatSize(file.size)})…`;
        const progress = { sent: 0, resumes: 0 };
        const stored = await uploadFile(this.api, target.workspace, file, progress, () => {
          this.status.textContent = `Uploading the recording… ${Math.floor((100 * progress.sent) / Math.max(file.size, 1))}%`;
        }, new AbortController().signal);
        this.element.dataset.file = stored.name;
        this.status.textContent = "Transcribing…";
        try {
          answer = await this.api.dispatcher.sendMessage({
            conversation: target.conversation,
            message: {
              role: MessageRole.USER,
              parts: [
                {
                  part: {
                    case: "file",
                    value: { file: stored.name, displayName: stored.displayName, mimeType: stored.mediaType, sizeBytes: stored.sizeBytes },
                  },
                },
              ],
            },
            handler: target.handler,
            assistant: target.assistant,
            speech: { transcribe: true, speak: true, outputFormat: { encoding: AudioEncoding.PCM16, sampleRateHz: SPEECH_RATE } },
            // Sent again after a lost answer, it is the same turn, not a second run.
            requestId: requestId(),
          });
        } catch (error) {
          const refused = problem(error);
          const summary = speechSummary(refused);
          throw summary === undefined ? error : { ...refused, summary };
        }
      },
      { button: this.button },
    );
    if (answer === undefined) {
      this.setState("idle");
      this.status.textContent = "";
      return;
    }
    this.host.sent(target.conversation, answer);
    const said = answer.message ? textOf(answer.message) : "";
    this.transcript.hidden = false;
    this.transcript.replaceChildren("You said: ", h("q", { "data-testid": "talk-transcript-text" }, said || "(nothing recognised)"));
    if (answer.run) this.answer(answer.run);
    else this.setState("idle");
  }

  // -- The answer ------------------------------------------------------------------------

  private answer(run: Run): void {
    this.unlisten?.();
    const context = this.context;
    if (context === null) return;
    const player = new SpeechPlayer(context, () => this.render());
    this.player = player;
    this.run = run.name;
    this.element.dataset.run = run.name;
    let listener: RunListener | null = {
      update: (update: RunUpdate, view: RunView) => {
        if (this.player !== player) return;
        if (update.update.case === "speech") {
          const unplayable = player.push(update.sequence, update.update.value);
          if (unplayable) this.page.showProblem(unplayable, "talk", this.button);
        } else {
          player.note(update.sequence);
        }
        if (view.terminal) player.finish();
      },
      closed: () => {
        if (this.player === player) void this.interrupt("the listener left the conversation");
      },
    };
    this.view = this.host.listen(run.name, listener);
    if (this.view === undefined) {
      listener = null;
      player.stop();
      this.setState("idle");
      this.status.textContent = "Sent; its conversation is no longer open, so the answer is not played here.";
      return;
    }
    this.unlisten = () => {
      if (listener) this.view?.unlisten(listener);
      listener = null;
    };
    if (this.view.terminal) player.finish();
    this.setState("answering");
  }

  /** Stops the answer's audio now and, if its run still goes, cancels it with the last
   *  speech update played as what was heard. */
  private async interrupt(reason: string): Promise<void> {
    const player = this.player;
    const view = this.view;
    if (player === null || !player.active) return;
    const heard = player.stop();
    // What CancelRun is told (data-heard-through is the last chunk played, 0 for none).
    this.element.dataset.cancelHeardThrough = String(heard);
    if (this.state === "answering") this.setState("idle");
    if (view === undefined || view.terminal) return;
    await this.page.busy(
      "talk-stop",
      async () => {
        const answer = await this.api.dispatcher.cancelRun({ name: view.name, reason, heardThroughSequence: heard });
        if (answer.run) view.adopt(answer.run);
      },
      { button: this.stopButton },
    );
  }

  // -- Showing ---------------------------------------------------------------------------

  private setState(state: TalkState): void {
    this.state = state;
    this.render();
  }

  private render(): void {
    const recording = this.state === "recording";
    const player = this.player;
    // The answer is done once its run ended and its audio played out (or was stopped).
    if (this.state === "answering" && player && !player.active && (this.view?.terminal ?? true)) {
      this.state = "idle";
      this.unlisten?.();
    }
    this.element.dataset.state = this.state;
    this.button.setAttribute("aria-pressed", String(recording));
    this.button.classList.toggle("recording", recording);
    this.button.textContent = recording ? "Send" : this.state === "starting" ? "Starting…" : "Talk";
    this.button.setAttribute("aria-label", recording ? "stop recording and send" : "talk: record a message");
    this.level.hidden = !recording;
    this.stopButton.hidden = !(player?.active ?? false);
    if (player) {
      Object.assign(this.element.dataset, {
        playback: player.state,
        chunksReceived: String(player.chunksReceived),
        chunksPlayed: String(player.chunksPlayed),
        msReceived: String(Math.round(player.msReceived)),
        msPlayed: String(Math.round(player.msPlayed)),
        underruns: String(player.underruns),
        heardThrough: String(player.heardThrough),
      });
      if (this.state === "answering" || this.state === "idle") {
        const spoken = `${(player.msPlayed / 1000).toFixed(1)} s`;
        this.status.textContent =
          player.state === "waiting"
            ? "Answering…"
            : player.state === "playing"
              ? `Speaking… ${spoken}`
              : player.state === "stopped"
                ? `Stopped after ${spoken}.`
                : player.chunksReceived
                  ? `Spoke for ${spoken}.`
                  : "The answer came without speech (its run's card says why).";
      }
    }
  }
}

function textOf(message: Message): string {
  return message.parts.map((p) => (p.part.case === "text" ? p.part.value : "")).join("");
}

function isProblem(value: unknown): value is Problem {
  return typeof value === "object" && value !== null && "code" in value && "violations" in value && "wire" in value;
}
