"""Domain experts as real processes for tests: the Python example (examples/expert/expert.py)
and the Node.js one (clients/node/expert.mjs). Each prints ``LISTENING <port>`` first."""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ROOT, START_TIMEOUT_S, ManagedProcess
from tests.infra import processlogs

EXPERT = ROOT / "examples" / "expert" / "expert.py"
NODE_EXPERT = ROOT / "clients" / "node" / "expert.mjs"
POLL_INTERVAL_S = 0.01


class ListeningProcess(ManagedProcess):
    """A server process whose first stdout line is ``LISTENING <port>``."""

    def __init__(self, prefix: str, port: int = 0) -> None:
        super().__init__(prefix)
        self._prefix = prefix
        self.port = port
        self.stderr_path = Path(self._tmp.name) / "stderr.log"
        self._stdout: queue.Queue[str | None] = queue.Queue()

    def _launch(
        self,
        argv: Sequence[str],
        what: str,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        # Not in the process's directory, which goes when it stops: kept if its test fails.
        self.stderr_path = processlogs.log_file(
            self._prefix.removeprefix("switchboard-").strip("-")
        )
        with self.stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen(
                list(argv), stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=cwd
            )
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            first = self._stdout.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"{what} printed nothing within {START_TIMEOUT_S}s; {self._stderr()}")
        if first is None or not first.startswith("LISTENING "):
            pytest.fail(f"{what} did not start (first line {first!r}); {self._stderr()}")
        self.port = int(first.split()[1])
        #: Everything after ``LISTENING`` (a process with more than one port names each).
        self.announced = first.split()[1:]

    def _pump(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._stdout.put(line.rstrip("\n"))
        self._stdout.put(None)

    def _stderr(self) -> str:
        return f"stderr:\n{self.stderr_path.read_text(errors='replace')}"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=CALL_DEADLINE_S)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class ExpertProcess(ListeningProcess):
    """``expert.py --port 0`` in a subprocess; the bound port comes from its
    first stdout line, and what it did from its side-effects file."""

    def __init__(
        self,
        id: str = "weather",
        side_effects: Path | None = None,
        *,
        args: Sequence[str] = (),
    ) -> None:
        super().__init__("switchboard-expert-")
        self.id = id
        self.side_effects = side_effects or Path(self._tmp.name) / "side-effects.log"
        self.args = ["--port", "0", "--id", id, "--side-effects", str(self.side_effects), *args]

    def start(self) -> ExpertProcess:
        env = dict(os.environ)
        # The checkout's trees first: the expert runs this checkout's
        # generated code whether or not (and wherever) the package is installed.
        paths = [str(ROOT / "services"), str(ROOT / "gen"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
        self.side_effects.touch()
        self._launch([sys.executable, str(EXPERT), *self.args], "the expert", env=env)
        return self

    def lines(self) -> list[str]:
        """The side-effects file's complete lines so far."""
        text = self.side_effects.read_text(encoding="utf-8")
        # A line the expert is still writing has no newline yet.
        return text.split("\n")[:-1]

    async def wait_for_line(
        self,
        predicate: Callable[[str], bool],
        # A caller's asyncio.timeout could not put the file's content in the failure.
        timeout: float = CALL_DEADLINE_S,  # noqa: ASYNC109
    ) -> str:
        """The first side-effects line for which ``predicate`` holds, once it is written.

        The writer is another process, so this polls (every 10 ms, up to
        ``timeout``); it fails with the file's content on timeout or if the
        process exits first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            lines = self.lines()
            for line in lines:
                if predicate(line):
                    return line
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(
                    f"expert exited ({self.proc.returncode}) before the line;"
                    f" side effects: {lines}; {self._stderr()}"
                )
            if loop.time() > deadline:
                pytest.fail(f"no such side-effects line within {timeout}s; lines: {lines}")
            await asyncio.sleep(POLL_INTERVAL_S)


class NodeExpert(ListeningProcess):
    """``node clients/node/expert.mjs`` (a HandlerService expert with grpc.health.v1)."""

    def __init__(self, *args: str, port: int = 0) -> None:
        super().__init__("switchboard-node-expert-", port)
        self.args = ["--port", str(port), *args]

    def start(self) -> NodeExpert:
        self._launch(
            ["node", str(NODE_EXPERT), *self.args], "the Node expert", cwd=NODE_EXPERT.parent
        )
        return self
