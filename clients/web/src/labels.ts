// What the page calls things: every enum value and update kind the contracts use, in the
// words a person reads. The page shows these, never an enum's name (`UNSPECIFIED`,
// `mcp_server`, `stateChange`); the names stay in data-* attributes, for scripts and tests.
// One module, so a value the contracts add is named once and the same everywhere.
import { Code } from "@connectrpc/connect";
import {
  MemoryCategory,
  MemoryChange,
  MemoryFormingMode,
  MemoryKind,
  MessageRole,
  WorkspaceRole,
} from "./gen/switchboard/api/context/v1/context_pb";
import {
  BudgetPeriod,
  CallDirection,
  CallState,
  ConcurrencyPolicy,
  FiringOutcome,
  MissedTickPolicy,
  type RequiredAction,
  type Run,
  RunState,
  type RunUpdate,
  ScheduleConversationMode,
  ScheduleState,
  SteerState,
  ToolApprovalDecision,
} from "./gen/switchboard/api/dispatcher/v1/dispatcher_pb";
import {
  BudgetAlertKind,
  ChangeKind,
  EventType,
  MemoryDecisionAction,
  MemoryFormingOutcome,
  SecurityEventKind,
} from "./gen/switchboard/api/events/v1/events_pb";
import { ToolOutcome, type Usage } from "./gen/switchboard/api/handler/v1/handler_pb";
import {
  CircuitState,
  DeliveryState,
  HealthState,
  IntegrationKind,
} from "./gen/switchboard/api/integration/v1/integration_pb";

/** The label of `value` in `labels`; a value the contracts added since reads "other". */
function label<T extends number>(labels: Record<T, string>, value: T): string {
  return labels[value] ?? "other";
}

const HEALTH: Record<HealthState, string> = {
  [HealthState.UNSPECIFIED]: "not checked yet",
  [HealthState.HEALTHY]: "healthy",
  [HealthState.DEGRADED]: "degraded",
  [HealthState.UNHEALTHY]: "unhealthy",
};
export const healthLabel = (value: HealthState): string => label(HEALTH, value);

const CIRCUIT: Record<CircuitState, string> = {
  // No call has gone through this process's breaker yet: nothing to say.
  [CircuitState.UNSPECIFIED]: "",
  [CircuitState.CLOSED]: "calls flow",
  [CircuitState.OPEN]: "calls paused",
  [CircuitState.HALF_OPEN]: "trying calls again",
};
export const circuitLabel = (value: CircuitState): string => label(CIRCUIT, value);

const KIND: Record<IntegrationKind, string> = {
  [IntegrationKind.UNSPECIFIED]: "integration",
  [IntegrationKind.MCP_SERVER]: "MCP server",
  [IntegrationKind.GRPC_HANDLER]: "gRPC domain expert",
  [IntegrationKind.WEBHOOK]: "webhook",
  [IntegrationKind.A2A_AGENT]: "A2A agent",
};
export const kindLabel = (value: IntegrationKind): string => label(KIND, value);

const DELIVERY: Record<DeliveryState, string> = {
  [DeliveryState.UNSPECIFIED]: "unknown",
  [DeliveryState.PENDING]: "being delivered",
  [DeliveryState.SUCCEEDED]: "delivered",
  [DeliveryState.FAILED]: "failed",
};
export const deliveryLabel = (value: DeliveryState): string => label(DELIVERY, value);

const RUN_STATE: Record<RunState, string> = {
  [RunState.UNSPECIFIED]: "unknown",
  [RunState.QUEUED]: "queued",
  [RunState.RUNNING]: "running",
  [RunState.SUCCEEDED]: "succeeded",
  [RunState.FAILED]: "failed",
  [RunState.CANCELLED]: "cancelled",
  [RunState.DEADLINE_EXCEEDED]: "out of time",
  [RunState.REQUIRES_ACTION]: "waiting for approval",
};
const TERMINAL_STATES: ReadonlySet<RunState> = new Set([RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.DEADLINE_EXCEEDED]);

export const runStateLabel = (value: RunState): string => label(RUN_STATE, value);

/** A run's state in words, saying what a paused run waits for (a person, or budget room). */
export function runLabel(run: Run): string {
  // A steer the run it steered took is done, but answered nothing itself: say where it went.
  if (run.steer?.state === SteerState.CONSUMED && run.state === RunState.SUCCEEDED) {
    return run.steer.step ? `steer consumed at step ${run.steer.step}` : "steer consumed";
  }
  return waitingLabel(run.state, run.requiredAction);
}

/** A state, and for REQUIRES_ACTION what the run waits for (a run's own, or a child's as
 *  its parent's `child_run` update says it). */
export function waitingLabel(state: RunState, action: RequiredAction | undefined): string {
  if (state !== RunState.REQUIRES_ACTION) return runStateLabel(state);
  if (action?.budget) return "waiting for budget room";
  // A call in flight at a crash: a person says what became of it, not whether to make it.
  const unknown = action?.toolCalls.some((c) => c.outcomeUnknown && c.decision === ToolApprovalDecision.UNSPECIFIED);
  return unknown ? "waiting for a decision (outcome unknown)" : runStateLabel(state);
}

const DECISION: Record<ToolApprovalDecision, string> = {
  [ToolApprovalDecision.UNSPECIFIED]: "undecided",
  [ToolApprovalDecision.APPROVE]: "approved",
  [ToolApprovalDecision.DENY]: "denied",
  [ToolApprovalDecision.RETRY]: "sent again",
  [ToolApprovalDecision.COMPLETE]: "marked done",
  [ToolApprovalDecision.FAIL_RUN]: "run failed",
};
/** A tool call's decision as the timeline and the approvals say it. */
export const decisionLabel = (value: ToolApprovalDecision): string => label(DECISION, value);

const OUTCOME: Record<ToolOutcome, string> = {
  [ToolOutcome.UNSPECIFIED]: "ended",
  [ToolOutcome.SUCCEEDED]: "succeeded",
  [ToolOutcome.ERROR]: "tool error",
  [ToolOutcome.FAILED]: "failed",
  [ToolOutcome.DENIED]: "denied",
};
export const outcomeLabel = (value: ToolOutcome): string => label(OUTCOME, value);

/** A stored tool result's outcome ("succeeded", "error", ... as the context service keeps it). */
export function storedOutcomeLabel(outcome: string): string {
  const found = Object.entries(ToolOutcome).find(([name]) => name.toLowerCase() === outcome.toLowerCase());
  return found ? outcomeLabel(found[1] as ToolOutcome) : "ended";
}

const CALL_STATE: Record<CallState, string> = {
  [CallState.UNSPECIFIED]: "unknown",
  [CallState.DIALING]: "dialing",
  [CallState.RINGING]: "ringing",
  [CallState.ANSWERED]: "answered",
  [CallState.ENDED]: "ended",
};
export const callStateLabel = (value: CallState): string => label(CALL_STATE, value);

const CALL_DIRECTION: Record<CallDirection, string> = {
  [CallDirection.UNSPECIFIED]: "call",
  [CallDirection.INBOUND]: "in",
  [CallDirection.OUTBOUND]: "out",
};
/** A call's direction in a word ("in", "out"). */
export const callDirectionLabel = (value: CallDirection): string => label(CALL_DIRECTION, value);

const EVENT_TYPE: Record<EventType, string> = {
  [EventType.UNSPECIFIED]: "event",
  [EventType.WORKSPACE_CHANGED]: "Workspace",
  [EventType.MEMBER_CHANGED]: "Member",
  [EventType.CONVERSATION_CHANGED]: "Conversation",
  [EventType.MESSAGE_CREATED]: "Message",
  [EventType.MEMORY_CHANGED]: "Memory",
  [EventType.RUN_UPDATED]: "Run",
  [EventType.INTEGRATION_CHANGED]: "Integration",
  [EventType.SECURITY]: "Security",
  [EventType.MESSAGE_FILTERED]: "Message filtered",
  [EventType.TOOL_INVOKED]: "Tool call",
  [EventType.ASSISTANT_CHANGED]: "Assistant",
  [EventType.BUDGET_CHANGED]: "Budget",
  [EventType.BUDGET_ALERT]: "Budget alert",
  [EventType.FILE_CHANGED]: "File",
  [EventType.SCHEDULE_CHANGED]: "Schedule",
  [EventType.SCHEDULE_FIRED]: "Schedule fired",
  [EventType.MEMORY_DECIDED]: "Memory decision",
  [EventType.MESSAGE_DELETED]: "Message deleted",
  [EventType.CALL_CHANGED]: "Phone call",
};
/** An event type as the feed's entries and its filter name it. */
export const eventTypeLabel = (value: EventType): string => label(EVENT_TYPE, value);

/** A webhook's event type as the contracts spell it (`MESSAGE_CREATED`), in words. */
export function eventTypeNameLabel(name: string): string {
  const value = (EventType as unknown as Record<string, EventType | undefined>)[name.replace(/^EVENT_TYPE_/, "")];
  return value === undefined ? name.toLowerCase().replaceAll("_", " ") : eventTypeLabel(value);
}

const CHANGE: Record<ChangeKind, string> = {
  [ChangeKind.UNSPECIFIED]: "changed",
  [ChangeKind.CREATED]: "created",
  [ChangeKind.UPDATED]: "changed",
  [ChangeKind.DELETED]: "deleted",
};
export const changeLabel = (value: ChangeKind): string => label(CHANGE, value);

const SECURITY: Record<SecurityEventKind, string> = {
  [SecurityEventKind.UNSPECIFIED]: "security event",
  [SecurityEventKind.LOGIN_SUCCEEDED]: "signed in",
  [SecurityEventKind.LOGIN_FAILED]: "a sign-in failed",
  [SecurityEventKind.REFRESH_REUSE_DETECTED]: "a spent refresh token came back: the session was revoked",
  [SecurityEventKind.SESSION_REVOKED]: "a session was signed out",
  [SecurityEventKind.API_KEY_CREATED]: "an API key was created",
  [SecurityEventKind.API_KEY_REVOKED]: "an API key was revoked",
  [SecurityEventKind.ACCOUNT_DELETED]: "an account was deleted",
};
export const securityLabel = (value: SecurityEventKind): string => label(SECURITY, value);

const MEMORY_KIND: Record<MemoryKind, string> = {
  [MemoryKind.UNSPECIFIED]: "memory",
  [MemoryKind.FACT]: "fact",
  [MemoryKind.PREFERENCE]: "preference",
  [MemoryKind.SUMMARY]: "summary",
  [MemoryKind.ENTITY]: "entity",
  [MemoryKind.NOTE]: "note",
  [MemoryKind.PLAN]: "plan or date",
};
export const memoryKindLabel = (value: MemoryKind): string => label(MEMORY_KIND, value);

const MEMORY_CHANGE: Record<MemoryChange, string> = {
  [MemoryChange.UNSPECIFIED]: "changed",
  [MemoryChange.CREATED]: "learned",
  [MemoryChange.EDITED]: "edited",
  [MemoryChange.RETIRED]: "retired",
};
/** How a version of a memory item came about, as its history says it. */
export const memoryChangeLabel = (value: MemoryChange): string => label(MEMORY_CHANGE, value);

const MEMORY_DECISION: Record<MemoryDecisionAction, string> = {
  [MemoryDecisionAction.UNSPECIFIED]: "decided",
  [MemoryDecisionAction.ADD]: "remembered",
  [MemoryDecisionAction.UPDATE]: "updated",
  [MemoryDecisionAction.INVALIDATE]: "retired",
  [MemoryDecisionAction.NONE]: "kept nothing",
  [MemoryDecisionAction.MERGE]: "merged",
  [MemoryDecisionAction.EXPIRE]: "expired",
};
/** What memory forming or consolidation decided about a fact. */
export const memoryDecisionLabel = (value: MemoryDecisionAction): string => label(MEMORY_DECISION, value);

const FORMING_OUTCOME: Record<MemoryFormingOutcome, string> = {
  [MemoryFormingOutcome.UNSPECIFIED]: "",
  [MemoryFormingOutcome.APPLIED]: "",
  [MemoryFormingOutcome.FAILED]: "forming failed: nothing of it was applied",
  [MemoryFormingOutcome.PAUSED]: "forming paused: a budget is at its cap",
};
/** How a forming round ended, when that is news ("" when its decisions were applied). */
export const formingOutcomeLabel = (value: MemoryFormingOutcome): string => label(FORMING_OUTCOME, value);

const FORMING_MODE: Record<MemoryFormingMode, string> = {
  [MemoryFormingMode.UNSPECIFIED]: "as the workspace's default",
  [MemoryFormingMode.OFF]: "off",
  [MemoryFormingMode.USER]: "about the person",
  [MemoryFormingMode.WORKSPACE]: "about the workspace",
  [MemoryFormingMode.USER_AND_WORKSPACE]: "about the person and the workspace",
};
/** Which scopes an assistant (or a workspace's default) forms memory in. */
export const formingModeLabel = (value: MemoryFormingMode): string => label(FORMING_MODE, value);

const MEMORY_CATEGORY: Record<MemoryCategory, string> = {
  [MemoryCategory.UNSPECIFIED]: "category",
  [MemoryCategory.PREFERENCES]: "the person's preferences",
  [MemoryCategory.PERSON_FACTS]: "facts about the person",
  [MemoryCategory.PLANS]: "plans and dates",
  [MemoryCategory.WORKSPACE_FACTS]: "the workspace's facts",
};
export const memoryCategoryLabel = (value: MemoryCategory): string => label(MEMORY_CATEGORY, value);

const ROLE: Record<WorkspaceRole, string> = {
  [WorkspaceRole.UNSPECIFIED]: "no role",
  [WorkspaceRole.VIEWER]: "viewer",
  [WorkspaceRole.EDITOR]: "editor",
  [WorkspaceRole.OWNER]: "owner",
};
export const roleLabel = (value: WorkspaceRole): string => label(ROLE, value);

const MESSAGE_ROLE: Record<MessageRole, string> = {
  [MessageRole.UNSPECIFIED]: "message",
  [MessageRole.USER]: "user",
  [MessageRole.ASSISTANT]: "assistant",
  [MessageRole.SYSTEM]: "system",
  [MessageRole.TOOL]: "tool",
};
export const messageRoleLabel = (value: MessageRole): string => label(MESSAGE_ROLE, value);

const PERIOD: Record<BudgetPeriod, string> = {
  [BudgetPeriod.UNSPECIFIED]: "no period",
  [BudgetPeriod.RUN]: "per run",
  [BudgetPeriod.DAY]: "per day",
  [BudgetPeriod.WEEK]: "per week",
  [BudgetPeriod.MONTH]: "per month",
  [BudgetPeriod.TOTAL]: "in total",
};
export const periodLabel = (value: BudgetPeriod): string => label(PERIOD, value);

const ALERT: Record<BudgetAlertKind, string> = {
  [BudgetAlertKind.UNSPECIFIED]: "alert",
  [BudgetAlertKind.THRESHOLD]: "reached a threshold",
  [BudgetAlertKind.MESSAGE_REFUSED]: "refused a message",
  [BudgetAlertKind.RUN_PAUSED]: "paused a run",
};
export const budgetAlertLabel = (value: BudgetAlertKind): string => label(ALERT, value);

const STEER: Record<SteerState, string> = {
  [SteerState.UNSPECIFIED]: "steer",
  [SteerState.ACCEPTED]: "steer accepted",
  [SteerState.CONSUMED]: "steer consumed",
  [SteerState.REQUEUED]: "steer requeued",
};
/** What became of a steer, as a run's timeline says it (its step is said beside). */
export const steerLabel = (value: SteerState): string => label(STEER, value);

const SCHEDULE_STATE: Record<ScheduleState, string> = {
  [ScheduleState.UNSPECIFIED]: "unknown",
  [ScheduleState.ACTIVE]: "active",
  [ScheduleState.PAUSED]: "paused",
};
export const scheduleStateLabel = (value: ScheduleState): string => label(SCHEDULE_STATE, value);

const CONVERSATION_MODE: Record<ScheduleConversationMode, string> = {
  [ScheduleConversationMode.UNSPECIFIED]: "one conversation for all its runs",
  [ScheduleConversationMode.SHARED]: "one conversation for all its runs",
  [ScheduleConversationMode.PER_RUN]: "a new conversation for each run",
};
export const conversationModeLabel = (value: ScheduleConversationMode): string => label(CONVERSATION_MODE, value);

const POLICY: Record<ConcurrencyPolicy, string> = {
  [ConcurrencyPolicy.UNSPECIFIED]: "wait in line behind a run going",
  [ConcurrencyPolicy.REJECT]: "skip the tick while a run is going",
  [ConcurrencyPolicy.ENQUEUE]: "wait in line behind a run going",
  [ConcurrencyPolicy.INTERRUPT]: "interrupt a run going",
  [ConcurrencyPolicy.STEER]: "steer a run going",
};
/** A schedule's concurrency policy: what its tick does when its conversation is busy. */
export const policyLabel = (value: ConcurrencyPolicy): string => label(POLICY, value);

const MISSED: Record<MissedTickPolicy, string> = {
  [MissedTickPolicy.UNSPECIFIED]: "skip missed ticks",
  [MissedTickPolicy.SKIP]: "skip missed ticks",
  [MissedTickPolicy.RUN_ONCE]: "run once for missed ticks",
};
export const missedTickLabel = (value: MissedTickPolicy): string => label(MISSED, value);

const FIRING: Record<FiringOutcome, string> = {
  [FiringOutcome.UNSPECIFIED]: "unknown",
  [FiringOutcome.CLAIMED]: "starting",
  [FiringOutcome.STARTED]: "started a run",
  [FiringOutcome.SKIPPED]: "skipped",
  [FiringOutcome.FAILED]: "refused",
};
export const firingLabel = (value: FiringOutcome): string => label(FIRING, value);

/** Micro-units of the price table's currency as money: 12300 -> "$0.0123". */
export function money(micros: bigint | number): string {
  const units = Number(micros) / 1e6;
  return `$${units.toFixed(Math.abs(units) >= 100 ? 2 : 4)}`;
}

/** Whether some of a run's model calls went unpriced: the server counts the calls of a
 *  model its price table has no price for (`Usage.unpriced_calls`), whose cost is unknown
 *  rather than nothing. A model priced at 0 is priced: its runs cost "$0.0000". */
export function unpriced(usage: Usage): boolean {
  return usage.unpricedCalls > 0;
}

/** "N runs" / "1 run" (any counted noun with a plain plural). */
export function counted(n: bigint | number, noun: string): string {
  return `${n.toLocaleString("en")} ${n === 1n || n === 1 ? noun : `${noun}s`}`;
}

/** A run's cost in dollars to `digits` places; "unpriced" when its calls were unpriced and
 *  nothing it did had a cost, else the known cost and what it leaves out ("$0.0070 + 2
 *  unpriced calls": a priced tool beside an unpriced model). */
export function usageCost(usage: Usage, digits: number): string {
  const cost = `$${usage.estimatedCostUsd.toFixed(digits)}`;
  if (!unpriced(usage)) return cost;
  return usage.costMicros === 0n ? "unpriced" : `${cost} + ${counted(usage.unpricedCalls, "unpriced call")}`;
}

/** A usage row's cost: money, "unpriced" when every run of the row had unpriced calls and
 *  nothing cost anything, else the known cost and the runs it leaves out. */
export function rowCost(costMicros: bigint, runs: bigint, unpricedRuns: bigint): string {
  if (unpricedRuns === 0n) return money(costMicros);
  if (costMicros === 0n && unpricedRuns === runs) return "unpriced";
  return `${money(costMicros)} + ${counted(unpricedRuns, "unpriced run")}`;
}

/** How a budget limited a run's answers: its model calls made with max_tokens lowered to
 *  fit what a budget had left ("answer limited by a budget to 485 tokens"). */
export function limitedLabel(usage: Usage): string {
  const calls = usage.budgetLoweredCalls;
  const to = usage.lowestMaxTokens.toLocaleString("en");
  if (calls === 1) return `answer limited by a budget${usage.lowestMaxTokens ? ` to ${to} tokens` : ""}`;
  return `${calls} answers limited by a budget${usage.lowestMaxTokens ? ` (the shortest to ${to} tokens)` : ""}`;
}

/** What a run update says, for the live feed: "succeeded", "wrote text", "calls echo".
 *  `run` is the run whose update it is: a child_run update naming another run as the one
 *  that asked is a grandchild's (or deeper), forwarded up the tree, and says who asked. */
export function runUpdateLabel(update: RunUpdate["update"], run = ""): string {
  switch (update.case) {
    case "stateChange":
      return update.value.run ? runLabel(update.value.run) : "changed state";
    case "delta":
      return "wrote text";
    case "progress":
      return update.value.stage ? `progress: ${update.value.stage}` : "made progress";
    case "toolCall":
      return `calls ${update.value.functionName || update.value.tool.split("/").pop() || "a tool"}`;
    case "toolResult":
      return `tool ${outcomeLabel(update.value.outcome)}`;
    case "result":
      return "answered";
    case "speech":
      return "spoke";
    case "steer":
      return update.value.step ? `${steerLabel(update.value.state)} at step ${update.value.step}` : steerLabel(update.value.state);
    case "childRun": {
      const asked = (update.value.assistant || update.value.handler).split("/").pop() || "an assistant";
      const parent = update.value.parent;
      const by = parent && run && parent !== run ? `its run ${parent.split("/").pop()?.slice(0, 8) ?? ""} ` : "";
      if (TERMINAL_STATES.has(update.value.state)) return `${by}asked ${asked}: ${runStateLabel(update.value.state)}`;
      // A child's pause shows on its parent: what it waits for (decided on the parent's card).
      return update.value.state === RunState.REQUIRES_ACTION ? `${by}asks ${asked}, ${waitingLabel(update.value.state, update.value.requiredAction)}` : `${by}asks ${asked}`;
    }
    case "queuedBehind":
      return update.value.run
        ? `waits behind run ${update.value.run.split("/").pop()?.slice(0, 8) ?? ""}${update.value.reason ? `: ${update.value.reason}` : ""}`
        : "waits behind no run now";
    case "handoff": {
      const to = update.value.toAssistant.split("/").pop() ?? "another assistant";
      return `handed the conversation to ${to}${update.value.reason ? `: ${update.value.reason}` : ""}`;
    }
    default:
      return "changed";
  }
}

const CODE: Partial<Record<Code, string>> = {
  [Code.Canceled]: "Cancelled",
  [Code.Unknown]: "Failed",
  [Code.InvalidArgument]: "Not accepted",
  [Code.DeadlineExceeded]: "No answer in time",
  [Code.NotFound]: "Not found",
  [Code.AlreadyExists]: "Already exists",
  [Code.PermissionDenied]: "Not allowed",
  [Code.ResourceExhausted]: "Over a limit",
  [Code.FailedPrecondition]: "Not possible now",
  [Code.Aborted]: "Conflict",
  [Code.OutOfRange]: "Out of range",
  [Code.Unimplemented]: "Not supported",
  [Code.Internal]: "Server error",
  [Code.Unavailable]: "Unavailable",
  [Code.DataLoss]: "Data lost",
  [Code.Unauthenticated]: "Not signed in",
};
/** A gRPC code's name ("PERMISSION_DENIED") as a heading ("Not allowed"). */
export function codeLabel(name: string): string {
  const key = name.toLowerCase().replace(/_(.)/g, (_, c: string) => c.toUpperCase());
  const code = (Code as unknown as Record<string, Code | undefined>)[key.charAt(0).toUpperCase() + key.slice(1)];
  return (code !== undefined ? CODE[code] : undefined) ?? "Failed";
}
