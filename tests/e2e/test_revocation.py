"""Revocation across real processes sharing a database and a real redis-server.

Two `switchboard serve` processes, A and B, share one SQLite file, one Redis
and one signing key. A session revoked through A must be refused by B on the
very next call, including while Redis is paused (SIGSTOP) or dead (SIGKILL),
and no call may hang meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.auth.tokens import SigningKey, private_key_pem
from tests.e2e.procs import ServeProcess
from tests.infra.redis import RedisServer
from tests.service.authkit import PASSWORD, bearer, unique_email

pytestmark = pytest.mark.e2e

# Every call in this file carries a deadline well above the bounded fallbacks
# (redis timeout 0.2 s, lease 0.6 s) and far below "hanging".
CALL_TIMEOUT_S = 5.0


@pytest.fixture
def pair(
    tmp_path: Path, redis_server: RedisServer, postgres_url: str
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    key_file = tmp_path / "k1.pem"
    key_file.write_bytes(private_key_pem(SigningKey.generate("k1")))
    env = {
        "SWITCHBOARD_SECRET_KEY": "e2e-secret-key-that-is-long-enough-000000",
        "SWITCHBOARD_SIGNING_KEYS": str(key_file),
        # Processes share PostgreSQL: a SQLite file belongs to one process.
        "SWITCHBOARD_DATABASE_URL": postgres_url,
        "SWITCHBOARD_REDIS_URL": redis_server.url,
        "SWITCHBOARD_REDIS_TIMEOUT_S": "0.2",
        "SWITCHBOARD_REDIS_LEASE_S": "0.6",
    }
    with ServeProcess(env=env) as a, ServeProcess(env=env) as b:
        yield a, b


def _stub(channel: grpc.Channel) -> auth_pb2_grpc.AuthServiceStub:
    return auth_pb2_grpc.AuthServiceStub(channel)


def _register(stub: auth_pb2_grpc.AuthServiceStub, email: str) -> auth_pb2.RegisterResponse:
    response: auth_pb2.RegisterResponse = stub.Register(
        auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name="E2E"),
        timeout=CALL_TIMEOUT_S * 4,
    )
    return response


def _login(stub: auth_pb2_grpc.AuthServiceStub, email: str) -> auth_pb2.LoginResponse:
    response: auth_pb2.LoginResponse = stub.Login(
        auth_pb2.LoginRequest(password=auth_pb2.PasswordCredential(email=email, password=PASSWORD)),
        timeout=CALL_TIMEOUT_S * 4,
    )
    return response


def _who(stub: auth_pb2_grpc.AuthServiceStub, access: str) -> grpc.StatusCode:
    try:
        stub.GetPrincipal(
            auth_pb2.GetPrincipalRequest(), metadata=bearer(access), timeout=CALL_TIMEOUT_S
        )
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _revoke(stub: auth_pb2_grpc.AuthServiceStub, access: str, session: str) -> float:
    started = time.monotonic()
    stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(name=session), metadata=bearer(access), timeout=CALL_TIMEOUT_S
    )
    return time.monotonic() - started


def test_revocation_through_a_reaches_b_at_once(pair: tuple[ServeProcess, ServeProcess]) -> None:
    a, b = pair
    with grpc.insecure_channel(a.address) as ca, grpc.insecure_channel(b.address) as cb:
        sa, sb = _stub(ca), _stub(cb)
        email = unique_email("e2e")
        victim = _register(sa, email)
        admin = _login(sa, email)
        # B verifies and caches the victim's token and session.
        assert _who(sb, victim.tokens.access_token) == grpc.StatusCode.OK
        assert _who(sb, victim.tokens.access_token) == grpc.StatusCode.OK
        _revoke(sa, admin.tokens.access_token, victim.session.name)
        assert _who(sb, victim.tokens.access_token) == grpc.StatusCode.UNAUTHENTICATED
        assert _who(sb, admin.tokens.access_token) == grpc.StatusCode.OK


@pytest.mark.parametrize("outage", ["pause", "kill"])
def test_revoked_tokens_stay_rejected_while_redis_is_down(
    pair: tuple[ServeProcess, ServeProcess], redis_server: RedisServer, outage: str
) -> None:
    a, b = pair
    with grpc.insecure_channel(a.address) as ca, grpc.insecure_channel(b.address) as cb:
        sa, sb = _stub(ca), _stub(cb)
        email = unique_email("outage")
        before = _register(sa, email)  # revoked before the outage
        during = _login(sa, email)  # revoked during the outage
        admin = _login(sa, email)
        for token in (before, during, admin):
            assert _who(sb, token.tokens.access_token) == grpc.StatusCode.OK
        _revoke(sa, admin.tokens.access_token, before.session.name)
        assert _who(sb, before.tokens.access_token) == grpc.StatusCode.UNAUTHENTICATED

        if outage == "pause":
            redis_server.pause()
        else:
            redis_server.kill()
        try:
            # A cannot publish; it waits out the lease (bounded) so B stops trusting its cache.
            took = _revoke(sa, admin.tokens.access_token, during.session.name)
            assert took < CALL_TIMEOUT_S
            assert _who(sb, during.tokens.access_token) == grpc.StatusCode.UNAUTHENTICATED
            assert _who(sb, before.tokens.access_token) == grpc.StatusCode.UNAUTHENTICATED
            # Still-valid sessions keep working from the database fallback, on both sides.
            assert _who(sb, admin.tokens.access_token) == grpc.StatusCode.OK
            assert _who(sa, admin.tokens.access_token) == grpc.StatusCode.OK
            # Logins still work: rate limits fall back to memory instead of hanging.
            assert _login(sb, email).tokens.access_token
        finally:
            if outage == "pause":
                redis_server.resume()
            else:
                redis_server.restart()
        assert _who(sb, during.tokens.access_token) == grpc.StatusCode.UNAUTHENTICATED
        assert _who(sb, admin.tokens.access_token) == grpc.StatusCode.OK
