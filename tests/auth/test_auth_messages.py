"""What a refused credential is told: which check failed and what to do, never the secret.

Every UNAUTHENTICATED the interceptor (``authn``), token verification (``tokens``),
the credential checks (``authenticator``) and AuthService (``accounts``) answer is
here, sent over gRPC as a client would, with its exact message and reason.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import jwt
import pytest
from grpc import aio
from sqlalchemy import update

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.auth import accounts
from switchboard.platform.process import Shared
from switchboard.platform.security import authenticator, authn, policy
from switchboard.platform.security.credentials import accesstokens
from switchboard.platform.security.credentials.accesstokens import (
    ACCESS_TOKEN_TYPE,
    ALGORITHM,
    SigningKey,
)
from switchboard.platform.store.models import ApiKeyRow
from tests.conftest import CALL_DEADLINE_S
from tests.kits.authkit import bearer, reason, register

pytestmark = pytest.mark.service

Metadata = tuple[tuple[str, str], ...]


async def _refusal(channel: aio.Channel, metadata: Metadata) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await auth_pb2_grpc.AuthServiceStub(channel).GetPrincipal(
            auth_pb2.GetPrincipalRequest(), metadata=metadata, timeout=CALL_DEADLINE_S
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value.details()
    return caught.value


def _assert_refused(error: aio.AioRpcError, message: str, why: str, *secrets: str) -> None:
    assert error.details() == message
    assert reason(error) == why
    for secret in secrets:
        if secret:
            assert secret not in (error.details() or "")
            assert secret not in str(error.trailing_metadata())


# -- the authorization header ---------------------------------------------------------------

HEADERS: list[tuple[str, Metadata, str]] = [
    ("none", (), policy.REQUIRED),
    # A shell variable that was never set: "Bearer $TOKEN" with TOKEN empty.
    ("empty-bearer", (("authorization", "Bearer "),), authn.EMPTY),
    ("bearer-alone", (("authorization", "Bearer"),), authn.EMPTY),
    ("bearer-spaces", (("authorization", "bearer    "),), authn.EMPTY),
    ("basic", (("authorization", "Basic dXNlcjpwYXNz"),), authn.NOT_BEARER),
    ("token-alone", (("authorization", "eyJhbGciOi.x.y"),), authn.NOT_BEARER),
    (
        "two-headers",
        (("authorization", "Bearer a.b.c"), ("authorization", "Bearer d.e.f")),
        authn.SEVERAL,
    ),
]


@pytest.mark.parametrize(
    ("metadata", "message"), [h[1:] for h in HEADERS], ids=[h[0] for h in HEADERS]
)
async def test_the_authorization_header_s_refusals_say_what_to_send(
    channel: aio.Channel, metadata: Metadata, message: str
) -> None:
    error = await _refusal(channel, metadata)
    _assert_refused(error, message, "ERROR_REASON_UNAUTHENTICATED", "dXNlcjpwYXNz")


# -- access tokens --------------------------------------------------------------------------


def _claims(shared: Shared, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": shared.tokens.policy.issuer,
        "aud": shared.tokens.policy.audience,
        "sub": "u1",
        "sid": "s1",
        "jti": "j1",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "typ": "access",
        "scope": "read",
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name)
        else:
            claims[name] = value
    return claims


def _signed(key: SigningKey, claims: dict[str, Any], **headers: Any) -> str:
    header = {"kid": key.kid, "typ": ACCESS_TOKEN_TYPE, **headers}
    return jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers=header)


def _flip_signature(token: str) -> str:
    head, body, signature = token.split(".")
    return f"{head}.{body}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"


def _refresh_token(_: Shared, registered: auth_pb2.RegisterResponse) -> str:
    return registered.tokens.refresh_token


TOKENS: list[tuple[str, Callable[[Shared, auth_pb2.RegisterResponse], str], str, str]] = [
    ("garbage", lambda s, r: "not-a-token", accesstokens.MALFORMED, "ERROR_REASON_UNAUTHENTICATED"),
    ("bad-base64", lambda s, r: "a.b.c", accesstokens.MALFORMED, "ERROR_REASON_UNAUTHENTICATED"),
    (
        "refresh-token",
        _refresh_token,
        accesstokens.REFRESH_AS_BEARER,
        "ERROR_REASON_UNAUTHENTICATED",
    ),
    ("huge", lambda s, r: "x" * 9000, accesstokens.TOO_LARGE, "ERROR_REASON_UNAUTHENTICATED"),
    (
        "wrong-typ-header",
        lambda s, r: _signed(s.keys.active, _claims(s), typ="JWT"),
        accesstokens.FOREIGN,
        "ERROR_REASON_UNAUTHENTICATED",
    ),
    (
        "unknown-key",
        # What a dev-mode server with a new data directory sees: a key id it never had.
        lambda s, r: _signed(SigningKey.generate("dev-0123456789abcdef"), _claims(s)),
        accesstokens.UNKNOWN_KEY,
        "ERROR_REASON_UNAUTHENTICATED",
    ),
    (
        "altered",
        lambda s, r: _flip_signature(r.tokens.access_token),
        accesstokens.BAD_SIGNATURE,
        "ERROR_REASON_UNAUTHENTICATED",
    ),
    (
        "other-audience",
        lambda s, r: _signed(s.keys.active, _claims(s, aud="another-deployment")),
        accesstokens.OTHER_DEPLOYMENT,
        "ERROR_REASON_UNAUTHENTICATED",
    ),
    (
        "future",
        lambda s, r: _signed(s.keys.active, _claims(s, nbf=int(time.time()) + 3600)),
        accesstokens.NOT_YET_VALID,
        "ERROR_REASON_UNAUTHENTICATED",
    ),
    (
        "no-session-claim",
        lambda s, r: _signed(s.keys.active, _claims(s, sid=None)),
        accesstokens.INCOMPLETE,
        "ERROR_REASON_UNAUTHENTICATED",
    ),
    (
        "expired",
        lambda s, r: _signed(s.keys.active, _claims(s, exp=int(time.time()) - 3600)),
        accesstokens.EXPIRED,
        "ERROR_REASON_TOKEN_EXPIRED",
    ),
    (
        "no-such-session",
        lambda s, r: _signed(s.keys.active, _claims(s)),
        authenticator.SESSION_ENDED,
        "ERROR_REASON_SESSION_REVOKED",
    ),
]


@pytest.mark.parametrize(
    ("make", "message", "why"), [t[1:] for t in TOKENS], ids=[t[0] for t in TOKENS]
)
async def test_a_refused_access_token_is_told_why_and_what_to_do(
    channel: aio.Channel,
    shared: Shared,
    make: Callable[[Shared, auth_pb2.RegisterResponse], str],
    message: str,
    why: str,
) -> None:
    registered = await register(channel)
    credential = make(shared, registered)
    error = await _refusal(channel, bearer(credential))
    _assert_refused(error, message, why, credential, registered.tokens.refresh_token)


async def test_a_signed_out_session_s_token_is_told_to_sign_in_again(
    channel: aio.Channel,
) -> None:
    registered = await register(channel)
    access = registered.tokens.access_token
    await auth_pb2_grpc.AuthServiceStub(channel).Logout(
        auth_pb2.LogoutRequest(), metadata=bearer(access), timeout=CALL_DEADLINE_S
    )
    error = await _refusal(channel, bearer(access))
    _assert_refused(error, authenticator.SESSION_ENDED, "ERROR_REASON_SESSION_REVOKED", access)


# -- API keys -------------------------------------------------------------------------------


async def _api_key(channel: aio.Channel, access: str) -> auth_pb2.CreateApiKeyResponse:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    request = auth_pb2.CreateApiKeyRequest(display_name="ci", scopes=["read"])
    request.expire_time.FromDatetime(soon)
    response: auth_pb2.CreateApiKeyResponse = await auth_pb2_grpc.AuthServiceStub(
        channel
    ).CreateApiKey(request, metadata=bearer(access), timeout=CALL_DEADLINE_S)
    return response


KeyMaker = Callable[
    [aio.Channel, auth_pb2.RegisterResponse, auth_pb2.CreateApiKeyResponse], Awaitable[str]
]


async def _not_a_key(
    channel: aio.Channel, owner: auth_pb2.RegisterResponse, key: auth_pb2.CreateApiKeyResponse
) -> str:
    return "sbk_" + "z" * 10


async def _unknown(
    channel: aio.Channel, owner: auth_pb2.RegisterResponse, key: auth_pb2.CreateApiKeyResponse
) -> str:
    return "sbk_0000abcd_" + "A" * 43


async def _mistyped(
    channel: aio.Channel, owner: auth_pb2.RegisterResponse, key: auth_pb2.CreateApiKeyResponse
) -> str:
    return key.secret[:-1] + ("a" if key.secret[-1] != "a" else "b")


async def _revoked(
    channel: aio.Channel, owner: auth_pb2.RegisterResponse, key: auth_pb2.CreateApiKeyResponse
) -> str:
    await auth_pb2_grpc.AuthServiceStub(channel).RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(name=key.api_key.name),
        metadata=bearer(owner.tokens.access_token),
        timeout=CALL_DEADLINE_S,
    )
    return key.secret


def _expiring(shared: Shared) -> KeyMaker:
    async def expired(
        channel: aio.Channel, owner: auth_pb2.RegisterResponse, key: auth_pb2.CreateApiKeyResponse
    ) -> str:
        # Its expiry moved into the past, as the clock would.
        async with shared.database.sessions.begin() as db:
            await db.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.id == key.api_key.name.rpartition("/")[2])
                .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
            )
        return key.secret

    return expired


KEYS: list[tuple[str, Callable[[Shared], KeyMaker], str]] = [
    ("malformed", lambda s: _not_a_key, authenticator.API_KEY_INVALID),
    ("unknown", lambda s: _unknown, authenticator.API_KEY_INVALID),
    ("mistyped", lambda s: _mistyped, authenticator.API_KEY_INVALID),
    ("revoked", lambda s: _revoked, authenticator.API_KEY_REVOKED),
    ("expired", _expiring, authenticator.API_KEY_EXPIRED),
]


@pytest.mark.parametrize(("make", "message"), [k[1:] for k in KEYS], ids=[k[0] for k in KEYS])
async def test_a_refused_api_key_is_told_why_and_what_to_do(
    channel: aio.Channel,
    shared: Shared,
    make: Callable[[Shared], KeyMaker],
    message: str,
) -> None:
    owner = await register(channel)
    key = await _api_key(channel, owner.tokens.access_token)
    credential = await make(shared)(channel, owner, key)
    error = await _refusal(channel, bearer(credential))
    _assert_refused(error, message, "ERROR_REASON_UNAUTHENTICATED", credential, key.secret)


# -- refresh tokens -------------------------------------------------------------------------


async def _refresh(channel: aio.Channel, refresh_token: str) -> auth_pb2.RefreshTokenResponse:
    response: auth_pb2.RefreshTokenResponse = await auth_pb2_grpc.AuthServiceStub(
        channel
    ).RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=refresh_token), timeout=CALL_DEADLINE_S
    )
    return response


async def test_refused_refresh_tokens_are_told_why_and_to_sign_in_again(
    channel: aio.Channel,
) -> None:
    registered = await register(channel)
    spent = registered.tokens.refresh_token
    cases = [
        ("an access token", registered.tokens.access_token, accounts.REFRESH_MALFORMED),
        ("unknown", "sbr_" + "A" * 43, accounts.REFRESH_INVALID),
    ]
    for what, presented, message in cases:
        with pytest.raises(aio.AioRpcError) as caught:
            await _refresh(channel, presented)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, what
        _assert_refused(caught.value, message, "ERROR_REASON_UNAUTHENTICATED", presented)
    await _refresh(channel, spent)
    with pytest.raises(aio.AioRpcError) as caught:
        await _refresh(channel, spent)
    _assert_refused(caught.value, accounts.REFRESH_REUSED, "ERROR_REASON_SESSION_REVOKED", spent)
