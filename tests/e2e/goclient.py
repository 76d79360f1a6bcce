"""The Go client (clients/go) from tests: its go toolchain commands, and the quickstart
example as a child process whose JSON lines a test waits on."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import ROOT, tool

GO_DIR = ROOT / "clients" / "go"
#: A cold build of grpc-go takes tens of seconds on two cores, more when other tests run.
BUILD_TIMEOUT_S = 600.0
#: How long a test waits for one thing the example reports, however busy the machine is.
LINE_TIMEOUT_S = 60.0

Line = dict[str, Any]


def go_env() -> dict[str, str]:
    """The environment of every go command: modules only from the local cache (`make
    tools` downloads them; a test never does), the toolchain that is installed, and no
    VCS stamping (the checkout is shared and may be mid-commit)."""
    env = dict(os.environ)
    env.update(
        {
            "GOFLAGS": "-mod=readonly -buildvcs=false",
            "GOPROXY": "off",
            "GOTOOLCHAIN": "local",
        }
    )
    return env


def go(*args: str, timeout: float = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``go args...`` in clients/go."""
    return subprocess.run(
        [tool("go"), *args],
        cwd=GO_DIR,
        env=go_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def gofmt(*args: str) -> subprocess.CompletedProcess[str]:
    """``gofmt args...`` in clients/go, the gofmt of the go toolchain in use."""
    goroot = go("env", "GOROOT", timeout=60.0).stdout.strip()
    return subprocess.run(
        [str(Path(goroot) / "bin" / "gofmt"), *args],
        cwd=GO_DIR,
        capture_output=True,
        text=True,
        timeout=120.0,
        check=False,
    )


def build_quickstart(directory: Path) -> Path:
    return build_example(directory, "quickstart")


def build_example(directory: Path, name: str) -> Path:
    """``go build ./examples/<name>`` into ``directory``; the binary."""
    binary = directory / name
    done = go("build", "-o", str(binary), f"./examples/{name}")
    if done.returncode != 0:
        pytest.fail(f"go build failed (run `make tools` for the modules):\n{done.stderr}")
    return binary


class Quickstart:
    """The quickstart example running: every stdout line is a JSON object, kept in
    ``lines`` in order; waits are on those lines, each with a deadline."""

    def __init__(self, binary: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = [str(binary), *args]
        # Only the settings a test gives: none leaks in from the environment running it.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        self.env = {**inherited, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[Line] = []
        self._incoming: queue.Queue[Line | None] = queue.Queue()
        self._stderr: list[str] = []
        self._read = 0

    def __enter__(self) -> Quickstart:
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=LINE_TIMEOUT_S)

    def _pump(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                line = {"kind": "not-json", "raw": raw}
            self._incoming.put(line)
        self._incoming.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._stderr.append(raw)

    def describe(self) -> str:
        shown = "\n".join(json.dumps(line) for line in self.lines)
        return f"stdout:\n{shown}\nstderr:\n{''.join(self._stderr)}"

    def _take(self, timeout: float) -> Line | None:
        """The next line (also appended to ``lines``); None once stdout closed."""
        try:
            line = self._incoming.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout}s\n{self.describe()}") from None
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for(
        self, predicate: Callable[[Line], bool], what: str, timeout: float = LINE_TIMEOUT_S
    ) -> Line:
        """The first line not waited past yet that matches; fails on an "error" line,
        the end of the output, or the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            while self._read < len(self.lines):
                line = self.lines[self._read]
                self._read += 1
                if predicate(line):
                    return line
                if line["kind"] == "error":
                    raise AssertionError(
                        f"the example failed waiting for {what}\n{self.describe()}"
                    )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not within {timeout}s: {what}\n{self.describe()}")
            if self._take(remaining) is None:
                raise AssertionError(f"the example ended before {what}\n{self.describe()}")

    def wait_kind(self, kind: str, timeout: float = LINE_TIMEOUT_S) -> Line:
        return self.wait_for(lambda line: line["kind"] == kind, f"a {kind!r} line", timeout)

    def finish(self, timeout: float = LINE_TIMEOUT_S) -> int:
        """Read the output to its end and return the exit code."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self._take(max(0.001, deadline - time.monotonic())) is not None:
            pass
        return self.proc.wait(timeout=max(0.001, deadline - time.monotonic()))

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def of_kind(self, kind: str) -> list[Line]:
        return [line for line in self.lines if line["kind"] == kind]
