"""SIP digest authentication of a trunk's INVITEs (``talk/sip/digest.py``): a challenge
answered as a carrier's user agent answers it (RFC 2617, MD5, ``qop=auth``) passes; a
wrong password or username, another realm or URI, a forged nonce and a missing field do
not; an old nonce asks for a fresh challenge."""

from __future__ import annotations

import hashlib
import re

import pytest

from switchboard.dispatcher.talk.sip import digest
from switchboard.dispatcher.talk.sip.digest import Digest

pytestmark = pytest.mark.unit

URI = "sip:+15550100@127.0.0.1:5060"
NOW = 1_800_000_000.0


def md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def answered(
    challenge: str,
    *,
    username: str = "carrier",
    password: str = "a long trunk secret",  # noqa: S107 - the test's own trunk
    uri: str = URI,
    qop: bool = True,
) -> str:
    """What a user agent sends back: the Authorization header's value."""
    fields = dict(re.findall(r'(\w+)="?([^",]+)"?', challenge))
    realm, nonce = fields["realm"], fields["nonce"]
    ha1 = md5(f"{username}:{realm}:{password}")
    ha2 = md5(f"INVITE:{uri}")
    if qop:
        response = md5(f"{ha1}:{nonce}:00000001:0a4f113b:auth:{ha2}")
        extra = ', qop=auth, nc=00000001, cnonce="0a4f113b"'
    else:
        response = md5(f"{ha1}:{nonce}:{ha2}")
        extra = ""
    return (
        f'Digest username="{username}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
        f'response="{response}", algorithm=MD5{extra}'
    )


def verdict(keeper: Digest, header: str, now: float = NOW) -> str:
    answer = digest.parse(header)
    assert answer is not None
    return keeper.check(
        answer,
        method="INVITE",
        request_uri=URI,
        username="carrier",
        password="a long trunk secret",
        now=now,
    )


def test_a_challenge_answered_right_passes_with_qop_and_without() -> None:
    keeper = Digest()
    challenge = keeper.challenge(now=NOW)
    assert challenge.startswith('Digest realm="switchboard", nonce="')
    assert 'qop="auth"' in challenge
    assert verdict(keeper, answered(challenge)) == "ok"
    assert verdict(keeper, answered(challenge, qop=False)) == "ok"


@pytest.mark.parametrize(
    "change",
    [
        {"password": "not the secret at all"},
        {"username": "someone"},
        {"uri": "sip:+15550199@127.0.0.1:5060"},
    ],
)
def test_a_wrong_answer_is_wrong(change: dict[str, str]) -> None:
    keeper = Digest()
    assert verdict(keeper, answered(keeper.challenge(now=NOW), **change)) == "wrong"  # type: ignore[arg-type]


def test_a_nonce_from_another_key_or_forged_is_wrong_and_an_old_one_stale() -> None:
    keeper = Digest()
    other = Digest().challenge(now=NOW)
    assert verdict(keeper, answered(other)) == "wrong"
    forged = keeper.challenge(now=NOW).replace('nonce="', 'nonce="1')
    assert verdict(keeper, answered(forged)) == "wrong"
    old = keeper.challenge(now=NOW - digest.NONCE_TTL_S - 1)
    assert verdict(keeper, answered(old)) == "stale"
    assert "stale=true" in keeper.challenge(stale=True)


def test_only_a_whole_digest_answer_parses() -> None:
    assert digest.parse("Basic dXNlcjpwYXNz") is None
    assert digest.parse('Digest username="a", realm="switchboard", nonce="n"') is None
    parsed = digest.parse(answered(Digest().challenge(now=NOW)))
    assert parsed is not None
    assert (parsed.username, parsed.uri, parsed.qop) == ("carrier", URI, "auth")
