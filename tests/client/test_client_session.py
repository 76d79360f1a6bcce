"""switchboard.client.session: when a session renews itself, and that it renews once.

The keeper's clock is a test clock moved by hand and its exchange a recorded
coroutine: these are the decisions (due or not, single flight, a refresh
token presented at most once, what ends a session), without a server. The
same keeper against a real server: tests/client/test_client_auth.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import grpc
import pytest

from switchboard.api.auth.v1 import auth_pb2
from switchboard.client.backoff import Backoff
from switchboard.client.errors import (
    SessionRevoked,
    SignedOut,
    SwitchboardError,
    TokenExpired,
    Unauthenticated,
    Unavailable,
)
from switchboard.client.session import (
    RefreshNotSent,
    TokenKeeper,
    schedule,
    token_lifetime,
)
from switchboard.platform.security.credentials.accesstokens import (
    AccessTokens,
    KeyRing,
    SigningKey,
    TokenPolicy,
)
from tests.infra.clock import FakeClock

pytestmark = pytest.mark.unit

WALL = 1_800_000_000.0


def _jwt(iat: float, exp: float) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'EdDSA'})}.{part({'iat': iat, 'exp': exp, 'sub': 'u'})}.c2ln"


_serial = iter(range(1, 1_000_000))


def _pair(
    lifetime_s: float = 900.0, *, issued: float = WALL, expires: float | None = None
) -> auth_pb2.TokenPair:
    n = next(_serial)
    pair = auth_pb2.TokenPair(
        access_token=_jwt(issued, issued + lifetime_s) + f"-{n}",
        refresh_token=f"sbr_{n}",
        token_type="Bearer",
    )
    pair.access_token_expire_time.FromSeconds(
        int(expires if expires is not None else issued + lifetime_s)
    )
    return pair


class Exchange:
    """A stand-in for the RefreshToken call: records each token, answers as told."""

    def __init__(self) -> None:
        self.presented: list[str] = []
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.failure: BaseException | None = None
        self.lifetime_s = 900.0

    async def __call__(self, refresh_token: str) -> auth_pb2.TokenPair:
        self.presented.append(refresh_token)
        self.entered.set()
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return _pair(self.lifetime_s)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=100.0)


def _keeper(exchange: Exchange, clock: FakeClock, **kwargs: object) -> TokenKeeper:
    return TokenKeeper(exchange, clock=clock, wall=lambda: WALL, **kwargs)  # type: ignore[arg-type]


# -- when --------------------------------------------------------------------------------


def test_the_lifetime_is_read_from_a_real_access_token() -> None:
    tokens = AccessTokens(
        KeyRing(SigningKey.generate("k1")), TokenPolicy("iss", "aud", access_ttl_s=600)
    )
    token, _ = tokens.issue(subject="u", session="s", scopes=["read"])
    assert token_lifetime(token) == 600
    assert token_lifetime("not-a-jwt") is None
    assert token_lifetime("a.!!!.c") is None
    assert token_lifetime("a.bnVsbA.c") is None  # "null"


def test_a_fresh_pair_is_timed_by_its_lifetime_not_the_wall_clock() -> None:
    # The client's wall clock is an hour off: the expiry field alone would say
    # the token died long ago (or lives an hour too long).
    pair = _pair(900.0, issued=WALL - 3600)
    times = schedule(pair, now=10.0, wall_now=WALL, fresh=True, margin_s=60)
    assert times.expire_at == 910.0
    assert times.refresh_at == 850.0
    assert not times.due(849.9)
    assert times.due(850.0)


def test_a_restored_pair_is_timed_by_its_expiry_and_the_wall_clock() -> None:
    pair = _pair(900.0, issued=WALL - 600)  # 300 s left
    times = schedule(pair, now=10.0, wall_now=WALL, fresh=False, margin_s=60)
    assert times.expire_at == 310.0
    assert times.refresh_at == 250.0
    dead = schedule(_pair(900.0, issued=WALL - 3600), now=10.0, wall_now=WALL, fresh=False)
    assert dead.due(10.0)
    assert dead.expired(10.0)


def test_short_tokens_are_refreshed_halfway() -> None:
    times = schedule(_pair(60.0), now=0.0, wall_now=WALL, fresh=True, margin_s=60)
    assert times.refresh_at == 30.0
    assert times.expire_at == 60.0


# -- how often ---------------------------------------------------------------------------


async def test_not_due_means_no_refresh(clock: FakeClock) -> None:
    exchange = Exchange()
    keeper = _keeper(exchange, clock)
    first = _pair()
    keeper.use_session(first, fresh=True)
    clock.advance(839.0)
    assert await keeper.bearer() == first.access_token
    assert exchange.presented == []


async def test_many_calls_that_find_the_token_due_share_one_refresh(clock: FakeClock) -> None:
    exchange = Exchange()
    seen: list[auth_pb2.TokenPair | None] = []
    keeper = _keeper(exchange, clock, on_tokens=seen.append)
    first = _pair()
    keeper.use_session(first, fresh=True)
    clock.advance(841.0)
    exchange.gate.clear()
    callers = [asyncio.ensure_future(keeper.bearer()) for _ in range(50)]
    await exchange.entered.wait()
    exchange.gate.set()
    bearers = await asyncio.gather(*callers)
    assert exchange.presented == [first.refresh_token]
    assert len(set(bearers)) == 1
    assert bearers[0] != first.access_token
    assert keeper.refreshes == 1
    assert len(seen) == 1
    assert seen[0] is not None
    assert seen[0].access_token == bearers[0]
    # Renewed: not due again until the new token's own time.
    assert await keeper.bearer() == bearers[0]
    assert len(exchange.presented) == 1


async def test_a_caller_that_gives_up_does_not_abort_the_refresh(clock: FakeClock) -> None:
    exchange = Exchange()
    keeper = _keeper(exchange, clock)
    keeper.use_session(_pair(), fresh=True)
    clock.advance(900.0)
    exchange.gate.clear()
    impatient = asyncio.ensure_future(keeper.bearer())
    patient = asyncio.ensure_future(keeper.bearer())
    await exchange.entered.wait()
    impatient.cancel()
    exchange.gate.set()
    renewed = await patient
    assert impatient.cancelled()
    assert keeper.current() == renewed
    assert len(exchange.presented) == 1


async def test_a_refusal_of_a_token_already_replaced_just_retries(clock: FakeClock) -> None:
    exchange = Exchange()
    keeper = _keeper(exchange, clock)
    old = _pair()
    keeper.use_session(old, fresh=True)
    clock.advance(850.0)
    await keeper.bearer()  # renewed by another caller
    assert len(exchange.presented) == 1
    await keeper.rejected(old.access_token, TokenExpired("expired"))
    assert len(exchange.presented) == 1


async def test_a_refused_access_token_is_renewed_once(clock: FakeClock) -> None:
    exchange = Exchange()
    keeper = _keeper(exchange, clock)
    pair = _pair()
    keeper.use_session(pair, fresh=True)  # not due by the clock; the server disagrees
    await asyncio.gather(
        *(keeper.rejected(pair.access_token, TokenExpired("expired")) for _ in range(10))
    )
    assert exchange.presented == [pair.refresh_token]
    assert keeper.current() != pair.access_token


# -- at most once ------------------------------------------------------------------------


async def test_a_refresh_token_that_was_sent_is_never_sent_again(clock: FakeClock) -> None:
    exchange = Exchange()
    exchange.failure = Unavailable("connection reset", code=grpc.StatusCode.UNAVAILABLE)
    seen: list[auth_pb2.TokenPair | None] = []
    keeper = _keeper(exchange, clock, on_tokens=seen.append)
    pair = _pair()
    keeper.use_session(pair, fresh=True)
    clock.advance(850.0)
    # The answer was lost: the access token still serves while it lives.
    assert await keeper.bearer() == pair.access_token
    clock.advance(40.0)
    assert await keeper.bearer() == pair.access_token
    with pytest.raises(SignedOut):
        await keeper.refresh()
    assert exchange.presented == [pair.refresh_token]
    # Once the server refuses the access token, the session is over.
    with pytest.raises(SignedOut) as ended:
        await keeper.rejected(pair.access_token, TokenExpired("expired"))
    assert isinstance(ended.value.__cause__, TokenExpired)
    assert exchange.presented == [pair.refresh_token]
    assert seen == [None]
    with pytest.raises(SignedOut):
        await keeper.bearer()


async def test_a_refresh_that_could_not_be_sent_keeps_its_token(clock: FakeClock) -> None:
    exchange = Exchange()
    unreachable = Unavailable("not reachable", code=grpc.StatusCode.UNAVAILABLE)
    exchange.failure = RefreshNotSent(unreachable)
    keeper = _keeper(exchange, clock, backoff=Backoff(initial_s=5.0, max_s=5.0, jitter=0.0))
    pair = _pair()
    keeper.use_session(pair, fresh=True)
    clock.advance(850.0)
    assert await keeper.bearer() == pair.access_token
    # Backing off: the next calls do not try again at once.
    clock.advance(1.0)
    assert await keeper.bearer() == pair.access_token
    assert exchange.presented == [pair.refresh_token]
    exchange.failure = None
    clock.advance(5.0)
    renewed = await keeper.bearer()
    assert renewed != pair.access_token
    assert exchange.presented == [pair.refresh_token, pair.refresh_token]


async def test_an_unreachable_server_fails_the_call_once_the_token_is_dead(
    clock: FakeClock,
) -> None:
    exchange = Exchange()
    exchange.failure = RefreshNotSent(Unavailable("down", code=grpc.StatusCode.UNAVAILABLE))
    keeper = _keeper(exchange, clock)
    keeper.use_session(_pair(), fresh=True)
    clock.advance(901.0)
    with pytest.raises(Unavailable):
        await keeper.bearer()


# -- the end of a session ----------------------------------------------------------------


async def test_a_refused_refresh_signs_out(clock: FakeClock) -> None:
    exchange = Exchange()
    exchange.failure = Unauthenticated("invalid refresh token", domain="switchboard.dev")
    seen: list[auth_pb2.TokenPair | None] = []
    keeper = _keeper(exchange, clock, on_tokens=seen.append)
    pair = _pair()
    keeper.use_session(pair, fresh=True)
    clock.advance(850.0)
    with pytest.raises(SignedOut) as ended:
        await keeper.bearer()
    assert isinstance(ended.value.__cause__, Unauthenticated)
    assert keeper.kind == "none"
    assert seen == [None]
    with pytest.raises(SignedOut):
        await keeper.bearer()
    # Signing in again starts over.
    keeper.use_session(_pair(), fresh=True)
    assert await keeper.bearer()


async def test_a_revoked_session_signs_out_without_a_refresh(clock: FakeClock) -> None:
    exchange = Exchange()
    keeper = _keeper(exchange, clock)
    pair = _pair()
    keeper.use_session(pair, fresh=True)
    with pytest.raises(SignedOut):
        await keeper.rejected(pair.access_token, SessionRevoked("logged out"))
    assert exchange.presented == []


async def test_signing_in_during_a_refresh_keeps_the_new_session(clock: FakeClock) -> None:
    exchange = Exchange()
    keeper = _keeper(exchange, clock)
    keeper.use_session(_pair(), fresh=True)
    clock.advance(850.0)
    exchange.gate.clear()
    waiting = asyncio.ensure_future(keeper.bearer())
    await exchange.entered.wait()
    newer = _pair()
    keeper.use_session(newer, fresh=True)
    exchange.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert keeper.current() == newer.access_token
    assert keeper.pair is not None
    assert keeper.pair.refresh_token == newer.refresh_token


async def test_an_api_key_is_presented_as_it_is_and_never_refreshed(clock: FakeClock) -> None:
    exchange = Exchange()
    keeper = _keeper(exchange, clock)
    keeper.use_api_key("sbk_abc")
    clock.advance(10**6)
    assert await keeper.bearer() == "sbk_abc"
    refused = Unauthenticated("revoked key")
    with pytest.raises(Unauthenticated) as raised:
        await keeper.rejected("sbk_abc", refused)
    assert raised.value is refused
    assert exchange.presented == []


async def test_a_failing_on_tokens_callback_does_not_fail_the_refresh(clock: FakeClock) -> None:
    def broken(pair: auth_pb2.TokenPair | None) -> None:
        raise OSError("disk full")

    exchange = Exchange()
    keeper = _keeper(exchange, clock, on_tokens=broken)
    pair = _pair()
    keeper.use_session(pair, fresh=True)
    renewed = await keeper.refresh()
    assert renewed.access_token != pair.access_token
    assert keeper.current() == renewed.access_token


async def test_no_credential_means_no_bearer(clock: FakeClock) -> None:
    keeper = _keeper(Exchange(), clock)
    assert await keeper.bearer() == ""
    with pytest.raises(SignedOut):
        await keeper.refresh()
    error: SwitchboardError = Unauthenticated("authentication required")
    with pytest.raises(Unauthenticated):
        await keeper.rejected("", error)


def test_the_real_clock_is_the_default() -> None:
    keeper = TokenKeeper(Exchange())
    keeper.use_session(_pair(900.0, issued=time.time()), fresh=True)
    times = keeper.times
    assert times is not None
    assert times.expire_at - time.monotonic() == pytest.approx(900.0, abs=5.0)
