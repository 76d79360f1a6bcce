// The console, composed: the sign-in screen, or the three columns (navigation, the open
// conversation with its runs and composer, integrations and live events), each a part of
// its own. What they share is here: the session (who is signed in, its renewals, signing
// out, which empties every part) and the event feed, whose scopes follow the session and
// the open workspace and whose events reach the parts that show them.
import type { Api } from "./api";
import { Account } from "./account";
import { Assistants } from "./assistants";
import { AuthScreen } from "./auth";
import { Budgets } from "./budgets";
import { Calls } from "./calls";
import { Composer } from "./composer";
import { formatTime, h } from "./dom";
import type { Problem } from "./errors";
import { EventFeed, type FeedState } from "./feed";
import { FilesPanel } from "./filespanel";
import { WorkspaceRole } from "./gen/switchboard/api/context/v1/context_pb";
import type { Event, Scope } from "./gen/switchboard/api/events/v1/events_pb";
import { Integrations } from "./integrations";
import { LiveEvents } from "./live";
import { MemoryPage } from "./memory";
import { Names } from "./names";
import { Navigation } from "./navigation";
import { Page } from "./page";
import { RunCards } from "./runcards";
import { Schedules } from "./schedules";
import { SearchPage } from "./search";
import type { SessionChange } from "./session";
import { YourData } from "./yourdata";

export class App {
  private readonly page: Page;
  private readonly auth: AuthScreen;
  private readonly consoleView: HTMLElement;
  /** The centre column: the assistant editor, then the open conversation or page. */
  private readonly centre: HTMLElement;
  private readonly navigation: Navigation;
  private readonly runs: RunCards;
  private readonly integrations: Integrations;
  private readonly live: LiveEvents;
  private readonly assistants: Assistants;
  private readonly budgets: Budgets;
  private readonly schedules: Schedules;
  private readonly calls: Calls;
  private readonly search: SearchPage;
  private readonly files: FilesPanel;
  private readonly memory: MemoryPage;
  private readonly composer: Composer;
  private readonly names = new Names();
  private readonly account: Account;
  private readonly yourData: YourData;
  private feed: EventFeed | null = null;

  constructor(private readonly api: Api) {
    const root = document.getElementById("root");
    if (root === null) throw new Error("index.html has no #root");
    this.page = new Page(root, () => api.tokens.signedIn);
    this.auth = new AuthScreen(api, this.page, () => this.enter());
    this.runs = new RunCards(api, this.page, this.names);
    this.integrations = new Integrations(api, this.page, this.names);
    this.live = new LiveEvents(this.page, this.names);
    this.budgets = new Budgets(api, this.page, this.names);
    this.schedules = new Schedules(api, this.page, this.names, { openRun: (run) => void this.navigation.openRun(run) });
    this.calls = new Calls(api, this.page, this.names);
    this.search = new SearchPage(api, this.page, this.names);
    this.files = new FilesPanel(api, this.page, this.names);
    this.memory = new MemoryPage(api, this.page, this.names);
    // The composer asks the navigation, built next, what is open when it needs to know.
    const composer = (this.composer = new Composer(api, this.page, {
      workspace: () => this.navigation.workspace,
      conversation: () => this.navigation.conversation,
      sent: (conversation, answer) => this.navigation.sent(conversation, answer),
      listen: (run, listener) => this.runs.listen(run, listener),
      steerTarget: () => this.runs.steerTarget(),
    }, this.names));
    // A run started or ended (Steer is offered while one goes), or a steer landed (its
    // message says where).
    this.runs.onChange = () => {
      composer.offerSteer();
      this.navigation.landingsChanged();
    };
    // A followed run handed the open conversation over, or its holder answered it: the
    // composer says who holds it.
    this.runs.onHolder = (claim) => {
      if (claim.run.startsWith(`${this.navigation.conversation}/runs/`)) composer.held(claim);
    };
    this.navigation = new Navigation(
      api,
      this.page,
      this.runs,
      this.integrations,
      composer,
      (workspace) => this.followWorkspace(workspace),
      this.names,
      (open) => this.budgets.show(open),
      (open) => this.schedules.show(open),
      (open) => this.search.show(open),
      (open) => this.files.show(open),
      (open) => this.memory.show(open),
      (open) => this.calls.show(open),
    );
    this.assistants = new Assistants(api, this.page, this.integrations, {
      workspace: () => this.navigation.workspace,
      tryIt: async (assistant) => {
        const name = await this.navigation.openNew(`Trying ${assistant.displayName || assistant.name.split("/").pop()}`);
        if (!name) return;
        await composer.load();
        composer.choose(assistant.name);
        composer.focus();
      },
      changed: () => void composer.load(),
      listed: () => {
        // Run cards name the assistants a run asked by their titles.
        for (const a of this.assistants.all()) this.names.learn(a.name, a.displayName);
        this.navigation.firstStepsChanged();
      },
      title: (name) => (this.names.knows(name) ? this.names.title(name) : ""),
      editing: (open) => {
        this.centre.classList.toggle("editing", open);
        if (open) this.assistants.editor.scrollIntoView({ block: "nearest" });
      },
    });
    this.navigation.firstSteps = () => ({ assistants: this.assistants.count(), integrations: this.integrations.count() });
    this.integrations.onChange = () => this.navigation.firstStepsChanged();
    this.account = new Account(api, this.page, this.names, () => api.tokens.end("signed out everywhere"));
    // The server revoked every credential of the person already; whichever part learned it
    // first, the sign-in screen says the account is deleted, not why a stream ended.
    this.yourData = new YourData(api, this.page, this.names, () => {
      api.tokens.end("your account is deleted");
      this.auth.showProblem();
    });
    this.navigation.column.append(...this.account.elements, this.yourData.element);
    // The assistant editor first in the centre, above what the centre shows.
    this.centre = h(
      "section",
      { class: "column chat" },
      this.assistants.editor,
      ...this.navigation.chat,
      this.budgets.element,
      this.schedules.element,
      this.calls.element,
      this.search.element,
      this.files.pageElement,
      this.memory.element,
      ...this.runs.elements,
      composer.element,
    );
    this.consoleView = h(
      "div",
      { class: "console", "data-testid": "console" },
      // Atop the columns, in the page's flow: a problem shown here covers nothing.
      h("div", { class: "problems", "data-testid": "problems", "aria-live": "polite" }),
      this.navigation.column,
      this.centre,
      h("aside", { class: "column" }, ...this.assistants.elements, ...this.files.elements, ...this.integrations.elements, ...this.live.elements),
    );
    root.replaceChildren(this.auth.element, this.consoleView);
    this.page.part("sign-out").addEventListener("click", () => void this.signOut());
    api.tokens.onChange((change) => this.sessionChanged(change));
    window.addEventListener("hashchange", () => void this.navigation.followHash());
  }

  async start(): Promise<void> {
    // Neither screen until it is known whether this tab still has a session.
    this.auth.element.hidden = this.consoleView.hidden = true;
    const identity = await this.api.tokens.restore();
    if (identity === null) this.showSignedOut();
    else await this.enter();
  }

  // -- Session ---------------------------------------------------------------------------

  private sessionChanged(change: SessionChange): void {
    const info = this.page.part("session-info");
    switch (change.kind) {
      case "signed-in":
        this.page.part("user").textContent = change.identity.email || change.identity.user;
        this.names.learn(change.identity.user, change.identity.email);
        this.account.signedIn(change.identity.user);
        info.dataset.session = change.identity.session;
        this.renderSessionInfo();
        break;
      case "renewed":
        this.renderSessionInfo();
        break;
      case "unrenewable":
        this.page.notice(`This session can no longer be renewed (a renewal got no answer); sign in again before ${formatTime(new Date(change.until))}.`);
        break;
      case "signed-out":
        this.leave();
        this.showSignedOut();
        if (change.why !== "signed out") this.page.notice(`Signed out: ${change.why}.`);
        this.auth.showProblem(change.problem);
        break;
    }
  }

  private renderSessionInfo(): void {
    const info = this.page.part("session-info");
    const renewals = this.api.tokens.renewals;
    info.dataset.renewals = String(renewals);
    const until = this.api.tokens.accessExpiresAt;
    info.textContent = `${renewals ? `renewed ${renewals}× · ` : ""}${until ? `token until ${formatTime(new Date(until))}` : ""}`;
  }

  private showSignedOut(): void {
    this.auth.element.hidden = false;
    this.consoleView.hidden = true;
    this.page.part("sign-out").hidden = true;
    this.page.part("user").textContent = "";
    this.page.part("session-info").textContent = "";
    this.live.connection("offline");
  }

  private async enter(): Promise<void> {
    const identity = this.api.tokens.identity;
    if (identity === null) return;
    this.auth.element.hidden = true;
    this.consoleView.hidden = false;
    this.page.part("sign-out").hidden = false;
    this.startFeed([{ scope: { case: "user", value: identity.user } } as Scope], "");
    await this.navigation.enter();
  }

  private leave(): void {
    const feed = this.feed;
    this.feed = null;
    feed?.stop();
    this.integrations.stop();
    this.assistants.clear();
    this.budgets.clear();
    this.schedules.clear();
    this.calls.clear();
    this.search.clear();
    this.files.clear();
    this.memory.clear();
    this.account.clear();
    this.yourData.clear();
    this.runs.clear();
    this.composer.left();
    this.navigation.clear();
    this.live.clear();
    this.names.forget();
  }

  private async signOut(): Promise<void> {
    const failed = await this.api.tokens.signOut(() => this.api.auth.logout({}));
    if (failed !== null) {
      this.page.notice("Signed out here, but the server could not be told: the session stays valid until it expires or is revoked.");
      this.auth.showProblem(failed);
    }
  }

  // -- The feed --------------------------------------------------------------------------

  private followWorkspace(workspace: string): void {
    // Owners manage integrations and assistants; the others see no controls for it.
    const role = this.navigation.roleOf(workspace);
    const owner = role === WorkspaceRole.OWNER;
    this.integrations.canManage(owner);
    this.assistants.canManage(owner, owner || role === WorkspaceRole.EDITOR);
    this.account.open(workspace, owner);
    this.budgets.open(workspace, owner);
    this.schedules.open(workspace, owner);
    // Hanging up a call is a write: editors and owners.
    this.calls.open(workspace, owner || role === WorkspaceRole.EDITOR);
    this.search.open(workspace);
    this.files.open(workspace, owner || role === WorkspaceRole.EDITOR);
    this.memory.open(workspace, role);
    this.runs.canResolve(owner);
    void this.assistants.load();
    const identity = this.api.tokens.identity;
    const scopes: Scope[] = [{ scope: { case: "workspace", value: workspace } } as Scope];
    if (identity) scopes.unshift({ scope: { case: "user", value: identity.user } } as Scope);
    // Continue from where the feed is: the user's events go on without a gap.
    this.startFeed(scopes, this.feed?.cursor ?? "");
  }

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
          if (this.feed === feed) this.live.cursor(cursor);
        },
        gap: (p) => {
          this.page.notice("Some events are no longer retained; the lists were reloaded.");
          this.page.showProblem(p, "events");
          void this.navigation.reload();
        },
      },
      previous ? previous.ids : [],
    );
    const feed = this.feed;
    this.live.connection("connecting");
    feed.start();
  }

  private feedState(state: FeedState, detail?: Problem): void {
    this.live.state(state, this.feed);
    // Back: whatever stopped it is over.
    if (state === "live") this.page.clearProblem("events");
    if (detail !== undefined && state === "stopped") this.page.showProblem(detail, "events");
  }

  private onEvents(events: Event[]): void {
    for (const event of events) {
      this.live.show(event);
      this.navigation.apply(event);
      this.assistants.apply(event);
      this.budgets.apply(event);
      this.schedules.apply(event);
      this.calls.apply(event);
      this.files.apply(event);
      this.memory.apply(event);
    }
    if (this.feed !== null) this.live.cursor(this.feed.cursor);
  }
}
