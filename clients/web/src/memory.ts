// The open workspace's Memory page (`#workspaces/w/memory`, in the centre like Files): what
// the assistants remember about the signed-in person here (ListMemoryItems on `users/{me}`
// with `workspace`: the items formed in this workspace and those people wrote) and about the
// workspace (`workspaces/{w}`). Each item shows what it says, its kind, since when it is true
// and when it was learned, who formed it (the assistant, the model, how sure it was) or who
// wrote it, links to the messages it came from, and its history (GetMemoryItem with
// `include_history`: every version, and those of the items it replaced, retired). Edit
// changes its content (UpdateMemoryItem with its etag: a change made elsewhere meanwhile is
// refused as such, and the current version offered); Forget deletes it for good, with its
// history and the items it replaced, after asking. A viewer of the workspace edits none of
// the workspace's items (the server refuses it anyway; a refusal is shown beside the item).
// The page follows MEMORY_CHANGED and MEMORY_DECIDED events; "Show" takes the retired items
// too, or only them, each marked with why and since when it stopped being true. Owners set
// the workspace's default forming policy here (the assistants that set none take it).
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { type Api, PAGE_SIZE } from "./api";
import { deleteConfirmation } from "./confirm";
import { type Child, append, fill, h } from "./dom";
import { offerCurrentVersion, problem, renderProblem } from "./errors";
import {
  MemoryChange,
  type MemoryItem,
  type MemoryItemVersion,
  MemoryKind,
  MemoryValidity,
  type Workspace,
  WorkspaceRole,
} from "./gen/switchboard/api/context/v1/context_pb";
import type { Event } from "./gen/switchboard/api/events/v1/events_pb";
import { memoryChangeLabel, memoryKindLabel } from "./labels";
import { type PolicyForm, policyForm } from "./memorypolicy";
import { browserZone, dateTime } from "./moments";
import type { Names } from "./names";
import type { Page } from "./page";

/** What "Show" offers (ListMemoryItems `validity`). */
const SHOWN: [MemoryValidity, string][] = [
  [MemoryValidity.CURRENT, "what is true now"],
  [MemoryValidity.ALL, "with what is no longer true"],
  [MemoryValidity.RETIRED, "only what is no longer true"],
];

/** `workspaces/w/conversations/c/messages/m`: a message the console can open. */
const MESSAGE = /^(workspaces\/[^/]+\/conversations\/[^/]+)\/messages\/[^/]+$/;

/** One of the page's two lists. */
interface Scope {
  kind: "user" | "workspace";
  list: HTMLElement;
  more: HTMLButtonElement;
  items: MemoryItem[];
  next: string;
  /** The parent listed ("" when there is none to list). */
  parent(): string;
}

function when(time: Timestamp | undefined): string {
  return time ? dateTime(timestampDate(time), browserZone()) : "";
}

/** Whether the item has stopped being true (an `invalid_time` now or past). */
export function retired(item: { invalidTime?: Timestamp | undefined }, now = Date.now()): boolean {
  return item.invalidTime !== undefined && timestampDate(item.invalidTime).getTime() <= now;
}

function policySummary(): HTMLElement {
  return h("summary", { "data-testid": "workspace-memory-policy-toggle" }, "The workspace's default memory policy");
}

export class MemoryPage {
  /** The page, in the centre column while it is open. */
  readonly element: HTMLElement;
  private readonly validity = h(
    "select",
    { "data-testid": "memory-validity", "aria-label": "which memories", onchange: () => void this.load() },
    ...SHOWN.map(([value, label]) => h("option", { value: String(value) }, label)),
  );
  private readonly user: Scope;
  private readonly shared: Scope;
  /** The workspace's default policy (owners), opened on demand. */
  private readonly policyBox = h(
    "details",
    { class: "memory-policy", "data-testid": "workspace-memory-policy", hidden: true },
    policySummary(),
  );
  private workspace = "";
  private role = WorkspaceRole.UNSPECIFIED;
  private pageOpen = false;
  /** Items whose history is open: it stays open (and is read again) when the list is. */
  private readonly histories = new Set<string>();
  private loading = false;
  private again = false;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
  ) {
    const scope = (kind: Scope["kind"], parent: () => string): Scope => {
      const self: Scope = {
        kind,
        list: h("ul", { class: "list memories", "data-testid": "memory-list", "data-scope": kind }),
        more: h("button", { type: "button", "data-testid": "memory-more", "data-scope": kind, hidden: true }, "More"),
        items: [],
        next: "",
        parent,
      };
      self.more.addEventListener("click", () => void this.loadScope(self, true));
      return self;
    };
    this.user = scope("user", () => this.api.tokens.identity?.user ?? "");
    this.shared = scope("workspace", () => this.workspace);
    this.policyBox.addEventListener("toggle", () => {
      if (this.policyBox.open) void this.loadPolicy();
    });
    this.element = h(
      "section",
      { class: "page memory-page", "data-testid": "memory-page", hidden: true },
      h("div", { class: "row" }, h("label", {}, "Show ", this.validity)),
      h(
        "section",
        { "data-testid": "memory-user" },
        h("h3", {}, "What this workspace's assistants remember about you"),
        h("p", { class: "muted" }, "Only you see these. What they learned in another workspace stays there; what you wrote yourself follows you."),
        this.user.list,
        this.user.more,
      ),
      h(
        "section",
        { "data-testid": "memory-workspace" },
        h("h3", {}, "About this workspace"),
        h("p", { class: "muted" }, "Every member sees these; editors and owners change them."),
        this.shared.list,
        this.shared.more,
        this.policyBox,
      ),
    );
  }

  /** A workspace opened; `role` is the caller's there. */
  open(workspace: string, role: WorkspaceRole): void {
    if (workspace !== this.workspace) this.histories.clear();
    this.workspace = workspace;
    this.role = role;
    this.element.dataset.workspace = workspace;
    this.policyBox.hidden = role !== WorkspaceRole.OWNER;
    this.policyBox.open = false;
    if (this.pageOpen) void this.load();
  }

  /** The Memory page shown (true) or left (false). */
  show(open: boolean): void {
    this.pageOpen = open;
    this.element.hidden = !open;
    if (open) void this.load();
    else for (const scope of [this.user, this.shared]) this.empty(scope);
  }

  clear(): void {
    this.workspace = "";
    this.role = WorkspaceRole.UNSPECIFIED;
    this.histories.clear();
    this.element.hidden = true;
    this.pageOpen = false;
    this.policyBox.open = false;
    fill(this.policyBox, policySummary());
    for (const scope of [this.user, this.shared]) this.empty(scope);
  }

  /** Memory changed or was decided about: the lists are read again (once, however many). */
  apply(event: Event): void {
    if (!this.pageOpen || !this.workspace) return;
    const payload = event.payload;
    const user = this.user.parent();
    const listed = (name: string): boolean =>
      (user !== "" && name.startsWith(`${user}/memories/`)) || name.startsWith(`${this.workspace}/memories/`);
    let ours = false;
    if (payload.case === "memoryChanged") {
      ours = listed(payload.value.memoryItem?.name ?? "");
    } else if (payload.case === "memoryDecided") {
      // A decision about the person's scope is addressed to them (no workspace).
      ours = event.workspace === this.workspace || listed(payload.value.memoryItem) || listed(payload.value.replaces);
    }
    if (ours) void this.load();
  }

  private empty(scope: Scope): void {
    scope.items = [];
    scope.next = "";
    scope.more.hidden = true;
    scope.list.replaceChildren();
    delete scope.list.dataset.count;
  }

  /** Both lists, from their first page; a load asked for meanwhile runs once after it. */
  private async load(): Promise<void> {
    if (this.loading) {
      this.again = true;
      return;
    }
    this.loading = true;
    try {
      do {
        this.again = false;
        await Promise.all([this.loadScope(this.user), this.loadScope(this.shared)]);
      } while (this.again && this.pageOpen);
    } finally {
      this.loading = false;
    }
  }

  private async loadScope(scope: Scope, more = false): Promise<void> {
    const parent = scope.parent();
    const workspace = this.workspace;
    if (!parent || !workspace || !this.pageOpen) return;
    const validity = Number(this.validity.value) as MemoryValidity;
    await this.page.busy(
      "list-memory",
      async () => {
        const listed = await this.api.context.listMemoryItems({
          parent,
          pageSize: PAGE_SIZE,
          pageToken: more ? scope.next : "",
          validity,
          // In the person's own scope: what was formed here, and what people wrote.
          workspace: scope.kind === "user" ? workspace : "",
        });
        if (workspace !== this.workspace || !this.pageOpen || validity !== Number(this.validity.value)) return;
        scope.next = listed.nextPageToken;
        scope.more.hidden = !listed.nextPageToken;
        scope.items = more ? [...scope.items, ...listed.memoryItems] : listed.memoryItems;
        this.render(scope);
      },
      more ? { button: scope.more } : {},
    );
  }

  private render(scope: Scope): void {
    // An item being edited keeps its editor (and what was typed in it) across a reload.
    const editing = new Map<string, HTMLElement>();
    for (const item of scope.list.querySelectorAll<HTMLElement>('[data-testid="memory-item"][data-editing="true"]')) {
      editing.set(item.dataset.name ?? "", item);
    }
    const validity = Number(this.validity.value) as MemoryValidity;
    const none =
      scope.kind === "user"
        ? "Nothing remembered about you here yet."
        : "Nothing remembered about this workspace yet.";
    fill(
      scope.list,
      scope.items.length === 0
        ? h("li", { class: "muted", "data-testid": "memory-empty" }, validity === MemoryValidity.RETIRED ? "Nothing here has stopped being true." : none)
        : null,
      ...scope.items.map((item) => editing.get(item.name) ?? this.entry(scope, item)),
    );
    scope.list.dataset.count = String(scope.items.length);
  }

  private canChange(scope: Scope): boolean {
    return scope.kind === "user" || this.role === WorkspaceRole.EDITOR || this.role === WorkspaceRole.OWNER;
  }

  /** One item's row. */
  private entry(scope: Scope, item: MemoryItem): HTMLElement {
    const gone = retired(item);
    const formation = item.formation;
    const row = h("li", {
      class: gone ? "memory-item retired" : "memory-item",
      "data-testid": "memory-item",
      "data-name": item.name,
      "data-scope": scope.kind,
      "data-kind": MemoryKind[item.kind] ?? "",
      "data-retired": String(gone),
      "data-version": String(item.version),
      "data-etag": item.etag,
      "data-formed": String(formation !== undefined),
      "data-supersedes": item.supersedes || undefined,
      "data-superseded-by": item.supersededBy || undefined,
    });
    const content = h("p", { class: "memory-content", "data-testid": "memory-content", "data-content": true }, item.content);
    const facts = [
      memoryKindLabel(item.kind),
      item.validTime ? `true since ${when(item.validTime)}` : "",
      item.createTime ? `learned ${when(item.createTime)}` : "",
      item.version > 1 ? `version ${item.version}` : "",
    ].filter(Boolean);
    const problemSlot = h("div", { "data-testid": "memory-problem" });
    const about = h(
      "div",
      { class: "memory-about" },
      content,
      gone
        ? h(
            "p",
            { class: "memory-retired-note", "data-testid": "memory-retired" },
            h("span", { class: "badge" }, "retired"),
            ` no longer true since ${when(item.invalidTime)}`,
            item.invalidReason ? ": " : "",
            item.invalidReason ? h("q", { "data-testid": "memory-invalid-reason", "data-content": true }, item.invalidReason) : null,
            item.supersededBy ? " (a newer version replaced it)" : "",
          )
        : null,
      h("small", { class: "muted memory-meta", "data-testid": "memory-meta" }, facts.join(" · ")),
      this.origin(item),
      this.sources(item),
      this.history(item),
      problemSlot,
    );
    const actions = h("div", { class: "memory-actions" });
    if (this.canChange(scope)) {
      if (!gone) {
        actions.append(
          h("button", { type: "button", "data-testid": "edit-memory", onclick: () => this.edit(scope, row, item, content, problemSlot) }, "Edit"),
        );
      }
      actions.append(
        h(
          "button",
          {
            type: "button",
            class: "danger",
            "data-testid": "forget-memory",
            onclick: () => {
              if (row.querySelector('[data-testid="delete-confirmation"]')) return;
              row.append(
                deleteConfirmation({
                  title: `“${item.content.length > 60 ? `${item.content.slice(0, 60)}…` : item.content}”`,
                  consequence:
                    "It is forgotten for good: the item, its history and the earlier versions it replaced are removed, and no assistant uses it again.",
                  action: "forget-memory",
                  remove: async () => {
                    await this.api.context.deleteMemoryItem({ name: item.name });
                    this.histories.delete(item.name);
                    scope.items = scope.items.filter((x) => x.name !== item.name);
                    this.render(scope);
                  },
                }),
              );
            },
          },
          "Forget",
        ),
      );
    }
    append(row, [about, actions]);
    return row;
  }

  /** Who formed it (the assistant or the workspace's default, the model, how sure), or who
   *  wrote it. */
  private origin(item: MemoryItem): HTMLElement {
    const formation = item.formation;
    if (formation === undefined) {
      return h(
        "small",
        { class: "muted memory-origin", "data-testid": "memory-written", "data-creator": item.creator },
        item.creator ? `written by ${this.names.title(item.creator)}` : "written by a person",
      );
    }
    const by: Child = formation.assistant
      ? h("strong", { "data-testid": "memory-assistant" }, this.names.title(formation.assistant))
      : "the workspace's default policy";
    return h(
      "small",
      {
        class: "muted memory-origin",
        "data-testid": "memory-formation",
        "data-assistant": formation.assistant,
        "data-model": formation.model,
        "data-policy": formation.policy,
        "data-run": formation.run,
        "data-confidence": String(item.confidence),
      },
      "formed by ",
      by,
      formation.model ? " with " : "",
      formation.model ? h("code", {}, formation.model) : null,
      ` · ${Math.round(item.confidence * 100)}% sure`,
    );
  }

  /** The messages it came from, each a link that opens its conversation at it. */
  private sources(item: MemoryItem): HTMLElement | null {
    if (item.sourceMessages.length === 0) return null;
    const links: Child[] = [];
    item.sourceMessages.forEach((message, i) => {
      if (i > 0) links.push(", ");
      links.push(
        MESSAGE.test(message)
          ? h("a", { href: `#${message}`, "data-testid": "memory-source", "data-message": message, title: message }, this.names.title(message))
          : h("code", { "data-testid": "memory-source", "data-message": message }, message),
      );
    });
    return h("small", { class: "memory-sources", "data-testid": "memory-sources" }, item.sourceMessages.length > 1 ? "From the messages " : "From the message ", ...links);
  }

  /** Its versions and those of the items it replaced, read when opened. */
  private history(item: MemoryItem): HTMLElement {
    const versions = h("ol", { class: "memory-versions", "data-testid": "memory-versions" });
    const details = h(
      "details",
      { class: "memory-history", "data-testid": "memory-history" },
      h("summary", { "data-testid": "memory-history-toggle" }, item.supersedes ? "History, with what it replaced" : "History"),
      versions,
    );
    details.addEventListener("toggle", () => {
      if (details.open) {
        this.histories.add(item.name);
        if (details.dataset.loaded !== "true") this.readHistory(item);
      } else {
        this.histories.delete(item.name);
        delete details.dataset.loaded; // opened again, it is read again
      }
    });
    if (this.histories.has(item.name)) {
      details.open = true;
      // The toggle event fires for this too, which reads it.
    }
    return details;
  }

  /** Reads `item`'s history into its row as the page shows it when the answer comes: the
   *  list may have been drawn again meanwhile (a memory event), and a history opened just
   *  before that was read into the row it replaced, which is no longer shown. */
  private readHistory(item: MemoryItem): void {
    void this.page.busy(
      "memory-history",
      async () => {
        const got = await this.api.context.getMemoryItem({ name: item.name, includeHistory: true });
        for (const scope of [this.user, this.shared]) {
          for (const row of scope.list.querySelectorAll<HTMLElement>('[data-testid="memory-item"]')) {
            const details = row.dataset.name === item.name ? row.querySelector<HTMLDetailsElement>('[data-testid="memory-history"]') : null;
            const versions = details?.querySelector<HTMLElement>('[data-testid="memory-versions"]');
            if (!details || !versions) continue;
            fill(versions, ...got.history.map((v) => this.version(item, v)));
            versions.dataset.count = String(got.history.length);
            details.dataset.loaded = "true";
            // Opened by the person on the row drawn over: open on this one (read already).
            if (this.histories.has(item.name)) details.open = true;
          }
        }
      },
      {},
    );
  }

  private version(item: MemoryItem, v: MemoryItemVersion): HTMLElement {
    const earlier = v.memoryItem !== item.name;
    const gone = retired(v) || v.change === MemoryChange.RETIRED;
    return h(
      "li",
      {
        class: gone ? "memory-version retired" : "memory-version",
        "data-testid": "memory-version",
        "data-memory-item": v.memoryItem,
        "data-version": String(v.version),
        "data-change": MemoryChange[v.change] ?? "",
        "data-earlier": String(earlier),
        "data-retired": String(gone),
      },
      h(
        "small",
        { class: "muted" },
        earlier ? "earlier item, " : "",
        `version ${v.version}: ${memoryChangeLabel(v.change)}`,
        v.changeTime ? ` ${when(v.changeTime)}` : "",
        v.editor ? ` by ${this.names.title(v.editor)}` : "",
        gone ? " " : "",
        gone ? h("span", { class: "badge", "data-testid": "memory-version-retired" }, "retired") : null,
      ),
      h("p", { "data-testid": "memory-version-content", "data-content": true }, v.content),
      v.invalidTime
        ? h(
            "small",
            { class: "muted" },
            `no longer true since ${when(v.invalidTime)}`,
            v.invalidReason ? ": " : "",
            v.invalidReason ? h("q", { "data-content": true }, v.invalidReason) : null,
          )
        : null,
    );
  }

  /** Edit in place: the content in a text box, saved with the item's etag. */
  private edit(scope: Scope, row: HTMLElement, item: MemoryItem, content: HTMLElement, problemSlot: HTMLElement): void {
    if (row.dataset.editing === "true") return;
    row.dataset.editing = "true";
    let etag = item.etag;
    const box = h("textarea", { "data-testid": "memory-edit-content", "aria-label": "what it remembers", rows: 3, maxlength: 10_000 });
    box.value = item.content;
    const close = (): void => {
      delete row.dataset.editing;
      form.replaceWith(content);
    };
    const save = h("button", { type: "submit", "data-testid": "save-memory" }, "Save");
    const form = h(
      "form",
      {
        class: "inline memory-editor",
        "data-testid": "memory-editor",
        onsubmit: (e: globalThis.Event) => {
          e.preventDefault();
          void submit();
        },
      },
      box,
      h("div", { class: "row" }, save, h("button", { type: "button", "data-testid": "cancel-memory-edit", onclick: close }, "Cancel")),
    );
    const submit = async (): Promise<void> => {
      problemSlot.replaceChildren();
      save.disabled = true;
      try {
        const answer = await this.api.context.updateMemoryItem({
          memoryItem: { name: item.name, etag, content: box.value.trim() },
          updateMask: { paths: ["content"] },
        });
        const saved = answer.memoryItem;
        delete row.dataset.editing;
        if (saved) {
          scope.items = scope.items.map((x) => (x.name === saved.name ? saved : x));
          row.replaceWith(this.entry(scope, saved));
        }
      } catch (error) {
        const p = problem(error);
        const shown = renderProblem(p);
        shown.dataset.action = "save-memory";
        offerCurrentVersion(shown, p, "reload-memory", (button) =>
          void this.page.busy(
            "reload-memory",
            async () => {
              const fresh = (await this.api.context.getMemoryItem({ name: item.name })).memoryItem;
              if (!fresh) return;
              etag = fresh.etag;
              box.value = fresh.content;
              shown.remove();
            },
            { button },
          ),
        );
        problemSlot.replaceChildren(shown);
      } finally {
        save.disabled = false;
      }
    };
    content.replaceWith(form);
    box.focus();
  }

  /** The workspace's default policy (owners): read when opened, saved with its etag. */
  private async loadPolicy(): Promise<void> {
    const name = this.workspace;
    await this.page.busy("load-workspace-policy", async () => {
      const workspace = (await this.api.context.getWorkspace({ name })).workspace;
      if (!workspace || name !== this.workspace) return;
      this.renderPolicy(workspace);
    });
  }

  private renderPolicy(workspace: Workspace): void {
    const form: PolicyForm = policyForm("workspace", workspace.memoryPolicy, true);
    const where = h("div", { "data-testid": "workspace-policy-problem" });
    const save = h("button", { type: "submit", "data-testid": "save-workspace-policy" }, "Save the default");
    fill(
      this.policyBox,
      policySummary(),
      h(
        "form",
        {
          class: "inline editor",
          "data-etag": workspace.etag,
          onsubmit: (e: globalThis.Event) => {
            e.preventDefault();
            void (async () => {
              where.replaceChildren();
              save.disabled = true;
              try {
                const policy = form.read();
                const answer = await this.api.context.updateWorkspace({
                  workspace: { name: workspace.name, etag: workspace.etag, ...(policy ? { memoryPolicy: policy } : {}) },
                  updateMask: { paths: ["memory_policy"] },
                });
                if (answer.workspace) {
                  this.renderPolicy(answer.workspace);
                  this.policyBox.dataset.saved = answer.workspace.etag;
                }
              } catch (error) {
                const p = problem(error);
                const shown = renderProblem(p);
                shown.dataset.action = "save-workspace-policy";
                offerCurrentVersion(shown, p, "reload-workspace-policy", () => void this.loadPolicy());
                where.replaceChildren(shown);
              } finally {
                save.disabled = false;
              }
            })();
          },
        },
        form.element,
        where,
        save,
      ),
    );
    this.policyBox.open = true;
  }
}
