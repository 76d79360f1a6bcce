// The open workspace's files (ListFiles, newest first), beside the assistants: each with its
// name, size and kind, Download, and, for editors and owners, Delete (asked first, beside
// it). The list follows the workspace's FILE_CHANGED events, so a file attached in a message,
// stored by a script or deleted elsewhere shows as it happens. The Files page
// (`#workspaces/w/files`, in the centre) lists them all, a page of ListFiles at a time, by
// kind, with each one's type, when and by whom it was stored and whether its text was read;
// while it is open the side list steps aside, so each file shows once.
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { type Api, PAGE_SIZE } from "./api";
import { deleteConfirmation } from "./confirm";
import { append, fill, formatTime, h } from "./dom";
import { downloadFile, formatSize, save } from "./files";
import { type File as StoredFile, FileKind, FileTextState } from "./gen/switchboard/api/context/v1/context_pb";
import type { Event } from "./gen/switchboard/api/events/v1/events_pb";
import type { Names } from "./names";
import type { Page } from "./page";

const KIND: Record<FileKind, string> = {
  [FileKind.UNSPECIFIED]: "file",
  [FileKind.IMAGE]: "image",
  [FileKind.DOCUMENT]: "document",
  [FileKind.AUDIO]: "audio",
  [FileKind.OTHER]: "file",
};

/** The kinds the Files page filters by (ListFiles `kinds`). */
const KIND_CHOICES: [FileKind, string][] = [
  [FileKind.UNSPECIFIED, "every kind"],
  [FileKind.IMAGE, "images"],
  [FileKind.DOCUMENT, "documents"],
  [FileKind.AUDIO, "audio"],
  [FileKind.OTHER, "other files"],
];

const TEXT: Partial<Record<FileTextState, string>> = {
  [FileTextState.PENDING]: "text being read",
  [FileTextState.READY]: "text read",
  [FileTextState.FAILED]: "text could not be read",
};

export class FilesPanel {
  readonly elements: HTMLElement[];
  /** The Files page, in the centre column while it is open. */
  readonly pageElement: HTMLElement;
  private readonly list = h("ul", { class: "list files", "data-testid": "file-list" });
  private readonly usage = h("p", { class: "muted", "data-testid": "files-usage" });
  private readonly section: HTMLElement;
  private readonly pageList = h("ul", { class: "list files", "data-testid": "files-page-list" });
  private readonly pageUsage = h("p", { class: "muted", "data-testid": "files-page-usage" });
  private readonly kind = h(
    "select",
    { "data-testid": "files-kind", "aria-label": "kind", onchange: () => void this.loadPage() },
    ...KIND_CHOICES.map(([kind, label]) => h("option", { value: String(kind) }, label)),
  );
  private readonly more = h("button", { type: "button", "data-testid": "files-more", hidden: true, onclick: () => void this.loadPage(true) }, "More");
  private workspace = "";
  private canDelete = false;
  private pageOpen = false;
  private nextPage = "";

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
  ) {
    this.section = h(
      "section",
      { class: "files-panel", "data-testid": "files-panel", hidden: true },
      h("h2", {}, "Files"),
      this.usage,
      this.list,
      h("a", { href: "#", class: "item", "data-testid": "all-files" }, "All files, by kind →"),
    );
    this.elements = [this.section];
    this.pageElement = h(
      "section",
      { class: "page files-page", "data-testid": "files-page", hidden: true },
      h("div", { class: "row" }, h("label", {}, "Show ", this.kind), this.pageUsage),
      this.pageList,
      this.more,
    );
  }

  open(workspace: string, canDelete: boolean): void {
    this.workspace = workspace;
    this.canDelete = canDelete;
    this.section.hidden = this.pageOpen;
    this.section.querySelector('[data-testid="all-files"]')?.setAttribute("href", `#${workspace}/files`);
    void this.load();
  }

  /** The Files page shown (true) or left (false). */
  show(open: boolean): void {
    this.pageOpen = open;
    this.pageElement.hidden = !open;
    this.section.hidden = open || !this.workspace;
    // Emptied rather than only hidden: a script's selector for a file finds the one shown.
    if (open) {
      this.list.replaceChildren();
      void this.loadPage();
    } else {
      this.pageList.replaceChildren();
      void this.load();
    }
  }

  clear(): void {
    this.workspace = "";
    this.section.hidden = true;
    this.list.replaceChildren();
    this.usage.textContent = "";
    this.pageList.replaceChildren();
    this.pageUsage.textContent = "";
    this.more.hidden = true;
    this.nextPage = "";
  }

  apply(event: Event): void {
    if (event.payload.case !== "fileChanged" || event.workspace !== this.workspace) return;
    void this.load();
    if (this.pageOpen) void this.loadPage();
  }

  /** The page's list: the first page of the kind chosen, or (`more`) the next one after it. */
  private async loadPage(more = false): Promise<void> {
    const parent = this.workspace;
    if (!parent || !this.pageOpen) return;
    const kind = Number(this.kind.value) as FileKind;
    await this.page.busy(
      "files-more",
      async () => {
        const listed = await this.api.context.listFiles({
          parent,
          pageSize: PAGE_SIZE,
          pageToken: more ? this.nextPage : "",
          kinds: kind === FileKind.UNSPECIFIED ? [] : [kind],
        });
        if (parent !== this.workspace || !this.pageOpen) return;
        this.nextPage = listed.nextPageToken;
        this.more.hidden = !listed.nextPageToken;
        this.pageUsage.textContent = `${formatSize(listed.workspaceUsageBytes)} stored in this workspace`;
        this.pageUsage.dataset.bytes = String(listed.workspaceUsageBytes);
        const entries = listed.files.map((f) => this.entry(f, true));
        if (more) append(this.pageList, entries);
        else fill(this.pageList, entries.length === 0 ? h("li", { class: "muted", "data-testid": "files-page-empty" }, "No files of this kind.") : null, ...entries);
        this.pageList.dataset.count = String(this.pageList.querySelectorAll('[data-testid="file-entry"]').length);
      },
      { button: this.more },
    );
  }

  private async load(): Promise<void> {
    const parent = this.workspace;
    if (!parent || this.pageOpen) return;
    await this.page.busy(
      "list-files",
      async () => {
        const listed = await this.api.context.listFiles({ parent, pageSize: PAGE_SIZE });
        if (parent !== this.workspace || this.pageOpen) return;
        this.usage.textContent = `${formatSize(listed.workspaceUsageBytes)} stored`;
        this.usage.dataset.bytes = String(listed.workspaceUsageBytes);
        fill(
          this.list,
          listed.files.length === 0 ? h("li", { class: "muted" }, "No files yet: attach one to a message.") : null,
          ...listed.files.map((f) => this.entry(f)),
        );
      },
      { area: "file-list" },
    );
  }

  /** A file's row; `full` (the Files page): with its type, when and by whom it was stored,
   *  and whether its text was read. */
  private entry(file: StoredFile, full = false): HTMLElement {
    const item = h("li", { class: "file-entry", "data-testid": "file-entry", "data-file": file.name, "data-kind": FileKind[file.kind] ?? "" });
    const download = h("button", { type: "button", "data-testid": "file-entry-download" }, "Download");
    download.addEventListener("click", () =>
      void this.page.busy(
        "file-entry-download",
        async () => {
          const { blob } = await downloadFile(this.api, file.name);
          const url = URL.createObjectURL(blob);
          save(url, file.displayName || "file");
          // The download has its own copy by the time a minute has passed.
          setTimeout(() => URL.revokeObjectURL(url), 60_000);
        },
        { button: download },
      ),
    );
    const remove = this.canDelete
      ? h("button", { type: "button", class: "danger", "data-testid": "delete-file" }, "Delete")
      : null;
    remove?.addEventListener("click", () => {
      if (item.querySelector('[data-testid="delete-confirmation"]')) return;
      item.append(
        deleteConfirmation({
          title: file.displayName || file.name,
          consequence: "Messages that name it keep the reference, but nobody can read or download it any more.",
          action: "delete-file",
          remove: async () => {
            await this.api.context.deleteFile({ name: file.name });
            item.remove();
          },
        }),
      );
    });
    // The name and what it is on the left, wrapping as it must; the buttons together on the
    // right, one row whatever the name's length.
    append(item, [
      h(
        "div",
        { class: "file-about" },
        h("span", { class: "file-name", "data-content": true }, file.displayName || file.name),
        h("span", { class: "muted" }, ` ${formatSize(file.sizeBytes)} · ${KIND[file.kind] ?? "file"}`),
        full ? this.details(file) : null,
      ),
      h("div", { class: "file-actions" }, download, remove),
    ]);
    return item;
  }

  private details(file: StoredFile): HTMLElement {
    const stored = file.createTime ? timestampDate(file.createTime) : undefined;
    const text = TEXT[file.textState];
    return h(
      "small",
      { class: "muted file-details", "data-testid": "file-details", "data-media-type": file.mediaType },
      [
        file.mediaType,
        stored ? `stored ${stored.toLocaleDateString("en", { day: "numeric", month: "short", year: "numeric" })} ${formatTime(stored)}` : "",
        file.creator ? `by ${this.names.title(file.creator)}` : "",
        text ?? "",
      ]
        .filter(Boolean)
        .join(" · "),
    );
  }
}
