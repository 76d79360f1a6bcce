// The open workspace's files (ListFiles, newest first), beside the assistants: each with its
// name, size and kind, Download, and, for editors and owners, Delete (asked first, beside
// it). The list follows the workspace's FILE_CHANGED events, so a file attached in a message,
// stored by a script or deleted elsewhere shows as it happens.
import { type Api, PAGE_SIZE } from "./api";
import { deleteConfirmation } from "./confirm";
import { append, fill, h } from "./dom";
import { downloadFile, formatSize, save } from "./files";
import { type File as StoredFile, FileKind } from "./gen/switchboard/api/context/v1/context_pb";
import type { Event } from "./gen/switchboard/api/events/v1/events_pb";
import type { Page } from "./page";

const KIND: Record<FileKind, string> = {
  [FileKind.UNSPECIFIED]: "file",
  [FileKind.IMAGE]: "image",
  [FileKind.DOCUMENT]: "document",
  [FileKind.AUDIO]: "audio",
  [FileKind.OTHER]: "file",
};

export class FilesPanel {
  readonly elements: HTMLElement[];
  private readonly list = h("ul", { class: "list files", "data-testid": "file-list" });
  private readonly usage = h("p", { class: "muted", "data-testid": "files-usage" });
  private readonly section: HTMLElement;
  private workspace = "";
  private canDelete = false;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
  ) {
    this.section = h("section", { class: "files-panel", "data-testid": "files-panel", hidden: true }, h("h2", {}, "Files"), this.usage, this.list);
    this.elements = [this.section];
  }

  open(workspace: string, canDelete: boolean): void {
    this.workspace = workspace;
    this.canDelete = canDelete;
    this.section.hidden = false;
    void this.load();
  }

  clear(): void {
    this.workspace = "";
    this.section.hidden = true;
    this.list.replaceChildren();
    this.usage.textContent = "";
  }

  apply(event: Event): void {
    if (event.payload.case !== "fileChanged" || event.workspace !== this.workspace) return;
    void this.load();
  }

  private async load(): Promise<void> {
    const parent = this.workspace;
    if (!parent) return;
    await this.page.busy(
      "list-files",
      async () => {
        const listed = await this.api.context.listFiles({ parent, pageSize: PAGE_SIZE });
        if (parent !== this.workspace) return;
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

  private entry(file: StoredFile): HTMLElement {
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
      ),
      h("div", { class: "file-actions" }, download, remove),
    ]);
    return item;
  }
}
