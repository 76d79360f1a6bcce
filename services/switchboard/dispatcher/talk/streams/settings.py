"""The media streams' section (``SWITCHBOARD_STREAMS_*``): where the carriers' webhook and
WebSocket are served, the public URL the carriers reach them by (their signatures cover
it), each carrier's key, the dispatch rules (SIP's shape, ``sip/rules.py``; a carrier is
a trunk named ``twilio`` or ``telnyx``) and the limits on calls."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from typing import Final

from pydantic import Field, SecretStr, field_validator, model_validator

from switchboard.dispatcher.talk.sip.rules import Dialplan
from switchboard.platform.config import Section

TWILIO: Final = "twilio"
TELNYX: Final = "telnyx"
CARRIERS: Final = (TWILIO, TELNYX)
#: The carriers as SIP's rules know trunks: a rule's ``trunks`` may name them. The
#: addresses are never looked at (a stream is proven by its carrier's signature, not its
#: address): TEST-NET-1, which nothing sends from.
_CARRIER_TRUNKS: Final = (
    '[{"name": "twilio", "addresses": ["192.0.2.1/32"]}, '
    '{"name": "telnyx", "addresses": ["192.0.2.2/32"]}]'
)
#: Twilio's auth tokens are 32 hex characters; anything much shorter is a mistake.
MIN_TOKEN_LENGTH: Final = 16


class StreamsSettings(Section):
    """What the dispatcher's media streams server reads (``talk/streams/build.py``)."""

    streams_listen: str = Field(
        default="",
        description="`host:port` the carriers' webhook and media streams are served on "
        "(HTTP and WebSocket; port 0: any free one, logged at start); empty: none",
    )
    streams_public_url: str = Field(
        default="",
        description="the `https://` URL the carriers reach that server by (Envoy's, or a "
        "proxy's), without a path: their signatures cover it, and the stream's `wss://` URL "
        "is made from it; needed with `SWITCHBOARD_STREAMS_LISTEN`",
    )
    streams_twilio_auth_token: SecretStr = Field(
        default=SecretStr(""),
        description="the Twilio account's auth token, which signs its webhooks and streams "
        "(`X-Twilio-Signature`); empty: no Twilio",
    )
    streams_telnyx_public_key: str = Field(
        default="",
        description="the Telnyx account's public key (base64, from its portal), which checks "
        "its webhooks' ed25519 signatures; empty: no Telnyx",
    )
    streams_rules: SecretStr = Field(
        default=SecretStr(""),
        description="where calls go, as JSON in the shape of `SWITCHBOARD_SIP_RULES`; a rule's "
        '`trunks` may name the carriers `"twilio"` and `"telnyx"` (all if none); `transfer` '
        "is not offered on a stream (docs/telephony.md)",
    )
    streams_max_calls: int = Field(
        default=16,
        ge=1,
        le=1000,
        description="media-stream calls this process carries at once (the webhook answers "
        '`<Reject reason="busy"/>` above)',
    )
    streams_max_calls_per_workspace: int = Field(
        default=16,
        ge=1,
        le=1000,
        description="media-stream calls one workspace's rules carry at once in this process",
    )

    @field_validator("streams_listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        listen(value)
        return value

    @field_validator("streams_public_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value:
            public_url(value)
        return value

    @field_validator("streams_telnyx_public_key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        if value:
            telnyx_key(value)
        return value

    @model_validator(mode="after")
    def _check_all(self) -> StreamsSettings:
        dialplan(self.streams_rules.get_secret_value())
        token = self.streams_twilio_auth_token.get_secret_value()
        if token and len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"SWITCHBOARD_STREAMS_TWILIO_AUTH_TOKEN: at least {MIN_TOKEN_LENGTH} characters "
                "(the account's auth token)"
            )
        if not self.streams_listen.strip():
            return self
        if not self.streams_public_url:
            raise ValueError(
                "SWITCHBOARD_STREAMS_PUBLIC_URL: needed with SWITCHBOARD_STREAMS_LISTEN (the "
                "carriers' signatures cover it)"
            )
        if not token and not self.streams_telnyx_public_key:
            raise ValueError(
                "SWITCHBOARD_STREAMS_LISTEN: set SWITCHBOARD_STREAMS_TWILIO_AUTH_TOKEN or "
                "SWITCHBOARD_STREAMS_TELNYX_PUBLIC_KEY (a carrier to take calls from)"
            )
        return self

    @property
    def carriers(self) -> tuple[str, ...]:
        """The carriers calls are taken from: those with a key."""
        found = []
        if self.streams_twilio_auth_token.get_secret_value():
            found.append(TWILIO)
        if self.streams_telnyx_public_key:
            found.append(TELNYX)
        return tuple(found)


def listen(value: str) -> tuple[str, int] | None:
    """``host:port`` as a pair; None for "" (no streams); ValueError for anything else."""
    if not value.strip():
        return None
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65_535:
        raise ValueError(f"SWITCHBOARD_STREAMS_LISTEN: {value!r} is not host:port")
    return host.strip("[]"), int(port)


def public_url(value: str) -> str:
    """The public base URL without a trailing slash; ValueError unless it is an http(s)
    URL of a host and nothing more."""
    parsed = urllib.parse.urlsplit(value.strip())
    if (
        parsed.scheme not in ("https", "http")
        or not parsed.hostname
        or parsed.path not in ("", "/")
        or parsed.query
        or parsed.fragment
        or parsed.username
    ):
        raise ValueError(
            "SWITCHBOARD_STREAMS_PUBLIC_URL: an https:// URL of a host (and port), no path"
        )
    return f"{parsed.scheme}://{parsed.netloc}"


def telnyx_key(value: str) -> bytes:
    """The raw 32 bytes of an ed25519 public key given in base64."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(
            "SWITCHBOARD_STREAMS_TELNYX_PUBLIC_KEY: an ed25519 public key in base64 (32 bytes)"
        )
    return raw


def dialplan(rules_json: str) -> Dialplan:
    """The rules, read as SIP reads its own, the carriers standing for trunks; ValueError
    with the entry and field of a mistake (said for SIP's rules: the same shape)."""
    try:
        read = Dialplan.read(_CARRIER_TRUNKS, rules_json)
    except ValueError as exc:
        raise ValueError(f"SWITCHBOARD_STREAMS_RULES: {exc}") from None
    return Dialplan(trunks=(), rules=read.rules)
