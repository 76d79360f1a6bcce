"""Helpers for the tests of switchboard.client (no tests here).

``Wire`` is an interceptor the tests add after the client's own: it sees every
attempt as it goes out, with the bearer the client attached, so a test can
count RefreshToken calls and retries where they happen, on the wire.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.client import Client
from switchboard.platform.security.credentials.accesstokens import AccessTokens, TokenPolicy

pytestmark = pytest.mark.service

REFRESH = "/switchboard.api.auth.v1.AuthService/RefreshToken"


@dataclass
class Sent:
    method: str
    authorization: str
    at: float


class Wire:
    """Every attempt the client sends: its method, its authorization, when.

    Give the client ``wire.interceptors`` (gRPC takes one object per call shape).
    """

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.interceptors: list[Any] = [_Unary(self), _Stream(self)]

    def note(self, details: aio.ClientCallDetails) -> None:
        raw: Any = details.method  # bytes on the wire, whatever the stubs say
        method = raw.decode() if isinstance(raw, bytes) else str(raw)
        authorization = ""
        for key, value in details.metadata or ():
            if key == "authorization":
                authorization = str(value)
        self.sent.append(Sent(method, authorization, time.monotonic()))

    def count(self, suffix: str) -> int:
        return sum(1 for s in self.sent if s.method.endswith(suffix))

    def of(self, suffix: str) -> list[Sent]:
        return [s for s in self.sent if s.method.endswith(suffix)]


class _Unary(aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, wire: Wire) -> None:
        self._wire = wire

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        self._wire.note(client_call_details)
        return await continuation(client_call_details, request)


class _Stream(aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, wire: Wire) -> None:
        self._wire = wire

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        self._wire.note(client_call_details)
        return await continuation(client_call_details, request)


def unique_email(prefix: str = "client") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


PASSWORD = "correct horse battery staple 42"


async def new_workspace(client: Client, title: str = "Client tests") -> str:
    response = await client.context.CreateWorkspace(
        cpb.CreateWorkspaceRequest(workspace=cpb.Workspace(display_name=title))
    )
    return response.workspace.name


async def new_conversation(client: Client, workspace: str, title: str = "Talk") -> str:
    response = await client.context.CreateConversation(
        cpb.CreateConversationRequest(parent=workspace, conversation=cpb.Conversation(title=title))
    )
    return response.conversation.name


async def append(client: Client, conversation: str, text: str) -> cpb.Message:
    """A user message (a MESSAGE_CREATED event), retried safely by its request id."""
    response = await client.context.AppendMessage(
        cpb.AppendMessageRequest(
            parent=conversation,
            message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=[cpb.ContentPart(text=text)]),
            request_id=uuid.uuid4().hex,
        )
    )
    return response.message


def text_of(message: cpb.Message) -> str:
    return "".join(part.text for part in message.parts)


def minted_pair(
    keys: Any,
    settings: Any,
    *,
    user: str,
    session: str,
    refresh_token: str,
    valid_for_s: float,
    claims_now: Callable[[], float] = time.time,
) -> auth_pb2.TokenPair:
    """A pair whose access token the server stops accepting ``valid_for_s`` from now
    (its verifier's leeway included), for the real session ``session``; the
    expiry field claims 15 minutes, so the client sees nothing due and only the
    server's refusal can tell it."""
    leeway = TokenPolicy(settings.auth_issuer, settings.auth_audience).leeway_s
    # Issued a minute ago, so that with the verifier's leeway it stops verifying
    # ``valid_for_s`` from now.
    lifetime = round(60 + valid_for_s - leeway)
    short = AccessTokens(
        keys, TokenPolicy(settings.auth_issuer, settings.auth_audience, access_ttl_s=lifetime)
    )
    token, _ = short.issue(
        subject=user.removeprefix("users/"),
        session=session.rsplit("/", 1)[-1],
        scopes=["read", "write", "manage"],
        now=claims_now() - 60,
    )
    pair = auth_pb2.TokenPair(access_token=token, refresh_token=refresh_token)
    pair.access_token_expire_time.FromSeconds(int(time.time()) + 900)
    return pair
