"""Transport for ContextService: converts proto to domain calls and nothing else."""

from __future__ import annotations

from switchboard.api.context.v1 import context_pb2, context_pb2_grpc
from switchboard.platform.unimplemented import unimplemented_rpcs

SERVICE = context_pb2.DESCRIPTOR.services_by_name["ContextService"]


@unimplemented_rpcs(SERVICE, planned="it arrives with the context service (issue #5)")
class ContextServiceServicer(context_pb2_grpc.ContextServiceServicer):
    """ContextService transport; RPCs not defined here answer UNIMPLEMENTED."""
