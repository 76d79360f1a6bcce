"""A server built with the real assembly but test servicers that raise on demand.

The error to raise is named in the `x-test-error` request metadata, so one
server exercises every error class through the same interceptor as production.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2, context_pb2_grpc
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.auth.servicer import AuthServiceServicer
from switchboard.platform import errors
from switchboard.platform.rpc.server import ServiceRegistration, SwitchboardServer, build_server
from switchboard.settings import Settings

LEAKY_TEXT = "password=hunter2 at /srv/app/secret.py line 42"


def all_error_classes() -> list[type[errors.SwitchboardError]]:
    """Every concrete SwitchboardError subclass, found by walking the hierarchy."""
    found: list[type[errors.SwitchboardError]] = []
    todo: list[type[errors.SwitchboardError]] = [errors.SwitchboardError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__name__)


def build_error(name: str) -> BaseException:
    if name == "RuntimeError":
        return RuntimeError(LEAKY_TEXT)
    cls: type[errors.SwitchboardError] = getattr(errors, name)
    if cls is errors.InvalidArgument:
        return cls(
            "request is invalid",
            [
                errors.FieldViolation("email", "must be a valid address"),
                errors.FieldViolation("password", "must be at least 12 characters"),
            ],
        )
    if issubclass(cls, errors.RateLimited):
        return cls("too many attempts", retry_after_s=1.5)
    if issubclass(cls, errors.QuotaExceeded):
        return cls("too many subscriptions", subject="subscriptions_per_principal")
    return cls(f"{name} raised for a test", metadata={"resource": "workspaces/w1"})


def _error_from(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-test-error":
            return str(value)
    return ""


class RaisingAuth(AuthServiceServicer):
    """Logout raises the requested error; GetPrincipal blocks until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: Any
    ) -> auth_pb2.LogoutResponse:
        name = _error_from(context)
        if name:
            raise build_error(name)
        return auth_pb2.LogoutResponse()

    async def GetPrincipal(
        self, request: auth_pb2.GetPrincipalRequest, context: Any
    ) -> auth_pb2.GetPrincipalResponse:
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return auth_pb2.GetPrincipalResponse(principal=auth_pb2.Principal(user="users/slow"))


class RaisingEvents(events_pb2_grpc.EventServiceServicer):
    """Subscribe yields one heartbeat, then raises the requested error."""

    async def Subscribe(
        self, request: events_pb2.SubscribeRequest, context: Any
    ) -> AsyncIterator[events_pb2.SubscribeResponse]:
        yield events_pb2.SubscribeResponse(heartbeat=events_pb2.Heartbeat(cursor="1"))
        name = _error_from(context)
        if name:
            raise build_error(name)


class EchoContext(context_pb2_grpc.ContextServiceServicer):
    """AppendMessage echoes its message back (to exercise size limits)."""

    async def AppendMessage(
        self, request: context_pb2.AppendMessageRequest, context: Any
    ) -> context_pb2.AppendMessageResponse:
        return context_pb2.AppendMessageResponse(message=request.message)


async def start_error_server(settings: Settings) -> tuple[SwitchboardServer, RaisingAuth]:
    auth = RaisingAuth()
    server = await build_server(
        settings.kernel,
        [
            ServiceRegistration(auth_pb2.DESCRIPTOR.services_by_name["AuthService"], auth),
            ServiceRegistration(
                events_pb2.DESCRIPTOR.services_by_name["EventService"],
                RaisingEvents(),  # type: ignore[abstract]
            ),
            ServiceRegistration(
                context_pb2.DESCRIPTOR.services_by_name["ContextService"],
                EchoContext(),  # type: ignore[abstract]
            ),
        ],
    )
    await server.start()
    return server, auth
