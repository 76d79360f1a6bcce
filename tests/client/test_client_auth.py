"""switchboard.client against a real in-process server: signing in and out, API keys,
and sessions that renew themselves.

Refreshes are driven without waiting for real time: by the client's clock
(a test clock moved past the refresh point), or by the server refusing an
access token that it stops accepting at a chosen moment (minted for the real
session with the server's key).
"""

from __future__ import annotations

import asyncio

import pytest

from switchboard.api.auth.v1 import auth_pb2
from switchboard.client import (
    AlreadyExists,
    Client,
    InvalidArgument,
    RateLimited,
    SessionRevoked,
    SignedOut,
    TokenExpired,
    Unauthenticated,
)
from switchboard.platform.rpc.server import SwitchboardServer
from tests.client.test_clientkit import (
    PASSWORD,
    REFRESH,
    Wire,
    append,
    minted_pair,
    new_conversation,
    new_workspace,
    unique_email,
)
from tests.infra.clock import FakeClock

pytestmark = pytest.mark.service

PRINCIPAL = "/switchboard.api.auth.v1.AuthService/GetPrincipal"
DEADLINE_S = 30.0


async def _principal(client: Client) -> auth_pb2.Principal:
    response = await client.auth.GetPrincipal(auth_pb2.GetPrincipalRequest())
    return response.principal


def _minted(
    mesh: SwitchboardServer, registered: auth_pb2.RegisterResponse, *, valid_for_s: int
) -> auth_pb2.TokenPair:
    """A pair for ``registered``'s session and refresh token, valid for ``valid_for_s``."""
    return minted_pair(
        mesh.shared.keys,
        mesh.shared.settings,
        user=registered.user.name,
        session=registered.session.name,
        refresh_token=registered.tokens.refresh_token,
        valid_for_s=valid_for_s,
    )


async def test_register_sign_out_and_sign_in_again(mesh: SwitchboardServer) -> None:
    seen: list[auth_pb2.TokenPair | None] = []
    email = unique_email()
    async with Client(mesh.address, on_tokens=seen.append) as client:
        registered = await client.register(email, PASSWORD, display_name="Ada")
        assert seen == [registered.tokens]
        principal = await _principal(client)
        assert principal.user == registered.user.name
        assert principal.session == registered.session.name
        assert principal.auth_method == auth_pb2.AUTH_METHOD_PASSWORD

        first_token = client.tokens.current()
        await client.sign_out()
        assert seen[-1] is None
        assert client.tokens.kind == "none"
        # No credential now: the server says so, as a typed error.
        with pytest.raises(Unauthenticated) as anonymous:
            await _principal(client)
        assert anonymous.value.reason == "ERROR_REASON_UNAUTHENTICATED"
        assert anonymous.value.request_id
        # The session is over on the server: its token is refused (a caller's
        # own authorization metadata is sent as it is).
        with pytest.raises(SessionRevoked):
            await client.auth.GetPrincipal(
                auth_pb2.GetPrincipalRequest(),
                metadata=(("authorization", f"Bearer {first_token}"),),
            )

        signed_in = await client.sign_in(email, PASSWORD)
        assert signed_in.session.name != registered.session.name
        assert (await _principal(client)).session == signed_in.session.name
        assert seen[-1] == signed_in.tokens

        # A failed sign-in leaves the current session alone.
        with pytest.raises(Unauthenticated):
            await client.sign_in(email, "not the password at all 123")
        assert (await _principal(client)).session == signed_in.session.name


async def test_registration_errors_are_typed_with_their_details(mesh: SwitchboardServer) -> None:
    email = unique_email()
    async with Client(mesh.address) as client:
        await client.register(email, PASSWORD)
        with pytest.raises(AlreadyExists) as taken:
            await client.register(email, PASSWORD)
        assert taken.value.reason == "ERROR_REASON_ALREADY_EXISTS"
        with pytest.raises(InvalidArgument) as invalid:
            await client.register(unique_email(), "short")
        assert [v.field for v in invalid.value.violations] == ["password"]


async def test_an_api_key_authenticates_every_call(mesh: SwitchboardServer) -> None:
    async with Client(mesh.address) as owner, Client(mesh.address) as robot:
        registered = await owner.register(unique_email(), PASSWORD)
        created = await owner.auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(display_name="robot", scopes=["read", "write"])
        )
        robot.use_api_key(created.secret)
        principal = await _principal(robot)
        assert principal.user == registered.user.name
        assert principal.api_key == created.api_key.name
        assert principal.auth_method == auth_pb2.AUTH_METHOD_API_KEY
        with pytest.raises(SignedOut):
            await robot.refresh()  # an API key has no session to renew
        await robot.sign_out()
        assert robot.tokens.kind == "none"
        # Only forgotten here: the key itself still works until revoked.
        owner_view = await owner.auth.ListApiKeys(auth_pb2.ListApiKeysRequest())
        assert [k.name for k in owner_view.api_keys] == [created.api_key.name]


async def test_a_due_token_is_refreshed_once_for_many_concurrent_calls(
    mesh: SwitchboardServer,
) -> None:
    clock = FakeClock(start=1000.0)
    wire = Wire()
    seen: list[auth_pb2.TokenPair | None] = []
    async with Client(
        mesh.address, clock=clock, interceptors=wire.interceptors, on_tokens=seen.append
    ) as client:
        registered = await client.register(unique_email(), PASSWORD)
        first = registered.tokens
        # Past the refresh point (a minute before the 15-minute expiry) on the
        # client's clock; the server's clock has not moved.
        clock.advance(900 - 59)
        principals = await asyncio.gather(*(_principal(client) for _ in range(20)))
        assert wire.count(REFRESH) == 1
        assert {p.session for p in principals} == {registered.session.name}
        renewed = client.tokens.pair
        assert renewed is not None
        assert renewed.access_token != first.access_token
        assert renewed.refresh_token != first.refresh_token
        assert seen[-1] == renewed
        # Every call went out with the renewed token.
        assert {s.authorization for s in wire.of(PRINCIPAL)} == {f"Bearer {renewed.access_token}"}
        # Not due again until the new token's own refresh point.
        await _principal(client)
        assert wire.count(REFRESH) == 1

        # The spent refresh token is spent on the server: presenting it again
        # is reuse, which revokes the session...
        with pytest.raises(SessionRevoked):
            await client.auth.RefreshToken(
                auth_pb2.RefreshTokenRequest(refresh_token=first.refresh_token)
            )
        # ...and the client, refused with its current token, is signed out.
        with pytest.raises(SignedOut) as ended:
            await _principal(client)
        assert isinstance(ended.value.__cause__, SessionRevoked)
        assert seen[-1:] == [None]
        assert wire.count(REFRESH) == 2  # the reuse above, never one by the client
        sent = len(wire.sent)
        with pytest.raises(SignedOut):
            await _principal(client)
        assert len(wire.sent) == sent  # refused locally, nothing sent


async def test_a_refused_access_token_is_renewed_and_the_call_retried_once(
    mesh: SwitchboardServer,
) -> None:
    wire = Wire()
    async with Client(mesh.address, interceptors=wire.interceptors) as client:
        registered = await client.register(unique_email(), PASSWORD)
        expired = _minted(mesh, registered, valid_for_s=-1)
        client.use_tokens(expired)  # the client believes it good for 15 minutes
        principal = await _principal(client)
        assert principal.session == registered.session.name
        attempts = wire.of(PRINCIPAL)
        assert [a.authorization for a in attempts] == [
            f"Bearer {expired.access_token}",
            f"Bearer {client.tokens.current()}",
        ]
        assert wire.count(REFRESH) == 1


async def test_a_refused_refresh_signs_out(mesh: SwitchboardServer) -> None:
    wire = Wire()
    seen: list[auth_pb2.TokenPair | None] = []
    async with Client(
        mesh.address, interceptors=wire.interceptors, on_tokens=seen.append
    ) as client:
        registered = await client.register(unique_email(), PASSWORD)
        await client.sign_out()  # the session and its refresh token are over
        client.use_tokens(_minted(mesh, registered, valid_for_s=600))
        with pytest.raises(SignedOut):
            await _principal(client)
        assert seen[-1] is None
        # A revoked session is not refreshed: the refusal says it is over.
        assert wire.count(REFRESH) == 0

        client.use_tokens(
            minted_pair(
                mesh.shared.keys,
                mesh.shared.settings,
                user=registered.user.name,
                session=(await client.sign_in(registered.user.email, PASSWORD)).session.name,
                refresh_token="sbr_" + "A" * 43,  # not a token this server issued
                valid_for_s=-1,
            )
        )
        with pytest.raises(SignedOut) as ended:
            await _principal(client)
        assert isinstance(ended.value.__cause__, Unauthenticated)
        assert wire.count(REFRESH) == 1


async def test_a_stream_whose_token_expires_resumes_with_a_renewed_token(
    mesh: SwitchboardServer,
) -> None:
    renewed = asyncio.Event()

    def on_tokens(pair: auth_pb2.TokenPair | None) -> None:
        if pair is not None and client.tokens.refreshes:
            renewed.set()

    wire = Wire()
    async with Client(mesh.address, interceptors=wire.interceptors, on_tokens=on_tokens) as client:
        registered = await client.register(unique_email(), PASSWORD)
        workspace = await new_workspace(client)
        conversation = await new_conversation(client, workspace)
        # The server ends open streams the instant their token expires.
        client.use_tokens(_minted(mesh, registered, valid_for_s=4))
        async with client.follow([conversation], types=["MESSAGE_CREATED"]) as follower:
            await asyncio.wait_for(follower.ready(), DEADLINE_S)
            before = [await append(client, conversation, f"before {i}") for i in range(3)]
            got = [await asyncio.wait_for(anext(follower), DEADLINE_S) for _ in before]
            # Read on: the stream breaks when the token expires, the follower
            # renews it and subscribes again from where it stood.
            reading = asyncio.ensure_future(anext(follower))
            await asyncio.wait_for(renewed.wait(), DEADLINE_S)
            after = [await append(client, conversation, f"after {i}") for i in range(3)]
            got.append(await asyncio.wait_for(reading, DEADLINE_S))
            got += [await asyncio.wait_for(anext(follower), DEADLINE_S) for _ in after[1:]]
            assert [e.message_created.message.name for e in got] == [m.name for m in before + after]
            assert follower.resumes == 1
            assert isinstance(follower.last_error, TokenExpired)
            assert follower.cursor == got[-1].cursor
        assert wire.count(REFRESH) == 1
        assert client.tokens.refreshes == 1


async def test_sign_in_is_refused_by_the_servers_throttle_and_not_retried(
    mesh: SwitchboardServer,
) -> None:
    """Login is not safe to repeat (each success is a session): one attempt per call,
    and the throttle's RetryInfo reaches the caller."""
    wire = Wire()
    async with Client(mesh.address, interceptors=wire.interceptors) as client:
        registered = await client.register(unique_email(), PASSWORD)
        throttle: RateLimited | None = None
        for attempt in range(1, 100):
            try:
                await client.sign_in(registered.user.email, "wrong password number 42")
            except RateLimited as error:
                throttle = error
                break
            except Unauthenticated:
                assert wire.count("/Login") == attempt
        assert throttle is not None
        assert throttle.retry_delay_s is not None
        assert throttle.retry_delay_s > 0
        assert wire.count("/Login") == attempt
