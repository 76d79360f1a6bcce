"""The client's channel options stay inside what the server enforces."""

from __future__ import annotations

import pytest

from switchboard.client import channel_options, new_request_id
from switchboard.client.client import handler_name
from switchboard.settings import FIELDS

pytestmark = pytest.mark.unit


def _default(name: str) -> float:
    value = FIELDS[name].default
    assert isinstance(value, int | float)
    return float(value)


def test_keepalive_pings_never_earn_strikes_from_a_default_server() -> None:
    options = dict(channel_options())
    # The server counts a strike for a ping sooner than this after the last one
    # and sends GOAWAY (too_many_pings) after a few.
    assert options["grpc.keepalive_time_ms"] / 1000 >= _default(
        "keepalive_min_client_ping_interval_s"
    )
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.keepalive_timeout_ms"] / 1000 <= _default("keepalive_timeout_s")
    # A restarted server is found within seconds, not gRPC's default 120 s.
    assert options["grpc.max_reconnect_backoff_ms"] <= 5_000
    assert options["grpc.primary_user_agent"].startswith("switchboard-python-client/")


def test_request_ids_fit_the_contract_and_do_not_repeat() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(1 <= len(i) <= 64 and i.isalnum() for i in ids)


def test_handler_names() -> None:
    assert handler_name("echo") == "handlers/echo"
    assert handler_name("handlers/echo") == "handlers/echo"
    assert handler_name("") == ""
