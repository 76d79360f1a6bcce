"""Access tokens: EdDSA-signed JWTs with key rotation, and their strict verification.

Verification trusts nothing in the token before the signature checks out: the
algorithm is pinned to EdDSA (so ``alg=none`` and HS256-with-the-public-key
fail), the ``kid`` must be well formed and known (never used as a path or a
query), and every registered claim we rely on is required. This module does
not import grpc; failures are ``Unauthenticated`` / ``TokenExpired``.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from switchboard.platform.errors import TokenExpired, Unauthenticated

ALGORITHM: Final = "EdDSA"
ACCESS_TOKEN_TYPE: Final = "at+jwt"  # noqa: S105 - RFC 9068 header typ, not a secret
ACCESS_CLAIM_TYPE: Final = "access"
MAX_TOKEN_BYTES: Final = 8 * 1024
_KID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_REQUIRED: Final = ("exp", "iat", "nbf", "sub", "jti", "iss", "aud", "sid", "typ")
# What a refused token is told: which check failed and what to do, never anything
# from the token (it may be someone's live credential) or about the keys.
#: Not a JWT at all (a typo, a truncated paste, some other string).
MALFORMED: Final = (
    "the bearer credential is not an access token (a JWT from Register, Login or "
    "RefreshToken) or an API key (sbk_...); sign in again for a new access token"
)
#: A refresh token sent as the bearer.
REFRESH_AS_BEARER: Final = (
    "the bearer credential is a refresh token; exchange it with RefreshToken for an "
    "access token, and send that"
)
TOO_LARGE: Final = f"the access token is larger than {MAX_TOKEN_BYTES} bytes; none issued here is"
#: A JWT, but not of the kind this server issues (another algorithm, type or key id form).
FOREIGN: Final = (
    "the bearer token is not an access token issued by this server (its header names "
    "another algorithm, type or key id form); sign in here for one"
)
#: Signed by a key id this server does not have. Most often another deployment's token
#: (a reader's other server, a mesh beside make run), so that comes first; dev mode's
#: new key after a new data directory is the hint after it.
UNKNOWN_KEY: Final = (
    "the access token is not one this server issued: it was signed by a key this server "
    "does not have (another deployment's, or a retired one; dev mode makes a new key when "
    "its data directory is new); sign in here"
)
BAD_SIGNATURE: Final = (
    "the access token's signature does not verify (it was altered, or signed by another "
    "deployment's key); sign in again"
)
OTHER_DEPLOYMENT: Final = (
    "the access token was issued by or for another deployment (its issuer or audience is "
    "not this server's); sign in here"
)
NOT_YET_VALID: Final = (
    "the access token is not valid yet (issued in the future: the issuing server's clock "
    "or this one's is wrong)"
)
INCOMPLETE: Final = (
    "the access token lacks a claim this server requires, or has one of the wrong form; "
    "sign in again"
)
EXPIRED: Final = "the access token has expired; renew it with RefreshToken, or sign in again"
_REFRESH_PREFIX: Final = "sbr_"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    """One Ed25519 key pair with its key id."""

    kid: str
    private_key: Ed25519PrivateKey = field(repr=False)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @classmethod
    def generate(cls, kid: str | None = None) -> SigningKey:
        return cls(kid or secrets.token_hex(8), Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, kid: str, pem: bytes) -> SigningKey:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"signing key {kid!r} is not an Ed25519 private key")
        return cls(kid, key)

    def jwk(self) -> dict[str, str]:
        raw = self.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": ALGORITHM,
            "use": "sig",
            "kid": self.kid,
            "x": _b64url(raw),
        }


class KeyRing:
    """The active signing key plus older keys still accepted during rotation."""

    def __init__(self, active: SigningKey, previous: Sequence[SigningKey] = ()) -> None:
        keys = [active, *previous]
        for key in keys:
            if not _KID_RE.fullmatch(key.kid):
                raise ValueError(f"key id {key.kid!r} must match {_KID_RE.pattern}")
        if len({k.kid for k in keys}) != len(keys):
            raise ValueError("key ids must be unique")
        self.active = active
        self._verifying: dict[str, Ed25519PublicKey] = {k.kid: k.public_key for k in keys}
        self._jwks = [k.jwk() for k in keys]

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        return self._verifying.get(kid)

    def jwks(self) -> list[dict[str, str]]:
        """Every key that may have signed a still-valid token (RFC 7517 JWK form)."""
        return [dict(k) for k in self._jwks]


@dataclass(frozen=True)
class AccessClaims:
    """The verified content of an access token."""

    subject: str
    session: str
    token_id: str
    scopes: tuple[str, ...]
    issued_at: int
    expires_at: int
    key_id: str


@dataclass(frozen=True)
class TokenPolicy:
    """Who issues tokens, for whom, and for how long."""

    issuer: str
    audience: str
    access_ttl_s: int = 900
    leeway_s: int = 30


class AccessTokens:
    """Issues and verifies access tokens under one key ring and policy."""

    def __init__(self, keys: KeyRing, policy: TokenPolicy) -> None:
        self.keys = keys
        self.policy = policy

    def issue(
        self,
        *,
        subject: str,
        session: str,
        scopes: Iterable[str],
        now: float | None = None,
    ) -> tuple[str, AccessClaims]:
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.policy.issuer,
            "aud": self.policy.audience,
            "sub": subject,
            "sid": session,
            "jti": uuid.uuid4().hex,
            "iat": issued,
            "nbf": issued,
            "exp": issued + self.policy.access_ttl_s,
            "typ": ACCESS_CLAIM_TYPE,
            "scope": " ".join(sorted(set(scopes))),
        }
        key = self.keys.active
        token = jwt.encode(
            claims,
            key.private_key,
            algorithm=ALGORITHM,
            headers={"kid": key.kid, "typ": ACCESS_TOKEN_TYPE},
        )
        return token, _to_claims(claims, key.kid)

    def verify(self, token: str, *, now: float | None = None) -> AccessClaims:
        """The token's claims, or Unauthenticated/TokenExpired. Never trusts the header."""
        kid, public_key = self._key_for(token)
        try:
            claims = _decode_at(token, public_key, self.policy, time.time() if now is None else now)
        except jwt.PyJWTError as exc:
            raise _refusal(exc) from None
        if claims.get("typ") != ACCESS_CLAIM_TYPE:
            raise Unauthenticated(INCOMPLETE)
        for name in ("sub", "sid", "jti"):
            if not isinstance(claims.get(name), str) or not claims[name]:
                raise Unauthenticated(INCOMPLETE)
        return _to_claims(claims, kid)

    def _key_for(self, token: str) -> tuple[str, Ed25519PublicKey]:
        """The key id the header names and its key, if the header is one we issue."""
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(TOO_LARGE)
        if token.startswith(_REFRESH_PREFIX):
            raise Unauthenticated(REFRESH_AS_BEARER)
        if token.count(".") != 2:
            raise Unauthenticated(MALFORMED)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated(MALFORMED) from None
        kid = header.get("kid")
        if (
            header.get("alg") != ALGORITHM
            or header.get("typ") != ACCESS_TOKEN_TYPE
            or not isinstance(kid, str)
            or not _KID_RE.fullmatch(kid)
        ):
            raise Unauthenticated(FOREIGN)
        public_key = self.keys.public_key(kid)
        if public_key is None:
            raise Unauthenticated(UNKNOWN_KEY)
        return kid, public_key


def _refusal(exc: jwt.PyJWTError) -> Unauthenticated:
    """What a token that failed decoding is told (the signature is checked first, so
    every reason after it is about a token this server's key signed)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return TokenExpired(EXPIRED)
    if isinstance(exc, jwt.InvalidSignatureError):
        return Unauthenticated(BAD_SIGNATURE)
    if isinstance(exc, jwt.InvalidAudienceError | jwt.InvalidIssuerError):
        return Unauthenticated(OTHER_DEPLOYMENT)
    if isinstance(exc, jwt.ImmatureSignatureError):
        return Unauthenticated(NOT_YET_VALID)
    if isinstance(exc, jwt.DecodeError):
        return Unauthenticated(MALFORMED)
    return Unauthenticated(INCOMPLETE)  # a required claim missing or of the wrong form


def _decode_at(
    token: str, public_key: Ed25519PublicKey, policy: TokenPolicy, now: float
) -> dict[str, Any]:
    """Verify signature, audience and issuer, then the time claims against ``now``.

    Time is checked here rather than by PyJWT so one code path serves both the
    real clock and the explicit clock tests use.
    """
    claims: dict[str, Any] = jwt.decode(
        token,
        key=public_key,
        algorithms=[ALGORITHM],
        audience=policy.audience,
        issuer=policy.issuer,
        options={
            "require": list(_REQUIRED),
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        },
    )
    for name in ("exp", "nbf", "iat"):
        if not isinstance(claims.get(name), int):
            raise jwt.InvalidTokenError(f"{name} must be an integer")
    if claims["exp"] <= now - policy.leeway_s:
        raise jwt.ExpiredSignatureError("expired")
    if claims["nbf"] > now + policy.leeway_s:
        raise jwt.ImmatureSignatureError("not yet valid")
    if claims["iat"] > now + policy.leeway_s:
        raise jwt.ImmatureSignatureError("issued in the future")
    return claims


def _to_claims(claims: Mapping[str, Any], kid: str) -> AccessClaims:
    scope = claims.get("scope", "")
    return AccessClaims(
        subject=str(claims["sub"]),
        session=str(claims["sid"]),
        token_id=str(claims["jti"]),
        scopes=tuple(str(scope).split()) if isinstance(scope, str) else (),
        issued_at=int(claims["iat"]),
        expires_at=int(claims["exp"]),
        key_id=kid,
    )


def load_key_ring(paths: Sequence[str]) -> KeyRing:
    """A key ring from Ed25519 PEM files named ``<kid>.pem``; the first one signs.

    Rotation: add the new key first and keep the old one after it until every
    token it signed has expired (the access-token lifetime), then remove it.
    """
    if not paths:
        raise ValueError("no signing key files given")
    keys: list[SigningKey] = []
    for path in paths:
        file = Path(path)
        kid = file.stem
        try:
            pem = file.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read signing key {path}: {exc.strerror}") from None
        try:
            keys.append(SigningKey.from_pem(kid, pem))
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"signing key {path} is not an unencrypted Ed25519 PEM: {exc}"
            ) from None
    return KeyRing(keys[0], keys[1:])


def private_key_pem(key: SigningKey) -> bytes:
    """PKCS#8 PEM of a signing key (for ``switchboard keygen``)."""
    return key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
