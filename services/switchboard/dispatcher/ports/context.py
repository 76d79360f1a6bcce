"""How the dispatcher reaches the context service: through its contract only.

The dispatcher stores messages and reads context windows with the context
service's own request and response messages (``AppendMessageRequest``,
``GetContextWindowRequest``). Two adapters carry them:

* ``LocalContext``: the context service runs in this process (the embedded
  default). The request goes straight to its domain object: the same
  validation, limits, events and cache as over gRPC, without a loopback
  call per message (decisions 19).
* ``RemoteContext``: the context service is another process (the mesh
  shape). The generated stub carries the request with an access token the
  dispatcher mints for the run's user and session from the shared key ring,
  so the context service authorizes the user itself, and the call's
  deadline is the run's.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.platform.rpc.peers import PeerService, TokenIssuer
from switchboard.platform.security.policy import Principal


class _Messages(Protocol):
    def append(
        self, principal: Principal, /, request: cpb.AppendMessageRequest
    ) -> Awaitable[cpb.Message]: ...


class _Windows(Protocol):
    def window(
        self, principal: Principal, request: cpb.GetContextWindowRequest
    ) -> Awaitable[bytes]: ...


class _Conversations(Protocol):
    def get(self, name: str) -> Awaitable[cpb.Conversation]: ...


class ContextDomain(Protocol):
    """What ``LocalContext`` needs of the context service's domain (``context/domain.py``)."""

    @property
    def messages(self) -> _Messages: ...

    @property
    def windows(self) -> _Windows: ...

    @property
    def conversations(self) -> _Conversations: ...


class ContextPort(Protocol):
    async def append_message(
        self, principal: Principal, request: cpb.AppendMessageRequest, *, timeout_s: float
    ) -> cpb.Message: ...

    async def window(
        self, principal: Principal, request: cpb.GetContextWindowRequest, *, timeout_s: float
    ) -> cpb.ContextWindow: ...

    async def conversation(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.Conversation: ...


class LocalContext:
    def __init__(self, domain: ContextDomain) -> None:
        self._domain = domain

    async def append_message(
        self, principal: Principal, request: cpb.AppendMessageRequest, *, timeout_s: float
    ) -> cpb.Message:
        return await self._domain.messages.append(principal, request)

    async def window(
        self, principal: Principal, request: cpb.GetContextWindowRequest, *, timeout_s: float
    ) -> cpb.ContextWindow:
        serialized = await self._domain.windows.window(principal, request)
        return cpb.GetContextWindowResponse.FromString(serialized).window

    async def conversation(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.Conversation:
        return await self._domain.conversations.get(name)


class RemoteContext:
    def __init__(self, address: str, tokens: TokenIssuer) -> None:
        self._peer = PeerService(address, tokens, "the context service")
        self._stub = context_pb2_grpc.ContextServiceStub(self._peer.channel)

    async def close(self) -> None:
        await self._peer.close()

    async def append_message(
        self, principal: Principal, request: cpb.AppendMessageRequest, *, timeout_s: float
    ) -> cpb.Message:
        response = await self._peer.call(self._stub.AppendMessage, request, principal, timeout_s)
        return response.message

    async def window(
        self, principal: Principal, request: cpb.GetContextWindowRequest, *, timeout_s: float
    ) -> cpb.ContextWindow:
        response = await self._peer.call(self._stub.GetContextWindow, request, principal, timeout_s)
        return response.window

    async def conversation(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.Conversation:
        response = await self._peer.call(
            self._stub.GetConversation, cpb.GetConversationRequest(name=name), principal, timeout_s
        )
        return response.conversation
