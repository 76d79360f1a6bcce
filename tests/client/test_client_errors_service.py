"""switchboard.client's errors, retries, deadlines and cancellation against a real
server whose servicers raise on demand (tests/kits/errorserver.py: the
production assembly and error interceptor, the error named in ``x-test-error``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.common.v1 import errors_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.client import (
    Backoff,
    Client,
    DeadlineExceeded,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
    StreamPolicy,
    SwitchboardError,
    Unavailable,
)
from switchboard.platform import errors as server_errors
from switchboard.platform.rpc.server import SwitchboardServer
from tests.client.test_clientkit import Wire
from tests.conftest import make_settings
from tests.kits.errorserver import RaisingAuth, all_error_classes, start_error_server

pytestmark = pytest.mark.service

DEADLINE_S = 30.0
FAST = Backoff(initial_s=0.05, max_s=0.2)


@pytest.fixture
async def error_server() -> AsyncIterator[tuple[SwitchboardServer, RaisingAuth]]:
    server, auth = await start_error_server(make_settings())
    try:
        yield server, auth
    finally:
        await server.shutdown(grace=0)


def _raise(name: str) -> tuple[tuple[str, str], ...]:
    return (("x-test-error", name),)


async def _logout(client: Client, error: str, deadline_s: float | None = None) -> None:
    await client.auth.Logout(auth_pb2.LogoutRequest(), metadata=_raise(error), timeout=deadline_s)


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
async def test_every_error_the_server_raises_arrives_typed(
    error_server: tuple[SwitchboardServer, RaisingAuth], cls: type[server_errors.SwitchboardError]
) -> None:
    server, _ = error_server
    async with Client(server.address, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(SwitchboardError) as raised:
            await _logout(client, cls.__name__)
    error = raised.value
    assert error.reason == cls.reason
    assert errors_pb2.ErrorReason.Name(type(error).REASON) == cls.reason
    assert error.code().value[0] == cls.code.value
    assert error.domain == "switchboard.dev"
    assert error.request_id
    assert isinstance(error, aio.AioRpcError)


async def test_an_unexpected_fault_is_internal_and_says_nothing_more(
    error_server: tuple[SwitchboardServer, RaisingAuth],
) -> None:
    server, _ = error_server
    async with Client(server.address) as client:
        with pytest.raises(SwitchboardError) as raised:
            await _logout(client, "RuntimeError")
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in str(raised.value)


async def test_an_idempotent_call_is_retried_after_unavailable(
    error_server: tuple[SwitchboardServer, RaisingAuth],
) -> None:
    server, _ = error_server
    wire = Wire()
    retry = RetryPolicy(max_attempts=3, backoff=FAST)
    async with Client(server.address, retry=retry, interceptors=wire.interceptors) as client:
        with pytest.raises(Unavailable):
            await _logout(client, "ServerUnavailable")
        assert wire.count("/Logout") == 3  # Logout is IDEMPOTENT in the contract
        with pytest.raises(PermissionDenied):
            await _logout(client, "PermissionDenied")
        assert wire.count("/Logout") == 4  # a refusal is not retried


async def test_a_retry_waits_as_long_as_retry_info_asks(
    error_server: tuple[SwitchboardServer, RaisingAuth],
) -> None:
    server, _ = error_server
    wire = Wire()
    retry = RetryPolicy(max_attempts=2, backoff=FAST)
    async with Client(server.address, retry=retry, interceptors=wire.interceptors) as client:
        with pytest.raises(RateLimited) as limited:
            await _logout(client, "RateLimited")
        assert limited.value.retry_delay_s == 1.5
        first, second = wire.of("/Logout")
        assert second.at - first.at >= 1.5
        # A wait that does not fit in the call's deadline is not waited for:
        # the caller hears the server's answer at once.
        started = time.monotonic()
        with pytest.raises(RateLimited):
            await _logout(client, "RateLimited", deadline_s=1.0)
        assert time.monotonic() - started < 1.0
        assert wire.count("/Logout") == 3


async def test_a_deadline_ends_the_call_on_both_sides(
    error_server: tuple[SwitchboardServer, RaisingAuth],
) -> None:
    server, auth = error_server
    async with Client(server.address, timeout_s=0.5) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await client.auth.GetPrincipal(auth_pb2.GetPrincipalRequest())  # blocks
        assert time.monotonic() - started < DEADLINE_S
        await asyncio.wait_for(auth.cancelled.wait(), DEADLINE_S)


async def test_cancelling_the_callers_task_cancels_the_call(
    error_server: tuple[SwitchboardServer, RaisingAuth],
) -> None:
    server, auth = error_server
    async with Client(server.address) as client:
        waiting = asyncio.ensure_future(client.auth.GetPrincipal(auth_pb2.GetPrincipalRequest()))
        await asyncio.wait_for(auth.entered.wait(), DEADLINE_S)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # The server's handler saw its call go.
        await asyncio.wait_for(auth.cancelled.wait(), DEADLINE_S)


@dataclass
class Subscriptions(aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Makes each Subscribe raise ``error`` after its heartbeat; records the requests."""

    error: str
    requests: list[events_pb2.SubscribeRequest] = field(default_factory=list)
    enough: asyncio.Event = field(default_factory=asyncio.Event)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        self.requests.append(request)
        if len(self.requests) >= 3:
            self.enough.set()
        metadata = aio.Metadata(*_raise(self.error))
        for key, value in client_call_details.metadata or ():
            metadata.add(key, value)
        details = aio.ClientCallDetails(
            client_call_details.method,
            client_call_details.timeout,
            metadata,
            client_call_details.credentials,
            client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


@pytest.mark.parametrize("error", ["ServerUnavailable", "SubscriberTooSlow"])
async def test_a_broken_subscription_resumes_after_its_last_cursor(
    error_server: tuple[SwitchboardServer, RaisingAuth], error: str
) -> None:
    server, _ = error_server
    subscriptions = Subscriptions(error)
    policy = StreamPolicy(backoff=FAST)
    async with Client(server.address, streams=policy, interceptors=[subscriptions]) as client:
        follower = client.follow(["workspaces/w1"], after_cursor="0-0", types=["RUN_UPDATED"])
        reading = asyncio.ensure_future(anext(follower))
        await asyncio.wait_for(subscriptions.enough.wait(), DEADLINE_S)
        assert not reading.done()  # no events: it keeps resuming, never gives up
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
    first, *later = subscriptions.requests
    assert first.after_cursor == "0-0"
    # Each one after the heartbeat's cursor ("1"), with the same scopes and types.
    assert {r.after_cursor for r in later} == {"1"}
    assert all(r.scopes == first.scopes and r.types == first.types for r in later)
    assert follower.resumes >= 2
    assert follower.cursor == "1"


async def test_a_subscription_refused_for_good_is_not_resumed(
    error_server: tuple[SwitchboardServer, RaisingAuth],
) -> None:
    server, _ = error_server
    subscriptions = Subscriptions("PermissionDenied")
    async with Client(server.address, interceptors=[subscriptions]) as client:
        follower = client.follow(["workspaces/w1"])
        with pytest.raises(PermissionDenied):
            await asyncio.wait_for(anext(follower), DEADLINE_S)
    assert len(subscriptions.requests) == 1


async def test_a_stream_that_keeps_failing_gives_up_when_told_to(
    error_server: tuple[SwitchboardServer, RaisingAuth],
) -> None:
    server, _ = error_server
    await server.shutdown(grace=0)  # nothing answers at that address any more
    policy = StreamPolicy(backoff=FAST, give_up_after_s=1.0)
    async with Client(server.address, streams=policy) as client:
        follower = client.follow(["workspaces/w1"])
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(anext(follower), DEADLINE_S)
        assert time.monotonic() - started >= 1.0
        assert follower.resumes >= 1
