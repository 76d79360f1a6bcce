"""The logs of the processes a test started, kept where CI keeps artifacts when it fails.

A flake seen once in CI has to be understood from what that run left behind: the
processes' own logs, not only the assertion. Every helper that starts a server process
(``switchboard serve``, Envoy, PostgreSQL, Redis, SeaweedFS, the experts, the MCP test
server) writes its output to a file it gets from ``log_file`` (or names a file the
server writes itself with ``keep``). Each file belongs to an owner, decided when it is
registered:

- the test being run (its setup, call or teardown, and the function-scoped fixtures
  that run for it): the process is that test's;
- a fixture of wider scope (module, class, package, session) being set up, however it
  was reached: the process is the worker's, shared by the tests that follow (PostgreSQL,
  Redis or SeaweedFS started once per xdist worker, a module's server); when that fixture
  is torn down its logs pass to the test whose teardown that is;
- nothing at all (a process started outside any test): the worker's until the end.

When a test fails in any phase, its own logs (their last ``TEST_LOG_BYTES`` each) and the
worker's (their last ``WORKER_TAIL_BYTES`` each, under ``worker/``) are copied at once to
``$SWITCHBOARD_TEST_ARTIFACTS/failures/<test id, sanitized>/`` (a directory under the
system's temporary one when the variable is unset), and the report gets a section naming
that folder; the run's summary lists each failed test's folder again. When the test is
over, its own files are removed, whatever its outcome, so a long run's disk stays bounded
and a passing test leaves nothing behind.

Nothing here reads or polls a log: a helper writes its lines as it reads them (or the
server writes its file itself), and only a failure copies anything. Outside pytest (the
benchmarks use some helpers) ``log_file`` gives a path in a directory removed when the
interpreter exits, and ``keep`` does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

#: Where CI keeps what a run leaves behind (``.ci/run`` sets it to the clone's ``artifacts``).
ARTIFACTS_ENV: Final = "SWITCHBOARD_TEST_ARTIFACTS"
#: How much of each of a failed test's own process logs is copied (the end of it).
TEST_LOG_BYTES: Final = 16 * 1024 * 1024
#: How much of each of the worker's shared servers' logs is copied (the end of it):
#: PostgreSQL's log of a whole session is long, and its last part is what a test saw.
WORKER_TAIL_BYTES: Final = 2 * 1024 * 1024
#: The report section's title (``pytest --show-capture`` filters sections by title).
SECTION: Final = "process logs"
_WORKER_DIR: Final = "worker"
_NAME_LIMIT: Final = 120


@dataclass
class _Log:
    path: Path
    #: The file's name among the copies of a failure's folder (unique in the session).
    name: str
    #: A file of ours (removed when its owner is done), not one a server writes itself.
    ours: bool


class _Worker:
    """The owner of logs registered outside any test and any shared fixture's setup."""


_WORKER: Final = _Worker()
_Owner = pytest.Item | pytest.FixtureDef[object] | _Worker


def folder_name(nodeid: str) -> str:
    """A test id as one directory name: what is not a letter, digit, dot or dash becomes
    ``_``; a long id is cut and ends with a hash of the whole, so two never meet."""
    name = re.sub(r"[^A-Za-z0-9.-]", "_", nodeid).strip("._") or "test"
    if len(name) > _NAME_LIMIT:
        digest = hashlib.sha256(nodeid.encode()).hexdigest()[:12]
        name = f"{name[:_NAME_LIMIT]}-{digest}"
    return name


def artifacts_root() -> Path:
    """``$SWITCHBOARD_TEST_ARTIFACTS``, else ``switchboard-test-artifacts`` in the system's
    temporary directory (read at each failure, so a test of this plugin can point it)."""
    given = os.environ.get(ARTIFACTS_ENV)
    return Path(given) if given else Path(tempfile.gettempdir()) / "switchboard-test-artifacts"


def copy_tail(source: Path, target: Path, limit: int) -> bool:
    """The last ``limit`` bytes of ``source`` into ``target`` (a first line says how much
    was left out); False when ``source`` is gone."""
    try:
        with source.open("rb") as read:
            size = os.fstat(read.fileno()).st_size
            skipped = max(0, size - limit)
            read.seek(skipped)
            data = read.read(limit)
    except OSError:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as write:
        if skipped:
            write.write(f"[the first {skipped} bytes of {source.name} are left out]\n".encode())
        write.write(data)
    return True


class LogKeeper:
    """The plugin's state for one pytest session (one xdist worker); see the module."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self._directory: Path | None = None
        self._serial = itertools.count(1)
        self._lock = threading.Lock()
        self._item: pytest.Item | None = None
        #: Fixtures being set up, the innermost last.
        self._setting_up: list[pytest.FixtureDef[object]] = []
        self._logs: dict[_Owner, list[_Log]] = {}
        #: Test ids whose folder this session has already emptied (a later phase adds).
        self._emptied: set[str] = set()
        #: Failed test id -> folder, for the summary (on the xdist controller too).
        self.kept: dict[str, str] = {}

    @property
    def directory(self) -> Path:
        """Where this session's own log files are: made at the first (a session that starts
        no process, the xdist controller's, makes none)."""
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="switchboard-process-logs-"))
        return self._directory

    def _owner(self) -> _Owner:
        if self._setting_up and self._setting_up[-1].scope != "function":
            return self._setting_up[-1]
        return self._item if self._item is not None else _WORKER

    def _register(self, stem: str, path: Path | None) -> Path:
        """``path`` (a server's own file), else a new file of ours."""
        with self._lock:
            if path is not None and any(
                log.path == path for logs in self._logs.values() for log in logs
            ):
                return path  # the same file again (a server restarted on its port)
            name = f"{re.sub(r'[^A-Za-z0-9.-]+', '_', stem)}-{next(self._serial)}.log"
            log = _Log(path or self.directory / name, name, ours=path is None)
            self._logs.setdefault(self._owner(), []).append(log)
        return log.path

    def log_file(self, stem: str) -> Path:
        return self._register(stem, None)

    def keep(self, path: Path, stem: str) -> None:
        self._register(stem, path)

    def set_aside(self, path: Path) -> None:
        with self._lock:
            found = [log for logs in self._logs.values() for log in logs if log.path == path]
            for log in found:
                target = self.directory / log.name
                try:
                    shutil.move(path, target)
                except OSError:
                    continue  # gone already: nothing to keep
                log.path, log.ours = target, True

    def _pass_on(self, owner: _Owner, to: _Owner | None) -> None:
        with self._lock:
            logs = self._logs.pop(owner, [])
            if to is not None:
                self._logs.setdefault(to, []).extend(logs)
                return
        for log in logs:
            if log.ours:
                log.path.unlink(missing_ok=True)

    def _keep_failure(self, item: pytest.Item) -> Path | None:
        with self._lock:
            own = list(self._logs.get(item, []))
            shared = [
                log
                for owner, logs in self._logs.items()
                if not isinstance(owner, pytest.Item)
                for log in logs
            ]
        if not own and not shared:
            return None
        folder = artifacts_root() / "failures" / folder_name(item.nodeid)
        if item.nodeid not in self._emptied:
            # What an earlier run left for the same test is not this failure's.
            shutil.rmtree(folder, ignore_errors=True)
            self._emptied.add(item.nodeid)
        folder.mkdir(parents=True, exist_ok=True)
        for log in own:
            copy_tail(log.path, folder / log.name, TEST_LOG_BYTES)
        for log in shared:
            copy_tail(log.path, folder / _WORKER_DIR / log.name, WORKER_TAIL_BYTES)
        return folder

    # Hooks.

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        self._item = item
        try:
            return (yield)
        finally:
            self._item = None
            self._pass_on(item, None)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[object]
    ) -> Generator[None, object, object]:
        self._setting_up.append(fixturedef)
        try:
            return (yield)
        finally:
            self._setting_up.pop()

    def pytest_fixture_post_finalizer(self, fixturedef: pytest.FixtureDef[object]) -> None:
        # A teardown that fails on a shared server's way out still finds its log.
        if fixturedef in self._logs:
            self._pass_on(fixturedef, self._item)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.failed:
            folder = self._keep_failure(item)
            if folder is not None:
                report.sections.append((SECTION, f"kept in {folder}"))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Here, not in makereport: the xdist controller only sees the workers' reports.
        for title, content in report.sections:
            if title == SECTION and report.failed:
                self.kept[report.nodeid] = content.removeprefix("kept in ")

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.kept or hasattr(self._config, "workerinput"):
            return
        terminalreporter.write_sep("-", "process logs of the failed tests")
        for nodeid, folder in self.kept.items():
            terminalreporter.write_line(f"{nodeid}: {folder}")

    def close(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)


_STASH: Final = pytest.StashKey[LogKeeper]()
#: One keeper per configured session, the newest last (pytester's in-process runs nest one).
_KEEPERS: list[LogKeeper] = []
_fallback: Path | None = None
_fallback_serial = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    keeper = LogKeeper(config)
    config.stash[_STASH] = keeper
    config.pluginmanager.register(keeper, "switchboard-processlogs-keeper")
    _KEEPERS.append(keeper)


def pytest_unconfigure(config: pytest.Config) -> None:
    keeper = config.stash.get(_STASH, None)
    if keeper is not None:
        with contextlib.suppress(ValueError):
            _KEEPERS.remove(keeper)
        keeper.close()


def log_file(stem: str) -> Path:
    """A new file for a process's output (``stem`` names the process in the copies), owned
    by the running test or by the worker (see the module); it does not exist yet."""
    if _KEEPERS:
        return _KEEPERS[-1].log_file(stem)
    global _fallback  # noqa: PLW0603 - one directory per interpreter outside pytest
    if _fallback is None:
        _fallback = Path(tempfile.mkdtemp(prefix="switchboard-process-logs-"))
        atexit.register(shutil.rmtree, _fallback, ignore_errors=True)
    return _fallback / f"{stem}-{next(_fallback_serial)}.log"


def keep(path: Path, stem: str) -> None:
    """A log file a server writes itself in a place its helper chose, owned like
    ``log_file``'s; a helper that removes it first calls ``set_aside``."""
    if _KEEPERS:
        _KEEPERS[-1].keep(path, stem)


def set_aside(path: Path) -> None:
    """``keep``'s ``path`` is about to be removed with its directory: it moves among this
    module's files, for its owner's failure to find (a teardown may fail after this)."""
    if _KEEPERS:
        _KEEPERS[-1].set_aside(path)
