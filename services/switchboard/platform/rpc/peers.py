"""Calls to another Switchboard service in the caller's name.

When a service reaches another one in another process (the dispatcher the
context service, the A2A front door both), the call carries an access token
minted for the caller's user, session and scopes from the shared key ring: the
other service authorizes the caller itself, as if the client had called it.
An error it answers comes back as the domain error it stands for
(``rpcerrors.from_rpc_error``), naming the peer, never its address.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

from grpc import aio
from pydantic import Field

from switchboard.platform.config import GrpcTarget, Section
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.observe.telemetry import client_interceptors
from switchboard.platform.rpc.rpcerrors import from_rpc_error
from switchboard.platform.security.policy import Principal

_R = TypeVar("_R")


class PeerSettings(Section):
    """Where the services this process does not serve run (the mesh shape): the dispatcher
    and the A2A front door both reach the context service, so the addresses are a section
    of the platform's, beside the calls that use them."""

    context_address: GrpcTarget = Field(
        default="",
        description="`host:port` of ContextService when the dispatcher (or the a2a front "
        "door) runs in another process (mesh shape); empty: the process's own",
    )
    dispatcher_address: GrpcTarget = Field(
        default="",
        description="`host:port` of DispatcherService when the a2a front door runs in another "
        "process; empty: the process's own ([docs/a2a.md](docs/a2a.md))",
    )


class TokenIssuer(Protocol):
    """Mints an access token (auth's ``AccessTokens``)."""

    def issue(
        self, *, subject: str, session: str, scopes: Iterable[str], now: float | None = None
    ) -> tuple[str, object]: ...


class PeerService:
    """A channel to another service's process, and how to call it as a principal."""

    def __init__(self, address: str, tokens: TokenIssuer, peer: str) -> None:
        self.channel = aio.insecure_channel(address, interceptors=client_interceptors())
        self._tokens = tokens
        self._peer = peer

    async def close(self) -> None:
        await self.channel.close(None)

    def metadata(self, principal: Principal) -> tuple[tuple[str, str], ...]:
        token, _ = self._tokens.issue(
            subject=principal.user_id,
            session=principal.session_id,
            scopes=[scope.value for scope in principal.scopes],
        )
        return (("authorization", f"Bearer {token}"),)

    def error(self, exc: aio.AioRpcError) -> SwitchboardError:
        return from_rpc_error(exc, peer=self._peer)

    async def call(
        self,
        method: Callable[..., Awaitable[_R]],
        request: Any,
        principal: Principal,
        timeout_s: float,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> _R:
        """A unary call of ``method`` (a stub's) as ``principal``, within ``timeout_s``;
        ``extra``: more metadata to send with it."""
        try:
            return await method(
                request, metadata=(*self.metadata(principal), *extra), timeout=timeout_s
            )
        except aio.AioRpcError as exc:
            raise self.error(exc) from None
