"""A call to another process that fails because that process (or the channel to it) is
gone answers UNAVAILABLE, never INTERNAL (issue 67: SendMessage answered INTERNAL once
while a dispatcher replica was killed in the mesh).

Real parts: grpc channels to a server that was stopped, a channel closed under its
caller, and the production server assembly (the one interceptor) around a servicer
whose call to another process fails that way without a port mapping it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.auth.servicer import AuthServiceServicer
from switchboard.dispatcher.ports.peers import GrpcPeers, Via
from switchboard.platform.errors import DependencyUnavailable
from switchboard.platform.rpc.outbound.peers import PeerService
from switchboard.platform.rpc.server import ServiceRegistration, SwitchboardServer, build_server
from switchboard.platform.rpc.status import STATUS_DETAILS_KEY
from switchboard.platform.security.policy import AuthMethod, Principal
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S
from tests.kits.errorserver import start_error_server

pytestmark = pytest.mark.service

RUN = "workspaces/w/conversations/c/runs/r"


class _Issuer:
    def issue(self, *, subject: str, session: str, scopes: Any, now: float | None = None) -> Any:
        return "token", None


async def _gone_address(settings: Settings) -> str:
    """The address of a server that was started and stopped: nothing answers there."""
    server, _ = await start_error_server(settings)
    address = server.address
    await server.shutdown(grace=0)
    return address


async def test_a_peer_call_on_a_closed_channel_is_unavailable(settings: Settings) -> None:
    peer = PeerService(await _gone_address(settings), _Issuer(), "the other service")
    stub = auth_pb2_grpc.AuthServiceStub(peer.channel)
    await peer.close()  # closed under a caller that still holds it (a process stopping)
    with pytest.raises(DependencyUnavailable) as raised:
        await peer.call(stub.Logout, auth_pb2.LogoutRequest(), _principal(), CALL_DEADLINE_S)
    assert "the other service" in raised.value.message


async def test_a_call_forwarded_to_a_replica_that_is_gone_is_unavailable(
    settings: Settings,
) -> None:
    peers = GrpcPeers()
    try:
        with pytest.raises(DependencyUnavailable):
            await peers.cancel_run(
                await _gone_address(settings),
                Via(credential="key", timeout_s=CALL_DEADLINE_S),
                pb.CancelRunRequest(name=RUN),
            )
    finally:
        await peers.close()


def _principal() -> Principal:
    return Principal(user_id="u1", auth_method=AuthMethod.PASSWORD, scopes=frozenset())


class _Calling(AuthServiceServicer):
    """Logout calls another process on a channel it was given, mapping nothing."""

    def __init__(self, channel: aio.Channel) -> None:
        self.stub = auth_pb2_grpc.AuthServiceStub(channel)

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: Any
    ) -> auth_pb2.LogoutResponse:
        await self.stub.Logout(request, timeout=CALL_DEADLINE_S)
        return auth_pb2.LogoutResponse()


async def _serving(settings: Settings, servicer: _Calling) -> SwitchboardServer:
    server = await build_server(
        settings.kernel,
        [ServiceRegistration(auth_pb2.DESCRIPTOR.services_by_name["AuthService"], servicer)],
    )
    await server.start()
    return server


@pytest.fixture
async def gone_channel(settings: Settings) -> AsyncIterator[aio.Channel]:
    channel = aio.insecure_channel(await _gone_address(settings))
    yield channel
    await channel.close(None)


@pytest.mark.parametrize("closed", [False, True], ids=["process gone", "channel closed"])
async def test_an_unmapped_failed_call_to_another_process_answers_unavailable(
    settings: Settings, gone_channel: aio.Channel, closed: bool
) -> None:
    if closed:
        await gone_channel.close(None)
    server = await _serving(settings, _Calling(gone_channel))
    try:
        async with aio.insecure_channel(server.address) as channel:
            with pytest.raises(aio.AioRpcError) as raised:
                await auth_pb2_grpc.AuthServiceStub(channel).Logout(
                    auth_pb2.LogoutRequest(), timeout=CALL_DEADLINE_S
                )
    finally:
        await server.shutdown(grace=0)
    error = raised.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    trailers: Any = error.trailing_metadata() or ()
    details = next(value for key, value in trailers if key == STATUS_DETAILS_KEY)
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(details).details[0].Unpack(info)
    assert info.reason == "ERROR_REASON_DEPENDENCY_UNAVAILABLE"
