"""Transport for IntegrationService: converts proto to domain calls and nothing else."""

from __future__ import annotations

from switchboard.api.integration.v1 import integration_pb2, integration_pb2_grpc
from switchboard.platform.unimplemented import unimplemented_rpcs

SERVICE = integration_pb2.DESCRIPTOR.services_by_name["IntegrationService"]


@unimplemented_rpcs(SERVICE, planned="it arrives with the integration hub (a later issue)")
class IntegrationServiceServicer(integration_pb2_grpc.IntegrationServiceServicer):
    """IntegrationService transport; RPCs not defined here answer UNIMPLEMENTED."""
