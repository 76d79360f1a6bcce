"""ID tokens and JWKS files nested too deep: refused in words, never a RecursionError.

PyJWT parses a token's header before anything is verified (the sender writes
it) and its payload after the signature, with Python's recursive parser, and
turns the RecursionError it gets into its own error; ``OidcVerifier`` measures
both with ``platform/jsonbounds`` first, so nothing recurses at all. The JWKS
file is read with the bounded parser (it had its own RecursionError case).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from switchboard.auth.oidc import OIDC_REFUSAL, OidcVerifier
from switchboard.platform.errors import Unauthenticated
from tests.auth.test_oidc import AUDIENCE, ISSUER, NOW, Signer, _claims

pytestmark = pytest.mark.unit

DEEP = 5000


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("rsa-1", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture
def verifier(signer: Signer) -> OidcVerifier:
    return OidcVerifier(ISSUER, AUDIENCE, {"keys": [signer.jwk(alg="RS256")]})


def _refused(verifier: OidcVerifier, token: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token, now=NOW)
    assert caught.value.message == OIDC_REFUSAL


def test_a_header_nested_thousands_deep_is_refused(verifier: OidcVerifier) -> None:
    header = _b64(b'{"alg": "RS256", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}")
    _refused(verifier, f"{header}.{_b64(json.dumps(_claims()).encode())}.c2ln")


def test_a_signed_payload_nested_thousands_deep_is_refused(
    verifier: OidcVerifier, signer: Signer
) -> None:
    """Only the issuer could sign one; it is refused all the same, not a crash."""
    payload = json.dumps(_claims())[:-1] + ', "x": ' + "[" * DEEP + "]" * DEEP + "}"
    header = _b64(json.dumps({"alg": "RS256", "kid": signer.kid}).encode())
    signing_input = f"{header}.{_b64(payload.encode())}"
    algorithm = jwt.get_algorithm_by_name("RS256")
    signature = algorithm.sign(signing_input.encode(), signer.private_key)
    _refused(verifier, f"{signing_input}.{_b64(signature)}")


def test_a_jwks_file_nested_too_deep_is_a_setting_error(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": [' + "[" * DEEP + "]" * DEEP + "]}")
    with pytest.raises(ValueError, match="JWKS file") as caught:
        OidcVerifier.from_jwks_file(ISSUER, AUDIENCE, path)
    assert "invalid JSON: nested deeper than 24 levels" in str(caught.value)
