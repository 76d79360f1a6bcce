"""Opaque refresh tokens and API keys: high entropy, recognizable, stored only as keyed hashes."""

from __future__ import annotations

import pytest

from switchboard.platform.security.credentials.opaque import (
    OpaqueSecrets,
    looks_like_refresh_token,
    parse_api_key,
)

pytestmark = pytest.mark.unit

PEPPER = "p" * 40


def test_refresh_tokens_are_unique_prefixed_and_stored_hashed() -> None:
    box = OpaqueSecrets(PEPPER)
    issued = [box.new_refresh_token() for _ in range(200)]
    assert len({i.secret for i in issued}) == 200
    for item in issued:
        assert item.secret.startswith("sbr_")
        assert looks_like_refresh_token(item.secret)
        assert item.secret not in item.digest
        assert len(item.digest) == 64
        assert box.matches(item.secret, item.digest)
    assert not box.matches(issued[0].secret, issued[1].digest)


def test_digest_depends_on_the_pepper() -> None:
    token = OpaqueSecrets(PEPPER).new_refresh_token()
    assert not OpaqueSecrets("q" * 40).matches(token.secret, token.digest)


def test_api_keys_carry_a_public_id_and_a_secret() -> None:
    box = OpaqueSecrets(PEPPER)
    key_id, issued = box.new_api_key()
    assert issued.display_prefix == f"sbk_{key_id}"
    assert issued.secret.startswith(issued.display_prefix + "_")
    assert parse_api_key(issued.secret) == key_id
    assert box.matches(issued.secret, issued.digest)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sbk_",
        "sbk_ABCDEFGH_" + "a" * 43,
        "sbk_abcdefgh_short",
        "sbr_" + "a" * 43,
        "sbk_abcdefgh_" + "a" * 43 + "' OR 1=1 --",
    ],
)
def test_malformed_api_keys_are_not_parsed(value: str) -> None:
    assert parse_api_key(value) is None


def test_access_tokens_do_not_look_like_refresh_tokens() -> None:
    assert not looks_like_refresh_token("eyJhbGciOiJFZERTQSJ9.e30.sig")


def test_short_pepper_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        OpaqueSecrets("short")
