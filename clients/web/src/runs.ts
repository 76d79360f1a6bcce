// A run as the console shows it, assembled from DispatcherService.WatchRun: its state,
// the answer appended delta by delta, its tool calls and results, what it waits for.
// WatchRun resumes with the last sequence seen, so a dropped stream loses nothing and
// repeats nothing.
import type { Api } from "./api";
import type { Problem } from "./errors";
import { follow } from "./follow";
import {
  type Run,
  type RunUpdate,
  RunState,
  type WatchRunResponse,
} from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import type { ToolCall, ToolResult } from "./gen/switchboard/api/handler/v1/handler_pb";

/** Each attempt at a run numbers its updates in its own block of 2^32 sequences. */
const ATTEMPT_BITS = 32n;

export const TERMINAL = new Set([
  RunState.SUCCEEDED,
  RunState.FAILED,
  RunState.CANCELLED,
  RunState.DEADLINE_EXCEEDED,
]);

export function stateName(state: RunState): string {
  return `RUN_STATE_${RunState[state] ?? "UNSPECIFIED"}`;
}

export class RunView {
  state: RunState = RunState.QUEUED;
  run: Run | undefined;
  text = "";
  deltas = 0;
  lastSequence = 0n;
  progress = "";
  calls: ToolCall[] = [];
  results: ToolResult[] = [];
  /** Times the watch was reopened after a drop. */
  resumes = 0;
  live = false;
  problem: Problem | undefined;
  private readonly stopper = new AbortController();

  constructor(
    readonly name: string,
    private readonly changed: (view: RunView) => void,
  ) {}

  get terminal(): boolean {
    return TERMINAL.has(this.state);
  }

  watch(api: Api): this {
    let openings = 0;
    void follow<WatchRunResponse>(
      api,
      {
        open: (headers, signal) => {
          if (openings++ > 0) this.resumes += 1;
          return api.dispatcher.watchRun(
            { name: this.name, afterSequence: this.lastSequence },
            { headers, signal, timeoutMs: 0 },
          );
        },
        frame: (response) => {
          if (response.frame.case === "update") this.apply(response.frame.value);
          return this.terminal ? "done" : "more";
        },
        status: (live, detail) => {
          this.live = live;
          this.problem = detail;
          this.changed(this);
        },
        failed: (detail) => {
          this.live = false;
          this.problem = detail;
          this.changed(this);
        },
      },
      this.stopper.signal,
    ).finally(() => {
      this.live = false;
      this.changed(this);
    });
    return this;
  }

  stop(): void {
    this.stopper.abort();
  }

  /** A state the console learned elsewhere (an event, a CancelRun answer). */
  adopt(run: Run): void {
    if (run.lastSequence < this.lastSequence) return;
    this.run = run;
    this.state = run.state;
    this.changed(this);
  }

  apply(update: RunUpdate): void {
    if (update.sequence <= this.lastSequence) return; // seen before the stream was reopened
    // Each attempt numbers its updates in its own block of 2^32. A watch resumed on a
    // restarted server may open a newer attempt with a snapshot of the run rather than
    // its QUEUED change: the first update of a newer block starts the answer over.
    if (update.sequence >> ATTEMPT_BITS > this.lastSequence >> ATTEMPT_BITS) {
      this.text = "";
      this.deltas = 0;
    }
    this.lastSequence = update.sequence;
    const change = update.update;
    switch (change.case) {
      case "stateChange": {
        const run = change.value.run;
        if (run === undefined) break;
        // A recovered run starts over from QUEUED: so does its answer.
        if (run.state === RunState.QUEUED && this.state !== RunState.QUEUED) {
          this.text = "";
          this.deltas = 0;
        }
        this.run = run;
        this.state = run.state;
        break;
      }
      case "delta":
        this.text += change.value.text;
        this.deltas += 1;
        break;
      case "progress":
        this.progress = change.value.stage;
        break;
      case "toolCall":
        this.calls.push(change.value);
        break;
      case "toolResult":
        this.results.push(change.value);
        break;
      case "result": {
        const whole = change.value.parts
          .map((part) => (part.part.case === "text" ? part.part.value : ""))
          .join("");
        // The result carries the whole answer, and wins over the deltas joined so far:
        // a watcher that joined late, or across attempts, still shows exactly it.
        if (whole) this.text = whole;
        break;
      }
      default:
        break;
    }
    this.changed(this);
  }
}
