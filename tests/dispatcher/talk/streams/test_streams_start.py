"""`switchboard serve` with media streams that cannot start: a port another socket holds,
rules that do not parse, no public URL, no carrier, a short token: each stops the process
at start (exit 2) with one line naming the setting, and no secret echoed."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.dispatcher.talk.sip.test_sip_start import refused

pytestmark = pytest.mark.e2e

TOKEN = "0123456789abcdef0123456789abcdef"
PUBLIC = "https://calls.example.test"


def test_a_port_in_use_stops_the_process_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refused(
            tmp_path,
            SWITCHBOARD_STREAMS_LISTEN=f"127.0.0.1:{port}",
            SWITCHBOARD_STREAMS_PUBLIC_URL=PUBLIC,
            SWITCHBOARD_STREAMS_TWILIO_AUTH_TOKEN=TOKEN,
        )
    assert f"SWITCHBOARD_STREAMS_LISTEN: media streams cannot listen on 127.0.0.1:{port}" in line
    assert TOKEN not in line


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        (
            {
                "SWITCHBOARD_STREAMS_TWILIO_AUTH_TOKEN": TOKEN,
                "SWITCHBOARD_STREAMS_RULES": '[{"number": "+1", "assistant": '
                '"workspaces/w/assistants/a", "user": "users/u", "trunks": ["sip-trunk"]}]',
            },
            "SWITCHBOARD_STREAMS_RULES: SIP rules[0].trunks",
        ),
        ({"SWITCHBOARD_STREAMS_PUBLIC_URL": ""}, "SWITCHBOARD_STREAMS_PUBLIC_URL: needed"),
        ({}, "SWITCHBOARD_STREAMS_TELNYX_PUBLIC_KEY (a carrier"),
        ({"SWITCHBOARD_STREAMS_TWILIO_AUTH_TOKEN": "short"}, "at least 16 characters"),
        (
            {
                "SWITCHBOARD_STREAMS_TWILIO_AUTH_TOKEN": TOKEN,
                "SWITCHBOARD_STREAMS_PUBLIC_URL": "https://calls.example.test/somewhere",
            },
            "SWITCHBOARD_STREAMS_PUBLIC_URL: an https:// URL of a host",
        ),
        (
            {"SWITCHBOARD_STREAMS_TELNYX_PUBLIC_KEY": "bm90IGEga2V5"},
            "an ed25519 public key in base64",
        ),
    ],
)
def test_settings_that_cannot_work_stop_the_process(
    tmp_path: Path, settings: dict[str, str], said: str
) -> None:
    env = {
        "SWITCHBOARD_STREAMS_LISTEN": "127.0.0.1:0",
        "SWITCHBOARD_STREAMS_PUBLIC_URL": PUBLIC,
        **settings,
    }
    line = refused(tmp_path, **env)
    assert said in line
    assert TOKEN not in line
