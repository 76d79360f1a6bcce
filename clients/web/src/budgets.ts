// The open workspace's Budgets page (`#workspaces/w/budgets`): what its runs spent per day,
// per assistant and model (QueryUsage, an inline SVG chart), and its budgets, each cap with
// how much of it the current period used and holds and when it resets. Owners create,
// edit (only the changed fields in the FieldMask, with the etag it was opened at) and
// delete budgets; editors and viewers read them. The server's field violations are shown
// beside the fields they name.
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { type Api, PAGE_SIZE, requestId } from "./api";
import { deleteConfirmation } from "./confirm";
import { type Child, fill, h } from "./dom";
import { type Problem, local, offerCurrentVersion, problem, renderProblem } from "./errors";
import {
  type Assistant,
  type Budget,
  BudgetPeriod,
  RunState,
  UsageDimension,
  type UsageRow,
} from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import type { Event } from "./gen/switchboard/api/events/v1/events_pb";
import { idAttributes, idRule } from "./ids";
import { counted, money, periodLabel, rowCost } from "./labels";
import { browserZone, calendarDay, dateTime, knownZone } from "./moments";
import type { Names } from "./names";
import type { Page } from "./page";

/** Days the chart covers, today (UTC) included. */
const DAYS = 30;
/** Series drawn in their own colour; the rest are summed as "others". */
const SERIES = 8;
/** Usage rows read at most (QueryUsage pages of 1,000). */
const MAX_ROWS = 5_000;
/** Rows of the token table shown (the newest days first). */
const TABLE_ROWS = 200;
const SVG = "http://www.w3.org/2000/svg";
const PERIODS = [BudgetPeriod.DAY, BudgetPeriod.WEEK, BudgetPeriod.MONTH, BudgetPeriod.TOTAL, BudgetPeriod.RUN];

/** The editor's fields: the data-testid, the label, and the budget's field (the
 *  FieldMask path, and what a violation names). */
const FIELDS = [
  ["budget-name", "Display name", "display_name"],
  ["budget-scope", "Applies to", "scope"],
  ["budget-period", "Period", "period"],
  ["budget-time-zone", "Time zone", "time_zone"],
  ["budget-cost", "Cost cap ($)", "cost_limit_micros"],
  ["budget-input-tokens", "Input tokens", "input_token_limit"],
  ["budget-output-tokens", "Output tokens", "output_token_limit"],
  ["budget-total-tokens", "Total tokens", "total_token_limit"],
  ["budget-thresholds", "Alerts at (% of a cap)", "alert_thresholds"],
] as const;
type Field = (typeof FIELDS)[number][2];

/** A cap and what the current period used and holds of it. */
interface Cap {
  key: "cost" | "input_tokens" | "output_tokens" | "total_tokens";
  label: string;
  limit: bigint;
  used: bigint;
  held: bigint;
  show: (n: bigint) => string;
}

/** Learns the titles of budgets a refusal or a paused run names, when the Budgets page has
 *  not listed them yet (a few GetBudget calls). One that cannot be read keeps its
 *  resource name's reading ("Acme › budget daily"): precise, if less friendly. */
export async function learnBudgetTitles(api: Api, names: Names, budgets: string[]): Promise<void> {
  const unknown = [...new Set(budgets)].filter((b) => !names.knows(b)).slice(0, 10);
  await Promise.all(
    unknown.map(async (name) => {
      try {
        const found = await api.dispatcher.getBudget({ name });
        if (found.budget) names.learn(name, found.budget.displayName);
      } catch {
        // Only a title was wanted: the name stands in for it.
      }
    }),
  );
}

function caps(b: Budget): Cap[] {
  const u = b.usage;
  const tokens = (n: bigint): string => `${n.toLocaleString()} tokens`;
  const found: Cap[] = [];
  if (b.costLimitMicros !== undefined)
    found.push({ key: "cost", label: "Cost", limit: b.costLimitMicros, used: u?.costMicros ?? 0n, held: u?.reservedCostMicros ?? 0n, show: money });
  if (b.inputTokenLimit !== undefined)
    found.push({ key: "input_tokens", label: "Input", limit: b.inputTokenLimit, used: u?.inputTokens ?? 0n, held: u?.reservedInputTokens ?? 0n, show: tokens });
  if (b.outputTokenLimit !== undefined)
    found.push({ key: "output_tokens", label: "Output", limit: b.outputTokenLimit, used: u?.outputTokens ?? 0n, held: u?.reservedOutputTokens ?? 0n, show: tokens });
  if (b.totalTokenLimit !== undefined) {
    const used = (u?.inputTokens ?? 0n) + (u?.outputTokens ?? 0n);
    const held = (u?.reservedInputTokens ?? 0n) + (u?.reservedOutputTokens ?? 0n);
    found.push({ key: "total_tokens", label: "Total", limit: b.totalTokenLimit, used, held, show: tokens });
  }
  return found;
}

/** When a budget's period resets, in the budget's own zone (its days begin at midnight
 *  there, UTC when it names none), and in the reader's when that differs: a bare "11:00 PM"
 *  said neither which zone nor whose midnight it was. */
function resetText(reset: Date, zone: string): string {
  const own = knownZone(zone || "UTC");
  const mine = browserZone();
  const there = `${dateTime(reset, own)} ${own}`;
  const here = dateTime(reset, mine);
  return here === dateTime(reset, own) ? `Resets ${there}.` : `Resets ${there} (${here} ${knownZone(mine)}, your time).`;
}

function svg<K extends keyof SVGElementTagNameMap>(tag: K, attrs: Record<string, string | number>, ...children: (SVGElement | string)[]): SVGElementTagNameMap[K] {
  const element = document.createElementNS(SVG, tag);
  // Attributes only: the CSP allows no inline style, and SVG's presentation attributes are not style.
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, String(value));
  for (const child of children) element.append(child);
  return element;
}

/** A cap as a bar: what was settled, then what calls in flight hold, against the cap. */
function capBar(cap: Cap): SVGSVGElement {
  const share = (n: bigint): number => (cap.limit > 0n ? Math.min(100, (Number(n) / Number(cap.limit)) * 100) : 0);
  const used = share(cap.used);
  const held = Math.min(100 - used, share(cap.held));
  return svg(
    "svg",
    { class: "cap-bar", viewBox: "0 0 100 6", preserveAspectRatio: "none", role: "img", "aria-label": `${cap.label}: ${Math.round(used + held)}% used` },
    svg("rect", { class: "cap-track", x: 0, y: 0, width: 100, height: 6 }),
    svg("rect", { class: cap.used >= cap.limit ? "cap-used full" : "cap-used", x: 0, y: 0, width: used, height: 6 }),
    svg("rect", { class: "cap-held", x: used, y: 0, width: held, height: 6 }),
  );
}

/** Midnight UTC of the day `back` days before today, as `YYYY-MM-DD`. */
function utcDay(back: number): string {
  const now = new Date();
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() - back)).toISOString().slice(0, 10);
}

export class Budgets {
  /** The page, in the centre column while it is open. */
  readonly element: HTMLElement;
  private readonly role = h("p", { class: "muted", "data-testid": "budgets-role" });
  private readonly chart = h("div", { class: "usage", "data-testid": "usage" });
  private readonly tokens = h("div", { class: "usage-tokens", "data-testid": "usage-tokens" });
  private readonly list = h("ul", { class: "list budgets", "data-testid": "budgets" });
  private readonly editor = h("form", { class: "inline editor", "data-testid": "budget-editor", hidden: true });
  private readonly newButton = h(
    "button",
    { type: "button", class: "manage", "data-testid": "new-budget", hidden: true, onclick: () => this.edit(null) },
    "New budget",
  );
  private workspace = "";
  private owner = false;
  private visible = false;
  private budgets: Budget[] = [];
  private assistants: Assistant[] = [];
  /** The budget being edited ("" for a new one), null when the editor is closed. */
  private editing: Budget | null = null;
  private editingNew = false;
  private reloadTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly api: Api,
    private readonly page: Page,
    private readonly names: Names,
  ) {
    this.element = h(
      "section",
      { class: "budgets-page", "data-testid": "budgets-page", hidden: true },
      this.role,
      h("h3", {}, `Spend per day, last ${DAYS} days`),
      this.chart,
      h("h3", {}, "Tokens per day of ended runs, by assistant and model"),
      this.tokens,
      h("h3", {}, "Budgets"),
      this.list,
      this.newButton,
      this.editor,
    );
    this.editor.addEventListener("submit", (event) => {
      event.preventDefault();
      void this.save();
    });
  }

  /** The open workspace and whether the caller owns it (owners edit; the others read). */
  open(workspace: string, owner: boolean): void {
    if (workspace !== this.workspace) {
      this.workspace = workspace;
      this.budgets = [];
      this.close();
    }
    this.owner = owner;
    this.newButton.hidden = !owner;
    if (!owner) this.close();
    this.role.textContent = owner
      ? "You own this workspace: you can create, edit and delete its budgets."
      : "Read only: the workspace's owners create and edit budgets.";
    this.render();
  }

  /** Shown (the page is open) or not; opening it loads what it shows. */
  show(visible: boolean): void {
    this.visible = visible;
    this.element.hidden = !visible;
    if (visible) void this.load();
  }

  async load(): Promise<void> {
    const parent = this.workspace;
    if (!parent || !this.visible) return;
    await this.page.busy("list-budgets", async () => {
      const [budgets, assistants, rows, notEnded] = await Promise.all([
        this.api.dispatcher.listBudgets({ parent, pageSize: PAGE_SIZE }),
        this.api.dispatcher.listAssistants({ parent, pageSize: PAGE_SIZE }),
        this.usage(parent),
        // QueryUsage sums ended runs only, while a budget is charged as calls are made: a
        // run paused for a decision is in one and not the other, so the page says how many
        // such runs there are rather than leave two totals that disagree unexplained.
        this.api.dispatcher.listRuns({ parent, states: [RunState.QUEUED, RunState.RUNNING, RunState.REQUIRES_ACTION], pageSize: 1 }),
      ]);
      if (parent !== this.workspace) return;
      this.budgets = budgets.budgets;
      this.assistants = assistants.assistants;
      for (const b of this.budgets) this.names.learn(b.name, b.displayName);
      for (const a of this.assistants) this.names.learn(a.name, a.displayName);
      this.render();
      this.renderChart(rows);
      this.renderTokens(rows, notEnded.totalSize);
    });
  }

  /** An event from the feed: a budget changed, or a run changed state (one that ended is
   *  in the chart and the table; one that started or paused changes how many have not
   *  ended, and a pause comes after the charges of its step). */
  apply(event: Event): void {
    if (!this.visible || event.workspace !== this.workspace) return;
    const payload = event.payload;
    const moved = payload.case === "runUpdated" && payload.value.update?.update.case === "stateChange";
    if (payload.case !== "budgetChanged" && payload.case !== "budgetAlert" && !moved) return;
    // Several at once (a burst of runs) make one reload.
    clearTimeout(this.reloadTimer);
    this.reloadTimer = setTimeout(() => void this.load(), 300);
  }

  clear(): void {
    clearTimeout(this.reloadTimer);
    this.workspace = "";
    this.budgets = [];
    this.close();
    this.list.replaceChildren();
    this.chart.replaceChildren();
    this.tokens.replaceChildren();
  }

  // -- Spend ----------------------------------------------------------------------------

  private async usage(parent: string): Promise<UsageRow[]> {
    const rows: UsageRow[] = [];
    const start = new Date(`${utcDay(DAYS - 1)}T00:00:00Z`);
    let pageToken = "";
    do {
      const page = await this.api.dispatcher.queryUsage({
        parent,
        groupBy: [UsageDimension.DAY, UsageDimension.ASSISTANT, UsageDimension.MODEL],
        startTime: timestampFromDate(start),
        pageSize: 1_000,
        pageToken,
      });
      rows.push(...page.rows);
      pageToken = page.nextPageToken;
    } while (pageToken && rows.length < MAX_ROWS);
    return rows;
  }

  private seriesLabel(assistant: string, model: string): string {
    return `${assistant ? this.names.title(assistant).split(" › ").pop() ?? assistant : "no assistant"} · ${model || "no model"}`;
  }

  /** Stacked bars, one a day, a colour per assistant and model (the costliest first). */
  private renderChart(rows: UsageRow[]): void {
    const days = Array.from({ length: DAYS }, (_, i) => utcDay(DAYS - 1 - i));
    const totals = new Map<string, bigint>();
    for (const r of rows) {
      const key = `${r.assistant}|${r.model}`;
      totals.set(key, (totals.get(key) ?? 0n) + r.costMicros);
    }
    const ranked = [...totals.entries()].filter(([, c]) => c > 0n).sort((a, b) => (b[1] > a[1] ? 1 : b[1] < a[1] ? -1 : 0));
    const total = ranked.reduce((sum, [, c]) => sum + c, 0n);
    const runs = rows.reduce((sum, r) => sum + r.runCount, 0n);
    const unpriced = rows.reduce((sum, r) => sum + r.unpricedRuns, 0n);
    if (total === 0n) {
      fill(
        this.chart,
        h(
          "p",
          { class: "muted", "data-testid": "usage-empty", "data-unpriced-runs": String(unpriced) },
          runs === 0n
            ? "No spend yet: the runs of the last 30 days cost nothing, or there were none."
            : unpriced === runs
              ? `${counted(runs, "run")}, nothing priced: the models used have no price in the server's price table. Their tokens are below.`
              : unpriced > 0n
                ? `${counted(runs, "run")}, none with a cost: ${unpriced} used a model with no price in the server's price table. Their tokens are below.`
                : `${counted(runs, "run")}, which cost nothing at the server's prices (their models are free in its price table, or they used none). Their tokens are below.`,
        ),
      );
      return;
    }
    const keys = ranked.slice(0, SERIES).map(([k]) => k);
    const series = new Map(keys.map((k, i) => [k, i]));
    const others = ranked.length > SERIES ? SERIES : -1;
    // cost by day, then by series index
    const grid = new Map<string, bigint[]>(days.map((d) => [d, Array<bigint>(SERIES + 1).fill(0n)]));
    for (const r of rows) {
      const cells = grid.get(r.day);
      if (!cells) continue;
      const index = series.get(`${r.assistant}|${r.model}`) ?? others;
      if (index >= 0) cells[index] = (cells[index] ?? 0n) + r.costMicros;
    }
    const peak = Math.max(...[...grid.values()].map((cells) => Number(cells.reduce((a, b) => a + b, 0n))), 1);
    const width = 600;
    const height = 180;
    const left = 56;
    const bottom = 20;
    const plot = height - bottom - 6;
    // Room on the right for today's date, centred under its bar.
    const step = (width - left - 16) / DAYS;
    const y = (micros: number): number => 6 + plot - (micros / peak) * plot;
    const chart = svg(
      "svg",
      {
        class: "usage-chart",
        "data-testid": "usage-chart",
        "data-total-micros": String(total),
        viewBox: `0 0 ${width} ${height}`,
        role: "img",
        "aria-label": `Spend per day over the last ${DAYS} days: ${money(total)} in all`,
      },
      // The scale: zero, half and the busiest day.
      ...[0, 0.5, 1].flatMap((f) => [
        svg("line", { class: "grid", x1: left, x2: width, y1: y(peak * f), y2: y(peak * f) }),
        svg("text", { class: "axis", x: left - 4, y: y(peak * f) + 4, "text-anchor": "end" }, money(Math.round(peak * f))),
      ]),
    );
    days.forEach((day, i) => {
      const x = left + i * step;
      let base = 0;
      const cells = grid.get(day) ?? [];
      cells.forEach((cost, index) => {
        if (cost === 0n) return;
        const key = index < keys.length ? (keys[index] ?? "") : "";
        const [assistant = "", model = ""] = key.split("|");
        const name = index < keys.length ? this.seriesLabel(assistant, model) : "others";
        const top = y(base + Number(cost));
        chart.append(
          svg(
            "rect",
            {
              class: `bar s${index}`,
              "data-testid": "usage-bar",
              "data-day": day,
              "data-assistant": assistant,
              "data-model": model,
              "data-cost-micros": String(cost),
              x: x + 1,
              y: top,
              width: Math.max(1, step - 2),
              height: y(base) - top,
            },
            svg("title", {}, `${day} · ${name}: ${money(cost)}`),
          ),
        );
        base += Number(cost);
      });
      // A date every week, and today's.
      if ((DAYS - 1 - i) % 7 === 0) {
        chart.append(svg("text", { class: "axis", x: x + step / 2, y: height - 4, "text-anchor": "middle" }, day.slice(5)));
      }
    });
    const legend = h(
      "ul",
      { class: "legend", "data-testid": "usage-legend" },
      ...keys.map((key, i) => {
        const [assistant = "", model = ""] = key.split("|");
        return h(
          "li",
          { "data-testid": "usage-series", "data-assistant": assistant, "data-model": model, "data-cost-micros": String(totals.get(key) ?? 0n) },
          h("span", { class: `swatch s${i}` }),
          `${this.seriesLabel(assistant, model)}: ${money(totals.get(key) ?? 0n)}`,
        );
      }),
      others >= 0 ? h("li", {}, h("span", { class: `swatch s${SERIES}` }), `others: ${money(ranked.slice(SERIES).reduce((s, [, c]) => s + c, 0n))}`) : null,
    );
    const today = (grid.get(days[DAYS - 1] ?? "") ?? []).reduce((a, b) => a + b, 0n);
    fill(
      this.chart,
      chart,
      legend,
      h(
        "p",
        { class: "muted", "data-testid": "usage-total", "data-today-micros": String(today), "data-unpriced-runs": String(unpriced) },
        `${money(total)} in ${DAYS} days (${counted(runs, "run")}${unpriced > 0n ? `, ${unpriced} of them with unpriced model calls` : ""}), ${money(today)} today (days in UTC).`,
      ),
    );
  }

  /** What the runs used, a row per day, assistant and model (newest day first): tokens
   *  whether or not a price table prices them, and the cost, or "unpriced" for runs whose
   *  model has no price in the server's price table (`UsageRow.unpriced_runs`; a model
   *  priced at 0 costs "$0.0000"). */
  private renderTokens(rows: UsageRow[], notEnded: number): void {
    const used = rows.filter((r) => r.runCount > 0n || r.inputTokens > 0n || r.outputTokens > 0n);
    const pending =
      notEnded > 0
        ? h(
            "p",
            { class: "muted", "data-testid": "usage-not-ended", "data-runs": String(notEnded) },
            `${notEnded === 1 ? "1 run has" : `${notEnded} runs have`} not ended yet (going, queued, or waiting for a decision or for room in a budget): ` +
              "this table counts a run once it ends, while the budgets below already count what its calls were charged.",
          )
        : null;
    if (used.length === 0) {
      fill(this.tokens, h("p", { class: "muted", "data-testid": "usage-tokens-empty" }, `No ended runs in the last ${DAYS} days.`), pending);
      return;
    }
    const sum = (pick: (r: UsageRow) => bigint): bigint => used.reduce((total, r) => total + pick(r), 0n);
    const totals = {
      runs: sum((r) => r.runCount),
      input: sum((r) => r.inputTokens),
      output: sum((r) => r.outputTokens),
      cost: sum((r) => r.costMicros),
      unpriced: sum((r) => r.unpricedRuns),
    };
    const sorted = [...used].sort((a, b) => (a.day !== b.day ? (a.day < b.day ? 1 : -1) : this.seriesLabel(a.assistant, a.model).localeCompare(this.seriesLabel(b.assistant, b.model))));
    const count = (n: bigint): string => n.toLocaleString("en");
    const shown = sorted.slice(0, TABLE_ROWS);
    fill(
      this.tokens,
      h(
        "table",
        { class: "usage-table", "data-testid": "usage-table" },
        h(
          "thead",
          {},
          h("tr", {}, h("th", { scope: "col" }, "Day (UTC)"), h("th", { scope: "col" }, "Assistant · model"), h("th", { scope: "col", class: "n" }, "Runs"), h("th", { scope: "col", class: "n" }, "Input"), h("th", { scope: "col", class: "n" }, "Output"), h("th", { scope: "col", class: "n" }, "Cost")),
        ),
        h(
          "tbody",
          {},
          ...shown.map((r, i) => {
            const unpriced = r.unpricedRuns > 0n;
            return h(
              "tr",
              {
                "data-testid": "usage-row",
                "data-day": r.day,
                "data-assistant": r.assistant,
                "data-model": r.model,
                "data-runs": String(r.runCount),
                "data-input-tokens": String(r.inputTokens),
                "data-output-tokens": String(r.outputTokens),
                "data-cost-micros": String(r.costMicros),
                "data-budget-lowered-runs": String(r.budgetLoweredRuns),
                "data-unpriced-runs": String(r.unpricedRuns),
                class: i > 0 && shown[i - 1]?.day === r.day ? "same-day" : undefined,
              },
              // A day's rows after its first leave its date blank: the table reads by day.
              h("td", { class: "day" }, i > 0 && shown[i - 1]?.day === r.day ? "" : calendarDay(r.day, { year: false })),
              h(
                "td",
                { class: "series" },
                h("span", { "data-content": true }, this.seriesLabel(r.assistant, r.model)),
                // Runs whose answer a budget cut short (a model call made with max_tokens
                // lowered to fit what was left).
                r.budgetLoweredRuns > 0n
                  ? h(
                      "span",
                      { class: "limited", "data-testid": "usage-row-limited", title: "A model call of each was made with fewer output tokens, to fit what a budget had left" },
                      `${count(r.budgetLoweredRuns)} ${r.budgetLoweredRuns === 1n ? "run" : "runs"} limited by a budget`,
                    )
                  : null,
              ),
              h("td", { class: "n" }, count(r.runCount)),
              h("td", { class: "n" }, count(r.inputTokens)),
              h("td", { class: "n" }, count(r.outputTokens)),
              h(
                "td",
                {
                  class: unpriced ? "n unpriced" : "n",
                  "data-testid": "usage-row-cost",
                  title: unpriced ? `${counted(r.unpricedRuns, "run")} used a model with no price in the server's price table: the cost leaves their calls out` : undefined,
                },
                rowCost(r.costMicros, r.runCount, r.unpricedRuns),
              ),
            );
          }),
        ),
        h(
          "tfoot",
          {},
          h(
            "tr",
            {
              "data-testid": "usage-total-row",
              "data-runs": String(totals.runs),
              "data-input-tokens": String(totals.input),
              "data-output-tokens": String(totals.output),
              "data-cost-micros": String(totals.cost),
            },
            h("th", { scope: "row", colspan: 2 }, `Total, ${DAYS} days (${(totals.input + totals.output).toLocaleString("en")} tokens)`),
            h("td", { class: "n" }, count(totals.runs)),
            h("td", { class: "n" }, count(totals.input)),
            h("td", { class: "n" }, count(totals.output)),
            h("td", { class: totals.unpriced > 0n ? "n unpriced" : "n" }, rowCost(totals.cost, totals.runs, totals.unpriced)),
          ),
        ),
      ),
      sorted.length > shown.length ? h("p", { class: "muted" }, `${sorted.length - shown.length} older rows not shown (in the total).`) : null,
      pending,
    );
  }

  // -- Budgets --------------------------------------------------------------------------

  private scopeLabel(scope: string): string {
    if (scope === this.workspace) return "the whole workspace";
    if (scope.includes("/assistants/")) return `assistant ${this.names.title(scope).split(" › ").pop() ?? scope}`;
    return `API key ${scope}`;
  }

  private render(): void {
    if (this.budgets.length === 0) {
      fill(
        this.list,
        h(
          "li",
          { class: "muted", "data-testid": "budgets-empty" },
          this.owner ? "No budgets: runs may spend without a cap. Create one below." : "No budgets in this workspace.",
        ),
      );
      return;
    }
    this.list.replaceChildren(...this.budgets.map((b) => this.item(b)));
  }

  private item(b: Budget): HTMLElement {
    const reset = b.usage?.resetTime ? timestampDate(b.usage.resetTime) : undefined;
    const id = b.name.split("/").pop() ?? b.name;
    return h(
      "li",
      { class: "budget", "data-testid": "budget", "data-name": b.name, "data-etag": b.etag },
      h(
        "div",
        { class: "row" },
        h("strong", {}, b.displayName || id),
        h("span", { class: "muted" }, `${periodLabel(b.period)} · ${this.scopeLabel(b.scope)}${b.timeZone ? ` · ${b.timeZone}` : ""}`),
      ),
      ...caps(b).map((cap) => {
        const share = cap.limit > 0n ? (Number(cap.used + cap.held) / Number(cap.limit)) * 100 : 0;
        // A small share still shows (0.2%, not 0%).
        const percent = share > 0 && share < 10 ? share.toFixed(1) : Math.round(share).toString();
        return h(
          "div",
          {
            class: "cap",
            "data-testid": "budget-cap",
            "data-cap": cap.key,
            "data-used": String(cap.used),
            "data-held": String(cap.held),
            "data-limit": String(cap.limit),
          },
          h("span", { class: "cap-label" }, cap.label),
          capBar(cap),
          h(
            "span",
            { class: "cap-numbers", "data-testid": "budget-cap-numbers" },
            `${cap.show(cap.used)} used${cap.held ? ` + ${cap.show(cap.held)} held` : ""} of ${cap.show(cap.limit)} (${percent}%)`,
          ),
        );
      }),
      h(
        "div",
        { class: "muted", "data-testid": "budget-reset", "data-reset": reset ? reset.toISOString() : "" },
        b.period === BudgetPeriod.RUN
          ? "Applies to each run on its own."
          : reset
            ? resetText(reset, b.timeZone)
            : "Never resets.",
        b.alertThresholds.length ? ` Alerts at ${b.alertThresholds.join(", ")}%.` : "",
      ),
      this.owner
        ? h(
            "div",
            { class: "row" },
            h("button", { type: "button", "data-testid": "edit-budget", onclick: () => this.edit(b) }, "Edit"),
            h("button", { type: "button", class: "danger", "data-testid": "delete-budget", onclick: (e: globalThis.Event) => this.confirmDelete(b, e) }, "Delete"),
          )
        : null,
    );
  }

  private confirmDelete(b: Budget, event: globalThis.Event): void {
    const item = (event.currentTarget as HTMLElement).closest("li");
    if (!item) return;
    const open = item.querySelector('[data-testid="delete-confirmation"]');
    open?.remove();
    if (open) return;
    item.append(
      deleteConfirmation({
        title: b.displayName || (b.name.split("/").pop() ?? b.name),
        consequence: "Runs it covers may then spend without this cap; runs paused at it go on.",
        action: "delete-budget",
        remove: async () => {
          await this.api.dispatcher.deleteBudget({ name: b.name, etag: b.etag });
          if (this.editing?.name === b.name) this.close();
          this.budgets = this.budgets.filter((x) => x.name !== b.name);
          this.render();
        },
      }),
    );
  }

  private close(): void {
    this.editing = null;
    this.editingNew = false;
    this.editor.hidden = true;
    this.editor.replaceChildren();
  }

  /** Opens the editor on `b` (null: a new one). */
  private edit(b: Budget | null): void {
    this.editing = b;
    this.editingNew = b === null;
    const value = (n: bigint | undefined, f = (x: bigint): string => String(x)): string => (n === undefined ? "" : f(n));
    const scope = h("select", { disabled: b !== null }, h("option", { value: this.workspace }, "the whole workspace"));
    for (const a of this.assistants) scope.append(h("option", { value: a.name }, `assistant ${a.displayName || (a.name.split("/").pop() ?? a.name)}`));
    scope.append(h("option", { value: "api-key" }, "an API key…"));
    const apiKey = h("input", { "data-testid": "budget-api-key", "aria-label": "API key", placeholder: "users/…/apiKeys/…", hidden: true });
    if (b && b.scope !== this.workspace && !this.assistants.some((a) => a.name === b.scope)) {
      scope.value = "api-key";
      apiKey.value = b.scope;
      apiKey.hidden = false;
      apiKey.disabled = true;
    } else {
      scope.value = b?.scope ?? this.workspace;
    }
    scope.addEventListener("change", () => {
      apiKey.hidden = scope.value !== "api-key";
    });
    const period = h("select", {}, ...PERIODS.map((p) => h("option", { value: String(p) }, periodLabel(p))));
    period.value = String(b?.period ?? BudgetPeriod.DAY);
    const number = (v: string, attrs: Record<string, string> = {}): HTMLInputElement => h("input", { type: "number", step: "any", value: v, ...attrs });
    const inputs: Record<string, HTMLElement> = {
      "budget-name": h("input", { value: b?.displayName ?? "", maxlength: 200 }),
      "budget-scope": scope,
      "budget-period": period,
      "budget-time-zone": h("input", { value: b?.timeZone ?? "", placeholder: "UTC, or e.g. Europe/Paris" }),
      "budget-cost": number(value(b?.costLimitMicros, (x) => String(Number(x) / 1e6)), { placeholder: "none, e.g. 5.00" }),
      "budget-input-tokens": number(value(b?.inputTokenLimit), { placeholder: "none" }),
      "budget-output-tokens": number(value(b?.outputTokenLimit), { placeholder: "none" }),
      "budget-total-tokens": number(value(b?.totalTokenLimit), { placeholder: "none" }),
      "budget-thresholds": h("input", { value: b?.alertThresholds.join(", ") ?? "", placeholder: "e.g. 50, 80, 100" }),
    };
    const field = ([testid, label, name]: (typeof FIELDS)[number]): HTMLElement => {
      const input = inputs[testid] as HTMLInputElement;
      input.dataset.testid = testid;
      input.setAttribute("aria-label", label);
      return h(
        "label",
        { "data-field": name },
        label,
        input,
        testid === "budget-scope" ? apiKey : null,
        h("span", { class: "field-problem", "data-testid": "field-problem", "data-field": name }),
      );
    };
    const byName = (name: Field): HTMLElement => field(FIELDS.find((f) => f[2] === name) ?? FIELDS[0]);
    // A budget's id follows the assistants' rule (the contract says so).
    const id = h("input", { "data-testid": "budget-id", "aria-label": "id", placeholder: "e.g. daily (empty: one is made)", ...idAttributes("assistant_id") });
    const rows: Child[] = [
      h("h3", { "data-testid": "budget-editor-title" }, b ? `Edit ${b.displayName || (b.name.split("/").pop() ?? "")}` : "New budget"),
      b ? null : h("label", { "data-field": "budget_id" }, "id", id, h("small", { class: "muted" }, `id: ${idRule("assistant_id").words}`)),
      byName("display_name"),
      h("div", { class: "row" }, byName("scope"), byName("period"), byName("time_zone")),
      h("div", { class: "row" }, byName("cost_limit_micros"), byName("input_token_limit"), byName("output_token_limit"), byName("total_token_limit")),
      byName("alert_thresholds"),
      h("small", { class: "muted" }, "Set at least one cap; an empty one is no cap. Cost is in the price table's currency."),
      h("div", { "data-testid": "budget-editor-problem" }),
      h(
        "div",
        { class: "row" },
        h("button", { type: "submit", "data-testid": "save-budget" }, b ? "Save" : "Create"),
        h("button", { type: "button", "data-testid": "close-budget-editor", onclick: () => this.close() }, "Close"),
      ),
    ];
    fill(this.editor, ...rows);
    this.editor.hidden = false;
    this.editor.scrollIntoView({ block: "nearest" });
  }

  /** The editor's values as a budget (the scope and id aside), or the local problem. */
  private read(): Budget | Problem {
    const text = (testid: string): string => this.editor.querySelector<HTMLInputElement>(`[data-testid="${testid}"]`)?.value.trim() ?? "";
    const violations: Problem["violations"] = [];
    const cap = (testid: string, field: Field, scale = 1): bigint | undefined => {
      const raw = text(testid);
      if (!raw) return undefined;
      const n = Number(raw) * scale;
      if (!Number.isFinite(n)) {
        violations.push({ field: `budget.${field}`, description: "must be a number" });
        return undefined;
      }
      return BigInt(Math.round(n));
    };
    const thresholds: number[] = [];
    for (const part of text("budget-thresholds").split(/[\s,;%]+/).filter(Boolean)) {
      const n = Number(part);
      if (Number.isInteger(n)) thresholds.push(n);
      else violations.push({ field: "budget.alert_thresholds", description: `${part} is not a whole number` });
    }
    const budget = {
      name: this.editing?.name ?? "",
      displayName: text("budget-name"),
      scope: this.editing?.scope ?? (text("budget-scope") === "api-key" ? text("budget-api-key") : text("budget-scope")),
      period: Number(text("budget-period")) as BudgetPeriod,
      timeZone: text("budget-time-zone"),
      costLimitMicros: cap("budget-cost", "cost_limit_micros", 1e6),
      inputTokenLimit: cap("budget-input-tokens", "input_token_limit"),
      outputTokenLimit: cap("budget-output-tokens", "output_token_limit"),
      totalTokenLimit: cap("budget-total-tokens", "total_token_limit"),
      alertThresholds: thresholds,
      etag: this.editing?.etag ?? "",
    } as Budget;
    return violations.length ? local("INVALID_ARGUMENT", "some fields are not numbers", violations) : budget;
  }

  /** The fields that differ from what the editor opened: the update's FieldMask. */
  private changed(before: Budget, after: Budget): string[] {
    const same: Record<Exclude<Field, "scope">, boolean> = {
      display_name: before.displayName === after.displayName,
      period: before.period === after.period,
      time_zone: before.timeZone === after.timeZone,
      cost_limit_micros: before.costLimitMicros === after.costLimitMicros,
      input_token_limit: before.inputTokenLimit === after.inputTokenLimit,
      output_token_limit: before.outputTokenLimit === after.outputTokenLimit,
      total_token_limit: before.totalTokenLimit === after.totalTokenLimit,
      alert_thresholds: before.alertThresholds.join(",") === after.alertThresholds.join(","),
    };
    return Object.entries(same)
      .filter(([, unchanged]) => !unchanged)
      .map(([path]) => path);
  }

  /** A problem shown under the editor, each violation also beside the field it names. */
  private showEditorProblem(p: Problem, reload?: () => void): void {
    for (const slot of this.editor.querySelectorAll<HTMLElement>('[data-testid="field-problem"]')) slot.replaceChildren();
    for (const v of p.violations) {
      // `budget.cost_limit_micros`, `alert_thresholds[2]`, `budget_id`: the field's own name.
      const name = v.field.replace(/^budget\./, "").replace(/\[\d+\]$/, "");
      const slot = this.editor.querySelector<HTMLElement>(`[data-testid="field-problem"][data-field="${CSS.escape(name)}"]`);
      const label = this.editor.querySelector<HTMLElement>(`label[data-field="${CSS.escape(name)}"]`);
      const where = slot ?? label;
      where?.append(h("span", { class: "violation", "data-testid": "field-violation", "data-field": v.field, "data-content": true }, v.description));
    }
    const box = renderProblem(p, "error");
    box.dataset.action = "save-budget";
    if (reload) offerCurrentVersion(box, p, "reload-budget", reload);
    this.editor.querySelector('[data-testid="budget-editor-problem"]')?.replaceChildren(box);
  }

  private async save(): Promise<void> {
    const parent = this.workspace;
    const before = this.editing;
    const read = this.read();
    if ("code" in read) return this.showEditorProblem(read);
    const button = this.editor.querySelector<HTMLButtonElement>('[data-testid="save-budget"]');
    if (button) button.disabled = true;
    try {
      if (before === null) {
        if (!this.editingNew) return;
        const answer = await this.api.dispatcher.createBudget({
          parent,
          budgetId: this.editor.querySelector<HTMLInputElement>('[data-testid="budget-id"]')?.value.trim() ?? "",
          budget: read,
          requestId: requestId(),
        });
        this.editor.dataset.saved = answer.budget?.name ?? "";
      } else {
        const paths = this.changed(before, read);
        if (paths.length) {
          const answer = await this.api.dispatcher.updateBudget({ budget: read, updateMask: { paths } });
          this.editor.dataset.saved = answer.budget?.name ?? "";
        }
      }
      this.close();
      await this.load();
    } catch (error) {
      const p = problem(error);
      const name = before?.name;
      this.showEditorProblem(
        p,
        name
          ? () =>
              void this.page.busy("reload-budget", async () => {
                const fresh = await this.api.dispatcher.getBudget({ name });
                if (fresh.budget) this.edit(fresh.budget);
              })
          : undefined,
      );
    } finally {
      if (button) button.disabled = false;
    }
  }
}
