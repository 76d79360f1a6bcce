"""AuthService end to end in one process: users, sessions, refresh rotation, API keys, limits."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc import aio
from sqlalchemy import select, update

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.events.v1 import events_pb2
from switchboard.platform.process import Shared
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import ApiKeyRow, UserRow
from tests.conftest import CALL_DEADLINE_S, make_settings, started
from tests.kits.authkit import (
    PASSWORD,
    bearer,
    detail,
    reason,
    register,
    unique_email,
    user_id,
)
from tests.kits.modulekit import module_channel_fixture, module_database_url_fixture

# One server per backend for the module (starting one per test was most of its time):
# each test registers users of its own (``unique_email``). Tests of other limits start
# their own.
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]


module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(module_database_url: str) -> AsyncIterator[SwitchboardServer]:
    # Every test here runs on SQLite and on a real PostgreSQL server. The module's tests
    # all log in from 127.0.0.1: the per-address limit stays out of their way.
    settings = make_settings(
        database_url=module_database_url,
        login_max_failures_per_account=3,
        login_max_attempts_per_address=1000,
    )
    async with started(settings) as server:
        yield server


channel = module_channel_fixture


@pytest.fixture
def stub(channel: aio.Channel) -> auth_pb2_grpc.AuthServiceAsyncStub:
    return auth_pb2_grpc.AuthServiceStub(channel)


async def _principal(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, credential: str
) -> auth_pb2.GetPrincipalResponse:
    response: auth_pb2.GetPrincipalResponse = await stub.GetPrincipal(
        auth_pb2.GetPrincipalRequest(), metadata=bearer(credential), timeout=CALL_DEADLINE_S
    )
    return response


async def _rejected(stub: auth_pb2_grpc.AuthServiceAsyncStub, credential: str) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await _principal(stub, credential)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return caught.value


async def _login(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, email: str, password: str = PASSWORD
) -> auth_pb2.LoginResponse:
    response: auth_pb2.LoginResponse = await stub.Login(
        auth_pb2.LoginRequest(
            password=auth_pb2.PasswordCredential(email=email, password=password),
            client_info=auth_pb2.ClientInfo(user_agent="pytest", device_name="ci"),
        ),
        timeout=CALL_DEADLINE_S,
    )
    return response


# Registration and login.


async def test_register_then_call_with_the_access_token(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    email = unique_email()
    registered = await register(channel, email.upper())
    assert registered.user.email == email  # normalized
    assert registered.tokens.token_type == "Bearer"
    assert registered.tokens.refresh_token.startswith("sbr_")
    assert registered.session.current
    me = await _principal(stub, registered.tokens.access_token)
    assert me.principal.user == registered.user.name
    assert me.principal.session == registered.session.name
    assert me.principal.auth_method == auth_pb2.AUTH_METHOD_PASSWORD
    assert set(me.principal.scopes) == {"read", "write", "manage"}
    assert me.user.email == email


async def test_stored_hash_is_argon2id_at_or_above_owasp(
    channel: aio.Channel, shared: Shared
) -> None:
    registered = await register(channel)
    async with shared.database.sessions() as db:
        row = await db.get(UserRow, user_id(registered.user.name))
    assert row is not None
    assert row.password_hash is not None
    assert PASSWORD not in row.password_hash
    assert row.password_hash.startswith("$argon2id$v=19$")
    params = dict(p.split("=") for p in row.password_hash.split("$")[3].split(","))
    assert int(params["m"]) >= 19456
    assert int(params["t"]) >= 2
    assert int(params["p"]) >= 1


async def test_register_rejects_bad_input_with_field_violations(
    stub: auth_pb2_grpc.AuthServiceAsyncStub,
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.Register(
            auth_pb2.RegisterRequest(email="not-an-email", password="password", display_name="x"),
            timeout=CALL_DEADLINE_S,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = detail(caught.value, error_details_pb2.BadRequest)
    fields = {v.field for v in bad.field_violations}
    assert fields == {"email", "password"}


async def test_register_twice_is_already_exists(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    email = unique_email()
    await register(channel, email)
    with pytest.raises(aio.AioRpcError) as caught:
        await register(channel, email)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_unknown_user_and_wrong_password_look_the_same(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    email = unique_email()
    await register(channel, email)
    errors = []
    for who in (email, unique_email("nobody")):
        with pytest.raises(aio.AioRpcError) as caught:
            await _login(stub, who, "wrong password entirely")
        errors.append(caught.value)
    assert {e.code() for e in errors} == {grpc.StatusCode.UNAUTHENTICATED}
    assert errors[0].details() == errors[1].details()
    assert reason(errors[0]) == reason(errors[1])


async def test_login_creates_a_new_session(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    email = unique_email()
    first = await register(channel, email)
    second = await _login(stub, email)
    assert second.session.name != first.session.name
    assert second.session.client_info.user_agent == "pytest"
    assert second.session.client_address == "127.0.0.1"
    listed = await stub.ListSessions(
        auth_pb2.ListSessionsRequest(),
        metadata=bearer(second.tokens.access_token),
        timeout=CALL_DEADLINE_S,
    )
    assert {s.name for s in listed.sessions} == {first.session.name, second.session.name}
    assert [s.current for s in listed.sessions if s.name == second.session.name] == [True]


async def test_brute_force_on_an_account_is_resource_exhausted_with_retry_info(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    email = unique_email()
    await register(channel, email)
    for _ in range(3):  # the configured per-account limit
        with pytest.raises(aio.AioRpcError) as caught:
            await _login(stub, email, "guess guess guess")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for password in ("guess again please", PASSWORD):  # even the right one is refused now
        with pytest.raises(aio.AioRpcError) as caught:
            await _login(stub, email, password)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = detail(caught.value, error_details_pb2.RetryInfo)
        assert 0 < retry.retry_delay.seconds <= 900


async def test_brute_force_from_one_address_is_resource_exhausted() -> None:
    settings = make_settings(login_max_attempts_per_address=4)
    from switchboard.mesh import create_server

    server, _ = await create_server(settings)
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as chan:
            stub = auth_pb2_grpc.AuthServiceStub(chan)
            codes = []
            for _ in range(6):
                with pytest.raises(aio.AioRpcError) as caught:
                    await _login(stub, unique_email("spray"), "some password here")
                codes.append(caught.value.code())
    finally:
        await server.shutdown(grace=0)
    assert codes[:4] == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert codes[4:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


# Refresh rotation and revocation.


async def test_refresh_rotates_and_reuse_revokes_the_family(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub, shared: Shared
) -> None:
    registered = await register(channel)
    first_refresh = registered.tokens.refresh_token
    rotated = await stub.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=first_refresh), timeout=CALL_DEADLINE_S
    )
    assert rotated.tokens.refresh_token != first_refresh
    assert rotated.tokens.access_token != registered.tokens.access_token
    await _principal(stub, rotated.tokens.access_token)

    # The spent token comes back: someone copied it. The whole session ends.
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=first_refresh), timeout=CALL_DEADLINE_S
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason(caught.value) == "ERROR_REASON_SESSION_REVOKED"
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=rotated.tokens.refresh_token),
            timeout=CALL_DEADLINE_S,
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for access in (registered.tokens.access_token, rotated.tokens.access_token):
        error = await _rejected(stub, access)
        assert reason(error) == "ERROR_REASON_SESSION_REVOKED"
    kinds = [e.security.kind for e in shared.bus.recent() if e.user == registered.user.name]
    assert events_pb2.SECURITY_EVENT_KIND_REFRESH_REUSE_DETECTED in kinds


async def test_refresh_token_garbage_is_unauthenticated(
    stub: auth_pb2_grpc.AuthServiceAsyncStub,
) -> None:
    for token in ("sbr_" + "A" * 43, "nonsense", "x" * 5000):
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.RefreshToken(
                auth_pb2.RefreshTokenRequest(refresh_token=token), timeout=CALL_DEADLINE_S
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.RefreshToken(auth_pb2.RefreshTokenRequest(), timeout=CALL_DEADLINE_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_refresh_token_is_not_an_access_token(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    registered = await register(channel)
    await _rejected(stub, registered.tokens.refresh_token)


async def test_revoke_session_rejects_its_tokens_at_once(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub, shared: Shared
) -> None:
    email = unique_email()
    phone = await register(channel, email)
    laptop = await _login(stub, email)
    await _principal(stub, phone.tokens.access_token)  # cached as valid
    revoked = await stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(name=phone.session.name),
        metadata=bearer(laptop.tokens.access_token),
        timeout=CALL_DEADLINE_S,
    )
    assert revoked.session.HasField("revoke_time")
    await _rejected(stub, phone.tokens.access_token)
    await _principal(stub, laptop.tokens.access_token)
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=phone.tokens.refresh_token),
            timeout=CALL_DEADLINE_S,
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    kinds = [e.security.kind for e in shared.bus.recent() if e.user == phone.user.name]
    assert events_pb2.SECURITY_EVENT_KIND_SESSION_REVOKED in kinds


async def test_another_users_session_is_not_found_and_untouched(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    victim = await register(channel)
    attacker = await register(channel)
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.RevokeSession(
            auth_pb2.RevokeSessionRequest(name=victim.session.name),
            metadata=bearer(attacker.tokens.access_token),
            timeout=CALL_DEADLINE_S,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await _principal(stub, victim.tokens.access_token)


async def test_revoke_all_sessions_keeping_the_current_one(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    email = unique_email()
    first = await register(channel, email)
    sessions: list[Any] = [first, *[await _login(stub, email) for _ in range(2)]]
    current = sessions[-1]
    result = await stub.RevokeAllSessions(
        auth_pb2.RevokeAllSessionsRequest(keep_current=True),
        metadata=bearer(current.tokens.access_token),
        timeout=CALL_DEADLINE_S,
    )
    assert result.revoked_count == 2
    for other in sessions[:-1]:
        await _rejected(stub, other.tokens.access_token)
    await _principal(stub, current.tokens.access_token)
    result = await stub.RevokeAllSessions(
        auth_pb2.RevokeAllSessionsRequest(),
        metadata=bearer(current.tokens.access_token),
        timeout=CALL_DEADLINE_S,
    )
    assert result.revoked_count == 1
    await _rejected(stub, current.tokens.access_token)


async def test_logout_ends_the_session(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    registered = await register(channel)
    await stub.Logout(
        auth_pb2.LogoutRequest(),
        metadata=bearer(registered.tokens.access_token),
        timeout=CALL_DEADLINE_S,
    )
    await _rejected(stub, registered.tokens.access_token)
    listed_error = None
    try:
        await stub.ListSessions(
            auth_pb2.ListSessionsRequest(),
            metadata=bearer(registered.tokens.access_token),
            timeout=CALL_DEADLINE_S,
        )
    except aio.AioRpcError as exc:
        listed_error = exc
    assert listed_error is not None
    assert listed_error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_session_limit_evicts_the_oldest() -> None:
    from switchboard.mesh import create_server

    server, _ = await create_server(make_settings(max_sessions_per_user=2))
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as chan:
            stub = auth_pb2_grpc.AuthServiceStub(chan)
            email = unique_email()
            first = await register(chan, email)
            await _login(stub, email)
            third = await _login(stub, email)
            await _rejected(stub, first.tokens.access_token)
            listed = await stub.ListSessions(
                auth_pb2.ListSessionsRequest(), metadata=bearer(third.tokens.access_token)
            )
            assert len(listed.sessions) == 2
    finally:
        await server.shutdown(grace=0)


async def test_list_sessions_pages(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    email = unique_email()
    first = await register(channel, email)
    for _ in range(4):
        await _login(stub, email)
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListSessions(
            auth_pb2.ListSessionsRequest(page_size=2, page_token=token),
            metadata=bearer(first.tokens.access_token),
            timeout=CALL_DEADLINE_S,
        )
        assert len(page.sessions) <= 2
        seen += [s.name for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 5
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.ListSessions(
            auth_pb2.ListSessionsRequest(page_token="garbage!"),
            metadata=bearer(first.tokens.access_token),
            timeout=CALL_DEADLINE_S,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# API keys.


async def _create_key(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, access: str, scopes: list[str], **extra: Any
) -> auth_pb2.CreateApiKeyResponse:
    response: auth_pb2.CreateApiKeyResponse = await stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(display_name="ci bot", scopes=scopes, **extra),
        metadata=bearer(access),
        timeout=CALL_DEADLINE_S,
    )
    return response


async def test_api_key_shown_once_works_and_records_use(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub, shared: Shared
) -> None:
    owner = await register(channel)
    access = owner.tokens.access_token
    created = await _create_key(stub, access, ["read"])
    assert created.secret.startswith(created.api_key.prefix + "_")
    assert created.api_key.prefix.startswith("sbk_")
    me = await _principal(stub, created.secret)
    assert me.principal.auth_method == auth_pb2.AUTH_METHOD_API_KEY
    assert me.principal.api_key == created.api_key.name
    assert list(me.principal.scopes) == ["read"]
    listed = await stub.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=bearer(access))
    assert [k.name for k in listed.api_keys] == [created.api_key.name]
    assert listed.api_keys[0].HasField("last_used_time")
    assert created.secret not in str(listed)
    async with shared.database.sessions() as db:
        mine = select(ApiKeyRow).where(ApiKeyRow.user_id == user_id(owner.user.name))
        row = (await db.execute(mine)).scalars().one()
    assert created.secret not in (row.digest, row.id, row.scopes)


async def test_api_key_scopes_bound_what_it_can_do(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    owner = await register(channel)
    read_only = await _create_key(stub, owner.tokens.access_token, ["read"])
    with pytest.raises(aio.AioRpcError) as caught:
        await _create_key(stub, read_only.secret, ["read"])
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(aio.AioRpcError) as caught:
        await _create_key(stub, owner.tokens.access_token, ["root"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_revoked_api_key_is_rejected(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    owner = await register(channel)
    created = await _create_key(stub, owner.tokens.access_token, ["read", "write"])
    await _principal(stub, created.secret)
    revoked = await stub.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(name=created.api_key.name),
        metadata=bearer(owner.tokens.access_token),
        timeout=CALL_DEADLINE_S,
    )
    assert revoked.api_key.HasField("revoke_time")
    await _rejected(stub, created.secret)


async def test_expired_api_key_is_rejected(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub, shared: Shared
) -> None:
    owner = await register(channel)
    soon = Timestamp()
    soon.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    created = await _create_key(stub, owner.tokens.access_token, ["read"], expire_time=soon)
    # Move its expiry into the past, as the clock would.
    async with shared.database.sessions.begin() as db:
        await db.execute(
            update(ApiKeyRow)
            .where(ApiKeyRow.user_id == user_id(owner.user.name))
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    await _rejected(stub, created.secret)
    past = Timestamp()
    past.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    with pytest.raises(aio.AioRpcError) as caught:
        await _create_key(stub, owner.tokens.access_token, ["read"], expire_time=past)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_forged_api_keys_are_rejected(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    owner = await register(channel)
    created = await _create_key(stub, owner.tokens.access_token, ["read"])
    prefix = created.api_key.prefix
    for forged in (prefix + "_" + "A" * 43, "sbk_zzzzzzzz_" + "A" * 43, "sbk_", prefix):
        await _rejected(stub, forged)


async def test_api_key_count_is_limited() -> None:
    from switchboard.mesh import create_server

    server, _ = await create_server(make_settings(max_api_keys_per_user=2))
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as chan:
            stub = auth_pb2_grpc.AuthServiceStub(chan)
            owner = await register(chan)
            for _ in range(2):
                await _create_key(stub, owner.tokens.access_token, ["read"])
            with pytest.raises(aio.AioRpcError) as caught:
                await _create_key(stub, owner.tokens.access_token, ["read"])
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "api_keys_per_user" in str(detail(caught.value, error_details_pb2.QuotaFailure))
    finally:
        await server.shutdown(grace=0)


# The user record and keys.


async def test_update_user_with_etag(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    registered = await register(channel)
    access = bearer(registered.tokens.access_token)
    user = registered.user
    user.display_name = "Ada"
    mask = field_mask_pb2.FieldMask(paths=["display_name"])
    updated = await stub.UpdateUser(
        auth_pb2.UpdateUserRequest(user=user, update_mask=mask),
        metadata=access,
        timeout=CALL_DEADLINE_S,
    )
    assert updated.user.display_name == "Ada"
    assert updated.user.etag != registered.user.etag
    with pytest.raises(aio.AioRpcError) as caught:  # stale etag
        await stub.UpdateUser(
            auth_pb2.UpdateUserRequest(user=user, update_mask=mask),
            metadata=access,
            timeout=CALL_DEADLINE_S,
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    other = auth_pb2.User(name="users/" + "0" * 32, display_name="x")
    with pytest.raises(aio.AioRpcError) as caught:  # someone else's user
        await stub.UpdateUser(
            auth_pb2.UpdateUserRequest(user=other, update_mask=mask),
            metadata=access,
            timeout=CALL_DEADLINE_S,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as caught:  # email is not updatable here
        await stub.UpdateUser(
            auth_pb2.UpdateUserRequest(
                user=updated.user, update_mask=field_mask_pb2.FieldMask(paths=["email"])
            ),
            metadata=access,
            timeout=CALL_DEADLINE_S,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_jwks_publishes_the_signing_key(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub, shared: Shared
) -> None:
    jwks = await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=CALL_DEADLINE_S)
    expected = shared.keys.jwks()
    assert json.loads(jwks.jwks_json) == {"keys": expected}
    assert [k.kid for k in jwks.keys] == [k["kid"] for k in expected]
    assert all(k.kty == "OKP" and k.alg == "EdDSA" for k in jwks.keys)


async def test_security_events_carry_no_secrets(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub, shared: Shared
) -> None:
    registered = await register(channel)
    await _login(stub, registered.user.email)
    events = [e for e in shared.bus.recent() if e.user == registered.user.name]
    assert [e.security.kind for e in events] == [events_pb2.SECURITY_EVENT_KIND_LOGIN_SUCCEEDED] * 2
    text = "".join(str(e) for e in events)
    for secret in (PASSWORD, registered.tokens.refresh_token, registered.tokens.access_token):
        assert secret not in text


async def test_login_events_logged_without_secrets(
    channel: aio.Channel, stub: auth_pb2_grpc.AuthServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="switchboard.security")
    registered = await register(channel)
    with pytest.raises(aio.AioRpcError):
        await _login(stub, registered.user.email, "a wrong password!!")
    records = [r for r in caplog.records if r.name == "switchboard.security"]
    assert [getattr(r, "event", "") for r in records] == ["login_succeeded", "login_failed"]
    logged = " ".join(str(r.__dict__) for r in records)
    assert PASSWORD not in logged
    assert "a wrong password!!" not in logged
    assert registered.tokens.access_token not in logged
