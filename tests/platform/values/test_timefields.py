"""Request Timestamp and Duration fields: out of the well-known types' range is INVALID_ARGUMENT."""

from __future__ import annotations

import contextlib
import datetime as dt

import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from switchboard.platform.errors import InvalidArgument
from switchboard.platform.values import timefields

pytestmark = pytest.mark.unit

INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)


def test_timestamps_at_the_edges_of_the_range_convert() -> None:
    first = timefields.timestamp(timestamp_pb2.Timestamp(seconds=-62_135_596_800), "t")
    assert first == dt.datetime(1, 1, 1, tzinfo=dt.UTC)
    last = timefields.timestamp(
        timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999), "t"
    )
    assert last == dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(2**62, 0), (253_402_300_800, 0), (-62_135_596_801, 0), (0, -1), (0, 10**9), (-(2**63), 0)],
)
def test_a_timestamp_out_of_range_names_its_field(seconds: int, nanos: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        timefields.timestamp(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos), "a.expire_time")
    assert [v.field for v in caught.value.violations] == ["a.expire_time"]


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(2**62, 0), (-(2**62), 0), (315_576_000_001, 0), (1, -1), (-1, 1), (0, 10**9), (0, -(10**9))],
)
def test_a_duration_out_of_range_names_its_field(seconds: int, nanos: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        timefields.seconds(duration_pb2.Duration(seconds=seconds, nanos=nanos), "timeout")
    assert [v.field for v in caught.value.violations] == ["timeout"]


def test_durations_in_range_convert() -> None:
    assert timefields.seconds(duration_pb2.Duration(seconds=-2, nanos=-500_000_000), "d") == -2.5
    assert timefields.seconds(duration_pb2.Duration(nanos=-1), "d") == -1e-9
    assert (
        timefields.seconds(duration_pb2.Duration(seconds=315_576_000_000), "d") == 315_576_000_000
    )


@settings(max_examples=300, deadline=None)
@given(INT64, INT32)
def test_any_wire_value_converts_or_is_invalid_argument(seconds: int, nanos: int) -> None:
    with contextlib.suppress(InvalidArgument):
        timefields.timestamp(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos), "f")
    with contextlib.suppress(InvalidArgument):
        timefields.seconds(duration_pb2.Duration(seconds=seconds, nanos=nanos), "f")
