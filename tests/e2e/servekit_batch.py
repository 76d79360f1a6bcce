"""A module's one-shot ``switchboard`` commands, each test's own process, run ahead.

A command that refuses a setting or ends at once still imports the whole server first
(seconds on two busy cores): run in turn, each test's process waits on the one before it
for nothing. ``started`` plans, when the first test asks for one, a process for every
test of the module selected in this run that the module's ``Plan`` gives a command, and
keeps ``RUNNING`` of them running in the tests' order: while a test waits for its own,
the next test's runs beside it. A test run alone starts its own process only.

Under xdist the module's tests are on one worker (``--dist loadfile``, as ``make test``
runs them); with ``--dist load`` a worker also runs the commands of the module's tests
sent to another one, which is waste, never a wrong result.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from tests.e2e.procs import START_TIMEOUT_S

#: Processes running at once: the suite's machine has two cores, and more would make each
#: one's time (what its test waits for, within START_TIMEOUT_S) that of all of them.
RUNNING: Final = 2


@dataclass(frozen=True)
class Command:
    """``switchboard ARGS`` with ``env`` (the caller's when None) in ``cwd``."""

    args: tuple[str, ...]
    env: dict[str, str] | None = None
    cwd: Path | None = None


#: The command of one selected test of the module (None: it starts none), given a
#: directory of its own (made when called) and a stack that closes with the module
#: (for what must outlive the process, such as a socket holding a port).
Plan = Callable[[pytest.Function, Callable[[], Path], ExitStack], Command | None]


class Started:
    """The processes of a module's tests, by test node id."""

    def __init__(self) -> None:
        #: Not started yet, in the tests' order.
        self._planned: dict[str, tuple[Command, Path]] = {}
        self._procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def plan(self, nodeid: str, command: Command, directory: Path) -> None:
        self._planned[nodeid] = (command, directory)

    def _start(self, nodeid: str) -> None:
        command, directory = self._planned.pop(nodeid)
        # Output to files, not pipes: nobody reads a process's output until its test runs.
        with (directory / "stdout").open("wb") as out, (directory / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "switchboard.cli", *command.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=command.env,
                cwd=command.cwd,
            )
        self._procs[nodeid] = (proc, directory)

    def fill(self) -> None:
        """Start the next planned commands while fewer than ``RUNNING`` run."""
        running = sum(proc.poll() is None for proc, _ in self._procs.values())
        for nodeid in list(self._planned)[: max(0, RUNNING - running)]:
            self._start(nodeid)

    def result(self, nodeid: str) -> subprocess.CompletedProcess[str]:
        """The test's command run to its end: its code and output."""
        assert nodeid in self._planned or nodeid in self._procs, (
            f"the module's plan gives {nodeid} no command"
        )
        if nodeid in self._planned:  # the tests run in another order than planned
            self._start(nodeid)
        self.fill()
        proc, directory = self._procs[nodeid]
        try:
            code: int | None = proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=START_TIMEOUT_S)
            code = None
        self.fill()
        out = (directory / "stdout").read_text(errors="replace")
        err = (directory / "stderr").read_text(errors="replace")
        if code is None:
            pytest.fail(f"{proc.args!r} did not end in {START_TIMEOUT_S:g} s:\n{err[-3000:]}")
        return subprocess.CompletedProcess(proc.args, code, out, err)

    def close(self) -> None:
        self._planned.clear()
        for proc, _ in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=START_TIMEOUT_S)


class _Directory:
    """A test's own directory, made the first time it is asked for."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._path: Path | None = None

    def __call__(self) -> Path:
        if self._path is None:
            self._path = self._factory.mktemp("command")
        return self._path


def started(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, plan: Plan
) -> Iterator[Started]:
    """For a module-scoped fixture to ``yield from``: the processes of the module's
    selected tests, the first ones started; any still running is killed when the module
    ends."""
    with ExitStack() as stack:
        batch = Started()
        stack.callback(batch.close)
        for item in request.session.items:
            if not isinstance(item, pytest.Function) or item.module is not request.module:
                continue
            directory = _Directory(tmp_path_factory)
            command = plan(item, directory, stack)
            if command is not None:
                batch.plan(item.nodeid, command, directory())
        batch.fill()
        yield batch


def fixtures(plan: Plan) -> tuple[Any, Any]:
    """A module's two fixtures, bound as ``at_once, ran = fixtures(_plan)``: ``at_once``
    (module scope) starts the selected tests' commands, and ``ran`` is the test's own
    command, run ahead beside the module's others, to its end."""

    @pytest.fixture(scope="module", name="at_once")
    def at_once(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Started]:
        yield from started(request, tmp_path_factory, plan)

    @pytest.fixture(name="ran")
    def ran(at_once: Started, request: pytest.FixtureRequest) -> subprocess.CompletedProcess[str]:
        return at_once.result(request.node.nodeid)

    return at_once, ran
