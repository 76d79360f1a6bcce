// Files: attaching them to a message (a picker, or dropped on the composer), uploading them
// with the resumable unary steps (grpc-web cannot stream a request), showing the files a
// message names (images inline, documents as cards with their extracted text) and
// downloading any of them (DownloadFile, a server stream, which grpc-web carries).
//
// An upload: StartUpload, then AppendUpload in 1 MiB chunks at the committed size, then
// FinishUpload with the SHA-256. A chunk that fails on the way (no answer, UNAVAILABLE, a
// deadline, an offset the server no longer expects) is not the end: GetUpload says how much
// the server holds, and the upload goes on from there. The SHA-256 comes from
// crypto.subtle, which hashes one buffer, not a stream: the whole file is read once, so a
// file is attached only within MAX_FILE_BYTES (the server's own limits still apply).
import { Code, ConnectError } from "@connectrpc/connect";
import { type Api, requestId } from "./api";
import { backoff, fill, h, pause } from "./dom";
import { type Problem, local, problem, renderProblem } from "./errors";
import {
  type File as StoredFile,
  type FileReference,
  FileTextState,
  FileView,
  type Upload,
} from "./gen/switchboard/api/context/v1/context_pb";
import type { Page } from "./page";

/** The largest chunk AppendUpload takes (and DownloadFile sends). */
export const CHUNK_BYTES = 1024 * 1024;
/** The largest file the console attaches: crypto.subtle hashes it in one piece, in memory. */
export const MAX_FILE_BYTES = 256 * 1024 * 1024;
/** Failures in a row an upload or a download rides out before it gives up. */
const MAX_RETRIES = 5;
/** Images whose bytes are kept (as Blob URLs) for the conversations shown. */
const MAX_KEPT = 64;

/** Media types by suffix, for the files a browser gives no type (it often knows none for
 *  markdown or CSV); the server sniffs the content anyway. */
const SUFFIX_TYPES: Record<string, string> = {
  md: "text/markdown",
  markdown: "text/markdown",
  csv: "text/csv",
  json: "application/json",
  txt: "text/plain",
  pdf: "application/pdf",
  png: "image/png",
  jpg: "image/jpeg",
  jpeg: "image/jpeg",
  gif: "image/gif",
  webp: "image/webp",
};

export function mediaTypeOf(file: Blob & { name: string }): string {
  if (file.type) return file.type;
  const suffix = file.name.split(".").pop()?.toLowerCase() ?? "";
  return SUFFIX_TYPES[suffix] ?? "application/octet-stream";
}

/** 1536 -> "1.5 KB" (powers of 1024, the way the limits are written). */
export function formatSize(bytes: bigint | number): string {
  let value = Number(bytes);
  for (const unit of ["bytes", "KB", "MB", "GB"]) {
    if (value < 1024 || unit === "GB") return unit === "bytes" ? `${value} bytes` : `${value.toFixed(1)} ${unit}`;
    value /= 1024;
  }
  return `${value} bytes`;
}

/** Whether a failed step may be tried again: the server may not have seen it, or says
 *  where to continue. Everything else (a refusal, a checksum) is the answer. */
function retriable(error: unknown): boolean {
  if (!(error instanceof ConnectError)) return false;
  if ([Code.Unavailable, Code.DeadlineExceeded, Code.Aborted, Code.Unknown].includes(error.code)) return true;
  return problem(error).reason === "ERROR_REASON_UPLOAD_OFFSET_MISMATCH";
}

async function sha256Hex(file: Blob): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

export interface UploadProgress {
  /** The upload's name, once StartUpload answered. */
  upload?: string;
  /** Bytes the server holds. */
  sent: number;
  /** Chunks sent again after a failure (resumes). */
  resumes: number;
}

/** Sends `file` to `workspace` as a resumable upload; the stored file. `state.upload` set
 *  by an earlier attempt makes this one continue that upload from its committed size. */
export async function uploadFile(
  api: Api,
  workspace: string,
  file: globalThis.File,
  state: UploadProgress,
  onProgress: () => void,
  signal: AbortSignal,
): Promise<StoredFile> {
  const size = file.size;
  if (size > MAX_FILE_BYTES) {
    throw local("RESOURCE_EXHAUSTED", `${file.name} is ${formatSize(size)}; the console attaches files up to ${formatSize(MAX_FILE_BYTES)}`, [
      { field: "file.size_bytes", description: `at most ${MAX_FILE_BYTES} bytes` },
    ]);
  }
  // Hashed while the chunks go out.
  const checksum = sha256Hex(file);
  checksum.catch(() => undefined);
  let upload: Upload | undefined;
  if (state.upload === undefined) {
    const started = await api.context.startUpload(
      {
        parent: workspace,
        file: { displayName: file.name, mediaType: mediaTypeOf(file), sizeBytes: BigInt(size) },
        // A start sent again after a lost answer is the same upload.
        requestId: requestId(),
      },
      { signal },
    );
    upload = started.upload;
    if (upload === undefined) throw local("INTERNAL", "StartUpload answered without an upload");
    state.upload = upload.name;
  }
  const name = state.upload;
  let offset = upload === undefined ? -1 : Number(upload.committedSize);
  let failures = 0;
  while (offset < size) {
    try {
      if (offset < 0) {
        // Where the server is, after a failure (or when an earlier attempt is continued).
        const got = await api.context.getUpload({ name }, { signal });
        offset = Number(got.upload?.committedSize ?? 0n);
        state.sent = offset;
        onProgress();
        continue;
      }
      const data = new Uint8Array(await file.slice(offset, Math.min(offset + CHUNK_BYTES, size)).arrayBuffer());
      const appended = await api.context.appendUpload({ name, offset: BigInt(offset), data }, { signal });
      offset = Number(appended.upload?.committedSize ?? BigInt(offset + data.length));
      state.sent = offset;
      failures = 0;
      onProgress();
    } catch (error) {
      if (signal.aborted || !retriable(error) || ++failures > MAX_RETRIES) throw error;
      state.resumes += 1;
      offset = -1;
      await pause(backoff(failures - 1), signal);
    }
  }
  const finished = await api.context.finishUpload({ name, sha256: await checksum }, { signal });
  if (finished.file === undefined) throw local("INTERNAL", "FinishUpload answered without a file");
  return finished.file;
}

/** A stored file's bytes and metadata, from DownloadFile; a stream that breaks is opened
 *  again at the offset reached (`read_offset`), so nothing is fetched twice. */
export async function downloadFile(api: Api, name: string, signal?: AbortSignal): Promise<{ file: StoredFile; blob: Blob }> {
  const chunks: Uint8Array<ArrayBuffer>[] = [];
  let received = 0;
  let file: StoredFile | undefined;
  let failures = 0;
  for (;;) {
    try {
      for await (const frame of api.context.downloadFile({ name, readOffset: BigInt(received) }, { signal })) {
        if (frame.file !== undefined && file === undefined) file = frame.file;
        if (frame.data.length > 0) {
          chunks.push(new Uint8Array(frame.data));
          received += frame.data.length;
        }
        failures = 0;
      }
      break;
    } catch (error) {
      if (signal?.aborted || !retriable(error) || ++failures > MAX_RETRIES) throw error;
      await pause(backoff(failures - 1), signal);
    }
  }
  if (file === undefined) throw local("INTERNAL", "DownloadFile sent no metadata");
  return { file, blob: new Blob(chunks, { type: file.mediaType || "application/octet-stream" }) };
}

/** Saves a blob as the browser's download of `filename`. */
export function save(url: string, filename: string): void {
  const link = h("a", { href: url, download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
}

// -- Attachments, in the composer ----------------------------------------------------------

interface Attachment {
  readonly file: globalThis.File;
  readonly workspace: string;
  readonly element: HTMLElement;
  readonly bar: HTMLProgressElement;
  readonly progress: UploadProgress;
  controller: AbortController;
  done: Promise<StoredFile>;
  stored?: StoredFile;
  failed?: Problem;
}

/** The files attached to the next message: each uploaded as soon as it is attached, with
 *  its progress, its failure (and Retry, which continues the upload), and × to drop it. */
export class Attachments {
  readonly element: HTMLElement;
  private readonly input = h("input", { type: "file", multiple: true, hidden: true, "data-testid": "attach-input" });
  private readonly list = h("ul", { class: "attachments", "data-testid": "attachments" });
  private readonly entries: Attachment[] = [];

  constructor(
    private readonly api: Api,
    private readonly workspace: () => string,
    /** Attachments were added or removed. */
    private readonly changed: () => void,
  ) {
    this.input.addEventListener("change", () => {
      this.add([...(this.input.files ?? [])]);
      this.input.value = "";
    });
    this.element = h(
      "div",
      { class: "attach" },
      this.input,
      h("button", { type: "button", "data-testid": "attach", onclick: () => this.input.click() }, "Attach files"),
      h("span", { class: "muted" }, " or drop them here"),
      this.list,
    );
  }

  /** Lets files be dropped anywhere on `target` (the composer). */
  dropTarget(target: HTMLElement): void {
    const carriesFiles = (event: DragEvent): boolean => [...(event.dataTransfer?.types ?? [])].includes("Files");
    target.addEventListener("dragover", (event) => {
      if (!carriesFiles(event)) return;
      event.preventDefault();
      target.classList.add("dropping");
    });
    target.addEventListener("dragleave", () => target.classList.remove("dropping"));
    target.addEventListener("drop", (event) => {
      target.classList.remove("dropping");
      if (!carriesFiles(event)) return;
      event.preventDefault();
      this.add([...(event.dataTransfer?.files ?? [])]);
    });
  }

  get count(): number {
    return this.entries.length;
  }

  add(files: globalThis.File[]): void {
    const workspace = this.workspace();
    if (!workspace) return;
    for (const file of files) {
      const bar = h("progress", { "data-testid": "upload-progress", max: Math.max(file.size, 1), value: 0 });
      const element = h("li", { class: "attachment", "data-testid": "attachment", "data-state": "uploading", "data-filename": file.name });
      const entry: Attachment = {
        file,
        workspace,
        element,
        bar,
        progress: { sent: 0, resumes: 0 },
        controller: new AbortController(),
        done: Promise.resolve(undefined as unknown as StoredFile),
      };
      this.entries.push(entry);
      this.list.append(element);
      this.start(entry);
    }
    this.changed();
  }

  /** The stored files, once every upload is done; a failed one is the message's failure. */
  async references(): Promise<FileReference[]> {
    const stored = await Promise.all(this.entries.map((e) => e.done));
    return stored.map(
      (f) => ({ file: f.name, displayName: f.displayName, mimeType: f.mediaType, sizeBytes: f.sizeBytes }) as FileReference,
    );
  }

  /** Drops every attachment (the message went, or another workspace opened). */
  clear(): void {
    for (const entry of [...this.entries]) this.remove(entry, false);
    this.changed();
  }

  private start(entry: Attachment): void {
    entry.failed = undefined;
    entry.controller = new AbortController();
    entry.element.dataset.state = "uploading";
    this.render(entry);
    entry.done = uploadFile(this.api, entry.workspace, entry.file, entry.progress, () => this.render(entry), entry.controller.signal).then(
      (stored) => {
        entry.stored = stored;
        entry.element.dataset.state = "stored";
        entry.element.dataset.file = stored.name;
        this.render(entry);
        return stored;
      },
      (error: unknown) => {
        if (entry.controller.signal.aborted) throw error;
        entry.failed = isProblem(error) ? error : problem(error);
        entry.element.dataset.state = "failed";
        this.render(entry);
        throw entry.failed;
      },
    );
    // Its failure is shown on the attachment; the send that waits on it reports it too.
    entry.done.catch(() => undefined);
  }

  private remove(entry: Attachment, notify = true): void {
    const index = this.entries.indexOf(entry);
    if (index >= 0) this.entries.splice(index, 1);
    entry.element.remove();
    if (entry.stored === undefined) {
      entry.controller.abort();
      // The bytes sent so far are discarded now, not at the upload's expiry.
      const name = entry.progress.upload;
      if (name !== undefined) void this.api.context.cancelUpload({ name }).catch(() => undefined);
    }
    if (notify) this.changed();
  }

  private render(entry: Attachment): void {
    const { file, progress, bar } = entry;
    bar.value = progress.sent;
    entry.element.dataset.sent = String(progress.sent);
    entry.element.dataset.resumes = String(progress.resumes);
    const status = entry.stored
      ? "uploaded"
      : entry.failed
        ? "failed"
        : `${Math.floor((100 * progress.sent) / Math.max(file.size, 1))}%`;
    fill(
      entry.element,
      h("span", { class: "file-name", "data-content": true }, file.name),
      h("span", { class: "muted" }, ` ${formatSize(file.size)} `),
      bar,
      h("span", { class: "muted", "data-testid": "upload-status" }, ` ${status}`),
      entry.failed
        ? h("button", { type: "button", "data-testid": "retry-upload", onclick: () => this.start(entry) }, "Retry")
        : null,
      h("button", { type: "button", class: "dismiss", "data-testid": "remove-attachment", "aria-label": "remove", onclick: () => this.remove(entry) }, "×"),
      entry.failed ? renderProblem(entry.failed) : null,
    );
  }
}

function isProblem(value: unknown): value is Problem {
  return typeof value === "object" && value !== null && "code" in value && "violations" in value && "wire" in value;
}

// -- Files in messages ---------------------------------------------------------------------

/** How a message's file parts look: an image inline (its bytes downloaded into a Blob
 *  URL), anything else a card with its name, size and (collapsed until opened) its text;
 *  each with Download. The views are kept by file, so showing the messages again (they are
 *  redrawn as they come) neither downloads an image again nor closes an open card. */
export class FileViews {
  private readonly views = new Map<string, HTMLElement>();
  private readonly urls = new Map<string, Promise<string>>();

  constructor(
    private readonly api: Api,
    private readonly page: Page,
  ) {}

  view(reference: FileReference, key: string): HTMLElement {
    const id = `${key}|${reference.file}`;
    let view = this.views.get(id);
    if (view === undefined) {
      view = reference.mimeType.startsWith("image/") ? this.image(reference) : this.card(reference);
      this.views.set(id, view);
    }
    return view;
  }

  /** Forgets the views and the images' bytes (another conversation opened). */
  clear(): void {
    this.views.clear();
    for (const url of this.urls.values()) void url.then(URL.revokeObjectURL, () => undefined);
    this.urls.clear();
  }

  private url(name: string): Promise<string> {
    let url = this.urls.get(name);
    if (url === undefined) {
      url = downloadFile(this.api, name).then(({ blob }) => URL.createObjectURL(blob));
      this.urls.set(name, url);
      // A failed download is not kept: the next try fetches again.
      url.catch(() => this.urls.delete(name));
      while (this.urls.size > MAX_KEPT) {
        const [oldest, kept] = this.urls.entries().next().value as [string, Promise<string>];
        this.urls.delete(oldest);
        void kept.then(URL.revokeObjectURL, () => undefined);
      }
    }
    return url;
  }

  private downloadButton(reference: FileReference): HTMLButtonElement {
    const button = h("button", { type: "button", "data-testid": "file-download", "data-file": reference.file }, "Download");
    button.addEventListener("click", () =>
      void this.page.busy(
        "file-download",
        async () => {
          save(await this.url(reference.file), reference.displayName || reference.file.split("/").pop() || "file");
        },
        { button },
      ),
    );
    return button;
  }

  private image(reference: FileReference): HTMLElement {
    const image = h("img", { alt: reference.displayName, "data-testid": "file-image", "data-file": reference.file, "data-state": "loading" });
    const figure = h(
      "figure",
      { class: "file-image", "data-testid": "file", "data-file": reference.file, "data-kind": "image" },
      image,
      h("figcaption", {}, h("span", { "data-content": true }, reference.displayName), ` ${formatSize(reference.sizeBytes)} `, this.downloadButton(reference)),
    );
    this.url(reference.file).then(
      (url) => {
        image.addEventListener("load", () => (image.dataset.state = "shown"), { once: true });
        image.src = url;
      },
      (error: unknown) => {
        image.dataset.state = "failed";
        figure.append(renderProblem(problem(error)));
      },
    );
    return figure;
  }

  private card(reference: FileReference): HTMLElement {
    const body = h("pre", { class: "file-text", "data-testid": "file-text-body", "data-content": true });
    const details = h("details", { "data-testid": "file-text" }, h("summary", {}, "Text"), body);
    let loaded = false;
    details.addEventListener("toggle", () => {
      if (!details.open || loaded) return;
      body.textContent = "loading…";
      void this.api.context.getFile({ name: reference.file, view: FileView.FULL }).then(
        ({ file }) => {
          const state = file?.textState ?? FileTextState.UNSPECIFIED;
          details.dataset.textState = FileTextState[state] ?? "";
          if (state === FileTextState.READY) {
            loaded = true;
            body.textContent = file?.text ?? "";
          } else if (state === FileTextState.PENDING) {
            // Opened again later, it asks again.
            body.textContent = "The text is still being extracted; close and open this again in a moment.";
          } else if (state === FileTextState.FAILED) {
            loaded = true;
            body.textContent = `The text could not be extracted: ${file?.textError ?? ""}`;
          } else {
            loaded = true;
            body.textContent = "This file has no text.";
          }
        },
        (error: unknown) => fill(body, renderProblem(problem(error))),
      );
    });
    return h(
      "article",
      { class: "file-card", "data-testid": "file", "data-file": reference.file, "data-kind": "document" },
      h("strong", { "data-testid": "file-name", "data-content": true }, reference.displayName || reference.file),
      h("span", { class: "muted", "data-testid": "file-size" }, ` ${formatSize(reference.sizeBytes)} · ${reference.mimeType} `),
      this.downloadButton(reference),
      details,
    );
  }
}
