// A run as the console shows it, assembled from DispatcherService.WatchRun: its state,
// the answer appended delta by delta, its tool calls and results, what it waits for.
// WatchRun resumes with the last sequence seen, so a dropped stream loses nothing and
// repeats nothing.
import { durationMs, timestampDate } from "@bufbuild/protobuf/wkt";
import type { Api } from "./api";
import type { Problem } from "./errors";
import { follow } from "./follow";
import { jsonText } from "./jsontext";
import {
  type ChildRun,
  type QueuedBehind,
  type RequiredAction,
  type Run,
  type RunUpdate,
  RunState,
  SteerState,
  type SteerUpdate,
  type WatchRunResponse,
} from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { type ToolCall, ToolOutcome, type ToolResult, type Usage } from "./gen/switchboard/api/handler/v1/handler_pb";
import { ToolApprovalDecision } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { decisionLabel, limitedLabel, outcomeLabel, runLabel, steerLabel, usageCost, waitingLabel } from "./labels";

/** One line of the run inspector's timeline (plain data: it is kept across a reload). */
export interface TimelineEntry {
  kind: "state" | "text" | "progress" | "tool-call" | "tool-result" | "approval" | "usage" | "attempt" | "speech" | "steer" | "discarded" | "child" | "handoff" | "queued";
  sequence: string;
  /** When it happened (ms since the epoch), 0 if unknown. */
  at: number;
  label: string;
  detail: string;
  /** Milliseconds it took (a tool call's, a state's time since the previous one). */
  ms?: number;
  /** Folded deltas (for "text"), the tool call id (for tool entries, the run ahead for
   *  "queued"), a decision's user. */
  count?: number;
  id?: string;
  by?: string;
  outcome?: string;
  /** A state entry's state, as the contracts name it (`RUN_STATE_SUCCEEDED`). */
  state?: string;
  /** An approval entry's decision, as the contracts name it (`TOOL_APPROVAL_DECISION_COMPLETE`). */
  decision?: string;
  /** A steer entry's state (`STEER_STATE_CONSUMED`), the step whose model call first held
   *  it, and its stored message (`id` is the steer's own run). */
  steerState?: string;
  step?: number;
  message?: string;
  /** A handoff entry's assistants: the one that handed the conversation over and the one
   *  that holds it now (`detail` is the reason). */
  from?: string;
  to?: string;
  /** A child entry's run that asked it, when that is not this run (a grandchild's). */
  parent?: string;
}

/** A conversation handed over by this run's assistant (RunUpdate.handoff), and when
 *  (ms since the epoch, 0 if unknown). */
export interface HandoffInfo {
  from: string;
  to: string;
  reason: string;
  at: number;
}

/** A run this run's assistant asked (a delegate tool call, docs/delegation.md), as the
 *  parent's `child_run` updates and ListRuns' `parent_run` say it. */
export interface ChildInfo {
  /** The child, `workspaces/{w}/conversations/{c}/runs/{r}`. */
  run: string;
  /** The assistant that answers, or "" for a delegate that names a handler instead. */
  assistant: string;
  /** The handler that answers (`handlers/{h}`) when the delegate names one, else "". */
  handler: string;
  /** The run that asked it: the run followed, or (a grandchild and below, whose updates
   *  the followed run's stream carries too) one of its descendants. */
  parent: string;
  toolCallId: string;
  state: RunState;
  usage: Usage | undefined;
  error: string;
  /** When it started and ended (ms since the epoch), 0 while unknown. */
  startedAt: number;
  endedAt: number;
  /** What it waits for while REQUIRES_ACTION (tool calls to decide, or room in a budget),
   *  decided on the child by its name; undefined otherwise. */
  requiredAction: RequiredAction | undefined;
}

/** How many levels below the followed run a child list goes at most (a bound on walking
 *  the tree: the server's own limit on a tree's depth is far below it). */
export const MAX_TREE_DEPTH = 32;

/** Who holds a conversation (docs/delegation.md, "Handoffs"), as one thing the console
 *  saw says it, and when (ms since the epoch): the latest claim wins. */
export interface HolderClaim {
  /** `workspaces/{w}/assistants/{a}`. */
  assistant: string;
  at: number;
  /** The handoff's reason, "" when the claim is a run's routing. */
  reason: string;
  /** The run that says so. */
  run: string;
  /** The assistant that handed it over, "" when unknown. */
  from: string;
}

/** What the server's routing says when the holder answers a message that named no
 *  assistant (`Run.routing_reason`: "the assistant X, which the conversation was handed
 *  over to"). */
const ROUTED_TO_HOLDER = /which the conversation was handed over to/;

/** The holder a run's routing names: its assistant, if the conversation's holder is why
 *  it answers. */
export function holderOf(run: Run): HolderClaim | undefined {
  if (!run.assistant || !ROUTED_TO_HOLDER.test(run.routingReason)) return undefined;
  return { assistant: run.assistant, at: run.createTime ? timestampDate(run.createTime).getTime() : 0, reason: "", run: run.name, from: "" };
}

/** Where a steer went: the run it steered, what became of it, and at which step. */
export interface Landing {
  /** The steer's own run. */
  steerRun: string;
  /** The run it steered. */
  target: string;
  state: SteerState;
  step: number;
}

export function steerStateName(state: SteerState): string {
  return `STEER_STATE_${SteerState[state] ?? "UNSPECIFIED"}`;
}

/** A stretch of the answer one delta update wrote: its sequences and how much text. */
interface Piece {
  first: string;
  last: string;
  length: number;
}

/** What a reload keeps of a run still going: enough to resume after its last sequence. */
interface Saved {
  lastSequence: string;
  text: string;
  deltas: number;
  state: number;
  timeline: TimelineEntry[];
  pieces?: Piece[];
}

const SAVED = "switchboard.console.run:";

/** Forgets every run's kept timeline (signed out: the next user of the tab sees none). */
export function forgetRuns(storage: Storage): void {
  for (const key of Object.keys(storage)) if (key.startsWith(SAVED)) storage.removeItem(key);
}

function usageLine(usage: Usage): string {
  const parts = [`${usage.inputTokens} in / ${usage.outputTokens} out tokens${usage.estimated ? " (estimated)" : ""}`];
  parts.push(usageCost(usage, 6));
  if (usage.model) parts.push(usage.model);
  if (usage.budgetLoweredCalls) parts.push(limitedLabel(usage));
  return parts.join(" · ");
}

/** Who else follows a run's updates (push-to-talk plays its speech). */
export interface RunListener {
  /** An update, once, in order, after the view applied it. */
  update(update: RunUpdate, view: RunView): void;
  /** The view stopped following (another conversation opened, or signed out). */
  closed(): void;
}

/** Speech updates kept for a listener that comes after them (a run followed from the
 *  feed before SendMessage answered); the rest are dropped. */
const MAX_EARLY_SPEECH = 256;

/** Each attempt at a run numbers its updates in its own block of 2^32 sequences. */
const ATTEMPT_BITS = 32n;

export const TERMINAL = new Set([
  RunState.SUCCEEDED,
  RunState.FAILED,
  RunState.CANCELLED,
  RunState.DEADLINE_EXCEEDED,
]);

/** What a run says it waits behind, while it is QUEUED: the server clears the note when
 *  the run leaves QUEUED, and a snapshot from before that must not outlive it here. */
function queuedNote(run: Run): QueuedBehind | undefined {
  return run.state === RunState.QUEUED && run.queuedBehind?.run ? run.queuedBehind : undefined;
}

/** A run's id as the page abbreviates it (its first 8 characters), for a line that names it. */
export function shortRun(name: string): string {
  return name.split("/").pop()?.slice(0, 8) ?? "";
}

export function stateName(state: RunState): string {
  return `RUN_STATE_${RunState[state] ?? "UNSPECIFIED"}`;
}

/** The first sequence an update covers: a merged delta's firstSequence (WatchRun's
 *  merge_deltas: the deltas ready together as one), else its own sequence. */
export function firstSequence(update: RunUpdate): bigint {
  return update.firstSequence || update.sequence;
}

/** How many sequences are missing between the last seen and `update`: none when it
 *  follows (merged or not), when it opens a newer attempt's block, and for a state change
 *  (it carries the whole run: a snapshot standing for the updates no longer kept). */
export function missing(last: bigint, update: RunUpdate): bigint {
  const first = firstSequence(update);
  if (first <= last + 1n || update.update.case === "stateChange") return 0n;
  if (first >> ATTEMPT_BITS > last >> ATTEMPT_BITS) return 0n;
  return first - last - 1n;
}

/** How many updates `update` stands for: a merged delta its range, any other one. */
function covered(update: RunUpdate): number {
  return Number(update.sequence - firstSequence(update)) + 1;
}

export class RunView {
  state: RunState = RunState.QUEUED;
  run: Run | undefined;
  text = "";
  deltas = 0;
  lastSequence = 0n;
  /** Sequences that never came (`missing`: a delta of another replica's run lost on the way). */
  missed = 0;
  progress = "";
  calls: ToolCall[] = [];
  results: ToolResult[] = [];
  /** The inspector's timeline: state changes, text (deltas folded), tool calls and their
   *  results with durations, approvals and who gave them, usage and cost. */
  timeline: TimelineEntry[] = [];
  usage: Usage | undefined;
  /** The runs its delegate tool calls started, in the order they started, by name. */
  readonly children = new Map<string, ChildInfo>();
  /** The runs below its children (grandchildren and deeper), by name: each run forwards
   *  its children's `child_run` updates up the tree, naming the run that asked each
   *  (`ChildRun.parent`), so this run's stream shows the whole tree and its pauses. */
  readonly descendants = new Map<string, ChildInfo>();
  /** The handoffs its assistant made (docs/delegation.md, "Handoffs"), in order: the last
   *  one names who holds the conversation after this run. */
  handoffs: HandoffInfo[] = [];
  /** The steers this run was handed (SteerUpdate), by the steer's own run, as last said. */
  readonly steers = new Map<string, SteerUpdate>();
  /** While QUEUED behind another run of its conversation: that run, its state, why and until
   *  when (a run waiting for a person's approval holds the conversation for up to the
   *  approval timeout, which without a word looks like a stuck run). From the run's
   *  snapshots and its `queued_behind` updates; undefined once it waits behind nothing. */
  queuedBehind: QueuedBehind | undefined;
  /** Deltas found void (a model call cut by a RESTART_STREAM steer) and dropped from `text`. */
  discarded = 0;
  /** The current attempt's delta updates, in order: what to cut when deltas turn void. */
  private pieces: Piece[] = [];
  /** Speech updates received, and the audio's length they said (SpeechChunk.duration_ms). */
  speechChunks = 0;
  speechMs = 0;
  private readonly listeners = new Set<RunListener>();
  /** Speech that came before anyone listened, replayed to the first listener. */
  private early: RunUpdate[] = [];
  /** Decisions already on the timeline, `id=decision`. */
  private readonly decided = new Set<string>();
  private lastStateAt = 0;
  /** Times the watch was reopened after a drop. */
  resumes = 0;
  live = false;
  problem: Problem | undefined;
  private readonly stopper = new AbortController();

  constructor(
    readonly name: string,
    private readonly changed: (view: RunView) => void,
    private readonly storage: Storage | null = null,
  ) {
    // A reload while it ran: what the page had, and the sequence to resume after.
    const raw = storage?.getItem(SAVED + name);
    if (raw) {
      try {
        const saved = JSON.parse(raw) as Saved;
        this.lastSequence = BigInt(saved.lastSequence);
        this.text = saved.text;
        this.deltas = saved.deltas;
        this.state = saved.state as RunState;
        this.timeline = saved.timeline;
        this.pieces = saved.pieces ?? [];
        // A reload resumes after the last update seen: its handoffs are only in the timeline.
        this.handoffs = saved.timeline.filter((e) => e.kind === "handoff").map((e) => ({ from: e.from ?? "", to: e.to ?? "", reason: e.detail, at: e.at }));
        this.restored = true;
      } catch {
        storage?.removeItem(SAVED + name);
      }
    }
  }

  /** Whether the view began from what a reload kept. */
  restored = false;
  /** The sequence the first WatchRun of this page asked to resume after. */
  firstAfter = "";

  private save(): void {
    if (this.storage === null) return;
    if (this.terminal) {
      this.storage.removeItem(SAVED + this.name);
      return;
    }
    const saved: Saved = {
      lastSequence: String(this.lastSequence),
      text: this.text,
      deltas: this.deltas,
      state: this.state,
      timeline: this.timeline,
      pieces: this.pieces,
    };
    try {
      this.storage.setItem(SAVED + this.name, JSON.stringify(saved));
    } catch {
      // Storage full: a reload replays the run from its start instead.
    }
  }

  private add(entry: TimelineEntry): void {
    this.timeline.push(entry);
  }

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
          else this.firstAfter = String(this.lastSequence);
          return api.dispatcher.watchRun(
            // Merged deltas: a card that is behind (a run replayed, a busy tab) takes fewer frames.
            { name: this.name, afterSequence: this.lastSequence, mergeDeltas: true },
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
    for (const listener of [...this.listeners]) listener.closed();
    this.listeners.clear();
  }

  /** Follows this run's updates from now on (and the speech that came before, if no one
   *  listened yet). */
  listen(listener: RunListener): void {
    this.listeners.add(listener);
    const early = this.early;
    this.early = [];
    for (const update of early) listener.update(update, this);
  }

  unlisten(listener: RunListener): void {
    this.listeners.delete(listener);
  }

  /** A state the console learned elsewhere (an event, a CancelRun answer). */
  adopt(run: Run): void {
    if (run.lastSequence < this.lastSequence) return;
    this.run = run;
    this.state = run.state;
    this.queuedBehind = queuedNote(run);
    this.noteDecisions(run, Date.now(), String(this.lastSequence));
    this.changed(this);
  }

  /** Decisions made on the run's pending calls, each once, with who made them. */
  private noteDecisions(run: Run, at: number, sequence: string): void {
    for (const pending of run.requiredAction?.toolCalls ?? []) {
      const id = pending.call?.id ?? "";
      if (pending.decision === ToolApprovalDecision.UNSPECIFIED) continue;
      const key = `${id}=${pending.decision}`;
      if (this.decided.has(key) || this.timeline.some((e) => e.kind === "approval" && e.id === id)) continue;
      this.decided.add(key);
      // A call marked done says what the model was given as its result; the others why.
      const said = pending.decision === ToolApprovalDecision.COMPLETE ? pending.resultText : pending.reason;
      this.add({
        kind: "approval",
        sequence,
        at: pending.decideTime ? timestampDate(pending.decideTime).getTime() : at,
        label: pending.outcomeUnknown ? `outcome unknown: ${decisionLabel(pending.decision)}` : decisionLabel(pending.decision),
        detail: `${pending.call?.functionName || pending.call?.tool || id}${said ? `: ${said}` : ""}`,
        id,
        by: pending.decidedBy,
        decision: `TOOL_APPROVAL_DECISION_${ToolApprovalDecision[pending.decision] ?? "UNSPECIFIED"}`,
      });
    }
  }

  apply(update: RunUpdate): void {
    if (update.sequence <= this.lastSequence) return; // seen before the stream was reopened
    // Each attempt numbers its updates in its own block of 2^32. A watch resumed on a
    // restarted server may open a newer attempt with a snapshot of the run rather than
    // its QUEUED change: the first update of a newer block starts the answer over.
    if (update.sequence >> ATTEMPT_BITS > this.lastSequence >> ATTEMPT_BITS) {
      this.text = "";
      this.deltas = 0;
      this.pieces = [];
    }
    const recovered = update.sequence >> ATTEMPT_BITS > this.lastSequence >> ATTEMPT_BITS && this.lastSequence > 0n;
    if (recovered) {
      this.add({ kind: "attempt", sequence: String(update.sequence), at: 0, label: "new attempt", detail: "the run was recovered after a restart" });
    }
    this.missed += Number(missing(this.lastSequence, update));
    this.lastSequence = update.sequence;
    const at = update.time ? timestampDate(update.time).getTime() : 0;
    const sequence = String(update.sequence);
    const change = update.update;
    this.record(change, at, sequence, covered(update));
    switch (change.case) {
      case "stateChange": {
        const run = change.value.run;
        if (run === undefined) break;
        // A recovered run starts over from QUEUED: so does its answer.
        if (run.state === RunState.QUEUED && this.state !== RunState.QUEUED) {
          this.text = "";
          this.deltas = 0;
          this.pieces = [];
        }
        // The QUEUED change a run's stream opens with was stored before the scheduler
        // took the run, so it carries no note: the one SendMessage answered with stays
        // until the stream's own `queued_behind` update (a card's line would flicker).
        const kept = run.state === RunState.QUEUED && this.state === RunState.QUEUED && !recovered ? this.queuedBehind : undefined;
        this.run = run;
        this.state = run.state;
        this.queuedBehind = queuedNote(run) ?? kept;
        break;
      }
      case "queuedBehind":
        // An empty note: it waits behind no run of its conversation now (only for room).
        this.queuedBehind = this.state === RunState.QUEUED && change.value.run ? change.value : undefined;
        break;
      case "delta":
        this.text += change.value.text;
        this.deltas += covered(update);
        this.pieces.push({ first: String(firstSequence(update)), last: sequence, length: change.value.text.length });
        break;
      case "childRun":
        this.child(change.value, at);
        break;
      case "handoff":
        this.handoffs.push({ from: change.value.fromAssistant, to: change.value.toAssistant, reason: change.value.reason, at });
        break;
      case "steer":
        this.steers.set(change.value.steerRun, change.value);
        if (change.value.discardedFromSequence > 0n) this.discard(change.value.discardedFromSequence, sequence, at);
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
      case "speech":
        this.speechChunks += 1;
        this.speechMs += change.value.durationMs;
        if (this.listeners.size === 0 && this.early.length < MAX_EARLY_SPEECH) this.early.push(update);
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
    this.save();
    this.changed(this);
    for (const listener of [...this.listeners]) listener.update(update, this);
  }

  /** A child started or ended: what the update says, over what was known of it. The
   *  start and end updates' times are its duration when ListRuns has not said better. */
  private child(update: ChildRun, at: number): void {
    const own = this.asks(update.parent);
    const tree = own ? this.children : this.descendants;
    const known = tree.get(update.run);
    const ended = TERMINAL.has(update.state);
    // An update replayed after a later one (a resumed watch never does; ListRuns may
    // have told the end first) does not take an ended child back.
    if (known && TERMINAL.has(known.state) && !ended) return;
    // A run that asked is running (a child's own updates say QUEUED at its start, then
    // nothing until it pauses or ends): its row does not stay "queued" above its child.
    const asker = own ? undefined : this.children.get(update.parent) ?? this.descendants.get(update.parent);
    if (asker?.state === RunState.QUEUED) asker.state = RunState.RUNNING;
    tree.set(update.run, {
      run: update.run,
      assistant: update.assistant || known?.assistant || "",
      handler: update.handler || known?.handler || "",
      parent: own ? this.name : update.parent,
      toolCallId: update.toolCallId || known?.toolCallId || "",
      state: update.state,
      usage: update.usage ?? known?.usage,
      error: update.error?.message ?? known?.error ?? "",
      startedAt: known?.startedAt || (ended ? 0 : at),
      endedAt: known?.endedAt || (ended ? at : 0),
      requiredAction: update.state === RunState.REQUIRES_ACTION ? update.requiredAction : undefined,
    });
  }

  /** A decision's answer for a paused child (SubmitToolApprovals on it): the calls it
   *  decided show as decided while others still wait. Its state stays what this run's
   *  updates say (a RUNNING that came first is not taken back by the answer). */
  adoptChildDecision(child: Run): void {
    const known = this.children.get(child.name) ?? this.descendants.get(child.name);
    if (!known || known.state !== RunState.REQUIRES_ACTION || child.state !== RunState.REQUIRES_ACTION) return;
    known.requiredAction = child.requiredAction;
    this.changed(this);
  }

  /** The children as the server lists them (ListRuns `parent_run`): a run opened after its
   *  children started (a reload, an earlier run inspected, a child expanded) has not seen
   *  their start updates. Runs a child asked (listed below it) are its descendants. */
  adoptChildren(runs: Run[]): void {
    const ms = (t: Run["startTime"]): number => (t ? timestampDate(t).getTime() : 0);
    const sorted = [...runs].sort((a, b) => ms(a.createTime) - ms(b.createTime));
    for (const run of sorted) {
      const own = this.asks(run.parent);
      const tree = own ? this.children : this.descendants;
      const known = tree.get(run.name);
      // An end the updates told wins over a listing made before it.
      if (known && TERMINAL.has(known.state) && !TERMINAL.has(run.state)) continue;
      tree.set(run.name, {
        run: run.name,
        assistant: run.assistant || known?.assistant || "",
        // A run of no assistant is a handler's, asked directly (AssistantDelegate.handler).
        handler: run.assistant ? "" : run.handler || known?.handler || "",
        parent: own ? this.name : run.parent,
        toolCallId: run.parentToolCall || known?.toolCallId || "",
        state: run.state,
        usage: run.usage ?? known?.usage,
        error: run.error?.message ?? known?.error ?? "",
        startedAt: ms(run.startTime) || ms(run.createTime) || known?.startedAt || 0,
        endedAt: ms(run.endTime) || known?.endedAt || 0,
        requiredAction: run.state === RunState.REQUIRES_ACTION ? run.requiredAction : undefined,
      });
    }
    this.changed(this);
  }

  /** Whether this run asked the child `parent` names: an update of an older server names
   *  no parent (and its stream carries no grandchildren). */
  private asks(parent: string): boolean {
    return parent === "" || parent === this.name;
  }

  /** The runs `run` asked, as far as this view knows: its own children for itself, the
   *  descendants that name it for a run below. */
  asked(run: string): ChildInfo[] {
    if (run === this.name) return [...this.children.values()];
    return [...this.descendants.values()].filter((c) => c.parent === run);
  }

  /** How far below this run `run` is (1 for a child), walking up through the runs that
   *  asked; a run not known here counts as a child. */
  levelOf(run: string): number {
    let level = 1;
    for (let at = this.descendants.get(run); at !== undefined && level < MAX_TREE_DEPTH; at = this.descendants.get(at.parent)) level += 1;
    return level;
  }

  /** A model call was cut to take a steer (RESTART_STREAM): its deltas, from `from` on, are
   *  void. They are the last ones written, so the answer (and the timeline's text) loses
   *  its tail. A merged delta that began before `from` is kept whole: its split is not
   *  known, and the run's final result, which carries the whole answer, replaces it. */
  private discard(from: bigint, sequence: string, at: number): void {
    let cut = 0;
    let count = 0;
    while (this.pieces.length) {
      const piece = this.pieces[this.pieces.length - 1];
      if (piece === undefined || BigInt(piece.first) < from) break;
      this.pieces.pop();
      cut += piece.length;
      count += Number(BigInt(piece.last) - BigInt(piece.first)) + 1;
    }
    if (count === 0) return;
    this.text = this.text.slice(0, Math.max(0, this.text.length - cut));
    this.deltas = Math.max(0, this.deltas - count);
    this.discarded += count;
    // The timeline's text entries lose the same tail, newest first.
    let left = cut;
    for (let i = this.timeline.length - 1; i >= 0 && left > 0; i--) {
      const entry = this.timeline[i];
      if (entry === undefined || entry.kind === "attempt") break;
      if (entry.kind !== "text") continue;
      const keep = Math.max(0, entry.detail.length - left);
      left -= entry.detail.length - keep;
      entry.detail = entry.detail.slice(0, keep);
    }
    this.timeline = this.timeline.filter((e) => e.kind !== "text" || e.detail !== "" || e.count === 0);
    this.add({
      kind: "discarded",
      sequence,
      at,
      label: "answer restarted",
      detail: `${count} ${count === 1 ? "delta" : "deltas"} from sequence ${from} void: the model call was cut to take a steer and made again`,
      count,
    });
  }

  private record(change: RunUpdate["update"], at: number, sequence: string, deltas: number): void {
    const last = this.timeline[this.timeline.length - 1];
    switch (change.case) {
      case "stateChange": {
        const run = change.value.run;
        if (!run) return;
        const ms = this.lastStateAt && at ? at - this.lastStateAt : undefined;
        if (at) this.lastStateAt = at;
        const detail = run.state === RunState.QUEUED && run.routingReason ? run.routingReason : run.error?.message ?? "";
        this.add({ kind: "state", sequence, at, label: runLabel(run), detail, state: stateName(run.state), ...(ms !== undefined ? { ms } : {}) });
        this.noteDecisions(run, at, sequence);
        if (run.usage && TERMINAL.has(run.state) && !this.timeline.some((e) => e.kind === "usage") && (run.usage.inputTokens || run.usage.outputTokens || run.usage.estimatedCostUsd)) {
          this.usage = run.usage;
          this.add({ kind: "usage", sequence, at, label: "usage", detail: usageLine(run.usage) });
        }
        return;
      }
      case "delta":
        // Deltas fold into the text they write: one entry per stretch of text.
        if (last?.kind === "text") {
          last.detail += change.value.text;
          last.count = (last.count ?? 1) + deltas;
        } else {
          this.add({ kind: "text", sequence, at, label: "text", detail: change.value.text, count: deltas });
        }
        return;
      case "progress":
        this.add({ kind: "progress", sequence, at, label: "progress", detail: change.value.stage });
        return;
      case "childRun": {
        const child = change.value;
        const ended = TERMINAL.has(child.state);
        // Started, paused (what it waits for), went on after a pause, or ended.
        const seen = this.timeline.some((e) => e.kind === "child" && e.id === child.run);
        // A grandchild (or deeper) is named as such, with the run that asked it (whose
        // start came first, so it is known here).
        const own = this.asks(child.parent);
        const level = own ? 1 : this.levelOf(child.parent) + 1;
        const who = level === 1 ? "child" : level === 2 ? "grandchild" : "descendant";
        const asker = own ? undefined : this.children.get(child.parent) ?? this.descendants.get(child.parent);
        const askerId = asker ? (asker.assistant || asker.handler).split("/").pop() ?? "" : "";
        this.add({
          kind: "child",
          sequence,
          at,
          label:
            ended || child.state === RunState.REQUIRES_ACTION
              ? `${who} run ${waitingLabel(child.state, child.requiredAction)}`
              : seen
                ? `${who} run going on`
                : `${who} run started`,
          detail: `${(child.assistant || child.handler).split("/").pop() ?? ""}${askerId ? ` (asked by ${askerId})` : ""}${ended && child.error?.message ? `: ${child.error.message}` : ""}`,
          id: child.run,
          state: stateName(child.state),
          ...(own ? {} : { parent: child.parent }),
        });
        return;
      }
      case "queuedBehind": {
        const behind = change.value;
        this.add({
          kind: "queued",
          sequence,
          at,
          label: behind.run ? `waiting behind run ${shortRun(behind.run)}` : "waiting behind no run now",
          detail: behind.reason,
          ...(behind.run ? { id: behind.run } : {}),
        });
        return;
      }
      case "handoff":
        this.add({
          kind: "handoff",
          sequence,
          at,
          label: `handed the conversation to ${change.value.toAssistant.split("/").pop() ?? ""}`,
          detail: change.value.reason,
          from: change.value.fromAssistant,
          to: change.value.toAssistant,
        });
        return;
      case "steer": {
        const steer = change.value;
        const consumed = steer.state === SteerState.CONSUMED && steer.step > 0;
        this.add({
          kind: "steer",
          sequence,
          at,
          label: consumed ? `${steerLabel(steer.state)} at step ${steer.step}` : steerLabel(steer.state),
          detail:
            steer.state === SteerState.REQUEUED
              ? "this run ended before taking it: it runs on its own and answers the message"
              : steer.state === SteerState.ACCEPTED
                ? "waiting for this run's next step"
                : "",
          id: steer.steerRun,
          steerState: steerStateName(steer.state),
          ...(consumed ? { step: steer.step } : {}),
          message: steer.message,
        });
        return;
      }
      case "speech": {
        // A sentence's chunks fold into one entry: its text, how many, how long.
        const chunk = change.value;
        const segment = String(chunk.segment);
        if (last?.kind === "speech" && last.id === segment) {
          last.count = (last.count ?? 1) + 1;
          last.ms = (last.ms ?? 0) + chunk.durationMs;
          if (!last.detail && chunk.text) last.detail = chunk.text;
        } else {
          this.add({ kind: "speech", sequence, at, label: "speech", detail: chunk.text, count: 1, ms: chunk.durationMs, id: segment });
        }
        return;
      }
      case "toolCall": {
        const call = change.value;
        this.add({
          kind: "tool-call",
          sequence,
          at,
          label: call.requiresApproval ? "tool call (needs approval)" : "tool call",
          detail: `${call.functionName || call.tool}(${call.invalidArguments || jsonText(call.arguments)})`,
          id: call.id,
        });
        return;
      }
      case "toolResult": {
        const result = change.value;
        this.add({
          kind: "tool-result",
          sequence,
          at,
          label: `result: ${outcomeLabel(result.outcome)}`,
          detail: result.text || (result.result ? jsonText(result.result) : ""),
          ms: result.duration ? durationMs(result.duration) : 0,
          id: result.id,
          outcome: `TOOL_OUTCOME_${ToolOutcome[result.outcome] ?? ""}`,
        });
        return;
      }
      case "result": {
        // A run watched after it ended may have no deltas to replay (the durable log need
        // not keep them): its text comes from the result then.
        const since = this.timeline.map((e) => e.kind).lastIndexOf("attempt");
        if (!this.timeline.slice(since + 1).some((e) => e.kind === "text")) {
          const whole = change.value.parts.map((part) => (part.part.case === "text" ? part.part.value : "")).join("");
          if (whole) this.add({ kind: "text", sequence, at, label: "text", detail: whole, count: 0 });
        }
        const usage = change.value.usage;
        if (usage) {
          this.usage = usage;
          this.add({ kind: "usage", sequence, at, label: "usage", detail: usageLine(usage) });
        }
        return;
      }
      default:
        return;
    }
  }
}
