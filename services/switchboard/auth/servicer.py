"""Transport for AuthService: converts proto to domain calls and nothing else."""

from __future__ import annotations

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.platform.unimplemented import unimplemented_rpcs

SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]


@unimplemented_rpcs(SERVICE, planned="it arrives with the auth service (issue #3)")
class AuthServiceServicer(auth_pb2_grpc.AuthServiceServicer):
    """AuthService transport; RPCs not defined here answer UNIMPLEMENTED."""
