// The open workspace's integrations: their health, circuit, failures and last error, as
// WatchIntegrations reports them (every reopening of the stream starts with a fresh
// snapshot, which replaces what was shown, so an integration deleted meanwhile goes too);
// registering one (an MCP server, a gRPC domain expert, a webhook, an A2A agent; the
// credential is write-only); each one's tools with their input schemas, and a tool
// invoked from a form its schema generates; a webhook's deliveries, redelivered on demand.
// Management controls are an owner's: other roles see them hidden (the server refuses
// them anyway, and the page shows that refusal as any other).
import { durationMs, timestampDate } from "@bufbuild/protobuf/wkt";
import { type Api, PAGE_SIZE, requestId } from "./api";
import { deleteConfirmation } from "./confirm";
import { fill, formatTime, h } from "./dom";
import { offerCurrentVersion, problem, renderProblem } from "./errors";
import { follow } from "./follow";
import { idAttributes, idRule } from "./ids";
import { jsonText } from "./jsontext";
import { EventType } from "./gen/switchboard/api/events/v1/events_pb";
import { circuitLabel, deliveryLabel, eventTypeLabel, eventTypeNameLabel, healthLabel, kindLabel } from "./labels";
import {
  CircuitState,
  DeliveryState,
  HealthState,
  type Integration,
  IntegrationKind,
  type Tool,
  type WatchIntegrationsResponse,
} from "./gen/switchboard/api/integration/v1/integration_pb";
import type { Names } from "./names";
import type { Page } from "./page";
import { schemaForm } from "./schemaform";

/** The last segment of a resource name, decoded (`~XX` escapes in tool names). */
export function lastSegment(name: string): string {
  const last = name.split("/").pop() ?? name;
  return last.replace(/~([0-9A-F]{2})/g, (_, hex: string) => String.fromCharCode(Number.parseInt(hex, 16)));
}

/** Micro-units of the price table's currency (US dollars) as dollars: 2500n is "0.0025". */
function units(micros: bigint): string {
  return (Number(micros) / 1e6).toLocaleString("en", { maximumFractionDigits: 6 });
}

/** What a tool call costs the run that makes it (docs/integration.md, "Prices"); "" if free. */
export function pricesText(i: Integration): string {
  const tools = Object.entries(i.toolCallPriceMicros).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  if (!i.callPriceMicros && !tools.length) return "";
  const each = tools.map(([tool, price]) => `${lastSegment(tool)}: ${units(price)}`).join(", ");
  return `price a tool call: ${units(i.callPriceMicros)}${each ? ` (${each})` : ""}`;
}

/** One integration's entry: its status line (re-rendered on every change) and the panes
 *  a person opened under it (tools, deliveries), which stay open across updates. */
interface Entry {
  item: HTMLElement;
  status: HTMLElement;
  panes: HTMLElement;
}

export class Integrations {
  /** The panel's heading, then its list and the registration form. */
  readonly elements: HTMLElement[];
  private readonly list = h("ul", { class: "list", "data-testid": "integrations" });
  private readonly integrations = new Map<string, Integration>();
  private readonly entries = new Map<string, Entry>();
  private readonly toolCache = new Map<string, Promise<Tool[]>>();
  private readonly kind = h(
    "select",
    { "data-testid": "integration-kind", "aria-label": "kind" },
    h("option", { value: String(IntegrationKind.MCP_SERVER) }, "MCP server"),
    h("option", { value: String(IntegrationKind.GRPC_HANDLER) }, "gRPC domain expert"),
    h("option", { value: String(IntegrationKind.WEBHOOK) }, "Webhook"),
    h("option", { value: String(IntegrationKind.A2A_AGENT) }, "A2A agent"),
  );
  private readonly newId = h("input", {
    "data-testid": "integration-id",
    "aria-label": "integration id",
    placeholder: "id (optional), e.g. kit",
    ...idAttributes("integration_id"),
  });
  private readonly newName = h("input", { "data-testid": "integration-name", "aria-label": "display name", placeholder: "display name" });
  private readonly endpoint = h("input", {
    "data-testid": "integration-endpoint",
    "aria-label": "endpoint",
    placeholder: "https://host/mcp, host:port, or a webhook URL",
  });
  private readonly credential = h("input", {
    "data-testid": "integration-credential",
    "aria-label": "credential",
    type: "password",
    autocomplete: "off",
    placeholder: "credential (write-only, optional)",
  });
  private readonly eventTypes = eventTypePicker("integration-event-types", []);
  private readonly retrySafe = h("input", { type: "checkbox", "data-testid": "integration-retry-safe-new" });
  private readonly form: HTMLElement;
  private watching: AbortController | null = null;
  /** The workspace watched, "" for none. */
  private parent = "";
  /** Whether a first snapshot of the workspace's integrations arrived. */
  private known = false;
  private manage = false;
  /** Called after every change to what is shown (the overview's hint follows). */
  onChange: () => void = () => undefined;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
  ) {
    this.form = h(
      "details",
      { class: "manage", "data-testid": "register-integration", hidden: true },
      h("summary", {}, "Register an integration"),
      h(
        "form",
        {
          class: "inline",
          onsubmit: (event: Event) => {
            event.preventDefault();
            void this.register();
          },
        },
        this.kind,
        this.newId,
        h("small", { class: "muted", "data-testid": "integration-id-format" }, `id: ${idRule("integration_id").words} (empty: one is made)`),
        this.newName,
        this.endpoint,
        this.credential,
        this.eventTypes.element,
        retrySafeChoice(this.retrySafe),
        h("button", { type: "submit", "data-testid": "create-integration" }, "Register"),
      ),
    );
    // Only a webhook is sent events: the choice shows for it alone.
    const kindChanged = (): void => {
      const webhook = Number(this.kind.value) === IntegrationKind.WEBHOOK;
      this.eventTypes.element.hidden = !webhook;
      // A webhook is sent events, never called as a tool: nothing to call again.
      (this.retrySafe.closest("label") ?? this.retrySafe).hidden = webhook;
    };
    this.kind.addEventListener("change", kindChanged);
    kindChanged();
    this.elements = [h("h2", {}, "Integrations"), this.list, this.form];
  }

  /** Whether the signed-in user may manage the open workspace's integrations (owners). */
  canManage(manage: boolean): void {
    this.manage = manage;
    this.form.hidden = !manage;
    for (const entry of this.entries.values()) {
      for (const button of entry.item.querySelectorAll<HTMLElement>(".manage")) button.hidden = !manage;
    }
  }

  all(): Integration[] {
    return [...this.integrations.values()];
  }

  /** How many the open workspace has; null before its first snapshot. */
  count(): number | null {
    return this.parent && this.known ? this.integrations.size : null;
  }

  /** The integration's tools (every page), fetched once per workspace opening. */
  tools(integration: string): Promise<Tool[]> {
    let found = this.toolCache.get(integration);
    if (found === undefined) {
      found = (async () => {
        const all: Tool[] = [];
        let pageToken = "";
        do {
          const page = await this.api.integration.listTools({ parent: integration, pageSize: 200, pageToken });
          all.push(...page.tools);
          pageToken = page.nextPageToken;
        } while (pageToken && all.length < 1_000);
        return all;
      })();
      this.toolCache.set(integration, found);
      found.catch(() => this.toolCache.delete(integration));
    }
    return found;
  }

  watch(parent: string): void {
    this.parent = parent;
    this.watching?.abort();
    const stop = new AbortController();
    this.watching = stop;
    this.integrations.clear();
    this.entries.clear();
    this.toolCache.clear();
    this.known = false;
    this.render();
    let snapshot: Map<string, Integration> | null = null;
    void follow<WatchIntegrationsResponse>(
      this.api,
      {
        open: (headers, signal) => {
          snapshot = new Map();
          return this.api.integration.watchIntegrations({ parent }, { headers, signal, timeoutMs: 0 });
        },
        frame: (frame) => {
          const target = snapshot ?? this.integrations;
          if (frame.integration) {
            if (frame.deleted) target.delete(frame.integration.name);
            else target.set(frame.integration.name, frame.integration);
          }
          if (frame.snapshotComplete && snapshot !== null) {
            // Replaces what an earlier stream showed: deletions while away are gone too.
            this.integrations.clear();
            for (const [name, integration] of snapshot) this.integrations.set(name, integration);
            snapshot = null;
            this.known = true;
          }
          if (snapshot === null) this.render();
          return "more";
        },
        status: (live, detail) => {
          const list = this.list;
          list.dataset.live = String(live);
          if (detail && !live) list.dataset.problem = detail.code;
          // Back: whatever ended the last stream is over.
          if (live) this.page.clearProblem("integrations");
        },
        failed: (detail) => this.page.showProblem(detail, "integrations"),
      },
      stop.signal,
    );
  }

  /** Signed out: nothing watched, nothing shown. */
  stop(): void {
    this.parent = "";
    this.watching?.abort();
    this.watching = null;
    this.integrations.clear();
    this.entries.clear();
    this.toolCache.clear();
    this.list.replaceChildren();
  }

  private async register(): Promise<void> {
    const parent = this.parent;
    const kind = Number(this.kind.value) as IntegrationKind;
    await this.page.busy("create-integration", async () => {
      const answer = await this.api.integration.createIntegration({
        parent,
        integrationId: this.newId.value.trim(),
        integration: {
          displayName: this.newName.value.trim(),
          kind,
          endpoint: this.endpoint.value.trim(),
          credential: this.credential.value,
          eventTypes: kind === IntegrationKind.WEBHOOK ? this.eventTypes.read() : [],
          retrySafe: kind !== IntegrationKind.WEBHOOK && this.retrySafe.checked,
        },
        requestId: requestId(),
      });
      // The credential is not kept on the page once the server has it.
      this.credential.value = "";
      this.newId.value = this.newName.value = this.endpoint.value = "";
      this.eventTypes.set([]);
      this.retrySafe.checked = false;
      // Registered: the form folds away (the new entry is what matters now).
      (this.form as HTMLDetailsElement).open = false;
      const created = answer.integration;
      if (created && parent === this.parent && !this.integrations.has(created.name)) {
        this.integrations.set(created.name, created);
        this.render();
      }
    });
  }

  private render(): void {
    this.renderList();
    this.onChange();
  }

  private renderList(): void {
    const list = this.list;
    if (this.integrations.size === 0) {
      const text = !this.parent ? "" : this.known ? "None in this workspace." : "Loading…";
      this.entries.clear();
      list.replaceChildren(h("li", { class: "muted", "data-testid": "integrations-empty" }, text));
      return;
    }
    const items: HTMLElement[] = [];
    for (const i of this.integrations.values()) {
      // Events and tool names read with its title.
      this.names.learn(i.name, i.displayName);
      items.push(this.entry(i));
    }
    for (const name of [...this.entries.keys()]) if (!this.integrations.has(name)) this.entries.delete(name);
    // Moved, not rebuilt: an open pane keeps what was typed in it.
    if (items.some((item, index) => list.children[index] !== item) || list.children.length !== items.length) {
      list.replaceChildren(...items);
    }
  }

  private entry(i: Integration): HTMLElement {
    let entry = this.entries.get(i.name);
    if (entry === undefined) {
      const status = h("div", {});
      const panes = h("div", { class: "panes" });
      const item = h(
        "li",
        { "data-testid": "integration", "data-name": i.name },
        status,
        h(
          "div",
          { class: "row" },
          i.kind === IntegrationKind.WEBHOOK
            ? null
            : h("button", { type: "button", "data-testid": "integration-tools", onclick: (e: Event) => void this.showTools(i.name, panes, e) }, "Tools"),
          i.kind === IntegrationKind.WEBHOOK
            ? h("button", { type: "button", "data-testid": "integration-deliveries", onclick: (e: Event) => void this.showDeliveries(i.name, panes, e) }, "Deliveries")
            : null,
          h("button", { type: "button", class: "manage", hidden: !this.manage, "data-testid": "edit-integration", onclick: () => this.editForm(i.name, panes) }, "Edit"),
          h("button", { type: "button", class: "manage danger", hidden: !this.manage, "data-testid": "delete-integration", onclick: () => this.confirmDelete(i.name, panes) }, "Delete"),
        ),
        panes,
      );
      entry = { item, status, panes };
      this.entries.set(i.name, entry);
    }
    const healthValue = i.status?.health ?? HealthState.UNSPECIFIED;
    const circuitValue = i.status?.circuit ?? CircuitState.UNSPECIFIED;
    const health = `HEALTH_STATE_${HealthState[healthValue] ?? "UNSPECIFIED"}`;
    const circuit = `CIRCUIT_STATE_${CircuitState[circuitValue] ?? "UNSPECIFIED"}`;
    const failures = i.status?.consecutiveFailures ?? 0;
    const item = entry.item;
    item.className = `integration h-${(HealthState[healthValue] ?? "unspecified").toLowerCase()}`;
    Object.assign(item.dataset, { health, circuit, disabled: String(i.disabled), etag: i.etag });
    const circuitText = circuitLabel(circuitValue);
    fill(
      entry.status,
      h("strong", {}, i.displayName || lastSegment(i.name)),
      " ",
      h("span", { class: "muted", "data-testid": "integration-kind-label" }, kindLabel(i.kind)),
      h("div", { class: "muted endpoint", "data-testid": "integration-endpoint-shown" }, i.endpoint),
      h(
        "div",
        { class: "badges" },
        h("span", { class: "badge health", "data-testid": "integration-health" }, healthLabel(healthValue)),
        // Disabled: neither probed nor called (its health is as it was when it stopped).
        i.disabled ? h("span", { class: "badge", "data-testid": "integration-disabled" }, "disabled") : null,
        circuitText && !i.disabled ? h("span", { class: "badge", "data-testid": "integration-circuit" }, circuitText) : null,
        i.hasCredential ? h("span", { class: "muted", "data-testid": "integration-has-credential" }, "credential set") : null,
        failures ? h("span", { class: "muted" }, `${failures} ${failures === 1 ? "failure" : "failures"} in a row`) : null,
        i.kind === IntegrationKind.WEBHOOK || !i.retrySafe ? null : retrySafeShown(i),
      ),
      i.kind === IntegrationKind.WEBHOOK
        ? h("div", { class: "muted", "data-testid": "integration-event-types-shown" }, `events sent: ${i.eventTypes.length ? i.eventTypes.map(eventTypeNameLabel).join(", ") : "every kind"}`)
        : null,
      pricesText(i) ? h("div", { class: "muted", "data-testid": "integration-prices-shown" }, pricesText(i)) : null,
      i.kind === IntegrationKind.WEBHOOK || i.retrySafe ? null : retrySafeShown(i),
      i.status?.lastError?.message
        ? h("div", { class: "muted", "data-testid": "integration-error", "data-content": true }, i.status.lastError.message)
        : null,
    );
    return item;
  }

  // -- Editing and deleting ------------------------------------------------------------------

  /** The edit form under the entry (toggled): display name, endpoint, a new credential
   *  (write-only: empty keeps the one set), the webhook's event types, disabled. Saving
   *  sends only what changed (the FieldMask) with the etag it was opened at, so a change
   *  made elsewhere meanwhile is refused (ABORTED) rather than overwritten. */
  private editForm(name: string, panes: HTMLElement, reopen = false): void {
    const open = panes.querySelector('[data-testid="integration-editor"]');
    open?.remove();
    if (open && !reopen) return;
    panes.querySelector('[data-testid="delete-confirmation"]')?.remove();
    const current = this.integrations.get(name);
    if (!current) return;
    const webhook = current.kind === IntegrationKind.WEBHOOK;
    const field = (testid: string, label: string, input: HTMLInputElement): HTMLElement => {
      input.dataset.testid = testid;
      input.setAttribute("aria-label", label);
      return h("label", {}, label, input);
    };
    const displayName = h("input", { value: current.displayName, maxlength: 200 });
    const endpoint = h("input", { value: current.endpoint, required: true });
    const credential = h("input", { type: "password", autocomplete: "off", placeholder: current.hasCredential ? "set: empty keeps it" : "none set" });
    const eventTypes = eventTypePicker("edit-integration-event-types", current.eventTypes);
    const disabled = h("input", { type: "checkbox", "data-testid": "edit-integration-disabled", checked: current.disabled });
    const retrySafe = h("input", { type: "checkbox", "data-testid": "edit-integration-retry-safe", checked: current.retrySafe });
    const where = h("div", { "data-testid": "integration-editor-problem" });
    const form: HTMLFormElement = h(
      "form",
      {
        class: "inline editor",
        "data-testid": "integration-editor",
        "data-etag": current.etag,
        onsubmit: (event: Event) => {
          event.preventDefault();
          void this.saveEdit(current, { displayName, endpoint, credential, eventTypes, disabled, retrySafe }, form, where, panes);
        },
      },
      field("edit-integration-name", "Display name", displayName),
      field("edit-integration-endpoint", "Endpoint", endpoint),
      field("edit-integration-credential", current.hasCredential ? "New credential (write-only)" : "Credential (write-only)", credential),
      webhook ? eventTypes.element : null,
      h("label", { class: "check" }, disabled, " Disabled (neither probed nor called)"),
      webhook ? null : retrySafeChoice(retrySafe),
      where,
      h(
        "div",
        { class: "row" },
        h("button", { type: "submit", "data-testid": "save-integration" }, "Save"),
        h("button", { type: "button", "data-testid": "cancel-integration-edit", onclick: () => form.remove() }, "Cancel"),
      ),
    );
    panes.prepend(form);
  }

  private async saveEdit(
    before: Integration,
    inputs: {
      displayName: HTMLInputElement;
      endpoint: HTMLInputElement;
      credential: HTMLInputElement;
      eventTypes: EventTypePicker;
      disabled: HTMLInputElement;
      retrySafe: HTMLInputElement;
    },
    form: HTMLFormElement,
    where: HTMLElement,
    panes: HTMLElement,
  ): Promise<void> {
    const paths: string[] = [];
    const displayName = inputs.displayName.value.trim();
    const endpoint = inputs.endpoint.value.trim();
    const eventTypes = inputs.eventTypes.read();
    if (displayName !== before.displayName) paths.push("display_name");
    if (endpoint !== before.endpoint) paths.push("endpoint");
    // Write-only: sent only when one was typed (empty keeps the one set).
    if (inputs.credential.value) paths.push("credential");
    if (before.kind === IntegrationKind.WEBHOOK && [...eventTypes].sort().join(",") !== [...before.eventTypes].sort().join(",")) {
      paths.push("event_types");
    }
    if (inputs.disabled.checked !== before.disabled) paths.push("disabled");
    if (before.kind !== IntegrationKind.WEBHOOK && inputs.retrySafe.checked !== before.retrySafe) paths.push("retry_safe");
    where.replaceChildren();
    if (paths.length === 0) {
      form.remove();
      return;
    }
    const button = form.querySelector<HTMLButtonElement>('[data-testid="save-integration"]');
    if (button) button.disabled = true;
    try {
      const answer = await this.api.integration.updateIntegration({
        integration: {
          name: before.name,
          etag: before.etag,
          displayName,
          endpoint,
          credential: inputs.credential.value,
          eventTypes,
          disabled: inputs.disabled.checked,
          retrySafe: inputs.retrySafe.checked,
        },
        updateMask: { paths },
      });
      inputs.credential.value = "";
      form.remove();
      const updated = answer.integration;
      if (updated && this.integrations.has(updated.name)) {
        this.integrations.set(updated.name, updated);
        this.render();
      }
    } catch (error) {
      const p = problem(error);
      const box = renderProblem(p);
      box.dataset.action = "save-integration";
      offerCurrentVersion(box, p, "reload-integration", (reload) =>
        void this.page.busy(
          "reload-integration",
          async () => {
            const fresh = await this.api.integration.getIntegration({ name: before.name });
            if (fresh.integration) this.integrations.set(before.name, fresh.integration);
            this.render();
            this.editForm(before.name, panes, true);
          },
          { button: reload },
        ),
      );
      where.replaceChildren(box);
    } finally {
      if (button) button.disabled = false;
    }
  }

  /** Asks first, in place: deleting an integration takes its tools from every assistant. */
  private confirmDelete(name: string, panes: HTMLElement): void {
    const open = panes.querySelector('[data-testid="delete-confirmation"]');
    open?.remove();
    if (open) return;
    panes.querySelector('[data-testid="integration-editor"]')?.remove();
    const integration = this.integrations.get(name);
    if (!integration) return;
    const box = deleteConfirmation({
      title: integration.displayName || lastSegment(name),
      consequence:
        integration.kind === IntegrationKind.WEBHOOK
          ? "Its deliveries stop."
          : "Assistants that use its tools lose them; runs calling them fail.",
      action: "delete-integration",
      remove: async () => {
        await this.api.integration.deleteIntegration({ name, etag: integration.etag });
        this.integrations.delete(name);
        this.render();
      },
    });
    panes.prepend(box);
  }

  // -- Tools ---------------------------------------------------------------------------------

  /** The integration's tools, one line each (a tool opens to its description and form):
   *  an MCP server may lend dozens, and the page should stay a page. */
  private async showTools(integration: string, panes: HTMLElement, event: Event): Promise<void> {
    const open = panes.querySelector('[data-testid="tools"]');
    if (open) return open.remove();
    await this.page.busy(
      "integration-tools",
      async () => {
        const tools = await this.tools(integration);
        panes.querySelector('[data-testid="tools"]')?.remove();
        panes.append(
          h(
            "ul",
            { class: "list tools", "data-testid": "tools", "data-integration": integration },
            ...(tools.length ? tools.map((t) => this.tool(t)) : [h("li", { class: "muted" }, "No tools.")]),
          ),
        );
      },
      { button: event.currentTarget as HTMLButtonElement },
    );
  }

  private tool(tool: Tool): HTMLElement {
    const name = lastSegment(tool.name);
    const form = schemaForm(tool.inputSchema);
    const output = h("div", { "data-testid": "tool-output" });
    const button = h("button", { type: "submit", "data-testid": "invoke-tool" }, "Invoke");
    const invoke = async (): Promise<void> => {
      const read = form.read();
      if ("problem" in read) {
        output.replaceChildren(renderProblem(read.problem, "tool-problem"));
        return;
      }
      output.replaceChildren(h("span", { class: "muted" }, "calling…"));
      button.disabled = true;
      try {
        const answer = await this.api.integration.invokeTool({ name: tool.name, arguments: read.args });
        const ms = answer.latency ? durationMs(answer.latency) : 0;
        output.replaceChildren(
          h(
            "div",
            { "data-testid": "tool-result", "data-error": String(answer.isError) },
            h("span", { class: "muted" }, `${answer.isError ? "tool error" : "result"} · ${ms} ms`),
            answer.text ? h("pre", { "data-testid": "tool-result-text" }, answer.text) : null,
            answer.result && Object.keys(answer.result).length ? h("pre", {}, jsonText(answer.result, 2)) : null,
          ),
        );
      } catch (error) {
        output.replaceChildren(renderProblem(problem(error), "tool-problem"));
      } finally {
        button.disabled = false;
      }
    };
    return h(
      "li",
      { class: "tool", "data-testid": "tool", "data-tool": name, "data-name": tool.name },
      h(
        "details",
        { "data-testid": "tool-try" },
        h(
          "summary",
          { title: tool.description },
          h("code", {}, name),
          tool.title && tool.title !== name ? h("span", { class: "tool-title" }, tool.title) : null,
        ),
        tool.description ? h("div", { class: "muted", "data-testid": "tool-description", "data-content": true }, tool.description) : null,
        h(
          "form",
          {
            class: "inline",
            onsubmit: (event: Event) => {
              event.preventDefault();
              void invoke();
            },
          },
          form.element,
          button,
          h("details", {}, h("summary", { class: "muted" }, "input schema"), h("pre", { "data-testid": "tool-schema" }, jsonText(tool.inputSchema, 2))),
        ),
        output,
      ),
    );
  }

  // -- Webhook deliveries --------------------------------------------------------------------

  private async showDeliveries(integration: string, panes: HTMLElement, event?: Event): Promise<void> {
    const button = event?.currentTarget instanceof HTMLButtonElement ? event.currentTarget : null;
    await this.page.busy("integration-deliveries", async () => {
      const answer = await this.api.integration.listWebhookDeliveries({ parent: integration, pageSize: PAGE_SIZE });
      panes.querySelector('[data-testid="deliveries"]')?.remove();
      panes.append(
        h(
          "ul",
          { class: "list deliveries", "data-testid": "deliveries" },
          ...(answer.deliveries.length
            ? answer.deliveries.map((d) =>
                h(
                  "li",
                  { "data-testid": "delivery", "data-name": d.name, "data-state": `DELIVERY_STATE_${DeliveryState[d.state] ?? ""}` },
                  h(
                    "span",
                    {},
                    h("strong", {}, eventTypeNameLabel(d.eventType)),
                    ` ${deliveryLabel(d.state)} · ${d.attempts} ${d.attempts === 1 ? "attempt" : "attempts"}`,
                    d.lastHttpStatus ? ` · HTTP ${d.lastHttpStatus}` : "",
                    d.lastAttemptTime ? ` · ${formatTime(timestampDate(d.lastAttemptTime))}` : "",
                    d.lastError ? h("div", { class: "muted", "data-content": true }, d.lastError) : null,
                  ),
                  h(
                    "button",
                    {
                      type: "button",
                      class: "manage",
                      // A pending delivery is still being tried: nothing to send again.
                      hidden: !this.manage || d.state === DeliveryState.PENDING,
                      "data-testid": "redeliver",
                      onclick: (e: Event) =>
                        void this.page.busy(
                          "redeliver",
                          async () => {
                            await this.api.integration.redeliverWebhook({ name: d.name });
                            await this.showDeliveries(integration, panes);
                          },
                          { button: e.currentTarget as HTMLButtonElement },
                        ),
                    },
                    "Redeliver",
                  ),
                ),
              )
            : [h("li", { class: "muted" }, "No deliveries yet.")]),
        ),
      );
    }, { button });
  }
}

/** The choice of `retry_safe`, in words: what happens to a call in flight when the server
 *  stopped (docs/console.md, "A call whose outcome is unknown"). */
function retrySafeChoice(input: HTMLInputElement): HTMLElement {
  const hint = h(
    "small",
    { class: "muted" },
    "A call in flight when the server stopped is sent again by itself, with the same idempotency key. Unticked, the run waits for a person to decide.",
  );
  return h("label", { class: "check retry-safe" }, input, h("span", {}, " Safe to call again after a crash", hint));
}

/** Whether its calls are sent again after a crash, as its entry says it: the whole
 *  integration (a badge), some of its tools (a line), or nothing (a person decides). */
function retrySafeShown(i: Integration): HTMLElement | null {
  if (i.retrySafe) {
    return h(
      "span",
      { class: "badge", "data-testid": "integration-retry-safe", title: "A call in flight when the server stopped is sent again by itself, with the same idempotency key." },
      "safe to call again",
    );
  }
  if (i.retrySafeTools.length === 0) return null;
  return h(
    "div",
    { class: "muted", "data-testid": "integration-retry-safe-tools" },
    "Safe to call again after a crash: ",
    ...i.retrySafeTools.flatMap((t, n) => (n ? [", ", h("code", {}, t)] : [h("code", {}, t)])),
  );
}

interface EventTypePicker {
  element: HTMLElement;
  /** The chosen types as the contracts name them (`MESSAGE_CREATED`); none: every one. */
  read(): string[];
  set(chosen: string[]): void;
}

/** A webhook's event types as a box per kind of event, named in words. */
function eventTypePicker(testid: string, chosen: string[]): EventTypePicker {
  const boxes = Object.entries(EventType)
    .filter((entry): entry is [string, EventType] => typeof entry[1] === "number" && entry[1] !== EventType.UNSPECIFIED)
    .map(([name, value]) => ({
      name,
      input: h("input", { type: "checkbox", "data-testid": "event-type", "data-type": name, checked: chosen.includes(name) }),
      label: eventTypeLabel(value),
    }));
  const element = h(
    "fieldset",
    { class: "event-types", "data-testid": testid },
    h("legend", {}, "Events it is sent (none ticked: every one)"),
    ...boxes.map((b) => h("label", {}, b.input, ` ${b.label}`)),
  );
  return {
    element,
    read: () => boxes.filter((b) => b.input.checked).map((b) => b.name),
    set: (names) => {
      for (const b of boxes) b.input.checked = names.includes(b.name);
    },
  };
}
