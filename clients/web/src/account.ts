// Who may do what, and with which credentials: the open workspace's members (owners add
// them by user name, change their role, remove them), the user's own API keys (created
// with their scopes, the secret shown once and never again; revoked), and the user's
// sessions (each signed out on its own, or all of them at once).
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { type Api, PAGE_SIZE } from "./api";
import { fill, formatTime, h } from "./dom";
import { local } from "./errors";
import { type WorkspaceMember, WorkspaceRole } from "./gen/switchboard/api/context/v1/context_pb";
import { roleLabel } from "./labels";
import type { Names } from "./names";
import type { Page } from "./page";

const ROLES = [WorkspaceRole.VIEWER, WorkspaceRole.EDITOR, WorkspaceRole.OWNER];

const roleName = roleLabel;

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
  private workspace = "";

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
    );
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
      });
      this.keyName.value = "";
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

  private async revokeAll(keepCurrent: boolean): Promise<void> {
    await this.page.busy(keepCurrent ? "revoke-other-sessions" : "revoke-all-sessions", async () => {
      await this.api.auth.revokeAllSessions({ keepCurrent });
      if (keepCurrent) await this.loadAccount();
      else this.signedOutEverywhere();
    });
  }
}
