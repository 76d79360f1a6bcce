"""WebRTC's section (``SWITCHBOARD_WEBRTC_*``): the ICE servers and TURN credentials a
browser's peer is given, the UDP ports media binds, and how many peers a process carries.
Each text setting is parsed here by the parser its peers use (``ports.PortRange``,
``ice_servers``), so a bad value is refused at start with the words a peer would use."""

from __future__ import annotations

import json
from typing import Final

from pydantic import Field, SecretStr, field_validator, model_validator

from switchboard.dispatcher.talk.webrtc.ports import PortRange
from switchboard.platform.config import Section


class WebRtcSettings(Section):
    """What ``ConnectTalk``'s peers read (``dispatcher/build.py``)."""

    webrtc_ice_servers: SecretStr = Field(
        default=SecretStr(""),
        description="STUN and TURN servers the server's WebRTC peers gather candidates with, as "
        'JSON: `[{"urls": "stun:stun.example.net:3478"}, {"urls": ["turn:turn.example.net:3478"], '
        '"username": "u", "credential": "p"}]` (at most 8); none: host candidates only, enough '
        "when browsers reach the server's address directly",
    )
    webrtc_turn_secret: SecretStr = Field(
        default=SecretStr(""),
        description="the secret shared with the TURN server (coturn's `static-auth-secret`): a "
        "TURN server listed without a username gets a credential minted per caller, valid for "
        "`SWITCHBOARD_WEBRTC_TURN_TTL_S` (the TURN REST API's scheme); empty: TURN servers "
        "need their own username and credential",
    )
    webrtc_turn_ttl_s: float = Field(
        default=3600.0,
        ge=60,
        le=86_400,
        description="how long a minted TURN credential is valid",
    )
    webrtc_ports: str = Field(
        default="",
        description="the UDP ports the server's WebRTC peers bind for media, as `low-high` "
        "(`40000-40099`, within 1024-65535; one port per connected peer and local address, so "
        "at least `SWITCHBOARD_WEBRTC_MAX_PEERS` of them); empty: any port the system picks",
    )
    webrtc_connect_timeout_s: float = Field(
        default=15.0,
        ge=1,
        le=120,
        description="how long a WebRTC peer may take to connect after its answer; one that does "
        "not is closed, and its session never starts",
    )
    webrtc_max_peers: int = Field(
        # A connected peer costs 30-58 ms of CPU a second while no one speaks, more while it
        # does, and a process runs on one core (docs/operations.md, "Live voice").
        default=12,
        ge=1,
        le=10_000,
        description="WebRTC peers (`ConnectTalk`) carried at once by this process "
        "(`RESOURCE_EXHAUSTED` above); each costs 30-58 ms of CPU a second even while no one "
        "speaks (docs/operations.md)",
    )
    webrtc_max_peers_per_user: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="WebRTC peers one user may hold at once in this process",
    )

    @field_validator("webrtc_ports")
    @classmethod
    def _check_ports(cls, value: str) -> str:
        PortRange.parse(value)
        return value

    @model_validator(mode="after")
    def _check_ice(self) -> WebRtcSettings:
        ice_servers(
            self.webrtc_ice_servers.get_secret_value(),
            minting=bool(self.webrtc_turn_secret.get_secret_value()),
        )
        return self


_ICE_SCHEMES: Final = ("stun:", "turn:", "turns:")


def ice_servers(text: str, *, minting: bool = False) -> list[dict[str, str | list[str]]]:
    """``SWITCHBOARD_WEBRTC_ICE_SERVERS`` read: each server's ``urls`` (a list), and its
    ``username`` and ``credential`` when given (a TURN server needs both unless ``minting``:
    a TURN secret mints them). ValueError says what is wrong, never the credential."""
    if not text.strip():
        return []
    try:
        given = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("SWITCHBOARD_WEBRTC_ICE_SERVERS is not JSON") from None
    if not isinstance(given, list) or len(given) > 8:
        raise ValueError("SWITCHBOARD_WEBRTC_ICE_SERVERS must be a JSON list of at most 8 servers")
    servers: list[dict[str, str | list[str]]] = []
    for i, item in enumerate(given):
        where = f"SWITCHBOARD_WEBRTC_ICE_SERVERS[{i}]"
        if not isinstance(item, dict) or set(item) - {"urls", "username", "credential"}:
            raise ValueError(f"{where} must be an object of urls, username and credential")
        urls = item.get("urls")
        urls = [urls] if isinstance(urls, str) else urls
        if (
            not isinstance(urls, list)
            or not 1 <= len(urls) <= 8
            or not all(isinstance(u, str) and u.startswith(_ICE_SCHEMES) for u in urls)
        ):
            raise ValueError(f"{where}.urls must be 1 to 8 stun:, turn: or turns: URLs")
        server: dict[str, str | list[str]] = {"urls": urls}
        for key in ("username", "credential"):
            if key in item:
                if not isinstance(item[key], str):
                    raise ValueError(f"{where}.{key} must be a string")
                server[key] = item[key]
        if ("username" in server) != ("credential" in server):
            raise ValueError(f"{where}: a username and a credential go together")
        if (
            any(u.startswith(("turn:", "turns:")) for u in urls)
            and "username" not in server
            and not minting
        ):
            raise ValueError(
                f"{where}: a TURN server needs a username and a credential, or "
                "SWITCHBOARD_WEBRTC_TURN_SECRET to mint them"
            )
        servers.append(server)
    return servers
