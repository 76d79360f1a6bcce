"""Opaque page tokens (AIP-158) for keyset pagination.

A token carries the sort key of the last item returned and a fingerprint of
the request's filters: a token used with different filters, or altered, is
INVALID_ARGUMENT rather than a silently wrong page. Keyset tokens (never
offsets) are what keep pages exact while rows are inserted concurrently: the
next page starts strictly after the last key seen, whatever was added before it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Final

from switchboard.platform.errors import FieldViolation, InvalidArgument

Key = Sequence[str | int]

_VERSION: Final = 1
# Not a secret: the MAC only makes accidental edits and mixed-up tokens fail loudly.
_MAC_KEY: Final = b"switchboard-page-token"


def fingerprint(*parts: object) -> str:
    """A short digest of a request's filters (everything but the page fields)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def encode(key: Key, request_fingerprint: str) -> str:
    body = json.dumps([_VERSION, list(key), request_fingerprint], separators=(",", ":")).encode()
    mac = hmac.new(_MAC_KEY, body, hashlib.sha256).digest()[:8]
    return base64.urlsafe_b64encode(mac + body).decode().rstrip("=")


def decode(token: str, request_fingerprint: str, arity: int) -> list[str | int]:
    """The key a token carries; INVALID_ARGUMENT if it is not one of ours for this request."""
    invalid = InvalidArgument(
        "page_token is not valid for this request",
        [FieldViolation("page_token", "does not come from the same request with the same filters")],
    )
    if len(token) > 2048:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        mac, body = raw[:8], raw[8:]
        if not hmac.compare_digest(mac, hmac.new(_MAC_KEY, body, hashlib.sha256).digest()[:8]):
            raise invalid
        version, key, found = json.loads(body)
    except (ValueError, TypeError):
        raise invalid from None
    if (
        version != _VERSION
        or found != request_fingerprint
        or not isinstance(key, list)
        or len(key) != arity
        or not all(isinstance(part, str | int) for part in key)
    ):
        raise invalid
    return key


def page_size(requested: int, *, default: int, maximum: int, field: str = "page_size") -> int:
    """AIP-158: 0 means the default, larger than the maximum is capped, negative is invalid."""
    if requested < 0:
        raise InvalidArgument(
            f"{field} must not be negative", [FieldViolation(field, "must not be negative")]
        )
    return min(requested or default, maximum)
