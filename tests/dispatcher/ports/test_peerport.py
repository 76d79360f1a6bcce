"""Where a dispatcher replica says it can be reached, and how long a forwarded call may take."""

from __future__ import annotations

import socket

import pytest

from switchboard.dispatcher.ports.peers import PEER_TIMEOUT_S, Via
from switchboard.platform.config import ConfigError
from switchboard.platform.rpc.server import advertise_address
from tests.conftest import make_settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1:7001"),
        ("10.1.2.3", "10.1.2.3:7001"),
        ("::1", "[::1]:7001"),
        # Bound to every address: the host name is what the others can resolve.
        ("0.0.0.0", f"{socket.gethostname()}:7001"),
        ("::", f"{socket.gethostname()}:7001"),
    ],
)
def test_the_default_is_the_bound_host_and_port(host: str, expected: str) -> None:
    assert advertise_address(make_settings(host=host).kernel, 7001) == expected


def test_a_configured_address_wins() -> None:
    settings = make_settings(host="0.0.0.0", advertise_address="dispatcher-1:50051")
    assert advertise_address(settings.kernel, 7001) == "dispatcher-1:50051"


def test_an_address_longer_than_the_lease_holds_is_refused() -> None:
    settings = make_settings(advertise_address=f"{'h' * 300}:50051")
    with pytest.raises(ConfigError, match="SWITCHBOARD_ADVERTISE_ADDRESS"):
        advertise_address(settings.kernel, 7001)


def test_a_forwarded_call_keeps_the_callers_deadline_within_the_peer_bound() -> None:
    assert Via().budget() == PEER_TIMEOUT_S
    assert Via(timeout_s=2.5).budget() == 2.5
    assert Via(timeout_s=3600.0).budget() == PEER_TIMEOUT_S
    assert Via(timeout_s=-1.0).budget() > 0
