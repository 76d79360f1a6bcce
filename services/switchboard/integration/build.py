"""The integration service as a process builds it: the hub, its breakers and webhooks.

The hub is one per process (``integration_hub``): the integration service
serves it, and the dispatcher calls tools through it and shares its breakers
(an expert's circuit is one for runs and tools) even where the integration
service is not served.

Its webhook engine also delivers the A2A front door's push notifications, which
no service may import: the composition root plugs them in (``PUSH_NOTIFICATIONS``).
"""

from __future__ import annotations

from typing import Final

from switchboard.integration import servicer
from switchboard.integration.connect.connections import Limits
from switchboard.integration.connect.registry import (
    connector_factory,
    reserved_handler_ids,
    stdio_servers,
)
from switchboard.integration.privacy import IntegrationEraser
from switchboard.integration.service import IntegrationHub
from switchboard.integration.settings import IntegrationSettings
from switchboard.integration.store import IntegrationStore
from switchboard.integration.webhooks.delivery import WebhookEngine, WebhookLimits
from switchboard.platform.events.erasure.store import INTEGRATION, ErasureStore
from switchboard.platform.events.erasure.worker import serve_part
from switchboard.platform.observe.metrics import Metrics
from switchboard.platform.process import Port, Shared, setting
from switchboard.platform.resilience.breaker import Breakers
from switchboard.platform.rpc.outbound.channels import RemoteHandlerSettings
from switchboard.platform.rpc.server import ServiceRegistration
from switchboard.platform.security.egress import EgressPolicy, EgressSettings
from switchboard.shared import PushNotifications

#: The A2A front door's push configs, which the webhook engine delivers (``a2a/push/``).
PUSH_NOTIFICATIONS: Final = Port[PushNotifications]("the A2A push notifications")


def integration_limits(settings: IntegrationSettings, egress: EgressPolicy) -> Limits:
    return Limits(
        max_per_workspace=settings.integration_max_per_workspace,
        max_config_bytes=settings.integration_max_config_bytes,
        default_call_timeout_s=settings.integration_default_call_timeout_s,
        max_call_timeout_s=settings.integration_max_call_timeout_s,
        max_result_bytes=settings.integration_max_result_bytes,
        tool_calls_per_minute=settings.integration_tool_calls_per_minute,
        probe_interval_s=settings.integration_probe_interval_s,
        allow_plain_http=egress.allow_loopback or egress.allow_private,
        secret_overlap_s=settings.webhook_secret_overlap_s,
    )


async def integration_hub(shared: Shared) -> IntegrationHub:
    """The process's one hub, with its breakers, sealed credentials and egress policy."""

    async def make() -> IntegrationHub:
        hub = await _open_hub(shared)
        if shared.metrics is not None:
            _observe(shared.metrics, hub.breakers)
        return hub

    return await shared.part(IntegrationHub, make)


async def _open_hub(shared: Shared) -> IntegrationHub:
    settings, database, resources = (
        shared.section(IntegrationSettings),
        shared.database,
        shared.resources,
    )
    kernel = shared.settings
    with setting("SWITCHBOARD_EGRESS_ALLOW_CIDRS"):
        egress = EgressPolicy.from_settings(shared.section(EgressSettings))
    with setting("SWITCHBOARD_INTEGRATION_MCP_STDIO_SERVERS"):
        stdio = stdio_servers(settings)
    breakers = Breakers(
        kernel.redis_url.get_secret_value(),
        failures=settings.integration_breaker_failures,
        reset_s=settings.integration_breaker_reset_s,
        timeout_s=kernel.redis_timeout_s,
    )
    await breakers.start()
    resources.push_async_callback(breakers.close)
    hub: IntegrationHub | None = None

    def tools_changed(name: str) -> None:
        if hub is not None:
            hub.tools_changed(name)

    secrets = shared.secret_box
    hub = IntegrationHub(
        IntegrationStore(database),
        shared.bus,
        shared.cache,
        breakers,
        secrets,
        egress,
        shared.page_tokens,
        integration_limits(settings, egress),
        connector_factory(settings, egress, stdio, tools_changed, secrets=secrets),
        stdio_servers=frozenset(stdio),
        reserved_handler_ids=reserved_handler_ids(shared.section(RemoteHandlerSettings)),
        metrics=shared.metrics,
    )
    await hub.start(probe="integration" in kernel.services)
    resources.push_async_callback(hub.close)
    if "integration" in kernel.services:
        # Deliveries run where the hub is served; every replica feeds and sends,
        # and the database decides which one does each (integration/webhooks/delivery.py).
        webhooks = WebhookEngine(
            database,
            shared.bus,
            secrets,
            egress,
            breakers,
            WebhookLimits.from_settings(settings),
            instance_id=shared.instance_id,
            on_disable=hub.disable,
            page_tokens=shared.page_tokens,
            push=shared.plugged(PUSH_NOTIFICATIONS),
        )
        hub.webhooks = webhooks
        hub.webhook_health = webhooks.health
        await webhooks.start()
        resources.push_async_callback(webhooks.close)
        serve_part(
            resources,
            database,
            shared.bus,
            INTEGRATION,
            IntegrationEraser(database, ErasureStore(database)),
            claimer=shared.instance_id,
        )
    return hub


def _observe(metrics: Metrics, breakers: Breakers) -> None:
    """Read the breakers' states at every scrape (docs/metrics.md)."""
    metrics.observe(
        "switchboard_breakers",
        lambda: [((state,), count) for state, count in breakers.counts().items()],
    )
    metrics.observe(
        "switchboard_breaker_transitions_total",
        lambda: [((state,), count) for state, count in breakers.transitions.items()],
    )


async def build(shared: Shared) -> ServiceRegistration:
    return ServiceRegistration(
        servicer.SERVICE,
        servicer.IntegrationServiceServicer(await integration_hub(shared), shared.access),
    )
