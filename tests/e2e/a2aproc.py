"""The test A2A agent (tests/e2e/a2aagent.py) as a process: ports, card URL, side effects."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx

from tests.conftest import CALL_DEADLINE_S
from tests.e2e.expertproc import ExpertProcess, ListeningProcess
from tests.e2e.procs import ROOT

AGENT = ROOT / "tests" / "e2e" / "a2aagent.py"


class A2AAgentProcess(ExpertProcess):
    """``a2aagent.py``: its HTTP port (card, JSON-RPC, ``/release``) and its gRPC port.

    Given ports are bound again by ``restart``, so the card and every address a
    client holds stay right. ``wait_for_line`` and ``lines`` read its side effects.
    """

    def __init__(
        self,
        *,
        token: str = "",
        jsonrpc_only: bool = False,
        advertise_grpc: str = "",
        port: int = 0,
        grpc_port: int = 0,
        side_effects: Path | None = None,
    ) -> None:
        ListeningProcess.__init__(self, "switchboard-a2a-agent-", port)
        self.grpc_port = grpc_port
        self.side_effects = side_effects or Path(self._tmp.name) / "side-effects.log"
        self.options = {
            "token": token,
            "jsonrpc_only": jsonrpc_only,
            "advertise_grpc": advertise_grpc,
        }
        self.args = ["--side-effects", str(self.side_effects)]
        if token:
            self.args += ["--token", token]
        if jsonrpc_only:
            self.args.append("--jsonrpc-only")
        if advertise_grpc:
            self.args += ["--advertise-grpc", advertise_grpc]

    def start(self) -> A2AAgentProcess:
        env = dict(os.environ)
        paths = [str(ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
        self.side_effects.touch()
        ports = ["--port", str(self.port), "--grpc-port", str(self.grpc_port)]
        self._launch([sys.executable, str(AGENT), *ports, *self.args], "the A2A agent", env=env)
        self.grpc_port = int(self.announced[1])
        return self

    @property
    def card_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/agent-card.json"

    async def release(self) -> None:
        """Let a ``hold`` task stream its second half."""
        async with httpx.AsyncClient(timeout=CALL_DEADLINE_S) as client:
            answer = await client.post(f"http://127.0.0.1:{self.port}/release")
            assert answer.status_code == 200

    def restart(self) -> A2AAgentProcess:
        """Kill it; the same agent on the same ports, to start with ``with`` (a crash and
        a restart): the new process is that ``with``'s to stop, whatever happens."""
        self.kill()
        again = A2AAgentProcess(
            port=self.port,
            grpc_port=self.grpc_port,
            side_effects=self.side_effects,
            token=str(self.options["token"]),
            jsonrpc_only=bool(self.options["jsonrpc_only"]),
            advertise_grpc=str(self.options["advertise_grpc"]),
        )
        return again
