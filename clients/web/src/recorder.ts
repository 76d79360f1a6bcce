// The microphone, recorded for push-to-talk: getUserMedia, the samples taken off the audio
// graph by an AudioWorklet (capture.js) or, where a worklet cannot load, a
// ScriptProcessorNode, mixed down to one channel; at the end resampled to 16 kHz and
// written as a WAV of 16-bit PCM (audio.ts), the one form every transcription endpoint
// takes.
import { RECORDING_RATE, join, resample, rms, wav } from "./audio";
import { type Problem, local } from "./errors";

/** The longest recording: the server's own limit on a turn (SWITCHBOARD_VOICE_MAX_TURN_S)
 *  is a minute by default; the recording is sent when it reaches this. */
export const MAX_RECORDING_MS = 60_000;
/** Shorter than this is a slip of the finger, not a question: nothing is sent. */
export const MIN_RECORDING_MS = 250;

/** How the samples were taken (the page shows it, `data-capture`). */
export type CapturePath = "worklet" | "script-processor";

export interface Recording {
  wav: Blob;
  durationMs: number;
  /** The loudest block's level (RMS, 0..1): 0 means the microphone gave only silence. */
  peak: number;
}

export interface RecorderListener {
  /** A block arrived: its level and the milliseconds recorded so far. */
  level(rms: number, recordedMs: number): void;
  /** MAX_RECORDING_MS reached: nothing more is kept. */
  full(): void;
}

// Where the console's script came from: the worklet is beside it (capture.js).
const SCRIPT_URL = (document.currentScript as HTMLScriptElement | null)?.src || window.location.href;
const WORKLET_URL = new URL("capture.js", SCRIPT_URL).href;
/** Each context loads the worklet once. */
const loaded = new WeakMap<BaseAudioContext, Promise<void>>();

/** The microphone's refusal in words: what the browser said, as a problem the page shows
 *  like a server's (a code, a sentence). */
export function microphoneProblem(error: unknown): Problem {
  const name = error instanceof DOMException ? error.name : "";
  switch (name) {
    case "NotAllowedError":
    case "SecurityError":
      return withSummary(
        local("PERMISSION_DENIED", "the browser was not allowed to use the microphone"),
        "Microphone permission denied: allow this site to use the microphone (the icon in the address bar), then press Talk again.",
      );
    case "NotFoundError":
    case "OverconstrainedError":
      return withSummary(local("NOT_FOUND", "no microphone was found"), "No microphone: connect one, then press Talk again.");
    case "NotReadableError":
    case "AbortError":
      return withSummary(
        local("UNAVAILABLE", "the microphone could not be opened"),
        "The microphone could not be opened: another application may be using it.",
      );
    default:
      return withSummary(local("UNAVAILABLE", `the microphone failed${name ? ` (${name})` : ""}`), "The microphone could not be used.");
  }
}

function withSummary(p: Problem, summary: string): Problem {
  return { ...p, summary };
}

export class Recorder {
  private readonly blocks: Float32Array[] = [];
  private frames = 0;
  private peak = 0;
  private ended: (() => void) | null = null;
  private closed = false;
  /** MAX_RECORDING_MS reached (said once). */
  private filled = false;

  private constructor(
    private readonly context: AudioContext,
    private readonly stream: MediaStream,
    private readonly source: MediaStreamAudioSourceNode,
    private readonly node: AudioWorkletNode | ScriptProcessorNode,
    readonly path: CapturePath,
    private readonly listener: RecorderListener,
  ) {}

  /** Asks for the microphone and starts recording from it into `context`. */
  static async open(context: AudioContext, listener: RecorderListener): Promise<Recorder> {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw withSummary(
        local("FAILED_PRECONDITION", "this page has no access to microphones"),
        "Browsers give microphones only to pages served over HTTPS (or from localhost).",
      );
    }
    let stream: MediaStream;
    try {
      // The voice as the microphone gave it: nothing plays while Talk records (pressing it
      // stops the answer), so there is no echo to cancel, and a recogniser does better with
      // the raw sound than with what noise suppression and gain control leave of it.
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      });
    } catch (error) {
      throw microphoneProblem(error);
    }
    try {
      const source = context.createMediaStreamSource(stream);
      let node: AudioWorkletNode | ScriptProcessorNode;
      let path: CapturePath;
      try {
        let loading = loaded.get(context);
        if (loading === undefined) {
          loading = context.audioWorklet.addModule(WORKLET_URL);
          loaded.set(context, loading);
        }
        await loading;
        node = new AudioWorkletNode(context, "switchboard-capture", {
          numberOfInputs: 1,
          numberOfOutputs: 1,
          outputChannelCount: [1],
          // The microphone's channels mixed down to one before the worklet sees them.
          channelCount: 1,
          channelCountMode: "explicit",
        });
        path = "worklet";
      } catch {
        // No worklet (an older browser, or its module refused): the deprecated node
        // that runs on the page's thread does the same job.
        node = context.createScriptProcessor(4096, 1, 1);
        path = "script-processor";
      }
      const recorder = new Recorder(context, stream, source, node, path, listener);
      if (node instanceof AudioWorkletNode) {
        node.port.onmessage = (event: MessageEvent<Float32Array | { last: Float32Array }>) => {
          const data = event.data;
          if (data instanceof Float32Array) recorder.take(data);
          else {
            recorder.take(data.last);
            recorder.ended?.();
          }
        };
      } else {
        node.onaudioprocess = (event) => {
          recorder.take(event.inputBuffer.getChannelData(0).slice());
          event.outputBuffer.getChannelData(0).fill(0);
        };
      }
      source.connect(node);
      // Connected to the output (silent) so the graph pulls it: a node nothing listens to
      // may never run.
      node.connect(context.destination);
      return recorder;
    } catch (error) {
      for (const track of stream.getTracks()) track.stop();
      throw error;
    }
  }

  get recordedMs(): number {
    return (1000 * this.frames) / this.context.sampleRate;
  }

  /** Stops recording; the recording as a 16 kHz WAV. */
  async stop(): Promise<Recording> {
    if (this.node instanceof AudioWorkletNode && !this.closed) {
      // What the worklet holds (under one block) comes with its last message.
      const node = this.node;
      await new Promise<void>((resolve) => {
        this.ended = resolve;
        node.port.postMessage("stop");
        // A worklet that no longer runs (its context closed) answers nothing.
        setTimeout(resolve, 500);
      });
    }
    this.close();
    const samples = resample(join(this.blocks), this.context.sampleRate, RECORDING_RATE);
    return { wav: wav(samples, RECORDING_RATE), durationMs: (1000 * samples.length) / RECORDING_RATE, peak: this.peak };
  }

  /** Stops without keeping anything. */
  abort(): void {
    this.close();
    this.blocks.length = 0;
  }

  private take(block: Float32Array): void {
    if (this.closed || block.length === 0) return;
    const room = Math.floor((MAX_RECORDING_MS / 1000) * this.context.sampleRate) - this.frames;
    const kept = block.length > room ? block.slice(0, Math.max(0, room)) : block;
    if (kept.length > 0) {
      this.blocks.push(kept);
      this.frames += kept.length;
      const level = rms(kept);
      this.peak = Math.max(this.peak, level);
      this.listener.level(level, this.recordedMs);
    }
    if (!this.filled && room <= kept.length) {
      this.filled = true;
      this.listener.full();
    }
  }

  private close(): void {
    if (this.closed) return;
    this.closed = true;
    this.source.disconnect();
    this.node.disconnect();
    if (this.node instanceof ScriptProcessorNode) this.node.onaudioprocess = null;
    else this.node.port.onmessage = null;
    // The browser's recording indicator goes off with the tracks.
    for (const track of this.stream.getTracks()) track.stop();
  }
}
