"""Transport for EventService: converts proto to domain calls and nothing else."""

from __future__ import annotations

from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.platform.unimplemented import unimplemented_rpcs

SERVICE = events_pb2.DESCRIPTOR.services_by_name["EventService"]


@unimplemented_rpcs(SERVICE, planned="it arrives with the event backbone (issue #4)")
class EventServiceServicer(events_pb2_grpc.EventServiceServicer):
    """EventService transport; RPCs not defined here answer UNIMPLEMENTED."""
