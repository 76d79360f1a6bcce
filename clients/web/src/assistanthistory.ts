// An assistant's revision history, in its editor (owners) or on its own (the other
// members: ListAssistantRevisions needs only READ): every change of its configuration, newest
// first (its number, when, by whom, and whether it was created, changed or rolled back,
// with the revision a rollback restored), a page at a time ("Load more"); two revisions
// compared field by field (revisiondiff.ts), the one picked against the current one by
// default; and for owners "Roll back to this revision" (RollbackAssistant with the etag the
// editor was opened at, so a change made elsewhere meanwhile is refused as such rather than
// overwritten), asked first, beside the revision. A rollback is a new revision; the
// revisions in between stay. A configuration that no longer holds (a delegate deleted
// since) is refused (FAILED_PRECONDITION) and said beside the revision.
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { Api } from "./api";
import { fill, h } from "./dom";
import { confirmation } from "./confirm";
import { offerCurrentVersion } from "./errors";
import {
  type Assistant,
  type AssistantRevision,
  AssistantRevisionOrigin,
} from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { browserZone, dateTime } from "./moments";
import type { Page } from "./page";
import { renderDiff } from "./revisiondiff";

/** Revisions a page (the server's default; it allows 50). */
export const REVISIONS_PAGE = 20;

export interface HistoryHost {
  /** What the console calls a user it has learned of (a member's email), "" if none. */
  title(name: string): string;
  /** The etag the editor holds (a rollback is refused if the assistant changed since). */
  etag(): string;
  /** A rollback made `assistant` current: the editor shows it. */
  rolledBack(assistant: Assistant): Promise<void>;
  /** The editor reopened on the assistant as it is now (after an etag conflict). */
  reload(): void;
}

export interface HistoryOptions {
  /** Whether Roll back is offered (owners). */
  rollback: boolean;
  /** Open (and read) from the start. */
  open: boolean;
}

function originLabel(origin: AssistantRevisionOrigin): string {
  switch (origin) {
    case AssistantRevisionOrigin.CREATED:
      return "created";
    case AssistantRevisionOrigin.UPDATED:
      return "changed";
    case AssistantRevisionOrigin.ROLLED_BACK:
      return "rolled back";
    default:
      return "made";
  }
}

export class AssistantHistory {
  readonly element: HTMLDetailsElement;
  private readonly summary = h("summary", { "data-testid": "assistant-history-toggle" });
  private readonly list = h("ol", { class: "list revisions", "data-testid": "assistant-revisions" });
  private readonly more = h("button", { type: "button", "data-testid": "assistant-revisions-more", hidden: true }, "Load more");
  private readonly from = h("select", { "data-testid": "revision-diff-from", "aria-label": "Compare revision" });
  private readonly to = h("select", { "data-testid": "revision-diff-to", "aria-label": "with revision" });
  private readonly compare = h("div", { class: "row revision-compare", "data-testid": "revision-compare", hidden: true });
  private readonly diff = h("div", { "data-testid": "revision-diff-slot" });
  private revisions: AssistantRevision[] = [];
  /** The rows shown, by revision: a revision never changes, so a read again keeps its row
   *  (and a confirmation open in it) unless it stopped being the current one. */
  private readonly rows = new Map<bigint, { element: HTMLElement; current: boolean }>();
  private next = "";
  private loading = false;
  private again = false;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly assistant: Assistant,
    private readonly options: HistoryOptions,
    private readonly host: HistoryHost,
  ) {
    this.summary.textContent = `History (revision ${assistant.revision})`;
    this.element = h(
      "details",
      { class: "assistant-history", "data-testid": "assistant-history", "data-assistant": assistant.name },
      this.summary,
      this.list,
      this.more,
      this.compare,
      this.diff,
    );
    this.more.addEventListener("click", () => void this.read(true));
    this.from.addEventListener("change", () => this.showDiff());
    this.to.addEventListener("change", () => this.showDiff());
    fill(this.compare, h("label", {}, "Compare ", this.from), h("label", {}, " with ", this.to));
    this.element.addEventListener("toggle", () => {
      if (this.element.open) void this.refresh();
    });
    // The toggle event reads it.
    if (options.open) this.element.open = true;
  }

  /** The first page read again (a save, a rollback, a change elsewhere); nothing while
   *  closed (opening reads it). A refresh asked for meanwhile runs once after it. */
  async refresh(revision?: bigint): Promise<void> {
    if (revision !== undefined) this.summary.textContent = `History (revision ${revision})`;
    if (!this.element.open) return;
    if (this.loading) {
      this.again = true;
      return;
    }
    this.loading = true;
    try {
      do {
        this.again = false;
        await this.read(false);
      } while (this.again && this.element.open);
    } finally {
      this.loading = false;
    }
  }

  private async read(more: boolean): Promise<void> {
    await this.page.busy(
      "list-assistant-revisions",
      async () => {
        const listed = await this.api.dispatcher.listAssistantRevisions({
          parent: this.assistant.name,
          pageSize: REVISIONS_PAGE,
          pageToken: more ? this.next : "",
        });
        this.next = listed.nextPageToken;
        this.more.hidden = !listed.nextPageToken;
        this.revisions = more ? [...this.revisions, ...listed.revisions] : listed.revisions;
        this.render();
      },
      more ? { button: this.more } : {},
    );
  }

  /** The newest listed: the current configuration. */
  private current(): AssistantRevision | undefined {
    return this.revisions[0];
  }

  private render(): void {
    const current = this.current();
    this.element.dataset.current = current ? String(current.revision) : "";
    this.list.dataset.count = String(this.revisions.length);
    if (current) this.summary.textContent = `History (revision ${current.revision})`;
    fill(
      this.list,
      this.revisions.length ? null : h("li", { class: "muted", "data-testid": "revisions-empty" }, "No revision kept."),
      ...this.revisions.map((r) => {
        const shown = this.rows.get(r.revision);
        if (shown && shown.current === (r === current)) return shown.element;
        const element = this.entry(r, r === current);
        this.rows.set(r.revision, { element, current: r === current });
        return element;
      }),
    );
    for (const revision of this.rows.keys()) {
      if (!this.revisions.some((r) => r.revision === revision)) this.rows.delete(revision);
    }
    // The picks keep what was chosen while it is still listed; else the last change.
    const keep = (select: HTMLSelectElement, fallback: bigint | undefined): void => {
      const chosen = select.value;
      const options = this.revisions.map((r) => String(r.revision));
      if (options.join() === [...select.options].map((o) => o.value).join()) return;
      fill(select, ...this.revisions.map((r) => h("option", { value: String(r.revision) }, `revision ${r.revision}`)));
      const listed = this.revisions.some((r) => String(r.revision) === chosen);
      select.value = listed ? chosen : String(fallback ?? "");
    };
    const shown = this.diff.querySelector<HTMLElement>('[data-testid="revision-diff"]');
    keep(this.from, (this.revisions[1] ?? current)?.revision);
    keep(this.to, current?.revision);
    this.compare.hidden = this.revisions.length < 2;
    if (shown) this.showDiff(true);
  }

  private entry(r: AssistantRevision, current: boolean): HTMLElement {
    const me = this.api.tokens.identity?.user;
    const at = r.createTime ? timestampDate(r.createTime) : undefined;
    const row = h(
      "li",
      {
        class: current ? "revision current" : "revision",
        "data-testid": "assistant-revision",
        "data-revision": String(r.revision),
        "data-origin": AssistantRevisionOrigin[r.origin] ?? "",
        "data-restored": r.restoredRevision ? String(r.restoredRevision) : undefined,
        "data-author": r.author,
        "data-current": String(current),
      },
      h(
        "div",
        { class: "revision-about" },
        h("strong", {}, `Revision ${r.revision}`),
        current ? h("span", { class: "badge", "data-testid": "revision-current" }, "current") : null,
        " ",
        h("span", { "data-testid": "revision-origin" }, originLabel(r.origin)),
        r.origin === AssistantRevisionOrigin.ROLLED_BACK && r.restoredRevision
          ? h("span", { "data-testid": "revision-restored" }, `, restored revision ${r.restoredRevision}`)
          : null,
        at ? h("span", { class: "muted" }, " ", h("time", { datetime: at.toISOString() }, dateTime(at, browserZone(), true))) : null,
        r.author
          ? h(
              "span",
              { class: "muted", "data-testid": "revision-author" },
              " by ",
              r.author === me ? "you" : this.host.title(r.author) || h("code", { title: r.author }, r.author),
            )
          : null,
      ),
      h(
        "div",
        { class: "revision-actions" },
        current
          ? null
          : h("button", { type: "button", "data-testid": "compare-revision", onclick: () => this.compareWithCurrent(r) }, "Compare with current"),
        current || !this.options.rollback
          ? null
          : h(
              "button",
              { type: "button", class: "danger", "data-testid": "rollback-revision", onclick: () => this.confirmRollback(row, r) },
              "Roll back to this revision",
            ),
      ),
    );
    return row;
  }

  private compareWithCurrent(r: AssistantRevision): void {
    const current = this.current();
    if (!current) return;
    this.from.value = String(r.revision);
    this.to.value = String(current.revision);
    this.showDiff();
  }

  /** The two picked revisions compared; `again`: only if the picks changed since it was
   *  shown (revisions never change, so neither does their diff). */
  private showDiff(again = false): void {
    const shown = this.diff.querySelector<HTMLElement>('[data-testid="revision-diff"]');
    if (again && shown?.dataset.from === this.from.value && shown.dataset.to === this.to.value) return;
    const find = (value: string): AssistantRevision | undefined => this.revisions.find((r) => String(r.revision) === value);
    const a = find(this.from.value);
    const b = find(this.to.value);
    if (!a?.assistant || !b?.assistant) {
      this.diff.replaceChildren();
      return;
    }
    this.diff.replaceChildren(renderDiff(a.revision, a.assistant, b.revision, b.assistant));
  }

  /** Asks first, beside the revision; a refusal stays in the box. */
  private confirmRollback(row: HTMLElement, r: AssistantRevision): void {
    const open = row.querySelector('[data-testid="rollback-confirmation"]');
    open?.remove();
    if (open) return;
    const latest = this.current()?.revision ?? this.assistant.revision;
    const box = confirmation({
      text:
        `Roll back to revision ${r.revision}? Its configuration becomes current as revision ${latest + 1n}; ` +
        "the revisions in between stay in the history. What is not saved in the editor is lost.",
      label: "Roll back",
      name: "rollback",
      action: "rollback-assistant",
      act: async () => {
        const answer = await this.api.dispatcher.rollbackAssistant({
          name: this.assistant.name,
          revision: r.revision,
          etag: this.host.etag(),
        });
        box.remove();
        if (answer.assistant) await this.host.rolledBack(answer.assistant);
      },
      refused: (shown, found) => offerCurrentVersion(shown, found, "reload-assistant", () => this.host.reload()),
    });
    row.append(box);
  }
}
