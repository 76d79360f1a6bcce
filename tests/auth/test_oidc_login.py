"""Federated login: ID tokens from a configured external issuer, mapped to local users."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.authkit import ISSUER, bearer, id_token, oidc_settings

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def idp_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def oidc_channel(
    tmp_path: Path, idp_key: rsa.RSAPrivateKey
) -> AsyncIterator[tuple[aio.Channel, SwitchboardServer]]:
    settings = make_settings(**oidc_settings(tmp_path, idp_key))
    server, _ = await create_server(settings)
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            yield channel, server
    finally:
        await server.shutdown(grace=0)


async def _login(channel: aio.Channel, token: str) -> auth_pb2.LoginResponse:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    response: auth_pb2.LoginResponse = await stub.Login(
        auth_pb2.LoginRequest(oidc=auth_pb2.OidcCredential(id_token=token)), timeout=CALL_DEADLINE_S
    )
    return response


async def test_first_sight_creates_a_user_and_later_logins_find_it(
    oidc_channel: tuple[aio.Channel, SwitchboardServer], idp_key: rsa.RSAPrivateKey
) -> None:
    channel, _ = oidc_channel
    first = await _login(channel, id_token(idp_key))
    assert first.user.email == "federated@example.com"
    assert first.user.display_name == "Fed Erated"
    assert [(i.issuer, i.subject) for i in first.user.federated_identities] == [
        (ISSUER, "idp-subject-1")
    ]
    assert first.session.auth_method == auth_pb2.AUTH_METHOD_OIDC
    again = await _login(channel, id_token(idp_key))
    assert again.user.name == first.user.name
    assert again.session.name != first.session.name
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    me = await stub.GetPrincipal(
        auth_pb2.GetPrincipalRequest(),
        metadata=bearer(again.tokens.access_token),
        timeout=CALL_DEADLINE_S,
    )
    assert me.principal.user == first.user.name


async def test_forged_or_foreign_id_tokens_are_unauthenticated(
    oidc_channel: tuple[aio.Channel, SwitchboardServer], idp_key: rsa.RSAPrivateKey
) -> None:
    channel, _ = oidc_channel
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = [
        id_token(impostor),
        id_token(idp_key, aud="someone-else"),
        id_token(idp_key, iss="https://evil.example.test/"),
        id_token(idp_key, exp=int(time.time()) - 3600),
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
        await _login(channel, id_token(idp_key, sub="other", email_verified=False))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_federated_login_not_configured_is_failed_precondition(
    channel: aio.Channel, idp_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await _login(channel, id_token(idp_key))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
