// The live events panel and the connection indicator in the header: every event the
// feed delivers, newest first, and the feed's state with where it resumed (in data-*, for
// whoever checks that nothing was lost). The feed itself belongs to the App, whose session
// and open workspace decide what it subscribes to; this only shows it.
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { type Child, formatTime, h } from "./dom";
import type { EventFeed, FeedState } from "./feed";
import { type Event, EventType } from "./gen/switchboard/api/events/v1/events_pb";
import {
  budgetAlertLabel,
  callDirectionLabel,
  callStateLabel,
  changeLabel,
  eventTypeLabel,
  firingLabel,
  formingOutcomeLabel,
  memoryDecisionLabel,
  messageRoleLabel,
  runUpdateLabel,
  securityLabel,
} from "./labels";
import type { Names } from "./names";
import type { Page } from "./page";

/** Events kept on screen (the feed itself remembers more ids for deduplication). */
const EVENTS_SHOWN = 300;

export class LiveEvents {
  /** The panel's heading, with the feed's status line, then its list. */
  readonly elements: HTMLElement[];
  private readonly status = h("span", { class: "muted", "data-testid": "feed" });
  private readonly list = h("ol", { class: "events", "data-testid": "events" });
  private readonly history: string[] = [];
  private shown = 0;
  private readonly filter = h(
    "select",
    { "data-testid": "event-filter", "aria-label": "event type", onchange: () => this.applyFilter() },
    h("option", { value: "" }, "every kind"),
    ...Object.entries(EventType)
      .filter((entry): entry is [string, EventType] => typeof entry[1] === "number" && entry[1] !== EventType.UNSPECIFIED)
      .map(([key, value]) => h("option", { value: `EVENT_TYPE_${key}` }, eventTypeLabel(value))),
  );

  constructor(
    private readonly page: Page,
    private readonly names: Names,
  ) {
    this.elements = [h("h2", {}, "Live events ", this.status), this.filter, this.list];
  }

  private applyFilter(): void {
    const type = this.filter.value;
    this.list.dataset.filter = type;
    for (const item of this.list.children) {
      if (item instanceof HTMLElement) item.hidden = type !== "" && item.dataset.type !== type;
    }
  }

  /** The indicator: the feed's state, or "offline" when signed out. */
  connection(state: string): void {
    const badge = this.page.part("connection");
    if (badge.dataset.state !== state) this.history.push(state);
    badge.dataset.state = state;
    badge.dataset.history = this.history.slice(-50).join(",");
    badge.textContent = state;
    // Signed out there is no feed to be offline: no badge until there is one.
    badge.hidden = state === "offline";
  }

  /** A state of the current feed (null while none is). */
  state(state: FeedState, feed: EventFeed | null): void {
    const info = this.status;
    this.connection(state);
    if (feed !== null) {
      info.dataset.cursor = feed.cursor;
      info.dataset.firstCursor = feed.firstCursor;
      info.dataset.resumedFrom = JSON.stringify(feed.resumedFrom);
      info.dataset.duplicates = String(feed.duplicates);
      info.textContent = `${state}${feed.resumedFrom.length ? ` · resumed ${feed.resumedFrom.length}×` : ""}`;
    }
  }

  cursor(cursor: string): void {
    this.status.dataset.cursor = cursor;
  }

  show(event: Event): void {
    const list = this.list;
    const type = `EVENT_TYPE_${EventType[event.type] ?? "UNSPECIFIED"}`;
    // A spoken answer sends a speech update every 200 ms or so: the run's consecutive ones
    // fold into one line that counts them.
    const update = event.payload.case === "runUpdated" ? event.payload.value.update : undefined;
    if (update?.update.case === "speech") {
      const top = list.firstElementChild as HTMLElement | null;
      if (top?.dataset.speechRun === update.run) {
        const count = Number(top.dataset.speechChunks ?? "1") + 1;
        top.dataset.speechChunks = String(count);
        const summary = top.querySelector<HTMLElement>('[data-testid="event-summary"]');
        if (summary) summary.textContent = `${update.run.split("/").pop()?.slice(0, 8) ?? ""} spoke (${count} chunks)`;
        return;
      }
    }
    const item = h(
      "li",
      { "data-testid": "event", "data-id": event.id, "data-cursor": event.cursor, "data-type": type, "data-subject": subject(event) },
      h("time", {}, formatTime(event.time ? timestampDate(event.time) : undefined)),
      " ",
      h("strong", {}, eventTypeLabel(event.type)),
      " ",
      h("span", { class: "muted", "data-testid": "event-summary" }, ...summarize(event, this.names)),
      link(event, this.names),
    );
    if (update?.update.case === "speech") Object.assign(item.dataset, { speechRun: update.run, speechChunks: "1" });
    if (this.filter.value && this.filter.value !== type) item.hidden = true;
    list.prepend(item);
    this.shown += 1;
    while (this.shown > EVENTS_SHOWN && list.lastChild) {
      list.lastChild.remove();
      this.shown -= 1;
    }
  }

  clear(): void {
    this.shown = 0;
    this.list.replaceChildren();
  }
}

/** The resource an event is about, by its full name (kept in data-subject). */
function subject(event: Event): string {
  const payload = event.payload;
  switch (payload.case) {
    case "messageCreated":
      return payload.value.message?.name ?? "";
    case "messageDeleted":
      return payload.value.message;
    case "runUpdated":
      return payload.value.update?.run ?? "";
    case "integrationChanged":
      return payload.value.integration?.name ?? "";
    case "conversationChanged":
      return payload.value.conversation?.name ?? "";
    case "workspaceChanged":
      return payload.value.workspace?.name ?? "";
    case "toolInvoked":
      return payload.value.tool;
    case "budgetChanged":
      return payload.value.budget?.name ?? "";
    case "budgetAlert":
      return payload.value.budget;
    case "fileChanged":
      return payload.value.file?.name ?? "";
    case "scheduleChanged":
      return payload.value.schedule?.name ?? "";
    case "scheduleFired":
      return payload.value.schedule;
    case "memoryChanged":
      return payload.value.memoryItem?.name ?? "";
    case "callChanged":
      return payload.value.call?.name ?? "";
    case "memoryDecided":
      return payload.value.memoryItem || payload.value.replaces || payload.value.run;
    default:
      return event.conversation || event.workspace || event.user;
  }
}

/** Where an event points: the conversation (or workspace) it is about, opened by the
 *  console's own URL scheme. */
function link(event: Event, names: Names): HTMLElement | null {
  // A call's events lead to the workspace's Calls page (its transcript is linked there).
  const call = event.payload.case === "callChanged";
  const target = call ? event.workspace : event.conversation || event.workspace;
  if (!target) return null;
  // A budget's events lead to the workspace's Budgets page.
  const budget = !event.conversation && (event.payload.case === "budgetChanged" || event.payload.case === "budgetAlert");
  // And a schedule's to its Schedules page.
  const schedule = !event.conversation && (event.payload.case === "scheduleChanged" || event.payload.case === "scheduleFired");
  // And memory's to its Memory page.
  const memory = !event.conversation && (event.payload.case === "memoryChanged" || event.payload.case === "memoryDecided");
  const page = call ? "calls" : budget ? "budgets" : schedule ? "schedules" : memory ? "memory" : "";
  const href = page ? `#${target}/${page}` : `#${target}`;
  return h(
    "a",
    { href, class: "event-link", "data-testid": "event-link", title: target },
    ` → ${names.title(target)}${page ? ` › ${page}` : ""}`,
  );
}

/** What happened, in words; what someone wrote is quoted as it is (data-content). */
function summarize(event: Event, names: Names): Child[] {
  const payload = event.payload;
  const by = event.user ? ` by ${names.title(event.user)}` : "";
  const quote = (text: string): HTMLElement =>
    h("q", { "data-content": true }, text.length > 60 ? `${text.slice(0, 60)}…` : text);
  switch (payload.case) {
    case "messageCreated": {
      const message = payload.value.message;
      const text =
        message?.parts
          .map((p) =>
            p.part.case === "text"
              ? p.part.value
              : p.part.case === "toolResult"
                ? `${p.part.value.text}`
                : p.part.case === "toolCall"
                  ? `${p.part.value.functionName || p.part.value.tool}(…)`
                  : p.part.case === "file"
                    ? `[${p.part.value.displayName || "file"}]`
                    : "",
          )
          .join(" ") ?? "";
      const role = message ? messageRoleLabel(message.role) : "a";
      return [`${role === "assistant" ? "an" : "a"} ${role} message${by}: `, quote(text)];
    }
    case "runUpdated": {
      const update = payload.value.update;
      if (!update) return [];
      const id = update.run.split("/").pop()?.slice(0, 8) ?? "";
      // A tool's function name is quoted as the model called it (`kit__echo`), as code.
      if (update.update.case === "toolCall") {
        const call = update.update.value;
        return [`${id} calls `, h("code", {}, call.functionName || call.tool.split("/").pop() || "a tool")];
      }
      // A handler's progress is its own words ("max_tokens lowered from 1,024 to 485 ..."):
      // quoted, like what a message says.
      if (update.update.case === "progress" && update.update.value.stage) {
        return [`${id} progress: `, quote(update.update.value.stage)];
      }
      // A handoff names the assistant that holds the conversation now, by its title, and
      // quotes the handing model's reason.
      if (update.update.case === "handoff") {
        const handoff = update.update.value;
        return [
          `${id} handed the conversation to `,
          h("strong", { "data-testid": "event-handoff-to", "data-assistant": handoff.toAssistant }, names.title(handoff.toAssistant)),
          ...(handoff.reason ? [": ", quote(handoff.reason)] : []),
        ];
      }
      return [`${id} ${runUpdateLabel(update.update, update.run)}`];
    }
    case "security":
      return [`${securityLabel(payload.value.kind)}${by}`];
    case "integrationChanged":
      return [
        `${payload.value.integration?.displayName || names.title(payload.value.integration?.name ?? "")} ${changeLabel(payload.value.change)}${by}`,
      ];
    case "conversationChanged":
      return [quote(payload.value.conversation?.title ?? ""), ` ${changeLabel(payload.value.change)}${by}`];
    case "workspaceChanged":
      return [quote(payload.value.workspace?.displayName ?? ""), ` ${changeLabel(payload.value.change)}${by}`];
    case "memberChanged":
      return [`${names.title(payload.value.member?.user ?? "")} ${changeLabel(payload.value.change)}${by}`];
    case "toolInvoked":
      return [`${names.title(payload.value.tool)}${payload.value.isError || payload.value.status?.code ? " failed" : " answered"}${by}`];
    case "assistantChanged":
      return [
        `${payload.value.assistant?.displayName || names.title(payload.value.assistant?.name ?? "") || "an assistant"} ${changeLabel(payload.value.change)}${by}`,
      ];
    case "budgetChanged":
      return [
        `${payload.value.budget?.displayName || names.title(payload.value.budget?.name ?? "") || "a budget"} ${changeLabel(payload.value.change)}${by}`,
      ];
    case "budgetAlert": {
      const alert = payload.value;
      const threshold = alert.percent ? ` (${alert.percent}%)` : "";
      return [`${names.title(alert.budget) || "a budget"} ${budgetAlertLabel(alert.kind)}${threshold}`];
    }
    case "fileChanged":
      return [quote(payload.value.file?.displayName ?? ""), ` ${changeLabel(payload.value.change)}${by}`];
    case "scheduleChanged":
      return [
        `${payload.value.schedule?.displayName || names.title(payload.value.schedule?.name ?? "") || "a schedule"} ${changeLabel(payload.value.change)}${by}`,
      ];
    case "callChanged": {
      const call = payload.value.call;
      if (!call) return ["a phone call"];
      const way = callDirectionLabel(call.direction);
      return [
        way === "call" ? "call " : `call ${way} `,
        quote(call.fromNumber || "unknown number"),
        " → ",
        quote(call.toNumber || "unknown number"),
        `: ${callStateLabel(call.state)}`,
      ];
    }
    case "scheduleFired": {
      const firing = payload.value.firing;
      return [`${names.title(payload.value.schedule) || "a schedule"} fired: ${firing ? firingLabel(firing.outcome) : "fired"}`];
    }
    case "memoryChanged": {
      // Said by who acted: a person, or the assistant that formed it (the event's user is
      // whose memory it is, not who changed it).
      const item = payload.value.memoryItem;
      const actor = event.actor?.name ?? "";
      const formedBy = item?.formation?.assistant ? ` by ${names.title(item.formation.assistant)}` : "";
      const who = actor.startsWith("users/") ? ` by ${names.title(actor)}` : formedBy;
      return [quote(item?.content ?? ""), ` ${changeLabel(payload.value.change)}${who}`];
    }
    case "memoryDecided": {
      const decided = payload.value;
      const outcome = formingOutcomeLabel(decided.outcome);
      if (outcome) return [outcome];
      const who = decided.assistant ? ` by ${names.title(decided.assistant)}` : "";
      return [
        `${memoryDecisionLabel(decided.action)}${who}`,
        ...(decided.candidate ? [": ", quote(decided.candidate)] : []),
        ...(decided.reason ? [" (", quote(decided.reason), ")"] : []),
      ];
    }
    case "messageFiltered":
      return [`${payload.value.rejected ? "refused" : "flagged"} by the content filter${by}`];
    case "messageDeleted":
      return [`a message deleted${by}`];
    default:
      return [by.trim()];
  }
}
