// The open conversation's runs, one card each (its state, the answer as it grows, its
// tool calls and results, Cancel), and the tool calls that wait for a person's decision
// (Approve, or Deny with a reason the model is told; for a call a crash left in flight, whose
// outcome is unknown: Retry, Mark done with its result, or Fail run). Each run is a RunView
// (runs.ts) following WatchRun; which runs to follow is the navigation's call. A run whose
// assistant asked others (delegation) lists its child runs, each expandable to follow
// its own stream in place, and below each the runs it asked in turn (the run's own stream
// names the whole tree); a child at any depth that waits (its tool calls, room in a
// budget) is decided right in its row, on the child, without expanding it; one whose assistant
// handed the conversation over says to whom and why, and the host hears who holds the
// conversation (the composer says so).
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { Api } from "./api";
import { learnBudgetTitles } from "./budgets";
import { fill, formatTime, h } from "./dom";
import { renderProblem } from "./errors";
import { jsonText } from "./jsontext";
import {
  type BudgetAction,
  BudgetDecision,
  type PendingToolCall,
  type RequiredAction,
  type Run,
  RunState,
  SteerState,
  ToolApprovalDecision,
} from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { ToolOutcome } from "./gen/switchboard/api/handler/v1/handler_pb";
import { counted, decisionLabel, limitedLabel, money, outcomeLabel, runLabel, runStateLabel, unpriced, usageCost, waitingLabel } from "./labels";
import type { Page } from "./page";
import type { Names } from "./names";
import {
  type ChildInfo,
  type HolderClaim,
  MAX_TREE_DEPTH,
  type Landing,
  type RunListener,
  RunView,
  TERMINAL,
  type TimelineEntry,
  forgetRuns,
  holderOf,
  shortRun,
  stateName,
  steerStateName,
} from "./runs";

/** The most a call marked done may say it returned (`ToolApproval.result_text`). */
export const MAX_RESULT_TEXT = 16_000;

/** A decision as the contracts name it (`TOOL_APPROVAL_DECISION_COMPLETE`), for data-* attributes. */
function decisionName(decision: ToolApprovalDecision): string {
  return `TOOL_APPROVAL_DECISION_${ToolApprovalDecision[decision] ?? "UNSPECIFIED"}`;
}

/** What a decision is made on, by its name: a run a card follows, or a child a card lists
 *  (docs/delegation.md: a child's pause is decided on the child), and what takes the
 *  answer (the run as it stands after the decision). A RunView is one. */
interface Decidable {
  readonly name: string;
  adopt(run: Run): void;
}

export class RunCards {
  /** The cards, then the approvals. */
  readonly elements: HTMLElement[];
  private readonly list = h("div", { "data-testid": "runs" });
  private readonly approvals = h("div", { "data-testid": "approvals" });
  /** The conversation's finished runs not shown here, each to be inspected on demand. */
  private readonly earlierList = h("div", { class: "row earlier", "data-testid": "earlier-runs" });
  private readonly runs = new Map<string, RunView>();
  private readonly cards = new Map<string, HTMLElement>();
  /** Denial reasons being typed, by tool call id. */
  private readonly reasons = new Map<string, string>();
  /** Results being typed for calls of unknown outcome ("Mark done"), by tool call id. */
  private readonly resultTexts = new Map<string, string>();
  /** Messages the conversation shows: a run whose answer is one of them shows it there only. */
  private shownMessages = new Set<string>();
  /** Budgets whose titles were asked for (GetBudget), so a failure is not asked again. */
  private readonly askedTitles = new Set<string>();
  /** Whether the caller owns the workspace (owners decide runs paused at a budget). */
  private owner = false;
  /** The conversation's branch shown (0: not read yet, every run's card shows): a run
   *  answering on another branch keeps its card, hidden, until that branch is shown. */
  private branch = 0;
  /** The finished runs offered for inspection (`earlier`), by branch as the cards are. */
  private earlierRuns: Run[] = [];
  /** Where each steer message went, by the message's name (from the steers' own runs and
   *  from the SteerUpdates of the runs they steered). */
  private readonly landings = new Map<string, Landing>();
  /** The child runs expanded to follow their own streams (each a RunView on WatchRun),
   *  and what shows each, by the child's name. */
  private readonly childViews = new Map<string, RunView>();
  private readonly childStreams = new Map<string, HTMLElement>();
  /** Runs whose children were listed (ListRuns `parent_run`), each once. */
  private readonly childrenListed = new Set<string>();
  /** What each followed run has told the host of who holds the conversation: its own
   *  routing (a run the holder answered) and how many of its handoffs, by run name. */
  private readonly holdersTold = new Map<string, { routed: boolean; handoffs: number }>();
  /** Who holds the open conversation, as a followed run says it (a handoff its assistant
   *  made, or its own routing to the holder); the host keeps the latest. */
  onHolder: (claim: HolderClaim) => void = () => undefined;
  /** Called when a run's state or a steer's landing changed (the composer offers Steer
   *  while a run is going; the messages show where steers landed). */
  onChange: () => void = () => undefined;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
  ) {
    this.elements = [this.earlierList, this.list, this.approvals];
  }

  /** Owners get "Allow overdraft" and "Fail run" on a run paused at a budget's cap. */
  canResolve(owner: boolean): void {
    if (this.owner === owner) return;
    this.owner = owner;
    for (const card of this.cards.values()) delete card.querySelector<HTMLElement>('[data-part="budget"]')?.dataset.key;
    this.render();
    // A child paused at a budget, listed in an expanded child's stream, has the controls too.
    this.renderAllChildren();
  }

  has(name: string): boolean {
    return this.runs.has(name);
  }

  /** The run a steer sent now would steer: the oldest followed run still going that is
   *  not itself a steer waiting (as CONCURRENCY_POLICY_STEER picks); "" for none. */
  steerTarget(): string {
    const going = [...this.runs.values()].filter(
      (v) => !v.terminal && v.run !== undefined && (v.run.steer === undefined || v.run.steer.state === SteerState.REQUEUED),
    );
    const created = (v: RunView): bigint => (v.run?.createTime ? v.run.createTime.seconds * 1_000_000_000n + BigInt(v.run.createTime.nanos) : 0n);
    going.sort((a, b) => (created(a) < created(b) ? -1 : created(a) > created(b) ? 1 : 0));
    return going[0]?.name ?? "";
  }

  /** Where the steer message `message` went, if it is one this page knows of. */
  landing(message: string): Landing | undefined {
    return this.landings.get(message);
  }

  /** Finished runs listed (ListRuns): the steers among them say where their messages went. */
  learnLandings(runs: Run[]): void {
    let changed = false;
    for (const run of runs) changed = this.learnLanding(run) || changed;
    if (changed) this.onChange();
  }

  private learnLanding(run: Run | undefined): boolean {
    const steer = run?.steer;
    if (!run || !steer || !run.inputMessage) return false;
    return this.land(run.inputMessage, { steerRun: run.name, target: steer.target, state: steer.state, step: steer.step });
  }

  private land(message: string, landing: Landing): boolean {
    const known = this.landings.get(message);
    // A later word wins (accepted, then consumed or requeued); never back to accepted.
    if (known && known.state !== SteerState.ACCEPTED && landing.state === SteerState.ACCEPTED) return false;
    if (known && known.state === landing.state && known.step === landing.step && known.target === landing.target) return false;
    this.landings.set(message, { ...landing, target: landing.target || known?.target || "" });
    return true;
  }

  /** Shows a run's card (following it first if it is not), scrolled to and opened. */
  reveal(name: string): void {
    this.follow(name);
    const card = this.cards.get(name);
    if (!card) return;
    card.scrollIntoView({ block: "nearest" });
    card.classList.add("revealed");
    setTimeout(() => card.classList.remove("revealed"), 1_500);
  }

  /** The conversation now shows these messages (its runs' answers among them). */
  messagesShown(names: Iterable<string>): void {
    this.shownMessages = new Set(names);
    for (const view of this.runs.values()) {
      const output = view.run?.outputMessage;
      if (output && this.shownMessages.has(output)) this.renderRun(view);
    }
  }

  /** Follows a run in a card of its own. `opened`: a run that began before this page
   *  followed it (listed, or an earlier run inspected): its children are listed, as the
   *  updates that started them may have come before. */
  follow(name: string, run?: Run, opened = false): void {
    if (this.runs.has(name)) return;
    const view = new RunView(name, (v) => this.renderRun(v), window.sessionStorage);
    this.runs.set(name, view);
    if (run) view.adopt(run);
    this.render();
    view.watch(this.api);
    // A reload resumes after the last update seen: the children's start updates are
    // not sent again.
    if (opened || view.restored) this.listChildren(view);
  }

  /** Follows a followed run's updates too (push-to-talk plays its speech); its view, or
   *  undefined when the run has no card here. */
  listen(name: string, listener: RunListener): RunView | undefined {
    const view = this.runs.get(name);
    view?.listen(listener);
    return view;
  }

  /** The conversation's recent runs: those not followed get an "inspect" button, which
   *  replays their updates (WatchRun from the start) into a card of their own. */
  earlier(runs: Run[]): void {
    this.earlierRuns = runs.filter((r) => !this.runs.has(r.name)).reverse();
    this.renderEarlier();
  }

  private renderEarlier(): void {
    const shown = this.earlierRuns.filter((r) => this.onBranch(r));
    this.earlierList.replaceChildren(
      ...(shown.length ? [h("span", { class: "muted" }, "Earlier runs:")] : []),
      ...shown.map((run) =>
        h(
          "button",
          {
            type: "button",
            "data-testid": "inspect-run",
            "data-run": run.name,
            "data-branch": branchOf(run),
            title: run.name,
            onclick: () => {
              this.earlierRuns = this.earlierRuns.filter((r) => r !== run);
              this.renderEarlier();
              this.follow(run.name, undefined, true);
            },
          },
          `${runStateLabel(run.state)} ${run.createTime ? formatTime(timestampDate(run.createTime)) : ""}`,
        ),
      ),
    );
  }

  /** The conversation shows branch `branch` now (0: not known yet): only the runs that
   *  answer there keep their cards in view. A run's answer is on its own branch, so another
   *  branch's card would show an answer the messages above it do not lead to. */
  showBranch(branch: number): void {
    if (branch === this.branch) return;
    this.branch = branch;
    for (const view of this.runs.values()) this.placeCard(view);
    this.renderEarlier();
  }

  /** Whether `run` answers on the branch shown; a run not known yet (its first update
   *  not come) shows until it is. */
  private onBranch(run: Run | undefined): boolean {
    return this.branch === 0 || run === undefined || branchOf(run) === this.branch;
  }

  private placeCard(view: RunView): void {
    const card = this.cards.get(view.name);
    if (!card) return;
    card.hidden = !this.onBranch(view.run);
    card.dataset.branch = view.run ? String(branchOf(view.run)) : "";
  }

  /** Another conversation opened: its runs are not these. */
  stop(): void {
    this.earlierList.replaceChildren();
    this.earlierRuns = [];
    this.branch = 0;
    for (const run of this.runs.values()) run.stop();
    for (const child of this.childViews.values()) child.stop();
    this.runs.clear();
    this.cards.clear();
    this.childViews.clear();
    this.childStreams.clear();
    this.childrenListed.clear();
    this.holdersTold.clear();
    this.shownMessages.clear();
  }

  /** Signed out: nothing followed, shown or remembered for the next session. */
  clear(): void {
    this.stop();
    this.landings.clear();
    forgetRuns(window.sessionStorage);
    this.reasons.clear();
    this.resultTexts.clear();
    delete this.approvals.dataset.key;
    this.list.replaceChildren();
    this.approvals.replaceChildren();
    this.earlierList.replaceChildren();
  }

  render(): void {
    this.list.replaceChildren(...[...this.runs.values()].map((v) => this.card(v)));
    this.renderApprovals();
  }

  private renderRun(view: RunView): void {
    if (this.runs.get(view.name) !== view) return;
    const card = this.card(view);
    if (!card.isConnected) this.list.append(card);
    this.renderApprovals();
    let landed = this.learnLanding(view.run);
    for (const steer of view.steers.values()) {
      if (steer.message) landed = this.land(steer.message, { steerRun: steer.steerRun, target: view.name, state: steer.state, step: steer.step }) || landed;
    }
    this.tellHolder(view);
    // The runs queued behind this one name it (its assistant's title, once this run says it).
    for (const other of this.runs.values()) {
      const waiting = this.cards.get(other.name);
      if (other.queuedBehind?.run === view.name && waiting) this.renderQueued(waiting, other);
    }
    const going = `${view.terminal}`;
    if (landed || card.dataset.going !== going) {
      card.dataset.going = going;
      this.onChange();
    }
  }

  /** The run's card, updated in place: a Cancel button must not be replaced under the
   *  pointer while deltas stream in. */
  private card(view: RunView): HTMLElement {
    let card = this.cards.get(view.name);
    if (card === undefined) {
      card = h(
        "article",
        { "data-testid": "run", "data-run": view.name },
        h(
          "header",
          {},
          h("span", { "data-testid": "run-state" }),
          " ",
          h("code", { "data-part": "handler" }),
          h("span", { class: "muted", "data-testid": "run-assistant" }),
          h("span", { class: "muted", "data-part": "meta" }),
          h("button", { type: "button", "data-testid": "cancel-run", onclick: () => void this.cancel(view) }, "Cancel"),
        ),
        h("div", { "data-part": "steer" }),
        h("div", { "data-part": "queued" }),
        h("div", { "data-part": "tools" }),
        h("div", { "data-part": "handoff" }),
        h("div", { "data-part": "budget" }),
        h("div", { class: "answer", "data-testid": "run-answer", "data-content": true }),
        h("div", { "data-part": "end" }),
        h(
          "details",
          { class: "inspector", "data-testid": "inspector", open: true },
          h("summary", {}, "Run inspector ", h("span", { class: "muted", "data-testid": "run-usage" })),
          h("ol", { class: "timeline", "data-testid": "timeline" }),
        ),
        // Last in the card: the card's own parts come first in document order, before
        // any child's expanded stream (which has parts of the same names).
        h("section", { class: "children", "data-part": "children" }),
      );
      this.cards.set(view.name, card);
    }
    const state = stateName(view.state);
    card.className = `run ${view.terminal ? "done" : "active"}`;
    this.placeCard(view);
    Object.assign(card.dataset, {
      state,
      deltas: String(view.deltas),
      missed: String(view.missed),
      resumes: String(view.resumes),
      speechChunks: String(view.speechChunks),
      speechMs: String(view.speechMs),
      restored: String(view.restored),
      watchedAfter: view.firstAfter,
      live: String(view.live),
      discarded: String(view.discarded),
      steers: String(view.steers.size),
      assistant: view.run?.assistant ?? "",
      handoffs: String(view.handoffs.length),
    });
    this.renderSteer(card, view);
    this.renderQueued(card, view);
    const badge = card.querySelector<HTMLElement>('[data-testid="run-state"]');
    if (badge) {
      badge.className = `state s-${RunState[view.state]?.toLowerCase() ?? "unspecified"}`;
      badge.textContent = view.run && view.run.state === view.state ? runLabel(view.run) : runStateLabel(view.state);
    }
    this.renderBudgetAction(card, view);
    setText(card, '[data-part="handler"]', view.run?.handler ?? "");
    this.renderAssistant(card, view);
    const meta = card.querySelector<HTMLElement>('[data-part="meta"]');
    const counts = `${view.deltas ? ` · ${view.deltas} ${view.deltas === 1 ? "delta" : "deltas"}` : ""}${view.speechChunks ? ` · ${(view.speechMs / 1000).toFixed(1)} s of speech` : ""}`;
    if (meta && (meta.dataset.progress !== view.progress || meta.dataset.counts !== counts)) {
      Object.assign(meta.dataset, { progress: view.progress, counts });
      // The handler's words ("max_tokens lowered from 1,024 to 485 to fit the budget ..."),
      // quoted as it said them.
      fill(meta, view.progress ? h("span", {}, " · ", h("q", { "data-testid": "run-progress", "data-content": true }, view.progress)) : null, counts);
    }
    const cancel = card.querySelector<HTMLButtonElement>('[data-testid="cancel-run"]');
    if (cancel) cancel.hidden = view.terminal;
    this.renderTools(card, view);
    this.renderHandoffs(card, view);
    setText(card, '[data-testid="run-answer"]', view.text);
    this.renderTimeline(card, view);
    this.renderChildren(card, view);
    // Streamed here while it grows; once the answer is a message of the conversation it is
    // shown there, and only there.
    const output = view.run?.outputMessage ?? "";
    const inMessages = view.terminal && output !== "" && this.shownMessages.has(output);
    const answer = card.querySelector<HTMLElement>('[data-testid="run-answer"]');
    if (answer) answer.hidden = inMessages;
    card.dataset.answerIn = inMessages ? "messages" : "card";
    card.querySelector('[data-part="end"]')?.replaceChildren(
      ...(view.run?.error && view.terminal && view.run.error.code !== 0
        ? [h("div", { class: "muted", "data-testid": "run-error", "data-content": true }, view.run.error.message)]
        : view.problem && !view.terminal
          ? [renderProblem(view.problem, "run-problem")]
          : []),
    );
    return card;
  }

  /** The assistant that answers the run, by its title, and why it does (the routing's
   *  reason: named, the workspace's default, or the one the conversation was handed to). */
  private renderAssistant(card: HTMLElement, view: RunView): void {
    const box = card.querySelector<HTMLElement>('[data-testid="run-assistant"]');
    const assistant = view.run?.assistant ?? "";
    if (!box) return;
    const key = `${assistant}:${this.names.title(assistant)}:${view.run?.routingReason ?? ""}`;
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    box.dataset.assistant = assistant;
    box.title = view.run?.routingReason ?? "";
    box.textContent = assistant ? ` · ${this.names.title(assistant)}` : "";
  }

  /** The conversation handed over by this run's assistant: to whom and why, one line per
   *  handoff, rebuilt only when one came (or a title was learned). */
  private renderHandoffs(card: HTMLElement, view: RunView): void {
    const box = card.querySelector<HTMLElement>('[data-part="handoff"]');
    if (!box) return;
    const key = view.handoffs.map((x) => `${x.to}:${this.names.title(x.to)}:${x.reason}`).join(";");
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    box.replaceChildren(
      ...view.handoffs.map((x) =>
        h(
          "p",
          { class: "handoff", "data-testid": "run-handoff", "data-from": x.from, "data-to": x.to },
          "Handed the conversation to ",
          h("strong", { "data-testid": "run-handoff-to", title: x.to }, this.names.title(x.to)),
          x.reason ? ": " : ".",
          x.reason ? h("q", { "data-testid": "run-handoff-reason", "data-content": true }, x.reason) : null,
        ),
      ),
    );
  }

  /** Tells the host who holds the conversation, as this run says it: once for a run the
   *  holder answered (its routing says so), once per handoff its assistant made. */
  private tellHolder(view: RunView): void {
    const told = this.holdersTold.get(view.name) ?? { routed: false, handoffs: 0 };
    this.holdersTold.set(view.name, told);
    if (!told.routed && view.run) {
      told.routed = true;
      const claim = holderOf(view.run);
      if (claim) this.onHolder(claim);
    }
    for (const handoff of view.handoffs.slice(told.handoffs)) {
      this.onHolder({ assistant: handoff.to, at: handoff.at, reason: handoff.reason, run: view.name, from: handoff.from });
    }
    told.handoffs = view.handoffs.length;
  }

  /** Its tool calls and their results, rebuilt only when one came. */
  private renderTools(root: HTMLElement, view: RunView): void {
    const tools = root.querySelector<HTMLElement>('[data-part="tools"]');
    const toolsKey = `${view.calls.length}/${view.results.length}`;
    if (!tools || tools.dataset.key === toolsKey) return;
    tools.dataset.key = toolsKey;
    tools.replaceChildren(
      ...view.calls.map((call) => {
        const result = view.results.find((r) => r.id === call.id);
        return h(
          "div",
          { class: "tool", "data-testid": "run-tool", "data-call-id": call.id, "data-outcome": result ? `TOOL_OUTCOME_${ToolOutcome[result.outcome] ?? ""}` : "" },
          h("code", {}, `${call.functionName || call.tool}(${jsonText(call.arguments)})`),
          result ? h("span", { class: "muted" }, ` → ${outcomeLabel(result.outcome)}: `, h("span", { "data-content": true }, result.text)) : null,
        );
      }),
    );
  }

  /** The runs this run's assistant asked (its delegate calls): each with the assistant
   *  that answers, its state, tokens, cost and time, and a control that follows its own
   *  stream below it (where its own children show the same way); under a row not
   *  expanded, the runs that child asked in turn, as this run's stream names them (so a
   *  grandchild's pause is decided here). Rebuilt only when one of them changed: an
   *  Expand button is not replaced under the pointer while the run streams. */
  private renderChildren(root: HTMLElement, view: RunView): void {
    const box = root.querySelector<HTMLElement>(':scope > [data-part="children"]');
    if (!box) return;
    const children = [...view.children.values()];
    // The children's depth is known once this run is (ListRuns may list them first): the
    // rows are made again then.
    const depth = (view.run?.depth ?? 0) + 1;
    const key = `${depth}|${[...children, ...view.descendants.values()]
      .map((c) => `${c.run}<${c.parent}:${c.state}:${c.usage?.inputTokens ?? ""}/${c.usage?.outputTokens ?? ""}:${c.startedAt}-${c.endedAt}:${this.childTitle(c)}:${this.childViews.has(c.run)}:${this.waitKey(c.requiredAction)}`)
      .join(";")}|${this.owner}`;
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    if (!children.length) return box.replaceChildren();
    box.replaceChildren(
      h("h4", {}, `Asked ${counted(children.length, "assistant")}`),
      h("ol", { class: "child-runs", "data-testid": "child-runs", "data-run": view.name }, ...children.map((c) => this.childRow(c, depth, view))),
    );
  }

  /** A child's title: its assistant's, or the id of the handler a delegate named. */
  private childTitle(child: ChildInfo): string {
    if (child.assistant) return this.names.title(child.assistant) || child.assistant;
    return child.handler.split("/").pop() ?? "";
  }

  /** What a paused child waits for, as far as its row shows it: its calls and their
   *  decisions, or the budgets (by their titles) and the budget's decision. */
  private waitKey(action: RequiredAction | undefined): string {
    if (!action) return "";
    const calls = action.toolCalls.map((c) => `${c.call?.id}=${c.decision}${c.outcomeUnknown ? "?" : ""}`).join(",");
    const budget = action.budget;
    return `${calls}|${budget ? `${budget.budgets.map((b) => this.names.title(b)).join(",")}:${budget.decision}:${budget.costMicros}:${budget.description}` : ""}`;
  }

  /** Every children list shown (cards' and expanded children's), made again where what
   *  it shows changed (a budget's title learned, the caller's role). */
  private renderAllChildren(): void {
    for (const [run, card] of this.cards) {
      const view = this.runs.get(run);
      if (view) this.renderChildren(card, view);
    }
    for (const [run, stream] of this.childStreams) {
      const view = this.childViews.get(run);
      if (view) this.renderChildren(stream, view);
    }
  }

  /** A paused child, decided in its row (one place where a person decides, its stream
   *  not expanded; a grandchild's on the root's card, its parent not expanded either): its
   *  tool calls with Approve and Deny (or, for a call of unknown outcome, Retry, Mark done
   *  and Fail run), or the budget it waits for with Allow overdraft and Fail run for
   *  owners. The decision goes to the child, by its name; its answer updates every view
   *  that lists it until the next child_run update says it went on. */
  private childWaits(child: ChildInfo): HTMLElement | null {
    const action = child.requiredAction;
    if (child.state !== RunState.REQUIRES_ACTION || !action) return null;
    const target: Decidable = {
      name: child.run,
      adopt: (run: Run) => {
        for (const view of [...this.runs.values(), ...this.childViews.values()]) view.adoptChildDecision(run);
        this.childViews.get(run.name)?.adopt(run);
      },
    };
    const budget = action.budget;
    if (budget) {
      if (budget.decision !== BudgetDecision.UNSPECIFIED) return null;
      return this.budgetBox(target, budget, action, () => this.renderAllChildren());
    }
    if (!action.toolCalls.length) return null;
    const title = this.childTitle(child);
    return h(
      "section",
      { class: "approval child-approval", "data-testid": "child-approval", "data-run": child.run },
      h(
        "h5",
        {},
        `${title} waits for your decision`,
        action.expireTime ? h("span", { class: "muted" }, ` (until ${formatTime(timestampDate(action.expireTime))})`) : null,
      ),
      ...this.pendingCalls(target, action),
    );
  }

  /** A child's row in `view`'s list (`depth` its depth in the tree): then, expanded, its
   *  own stream; not expanded, the runs it asked as `view`'s stream names them, nested
   *  (an expanded stream lists them itself: a run shows once). */
  private childRow(child: ChildInfo, depth: number, view: RunView): HTMLElement {
    const expanded = this.childViews.get(child.run);
    const usage = child.usage;
    const ended = TERMINAL.has(child.state);
    const ms = child.startedAt && child.endedAt ? Math.max(0, child.endedAt - child.startedAt) : undefined;
    const title = this.childTitle(child);
    const below = expanded || depth - ((view.run?.depth ?? 0) + 1) >= MAX_TREE_DEPTH ? [] : view.asked(child.run);
    return h(
      "li",
      {
        class: "child-run",
        "data-testid": "child-run",
        "data-run": child.run,
        "data-assistant": child.assistant,
        "data-handler": child.handler || undefined,
        "data-parent": child.parent,
        "data-call-id": child.toolCallId,
        "data-state": stateName(child.state),
        "data-depth": String(depth),
        "data-input-tokens": usage ? String(usage.inputTokens) : undefined,
        "data-output-tokens": usage ? String(usage.outputTokens) : undefined,
        "data-cost-usd": usage ? String(usage.estimatedCostUsd) : undefined,
        "data-priced": usage ? String(!unpriced(usage)) : undefined,
        "data-ms": ms !== undefined ? String(ms) : undefined,
        "data-expanded": String(expanded !== undefined),
        "data-waiting": child.requiredAction ? (child.requiredAction.budget ? "budget" : "tool-calls") : undefined,
      },
      h(
        "div",
        { class: "child-head" },
        h("span", { class: `state s-${RunState[child.state]?.toLowerCase() ?? "unspecified"}`, "data-testid": "child-run-state" }, waitingLabel(child.state, child.requiredAction)),
        " ",
        h("strong", { "data-testid": "child-run-assistant", title: child.assistant || child.handler }, title),
        h("span", { class: "muted", "data-testid": "child-run-tokens" }, usage ? ` · ${(usage.inputTokens + usage.outputTokens).toLocaleString("en")} tokens` : ""),
        h("span", { class: "muted", "data-testid": "child-run-cost" }, usage ? ` · ${usageCost(usage, 4)}` : ""),
        h(
          "span",
          { class: "muted", "data-testid": "child-run-time", title: "from its start to its end" },
          ms !== undefined ? ` · ${(ms / 1000).toFixed(2)} s` : ended ? "" : " · going",
        ),
        " ",
        h(
          "button",
          {
            type: "button",
            "data-testid": "expand-child-run",
            "aria-expanded": String(expanded !== undefined),
            title: child.run,
            onclick: () => this.toggleChild(child.run),
          },
          expanded ? "Hide its stream" : "Follow its stream",
        ),
      ),
      ended && child.error && child.state !== RunState.SUCCEEDED
        ? h("div", { class: "muted", "data-testid": "child-run-error", "data-content": true }, child.error)
        : null,
      this.childWaits(child),
      below.length
        ? h("ol", { class: "child-runs nested", "data-testid": "child-runs", "data-run": child.run }, ...below.map((c) => this.childRow(c, depth + 1, view)))
        : null,
      expanded ? this.childStream(expanded) : null,
    );
  }

  /** Expands a child (a RunView on its WatchRun, its own children listed) or folds it
   *  (the stream stopped). */
  private toggleChild(name: string): void {
    const open = this.childViews.get(name);
    if (open) {
      open.stop();
      this.childViews.delete(name);
      this.childStreams.delete(name);
      this.childrenListed.delete(name);
    } else {
      const view = new RunView(name, (v) => this.renderChildStream(v));
      this.childViews.set(name, view);
      view.watch(this.api);
      this.listChildren(view);
    }
    // Whichever run lists it (a card, or another child's stream, as a child or further
    // down) shows the change.
    this.renderAllChildren();
  }

  private renderChildStream(view: RunView): void {
    if (this.childViews.get(view.name) !== view) return;
    this.childStream(view);
  }

  /** An expanded child's own stream: its state, tool calls, answer as it grows, its
   *  inspector (where a call of its own waiting for a person is decided), and its own
   *  children. Made once, updated in place. */
  private childStream(view: RunView): HTMLElement {
    let stream = this.childStreams.get(view.name);
    if (stream === undefined) {
      stream = h(
        "div",
        { class: "child-stream", "data-testid": "child-run-stream", "data-run": view.name },
        h("div", { class: "muted" }, h("span", { "data-testid": "run-state" }), h("code", { "data-part": "handler" })),
        h("div", { "data-part": "tools" }),
        h("div", { class: "answer", "data-testid": "child-run-answer", "data-content": true }),
        h("div", { "data-part": "end" }),
        h(
          "details",
          { class: "inspector", "data-testid": "inspector" },
          h("summary", {}, "Its inspector ", h("span", { class: "muted", "data-testid": "run-usage" })),
          h("ol", { class: "timeline", "data-testid": "timeline" }),
        ),
        h("section", { class: "children", "data-part": "children" }),
      );
      this.childStreams.set(view.name, stream);
    }
    Object.assign(stream.dataset, { state: stateName(view.state), live: String(view.live), deltas: String(view.deltas) });
    const badge = stream.querySelector<HTMLElement>('[data-testid="run-state"]');
    if (badge) {
      badge.className = `state s-${RunState[view.state]?.toLowerCase() ?? "unspecified"}`;
      badge.textContent = view.run && view.run.state === view.state ? runLabel(view.run) : runStateLabel(view.state);
    }
    setText(stream, '[data-part="handler"]', view.run?.handler ? ` ${view.run.handler}` : "");
    this.renderTools(stream, view);
    setText(stream, '[data-testid="child-run-answer"]', view.text);
    stream.querySelector('[data-part="end"]')?.replaceChildren(
      ...(view.run?.error && view.terminal && view.run.error.code !== 0
        ? [h("div", { class: "muted", "data-testid": "run-error", "data-content": true }, view.run.error.message)]
        : view.problem && !view.terminal
          ? [renderProblem(view.problem, "run-problem")]
          : []),
    );
    this.renderTimeline(stream, view);
    this.renderChildren(stream, view);
    return stream;
  }

  /** The run's children as the server lists them (ListRuns `parent_run`, `parent` the
   *  workspace: children live in conversations of their own), once per run; and below
   *  each child still going, the runs it asked, and so on (their start and pause updates,
   *  which the run's stream carries too, came before the page followed it). */
  private listChildren(view: RunView): void {
    if (this.childrenListed.has(view.name)) return;
    this.childrenListed.add(view.name);
    this.listBelow(view, view.name, 1);
  }

  private listBelow(view: RunView, run: string, level: number): void {
    const workspace = view.name.split("/conversations/")[0] ?? "";
    void this.page.busy("list-child-runs", async () => {
      const listed = await this.api.dispatcher.listRuns({ parent: workspace, parentRun: run, pageSize: 100 });
      if (listed.runs.length) view.adoptChildren(listed.runs);
      if (level >= MAX_TREE_DEPTH) return;
      for (const child of listed.runs) if (!TERMINAL.has(child.state)) this.listBelow(view, child.name, level + 1);
    });
  }

  /** A queued run says what it waits behind: the run ahead (linked to its card, a run of
   *  the same conversation), why, and until when a person's approval may hold it; gone
   *  when it starts. Rebuilt only when the note changed. */
  private renderQueued(card: HTMLElement, view: RunView): void {
    const box = card.querySelector<HTMLElement>(':scope > [data-part="queued"]');
    if (!box) return;
    const behind = view.state === RunState.QUEUED ? view.queuedBehind : undefined;
    const assistant = behind ? this.runs.get(behind.run)?.run?.assistant ?? "" : "";
    const title = assistant ? this.names.title(assistant) : "";
    const expires = behind?.expireTime ? timestampDate(behind.expireTime) : undefined;
    const key = behind ? `${behind.run}:${behind.state}:${behind.reason}:${behind.ahead}:${expires?.getTime() ?? ""}:${title}` : "";
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    if (!behind) return box.replaceChildren();
    const ahead = behind.run;
    box.replaceChildren(
      h(
        "p",
        {
          class: "muted queued-behind",
          "data-testid": "queued-behind",
          "data-run": ahead,
          "data-state": stateName(behind.state),
          "data-ahead": String(behind.ahead),
          "data-expire-time": expires?.toISOString(),
        },
        "Waiting behind ",
        h("a", { href: "#", "data-testid": "queued-behind-run", title: ahead, onclick: (e: globalThis.Event) => { e.preventDefault(); this.reveal(ahead); } }, `run ${shortRun(ahead)}`),
        title ? ` (${title})` : "",
        behind.reason ? ": " : "",
        behind.reason ? h("span", { "data-testid": "queued-behind-reason", "data-content": true }, behind.reason) : null,
        expires ? h("span", { "data-testid": "queued-behind-until" }, ` (until ${formatTime(expires)})`) : null,
        // "ahead" counts the run named: more than it means others queued in between.
        behind.ahead > 1 ? `; ${counted(behind.ahead, "run")} start before this one` : "",
        ".",
      ),
    );
  }

  /** A steer's own run: the run it steers and what became of it. Rebuilt only when that
   *  changes. */
  private renderSteer(card: HTMLElement, view: RunView): void {
    const box = card.querySelector<HTMLElement>('[data-part="steer"]');
    const steer = view.run?.steer;
    if (!box) return;
    const key = steer ? `${steer.target}:${steer.state}:${steer.step}` : "";
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    if (!steer) return box.replaceChildren();
    const target = steer.target.split("/").pop()?.slice(0, 8) ?? "";
    const said =
      steer.state === SteerState.CONSUMED
        ? steer.step
          ? `: its model saw this message before step ${steer.step}, and its answer answers it.`
          : ": it took this message."
        : steer.state === SteerState.REQUEUED
          ? " ended before taking it: this run answers the message on its own."
          : ": waiting for its next step.";
    box.replaceChildren(
      h(
        "p",
        {
          class: "muted steer",
          "data-testid": "steer-of",
          "data-target": steer.target,
          "data-steer-state": steerStateName(steer.state),
          "data-step": steer.step || undefined,
        },
        "A steer of run ",
        h("a", { href: "#", "data-testid": "steer-target", title: steer.target, onclick: (e: globalThis.Event) => { e.preventDefault(); this.reveal(steer.target); } }, target),
        said,
      ),
    );
  }

  /** A run paused at a budget's cap: which budgets, what the step asks, and (owners)
   *  Allow overdraft or Fail run. Rebuilt only when that changes: a button is not
   *  replaced under the pointer. */
  private renderBudgetAction(card: HTMLElement, view: RunView): void {
    const box = card.querySelector<HTMLElement>('[data-part="budget"]');
    if (!box) return;
    const action = view.state === RunState.REQUIRES_ACTION ? view.run?.requiredAction?.budget : undefined;
    const waiting = action !== undefined && action.decision === BudgetDecision.UNSPECIFIED;
    const key = waiting ? `${action.budgets.join(",")}:${action.costMicros}:${action.description}:${this.owner}` : "";
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    if (!waiting) return box.replaceChildren();
    const required = view.run?.requiredAction;
    if (!required) return box.replaceChildren();
    box.replaceChildren(
      this.budgetBox(view, action, required, () => {
        delete box.dataset.key;
        this.renderBudgetAction(card, view);
      }),
    );
  }

  /** What a run paused at a budget's cap waits for, and (owners) Allow overdraft or Fail
   *  run on `target`: the card's own run, or a child its row lists. `retitled` shows it
   *  again once the budgets' titles are learned. */
  private budgetBox(target: Decidable, action: BudgetAction, required: RequiredAction, retitled: () => void): HTMLElement {
    const unknown = action.budgets.filter((b) => !this.names.knows(b) && !this.askedTitles.has(b));
    if (unknown.length) {
      // Said by their titles once known (each asked for once): shown now, again when they are.
      for (const b of unknown) this.askedTitles.add(b);
      void learnBudgetTitles(this.api, this.names, unknown).then(retitled);
    }
    const expires = required.expireTime;
    const asks = [
      action.costMicros ? money(action.costMicros) : "",
      action.inputTokens || action.outputTokens ? `${action.inputTokens} input and ${action.outputTokens} output tokens` : "",
    ].filter(Boolean);
    return h(
      "div",
      { class: "approval budget-action", "data-testid": "budget-action", "data-budgets": action.budgets.join(" "), "data-run": target.name },
      h(
        "p",
        {},
        `Paused: its next step does not fit in ${action.budgets.length > 1 ? "the budgets" : "the budget"} `,
        ...action.budgets.flatMap((b, i) => [i ? ", " : "", h("a", { href: `#${b.split("/budgets/")[0] ?? ""}/budgets`, "data-testid": "budget-action-budget", "data-budget": b }, this.names.title(b))]),
        asks.length ? ` (it asks ${asks.join(" and ")}).` : ".",
        " Raising the cap lets it go on by itself",
        expires ? `; undecided, it fails at ${formatTime(timestampDate(expires))}.` : ".",
      ),
      // The server's account of the shortfall: what the call needs at least, and how much
      // of which budget is left.
      action.description
        ? h("p", { class: "muted", "data-testid": "budget-action-description" }, "Why: ", h("q", { "data-content": true }, action.description))
        : null,
      this.owner
        ? h(
            "div",
            { class: "row" },
            h("button", { type: "button", class: "approve", "data-testid": "allow-overdraft", onclick: (e: globalThis.Event) => void this.resolve(target, BudgetDecision.ALLOW_OVERDRAFT, e) }, "Allow overdraft"),
            h("button", { type: "button", class: "danger", "data-testid": "fail-run", onclick: (e: globalThis.Event) => void this.resolve(target, BudgetDecision.FAIL, e) }, "Fail run"),
          )
        : h("p", { class: "muted" }, "An owner of the workspace can allow this step past the cap or fail the run."),
    );
  }

  private async resolve(view: Decidable, decision: BudgetDecision, event: globalThis.Event): Promise<void> {
    const button = event.currentTarget as HTMLButtonElement;
    await this.page.busy(
      decision === BudgetDecision.FAIL ? "fail-run" : "allow-overdraft",
      async () => {
        const answer = await this.api.dispatcher.resolveBudgetAction({ name: view.name, decision });
        if (answer.run) view.adopt(answer.run);
      },
      { button },
    );
  }

  /** The inspector: every entry of the run's timeline, rebuilt only when it changed; a
   *  tool call still waiting for a decision links to the one place it is decided. */
  private renderTimeline(card: HTMLElement, view: RunView): void {
    const list = card.querySelector<HTMLElement>('[data-testid="timeline"]');
    if (!list) return;
    const last = view.timeline[view.timeline.length - 1];
    const pending = new Map(
      view.state === RunState.REQUIRES_ACTION
        ? (view.run?.requiredAction?.toolCalls ?? []).filter((c) => c.decision === ToolApprovalDecision.UNSPECIFIED).map((c) => [c.call?.id ?? "", c])
        : [],
    );
    const key = `${view.timeline.length}:${last?.detail.length ?? 0}:${last?.count ?? 0}:${[...pending.values()].map((c) => `${c.call?.id}${c.outcomeUnknown ? "?" : ""}`).join(",")}`;
    if (list.dataset.key === key) return;
    list.dataset.key = key;
    const usage = view.usage;
    const usageLine = card.querySelector<HTMLElement>('[data-testid="run-usage"]');
    if (usageLine && usage) {
      usageLine.textContent = `· ${usage.inputTokens + usage.outputTokens} tokens · ${usageCost(usage, 4)}${usage.budgetLoweredCalls ? ` · ${limitedLabel(usage)}` : ""}`;
      usageLine.title = unpriced(usage) ? `${counted(usage.unpricedCalls, "model call")} of a model with no price in the server's price table: the cost leaves them out` : "";
      Object.assign(usageLine.dataset, {
        inputTokens: String(usage.inputTokens),
        outputTokens: String(usage.outputTokens),
        costUsd: String(usage.estimatedCostUsd),
        priced: String(!unpriced(usage)),
        unpricedCalls: String(usage.unpricedCalls),
        budgetLoweredCalls: String(usage.budgetLoweredCalls),
        lowestMaxTokens: String(usage.lowestMaxTokens),
      });
    }
    const start = view.timeline.find((e) => e.at)?.at ?? 0;
    list.replaceChildren(...view.timeline.map((entry) => this.entry(view, entry, start, pending)));
  }

  private entry(view: RunView, entry: TimelineEntry, start: number, pending: Map<string, PendingToolCall>): HTMLElement {
    const call = entry.kind === "tool-call" && entry.id !== undefined ? pending.get(entry.id) : undefined;
    return h(
      "li",
      {
        class: `entry k-${entry.kind}`,
        "data-testid": "timeline-entry",
        "data-kind": entry.kind,
        "data-sequence": entry.sequence,
        "data-call-id": entry.id,
        "data-by": entry.by,
        "data-outcome": entry.outcome,
        "data-count": entry.count,
        "data-ms": entry.ms,
        "data-state": entry.state,
        "data-decision": entry.decision,
        "data-steer-state": entry.steerState,
        "data-step": entry.step,
        "data-message": entry.message,
        "data-from": entry.from,
        "data-to": entry.to,
        "data-parent": entry.parent,
      },
      h("span", { class: "muted when" }, entry.at && start ? `+${((entry.at - start) / 1000).toFixed(2)} s` : ""),
      h("strong", {}, entry.kind === "handoff" && entry.to ? `handed the conversation to ${this.names.title(entry.to)}` : entry.label),
      entry.kind === "steer" && entry.id
        ? h(
            "span",
            {},
            " ",
            h(
              "a",
              { href: "#", "data-testid": "steer-run", title: entry.id, onclick: (e: globalThis.Event) => { e.preventDefault(); this.reveal(entry.id ?? ""); } },
              `steer ${entry.id.split("/").pop()?.slice(0, 8) ?? ""}`,
            ),
          )
        : null,
      entry.kind === "text"
        ? h("span", { class: "muted" }, entry.count ? ` (${entry.count} ${entry.count === 1 ? "delta" : "deltas"})` : " (from the result)")
        : entry.kind === "speech"
          ? h("span", { class: "muted" }, ` (${entry.count ?? 1} ${entry.count === 1 ? "chunk" : "chunks"})`)
          : null,
      entry.ms !== undefined
        ? h(
            "span",
            {
              class: "muted",
              "data-testid": "entry-duration",
              title: entry.kind === "state" ? "since the previous state" : entry.kind === "speech" ? "the audio's length" : "how long the call took",
            },
            ` ${entry.ms} ms`,
          )
        : null,
      entry.by ? h("span", { "data-testid": "entry-by" }, ` by ${this.names.title(entry.by)}`) : null,
      entry.detail ? h(entry.kind === "text" || entry.kind === "speech" ? "div" : "code", { class: "detail", "data-content": true }, entry.detail) : null,
      call ? this.decisionLink(view.name, call) : null,
    );
  }

  /** A call in the timeline that waits for a decision points at where it is decided (the
   *  approvals below the cards, or a child's row), rather than offering the buttons again:
   *  two Approve / Deny pairs for one call read as two calls. */
  private decisionLink(run: string, call: PendingToolCall): HTMLElement {
    const id = call.call?.id ?? "";
    const where = [`[data-testid="approval"]`, `[data-testid="child-approval"]`]
      .map((box) => `${box}[data-run="${CSS.escape(run)}"] [data-testid="pending-call"][data-call-id="${CSS.escape(id)}"]`)
      .join(", ");
    return h(
      "a",
      {
        href: "#",
        class: "decision-link",
        "data-testid": "inspector-decide",
        "data-call-id": id,
        onclick: (e: globalThis.Event) => {
          e.preventDefault();
          const target = document.querySelector<HTMLElement>(where);
          target?.scrollIntoView({ block: "center" });
          target?.querySelector<HTMLElement>("input, textarea, button")?.focus({ preventScroll: true });
        },
      },
      call.outcomeUnknown ? "outcome unknown: go to its decision" : "waiting for your decision: go to it",
    );
  }

  /** What a person decides for a call a crash left in flight (outcome unknown): not whether
   *  to make it, but what became of it. Approve and Deny would be refused for it. */
  private outcomeControls(view: Decidable, pending: PendingToolCall): HTMLElement {
    const id = pending.call?.id ?? "";
    const result: HTMLTextAreaElement = h("textarea", {
      "data-testid": "outcome-result",
      placeholder: "what the call returned (required for Mark done; the model is given it as its result)",
      maxlength: MAX_RESULT_TEXT,
      rows: 2,
      value: this.resultTexts.get(id) ?? "",
      oninput: () => {
        this.resultTexts.set(id, result.value);
        done.disabled = result.value.trim() === "";
      },
    });
    const done = h(
      "button",
      {
        type: "button",
        "data-testid": "outcome-complete",
        class: "approve",
        title: "It took effect: the model is given the result above",
        onclick: (e: globalThis.Event) => {
          // Required, 1 to 16,000 characters (the field's maxlength keeps it under).
          if (result.value.trim() === "") return;
          void this.decide(view, id, ToolApprovalDecision.COMPLETE, "", e, result.value);
        },
      },
      "Mark done",
    );
    done.disabled = result.value.trim() === "";
    return h(
      "div",
      { class: "outcome-unknown", "data-testid": "outcome-unknown", "data-call-id": id },
      h(
        "p",
        {},
        h("strong", {}, "Outcome unknown. "),
        "This call was in flight when the server stopped: it may or may not have happened, and its tool is not marked safe to call again. ",
        "Retry sends it again with the same idempotency key (a tool that honours the key does it once); Mark done gives the model the result you enter; Fail run ends the run.",
      ),
      result,
      h(
        "div",
        { class: "row" },
        h("button", { type: "button", "data-testid": "outcome-retry", title: "Send it again, with the same idempotency key", onclick: (e: globalThis.Event) => void this.decide(view, id, ToolApprovalDecision.RETRY, "", e) }, "Retry"),
        done,
        h("button", { type: "button", "data-testid": "outcome-fail-run", class: "danger", title: "End the run FAILED without sending it again", onclick: (e: globalThis.Event) => void this.decide(view, id, ToolApprovalDecision.FAIL_RUN, "", e) }, "Fail run"),
      ),
    );
  }

  /** A call decided while its run still waits for others: what was decided, and by whom. */
  private decided(pending: PendingToolCall): HTMLElement {
    const call = pending.call;
    const said = pending.decision === ToolApprovalDecision.COMPLETE ? pending.resultText : pending.reason;
    return h(
      "div",
      {
        class: "decided muted",
        "data-testid": "decided-call",
        "data-call-id": call?.id ?? "",
        "data-decision": decisionName(pending.decision),
        "data-outcome-unknown": String(pending.outcomeUnknown),
      },
      h("code", {}, call?.functionName || call?.tool || call?.id || ""),
      ` ${pending.outcomeUnknown ? "outcome unknown: " : ""}${decisionLabel(pending.decision)}`,
      pending.decidedBy ? ` by ${this.names.title(pending.decidedBy)}` : "",
      said ? h("span", { "data-content": true }, `: ${said}`) : null,
    );
  }

  private async cancel(view: RunView): Promise<void> {
    await this.page.busy("cancel-run", async () => {
      const answer = await this.api.dispatcher.cancelRun({ name: view.name, reason: "cancelled from the console" });
      if (answer.run) view.adopt(answer.run);
    });
  }

  private renderApprovals(): void {
    // A run paused at a budget waits in its card (renderBudgetAction), not here.
    const waiting = [...this.runs.values()].filter((v) => v.state === RunState.REQUIRES_ACTION && v.run?.requiredAction?.toolCalls.length);
    // Rebuilt only when what waits changes: a reason being typed stays where it is.
    const key = waiting
      .map((v) => `${v.name}:${v.run?.requiredAction?.toolCalls.map((c) => `${c.call?.id}=${c.decision}`).join(",")}`)
      .join(";");
    const list = this.approvals;
    if (list.dataset.key === key) return;
    list.dataset.key = key;
    list.replaceChildren(
      ...waiting.map((view) => {
        const action = view.run?.requiredAction;
        return h(
          "section",
          { class: "approval", "data-testid": "approval", "data-run": view.name },
          h(
            "h3",
            {},
            "Waiting for your decision",
            action?.expireTime ? h("span", { class: "muted" }, ` (until ${formatTime(timestampDate(action.expireTime))})`) : null,
          ),
          ...(action ? this.pendingCalls(view, action) : []),
        );
      }),
    );
  }

  /** A paused run's tool calls (the card's own run, or a child its row lists): each
   *  undecided one with its arguments and Approve / Deny (with a reason the model is
   *  told), or for a call of unknown outcome Retry / Mark done / Fail run; then those
   *  decided already while others wait. */
  private pendingCalls(view: Decidable, action: RequiredAction): HTMLElement[] {
    const calls = action.toolCalls.filter((c) => c.decision === ToolApprovalDecision.UNSPECIFIED);
    const decided = action.toolCalls.filter((c) => c.decision !== ToolApprovalDecision.UNSPECIFIED);
    return [
      ...calls.map((pending) => {
        const call = pending.call;
        const id = call?.id ?? "";
        if (pending.outcomeUnknown) {
          return h(
            "div",
            { class: "pending unknown", "data-testid": "pending-call", "data-call-id": id, "data-tool": call?.tool ?? "", "data-outcome-unknown": "true" },
            h("code", {}, call?.functionName || call?.tool || id),
            h("pre", {}, jsonText(call?.arguments, 2)),
            this.outcomeControls(view, pending),
          );
        }
        const reason = h("input", {
          "data-testid": "deny-reason",
          placeholder: "reason (shown to the model)",
          maxlength: 500,
          value: this.reasons.get(id) ?? "",
          oninput: () => this.reasons.set(id, reason.value),
        });
        return h(
          "div",
          { class: "pending", "data-testid": "pending-call", "data-call-id": id, "data-tool": call?.tool ?? "" },
          h("code", {}, call?.functionName || call?.tool || id),
          h("pre", {}, jsonText(call?.arguments, 2)),
          reason,
          h("button", { type: "button", "data-testid": "approve", onclick: () => void this.decide(view, id, ToolApprovalDecision.APPROVE, "") }, "Approve"),
          h("button", { type: "button", "data-testid": "deny", onclick: () => void this.decide(view, id, ToolApprovalDecision.DENY, reason.value) }, "Deny"),
        );
      }),
      ...decided.map((pending) => this.decided(pending)),
    ];
  }

  private async decide(
    view: Decidable,
    toolCallId: string,
    decision: ToolApprovalDecision,
    reason: string,
    event?: globalThis.Event,
    resultText = "",
  ): Promise<void> {
    const button = event?.currentTarget instanceof HTMLButtonElement ? event.currentTarget : undefined;
    await this.page.busy(
      "approval",
      async () => {
        const answer = await this.api.dispatcher.submitToolApprovals({
          name: view.name,
          approvals: [{ toolCallId, decision, reason, resultText }],
        });
        if (decision === ToolApprovalDecision.COMPLETE) this.resultTexts.delete(toolCallId);
        if (answer.run) view.adopt(answer.run);
      },
      button ? { button } : {},
    );
  }
}

/** The branch a run answers on; a run from before branches (0) answered on the first. */
function branchOf(run: Run): number {
  return run.branch || 1;
}

function setText(root: HTMLElement, selector: string, text: string): void {
  const element = root.querySelector(selector);
  if (element && element.textContent !== text) element.textContent = text;
}
