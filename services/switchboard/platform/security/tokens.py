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
_INVALID: Final = "invalid access token"


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
        if not token or len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise Unauthenticated(_INVALID)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated(_INVALID) from None
        kid = header.get("kid")
        if (
            header.get("alg") != ALGORITHM
            or header.get("typ") != ACCESS_TOKEN_TYPE
            or not isinstance(kid, str)
            or not _KID_RE.fullmatch(kid)
        ):
            raise Unauthenticated(_INVALID)
        public_key = self.keys.public_key(kid)
        if public_key is None:
            raise Unauthenticated(_INVALID)
        try:
            claims = _decode_at(token, public_key, self.policy, time.time() if now is None else now)
        except jwt.ExpiredSignatureError:
            raise TokenExpired("access token expired") from None
        except jwt.PyJWTError:
            raise Unauthenticated(_INVALID) from None
        if claims.get("typ") != ACCESS_CLAIM_TYPE:
            raise Unauthenticated(_INVALID)
        for name in ("sub", "sid", "jti"):
            if not isinstance(claims.get(name), str) or not claims[name]:
                raise Unauthenticated(_INVALID)
        return _to_claims(claims, kid)


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
