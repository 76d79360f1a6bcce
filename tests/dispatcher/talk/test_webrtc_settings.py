"""The WebRTC settings (``SWITCHBOARD_WEBRTC_*``): a bad value stops the server at start
with a message naming it, never echoing a TURN credential; a good one reaches the peers."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from switchboard.dispatcher.build import _peer_settings
from switchboard.dispatcher.settings import DispatcherSettings
from switchboard.dispatcher.talk.webrtc.ports import PortRange

pytestmark = pytest.mark.unit

SECRET = "s3cr3t-turn-credential"


def settings(**values: object) -> DispatcherSettings:
    return DispatcherSettings.model_validate(values)


@pytest.mark.parametrize(
    ("servers", "said"),
    [
        ("{", "is not JSON"),
        (json.dumps({"urls": "stun:a"}), "a JSON list of at most 8"),
        (json.dumps([{"urls": "stun:a"}] * 9), "a JSON list of at most 8"),
        (json.dumps(["stun:a"]), "[0] must be an object"),
        (json.dumps([{"urls": "http://a"}]), "[0].urls must be 1 to 8 stun:"),
        (json.dumps([{"urls": []}]), "[0].urls must be 1 to 8"),
        (json.dumps([{"urls": "stun:a", "port": 1}]), "[0] must be an object of urls"),
        (json.dumps([{"urls": "turn:t", "credential": SECRET}]), "needs a username and a"),
        (json.dumps([{"urls": "turn:t", "username": 1, "credential": SECRET}]), ".username must"),
    ],
)
def test_bad_ice_servers_are_refused_naming_the_setting_and_never_the_credential(
    servers: str, said: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        settings(webrtc_ice_servers=servers)
    message = str(refused.value)
    assert "SWITCHBOARD_WEBRTC_ICE_SERVERS" in message
    assert said in message
    assert SECRET not in message


@pytest.mark.parametrize("ports", ["40000", "a-b", "40099-40000", "80-90", "40000-70000"])
def test_a_bad_port_range_is_refused(ports: str) -> None:
    with pytest.raises(ValidationError) as refused:
        settings(webrtc_ports=ports)
    assert "SWITCHBOARD_WEBRTC_PORTS" in str(refused.value)


def test_good_settings_reach_the_peers() -> None:
    servers: list[dict[str, object]] = [
        {"urls": "stun:stun.example.net:3478"},
        {"urls": ["turn:turn.example.net:3478"], "username": "u", "credential": SECRET},
    ]
    made = _peer_settings(
        settings(
            webrtc_ice_servers=json.dumps(servers),
            webrtc_ports="40000-40099",
            webrtc_connect_timeout_s=3,
        )
    )
    assert [s.urls for s in made.ice_servers] == [
        ["stun:stun.example.net:3478"],
        servers[1]["urls"],
    ]
    assert (made.ice_servers[1].username, made.ice_servers[1].credential) == ("u", SECRET)
    assert made.ice_servers[0].username is None
    assert made.ports == PortRange(40000, 40099)
    assert made.connect_timeout_s == 3
    # The credential is a secret: the settings' own text never shows it.
    assert SECRET not in repr(settings(webrtc_ice_servers=json.dumps(servers)))
    # Unset: host candidates only, any port.
    plain = _peer_settings(settings())
    assert (plain.ice_servers, plain.ports) == ((), None)
