// The open workspace's assistants: listed (the default marked), created and edited by
// owners (instructions, handler, model settings, the tools each integration lends it and
// which of them need a person's approval, the assistants it may ask (its delegates) and
// those it may hand its conversations over to (its handoffs), context budget, tool-step
// limit, the workspace default, what it learns from conversations (its memory policy)),
// with the etag sent back so a change made elsewhere meanwhile is refused as such
// (ABORTED / ERROR_REASON_ETAG_MISMATCH) rather than overwritten; and "Try it", a
// conversation opened beside the editor with the assistant chosen in the composer. Its
// revision history (assistanthistory.ts) is in the editor, with Roll back; the other
// members open it read-only from the list (History).
import { type Api, PAGE_SIZE, requestId } from "./api";
import { AssistantHistory, type HistoryHost } from "./assistanthistory";
import { deleteConfirmation } from "./confirm";
import { fill, h } from "./dom";
import { SearchMode } from "./gen/switchboard/api/context/v1/context_pb";
import { offerCurrentVersion, type Problem, problem, renderProblem } from "./errors";
import type { Assistant, AssistantDelegate, AssistantHandoff, AssistantTools } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { HandoffHistory } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import type { Event } from "./gen/switchboard/api/events/v1/events_pb";
import { IntegrationKind } from "./gen/switchboard/api/integration/v1/integration_pb";
import { type Integrations, lastSegment } from "./integrations";
import { idAttributes, idRule } from "./ids";
import { type PolicyForm, policyForm, samePolicy } from "./memorypolicy";
import type { Page } from "./page";

export interface AssistantsHost {
  workspace(): string;
  /** Opens a new conversation to try the assistant in, the assistant chosen. */
  tryIt(assistant: Assistant): Promise<void>;
  /** The list changed (the composer's choices follow). */
  changed(): void;
  /** The list was read again (the overview's hint follows). */
  listed(): void;
  /** The editor opened (true) or closed (false): the host gives it the centre. */
  editing(open: boolean): void;
  /** What the console calls a user (`users/{u}`) it has learned of, "" if none. */
  title(name: string): string;
}

const FIELDS = [
  "display_name",
  "description",
  "instructions",
  "handler",
  "model",
  "tools",
  "context_token_budget",
  "max_tool_steps",
  "workspace_default",
  "voice",
  "retrieval",
  "delegates",
  "handoffs",
];

/** The most delegates (and handoffs) an assistant may list, and the longest description
 *  of one (docs/delegation.md); the server refuses more, naming the field. */
const MAX_DELEGATES = 16;
const MAX_DELEGATE_DESCRIPTION = 1_000;

/** The other assistants one lists (Assistant.delegates, Assistant.handoffs): each an
 *  assistant of the workspace with what its model reads about it. */
interface TargetKind {
  /** The fieldset's test handle, and the prefix of its rows' and inputs' handles. */
  testid: string;
  row: string;
  legend: string;
  /** The description's label and placeholder, for the assistant titled `title`. */
  label(title: string): string;
  placeholder: string;
}

const DELEGATES: TargetKind = {
  testid: "assistant-delegates",
  row: "delegate",
  legend: `Delegates (assistants it may ask, at most ${MAX_DELEGATES})`,
  label: (title) => `What to ask ${title} for`,
  placeholder: "what to ask it for (empty: its own description)",
};

const HANDOFFS: TargetKind = {
  testid: "assistant-handoffs",
  row: "handoff",
  legend: `Handoffs (assistants it may hand the conversation over to, at most ${MAX_DELEGATES})`,
  label: (title) => `When to hand over to ${title}`,
  placeholder: "when to hand over to it (empty: its own description)",
};

/** What of the conversation a handoff's target sees (AssistantHandoff.history); kept as
 *  stored when the assistant is saved again. */
function historySelect(title: string, history: HandoffHistory): HTMLSelectElement {
  const select = h(
    "select",
    { "data-testid": "handoff-history", "aria-label": `What ${title} sees of the conversation` },
    h("option", { value: String(HandoffHistory.UNSPECIFIED) }, "sees the whole history"),
    h("option", { value: String(HandoffHistory.SINCE_HANDOFF) }, "sees only what comes from the handoff on"),
    h("option", { value: String(HandoffHistory.SUMMARY) }, "sees a summary, then what comes from the handoff on"),
  );
  select.value = String(history);
  return select;
}

export class Assistants {
  /** The list and its New button, in the side column. */
  readonly elements: HTMLElement[];
  /** The editor, which the host puts in the centre: it is some 2,600 px tall with an
   *  integration's tools, delegates and handoffs, and squeezed into the side column it
   *  overflowed it while the centre stood empty. */
  readonly editor = h("form", { class: "inline editor assistant-editor", "data-testid": "assistant-editor", hidden: true });
  private readonly list = h("ul", { class: "list", "data-testid": "assistants" });
  private readonly newButton = h(
    "button",
    { type: "button", class: "manage", "data-testid": "new-assistant", hidden: true, onclick: () => void this.edit(null) },
    "New assistant",
  );
  private assistants: Assistant[] = [];
  /** The workspace `assistants` lists ("" before a list arrives). */
  private listedFor = "";
  private handlers: string[] = [];
  private manage = false;
  private write = false;
  /** The assistant being edited ("" for a new one), null when the editor is closed. */
  private editing: string | null = null;
  private etag = "";
  /** The open editor's memory policy form. */
  private policy: PolicyForm | null = null;
  /** The open editor's (or the history view's) revision history. */
  private history: AssistantHistory | null = null;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly integrations: Integrations,
    private readonly host: AssistantsHost,
  ) {
    this.elements = [h("h2", {}, "Assistants"), this.list, this.newButton];
    this.editor.addEventListener("submit", (event) => {
      event.preventDefault();
      void this.save();
    });
  }

  /** Owners manage assistants; editors and owners try them (a viewer cannot write). */
  canManage(manage: boolean, write: boolean): void {
    this.write = write;
    this.manage = manage;
    this.newButton.hidden = !manage;
    if (!manage) this.close();
    this.render();
  }

  all(): Assistant[] {
    return this.assistants;
  }

  /** How many the open workspace has; null until they are listed. */
  count(): number | null {
    const workspace = this.host.workspace();
    return workspace && this.listedFor === workspace ? this.assistants.length : null;
  }

  async load(): Promise<void> {
    const parent = this.host.workspace();
    if (!parent) return;
    await this.page.busy("list-assistants", async () => {
      const [assistants, handlers] = await Promise.all([
        this.api.dispatcher.listAssistants({ parent, pageSize: PAGE_SIZE }),
        this.api.dispatcher.listHandlers({ parent, pageSize: PAGE_SIZE }),
      ]);
      if (parent !== this.host.workspace()) return;
      this.assistants = assistants.assistants;
      this.listedFor = parent;
      this.handlers = handlers.handlers.map((x) => x.name);
      this.render();
      this.host.listed();
    });
  }

  apply(event: Event): void {
    if (event.payload.case === "assistantChanged" && event.workspace === this.host.workspace()) {
      void this.load().then(() => this.host.changed());
      if (event.payload.value.assistant?.name === this.editor.dataset.assistant) void this.history?.refresh();
    }
  }

  clear(): void {
    this.assistants = [];
    this.listedFor = "";
    this.close();
    this.list.replaceChildren();
  }

  private render(): void {
    if (this.assistants.length === 0) {
      fill(
        this.list,
        h(
          "li",
          { class: "muted", "data-testid": "assistants-empty" },
          this.host.workspace()
            ? this.manage
              ? this.integrations.all().length
                ? "None yet: create one that uses the tools of the integrations below."
                : "None yet: register an integration below, then create an assistant that uses its tools."
              : "None in this workspace."
            : "",
        ),
      );
      return;
    }
    this.list.replaceChildren(
      ...this.assistants.map((a) =>
        h(
          "li",
          {
            class: "assistant",
            "data-testid": "assistant",
            "data-name": a.name,
            "data-default": String(a.workspaceDefault),
            "data-voice": String(a.voice !== undefined),
            "data-delegates": a.delegates.map((d) => d.assistant || d.handler).join(" "),
            "data-handoffs": a.handoffs.map((d) => d.assistant).join(" "),
          },
          h("strong", {}, a.displayName || lastSegment(a.name)),
          a.workspaceDefault ? h("span", { class: "badge", "data-testid": "assistant-default" }, "default") : null,
          a.voice ? h("span", { class: "badge", "data-testid": "assistant-speaks" }, "speaks") : null,
          h(
            "span",
            { class: "muted" },
            ` ${a.handler || "handlers/llm"}${a.tools.length ? ` · ${a.tools.length} integration${a.tools.length > 1 ? "s" : ""}` : ""}`,
            a.delegates.length ? h("span", { "data-testid": "assistant-delegates-count" }, ` · asks ${a.delegates.length} assistant${a.delegates.length > 1 ? "s" : ""}`) : null,
            a.handoffs.length ? h("span", { "data-testid": "assistant-handoffs-count" }, ` · hands over to ${a.handoffs.length}`) : null,
          ),
          h(
            "div",
            { class: "row" },
            h("button", { type: "button", "data-testid": "try-assistant", hidden: !this.write, onclick: (e: globalThis.Event) => void this.tryIt(a, e) }, "Try it"),
            h("button", { type: "button", class: "manage", hidden: !this.manage, "data-testid": "edit-assistant", onclick: () => void this.edit(a) }, "Edit"),
            // Owners see the history in the editor.
            h("button", { type: "button", hidden: this.manage, "data-testid": "assistant-history-open", onclick: () => this.showHistory(a) }, "History"),
            h("button", { type: "button", class: "manage danger", hidden: !this.manage, "data-testid": "delete-assistant", onclick: (e: globalThis.Event) => this.confirmDelete(a, e) }, "Delete"),
          ),
        ),
      ),
    );
  }

  /** "Try it" takes the person to the conversation it opens: the editor closes (what was
   *  saved is what gets tried; the editor reopens with Edit), wherever it was clicked. */
  private async tryIt(assistant: Assistant, event: globalThis.Event): Promise<void> {
    const button = event.currentTarget as HTMLButtonElement;
    await this.page.busy(
      "try-assistant",
      async () => {
        this.close();
        await this.host.tryIt(assistant);
      },
      { button },
    );
  }

  /** Asks first, in place, then DeleteAssistant with the etag the list showed: a change
   *  made elsewhere meanwhile is refused rather than deleted unseen. */
  private confirmDelete(assistant: Assistant, event: globalThis.Event): void {
    const item = (event.currentTarget as HTMLElement).closest("li");
    if (!item) return;
    const open = item.querySelector('[data-testid="delete-confirmation"]');
    open?.remove();
    if (open) return;
    const box = deleteConfirmation({
      title: assistant.displayName || lastSegment(assistant.name),
      consequence: assistant.workspaceDefault
        ? "It answers the workspace's messages that name no assistant: they go to the router's choice instead."
        : "Messages that name it will be refused.",
      action: "delete-assistant",
      remove: async () => {
        await this.api.dispatcher.deleteAssistant({ name: assistant.name, etag: assistant.etag });
        if (this.editing === assistant.name) this.close();
        this.assistants = this.assistants.filter((x) => x.name !== assistant.name);
        this.render();
        this.host.changed();
      },
    });
    item.append(box);
  }

  private close(): void {
    const open = !this.editor.hidden;
    this.editing = null;
    this.policy = null;
    this.history = null;
    this.editor.hidden = true;
    this.editor.replaceChildren();
    delete this.editor.dataset.assistant;
    delete this.editor.dataset.revision;
    if (open) this.host.editing(false);
  }

  /** The history of `assistant` for a member who does not edit it, where the editor opens. */
  private showHistory(assistant: Assistant): void {
    this.editing = null;
    this.policy = null;
    this.history = new AssistantHistory(this.api, this.page, assistant, { rollback: false, open: true }, this.historyHost());
    fill(
      this.editor,
      h("h3", { "data-testid": "editor-title" }, `History of ${assistant.displayName || lastSegment(assistant.name)}`),
      this.history.element,
      h("div", { class: "row" }, h("button", { type: "button", "data-testid": "close-editor", onclick: () => this.close() }, "Close")),
    );
    this.editor.dataset.assistant = assistant.name;
    this.editor.dataset.revision = String(assistant.revision);
    this.editor.hidden = false;
    this.host.editing(true);
  }

  private historyHost(): HistoryHost {
    const reopen = async (name: string): Promise<void> => {
      const fresh = (await this.api.dispatcher.getAssistant({ name })).assistant;
      if (fresh) await this.edit(fresh, true);
    };
    return {
      title: (name) => this.host.title(name),
      etag: () => this.etag,
      rolledBack: async (assistant) => {
        await this.edit(assistant, true);
        await this.load();
        this.host.changed();
      },
      reload: () => {
        const name = this.editing;
        if (name) void this.page.busy("reload-assistant", () => reopen(name));
      },
    };
  }

  /** Opens the editor on `assistant` (null: a new one), its history open if `history`. */
  private async edit(assistant: Assistant | null, history = false): Promise<void> {
    this.editing = assistant?.name ?? "";
    this.etag = assistant?.etag ?? "";
    const a = assistant;
    this.history = a ? new AssistantHistory(this.api, this.page, a, { rollback: this.manage, open: history }, this.historyHost()) : null;
    const field = (testid: string, label: string, input: HTMLElement): HTMLElement => {
      input.dataset.testid = testid;
      input.setAttribute("aria-label", label);
      return h("label", {}, label, input);
    };
    const id = h("input", { placeholder: "e.g. helper (empty: one is made)", ...idAttributes("assistant_id") });
    const handler = h(
      "select",
      {},
      h("option", { value: "" }, "handlers/llm (a model)"),
      ...this.handlers.map((name) => h("option", { value: name }, name)),
    );
    handler.value = a?.handler ?? "";
    const model = a?.model;
    const voice = a?.voice;
    const retrieval = a?.retrieval;
    const mode = h(
      "select",
      {},
      h("option", { value: String(SearchMode.UNSPECIFIED) }, "Default (hybrid once indexed)"),
      h("option", { value: String(SearchMode.FULL_TEXT) }, "Full-text"),
      h("option", { value: String(SearchMode.SEMANTIC) }, "Semantic"),
      h("option", { value: String(SearchMode.HYBRID) }, "Hybrid"),
    );
    mode.value = String(retrieval?.mode ?? SearchMode.UNSPECIFIED);
    const numberInput = (value: number | undefined, attrs: Record<string, string | number> = {}): HTMLInputElement =>
      h("input", { type: "number", value: value ? String(value) : "", ...attrs });
    fill(
      this.editor,
      h("h3", { "data-testid": "editor-title" }, a ? `Edit ${a.displayName || lastSegment(a.name)}` : "New assistant"),
      this.history?.element,
      a ? null : field("assistant-id", "id", id),
      a ? null : h("small", { class: "muted", "data-testid": "assistant-id-format" }, `id: ${idRule("assistant_id").words}`),
      field("assistant-name", "Display name", h("input", { value: a?.displayName ?? "", required: true, maxlength: 200 })),
      field("assistant-instructions", "Instructions", h("textarea", { rows: 4 }, a?.instructions ?? "")),
      field("assistant-handler", "Handler", handler),
      h(
        "div",
        { class: "row" },
        field("assistant-provider", "Provider", h("input", { value: model?.provider ?? "", placeholder: "configured chain" })),
        field("assistant-model", "Model", h("input", { value: model?.model ?? "", placeholder: "provider's" })),
        field("assistant-temperature", "Temperature", numberInput(model?.temperature, { min: 0, max: 2, step: "any" })),
        field("assistant-max-output", "Max output tokens", numberInput(model?.maxOutputTokens, { min: 0 })),
      ),
      h(
        "div",
        { class: "row" },
        field("assistant-budget", "Context token budget", numberInput(a?.contextTokenBudget, { min: 0 })),
        field("assistant-steps", "Tool-step limit", numberInput(a?.maxToolSteps, { min: 0, max: 32 })),
      ),
      h("fieldset", { "data-testid": "assistant-tools" }, h("legend", {}, "Tools (✓ enables, ✋ needs approval)"), h("span", { class: "muted" }, "Loading…")),
      this.targetsField(DELEGATES, a, a?.delegates ?? []),
      this.targetsField(HANDOFFS, a, a?.handoffs ?? []),
      // Voice settings (Assistant.voice): with them the assistant takes recordings and
      // speaks its answers (push-to-talk here, Talk sessions elsewhere); each field left
      // empty is the server's default.
      h(
        "fieldset",
        { "data-testid": "assistant-voice" },
        h("legend", {}, "Voice"),
        h(
          "label",
          { class: "check" },
          h("input", { type: "checkbox", "data-testid": "assistant-voice-on", checked: voice !== undefined }),
          " It speaks: takes recordings and answers aloud (the server needs a speech engine)",
        ),
        h(
          "div",
          { class: "row" },
          field("assistant-voice-name", "Voice", h("input", { value: voice?.voice ?? "", placeholder: "the server's", maxlength: 64 })),
          field(
            "assistant-voice-language",
            "Language",
            h("input", { value: voice?.language ?? "", placeholder: "detected", pattern: "[a-z]{2}", maxlength: 2, title: "Two lowercase letters (ISO 639-1), for example en." }),
          ),
          field("assistant-speech-model", "Speech model", h("input", { value: voice?.speechModel ?? "", placeholder: "the server's", maxlength: 256 })),
          field(
            "assistant-transcription-model",
            "Transcription model",
            h("input", { value: voice?.transcriptionModel ?? "", placeholder: "the server's", maxlength: 256 }),
          ),
        ),
      ),
      // Retrieval (Assistant.retrieval): the best matches of each message put in the
      // model's context with their sources, and the search_memory tool; 0 is the default.
      h(
        "fieldset",
        { "data-testid": "assistant-retrieval" },
        h("legend", {}, "Retrieval"),
        h(
          "label",
          { class: "check" },
          h("input", { type: "checkbox", "data-testid": "assistant-retrieval-on", checked: retrieval?.enabled ?? false }),
          " Put the best matches of each message in its context, with their sources",
        ),
        h(
          "div",
          { class: "row" },
          field("assistant-retrieval-top-k", "Passages", numberInput(retrieval?.topK, { min: 0, max: 20, placeholder: "5" })),
          field("assistant-retrieval-budget", "Token budget", numberInput(retrieval?.tokenBudget, { min: 0, max: 32000, placeholder: "1000" })),
          field("assistant-retrieval-mode", "Mode", mode),
        ),
        field(
          "assistant-retrieval-filter",
          "Filter",
          h("input", { value: retrieval?.filter ?? "", placeholder: "e.g. source != message", maxlength: 1000 }),
        ),
        h(
          "label",
          { class: "check" },
          h("input", { type: "checkbox", "data-testid": "assistant-search-tool", checked: retrieval?.searchTool ?? false }),
          " Let the model search memory itself (a search tool it can call)",
        ),
      ),
      // Memory (Assistant.memory_policy): what it learns from its conversations, by which
      // model and when; "as the workspace's default" takes the workspace's policy.
      (this.policy = policyForm("assistant", a?.memoryPolicy)).element,
      h(
        "label",
        { class: "check" },
        h("input", { type: "checkbox", "data-testid": "assistant-default-input", checked: a?.workspaceDefault ?? false }),
        " The workspace default (answers messages that name no assistant)",
      ),
      h("div", { "data-testid": "editor-problem" }),
      h(
        "div",
        { class: "row" },
        h("button", { type: "submit", "data-testid": "save-assistant" }, a ? "Save" : "Create"),
        h("button", { type: "button", "data-testid": "close-editor", onclick: () => this.close() }, "Close"),
      ),
    );
    if (a) {
      this.editor.dataset.assistant = a.name;
      this.editor.dataset.revision = String(a.revision);
    } else {
      delete this.editor.dataset.assistant;
      delete this.editor.dataset.revision;
    }
    this.editor.hidden = false;
    this.host.editing(true);
    const textarea = this.editor.querySelector<HTMLTextAreaElement>('[data-testid="assistant-instructions"]');
    if (textarea) textarea.value = a?.instructions ?? "";
    await this.renderTools(a?.tools ?? []);
  }

  /** Delegates (Assistant.delegates) or handoffs (Assistant.handoffs): the workspace's
   *  other assistants, each one this assistant's model may ask (an `ask_{id}` tool whose
   *  call is a child run) or hand the conversation over to (a `transfer_to_{id}` tool
   *  whose call makes it the conversation's holder), with what the model reads about it.
   *  Those it lists first, in their order; one it lists that is no longer in the
   *  workspace's list stays until unticked (the server refuses it). */
  private targetsField(kind: TargetKind, a: Assistant | null, listed: readonly (AssistantDelegate | AssistantHandoff)[]): HTMLElement {
    const others = this.assistants.filter((x) => x.name !== a?.name && !listed.some((d) => d.assistant === x.name));
    // A delegate may name a handler (an expert, an A2A agent) instead of an assistant.
    const handlerDelegates = kind === DELEGATES ? (listed as readonly AssistantDelegate[]).filter((d) => d.handler) : [];
    const otherHandlers =
      kind === DELEGATES ? this.handlers.filter((name) => name !== "handlers/llm" && !handlerDelegates.some((d) => d.handler === name)) : [];
    const row = (name: string, title: string, chosen: AssistantDelegate | AssistantHandoff | undefined, known: boolean, handler = ""): HTMLElement =>
      h(
        "div",
        handler
          ? { class: "row target", "data-testid": `assistant-${kind.row}-handler`, "data-handler": handler }
          : { class: "row target", "data-testid": `assistant-${kind.row}`, "data-assistant": name },
        h(
          "label",
          { class: "check" },
          h("input", { type: "checkbox", "data-testid": `${kind.row}-enabled`, checked: chosen !== undefined }),
          " ",
          h("strong", { title: name }, title),
          known ? null : h("span", { class: "muted" }, " (not in this workspace's list)"),
        ),
        h("input", {
          "data-testid": `${kind.row}-description`,
          "aria-label": kind.label(title),
          value: chosen?.description ?? "",
          placeholder: kind.placeholder,
          maxlength: MAX_DELEGATE_DESCRIPTION,
        }),
        kind === HANDOFFS ? historySelect(title, chosen && "history" in chosen ? chosen.history : HandoffHistory.UNSPECIFIED) : null,
      );
    const rows = [
      ...listed
        .filter((d) => !("handler" in d && d.handler))
        .map((d) => {
          const known = this.assistants.find((x) => x.name === d.assistant);
          return row(d.assistant, known ? known.displayName || lastSegment(known.name) : lastSegment(d.assistant), d, known !== undefined);
        }),
      ...handlerDelegates.map((d) => row("", `${d.handler} (handler)`, d, this.handlers.includes(d.handler), d.handler)),
      ...others.map((x) => row(x.name, x.displayName || lastSegment(x.name), undefined, true)),
      ...otherHandlers.map((name) => row("", `${name} (handler)`, undefined, true, name)),
    ];
    return h(
      "fieldset",
      { "data-testid": kind.testid },
      h("legend", {}, kind.legend),
      ...(rows.length ? rows : [h("span", { class: "muted", "data-testid": `${kind.row}s-empty` }, "No other assistant in this workspace yet.")]),
    );
  }

  /** The ticked rows of a delegates or handoffs fieldset, in their order. */
  private readTargets(kind: TargetKind): { assistant: string; handler?: string; description: string; history?: HandoffHistory }[] {
    const chosen: { assistant: string; handler?: string; description: string; history?: HandoffHistory }[] = [];
    // Assistants' rows and handlers' rows, in the order they are shown.
    const rows = this.editor.querySelectorAll<HTMLElement>(`[data-testid="assistant-${kind.row}"], [data-testid="assistant-${kind.row}-handler"]`);
    for (const row of rows) {
      if (!row.querySelector<HTMLInputElement>(`[data-testid="${kind.row}-enabled"]`)?.checked) continue;
      const history = row.querySelector<HTMLSelectElement>('[data-testid="handoff-history"]');
      chosen.push({
        assistant: row.dataset.handler ? "" : (row.dataset.assistant ?? ""),
        ...(row.dataset.handler ? { handler: row.dataset.handler } : {}),
        description: row.querySelector<HTMLInputElement>(`[data-testid="${kind.row}-description"]`)?.value.trim() ?? "",
        ...(history ? { history: Number(history.value) as HandoffHistory } : {}),
      });
    }
    return chosen;
  }

  private async renderTools(enabled: AssistantTools[]): Promise<void> {
    const box = this.editor.querySelector<HTMLElement>('[data-testid="assistant-tools"]');
    if (!box) return;
    const rows: HTMLElement[] = [];
    // Webhooks lend no tools.
    for (const integration of this.integrations.all().filter((i) => i.kind !== IntegrationKind.WEBHOOK)) {
      const chosen = enabled.find((t) => t.integration === integration.name);
      let tools: string[] = [];
      let failure: Problem | undefined;
      try {
        tools = (await this.integrations.tools(integration.name)).map((t) => t.name.split("/").pop() ?? t.name);
      } catch (error) {
        failure = problem(error);
      }
      rows.push(
        h(
          "div",
          { class: "tool-choice", "data-testid": "assistant-integration", "data-integration": integration.name },
          h("strong", {}, integration.displayName || lastSegment(integration.name)),
          failure ? renderProblem(failure, "tools-problem") : null,
          ...tools.map((tool) => {
            const on = chosen !== undefined && (chosen.tools.length === 0 || chosen.tools.includes(tool));
            const approval = chosen !== undefined && (chosen.requiresApproval || chosen.approvalRequiredTools.includes(tool));
            return h(
              "div",
              { class: "row", "data-testid": "assistant-tool", "data-tool": tool },
              h("label", {}, h("input", { type: "checkbox", "data-testid": "tool-enabled", checked: on }), " ", h("code", {}, lastSegment(tool))),
              h("label", { class: "muted" }, h("input", { type: "checkbox", "data-testid": "tool-approval", checked: approval }), " approval"),
            );
          }),
        ),
      );
    }
    if (rows.length === 0) rows.push(h("span", { class: "muted" }, "No integrations in this workspace yet: register one to lend its tools."));
    fill(box, h("legend", {}, "Tools (enabled, and which need a person's approval)"), ...rows);
  }

  private read(): Assistant {
    const value = (testid: string): string =>
      this.editor.querySelector<HTMLInputElement>(`[data-testid="${testid}"]`)?.value.trim() ?? "";
    const num = (testid: string): number => Number(value(testid) || "0");
    const tools: AssistantTools[] = [];
    for (const box of this.editor.querySelectorAll<HTMLElement>('[data-testid="assistant-integration"]')) {
      const enabled: string[] = [];
      const approval: string[] = [];
      for (const row of box.querySelectorAll<HTMLElement>('[data-testid="assistant-tool"]')) {
        const tool = row.dataset.tool ?? "";
        const on = row.querySelector<HTMLInputElement>('[data-testid="tool-enabled"]')?.checked ?? false;
        if (!on) continue;
        enabled.push(tool);
        if (row.querySelector<HTMLInputElement>('[data-testid="tool-approval"]')?.checked) approval.push(tool);
      }
      if (enabled.length) {
        tools.push({ integration: box.dataset.integration ?? "", tools: enabled, approvalRequiredTools: approval, requiresApproval: false } as AssistantTools);
      }
    }
    // What the editor does not show of a delegate (its input schema) is kept as stored.
    const stored = this.assistants.find((x) => x.name === this.editing)?.delegates ?? [];
    const delegates = (this.readTargets(DELEGATES) as AssistantDelegate[]).map((d) => {
      const before = stored.find((x) => (d.handler ? x.handler === d.handler : x.assistant === d.assistant));
      return before?.inputSchema ? ({ ...d, inputSchema: before.inputSchema } as AssistantDelegate) : d;
    });
    const handoffs = this.readTargets(HANDOFFS) as AssistantHandoff[];
    const temperature = value("assistant-temperature");
    const speaks = this.editor.querySelector<HTMLInputElement>('[data-testid="assistant-voice-on"]')?.checked ?? false;
    const checked = (testid: string): boolean => this.editor.querySelector<HTMLInputElement>(`[data-testid="${testid}"]`)?.checked ?? false;
    const retrieves = checked("assistant-retrieval-on");
    const searches = checked("assistant-search-tool");
    return {
      name: this.editing ?? "",
      displayName: value("assistant-name"),
      instructions: this.editor.querySelector<HTMLTextAreaElement>('[data-testid="assistant-instructions"]')?.value ?? "",
      handler: value("assistant-handler"),
      model: {
        provider: value("assistant-provider"),
        model: value("assistant-model"),
        ...(temperature ? { temperature: Number(temperature) } : {}),
        maxOutputTokens: num("assistant-max-output"),
      },
      tools,
      delegates,
      handoffs,
      contextTokenBudget: num("assistant-budget"),
      maxToolSteps: num("assistant-steps"),
      workspaceDefault: this.editor.querySelector<HTMLInputElement>('[data-testid="assistant-default-input"]')?.checked ?? false,
      ...(speaks
        ? {
            voice: {
              voice: value("assistant-voice-name"),
              language: value("assistant-voice-language"),
              speechModel: value("assistant-speech-model"),
              transcriptionModel: value("assistant-transcription-model"),
            },
          }
        : {}),
      ...(retrieves || searches || value("assistant-retrieval-filter")
        ? {
            retrieval: {
              enabled: retrieves,
              topK: num("assistant-retrieval-top-k"),
              tokenBudget: num("assistant-retrieval-budget"),
              mode: num("assistant-retrieval-mode") as SearchMode,
              filter: value("assistant-retrieval-filter"),
              searchTool: searches,
            },
          }
        : {}),
      ...(this.policy?.read() ? { memoryPolicy: this.policy.read() } : {}),
      etag: this.etag,
    } as Assistant;
  }

  /** The fields a save changes: the editor's, and the memory policy only when the form
   *  changed it (a server without memory forming is not asked to store an empty one). */
  private mask(assistant: Assistant): string[] {
    const stored = this.assistants.find((x) => x.name === this.editing)?.memoryPolicy;
    return samePolicy(stored, assistant.memoryPolicy) ? FIELDS : [...FIELDS, "memory_policy"];
  }

  private async save(): Promise<void> {
    const parent = this.host.workspace();
    const editing = this.editing;
    if (editing === null) return;
    const assistant = this.read();
    const where = this.editor.querySelector<HTMLElement>('[data-testid="editor-problem"]');
    where?.replaceChildren();
    const button = this.editor.querySelector<HTMLButtonElement>('[data-testid="save-assistant"]');
    if (button) button.disabled = true;
    try {
      const saved = editing
        ? (await this.api.dispatcher.updateAssistant({ assistant, updateMask: { paths: this.mask(assistant) } })).assistant
        : (
            await this.api.dispatcher.createAssistant({
              parent,
              assistantId: this.editor.querySelector<HTMLInputElement>('[data-testid="assistant-id"]')?.value.trim() ?? "",
              assistant,
              requestId: requestId(),
            })
          ).assistant;
      if (saved) {
        this.editing = saved.name;
        this.etag = saved.etag;
        const title = this.editor.querySelector('[data-testid="editor-title"]');
        if (title) title.textContent = `Edit ${saved.displayName || lastSegment(saved.name)}`;
        this.editor.querySelector('[data-testid="assistant-id"]')?.closest("label")?.remove();
        this.editor.querySelector('[data-testid="assistant-id-format"]')?.remove();
        if (button) button.textContent = "Save";
        this.editor.dataset.saved = saved.name;
        this.editor.dataset.etag = saved.etag;
        this.editor.dataset.assistant = saved.name;
        this.editor.dataset.revision = String(saved.revision);
        if (this.history) {
          void this.history.refresh(saved.revision);
        } else {
          this.history = new AssistantHistory(this.api, this.page, saved, { rollback: this.manage, open: false }, this.historyHost());
          title?.after(this.history.element);
        }
      }
      await this.load();
      this.host.changed();
    } catch (error) {
      const p = problem(error);
      const box = renderProblem(p, "error");
      box.dataset.action = "save-assistant";
      offerCurrentVersion(box, p, "reload-assistant", () =>
        void this.page.busy("reload-assistant", async () => {
          const fresh = await this.api.dispatcher.getAssistant({ name: editing });
          if (fresh.assistant) await this.edit(fresh.assistant);
        }),
      );
      where?.replaceChildren(box);
    } finally {
      if (button) button.disabled = false;
    }
  }
}
