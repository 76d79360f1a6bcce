"""The event service as a process builds it: subscriptions over the process's bus.

The bus itself is every process's (``mesh.open_shared``): every service
publishes to it; this serves it to subscribers.
"""

from __future__ import annotations

from switchboard.events import servicer
from switchboard.events.subscriptions import Limits
from switchboard.platform.config import Settings
from switchboard.platform.rpc.server import ServiceRegistration
from switchboard.shared import Shared


def event_limits(settings: Settings) -> Limits:
    return Limits(
        heartbeat_s=settings.events_heartbeat_s,
        reauthorize_s=settings.events_reauthorize_s,
        buffer=settings.events_subscriber_buffer,
        max_batch=settings.events_max_batch,
        max_scopes=settings.events_max_scopes,
        per_principal=settings.events_max_subscriptions_per_principal,
        per_stream=settings.events_max_subscriptions_per_stream,
    )


async def build(settings: Settings, shared: Shared) -> ServiceRegistration:
    return ServiceRegistration(
        servicer.SERVICE,
        servicer.EventServiceServicer(
            shared.bus, shared.access, shared.policy, event_limits(settings), shared.page_tokens
        ),
        servicer.PRESERIALIZED,
    )
