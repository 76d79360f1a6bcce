"""The integration hub's section: quotas, calls, probes, breakers, stdio servers, webhooks.

Where outbound calls may go is the platform's ``EgressSettings``, and the static
experts' ids the hub keeps from integrations are ``RemoteHandlerSettings``: the
dispatcher reads both too.
"""

from __future__ import annotations

from pydantic import Field

from switchboard.platform.config import Section


class IntegrationSettings(Section):
    """What only the integration hub reads (``integration/build.py``), wherever it is built."""

    integration_max_per_workspace: int = Field(
        default=50,
        ge=1,
        le=10_000,
        description="integrations per workspace; more gets `RESOURCE_EXHAUSTED`",
    )
    integration_max_config_bytes: int = Field(
        default=16_384,
        ge=256,
        le=1_048_576,
        description="serialized size of one integration's `config`",
    )
    integration_default_call_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="call timeout of an integration that sets none",
    )
    integration_max_call_timeout_s: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="cap on any integration's `call_timeout` and any `InvokeTool` timeout",
    )
    integration_max_result_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=64 * 1_048_576,
        description="largest tool result returned; a larger one is `RESOURCE_EXHAUSTED`",
    )
    integration_tool_calls_per_minute: int = Field(
        default=600,
        ge=1,
        le=1_000_000,
        description="`InvokeTool` calls per workspace per minute",
    )
    integration_probe_interval_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="how often each integration's health is probed (with jitter); "
        "`0`: no probes, health stays unknown and only calls open circuits",
    )
    integration_breaker_failures: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="failed calls or probes in a row that open an integration's circuit",
    )
    integration_breaker_reset_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="how long an open circuit waits before trial calls",
    )
    integration_mcp_stdio_servers: str = Field(
        default="",
        description='operator-configured MCP servers over stdio, JSON `{"id": {"command": '
        '["node", "server.js"], "env": {}}}`; integrations name them as '
        "`stdio:<id>` (an API call never starts a process)",
    )
    # Webhook deliveries (integration/webhooks/delivery.py).
    webhook_timeout_s: float = Field(
        default=15.0,
        gt=0,
        le=300,
        description="one webhook delivery attempt's timeout",
    )
    webhook_max_attempts: int = Field(
        default=12,
        ge=1,
        le=100,
        description="attempts (exponential backoff with jitter) before a delivery is failed",
    )
    webhook_disable_after_s: float = Field(
        default=86_400.0,
        gt=0,
        le=30 * 86_400,
        description="an endpoint failing without a success this long is disabled, with an event",
    )
    webhook_secret_overlap_s: float = Field(
        default=86_400.0,
        ge=0,
        le=30 * 86_400,
        description="after a signing secret is rotated, how long deliveries are also signed "
        "with the previous one",
    )
