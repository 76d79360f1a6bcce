// Where the user is: the workspaces and their conversations (listed, created, picked),
// the open conversation's messages, and the URL (#workspaces/w/conversations/c) that
// opens them again, after a reload too (…/messages/m opens it at that message, marked: a
// memory's source links there). Opening a workspace or a conversation is where
// the other parts learn of it: the runs followed, the integrations watched, the
// composer's choices, and (through `opened`) the feed's scopes.
import { Code, ConnectError } from "@connectrpc/connect";
import { type Api, PAGE_SIZE, requestId } from "./api";
import { Branches } from "./branches";
import { Forks } from "./forks";
import type { Composer } from "./composer";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { type Child, fill, h } from "./dom";
import { browserZone, dateTime } from "./moments";
import { FileViews } from "./files";
import { local } from "./errors";
import { idAttributes, idRule } from "./ids";
import { jsonText } from "./jsontext";
import { messageRoleLabel, roleLabel, storedOutcomeLabel } from "./labels";
import { type Conversation, type Message, MessageRole, type Workspace, WorkspaceRole } from "./gen/switchboard/api/context/v1/context_pb";
import { type Run, RunState, SteerState } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import type { Event } from "./gen/switchboard/api/events/v1/events_pb";
import type { Integrations } from "./integrations";
import type { Names } from "./names";
import type { Page } from "./page";
import type { RunCards } from "./runcards";
import { TERMINAL, holderOf, steerStateName } from "./runs";

/** The workspace's pages, each shown in the centre where a conversation would be
 * (`#workspaces/w/<page>`), with the title it gives the centre. */
const WORKSPACE_PAGES = { budgets: "Budgets", schedules: "Schedules", calls: "Calls", search: "Search", files: "Files", memory: "Memory" } as const;
type WorkspacePage = keyof typeof WORKSPACE_PAGES;
const PAGE_IDS = Object.keys(WORKSPACE_PAGES) as WorkspacePage[];

export class Navigation {
  /** The open workspace, "" before one is picked. */
  workspace = "";
  /** The open conversation, "" before one is picked. */
  conversation = "";
  /** The open workspace's page that is open (`#workspaces/w/budgets`, `/schedules`, `/calls`, `/search`, `/files`, `/memory`), "" when none is. */
  workspacePage: WorkspacePage | "" = "";
  /** Counts navigations (a workspace or its page picked): a slower earlier one yields. */
  private navigations = 0;
  /** The left column: the lists, and the forms that add to them. */
  readonly column: HTMLElement;
  /** The open conversation's title and messages, atop the chat column. */
  readonly chat: HTMLElement[];
  private readonly workspaceList = h("ul", { class: "list", "data-testid": "workspace-list" });
  private readonly conversationList = h("ul", { class: "list", "data-testid": "conversation-list" });
  private readonly title = h("h2", { "data-testid": "conversation-title" });
  private readonly messageList = h("ol", { class: "messages", "data-testid": "messages" });
  /** The open workspace at a glance, while no conversation is open in it. */
  private readonly overview = h("section", { class: "overview", "data-testid": "workspace-overview", hidden: true });
  /** The workspaces to pick from, while none is open (several, and the URL named none). */
  private readonly picker = h("section", { class: "overview", "data-testid": "workspace-picker", hidden: true });
  private readonly hintSlot = h("div", {});
  /** How far the open workspace is from a first assistant: its assistants and
   *  integrations, each null until listed (the overview's hint says what comes next). */
  firstSteps: () => { assistants: number | null; integrations: number | null } = () => ({ assistants: null, integrations: null });
  private readonly newWorkspaceId = h("input", {
    "data-testid": "new-workspace-id",
    "aria-label": "new workspace id",
    placeholder: "id (optional)",
    ...idAttributes("workspace_id"),
  });
  private readonly newWorkspaceName = h("input", {
    "data-testid": "new-workspace-name",
    "aria-label": "new workspace name",
    placeholder: "display name",
  });
  private readonly newConversationTitle = h("input", {
    "data-testid": "new-conversation-title",
    "aria-label": "new conversation title",
    placeholder: "title",
  });
  /** The open workspace's pages besides its conversations. */
  private readonly pages = h(
    "div",
    { class: "pages", hidden: true },
    h("a", { href: "#", class: "item", "data-testid": "open-budgets" }, "Budgets and spend"),
    h("a", { href: "#", class: "item", "data-testid": "open-schedules" }, "Schedules"),
    h("a", { href: "#", class: "item", "data-testid": "open-calls" }, "Calls"),
    h("a", { href: "#", class: "item", "data-testid": "open-search" }, "Search"),
    h("a", { href: "#", class: "item", "data-testid": "open-files" }, "Files"),
    h("a", { href: "#", class: "item", "data-testid": "open-memory" }, "Memory"),
  );
  private workspaces: Workspace[] = [];
  /** Whether the workspaces were listed since signing in (the picker waits for it). */
  private listed = false;
  private conversations: Conversation[] = [];
  /** Whether delegates' conversations are listed too (hidden by default). */
  private showDelegated = false;
  private readonly messages = new Map<string, Message>();
  /** The open conversation's branch shown (`ListMessagesResponse.branch`), 0 before it is read. */
  private branch = 0;
  /** Messages come by event while the branch is read again (kept for after: the list may
   *  have been read before they were stored). */
  private arriving: Message[] | null = null;
  private readonly files: FileViews;
  private readonly branches: Branches;
  private readonly forks: Forks;
  /** The message a link opened the conversation at (`#…/messages/m`), marked among the others. */
  private highlighted = "";

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly runs: RunCards,
    private readonly integrations: Integrations,
    private readonly composer: Composer,
    /** A workspace opened: the feed should carry its events too. */
    private readonly opened: (workspace: string) => void,
    private readonly names: Names,
    /** The Budgets page shown (true) or left (false). */
    private readonly budgets: (open: boolean) => void = () => undefined,
    /** The Schedules page shown (true) or left (false). */
    private readonly schedules: (open: boolean) => void = () => undefined,
    /** The Search page shown (true) or left (false). */
    private readonly search: (open: boolean) => void = () => undefined,
    /** The Files page shown (true) or left (false). */
    private readonly filesPage: (open: boolean) => void = () => undefined,
    /** The Memory page shown (true) or left (false). */
    private readonly memoryPage: (open: boolean) => void = () => undefined,
    /** The Calls page shown (true) or left (false). */
    private readonly callsPage: (open: boolean) => void = () => undefined,
  ) {
    this.files = new FileViews(api, page);
    this.forks = new Forks(api, page, names, {
      conversation: () => this.conversation,
      listed: (name) => this.conversations.find((c) => c.name === name),
      role: () => this.roleOf(this.workspace),
      open: (name) => this.openConversation(name),
    });
    this.branches = new Branches(api, page, names, {
      conversation: () => this.conversation,
      role: () => this.roleOf(this.workspace),
      me: () => api.tokens.identity?.user ?? "",
      target: () => composer.choice(),
      reload: (branch) => this.reloadMessages(branch),
      sent: (conversation, answer) => this.sent(conversation, answer),
    }, this.forks);
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
    this.column = h(
      "nav",
      { class: "column" },
      h("h2", {}, "Workspaces"),
      this.workspaceList,
      form(
        () => this.createWorkspace(),
        this.newWorkspaceId,
        this.newWorkspaceName,
        h("button", { type: "submit", "data-testid": "create-workspace" }, "Create workspace"),
        // Said where it is typed, not only when the server refuses it.
        h(
          "small",
          { class: "muted", "data-testid": "workspace-id-format" },
          `id: ${idRule("workspace_id").words}, e.g. acme-1 (empty: one is made)`,
        ),
      ),
      h("h2", {}, "Conversations"),
      this.conversationList,
      form(
        () => this.createConversation(),
        this.newConversationTitle,
        h("button", { type: "submit", "data-testid": "create-conversation" }, "Create conversation"),
      ),
      this.pages,
    );
    this.chat = [this.title, this.forks.note, this.picker, this.overview, this.messageList];
  }

  /** Signed in: the workspaces, then what the URL names. */
  async enter(): Promise<void> {
    await this.loadWorkspaces();
    await this.followHash();
    // Nothing named in the URL and nothing to choose between: the only workspace is open.
    const [only, ...others] = this.workspaces;
    if (!this.workspace && only && others.length === 0) await this.pickWorkspace(only.name);
  }

  async followHash(): Promise<void> {
    const target = decodeURIComponent(location.hash.slice(1));
    const match = /^(workspaces\/[^/]+)(?:(\/conversations\/[^/]+)(\/messages\/[^/]+)?|\/budgets|\/schedules|\/calls|\/search|\/files|\/memory)?$/.exec(target);
    if (match === null || !this.api.tokens.signedIn) return;
    const workspace = match[1] ?? "";
    const page = PAGE_IDS.find((id) => target === `${workspace}/${id}`);
    if (page) return this.openPage(workspace, page);
    // A message (a memory's source links to it): its conversation, opened at it.
    const conversation = match[2] ? `${workspace}${match[2]}` : "";
    this.highlighted = match[3] ? target : "";
    await this.pickWorkspace(workspace, conversation);
    if (this.highlighted) this.revealMessage();
  }

  /** Scrolls the highlighted message into view, if the open conversation has it. */
  private revealMessage(): void {
    this.renderMessages();
    const shown = [...this.messageList.querySelectorAll<HTMLElement>('[data-testid="message"]')].find((m) => m.dataset.name === this.highlighted);
    shown?.scrollIntoView({ block: "center" });
  }

  /** Everything listed again, the open conversation too: events were missed. */
  async reload(): Promise<void> {
    await this.loadWorkspaces();
    await this.loadConversations();
    const conversation = this.conversation;
    if (conversation) {
      this.conversation = "";
      await this.pickConversation(conversation);
    }
  }

  /** An event from the feed, applied to what is open. */
  apply(event: Event): void {
    const payload = event.payload;
    switch (payload.case) {
      case "messageCreated": {
        const message = payload.value.message;
        if (!message || event.conversation !== this.conversation) break;
        if (this.arriving) this.arriving.push(message);
        // Appended on a branch not shown (an edit or a regeneration made elsewhere): not here.
        else if (!message.branch || !this.branch || message.branch === this.branch) this.arrived(message);
        break;
      }
      case "messageDeleted": {
        const deleted = payload.value.message;
        if (event.conversation !== this.conversation || !this.messages.delete(deleted)) break;
        this.renderMessages();
        break;
      }
      case "runUpdated": {
        const update = payload.value.update;
        if (!update || event.conversation !== this.conversation) break;
        const known = this.runs.has(update.run);
        // Handed over from a run this page does not follow (another tab, a script).
        if (update.update.case === "handoff") {
          const handoff = update.update.value;
          this.composer.held({
            assistant: handoff.toAssistant,
            at: update.time ? timestampDate(update.time).getTime() : Date.now(),
            reason: handoff.reason,
            run: update.run,
            from: handoff.fromAssistant,
          });
        }
        if (!known && update.update.case === "stateChange" && update.update.value.run) {
          // A run started elsewhere (another tab, a script): follow it here too.
          const run = update.update.value.run;
          if (!TERMINAL.has(run.state)) this.runs.follow(run.name);
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

  /** The signed-in user's role in a listed workspace (UNSPECIFIED when not listed). */
  roleOf(name: string): WorkspaceRole {
    return this.workspaces.find((w) => w.name === name)?.callerRole ?? WorkspaceRole.UNSPECIFIED;
  }

  /** A new conversation in the open workspace, opened; its name. */
  async openNew(title: string): Promise<string> {
    const parent = this.workspace;
    const answer = await this.api.context.createConversation({ parent, conversation: { title }, requestId: requestId() });
    const name = answer.conversation?.name ?? "";
    await this.loadConversations();
    if (name) await this.pickWorkspace(parent, name);
    return name;
  }

  /** SendMessage's (or SteerRun's) answer, shown if its conversation is still the open one. */
  sent(conversation: string, answer: { run?: Run | undefined; message?: Message | undefined }): void {
    // Writing in it: the conversation follows its newest message again.
    this.highlighted = "";
    if (answer.message && conversation === this.conversation) this.addMessages([answer.message]);
    if (answer.run && conversation === this.conversation) this.runs.follow(answer.run.name, answer.run);
  }

  /** A steer of the open conversation landed (or was requeued): its message says so. */
  landingsChanged(): void {
    if (!this.conversation) return;
    for (const item of this.messageList.querySelectorAll<HTMLElement>('[data-testid="message"]')) {
      const name = item.dataset.name ?? "";
      const note = this.landingNote(name);
      const old = item.querySelector('[data-testid="steer-landing"]');
      if (note === null) old?.remove();
      else if (old === null) item.querySelector('[data-testid="message-text"]')?.after(note);
      else if ((old as HTMLElement).dataset.key !== note.dataset.key) old.replaceWith(note);
    }
  }

  /** Where a steer message went: the run it steered (a link to its card) and the step. */
  private landingNote(message: string): HTMLElement | null {
    const landing = this.runs.landing(message);
    if (landing === undefined) return null;
    const target = landing.target.split("/").pop()?.slice(0, 8) ?? "";
    const link = (run: string, text: string): HTMLElement =>
      h("a", { href: "#", title: run, "data-testid": "steer-landing-run", "data-run": run, onclick: (e: globalThis.Event) => { e.preventDefault(); this.runs.reveal(run); } }, text);
    const words: Child[] =
      landing.state === SteerState.CONSUMED
        ? ["Steered run ", link(landing.target, target), landing.step ? `: taken at step ${landing.step}.` : ": taken."]
        : landing.state === SteerState.REQUEUED
          ? ["Run ", link(landing.target, target), " ended before taking this steer: ", link(landing.steerRun, "its own run"), " answers it."]
          : ["Steering run ", link(landing.target, target), ": waiting for its next step."];
    return h(
      "div",
      {
        class: "steer-landing muted",
        "data-testid": "steer-landing",
        "data-target": landing.target,
        "data-steer-run": landing.steerRun,
        "data-steer-state": steerStateName(landing.state),
        "data-step": landing.step || undefined,
        "data-key": `${landing.target}:${landing.state}:${landing.step}`,
      },
      ...words,
    );
  }

  /** Signed out: nothing open, nothing listed. */
  clear(): void {
    this.highlighted = "";
    this.messages.clear();
    this.files.clear();
    this.workspaces = [];
    this.listed = false;
    this.picker.hidden = true;
    this.conversations = [];
    this.workspace = this.conversation = "";
    this.workspacePage = "";
    for (const page of PAGE_IDS) this.shown(page, false);
    this.pages.hidden = true;
    this.workspaceList.replaceChildren();
    this.conversationList.replaceChildren();
    this.messageList.replaceChildren();
    this.title.textContent = "";
    this.forks.opened("");
  }

  // -- Workspaces and conversations ---------------------------------------------------

  private async loadWorkspaces(): Promise<void> {
    await this.page.busy("list-workspaces", async () => {
      const all: Workspace[] = [];
      let pageToken = "";
      do {
        const page = await this.api.context.listWorkspaces({ pageSize: PAGE_SIZE, pageToken });
        all.push(...page.workspaces);
        pageToken = page.nextPageToken;
      } while (pageToken && all.length < 1_000);
      this.workspaces = all;
      this.listed = true;
      for (const w of all) this.names.learn(w.name, w.displayName);
      this.renderWorkspaces();
      this.renderPicker();
    });
  }

  private renderWorkspaces(): void {
    this.pages.hidden = !this.workspace;
    this.pages.querySelector('[data-testid="open-budgets"]')?.setAttribute("href", `#${this.workspace}/budgets`);
    this.pages.querySelector('[data-testid="open-schedules"]')?.setAttribute("href", `#${this.workspace}/schedules`);
    this.pages.querySelector('[data-testid="open-calls"]')?.setAttribute("href", `#${this.workspace}/calls`);
    this.pages.querySelector('[data-testid="open-search"]')?.setAttribute("href", `#${this.workspace}/search`);
    this.pages.querySelector('[data-testid="open-files"]')?.setAttribute("href", `#${this.workspace}/files`);
    this.pages.querySelector('[data-testid="open-memory"]')?.setAttribute("href", `#${this.workspace}/memory`);
    if (this.workspaces.length === 0) {
      // The first sign-in: nothing to pick yet, so say what comes first.
      this.workspaceList.replaceChildren(
        h(
          "li",
          { class: "empty muted", "data-testid": "empty-hint" },
          "No workspaces yet. Create one below, then a conversation in it, then send a message: " +
            "the answer streams into the conversation.",
        ),
      );
      return;
    }
    this.workspaceList.replaceChildren(
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
    const id = this.newWorkspaceId.value.trim();
    const displayName = this.newWorkspaceName.value.trim();
    await this.page.busy("create-workspace", async () => {
      const answer = await this.api.context.createWorkspace({
        workspaceId: id,
        workspace: { displayName },
        requestId: requestId(),
      });
      this.newWorkspaceId.value = "";
      this.newWorkspaceName.value = "";
      await this.loadWorkspaces();
      if (answer.workspace) await this.pickWorkspace(answer.workspace.name);
    });
  }

  /** A page of the workspace, in the centre where a conversation would be. */
  private async openPage(workspace: string, page: WorkspacePage): Promise<void> {
    await this.pickWorkspace(workspace);
    if (workspace !== this.workspace) return;
    this.conversation = "";
    this.messages.clear();
    this.files.clear();
    this.runs.stop();
    this.composer.left();
    this.workspacePage = page;
    this.renderConversations();
    this.renderConversation();
    history.replaceState(null, "", `#${workspace}/${page}`);
    this.shown(page, true);
  }

  /** Tells the page's own view it is shown (true) or left (false). */
  private shown(page: WorkspacePage, open: boolean): void {
    ({ budgets: this.budgets, schedules: this.schedules, calls: this.callsPage, search: this.search, files: this.filesPage, memory: this.memoryPage })[page](open);
  }

  /** Opens the conversation of `run` (`workspaces/w/conversations/c/runs/r`) with the run's
   *  card shown: a schedule's firing leads there. */
  async openRun(run: string): Promise<void> {
    const match = /^(workspaces\/[^/]+)\/(conversations\/[^/]+)\/runs\/[^/]+$/.exec(run);
    if (match === null) return;
    const workspace = match[1] ?? "";
    await this.pickWorkspace(workspace, `${workspace}/${match[2] ?? ""}`);
    this.runs.reveal(run);
  }

  private async pickWorkspace(name: string, conversation = ""): Promise<void> {
    // A later navigation (a page opened while this one's lists load) wins: this one
    // must not put its own address back when its loads end.
    const turn = ++this.navigations;
    if (this.workspacePage) {
      const left = this.workspacePage;
      this.workspacePage = "";
      this.shown(left, false);
      this.renderConversation();
    }
    if (name !== this.workspace) {
      this.workspace = name;
      this.conversation = "";
      this.messages.clear();
      this.files.clear();
      this.runs.stop();
      this.composer.left();
      this.renderWorkspaces();
      this.renderConversation();
      this.opened(name);
      this.integrations.watch(name);
      await Promise.all([this.loadConversations(), this.composer.load()]);
      if (turn !== this.navigations) return;
    }
    const wanted = conversation ? `#${conversation}` : `#${name}`;
    if (location.hash !== wanted) history.replaceState(null, "", wanted);
    if (conversation) await this.pickConversation(conversation);
  }

  private async loadConversations(): Promise<void> {
    const parent = this.workspace;
    if (!parent) return;
    await this.page.busy("list-conversations", async () => {
      const page = await this.api.context.listConversations({ parent, pageSize: PAGE_SIZE });
      if (parent !== this.workspace) return;
      this.conversations = page.conversations;
      for (const c of page.conversations) this.names.learn(c.name, c.title);
      this.renderConversations();
    });
  }

  private renderConversations(): void {
    // A delegate's conversation (its metadata names the run that asked it) is the tree's,
    // not the person's: listed only on asking, or when it is the one open.
    const delegated = this.conversations.filter((c) => delegatedBy(c) && c.name !== this.conversation);
    const shown = this.showDelegated ? this.conversations : this.conversations.filter((c) => !delegated.includes(c));
    this.conversationList.replaceChildren(
      ...shown.map((c) =>
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
      ...(delegated.length
        ? [
            h(
              "li",
              {},
              h(
                "button",
                {
                  type: "button",
                  class: "item muted",
                  "data-testid": "show-delegated",
                  "data-count": String(delegated.length),
                  "aria-pressed": String(this.showDelegated),
                  onclick: () => {
                    this.showDelegated = !this.showDelegated;
                    this.renderConversations();
                  },
                },
                this.showDelegated
                  ? `Hide ${delegated.length} delegated conversation${delegated.length > 1 ? "s" : ""}`
                  : `Show ${delegated.length} delegated conversation${delegated.length > 1 ? "s" : ""}`,
              ),
            ),
          ]
        : []),
    );
    this.renderOverview();
  }

  /** The assistants or integrations of the open workspace were listed (the hint follows). */
  firstStepsChanged(): void {
    this.renderHint();
  }

  /** The overview's hint, in its own slot: integrations change often (each probe), and the
   *  rest of the overview (cards a person may be clicking) stays as it is. */
  private renderHint(): void {
    const owner = this.roleOf(this.workspace) === WorkspaceRole.OWNER;
    fill(this.hintSlot, owner ? this.hint() : null);
  }

  /** With no workspace open, the centre offers the workspaces (each with the caller's
   *  role), or says to create one; rather than an empty box. */
  private renderPicker(): void {
    const open = this.listed && this.api.tokens.signedIn && this.workspace === "";
    this.picker.hidden = !open;
    if (!open) return;
    fill(
      this.picker,
      this.workspaces.length
        ? h("p", { class: "muted" }, `Pick one of your ${this.workspaces.length} workspaces, or make another with Create workspace.`)
        : h("p", { "data-testid": "picker-empty" }, "No workspaces yet: make one with Create workspace, then a conversation in it."),
      this.workspaces.length
        ? h(
            "ul",
            { class: "list cards" },
            ...this.workspaces.map((w) =>
              h(
                "li",
                {},
                h(
                  "button",
                  { type: "button", class: "card", "data-testid": "picker-workspace", "data-name": w.name, onclick: () => void this.pickWorkspace(w.name) },
                  h("strong", {}, w.displayName || w.name),
                  h("span", { class: "muted" }, `You are ${w.callerRole === WorkspaceRole.OWNER ? "its" : "a"} ${roleLabel(w.callerRole)}.`),
                ),
              ),
            ),
          )
        : null,
    );
  }

  /** What the owner does next in a workspace with no assistant yet; null once it has one
   *  (or before its assistants and integrations are listed: no hint that may be wrong). */
  private hint(): HTMLElement | null {
    const { assistants, integrations } = this.firstSteps();
    if (assistants === null || integrations === null || assistants > 0) return null;
    return h(
      "p",
      { class: "muted", "data-testid": "overview-hint" },
      integrations > 0
        ? "Build an assistant on the right, with the tools of the integrations there; try it from there."
        : "Build an assistant on the right (register an integration first if it should call tools); try it from there.",
    );
  }

  private renderOverview(): void {
    this.renderPicker();
    const open = this.workspace !== "" && this.conversation === "" && !this.workspacePage;
    this.overview.hidden = !open;
    if (!open) return;
    const role = this.roleOf(this.workspace);
    const newest = [...this.conversations].sort((a, b) => Number((b.updateTime?.seconds ?? 0n) - (a.updateTime?.seconds ?? 0n)));
    this.overview.dataset.workspace = this.workspace;
    fill(
      this.overview,
      h("p", { class: "muted" }, `You are ${role === WorkspaceRole.OWNER ? "its" : "a"} ${roleLabel(role)}.`),
      newest.length
        ? h(
            "ul",
            { class: "list cards" },
            ...newest.slice(0, 12).map((c) =>
              h(
                "li",
                {},
                h(
                  "button",
                  { type: "button", class: "card", "data-testid": "overview-conversation", "data-name": c.name, onclick: () => void this.pickWorkspace(this.workspace, c.name) },
                  h("strong", { "data-content": true }, c.title || "Untitled"),
                  h(
                    "span",
                    { class: "muted" },
                    `${c.messageCount} ${c.messageCount === 1n ? "message" : "messages"}${c.updateTime ? ` · ${dateTime(timestampDate(c.updateTime), browserZone())}` : ""}`,
                  ),
                ),
              ),
            ),
          )
        : h("p", { "data-testid": "overview-empty" }, "No conversations yet: create one on the left, then send a message. The answer streams in here."),
      this.hintSlot,
    );
    this.renderHint();
  }

  private async createConversation(): Promise<void> {
    const parent = this.workspace;
    if (!parent) return this.page.showProblem(local("FAILED_PRECONDITION", "pick a workspace first"), "create-conversation");
    const title = this.newConversationTitle.value.trim();
    await this.page.busy("create-conversation", async () => {
      const answer = await this.api.context.createConversation({
        parent,
        conversation: { title },
        requestId: requestId(),
      });
      this.newConversationTitle.value = "";
      await this.loadConversations();
      if (answer.conversation) await this.pickWorkspace(parent, answer.conversation.name);
    });
  }

  /** Conversation `name` opened as from the list (a fork just made: listed again first). */
  private async openConversation(name: string): Promise<void> {
    const workspace = /^workspaces\/[^/]+/.exec(name)?.[0] ?? "";
    if (!workspace) return;
    if (workspace === this.workspace) await this.loadConversations();
    await this.pickWorkspace(workspace, name);
  }

  // -- One conversation ------------------------------------------------------------------

  private async pickConversation(name: string): Promise<void> {
    if (this.highlighted && !this.highlighted.startsWith(`${name}/messages/`)) this.highlighted = "";
    if (name === this.conversation) return;
    this.conversation = name;
    this.messages.clear();
    this.branch = 0;
    this.branches.reset();
    this.files.clear();
    this.runs.stop();
    this.composer.left();
    this.renderConversations();
    this.renderConversation();
    await this.page.busy("list-messages", async () => {
      const { found, branch } = await this.listBranch(name);
      if (name !== this.conversation) return;
      this.branch = branch;
      this.runs.showBranch(branch);
      this.addMessages(found);
      // Who holds it: its last handoff, in its history.
      this.composer.history(found);
      // Runs still going (or waiting for a decision) are followed as if sent from here.
      const active = await this.api.dispatcher.listRuns({
        parent: name,
        pageSize: PAGE_SIZE,
        states: [RunState.QUEUED, RunState.RUNNING, RunState.REQUIRES_ACTION],
      });
      if (name !== this.conversation) return;
      for (const run of active.runs.reverse()) this.runs.follow(run.name, run, true);
      // The finished ones, newest first: inspected on demand.
      const recent = await this.api.dispatcher.listRuns({ parent: name, pageSize: 10 });
      if (name !== this.conversation) return;
      this.runs.earlier(recent.runs.filter((r) => TERMINAL.has(r.state)));
      // Or a run the holder answered (its history may be longer than what was listed).
      for (const run of [...active.runs, ...recent.runs]) {
        const claim = holderOf(run);
        if (claim) this.composer.held(claim);
      }
      // Steers among them: their messages say where they went.
      this.runs.learnLandings([...active.runs, ...recent.runs]);
    });
  }

  private renderConversation(): void {
    const conversation = this.conversations.find((c) => c.name === this.conversation);
    const workspace = this.workspaces.find((w) => w.name === this.workspace);
    this.title.textContent = this.conversation
      ? conversation?.title || this.conversation
      : this.workspacePage
        ? `${WORKSPACE_PAGES[this.workspacePage]} · ${workspace?.displayName || this.workspace}`
        : this.workspace
        ? workspace?.displayName || this.workspace
        : "Pick or create a workspace";
    this.forks.opened(this.conversation);
    this.renderOverview();
    for (const page of PAGE_IDS) {
      this.pages.querySelector(`[data-testid="open-${page}"]`)?.classList.toggle("current", this.workspacePage === page);
    }
    this.composer.show(!!this.conversation);
    this.renderMessages();
    this.runs.render();
  }

  /** A branch of conversation `name` (0: its active one), in order (its first 1,000 messages). */
  private async listBranch(name: string, wanted = 0): Promise<{ found: Message[]; branch: number }> {
    const found: Message[] = [];
    let branch = 0;
    let pageToken = "";
    do {
      const page = await this.api.context.listMessages({ parent: name, pageSize: PAGE_SIZE, pageToken, branch: wanted });
      found.push(...page.messages);
      branch = page.branch;
      pageToken = page.nextPageToken;
    } while (pageToken && found.length < 1_000);
    return { found, branch };
  }

  /** The open conversation's active branch (or `wanted`, a reader's look at another) read
   *  again (another was switched to, a message edited, regenerated or deleted): what it
   *  holds replaces what was shown. */
  async reloadMessages(wanted = 0): Promise<void> {
    const name = this.conversation;
    if (!name) return;
    this.arriving = [];
    try {
      const { found, branch } = await this.listBranch(name, wanted);
      if (name !== this.conversation) return;
      const listed = new Set(found.map((m) => m.name));
      const arrived = this.arriving.filter((m) => !listed.has(m.name) && (!m.branch || m.branch === branch));
      this.branch = branch;
      this.runs.showBranch(branch);
      this.messages.clear();
      this.addMessages(found);
      for (const message of arrived) this.arrived(message);
    } finally {
      this.arriving = null;
    }
  }

  /** A message come by event, shown; read again when the conversation has branches: an
   *  event's message does not say its siblings, and the switcher needs them. */
  private arrived(message: Message): void {
    this.addMessages([message]);
    const branched = this.branch > 1 || [...this.messages.values()].some((m) => m.siblings.length > 1);
    if (!branched || message.siblings.length > 0) return;
    const conversation = this.conversation;
    void this.page.busy("get-message", async () => {
      try {
        const answer = await this.api.context.getMessage({ name: message.name });
        if (answer.message && conversation === this.conversation && this.messages.has(message.name)) this.addMessages([answer.message]);
      } catch (error) {
        // Deleted since: its tombstone takes it off the list.
        if (!(error instanceof ConnectError && error.code === Code.NotFound)) throw error;
      }
    });
  }

  private addMessages(messages: Message[]): void {
    for (const message of messages) this.messages.set(message.name, message);
    this.renderMessages();
    // A run's answer, once it is a message here, is not shown again in its card.
    this.runs.messagesShown(this.messages.keys());
  }

  private renderMessages(): void {
    const sorted = [...this.messages.values()].sort((a, b) => Number(a.sequence - b.sequence));
    const list = this.messageList;
    list.replaceChildren(
      ...sorted.map((m) => {
        const role = MessageRole[m.role]?.toLowerCase() ?? "unspecified";
        return h(
          "li",
          {
            "data-testid": "message",
            "data-name": m.name,
            "data-role": role,
            class: m.name === this.highlighted ? `message ${role} highlighted` : `message ${role}`,
            "data-highlighted": m.name === this.highlighted ? "true" : undefined,
          },
          h("span", { class: "role" }, messageRoleLabel(m.role)),
          h("div", { class: "text", "data-testid": "message-text", "data-content": true }, messageText(m)),
          this.landingNote(m.name),
          spokenNote(m),
          ...m.parts.flatMap((part) =>
            part.part.case === "file" && part.part.value.file ? [this.files.view(part.part.value, m.name)] : [],
          ),
          this.branches.controls(m),
        );
      }),
    );
    if (this.highlighted && this.messages.has(this.highlighted)) {
      [...list.children].find((m) => m instanceof HTMLElement && m.dataset.name === this.highlighted)?.scrollIntoView({ block: "center" });
    } else {
      list.scrollTop = list.scrollHeight;
    }
  }
}

/** An answer that was spoken (metadata `voice`, docs/voice.md): said when the listener
 *  stopped it, with what was not spoken (the stored text is what was heard), or when its
 *  speech failed. Nothing for any other message. */
function spokenNote(message: Message): HTMLElement | null {
  const voice = message.metadata?.voice;
  if (typeof voice !== "object" || voice === null || Array.isArray(voice)) return null;
  const interrupted = voice.interrupted === true;
  const unspoken = typeof voice.unspoken_text === "string" ? voice.unspoken_text : "";
  const unspokenChars = typeof voice.unspoken_chars === "number" ? voice.unspoken_chars : unspoken.length;
  const error = typeof voice.speech_error === "string" ? voice.speech_error : "";
  if (!interrupted && !unspoken && !error) return null;
  const seconds = typeof voice.audio_ms === "number" ? ` after ${(voice.audio_ms / 1000).toFixed(1)} s` : "";
  return h(
    "div",
    {
      class: "spoken muted",
      "data-testid": "message-spoken",
      "data-interrupted": String(interrupted),
      "data-spoken-chars": typeof voice.spoken_chars === "number" ? voice.spoken_chars : undefined,
      "data-unspoken-chars": unspokenChars,
    },
    interrupted ? `Interrupted${seconds}: the text above is what was heard.` : "Not all of it was spoken.",
    error ? h("span", {}, " Speech failed: ", h("q", { "data-content": true }, error)) : null,
    unspoken
      ? h(
          "details",
          {},
          h("summary", {}, `Not spoken (${unspokenChars} ${unspokenChars === 1 ? "character" : "characters"})`),
          h("div", { class: "text", "data-testid": "message-unspoken", "data-content": true }, unspoken),
        )
      : null,
  );
}

function messageText(message: Message): string {
  return message.parts
    .map((part) => {
      switch (part.part.case) {
        case "text":
          return part.part.value;
        case "toolCall":
          return `→ ${part.part.value.functionName || part.part.value.tool}(${jsonText(part.part.value.arguments)})`;
        case "toolResult":
          return `← ${storedOutcomeLabel(part.part.value.outcome)}: ${part.part.value.text}`;
        case "data":
          return jsonText(part.part.value);
        case "file":
          // A stored file is shown beside the text (FileViews); a bare URL as itself.
          return part.part.value.file ? "" : `[file ${part.part.value.uri}]`;
        default:
          return "";
      }
    })
    .filter((text) => text !== "")
    .join("\n");
}

/** The run whose delegate call made conversation `c` (its metadata's `delegated_by`), or "". */
function delegatedBy(c: Conversation): string {
  const by = c.metadata?.["delegated_by"];
  return typeof by === "string" ? by : "";
}
