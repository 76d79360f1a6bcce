"""Which services a Switchboard process runs, and ``create_server`` for them.

All-in-one and mesh shapes run this same code: ``Settings.services`` picks the
subset a process serves; services reach each other through their stubs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from grpc import aio

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

# Short name (for SWITCHBOARD_SERVICES / --services) -> servicer class and the
# generated function that registers it.
SERVICES: dict[str, tuple[type, Callable[[Any, aio.Server], None]]] = {
    "auth": (AuthServiceServicer, auth_pb2_grpc.add_AuthServiceServicer_to_server),
    "context": (ContextServiceServicer, context_pb2_grpc.add_ContextServiceServicer_to_server),
    "dispatcher": (
        DispatcherServiceServicer,
        dispatcher_pb2_grpc.add_DispatcherServiceServicer_to_server,
    ),
    "integration": (
        IntegrationServiceServicer,
        integration_pb2_grpc.add_IntegrationServiceServicer_to_server,
    ),
    "events": (EventServiceServicer, events_pb2_grpc.add_EventServiceServicer_to_server),
}


def registration(name: str) -> ServiceRegistration:
    """Build one service by its short name."""
    servicer_class, add_to_server = SERVICES[name]
    # Each servicer module declares SERVICE, the descriptor it implements.
    descriptor = sys.modules[servicer_class.__module__].SERVICE
    return ServiceRegistration(descriptor.full_name, servicer_class(), add_to_server)


async def create_server(settings: Settings) -> tuple[SwitchboardServer, int]:
    """Build every configured service into one bound (not yet started) server."""
    registrations = [registration(name) for name in settings.services]
    server = await build_server(settings, registrations)
    return server, server.port
