"""Federated login: ID tokens from a configured external issuer, mapped to local users."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc import aio
from jwt.algorithms import RSAAlgorithm

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.mesh import create_server
from switchboard.platform.server import SwitchboardServer
from tests.conftest import make_settings
from tests.service.authkit import bearer

ISSUER = "https://login.example.test/tenant/v2.0"
AUDIENCE = "switchboard-client-id"


@pytest.fixture(scope="module")
def idp_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def oidc_channel(
    tmp_path: Path, idp_key: rsa.RSAPrivateKey
) -> AsyncIterator[tuple[aio.Channel, SwitchboardServer]]:
    jwk = json.loads(RSAAlgorithm.to_jwk(idp_key.public_key()))
    jwk.update({"kid": "idp-1", "alg": "RS256", "use": "sig"})
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk]}))
    settings = make_settings(
        oidc_issuer=ISSUER, oidc_audience=AUDIENCE, oidc_jwks_file=str(jwks_file)
    )
    server, _ = await create_server(settings)
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            yield channel, server
    finally:
        await server.shutdown(grace=0)


def _id_token(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "idp-subject-1",
        "iat": now,
        "exp": now + 300,
        "email": "federated@example.com",
        "email_verified": True,
        "name": "Fed Erated",
    }
    body.update(claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "idp-1"})


async def _login(channel: aio.Channel, token: str) -> auth_pb2.LoginResponse:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    response: auth_pb2.LoginResponse = await stub.Login(
        auth_pb2.LoginRequest(oidc=auth_pb2.OidcCredential(id_token=token)), timeout=10
    )
    return response


async def test_first_sight_creates_a_user_and_later_logins_find_it(
    oidc_channel: tuple[aio.Channel, SwitchboardServer], idp_key: rsa.RSAPrivateKey
) -> None:
    channel, _ = oidc_channel
    first = await _login(channel, _id_token(idp_key))
    assert first.user.email == "federated@example.com"
    assert first.user.display_name == "Fed Erated"
    assert [(i.issuer, i.subject) for i in first.user.federated_identities] == [
        (ISSUER, "idp-subject-1")
    ]
    assert first.session.auth_method == auth_pb2.AUTH_METHOD_OIDC
    again = await _login(channel, _id_token(idp_key))
    assert again.user.name == first.user.name
    assert again.session.name != first.session.name
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    me = await stub.GetPrincipal(
        auth_pb2.GetPrincipalRequest(), metadata=bearer(again.tokens.access_token), timeout=10
    )
    assert me.principal.user == first.user.name


async def test_forged_or_foreign_id_tokens_are_unauthenticated(
    oidc_channel: tuple[aio.Channel, SwitchboardServer], idp_key: rsa.RSAPrivateKey
) -> None:
    channel, _ = oidc_channel
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = [
        _id_token(impostor),
        _id_token(idp_key, aud="someone-else"),
        _id_token(idp_key, iss="https://evil.example.test/"),
        _id_token(idp_key, exp=int(time.time()) - 3600),
        "not-a-token",
    ]
    for token in bad:
        with pytest.raises(aio.AioRpcError) as caught:
            await _login(channel, token)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_unverified_email_is_not_enough_to_create_an_account(
    oidc_channel: tuple[aio.Channel, SwitchboardServer], idp_key: rsa.RSAPrivateKey
) -> None:
    channel, _ = oidc_channel
    with pytest.raises(aio.AioRpcError) as caught:
        await _login(channel, _id_token(idp_key, sub="other", email_verified=False))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_federated_login_not_configured_is_failed_precondition(
    channel: aio.Channel, idp_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await _login(channel, _id_token(idp_key))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
