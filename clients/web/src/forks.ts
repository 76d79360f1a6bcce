// Forks (docs/console.md#branches, "Forks"): "Fork" on a message starts a new
// conversation that shares the open one's history up to it (ForkConversation), with a
// title asked for in place, and opens it. In a fork, the shared messages are named under
// the conversation they were written in: they are that conversation's to edit,
// regenerate and delete, so they get no such action here (the server refuses them too),
// and the header says where the fork came from, linking there when the caller may open
// it. The Branches controls ask here for each message's Fork action and its form.
import { Code, ConnectError } from "@connectrpc/connect";
import { type Api, requestId } from "./api";
import { fill, h } from "./dom";
import { type Conversation, type Message, WorkspaceRole } from "./gen/switchboard/api/context/v1/context_pb";
import type { Names } from "./names";
import type { Page } from "./page";

export interface ForksHost {
  /** The open conversation's name ("" for none). */
  conversation(): string;
  /** The open conversation as listed, if it is (its title, what it was forked from). */
  listed(name: string): Conversation | undefined;
  /** The caller's role in the open workspace. */
  role(): WorkspaceRole;
  /** Opens conversation `name` as picking it from the list does (the list read again first). */
  open(name: string): Promise<void>;
}

/** A fork being asked for, by message: its form is kept across the list's renderings, with
 *  what was typed, and the request id of its last try (a retry of the same title makes one
 *  fork). */
interface Forking {
  name: string;
  form: HTMLFormElement;
  input: HTMLInputElement;
  tried: { title: string; id: string } | null;
}

/** The conversation a message is named under (`…/conversations/c/messages/m` -> `…/conversations/c`). */
export function conversationOf(message: string): string {
  const at = message.indexOf("/messages/");
  return at < 0 ? "" : message.slice(0, at);
}

export class Forks {
  /** Under the conversation's title: "Forked from <source>", hidden for any other conversation. */
  readonly note = h("p", { class: "forked-from muted", "data-testid": "forked-from", hidden: true });
  private forking: Forking | null = null;
  /** The conversation the note was made for (each one is looked up once per opening). */
  private noted = "";

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
    private readonly host: ForksHost,
  ) {}

  /** A conversation was opened or left: no form of the last one stays open. */
  reset(): void {
    this.forking = null;
  }

  /** Whether `m` is shared history of the open conversation (a fork's), named under the
   *  conversation it was written in. */
  shared(m: Message): boolean {
    const open = this.host.conversation();
    return open !== "" && conversationOf(m.name) !== open;
  }

  /** The Fork action on message `m`, for editors and owners; null for anyone else. */
  action(m: Message): HTMLElement | null {
    const role = this.host.role();
    if (role !== WorkspaceRole.EDITOR && role !== WorkspaceRole.OWNER) return null;
    return h(
      "button",
      {
        type: "button",
        class: "link",
        "data-testid": "fork-message",
        title: "A new conversation with the history up to here, to go on another way",
        hidden: this.forking?.name === m.name,
        onclick: (e: globalThis.Event) => this.openForm(m, e.currentTarget as HTMLButtonElement),
      },
      "Fork",
    );
  }

  /** The form open on `m`, moved into the list's new rendering; null when none is. */
  form(m: Message): HTMLElement | null {
    return this.forking?.name === m.name ? this.forking.form : null;
  }

  private openForm(m: Message, button: HTMLButtonElement): void {
    const open = this.host.conversation();
    const input = h("input", { "data-testid": "fork-title", "aria-label": "the new conversation's title", placeholder: "title" });
    input.value = this.host.listed(open)?.title ?? "";
    const form: HTMLFormElement = h(
      "form",
      {
        class: "editor fork-form",
        "data-testid": "fork-form",
        "data-name": m.name,
        onsubmit: (e: globalThis.Event) => {
          e.preventDefault();
          void this.fork(m, form.querySelector<HTMLButtonElement>('[data-testid="confirm-fork"]'));
        },
      },
      h("label", {}, "Fork into a new conversation, titled", input),
      h(
        "div",
        { class: "row" },
        h("button", { type: "submit", "data-testid": "confirm-fork" }, "Fork"),
        h("button", { type: "button", "data-testid": "cancel-fork", onclick: () => this.closeForm(form) }, "Cancel"),
        h("small", { class: "muted" }, "It shares the messages up to this one; this conversation stays as it is."),
      ),
    );
    this.forking = { name: m.name, form, input, tried: null };
    button.hidden = true;
    button.closest('[data-testid="message-controls"]')?.append(form);
    input.focus();
    input.select();
  }

  private closeForm(form: HTMLFormElement): void {
    if (this.forking?.form === form) this.forking = null;
    const button = form.closest('[data-testid="message"]')?.querySelector<HTMLButtonElement>('[data-testid="fork-message"]');
    if (button) button.hidden = false;
    form.remove();
  }

  private async fork(m: Message, button: HTMLButtonElement | null): Promise<void> {
    const forking = this.forking;
    if (forking?.name !== m.name) return;
    const title = forking.input.value.trim();
    // The same title tried again (the answer was lost) is the same request: one fork.
    if (forking.tried?.title !== title) forking.tried = { title, id: requestId() };
    const id = forking.tried.id;
    await this.page.busy(
      "confirm-fork",
      async () => {
        const answer = await this.api.context.forkConversation({ message: m.name, conversation: { title }, requestId: id });
        const made = answer.conversation;
        if (this.forking === forking) this.forking = null;
        if (!made) return;
        this.names.learn(made.name, made.title);
        await this.host.open(made.name);
      },
      { button },
    );
  }

  /** Conversation `name` is open ("" for none): the header says what it was forked from. */
  opened(name: string): void {
    if (name === this.noted) return;
    this.noted = name;
    this.note.hidden = true;
    fill(this.note);
    delete this.note.dataset.source;
    delete this.note.dataset.message;
    if (!name) return;
    void this.page.busy("forked-from", async () => {
      const conversation = this.host.listed(name) ?? (await this.api.context.getConversation({ name })).conversation;
      const from = conversation?.forkedFrom ?? "";
      const source = conversationOf(from);
      if (!source || name !== this.noted) return;
      // The source may be gone (deleted) or out of reach: then it is named, not linked.
      const title = this.host.listed(source)?.title ?? (await this.sourceTitle(source));
      if (name !== this.noted) return;
      const readable = title !== undefined;
      const shown = title || this.names.title(source);
      Object.assign(this.note.dataset, { source, message: from, readable: String(readable) });
      fill(
        this.note,
        "Forked from ",
        readable
          ? h("a", { href: `#${source}`, "data-testid": "forked-from-link", title: source, "data-content": true }, shown)
          : h("span", { "data-testid": "forked-from-name", "data-content": true }, shown),
      );
      this.note.hidden = false;
    });
  }

  /** The source's title ("" for none) if the caller may open it; undefined if not. */
  private async sourceTitle(source: string): Promise<string | undefined> {
    try {
      const { conversation } = await this.api.context.getConversation({ name: source });
      if (conversation) this.names.learn(conversation.name, conversation.title);
      return conversation?.title ?? "";
    } catch (error) {
      if (error instanceof ConnectError && (error.code === Code.NotFound || error.code === Code.PermissionDenied)) return undefined;
      throw error;
    }
  }
}
