// A run's spoken answer, played as it arrives: each `speech` update (a SpeechChunk of
// 16-bit PCM) becomes an AudioBuffer scheduled to start exactly where the one before it
// ends, on the AudioContext's clock, so the chunks join without a gap or a click. The
// server paces its speech at the speed of playback with a small lead, so a few hundred
// milliseconds are queued at most; a chunk that arrives after the queue ran dry starts a
// moment from now (an underrun, counted).
//
// What was heard is read off the same clock: a chunk counts as played once its start time
// has passed the output (the context's time less its output latency). Stopping silences
// every scheduled buffer at once and says the sequence of the last chunk played, which
// CancelRun takes as `heard_through_sequence`.
import { SPEECH_RATE, pcm16 } from "./audio";
import { type Problem, local } from "./errors";
import { AudioEncoding, type SpeechChunk } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";

/** How far ahead of now the first chunk (or one after an underrun) starts. */
const LEAD_S = 0.04;
/** How often the counters are brought up to date while audio plays. */
const TICK_MS = 100;

export type PlaybackState = "waiting" | "playing" | "ended" | "stopped";

interface Scheduled {
  sequence: bigint;
  start: number;
  end: number;
  source: AudioBufferSourceNode | null;
}

export class SpeechPlayer {
  state: PlaybackState = "waiting";
  /** Speech updates received, and their audio's length. */
  chunksReceived = 0;
  msReceived = 0;
  /** Chunks whose playback began, and the milliseconds actually played. */
  chunksPlayed = 0;
  msPlayed = 0;
  /** Times the queue ran dry before the answer's speech ended. */
  underruns = 0;
  /** The sequence of the last chunk played (0 before any). */
  heardThrough = 0n;
  private readonly output: GainNode;
  private readonly scheduled: Scheduled[] = [];
  /** Where the next chunk starts, on the context's clock. */
  private next = 0;
  /** The last sequence seen before speech began: what was heard when nothing played. */
  private before = 0n;
  /** An odd byte left at the end of a chunk: the first half of the next one's sample. */
  private carry: number | null = null;
  private finished = false;
  private timer: ReturnType<typeof setInterval> | undefined;

  constructor(
    private readonly context: AudioContext,
    private readonly changed: () => void,
  ) {
    this.output = context.createGain();
    this.output.connect(context.destination);
  }

  /** An update of the run that is not speech (its sequence orders what was heard). */
  note(sequence: bigint): void {
    if (this.chunksReceived === 0 && sequence > this.before) this.before = sequence;
  }

  /** A speech update: scheduled right after the one before it. A problem if it cannot be
   *  played (an encoding the console does not know). */
  push(sequence: bigint, chunk: SpeechChunk): Problem | undefined {
    if (this.state === "stopped" || this.state === "ended") return undefined;
    const encoding = chunk.format?.encoding ?? AudioEncoding.UNSPECIFIED;
    if (encoding !== AudioEncoding.UNSPECIFIED && encoding !== AudioEncoding.PCM16) {
      return local("UNIMPLEMENTED", `the console plays 16-bit PCM only, not ${AudioEncoding[encoding] ?? encoding}`);
    }
    const rate = chunk.format?.sampleRateHz || SPEECH_RATE;
    let bytes = chunk.audio;
    if (this.carry !== null) {
      const joined = new Uint8Array(bytes.length + 1);
      joined[0] = this.carry;
      joined.set(bytes, 1);
      bytes = joined;
      this.carry = null;
    }
    if (bytes.length % 2 === 1) this.carry = bytes[bytes.length - 1] ?? 0;
    this.chunksReceived += 1;
    const samples = pcm16(bytes);
    if (samples.length === 0) return undefined;
    const buffer = this.context.createBuffer(1, samples.length, rate);
    buffer.copyToChannel(samples, 0);
    this.msReceived += buffer.duration * 1000;
    const now = this.context.currentTime;
    let start = this.next;
    if (start < now + 0.005) {
      // Nothing queued (the first chunk), or the queue ran dry: a gap cannot be helped.
      if (this.scheduled.length > 0) this.underruns += 1;
      start = now + LEAD_S;
    }
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.output);
    source.start(start);
    const entry: Scheduled = { sequence, start, end: start + buffer.duration, source };
    source.onended = () => {
      entry.source = null;
      this.tick();
    };
    this.scheduled.push(entry);
    this.next = entry.end;
    if (this.state === "waiting") this.state = "playing";
    this.timer ??= setInterval(() => this.tick(), TICK_MS);
    this.tick();
    return undefined;
  }

  /** No more speech will come (the run ended): the player ends with its last chunk. */
  finish(): void {
    this.finished = true;
    this.tick();
  }

  get active(): boolean {
    return this.state === "waiting" || this.state === "playing";
  }

  /** Silences it now; the sequence of the last chunk heard (or, when none was, of the
   *  last update before speech began: nothing spoken was heard). */
  stop(): bigint {
    this.tick();
    if (this.state !== "ended") this.state = "stopped";
    for (const entry of this.scheduled) {
      const source = entry.source;
      if (source === null) continue;
      entry.source = null;
      source.onended = null;
      try {
        source.stop();
      } catch {
        // Never started: nothing to stop.
      }
      source.disconnect();
    }
    this.output.disconnect();
    this.halt();
    this.changed();
    return this.heardThrough > 0n ? this.heardThrough : this.before > 0n ? this.before : 1n;
  }

  /** Brings the counters up to the output's clock. */
  private tick(): void {
    if (this.state === "stopped") return;
    const heard = this.context.currentTime - (this.context.outputLatency || 0);
    let chunks = 0;
    let ms = 0;
    for (const entry of this.scheduled) {
      if (entry.start > heard) break;
      chunks += 1;
      this.heardThrough = entry.sequence;
      ms += (Math.min(heard, entry.end) - entry.start) * 1000;
    }
    this.chunksPlayed = chunks;
    this.msPlayed = ms;
    const drained = this.scheduled.every((e) => e.source === null);
    if (this.finished && drained && (this.scheduled.length === 0 || this.context.currentTime >= this.next)) {
      this.state = "ended";
      // Everything was played: the counters say all of it, whatever the clock's latency.
      this.chunksPlayed = this.scheduled.length;
      this.msPlayed = this.scheduled.reduce((n, e) => n + (e.end - e.start) * 1000, 0);
      const last = this.scheduled[this.scheduled.length - 1];
      if (last) this.heardThrough = last.sequence;
      this.output.disconnect();
      this.halt();
    }
    this.changed();
  }

  private halt(): void {
    if (this.timer !== undefined) clearInterval(this.timer);
    this.timer = undefined;
  }
}
