// The open workspace's integrations and their health, circuit, failures and last error,
// as WatchIntegrations reports them. Every reopening of the stream starts with a fresh
// snapshot, which replaces what was shown, so an integration deleted meanwhile goes too.
import type { Api } from "./api";
import { h } from "./dom";
import { follow } from "./follow";
import {
  CircuitState,
  HealthState,
  type Integration,
  IntegrationKind,
  type WatchIntegrationsResponse,
} from "./gen/switchboard/api/integration/v1/integration_pb";
import type { Page } from "./page";

export class Integrations {
  /** The panel's heading, then its list. */
  readonly elements: HTMLElement[];
  private readonly list = h("ul", { class: "list", "data-testid": "integrations" });
  private readonly integrations = new Map<string, Integration>();
  private watching: AbortController | null = null;
  /** The workspace watched, "" for none. */
  private parent = "";
  /** Whether a first snapshot of the workspace's integrations arrived. */
  private known = false;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
  ) {
    this.elements = [h("h2", {}, "Integrations"), this.list];
  }

  watch(parent: string): void {
    this.parent = parent;
    this.watching?.abort();
    const stop = new AbortController();
    this.watching = stop;
    this.integrations.clear();
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
    this.list.replaceChildren();
  }

  private render(): void {
    const list = this.list;
    if (this.integrations.size === 0) {
      const text = !this.parent ? "" : this.known ? "None in this workspace." : "Loading…";
      list.replaceChildren(h("li", { class: "muted" }, text));
      return;
    }
    list.replaceChildren(
      ...[...this.integrations.values()].map((i) => {
        const health = `HEALTH_STATE_${HealthState[i.status?.health ?? HealthState.UNSPECIFIED] ?? "UNSPECIFIED"}`;
        const circuit = `CIRCUIT_STATE_${CircuitState[i.status?.circuit ?? CircuitState.UNSPECIFIED] ?? "UNSPECIFIED"}`;
        const failures = i.status?.consecutiveFailures ?? 0;
        return h(
          "li",
          {
            class: `integration h-${(HealthState[i.status?.health ?? 0] ?? "unspecified").toLowerCase()}`,
            "data-testid": "integration",
            "data-name": i.name,
            "data-health": health,
            "data-circuit": circuit,
            "data-disabled": i.disabled,
          },
          h("strong", {}, i.displayName || i.name.split("/").pop() || i.name),
          " ",
          h("span", { class: "muted" }, `${IntegrationKind[i.kind]?.toLowerCase() ?? ""} · ${i.endpoint}`),
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
      }),
    );
  }
}
