"""Page tokens: signed with a key derived from the server secret, every decoded part checked."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchboard.platform.errors import InvalidArgument
from switchboard.platform.store import pagination
from switchboard.platform.store.pagination import COUNT, ID, ISO_TIME, MICROS, U64, Int, PageTokens

pytestmark = pytest.mark.unit

SECRET = "a server secret of at least thirty-two characters"
SHAPE = (MICROS, ID)


def forge(secret: str, body: object) -> str:
    """A token signed the way the server signs, with any body."""
    key = hmac.new(secret.encode(), b"switchboard/page-token/v1", hashlib.sha256).digest()
    raw = json.dumps(body, separators=(",", ":")).encode()
    mac = hmac.new(key, raw, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(mac + raw).decode().rstrip("=")


def refused(call: object) -> None:
    with pytest.raises(InvalidArgument) as caught:
        call()  # type: ignore[operator]
    assert [v.field for v in caught.value.violations] == ["page_token"]


def test_a_token_round_trips_for_the_same_filters() -> None:
    tokens = PageTokens(SECRET)
    token = tokens.encode([1_700_000_000_000_000, "abc-1"], "fp")
    assert tokens.decode(token, "fp", SHAPE) == [1_700_000_000_000_000, "abc-1"]
    refused(lambda: tokens.decode(token, "other filters", SHAPE))


def test_a_token_signed_with_another_secret_is_refused() -> None:
    """The key comes from the server secret: the old constant key (or any other) forges nothing."""
    token = PageTokens("another secret, also thirty-two characters long").encode([5, "x"], "fp")
    refused(lambda: PageTokens(SECRET).decode(token, "fp", SHAPE))
    old_constant = hmac.new(
        b"switchboard-page-token", json.dumps([1, [5, "x"], "fp"]).encode(), hashlib.sha256
    )
    legacy = base64.urlsafe_b64encode(old_constant.digest()[:8] + b'[1,[5,"x"],"fp"]').decode()
    refused(lambda: PageTokens(SECRET).decode(legacy.rstrip("="), "fp", SHAPE))


def test_processes_sharing_the_secret_accept_each_others_tokens() -> None:
    token = PageTokens(SECRET).encode([7, "id"], "fp")
    assert PageTokens(SECRET).decode(token, "fp", SHAPE) == [7, "id"]


@pytest.mark.parametrize(
    "key",
    [
        [-1, "abc"],  # negative time
        [2**70, "abc"],  # past year 9999
        [True, "abc"],  # a bool is not an int here
        [1.5, "abc"],
        ["1", "abc"],
        [1, "ABC"],  # not an id
        [1, "abc\n"],
        [1, "a" * 64],
        [1, 5],
        [1],  # wrong arity
        [1, "abc", "extra"],
        [None, "abc"],
        [[1], "abc"],
        [{"a": 1}, "abc"],
    ],
)
def test_a_correctly_signed_token_with_an_odd_key_is_refused(key: list[object]) -> None:
    tokens = PageTokens(SECRET)
    refused(lambda: tokens.decode(forge(SECRET, [1, key, "fp"]), "fp", SHAPE))


@pytest.mark.parametrize(
    "body", [[2, [1, "a"], "fp"], [1, [1, "a"]], {"v": 1}, "text", 5, None, [1, "a", "fp"]]
)
def test_a_correctly_signed_token_with_an_odd_layout_is_refused(body: object) -> None:
    refused(lambda: PageTokens(SECRET).decode(forge(SECRET, body), "fp", SHAPE))


def test_the_other_key_shapes() -> None:
    tokens = PageTokens(SECRET)
    for shape, good, bad in [
        ((COUNT,), [0], [-1]),
        ((U64, U64), [2**64 - 1, 0], [2**64, 0]),
        ((Int(0, 500),), [500], [501]),
        ((ISO_TIME, ID), ["2026-01-01T00:00:00+00:00", "a"], ["2026-13-01T00:00:00+00:00", "a"]),
        ((ISO_TIME, ID), ["2026-01-01T00:00:00+00:00", "a"], ["2026-01-01T00:00:00", "a"]),
    ]:
        assert tokens.decode(forge(SECRET, [1, good, "fp"]), "fp", shape) == good
        refused(
            lambda shape=shape, bad=bad: tokens.decode(forge(SECRET, [1, bad, "fp"]), "fp", shape)
        )


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=80)
    | st.binary(max_size=60).map(lambda b: base64.urlsafe_b64encode(b).decode())
)
def test_any_string_is_either_a_key_or_invalid_argument(token: str) -> None:
    try:
        PageTokens(SECRET).decode(token, "fp", SHAPE)
    except InvalidArgument:
        return
    raise AssertionError("an unsigned string decoded")


def test_an_overlong_token_is_refused() -> None:
    refused(lambda: PageTokens(SECRET).decode("A" * (pagination.MAX_TOKEN_CHARS + 4), "fp", SHAPE))


def test_a_secret_is_required() -> None:
    with pytest.raises(ValueError, match="secret"):
        PageTokens("")
