"""Real `switchboard serve` processes and external tools for end-to-end tests."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Self

import pytest

from tests.conftest import CALL_DEADLINE_S, TEST_DATABASE_TIMEOUT_S
from tests.infra import processlogs

ROOT = Path(__file__).resolve().parents[2]
#: Generous: at a load of 16 on 2 cores a `switchboard serve` printed nothing in 30 s.
START_TIMEOUT_S = 90.0


def tool(name: str) -> str:
    """Path of an external tool installed by `make tools`; a missing tool fails the test."""
    candidates = [os.environ.get("SWITCHBOARD_TOOLS_BIN", ""), str(ROOT / ".tools" / "bin")]
    for directory in candidates:
        if directory and (Path(directory) / name).is_file():
            return str(Path(directory) / name)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} is not installed; run `make tools` (the test command does this)")


def shared_secrets(directory: Path) -> dict[str, str]:
    """Settings that let several processes accept each other's tokens: one server secret and
    one signing key (written into ``directory``), not dev mode's, which are per database."""
    from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem

    key_file = directory / "k1.pem"
    key_file.write_bytes(private_key_pem(SigningKey.generate("k1")))
    return {
        "SWITCHBOARD_SECRET_KEY": "e2e-secret-key-that-is-long-enough-000000",
        "SWITCHBOARD_SIGNING_KEYS": str(key_file),
    }


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``switchboard ARGS`` run to its end (within a minute): its code and output."""
    return subprocess.run(
        [sys.executable, "-m", "switchboard.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
        check=False,
    )


def shared_env(directory: Path, postgres_url: str, redis_url: str) -> dict[str, str]:
    """Processes sharing PostgreSQL, Redis (the event log) and their secrets
    (``shared_secrets``, written into ``directory``)."""
    return {
        **shared_secrets(directory),
        "SWITCHBOARD_DATABASE_URL": postgres_url,
        "SWITCHBOARD_REDIS_URL": redis_url,
    }


def scaled_env(directory: Path, postgres_url: str, redis_url: str) -> dict[str, str]:
    """``shared_env``, with loopback egress allowed and the prober waiting to be asked."""
    return {
        **shared_env(directory, postgres_url, redis_url),
        "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
        "SWITCHBOARD_INTEGRATION_PROBE_INTERVAL_S": "3600",
    }


class ManagedProcess:
    """A child process with a private temporary directory: SIGTERM to stop it
    politely, and a kill plus cleanup on context exit whatever happened."""

    def __init__(self, prefix: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        # A start that fails after its process began (it printed the wrong line, or
        # nothing in time) leaves that process to this, never running on its own:
        # ``with`` calls no ``__exit__`` when ``__enter__`` raises.
        try:
            self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=CALL_DEADLINE_S)
        self._tmp.cleanup()


class ServeProcess(ManagedProcess):
    """`switchboard serve --port 0` in a subprocess; the bound port comes from its log."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = ["serve", "--host", "127.0.0.1", "--port", "0", *args]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        # Unless a test shares a database on purpose, each process gets its own
        # (never the default file in the working directory).
        super().__init__("switchboard-e2e-")
        full_env["SWITCHBOARD_DATABASE_URL"] = (
            f"sqlite+aiosqlite:///{self._tmp.name}/switchboard.db"
        )
        # A dispatcher replica's id is its own: two live processes may not share one.
        full_env["SWITCHBOARD_INSTANCE_ID"] = f"e2e-{os.path.basename(self._tmp.name)}"
        # Files too (with PostgreSQL they would go to the working directory otherwise).
        full_env["SWITCHBOARD_CONTEXT_FILES_DIR"] = f"{self._tmp.name}/files"
        # The in-process servers' database timeout (make_settings says why): on a slow
        # host under the suite's load, replicas on PostgreSQL waited past the product's
        # 5 s and failed runs as if the database were down. Tests of outages set theirs.
        full_env["SWITCHBOARD_DATABASE_TIMEOUT_S"] = str(TEST_DATABASE_TIMEOUT_S)
        full_env.update(env or {})
        self.env = full_env
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.log: list[dict[str, Any]] = []
        #: Every line the process wrote, as written (kept if its test fails: processlogs).
        self.log_path: Path | None = None
        self.port = 0

    def start(self) -> ServeProcess:
        self.log_path = processlogs.log_file(f"serve-{self.env['SWITCHBOARD_INSTANCE_ID']}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "switchboard.cli", *self.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        entry = self.wait_for("switchboard listening")
        self.port = int(entry["port"])
        return self

    def _pump(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        assert self.log_path is not None
        # Line-buffered: what a failure copies is every line read so far.
        with self.log_path.open("w", encoding="utf-8", errors="replace", buffering=1) as kept:
            kept.write(f"--- {' '.join(self.args)} (pid {self.proc.pid})\n")
            for raw in self.proc.stderr:
                kept.write(raw)
                try:
                    entry = json.loads(raw)
                except json.JSONDecodeError:
                    entry = {"message": raw.rstrip("\n"), "raw": True}
                self.lines.put(entry)
        self.lines.put(None)

    def wait_for(self, message: str, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Block until a log line with this message arrives (or the process ends)."""
        while True:
            try:
                entry = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no log line {message!r} within {timeout}s; log: {self.log}")
            if entry is None:
                pytest.fail(f"process ended before logging {message!r}; log: {self.log}")
            self.log.append(entry)
            if entry.get("message") == message:
                return entry

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def run(cmd: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
