// Who may do what, and with which credentials: the open workspace's members (owners add
// them by user name, change their role, remove them), the user's own API keys (created
// with their scopes, the secret shown once and never again; revoked), and the user's
// sessions (each signed out on its own, or all of them at once). A key may pin assistants of
// the open workspace at a revision (docs/assistants.md, "Revisions"), fixed for its life.
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { type Api, PAGE_SIZE } from "./api";
import { fill, formatTime, h } from "./dom";
import { confirmation } from "./confirm";
import { local } from "./errors";
import type { ApiKey, ApiKeyAssistantPin } from "./gen/switchboard/api/auth/v1/auth_pb";
import { type WorkspaceMember, WorkspaceRole } from "./gen/switchboard/api/context/v1/context_pb";
import type { Assistant } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { roleLabel } from "./labels";
import type { Names } from "./names";
import type { Page } from "./page";
import { atRevision, fillRevisions } from "./revisionpick";

const ROLES = [WorkspaceRole.VIEWER, WorkspaceRole.EDITOR, WorkspaceRole.OWNER];

const roleName = roleLabel;

/** Pins one key may hold (CreateApiKeyRequest.assistant_pins). */
const MAX_PINS = 16;

function when(time: Parameters<typeof timestampDate>[0] | undefined): string {
  if (!time) return "";
  const date = timestampDate(time);
  return `${date.toLocaleDateString()} ${formatTime(date)}`;
}

export class Account {
  readonly elements: HTMLElement[];
  private readonly members = h("ul", { class: "list members", "data-testid": "members" });
  private readonly membersPanel: HTMLElement;
  private readonly keys = h("ul", { class: "list keys", "data-testid": "api-keys" });
  private readonly sessions = h("ul", { class: "list sessions", "data-testid": "sessions" });
  private readonly secret = h("div", { "data-testid": "api-key-secret-box" });
  private readonly newMember = h("input", { "data-testid": "member-user", "aria-label": "user name (users/…)", placeholder: "user name: users/…" });
  /** The caller's own user name, to copy and give to an owner who adds them. */
  private readonly ownName = h("code", { "data-testid": "own-user-name", "data-content": true });
  private readonly newRole = h(
    "select",
    { "data-testid": "member-role", "aria-label": "role" },
    ...ROLES.map((r) => h("option", { value: String(r) }, roleName(r))),
  );
  private readonly keyName = h("input", { "data-testid": "api-key-name", "aria-label": "key label", placeholder: "label, e.g. CI" });
  private readonly keyScopes = ["read", "write", "manage"].map((scope) =>
    h("input", { type: "checkbox", "data-testid": "api-key-scope", "data-scope": scope, value: scope, checked: scope !== "manage" }),
  );
  /** The new key's pins, a row each: an assistant of the open workspace and a revision. */
  private readonly pinRows = h("ul", { class: "list key-pins", "data-testid": "api-key-pin-rows" });
  private readonly addPin = h(
    "button",
    { type: "button", "data-testid": "add-api-key-pin", onclick: () => void this.addPinRow() },
    "Pin an assistant",
  );
  private workspace = "";
  /** The open workspace's assistants, offered to pin; null until first needed. */
  private assistants: Assistant[] | null = null;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
    private readonly signedOutEverywhere: () => void,
  ) {
    const form = (action: () => Promise<void>, ...children: HTMLElement[]): HTMLElement =>
      h(
        "form",
        {
          class: "inline",
          onsubmit: (event: Event) => {
            event.preventDefault();
            void action();
          },
        },
        ...children,
      );
    this.membersPanel = h(
      "section",
      { "data-testid": "members-panel", hidden: true },
      h("h2", {}, "Members"),
      this.members,
      form(
        () => this.addMember(),
        this.newMember,
        this.newRole,
        h("button", { type: "submit", "data-testid": "add-member" }, "Add member"),
      ),
      // The server adds a member by user name and has no way to find a user by email
      // (AuthService looks no one up), so the page says what to ask for and where it is.
      h(
        "small",
        { class: "muted", "data-testid": "member-user-help" },
        "A member is added by user name (users/…), not by email: Switchboard looks no one up by email. " +
          "Each person finds theirs under Your account, with a Copy button.",
      ),
    );
    this.elements = [
      this.membersPanel,
      h(
        "details",
        { "data-testid": "account", ontoggle: (e: Event) => (e.target as HTMLDetailsElement).open && void this.loadAccount() },
        h("summary", {}, h("h2", { class: "inline-heading" }, "Your account")),
        h(
          "p",
          { class: "row" },
          "Your user name: ",
          this.ownName,
          h("button", { type: "button", "data-testid": "copy-own-user-name", onclick: (e: Event) => void this.copyOwnName(e) }, "Copy"),
        ),
        h("small", { class: "muted" }, "An owner adds you to a workspace by this name."),
        h("h3", {}, "API keys"),
        this.keys,
        form(
          () => this.createKey(),
          this.keyName,
          h("div", { class: "row" }, ...this.keyScopes.map((box) => h("label", {}, box, ` ${box.value}`))),
          h(
            "fieldset",
            { class: "key-pins", "data-testid": "api-key-pins-editor" },
            h("legend", {}, "Pin assistants (optional)"),
            h(
              "small",
              { class: "muted" },
              "A message sent with the key to a pinned assistant answers with that revision, not the current one, for the key's whole life.",
            ),
            this.pinRows,
            this.addPin,
          ),
          h("button", { type: "submit", "data-testid": "create-api-key" }, "Create API key"),
        ),
        this.secret,
        h("h3", {}, "Sessions"),
        this.sessions,
        h(
          "div",
          { class: "row" },
          h("button", { type: "button", "data-testid": "revoke-other-sessions", onclick: () => void this.revokeAll(true) }, "Sign out the others"),
          h("button", { type: "button", "data-testid": "revoke-all-sessions", onclick: () => void this.revokeAll(false) }, "Sign out everywhere"),
        ),
      ),
    ];
  }

  /** The signed-in user's name, shown to copy. */
  signedIn(user: string): void {
    this.ownName.textContent = user;
  }

  private async copyOwnName(event: Event): Promise<void> {
    const button = event.currentTarget as HTMLButtonElement;
    try {
      await navigator.clipboard.writeText(this.ownName.textContent ?? "");
      button.textContent = "Copied";
    } catch {
      // No clipboard (an insecure origin, a refusal): the name is selected to copy by hand.
      const range = document.createRange();
      range.selectNodeContents(this.ownName);
      window.getSelection()?.removeAllRanges();
      window.getSelection()?.addRange(range);
    }
  }

  /** A workspace opened: its members, for an owner. */
  open(workspace: string, owner: boolean): void {
    if (workspace !== this.workspace) this.assistants = null;
    this.workspace = workspace;
    this.membersPanel.hidden = !owner;
    this.members.replaceChildren();
    if (owner) void this.loadMembers();
  }

  clear(): void {
    this.workspace = "";
    this.membersPanel.hidden = true;
    this.members.replaceChildren();
    this.keys.replaceChildren();
    this.sessions.replaceChildren();
    this.secret.replaceChildren();
    this.ownName.textContent = "";
    this.assistants = null;
    this.pinRows.replaceChildren();
    this.addPin.disabled = false;
  }

  // -- Members -----------------------------------------------------------------------------

  private async loadMembers(): Promise<void> {
    const parent = this.workspace;
    await this.page.busy("list-members", async () => {
      const answer = await this.api.context.listWorkspaceMembers({ parent, pageSize: PAGE_SIZE });
      if (parent !== this.workspace) return;
      const owners = answer.members.filter((m) => m.role === WorkspaceRole.OWNER).length;
      this.members.replaceChildren(...answer.members.map((m) => this.member(m, owners)));
    });
  }

  /** A member's row. The caller's own has no Remove (taking oneself out of a workspace
   *  is not what a members list is for, and the last owner cannot be removed), and its
   *  role is fixed while the caller is the only owner (the server refuses to demote the
   *  last one). */
  private member(m: WorkspaceMember, owners: number): HTMLElement {
    const self = m.user === this.api.tokens.identity?.user;
    const fixed = self && m.role === WorkspaceRole.OWNER && owners <= 1;
    const role = h(
      "select",
      {
        disabled: fixed,
        title: fixed ? "You are its only owner: make someone else an owner first." : undefined,
        "data-testid": "member-role-select",
        "aria-label": "role",
        onchange: () =>
          void this.page.busy("update-member", async () => {
            await this.api.context.updateWorkspaceMember({
              member: { name: m.name, role: Number(role.value) as WorkspaceRole },
              updateMask: { paths: ["role"] },
            });
            await this.loadMembers();
          }),
      },
      ...ROLES.map((r) => h("option", { value: String(r) }, roleName(r))),
    );
    role.value = String(m.role);
    return h(
      "li",
      { "data-testid": "member", "data-user": m.user, "data-role": `WORKSPACE_ROLE_${WorkspaceRole[m.role] ?? ""}` },
      h("span", { class: "who", title: m.user }, this.names.title(m.user), self ? h("span", { class: "badge", "data-testid": "member-you" }, "you") : null),
      role,
      self
        ? null
        : h(
            "button",
            {
              type: "button",
              "data-testid": "remove-member",
              onclick: () =>
                void this.page.busy("remove-member", async () => {
                  await this.api.context.removeWorkspaceMember({ name: m.name });
                  await this.loadMembers();
                }),
            },
            "Remove",
          ),
      self ? null : this.eraseButton(m),
    );
  }

  /** Remove a member and erase what they wrote here (docs/privacy.md), once confirmed. */
  private eraseButton(m: WorkspaceMember): HTMLElement {
    const asking = h("div", { class: "asking" });
    const button = h(
      "button",
      {
        type: "button",
        class: "danger",
        "data-testid": "erase-member",
        onclick: () =>
          asking.replaceChildren(
            confirmation({
              text: `Remove ${this.names.title(m.user)} and erase what they wrote in this workspace: their messages and the answers to them, their files and memory here, their runs and schedules; their events here are redacted. Their account and other workspaces stay.`,
              label: "Remove and erase",
              name: "erase-member",
              action: "erase-member",
              act: async () => {
                await this.api.context.removeWorkspaceMember({ name: m.name, erase: true });
                await this.loadMembers();
              },
            }),
          ),
      },
      "Remove and erase…",
    );
    return h("span", { class: "erase-member" }, button, asking);
  }

  private async addMember(): Promise<void> {
    await this.page.busy("add-member", async () => {
      const user = this.newMember.value.trim();
      if (user.includes("@")) {
        throw local("INVALID_ARGUMENT", `${user} is an email address: a member is added by user name (users/…), and Switchboard cannot look a user up by email.`, [
          { field: "user", description: "must be a user name, users/{id}: ask the person for theirs (Your account shows it)" },
        ]);
      }
      await this.api.context.addWorkspaceMember({
        parent: this.workspace,
        user,
        role: Number(this.newRole.value) as WorkspaceRole,
      });
      this.newMember.value = "";
      await this.loadMembers();
    });
  }

  // -- API keys and sessions ------------------------------------------------------------------

  private async loadAccount(): Promise<void> {
    await this.page.busy("list-account", async () => {
      const [keys, sessions] = await Promise.all([
        this.api.auth.listApiKeys({ pageSize: PAGE_SIZE }),
        this.api.auth.listSessions({ pageSize: PAGE_SIZE }),
      ]);
      this.keys.replaceChildren(
        ...keys.apiKeys.map((k) =>
          h(
            "li",
            { "data-testid": "api-key", "data-name": k.name },
            h("strong", {}, k.displayName || "API key"),
            " ",
            h("code", {}, `${k.prefix}…`),
            h("span", { class: "muted" }, ` · ${k.scopes.join(", ")}${k.lastUsedTime ? ` · used ${when(k.lastUsedTime)}` : ""}`),
            this.pinsShown(k),
            " ",
            h(
              "button",
              {
                type: "button",
                "data-testid": "revoke-api-key",
                onclick: () =>
                  void this.page.busy("revoke-api-key", async () => {
                    await this.api.auth.revokeApiKey({ name: k.name });
                    await this.loadAccount();
                  }),
              },
              "Revoke",
            ),
          ),
        ),
      );
      if (keys.apiKeys.length === 0) fill(this.keys, h("li", { class: "muted" }, "No API keys."));
      this.sessions.replaceChildren(
        ...sessions.sessions.map((s) =>
          h(
            "li",
            { "data-testid": "session", "data-name": s.name, "data-current": String(s.current) },
            h("strong", {}, s.current ? "this tab" : s.clientInfo?.userAgent?.slice(0, 40) || "a session"),
            h("span", { class: "muted" }, ` since ${when(s.createTime)} · last seen ${when(s.lastSeenTime)}${s.clientAddress ? ` · ${s.clientAddress}` : ""}`),
            " ",
            h(
              "button",
              {
                type: "button",
                "data-testid": "revoke-session",
                onclick: () =>
                  void this.page.busy("revoke-session", async () => {
                    await this.api.auth.revokeSession({ name: s.name });
                    if (s.current) this.signedOutEverywhere();
                    else await this.loadAccount();
                  }),
              },
              "Sign out",
            ),
          ),
        ),
      );
    });
  }

  private async createKey(): Promise<void> {
    await this.page.busy("create-api-key", async () => {
      const answer = await this.api.auth.createApiKey({
        displayName: this.keyName.value.trim(),
        scopes: this.keyScopes.filter((b) => b.checked).map((b) => b.value),
        assistantPins: this.readPins(),
      });
      this.keyName.value = "";
      this.pinRows.replaceChildren();
      this.addPin.disabled = false;
      // The secret exists here once: shown, never stored, gone when dismissed.
      fill(
        this.secret,
        h(
          "div",
          { class: "secret" },
          "Copy it now; it will not be shown again: ",
          h("code", { "data-testid": "api-key-secret" }, answer.secret),
          " ",
          h("button", { type: "button", onclick: () => this.secret.replaceChildren() }, "Done"),
        ),
      );
      await this.loadAccount();
    });
  }

  /** A key's pins in words: " · pins Support at revision 2, Billing at revision 5". */
  private pinsShown(k: ApiKey): HTMLElement | null {
    if (k.assistantPins.length === 0) return null;
    return h(
      "span",
      { class: "muted", "data-testid": "api-key-pins" },
      " · pins ",
      ...k.assistantPins.flatMap((p, i) => [
        i ? ", " : null,
        h(
          "span",
          { "data-testid": "api-key-pin", "data-assistant": p.assistant, "data-revision": String(p.revision), title: p.assistant },
          h("span", { "data-content": true }, this.assistantTitle(p.assistant)),
          ` ${atRevision(p.revision)}`,
        ),
      ]),
    );
  }

  private assistantTitle(name: string): string {
    return this.names.title(name).split(" › ").pop() ?? name;
  }

  /** A new pin row: the first assistant not pinned yet, at its current revision. */
  private async addPinRow(): Promise<void> {
    await this.page.busy("add-api-key-pin", async () => {
      const parent = this.workspace;
      if (!parent) throw local("FAILED_PRECONDITION", "Open a workspace first: its assistants are the ones a key can pin here.");
      if (this.assistants === null) {
        const listed = await this.api.dispatcher.listAssistants({ parent, pageSize: PAGE_SIZE });
        if (parent !== this.workspace) return;
        this.assistants = listed.assistants;
        for (const a of listed.assistants) this.names.learn(a.name, a.displayName);
      }
      const assistants = this.assistants;
      if (assistants.length === 0) throw local("FAILED_PRECONDITION", "This workspace has no assistants to pin.");
      const taken = new Set(this.pinSelects().map(([assistant]) => assistant.value));
      const first = assistants.find((a) => !taken.has(a.name)) ?? assistants[0];
      const assistant = h(
        "select",
        { "data-testid": "api-key-pin-assistant", "aria-label": "assistant to pin" },
        ...assistants.map((a) => h("option", { value: a.name }, this.assistantTitle(a.name))),
      );
      assistant.value = first?.name ?? "";
      const revision = h("select", { "data-testid": "api-key-pin-revision", "aria-label": "its revision" });
      const row = h(
        "li",
        { class: "row", "data-testid": "api-key-pin-row" },
        assistant,
        h("span", {}, " at revision "),
        revision,
        h(
          "button",
          {
            type: "button",
            "data-testid": "remove-api-key-pin",
            onclick: () => {
              row.remove();
              this.addPin.disabled = false;
            },
          },
          "Remove",
        ),
      );
      const listRevisions = (): Promise<void> =>
        this.page.busy("list-api-key-pin-revisions", () => fillRevisions(this.api, revision, assistant.value, [], ""));
      assistant.addEventListener("change", () => void listRevisions());
      this.pinRows.append(row);
      this.addPin.disabled = this.pinRows.children.length >= MAX_PINS;
      await listRevisions();
    });
  }

  private pinSelects(): [HTMLSelectElement, HTMLSelectElement][] {
    return [...this.pinRows.querySelectorAll<HTMLElement>('[data-testid="api-key-pin-row"]')].map((row) => [
      row.querySelector<HTMLSelectElement>('[data-testid="api-key-pin-assistant"]') as HTMLSelectElement,
      row.querySelector<HTMLSelectElement>('[data-testid="api-key-pin-revision"]') as HTMLSelectElement,
    ]);
  }

  /** The pins the form holds, each assistant once and at a revision, or the local problem. */
  private readPins(): ApiKeyAssistantPin[] {
    const seen = new Set<string>();
    const violations: { field: string; description: string }[] = [];
    const pins = this.pinSelects().map(([assistant, revision], i) => {
      if (seen.has(assistant.value)) violations.push({ field: `assistant_pins[${i}].assistant`, description: "is pinned twice: pin each assistant once" });
      seen.add(assistant.value);
      if (!/^[1-9][0-9]*$/.test(revision.value)) violations.push({ field: `assistant_pins[${i}].revision`, description: "pick one of its revisions" });
      return { assistant: assistant.value, revision: /^[0-9]+$/.test(revision.value) ? BigInt(revision.value) : 0n } as ApiKeyAssistantPin;
    });
    if (violations.length) throw local("INVALID_ARGUMENT", "some pins are not accepted", violations);
    return pins;
  }

  private async revokeAll(keepCurrent: boolean): Promise<void> {
    await this.page.busy(keepCurrent ? "revoke-other-sessions" : "revoke-all-sessions", async () => {
      await this.api.auth.revokeAllSessions({ keepCurrent });
      if (keepCurrent) await this.loadAccount();
      else this.signedOutEverywhere();
    });
  }
}
