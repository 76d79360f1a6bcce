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

from collections.abc import Awaitable, Iterable
from typing import Protocol

from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.platform.errors import (
    SwitchboardError,
)
from switchboard.platform.policy import Principal
from switchboard.platform.rpcerrors import from_rpc_error
from switchboard.platform.telemetry import client_interceptors


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


class TokenIssuer(Protocol):
    """What ``RemoteContext`` needs to mint an access token (auth's ``AccessTokens``)."""

    def issue(
        self, *, subject: str, session: str, scopes: Iterable[str], now: float | None = None
    ) -> tuple[str, object]: ...


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


# Status codes of the context service, back to the domain errors they came from.
class RemoteContext:
    def __init__(self, address: str, tokens: TokenIssuer) -> None:
        self._channel = aio.insecure_channel(address, interceptors=client_interceptors())
        self._stub = context_pb2_grpc.ContextServiceStub(self._channel)
        self._tokens = tokens

    async def close(self) -> None:
        await self._channel.close(None)

    def _metadata(self, principal: Principal) -> tuple[tuple[str, str], ...]:
        token, _ = self._tokens.issue(
            subject=principal.user_id,
            session=principal.session_id,
            scopes=[scope.value for scope in principal.scopes],
        )
        return (("authorization", f"Bearer {token}"),)

    async def append_message(
        self, principal: Principal, request: cpb.AppendMessageRequest, *, timeout_s: float
    ) -> cpb.Message:
        try:
            response = await self._stub.AppendMessage(
                request, metadata=self._metadata(principal), timeout=timeout_s
            )
        except aio.AioRpcError as exc:
            raise _mapped_error(exc) from None
        return response.message

    async def window(
        self, principal: Principal, request: cpb.GetContextWindowRequest, *, timeout_s: float
    ) -> cpb.ContextWindow:
        try:
            response = await self._stub.GetContextWindow(
                request, metadata=self._metadata(principal), timeout=timeout_s
            )
        except aio.AioRpcError as exc:
            raise _mapped_error(exc) from None
        return response.window

    async def conversation(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.Conversation:
        try:
            response = await self._stub.GetConversation(
                cpb.GetConversationRequest(name=name),
                metadata=self._metadata(principal),
                timeout=timeout_s,
            )
        except aio.AioRpcError as exc:
            raise _mapped_error(exc) from None
        return response.conversation


def _mapped_error(exc: aio.AioRpcError) -> SwitchboardError:
    return from_rpc_error(exc, peer="the context service")
