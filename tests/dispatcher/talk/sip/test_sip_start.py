"""`switchboard serve` with SIP that cannot start: a UDP port another socket holds, and
dispatch rules that do not parse, each stop the process at start (exit 2) with one line
naming the setting, no traceback, and nothing of PJSIP's on stdout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CALL_DEADLINE_S

pytestmark = pytest.mark.e2e


def refused(tmp_path: Path, **settings: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env["SWITCHBOARD_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path}/switchboard.db"
    env.update(settings)
    ran = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", "serve", "--dev", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=CALL_DEADLINE_S,
        check=False,
    )
    assert ran.returncode == 2, ran.stderr[-2000:]
    assert "Traceback" not in ran.stderr
    assert ran.stdout == ""
    lines = [
        line
        for line in ran.stderr.splitlines()
        if "configuration error" in line or "cannot start" in line
    ]
    assert len(lines) == 1, ran.stderr[-2000:]
    return lines[0]


def test_a_sip_port_in_use_stops_the_process_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        line = refused(tmp_path, SWITCHBOARD_SIP_LISTEN=f"127.0.0.1:{port}")
    assert f"SWITCHBOARD_SIP_LISTEN: SIP cannot listen on 127.0.0.1:{port}" in line
    assert "Address already in use" in line


def test_rules_that_do_not_parse_stop_the_process_naming_the_entry(tmp_path: Path) -> None:
    line = refused(
        tmp_path,
        SWITCHBOARD_SIP_LISTEN="127.0.0.1:0",
        SWITCHBOARD_SIP_TRUNKS='[{"name": "carrier", "addresses": ["10.0.0.0/8"]}]',
        SWITCHBOARD_SIP_RULES='[{"number": "+1", "assistant": "workspaces/w/assistants/a", '
        '"user": "users/u", "trunks": ["elsewhere"]}]',
    )
    assert "SIP rules[0].trunks" in line
    # The trunks' JSON, a secret setting, is never echoed.
    assert "10.0.0.0/8" not in line
