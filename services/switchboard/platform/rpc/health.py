"""The standard health service, with a NOT_FOUND that says what to ask for instead.

grpc's own servicer answers an unknown name with NOT_FOUND and no message at all,
which reads like a missing method to whoever typed the name (an orchestrator's
probe, grpc-health-probe, grpcurl).
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

#: How much of an unknown name is repeated back (it is the caller's text).
_ECHO_MAX = 120


class Health(HealthServicer):  # type: ignore[misc]  # grpc_health ships no types
    """``HealthServicer`` whose unknown service is a NOT_FOUND naming the known ones."""

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        status = self._server_status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, unknown_service(request.service, self))
        return health_pb2.HealthCheckResponse(status=status)

    def known(self) -> list[str]:
        """The names this servicer answers for, "" (the whole server) first."""
        return sorted(self._server_status)


def unknown_service(service: str, health: Health) -> str:
    asked = service if len(service) <= _ECHO_MAX else service[:_ECHO_MAX] + "..."
    names = ", ".join(name for name in health.known() if name)
    return f"no health status for service {asked!r}: ask for '' (the whole server)" + (
        f" or one of: {names}" if names else ""
    )
