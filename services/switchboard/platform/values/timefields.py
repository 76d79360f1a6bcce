"""The one way to read a client's ``Timestamp`` or ``Duration`` field.

The wire format carries any int64 seconds and int32 nanos, but the
well-known types only define a range (Timestamp: 0001-01-01 to 9999-12-31 UTC,
nanos 0..999,999,999; Duration: +-315,576,000,000 s, nanos of the same sign).
Outside it the protobuf converters raise ValueError or OverflowError, which
would surface as INTERNAL; here it is INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from google.protobuf import duration_pb2, timestamp_pb2

from switchboard.platform.errors import FieldViolation, InvalidArgument

#: 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z in Unix seconds.
MIN_TIMESTAMP_S: Final = -62_135_596_800
MAX_TIMESTAMP_S: Final = 253_402_300_799
#: About 10,000 years, the Duration type's own bound.
MAX_DURATION_S: Final = 315_576_000_000
_MAX_NANOS: Final = 999_999_999
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
UTC_ZONE: Final = ZoneInfo("UTC")


def _out_of_range(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(f"{field} is out of range", [FieldViolation(field, description)])


def timestamp(value: timestamp_pb2.Timestamp, field: str) -> dt.datetime:
    """``value`` as an aware UTC datetime (microseconds), or INVALID_ARGUMENT on ``field``."""
    if not MIN_TIMESTAMP_S <= value.seconds <= MAX_TIMESTAMP_S or not (
        0 <= value.nanos <= _MAX_NANOS
    ):
        raise _out_of_range(
            field, "must lie in 0001-01-01..9999-12-31 UTC with nanos in 0..999999999"
        )
    return _EPOCH + dt.timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def seconds(value: duration_pb2.Duration, field: str) -> float:
    """``value`` in seconds, or INVALID_ARGUMENT on ``field`` outside the Duration range."""
    whole, nanos = value.seconds, value.nanos
    if (
        abs(whole) > MAX_DURATION_S
        or abs(nanos) > _MAX_NANOS
        or (whole > 0 and nanos < 0)
        or (whole < 0 and nanos > 0)
    ):
        raise _out_of_range(
            field,
            f"seconds in +-{MAX_DURATION_S}, nanos in +-999999999 with the sign of seconds",
        )
    return whole + nanos / 1e9


def zone(name: str) -> ZoneInfo | None:
    """The IANA zone ``name`` (UTC for ""), or None if there is no such zone.

    Only the zones the system's database lists: ``ZoneInfo`` itself opens any file
    under its directories (a directory such as "Europe" raises IsADirectoryError,
    which would surface as INTERNAL instead of a field violation).
    """
    if not name:
        return UTC_ZONE
    if name not in _zones():
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())
