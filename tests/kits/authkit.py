"""Helpers for tests that sign in: register users, attach credentials, read errors."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from jwt.algorithms import RSAAlgorithm

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.auth.accounts import Accounts
from tests.conftest import built

PASSWORD = "correct horse battery staple 42"
_serial = itertools.count()


def bearer(credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"),)


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}{next(_serial)}@example.com"


async def register(
    channel: aio.Channel, email: str | None = None, password: str = PASSWORD
) -> auth_pb2.RegisterResponse:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    response: auth_pb2.RegisterResponse = await stub.Register(
        auth_pb2.RegisterRequest(
            email=email or unique_email(), password=password, display_name="Test User"
        ),
        timeout=30,
    )
    return response


def user_id(user_name: str) -> str:
    return user_name.removeprefix("users/")


def rich_status(error: aio.AioRpcError) -> status_pb2.Status:
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    raise AssertionError("no grpc-status-details-bin in the trailers")


def detail(error: aio.AioRpcError, cls: Any) -> Any:
    for item in rich_status(error).details:
        if item.Is(cls.DESCRIPTOR):
            found = cls()
            item.Unpack(found)
            return found
    raise AssertionError(f"no {cls.DESCRIPTOR.name} in the status details")


def reason(error: aio.AioRpcError) -> str:
    info: error_details_pb2.ErrorInfo = detail(error, error_details_pb2.ErrorInfo)
    return str(info.reason)


def error_infos(error: aio.AioRpcError) -> list[error_details_pb2.ErrorInfo]:
    """Every ErrorInfo of the error's status, in order (another protocol's first where
    its front door raised the error, then ours)."""
    found = []
    for item in rich_status(error).details:
        if item.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            item.Unpack(info)
            found.append(info)
    return found


def reasons(error: aio.AioRpcError) -> list[tuple[str, str]]:
    """(domain, reason) of each ErrorInfo of the error's status, in order."""
    return [(info.domain, info.reason) for info in error_infos(error)]


def code_of(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, aio.AioRpcError), error
    return error.code()


async def quick_user(mesh: Any) -> tuple[str, str]:
    """(user id, access token) of a new user, without paying for password hashing.

    For tests about authorization, where hundreds of users would otherwise
    spend most of the suite in argon2.
    """
    from switchboard.auth.accounts import ClientContext
    from switchboard.auth.store import AuthStore
    from switchboard.platform.security.policy import AuthMethod

    store = AuthStore(mesh.shared.database)
    user = await store.create_user(unique_email("quick"), "Quick", None)
    sign_in = await built(mesh, Accounts).start_session(
        user, AuthMethod.PASSWORD, ClientContext(address="127.0.0.1")
    )
    return user.id, sign_in.tokens.access_token


# A federated identity provider of the tests' own (OIDC sign-in).
ISSUER = "https://login.example.test/tenant/v2.0"
AUDIENCE = "switchboard-client-id"


def oidc_settings(directory: Path, idp_key: rsa.RSAPrivateKey) -> dict[str, str]:
    """Settings trusting ``idp_key`` as ISSUER's signing key (its JWKS written to ``directory``)."""
    jwk = json.loads(RSAAlgorithm.to_jwk(idp_key.public_key()))
    jwk.update({"kid": "idp-1", "alg": "RS256", "use": "sig"})
    jwks_file = directory / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk]}))
    return {"oidc_issuer": ISSUER, "oidc_audience": AUDIENCE, "oidc_jwks_file": str(jwks_file)}


def id_token(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    """An ID token ISSUER would issue for its subject ``idp-subject-1`` (``claims`` override)."""
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
