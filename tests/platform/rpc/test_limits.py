"""Transport limits: oversized requests and metadata are refused precisely, and
the connection stays usable afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2, context_pb2_grpc
from switchboard.mesh import create_server
from switchboard.platform.config import MiB
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.errorserver import start_error_server

pytestmark = pytest.mark.service


@pytest.fixture
async def echo_channel() -> AsyncIterator[aio.Channel]:
    server, auth = await start_error_server(make_settings())
    try:
        async with aio.insecure_channel(server.address) as chan:
            yield chan
    finally:
        auth.release.set()
        await server.shutdown(grace=0)


def _message(size: int) -> context_pb2.AppendMessageRequest:
    return context_pb2.AppendMessageRequest(
        parent="workspaces/w/conversations/c",
        message=context_pb2.Message(parts=[context_pb2.ContentPart(text="x" * size)]),
    )


async def _healthy(channel: aio.Channel) -> bool:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=CALL_DEADLINE_S
    )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def test_five_megabyte_request_is_resource_exhausted(echo_channel: aio.Channel) -> None:
    stub = context_pb2_grpc.ContextServiceStub(echo_channel)
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.AppendMessage(_message(5 * MiB), timeout=CALL_DEADLINE_S)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The same channel still works, for small calls and for the next big refusal.
    assert await _healthy(echo_channel)
    ok = await stub.AppendMessage(_message(1024), timeout=CALL_DEADLINE_S)
    assert len(ok.message.parts[0].text) == 1024
    with pytest.raises(aio.AioRpcError) as again:
        await stub.AppendMessage(_message(5 * MiB), timeout=CALL_DEADLINE_S)
    assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_request_just_under_the_limit_is_accepted(echo_channel: aio.Channel) -> None:
    stub = context_pb2_grpc.ContextServiceStub(echo_channel)
    reply = await stub.AppendMessage(_message(4 * MiB - 1024), timeout=CALL_DEADLINE_S)
    assert len(reply.message.parts[0].text) == 4 * MiB - 1024


async def test_oversized_metadata_is_refused_and_channel_survives(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    huge = (("x-padding", "p" * (mesh.settings.max_metadata_bytes * 2)),)
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.Check(health_pb2.HealthCheckRequest(), metadata=huge, timeout=CALL_DEADLINE_S)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await _healthy(channel)


async def test_keepalive_enforcement_disconnects_a_client_that_pings_too_often() -> None:
    settings = make_settings(keepalive_min_client_ping_interval_s=5, keepalive_max_ping_strikes=1)
    server, _port = await create_server(settings)
    await server.start()
    abusive = [
        ("grpc.keepalive_time_ms", 50),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    try:
        async with aio.insecure_channel(server.address, options=abusive) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            # Nothing else is sent on the stream: the next thing that can happen is
            # the server's GOAWAY for too many pings, which ends the call.
            with pytest.raises(aio.AioRpcError) as caught:
                await watch.read()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "too many pings" in (caught.value.details() or "").lower()
    finally:
        await server.shutdown(grace=0)


async def test_calls_beyond_the_process_limit_are_resource_exhausted() -> None:
    server, auth = await start_error_server(make_settings(max_concurrent_rpcs=1))
    try:
        async with aio.insecure_channel(server.address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            first = asyncio.ensure_future(
                stub.GetPrincipal(auth_pb2.GetPrincipalRequest(), timeout=30)
            )
            await asyncio.wait_for(auth.entered.wait(), CALL_DEADLINE_S)
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.Logout(auth_pb2.LogoutRequest(), timeout=CALL_DEADLINE_S)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            auth.release.set()
            assert (await first).principal.user == "users/slow"
            # Capacity is back once the first call is done.
            await stub.Logout(auth_pb2.LogoutRequest(), timeout=CALL_DEADLINE_S)
    finally:
        auth.release.set()
        await server.shutdown(grace=0)
