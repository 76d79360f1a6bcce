"""Which services a Switchboard process runs, and ``create_server`` for them.

All-in-one and mesh shapes run this same code: ``Settings.services`` picks the
subset a process serves; services reach each other through their stubs.
"""

from __future__ import annotations

from collections.abc import Callable

from switchboard.api.auth.v1 import auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.api.events.v1 import events_pb2_grpc
from switchboard.api.integration.v1 import integration_pb2_grpc
from switchboard.auth.servicer import AuthServiceServicer
from switchboard.context.servicer import ContextServiceServicer
from switchboard.dispatcher.servicer import DispatcherServiceServicer
from switchboard.events.servicer import EventServiceServicer
from switchboard.integration.servicer import IntegrationServiceServicer
from switchboard.platform.config import Settings
from switchboard.platform.server import ServiceRegistration, SwitchboardServer, build_server

# Short name (for SWITCHBOARD_SERVICES / --services) -> how to build it.
# (mypy sees the generated bases' RPCs as abstract; @unimplemented_rpcs fills
# every RPC a servicer does not define, hence the ignores.)
SERVICE_FACTORIES: dict[str, Callable[[Settings], ServiceRegistration]] = {
    "auth": lambda _s: ServiceRegistration(
        "switchboard.api.auth.v1.AuthService",
        AuthServiceServicer(),  # type: ignore[abstract]
        auth_pb2_grpc.add_AuthServiceServicer_to_server,
    ),
    "context": lambda _s: ServiceRegistration(
        "switchboard.api.context.v1.ContextService",
        ContextServiceServicer(),  # type: ignore[abstract]
        context_pb2_grpc.add_ContextServiceServicer_to_server,
    ),
    "dispatcher": lambda _s: ServiceRegistration(
        "switchboard.api.dispatcher.v1.DispatcherService",
        DispatcherServiceServicer(),  # type: ignore[abstract]
        dispatcher_pb2_grpc.add_DispatcherServiceServicer_to_server,
    ),
    "integration": lambda _s: ServiceRegistration(
        "switchboard.api.integration.v1.IntegrationService",
        IntegrationServiceServicer(),  # type: ignore[abstract]
        integration_pb2_grpc.add_IntegrationServiceServicer_to_server,
    ),
    "events": lambda _s: ServiceRegistration(
        "switchboard.api.events.v1.EventService",
        EventServiceServicer(),  # type: ignore[abstract]
        events_pb2_grpc.add_EventServiceServicer_to_server,
    ),
}


async def create_server(settings: Settings) -> tuple[SwitchboardServer, int]:
    """Build every configured service into one bound (not yet started) server."""
    registrations = [SERVICE_FACTORIES[name](settings) for name in settings.services]
    server = await build_server(settings, registrations)
    return server, server.port
