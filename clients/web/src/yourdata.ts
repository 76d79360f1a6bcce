// The person's own data (docs/privacy.md): an archive of everything of theirs to download
// (ExportMyData, read with GetDataExport until it is written, then DownloadFile), and
// deleting their account (DeleteMyAccount), which first asks what becomes of each
// workspace they own with no other owner: deleted with it, or handed over to a member.
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { type Api, PAGE_SIZE, requestId } from "./api";
import { backoff, fill, formatTime, h, pause } from "./dom";
import { type Problem, codeName, local, problem, renderProblem } from "./errors";
import { OwnedWorkspaceAction, type OwnedWorkspace } from "./gen/switchboard/api/auth/v1/auth_pb";
import {
  type DataExport,
  DataExportState,
  type Workspace,
  type WorkspaceMember,
  WorkspaceRole,
} from "./gen/switchboard/api/context/v1/context_pb";
import { confirmation } from "./confirm";
import { downloadFile, formatSize, save } from "./files";
import { roleLabel } from "./labels";
import type { Names } from "./names";
import type { Page } from "./page";

/** The name a downloaded archive is saved under. */
export const EXPORT_FILENAME = "switchboard-export.zip";
/** Polling GetDataExport: from half a second, doubling, never more than 5 s apart. */
const POLL_BASE_MS = 500;
const POLL_MAX_MS = 5_000;
/** Failed reads in a row that polling rides out (no answer, UNAVAILABLE) before it stops. */
const POLL_FAILURES = 5;

const EXPORT_STATE: Record<DataExportState, string> = {
  [DataExportState.UNSPECIFIED]: "unknown",
  [DataExportState.RUNNING]: "being written…",
  [DataExportState.SUCCEEDED]: "ready to download",
  [DataExportState.FAILED]: "could not be written",
};

/** A workspace the person owns with no other owner, and the members it could go to. */
interface OwnedAlone {
  workspace: Workspace;
  others: WorkspaceMember[];
}

function when(time: Parameters<typeof timestampDate>[0] | undefined): string {
  if (!time) return "";
  const date = timestampDate(time);
  return `${date.toLocaleDateString()} ${formatTime(date)}`;
}

export class YourData {
  readonly element: HTMLElement;
  private readonly exportBox = h("div", { "data-testid": "data-export-box" });
  private readonly owned = h("ul", { class: "list owned-workspaces", "data-testid": "owned-workspaces" });
  private readonly email = h("input", {
    type: "email",
    "data-testid": "delete-account-email",
    "aria-label": "your account's email, to confirm",
    placeholder: "your account's email",
    autocomplete: "off",
  });
  private readonly deleteForm: HTMLElement;
  /** Where the last question (the confirmation) is asked. */
  private readonly asking = h("div", {});
  /** Ends the polling of the export shown (a sign-out, a new export). */
  private polling: AbortController | null = null;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
    /** The account is gone: this tab forgets its session (the server revoked it already). */
    private readonly deleted: () => void,
  ) {
    this.deleteForm = h(
      "form",
      {
        class: "inline delete-account",
        "data-testid": "delete-account-form",
        hidden: true,
        onsubmit: (event: Event) => {
          event.preventDefault();
          void this.askToDelete();
        },
      },
      h(
        "p",
        { class: "muted" },
        "Your sessions and API keys end at once, everywhere. Your messages (and the answers to your runs), files, " +
          "memory about you, runs, schedules and voice sessions are erased. This cannot be undone.",
      ),
      h("h4", {}, "Workspaces only you own"),
      this.owned,
      h("label", {}, "Type your account's email to confirm ", this.email),
      h("button", { type: "submit", class: "danger", "data-testid": "delete-account" }, "Delete my account"),
      this.asking,
    );
    this.element = h(
      "details",
      { class: "your-data", "data-testid": "your-data" },
      h("summary", {}, h("h2", { class: "inline-heading" }, "Your data")),
      // A section each: a refusal shows inside the part whose button was used.
      h(
        "section",
        { "data-testid": "data-export-section" },
        h("h3", {}, "Export"),
        h(
          "p",
          { class: "muted" },
          "One ZIP archive of your account, memberships, the messages you wrote and the answers to your runs, " +
            "the memory about you, your usage and the files you uploaded.",
        ),
        h("button", { type: "button", "data-testid": "export-data", onclick: () => void this.startExport() }, "Export my data"),
        this.exportBox,
      ),
      h(
        "section",
        { "data-testid": "delete-account-section" },
        h("h3", {}, "Delete your account"),
        h(
          "button",
          { type: "button", class: "danger", "data-testid": "delete-account-start", onclick: () => void this.openDeleteForm() },
          "Delete my account…",
        ),
        this.deleteForm,
      ),
    );
  }

  clear(): void {
    this.polling?.abort();
    this.polling = null;
    this.exportBox.replaceChildren();
    this.owned.replaceChildren();
    this.asking.replaceChildren();
    this.email.value = "";
    this.deleteForm.hidden = true;
  }

  // -- Export ------------------------------------------------------------------------------

  private async startExport(): Promise<void> {
    await this.page.busy("export-data", async () => {
      // While one is written the server answers with that one, so a second click is harmless.
      const answer = await this.api.context.exportMyData({ requestId: requestId() });
      if (answer.export === undefined) throw local("INTERNAL", "ExportMyData answered without the export");
      this.follow(answer.export);
    });
  }

  /** Shows `exported` and, while it is written, reads it again until it is done. */
  private follow(exported: DataExport): void {
    this.polling?.abort();
    const controller = (this.polling = new AbortController());
    this.showExport(exported);
    if (exported.state === DataExportState.RUNNING) void this.poll(exported.name, controller.signal);
  }

  private async poll(name: string, signal: AbortSignal): Promise<void> {
    let attempt = 0;
    let failures = 0;
    while (!signal.aborted) {
      await pause(backoff(attempt++, POLL_BASE_MS, POLL_MAX_MS), signal);
      if (signal.aborted) return;
      let found: DataExport | undefined;
      try {
        found = (await this.api.context.getDataExport({ name }, { signal })).export;
      } catch (error) {
        if (signal.aborted) return;
        const p = problem(error);
        if ((!p.wire || p.code === "UNAVAILABLE") && ++failures <= POLL_FAILURES) continue;
        this.pollStopped(name, p);
        return;
      }
      failures = 0;
      if (signal.aborted || found === undefined) return;
      this.showExport(found);
      if (found.state !== DataExportState.RUNNING) return;
    }
  }

  /** Polling gave up (a refusal, or no answer several times): why, and Check again. */
  private pollStopped(name: string, p: Problem): void {
    const box = this.exportBox.querySelector<HTMLElement>('[data-testid="data-export"]');
    if (box === null) return;
    const shown = renderProblem(p);
    shown.dataset.action = "check-data-export";
    box.append(
      shown,
      h(
        "button",
        {
          type: "button",
          "data-testid": "check-data-export",
          onclick: () =>
            void this.page.busy("check-data-export", async () => {
              const found = (await this.api.context.getDataExport({ name })).export;
              if (found !== undefined) this.follow(found);
            }),
        },
        "Check again",
      ),
    );
  }

  private showExport(exported: DataExport): void {
    const state = DataExportState[exported.state] ?? "UNSPECIFIED";
    const done = exported.state === DataExportState.SUCCEEDED;
    const failed = exported.state === DataExportState.FAILED;
    const failure = exported.error;
    fill(
      this.exportBox,
      h(
        "div",
        {
          class: "data-export",
          "data-testid": "data-export",
          "data-name": exported.name,
          "data-state": `DATA_EXPORT_STATE_${state}`,
          "data-size": done ? String(exported.sizeBytes) : undefined,
        },
        h("p", {}, "Your archive ", h("strong", { "data-testid": "data-export-state" }, EXPORT_STATE[exported.state] ?? "unknown"), exported.createTime ? ` (asked for ${when(exported.createTime)})` : ""),
        done
          ? h(
              "p",
              { class: "row" },
              h("span", { "data-testid": "data-export-size" }, formatSize(exported.sizeBytes)),
              h("span", { class: "muted", "data-testid": "data-export-expires" }, `kept until ${when(exported.expireTime)}`),
              h(
                "button",
                { type: "button", "data-testid": "download-data-export", onclick: (e: Event) => void this.download(exported, e.currentTarget as HTMLButtonElement) },
                "Download",
              ),
            )
          : null,
        failed
          ? renderProblem(
              failure ? local(codeName(failure.code), failure.message || "the archive could not be written") : local("UNKNOWN", "the archive could not be written"),
              "data-export-error",
            )
          : null,
      ),
    );
  }

  private async download(exported: DataExport, button: HTMLButtonElement): Promise<void> {
    await this.page.busy(
      "download-data-export",
      async () => {
        const { blob } = await downloadFile(this.api, exported.name);
        // The archive is checked against the digest the server gave before it is saved:
        // a download that went wrong is not kept as if it were the person's data.
        if (exported.sha256) {
          const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()));
          const hex = [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
          if (hex !== exported.sha256) throw local("DATA_LOSS", "the archive downloaded does not match its checksum; download it again");
        }
        const url = URL.createObjectURL(blob);
        save(url, EXPORT_FILENAME);
        // The download has its own copy by the time a minute has passed.
        setTimeout(() => URL.revokeObjectURL(url), 60_000);
      },
      { button },
    );
  }

  // -- Delete the account ----------------------------------------------------------------

  private async openDeleteForm(): Promise<void> {
    await this.page.busy("delete-account-start", async () => {
      this.deleteForm.hidden = false;
      this.asking.replaceChildren();
      await this.listOwned();
    });
  }

  /** The workspaces the caller owns with no other owner: each of theirs (ListWorkspaces)
   *  where they are an owner and, among its members, the only one. */
  private async listOwned(): Promise<void> {
    const me = this.api.tokens.identity?.user ?? "";
    const owned: Workspace[] = [];
    let pageToken = "";
    do {
      const page = await this.api.context.listWorkspaces({ pageSize: PAGE_SIZE, pageToken });
      owned.push(...page.workspaces.filter((w) => w.callerRole === WorkspaceRole.OWNER));
      pageToken = page.nextPageToken;
    } while (pageToken);
    const alone: OwnedAlone[] = [];
    for (const workspace of owned) {
      this.names.learn(workspace.name, workspace.displayName);
      const members = await this.members(workspace.name);
      if (members.filter((m) => m.role === WorkspaceRole.OWNER).length > 1) continue;
      alone.push({ workspace, others: members.filter((m) => m.user !== me) });
    }
    if (alone.length === 0) {
      fill(this.owned, h("li", { class: "muted", "data-testid": "owned-workspaces-none" }, "None: every workspace you own has another owner."));
      return;
    }
    this.owned.replaceChildren(...alone.map((entry, i) => this.ownedRow(entry, i)));
  }

  private async members(parent: string): Promise<WorkspaceMember[]> {
    const found: WorkspaceMember[] = [];
    let pageToken = "";
    do {
      const page = await this.api.context.listWorkspaceMembers({ parent, pageSize: PAGE_SIZE, pageToken });
      found.push(...page.members);
      pageToken = page.nextPageToken;
    } while (pageToken);
    return found;
  }

  /** A workspace's row: Delete it, or Hand over to one of its other members. Neither is
   *  chosen at first: what becomes of a workspace is the person's decision. */
  private ownedRow({ workspace, others }: OwnedAlone, index: number): HTMLElement {
    const group = `owned-workspace-${index}`;
    const newOwner = h(
      "select",
      { "data-testid": "owned-workspace-new-owner", "aria-label": "the member who becomes its owner", disabled: true },
      ...others.map((m) => h("option", { value: m.user }, `${this.names.title(m.user)} (${roleLabel(m.role)})`)),
    );
    const choice = (value: "delete" | "hand-over", label: string, disabled = false): HTMLElement =>
      h(
        "label",
        { class: "check" },
        h("input", {
          type: "radio",
          name: group,
          value,
          disabled,
          "data-testid": "owned-workspace-choice",
          "data-choice": value,
          onchange: () => {
            newOwner.disabled = value !== "hand-over";
          },
        }),
        ` ${label}`,
      );
    return h(
      "li",
      { class: "owned-workspace", "data-testid": "owned-workspace", "data-workspace": workspace.name, "data-members": String(others.length) },
      h("strong", { "data-content": true }, workspace.displayName || this.names.title(workspace.name)),
      h("div", { class: "row" }, choice("delete", "Delete it, with everything in it")),
      h(
        "div",
        { class: "row" },
        choice("hand-over", "Hand over to", others.length === 0),
        others.length ? newOwner : h("span", { class: "muted" }, "(no other member: add one first to hand it over)"),
      ),
    );
  }

  /** What the form says becomes of each workspace, or the choices still missing. */
  private choices(): OwnedWorkspace[] {
    const rows = [...this.owned.querySelectorAll<HTMLElement>('[data-testid="owned-workspace"]')];
    const violations: { field: string; description: string }[] = [];
    const chosen = rows.map((row, i) => {
      const workspace = row.dataset.workspace ?? "";
      const picked = row.querySelector<HTMLInputElement>('[data-testid="owned-workspace-choice"]:checked')?.value;
      const select = row.querySelector<HTMLSelectElement>('[data-testid="owned-workspace-new-owner"]');
      if (picked === undefined) {
        violations.push({ field: `workspaces[${i}].action`, description: "choose Delete or Hand over" });
      }
      if (picked === "hand-over" && !select?.value) {
        violations.push({ field: `workspaces[${i}].new_owner`, description: "choose the member who becomes its owner" });
      }
      return {
        workspace,
        action: picked === "hand-over" ? OwnedWorkspaceAction.HAND_OVER : OwnedWorkspaceAction.DELETE,
        newOwner: picked === "hand-over" ? (select?.value ?? "") : "",
      } as OwnedWorkspace;
    });
    if (violations.length) throw local("INVALID_ARGUMENT", "say what becomes of each workspace only you own", violations);
    return chosen;
  }

  private async askToDelete(): Promise<void> {
    await this.page.busy("delete-account", async () => {
      const workspaces = this.choices();
      const removed = workspaces.filter((w) => w.action === OwnedWorkspaceAction.DELETE).length;
      const handed = workspaces.length - removed;
      const parts = [
        removed ? `${removed === 1 ? "1 workspace is" : `${removed} workspaces are`} deleted with everything in it` : "",
        handed ? `${handed === 1 ? "1 workspace is" : `${handed} workspaces are`} handed over` : "",
      ].filter(Boolean);
      this.asking.replaceChildren(
        confirmation({
          text: `Delete your account for good? You are signed out everywhere at once${parts.length ? `; ${parts.join(", ")}` : ""}.`,
          label: "Delete my account",
          name: "delete-account",
          action: "delete-account",
          act: () => this.deleteAccount(workspaces),
          refused: (_shown, found) => {
            // A workspace came to be owned by the person alone since the list was read (an
            // owner left): the list is read again, to choose for it too.
            if (found.code === "FAILED_PRECONDITION") void this.page.busy("delete-account-start", () => this.listOwned());
          },
        }),
      );
    });
  }

  private async deleteAccount(workspaces: OwnedWorkspace[]): Promise<void> {
    await this.api.auth.deleteMyAccount({ confirmEmail: this.email.value.trim(), workspaces });
    // Every credential of the person is refused from now on: this tab forgets its own.
    this.deleted();
    this.page.notice("Your account is deleted. You are signed out everywhere; the rest of your data is being erased.");
  }
}
