"""Which contracts a deployment's short service names serve: what the edge routes and answers for.

Kept apart from ``envoy.py`` so that ``switchboard edge-health`` knows the contracts
without paying for envoy-data-plane's import.
"""

from __future__ import annotations

from typing import Final

from a2a.types import a2a_pb2
from google.protobuf.descriptor import ServiceDescriptor

from switchboard.api.agentcard.v1 import agentcard_pb2
from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2

#: Each short service name (``SWITCHBOARD_SERVICES``) and the contract it serves.
API: Final[dict[str, ServiceDescriptor]] = {
    "auth": auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
    "context": context_pb2.DESCRIPTOR.services_by_name["ContextService"],
    "dispatcher": dispatcher_pb2.DESCRIPTOR.services_by_name["DispatcherService"],
    "integration": integration_pb2.DESCRIPTOR.services_by_name["IntegrationService"],
    "events": events_pb2.DESCRIPTOR.services_by_name["EventService"],
    # A2A's contract (the official SDK's types), served by the a2a front door.
    "a2a": a2a_pb2.DESCRIPTOR.services_by_name["A2AService"],
}
#: Services a short name's processes serve beside its own (``switchboard.mesh.COMPANIONS``):
#: routed to the same replicas.
COMPANION_API: Final[dict[str, tuple[ServiceDescriptor, ...]]] = {
    "a2a": (agentcard_pb2.DESCRIPTOR.services_by_name["AgentCardService"],),
}
#: Services an edge may leave out (no upstream: not routed): a deployment without the
#: a2a front door still gets an edge for the rest (docs/a2a.md).
OPTIONAL_API: Final = frozenset({"a2a"})


def served_by(name: str) -> tuple[ServiceDescriptor, ...]:
    """Every contract the processes of short name ``name`` serve: its own, then companions."""
    return (API[name], *COMPANION_API.get(name, ()))


__all__ = ["API", "COMPANION_API", "OPTIONAL_API", "served_by"]
