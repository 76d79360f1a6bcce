// The composer under the open conversation: a message, the files attached to it (uploaded
// as they are attached, files.ts), the handler or assistant it goes to (the workspace's,
// listed when it opens; once the conversation was handed over, the assistant holding it
// is said beside the choice), handler parameters, and SendMessage. What
// is open, and what to do with the answer, is the host's (the navigation's): the composer
// asks rather than keeps a copy that could fall behind.
import type { JsonObject } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { type Api, PAGE_SIZE, requestId } from "./api";
import { h } from "./dom";
import { limitSummary, local, problem } from "./errors";
import { type Message, MessageRole } from "./gen/switchboard/api/context/v1/context_pb";
import type { Assistant, Run, SendMessageResponse } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { SteerMode } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import { learnBudgetTitles } from "./budgets";
import { Attachments } from "./files";
import type { Names } from "./names";
import type { Page } from "./page";
import type { HolderClaim, RunListener, RunView } from "./runs";
import { TalkControl } from "./talk";
import { LiveTalk } from "./livetalk";

export interface ComposerHost {
  /** The open workspace's name ("" for none). */
  workspace(): string;
  /** The open conversation's name ("" for none). */
  conversation(): string;
  /** SendMessage (or SteerRun) answered for `conversation`, which may no longer be the
   *  open one: the stored message and the run that answers it (or the steer's own run). */
  sent(conversation: string, answer: { run?: Run | undefined; message?: Message | undefined }): void;
  /** Follows a run's updates beside its card (push-to-talk plays its speech). */
  listen(run: string, listener: RunListener): RunView | undefined;
  /** The open conversation's run a steer would go to, "" when none is going. */
  steerTarget(): string;
}

export class Composer {
  readonly element: HTMLFormElement;
  private readonly text = h("textarea", {
    "data-testid": "message-input",
    "aria-label": "message",
    rows: 3,
    placeholder: "Message",
    required: true,
  });
  private readonly handler = h("select", { "data-testid": "handler-select", "aria-label": "handler" });
  private readonly assistant = h("select", { "data-testid": "assistant-select", "aria-label": "assistant" });
  private readonly parameters = h("textarea", { "data-testid": "parameters-input", rows: 2, spellcheck: false });
  /** How the run a message starts takes a steer that comes while its model writes
   *  (`SendMessageRequest.steer_mode`). */
  private readonly steerMode = h(
    "select",
    { "data-testid": "steer-mode", "aria-label": "when steered while writing" },
    h("option", { value: String(SteerMode.FINISH_STREAM) }, "finish the answer, then take the steer"),
    h("option", { value: String(SteerMode.RESTART_STREAM) }, "cut the answer and start again with the steer"),
  );
  /** Hands the message to the run going (SteerRun), shown while one is. */
  private readonly steerButton = h(
    "button",
    {
      type: "button",
      "data-testid": "steer",
      hidden: true,
      title: "Hand this message to the run going: it takes it before its next model call, without starting over",
      onclick: () => void this.steer(),
    },
    "Steer",
  );
  private readonly attachments: Attachments;
  private attachmentsWorkspace = "";
  /** Push-to-talk, shown when the chosen assistant has a voice. */
  readonly talk: TalkControl;
  /** Live voice (a Talk session over WebRTC), beside push-to-talk. */
  readonly live: LiveTalk;
  /** The assistant with a voice that Talk and Live speak to ("" when none would). */
  private voiced = "";
  /** The open workspace's assistants (whose `voice` says whether Talk shows). */
  private assistants: Assistant[] = [];
  /** Who holds the open conversation, as the latest thing seen in it says (a handoff, a
   *  run the holder answered); undefined until one is seen. */
  private holder: HolderClaim | undefined;
  /** Says which assistant holds the conversation, and so where a message naming none goes. */
  private readonly holderHint = h("p", { class: "muted holder", "data-testid": "conversation-holder", hidden: true });

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly host: ComposerHost,
    private readonly names: Names,
  ) {
    // A message with files needs no text.
    this.attachments = new Attachments(api, () => this.host.workspace(), () => {
      this.text.required = this.attachments.count === 0;
    });
    this.talk = new TalkControl(api, page, {
      target: () => ({
        workspace: this.host.workspace(),
        conversation: this.host.conversation(),
        assistant: this.assistant.value,
        handler: this.handler.value,
      }),
      sent: (conversation, answer) => this.host.sent(conversation, answer),
      listen: (run, listener) => this.host.listen(run, listener),
    });
    this.live = new LiveTalk(api, page, {
      target: () => ({ conversation: this.host.conversation(), assistant: this.voiced }),
      started: (conversation, run) => this.host.sent(conversation, { run }),
      activeChanged: () => this.showTalk(),
    });
    this.handler.addEventListener("change", () => this.showTalk());
    this.assistant.addEventListener("change", () => this.showTalk());
    this.handler.addEventListener("change", () => this.showHolder());
    this.assistant.addEventListener("change", () => this.showHolder());
    this.element = h(
      "form",
      {
        class: "composer",
        "data-testid": "composer",
        hidden: true,
        onsubmit: (event: Event) => {
          event.preventDefault();
          void this.send();
        },
      },
      this.text,
      this.attachments.element,
      h("div", { class: "row" }, this.handler, this.assistant, h("button", { type: "submit", "data-testid": "send" }, "Send"), this.steerButton),
      this.holderHint,
      this.talk.element,
      this.live.element,
      h(
        "details",
        { "data-testid": "advanced" },
        h("summary", {}, "Advanced"),
        h("label", {}, "Handler parameters (JSON object, e.g. ", h("code", {}, '{"delay_ms": 200}'), ")", this.parameters),
        h("label", {}, "A steer that comes while the model writes: ", this.steerMode),
      ),
    );
    this.attachments.dropTarget(this.element);
  }

  /** Shown while a conversation is open. */
  show(visible: boolean): void {
    this.element.hidden = !visible;
    this.offerSteer();
  }

  /** Steer is offered while the open conversation has a run going (the run it would
   *  steer in `data-target`). */
  offerSteer(): void {
    const target = this.host.conversation() ? this.host.steerTarget() : "";
    this.steerButton.hidden = target === "";
    this.steerButton.dataset.target = target;
  }

  /** The conversation open changed (or none is): a recording or a spoken answer of the one
   *  before stops. */
  left(): void {
    this.talk.reset();
    this.live.reset();
    this.holder = undefined;
    this.showHolder();
    this.showTalk();
  }

  /** Something seen in the open conversation says who holds it: kept if it is the latest
   *  word (an older run inspected later does not take the conversation back). */
  held(claim: HolderClaim): void {
    if (this.holder && claim.at < this.holder.at) return;
    this.holder = claim;
    this.showHolder();
    this.showTalk();
  }

  /** The conversation's history, as listed when it opened: its last handoff that took
   *  (a `transfer_to_{id}` call whose result succeeded) says who holds it. */
  history(messages: Message[]): void {
    const results = new Set<string>();
    for (const m of messages) {
      for (const p of m.parts) if (p.part.case === "toolResult" && p.part.value.outcome === "succeeded") results.add(p.part.value.id);
    }
    const sorted = [...messages].sort((a, b) => Number(b.sequence - a.sequence));
    for (const m of sorted) {
      for (const p of [...m.parts].reverse()) {
        if (p.part.case !== "toolCall" || !results.has(p.part.value.id)) continue;
        const assistant = this.handoffTarget(m.name, p.part.value.functionName || p.part.value.tool);
        if (!assistant) continue;
        const reason = p.part.value.arguments?.reason;
        return this.held({
          assistant,
          at: m.createTime ? timestampDate(m.createTime).getTime() : 0,
          reason: typeof reason === "string" ? reason : "",
          run: "",
          from: "",
        });
      }
    }
  }

  /** The assistant a handoff tool (`transfer_to_{assistant id}`, docs/delegation.md) hands
   *  to, in the workspace of `message`; "" if `tool` is no handoff. A name past 64
   *  characters is cut to 55 and hashed: matched among the workspace's assistants by the
   *  part kept (ids have no underscore, so only a cut name ends in `_` and 8 hex digits). */
  private handoffTarget(message: string, tool: string): string {
    const prefix = "transfer_to_";
    if (!tool.startsWith(prefix)) return "";
    const workspace = message.split("/conversations/")[0] ?? "";
    const cut = tool.length === 64 ? /^(.{55})_[0-9a-f]{8}$/.exec(tool) : null;
    if (!cut) return `${workspace}/assistants/${tool.slice(prefix.length)}`;
    const kept = `${workspace}/assistants/${(cut[1] ?? "").slice(prefix.length)}`;
    const found = this.assistants.filter((a) => a.name.startsWith(kept));
    return found.length === 1 ? (found[0]?.name ?? "") : "";
  }

  /** The assistant holding the conversation, by its title, and whether this message goes
   *  to it: it does when it names no assistant and forces no handler. */
  private showHolder(): void {
    // A holder deleted since: the workspace's default answers again.
    const claim = this.holder && (this.assistants.length === 0 || this.assistants.some((a) => a.name === this.holder?.assistant)) ? this.holder : undefined;
    const hint = this.holderHint;
    const unnamed = this.assistant.options[0];
    if (unnamed?.value === "") {
      unnamed.textContent = claim ? `assistant: ${this.names.title(claim.assistant)}, which holds this conversation` : "assistant: the workspace default";
    }
    if (!claim) {
      hint.hidden = true;
      hint.replaceChildren();
      delete hint.dataset.assistant;
      return;
    }
    const title = this.names.title(claim.assistant);
    const chosen = this.assistant.value;
    const goes = !chosen && !this.handler.value;
    Object.assign(hint.dataset, { assistant: claim.assistant, run: claim.run, goesToHolder: String(goes) });
    hint.title = claim.reason ? `Handed over: ${claim.reason}` : "";
    hint.hidden = false;
    hint.replaceChildren(
      "This conversation is with ",
      h("strong", { "data-testid": "conversation-holder-title" }, title),
      goes
        ? ": a message that names no assistant goes to it."
        : chosen
          ? `: this message goes to ${chosen === claim.assistant ? "it" : this.names.title(chosen)}, and the conversation stays with ${title}.`
          : ": this message goes to the handler chosen, and the conversation stays with it.",
    );
  }

  /** Talk and Live show when the message would go to an assistant with a voice: the one
   *  chosen, or, when none is and no handler is forced, the one holding the conversation,
   *  else the workspace's default. */
  private showTalk(): void {
    const chosen = this.assistant.value;
    const holder = this.holder?.assistant;
    const target = chosen
      ? this.assistants.find((a) => a.name === chosen)
      : this.handler.value
        ? undefined
        : (holder ? this.assistants.find((a) => a.name === holder) : undefined) ?? this.assistants.find((a) => a.workspaceDefault);
    const voice = target?.voice !== undefined;
    this.voiced = voice ? (target?.name ?? "") : "";
    // While a live session goes, it has the microphone: push-to-talk steps aside.
    this.talk.available(voice && !this.live.active);
    this.live.available(voice);
  }

  /** The open workspace's handlers and assistants, as the choices. */
  async load(): Promise<void> {
    const parent = this.host.workspace();
    // Files stored in another workspace cannot go with a message here.
    if (this.attachments.count > 0 && this.attachmentsWorkspace !== parent) this.attachments.clear();
    this.attachmentsWorkspace = parent;
    await this.page.busy("list-handlers", async () => {
      const [handlers, assistants] = await Promise.all([
        this.api.dispatcher.listHandlers({ parent, pageSize: PAGE_SIZE }),
        this.api.dispatcher.listAssistants({ parent, pageSize: PAGE_SIZE }),
      ]);
      if (parent !== this.host.workspace()) return;
      this.handler.replaceChildren(
        h("option", { value: "" }, "handler: the router decides"),
        ...handlers.handlers.map((x) =>
          h("option", { value: x.name, disabled: !x.available }, `${x.name}${x.available ? "" : " (unavailable)"}`),
        ),
      );
      const chosen = this.assistant.value;
      this.assistant.replaceChildren(
        h("option", { value: "" }, "assistant: the workspace default"),
        ...assistants.assistants.map((a) =>
          h("option", { value: a.name }, `${a.displayName || a.name}${a.workspaceDefault ? " (default)" : ""}`),
        ),
      );
      if (assistants.assistants.some((a) => a.name === chosen)) this.assistant.value = chosen;
      this.assistants = assistants.assistants;
      this.showTalk();
      this.showHolder();
    });
  }

  /** Where the next message is written: scrolled to and focused. */
  focus(): void {
    this.text.scrollIntoView({ block: "nearest" });
    this.text.focus();
  }

  /** Where a message sent now goes: the handler and the assistant chosen ("" for the
   *  router's or the default's choice). A message edited goes there too. */
  choice(): { handler: string; assistant: string } {
    return { handler: this.handler.value, assistant: this.assistant.value };
  }

  /** Picks the assistant the next message goes to (the handler left to it). */
  choose(assistant: string): void {
    this.handler.value = "";
    this.assistant.value = assistant;
    this.assistant.dataset.chosen = assistant;
    this.showTalk();
    this.showHolder();
  }

  private async send(): Promise<void> {
    const conversation = this.host.conversation();
    const text = this.text.value;
    const handler = this.handler.value;
    const assistant = this.assistant.value;
    const raw = this.parameters.value.trim();
    let parameters: JsonObject | undefined;
    if (raw) {
      try {
        const parsed: unknown = JSON.parse(raw);
        if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new TypeError();
        parameters = parsed as JsonObject;
      } catch {
        return this.page.showProblem(
          local("INVALID_ARGUMENT", "the handler parameters are not a JSON object", [
            { field: "parameters", description: 'must be a JSON object, e.g. {"delay_ms": 200}' },
          ]),
          "send",
        );
      }
    }
    await this.page.busy("send", async () => {
      // The message goes once every attached file is stored (a failed one is the failure).
      const files = await this.attachments.references();
      const parts = [
        ...(text || files.length === 0 ? [{ part: { case: "text" as const, value: text } }] : []),
        ...files.map((value) => ({ part: { case: "file" as const, value } })),
      ];
      let answer: SendMessageResponse;
      try {
        answer = await this.api.dispatcher.sendMessage({
          conversation,
          message: { role: MessageRole.USER, parts },
          handler,
          assistant,
          ...(parameters ? { parameters } : {}),
          steerMode: Number(this.steerMode.value) as SteerMode,
          // Sending again after a lost answer must not start a second run.
          requestId: requestId(),
        });
      } catch (error) {
        // A limit (a spent budget, a rate, too many runs) is said in words: which one and
        // when it lets the message through; the text stays in the box to send again.
        const refused = problem(error);
        if (refused.reason === "ERROR_REASON_BUDGET_EXHAUSTED") {
          await learnBudgetTitles(this.api, this.names, refused.violations.map((v) => v.field));
        }
        const summary = limitSummary(refused, (name) => this.names.title(name));
        if (summary === undefined) throw error;
        throw { ...refused, summary };
      }
      this.text.value = "";
      this.attachments.clear();
      this.host.sent(conversation, answer);
    });
  }

  /** SteerRun on the conversation's run going: the message is stored at once and the run
   *  takes it at its next step boundary. A run that ended meanwhile refuses it (RUN_ENDED)
   *  and nothing is stored: the text stays in the box, to send as a new message. */
  private async steer(): Promise<void> {
    const conversation = this.host.conversation();
    const run = this.host.steerTarget();
    const text = this.text.value;
    if (!run) return this.offerSteer();
    if (!text.trim() && this.attachments.count === 0) {
      return this.page.showProblem(local("INVALID_ARGUMENT", "write the message to steer with", [{ field: "message", description: "must not be empty" }]), "steer");
    }
    await this.page.busy("steer", async () => {
      const files = await this.attachments.references();
      const parts = [
        ...(text || files.length === 0 ? [{ part: { case: "text" as const, value: text } }] : []),
        ...files.map((value) => ({ part: { case: "file" as const, value } })),
      ];
      try {
        const answer = await this.api.dispatcher.steerRun({
          run,
          message: { role: MessageRole.USER, parts },
          requestId: requestId(),
        });
        this.text.value = "";
        this.attachments.clear();
        this.host.sent(conversation, answer);
      } catch (error) {
        const refused = problem(error);
        if (refused.reason === "ERROR_REASON_RUN_ENDED") {
          this.offerSteer();
          throw { ...refused, summary: "The run ended before the steer reached it: nothing was stored. Send the message as a new one." };
        }
        const summary = limitSummary(refused, (name) => this.names.title(name));
        if (summary === undefined) throw error;
        throw { ...refused, summary };
      }
    });
  }
}
