"""Client addresses behind Envoy: per-client sign-in limits, and forged x-forwarded-for.

A real `switchboard serve` trusts 127.0.0.1/32 (where Envoy connects from) and
allows LIMIT sign-in attempts per address; a real Envoy (`switchboard envoy`)
sits in front. Browser-like clients speak grpc-web over HTTP/1.1 from their own
source addresses (Linux routes all of 127/8 to loopback): Envoy appends each
one's address to x-forwarded-for, and the server takes the rightmost entry that
is not a trusted proxy. The grpc-web client is tests/e2e/grpcweb.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Final

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.envoy import EnvoyProcess, fronting
from tests.e2e.grpcweb import AUTH, ORIGIN, GrpcWeb, WebStatus
from tests.e2e.procs import ServeProcess
from tests.kits.authkit import PASSWORD, bearer, detail, unique_email

pytestmark = pytest.mark.e2e

#: Sign-in attempts (registrations and logins) per client address per window.
LIMIT: Final = 5
_RESOURCE_EXHAUSTED: Final = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def _serve(trusted_proxies: str) -> ServeProcess:
    return ServeProcess(
        "--dev",
        env={
            "SWITCHBOARD_TRUSTED_PROXIES": trusted_proxies,
            "SWITCHBOARD_LOGIN_MAX_ATTEMPTS_PER_ADDRESS": str(LIMIT),
        },
    )


@pytest.fixture(scope="module")
def serve() -> Iterator[ServeProcess]:
    # Envoy reaches the server from 127.0.0.1: that, and only that, is a proxy.
    with _serve("127.0.0.1/32") as process:
        yield process


@pytest.fixture(scope="module")
def envoy(serve: ServeProcess) -> Iterator[EnvoyProcess]:
    yield from fronting(serve.address, allow_origins=(ORIGIN,))


class ForgingGrpcWeb(GrpcWeb):
    """A client that sends an x-forwarded-for of its own, hoping to be believed."""

    def __init__(self, client: httpx.AsyncClient, forged: str, token: str = "") -> None:
        super().__init__(client, token)
        self.forged = forged

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "x-forwarded-for": self.forged}


@asynccontextmanager
async def browser(envoy: EnvoyProcess, source: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP/1.1 client whose connections to Envoy come from ``source``."""
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(
        transport=transport, base_url=envoy.url, timeout=CALL_DEADLINE_S, trust_env=False
    ) as client:
        yield client


def _register_request(prefix: str) -> auth_pb2.RegisterRequest:
    return auth_pb2.RegisterRequest(
        email=unique_email(prefix), password=PASSWORD, display_name=prefix
    )


async def _register(web: GrpcWeb) -> tuple[auth_pb2.RegisterResponse | None, WebStatus]:
    return await web.unary(
        AUTH + "Register", _register_request("addr"), auth_pb2.RegisterResponse.FromString
    )


async def _registered(web: GrpcWeb) -> auth_pb2.RegisterResponse:
    registered, status = await _register(web)
    assert status.code == 0, status
    assert registered is not None
    return registered


async def _login(web: GrpcWeb, email: str) -> WebStatus:
    request = auth_pb2.LoginRequest(
        password=auth_pb2.PasswordCredential(email=email, password=PASSWORD)
    )
    _, status = await web.unary(AUTH + "Login", request, auth_pb2.LoginResponse.FromString)
    return status


def _assert_throttled(status: WebStatus) -> None:
    assert status.code == _RESOURCE_EXHAUSTED, status
    assert status.message == "too many sign-in attempts from this address"
    retry = status.detail(error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds >= 1


async def _session_addresses(web: GrpcWeb, token: str) -> list[str]:
    listed, status = await GrpcWeb(web.client, token).unary(
        AUTH + "ListSessions",
        auth_pb2.ListSessionsRequest(),
        auth_pb2.ListSessionsResponse.FromString,
    )
    assert status.code == 0, status
    assert listed is not None
    return [session.client_address for session in listed.sessions]


async def test_each_client_behind_envoy_has_its_own_sign_in_limit(envoy: EnvoyProcess) -> None:
    async with browser(envoy, "127.0.0.2") as a_http, browser(envoy, "127.0.0.3") as b_http:
        a, b = GrpcWeb(a_http), GrpcWeb(b_http)

        # A's session records A's own address, not Envoy's.
        first = await _registered(a)
        assert first.session.client_address == "127.0.0.2"
        assert await _session_addresses(a, first.tokens.access_token) == ["127.0.0.2"]

        # A spends its budget...
        for _ in range(LIMIT - 1):
            assert (await _registered(a)).session.client_address == "127.0.0.2"
        _, status = await _register(a)
        _assert_throttled(status)
        # ...which covers signing in too, even with the right password.
        _assert_throttled(await _login(a, first.user.email))

        # B, through the same Envoy, is another client: its budget is untouched.
        registered = await _registered(b)
        assert registered.session.client_address == "127.0.0.3"
        assert await _session_addresses(b, registered.tokens.access_token) == ["127.0.0.3"]
        assert (await _login(b, registered.user.email)).code == 0
        # And B may sign in as the user A registered: limits are per address.
        assert (await _login(b, first.user.email)).code == 0


FORGERIES: Final = (
    "127.0.0.5",  # another client's address
    "127.0.0.1",  # the trusted proxy's own address
    "198.51.100.7, 127.0.0.1",
    "[2001:db8::1]:443",
    "garbage",
    "127.0.0.5,127.0.0.5,127.0.0.5",
)


async def test_a_forged_x_forwarded_for_neither_escapes_the_limit_nor_poses_as_another_client(
    envoy: EnvoyProcess,
) -> None:
    assert len(FORGERIES) == LIMIT + 1
    async with browser(envoy, "127.0.0.4") as forger_http, browser(envoy, "127.0.0.5") as e_http:
        # Every forgery is an attempt from 127.0.0.4, recorded as 127.0.0.4.
        for forged in FORGERIES[:LIMIT]:
            registered, status = await _register(ForgingGrpcWeb(forger_http, forged))
            assert status.code == 0, (forged, status)
            assert registered is not None
            assert registered.session.client_address == "127.0.0.4", forged
        # A fresh forgery does not buy a fresh budget.
        _, status = await _register(ForgingGrpcWeb(forger_http, FORGERIES[LIMIT]))
        _assert_throttled(status)

        # 127.0.0.5, whose address the forger used, spent nothing.
        for _ in range(LIMIT):
            assert (await _registered(GrpcWeb(e_http))).session.client_address == "127.0.0.5"


async def _native_register(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, forged: str
) -> auth_pb2.RegisterResponse:
    response: auth_pb2.RegisterResponse = await stub.Register(
        _register_request("native"),
        metadata=(("x-forwarded-for", forged),),
        timeout=CALL_DEADLINE_S,
    )
    return response


async def test_a_trusted_peer_is_believed_about_its_client(serve: ServeProcess) -> None:
    """What trusting 127.0.0.1/32 means: anything that connects from there is a proxy, so
    the list must name only the proxies' own addresses."""
    async with aio.insecure_channel(serve.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        registered = await _native_register(stub, "127.0.0.9")
        assert registered.session.client_address == "127.0.0.9"
        sessions = await stub.ListSessions(
            auth_pb2.ListSessionsRequest(),
            metadata=bearer(registered.tokens.access_token),
            timeout=CALL_DEADLINE_S,
        )
        assert [s.client_address for s in sessions.sessions] == ["127.0.0.9"]


async def test_without_trusted_proxies_the_header_is_ignored_and_envoy_is_everyone() -> None:
    with _serve("") as serve:
        async with aio.insecure_channel(serve.address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            # Sent directly, a forged header is ignored: each attempt is 127.0.0.1's.
            for n in range(LIMIT):
                registered = await _native_register(stub, f"198.51.100.{n + 1}")
                assert registered.session.client_address == "127.0.0.1"
            with pytest.raises(aio.AioRpcError) as caught:
                await _native_register(stub, "198.51.100.99")
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            retry = detail(caught.value, error_details_pb2.RetryInfo)
            assert retry.retry_delay.seconds >= 1

        # Behind an Envoy it does not trust, every client is Envoy (127.0.0.1): what
        # 127.0.0.1 spent above locks out a browser that has never signed in.
        with EnvoyProcess(serve.address, allow_origins=(ORIGIN,)) as proxy:
            async with browser(proxy, "127.0.0.6") as http:
                _, status = await _register(GrpcWeb(http))
                _assert_throttled(status)
            assert proxy.terminate() == 0
        assert serve.terminate() == 0


def test_serve_refuses_a_bad_trusted_proxies_setting() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env["SWITCHBOARD_TRUSTED_PROXIES"] = "127.0.0.1/32, envoy.internal"
    done = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "serve", "--dev", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "switchboard: configuration error: SWITCHBOARD_TRUSTED_PROXIES (item 2): "
        "'envoy.internal' is not an IP address or a CIDR network (like 10.0.0.0/8)"
    )
