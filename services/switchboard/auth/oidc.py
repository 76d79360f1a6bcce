"""ID tokens from one external OpenID Connect issuer, verified against a pinned JWKS.

The verifier is provider-neutral: Azure AD/Entra, Google, Okta and Keycloak all
publish a JWKS and sign ID tokens with the same handful of asymmetric
algorithms, so nothing here names a provider. The issuer, the audience (our
client id) and the key set are configuration; the keys are loaded once and are
never fetched on the token's say-so (``jku``/``x5u``/``jwk`` headers are
ignored).

Trust rules, in the order they are applied:

* the token is size-checked before any parsing;
* the only thing read from the unverified header is what picks the key
  (``kid``) and the algorithm, which must equal the one the *key* dictates, so
  ``alg=none``, HS256-keyed-with-the-public-key and RSA/EC confusion all fail;
* claims are checked only after the signature, and time is checked against an
  explicit clock (as in ``platform.security.credentials.accesstokens``) so tests need no
  patching.

Failures are ``Unauthenticated`` with one message that says what to do
(nothing from the token is echoed: it may be a live credential) or
``TokenExpired``. This module
does not import grpc.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from switchboard.platform.errors import TokenExpired, Unauthenticated
from switchboard.platform.values import jsonbounds
from switchboard.platform.values.jsonbounds import JsonRejected

MAX_TOKEN_BYTES: Final = 16 * 1024
# A JWKS is a few KiB; the cap keeps a misconfigured path (a log, a device)
# from being slurped into memory.
MAX_JWKS_BYTES: Final = 1024 * 1024
MIN_RSA_BITS: Final = 2048
MAX_SUBJECT_CHARS: Final = 255  # OpenID Connect Core 1.0, section 2
_KID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]+={0,2}")
# One message for every refusal but expiry: which check failed would tell a forger
# how far a token got. It still says what to do.
OIDC_REFUSAL: Final = (
    "the ID token is not valid here (its issuer, audience, key, signature or claims are "
    "not what this deployment accepts); get a new one from the identity provider, or ask "
    "the operator to check SWITCHBOARD_OIDC_ISSUER, _AUDIENCE and _JWKS_FILE"
)
_EXPIRED: Final = "the ID token has expired; get a new one from the identity provider"

# Parameters that only a private (or symmetric) JWK carries (RFC 7518 section 6).
# A verifier needs none of them; a file holding them is a leaked signing key.
_PRIVATE_PARAMS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

_RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256"})
# EC and OKP keys determine their algorithm through the curve: one curve, one alg.
_EC_CURVES: Final[Mapping[str, tuple[str, ec.EllipticCurve, int]]] = {
    "P-256": ("ES256", ec.SECP256R1(), 32),
    "P-384": ("ES384", ec.SECP384R1(), 48),
}
_OKP_CURVES: Final[Mapping[str, str]] = {"Ed25519": "EdDSA"}
# JWS signature algorithms by the key type that can produce them (RFC 7518, RFC 8037).
_ALG_FAMILIES: Final[Mapping[str, tuple[str, ...]]] = {
    "RSA": ("RS", "PS"),
    "EC": ("ES",),
    "OKP": ("EdDSA", "Ed25519", "Ed448"),
    "oct": ("HS",),
}
# Header parameters that change how the JWS is processed. No IdP sets them on
# ID tokens, and we implement no extension, so their presence means tampering.
_FORBIDDEN_HEADERS: Final = frozenset({"crit", "b64", "zip", "enc"})
# RFC 9068 access tokens must not be accepted where an ID token is expected.
_ACCESS_TOKEN_TYPES: Final = frozenset({"at+jwt", "application/at+jwt"})

_PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey


@dataclass(frozen=True)
class OidcIdentity:
    """Who the external issuer says signed in."""

    issuer: str
    subject: str
    email: str | None
    email_verified: bool
    name: str


@dataclass(frozen=True)
class _VerificationKey:
    kid: str | None
    algorithm: str
    key: _PublicKey


class _SkipKey(Exception):
    """A JWK we do not use (encryption key, unsupported type); not an error."""


class OidcVerifier:
    """Verifies ID tokens of one issuer for one audience against a fixed JWKS."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks: Mapping[str, Any],
        *,
        leeway_s: int = 60,
        max_token_bytes: int = MAX_TOKEN_BYTES,
    ) -> None:
        if not issuer or not audience:
            raise ValueError("OIDC issuer and audience must be non-empty")
        if leeway_s < 0:
            raise ValueError("leeway_s must be >= 0")
        if max_token_bytes <= 0:
            raise ValueError("max_token_bytes must be > 0")
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self.max_token_bytes = max_token_bytes
        keys = _load_jwks(jwks)
        self._keys: dict[str | None, _VerificationKey] = {k.kid: k for k in keys}
        # With a single key a token may omit ``kid`` (some IdPs do); with
        # several, guessing would mean trying keys until one verifies.
        self._sole: _VerificationKey | None = keys[0] if len(keys) == 1 else None

    @classmethod
    def from_jwks_file(cls, issuer: str, audience: str, path: str | Path) -> OidcVerifier:
        """Load the JWKS at ``path``; ValueError names the file, never the key material."""
        where = f"JWKS file {str(path)!r}"
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_JWKS_BYTES + 1)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ValueError(f"{where}: cannot read: {reason}") from None
        if len(raw) > MAX_JWKS_BYTES:
            raise ValueError(f"{where}: larger than {MAX_JWKS_BYTES} bytes")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{where}: not UTF-8 text") from None
        try:
            document = jsonbounds.loads(raw, max_bytes=MAX_JWKS_BYTES)
        except JsonRejected as exc:
            # Its reason gives a position at most: the file's text is never quoted.
            raise ValueError(f"{where}: invalid JSON: {exc}") from None
        if not isinstance(document, dict):
            # ValueError, not TypeError: every configuration fault is one type for callers.
            raise ValueError(  # noqa: TRY004
                f"{where}: must be a JSON object with a 'keys' array"
            )
        try:
            return cls(issuer, audience, document)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def verify(self, id_token: str, *, now: float | None = None) -> OidcIdentity:
        """The identity in a valid ID token, or Unauthenticated / TokenExpired."""
        key = self._select_key(id_token)
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key=key.key,
                algorithms=[key.algorithm],
                # Claims are checked below, by us, after the signature: one code
                # path for the explicit clock and no dependence on PyJWT's
                # per-version claim semantics (e.g. partial ``iss`` matching).
                options={
                    "verify_signature": True,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": [],
                },
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthenticated(OIDC_REFUSAL) from None
        return self._check_claims(claims, time.time() if now is None else now)

    def _select_key(self, id_token: str) -> _VerificationKey:
        """The one key that may have signed the token; the header is not trusted beyond this."""
        if (
            not id_token
            or len(id_token) > self.max_token_bytes
            or not id_token.isascii()
            or id_token.count(".") != 2  # compact JWS only; JWE has five parts
        ):
            raise Unauthenticated(OIDC_REFUSAL)
        # PyJWT parses the header here and the payload after the signature, with a
        # recursive parser: both are measured first (a header is the sender's to
        # write, and a mebibyte of '[' is no header).
        for segment in id_token.split(".")[:2]:
            try:
                jsonbounds.check_text(_b64url(segment), max_bytes=self.max_token_bytes)
            except (JsonRejected, ValueError):
                raise Unauthenticated(OIDC_REFUSAL) from None
        try:
            header = jwt.get_unverified_header(id_token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthenticated(OIDC_REFUSAL) from None
        if _FORBIDDEN_HEADERS.intersection(header):
            raise Unauthenticated(OIDC_REFUSAL)
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() in _ACCESS_TOKEN_TYPES):
            raise Unauthenticated(OIDC_REFUSAL)
        kid = header.get("kid")
        if kid is None:
            key = self._sole
        elif isinstance(kid, str) and _KID_RE.fullmatch(kid):
            # Only ever a dictionary lookup: never a path, URL or query.
            key = self._keys.get(kid)
        else:
            key = None
        if key is None or header.get("alg") != key.algorithm:
            raise Unauthenticated(OIDC_REFUSAL)
        return key

    def _check_claims(self, claims: Mapping[str, Any], now: float) -> OidcIdentity:
        if claims.get("iss") != self.issuer:
            raise Unauthenticated(OIDC_REFUSAL)
        if not self._audience_ok(claims):
            raise Unauthenticated(OIDC_REFUSAL)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_CHARS:
            raise Unauthenticated(OIDC_REFUSAL)
        exp, iat = _int_claim(claims, "exp"), _int_claim(claims, "iat")
        nbf = _int_claim(claims, "nbf") if "nbf" in claims else None
        # Issuer and audience are settled first, so TokenExpired is only ever
        # reported for a token that was genuinely ours.
        if exp <= now - self.leeway_s:
            raise TokenExpired(_EXPIRED)
        if (nbf is not None and nbf > now + self.leeway_s) or iat > now + self.leeway_s:
            raise Unauthenticated(OIDC_REFUSAL)
        email = claims.get("email")
        if email is not None and not isinstance(email, str):
            raise Unauthenticated(OIDC_REFUSAL)
        verified = _email_verified(claims.get("email_verified", False))
        return OidcIdentity(
            issuer=self.issuer,
            subject=subject,
            email=email or None,
            # A verification flag without an address vouches for nothing.
            email_verified=verified and bool(email),
            name=_display_name(claims),
        )

    def _audience_ok(self, claims: Mapping[str, Any]) -> bool:
        aud = claims.get("aud")
        if isinstance(aud, str):
            return aud == self.audience
        if not isinstance(aud, list) or not aud or not all(isinstance(a, str) for a in aud):
            return False
        if self.audience not in aud:
            return False
        if len(set(aud)) > 1:
            # OIDC Core 3.1.3.7: with several audiences the authorized party
            # must be us, or a token minted for another client could be replayed.
            return claims.get("azp") == self.audience
        return True


def _b64url(segment: str) -> bytes:
    """One segment of a compact JWS, decoded (ValueError if it is not base64url)."""
    if segment and not _B64URL_RE.fullmatch(segment):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error:
        raise ValueError("not base64url") from None


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    # bool is an int subclass; ``"exp": true`` must not pass as a timestamp.
    if not isinstance(value, int) or isinstance(value, bool):
        raise Unauthenticated(OIDC_REFUSAL)
    return value


def _email_verified(value: object) -> bool:
    if isinstance(value, bool):
        return value
    # Azure AD B2C and AWS Cognito send the flag as a JSON string.
    if isinstance(value, str) and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    raise Unauthenticated(OIDC_REFUSAL)


def _display_name(claims: Mapping[str, Any]) -> str:
    # Display-only fields fall back instead of failing: Azure often omits
    # ``name`` for guest accounts but sends ``preferred_username``.
    for claim in ("name", "preferred_username"):
        value = claims.get(claim)
        if isinstance(value, str) and value:
            return value
    return ""


def _load_jwks(jwks: Mapping[str, Any]) -> list[_VerificationKey]:
    """The usable verification keys; ValueError (without key material) if none or unsafe."""
    entries = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError("JWKS must be a JSON object with a 'keys' array")  # noqa: TRY004
    # Refuse before looking at anything else: private material in a file that
    # should hold public keys means a signing key has leaked (or is about to).
    for index, entry in enumerate(entries):
        if isinstance(entry, Mapping) and _PRIVATE_PARAMS.intersection(entry):
            raise ValueError(
                f"key #{index}{_kid_label(entry)} contains private or symmetric key "
                "material; a verifier needs public keys only - refusing to load"
            )
    keys: list[_VerificationKey] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"key #{index} is not a JSON object")  # noqa: TRY004
        try:
            keys.append(_load_jwk(entry))
        except _SkipKey:
            continue
        except ValueError as exc:
            raise ValueError(f"key #{index}{_kid_label(entry)}: {exc}") from None
    if not keys:
        raise ValueError(
            "no usable signing keys (need RSA >= 2048 bits, EC P-256/P-384 or Ed25519 "
            "public keys with use 'sig')"
        )
    kids = [k.kid for k in keys]
    if len(keys) > 1 and None in kids:
        raise ValueError("with more than one signing key every key needs a 'kid'")
    if len(set(kids)) != len(kids):
        raise ValueError("duplicate 'kid' among signing keys")
    return keys


def _load_jwk(jwk: Mapping[str, Any]) -> _VerificationKey:
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise _SkipKey
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise _SkipKey
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or not _KID_RE.fullmatch(kid)):
        # Such a key could never be selected, since tokens' kids are held to
        # the same pattern; say so instead of failing every token later.
        raise ValueError(f"'kid' must match {_KID_RE.pattern}")
    alg = jwk.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise ValueError("'alg' must be a string")
    kty = jwk.get("kty")
    if kty == "RSA":
        return _rsa_key(kid, alg, jwk)
    if kty == "EC":
        return _ec_key(kid, alg, jwk)
    if kty == "OKP":
        return _okp_key(kid, alg, jwk)
    raise _SkipKey  # unknown key type: another consumer's business


def _rsa_key(kid: str | None, alg: str | None, jwk: Mapping[str, Any]) -> _VerificationKey:
    if alg is not None and alg not in _RSA_ALGS:
        _reject_or_skip(alg, "RSA")
    n = int.from_bytes(_b64_field(jwk, "n"), "big")
    e = int.from_bytes(_b64_field(jwk, "e"), "big")
    if n.bit_length() < MIN_RSA_BITS:
        raise ValueError(f"RSA key shorter than {MIN_RSA_BITS} bits")
    try:
        public = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise ValueError("invalid RSA public key") from None
    return _VerificationKey(kid, alg or "RS256", public)


def _ec_key(kid: str | None, alg: str | None, jwk: Mapping[str, Any]) -> _VerificationKey:
    crv = jwk.get("crv")
    if not isinstance(crv, str) or crv not in _EC_CURVES:
        raise _SkipKey  # P-521, secp256k1, ...: not accepted, not an error
    expected, curve, size = _EC_CURVES[crv]
    if alg is not None and alg != expected:
        if alg.startswith("ES"):
            # ES384 on a P-256 key: the key contradicts itself.
            raise ValueError(f"'alg' must be {expected} for curve {crv}")
        _reject_or_skip(alg, "EC")
    x, y = _b64_field(jwk, "x"), _b64_field(jwk, "y")
    # RFC 7518 6.2.1.2: coordinates are exactly the field size, no more, no less.
    if len(x) != size or len(y) != size:
        raise ValueError(f"invalid {crv} coordinates")
    try:
        # from_encoded_point rejects points that are not on the curve.
        public = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
    except ValueError:
        raise ValueError(f"invalid {crv} public key") from None
    return _VerificationKey(kid, expected, public)


def _okp_key(kid: str | None, alg: str | None, jwk: Mapping[str, Any]) -> _VerificationKey:
    crv = jwk.get("crv")
    if not isinstance(crv, str) or crv not in _OKP_CURVES:
        raise _SkipKey  # X25519 is key agreement; Ed448 is not accepted
    expected = _OKP_CURVES[crv]
    if alg is not None and alg != expected:
        _reject_or_skip(alg, "OKP")
    x = _b64_field(jwk, "x")
    if len(x) != 32:
        raise ValueError("invalid Ed25519 public key")
    try:
        public = Ed25519PublicKey.from_public_bytes(x)
    except ValueError:
        raise ValueError("invalid Ed25519 public key") from None
    return _VerificationKey(kid, expected, public)


def _reject_or_skip(alg: str, kty: str) -> None:
    """Decide about a key whose ``alg`` we will not verify with. Always raises.

    A signature algorithm of another key family (ES256 on an RSA key, HS256 on
    anything, ``none``) is the raw material of algorithm confusion: the file is
    wrong and is refused. Anything else (RSA-OAEP, ECDH-ES, PS384, ...) is a
    legitimate key we simply do not use.
    """
    family = next((f for f, prefixes in _ALG_FAMILIES.items() if alg.startswith(prefixes)), None)
    if alg == "none" or (family is not None and family != kty):
        raise ValueError(f"'alg' {alg!r} does not match key type {kty!r}")
    raise _SkipKey


def _b64_field(jwk: Mapping[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not _B64URL_RE.fullmatch(value):
        raise ValueError(f"'{name}' must be base64url")
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"'{name}' must be base64url") from None


def _kid_label(jwk: Mapping[str, Any]) -> str:
    # The kid is a public label, safe to name; truncated so a hostile file
    # cannot flood the log through an error message.
    kid = jwk.get("kid")
    return f" (kid {kid[:64]!r})" if isinstance(kid, str) else ""
