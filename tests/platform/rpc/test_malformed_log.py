"""The log of undecodable requests: one line per interval, counting the ones left out."""

from __future__ import annotations

import logging

import pytest

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.rpc.interceptors import UNDECODABLE, MalformedLog, message_name, tolerant
from tests.infra.clock import FakeClock

pytestmark = pytest.mark.unit


def test_one_line_per_interval_with_the_count_of_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(100.0)
    malformed = MalformedLog(interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="switchboard.access"):
        for _ in range(500):
            malformed.record("/svc/M", "ipv4:1.2.3.4:5")
        clock.now += 9.9
        malformed.record("/svc/M", "ipv4:1.2.3.4:5")
        clock.now += 0.1
        malformed.record("/svc/N", "ipv4:1.2.3.4:5")
    lines = [r for r in caplog.records if r.getMessage() == "malformed request body"]
    assert [r.__dict__["suppressed"] for r in lines] == [0, 500]
    assert [r.__dict__["method"] for r in lines] == ["/svc/M", "/svc/N"]
    assert all(r.exc_info is None for r in lines)


def test_the_tolerant_deserializer_never_raises() -> None:
    decode = tolerant(events_pb2.StreamRequest.FromString)
    assert decode is not None
    assert decode(b"\xff\xff") is UNDECODABLE
    assert decode(b"\x12\x03\x0a\x01\x80") is UNDECODABLE  # invalid UTF-8 in a string
    assert decode(b"") == events_pb2.StreamRequest()
    assert tolerant(None) is None
    assert (
        message_name(events_pb2.StreamRequest.FromString)
        == "switchboard.api.events.v1.StreamRequest"
    )
    assert message_name(None) == "request message"
