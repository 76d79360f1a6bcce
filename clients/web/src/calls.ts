// The open workspace's Calls page (`#workspaces/w/calls`): its phone calls, the live ones
// first (dialing, ringing, answered), then the recent ones, newest first. Each says which
// way it went, from which number to which, its state, the assistant that answers, when it
// started, how long it has lasted (ticking on the page while it is answered: no request a
// second), how it ended (the server's reason and the SIP status) and where its transcript
// is (its conversation). Editors and owners hang up a live call (EndCall); viewers read.
// Each CALL_CHANGED event of the workspace updates its call's row from the event's own
// copy of the call, or adds the call at the top: the list is not read again.
import { durationMs, timestampDate } from "@bufbuild/protobuf/wkt";
import { type Api, PAGE_SIZE } from "./api";
import { type Child, fill, h } from "./dom";
import { type Problem, problem, renderProblem } from "./errors";
import { type Call, CallDirection, CallState } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import type { Event } from "./gen/switchboard/api/events/v1/events_pb";
import { callDirectionLabel, callStateLabel } from "./labels";
import { browserZone, dateTime, needsSeconds } from "./moments";
import type { Names } from "./names";
import type { Page } from "./page";

/** The recent calls read at once (ListCalls' page; "More" reads the next). */
const RECENT = 50;
/** How often an answered call's duration moves on the page. */
const TICK_MS = 1_000;

/** A call's states in the order a call goes through them: a copy further along is newer
 *  (an event read before a list that was answered after it must not take the call back). */
const ORDER: Record<CallState, number> = {
  [CallState.UNSPECIFIED]: 0,
  [CallState.DIALING]: 1,
  [CallState.RINGING]: 2,
  [CallState.ANSWERED]: 3,
  [CallState.ENDED]: 4,
};

/** "0:07", "12:30", "1:02:03": a call's length as a clock reads it, the page's own way. */
export function callClock(ms: number): string {
  const total = Math.max(0, Math.floor(ms / 1000));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const seconds = String(total % 60).padStart(2, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${seconds}` : `${minutes}:${seconds}`;
}

function live(c: Call): boolean {
  return c.state !== CallState.ENDED;
}

function created(c: Call): number {
  return c.createTime ? timestampDate(c.createTime).getTime() : 0;
}

export class Calls {
  /** The page, in the centre column while it is open. */
  readonly element: HTMLElement;
  private readonly role = h("p", { class: "muted", "data-testid": "calls-role" });
  private readonly liveList = h("ul", { class: "list calls", "data-testid": "live-calls" });
  private readonly recentList = h("ul", { class: "list calls", "data-testid": "recent-calls" });
  private readonly moreButton = h(
    "button",
    { type: "button", "data-testid": "calls-more", hidden: true, onclick: () => void this.more() },
    "More",
  );
  private workspace = "";
  private canEnd = false;
  private visible = false;
  /** Every call shown, by name. */
  private readonly calls = new Map<string, Call>();
  /** A refused hang-up, beside its call. */
  private readonly problems = new Map<string, Problem>();
  /** The recent calls' next page, "" when there is none. */
  private nextPageToken = "";
  /** Calls the feed brought while the latest load was reading: applied again over what
   *  it read (they may be newer than the list). */
  private arriving: Call[] | null = null;
  /** Counts loads: an earlier one still reading yields to the latest. */
  private loads = 0;
  private ticker: ReturnType<typeof setInterval> | undefined;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
  ) {
    this.element = h(
      "section",
      { class: "calls-page", "data-testid": "calls-page", hidden: true },
      this.role,
      h("p", { class: "muted" }, "Phone calls into and out of this workspace, each answered by an assistant; each call's conversation is its transcript."),
      h("h3", {}, "Live calls"),
      this.liveList,
      h("h3", {}, "Recent calls"),
      this.recentList,
      this.moreButton,
    );
  }

  /** The open workspace, and whether the caller may hang up its calls (editors and
   *  owners: EndCall needs the right to write; every member reads them). */
  open(workspace: string, canEnd: boolean): void {
    if (workspace !== this.workspace) {
      this.workspace = workspace;
      this.calls.clear();
      this.problems.clear();
      this.nextPageToken = "";
    }
    this.canEnd = canEnd;
    this.role.textContent = canEnd
      ? "You can hang up this workspace's live calls."
      : "Read only: the workspace's editors and owners hang up its calls.";
    this.render();
  }

  /** Shown (the page is open) or not; opening it loads what it shows. */
  show(visible: boolean): void {
    this.visible = visible;
    this.element.hidden = !visible;
    this.tick();
    if (visible) void this.load();
  }

  async load(): Promise<void> {
    const parent = this.workspace;
    if (!parent || !this.visible) return;
    const turn = ++this.loads;
    this.arriving = [];
    await this.page.busy("list-calls", async () => {
      try {
        // The live ones on their own too: a call going on for long is older than the
        // newest page of calls.
        const [going, recent, assistants] = await Promise.all([
          this.api.dispatcher.listCalls({ parent, pageSize: PAGE_SIZE, liveOnly: true }),
          this.api.dispatcher.listCalls({ parent, pageSize: RECENT }),
          this.api.dispatcher.listAssistants({ parent, pageSize: PAGE_SIZE }),
        ]);
        if (parent !== this.workspace || turn !== this.loads) return;
        for (const a of assistants.assistants) this.names.learn(a.name, a.displayName);
        this.calls.clear();
        for (const c of [...recent.calls, ...going.calls]) this.keep(c);
        for (const c of this.arriving ?? []) this.keep(c);
        this.nextPageToken = recent.nextPageToken;
        this.render();
      } finally {
        if (turn === this.loads) this.arriving = null;
      }
    });
  }

  /** The next page of recent calls, below the ones shown. */
  private async more(): Promise<void> {
    const parent = this.workspace;
    const pageToken = this.nextPageToken;
    if (!parent || !pageToken) return;
    await this.page.busy("calls-more", async () => {
      const answer = await this.api.dispatcher.listCalls({ parent, pageSize: RECENT, pageToken });
      if (parent !== this.workspace) return;
      for (const c of answer.calls) this.keep(c);
      this.nextPageToken = answer.nextPageToken;
      this.render();
    });
  }

  /** An event from the feed: a call came, was answered or ended. */
  apply(event: Event): void {
    if (!this.visible || event.workspace !== this.workspace) return;
    const payload = event.payload;
    if (payload.case !== "callChanged" || !payload.value.call) return;
    const call = payload.value.call;
    this.arriving?.push(call);
    this.keep(call);
    this.render();
  }

  clear(): void {
    this.workspace = "";
    this.visible = false;
    this.calls.clear();
    this.problems.clear();
    this.nextPageToken = "";
    this.tick();
    this.liveList.replaceChildren();
    this.recentList.replaceChildren();
    this.moreButton.hidden = true;
  }

  /** `call` as the page's copy, unless the copy it has is further along. */
  private keep(call: Call): void {
    const known = this.calls.get(call.name);
    if (known && ORDER[known.state] > ORDER[call.state]) return;
    this.calls.set(call.name, call);
  }

  // -- The lists --------------------------------------------------------------------------

  private render(): void {
    const all = [...this.calls.values()].sort((a, b) => created(b) - created(a));
    const going = all.filter(live);
    const ended = all.filter((c) => !live(c));
    // Seconds when any start shown together has them: calls a minute apart or less.
    const starts = all.flatMap((c) => (c.createTime ? [timestampDate(c.createTime)] : []));
    const seconds = needsSeconds(starts);
    fill(
      this.liveList,
      ...(going.length
        ? going.map((c) => this.item(c, seconds))
        : [h("li", { class: "muted", "data-testid": "live-calls-empty" }, "No call is going on.")]),
    );
    fill(
      this.recentList,
      ...(ended.length
        ? ended.map((c) => this.item(c, seconds))
        : [h("li", { class: "muted", "data-testid": "recent-calls-empty" }, "No ended calls yet.")]),
    );
    this.moreButton.hidden = !this.nextPageToken;
    this.tick();
  }

  private item(c: Call, seconds: boolean): HTMLElement {
    const start = c.createTime ? timestampDate(c.createTime) : undefined;
    const answered = c.answerTime ? timestampDate(c.answerTime) : undefined;
    const zone = browserZone();
    const state = `CALL_STATE_${CallState[c.state] ?? "UNSPECIFIED"}`;
    const stateClass = c.state === CallState.ENDED ? "s-cancelled" : c.state === CallState.ANSWERED ? "s-running" : "s-requires_action";
    const problemHere = this.problems.get(c.name);
    return h(
      "li",
      {
        class: `call ${live(c) ? "live" : "ended"}`,
        "data-testid": "call",
        "data-name": c.name,
        "data-state": state,
        "data-direction": `CALL_DIRECTION_${CallDirection[c.direction] ?? "UNSPECIFIED"}`,
        "data-conversation": c.conversation,
        "data-sip-status": String(c.sipStatus),
      },
      h(
        "div",
        { class: "row" },
        h("strong", { "data-testid": "call-direction" }, callDirectionLabel(c.direction)),
        h(
          "span",
          { "data-testid": "call-numbers" },
          h("span", { "data-content": true, "data-testid": "call-from" }, c.fromNumber || "unknown number"),
          " → ",
          h("span", { "data-content": true, "data-testid": "call-to" }, c.toNumber || "unknown number"),
        ),
        h("span", { class: `state ${stateClass}`, "data-testid": "call-state" }, callStateLabel(c.state)),
      ),
      h(
        "div",
        { class: "muted" },
        h("span", { "data-testid": "call-assistant", "data-assistant": c.assistant }, `assistant ${this.assistantTitle(c.assistant)}`),
        start ? h("span", {}, " · started ", h("time", { datetime: start.toISOString(), "data-testid": "call-started" }, dateTime(start, zone, seconds)), ` (${zone})`) : null,
        c.tls || c.srtp
          ? h("span", { "data-testid": "call-security", "data-tls": String(c.tls), "data-srtp": String(c.srtp) }, ` · ${callProtectionLabel(c)}`)
          : null,
      ),
      h("div", {}, this.duration(c, answered)),
      c.state === CallState.ENDED ? this.ending(c) : null,
      problemHere ? this.problemBox(problemHere) : null,
      h(
        "div",
        { class: "row" },
        c.conversation
          ? h("a", { href: `#${c.conversation}`, "data-testid": "call-conversation", title: c.conversation }, "Transcript")
          : h("span", { class: "muted" }, "No transcript yet"),
        this.canEnd && live(c)
          ? h("button", { type: "button", class: "danger", "data-testid": "hang-up-call", onclick: (e: globalThis.Event) => void this.hangUp(c, e) }, "Hang up")
          : null,
      ),
    );
  }

  private problemBox(p: Problem): HTMLElement {
    const box = renderProblem(p, "error");
    box.dataset.action = "hang-up-call";
    return box;
  }

  private assistantTitle(assistant: string): string {
    if (!assistant) return "none";
    // One the page has not listed (deleted since): its id.
    return this.names.knows(assistant) ? this.names.title(assistant) : (assistant.split("/").pop() ?? assistant);
  }

  /** How long it lasted: ticking from its answer while it is answered; ended, the
   *  server's `duration` (answer to end). */
  private duration(c: Call, answered: Date | undefined): Child {
    if (c.state === CallState.ANSWERED && answered) {
      const since = answered.getTime();
      return h(
        "span",
        { "data-testid": "call-duration", "data-since": String(since), "data-live": "true" },
        `on the line for ${callClock(Date.now() - since)}`,
      );
    }
    if (c.state === CallState.ENDED) {
      const ms = c.duration ? durationMs(c.duration) : 0;
      return answered
        ? h("span", { "data-testid": "call-duration", "data-seconds": String(Math.round(ms / 1000)) }, `lasted ${callClock(ms)}`)
        : h("span", { "data-testid": "call-duration", "data-seconds": "0" }, "never answered");
    }
    return h("span", { "data-testid": "call-duration" }, "not answered yet");
  }

  /** How it ended: the server's reason (its words, quoted) and the SIP status. */
  private ending(c: Call): HTMLElement {
    return h(
      "div",
      { class: "muted", "data-testid": "call-ended", "data-sip-status": String(c.sipStatus) },
      "Ended",
      c.endReason ? h("span", {}, ": ", h("q", { "data-content": true, "data-testid": "call-end-reason" }, c.endReason)) : null,
      c.sipStatus ? ` (SIP ${c.sipStatus})` : null,
      c.endTime ? h("span", {}, " at ", h("time", { datetime: timestampDate(c.endTime).toISOString() }, dateTime(timestampDate(c.endTime), browserZone(), true))) : null,
    );
  }

  /** The answered calls' durations move once a second while the page is shown; the
   *  timer runs only then. */
  private tick(): void {
    const ticking = this.visible && [...this.calls.values()].some((c) => c.state === CallState.ANSWERED);
    if (!ticking) {
      clearInterval(this.ticker);
      this.ticker = undefined;
      return;
    }
    this.ticker ??= setInterval(() => {
      const now = Date.now();
      for (const shown of this.liveList.querySelectorAll<HTMLElement>('[data-testid="call-duration"][data-live]')) {
        shown.textContent = `on the line for ${callClock(now - Number(shown.dataset.since))}`;
      }
    }, TICK_MS);
  }

  private async hangUp(c: Call, event: globalThis.Event): Promise<void> {
    const button = event.currentTarget as HTMLButtonElement;
    button.disabled = true;
    try {
      const answer = await this.api.dispatcher.endCall({ name: c.name });
      this.problems.delete(c.name);
      // Ended on the record, or still answered until its line is down (an event says so).
      if (answer.call) this.keep(answer.call);
    } catch (error) {
      const p = problem(error);
      this.problems.set(c.name, p);
    } finally {
      button.disabled = false;
      this.render();
    }
  }
}

/** What protected the call: its signalling over TLS, its audio as SRTP. */
export function callProtectionLabel(c: Pick<Call, "tls" | "srtp">): string {
  return [c.tls ? "over TLS" : "", c.srtp ? "encrypted audio (SRTP)" : ""].filter(Boolean).join(", ");
}
