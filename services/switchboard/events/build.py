"""The event service as a process builds it: subscriptions over the process's bus.

The bus itself is every process's (``mesh.open_shared``): every service
publishes to it; this serves it to subscribers.
"""

from __future__ import annotations

from switchboard.events import servicer
from switchboard.events.history import History
from switchboard.events.settings import EventSettings
from switchboard.events.streams import Streams
from switchboard.events.subscriptions import Limits
from switchboard.platform.config import KernelSettings
from switchboard.platform.events.erasure.redaction import Redaction
from switchboard.platform.events.erasure.store import EVENTS, ErasureRecord, ErasureStore
from switchboard.platform.events.erasure.worker import serve_part
from switchboard.platform.process import Shared
from switchboard.platform.rpc.server import ServiceRegistration


def event_limits(settings: EventSettings, kernel: KernelSettings) -> Limits:
    return Limits(
        heartbeat_s=settings.events_heartbeat_s,
        # The kernel's: every process keeps its open streams' access current.
        reauthorize_s=kernel.events_reauthorize_s,
        buffer=settings.events_subscriber_buffer,
        max_batch=settings.events_max_batch,
        max_scopes=settings.events_max_scopes,
        per_principal=settings.events_max_subscriptions_per_principal,
        per_stream=settings.events_max_subscriptions_per_stream,
    )


async def build(shared: Shared) -> ServiceRegistration:
    limits = event_limits(shared.section(EventSettings), shared.settings)
    erasures = ErasureStore(shared.database)

    async def redact(erasure: ErasureRecord) -> None:
        # The last part: every other service has removed what it held, and named it.
        names = await erasures.names(erasure.id)
        await shared.bus.redact(Redaction(erasure.user_id, names, erasure.workspaces))
        await shared.database.checkpoint()

    serve_part(
        shared.resources, shared.database, shared.bus, EVENTS, redact, claimer=shared.instance_id
    )
    return ServiceRegistration(
        servicer.SERVICE,
        servicer.EventServiceServicer(
            Streams(bus=shared.bus, access=shared.access, limits=limits),
            History(
                bus=shared.bus, policy=shared.policy, limits=limits, page_tokens=shared.page_tokens
            ),
        ),
        servicer.PRESERIALIZED,
    )
