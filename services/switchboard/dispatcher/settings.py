"""The dispatcher's section: runs, routing, filters, tools, assistants, and its model.

The ``llm`` handler is the dispatcher's, so its ``SWITCHBOARD_LLM_*`` settings
are here too. The static remote experts are the platform's
``RemoteHandlerSettings`` (the integration hub keeps their ids from
integrations), and the context service's address is ``PeerSettings`` (the A2A
front door reaches it too). A new dispatcher setting is a field here, read in
``dispatcher/build.py``, and a row of the README that ``make docs`` writes.
"""

from __future__ import annotations

import json
from typing import Final, Literal

from pydantic import Field, SecretStr, model_validator

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
    schedules_max_per_workspace: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="schedules one workspace may hold (RESOURCE_EXHAUSTED `QUOTA_EXCEEDED` past "
        "it; docs/schedules.md)",
    )
    schedules_min_interval_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="the shortest `interval` a schedule may have (INVALID_ARGUMENT below it); "
        "cron schedules may fire every second",
    )
    schedules_missed_grace_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="a schedule's tick still unclaimed this long after it was due is missed: "
        "the schedule's `missed_tick_policy` decides (SKIP or RUN_ONCE)",
    )
    schedules_poll_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="how often each dispatcher replica looks for due schedule ticks, at most "
        "(sooner when the next tick is sooner, or a schedule changed here; up to four times "
        "that while none come due, never past the next tick)",
    )
    # The LLM handler (OpenAI-compatible Chat Completions). Off unless a base URL is set.
    llm_base_url: str = Field(
        default="",
        description="OpenAI-compatible API base, e.g. `https://api.openai.com/v1`; the `llm` "
        "handler exists only when this and the model are set; set both or "
        "neither, or the server refuses to start",
    )
    llm_api_key: SecretStr = Field(
        default=SecretStr(""),
        description="the provider's bearer key (a secret: never logged)",
    )
    llm_model: str = Field(
        default="",
        description="model of the primary provider",
    )
    llm_vision: bool = Field(
        default=False,
        description="the primary model sees images: messages' image files go to it as "
        "`image_url` parts (docs/files.md)",
    )
    llm_fallbacks: SecretStr = Field(
        default=SecretStr(""),
        description='JSON list of fallback providers, tried in order: `[{"name": "b", '
        '"base_url": "...", "api_key": "...", "model": "...", "vision": false}]` (a secret; '
        "`vision`: the model sees images)",
    )
    llm_prices: str = Field(
        default="",
        description='JSON price table in USD per million tokens: `{"gpt-4o-mini": '
        '{"input_per_mtok": 0.15, "output_per_mtok": 0.6}}`',
    )
    llm_max_retries: int = Field(
        default=3,
        ge=0,
        le=20,
        description="retries per provider on 429, 5xx and connection errors, before any text "
        "has streamed",
    )
    llm_breaker_failures: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="failed attempts in a row that open a provider's circuit breaker",
    )
    llm_breaker_reset_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="how long an open breaker waits before one trial call",
    )
    llm_max_output_tokens: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="cap on `max_tokens` asked of the model",
    )
    llm_min_output_tokens: int = Field(
        default=64,
        ge=1,
        le=1_000_000,
        description="near a budget's cap, a model call is made with `max_tokens` lowered to "
        "what the budget has room for while at least this many answer tokens fit (or its whole "
        "`max_tokens`, if smaller); below that the run pauses at the cap (docs/budgets.md)",
    )
    llm_max_connections: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="model connections open at once: at most this many llm runs stream at a time",
    )

    llm_image_policy: Literal["note", "refuse"] = Field(
        default="note",
        description="an image sent to a model without vision: `note` (a text note in its "
        "place) or `refuse` (the run fails `FAILED_PRECONDITION`, `MODALITY_UNSUPPORTED`)",
    )
    llm_max_image_bytes: int = Field(
        default=5 * MiB,
        ge=1024,
        le=64 * MiB,
        description="largest image sent to a vision model; a larger one is a text note",
    )
    llm_max_images: int = Field(
        default=16,
        ge=0,
        le=500,
        description="images sent in one model call (the newest); older ones are text notes",
    )

    voice_url: str = Field(
        default="",
        description="base URL of an OpenAI-compatible audio API (`/audio/transcriptions`, "
        "`/audio/speech`), for example `https://api.openai.com/v1`; empty: no speech "
        "(`Talk` and `SendMessage.speech` answer `SPEECH_NOT_CONFIGURED`); reached through the "
        "egress policy",
    )
    voice_api_key: SecretStr = Field(
        default=SecretStr(""),
        description="bearer key of the audio API",
    )
    voice_transcription_model: str = Field(
        default="whisper-1",
        max_length=256,
        description="transcription model of assistants whose `voice` names none",
    )
    voice_speech_model: str = Field(
        default="tts-1",
        max_length=256,
        description="speech model of assistants whose `voice` names none",
    )
    voice_voice: str = Field(
        default="alloy",
        max_length=64,
        description="voice of assistants whose `voice` names none",
    )
    voice_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="longest wait for one transcription or one sentence's speech",
    )
    voice_max_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="retries of an audio request that failed for a reason worth retrying "
        "(429, 5xx, a dropped connection)",
    )
    voice_max_turn_s: float = Field(
        default=60.0,
        ge=1,
        le=600,
        description="longest user turn in a voice session; a turn reaching it ends there",
    )
    voice_max_frame_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        le=1 * MiB,
        description="largest audio frame a voice session takes (`INVALID_ARGUMENT` above it)",
    )
    voice_idle_timeout_s: float = Field(
        default=30.0,
        ge=1,
        le=3600,
        description="a voice session that sends nothing this long ends with `DEADLINE_EXCEEDED` "
        "(`SESSION_IDLE`)",
    )
    voice_resume_window_s: float = Field(
        default=120.0,
        ge=1,
        le=86_400,
        description="how long a dropped voice session may be resumed (`TalkResume`)",
    )
    voice_max_sessions: int = Field(
        default=200,
        ge=1,
        le=100_000,
        description="voice sessions open at once in this process (`RESOURCE_EXHAUSTED` above)",
    )
    voice_max_sessions_per_user: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="voice sessions one user may hold open at once in this process",
    )
    voice_lead_ms: int = Field(
        default=400,
        ge=0,
        le=10_000,
        description="how far ahead of playback a run sends its speech: less stops speech sooner "
        "on barge-in, more rides out network jitter",
    )
    voice_turn_models: str = Field(
        default=".tools/models",
        description="the folder of the end-of-turn model (`smart-turn-v3.2-cpu.onnx`, put there "
        "by `make tools`); without it, voice turns end on silence alone",
    )

    webrtc_ice_servers: SecretStr = Field(
        default=SecretStr(""),
        description="STUN and TURN servers the server's WebRTC peers gather candidates with, as "
        'JSON: `[{"urls": "stun:stun.example.net:3478"}, {"urls": ["turn:turn.example.net:3478"], '
        '"username": "u", "credential": "p"}]` (at most 8); none: host candidates only, enough '
        "when browsers reach the server's address directly",
    )
    webrtc_turn_secret: SecretStr = Field(
        default=SecretStr(""),
        description="the secret shared with the TURN server (coturn's `static-auth-secret`): a "
        "TURN server listed without a username gets a credential minted per caller, valid for "
        "`SWITCHBOARD_WEBRTC_TURN_TTL_S` (the TURN REST API's scheme); empty: TURN servers "
        "need their own username and credential",
    )
    webrtc_turn_ttl_s: float = Field(
        default=3600.0,
        ge=60,
        le=86_400,
        description="how long a minted TURN credential is valid",
    )
    webrtc_ports: str = Field(
        default="",
        description="the UDP ports the server's WebRTC peers bind for media, as `low-high` "
        "(`40000-40099`, within 1024-65535; one port per connected peer and local address, so "
        "at least `SWITCHBOARD_WEBRTC_MAX_PEERS` of them); empty: any port the system picks",
    )
    webrtc_connect_timeout_s: float = Field(
        default=15.0,
        ge=1,
        le=120,
        description="how long a WebRTC peer may take to connect after its answer; one that does "
        "not is closed, and its session never starts",
    )
    webrtc_max_peers: int = Field(
        # A connected peer costs 30-58 ms of CPU a second while no one speaks, more while it
        # does, and a process runs on one core (docs/operations.md, "Live voice").
        default=12,
        ge=1,
        le=10_000,
        description="WebRTC peers (`ConnectTalk`) carried at once by this process "
        "(`RESOURCE_EXHAUSTED` above); each costs 30-58 ms of CPU a second even while no one "
        "speaks (docs/operations.md)",
    )
    webrtc_max_peers_per_user: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="WebRTC peers one user may hold at once in this process",
    )

    @model_validator(mode="after")
    def _check_ice(self) -> DispatcherSettings:
        ice_servers(_text(self.webrtc_ice_servers), minting=bool(_text(self.webrtc_turn_secret)))
        port_range(self.webrtc_ports)
        return self

    @model_validator(mode="after")
    def _check_llm(self) -> DispatcherSettings:
        # Half an LLM configuration used to be ignored without a word: the
        # operator believed the model was on while every run was echoed.
        if bool(self.llm_base_url) != bool(self.llm_model):
            missing = "SWITCHBOARD_LLM_MODEL" if self.llm_base_url else "SWITCHBOARD_LLM_BASE_URL"
            raise ValueError(
                "SWITCHBOARD_LLM_BASE_URL and SWITCHBOARD_LLM_MODEL must be set together "
                f"({missing} is missing)"
            )
        if self.llm_base_url:
            return self
        orphans = [
            f"SWITCHBOARD_{name.upper()}"
            for name in ("llm_api_key", "llm_fallbacks", "llm_prices")
            if _text(getattr(self, name))
        ]
        if orphans:
            verb = "needs" if len(orphans) == 1 else "need"
            raise ValueError(
                f"{', '.join(orphans)} {verb} SWITCHBOARD_LLM_BASE_URL and SWITCHBOARD_LLM_MODEL "
                "(the language model is off without them)"
            )
        return self


def _text(value: object) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


_ICE_SCHEMES: Final = ("stun:", "turn:", "turns:")


def ice_servers(text: str, *, minting: bool = False) -> list[dict[str, str | list[str]]]:
    """``SWITCHBOARD_WEBRTC_ICE_SERVERS`` read: each server's ``urls`` (a list), and its
    ``username`` and ``credential`` when given (a TURN server needs both unless ``minting``:
    a TURN secret mints them). ValueError says what is wrong, never the credential."""
    if not text.strip():
        return []
    try:
        given = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("SWITCHBOARD_WEBRTC_ICE_SERVERS is not JSON") from None
    if not isinstance(given, list) or len(given) > 8:
        raise ValueError("SWITCHBOARD_WEBRTC_ICE_SERVERS must be a JSON list of at most 8 servers")
    servers: list[dict[str, str | list[str]]] = []
    for i, item in enumerate(given):
        where = f"SWITCHBOARD_WEBRTC_ICE_SERVERS[{i}]"
        if not isinstance(item, dict) or set(item) - {"urls", "username", "credential"}:
            raise ValueError(f"{where} must be an object of urls, username and credential")
        urls = item.get("urls")
        urls = [urls] if isinstance(urls, str) else urls
        if (
            not isinstance(urls, list)
            or not 1 <= len(urls) <= 8
            or not all(isinstance(u, str) and u.startswith(_ICE_SCHEMES) for u in urls)
        ):
            raise ValueError(f"{where}.urls must be 1 to 8 stun:, turn: or turns: URLs")
        server: dict[str, str | list[str]] = {"urls": urls}
        for key in ("username", "credential"):
            if key in item:
                if not isinstance(item[key], str):
                    raise ValueError(f"{where}.{key} must be a string")
                server[key] = item[key]
        if ("username" in server) != ("credential" in server):
            raise ValueError(f"{where}: a username and a credential go together")
        if (
            any(u.startswith(("turn:", "turns:")) for u in urls)
            and "username" not in server
            and not minting
        ):
            raise ValueError(
                f"{where}: a TURN server needs a username and a credential, or "
                "SWITCHBOARD_WEBRTC_TURN_SECRET to mint them"
            )
        servers.append(server)
    return servers


def port_range(text: str) -> tuple[int, int] | None:
    """``SWITCHBOARD_WEBRTC_PORTS`` read: its first and last port, or None for any."""
    if not text.strip():
        return None
    low, sep, high = text.partition("-")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()):
        raise ValueError(
            f"SWITCHBOARD_WEBRTC_PORTS={text!r} is not two ports joined by a hyphen "
            "(like 40000-40099), nor empty (any port)"
        )
    first, last = int(low), int(high)
    if not 1024 <= first <= last <= 65535:
        raise ValueError(
            f"SWITCHBOARD_WEBRTC_PORTS={text!r} must lie within 1024-65535 and start at or "
            "below its end"
        )
    return first, last
