// Errors as the user sees them: the gRPC code, the ErrorInfo reason and metadata, the
// field violations, the retry delay; never an exception's text or stack.
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  QuotaFailureSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb";
import { h } from "./dom";
import { codeLabel } from "./labels";

export interface Violation {
  field: string;
  description: string;
}

export interface Problem {
  /** Canonical gRPC code name, e.g. "UNAUTHENTICATED". */
  code: string;
  /** The server's message (or the console's own, for local checks). */
  message: string;
  /** ErrorInfo.reason, e.g. "ERROR_REASON_SESSION_REVOKED"; "" when there is none. */
  reason: string;
  metadata: Record<string, string>;
  violations: Violation[];
  /** RetryInfo's delay in seconds, when the server sent one. */
  retryAfterS?: number;
  /** True when the server (or Envoy) answered; false for a connection that failed. */
  wire: boolean;
  /** What it means for the user, in a sentence, when the console knows (a limit hit). */
  summary?: string;
}

/** `Code.PermissionDenied` -> "PERMISSION_DENIED". */
export function codeName(code: Code): string {
  const name = Code[code] ?? "Unknown";
  return name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

export function problem(reason: unknown): Problem {
  if (!(reason instanceof ConnectError)) {
    // Calls always fail with a ConnectError; anything else is a bug in the console,
    // reported without the exception's text.
    console.error(reason);
    return local("INTERNAL", "unexpected failure in the console");
  }
  const error = reason;
  const result: Problem = {
    code: codeName(error.code),
    // A failure without an answer says what happened, not what the browser's fetch threw.
    message: error.isWireError ? error.rawMessage : describeLocal(error),
    reason: "",
    metadata: {},
    violations: [],
    wire: error.isWireError,
  };
  for (const info of error.findDetails(ErrorInfoSchema)) {
    result.reason = info.reason;
    result.metadata = { ...info.metadata };
  }
  for (const bad of error.findDetails(BadRequestSchema)) {
    for (const v of bad.fieldViolations) result.violations.push({ field: v.field, description: v.description });
  }
  for (const quota of error.findDetails(QuotaFailureSchema)) {
    for (const v of quota.violations) result.violations.push({ field: v.subject, description: v.description });
  }
  for (const retry of error.findDetails(RetryInfoSchema)) {
    const delay = retry.retryDelay;
    if (delay) result.retryAfterS = Number(delay.seconds) + delay.nanos / 1e9;
  }
  return result;
}

function describeLocal(error: ConnectError): string {
  switch (error.code) {
    case Code.Canceled:
      return "cancelled";
    case Code.DeadlineExceeded:
      return "no answer in time";
    default:
      return "the connection to the server failed";
  }
}

/** A problem the console found itself (a bad JSON field, say), shaped like the server's. */
export function local(code: string, message: string, violations: Violation[] = []): Problem {
  return { code, message, reason: "", metadata: {}, violations, wire: false };
}

export function isCode(p: Problem, code: Code): boolean {
  return p.code === codeName(code);
}

/** The problem as a block: what happened in words, then the code and reason exactly as the
 *  server gave them (what a support request quotes), the message and the violations. */
export function renderProblem(p: Problem, testid = "error"): HTMLElement {
  return h(
    "div",
    { class: "problem", role: "alert", "data-testid": testid, "data-code": p.code, "data-reason": p.reason },
    h("strong", {}, codeLabel(p.code)),
    h("code", { "data-testid": `${testid}-code` }, p.code),
    p.reason ? h("code", { "data-testid": `${testid}-reason` }, p.reason) : null,
    p.summary ? h("p", { class: "problem-summary", "data-testid": `${testid}-summary` }, p.summary) : null,
    // The server's words, quoted as they came (they may name fields).
    h("span", { class: "problem-message", "data-testid": `${testid}-message`, "data-content": true }, p.message),
    p.retryAfterS !== undefined ? h("span", { class: "muted" }, `retry in ${p.retryAfterS.toFixed(1)} s`) : null,
    p.violations.length
      ? h(
          "ul",
          {},
          ...p.violations.map((v) =>
            h(
              "li",
              { "data-testid": `${testid}-violation`, "data-field": v.field },
              h("code", {}, v.field),
              ": ",
              h("span", { "data-content": true }, v.description),
            ),
          ),
        )
      : null,
  );
}

/** A message refused at a limit, said in a sentence: which budgets have no room and when
 *  they reset (BUDGET_EXHAUSTED: the QuotaFailure's subjects, ErrorInfo's `reset_time`),
 *  or how long to wait (RATE_LIMITED, QUOTA_EXCEEDED: RetryInfo). `title` names a budget
 *  as the page does. Undefined for any other problem. */
export function limitSummary(p: Problem, title: (name: string) => string): string | undefined {
  if (p.code !== "RESOURCE_EXHAUSTED") return undefined;
  const wait = p.retryAfterS !== undefined ? ` Try again in ${Math.max(1, Math.ceil(p.retryAfterS))} s.` : "";
  switch (p.reason) {
    case "ERROR_REASON_BUDGET_EXHAUSTED": {
      const budgets = p.violations.map((v) => `“${title(v.field)}”`);
      const which =
        budgets.length > 1 ? `the budgets ${budgets.join(", ")} have` : budgets.length ? `the budget ${budgets[0]} has` : "a budget has";
      const reset = p.metadata.reset_time ? new Date(p.metadata.reset_time) : undefined;
      const when =
        reset && !Number.isNaN(reset.getTime())
          ? ` It resets ${reset.toLocaleString([], { dateStyle: "medium", timeStyle: "short" })}.`
          : " It does not reset by itself: an owner can raise the cap.";
      return `Not sent: ${which} no room left for this message.${when}`;
    }
    case "ERROR_REASON_RATE_LIMITED":
      return `Not sent: too many messages in this workspace for now.${wait}`;
    case "ERROR_REASON_QUOTA_EXCEEDED":
      return `Not sent: too many runs are going at once.${wait}`;
    default:
      return undefined;
  }
}

/** A save refused because the thing changed elsewhere since its editor opened (an etag
 *  that no longer matches): ``box`` says so and offers the current version, which
 *  ``load`` (given the button, for its busy state) brings into the editor. Nothing for
 *  another problem. */
export function offerCurrentVersion(
  box: HTMLElement,
  p: Problem,
  testid: string,
  load: (button: HTMLButtonElement) => void,
): void {
  if (p.reason !== "ERROR_REASON_ETAG_MISMATCH") return;
  box.append(
    h("span", { "data-testid": "etag-conflict" }, "Changed elsewhere since you opened it. "),
    h(
      "button",
      {
        type: "button",
        "data-testid": testid,
        onclick: (e: globalThis.Event) => load(e.currentTarget as HTMLButtonElement),
      },
      "Load the current version",
    ),
  );
}

/** Whether the cause may go by itself (the connection, a deadline, a rate limit that says
 *  when to retry): such a problem is shown for a while, not until dismissed. */
export function isTransient(p: Problem): boolean {
  if (!p.wire) return true;
  if (p.code === "RESOURCE_EXHAUSTED") return p.retryAfterS !== undefined;
  return p.code === "UNAVAILABLE" || p.code === "DEADLINE_EXCEEDED" || p.code === "CANCELED";
}
