"""Access-token verification under attack: every forgery is UNAUTHENTICATED."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from switchboard.platform.errors import TokenExpired, Unauthenticated
from switchboard.platform.security.credentials.accesstokens import (
    ACCESS_TOKEN_TYPE,
    AccessTokens,
    KeyRing,
    SigningKey,
    TokenPolicy,
)

pytestmark = pytest.mark.unit

POLICY = TokenPolicy(issuer="https://switchboard.test", audience="switchboard", access_ttl_s=900)
NOW = 1_900_000_000.0


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate("k1")


@pytest.fixture
def tokens(key: SigningKey) -> AccessTokens:
    return AccessTokens(KeyRing(key), POLICY)


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": POLICY.issuer,
        "aud": POLICY.audience,
        "sub": "users/u1",
        "sid": "users/u1/sessions/s1",
        "jti": "j1",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 900,
        "typ": "access",
        "scope": "mesh",
    }
    # An override of None leaves the claim out (no base claim is None).
    return {name: value for name, value in {**claims, **overrides}.items() if value is not None}


def _sign(key: SigningKey, claims: dict[str, Any], **headers: Any) -> str:
    merged = {"kid": key.kid, "typ": ACCESS_TOKEN_TYPE, **headers}
    return jwt.encode(claims, key.private_key, algorithm="EdDSA", headers=merged)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _reject(tokens: AccessTokens, token: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        tokens.verify(token, now=NOW)
    assert not isinstance(caught.value, TokenExpired)


def test_round_trip(tokens: AccessTokens) -> None:
    token, issued = tokens.issue(
        subject="users/u1", session="users/u1/sessions/s1", scopes=["b", "a"], now=NOW
    )
    verified = tokens.verify(token, now=NOW + 10)
    assert verified == issued
    assert verified.scopes == ("a", "b")
    assert verified.expires_at == int(NOW) + 900
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": "k1", "typ": ACCESS_TOKEN_TYPE}
    body = jwt.decode(token, options={"verify_signature": False})
    assert set(body) == {"iss", "aud", "sub", "sid", "jti", "iat", "nbf", "exp", "typ", "scope"}


def test_alg_none_is_rejected(tokens: AccessTokens) -> None:
    forged = f"{_b64({'alg': 'none', 'kid': 'k1', 'typ': ACCESS_TOKEN_TYPE})}.{_b64(_claims())}."
    _reject(tokens, forged)


def test_hs256_signed_with_the_public_key_is_rejected(
    tokens: AccessTokens, key: SigningKey
) -> None:
    public_pem = key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # PyJWT itself refuses asymmetric key material as an HMAC secret, so the
    # forgery is assembled by hand, as an attacker would.
    signing_input = (
        f"{_b64({'alg': 'HS256', 'kid': 'k1', 'typ': ACCESS_TOKEN_TYPE})}.{_b64(_claims())}"
    )
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    _reject(tokens, forged)


def test_tampered_signature_and_payload_are_rejected(tokens: AccessTokens, key: SigningKey) -> None:
    token = _sign(key, _claims())
    head, body, sig = token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    _reject(tokens, f"{head}.{body}.{flipped}")
    _reject(tokens, f"{head}.{_b64(_claims(sub='users/admin'))}.{sig}")


@pytest.mark.parametrize("missing", ["exp", "iat", "sub", "jti", "nbf", "sid", "iss", "aud", "typ"])
def test_missing_required_claims_are_rejected(
    tokens: AccessTokens, key: SigningKey, missing: str
) -> None:
    _reject(tokens, _sign(key, _claims(**{missing: None})))


def test_expired_token_is_token_expired(tokens: AccessTokens, key: SigningKey) -> None:
    token = _sign(key, _claims(exp=int(NOW) - 60))
    with pytest.raises(TokenExpired):
        tokens.verify(token, now=NOW)


def test_expiry_honours_leeway_only(tokens: AccessTokens, key: SigningKey) -> None:
    token = _sign(key, _claims(exp=int(NOW) - POLICY.leeway_s + 5))
    assert tokens.verify(token, now=NOW).subject == "users/u1"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_not_yet_valid_is_rejected(tokens: AccessTokens, key: SigningKey, claim: str) -> None:
    _reject(tokens, _sign(key, _claims(**{claim: int(NOW) + 3600})))


@pytest.mark.parametrize(
    "overrides",
    [{"aud": "someone-else"}, {"iss": "https://evil.example"}, {"typ": "refresh"}],
    ids=["wrong-aud", "wrong-iss", "wrong-typ"],
)
def test_wrong_audience_issuer_or_type_is_rejected(
    tokens: AccessTokens, key: SigningKey, overrides: dict[str, str]
) -> None:
    _reject(tokens, _sign(key, _claims(**overrides)))


@pytest.mark.parametrize(
    "kid",
    ["unknown", "../../etc/passwd", "k1' OR '1'='1", "/dev/null", "", "k" * 65],
)
def test_unknown_or_malicious_kid_is_rejected(tokens: AccessTokens, kid: str) -> None:
    attacker = SigningKey(kid="k1", private_key=SigningKey.generate().private_key)
    _reject(tokens, _sign(attacker, _claims(), kid=kid))


def test_token_signed_by_an_unknown_key_with_a_known_kid_is_rejected(
    tokens: AccessTokens,
) -> None:
    impostor = SigningKey(kid="k1", private_key=SigningKey.generate().private_key)
    _reject(tokens, _sign(impostor, _claims()))


def test_wrong_header_typ_is_rejected(tokens: AccessTokens, key: SigningKey) -> None:
    _reject(tokens, _sign(key, _claims(), typ="JWT"))


@pytest.mark.parametrize(
    "garbage",
    ["", "abc", "a.b", "a.b.c.d", "x" * 9000, "sbr_" + secrets.token_urlsafe(32)],
    ids=["empty", "word", "two-parts", "four-parts", "huge", "opaque-refresh-token"],
)
def test_garbage_and_refresh_tokens_are_rejected(tokens: AccessTokens, garbage: str) -> None:
    _reject(tokens, garbage)


def test_rotation_old_key_verifies_until_dropped(key: SigningKey) -> None:
    old = AccessTokens(KeyRing(key), POLICY)
    token, _ = old.issue(subject="users/u1", session="s", scopes=[], now=NOW)
    new_key = SigningKey.generate("k2")
    during = AccessTokens(KeyRing(new_key, previous=[key]), POLICY)
    assert during.verify(token, now=NOW).key_id == "k1"
    fresh, _ = during.issue(subject="users/u1", session="s", scopes=[], now=NOW)
    assert jwt.get_unverified_header(fresh)["kid"] == "k2"
    assert {k["kid"] for k in during.keys.jwks()} == {"k1", "k2"}
    after = AccessTokens(KeyRing(new_key), POLICY)
    _reject(after, token)
    assert after.verify(fresh, now=NOW).key_id == "k2"


def test_jwks_has_only_public_material(key: SigningKey) -> None:
    (jwk,) = KeyRing(key).jwks()
    assert jwk["kty"] == "OKP"
    assert jwk["crv"] == "Ed25519"
    assert jwk["alg"] == "EdDSA"
    assert "d" not in jwk
    # The published key verifies a real token (what Envoy's jwt_authn would do).
    public = jwt.PyJWK(jwk).key
    token = _sign(key, _claims())
    assert jwt.decode(
        token,
        public,
        algorithms=["EdDSA"],
        audience=POLICY.audience,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )


def test_real_clock_is_used_by_default(tokens: AccessTokens) -> None:
    token, _ = tokens.issue(subject="users/u1", session="s", scopes=[])
    assert tokens.verify(token).subject == "users/u1"
    old, _ = tokens.issue(subject="users/u1", session="s", scopes=[], now=time.time() - 3600)
    with pytest.raises(TokenExpired):
        tokens.verify(old)


def test_key_ring_rejects_bad_kids_and_duplicates(key: SigningKey) -> None:
    with pytest.raises(ValueError, match="must match"):
        KeyRing(SigningKey.generate("../x"))
    with pytest.raises(ValueError, match="unique"):
        KeyRing(key, previous=[SigningKey("k1", SigningKey.generate().private_key)])


def test_pem_loading_accepts_ed25519_only() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = SigningKey.generate().private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert SigningKey.from_pem("k9", pem).kid == "k9"
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(TypeError, match="not an Ed25519"):
        SigningKey.from_pem("k8", ec_pem)
