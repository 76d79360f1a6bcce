"""Opaque credentials: refresh tokens and API keys.

Both are 256-bit random secrets with a recognizable prefix (so leaked ones
are easy to find with secret scanners). The database stores only a keyed
hash (HMAC-SHA256 with the server secret as pepper): a high-entropy secret
needs no slow hash, and a stolen table is useless without the server secret.
Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

REFRESH_PREFIX: Final = "sbr_"
API_KEY_PREFIX: Final = "sbk_"
_SECRET_BYTES: Final = 32
_KEY_ID_CHARS: Final = 8
_REFRESH_RE: Final = re.compile(r"sbr_[A-Za-z0-9_-]{43}")
_API_KEY_RE: Final = re.compile(r"sbk_([a-z0-9]{8})_([A-Za-z0-9_-]{43})")
_KEY_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(frozen=True)
class IssuedSecret:
    """A secret to hand to the client once, and what to store about it."""

    secret: str
    digest: str
    display_prefix: str


class OpaqueSecrets:
    """Creates, hashes and checks opaque secrets under one pepper."""

    def __init__(self, pepper: str) -> None:
        if len(pepper) < 32:
            raise ValueError("the pepper must be at least 32 characters")
        self._pepper = pepper.encode("utf-8")

    def digest(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode("utf-8"), hashlib.sha256).hexdigest()

    def matches(self, secret: str, stored_digest: str) -> bool:
        return hmac.compare_digest(self.digest(secret), stored_digest)

    def new_refresh_token(self) -> IssuedSecret:
        token = REFRESH_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        return IssuedSecret(token, self.digest(token), token[:8])

    def new_api_key(self) -> tuple[str, IssuedSecret]:
        """(key id, secret): the id is public and indexes the key; the secret is shown once."""
        key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(_KEY_ID_CHARS))
        secret = f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
        return key_id, IssuedSecret(secret, self.digest(secret), f"{API_KEY_PREFIX}{key_id}")


def looks_like_refresh_token(value: str) -> bool:
    return bool(_REFRESH_RE.fullmatch(value))


def parse_api_key(value: str) -> str | None:
    """The key id of a well-formed API key, else None (no lookup for malformed input)."""
    match = _API_KEY_RE.fullmatch(value)
    return match.group(1) if match else None
