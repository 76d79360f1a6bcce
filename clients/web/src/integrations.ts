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
import { fill, formatTime, h } from "./dom";
import { problem, renderProblem } from "./errors";
import { follow } from "./follow";
import {
  CircuitState,
  DeliveryState,
  HealthState,
  type Integration,
  IntegrationKind,
  type Tool,
  type WatchIntegrationsResponse,
} from "./gen/switchboard/api/integration/v1/integration_pb";
import type { Page } from "./page";
import { schemaForm } from "./schemaform";

/** The last segment of a resource name, decoded (`~XX` escapes in tool names). */
export function lastSegment(name: string): string {
  const last = name.split("/").pop() ?? name;
  return last.replace(/~([0-9A-F]{2})/g, (_, hex: string) => String.fromCharCode(Number.parseInt(hex, 16)));
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
  private readonly newId = h("input", { "data-testid": "integration-id", "aria-label": "integration id", placeholder: "id, e.g. kit" });
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
  private readonly eventTypes = h("input", {
    "data-testid": "integration-event-types",
    "aria-label": "event types",
    placeholder: "webhook events, e.g. MESSAGE_CREATED (empty: all)",
  });
  private readonly form: HTMLElement;
  private watching: AbortController | null = null;
  /** The workspace watched, "" for none. */
  private parent = "";
  /** Whether a first snapshot of the workspace's integrations arrived. */
  private known = false;
  private manage = false;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
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
        this.newName,
        this.endpoint,
        this.credential,
        this.eventTypes,
        h("button", { type: "submit", "data-testid": "create-integration" }, "Register"),
      ),
    );
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
          eventTypes: kind === IntegrationKind.WEBHOOK ? splitList(this.eventTypes.value) : [],
        },
        requestId: requestId(),
      });
      // The credential is not kept on the page once the server has it.
      this.credential.value = "";
      this.newId.value = this.newName.value = this.endpoint.value = this.eventTypes.value = "";
      const created = answer.integration;
      if (created && parent === this.parent && !this.integrations.has(created.name)) {
        this.integrations.set(created.name, created);
        this.render();
      }
    });
  }

  private render(): void {
    const list = this.list;
    if (this.integrations.size === 0) {
      const text = !this.parent ? "" : this.known ? "None in this workspace." : "Loading…";
      this.entries.clear();
      list.replaceChildren(h("li", { class: "muted", "data-testid": "integrations-empty" }, text));
      return;
    }
    const items: HTMLElement[] = [];
    for (const i of this.integrations.values()) items.push(this.entry(i));
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
            : h("button", { type: "button", "data-testid": "integration-tools", onclick: () => void this.showTools(i.name, panes) }, "Tools"),
          i.kind === IntegrationKind.WEBHOOK
            ? h("button", { type: "button", "data-testid": "integration-deliveries", onclick: () => void this.showDeliveries(i.name, panes) }, "Deliveries")
            : null,
        ),
        panes,
      );
      entry = { item, status, panes };
      this.entries.set(i.name, entry);
    }
    const health = `HEALTH_STATE_${HealthState[i.status?.health ?? HealthState.UNSPECIFIED] ?? "UNSPECIFIED"}`;
    const circuit = `CIRCUIT_STATE_${CircuitState[i.status?.circuit ?? CircuitState.UNSPECIFIED] ?? "UNSPECIFIED"}`;
    const failures = i.status?.consecutiveFailures ?? 0;
    const item = entry.item;
    item.className = `integration h-${(HealthState[i.status?.health ?? 0] ?? "unspecified").toLowerCase()}`;
    Object.assign(item.dataset, { health, circuit, disabled: String(i.disabled) });
    fill(
      entry.status,
      h("strong", {}, i.displayName || lastSegment(i.name)),
      " ",
      h("span", { class: "muted" }, `${IntegrationKind[i.kind]?.toLowerCase() ?? ""} · ${i.endpoint}`),
      i.hasCredential ? h("span", { class: "muted", "data-testid": "integration-has-credential" }, " · credential set") : null,
      h(
        "div",
        {},
        h("span", { class: "badge", "data-testid": "integration-health" }, health.replace("HEALTH_STATE_", "")),
        " ",
        h("span", { class: "badge", "data-testid": "integration-circuit" }, `circuit ${circuit.replace("CIRCUIT_STATE_", "")}`),
        i.disabled ? h("span", { class: "badge" }, "disabled") : null,
        failures ? h("span", { class: "muted" }, ` · ${failures} failures`) : null,
      ),
      i.status?.lastError?.message ? h("div", { class: "muted", "data-testid": "integration-error" }, i.status.lastError.message) : null,
    );
    return item;
  }

  // -- Tools ---------------------------------------------------------------------------------

  private async showTools(integration: string, panes: HTMLElement): Promise<void> {
    const open = panes.querySelector('[data-testid="tools"]');
    if (open) return open.remove();
    await this.page.busy("integration-tools", async () => {
      const tools = await this.tools(integration);
      panes.querySelector('[data-testid="tools"]')?.remove();
      panes.append(
        h(
          "ul",
          { class: "list tools", "data-testid": "tools", "data-integration": integration },
          ...(tools.length ? tools.map((t) => this.tool(t)) : [h("li", { class: "muted" }, "No tools.")]),
        ),
      );
    });
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
            answer.result && Object.keys(answer.result).length ? h("pre", {}, JSON.stringify(answer.result, null, 2)) : null,
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
      h("code", {}, name),
      tool.title && tool.title !== name ? h("span", {}, ` ${tool.title}`) : null,
      tool.description ? h("div", { class: "muted" }, tool.description) : null,
      h(
        "details",
        { "data-testid": "tool-try" },
        h("summary", {}, "Try it"),
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
          h("details", {}, h("summary", { class: "muted" }, "input schema"), h("pre", { "data-testid": "tool-schema" }, JSON.stringify(tool.inputSchema ?? {}, null, 2))),
        ),
        output,
      ),
    );
  }

  // -- Webhook deliveries --------------------------------------------------------------------

  private async showDeliveries(integration: string, panes: HTMLElement): Promise<void> {
    await this.page.busy("integration-deliveries", async () => {
      const answer = await this.api.integration.listWebhookDeliveries({ parent: integration, pageSize: PAGE_SIZE });
      panes.querySelector('[data-testid="deliveries"]')?.remove();
      panes.append(
        h(
          "ul",
          { class: "list", "data-testid": "deliveries" },
          ...(answer.deliveries.length
            ? answer.deliveries.map((d) =>
                h(
                  "li",
                  { "data-testid": "delivery", "data-name": d.name, "data-state": `DELIVERY_STATE_${DeliveryState[d.state] ?? ""}` },
                  h("code", {}, d.eventType),
                  ` ${DeliveryState[d.state]?.toLowerCase() ?? ""} · ${d.attempts} ${d.attempts === 1 ? "attempt" : "attempts"}`,
                  d.lastHttpStatus ? ` · HTTP ${d.lastHttpStatus}` : "",
                  d.lastAttemptTime ? ` · ${formatTime(timestampDate(d.lastAttemptTime))}` : "",
                  d.lastError ? h("div", { class: "muted" }, d.lastError) : null,
                  h(
                    "button",
                    {
                      type: "button",
                      class: "manage",
                      // A pending delivery is still being tried: nothing to send again.
                      hidden: !this.manage || d.state === DeliveryState.PENDING,
                      "data-testid": "redeliver",
                      onclick: () =>
                        void this.page.busy("redeliver", async () => {
                          await this.api.integration.redeliverWebhook({ name: d.name });
                          await this.showDeliveries(integration, panes);
                        }),
                    },
                    "Redeliver",
                  ),
                ),
              )
            : [h("li", { class: "muted" }, "No deliveries yet.")]),
        ),
      );
    });
  }
}

function splitList(text: string): string[] {
  return text
    .split(/[\s,]+/)
    .map((x) => x.trim())
    .filter(Boolean);
}
