"""Typed settings, read once from the environment at start.

Every setting has the prefix ``SWITCHBOARD_`` (``SWITCHBOARD_PORT=0``). The
object is frozen and passed to constructors; nothing reads the environment
after start. Secrets are ``SecretStr`` so they never print in reprs or logs.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

#: The database drivers a URL may name (the database module opens them).
SQLITE_DRIVER: Final = "sqlite+aiosqlite"
POSTGRES_DRIVER: Final = "postgresql+asyncpg"

# Known-insecure values that are acceptable only in dev mode. A deployment
# that forgets to set a secret fails at start instead of running on these.
DEV_SECRET_KEY = "dev-only-insecure-secret-key-do-not-use-in-production"  # noqa: S105
MIN_SECRET_KEY_LENGTH = 32
MiB = 1024 * 1024
ALL_SERVICES = ("auth", "context", "dispatcher", "integration", "events", "a2a")
PREFIX = "SWITCHBOARD_"
#: SWITCHBOARD_* variables that are not settings of the server but are read by
#: the tools around it (tests/e2e/procs.py finds grpcurl through the first; the
#: browser test writes its screenshot where the second says).
NOT_SETTINGS = frozenset({"SWITCHBOARD_TOOLS_BIN", "SWITCHBOARD_TEST_ARTIFACTS"})
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: An A2A tenant: a workspace id and an assistant id (``a2a/mapping.py``).
_TENANT: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\.[a-z0-9][a-z0-9-]{0,62}")
# A gRPC target: host:port (IPv6 in brackets), or a resolver scheme gRPC knows.
_GRPC_TARGET = re.compile(
    r"(?:(?:dns|ipv4|ipv6|unix|unix-abstract|vsock):\S+)|(?:\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}"
)


class ConfigError(Exception):
    """The settings are unusable; the process must not start."""


def parse_remotes(text: str) -> list[tuple[str, str]]:
    """``SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS`` (``id=host:port,...``) as (id, address)
    pairs; ValueError if malformed. Here, with the settings, because both the dispatcher
    and the integration hub read it."""
    found: list[tuple[str, str]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        handler_id, sep, address = item.partition("=")
        host, colon, port = address.strip().rpartition(":")
        if not sep or not colon or not host or not port.isdigit():
            raise ValueError(f"remote handler {item!r}: expected id=host:port")
        found.append((handler_id.strip(), address.strip()))
    return found


class Settings(BaseSettings):
    """All configuration of a Switchboard process."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    # Where and how to listen.
    host: str = Field(default="127.0.0.1", description="Address to bind.")
    port: int = Field(default=50051, ge=0, le=65535, description="Port; 0 picks a free one.")
    dev_mode: bool = Field(
        default=False,
        description="Development mode: allows built-in insecure secrets, with loud warnings.",
    )
    services: Annotated[tuple[str, ...], NoDecode] = Field(
        default=ALL_SERVICES,
        description="Services this process serves, comma-separated; all by default.",
    )

    # Secrets.
    secret_key: SecretStr = Field(
        default=SecretStr(""),
        description="Server secret (signs page tokens and internal state); >= 32 chars.",
    )

    # Storage and cache. URLs are secrets: they may carry passwords.
    database_url: SecretStr = Field(
        default=SecretStr("sqlite+aiosqlite:///switchboard.db"),
        description="SQLAlchemy async URL: sqlite+aiosqlite:///file.db or postgresql+asyncpg://...",
    )
    database_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="Connect and statement timeout for the database."
    )
    database_auto_migrate: bool = Field(
        default=True, description="Apply pending migrations at start (else `switchboard migrate`)."
    )
    redis_url: SecretStr = Field(
        default=SecretStr(""),
        description="redis://host:port/db; empty runs on the in-memory cache (one process only).",
    )
    redis_timeout_s: float = Field(
        default=0.25, gt=0, le=5, description="Bound on every Redis command and connect."
    )
    redis_lease_s: float = Field(
        default=0.75,
        gt=0,
        le=30,
        description="How long a process trusts its revocation cache after Redis last answered.",
    )

    # Event log and subscriptions.
    events_retention: int = Field(
        default=100_000, ge=100, le=100_000_000, description="Events the log keeps (newest)."
    )
    events_retention_s: int = Field(
        default=86_400, ge=60, le=365 * 86_400, description="Oldest event age the log keeps."
    )
    events_memory: int = Field(
        default=10_000,
        ge=10,
        le=1_000_000,
        description="Newest events each process also keeps in memory for fast replay.",
    )
    events_stream_key: str = Field(
        default="switchboard:events",
        min_length=1,
        max_length=200,
        description="Redis Stream key of the shared log (scaled out).",
    )
    events_outbox_limit: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="Events a process holds while Redis is away; beyond it publishing fails.",
    )
    events_dedupe_window_s: int = Field(
        default=300,
        ge=10,
        le=86_400,
        description="How long Redis remembers an event id, so a retried publish lands once.",
    )
    events_heartbeat_s: float = Field(
        default=15.0, gt=0, le=3600, description="Heartbeat interval on idle event streams."
    )
    events_reauthorize_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="How often a live subscription re-checks its credential and access.",
    )
    events_subscriber_buffer: int = Field(
        default=1_000,
        ge=1,
        le=1_000_000,
        description="Events queued per subscriber before it is ended as too slow.",
    )
    events_max_batch: int = Field(
        default=256, ge=1, le=10_000, description="Most events coalesced into one message."
    )
    events_max_scopes: int = Field(default=16, ge=1, le=1_000, description="Scopes per request.")
    events_max_subscriptions_per_principal: int = Field(default=64, ge=1, le=1_000_000)
    events_max_subscriptions_per_stream: int = Field(default=32, ge=1, le=10_000)

    # The context service: every size and count has a limit.
    context_max_message_bytes: int = Field(
        default=256 * 1024, ge=1024, le=4 * MiB, description="Serialized size of one message."
    )
    context_max_message_parts: int = Field(default=64, ge=1, le=10_000)
    context_max_metadata_bytes: int = Field(default=16 * 1024, ge=256, le=1 * MiB)
    context_max_memory_chars: int = Field(default=8 * 1024, ge=64, le=1 * MiB)
    context_max_members: int = Field(default=1000, ge=1, le=1_000_000)
    context_max_owned_workspaces: int = Field(default=100, ge=1, le=1_000_000)
    context_max_conversations: int = Field(
        default=10_000, ge=1, le=100_000_000, description="Per workspace, deleted ones included."
    )
    context_max_memory_items: int = Field(
        default=10_000,
        ge=1,
        le=100_000_000,
        description="Per scope (user, workspace, conversation).",
    )
    context_max_pinned: int = Field(
        default=50, ge=0, le=10_000, description="Pinned items per scope."
    )
    context_max_window_tokens: int = Field(default=1_000_000, ge=1, le=100_000_000)
    context_relevant_limit: int = Field(
        default=10, ge=0, le=100, description="Relevant memory items a window considers."
    )
    context_auto_prune_messages: int = Field(
        default=5000, ge=0, description="Live messages that trigger automatic pruning (0: off)."
    )
    context_auto_prune_tokens: int = Field(
        default=0, ge=0, description="Live message tokens that trigger automatic pruning (0: off)."
    )
    context_summary_tokens: int = Field(default=512, ge=16, le=100_000)
    context_tokenizer: str = Field(default="approx-v1", description="Token counter plugin.")
    context_summarizer: str = Field(default="extractive-v1", description="Summarizer plugin.")
    context_entity_extractor: str = Field(default="builtin-v1", description="Entity plugin.")
    context_window_cache_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    context_window_cache_bytes: int = Field(default=64 * MiB, ge=1 * MiB, le=16 * 1024 * MiB)
    context_window_cache_ttl_s: int = Field(default=600, ge=1, le=86_400)
    context_max_writes_per_minute: int = Field(
        default=6000, ge=1, le=10_000_000, description="Context writes per user per minute."
    )
    context_purge_after_s: int = Field(
        default=30 * 86_400, ge=60, description="Soft-deleted workspaces and conversations."
    )

    # The dispatcher: runs, routing, filters.
    context_address: str = Field(
        default="",
        description="host:port of ContextService for a dispatcher in another process "
        "(mesh shape); empty: this process's own.",
    )
    dispatcher_address: str = Field(
        default="",
        description="host:port of DispatcherService for an a2a front door in another process "
        "(mesh shape); empty: this process's own.",
    )
    advertise_address: str = Field(
        default="",
        description="host:port other replicas reach this process at (a dispatcher forwards "
        "CancelRun and SubmitToolApprovals to the replica running the run); default: "
        "SWITCHBOARD_HOST and the bound port, or the host name when bound to all addresses.",
    )
    public_url: str = Field(
        default="",
        max_length=256,
        description="The edge's URL as clients outside reach it (Envoy's listener): A2A "
        "agent cards name it, HTTP+JSON at the URL and gRPC at its host:port. "
        "http(s)://host[:port], no path. Empty: the public card names the scheme and host "
        "the request reached Envoy with; the extended card http://127.0.0.1:8080.",
    )
    a2a_root_agent: str = Field(
        default="",
        max_length=127,
        description="The A2A agent the edge's root Agent Card "
        "(/.well-known/agent-card.json) serves, as {workspace}.{assistant}; A2A requests "
        "that name no tenant go to it. Empty: no root agent (the root card is 404; every "
        "agent's card is at /{workspace}.{assistant}/.well-known/agent-card.json).",
    )
    instance_id: str = Field(
        default="",
        max_length=64,
        description="This dispatcher replica's stable id (owns its runs across restarts); "
        "default: the host name.",
    )
    dispatcher_max_running: int = Field(
        default=64, ge=1, le=100_000, description="Runs executing at once in this process."
    )
    dispatcher_max_running_per_workspace: int = Field(
        default=16, ge=1, le=100_000, description="Runs of one workspace executing at once."
    )
    dispatcher_max_queued: int = Field(
        default=1_000, ge=1, le=1_000_000, description="Runs waiting in this process."
    )
    dispatcher_max_queued_per_workspace: int = Field(
        default=200, ge=1, le=1_000_000, description="Runs of one workspace waiting."
    )
    dispatcher_default_timeout_s: float = Field(
        default=120.0, gt=0, le=86_400, description="A run's deadline when the request sets none."
    )
    dispatcher_max_timeout_s: float = Field(
        default=900.0, gt=0, le=86_400, description="Cap on a requested run timeout."
    )
    dispatcher_recovery: Literal["fail", "requeue"] = Field(
        default="fail",
        description="Runs that were RUNNING at a restart: fail (RUN_INTERRUPTED) or run again.",
    )
    dispatcher_lease_s: float = Field(
        default=30.0,
        ge=1.0,
        le=3600.0,
        description="A replica that stops renewing its lease this long has its runs taken over "
        "by another (recovered by SWITCHBOARD_DISPATCHER_RECOVERY).",
    )
    dispatcher_default_handler: str = Field(
        default="", description="Handler when no rule matches; default: llm if set up, else echo."
    )
    dispatcher_routes: str = Field(
        default="",
        description="Routing rules, comma-separated: /prefix=handler, type:mime/*=handler, "
        "workspace:<id>=handler.",
    )
    dispatcher_remote_handlers: str = Field(
        default="",
        description="Static remote handlers (HandlerService), comma-separated id=host:port.",
    )
    dispatcher_handler_plugins: bool = Field(
        default=True, description="Load handlers from the switchboard.handlers entry points."
    )
    dispatcher_max_input_chars: int = Field(
        default=32_000, ge=1, le=4 * MiB, description="Text characters in one sent message."
    )
    dispatcher_max_messages_per_minute_per_user: int = Field(
        default=600, ge=1, le=10_000_000, description="SendMessage calls per user per minute."
    )
    dispatcher_max_messages_per_minute_per_workspace: int = Field(
        default=6_000, ge=1, le=10_000_000, description="SendMessage calls per workspace."
    )
    dispatcher_content_policy: str = Field(
        default="builtin", description="Content policy plugin (builtin, entry point, module:attr)."
    )
    dispatcher_blocklist: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Blocked terms for the builtin policy, comma-separated (re:<regex> allowed).",
    )
    dispatcher_flag_injection: bool = Field(
        default=True, description="Flag common prompt-injection markers (the run proceeds)."
    )
    dispatcher_run_retention_s: float = Field(
        default=300.0, ge=0, description="How long a finished run's updates stay replayable."
    )
    dispatcher_max_updates_per_run: int = Field(
        default=10_000, ge=10, le=1_000_000, description="Updates kept per run for replay."
    )
    dispatcher_heartbeat_s: float = Field(
        default=15.0, gt=0, le=3600, description="WatchRun/Converse keep-alive interval."
    )
    dispatcher_remote_timeout_s: float = Field(
        default=5.0, gt=0, le=600, description="Connect/capabilities timeout for remote handlers."
    )
    dispatcher_max_tool_steps: int = Field(
        default=8, ge=1, le=32, description="Tool steps per run unless its assistant says fewer."
    )
    dispatcher_max_tool_calls_per_step: int = Field(
        default=16, ge=1, le=128, description="Tool calls one model answer may make."
    )
    dispatcher_approval_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=7 * 86400,
        description="How long a run waits for tool approvals (its own deadline stops meanwhile).",
    )
    dispatcher_max_tool_result_chars: int = Field(
        default=16_000, ge=100, le=1_000_000, description="Tool output given to the model."
    )
    dispatcher_max_assistants_per_workspace: int = Field(
        default=100, ge=1, le=10_000, description="Assistants one workspace may define."
    )

    # The LLM handler (OpenAI-compatible Chat Completions). Off unless a base URL is set.
    llm_base_url: str = Field(default="", description="e.g. https://api.openai.com/v1")
    llm_api_key: SecretStr = Field(default=SecretStr(""), description="Bearer key, if needed.")
    llm_model: str = Field(default="", description="Model of the primary provider.")
    llm_fallbacks: SecretStr = Field(
        default=SecretStr(""),
        description='JSON list of fallback providers [{"name","base_url","api_key","model"}].',
    )
    llm_prices: str = Field(
        default="",
        description='JSON price table {"model": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}.',
    )
    llm_max_retries: int = Field(default=3, ge=0, le=20, description="Retries per provider.")
    llm_breaker_failures: int = Field(
        default=5, ge=1, le=1000, description="Failures in a row that open a provider's breaker."
    )
    llm_breaker_reset_s: float = Field(
        default=30.0, gt=0, le=3600, description="Open breaker's wait before a trial call."
    )
    llm_max_output_tokens: int = Field(default=1024, ge=1, le=1_000_000)
    llm_max_connections: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Model connections open at once, over all providers: at most this many "
        "llm runs stream at a time (keep it at least SWITCHBOARD_DISPATCHER_MAX_RUNNING).",
    )

    # The integration hub (integration/): quotas, calls, probes, breakers, webhooks.
    integration_max_per_workspace: int = Field(
        default=50, ge=1, le=10_000, description="Integrations per workspace."
    )
    integration_max_config_bytes: int = Field(
        default=16_384, ge=256, le=1_048_576, description="Serialized size of one config."
    )
    integration_default_call_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Call timeout when an integration sets none."
    )
    integration_max_call_timeout_s: float = Field(
        default=300.0, gt=0, le=3600, description="Cap on any integration's call timeout."
    )
    integration_max_result_bytes: int = Field(
        default=1_048_576, ge=1024, le=64 * 1_048_576, description="Largest tool result kept."
    )
    integration_tool_calls_per_minute: int = Field(
        default=600, ge=1, le=1_000_000, description="InvokeTool calls per workspace per minute."
    )
    integration_probe_interval_s: float = Field(
        default=30.0, gt=0, le=3600, description="Health probe interval (with jitter)."
    )
    integration_breaker_failures: int = Field(
        default=5, ge=1, le=1000, description="Failures in a row that open a circuit."
    )
    integration_breaker_reset_s: float = Field(
        default=30.0, gt=0, le=3600, description="Open circuit's wait before a trial call."
    )
    integration_mcp_stdio_servers: str = Field(
        default="",
        description='Operator-configured stdio MCP servers, JSON {"id": {"command": [...], '
        '"env": {...}}}; an API call never starts a process.',
    )
    egress_allow_loopback: bool = Field(
        default=False, description="Let integrations reach loopback addresses (dev and tests)."
    )
    egress_allow_private: bool = Field(
        default=False, description="Let integrations reach private and link-local networks."
    )
    egress_allow_cidrs: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="Comma-separated networks allowed despite the rules above."
    )
    webhook_timeout_s: float = Field(
        default=15.0, gt=0, le=300, description="One webhook delivery attempt's timeout."
    )
    webhook_max_attempts: int = Field(
        default=12, ge=1, le=100, description="Attempts before a delivery is failed."
    )
    webhook_disable_after_s: float = Field(
        default=86_400.0,
        gt=0,
        le=30 * 86_400,
        description="An endpoint failing without a success this long is disabled.",
    )
    webhook_secret_overlap_s: float = Field(
        default=86_400.0,
        ge=0,
        le=30 * 86_400,
        description="After a secret rotation, how long the previous secret also signs.",
    )

    # Identity: tokens, sessions, keys.
    auth_issuer: str = Field(default="switchboard", min_length=1, description="JWT `iss`.")
    auth_audience: str = Field(default="switchboard", min_length=1, description="JWT `aud`.")
    access_token_ttl_s: int = Field(default=900, ge=60, le=86_400)
    refresh_token_ttl_s: int = Field(default=30 * 86_400, ge=300, le=365 * 86_400)
    signing_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Ed25519 PEM files, comma-separated, named <kid>.pem; the first signs. "
        "Required outside dev mode.",
    )
    token_cache_size: int = Field(default=10_000, ge=0, le=1_000_000)
    max_sessions_per_user: int = Field(default=100, ge=1, le=10_000)
    max_api_keys_per_user: int = Field(default=50, ge=1, le=10_000)
    password_hash_threads: int = Field(default=2, ge=1, le=64)
    password_hash_max_pending: int = Field(default=64, ge=1, le=10_000)

    # Federated login (all three or none).
    oidc_issuer: str = Field(default="", description="Accepted ID-token issuer (exact `iss`).")
    oidc_audience: str = Field(default="", description="Our client id at that issuer (`aud`).")
    oidc_jwks_file: str = Field(default="", description="The issuer's JWKS, as a JSON file.")

    # Abuse limits on Login (fixed windows). A failed password counts for its
    # account from that address and for the account as a whole; the owner's
    # correct password from an address that is not throttled still signs in.
    login_window_s: int = Field(default=900, ge=1, le=86_400)
    login_max_failures_per_account_address: int = Field(
        default=10,
        ge=1,
        le=100_000,
        description="Failed sign-ins to one account from one address (IPv6: its /64).",
    )
    login_max_failures_per_account: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="Failed sign-ins to one account from all addresses together.",
    )
    login_max_attempts_per_address: int = Field(
        default=100, ge=1, le=1_000_000, description="Sign-in attempts from one address."
    )

    # Logging.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    # Metrics (docs/metrics.md): Prometheus text on a port of its own.
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of the Prometheus endpoint (/metrics); unset: off; 0 picks a free one.",
    )
    metrics_host: str = Field(
        default="127.0.0.1", min_length=1, description="Address the metrics endpoint binds."
    )

    # The edge.
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Comma-separated networks of proxies (Envoy) whose x-forwarded-for names "
        "the client; from any other peer the header is ignored.",
    )

    # Transport limits. Each exists so that one client cannot exhaust the process.
    max_receive_message_bytes: int = Field(default=4 * MiB, ge=1024, le=64 * MiB)
    max_send_message_bytes: int = Field(default=4 * MiB, ge=1024, le=64 * MiB)
    max_metadata_bytes: int = Field(default=16 * 1024, ge=1024, le=1 * MiB)
    max_concurrent_streams: int = Field(default=100, ge=1, le=10_000)
    max_concurrent_rpcs: int = Field(
        default=10_000,
        ge=1,
        le=100_000,
        description="Calls in flight per process, open streams included (a Subscribe holds one).",
    )
    keepalive_time_s: float = Field(default=60.0, gt=0)
    keepalive_timeout_s: float = Field(default=20.0, gt=0)
    keepalive_min_client_ping_interval_s: float = Field(
        default=30.0, gt=0, description="Client pings more often than this earn strikes."
    )
    keepalive_max_ping_strikes: int = Field(default=2, ge=0)
    max_connection_idle_s: float = Field(default=3600.0, gt=0)
    max_connection_age_s: float = Field(default=0.0, ge=0, description="0 disables.")
    max_connection_age_grace_s: float = Field(default=30.0, ge=0)

    # The interpreter.
    gc_threshold: Annotated[tuple[int, int, int], NoDecode] = Field(
        default=(100_000, 50, 1_000),
        description="Cyclic GC thresholds (gen0,gen1,gen2); CPython's are 700,10,10.",
    )
    switch_interval_ms: float = Field(
        default=0.5,
        ge=0.1,
        le=100.0,
        description="How long a busy thread holds the interpreter before a waiting one gets it.",
    )

    # Shutdown.
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="How long in-flight calls may finish after SIGTERM."
    )
    shutdown_drain_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="Time between health NOT_SERVING and refusing new calls, for load balancers.",
    )

    @field_validator(
        "services",
        "signing_keys",
        "dispatcher_blocklist",
        "egress_allow_cidrs",
        "trusted_proxies",
        mode="before",
    )
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("gc_threshold", mode="before")
    @classmethod
    def _split_ints(cls, value: object) -> object:
        if isinstance(value, str):
            parts = tuple(part.strip() for part in value.split(","))
            if len(parts) != 3:
                raise ValueError("expected three comma-separated integers (gen0,gen1,gen2)")
            return parts
        return value

    @field_validator("gc_threshold")
    @classmethod
    def _valid_thresholds(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(n < 0 for n in value) or value[0] == 0:
            raise ValueError("three non-negative integers, the first above 0 (0 disables GC)")
        return value

    @field_validator("services")
    @classmethod
    def _known_services(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(ALL_SERVICES))
        if unknown:
            raise ValueError(f"unknown services {unknown}; choose from {list(ALL_SERVICES)}")
        if not value:
            raise ValueError("at least one service must be served")
        # Keep a stable order and drop duplicates.
        return tuple(name for name in ALL_SERVICES if name in value)

    # The URLs are secrets: no message here quotes them.
    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr) -> SecretStr:
        try:
            driver = make_url(value.get_secret_value()).drivername
        except (ArgumentError, ValueError):
            raise ValueError("not a valid database URL") from None
        if driver not in (SQLITE_DRIVER, POSTGRES_DRIVER):
            raise ValueError(
                f"unsupported scheme {driver!r}; use {SQLITE_DRIVER}:///path/to/file.db or "
                f"{POSTGRES_DRIVER}://user:password@host:5432/database"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if not url:
            return value
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError("not a valid Redis URL (the port must be a number)") from None
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError(
                "must start with redis://, rediss:// or unix:// "
                "(redis://host:6379/0; empty for the in-memory cache)"
            )
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("has no host (redis://host:6379/0)")
        return value

    @field_validator("context_address", "dispatcher_address", "advertise_address")
    @classmethod
    def _grpc_target(cls, value: str) -> str:
        if value and not _GRPC_TARGET.fullmatch(value):
            raise ValueError("expected host:port (or a gRPC target such as dns:///host:port)")
        return value

    @field_validator("a2a_root_agent")
    @classmethod
    def _a2a_root_agent(cls, value: str) -> str:
        if value and not _TENANT.fullmatch(value):
            raise ValueError(
                "expected {workspace}.{assistant}, the tenant A2A names the agent by (acme.helper)"
            )
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if not value:
            return value
        try:
            parts = urlsplit(value)
            # .port raises for a port that is not a number.
            _ = parts.port
        except ValueError:
            raise ValueError("not a valid URL (http(s)://host[:port])") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected http(s)://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError(
                "expected http(s)://host[:port] without a path, query or user: A2A's "
                "HTTP+JSON paths start at the edge's root"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_secrets(self) -> Settings:
        key = self.secret_key.get_secret_value()
        # Report every problem at once: fixing them one restart at a time is tedious.
        problems = []
        oidc = (self.oidc_issuer, self.oidc_audience, self.oidc_jwks_file)
        if any(oidc) and not all(oidc):
            problems.append(
                "SWITCHBOARD_OIDC_ISSUER, SWITCHBOARD_OIDC_AUDIENCE and "
                "SWITCHBOARD_OIDC_JWKS_FILE must be set together"
            )
        problems.extend(self._llm_problems())
        # A secret that is set must be strong in every mode: dev mode allows the
        # built-in one (left unset), not a weak one that might reach production.
        if key and key != DEV_SECRET_KEY and len(key) < MIN_SECRET_KEY_LENGTH:
            problems.append(
                f"SWITCHBOARD_SECRET_KEY must be at least {MIN_SECRET_KEY_LENGTH} characters"
                + (" (leave it unset in dev mode for the built-in one)" if self.dev_mode else "")
            )
        if self.dev_mode:
            if problems:
                raise ValueError("; ".join(problems))
            return self
        if not key:
            problems.append(
                "SWITCHBOARD_SECRET_KEY is required outside dev mode "
                "(set SWITCHBOARD_DEV_MODE=true for local development)"
            )
        elif key == DEV_SECRET_KEY:
            problems.append("SWITCHBOARD_SECRET_KEY is the built-in dev key; refusing to start")
        if not self.signing_keys:
            problems.append(
                "SWITCHBOARD_SIGNING_KEYS is required outside dev mode "
                "(Ed25519 PEM files; `switchboard keygen` makes one)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _llm_problems(self) -> list[str]:
        # Half an LLM configuration used to be ignored without a word: the
        # operator believed the model was on while every run was echoed.
        if bool(self.llm_base_url) != bool(self.llm_model):
            missing = "SWITCHBOARD_LLM_MODEL" if self.llm_base_url else "SWITCHBOARD_LLM_BASE_URL"
            return [
                "SWITCHBOARD_LLM_BASE_URL and SWITCHBOARD_LLM_MODEL must be set together "
                f"({missing} is missing)"
            ]
        if self.llm_base_url:
            return []
        orphans = [
            f"SWITCHBOARD_{name.upper()}"
            for name in ("llm_api_key", "llm_fallbacks", "llm_prices")
            if _text(getattr(self, name))
        ]
        if orphans:
            verb = "needs" if len(orphans) == 1 else "need"
            return [
                f"{', '.join(orphans)} {verb} SWITCHBOARD_LLM_BASE_URL and SWITCHBOARD_LLM_MODEL "
                "(the language model is off without them)"
            ]
        return []

    def effective_secret_key(self) -> str:
        """The secret in force: the configured one, or the dev key in dev mode."""
        key = self.secret_key.get_secret_value()
        if not key and self.dev_mode:
            return DEV_SECRET_KEY
        return key

    def insecure_defaults_in_use(self) -> list[str]:
        """Names of settings running on built-in dev values (for start-up warnings)."""
        insecure: list[str] = []
        if self.effective_secret_key() == DEV_SECRET_KEY:
            insecure.append("SWITCHBOARD_SECRET_KEY")
        if not self.signing_keys:
            insecure.append("SWITCHBOARD_SIGNING_KEYS")
        return insecure


def _text(value: object) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def known_variables() -> frozenset[str]:
    """Every environment variable that is a setting."""
    return frozenset(PREFIX + name.upper() for name in Settings.model_fields)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message per ``SWITCHBOARD_*`` variable that is no setting, with the nearest name.

    pydantic-settings ignores them, so a misspelt variable would silently
    leave its setting at the default (a limit, a timeout, a secret).
    """
    known = known_variables()
    problems = []
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith(PREFIX) or name in known or name in NOT_SETTINGS:
            continue
        # Compared without the prefix, which every name shares and would make all alike.
        close = difflib.get_close_matches(
            name.removeprefix(PREFIX), [k.removeprefix(PREFIX) for k in known], n=1, cutoff=0.6
        )
        hint = f"; did you mean {PREFIX}{close[0]}?" if close else ""
        problems.append(f"{variable} is not a setting{hint}")
    return problems


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, with explicit overrides (CLI flags) on top.

    ConfigError names every bad variable at once and never quotes a value.
    """
    problems = unknown_variables(os.environ)
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            # gc_threshold.2 is the third item of SWITCHBOARD_GC_THRESHOLD.
            field, _, item = where.partition(".")
            name = f"{PREFIX}{field.upper()}" + (
                f" (item {int(item) + 1})" if item.isdigit() else ""
            )
            problems.append(f"{name}: {message}" if field else message)
    else:
        if not problems:
            return settings
    raise ConfigError("; ".join(problems))
