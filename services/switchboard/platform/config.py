"""The kernel's settings, and what every section of the settings is made of.

Every setting is an environment variable with the prefix ``SWITCHBOARD_``
(``SWITCHBOARD_PORT=0``), read once at start into frozen sections that are
passed to constructors; nothing reads the environment after start. Secrets are
``SecretStr`` so they never print in reprs or logs.

This module holds the kernel's section, ``KernelSettings``: what every process
reads, whatever it serves (where it listens, dev mode, the database, Redis, the
secrets and keys every process verifies tokens with, the event log, logging,
metrics, the limits every server shares). Each service has a section of its own
in its package (``dispatcher/settings.py``...), a setting two services read a
section beside the platform part they read it for (``EgressSettings``,
``PeerSettings``, ``RemoteHandlerSettings``), and ``switchboard/settings.py``
composes them all (docs/decisions.md, entry 48). A field's description is its
row in the README's configuration table (``make docs`` writes it).
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict
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
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
#: The key of a field's ``json_schema_extra`` that the README's default column shows
#: instead of the default itself (``shown``).
SHOWN_DEFAULT: Final = "shown_default"
# A gRPC target: host:port (IPv6 in brackets), or a resolver scheme gRPC knows.
_GRPC_TARGET = re.compile(
    r"(?:(?:dns|ipv4|ipv6|unix|unix-abstract|vsock):\S+)|(?:\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}"
)


class ConfigError(Exception):
    """The settings are unusable; the process must not start."""


def shown(text: str) -> JsonDict:
    """A field's ``json_schema_extra``: what the README's default column says for a default
    that says little by itself (an empty value that means something, a computed one)."""
    return {SHOWN_DEFAULT: text}


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _grpc_target(value: str) -> str:
    if value and not _GRPC_TARGET.fullmatch(value):
        raise ValueError("expected host:port (or a gRPC target such as dns:///host:port)")
    return value


#: A comma-separated list in the environment, a tuple in the section.
CommaSeparated = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_csv)]
#: ``host:port`` or a gRPC target such as ``dns:///host:port``; empty allowed.
GrpcTarget = Annotated[str, AfterValidator(_grpc_target)]


class Section(BaseSettings):
    """One section of the settings: each field is the variable ``SWITCHBOARD_<FIELD>``.

    Field names are the whole variable name, so a variable is found by its name in
    code; no two sections may share one (``switchboard/settings.py`` checks).
    """

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )


_S = TypeVar("_S", bound=Section)


class Sections(Protocol):
    """A process's settings by section (``switchboard/settings.py`` composes them): each
    service asks for its own, and for those it shares with another."""

    def section(self, kind: type[_S]) -> _S: ...


def problems(exc: ValidationError) -> list[str]:
    """One message per error, naming the variable and never quoting its value."""
    found = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        # gc_threshold.2 is the third item of SWITCHBOARD_GC_THRESHOLD.
        field, _, item = where.partition(".")
        name = f"{PREFIX}{field.upper()}" + (f" (item {int(item) + 1})" if item.isdigit() else "")
        found.append(f"{name}: {message}" if field else message)
    return found


class KernelSettings(Section):
    """What every Switchboard process reads, whatever it serves."""

    # Where and how to listen.
    host: str = Field(
        default="127.0.0.1",
        description="address to bind (`0.0.0.0` or `::` for all interfaces)",
    )
    port: int = Field(
        default=50051,
        ge=0,
        le=65535,
        description="port to bind; `0` picks a free one, and the bound address is logged",
    )
    dev_mode: bool = Field(
        default=False,
        description="development mode: accepts the built-in insecure secret and logs a loud "
        "warning",
    )
    services: CommaSeparated = Field(
        default=ALL_SERVICES,
        description="services this process runs, comma-separated: "
        "`auth,context,dispatcher,integration,events,a2a` (`a2a` needs "
        "`dispatcher` and `context` in the same process: "
        "[docs/a2a.md](docs/a2a.md))",
        json_schema_extra=shown("all six"),
    )
    # Secrets.
    secret_key: SecretStr = Field(
        default=SecretStr(""),
        description="server secret, at least 32 characters: it peppers the stored hashes of "
        "refresh tokens and API keys and signs page tokens. Required outside dev "
        "mode; in dev mode leave it unset for the built-in one (a set one needs "
        "32 characters there too)",
        json_schema_extra=shown("none"),
    )
    signing_keys: CommaSeparated = Field(
        default=(),
        description="Ed25519 PEM files named `<kid>.pem`, comma-separated; the first signs "
        "access tokens, the rest still verify (rotation). Required outside dev "
        "mode; `switchboard keygen k1.pem` makes one. Dev mode without keys signs "
        "with a key it keeps beside the SQLite database "
        "(`<database>.dev-signing-key.pem`, owner-only; one per process on "
        "PostgreSQL or `:memory:`), with a warning",
        json_schema_extra=shown("none"),
    )
    # Storage and cache. URLs are secrets: they may carry passwords.
    database_url: SecretStr = Field(
        default=SecretStr("sqlite+aiosqlite:///switchboard.db"),
        description="SQLAlchemy async URL: `sqlite+aiosqlite:///path.db` or "
        "`postgresql+asyncpg://user:pass@host/db` (secret: never logged)",
    )
    database_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="connect and statement timeout for the database",
    )
    database_auto_migrate: bool = Field(
        default=True,
        description="apply pending migrations at start; set `false` and run `switchboard "
        "migrate` to control when (a process then refuses to start on an older "
        "schema)",
    )
    redis_url: SecretStr = Field(
        default=SecretStr(""),
        description="`redis://host:port/db`, or `redis+cluster://host:port` for a Redis "
        "Cluster (any one node); empty runs on the in-memory cache, which is right for one "
        "process only. Needed when several processes share a deployment (revocation, rate "
        "limits)",
    )
    redis_timeout_s: float = Field(
        default=0.25,
        gt=0,
        le=5,
        description="bound on every Redis command; past it the in-memory fallback answers",
    )
    redis_lease_s: float = Field(
        default=0.75,
        gt=0,
        le=30,
        description="a process trusts its revocation cache only this long after Redis last "
        "confirmed its subscription; a revocation that cannot be published waits "
        "this long before returning",
    )
    # The event log: every process publishes to it and keeps its open streams'
    # access current.
    events_retention: int = Field(
        default=100_000,
        ge=100,
        le=100_000_000,
        description="newest events the log keeps; older ones are trimmed (a cursor before "
        "them gets OUT_OF_RANGE)",
    )
    events_retention_s: int = Field(
        default=86_400,
        ge=60,
        le=365 * 86_400,
        description="events older than this are trimmed too",
    )
    events_memory: int = Field(
        default=10_000,
        ge=10,
        le=1_000_000,
        description="newest events each process also keeps in memory, for replays without "
        "storage reads",
    )
    events_stream_key: str = Field(
        default="switchboard:events",
        min_length=1,
        max_length=200,
        description="Redis Stream key of the shared log (with Redis)",
    )
    events_outbox_limit: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="events one process holds while Redis is unreachable; beyond it "
        "publishing fails with UNAVAILABLE",
    )
    events_dedupe_window_s: int = Field(
        default=300,
        ge=10,
        le=86_400,
        description="how long Redis remembers an event id, so a publish retried after an "
        "outage lands once",
    )
    events_reauthorize_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="how often a live subscription re-checks its credential and access (it "
        "also re-checks at once on membership and revocation events)",
    )
    # This replica in the deployment.
    advertise_address: GrpcTarget = Field(
        default="",
        description="`host:port` other replicas reach this process at: a dispatcher that gets "
        "`CancelRun`, `SubmitToolApprovals` or `SteerRun` for a run another replica runs "
        "forwards it there (Kubernetes: the pod IP)",
        json_schema_extra=shown(
            "`SWITCHBOARD_HOST` and the bound port (the host name when bound to `0.0.0.0`)"
        ),
    )
    instance_id: str = Field(
        default="",
        max_length=64,
        description="this dispatcher replica's stable id; it owns its runs across restarts, "
        "so every replica needs its own (a second live dispatcher process with "
        "the same id is refused at start)",
        json_schema_extra=shown("host name"),
    )
    # Verifying tokens: every process does it, whatever it serves.
    auth_issuer: str = Field(
        default="switchboard",
        min_length=1,
        description="`iss` of access tokens",
    )
    auth_audience: str = Field(
        default="switchboard",
        min_length=1,
        description="`aud` of access tokens",
    )
    access_token_ttl_s: int = Field(
        default=900,
        ge=60,
        le=86_400,
        description="access token lifetime (60 s to 1 day)",
    )
    token_cache_size: int = Field(
        default=10_000,
        ge=0,
        le=1_000_000,
        description="verified tokens, session states and API keys kept per process (each bounded)",
    )
    membership_cache_size: int = Field(
        default=10_000,
        ge=0,
        le=1_000_000,
        description="workspace roles (a user's in a workspace) kept per process for the access "
        "check of unary calls, exact while Redis confirms its invalidations; 0: none",
    )
    # Logging.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO",
        description="`DEBUG`, `INFO`, `WARNING` or `ERROR`",
    )
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="`json` (one object per line) or `text`",
    )
    # Metrics (docs/metrics.md): Prometheus text on a port of its own.
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="port of the Prometheus endpoint (`/metrics`, "
        "[docs/metrics.md](docs/metrics.md)); `0` picks a free one, and the bound "
        "port is logged; unset, nothing is recorded",
        json_schema_extra=shown("unset (off)"),
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="address the metrics endpoint binds",
    )
    # Transport limits. Each exists so that one client cannot exhaust the process.
    max_receive_message_bytes: int = Field(
        default=4 * MiB,
        ge=1024,
        le=64 * MiB,
        description="largest request message; a larger one gets `RESOURCE_EXHAUSTED`",
    )
    max_send_message_bytes: int = Field(
        default=4 * MiB,
        ge=1024,
        le=64 * MiB,
        description="largest response message",
    )
    max_metadata_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        le=1 * MiB,
        description="largest request metadata (headers); a larger one gets `RESOURCE_EXHAUSTED`",
    )
    max_concurrent_streams: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="HTTP/2 streams (calls) in flight per connection",
    )
    max_concurrent_rpcs: int = Field(
        default=10_000,
        ge=1,
        le=100_000,
        description="calls in flight per process, open streams included (each `Subscribe` "
        "holds one); beyond it calls get `RESOURCE_EXHAUSTED`. `switchboard "
        "envoy` sizes Envoy's circuit breakers from it",
    )
    keepalive_time_s: float = Field(
        default=60.0,
        gt=0,
        description="the server pings idle connections this often",
    )
    keepalive_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="and drops them if a ping goes unanswered this long",
    )
    keepalive_min_client_ping_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="client pings more frequent than this earn strikes",
    )
    keepalive_max_ping_strikes: int = Field(
        default=2,
        ge=0,
        description="strikes before the server sends GOAWAY (`too_many_pings`)",
    )
    max_connection_idle_s: float = Field(
        default=3600.0,
        gt=0,
        description="close connections that have had no calls this long",
    )
    max_connection_age_s: float = Field(
        default=0.0,
        ge=0,
        description="recycle connections after this long, to rebalance load (`0` = never)",
    )
    max_connection_age_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="time in-flight calls get when a connection is recycled",
    )
    # The interpreter.
    gc_threshold: Annotated[tuple[int, int, int], NoDecode] = Field(
        default=(100_000, 50, 1_000),
        description="cyclic garbage collector thresholds, applied with `gc.freeze()` after "
        "start-up (CPython's default is `700,10,10`; thousands of open streams "
        "make those collections long, see BENCHMARKS.md)",
    )
    switch_interval_ms: float = Field(
        default=0.5,
        ge=0.1,
        le=100.0,
        description="how long the event loop's thread may hold the interpreter while a "
        "database thread or gRPC's poller waits for it (`sys.setswitchinterval`, "
        "applied by `switchboard serve`; CPython's default is 5 ms, which a busy "
        "loop makes every SQLite statement of a write wait; decision 34)",
    )
    # Shutdown.
    shutdown_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="on SIGTERM/SIGINT, how long in-flight calls may finish",
    )
    shutdown_drain_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="time between health turning NOT_SERVING and the server refusing new "
        "calls (give load balancers time)",
    )

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
                "must start with redis://, rediss://, unix://, or redis+cluster:// or "
                "rediss+cluster:// for a Redis Cluster "
                "(redis://host:6379/0; empty for the in-memory cache)"
            )
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("has no host (redis://host:6379/0)")
        if parts.scheme.endswith("+cluster") and parts.path not in ("", "/", "/0"):
            raise ValueError("a Redis Cluster has only database 0 (redis+cluster://host:6379)")
        return value

    @model_validator(mode="after")
    def _check_secrets(self) -> KernelSettings:
        key = self.secret_key.get_secret_value()
        # Report every problem at once: fixing them one restart at a time is tedious.
        problems = []
        # A secret that is set must be strong in every mode: dev mode allows the
        # built-in one (left unset), not a weak one that might reach production.
        if key and key != DEV_SECRET_KEY and len(key) < MIN_SECRET_KEY_LENGTH:
            problems.append(
                f"SWITCHBOARD_SECRET_KEY must be at least {MIN_SECRET_KEY_LENGTH} characters"
                + (" (leave it unset in dev mode for the built-in one)" if self.dev_mode else "")
            )
        if not self.dev_mode:
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
