"""The auth domain without gRPC: refresh rotation, session and API key limits,
revocation, the caller's own scopes, and sign-in throttling.

``Accounts`` is built as a process builds it (``mesh.open_shared`` then
``auth/build.py``): a SQLite file, the embedded cache and event bus. Callers
are the principals the process's authenticator makes of their credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.auth import build
from switchboard.auth.accounts import Accounts, ClientContext, SignIn
from switchboard.auth.store import AuthStore
from switchboard.mesh import open_shared
from switchboard.platform.errors import (
    EtagMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    RateLimited,
    SessionRevoked,
    Unauthenticated,
)
from switchboard.platform.process import Shared
from switchboard.platform.security.policy import AuthMethod, Principal
from switchboard.settings import Settings

pytestmark = pytest.mark.unit

PASSWORD = "correct horse battery staple 42"
HERE = "192.0.2.10"
_serial = itertools.count()


@dataclass
class Auth:
    shared: Shared
    accounts: Accounts
    store: AuthStore

    async def user(self) -> str:
        """A new user without a password (no hashing); its id."""
        user = await self.store.create_user(f"user-{next(_serial)}@example.com", "User", None)
        return user.id

    async def sign_in(self, user_id: str) -> SignIn:
        user = await self.store.user_by_id(user_id)
        assert user is not None
        return await self.accounts.start_session(
            user, AuthMethod.PASSWORD, ClientContext(address=HERE)
        )

    async def caller(self, credential: str) -> Principal:
        return await self.shared.authenticator.authenticate(credential)

    def security_events(self, user_id: str) -> list[events_pb2.Event]:
        return [
            event
            for event in self.shared.bus.recent()
            if event.user == f"users/{user_id}" and event.type == events_pb2.EVENT_TYPE_SECURITY
        ]


OpenAuth = Callable[..., Awaitable[Auth]]


@pytest.fixture
async def open_auth(tmp_path: Path) -> AsyncIterator[OpenAuth]:
    """Opens the auth domain with settings overridden as asked; closed after the test."""
    async with contextlib.AsyncExitStack() as resources:

        async def open_(**overrides: object) -> Auth:
            values: dict[str, object] = {
                "host": "127.0.0.1",
                "port": 0,
                "dev_mode": True,
                "services": ("auth",),
                "database_url": f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}",
            }
            values.update(overrides)
            settings = Settings.from_values(**values)
            shared = await open_shared(settings, resources)
            return Auth(shared, await build.accounts(shared), AuthStore(shared.database))

        yield open_


@pytest.fixture
async def auth(open_auth: OpenAuth) -> Auth:
    return await open_auth()


def _refresh(token: str) -> auth_pb2.RefreshTokenRequest:
    return auth_pb2.RefreshTokenRequest(refresh_token=token)


# -- refresh tokens ---------------------------------------------------------------------


async def test_a_refresh_token_is_exchanged_for_new_tokens_in_the_same_session(
    auth: Auth,
) -> None:
    first = await auth.sign_in(await auth.user())
    renewed = (await auth.accounts.refresh(_refresh(first.tokens.refresh_token), HERE)).tokens
    assert renewed.refresh_token != first.tokens.refresh_token
    caller = await auth.caller(renewed.access_token)
    assert caller.session_id == first.session.id
    # The session's lifetime is the family's: rotation does not extend it.
    assert renewed.refresh_token_expire_time == first.tokens.refresh_token_expire_time


async def test_a_spent_refresh_token_presented_again_ends_its_whole_session(auth: Auth) -> None:
    user_id = await auth.user()
    first = await auth.sign_in(user_id)
    renewed = (await auth.accounts.refresh(_refresh(first.tokens.refresh_token), HERE)).tokens

    with pytest.raises(SessionRevoked):
        await auth.accounts.refresh(_refresh(first.tokens.refresh_token), HERE)

    # Every token of the family is dead, the newest one included.
    with pytest.raises(Unauthenticated):
        await auth.accounts.refresh(_refresh(renewed.refresh_token), HERE)
    with pytest.raises(SessionRevoked):
        await auth.caller(renewed.access_token)
    reuse = [
        event
        for event in auth.security_events(user_id)
        if event.security.kind == events_pb2.SECURITY_EVENT_KIND_REFRESH_REUSE_DETECTED
    ]
    assert [event.security.session for event in reuse] == [
        f"users/{user_id}/sessions/{first.session.id}"
    ]


async def test_two_redemptions_of_one_refresh_token_at_once_are_one_rotation_and_one_reuse(
    auth: Auth,
) -> None:
    first = await auth.sign_in(await auth.user())
    token = first.tokens.refresh_token
    outcomes = await asyncio.gather(
        auth.accounts.refresh(_refresh(token), HERE),
        auth.accounts.refresh(_refresh(token), HERE),
        return_exceptions=True,
    )
    assert sorted(type(outcome).__name__ for outcome in outcomes) == [
        "RefreshTokenResponse",
        "SessionRevoked",
    ]
    with pytest.raises(SessionRevoked):
        await auth.caller(first.tokens.access_token)


async def test_a_refresh_token_we_never_issued_is_refused(auth: Auth) -> None:
    with pytest.raises(Unauthenticated):
        await auth.accounts.refresh(_refresh("sbr_" + "A" * 43), HERE)
    with pytest.raises(Unauthenticated):
        await auth.accounts.refresh(_refresh("not a refresh token"), HERE)
    with pytest.raises(InvalidArgument):
        await auth.accounts.refresh(_refresh(""), HERE)


# -- sessions -------------------------------------------------------------------------


async def test_a_new_session_beyond_the_limit_evicts_the_least_recently_seen(
    open_auth: OpenAuth,
) -> None:
    auth = await open_auth(max_sessions_per_user=2)
    user_id = await auth.user()
    oldest, middle, newest = [await auth.sign_in(user_id) for _ in range(3)]

    with pytest.raises(SessionRevoked):
        await auth.caller(oldest.tokens.access_token)
    for kept in (middle, newest):
        assert (await auth.caller(kept.tokens.access_token)).session_id == kept.session.id
    caller = await auth.caller(newest.tokens.access_token)
    live = await auth.accounts.list_sessions(caller, auth_pb2.ListSessionsRequest())
    assert [(s.name.rpartition("/")[2], s.current) for s in live.sessions] == [
        (newest.session.id, True),
        (middle.session.id, False),
    ]
    every = await auth.accounts.list_sessions(
        caller, auth_pb2.ListSessionsRequest(show_inactive=True)
    )
    assert [s.HasField("revoke_time") for s in every.sessions] == [False, False, True]
    evicted = [
        event.security.session
        for event in auth.security_events(user_id)
        if event.security.kind == events_pb2.SECURITY_EVENT_KIND_SESSION_REVOKED
    ]
    assert evicted == [f"users/{user_id}/sessions/{oldest.session.id}"]


async def test_sessions_page_newest_first_with_tokens_bound_to_the_filters(auth: Auth) -> None:
    user_id = await auth.user()
    signed = [await auth.sign_in(user_id) for _ in range(3)]
    caller = await auth.caller(signed[-1].tokens.access_token)
    seen: list[str] = []
    token = ""
    while True:
        page = await auth.accounts.list_sessions(
            caller, auth_pb2.ListSessionsRequest(page_size=2, page_token=token)
        )
        seen += [s.name.rpartition("/")[2] for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
        with pytest.raises(InvalidArgument):
            await auth.accounts.list_sessions(
                caller, auth_pb2.ListSessionsRequest(page_token=token, show_inactive=True)
            )
    assert seen == [s.session.id for s in reversed(signed)]


async def test_a_caller_revokes_only_their_own_sessions(auth: Auth) -> None:
    mine = await auth.sign_in(await auth.user())
    theirs = await auth.sign_in(await auth.user())
    caller = await auth.caller(mine.tokens.access_token)
    other = f"users/{caller.user_id}/sessions/{theirs.session.id}"
    with pytest.raises(NotFound):
        await auth.accounts.revoke_session(caller, auth_pb2.RevokeSessionRequest(name=other))
    assert (await auth.caller(theirs.tokens.access_token)).session_id == theirs.session.id


async def test_revoking_all_sessions_can_keep_the_callers_own(auth: Auth) -> None:
    user_id = await auth.user()
    current, *others = [await auth.sign_in(user_id) for _ in range(3)]
    caller = await auth.caller(current.tokens.access_token)
    answer = await auth.accounts.revoke_all_sessions(
        caller, auth_pb2.RevokeAllSessionsRequest(keep_current=True)
    )
    assert answer.revoked_count == 2
    for gone in others:
        with pytest.raises(SessionRevoked):
            await auth.caller(gone.tokens.access_token)
    await auth.caller(current.tokens.access_token)


# -- API keys -------------------------------------------------------------------------


async def test_api_keys_are_limited_per_user_and_a_revoked_one_frees_its_place(
    open_auth: OpenAuth,
) -> None:
    auth = await open_auth(max_api_keys_per_user=2)
    caller = await auth.caller((await auth.sign_in(await auth.user())).tokens.access_token)
    create = auth_pb2.CreateApiKeyRequest(display_name="ci", scopes=["read"])
    first, _ = [await auth.accounts.create_api_key(caller, create) for _ in range(2)]
    with pytest.raises(QuotaExceeded):
        await auth.accounts.create_api_key(caller, create)

    key = await auth.caller(first.secret)
    assert key.api_key_id == first.api_key.name.rpartition("/")[2]
    revoked = await auth.accounts.revoke_api_key(
        caller, auth_pb2.RevokeApiKeyRequest(name=first.api_key.name)
    )
    assert revoked.api_key.HasField("revoke_time")
    with pytest.raises(Unauthenticated):
        await auth.caller(first.secret)
    await auth.accounts.create_api_key(caller, create)

    live = await auth.accounts.list_api_keys(caller, auth_pb2.ListApiKeysRequest())
    every = await auth.accounts.list_api_keys(
        caller, auth_pb2.ListApiKeysRequest(show_inactive=True)
    )
    assert len(live.api_keys) == 2
    assert len(every.api_keys) == 3
    assert first.api_key.name not in {k.name for k in live.api_keys}


async def test_an_api_key_never_has_more_scopes_than_its_creator(auth: Auth) -> None:
    caller = await auth.caller((await auth.sign_in(await auth.user())).tokens.access_token)
    reader = await auth.accounts.create_api_key(
        caller, auth_pb2.CreateApiKeyRequest(display_name="reader", scopes=["read"])
    )
    as_key = await auth.caller(reader.secret)
    with pytest.raises(InvalidArgument) as refused:
        await auth.accounts.create_api_key(
            as_key, auth_pb2.CreateApiKeyRequest(display_name="wider", scopes=["read", "write"])
        )
    assert [v.field for v in refused.value.violations] == ["scopes"]
    # A key has no session to end.
    with pytest.raises(FailedPrecondition):
        await auth.accounts.logout(as_key)


# -- the user record ------------------------------------------------------------------


async def test_an_update_with_a_stale_etag_is_refused(auth: Auth) -> None:
    caller = await auth.caller((await auth.sign_in(await auth.user())).tokens.access_token)
    before = (await auth.accounts.get_principal(caller)).user
    mask = auth_pb2.UpdateUserRequest(user=auth_pb2.User(display_name="Renamed", etag=before.etag))
    mask.update_mask.paths.append("display_name")
    renamed = (await auth.accounts.update_user(caller, mask)).user
    assert (renamed.display_name, renamed.etag) == ("Renamed", '"2"')
    with pytest.raises(EtagMismatch):
        await auth.accounts.update_user(caller, mask)


# -- sign-in throttling ---------------------------------------------------------------


async def _registered(auth: Auth) -> str:
    email = f"login-{next(_serial)}@example.com"
    await auth.accounts.register(
        auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name="Login"), HERE
    )
    return email


async def _login(auth: Auth, email: str, password: str, address: str) -> auth_pb2.LoginResponse:
    request = auth_pb2.LoginRequest(
        password=auth_pb2.PasswordCredential(email=email, password=password)
    )
    return await auth.accounts.login(request, address)


async def test_failed_passwords_throttle_the_account_from_that_address_only(
    open_auth: OpenAuth,
) -> None:
    auth = await open_auth(
        login_max_failures_per_account_address=2, login_max_failures_per_account=10
    )
    email = await _registered(auth)
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await _login(auth, email, "wrong password 1234", "192.0.2.1")
    # Throttled before the password is checked: the right one is refused too.
    with pytest.raises(RateLimited):
        await _login(auth, email, PASSWORD, "192.0.2.1")
    # The owner, elsewhere, still signs in.
    await _login(auth, email, PASSWORD, "198.51.100.7")


async def test_a_correct_password_forgives_the_failures_before_it(open_auth: OpenAuth) -> None:
    auth = await open_auth(login_max_failures_per_account_address=2)
    email = await _registered(auth)
    with pytest.raises(Unauthenticated):
        await _login(auth, email, "wrong password 1234", "192.0.2.1")
    await _login(auth, email, PASSWORD, "192.0.2.1")
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await _login(auth, email, "wrong password 1234", "192.0.2.1")


async def test_failures_from_many_addresses_together_throttle_the_account(
    open_auth: OpenAuth,
) -> None:
    auth = await open_auth(login_max_failures_per_account=2)
    email = await _registered(auth)
    for address in ("192.0.2.1", "192.0.2.2"):
        with pytest.raises(Unauthenticated):
            await _login(auth, email, "wrong password 1234", address)
    with pytest.raises(RateLimited):
        await _login(auth, email, PASSWORD, "192.0.2.3")


async def test_one_ipv6_slash_64_counts_as_one_address(open_auth: OpenAuth) -> None:
    auth = await open_auth(login_max_attempts_per_address=2)
    for address in ("2001:db8::1", "2001:db8::2"):
        with pytest.raises(Unauthenticated):
            await _login(auth, "nobody@example.com", "wrong password 1234", address)
    with pytest.raises(RateLimited):
        await _login(auth, "nobody@example.com", "wrong password 1234", "2001:db8::ffff")
    # The next /64 is another address.
    with pytest.raises(Unauthenticated):
        await _login(auth, "nobody@example.com", "wrong password 1234", "2001:db8:0:1::1")
