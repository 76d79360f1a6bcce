"""A real TURN server (coturn's ``turnserver``) for the WebRTC tests.

It checks credentials the way a deployment's does with a shared secret
(``use-auth-secret``: the TURN REST API's scheme), so a test that gathers a relay
candidate with a credential the mesh minted shows the minting is right, and one that
gathers none with a tampered credential shows the server really checks. It listens on
127.0.0.1 at a free port (UDP and TCP), relays on 127.0.0.1 within a range of its own,
and keeps its log with the test's process logs.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import pytest

from tests.infra import processlogs

#: A bound on a hang, never a speed check (as tests/conftest.py's CALL_DEADLINE_S).
STARTUP_DEADLINE_S: Final = 60.0
REALM: Final = "switchboard.test"


@dataclass(frozen=True)
class TurnServer:
    port: int
    secret: str

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"


def _free_port() -> int:
    # Free for UDP and TCP both: coturn listens on each at the same port.
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextmanager
def turn_server(secret: str = "") -> Iterator[TurnServer]:
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.fail(
            "turnserver (coturn) is not installed: scripts/install-deps.sh test installs it"
        )
    secret = secret or f"turn-secret-{secrets.token_hex(16)}"
    port = _free_port()
    # The relay range: somewhere above the listener's, wide enough for a test's peers.
    relay_low = 40_000 + secrets.randbelow(20_000)
    with tempfile.TemporaryDirectory(prefix="switchboard-turn-") as folder:
        log = processlogs.log_file("turnserver")
        with log.open("w") as out:
            process = subprocess.Popen(
                [
                    binary,
                    "-n",  # no configuration file
                    "--listening-ip=127.0.0.1",
                    f"--listening-port={port}",
                    "--relay-ip=127.0.0.1",
                    f"--min-port={relay_low}",
                    f"--max-port={relay_low + 200}",
                    "--use-auth-secret",
                    f"--static-auth-secret={secret}",
                    f"--realm={REALM}",
                    "--allow-loopback-peers",
                    "--no-tls",
                    "--no-dtls",
                    "--no-cli",
                    f"--userdb={folder}/turndb",
                    f"--pidfile={folder}/turnserver.pid",
                    "--log-file=stdout",
                    "--simple-log",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + STARTUP_DEADLINE_S
            while not _answers(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"turnserver did not listen on {port}: {log.read_text()[-2000:]}"
                    )
                time.sleep(0.02)  # polling its port with a deadline
            yield TurnServer(port, secret)
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
