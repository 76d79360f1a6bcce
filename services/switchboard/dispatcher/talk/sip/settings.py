"""SIP's section (``SWITCHBOARD_SIP_*``): where the user agent listens (UDP, and TLS with
its certificate), the RTP ports, the trunks and dispatch rules (``rules.py`` parses them,
so a mistake stops the process at start with the words a call would be refused with), and
the limits on calls."""

from __future__ import annotations

import os

from pydantic import Field, SecretStr, field_validator, model_validator

from switchboard.dispatcher.talk.sip.engine import PJSIP_MAX_CALLS
from switchboard.dispatcher.talk.sip.rules import Dialplan
from switchboard.dispatcher.talk.webrtc.ports import PortRange
from switchboard.platform.config import Section


class SipSettings(Section):
    """What the dispatcher's SIP user agent reads (``talk/sip/build.py``)."""

    sip_listen: str = Field(
        default="",
        description="`host:port` the SIP user agent listens on (UDP; port 0: any free one, "
        "logged at start); empty: no SIP. Calls come in only from `SWITCHBOARD_SIP_TRUNKS`",
    )
    sip_public_host: str = Field(
        default="",
        description="the address SIP and SDP name for this server when it is behind NAT (its "
        "public IP); empty: the listening host",
    )
    sip_tls_listen: str = Field(
        default="",
        description="`host:port` the SIP user agent also listens on for SIP over TLS (TCP; "
        "port 0: any free one, logged at start); empty: no TLS. Needed by a trunk with "
        "`tls`, and for SRTP (docs/telephony.md)",
    )
    sip_tls_cert: str = Field(
        default="",
        description="the TLS certificate chain SIP over TLS presents (a PEM file)",
    )
    sip_tls_key: str = Field(
        default="",
        description="the private key of `SWITCHBOARD_SIP_TLS_CERT` (a PEM file, read at start)",
    )
    sip_tls_ca: str = Field(
        default="",
        description="the certificate authorities a carrier's certificate must chain to when a "
        "call goes out over TLS (a PEM file); empty: the system's",
    )
    sip_rtp_ports: str = Field(
        default="",
        description="the UDP ports calls' RTP binds, as `low-high` (two per call: RTP and "
        "RTCP); empty: any the system picks",
    )
    sip_trunks: SecretStr = Field(
        default=SecretStr(""),
        description='the carriers allowed to call in, as JSON: `[{"name": "carrier", '
        '"addresses": ["203.0.113.0/24"], "username": "u", "password": "p"}]` (addresses, '
        "digest credentials, or both); an INVITE from no trunk is refused (403), one without "
        "the trunk's credentials challenged (401). A trunk that places calls has "
        '`"outbound": {"to": "sip:sip.carrier.example", "caller_id": "+15550100", '
        '"workspaces": ["acme"], "numbers": ["+1"], "username": "u", "password": "p"}`; '
        '`"tls": true` holds a trunk to SIP over TLS, `"srtp": true` its audio to SRTP '
        "(docs/telephony.md)",
    )
    sip_rules: SecretStr = Field(
        default=SecretStr(""),
        description='where calls go, as JSON: `[{"number": "+15550100", "assistant": '
        '"workspaces/w/assistants/a", "user": "users/u", "trunks": ["carrier"], '
        '"callers": {"+15557654321": "users/v"}}]`; the first match wins, `*` matches any '
        "number (docs/telephony.md)",
    )
    sip_max_calls: int = Field(
        default=PJSIP_MAX_CALLS,
        ge=1,
        # The pjsua2-python wheel's PJSIP holds 4 calls, ringing and refused ones too.
        le=PJSIP_MAX_CALLS,
        description="calls this process carries at once (486 Busy Here above); at most 4, "
        "the call slots of the `pjsua2-python` wheel's PJSIP (docs/telephony.md)",
    )
    sip_max_calls_per_workspace: int = Field(
        default=PJSIP_MAX_CALLS,
        ge=1,
        le=1000,
        description="calls one workspace's rules carry at once in this process (486 above)",
    )
    sip_invites_per_s: float = Field(
        default=5.0,
        gt=0,
        le=1000,
        description="INVITEs a second one source address may send, with bursts of "
        "`SWITCHBOARD_SIP_INVITE_BURST` (503 above, before anything is looked up)",
    )
    sip_invite_burst: int = Field(default=10, ge=1, le=10_000, description="see above")
    sip_max_call_s: float = Field(
        default=3600.0,
        ge=5,
        le=86_400,
        description="the longest a call may last once answered: it is hung up then",
    )
    sip_dtmf_pause_s: float = Field(
        default=2.0,
        ge=0.2,
        le=30,
        description="keys pressed are sent to the assistant as one message after this "
        "pause, or at once on `#`",
    )

    @field_validator("sip_rtp_ports")
    @classmethod
    def _check_ports(cls, value: str) -> str:
        PortRange.parse(value)
        return value

    @field_validator("sip_listen", "sip_tls_listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        listen(value)
        return value

    @model_validator(mode="after")
    def _check_plan(self) -> SipSettings:
        plan = Dialplan.read(self.sip_trunks.get_secret_value(), self.sip_rules.get_secret_value())
        tls = bool(self.sip_tls_listen.strip())
        if plan.secure and not tls:
            raise ValueError(
                "SWITCHBOARD_SIP_TLS_LISTEN: a trunk calls over TLS (`tls`), so SIP must "
                "listen on TLS too"
            )
        if tls:
            if not self.sip_listen.strip():
                raise ValueError("SWITCHBOARD_SIP_TLS_LISTEN: needs SWITCHBOARD_SIP_LISTEN")
            files = [("CERT", self.sip_tls_cert), ("KEY", self.sip_tls_key)]
            if self.sip_tls_ca:
                files.append(("CA", self.sip_tls_ca))
            for name, path in files:
                if not path or not os.access(path, os.R_OK):
                    raise ValueError(
                        f"SWITCHBOARD_SIP_TLS_{name}: a readable PEM file is needed for "
                        f"SIP over TLS (got {path!r})"
                    )
        return self


def listen(value: str) -> tuple[str, int] | None:
    """``host:port`` as a pair; None for "" (no SIP); ValueError for anything else."""
    if not value.strip():
        return None
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65_535:
        raise ValueError(f"SWITCHBOARD_SIP_LISTEN: {value!r} is not host:port")
    return host.strip("[]"), int(port)
