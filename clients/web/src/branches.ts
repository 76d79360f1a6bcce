// Conversation branches on the open conversation's messages (docs/console.md#branches):
// a message with other versions at its place (`Message.siblings`) has a "< 2 / 3 >"
// switcher (SwitchBranch by the sibling's name, then the active branch listed again); the
// caller's own user message has Edit (SendMessage with `replaces`: the new version answers
// on a new branch, which becomes the active one); an answer has Regenerate
// (RegenerateMessage: a new answer beside it, on a new branch); and Delete (DeleteMessage,
// asked first, with or without the answers below it) for whom the server lets delete it.
// Viewers read every version (the branch a version was written on, without making it the
// conversation's active one: that is a write) but change none. The navigation owns the list and asks here
// for each message's controls; what an edit or a regeneration starts is followed as a send.
// Fork (forks.ts) goes beside them; a fork's shared messages, its source's, get neither a
// switcher nor Edit, Regenerate or Delete here.
import { type Api, requestId } from "./api";
import { learnBudgetTitles } from "./budgets";
import { confirmation } from "./confirm";
import { h } from "./dom";
import { limitSummary, local, problem } from "./errors";
import type { Forks } from "./forks";
import { type ContentPart, type Message, MessageRole, WorkspaceRole } from "./gen/switchboard/api/context/v1/context_pb";
import type { Run } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { messageRoleLabel } from "./labels";
import type { Names } from "./names";
import type { Page } from "./page";

export interface BranchesHost {
  /** The open conversation's name ("" for none). */
  conversation(): string;
  /** The caller's role in the open workspace. */
  role(): WorkspaceRole;
  /** The signed-in user, `users/{user}` ("" when signed out). */
  me(): string;
  /** Where the composer would send a message now: an edit goes to the same place. */
  target(): { handler: string; assistant: string };
  /** Lists the open conversation again: its active branch (it changed), or `branch`. */
  reload(branch?: number): Promise<void>;
  /** An edit or a regeneration started `answer.run` in `conversation`: followed as a send. */
  sent(conversation: string, answer: { run?: Run | undefined; message?: Message | undefined }): void;
}

/** An edit open: the message, and its form (kept across the list's renderings, with what
 *  was typed in it). */
interface Editing {
  name: string;
  form: HTMLFormElement;
  input: HTMLTextAreaElement;
}

export class Branches {
  private editing: Editing | null = null;
  /** A delete being asked about, by message: the box is kept across renderings until it
   *  is answered (it removes itself then). */
  private asking: { name: string; box: HTMLElement } | null = null;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
    private readonly host: BranchesHost,
    private readonly forks: Forks | null = null,
  ) {}

  /** A conversation was opened or left: nothing of the last one stays open. */
  reset(): void {
    this.editing = null;
    this.asking = null;
    this.forks?.reset();
  }

  /** What goes under message `m` in the list: its switcher, its actions, and an edit or a
   *  delete question open on it; null when it has none. */
  controls(m: Message): HTMLElement | null {
    // A fork's shared message is its source's: its versions are switched there.
    const shared = this.forks?.shared(m) ?? false;
    const switcher = m.siblings.length > 1 && !shared ? this.switcher(m) : null;
    const actions = this.actions(m, shared);
    const editor = this.editing?.name === m.name ? this.keep(this.editing.form, this.editing.input) : null;
    const question = this.asking?.name === m.name && this.asking.box.isConnected ? this.keep(this.asking.box) : null;
    const forking = this.forks?.form(m);
    const fork = forking ? this.keep(forking) : null;
    if (!switcher && actions.length === 0 && !editor && !question && !fork) return null;
    return h(
      "div",
      { class: "branch-controls", "data-testid": "message-controls" },
      switcher || actions.length ? h("div", { class: "row branch-bar" }, switcher, ...actions) : null,
      editor,
      question,
      fork,
    );
  }

  /** An element moved into the list's new rendering; the field that had the focus keeps it. */
  private keep<T extends HTMLElement>(element: T, field: HTMLElement = element): T {
    const focused = document.activeElement === field || (document.activeElement !== null && field.contains(document.activeElement));
    const target = focused ? (document.activeElement as HTMLElement) : null;
    // Moving it takes the focus away; once the new list is in the page it comes back.
    if (target) queueMicrotask(() => target.isConnected && target.focus({ preventScroll: true }));
    return element;
  }

  // -- The switcher -----------------------------------------------------------------------

  private switcher(m: Message): HTMLElement {
    const count = m.siblings.length;
    // The server numbers from 1; a message it did not place is read by its own name.
    const position = m.siblingPosition > 0 ? m.siblingPosition : Math.max(1, m.siblings.indexOf(m.name) + 1);
    const go = (to: number) => (e: globalThis.Event) => {
      const button = e.currentTarget as HTMLButtonElement;
      const sibling = m.siblings[to - 1];
      if (sibling) void this.switchTo(sibling, button);
    };
    return h(
      "span",
      {
        class: "branch-switcher",
        role: "group",
        "aria-label": "Versions of this message",
        "data-testid": "branch-switcher",
        "data-position": position,
        "data-count": count,
      },
      h(
        "button",
        { type: "button", class: "step", "data-testid": "branch-previous", "aria-label": "Previous version", title: "Previous version", disabled: position <= 1, onclick: go(position - 1) },
        "<",
      ),
      h("span", { class: "branch-position", "data-testid": "branch-position" }, `${position} / ${count}`),
      h(
        "button",
        { type: "button", class: "step", "data-testid": "branch-next", "aria-label": "Next version", title: "Next version", disabled: position >= count, onclick: go(position + 1) },
        ">",
      ),
    );
  }

  private async switchTo(sibling: string, button: HTMLButtonElement): Promise<void> {
    const conversation = this.host.conversation();
    await this.page.busy(
      "switch-branch",
      async () => {
        const role = this.host.role();
        if (role === WorkspaceRole.EDITOR || role === WorkspaceRole.OWNER) {
          await this.api.context.switchBranch({ conversation, message: sibling });
          if (conversation !== this.host.conversation()) return;
          this.reset();
          await this.host.reload();
          return;
        }
        // The active branch is the conversation's, for everyone: a reader may not move it,
        // and reads the branch the other version was written on instead.
        const { message } = await this.api.context.getMessage({ name: sibling });
        if (!message || conversation !== this.host.conversation()) return;
        await this.host.reload(message.branch);
      },
      { button },
    );
  }

  // -- Edit, Regenerate, Delete -----------------------------------------------------------

  private actions(m: Message, shared: boolean): HTMLElement[] {
    const role = this.host.role();
    const writer = role === WorkspaceRole.EDITOR || role === WorkspaceRole.OWNER;
    if (!writer) return [];
    const fork = this.forks?.action(m) ?? null;
    // Shared history is changed in the conversation it was written in (the server says so too).
    if (shared) return fork ? [fork] : [];
    const mine = m.author !== "" && m.author === this.host.me();
    const found: HTMLElement[] = [];
    // Only its author may write another version of a message (the server says so too).
    if (m.role === MessageRole.USER && mine) {
      found.push(
        h("button", { type: "button", class: "link", "data-testid": "edit-message", hidden: this.editing?.name === m.name, onclick: (e: globalThis.Event) => this.openEditor(m, e.currentTarget as HTMLButtonElement) }, "Edit"),
      );
    }
    if (m.role === MessageRole.ASSISTANT && m.run) {
      found.push(
        h(
          "button",
          {
            type: "button",
            class: "link",
            "data-testid": "regenerate-message",
            title: "Write this answer again: the new one goes beside it, on a branch of its own",
            onclick: (e: globalThis.Event) => void this.regenerate(m, e.currentTarget as HTMLButtonElement),
          },
          "Regenerate",
        ),
      );
    }
    if (fork) found.push(fork);
    // Editors delete answers and their own messages; someone else's message is the owner's.
    const deletable = role === WorkspaceRole.OWNER || m.role === MessageRole.ASSISTANT || m.role === MessageRole.TOOL || (m.role === MessageRole.USER && mine);
    if (deletable) {
      found.push(h("button", { type: "button", class: "link danger", "data-testid": "delete-message", onclick: () => this.askDelete(m) }, "Delete"));
    }
    return found;
  }

  /** The inline editor, with the message's text; Save sends it as a new version. */
  private openEditor(m: Message, edit: HTMLButtonElement): void {
    const input = h("textarea", { "data-testid": "message-edit-input", "aria-label": "the message, edited", rows: 3 });
    input.value = m.parts.flatMap((p) => (p.part.case === "text" ? [p.part.value] : [])).join("\n");
    const form = h(
      "form",
      {
        class: "editor message-editor",
        "data-testid": "message-editor",
        "data-name": m.name,
        onsubmit: (e: globalThis.Event) => {
          e.preventDefault();
          void this.saveEdit(m, input.value, form.querySelector<HTMLButtonElement>('[data-testid="save-message-edit"]'));
        },
      },
      input,
      h(
        "div",
        { class: "row" },
        h("button", { type: "submit", "data-testid": "save-message-edit" }, "Save"),
        h(
          "button",
          {
            type: "button",
            "data-testid": "cancel-message-edit",
            onclick: () => {
              if (this.editing?.form === form) this.editing = null;
              const item = form.closest('[data-testid="message"]');
              const edit = item?.querySelector<HTMLButtonElement>('[data-testid="edit-message"]');
              if (edit) edit.hidden = false;
              form.remove();
            },
          },
          "Cancel",
        ),
        h("small", { class: "muted" }, "Saved as a new version: this one stays, one click away."),
      ),
    );
    this.editing = { name: m.name, form, input };
    edit.hidden = true;
    edit.closest('[data-testid="message-controls"]')?.append(form);
    input.focus();
  }

  private async saveEdit(m: Message, text: string, button: HTMLButtonElement | null): Promise<void> {
    const conversation = this.host.conversation();
    // Files the message carried go with the new version; only its text is edited here.
    const kept: ContentPart[] = m.parts.filter((p) => p.part.case === "file");
    if (!text.trim() && kept.length === 0) {
      return this.page.showProblem(
        local("INVALID_ARGUMENT", "write the message", [{ field: "message.parts", description: "must not be empty" }]),
        "save-message-edit",
        button,
      );
    }
    const { handler, assistant } = this.host.target();
    await this.page.busy(
      "save-message-edit",
      async () => {
        const answer = await this.limited(() =>
          this.api.dispatcher.sendMessage({
            conversation,
            message: { role: MessageRole.USER, parts: [...(text ? [{ part: { case: "text" as const, value: text } }] : []), ...kept] },
            handler,
            assistant,
            replaces: m.name,
            requestId: requestId(),
          }),
        );
        if (this.editing?.name === m.name) this.editing = null;
        if (conversation !== this.host.conversation()) return;
        // The new version is listed with its siblings; the answer's copy has none.
        await this.host.reload();
        this.host.sent(conversation, { run: answer.run });
      },
      { button },
    );
  }

  private async regenerate(m: Message, button: HTMLButtonElement): Promise<void> {
    const conversation = this.host.conversation();
    await this.page.busy(
      "regenerate-message",
      async () => {
        const answer = await this.limited(() => this.api.dispatcher.regenerateMessage({ message: m.name, requestId: requestId() }));
        if (conversation !== this.host.conversation()) return;
        await this.host.reload();
        this.host.sent(conversation, { run: answer.run });
      },
      { button },
    );
  }

  /** A run refused at a limit (a budget, a rate, too many runs) says which, in words. */
  private async limited<T>(call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (error) {
      const refused = problem(error);
      if (refused.reason === "ERROR_REASON_BUDGET_EXHAUSTED") {
        await learnBudgetTitles(this.api, this.names, refused.violations.map((v) => v.field));
      }
      const summary = limitSummary(refused, (name) => this.names.title(name));
      if (summary === undefined) throw error;
      throw { ...refused, summary };
    }
  }

  /** Delete, asked first beside the message; the answers below it go too if ticked. */
  private askDelete(m: Message): void {
    const item = this.item(m.name);
    if (!item) return;
    const later = h("input", { type: "checkbox", "data-testid": "delete-with-later" });
    const box = confirmation({
      text: `Delete this ${messageRoleLabel(m.role)} message? It is gone for good, from every branch that holds it.`,
      label: "Delete",
      name: "delete-message",
      action: "delete-message",
      act: async () => {
        const conversation = this.host.conversation();
        await this.api.context.deleteMessage({ name: m.name, withLater: later.checked });
        this.asking = null;
        if (conversation !== this.host.conversation()) return;
        void this.page.busy("list-messages", () => this.host.reload());
      },
    });
    box.querySelector("p")?.after(h("label", { class: "check" }, later, " Also delete the answers below it"));
    this.asking = { name: m.name, box };
    for (const open of item.querySelectorAll('[data-testid="delete-message-confirmation"]')) open.remove();
    let place = item.querySelector('[data-testid="message-controls"]');
    if (!place) {
      place = h("div", { class: "branch-controls", "data-testid": "message-controls" });
      item.append(place);
    }
    place.append(box);
  }

  private item(name: string): HTMLElement | undefined {
    return [...document.querySelectorAll<HTMLElement>('[data-testid="message"]')].find((e) => e.dataset.name === name);
  }
}
