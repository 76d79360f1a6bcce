"""External OIDC ID-token verification under attack: every forgery is UNAUTHENTICATED."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from switchboard.auth.oidc import OIDC_REFUSAL, OidcIdentity, OidcVerifier
from switchboard.platform.errors import TokenExpired, Unauthenticated

pytestmark = pytest.mark.unit

ISSUER = "https://login.example.test/tenant-1/v2.0"
AUDIENCE = "client-123"
NOW = 1_900_000_000.0

_PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | Ed25519PrivateKey


@dataclass(frozen=True)
class Signer:
    """A private key as the issuer holds it, and its public JWK as the JWKS publishes it."""

    kid: str
    alg: str
    private_key: _PrivateKey

    def jwk(self, **extra: Any) -> dict[str, Any]:
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", **extra}

    def sign(self, claims: dict[str, Any], **headers: Any) -> str:
        merged = {"kid": self.kid, **headers}
        return jwt.encode(claims, self.private_key, algorithm=self.alg, headers=merged)

    def sign_raw(self, claims: dict[str, Any], **headers: Any) -> str:
        """Sign without PyJWT's encoder checks, for values it refuses to produce."""
        header = {"alg": self.alg, "kid": self.kid, **headers}
        signing_input = f"{_b64(header)}.{_b64(claims)}"
        algorithm = jwt.get_algorithm_by_name(self.alg)
        signature = algorithm.sign(signing_input.encode(), self.private_key)
        return f"{signing_input}.{_b64_bytes(signature)}"


@pytest.fixture(scope="module")
def rsa_signer() -> Signer:
    return Signer("rsa-1", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_signer() -> Signer:
    return Signer("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def ed_signer() -> Signer:
    return Signer("ed-1", "EdDSA", Ed25519PrivateKey.generate())


@pytest.fixture
def write_jwks(tmp_path: Path) -> Callable[..., Path]:
    def write(*keys: dict[str, Any]) -> Path:
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps({"keys": list(keys)}))
        return path

    return write


@pytest.fixture
def verifier(
    write_jwks: Callable[..., Path], rsa_signer: Signer, ec_signer: Signer, ed_signer: Signer
) -> OidcVerifier:
    # The RSA key states its alg, the EC key relies on the curve default,
    # as both styles occur in real provider JWKS documents.
    path = write_jwks(rsa_signer.jwk(alg="RS256"), ec_signer.jwk(), ed_signer.jwk(alg="EdDSA"))
    return OidcVerifier.from_jwks_file(ISSUER, AUDIENCE, path)


@pytest.fixture(params=["rsa", "ec", "ed"])
def signer(request: pytest.FixtureRequest) -> Signer:
    fixture: Signer = request.getfixturevalue(f"{request.param}_signer")
    return fixture


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "00000000-0000-0000-0000-0000000000ab",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 3600,
        "email": "ada@example.test",
        "email_verified": True,
        "name": "Ada Lovelace",
        "preferred_username": "ada",
    }
    # An override of None leaves the claim out (no base claim is None).
    return {name: value for name, value in {**claims, **overrides}.items() if value is not None}


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _reject(verifier: OidcVerifier, token: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token, now=NOW)
    assert type(caught.value) is Unauthenticated
    assert caught.value.message == OIDC_REFUSAL
    if token:
        assert token not in str(caught.value)


# --- accepted tokens -------------------------------------------------------------------------


def test_valid_token_for_each_key_type(verifier: OidcVerifier, signer: Signer) -> None:
    identity = verifier.verify(signer.sign(_claims()), now=NOW + 10)
    assert identity == OidcIdentity(
        issuer=ISSUER,
        subject="00000000-0000-0000-0000-0000000000ab",
        email="ada@example.test",
        email_verified=True,
        name="Ada Lovelace",
    )


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256"])
def test_rsa_key_alg_decides_the_algorithm(
    write_jwks: Callable[..., Path], rsa_signer: Signer, alg: str
) -> None:
    verifier = OidcVerifier.from_jwks_file(ISSUER, AUDIENCE, write_jwks(rsa_signer.jwk(alg=alg)))
    signer = Signer(rsa_signer.kid, alg, rsa_signer.private_key)
    assert verifier.verify(signer.sign(_claims()), now=NOW).subject
    # The same key under any other RSA algorithm is refused: the key, not the
    # header, chooses.
    other = "RS512" if alg != "RS512" else "RS256"
    _reject(verifier, Signer(rsa_signer.kid, other, rsa_signer.private_key).sign(_claims()))


def test_es384_on_p384(write_jwks: Callable[..., Path]) -> None:
    signer = Signer("p384", "ES384", ec.generate_private_key(ec.SECP384R1()))
    verifier = OidcVerifier.from_jwks_file(ISSUER, AUDIENCE, write_jwks(signer.jwk()))
    assert verifier.verify(signer.sign(_claims()), now=NOW).subject


def test_raw_signing_helper_produces_valid_tokens(
    verifier: OidcVerifier, rsa_signer: Signer
) -> None:
    # The forgery tests below use sign_raw; prove it is not broken on its own.
    assert verifier.verify(rsa_signer.sign_raw(_claims()), now=NOW).subject


def test_single_key_jwks_accepts_a_token_without_kid(
    write_jwks: Callable[..., Path], rsa_signer: Signer
) -> None:
    verifier = OidcVerifier.from_jwks_file(ISSUER, AUDIENCE, write_jwks(rsa_signer.jwk()))
    token = jwt.encode(_claims(), rsa_signer.private_key, algorithm="RS256")
    assert "kid" not in jwt.get_unverified_header(token)
    assert verifier.verify(token, now=NOW).subject
    # ...but a kid that is present must still be the key's.
    _reject(verifier, rsa_signer.sign(_claims(), kid="rsa-2"))


def test_multi_key_jwks_requires_kid(verifier: OidcVerifier, rsa_signer: Signer) -> None:
    _reject(verifier, jwt.encode(_claims(), rsa_signer.private_key, algorithm="RS256"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("true", True), ("false", False), ("True", True), (None, False)],
)
def test_email_verified_accepts_bool_and_string_forms(
    verifier: OidcVerifier, rsa_signer: Signer, value: object, expected: bool
) -> None:
    token = rsa_signer.sign(_claims(email_verified=value))
    assert verifier.verify(token, now=NOW).email_verified is expected


@pytest.mark.parametrize("value", ["yes", 1, "", ["true"]])
def test_malformed_email_verified_is_rejected(
    verifier: OidcVerifier, rsa_signer: Signer, value: object
) -> None:
    _reject(verifier, rsa_signer.sign(_claims(email_verified=value)))


def test_email_is_optional_and_verified_needs_an_address(
    verifier: OidcVerifier, rsa_signer: Signer
) -> None:
    identity = verifier.verify(rsa_signer.sign(_claims(email=None)), now=NOW)
    assert identity.email is None
    assert identity.email_verified is False
    _reject(verifier, rsa_signer.sign(_claims(email=["ada@example.test"])))


def test_name_falls_back_to_preferred_username_then_empty(
    verifier: OidcVerifier, rsa_signer: Signer
) -> None:
    assert verifier.verify(rsa_signer.sign(_claims(name=None)), now=NOW).name == "ada"
    bare = _claims(name=None, preferred_username=None)
    assert verifier.verify(rsa_signer.sign(bare), now=NOW).name == ""


def test_multiple_audiences_with_matching_azp(verifier: OidcVerifier, rsa_signer: Signer) -> None:
    token = rsa_signer.sign(_claims(aud=[AUDIENCE, "api://other"], azp=AUDIENCE))
    assert verifier.verify(token, now=NOW).subject
    single = rsa_signer.sign(_claims(aud=[AUDIENCE]))
    assert verifier.verify(single, now=NOW).subject


def test_expiry_honours_leeway_only(verifier: OidcVerifier, rsa_signer: Signer) -> None:
    token = rsa_signer.sign(_claims(exp=int(NOW) - 30))
    assert verifier.verify(token, now=NOW).subject
    with pytest.raises(TokenExpired):
        verifier.verify(token, now=NOW + 31)


def test_real_clock_is_used_by_default(verifier: OidcVerifier, rsa_signer: Signer) -> None:
    now = int(time.time())
    fresh = rsa_signer.sign(_claims(iat=now, nbf=now, exp=now + 600))
    assert verifier.verify(fresh).subject
    stale = rsa_signer.sign(_claims(iat=now - 7200, nbf=now - 7200, exp=now - 3600))
    with pytest.raises(TokenExpired):
        verifier.verify(stale)


# --- forgeries and malformed tokens ----------------------------------------------------------


def test_alg_none_is_rejected(verifier: OidcVerifier) -> None:
    for header in ({"alg": "none", "kid": "rsa-1"}, {"alg": "none"}, {"alg": "None"}):
        _reject(verifier, f"{_b64(header)}.{_b64(_claims())}.")


@pytest.mark.parametrize(
    "fmt", [serialization.PublicFormat.SubjectPublicKeyInfo, serialization.PublicFormat.PKCS1]
)
def test_hs256_keyed_with_the_rsa_public_key_is_rejected(
    verifier: OidcVerifier, rsa_signer: Signer, fmt: serialization.PublicFormat
) -> None:
    public_pem = rsa_signer.private_key.public_key().public_bytes(serialization.Encoding.PEM, fmt)
    # PyJWT refuses asymmetric key material as an HMAC secret, so the forgery
    # is assembled by hand, as an attacker would.
    signing_input = f"{_b64({'alg': 'HS256', 'kid': 'rsa-1', 'typ': 'JWT'})}.{_b64(_claims())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    _reject(verifier, forged)


def test_impostor_key_with_a_known_kid_is_rejected(verifier: OidcVerifier, signer: Signer) -> None:
    if isinstance(signer.private_key, rsa.RSAPrivateKey):
        other: _PrivateKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif isinstance(signer.private_key, ec.EllipticCurvePrivateKey):
        other = ec.generate_private_key(ec.SECP256R1())
    else:
        other = Ed25519PrivateKey.generate()
    _reject(verifier, Signer(signer.kid, signer.alg, other).sign(_claims()))


def test_tampered_payload_and_signature_are_rejected(
    verifier: OidcVerifier, signer: Signer
) -> None:
    head, body, sig = signer.sign(_claims()).split(".")
    _reject(verifier, f"{head}.{_b64(_claims(sub='admin'))}.{sig}")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    _reject(verifier, f"{head}.{body}.{flipped}")
    _reject(verifier, f"{head}.{body}.{sig[:-8]}")  # truncated: wrong length for ES256/EdDSA
    _reject(verifier, f"{head}.{body}.")


def test_header_alg_must_match_the_key(
    verifier: OidcVerifier, rsa_signer: Signer, ec_signer: Signer, ed_signer: Signer
) -> None:
    # A validly signed ES256 token that points at the RSA key: the key says RS256.
    _reject(verifier, ec_signer.sign(_claims(), kid=rsa_signer.kid))
    _reject(verifier, rsa_signer.sign(_claims(), kid=ec_signer.kid))
    _reject(verifier, ec_signer.sign(_claims(), kid=ed_signer.kid))
    # Same family, other hash: still not the key's algorithm.
    _reject(verifier, Signer("rsa-1", "PS256", rsa_signer.private_key).sign(_claims()))


@pytest.mark.parametrize(
    "overrides",
    [
        {"iss": "https://evil.example.test/tenant-1/v2.0"},
        {"iss": ISSUER + "/"},
        {"iss": ISSUER.upper()},
        {"iss": [ISSUER]},
        {"iss": None},
        {"aud": "someone-else"},
        {"aud": AUDIENCE + "x"},
        {"aud": ["someone-else"]},
        {"aud": []},
        {"aud": None},
        {"aud": [AUDIENCE, "api://other"]},
        {"aud": [AUDIENCE, "api://other"], "azp": "api://other"},
        {"aud": [AUDIENCE, 7]},
    ],
    ids=[
        "wrong-iss",
        "iss-trailing-slash",
        "iss-case",
        "iss-list",
        "no-iss",
        "wrong-aud",
        "aud-prefix",
        "aud-list-without-us",
        "aud-empty",
        "no-aud",
        "multi-aud-no-azp",
        "multi-aud-wrong-azp",
        "aud-non-string",
    ],
)
def test_wrong_issuer_or_audience_is_rejected(
    verifier: OidcVerifier, rsa_signer: Signer, overrides: dict[str, Any]
) -> None:
    _reject(verifier, rsa_signer.sign_raw(_claims(**overrides)))


@pytest.mark.parametrize(
    "overrides",
    [
        {"sub": None},
        {"exp": None},
        {"iat": None},
        {"sub": ""},
        {"sub": 42},
        {"sub": "s" * 256},
        {"exp": "1900003600"},
        {"exp": float(NOW + 3600)},
        {"exp": True},
        {"iat": "now"},
        {"nbf": "0"},
    ],
    ids=[
        "no-sub",
        "no-exp",
        "no-iat",
        "empty-sub",
        "int-sub",
        "long-sub",
        "string-exp",
        "float-exp",
        "bool-exp",
        "string-iat",
        "string-nbf",
    ],
)
def test_missing_or_malformed_required_claims_are_rejected(
    verifier: OidcVerifier, rsa_signer: Signer, overrides: dict[str, Any]
) -> None:
    _reject(verifier, rsa_signer.sign(_claims(**overrides)))


def test_expired_token_is_token_expired(verifier: OidcVerifier, signer: Signer) -> None:
    token = signer.sign(_claims(exp=int(NOW) - 61))
    with pytest.raises(TokenExpired) as caught:
        verifier.verify(token, now=NOW)
    assert token not in str(caught.value)


def test_expired_token_for_someone_else_is_not_token_expired(
    verifier: OidcVerifier, rsa_signer: Signer
) -> None:
    # Only our own tokens earn the "refresh and retry" hint.
    _reject(verifier, rsa_signer.sign(_claims(exp=int(NOW) - 3600, aud="someone-else")))


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_not_yet_valid_is_rejected(verifier: OidcVerifier, rsa_signer: Signer, claim: str) -> None:
    _reject(verifier, rsa_signer.sign(_claims(**{claim: int(NOW) + 3600})))
    # Within leeway, clock skew is forgiven.
    assert verifier.verify(rsa_signer.sign(_claims(**{claim: int(NOW) + 30})), now=NOW).subject


@pytest.mark.parametrize(
    "kid",
    [
        "unknown",
        "../../etc/passwd",
        "rsa-1' OR '1'='1",
        "rsa-1; DROP TABLE keys;--",
        "/dev/null",
        "",
        "k" * 129,
        "rsa-1\x00",
        7,
        ["rsa-1"],
    ],
    ids=[
        "unknown",
        "path",
        "sql-or",
        "sql-drop",
        "abs-path",
        "empty",
        "long",
        "nul",
        "int",
        "list",
    ],
)
def test_unknown_or_malicious_kid_is_rejected(
    verifier: OidcVerifier, rsa_signer: Signer, kid: object
) -> None:
    _reject(verifier, rsa_signer.sign_raw(_claims(), kid=kid))


@pytest.mark.parametrize(
    "headers",
    [{"typ": "at+jwt"}, {"typ": "application/at+jwt"}, {"crit": ["exp"], "exp": 1}, {"zip": "DEF"}],
    ids=["at+jwt", "application-at+jwt", "crit", "zip"],
)
def test_access_tokens_and_extension_headers_are_rejected(
    verifier: OidcVerifier, rsa_signer: Signer, headers: dict[str, Any]
) -> None:
    _reject(verifier, rsa_signer.sign(_claims(), **headers))


def test_oversized_token_is_rejected_before_parsing(
    verifier: OidcVerifier, rsa_signer: Signer
) -> None:
    token = rsa_signer.sign(_claims(padding="x" * (16 * 1024)))
    assert len(token) > 16 * 1024
    _reject(verifier, token)
    # The limit is the configured one, not a hard-coded constant.
    jwks = {"keys": [rsa_signer.jwk()]}
    small = OidcVerifier(ISSUER, AUDIENCE, jwks, max_token_bytes=100)
    _reject(small, rsa_signer.sign(_claims()))


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "..",
        "a.b.c.d.e",
        f"{_b64({'alg': 'RS256', 'kid': 'rsa-1'})}.not-base64!.sig",
        f"{_b64({'alg': 'RS256', 'kid': 'rsa-1'})}.{_b64({'a': 1})[:-1]}é.sig",
        "eyJhbGciOiJSUzI1NiJ9.W10.c2ln",
        "W10.W10.c2ln",
        "x" * 20_000,
        "Bearer abc.def.ghi",
    ],
    ids=[
        "empty",
        "word",
        "two-parts",
        "three-words",
        "dots",
        "jwe-shape",
        "bad-payload",
        "non-ascii",
        "payload-array",
        "header-array",
        "huge",
        "bearer-prefix",
    ],
)
def test_garbage_is_rejected(verifier: OidcVerifier, garbage: str) -> None:
    _reject(verifier, garbage)


# --- loading the JWKS ------------------------------------------------------------------------


def _load_error(path: Path) -> str:
    with pytest.raises(ValueError, match="JWKS file") as caught:
        OidcVerifier.from_jwks_file(ISSUER, AUDIENCE, path)
    message = str(caught.value)
    assert str(path) in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "cannot read" in _load_error(tmp_path / "absent.json")


def test_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": [ {"kty": "RSA", "n": "secret-looking-bytes" ')
    message = _load_error(path)
    assert "invalid JSON" in message
    assert "secret-looking-bytes" not in message


@pytest.mark.parametrize(
    "document",
    [{"keys": []}, {}, {"keys": "none"}, [], {"keys": [{"kty": "RSA", "use": "enc"}]}],
    ids=["empty-keys", "no-keys", "keys-not-list", "top-level-list", "only-enc"],
)
def test_no_usable_keys(tmp_path: Path, document: object) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(document))
    _load_error(path)


def test_oct_key_only_is_refused(write_jwks: Callable[..., Path]) -> None:
    secret = base64.urlsafe_b64encode(b"s" * 32).rstrip(b"=").decode()
    message = _load_error(write_jwks({"kty": "oct", "kid": "hmac", "alg": "HS256", "k": secret}))
    assert secret not in message


@pytest.mark.parametrize("kind", ["rsa", "ec", "ed"])
def test_private_key_material_is_refused_outright(
    request: pytest.FixtureRequest, write_jwks: Callable[..., Path], kind: str
) -> None:
    signer: Signer = request.getfixturevalue(f"{kind}_signer")
    private = json.loads(
        RSAAlgorithm.to_jwk(signer.private_key)
        if isinstance(signer.private_key, rsa.RSAPrivateKey)
        else ECAlgorithm.to_jwk(signer.private_key)
        if isinstance(signer.private_key, ec.EllipticCurvePrivateKey)
        else OKPAlgorithm.to_jwk(signer.private_key)
    )
    assert "d" in private
    # Refused even next to a perfectly good public key: the file itself is a leak.
    message = _load_error(write_jwks(signer.jwk(), {**private, "kid": "leaked"}))
    assert "private" in message
    for param in ("d", "p", "q", "dp", "dq", "qi"):
        if param in private:
            assert private[param] not in message


def test_rsa_1024_is_refused(write_jwks: Callable[..., Path]) -> None:
    # A breakable key is exactly what this test needs to present.
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    weak = Signer("weak", "RS256", weak_key)
    jwk = weak.jwk()
    message = _load_error(write_jwks(jwk))
    assert "2048" in message
    assert jwk["n"] not in message


@pytest.mark.parametrize(
    ("kind", "alg"),
    [("rsa", "ES256"), ("rsa", "HS256"), ("ec", "RS256"), ("ec", "ES384"), ("ed", "ES256")],
)
def test_key_alg_contradicting_its_type_is_refused(
    request: pytest.FixtureRequest, write_jwks: Callable[..., Path], kind: str, alg: str
) -> None:
    signer: Signer = request.getfixturevalue(f"{kind}_signer")
    assert "'alg'" in _load_error(write_jwks(signer.jwk(alg=alg)))


def test_encryption_and_unsupported_keys_are_skipped(
    write_jwks: Callable[..., Path], rsa_signer: Signer, ec_signer: Signer
) -> None:
    enc = {**ec_signer.jwk(), "use": "enc", "kid": "enc-1"}
    oaep = rsa_signer.jwk(alg="RSA-OAEP", kid="oaep-1")
    p521 = Signer("p521", "ES512", ec.generate_private_key(ec.SECP521R1())).jwk()
    path = write_jwks(enc, oaep, p521, {"kty": "XYZ", "kid": "future"}, rsa_signer.jwk())
    verifier = OidcVerifier.from_jwks_file(ISSUER, AUDIENCE, path)
    # The one signing key is used (so a kid-less token is accepted); the
    # encryption key's kid does not verify anything.
    assert verifier.verify(rsa_signer.sign(_claims()), now=NOW).subject
    _reject(verifier, ec_signer.sign(_claims(), kid="enc-1"))


@pytest.mark.parametrize(
    "problem",
    ["duplicate-kid", "missing-kid", "bad-kid", "bad-n", "off-curve"],
)
def test_inconsistent_jwks_is_refused(
    write_jwks: Callable[..., Path], rsa_signer: Signer, ec_signer: Signer, problem: str
) -> None:
    keys: list[dict[str, Any]]
    if problem == "duplicate-kid":
        keys = [rsa_signer.jwk(), ec_signer.jwk(kid=rsa_signer.kid)]
    elif problem == "missing-kid":
        keys = [rsa_signer.jwk(), {k: v for k, v in ec_signer.jwk().items() if k != "kid"}]
    elif problem == "bad-kid":
        keys = [rsa_signer.jwk(kid="../../etc/passwd")]
    elif problem == "bad-n":
        keys = [rsa_signer.jwk(n="not base64url!")]
    else:
        jwk = ec_signer.jwk()
        y = base64.urlsafe_b64decode(jwk["y"] + "==")
        keys = [{**jwk, "y": _b64_bytes(bytes([y[0] ^ 1]) + y[1:])}]
    _load_error(write_jwks(*keys))


def _b64_bytes(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_constructor_takes_a_mapping(rsa_signer: Signer) -> None:
    verifier = OidcVerifier(ISSUER, AUDIENCE, {"keys": [rsa_signer.jwk()]}, leeway_s=0)
    assert verifier.verify(rsa_signer.sign(_claims()), now=NOW).subject
    with pytest.raises(TokenExpired):
        verifier.verify(rsa_signer.sign(_claims(exp=int(NOW))), now=NOW)
    with pytest.raises(ValueError, match="issuer and audience"):
        OidcVerifier("", AUDIENCE, {"keys": [rsa_signer.jwk()]})
