"""Standard health checking: overall and per service, Check and Watch."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S

pytestmark = pytest.mark.service

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

#: What the all-in-one process serves: our contracts, A2A's, and the public Agent Card's.
SERVED = [
    "switchboard.api.auth.v1.AuthService",
    "switchboard.api.context.v1.ContextService",
    "switchboard.api.dispatcher.v1.DispatcherService",
    "switchboard.api.integration.v1.IntegrationService",
    "switchboard.api.events.v1.EventService",
    "lf.a2a.v1.A2AService",
    "switchboard.api.agentcard.v1.AgentCardService",
]


@pytest.mark.parametrize("service", ["", *SERVED])
async def test_check_reports_serving(channel: aio.Channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_DEADLINE_S
    )
    assert reply.status == SERVING


async def test_check_unknown_service_is_not_found(channel: aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.Check(
            health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=CALL_DEADLINE_S
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # It says what was asked for and what to ask for instead (grpc's own says nothing).
    details = caught.value.details() or ""
    assert "'no.such.Service'" in details
    assert "''" in details
    assert all(name in details for name in SERVED)


async def test_watch_unknown_service_reports_service_unknown(channel: aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(
        health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=CALL_DEADLINE_S
    )
    first = await call.read()
    assert first.status == SERVICE_UNKNOWN
    call.cancel()


async def test_watch_sees_not_serving_on_shutdown(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    overall = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=CALL_DEADLINE_S)
    one = stub.Watch(health_pb2.HealthCheckRequest(service=SERVED[0]), timeout=CALL_DEADLINE_S)
    assert (await overall.read()).status == SERVING
    assert (await one.read()).status == SERVING
    await mesh.health.enter_graceful_shutdown()
    assert (await overall.read()).status == NOT_SERVING
    assert (await one.read()).status == NOT_SERVING
    check = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_DEADLINE_S)
    assert check.status == NOT_SERVING
    overall.cancel()
    one.cancel()
