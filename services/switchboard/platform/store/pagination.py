"""Opaque page tokens (AIP-158) for keyset pagination, signed with the server secret.

A token carries the sort key of the last item returned and a fingerprint of
the request's filters: a token used with different filters, altered, or made
by anyone without the server secret is INVALID_ARGUMENT on ``page_token``
rather than a silently wrong page. Keyset tokens (never offsets, but for
ranked search) are what keep pages exact while rows are inserted concurrently:
the next page starts strictly after the last key seen.

Every part of a decoded key is also checked against the shape its list
expects (type, range, pattern), so even a token signed by a leaked or shared
secret can put nothing into a query that the server would not have written.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from switchboard.platform.errors import FieldViolation, InvalidArgument
from switchboard.platform.values import names

Key = Sequence[str | int]

_VERSION: Final = 1
_MAC_BYTES: Final = 16
#: Longer than any token we issue (a few hundred characters at most).
MAX_TOKEN_CHARS: Final = 1024
#: Separates this key from every other use of the server secret.
_PURPOSE: Final = b"switchboard/page-token/v1"


class Part(Protocol):
    """The shape one part of a decoded key must have."""

    def accepts(self, value: object) -> bool: ...


@dataclass(frozen=True)
class Int:
    """An integer in ``[low, high]`` (never a bool, never a float)."""

    low: int
    high: int

    def accepts(self, value: object) -> bool:
        return type(value) is int and self.low <= value <= self.high


@dataclass(frozen=True)
class Text:
    """A string that ``pattern`` matches whole."""

    pattern: re.Pattern[str]

    def accepts(self, value: object) -> bool:
        return isinstance(value, str) and self.pattern.fullmatch(value) is not None


@dataclass(frozen=True)
class IsoTime:
    """An ISO 8601 date-time string with a UTC offset, as ``datetime.isoformat`` writes."""

    def accepts(self, value: object) -> bool:
        if not isinstance(value, str) or len(value) > 40 or not value.isascii():
            return False
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            return False
        return parsed.tzinfo is not None


#: A resource id, as in resource names.
ID: Final = Text(re.compile(names.ID))
#: Microseconds since the Unix epoch, up to the last instant of year 9999.
MICROS: Final = Int(0, 253_402_300_799_999_999)
#: A non-negative 63-bit counter (sequence numbers, row positions).
COUNT: Final = Int(0, 2**63 - 1)
#: One half of an event log position.
U64: Final = Int(0, 2**64 - 1)
ISO_TIME: Final = IsoTime()


def fingerprint(*parts: object) -> str:
    """A short digest of a request's filters (everything but the page fields)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _invalid() -> InvalidArgument:
    return InvalidArgument(
        "page_token is not valid for this request",
        [FieldViolation("page_token", "does not come from the same request with the same filters")],
    )


class PageTokens:
    """Makes and reads page tokens under a key derived from the server secret.

    Built once per process (``switchboard.mesh.open_shared``) and handed to
    every service that pages; processes sharing ``SWITCHBOARD_SECRET_KEY``
    accept each other's tokens, and changing the secret invalidates them.
    """

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("page tokens need the server secret")
        self._key = hmac.new(secret.encode("utf-8"), _PURPOSE, hashlib.sha256).digest()

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, key: Key, request_fingerprint: str) -> str:
        body = json.dumps(
            [_VERSION, list(key), request_fingerprint], separators=(",", ":")
        ).encode()
        return base64.urlsafe_b64encode(self._mac(body) + body).decode().rstrip("=")

    def decode(
        self, token: str, request_fingerprint: str, shape: Sequence[Part]
    ) -> list[str | int]:
        """The key a token carries, each part checked against ``shape``.

        INVALID_ARGUMENT (field ``page_token``) unless the token is one this
        server's secret signed for a request with the same filters.
        """
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise _invalid()
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise _invalid() from None
        mac, body = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
        if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, self._mac(body)):
            raise _invalid()
        try:
            decoded = json.loads(body)
        except ValueError:  # signed but unreadable: written by another version
            raise _invalid() from None
        if not isinstance(decoded, list) or len(decoded) != 3:
            raise _invalid()
        version, key, found = decoded
        if (
            version != _VERSION
            or found != request_fingerprint
            or not isinstance(key, list)
            or len(key) != len(shape)
            or not all(part.accepts(value) for part, value in zip(shape, key, strict=True))
        ):
            raise _invalid()
        return key


def page_size(requested: int, *, default: int, maximum: int, field: str = "page_size") -> int:
    """AIP-158: 0 means the default, larger than the maximum is capped, negative is invalid."""
    if requested < 0:
        raise InvalidArgument(
            f"{field} must not be negative", [FieldViolation(field, "must not be negative")]
        )
    return min(requested or default, maximum)


_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def micros(when: dt.datetime) -> int:
    """``when`` as microseconds since the epoch, for a keyset token (``MICROS``).

    Exact integer arithmetic: a float timestamp can be off by a microsecond, and
    a keyset token must name the row's key exactly.
    """
    return (when - _EPOCH) // dt.timedelta(microseconds=1)


def from_micros(value: str | int) -> dt.datetime:
    """The instant a decoded ``MICROS`` part names (INVALID_ARGUMENT if it is not one)."""
    if not isinstance(value, int):
        raise InvalidArgument(
            "page_token is not valid for this request",
            [FieldViolation("page_token", "is malformed")],
        )
    return _EPOCH + dt.timedelta(microseconds=value)
