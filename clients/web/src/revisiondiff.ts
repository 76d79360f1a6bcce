// Two revisions of an assistant side by side, field by field (ListAssistantRevisions gives
// each revision's whole configuration): which fields changed, and for each changed field
// its lines, removed and added, from a longest-common-subsequence diff of the lines (the
// instructions are long text; a structured field is compared as its JSON, one key a line,
// so a changed tool or budget reads as the line that changed). The fields come from the
// descriptor, so a field the contract gains is compared too, under its own name, until it
// is given words here.
import { toJson } from "@bufbuild/protobuf";
import { h } from "./dom";
import { type Assistant, AssistantSchema } from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";

/** Not configuration: who it is, its concurrency token, its clock, its number, and the
 *  workspace's routing choice (a change of only `workspace_default` makes no revision). */
const NOT_CONFIGURATION = new Set(["name", "etag", "create_time", "update_time", "revision", "workspace_default"]);

/** The fields in words, by their proto names. */
const LABELS: Record<string, string> = {
  display_name: "Display name",
  description: "Description",
  instructions: "Instructions",
  handler: "Handler",
  model: "Model",
  tools: "Tools",
  context_token_budget: "Context token budget",
  max_tool_steps: "Tool-step limit",
  voice: "Voice",
  retrieval: "Retrieval",
  delegates: "Delegates",
  handoffs: "Handoffs",
  memory_policy: "Memory policy",
};

/** Unchanged lines kept around a change; a longer unchanged stretch is folded. */
const CONTEXT = 3;

/** Past this many line pairs the LCS table is not built: the changed middle is shown as
 *  removed, then added (a 32,000-character prompt is some hundreds of lines, far below). */
const MAX_CELLS = 4_000_000;

export type LineOp = "same" | "del" | "add";

export interface DiffLine {
  op: LineOp;
  text: string;
}

export interface FieldDiff {
  /** The proto field name (`instructions`). */
  field: string;
  label: string;
  before: string;
  after: string;
  changed: boolean;
}

function lines(text: string): string[] {
  return text === "" ? [] : text.split("\n");
}

/** The lines of `before` and `after`, each kept, removed or added, in reading order. */
export function lineDiff(before: string, after: string): DiffLine[] {
  const a = lines(before);
  const b = lines(after);
  let start = 0;
  while (start < a.length && start < b.length && a[start] === b[start]) start++;
  let endA = a.length;
  let endB = b.length;
  while (endA > start && endB > start && a[endA - 1] === b[endB - 1]) {
    endA--;
    endB--;
  }
  const head: DiffLine[] = a.slice(0, start).map((text) => ({ op: "same", text }));
  const tail: DiffLine[] = a.slice(endA).map((text) => ({ op: "same", text }));
  const x = a.slice(start, endA);
  const y = b.slice(start, endB);
  const n = x.length;
  const m = y.length;
  if (n === 0 || m === 0 || (n + 1) * (m + 1) > MAX_CELLS) {
    return [
      ...head,
      ...x.map((text): DiffLine => ({ op: "del", text })),
      ...y.map((text): DiffLine => ({ op: "add", text })),
      ...tail,
    ];
  }
  // lcs[i * (m + 1) + j]: the longest common subsequence of x[i..] and y[j..].
  const width = m + 1;
  const lcs = new Uint32Array((n + 1) * width);
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i * width + j] =
        x[i] === y[j] ? (lcs[(i + 1) * width + j + 1] ?? 0) + 1 : Math.max(lcs[(i + 1) * width + j] ?? 0, lcs[i * width + j + 1] ?? 0);
    }
  }
  const middle: DiffLine[] = [];
  let i = 0;
  let j = 0;
  while (i < n && j < m) {
    if (x[i] === y[j]) {
      middle.push({ op: "same", text: x[i] ?? "" });
      i++;
      j++;
    } else if ((lcs[(i + 1) * width + j] ?? 0) >= (lcs[i * width + j + 1] ?? 0)) {
      // Removals before additions, as a reader expects a replaced line.
      middle.push({ op: "del", text: x[i] ?? "" });
      i++;
    } else {
      middle.push({ op: "add", text: y[j] ?? "" });
      j++;
    }
  }
  for (; i < n; i++) middle.push({ op: "del", text: x[i] ?? "" });
  for (; j < m; j++) middle.push({ op: "add", text: y[j] ?? "" });
  return [...head, ...middle, ...tail];
}

/** A field's value as text: a string as it is, a number or a flag as written, a message
 *  or a list as indented JSON (the contract's JSON names); "" when not set. */
function valueText(value: unknown): string {
  if (value === undefined || value === null) return "";
  if (typeof value === "string") return value;
  if (typeof value === "number" || typeof value === "boolean") return String(value);
  return JSON.stringify(value, null, 2);
}

function label(field: string): string {
  const words = field.replace(/_/g, " ");
  return LABELS[field] ?? words.charAt(0).toUpperCase() + words.slice(1);
}

/** Every configuration field of `before` and `after`, in the contract's order. */
export function fieldDiffs(before: Assistant, after: Assistant): FieldDiff[] {
  const a = toJson(AssistantSchema, before) as Record<string, unknown>;
  const b = toJson(AssistantSchema, after) as Record<string, unknown>;
  return AssistantSchema.fields
    .filter((f) => !NOT_CONFIGURATION.has(f.name))
    .map((f) => {
      const was = valueText(a[f.jsonName]);
      const is = valueText(b[f.jsonName]);
      return { field: f.name, label: label(f.name), before: was, after: is, changed: was !== is };
    });
}

/** The lines of a field, an unchanged stretch longer than the context around it folded. */
function renderLines(diff: DiffLine[]): HTMLElement {
  const pre = h("pre", { class: "line-diff", "data-testid": "revision-lines" });
  const near = diff.map((line, k) => {
    if (line.op !== "same") return true;
    for (let d = 1; d <= CONTEXT; d++) {
      if (diff[k - d]?.op === "del" || diff[k - d]?.op === "add") return true;
      if (diff[k + d]?.op === "del" || diff[k + d]?.op === "add") return true;
    }
    return false;
  });
  const mark: Record<LineOp, string> = { same: "  ", del: "- ", add: "+ " };
  for (let k = 0; k < diff.length; ) {
    const line = diff[k];
    if (line === undefined) break;
    if (near[k]) {
      pre.append(h("span", { class: `line ${line.op}`, "data-testid": "revision-line", "data-op": line.op }, mark[line.op] + line.text));
      k++;
      continue;
    }
    let end = k;
    while (end < diff.length && !near[end]) end++;
    const folded = end - k;
    pre.append(h("span", { class: "line fold", "data-testid": "revision-fold" }, `… ${folded} unchanged line${folded > 1 ? "s" : ""}`));
    k = end;
  }
  return pre;
}

/** `before` (revision `from`) against `after` (revision `to`): the changed fields with
 *  their lines first, then the unchanged ones, each opened on demand. */
export function renderDiff(from: bigint, before: Assistant, to: bigint, after: Assistant): HTMLElement {
  const fields = fieldDiffs(before, after);
  const changed = fields.filter((f) => f.changed);
  const row = (f: FieldDiff): HTMLElement =>
    f.changed
      ? h(
          "li",
          { class: "revision-field changed", "data-testid": "revision-field", "data-field": f.field, "data-changed": "true" },
          h("strong", {}, f.label),
          " ",
          h("span", { class: "badge changed" }, f.before === "" ? "set" : f.after === "" ? "cleared" : "changed"),
          renderLines(lineDiff(f.before, f.after)),
        )
      : h(
          "li",
          { class: "revision-field", "data-testid": "revision-field", "data-field": f.field, "data-changed": "false" },
          // What is the same in both is there on demand; what neither sets is only named.
          f.after === ""
            ? h("span", {}, f.label, h("span", { class: "muted" }, " not set in either"))
            : h("details", {}, h("summary", {}, f.label, h("span", { class: "muted" }, " unchanged")), h("pre", { "data-testid": "revision-value" }, f.after)),
        );
  return h(
    "div",
    {
      class: "revision-diff",
      "data-testid": "revision-diff",
      "data-from": String(from),
      "data-to": String(to),
      "data-changed": changed.map((f) => f.field).join(" "),
    },
    h(
      "p",
      { class: "muted", "data-testid": "revision-diff-summary" },
      `Revision ${from} → revision ${to}: `,
      changed.length === 0 ? "the same configuration." : `${changed.length} field${changed.length > 1 ? "s" : ""} changed.`,
    ),
    h("ul", { class: "revision-fields" }, ...changed.map(row), ...fields.filter((f) => !f.changed).map(row)),
  );
}
