// The console's screens: sign-in, workspaces, conversations and their messages, runs
// streaming their answers, pending tool approvals, integrations and live events.
// Every element a test (or a person's script) needs has a stable `data-testid`.
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { JsonObject } from "@bufbuild/protobuf";
import type { Api } from "./api";
import { formatTime, h } from "./dom";
import { type Problem, local, problem, renderProblem } from "./errors";
import { EventFeed, type FeedState } from "./feed";
import { follow } from "./follow";
import type { Conversation, Message, Workspace } from "./gen/switchboard/api/context/v1/context_pb";
import { MessageRole } from "./gen/switchboard/api/context/v1/context_pb";
import type { Assistant, Handler, Run } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { RunState, ToolApprovalDecision } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { type Event, EventType, type Scope, SecurityEventKind } from "./gen/switchboard/api/events/v1/events_pb";
import { ToolOutcome } from "./gen/switchboard/api/handler/v1/handler_pb";
import {
  CircuitState,
  HealthState,
  type Integration,
  IntegrationKind,
  type WatchIntegrationsResponse,
} from "./gen/switchboard/api/integration/v1/integration_pb";
import { RunView, TERMINAL, stateName } from "./runs";
import { type SessionChange, isSignedOut } from "./session";

/** Events kept on screen (the feed itself remembers more ids for deduplication). */
const EVENTS_SHOWN = 300;
const PAGE = 100;

export class App {
  private readonly root: HTMLElement;
  private readonly authView: HTMLElement;
  private readonly consoleView: HTMLElement;
  private readonly parts: Record<string, HTMLElement> = {};
  private feed: EventFeed | null = null;
  private readonly connectionHistory: string[] = [];
  private workspaces: Workspace[] = [];
  private conversations: Conversation[] = [];
  private workspace = "";
  private conversation = "";
  private readonly messages = new Map<string, Message>();
  private readonly runs = new Map<string, RunView>();
  private readonly runCards = new Map<string, HTMLElement>();
  /** Denial reasons being typed, by tool call id. */
  private readonly reasons = new Map<string, string>();
  private readonly integrations = new Map<string, Integration>();
  private integrationsWatch: AbortController | null = null;
  /** Whether a first snapshot of the workspace's integrations arrived. */
  private integrationsKnown = false;
  private handlers: Handler[] = [];
  private assistants: Assistant[] = [];
  private shownEvents = 0;

  constructor(private readonly api: Api) {
    const root = document.getElementById("root");
    if (root === null) throw new Error("index.html has no #root");
    this.root = root;
    this.authView = this.buildAuth();
    this.consoleView = this.buildConsole();
    this.root.replaceChildren(this.authView, this.consoleView);
    this.part("sign-out").addEventListener("click", () => void this.signOut());
    api.tokens.onChange((change) => this.sessionChanged(change));
    window.addEventListener("hashchange", () => void this.followHash());
  }

  async start(): Promise<void> {
    // Neither screen until it is known whether this tab still has a session.
    this.authView.hidden = this.consoleView.hidden = true;
    const identity = await this.api.tokens.restore();
    if (identity === null) this.showSignedOut();
    else await this.enter();
  }

  // -- Session ---------------------------------------------------------------------------

  private sessionChanged(change: SessionChange): void {
    const info = this.part("session-info");
    switch (change.kind) {
      case "signed-in":
        this.part("user").textContent = change.identity.email || change.identity.user;
        info.dataset.session = change.identity.session;
        this.renderSessionInfo();
        break;
      case "renewed":
        this.renderSessionInfo();
        break;
      case "unrenewable":
        this.notice(`This session can no longer be renewed (a renewal got no answer); sign in again before ${formatTime(new Date(change.until))}.`);
        break;
      case "signed-out":
        this.leave();
        this.showSignedOut();
        if (change.why !== "signed out") this.notice(`Signed out: ${change.why}.`);
        this.part("auth-error").replaceChildren(...(change.problem ? [renderProblem(change.problem, "auth-problem")] : []));
        break;
    }
  }

  private renderSessionInfo(): void {
    const info = this.part("session-info");
    const renewals = this.api.tokens.renewals;
    info.dataset.renewals = String(renewals);
    const until = this.api.tokens.accessExpiresAt;
    info.textContent = `${renewals ? `renewed ${renewals}× · ` : ""}${until ? `token until ${formatTime(new Date(until))}` : ""}`;
  }

  private showSignedOut(): void {
    this.authView.hidden = false;
    this.consoleView.hidden = true;
    this.part("sign-out").hidden = true;
    this.part("user").textContent = "";
    this.part("session-info").textContent = "";
    this.setConnection("offline");
  }

  private async authenticate(kind: "sign-in" | "register"): Promise<void> {
    const email = this.input("email").value.trim();
    const password = this.input("password").value;
    const displayName = this.input("display-name").value.trim();
    const clientInfo = { userAgent: "switchboard-console/0.1", deviceName: "browser console" };
    this.part("auth-error").replaceChildren();
    this.notice("");
    await this.busy(kind, async () => {
      const answer =
        kind === "register"
          ? await this.api.auth.register({ email, password, displayName, clientInfo })
          : await this.api.auth.login({
              credential: { case: "password", value: { email, password } },
              clientInfo,
            });
      if (!answer.tokens || !answer.user || !answer.session) {
        throw local("INTERNAL", "the server's answer has no tokens");
      }
      this.input("password").value = "";
      this.api.tokens.adopt(answer.tokens, answer.user, answer.session);
      await this.enter();
    }, "auth-error");
  }

  private async enter(): Promise<void> {
    const identity = this.api.tokens.identity;
    if (identity === null) return;
    this.authView.hidden = true;
    this.consoleView.hidden = false;
    this.part("sign-out").hidden = false;
    this.startFeed([{ scope: { case: "user", value: identity.user } } as Scope], "");
    await this.loadWorkspaces();
    await this.followHash();
  }

  private leave(): void {
    const feed = this.feed;
    this.feed = null;
    feed?.stop();
    this.integrationsWatch?.abort();
    this.integrationsWatch = null;
    this.stopRuns();
    this.reasons.clear();
    delete this.part("approvals").dataset.key;
    this.messages.clear();
    this.integrations.clear();
    this.workspaces = [];
    this.conversations = [];
    this.workspace = this.conversation = "";
    this.shownEvents = 0;
    this.part("events").replaceChildren();
    for (const id of ["workspace-list", "conversation-list", "messages", "runs", "approvals", "integrations"]) {
      this.part(id).replaceChildren();
    }
    this.part("conversation-title").textContent = "";
  }

  private async signOut(): Promise<void> {
    const failed = await this.api.tokens.signOut(() => this.api.auth.logout({}));
    if (failed !== null) {
      this.notice("Signed out here, but the server could not be told: the session stays valid until it expires or is revoked.");
      this.part("auth-error").replaceChildren(renderProblem(failed, "auth-problem"));
    }
  }

  // -- Live events -----------------------------------------------------------------------

  private startFeed(scopes: Scope[], after: string): void {
    const previous = this.feed;
    // Detached first: its "stopped" is not the connection's state.
    this.feed = null;
    previous?.stop();
    this.feed = new EventFeed(
      this.api,
      scopes,
      after,
      {
        events: (events) => this.onEvents(events),
        state: (state, detail) => {
          if (this.feed === feed) this.feedState(state, detail);
        },
        cursor: (cursor) => {
          if (this.feed === feed) this.part("feed").dataset.cursor = cursor;
        },
        gap: (p) => {
          this.notice("Some events are no longer retained; the lists were reloaded.");
          this.showProblem(p, "events");
          void this.reloadAll();
        },
      },
      previous ? previous.ids : [],
    );
    const feed = this.feed;
    this.setConnection("connecting");
    feed.start();
  }

  private feedState(state: FeedState, detail?: Problem): void {
    const feed = this.feed;
    const info = this.part("feed");
    this.setConnection(state);
    if (feed !== null) {
      info.dataset.cursor = feed.cursor;
      info.dataset.firstCursor = feed.firstCursor;
      info.dataset.resumedFrom = JSON.stringify(feed.resumedFrom);
      info.dataset.duplicates = String(feed.duplicates);
      info.textContent = `${state}${feed.resumedFrom.length ? ` · resumed ${feed.resumedFrom.length}×` : ""}`;
    }
    if (detail !== undefined && state === "stopped") this.showProblem(detail, "events");
  }

  private setConnection(state: string): void {
    const badge = this.part("connection");
    if (badge.dataset.state !== state) this.connectionHistory.push(state);
    badge.dataset.state = state;
    badge.dataset.history = this.connectionHistory.slice(-50).join(",");
    badge.textContent = state;
  }

  private onEvents(events: Event[]): void {
    const list = this.part("events");
    for (const event of events) {
      this.showEvent(list, event);
      this.applyEvent(event);
    }
    const info = this.part("feed");
    if (this.feed !== null) info.dataset.cursor = this.feed.cursor;
  }

  private showEvent(list: HTMLElement, event: Event): void {
    const type = `EVENT_TYPE_${EventType[event.type] ?? "UNSPECIFIED"}`;
    const item = h(
      "li",
      { "data-testid": "event", "data-id": event.id, "data-cursor": event.cursor, "data-type": type },
      h("time", {}, formatTime(event.time ? timestampDate(event.time) : undefined)),
      " ",
      h("strong", {}, type.replace("EVENT_TYPE_", "")),
      " ",
      h("span", { class: "muted" }, summarize(event)),
    );
    list.prepend(item);
    this.shownEvents += 1;
    while (this.shownEvents > EVENTS_SHOWN && list.lastChild) {
      list.lastChild.remove();
      this.shownEvents -= 1;
    }
  }

  private applyEvent(event: Event): void {
    const payload = event.payload;
    switch (payload.case) {
      case "messageCreated": {
        const message = payload.value.message;
        if (message && event.conversation === this.conversation) this.addMessages([message]);
        break;
      }
      case "runUpdated": {
        const update = payload.value.update;
        if (!update || event.conversation !== this.conversation) break;
        const known = this.runs.get(update.run);
        if (known === undefined && update.update.case === "stateChange" && update.update.value.run) {
          // A run started elsewhere (another tab, a script): follow it here too.
          const run = update.update.value.run;
          if (!TERMINAL.has(run.state)) this.follow(run.name);
        }
        break;
      }
      case "conversationChanged":
      case "workspaceChanged":
        void (payload.case === "workspaceChanged" ? this.loadWorkspaces() : this.loadConversations());
        break;
      default:
        break;
    }
  }

  // -- Workspaces and conversations ---------------------------------------------------

  private async loadWorkspaces(): Promise<void> {
    await this.busy("list-workspaces", async () => {
      const all: Workspace[] = [];
      let pageToken = "";
      do {
        const page = await this.api.context.listWorkspaces({ pageSize: PAGE, pageToken });
        all.push(...page.workspaces);
        pageToken = page.nextPageToken;
      } while (pageToken && all.length < 1_000);
      this.workspaces = all;
      this.renderWorkspaces();
    });
  }

  private renderWorkspaces(): void {
    this.part("workspace-list").replaceChildren(
      ...this.workspaces.map((w) =>
        h(
          "li",
          {},
          h(
            "button",
            {
              type: "button",
              class: w.name === this.workspace ? "item current" : "item",
              "data-testid": "workspace-item",
              "data-name": w.name,
              onclick: () => void this.pickWorkspace(w.name),
            },
            w.displayName || w.name,
          ),
        ),
      ),
    );
  }

  private async createWorkspace(): Promise<void> {
    const id = this.input("new-workspace-id").value.trim();
    const displayName = this.input("new-workspace-name").value.trim();
    await this.busy("create-workspace", async () => {
      const answer = await this.api.context.createWorkspace({
        workspaceId: id,
        workspace: { displayName },
        requestId: requestId(),
      });
      this.input("new-workspace-id").value = "";
      this.input("new-workspace-name").value = "";
      await this.loadWorkspaces();
      if (answer.workspace) await this.pickWorkspace(answer.workspace.name);
    });
  }

  private async pickWorkspace(name: string, conversation = ""): Promise<void> {
    if (name !== this.workspace) {
      this.workspace = name;
      this.conversation = "";
      this.messages.clear();
      this.stopRuns();
      this.renderWorkspaces();
      this.renderConversation();
      const identity = this.api.tokens.identity;
      const scopes: Scope[] = [{ scope: { case: "workspace", value: name } } as Scope];
      if (identity) scopes.unshift({ scope: { case: "user", value: identity.user } } as Scope);
      // Continue from where the feed is: the user's events go on without a gap.
      this.startFeed(scopes, this.feed?.cursor ?? "");
      this.watchIntegrations(name);
      await Promise.all([this.loadConversations(), this.loadRouting()]);
    }
    const wanted = conversation ? `#${conversation}` : `#${name}`;
    if (location.hash !== wanted) history.replaceState(null, "", wanted);
    if (conversation) await this.pickConversation(conversation);
  }

  private async loadConversations(): Promise<void> {
    const parent = this.workspace;
    if (!parent) return;
    await this.busy("list-conversations", async () => {
      const page = await this.api.context.listConversations({ parent, pageSize: PAGE });
      if (parent !== this.workspace) return;
      this.conversations = page.conversations;
      this.renderConversations();
    });
  }

  private renderConversations(): void {
    this.part("conversation-list").replaceChildren(
      ...this.conversations.map((c) =>
        h(
          "li",
          {},
          h(
            "button",
            {
              type: "button",
              class: c.name === this.conversation ? "item current" : "item",
              "data-testid": "conversation-item",
              "data-name": c.name,
              onclick: () => void this.pickWorkspace(this.workspace, c.name),
            },
            c.title || c.name.split("/").pop() || c.name,
          ),
        ),
      ),
    );
  }

  private async createConversation(): Promise<void> {
    const parent = this.workspace;
    if (!parent) return this.showProblem(local("FAILED_PRECONDITION", "pick a workspace first"), "create-conversation");
    const title = this.input("new-conversation-title").value.trim();
    await this.busy("create-conversation", async () => {
      const answer = await this.api.context.createConversation({
        parent,
        conversation: { title },
        requestId: requestId(),
      });
      this.input("new-conversation-title").value = "";
      await this.loadConversations();
      if (answer.conversation) await this.pickWorkspace(parent, answer.conversation.name);
    });
  }

  private async loadRouting(): Promise<void> {
    const parent = this.workspace;
    await this.busy("list-handlers", async () => {
      const [handlers, assistants] = await Promise.all([
        this.api.dispatcher.listHandlers({ parent, pageSize: PAGE }),
        this.api.dispatcher.listAssistants({ parent, pageSize: PAGE }),
      ]);
      if (parent !== this.workspace) return;
      this.handlers = handlers.handlers;
      this.assistants = assistants.assistants;
      const handlerSelect = this.part("handler-select");
      handlerSelect.replaceChildren(
        h("option", { value: "" }, "handler: the router decides"),
        ...this.handlers.map((x) =>
          h("option", { value: x.name, disabled: !x.available }, `${x.name}${x.available ? "" : " (unavailable)"}`),
        ),
      );
      this.part("assistant-select").replaceChildren(
        h("option", { value: "" }, "assistant: the workspace default"),
        ...this.assistants.map((a) => h("option", { value: a.name }, a.displayName || a.name)),
      );
    });
  }

  private async followHash(): Promise<void> {
    const target = decodeURIComponent(location.hash.slice(1));
    const match = /^(workspaces\/[^/]+)(?:\/conversations\/[^/]+)?$/.exec(target);
    if (match === null || !this.api.tokens.signedIn) return;
    const workspace = match[1] ?? "";
    await this.pickWorkspace(workspace, target === workspace ? "" : target);
  }

  // -- One conversation ------------------------------------------------------------------

  private async pickConversation(name: string): Promise<void> {
    if (name === this.conversation) return;
    this.conversation = name;
    this.messages.clear();
    this.stopRuns();
    this.renderConversations();
    this.renderConversation();
    await this.busy("list-messages", async () => {
      const found: Message[] = [];
      let pageToken = "";
      do {
        const page = await this.api.context.listMessages({ parent: name, pageSize: PAGE, pageToken });
        found.push(...page.messages);
        pageToken = page.nextPageToken;
      } while (pageToken && found.length < 1_000);
      if (name !== this.conversation) return;
      this.addMessages(found);
      // Runs still going (or waiting for a decision) are followed as if sent from here.
      const active = await this.api.dispatcher.listRuns({
        parent: name,
        pageSize: PAGE,
        states: [RunState.QUEUED, RunState.RUNNING, RunState.REQUIRES_ACTION],
      });
      if (name !== this.conversation) return;
      for (const run of active.runs.reverse()) this.follow(run.name, run);
    });
  }

  private renderConversation(): void {
    const conversation = this.conversations.find((c) => c.name === this.conversation);
    this.part("conversation-title").textContent = this.conversation
      ? conversation?.title || this.conversation
      : this.workspace
        ? "Pick or create a conversation"
        : "Pick or create a workspace";
    this.part("composer").hidden = !this.conversation;
    this.renderMessages();
    this.renderRuns();
  }

  private addMessages(messages: Message[]): void {
    for (const message of messages) this.messages.set(message.name, message);
    this.renderMessages();
  }

  private renderMessages(): void {
    const sorted = [...this.messages.values()].sort((a, b) => Number(a.sequence - b.sequence));
    this.part("messages").replaceChildren(
      ...sorted.map((m) => {
        const role = MessageRole[m.role]?.toLowerCase() ?? "unspecified";
        return h(
          "li",
          { "data-testid": "message", "data-name": m.name, "data-role": role, class: `message ${role}` },
          h("span", { class: "role" }, role),
          h("div", { class: "text", "data-testid": "message-text" }, messageText(m)),
        );
      }),
    );
    const list = this.part("messages");
    list.scrollTop = list.scrollHeight;
  }

  private async send(): Promise<void> {
    const conversation = this.conversation;
    const text = this.input("message-input").value;
    const handler = (this.part("handler-select") as HTMLSelectElement).value;
    const assistant = (this.part("assistant-select") as HTMLSelectElement).value;
    const raw = (this.part("parameters-input") as HTMLTextAreaElement).value.trim();
    let parameters: JsonObject | undefined;
    if (raw) {
      try {
        const parsed: unknown = JSON.parse(raw);
        if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new TypeError();
        parameters = parsed as JsonObject;
      } catch {
        return this.showProblem(
          local("INVALID_ARGUMENT", "the handler parameters are not a JSON object", [
            { field: "parameters", description: 'must be a JSON object, e.g. {"delay_ms": 200}' },
          ]),
          "send",
        );
      }
    }
    await this.busy("send", async () => {
      const answer = await this.api.dispatcher.sendMessage({
        conversation,
        message: { role: MessageRole.USER, parts: [{ part: { case: "text", value: text } }] },
        handler,
        assistant,
        ...(parameters ? { parameters } : {}),
        // Sending again after a lost answer must not start a second run.
        requestId: requestId(),
      });
      this.input("message-input").value = "";
      if (answer.message && conversation === this.conversation) this.addMessages([answer.message]);
      if (answer.run && conversation === this.conversation) this.follow(answer.run.name, answer.run);
    });
  }

  private follow(name: string, run?: Run): void {
    if (this.runs.has(name)) return;
    const view = new RunView(name, (v) => this.renderRun(v));
    this.runs.set(name, view);
    if (run) view.adopt(run);
    this.renderRuns();
    view.watch(this.api);
  }

  private stopRuns(): void {
    for (const run of this.runs.values()) run.stop();
    this.runs.clear();
    this.runCards.clear();
  }

  private renderRuns(): void {
    this.part("runs").replaceChildren(...[...this.runs.values()].map((v) => this.runCard(v)));
    this.renderApprovals();
  }

  private renderRun(view: RunView): void {
    if (this.runs.get(view.name) !== view) return;
    const card = this.runCard(view);
    if (!card.isConnected) this.part("runs").append(card);
    this.renderApprovals();
  }

  /** The run's card, updated in place: a Cancel button must not be replaced under the
   *  pointer while deltas stream in. */
  private runCard(view: RunView): HTMLElement {
    let card = this.runCards.get(view.name);
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
          h("span", { class: "muted", "data-part": "meta" }),
          h("button", { type: "button", "data-testid": "cancel-run", onclick: () => void this.cancel(view) }, "Cancel"),
        ),
        h("div", { "data-part": "tools" }),
        h("div", { class: "answer", "data-testid": "run-answer" }),
        h("div", { "data-part": "end" }),
      );
      this.runCards.set(view.name, card);
    }
    const state = stateName(view.state);
    card.className = `run ${view.terminal ? "done" : "active"}`;
    Object.assign(card.dataset, {
      state,
      deltas: String(view.deltas),
      resumes: String(view.resumes),
      live: String(view.live),
    });
    const badge = card.querySelector<HTMLElement>('[data-testid="run-state"]');
    if (badge) {
      badge.className = `state s-${RunState[view.state]?.toLowerCase() ?? "unspecified"}`;
      badge.textContent = state.replace("RUN_STATE_", "");
    }
    setText(card, '[data-part="handler"]', view.run?.handler ?? "");
    setText(
      card,
      '[data-part="meta"]',
      `${view.progress ? ` · ${view.progress}` : ""}${view.deltas ? ` · ${view.deltas} deltas` : ""}`,
    );
    const cancel = card.querySelector<HTMLButtonElement>('[data-testid="cancel-run"]');
    if (cancel) cancel.hidden = view.terminal;
    const tools = card.querySelector<HTMLElement>('[data-part="tools"]');
    const toolsKey = `${view.calls.length}/${view.results.length}`;
    if (tools && tools.dataset.key !== toolsKey) {
      tools.dataset.key = toolsKey;
      tools.replaceChildren(
        ...view.calls.map((call) => {
          const result = view.results.find((r) => r.id === call.id);
          return h(
            "div",
            { class: "tool", "data-testid": "run-tool", "data-call-id": call.id, "data-outcome": result ? `TOOL_OUTCOME_${ToolOutcome[result.outcome] ?? ""}` : "" },
            h("code", {}, `${call.functionName || call.tool}(${JSON.stringify(call.arguments ?? {})})`),
            result ? h("span", { class: "muted" }, ` → ${ToolOutcome[result.outcome] ?? ""}: ${result.text}`) : null,
          );
        }),
      );
    }
    setText(card, '[data-testid="run-answer"]', view.text);
    card.querySelector('[data-part="end"]')?.replaceChildren(
      ...(view.run?.error && view.terminal && view.run.error.code !== 0
        ? [h("div", { class: "muted", "data-testid": "run-error" }, view.run.error.message)]
        : view.problem && !view.terminal
          ? [renderProblem(view.problem, "run-problem")]
          : []),
    );
    return card;
  }

  private async cancel(view: RunView): Promise<void> {
    await this.busy("cancel-run", async () => {
      const answer = await this.api.dispatcher.cancelRun({ name: view.name, reason: "cancelled from the console" });
      if (answer.run) view.adopt(answer.run);
    });
  }

  private renderApprovals(): void {
    const waiting = [...this.runs.values()].filter((v) => v.state === RunState.REQUIRES_ACTION && v.run?.requiredAction);
    // Rebuilt only when what waits changes: a reason being typed stays where it is.
    const key = waiting
      .map((v) => `${v.name}:${v.run?.requiredAction?.toolCalls.map((c) => `${c.call?.id}=${c.decision}`).join(",")}`)
      .join(";");
    const list = this.part("approvals");
    if (list.dataset.key === key) return;
    list.dataset.key = key;
    list.replaceChildren(
      ...waiting.map((view) => {
        const action = view.run?.requiredAction;
        const calls = action?.toolCalls.filter((c) => c.decision === ToolApprovalDecision.UNSPECIFIED) ?? [];
        return h(
          "section",
          { class: "approval", "data-testid": "approval", "data-run": view.name },
          h(
            "h3",
            {},
            "Waiting for your decision",
            action?.expireTime ? h("span", { class: "muted" }, ` (until ${formatTime(timestampDate(action.expireTime))})`) : null,
          ),
          ...calls.map((pending) => {
            const call = pending.call;
            const id = call?.id ?? "";
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
              h("pre", {}, JSON.stringify(call?.arguments ?? {}, null, 2)),
              reason,
              h("button", { type: "button", "data-testid": "approve", onclick: () => void this.decide(view, id, ToolApprovalDecision.APPROVE, "") }, "Approve"),
              h("button", { type: "button", "data-testid": "deny", onclick: () => void this.decide(view, id, ToolApprovalDecision.DENY, reason.value) }, "Deny"),
            );
          }),
        );
      }),
    );
  }

  private async decide(view: RunView, toolCallId: string, decision: ToolApprovalDecision, reason: string): Promise<void> {
    await this.busy("approval", async () => {
      const answer = await this.api.dispatcher.submitToolApprovals({
        name: view.name,
        approvals: [{ toolCallId, decision, reason }],
      });
      if (answer.run) view.adopt(answer.run);
    });
  }

  // -- Integrations ----------------------------------------------------------------------

  private watchIntegrations(parent: string): void {
    this.integrationsWatch?.abort();
    const stop = new AbortController();
    this.integrationsWatch = stop;
    this.integrations.clear();
    this.integrationsKnown = false;
    this.renderIntegrations();
    let snapshot: Map<string, Integration> | null = null;
    void follow<WatchIntegrationsResponse>(
      this.api,
      {
        open: (headers, signal) => {
          snapshot = new Map();
          return this.api.integration.watchIntegrations({ parent }, { headers, signal, timeoutMs: 0 });
        },
        frame: (frame) => {
          const target = snapshot ?? this.integrations;
          if (frame.integration) {
            if (frame.deleted) target.delete(frame.integration.name);
            else target.set(frame.integration.name, frame.integration);
          }
          if (frame.snapshotComplete && snapshot !== null) {
            // Replaces what an earlier stream showed: deletions while away are gone too.
            this.integrations.clear();
            for (const [name, integration] of snapshot) this.integrations.set(name, integration);
            snapshot = null;
            this.integrationsKnown = true;
          }
          if (snapshot === null) this.renderIntegrations();
          return "more";
        },
        status: (live, detail) => {
          const list = this.part("integrations");
          list.dataset.live = String(live);
          if (detail && !live) list.dataset.problem = detail.code;
        },
        failed: (detail) => this.showProblem(detail, "integrations"),
      },
      stop.signal,
    );
  }

  private renderIntegrations(): void {
    const list = this.part("integrations");
    if (this.integrations.size === 0) {
      const text = !this.workspace ? "" : this.integrationsKnown ? "None in this workspace." : "Loading…";
      list.replaceChildren(h("li", { class: "muted" }, text));
      return;
    }
    list.replaceChildren(
      ...[...this.integrations.values()].map((i) => {
        const health = `HEALTH_STATE_${HealthState[i.status?.health ?? HealthState.UNSPECIFIED] ?? "UNSPECIFIED"}`;
        const circuit = `CIRCUIT_STATE_${CircuitState[i.status?.circuit ?? CircuitState.UNSPECIFIED] ?? "UNSPECIFIED"}`;
        const failures = i.status?.consecutiveFailures ?? 0;
        return h(
          "li",
          {
            class: `integration h-${(HealthState[i.status?.health ?? 0] ?? "unspecified").toLowerCase()}`,
            "data-testid": "integration",
            "data-name": i.name,
            "data-health": health,
            "data-circuit": circuit,
            "data-disabled": i.disabled,
          },
          h("strong", {}, i.displayName || i.name.split("/").pop() || i.name),
          " ",
          h("span", { class: "muted" }, `${IntegrationKind[i.kind]?.toLowerCase() ?? ""} · ${i.endpoint}`),
          h(
            "div",
            {},
            h("span", { class: "badge", "data-testid": "integration-health" }, health.replace("HEALTH_STATE_", "")),
            " ",
            h("span", { class: "badge", "data-testid": "integration-circuit" }, `circuit ${circuit.replace("CIRCUIT_STATE_", "")}`),
            i.disabled ? h("span", { class: "badge" }, "disabled") : null,
            failures ? h("span", { class: "muted" }, ` · ${failures} failures`) : null,
          ),
          i.status?.lastError?.message ? h("div", { class: "muted", "data-testid": "integration-error" }, i.status.lastError.message) : null,
        );
      }),
    );
  }

  // -- Plumbing --------------------------------------------------------------------------

  private async reloadAll(): Promise<void> {
    await this.loadWorkspaces();
    await this.loadConversations();
    const conversation = this.conversation;
    if (conversation) {
      this.conversation = "";
      await this.pickConversation(conversation);
    }
  }

  /** Run an action with its button disabled; its failure is shown, never thrown. */
  private async busy(action: string, work: () => Promise<void>, area = ""): Promise<void> {
    const button = this.root.querySelector<HTMLButtonElement>(`button[data-testid="${action}"]`);
    if (button) button.disabled = true;
    document.body.dataset.busy = String(Number(document.body.dataset.busy ?? "0") + 1);
    try {
      await work();
      if (!area) this.clearProblem(action);
    } catch (error) {
      // The session ended under it: the sign-in screen says why.
      if (isSignedOut(error) || (!this.api.tokens.signedIn && action !== "sign-in" && action !== "register")) return;
      const p = isProblem(error) ? error : problem(error);
      if (area) this.part(area).replaceChildren(renderProblem(p, area === "auth-error" ? "auth-problem" : "error"));
      else this.showProblem(p, action);
    } finally {
      if (button) button.disabled = false;
      document.body.dataset.busy = String(Number(document.body.dataset.busy ?? "1") - 1);
    }
  }

  private showProblem(p: Problem, action: string): void {
    const box = renderProblem(p);
    box.dataset.action = action;
    box.append(h("button", { type: "button", class: "dismiss", onclick: () => box.remove() }, "×"));
    this.part("problems").replaceChildren(box);
  }

  private clearProblem(action: string): void {
    const shown = this.part("problems").querySelector<HTMLElement>('[data-testid="error"]');
    if (shown?.dataset.action === action) shown.remove();
  }

  private notice(text: string): void {
    const notice = this.part("notice");
    notice.textContent = text;
    notice.hidden = !text;
  }

  private part(id: string): HTMLElement {
    const cached = this.parts[id];
    if (cached) return cached;
    const found = document.querySelector<HTMLElement>(`[data-testid="${id}"]`);
    if (found === null) throw new Error(`the page has no ${id}`);
    this.parts[id] = found;
    return found;
  }

  private input(id: string): HTMLInputElement {
    return this.part(id) as HTMLInputElement;
  }

  private buildAuth(): HTMLElement {
    const submit = (event: globalThis.Event): void => {
      event.preventDefault();
      void this.authenticate("sign-in");
    };
    return h(
      "section",
      { class: "auth", "data-testid": "auth" },
      h(
        "form",
        { onsubmit: submit },
        h("h2", {}, "Sign in"),
        h("label", {}, "Email", h("input", { type: "email", "data-testid": "email", autocomplete: "username", required: true })),
        h(
          "label",
          {},
          "Password",
          h("input", { type: "password", "data-testid": "password", autocomplete: "current-password", required: true }),
        ),
        h("label", {}, "Display name (to register)", h("input", { "data-testid": "display-name", autocomplete: "name" })),
        h(
          "div",
          { class: "row" },
          h("button", { type: "submit", "data-testid": "sign-in" }, "Sign in"),
          h("button", { type: "button", "data-testid": "register", onclick: () => void this.authenticate("register") }, "Register"),
        ),
        h("div", { "data-testid": "auth-error" }),
      ),
    );
  }

  private buildConsole(): HTMLElement {
    const form = (action: () => Promise<void>, ...children: HTMLElement[]): HTMLElement =>
      h(
        "form",
        {
          class: "inline",
          onsubmit: (event: globalThis.Event) => {
            event.preventDefault();
            void action();
          },
        },
        ...children,
      );
    return h(
      "div",
      { class: "console", "data-testid": "console" },
      h(
        "nav",
        { class: "column" },
        h("h2", {}, "Workspaces"),
        h("ul", { class: "list", "data-testid": "workspace-list" }),
        form(
          () => this.createWorkspace(),
          h("input", { "data-testid": "new-workspace-id", "aria-label": "new workspace id", placeholder: "id (optional)", pattern: "[a-z][a-z0-9\\-]{1,62}" }),
          h("input", { "data-testid": "new-workspace-name", "aria-label": "new workspace name", placeholder: "display name" }),
          h("button", { type: "submit", "data-testid": "create-workspace" }, "Create workspace"),
        ),
        h("h2", {}, "Conversations"),
        h("ul", { class: "list", "data-testid": "conversation-list" }),
        form(
          () => this.createConversation(),
          h("input", { "data-testid": "new-conversation-title", "aria-label": "new conversation title", placeholder: "title" }),
          h("button", { type: "submit", "data-testid": "create-conversation" }, "Create conversation"),
        ),
      ),
      h(
        "section",
        { class: "column chat" },
        h("h2", { "data-testid": "conversation-title" }),
        h("ol", { class: "messages", "data-testid": "messages" }),
        h("div", { "data-testid": "runs" }),
        h("div", { "data-testid": "approvals" }),
        h(
          "form",
          {
            class: "composer",
            "data-testid": "composer",
            hidden: true,
            onsubmit: (event: globalThis.Event) => {
              event.preventDefault();
              void this.send();
            },
          },
          h("textarea", { "data-testid": "message-input", "aria-label": "message", rows: 3, placeholder: "Message", required: true }),
          h(
            "div",
            { class: "row" },
            h("select", { "data-testid": "handler-select", "aria-label": "handler" }),
            h("select", { "data-testid": "assistant-select", "aria-label": "assistant" }),
            h("button", { type: "submit", "data-testid": "send" }, "Send"),
          ),
          h(
            "details",
            { "data-testid": "advanced" },
            h("summary", {}, "Advanced"),
            h(
              "label",
              {},
              "Handler parameters (JSON object, e.g. ",
              h("code", {}, '{"delay_ms": 200}'),
              ")",
              h("textarea", { "data-testid": "parameters-input", rows: 2, spellcheck: false }),
            ),
          ),
        ),
      ),
      h(
        "aside",
        { class: "column" },
        h("h2", {}, "Integrations"),
        h("ul", { class: "list", "data-testid": "integrations" }),
        h("h2", {}, "Live events ", h("span", { class: "muted", "data-testid": "feed" })),
        h("ol", { class: "events", "data-testid": "events" }),
      ),
      h("div", { class: "problems", "data-testid": "problems" }),
    );
  }
}

function setText(root: HTMLElement, selector: string, text: string): void {
  const element = root.querySelector(selector);
  if (element && element.textContent !== text) element.textContent = text;
}

function isProblem(value: unknown): value is Problem {
  return typeof value === "object" && value !== null && "code" in value && "violations" in value && "wire" in value;
}

/** An idempotency key: letters, digits and `-` (the contracts allow 1-64 of those). */
function requestId(): string {
  return crypto.randomUUID();
}

function messageText(message: Message): string {
  return message.parts
    .map((part) => {
      switch (part.part.case) {
        case "text":
          return part.part.value;
        case "toolCall":
          return `→ ${part.part.value.functionName || part.part.value.tool}(${JSON.stringify(part.part.value.arguments ?? {})})`;
        case "toolResult":
          return `← ${part.part.value.outcome}: ${part.part.value.text}`;
        case "data":
          return JSON.stringify(part.part.value);
        case "file":
          return `[file ${part.part.value.uri}]`;
        default:
          return "";
      }
    })
    .join("\n");
}

function summarize(event: Event): string {
  const payload = event.payload;
  switch (payload.case) {
    case "messageCreated":
      return payload.value.message?.name ?? "";
    case "runUpdated": {
      const update = payload.value.update;
      if (!update) return "";
      const kind = update.update.case ?? "";
      const state = update.update.case === "stateChange" && update.update.value.run ? ` ${stateName(update.update.value.run.state)}` : "";
      return `${update.run} #${update.sequence} ${kind}${state}`;
    }
    case "security":
      return `${SecurityEventKind[payload.value.kind] ?? ""} ${payload.value.session}`;
    case "integrationChanged":
      return payload.value.integration?.name ?? "";
    case "conversationChanged":
      return payload.value.conversation?.name ?? "";
    case "workspaceChanged":
      return payload.value.workspace?.name ?? "";
    case "toolInvoked":
      return payload.value.tool;
    default:
      return event.conversation || event.workspace || event.user;
  }
}
