// A memory forming policy (MemoryPolicy, docs/memory.md) as a form: which scopes memory is
// formed in, by which model, when (after each run, or once a conversation has been idle
// some minutes), the categories kept with their time to live, and the limits. One form for
// the assistant editor (Assistant.memory_policy) and the workspace's default
// (Workspace.memory_policy), so both read and write a policy the same way; the server
// checks the values (bad ones come back as field violations under `memory_policy`).
import type { Duration } from "@bufbuild/protobuf/wkt";
import { h } from "./dom";
import { MemoryCategory, MemoryFormingMode, type MemoryCategoryRule, type MemoryPolicy } from "./gen/switchboard/api/context/v1/context_pb";
import { formingModeLabel, memoryCategoryLabel } from "./labels";

const MODES = [
  MemoryFormingMode.UNSPECIFIED,
  MemoryFormingMode.OFF,
  MemoryFormingMode.USER,
  MemoryFormingMode.WORKSPACE,
  MemoryFormingMode.USER_AND_WORKSPACE,
];
const CATEGORIES = [MemoryCategory.PREFERENCES, MemoryCategory.PERSON_FACTS, MemoryCategory.PLANS, MemoryCategory.WORKSPACE_FACTS];
const DAY_S = 86_400;

export interface PolicyForm {
  /** The fieldset, `data-testid` `{prefix}-memory`. */
  element: HTMLElement;
  /** The policy as the form says it; undefined when it says nothing (inherit, nothing set). */
  read(): MemoryPolicy | undefined;
}

function days(ttl: Duration | undefined): string {
  if (!ttl) return "";
  const seconds = Number(ttl.seconds) + ttl.nanos / 1e9;
  return seconds > 0 ? String(Math.round((seconds / DAY_S) * 1000) / 1000) : "";
}

/**
 * The form for `policy` (undefined: none set). `workspaceDefault`: the workspace's own
 * policy, whose "inherit" means off (the contract's rule), so it offers Off instead.
 * Handles are `{prefix}-memory-mode`, `-provider`, `-model`, `-idle`, `-max-candidates`,
 * `-max-items`, and per category `{prefix}-memory-category[data-category]` holding
 * `memory-category-on` and `memory-category-ttl` (days).
 */
export function policyForm(prefix: string, policy: MemoryPolicy | undefined, workspaceDefault = false): PolicyForm {
  const field = (testid: string, label: string, input: HTMLElement): HTMLElement => {
    input.dataset.testid = `${prefix}-memory-${testid}`;
    input.setAttribute("aria-label", label);
    return h("label", {}, label, input);
  };
  const mode = h(
    "select",
    {},
    ...MODES.filter((m) => !(workspaceDefault && m === MemoryFormingMode.UNSPECIFIED)).map((m) =>
      h("option", { value: String(m) }, m === MemoryFormingMode.UNSPECIFIED ? "as the workspace's default" : formingModeLabel(m)),
    ),
  );
  const stored = policy?.mode ?? MemoryFormingMode.UNSPECIFIED;
  mode.value = String(workspaceDefault && stored === MemoryFormingMode.UNSPECIFIED ? MemoryFormingMode.OFF : stored);
  const number = (value: number | undefined, attrs: Record<string, string | number>): HTMLInputElement =>
    h("input", { type: "number", value: value ? String(value) : "", ...attrs });
  const rows = CATEGORIES.map((category) => {
    const rule = policy?.categories.find((c) => c.category === category);
    return h(
      "div",
      { class: "row", "data-testid": `${prefix}-memory-category`, "data-category": MemoryCategory[category] ?? "" },
      h(
        "label",
        { class: "check" },
        h("input", { type: "checkbox", "data-testid": "memory-category-on", checked: rule !== undefined }),
        ` ${memoryCategoryLabel(category)}`,
      ),
      h(
        "label",
        {},
        "kept for (days) ",
        h("input", {
          type: "number",
          "data-testid": "memory-category-ttl",
          "aria-label": `How many days ${memoryCategoryLabel(category)} are kept`,
          min: 0,
          step: "any",
          placeholder: "for ever",
          value: days(rule?.ttl),
        }),
      ),
    );
  });
  const element = h(
    "fieldset",
    { "data-testid": `${prefix}-memory` },
    h("legend", {}, workspaceDefault ? "Memory: the default of assistants that set none" : "Memory: what it learns from conversations"),
    h(
      "div",
      { class: "row" },
      field("mode", "Forms memory", mode),
      field("idle", "After idle minutes", number(policy?.idleMinutes, { min: 0, max: 1440, placeholder: "0: after each run" })),
    ),
    h(
      "div",
      { class: "row" },
      field("provider", "Forming provider", h("input", { value: policy?.provider ?? "", placeholder: "the assistant's", maxlength: 256 })),
      field("model", "Forming model", h("input", { value: policy?.model ?? "", placeholder: "the assistant's", maxlength: 256 })),
    ),
    h(
      "div",
      { class: "row" },
      field("max-candidates", "Facts per exchange", number(policy?.maxCandidates, { min: 0, max: 20, placeholder: "5" })),
      field("max-items", "Items per scope", number(policy?.maxItems, { min: 0, placeholder: "200" })),
    ),
    h("small", { class: "muted" }, "Categories kept (none ticked: every category its scopes allow, for ever)"),
    ...rows,
  );
  const value = (testid: string): string => element.querySelector<HTMLInputElement>(`[data-testid="${prefix}-memory-${testid}"]`)?.value.trim() ?? "";
  const read = (): MemoryPolicy | undefined => {
    const categories: MemoryCategoryRule[] = [];
    for (const row of rows) {
      if (!row.querySelector<HTMLInputElement>('[data-testid="memory-category-on"]')?.checked) continue;
      const category = MemoryCategory[(row.dataset.category ?? "") as keyof typeof MemoryCategory];
      const ttlDays = Number(row.querySelector<HTMLInputElement>('[data-testid="memory-category-ttl"]')?.value || "0");
      categories.push({
        category,
        ...(ttlDays > 0 ? { ttl: { seconds: BigInt(Math.round(ttlDays * DAY_S)), nanos: 0 } as Duration } : {}),
      } as MemoryCategoryRule);
    }
    const chosen: MemoryPolicy = {
      mode: Number(mode.value) as MemoryFormingMode,
      provider: value("provider"),
      model: value("model"),
      idleMinutes: Number(value("idle") || "0"),
      categories,
      maxCandidates: Number(value("max-candidates") || "0"),
      maxItems: Number(value("max-items") || "0"),
    } as MemoryPolicy;
    return isEmpty(chosen) ? undefined : chosen;
  };
  return { element, read };
}

/** Whether two policies say the same (undefined is "none set"). */
export function samePolicy(a: MemoryPolicy | undefined, b: MemoryPolicy | undefined): boolean {
  const key = (p: MemoryPolicy | undefined): string =>
    p === undefined || isEmpty(p)
      ? ""
      : JSON.stringify([
          p.mode,
          p.provider,
          p.model,
          p.idleMinutes,
          p.maxCandidates,
          p.maxItems,
          p.categories.map((c) => [c.category, String(c.ttl?.seconds ?? 0n), c.ttl?.nanos ?? 0]),
        ]);
  return key(a) === key(b);
}

/** A policy that says nothing: inherit, nothing set. */
function isEmpty(p: MemoryPolicy): boolean {
  return (
    p.mode === MemoryFormingMode.UNSPECIFIED &&
    !p.provider &&
    !p.model &&
    !p.idleMinutes &&
    !p.categories.length &&
    !p.maxCandidates &&
    !p.maxItems
  );
}
