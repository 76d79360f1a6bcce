"""What the browser tests share: the commands they need, trusting the development
certificate in Chromium, and where their screenshots go."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def required(name: str, installer: str) -> str:
    """The path of a command the test needs; a missing one fails the test and says
    what installs it."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; run {installer}")
    return found


def spki_sha256(cert_file: Path) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes: base64 of the
    SHA-256 of the certificate's SubjectPublicKeyInfo (trust that key, not every
    certificate)."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def artifacts_dir(tmp_path: Path) -> Path:
    """Where a test keeps what CI should keep (screenshots): SWITCHBOARD_TEST_ARTIFACTS,
    else the test's own tmp_path."""
    directory = Path(os.environ.get("SWITCHBOARD_TEST_ARTIFACTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def js_fixed(value: float, digits: int) -> str:
    """``value.toFixed(digits)`` as the page's JavaScript writes it.

    Python's ``f"{x:.2f}"`` rounds an exact tie to even (0.125 -> "0.12") where ``toFixed``
    takes the larger (0.125 -> "0.13"); both round the double's exact value, so only ties
    differ. A test that rebuilds a page's figure must round the page's way.
    """
    exact = Decimal(value)  # the double's exact binary value, as toFixed reads it
    return str(exact.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))
