"""Transport for DispatcherService: converts proto to domain calls and nothing else."""

from __future__ import annotations

from switchboard.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from switchboard.platform.unimplemented import unimplemented_rpcs

SERVICE = dispatcher_pb2.DESCRIPTOR.services_by_name["DispatcherService"]


@unimplemented_rpcs(SERVICE, planned="it arrives with the dispatcher (issue #6)")
class DispatcherServiceServicer(dispatcher_pb2_grpc.DispatcherServiceServicer):
    """DispatcherService transport; RPCs not defined here answer UNIMPLEMENTED."""
