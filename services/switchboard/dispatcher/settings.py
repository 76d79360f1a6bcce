"""The dispatcher's section: runs, routing, filters, tools, delegation and assistants.

Its rooms with settings of their own keep them beside their code: the model handler's
(``llm/settings.py``), speech's (``voice/settings.py``), WebRTC's
(``talk/webrtc/settings.py``) and schedules' (``schedules/settings.py``). The static
remote experts are the platform's ``RemoteHandlerSettings`` (the integration hub keeps
their ids from integrations), and the context service's address is ``PeerSettings``
(the A2A front door reaches it too). A new setting is a field of its room's section,
read in ``dispatcher/build.py``, and a row of the README that ``make docs`` writes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from switchboard.platform.config import CommaSeparated, MiB, Section, shown


class DispatcherSettings(Section):
    """What only the dispatcher reads (``dispatcher/build.py``)."""

    dispatcher_max_running: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="runs executing at once in this process",
    )
    dispatcher_max_running_per_workspace: int = Field(
        default=16,
        ge=1,
        le=100_000,
        description="runs of one workspace executing at once (workspaces take turns)",
    )
    dispatcher_max_queued: int = Field(
        default=1_000,
        ge=1,
        le=1_000_000,
        description="runs waiting in this process; past it SendMessage answers "
        "RESOURCE_EXHAUSTED `QUEUE_FULL`",
    )
    dispatcher_max_queued_per_workspace: int = Field(
        default=200,
        ge=1,
        le=1_000_000,
        description="runs of one workspace waiting",
    )
    dispatcher_default_timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=86_400,
        description="a run's deadline when the request sets no `timeout`",
    )
    dispatcher_max_timeout_s: float = Field(
        default=900.0,
        gt=0,
        le=86_400,
        description="cap on a requested `timeout`",
    )
    dispatcher_lease_s: float = Field(
        default=30.0,
        ge=1.0,
        le=3600.0,
        description="a dispatcher replica renews a lease on its runs; one that stops renewing "
        "this long has its runs taken over by another, as "
        "`SWITCHBOARD_DISPATCHER_RECOVERY` says",
    )
    dispatcher_recovery: Literal["resume", "fail", "requeue"] = Field(
        default="resume",
        description="runs that were RUNNING when the dispatcher stopped: `resume` (continue "
        "from the run's journal: no model or tool call made again; a call whose outcome is "
        "unknown is sent again only to a retry-safe tool, else the run waits for a person), "
        "`fail` (FAILED, `RUN_INTERRUPTED`) or `requeue` (as `resume`, but a call in flight is "
        "sent again whatever its tool); "
        "queued runs always run",
    )
    dispatcher_default_handler: str = Field(
        default="",
        description="handler when no routing rule matches",
        json_schema_extra=shown("`llm` if configured, else `echo`"),
    )
    dispatcher_routes: str = Field(
        default="",
        description="routing rules, comma-separated: `/prefix=handler`, "
        "`type:image/*=handler`, `workspace:<id>=handler`",
    )
    dispatcher_handler_plugins: bool = Field(
        default=True,
        description="load handlers registered in the `switchboard.handlers` entry point group",
    )
    dispatcher_max_input_chars: int = Field(
        default=32_000,
        ge=1,
        le=4 * MiB,
        description="text characters in one sent message (RESOURCE_EXHAUSTED "
        "`REQUEST_TOO_LARGE` past it)",
    )
    dispatcher_max_messages_per_minute_per_user: int = Field(
        default=600,
        ge=1,
        le=10_000_000,
        description="SendMessage calls per user per minute (RESOURCE_EXHAUSTED `RATE_LIMITED` "
        "with RetryInfo)",
    )
    dispatcher_max_messages_per_minute_per_workspace: int = Field(
        default=6_000,
        ge=1,
        le=10_000_000,
        description="SendMessage calls per workspace per minute, unless the workspace's quota "
        "sets its own (`UpdateWorkspaceQuota`; RESOURCE_EXHAUSTED `RATE_LIMITED` with RetryInfo)",
    )
    dispatcher_max_admitting_per_workspace: int = Field(
        default=64,
        ge=1,
        le=1_000,
        description="SendMessage calls of one workspace this process admits (stores) at once; "
        "the rest wait their turn. Lower (4) keeps a workspace sending thousands at once from "
        "holding up the others' messages in the database's queue, at about a fifth of a busy "
        "workspace's runs per second (BENCHMARKS.md)",
    )
    dispatcher_max_active_runs_per_workspace: int = Field(
        default=1_000,
        ge=1,
        le=1_000_000,
        description="runs of one workspace queued or running at once, across replicas, unless "
        "the workspace's quota sets its own; past it SendMessage answers RESOURCE_EXHAUSTED "
        "`QUOTA_EXCEEDED` with RetryInfo",
    )
    dispatcher_content_policy: str = Field(
        default="builtin",
        description="content policy: `builtin`, an entry point in "
        "`switchboard.content_policies`, or `module:attr`",
    )
    dispatcher_blocklist: CommaSeparated = Field(
        default=(),
        description="terms the builtin policy refuses, comma-separated; `re:<regex>` for a pattern",
    )
    dispatcher_flag_injection: bool = Field(
        default=True,
        description="flag common prompt-injection markers on the run (the run proceeds; an "
        "event records it)",
    )
    dispatcher_run_retention_s: float = Field(
        default=300.0,
        ge=0,
        description="how long a finished run's updates stay replayable by WatchRun",
    )
    dispatcher_max_updates_per_run: int = Field(
        default=10_000,
        ge=10,
        le=1_000_000,
        description="updates kept per run for replay (older ones are dropped on endless streams)",
    )
    dispatcher_heartbeat_s: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="WatchRun, Converse and Talk keep-alive interval",
    )
    dispatcher_remote_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="timeout of a remote handler's GetCapabilities",
    )
    dispatcher_max_tool_steps: int = Field(
        default=8,
        ge=1,
        le=32,
        description="tool steps (rounds of calls) per run, unless its assistant sets fewer",
    )
    dispatcher_max_tool_calls_per_step: int = Field(
        default=16,
        ge=1,
        le=128,
        description="tool calls one model answer may make (more are answered with an error)",
    )
    dispatcher_max_delegation_depth: int = Field(
        default=3,
        ge=1,
        le=8,
        description="how deep a tree of delegate runs may grow (a run with no parent is "
        "at 0; a delegate call past this is refused before it starts)",
    )
    dispatcher_max_children_per_run: int = Field(
        default=4,
        ge=1,
        le=64,
        description="delegate runs one run may have going at once (more calls wait)",
    )
    dispatcher_max_children_per_tree: int = Field(
        default=32,
        ge=1,
        le=10_000,
        description="delegate runs one tree may start in all (more calls are refused)",
    )
    dispatcher_approval_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=7 * 86400,
        description="how long a run waits in REQUIRES_ACTION before it fails with "
        "APPROVAL_EXPIRED (`required_action.expire_time`); the run's own deadline "
        "stops meanwhile",
    )
    dispatcher_max_tool_result_chars: int = Field(
        default=16_000,
        ge=100,
        le=1_000_000,
        description="a tool's output given to the model and stored, at most (longer is cut, "
        "and says so)",
    )
    dispatcher_max_assistants_per_workspace: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="assistants one workspace may define",
    )
    dispatcher_max_assistant_revisions: int = Field(
        default=1000,
        ge=2,
        le=100_000,
        description="revisions kept per assistant; a change beyond it drops the oldest "
        '(docs/assistants.md, "Revisions")',
    )
    # Memory forming (``dispatcher/memory/``, docs/memory.md): ``SWITCHBOARD_MEMORY_*``.
    memory_forming: bool = Field(
        default=True,
        description="whether this process forms memory from finished runs under the "
        "assistants' and workspaces' memory policies (a process that should not, such as "
        "one kept for Talk sessions, sets false)",
    )
    memory_poll_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="how often a replica looks for due memory-forming jobs and, not feeding, "
        "whether the feeder's lease is free, at most",
    )
    memory_lease_s: float = Field(
        default=15.0,
        ge=1,
        le=3600,
        description="the memory feeder's lease: another replica takes the feeding over "
        "this long after its holder stopped renewing it",
    )
    memory_claim_s: float = Field(
        default=60.0,
        ge=3,
        le=3600,
        description="how long a worker's claim on a forming job lasts unless renewed (a "
        "crashed worker's job is taken again this long after)",
    )
    memory_call_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=900,
        description="the longest one forming model call (or one context call) may take",
    )
    memory_max_output_tokens: int = Field(
        default=1024,
        ge=64,
        le=32_000,
        description="`max_tokens` of a forming model call",
    )
    memory_context_tokens: int = Field(
        default=1500,
        ge=100,
        le=100_000,
        description="the conversation's summary and recent turns given with an exchange, "
        "in tokens at most",
    )
    memory_similar: int = Field(
        default=5,
        ge=1,
        le=20,
        description="the existing memories of the same scope shown with each candidate "
        "fact, the most similar first",
    )
    memory_max_attempts: int = Field(
        default=5,
        ge=1,
        le=100,
        description="attempts of a forming job whose model or context could not be reached "
        "before it is recorded FAILED",
    )
    memory_paused_retry_s: float = Field(
        default=300.0,
        ge=1,
        le=86_400,
        description="how often forming paused at a budget's cap tries again (a change of "
        "the workspace's budgets wakes it at once)",
    )
    memory_consolidate_delay_s: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="how long after forming in a workspace its memory is consolidated "
        "(near-duplicates merged, expired items retired)",
    )
    memory_max_items_per_scope: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="the largest `max_items` an assistant's memory policy may set (keep it "
        "at most `SWITCHBOARD_CONTEXT_MAX_MEMORY_ITEMS`)",
    )
