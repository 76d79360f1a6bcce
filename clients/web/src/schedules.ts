// The open workspace's Schedules page (`#workspaces/w/schedules`): its schedules (what each
// sends, to which assistant or handler, on which cron expression and time zone or interval,
// whether it is active, when it fires next and what its last firing started), each one's
// firings (the tick, what came of it, the run it started or why none), and, for the
// workspace's owners, creating, editing (only the changed fields in the FieldMask, with the
// etag it was opened at), pausing, resuming and deleting them. The server checks every
// field (a cron that does not parse, a zone that does not exist, an interval under its
// minimum): its violations are shown beside the fields they name.
import { type Duration, durationMs, timestampDate } from "@bufbuild/protobuf/wkt";
import { type Api, PAGE_SIZE, requestId } from "./api";
import { deleteConfirmation } from "./confirm";
import { type Child, fill, h } from "./dom";
import { type Problem, local, offerCurrentVersion, problem, renderProblem } from "./errors";
import {
  type Assistant,
  ConcurrencyPolicy,
  FiringOutcome,
  type Handler,
  MissedTickPolicy,
  type Schedule,
  ScheduleConversationMode,
  type ScheduleFiring,
  ScheduleState,
} from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import type { Event } from "./gen/switchboard/api/events/v1/events_pb";
import { idAttributes, idRule } from "./ids";
import { conversationModeLabel, firingLabel, missedTickLabel, policyLabel, scheduleStateLabel } from "./labels";
import { browserZone, dateTime, knownZone, needsSeconds } from "./moments";
import type { Names } from "./names";
import type { Page } from "./page";
import { atRevision, fillRevisions } from "./revisionpick";

/** Firings shown per schedule (ListScheduleFirings' default page). */
const FIRINGS = 20;
const POLICIES = [ConcurrencyPolicy.ENQUEUE, ConcurrencyPolicy.REJECT, ConcurrencyPolicy.INTERRUPT, ConcurrencyPolicy.STEER];
const MODES = [ScheduleConversationMode.SHARED, ScheduleConversationMode.PER_RUN];
const MISSED = [MissedTickPolicy.SKIP, MissedTickPolicy.RUN_ONCE];

/** The editor's fields: the data-testid, the label, and the schedule's field (the FieldMask
 *  path, and what a violation names). */
const FIELDS = [
  ["schedule-name", "Display name", "display_name"],
  ["schedule-target", "Answered by", "assistant"],
  ["schedule-revision", "Revision", "assistant_revision"],
  ["schedule-template", "Message", "message_template"],
  ["schedule-cron", "Cron expression", "cron"],
  ["schedule-time-zone", "Time zone", "time_zone"],
  ["schedule-interval", "Every (seconds)", "interval"],
  ["schedule-mode", "Conversation", "conversation_mode"],
  ["schedule-policy", "When its conversation is busy", "concurrency_policy"],
  ["schedule-missed", "Ticks missed while stopped", "missed_tick_policy"],
  ["schedule-timeout", "Run timeout (seconds)", "timeout"],
] as const;
type Field = (typeof FIELDS)[number][2];

/** A duration in words: "every 90 s", "every 2 h". */
function every(d: Duration | undefined): string {
  if (!d) return "";
  const s = durationMs(d) / 1000;
  if (s % 86_400 === 0) return `every ${s / 86_400} d`;
  if (s % 3_600 === 0) return `every ${s / 3_600} h`;
  if (s % 60 === 0 && s >= 60) return `every ${s / 60} min`;
  return `every ${s} s`;
}

function seconds(n: number): Duration {
  const whole = Math.floor(n);
  return { seconds: BigInt(whole), nanos: Math.round((n - whole) * 1e9) } as Duration;
}

export interface SchedulesHost {
  /** Opens a run's conversation with its card shown. */
  openRun(run: string): void;
}

export class Schedules {
  /** The page, in the centre column while it is open. */
  readonly element: HTMLElement;
  private readonly role = h("p", { class: "muted", "data-testid": "schedules-role" });
  private readonly list = h("ul", { class: "list schedules", "data-testid": "schedules" });
  private readonly editor = h("form", { class: "inline editor", "data-testid": "schedule-editor", hidden: true });
  private readonly newButton = h(
    "button",
    { type: "button", class: "manage", "data-testid": "new-schedule", hidden: true, onclick: () => this.edit(null) },
    "New schedule",
  );
  private workspace = "";
  private owner = false;
  private visible = false;
  private schedules: Schedule[] = [];
  private assistants: Assistant[] = [];
  private handlers: Handler[] = [];
  /** Firings by schedule, for the schedules whose firings are open. */
  private readonly firings = new Map<string, ScheduleFiring[]>();
  /** Problems beside a schedule's entry (a pause refused), by schedule. */
  private readonly problems = new Map<string, Problem>();
  /** The schedule being edited, null when the editor is closed or on a new one. */
  private editing: Schedule | null = null;
  private editingNew = false;
  /** The open editor's "Answered by" choice: its options follow the assistants and
   *  handlers as they load (an editor opened before the page's first load had none). */
  private targetSelect: HTMLSelectElement | null = null;
  private reloadTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
    private readonly host: SchedulesHost,
  ) {
    this.element = h(
      "section",
      { class: "schedules-page", "data-testid": "schedules-page", hidden: true },
      this.role,
      h(
        "p",
        { class: "muted" },
        "A schedule sends its message on a cron expression in a time zone, or at a fixed interval, as its creator: each tick is claimed once, whatever the number of servers, then goes through the same checks as any message.",
      ),
      this.list,
      this.newButton,
      this.editor,
    );
    this.editor.addEventListener("submit", (event) => {
      event.preventDefault();
      void this.save();
    });
  }

  /** The open workspace, and whether the caller owns it (owners manage schedules, as they
   *  do assistants; every member reads them). */
  open(workspace: string, owner: boolean): void {
    if (workspace !== this.workspace) {
      this.workspace = workspace;
      this.schedules = [];
      this.firings.clear();
      this.problems.clear();
      this.close();
    }
    this.owner = owner;
    this.newButton.hidden = !owner;
    if (!owner) this.close();
    this.role.textContent = owner
      ? "You own this workspace: you can create, edit, pause and delete its schedules. Their runs run as whoever created them."
      : "Read only: the workspace's owners manage its schedules.";
    this.render();
  }

  /** Shown (the page is open) or not; opening it loads what it shows. */
  show(visible: boolean): void {
    this.visible = visible;
    this.element.hidden = !visible;
    if (visible) void this.load();
  }

  async load(): Promise<void> {
    const parent = this.workspace;
    if (!parent || !this.visible) return;
    await this.page.busy("list-schedules", async () => {
      const [schedules, assistants, handlers] = await Promise.all([
        this.listAll(parent),
        this.api.dispatcher.listAssistants({ parent, pageSize: PAGE_SIZE }),
        this.api.dispatcher.listHandlers({ parent, pageSize: PAGE_SIZE }),
      ]);
      if (parent !== this.workspace) return;
      this.schedules = schedules;
      this.assistants = assistants.assistants;
      this.handlers = handlers.handlers;
      this.refreshTargets();
      for (const s of schedules) this.names.learn(s.name, s.displayName);
      for (const a of this.assistants) this.names.learn(a.name, a.displayName);
      // Open firings follow what changed.
      await Promise.all([...this.firings.keys()].filter((n) => schedules.some((s) => s.name === n)).map((n) => this.loadFirings(n)));
      for (const name of [...this.firings.keys()]) if (!schedules.some((s) => s.name === name)) this.firings.delete(name);
      this.render();
    });
  }

  private async listAll(parent: string): Promise<Schedule[]> {
    const all: Schedule[] = [];
    let pageToken = "";
    do {
      const page = await this.api.dispatcher.listSchedules({ parent, pageSize: PAGE_SIZE, pageToken });
      all.push(...page.schedules);
      pageToken = page.nextPageToken;
    } while (pageToken && all.length < 1_000);
    return all;
  }

  /** An event from the feed: a schedule changed or fired. */
  apply(event: Event): void {
    if (!this.visible || event.workspace !== this.workspace) return;
    const payload = event.payload;
    if (payload.case !== "scheduleChanged" && payload.case !== "scheduleFired") return;
    // Several at once (a burst of ticks) make one reload.
    clearTimeout(this.reloadTimer);
    this.reloadTimer = setTimeout(() => void this.load(), 300);
  }

  clear(): void {
    clearTimeout(this.reloadTimer);
    this.workspace = "";
    this.schedules = [];
    this.firings.clear();
    this.problems.clear();
    this.close();
    this.list.replaceChildren();
  }

  // -- The list -------------------------------------------------------------------------

  private targetLabel(s: Schedule): string {
    if (s.handler) return `handler ${s.handler.replace(/^handlers\//, "")}`;
    if (s.assistant) {
      const title = `assistant ${this.names.title(s.assistant).split(" › ").pop() ?? s.assistant}`;
      return s.assistantRevision > 0n ? `${title} ${atRevision(s.assistantRevision)}` : title;
    }
    return "the workspace's default assistant";
  }

  private render(): void {
    if (this.schedules.length === 0) {
      fill(
        this.list,
        h(
          "li",
          { class: "muted", "data-testid": "schedules-empty" },
          this.owner ? "No schedules yet. Create one below." : "No schedules in this workspace.",
        ),
      );
      return;
    }
    this.list.replaceChildren(...this.schedules.map((s) => this.item(s)));
  }

  /** The zone a schedule's times are written in: a cron's own (its ticks are at those
   *  clock times there), else the browser's; named beside them either way. */
  private zone(s: Schedule): string {
    return s.cron ? knownZone(s.timeZone || "UTC") : browserZone();
  }

  private item(s: Schedule): HTMLElement {
    const id = s.name.split("/").pop() ?? s.name;
    const paused = s.state === ScheduleState.PAUSED;
    const next = s.nextFireTime ? timestampDate(s.nextFireTime) : undefined;
    const last = s.lastFireTime ? timestampDate(s.lastFireTime) : undefined;
    const when = s.cron ? `cron ${s.cron} (${s.timeZone || "UTC"})` : every(s.interval);
    const firings = this.firings.get(s.name);
    const problemHere = this.problems.get(s.name);
    // The next tick first, then the ones after it the server computed.
    const upcoming = paused ? [] : s.upcomingFireTimes.map((t) => timestampDate(t)).filter((t) => !next || t > next);
    const ticks = paused || !next ? [] : [next, ...upcoming];
    const zone = this.zone(s);
    const seconds = needsSeconds([...ticks, ...(last ? [last] : [])]);
    const moment = (d: Date): HTMLElement => this.moment(d, zone, seconds);
    const zoneName = h("span", { class: "zone", "data-content": true }, zone);
    return h(
      "li",
      {
        class: `schedule ${paused ? "paused" : "active"}`,
        "data-testid": "schedule",
        "data-name": s.name,
        "data-etag": s.etag,
        "data-state": `SCHEDULE_STATE_${ScheduleState[s.state] ?? "UNSPECIFIED"}`,
        "data-next": next ? next.toISOString() : "",
        "data-last-run": s.lastRun,
        "data-assistant-revision": String(s.assistantRevision),
        "data-time-zone": zone,
      },
      h(
        "div",
        { class: "row" },
        h("strong", {}, s.displayName || id),
        h("span", { class: `state s-${paused ? "paused" : "active"}`, "data-testid": "schedule-state" }, scheduleStateLabel(s.state)),
      ),
      h("div", { class: "muted", "data-testid": "schedule-when" }, h("span", { "data-content": true }, when), ` · ${this.targetLabel(s)}`),
      h("div", { class: "muted" }, `${conversationModeLabel(s.conversationMode)} · ${policyLabel(s.concurrencyPolicy)} · ${missedTickLabel(s.missedTickPolicy)}`),
      h("q", { class: "template", "data-content": true }, s.messageTemplate.length > 200 ? `${s.messageTemplate.slice(0, 200)}…` : s.messageTemplate),
      h(
        "div",
        { "data-testid": "schedule-next" },
        ...(paused
          ? ["Paused: fires nothing until resumed."]
          : next
            ? ["Next: ", moment(next), " (", zoneName, ")"]
            : ["Next: not known yet"]),
        upcoming.length
          ? h("span", { class: "muted" }, "; then ", ...upcoming.flatMap((t, i) => (i ? [" · ", moment(t)] : [moment(t)])))
          : null,
      ),
      h(
        "div",
        { class: "muted", "data-testid": "schedule-last" },
        ...(last ? ["Last fired ", moment(last), " (", zoneName.cloneNode(true), ")"] : ["Never fired yet"]),
        s.lastRun ? h("span", {}, ": ", this.runLink(s.lastRun, "its run")) : null,
        s.conversation ? h("span", {}, " · ", h("a", { href: `#${s.conversation}`, "data-testid": "schedule-conversation" }, "its conversation")) : null,
      ),
      problemHere ? renderProblem(problemHere, "error") : null,
      h(
        "div",
        { class: "row" },
        h(
          "button",
          { type: "button", "data-testid": "schedule-firings-toggle", "aria-expanded": String(firings !== undefined), onclick: () => void this.toggleFirings(s.name) },
          firings ? "Hide firings" : "Firings",
        ),
        ...(this.owner
          ? [
              h("button", { type: "button", "data-testid": "edit-schedule", onclick: () => this.edit(s) }, "Edit"),
              paused
                ? h("button", { type: "button", "data-testid": "resume-schedule", onclick: (e: globalThis.Event) => void this.pause(s, false, e) }, "Resume")
                : h("button", { type: "button", "data-testid": "pause-schedule", onclick: (e: globalThis.Event) => void this.pause(s, true, e) }, "Pause"),
              h("button", { type: "button", class: "danger", "data-testid": "delete-schedule", onclick: (e: globalThis.Event) => this.confirmDelete(s, e) }, "Delete"),
            ]
          : []),
      ),
      firings ? this.renderFirings(firings, zone) : null,
    );
  }

  /** A moment in the schedule's zone; the reader's own clock in its title when that
   *  differs (a cron in Berlin read in New York). */
  private moment(d: Date, zone: string, seconds: boolean): HTMLElement {
    const here = browserZone();
    return h(
      "time",
      { datetime: d.toISOString(), title: here === zone ? undefined : `${dateTime(d, here, seconds)} in ${here}` },
      dateTime(d, zone, seconds),
    );
  }

  private runLink(run: string, text: string): HTMLElement {
    return h(
      "a",
      {
        href: `#${run.split("/runs/")[0] ?? ""}`,
        title: run,
        "data-testid": "firing-run",
        "data-run": run,
        onclick: (e: globalThis.Event) => {
          e.preventDefault();
          this.host.openRun(run);
        },
      },
      text,
    );
  }

  private renderFirings(firings: ScheduleFiring[], zone: string): HTMLElement {
    if (firings.length === 0) return h("p", { class: "muted", "data-testid": "firings-empty" }, "No firings yet.");
    const ticks = firings.flatMap((f) => (f.fireTime ? [timestampDate(f.fireTime)] : []));
    const seconds = needsSeconds(ticks);
    const list = h(
      "ol",
      { class: "firings", "data-testid": "firings", "data-time-zone": zone },
      ...firings.map((f) => {
        const tick = f.fireTime ? timestampDate(f.fireTime) : undefined;
        return h(
          "li",
          {
            "data-testid": "firing",
            "data-outcome": `FIRING_OUTCOME_${FiringOutcome[f.outcome] ?? "UNSPECIFIED"}`,
            "data-tick": tick ? tick.toISOString() : "",
            "data-run": f.run,
            "data-catch-up": String(f.catchUp),
          },
          tick ? this.moment(tick, zone, seconds) : h("span", {}, "?"),
          h("strong", {}, ` ${firingLabel(f.outcome)}`),
          f.catchUp ? h("span", { class: "muted" }, " (for ticks missed while stopped)") : null,
          f.run ? h("span", {}, " · ", this.runLink(f.run, `run ${f.run.split("/").pop()?.slice(0, 8) ?? ""}`)) : null,
          f.error && (f.error.code || f.error.message)
            ? h("span", { class: "muted", "data-testid": "firing-error" }, ": ", h("span", { "data-content": true }, f.error.message))
            : null,
        );
      }),
    );
    return h("div", {}, h("p", { class: "muted firings-zone" }, "Ticks in ", h("span", { class: "zone", "data-content": true }, zone), ", newest first:"), list);
  }

  private async toggleFirings(name: string): Promise<void> {
    if (this.firings.has(name)) {
      this.firings.delete(name);
      return this.render();
    }
    await this.page.busy("list-firings", async () => {
      await this.loadFirings(name);
      this.render();
    });
  }

  private async loadFirings(name: string): Promise<void> {
    const answer = await this.api.dispatcher.listScheduleFirings({ parent: name, pageSize: FIRINGS });
    this.firings.set(name, answer.firings);
  }

  private async pause(s: Schedule, pause: boolean, event: globalThis.Event): Promise<void> {
    const button = event.currentTarget as HTMLButtonElement;
    button.disabled = true;
    try {
      // Without the etag: pausing or resuming is what the person wants whatever changed
      // since the page read the schedule (an edit elsewhere), and it overwrites nothing.
      const answer = pause
        ? await this.api.dispatcher.pauseSchedule({ name: s.name })
        : await this.api.dispatcher.resumeSchedule({ name: s.name });
      this.problems.delete(s.name);
      if (answer.schedule) this.replace(answer.schedule);
    } catch (error) {
      this.problems.set(s.name, this.explain(problem(error)));
      // A stale etag: what is shown is not the schedule any more.
      if (problem(error).reason === "ERROR_REASON_ETAG_MISMATCH") await this.load();
      this.render();
    } finally {
      button.disabled = false;
    }
  }

  /** An etag conflict said in words: the schedule changed since this page read it. */
  private explain(p: Problem): Problem {
    if (p.reason !== "ERROR_REASON_ETAG_MISMATCH") return p;
    return { ...p, summary: "This schedule changed elsewhere since the page read it (another tab, a script): it was reloaded; look at it again, then try again." };
  }

  private replace(s: Schedule): void {
    this.schedules = this.schedules.map((x) => (x.name === s.name ? s : x));
    this.names.learn(s.name, s.displayName);
    this.render();
  }

  private confirmDelete(s: Schedule, event: globalThis.Event): void {
    const item = (event.currentTarget as HTMLElement).closest("li");
    if (!item) return;
    const open = item.querySelector('[data-testid="delete-confirmation"]');
    open?.remove();
    if (open) return;
    item.append(
      deleteConfirmation({
        title: s.displayName || (s.name.split("/").pop() ?? s.name),
        consequence: "It fires no more; the runs it started and their conversations stay.",
        action: "delete-schedule",
        remove: async () => {
          await this.api.dispatcher.deleteSchedule({ name: s.name, etag: s.etag });
          if (this.editing?.name === s.name) this.close();
          this.schedules = this.schedules.filter((x) => x.name !== s.name);
          this.firings.delete(s.name);
          this.render();
        },
      }),
    );
  }

  // -- The editor -----------------------------------------------------------------------

  private close(): void {
    this.editing = null;
    this.editingNew = false;
    this.targetSelect = null;
    this.editor.hidden = true;
    this.editor.replaceChildren();
  }

  /** The choices for what answers: the workspace's default, an assistant, or a handler. */
  private targets(): [string, string][] {
    return [
      ["", "the workspace's default assistant"],
      ...this.assistants.map((a): [string, string] => [a.name, `assistant ${a.displayName || (a.name.split("/").pop() ?? a.name)}`]),
      ...this.handlers.map((x): [string, string] => [x.name, `handler ${x.name.replace(/^handlers\//, "")}`]),
    ];
  }

  /** The open editor's target choices, again from what was loaded; the choice made stays. */
  private refreshTargets(): void {
    const target = this.targetSelect;
    if (target === null) return;
    const chosen = target.value;
    const options = this.targets();
    if (!options.some(([value]) => value === chosen)) options.push([chosen, chosen]);
    target.replaceChildren(...options.map(([value, text]) => h("option", { value }, text)));
    target.value = chosen;
  }

  /** Opens the editor on `s` (null: a new one). */
  private edit(s: Schedule | null): void {
    this.editing = s;
    this.editingNew = s === null;
    const select = (options: [string, string][], value: string, attrs: Record<string, string | boolean> = {}): HTMLSelectElement => {
      const element = h("select", attrs, ...options.map(([v, text]) => h("option", { value: v }, text)));
      element.value = value;
      return element;
    };
    // One choice for what answers: the workspace's default, an assistant, or a handler.
    const answeredBy = s?.handler || s?.assistant || "";
    const choices = this.targets();
    // Not loaded yet (or gone): still the schedule's own, never silently the default.
    if (!choices.some(([value]) => value === answeredBy)) choices.push([answeredBy, answeredBy]);
    const target = select(choices, answeredBy);
    this.targetSelect = target;
    // The revision that answers, for an assistant: the current one as it changes (0), or
    // one of its kept revisions, pinned.
    const revision = select([["0", "current (follows changes)"]], "0");
    const kind = select(
      [
        ["cron", "on a cron expression"],
        ["interval", "at a fixed interval"],
      ],
      s && !s.cron && s.interval ? "interval" : s?.cron ? "cron" : "interval",
      { "data-testid": "schedule-kind", "aria-label": "how it fires" },
    );
    const inputs: Record<string, HTMLElement> = {
      "schedule-name": h("input", { value: s?.displayName ?? "", maxlength: 200 }),
      "schedule-target": target,
      "schedule-revision": revision,
      "schedule-template": h("textarea", { rows: 3, maxlength: 16_000, value: s?.messageTemplate ?? "", placeholder: "e.g. Summarise yesterday's tickets ({{date}})" }),
      "schedule-cron": h("input", { value: s?.cron ?? "", placeholder: "e.g. 30 2 * * * (minute hour day month weekday)", spellcheck: false }),
      "schedule-time-zone": h("input", { value: s?.timeZone ?? "", placeholder: "UTC, or e.g. Europe/Berlin", spellcheck: false }),
      "schedule-interval": h("input", { type: "number", min: "1", step: "any", value: s?.interval ? String(durationMs(s.interval) / 1000) : "", placeholder: "e.g. 3600" }),
      "schedule-mode": select(
        MODES.map((m): [string, string] => [String(m), conversationModeLabel(m)]),
        String(s?.conversationMode || ScheduleConversationMode.SHARED),
        s ? { disabled: true } : {},
      ),
      "schedule-policy": select(POLICIES.map((p): [string, string] => [String(p), policyLabel(p)]), String(s?.concurrencyPolicy || ConcurrencyPolicy.ENQUEUE)),
      "schedule-missed": select(MISSED.map((m): [string, string] => [String(m), missedTickLabel(m)]), String(s?.missedTickPolicy || MissedTickPolicy.SKIP)),
      "schedule-timeout": h("input", { type: "number", min: "1", step: "any", value: s?.timeout ? String(durationMs(s.timeout) / 1000) : "", placeholder: "the server's default" }),
    };
    const field = ([testid, label, name]: (typeof FIELDS)[number]): HTMLElement => {
      const input = inputs[testid] as HTMLInputElement;
      input.dataset.testid = testid;
      input.setAttribute("aria-label", label);
      return h(
        "label",
        { "data-field": name },
        label,
        input,
        h("span", { class: "field-problem", "data-testid": "field-problem", "data-field": name }),
      );
    };
    const byName = (name: Field): HTMLElement => field(FIELDS.find((f) => f[2] === name) ?? FIELDS[0]);
    const cronRow = h("div", { class: "row", "data-testid": "schedule-cron-row" }, byName("cron"), byName("time_zone"));
    const intervalRow = h("div", { class: "row", "data-testid": "schedule-interval-row" }, byName("interval"));
    const showKind = (): void => {
      cronRow.hidden = kind.value !== "cron";
      intervalRow.hidden = kind.value !== "interval";
    };
    kind.addEventListener("change", showKind);
    showKind();
    // What answers is one choice, but the server names `assistant` or `handler`.
    const targetField = byName("assistant");
    targetField.append(h("span", { class: "field-problem", "data-testid": "field-problem", "data-field": "handler" }));
    const revisionField = byName("assistant_revision");
    const pinned = s?.assistant && s.assistantRevision > 0n ? String(s.assistantRevision) : "0";
    const showRevisions = (): void => {
      const assistant = target.value && !target.value.startsWith("handlers/") ? target.value : "";
      revisionField.hidden = !assistant;
      // The schedule's own pin, while its own assistant is chosen; another one follows
      // its current revision until one is picked.
      const keep = assistant && assistant === s?.assistant ? pinned : "0";
      void this.page.busy("list-schedule-revisions", () => fillRevisions(this.api, revision, assistant, [["0", "current (follows changes)"]], keep));
    };
    target.addEventListener("change", showRevisions);
    showRevisions();
    const id = h("input", { "data-testid": "schedule-id", "aria-label": "id", placeholder: "e.g. nightly (empty: one is made)", ...idAttributes("assistant_id") });
    const rows: Child[] = [
      h("h3", { "data-testid": "schedule-editor-title" }, s ? `Edit ${s.displayName || (s.name.split("/").pop() ?? "")}` : "New schedule"),
      s ? null : h("label", { "data-field": "schedule_id" }, "id", id, h("small", { class: "muted" }, `id: ${idRule("assistant_id").words}`), h("span", { class: "field-problem", "data-testid": "field-problem", "data-field": "schedule_id" })),
      byName("display_name"),
      targetField,
      revisionField,
      byName("message_template"),
      h("small", { class: "muted" }, h("code", {}, "{{fire_time}}"), ", ", h("code", {}, "{{date}}"), " and ", h("code", {}, "{{schedule}}"), " are filled in at each tick."),
      h("label", {}, "Fires ", kind),
      cronRow,
      intervalRow,
      h("div", { class: "row" }, byName("conversation_mode"), byName("concurrency_policy"), byName("missed_tick_policy")),
      byName("timeout"),
      h("div", { "data-testid": "schedule-editor-problem" }),
      h(
        "div",
        { class: "row" },
        h("button", { type: "submit", "data-testid": "save-schedule" }, s ? "Save" : "Create"),
        h("button", { type: "button", "data-testid": "close-schedule-editor", onclick: () => this.close() }, "Close"),
      ),
    ];
    fill(this.editor, ...rows);
    this.editor.hidden = false;
    this.editor.scrollIntoView({ block: "nearest" });
  }

  /** The editor's values as a schedule (the id aside), or the local problem. */
  private read(): Schedule | Problem {
    const text = (testid: string): string => this.editor.querySelector<HTMLInputElement>(`[data-testid="${testid}"]`)?.value.trim() ?? "";
    const violations: Problem["violations"] = [];
    const positive = (testid: string, field: Field): Duration | undefined => {
      const raw = text(testid);
      if (!raw) return undefined;
      const n = Number(raw);
      if (!Number.isFinite(n) || n <= 0) {
        violations.push({ field: `schedule.${field}`, description: "must be a number of seconds above 0" });
        return undefined;
      }
      return seconds(n);
    };
    const cron = text("schedule-kind") === "cron";
    const target = text("schedule-target");
    const assistant = target.startsWith("handlers/") ? "" : target;
    const interval = cron ? undefined : positive("schedule-interval", "interval");
    if (!cron && interval === undefined && !violations.length) violations.push({ field: "schedule.interval", description: "how many seconds between ticks" });
    const timeout = positive("schedule-timeout", "timeout");
    const schedule = {
      name: this.editing?.name ?? "",
      displayName: text("schedule-name"),
      assistant,
      // A pin means nothing without an assistant named.
      assistantRevision: assistant ? BigInt(text("schedule-revision") || "0") : 0n,
      handler: target.startsWith("handlers/") ? target : "",
      messageTemplate: this.editor.querySelector<HTMLTextAreaElement>('[data-testid="schedule-template"]')?.value ?? "",
      cron: cron ? text("schedule-cron") : "",
      timeZone: cron ? text("schedule-time-zone") : "",
      interval,
      timeout,
      conversationMode: Number(text("schedule-mode")) as ScheduleConversationMode,
      concurrencyPolicy: Number(text("schedule-policy")) as ConcurrencyPolicy,
      missedTickPolicy: Number(text("schedule-missed")) as MissedTickPolicy,
      etag: this.editing?.etag ?? "",
    } as Schedule;
    return violations.length ? local("INVALID_ARGUMENT", "some fields are not accepted", violations) : schedule;
  }

  /** The fields that differ from what the editor opened: the update's FieldMask. */
  private changed(before: Schedule, after: Schedule): string[] {
    const ms = (d: Duration | undefined): number => (d ? durationMs(d) : 0);
    const same: Record<Exclude<Field, "conversation_mode">, boolean> & { handler: boolean } = {
      display_name: before.displayName === after.displayName,
      assistant: before.assistant === after.assistant,
      assistant_revision: before.assistantRevision === after.assistantRevision,
      handler: before.handler === after.handler,
      message_template: before.messageTemplate === after.messageTemplate,
      cron: before.cron === after.cron,
      time_zone: before.timeZone === after.timeZone,
      interval: ms(before.interval) === ms(after.interval),
      concurrency_policy: before.concurrencyPolicy === after.concurrencyPolicy,
      missed_tick_policy: before.missedTickPolicy === after.missedTickPolicy,
      timeout: ms(before.timeout) === ms(after.timeout),
    };
    return Object.entries(same)
      .filter(([, unchanged]) => !unchanged)
      .map(([path]) => path);
  }

  /** A problem shown under the editor, each violation also beside the field it names. */
  private showEditorProblem(p: Problem, reload?: () => void): void {
    for (const slot of this.editor.querySelectorAll<HTMLElement>('[data-testid="field-problem"]')) slot.replaceChildren();
    for (const v of p.violations) {
      // `schedule.cron`, `schedule.interval.seconds`, `schedule_id`: the field's own name.
      const name = v.field.replace(/^schedule\./, "").replace(/\..*$/, "").replace(/\[\d+\]$/, "");
      const slot = this.editor.querySelector<HTMLElement>(`[data-testid="field-problem"][data-field="${CSS.escape(name)}"]`);
      const label = this.editor.querySelector<HTMLElement>(`label[data-field="${CSS.escape(name)}"]`);
      const where = slot ?? label;
      where?.append(h("span", { class: "violation", "data-testid": "field-violation", "data-field": v.field, "data-content": true }, v.description));
    }
    const box = renderProblem(this.explainEditor(p), "error");
    box.dataset.action = "save-schedule";
    if (reload) offerCurrentVersion(box, p, "reload-schedule", reload);
    this.editor.querySelector('[data-testid="schedule-editor-problem"]')?.replaceChildren(box);
  }

  private explainEditor(p: Problem): Problem {
    if (p.reason !== "ERROR_REASON_ETAG_MISMATCH") return p;
    return { ...p, summary: "Not saved: this schedule changed elsewhere since you opened it. The list shows it as it is now; load the current version, then make your change again." };
  }

  private async save(): Promise<void> {
    const parent = this.workspace;
    const before = this.editing;
    const read = this.read();
    if ("code" in read) return this.showEditorProblem(read);
    const button = this.editor.querySelector<HTMLButtonElement>('[data-testid="save-schedule"]');
    if (button) button.disabled = true;
    try {
      if (before === null) {
        if (!this.editingNew) return;
        const answer = await this.api.dispatcher.createSchedule({
          parent,
          scheduleId: this.editor.querySelector<HTMLInputElement>('[data-testid="schedule-id"]')?.value.trim() ?? "",
          schedule: read,
          requestId: requestId(),
        });
        this.editor.dataset.saved = answer.schedule?.name ?? "";
      } else {
        const paths = this.changed(before, read);
        // Switching between cron and interval clears the other one.
        if (paths.includes("cron") || paths.includes("interval")) {
          for (const path of ["cron", "time_zone", "interval"]) if (!paths.includes(path)) paths.push(path);
        }
        if (paths.length) {
          const answer = await this.api.dispatcher.updateSchedule({ schedule: read, updateMask: { paths } });
          this.editor.dataset.saved = answer.schedule?.name ?? "";
        }
      }
      this.close();
      await this.load();
    } catch (error) {
      const p = problem(error);
      const name = before?.name;
      this.showEditorProblem(
        p,
        name
          ? () =>
              void this.page.busy("reload-schedule", async () => {
                const fresh = await this.api.dispatcher.getSchedule({ name });
                if (fresh.schedule) this.edit(fresh.schedule);
              })
          : undefined,
      );
      // Changed elsewhere: the list shows it as it is now (the editor keeps what was typed).
      if (p.reason === "ERROR_REASON_ETAG_MISMATCH") {
        const schedules = await this.listAll(parent).catch(() => null);
        if (schedules && parent === this.workspace) {
          this.schedules = schedules;
          this.render();
        }
      }
    } finally {
      if (button) button.disabled = false;
    }
  }
}
