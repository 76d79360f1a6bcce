// Live events: EventService.Subscribe (a server stream: browsers cannot stream upward),
// reopened after every drop from the last cursor it saw, so nothing is lost and, with the
// event ids remembered, nothing is shown twice.
//
// The cursor advances with each batch (EventBatch.cursor) and each heartbeat
// (Heartbeat.cursor, which also covers other scopes' events). The first frame of every
// stream is a heartbeat: that is when the feed is live again.
//
// It asks for merged deltas: a run's consecutive text deltas delivered together come as
// one event, the last one's, whose update covers firstSequence .. sequence. One id then
// stands for several deltas, so a delta its run's deltas shown already covered is dropped
// too (a resume on another replica sends them again one by one, under ids not seen here).
import { Code } from "@connectrpc/connect";
import type { Api } from "./api";
import { backoff, pause } from "./dom";
import { type Problem, isCode, problem } from "./errors";
import type { Event, Scope } from "./gen/switchboard/api/events/v1/events_pb";
import { isSignedOut, wantsRenewal } from "./session";

export type FeedState = "connecting" | "live" | "reconnecting" | "stopped";

/** Ids remembered for deduplication (a replay never reaches further back than this). */
const SEEN_LIMIT = 10_000;

export interface FeedHandlers {
  events(events: Event[]): void;
  state(state: FeedState, detail?: Problem): void;
  /** The cursor fell out of the retained log: events in between are gone. */
  gap(problem: Problem): void;
  /** A frame moved the cursor. */
  cursor(cursor: string): void;
}

export class EventFeed {
  /** Where the next stream resumes (the last cursor seen). */
  cursor: string;
  /** The cursor of the first heartbeat: where this feed started. */
  firstCursor = "";
  /** The cursor each reopened stream resumed after, in order. */
  readonly resumedFrom: string[] = [];
  duplicates = 0;
  state: FeedState = "connecting";
  private readonly seen = new Set<string>();
  /** Each run's last delta sequence shown, oldest run first. */
  private readonly deltas = new Map<string, bigint>();
  private readonly stopper = new AbortController();

  constructor(
    private readonly api: Api,
    readonly scopes: Scope[],
    after: string,
    private readonly handlers: FeedHandlers,
    seen: Iterable<string> = [],
  ) {
    this.cursor = after;
    for (const id of seen) this.remember(id);
  }

  get ids(): Iterable<string> {
    return this.seen;
  }

  start(): this {
    void this.run();
    return this;
  }

  stop(): void {
    this.stopper.abort();
    this.setState("stopped");
  }

  private async run(): Promise<void> {
    const stop = this.stopper.signal;
    let attempt = 0;
    let renewed = false;
    let opened = 0;
    while (!stop.aborted) {
      let used = "";
      try {
        used = await this.api.tokens.token();
        if (opened++ > 0) this.resumedFrom.push(this.cursor);
        const stream = this.api.events.subscribe(
          { scopes: this.scopes, afterCursor: this.cursor, mergeDeltas: true },
          { signal: stop, timeoutMs: 0, headers: { authorization: `Bearer ${used}` } },
        );
        for await (const response of stream) {
          const frame = response.frame;
          if (frame.case === "heartbeat") {
            if (frame.value.cursor) this.cursor = frame.value.cursor;
            if (!this.firstCursor) this.firstCursor = this.cursor;
            attempt = 0;
            renewed = false;
            this.setState("live");
          } else if (frame.case === "batch") {
            const fresh = frame.value.events.filter((event) => this.newDelta(event) && this.remember(event.id));
            this.duplicates += frame.value.events.length - fresh.length;
            if (fresh.length) this.handlers.events(fresh);
            if (frame.value.cursor) this.cursor = frame.value.cursor;
          }
          this.handlers.cursor(this.cursor);
        }
        // The server ended the stream (it is draining): reopen, elsewhere, after a short pause.
      } catch (error) {
        if (stop.aborted) return;
        const next = await this.recover(error, used, renewed);
        if (next === "stop") return;
        if (next === "renewed") {
          renewed = true;
          continue;
        }
        if (next === "resume") continue;
      }
      if (this.state === "live") this.setState("reconnecting");
      await pause(backoff(attempt++), stop);
    }
  }

  /** What to do after a failed stream: reopen now, back off first, or stop. */
  private async recover(error: unknown, used: string, renewed: boolean): Promise<"stop" | "renewed" | "resume" | "backoff"> {
    if (isSignedOut(error)) {
      this.setState("stopped");
      return "stop";
    }
    const p = problem(error);
    if (wantsRenewal(error) && !renewed) {
      // Once per opening: a token refused right after its renewal means the session is over.
      try {
        await this.api.tokens.renew(used);
        return "renewed";
      } catch (failure) {
        if (isSignedOut(failure)) {
          this.setState("stopped");
          return "stop";
        }
        this.setState("reconnecting", problem(failure));
        return "backoff";
      }
    }
    if (isCode(p, Code.Unauthenticated)) {
      this.api.tokens.end("the server ended the session", p);
      this.setState("stopped", p);
      return "stop";
    }
    // Expired (trimmed) or ahead (another deployment's, a reset log): from the oldest kept.
    const lost = p.reason === "ERROR_REASON_CURSOR_EXPIRED" || p.reason === "ERROR_REASON_CURSOR_AHEAD";
    if (lost && p.metadata.oldest_cursor) {
      this.handlers.gap(p);
      this.cursor = p.metadata.oldest_cursor;
      return "resume";
    }
    if (p.reason === "ERROR_REASON_SUBSCRIBER_TOO_SLOW" && p.metadata.resume_cursor) {
      this.cursor = p.metadata.resume_cursor;
      return "resume";
    }
    if (p.wire && !retryable(p)) {
      // No access (NOT_FOUND), a bad request: reopening would get the same answer.
      this.setState("stopped", p);
      return "stop";
    }
    this.setState("reconnecting", p);
    return "backoff";
  }

  /** False for a run's text delta at or before the last one of its run shown. */
  private newDelta(event: Event): boolean {
    if (event.payload.case !== "runUpdated") return true;
    const update = event.payload.value.update;
    if (update?.update.case !== "delta") return true;
    if (update.sequence <= (this.deltas.get(update.run) ?? 0n)) return false;
    this.deltas.delete(update.run);
    this.deltas.set(update.run, update.sequence);
    if (this.deltas.size > SEEN_LIMIT) {
      const oldest = this.deltas.keys().next();
      if (!oldest.done) this.deltas.delete(oldest.value);
    }
    return true;
  }

  private remember(id: string): boolean {
    if (this.seen.has(id)) return false;
    this.seen.add(id);
    if (this.seen.size > SEEN_LIMIT) {
      const oldest = this.seen.values().next();
      if (!oldest.done) this.seen.delete(oldest.value);
    }
    return true;
  }

  private setState(state: FeedState, detail?: Problem): void {
    if (this.state === state && detail === undefined) return;
    this.state = state;
    this.handlers.state(state, detail);
  }
}

export function retryable(p: Problem): boolean {
  return ["UNAVAILABLE", "UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"].includes(p.code);
}
