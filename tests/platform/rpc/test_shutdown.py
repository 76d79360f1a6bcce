"""Graceful shutdown: health flips first, new calls are refused, in-flight calls
finish within the grace period, and calls past the grace are cancelled."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.errorserver import start_error_server

pytestmark = pytest.mark.service


async def test_in_flight_call_drains_and_new_calls_are_refused() -> None:
    server, auth = await start_error_server(make_settings())
    async with aio.insecure_channel(server.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        in_flight = asyncio.ensure_future(
            stub.GetPrincipal(auth_pb2.GetPrincipalRequest(), timeout=30)
        )
        await asyncio.wait_for(auth.entered.wait(), CALL_DEADLINE_S)

        stopping = asyncio.ensure_future(server.shutdown(grace=30))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Long-lived streams would hold the drain until the grace ends; a client
        # that saw NOT_SERVING leaves, as this one does.
        watch.cancel()

        # A fresh connection is refused once the listener has closed.
        async with aio.insecure_channel(server.address) as fresh:
            with pytest.raises(aio.AioRpcError) as refused:
                await auth_pb2_grpc.AuthServiceStub(fresh).Logout(
                    auth_pb2.LogoutRequest(), timeout=CALL_DEADLINE_S, wait_for_ready=False
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        assert not stopping.done()
        auth.release.set()
        reply = await asyncio.wait_for(in_flight, CALL_DEADLINE_S)
        assert reply.principal.user == "users/slow"
        await asyncio.wait_for(stopping, CALL_DEADLINE_S)
        assert not auth.cancelled.is_set()


async def test_calls_past_the_grace_period_are_cancelled() -> None:
    server, auth = await start_error_server(make_settings())
    async with aio.insecure_channel(server.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        in_flight = asyncio.ensure_future(
            stub.GetPrincipal(auth_pb2.GetPrincipalRequest(), timeout=30)
        )
        await asyncio.wait_for(auth.entered.wait(), CALL_DEADLINE_S)
        await asyncio.wait_for(server.shutdown(grace=0.1), CALL_DEADLINE_S)
        with pytest.raises(aio.AioRpcError) as caught:
            await asyncio.wait_for(in_flight, CALL_DEADLINE_S)
        assert caught.value.code() in {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
        await asyncio.wait_for(auth.cancelled.wait(), CALL_DEADLINE_S)


async def test_shutdown_is_idempotent() -> None:
    server, _auth = await start_error_server(make_settings())
    await asyncio.gather(server.shutdown(grace=0), server.shutdown(grace=0))
    await asyncio.wait_for(server.wait_stopped(), CALL_DEADLINE_S)
