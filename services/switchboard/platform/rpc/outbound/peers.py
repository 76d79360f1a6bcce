"""Calls to another Switchboard service in the caller's name.

When a service reaches another one in another process (the dispatcher the
context service, the A2A front door both), the call carries an access token
minted for the caller's user, session and scopes from the shared key ring: the
other service authorizes the caller itself, as if the client had called it.
An error it answers comes back as the domain error it stands for
(``rpcerrors.from_rpc_error``), naming the peer, never its address; a call that
grpc refuses to make (its channel closed under it: this process stopping, a peer's
channel dropped) is the peer being unavailable, never INTERNAL (``call_failure``,
which the server's interceptor also applies to any such failure no port mapped).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

from grpc import aio
from pydantic import Field

from switchboard.platform.config import GrpcTarget, Section
from switchboard.platform.errors import DependencyUnavailable, SwitchboardError
from switchboard.platform.observe.telemetry import client_interceptors
from switchboard.platform.rpc.outbound.rpcerrors import from_rpc_error
from switchboard.platform.security.policy import DELEGATED_BACKGROUND, DELEGATED_KEY, Principal

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


def delegated_session(principal: Principal) -> str:
    """The ``sid`` of a token minted to act for ``principal`` in another service: its
    session; for a call made with an API key, the key (``key:{id}``, checked as the key
    is); for work a server does for a person without their credential (a schedule's
    tick, memory forming: ``bg:{user}``), no session at all. Sessions issued at sign-in
    never hold a colon, and only a server holding the signing key mints tokens."""
    if principal.session_id:
        return principal.session_id
    if principal.api_key_id:
        return f"{DELEGATED_KEY}{principal.api_key_id}"
    return f"{DELEGATED_BACKGROUND}{principal.user_id}"


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
            session=delegated_session(principal),
            scopes=[scope.value for scope in principal.scopes],
        )
        return (("authorization", f"Bearer {token}"),)

    def error(self, exc: aio.AioRpcError | aio.UsageError) -> SwitchboardError:
        return call_error(exc, peer=self._peer)

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
        except (aio.AioRpcError, aio.UsageError) as exc:
            raise self.error(exc) from None


def call_error(exc: aio.AioRpcError | aio.UsageError, *, peer: str) -> SwitchboardError:
    """``exc``, raised by a call to another service or replica, as our error. The peer's
    status comes back by its reason (``from_rpc_error``: a transport failure, a reset stream
    or a status without our ``ErrorInfo`` is UNAVAILABLE); grpc's ``UsageError`` means the
    channel was closed under the call: the peer cannot be reached from here now, an outage,
    not a bug."""
    if isinstance(exc, aio.AioRpcError):
        return from_rpc_error(exc, peer=peer)
    return DependencyUnavailable(f"{peer} cannot be reached now; retry")


def call_failure(exc: BaseException, *, peer: str) -> SwitchboardError | None:
    """``call_error`` when ``exc`` is a failed call to another process; None otherwise."""
    if isinstance(exc, (aio.AioRpcError, aio.UsageError)):
        return call_error(exc, peer=peer)
    return None
