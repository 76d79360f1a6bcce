"""Sign-in throttling: per account and address first, then an account-wide ceiling.

Nobody can deny a user sign-in by guessing their password from elsewhere: the
guesser's own address is throttled for that account, while the owner's correct
password from their address still signs in. The server listens on both stacks,
so the IPv4 and IPv6 loopback addresses are two real client addresses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.auth.accounts import throttle_address
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import make_settings
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, detail, register, unique_email

pytestmark = pytest.mark.service

PAIR_LIMIT = 3
ACCOUNT_LIMIT = 5
WRONG = "not the password at all"


@pytest.fixture
def settings(redis_url: str | None) -> Settings:
    return make_settings(
        host="::",  # both stacks: 127.0.0.1 and ::1 are two client addresses
        redis_url=redis_url or "",
        login_max_failures_per_account_address=PAIR_LIMIT,
        login_max_failures_per_account=ACCOUNT_LIMIT,
        login_max_attempts_per_address=1000,
    )


@pytest.fixture(params=["memory", "redis"])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    # Counters live in the cache: the in-memory one, or Redis when configured.
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def stubs(
    mesh: SwitchboardServer,
) -> AsyncIterator[tuple[auth_pb2_grpc.AuthServiceAsyncStub, auth_pb2_grpc.AuthServiceAsyncStub]]:
    async with (
        aio.insecure_channel(f"127.0.0.1:{mesh.port}") as v4,
        aio.insecure_channel(f"[::1]:{mesh.port}") as v6,
    ):
        yield auth_pb2_grpc.AuthServiceStub(v4), auth_pb2_grpc.AuthServiceStub(v6)


async def _login(stub: auth_pb2_grpc.AuthServiceAsyncStub, email: str, password: str) -> str:
    """The status of one password sign-in: "OK" or the code's name."""
    try:
        await stub.Login(
            auth_pb2.LoginRequest(
                password=auth_pb2.PasswordCredential(email=email, password=password)
            ),
            timeout=30,
        )
    except aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            retry = detail(exc, error_details_pb2.RetryInfo)
            assert 0 < retry.retry_delay.seconds <= 900
        return str(exc.code().name)
    return "OK"


async def _throttled_message(stub: auth_pb2_grpc.AuthServiceAsyncStub, email: str) -> str:
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.Login(
            auth_pb2.LoginRequest(
                password=auth_pb2.PasswordCredential(email=email, password=PASSWORD)
            ),
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return caught.value.details() or ""


async def test_a_guesser_elsewhere_cannot_lock_the_owner_out(
    mesh: SwitchboardServer,
    stubs: tuple[auth_pb2_grpc.AuthServiceAsyncStub, auth_pb2_grpc.AuthServiceAsyncStub],
) -> None:
    owner, attacker = stubs
    async with aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
        email = unique_email("victim")
        await register(channel, email)
    # The attacker guesses far past every old per-account limit.
    codes = [await _login(attacker, email, f"{WRONG} {n}") for n in range(PAIR_LIMIT + 7)]
    assert codes[:PAIR_LIMIT] == ["UNAUTHENTICATED"] * PAIR_LIMIT
    assert set(codes[PAIR_LIMIT:]) == {"RESOURCE_EXHAUSTED"}
    # Throttled for this account from there: even the right password is refused.
    assert "from this address" in await _throttled_message(attacker, email)
    # The owner, from their own address, signs in at once.
    assert await _login(owner, email, PASSWORD) == "OK"
    # And the owner's own typos do not count what the attacker did.
    assert await _login(owner, email, WRONG) == "UNAUTHENTICATED"
    assert await _login(owner, email, PASSWORD) == "OK"


async def test_the_account_wide_ceiling_stops_guessing_from_many_addresses(
    mesh: SwitchboardServer,
    stubs: tuple[auth_pb2_grpc.AuthServiceAsyncStub, auth_pb2_grpc.AuthServiceAsyncStub],
) -> None:
    first, second = stubs
    async with aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
        email = unique_email("target")
        await register(channel, email)
    assert [await _login(second, email, WRONG) for _ in range(PAIR_LIMIT)] == [
        "UNAUTHENTICATED"
    ] * PAIR_LIMIT
    assert await _login(second, email, WRONG) == "RESOURCE_EXHAUSTED"  # that pair is done
    rest = ACCOUNT_LIMIT - PAIR_LIMIT
    assert [await _login(first, email, WRONG) for _ in range(rest)] == ["UNAUTHENTICATED"] * rest
    # This address is below its own limit, but the account has had enough for this window.
    message = await _throttled_message(first, email)
    assert message.startswith("too many failed sign-in attempts for this account")
    assert "from this address" not in message
    # Other accounts are unaffected from either address.
    async with aio.insecure_channel(f"[::1]:{mesh.port}") as channel:
        other = unique_email("bystander")
        await register(channel, other)
    assert await _login(second, other, PASSWORD) == "OK"


async def test_a_correct_password_resets_its_own_failures(
    stubs: tuple[auth_pb2_grpc.AuthServiceAsyncStub, auth_pb2_grpc.AuthServiceAsyncStub],
    mesh: SwitchboardServer,
) -> None:
    owner, _ = stubs
    async with aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
        email = unique_email("typist")
        await register(channel, email)
    for _ in range(3):  # more failures in total than either limit, none in a row
        for _ in range(PAIR_LIMIT - 1):
            assert await _login(owner, email, WRONG) == "UNAUTHENTICATED"
        assert await _login(owner, email, PASSWORD) == "OK"


@pytest.mark.parametrize(
    ("address", "unit"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("unix:/run/switchboard.sock", "unix:/run/switchboard.sock"),
    ],
)
def test_an_ipv6_client_is_throttled_as_its_64(address: str, unit: str) -> None:
    # One IPv6 client usually holds a /64: rotating addresses in it changes nothing.
    assert throttle_address(address) == unit
