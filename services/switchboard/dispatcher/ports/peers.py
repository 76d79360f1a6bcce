"""How a dispatcher replica reaches the replica that runs a run: its contract only.

Behind Envoy a call for a run lands on any dispatcher replica, but only the
replica that owns the run (its ``worker``) holds the task to cancel and the
pending tool calls to decide (and the queue a steer waits in), and only the replica
whose SIP engine carries a phone call can hang it up. ``CancelRun``,
``SubmitToolApprovals``, ``SteerRun`` and ``EndCall`` that land elsewhere are sent on to the
owner's advertised address (``SWITCHBOARD_ADVERTISE_ADDRESS``, kept in its
lease) through the generated ``DispatcherService`` stub, and the owner's answer
is returned.

The forwarded call carries the caller's own credential, so the owner
authenticates and authorizes the caller itself, exactly as if the client had
called it, whatever the credential is (an access token, an API key). A token
minted for the user instead (as ``RemoteContext`` does) would have no session
for an API-key caller and would be refused. The forwarded call is marked with
``FORWARDED_KEY``: a replica that gets a marked call for a run it does not own
(ownership moved meanwhile) answers UNAVAILABLE instead of forwarding again, so
a call never loops. The mark grants nothing; a client that forges it only stops
its own call from being forwarded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final, Protocol

from google.protobuf.message import Message
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.platform import background
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.observe.logging import request_id_var
from switchboard.platform.observe.telemetry import client_interceptors
from switchboard.platform.rpc.outbound.channels import CHANNEL_OPTIONS
from switchboard.platform.rpc.outbound.peers import call_error
from switchboard.platform.rpc.status import REQUEST_ID_KEY
from switchboard.platform.security.authn import AUTHORIZATION_KEY

log = logging.getLogger("switchboard.dispatcher")

#: Metadata that marks a call one replica forwarded to another.
FORWARDED_KEY: Final = "x-switchboard-forwarded"
#: Bound on one forwarded call. CancelRun waits up to 10 s for the run's task
#: to end and its end to be stored; the owner's answer must get back in time.
PEER_TIMEOUT_S: Final = 15.0
#: Replicas a process keeps a channel to (the least recently used one closes).
MAX_PEERS: Final = 64


@dataclass(frozen=True)
class Via:
    """How a call for a run reached this replica (built by the servicer)."""

    #: The caller's bearer credential, presented to the owner as it came.
    credential: str = ""
    #: Another replica sent it here: never forwarded again.
    forwarded: bool = False
    #: What is left of the caller's deadline (None: it set none).
    timeout_s: float | None = None

    def budget(self) -> float:
        """The forwarded call's timeout: the caller's deadline, at most ``PEER_TIMEOUT_S``."""
        if self.timeout_s is None:
            return PEER_TIMEOUT_S
        return max(0.001, min(self.timeout_s, PEER_TIMEOUT_S))


class PeerPort(Protocol):
    """Calls on the dispatcher replica at ``address``, as the caller described by ``via``."""

    async def cancel_run(self, address: str, via: Via, request: pb.CancelRunRequest) -> pb.Run: ...

    async def submit_tool_approvals(
        self, address: str, via: Via, request: pb.SubmitToolApprovalsRequest
    ) -> pb.Run: ...

    async def resolve_budget_action(
        self, address: str, via: Via, request: pb.ResolveBudgetActionRequest
    ) -> pb.Run: ...

    async def steer_run(
        self, address: str, via: Via, request: pb.SteerRunRequest
    ) -> pb.SteerRunResponse: ...

    async def end_call(self, address: str, via: Via, request: pb.EndCallRequest) -> pb.Call: ...


class GrpcPeers:
    """``PeerPort`` over gRPC: one channel per peer address, kept open, closed on ``close``."""

    def __init__(self, *, max_peers: int = MAX_PEERS) -> None:
        self._max_peers = max_peers
        self._channels: OrderedDict[
            str, tuple[aio.Channel, dispatcher_pb2_grpc.DispatcherServiceAsyncStub]
        ] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def _stub(self, address: str) -> dispatcher_pb2_grpc.DispatcherServiceAsyncStub:
        found = self._channels.get(address)
        if found is not None:
            self._channels.move_to_end(address)
            return found[1]
        channel = aio.insecure_channel(
            address, options=CHANNEL_OPTIONS, interceptors=client_interceptors()
        )
        stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        self._channels[address] = (channel, stub)
        if len(self._channels) > self._max_peers:
            _, (old, _) = self._channels.popitem(last=False)
            # Calls in flight on it may finish first.
            background.spawn(
                old.close(PEER_TIMEOUT_S), name="peer-close", logger=log, keep=self._closing
            )
        return stub

    async def close(self) -> None:
        channels = [channel for channel, _ in self._channels.values()]
        self._channels.clear()
        for channel in channels:
            await channel.close(None)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=PEER_TIMEOUT_S)

    async def cancel_run(self, address: str, via: Via, request: pb.CancelRunRequest) -> pb.Run:
        response: pb.CancelRunResponse = await self._forward(address, via, "CancelRun", request)
        return response.run

    async def submit_tool_approvals(
        self, address: str, via: Via, request: pb.SubmitToolApprovalsRequest
    ) -> pb.Run:
        response: pb.SubmitToolApprovalsResponse = await self._forward(
            address, via, "SubmitToolApprovals", request
        )
        return response.run

    async def resolve_budget_action(
        self, address: str, via: Via, request: pb.ResolveBudgetActionRequest
    ) -> pb.Run:
        response: pb.ResolveBudgetActionResponse = await self._forward(
            address, via, "ResolveBudgetAction", request
        )
        return response.run

    async def steer_run(
        self, address: str, via: Via, request: pb.SteerRunRequest
    ) -> pb.SteerRunResponse:
        response: pb.SteerRunResponse = await self._forward(address, via, "SteerRun", request)
        return response

    async def end_call(self, address: str, via: Via, request: pb.EndCallRequest) -> pb.Call:
        response: pb.EndCallResponse = await self._forward(address, via, "EndCall", request)
        return response.call

    async def _forward(self, address: str, via: Via, method: str, request: Message) -> Any:
        """``method`` on the owner at ``address``, with the caller's credential, marked
        forwarded, within the caller's budget; its error mapped back by its reason."""
        call = getattr(self._stub(address), method)
        try:
            return await call(request, metadata=_metadata(via), timeout=via.budget())
        except (aio.AioRpcError, aio.UsageError) as exc:
            # The owner's answer by its reason; the owner gone (a reset, no answer) or
            # its channel closed under the call: UNAVAILABLE, never INTERNAL.
            raise _mapped(exc) from None


def _metadata(via: Via) -> tuple[tuple[str, str], ...]:
    metadata = [(AUTHORIZATION_KEY, f"Bearer {via.credential}"), (FORWARDED_KEY, "1")]
    # The same request id on both replicas: their log lines of one call go together.
    request_id = request_id_var.get()
    if request_id:
        metadata.append((REQUEST_ID_KEY, request_id))
    return tuple(metadata)


def _mapped(exc: aio.AioRpcError | aio.UsageError) -> SwitchboardError:
    # Not the address: a client reads this message, and it would name an internal host.
    return call_error(exc, peer="the dispatcher replica running the run")
