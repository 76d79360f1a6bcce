"""Credentials sealed at rest: round trip, binding to a purpose and a key, tampering."""

from __future__ import annotations

import pytest

from switchboard.platform.errors import Code, RequestTooLarge
from switchboard.platform.security.credentials.secretbox import (
    MAX_PLAINTEXT_BYTES,
    SecretBox,
    SecretUnreadable,
)

pytestmark = pytest.mark.unit

KEY = "k" * 40
PURPOSE = "workspaces/w/integrations/i#credential"
SECRET = "sk-live-0123456789abcdef"


def test_round_trip() -> None:
    box = SecretBox(KEY)
    for text in (SECRET, "", "ünïcødé ✓", "x" * MAX_PLAINTEXT_BYTES):
        assert box.open(box.seal(text, purpose=PURPOSE), purpose=PURPOSE) == text
    # Another instance with the same server secret (a restart, another replica).
    assert SecretBox(KEY).open(box.seal(SECRET, purpose=PURPOSE), purpose=PURPOSE) == SECRET


def test_the_database_may_hand_back_a_memoryview() -> None:
    box = SecretBox(KEY)
    sealed = box.seal(SECRET, purpose=PURPOSE)
    assert box.open(memoryview(sealed), purpose=PURPOSE) == SECRET


def test_a_value_does_not_open_for_another_purpose() -> None:
    box = SecretBox(KEY)
    sealed = box.seal(SECRET, purpose=PURPOSE)
    with pytest.raises(SecretUnreadable):
        box.open(sealed, purpose="workspaces/w/integrations/other#credential")


def test_a_value_does_not_open_under_another_key() -> None:
    sealed = SecretBox(KEY).seal(SECRET, purpose=PURPOSE)
    with pytest.raises(SecretUnreadable) as caught:
        SecretBox("z" * 40).open(sealed, purpose=PURPOSE)
    error = caught.value
    assert error.code is Code.FAILED_PRECONDITION
    assert "set the credential again" in error.message
    assert SECRET not in error.message


def test_tampering_is_detected() -> None:
    box = SecretBox(KEY)
    sealed = box.seal(SECRET, purpose=PURPOSE)
    for position in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[position] ^= 0x01
        with pytest.raises(SecretUnreadable):
            box.open(bytes(damaged), purpose=PURPOSE)
    for cut in (b"", sealed[:1], sealed[:20], sealed[:-1], sealed + b"\x00"):
        with pytest.raises(SecretUnreadable):
            box.open(cut, purpose=PURPOSE)


def test_every_seal_has_a_fresh_nonce() -> None:
    box = SecretBox(KEY)
    sealed = [box.seal(SECRET, purpose=PURPOSE) for _ in range(1000)]
    assert len({s[1:13] for s in sealed}) == 1000
    assert len(set(sealed)) == 1000
    assert {s[0] for s in sealed} == {1}


def test_the_plaintext_is_not_in_the_sealed_bytes() -> None:
    box = SecretBox(KEY)
    sealed = box.seal(SECRET, purpose=PURPOSE)
    assert SECRET.encode() not in sealed
    assert KEY.encode() not in sealed
    # Only the version byte, the nonce and the tag add to the length.
    assert len(sealed) == 1 + 12 + len(SECRET) + 16


def test_repr_shows_no_key_material() -> None:
    box = SecretBox(KEY)
    assert KEY not in repr(box)
    assert "k" * 8 not in repr(box)
    assert not hasattr(box, "__dict__")


def test_limits_and_arguments() -> None:
    box = SecretBox(KEY)
    with pytest.raises(RequestTooLarge):
        box.seal("x" * (MAX_PLAINTEXT_BYTES + 1), purpose=PURPOSE)
    with pytest.raises(ValueError, match="purpose"):
        box.seal(SECRET, purpose="")
    with pytest.raises(ValueError, match="secret"):
        SecretBox("")
