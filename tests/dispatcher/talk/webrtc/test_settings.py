"""The WebRTC settings (``SWITCHBOARD_WEBRTC_*``): a bad value stops the server at start
with a message naming it, never echoing a TURN credential; a good one reaches the peers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from switchboard.dispatcher.talk.build import ice, peer_options
from switchboard.dispatcher.talk.webrtc.ice import IceServer, IceServers
from switchboard.dispatcher.talk.webrtc.peers import PeerLimits
from switchboard.dispatcher.talk.webrtc.ports import PortRange
from switchboard.dispatcher.talk.webrtc.settings import WebRtcSettings
from switchboard.platform.config import problems

pytestmark = pytest.mark.unit

SECRET = "s3cr3t-turn-credential"


def settings(**values: object) -> WebRtcSettings:
    return WebRtcSettings.model_validate(values)


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
        (json.dumps([{"urls": "turn:t", "credential": SECRET}]), "go together"),
        (json.dumps([{"urls": "turn:t"}]), "needs a username and a credential, or"),
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
    # What the operator reads at start: the variable, in the words of the one parser the
    # peers use too.
    with pytest.raises(ValueError, match="the WebRTC port range") as parsed:
        PortRange.parse(ports)
    assert problems(refused.value) == [f"SWITCHBOARD_WEBRTC_PORTS: {parsed.value}"]


def test_good_settings_reach_the_peers() -> None:
    servers: list[dict[str, object]] = [
        {"urls": "stun:stun.example.net:3478"},
        {"urls": ["turn:turn.example.net:3478"], "username": "u", "credential": SECRET},
    ]
    chosen = settings(
        webrtc_ice_servers=json.dumps(servers),
        webrtc_ports="40000-40099",
        webrtc_connect_timeout_s=3,
    )
    made = peer_options(chosen)
    assert made.ports == PortRange(40000, 40099)
    assert made.connect_timeout_s == 3
    rtc = ice(chosen).for_server()
    assert [s.urls for s in rtc] == [["stun:stun.example.net:3478"], ["turn:turn.example.net:3478"]]
    assert (rtc[1].username, rtc[1].credential) == ("u", SECRET)
    assert rtc[0].username is None
    # A listed credential is handed as it is, and nothing was minted.
    page = ice(chosen).for_page("someone")
    assert [(s.username, s.credential) for s in page.ice_servers] == [("", ""), ("u", SECRET)]
    assert not page.HasField("expire_time")
    # The credential is a secret: the settings' own text never shows it.
    assert SECRET not in repr(chosen)
    # Unset: host candidates only, any port.
    plain = settings()
    assert (ice(plain).for_server(), peer_options(plain).ports) == ([], None)


def test_a_turn_server_without_a_credential_needs_the_secret_to_mint_one() -> None:
    turn = json.dumps([{"urls": "turn:turn.example.net:3478"}])
    with pytest.raises(ValidationError) as refused:
        settings(webrtc_ice_servers=turn)
    assert "SWITCHBOARD_WEBRTC_TURN_SECRET to mint them" in str(refused.value)
    half = json.dumps([{"urls": "turn:t", "username": "u"}])
    with pytest.raises(ValidationError) as refused:
        settings(webrtc_ice_servers=half, webrtc_turn_secret=SECRET)
    assert "a username and a credential go together" in str(refused.value)
    minting = settings(webrtc_ice_servers=turn, webrtc_turn_secret=SECRET, webrtc_turn_ttl_s=120)
    assert SECRET not in repr(minting)


def test_minted_credentials_are_the_turn_rest_apis() -> None:
    """username ``{expiry}:{user}``, credential base64(HMAC-SHA1(secret, username)): what
    coturn's ``use-auth-secret`` checks (against a real coturn: test_ice.py)."""
    ice = IceServers(
        [IceServer(("stun:s",)), IceServer(("turn:t", "turns:t"))],
        turn_secret=SECRET,
        ttl_s=120,
        clock=lambda: 1_000_000.5,
    )
    servers, expiry = ice.minted_for("u1")
    assert expiry == 1_000_120
    assert servers[0] == IceServer(("stun:s",))
    assert servers[1].username == "1000120:u1"
    signed = hmac.new(SECRET.encode(), b"1000120:u1", hashlib.sha1).digest()
    assert servers[1].credential == base64.b64encode(signed).decode()
    assert ice.for_page("u1").expire_time.seconds == 1_000_120
    assert ice.for_server()[1].username == "1000120:switchboard"


def test_the_default_peer_limit_is_what_operations_md_measured_a_process_carries() -> None:
    """``SWITCHBOARD_WEBRTC_MAX_PEERS`` defaults to the count docs/operations.md derives
    from its measurement of what a quiet peer costs, and the registry's own default agrees."""
    text = (Path(__file__).parents[4] / "docs" / "operations.md").read_text()
    section = text.split("### Live voice: peers per process", 1)[1].split("\n#", 1)[0]
    stated = re.search(r"`SWITCHBOARD_WEBRTC_MAX_PEERS`' default, (\d+)", section)
    assert stated is not None, "docs/operations.md names no default peer count"
    assert settings().webrtc_max_peers == int(stated[1]) == PeerLimits().max_peers
