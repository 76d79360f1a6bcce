"""``@modelcontextprotocol/server-everything``, the reference MCP server, as a process.

Pinned in tests/mcp/package.json (installed by scripts/install-tools.sh). A
preload (tests/mcp/observe.mjs) makes it write each ``notifications/cancelled``
it receives to its stderr, which ``stderr()`` returns.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import CALL_DEADLINE_S

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ROOT / "tests" / "mcp"
EVERYTHING = PACKAGES / "node_modules" / "@modelcontextprotocol" / "server-everything"
EVERYTHING_MAIN = EVERYTHING / "dist" / "index.js"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EverythingServer:
    """server-everything over streamable HTTP, its stderr in a file the tests read."""

    def __init__(self) -> None:
        if not EVERYTHING_MAIN.is_file():
            pytest.fail(
                "server-everything is not installed; run `make tools` (scripts/install-tools.sh)"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="mcp-everything-")
        self.log = Path(self._tmp.name) / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def start(self) -> None:
        # A port picked here may be taken before node binds it: try another.
        for _ in range(3):
            self.port = _free_port()
            with self.log.open("wb") as err:
                self.proc = subprocess.Popen(
                    ["node", "--import", "./observe.mjs", str(EVERYTHING_MAIN), "streamableHttp"],
                    cwd=PACKAGES,
                    env={**os.environ, "PORT": str(self.port)},
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            deadline = time.monotonic() + CALL_DEADLINE_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                if f"listening on port {self.port}" in self.stderr():
                    return
                time.sleep(0.05)
            self.stop()
            if "EADDRINUSE" not in self.stderr() and "already in use" not in self.stderr():
                break
        pytest.fail(f"server-everything did not start: {self.stderr()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=CALL_DEADLINE_S)

    def __enter__(self) -> EverythingServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()
