"""The real `switchboard` command: keygen, refusing every bad setting, and text logs.

An operator's mistake gets exit code 2 and one line naming what is wrong (the
file, or the SWITCHBOARD_* variable), never a traceback and never a secret.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import cast

import grpc
import pytest

from switchboard import cli as switchboard_cli
from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.platform.security.credentials.accesstokens import load_key_ring
from tests.conftest import CALL_DEADLINE_S
from tests.e2e import servekit_batch
from tests.e2e.procs import START_TIMEOUT_S, cli

pytestmark = pytest.mark.e2e

EXIT_CONFIG = 2


def _env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """The environment without the caller's SWITCHBOARD_* settings, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SWITCHBOARD_")}
    env["SWITCHBOARD_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path}/switchboard.db"
    env.update(variables)
    return env


# keygen: the first test through the real command, the others through its entry point in
# this process (the command is the same code; a process each only adds its start).


def _keygen(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``switchboard keygen ARGS`` in this process: its exit code and what it wrote to stderr."""
    code = switchboard_cli.main(["keygen", *args])
    return code, capsys.readouterr().err


def test_keygen_creates_missing_directories_owner_only(tmp_path: Path) -> None:
    done = cli("keygen", "keys/prod/k1.pem", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for directory in (tmp_path / "keys", tmp_path / "keys" / "prod"):
        assert directory.stat().st_mode & 0o777 == 0o700
    key = tmp_path / "keys" / "prod" / "k1.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert load_key_ring([str(key)]).active.kid == "k1"
    assert [p.name for p in key.parent.iterdir()] == ["k1.pem"]  # no temporary file left


def test_keygen_refuses_to_overwrite_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _keygen(capsys, str(tmp_path / "k1.pem"))[0] == 0
    before = (tmp_path / "k1.pem").read_bytes()
    code, stderr = _keygen(capsys, str(tmp_path / "k1.pem"))
    assert code == EXIT_CONFIG
    assert "Traceback" not in stderr
    assert f"{tmp_path / 'k1.pem'} exists" in stderr
    assert "--force" in stderr
    assert (tmp_path / "k1.pem").read_bytes() == before


def test_keygen_force_replaces_the_key_owner_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k1.pem"
    key.write_text("old")
    key.chmod(0o644)
    code, stderr = _keygen(capsys, "--force", str(key))
    assert code == 0, stderr
    assert key.stat().st_mode & 0o777 == 0o600
    assert load_key_ring([str(key)]).active.kid == "k1"


@pytest.mark.parametrize(
    ("make", "target", "fragment"),
    [
        (lambda tmp: (tmp / "file").write_text(""), "file/k1.pem", "file: not a directory"),
        (lambda tmp: (tmp / "dir.pem").mkdir(), "dir.pem", "dir.pem is a directory"),
        (lambda tmp: None, "bad key id!.pem", "key id"),
    ],
)
def test_keygen_explains_a_path_it_cannot_use(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], object],
    target: str,
    fragment: str,
) -> None:
    make(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, stderr = _keygen(capsys, target)
    assert code == EXIT_CONFIG
    assert "Traceback" not in stderr
    assert fragment in stderr


# Every bad setting: exit 2, one line naming the variable, no traceback, no secret.

SECRET = "sk-live-do-not-print-me"


#: Refused while the settings are read, before anything starts: checked in this process
#: through the command's own entry point (a process each would cost seconds to import the
#: server), and one of them, below, through the real command.
REFUSED_EARLY = [
    ({"SWITCHBOARD_SECRET_KEY": SECRET[:12]}, "SWITCHBOARD_SECRET_KEY must be at least 32"),
    ({"SWITCHBOARD_PROT": "50052"}, "SWITCHBOARD_PROT is not a setting; did you mean"),
    ({"SWITCHBOARD_LLM_BASE_URL": "http://127.0.0.1:9/v1"}, "SWITCHBOARD_LLM_MODEL is missing"),
    ({"SWITCHBOARD_LLM_API_KEY": SECRET}, "SWITCHBOARD_LLM_API_KEY needs"),
    ({"SWITCHBOARD_DISPATCHER_ROUTES": "weather"}, "SWITCHBOARD_DISPATCHER_ROUTES: route"),
    (
        {"SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS": "weather"},
        "SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS: remote handler",
    ),
    (
        {
            "SWITCHBOARD_LLM_BASE_URL": "http://127.0.0.1:9/v1",
            "SWITCHBOARD_LLM_MODEL": "m-1",
            "SWITCHBOARD_LLM_FALLBACKS": f'[{{"name": "b", "api_key": "{SECRET}"',
        },
        "SWITCHBOARD_LLM_FALLBACKS: ",
    ),
    (
        {
            "SWITCHBOARD_LLM_BASE_URL": "http://127.0.0.1:9/v1",
            "SWITCHBOARD_LLM_MODEL": "m-1",
            "SWITCHBOARD_LLM_PRICES": '{"m-1": {"input_per_mtok": "free"}}',
        },
        "SWITCHBOARD_LLM_PRICES: ",
    ),
    ({"SWITCHBOARD_DISPATCHER_BLOCKLIST": "re:("}, "SWITCHBOARD_DISPATCHER_BLOCKLIST: "),
    (
        {"SWITCHBOARD_REDIS_URL": f"redis://:{SECRET}@cache:port/0"},
        "SWITCHBOARD_REDIS_URL: not a valid Redis URL",
    ),
]
#: Refused once the server starts (it opens its database): the real command.
REFUSED_AT_START = [
    (
        {"SWITCHBOARD_DATABASE_URL": f"postgresql+asyncpg://app:{SECRET}@127.0.0.1:9/app"},
        "SWITCHBOARD_DATABASE_URL: cannot open the database",
    ),
    (
        {"SWITCHBOARD_DATABASE_URL": "sqlite+aiosqlite:////nonexistent/dir/x.db"},
        "SWITCHBOARD_DATABASE_URL: ",
    ),
    ({"SWITCHBOARD_SECRET_KEY": SECRET[:12]}, "SWITCHBOARD_SECRET_KEY must be at least 32"),
    (
        {"SWITCHBOARD_DISPATCHER_ROUTES": "/w=nosuch"},
        "SWITCHBOARD_DISPATCHER_ROUTES: no handler",
    ),
    (
        {"SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS": "echo=127.0.0.1:9"},
        "SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS: two handlers claim the id 'echo'",
    ),
    ({"SWITCHBOARD_CONTEXT_TOKENIZER": "nosuch"}, "SWITCHBOARD_CONTEXT_TOKENIZER: unknown"),
]


def _refusal_is_clean(code: int, stderr: str, named: str) -> None:
    assert code == EXIT_CONFIG, stderr[-2000:]
    assert named in stderr
    assert "Traceback" not in stderr
    assert SECRET not in stderr
    assert SECRET[:12] not in stderr


def _serve_here(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variables: dict[str, str],
    port: str = "0",
) -> tuple[int, str]:
    """``switchboard serve --dev --port PORT`` through the command's entry point in this
    process, with only ``variables`` of SWITCHBOARD_*, refused before its server starts:
    its exit code and what it wrote to stderr."""
    for key in [k for k in os.environ if k.upper().startswith("SWITCHBOARD_")]:
        monkeypatch.delenv(key)
    for key, value in _env(tmp_path, **variables).items():
        if key.upper().startswith("SWITCHBOARD_"):
            monkeypatch.setenv(key, value)

    def started(*_: object, **__: object) -> int:
        raise AssertionError("the server started: the setting was not refused first")

    # The command starts its server with asyncio.run; a refusal comes before it.
    monkeypatch.setattr(asyncio, "run", started)
    code = switchboard_cli.main(["serve", "--dev", "--port", port])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("variables", "named"), REFUSED_EARLY)
def test_serve_refuses_a_bad_setting_by_name(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variables: dict[str, str],
    named: str,
) -> None:
    code, stderr = _serve_here(tmp_path, monkeypatch, capsys, variables)
    _refusal_is_clean(code, stderr, named)


_MIGRATE_CANNOT_OPEN = "test_migrate_names_a_database_it_cannot_open"


def _plan(
    test: pytest.Function, directory: Callable[[], Path], _: ExitStack
) -> servekit_batch.Command | None:
    """The real command of each test below that runs one to its end (``ran``)."""
    if test.originalname == "test_the_command_refuses_a_bad_setting_by_name":
        variables = cast("dict[str, str]", test.callspec.params["variables"])
        return servekit_batch.Command(
            ("serve", "--dev", "--port", "0"), env=_env(directory(), **variables)
        )
    if test.originalname == _MIGRATE_CANNOT_OPEN:
        env = _env(
            directory(),
            SWITCHBOARD_DEV_MODE="true",
            SWITCHBOARD_DATABASE_URL="sqlite+aiosqlite:////nonexistent/dir/x.db",
        )
        return servekit_batch.Command(("migrate",), env=env)
    return None


at_once, ran = servekit_batch.fixtures(_plan)


@pytest.mark.parametrize(("variables", "named"), REFUSED_AT_START)
def test_the_command_refuses_a_bad_setting_by_name(
    ran: subprocess.CompletedProcess[str], variables: dict[str, str], named: str
) -> None:
    # ``variables`` are the command's environment: ``_plan`` reads them from the test.
    _refusal_is_clean(ran.returncode, ran.stderr, named)


def test_migrate_names_a_database_it_cannot_open(ran: subprocess.CompletedProcess[str]) -> None:
    assert ran.args[-1] == "migrate"
    assert ran.returncode == EXIT_CONFIG
    assert "SWITCHBOARD_DATABASE_URL: cannot open the database" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_the_e2e_harness_variable_is_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # tests/e2e/procs.py reads SWITCHBOARD_TOOLS_BIN; a server started from the
    # same shell must not refuse it. `--port -1` stops the start right after
    # the settings are read (a variable refused would be named first).
    variables = {"SWITCHBOARD_TOOLS_BIN": str(tmp_path)}
    code, stderr = _serve_here(tmp_path, monkeypatch, capsys, variables, port="-1")
    assert code == EXIT_CONFIG
    assert "SWITCHBOARD_PORT" in stderr
    assert "SWITCHBOARD_TOOLS_BIN" not in stderr


# Text logs carry what JSON logs carry.


class _Lines:
    def __init__(self, stream: object) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, fragment: str) -> str:
        while True:
            line = self.lines.get(timeout=START_TIMEOUT_S)
            assert line is not None, f"the process ended before logging {fragment!r}"
            if fragment in line:
                return line


def _fields(line: str, message: str) -> dict[str, str]:
    tail = line.split(f" {message} ", 1)[1]
    return dict(pair.split("=", 1) for pair in tail.split(" "))


@pytest.fixture
def text_serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], _Lines]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "switchboard.cli", "serve", "--dev", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path, SWITCHBOARD_LOG_FORMAT="text"),
    )
    assert proc.stderr is not None
    try:
        yield proc, _Lines(proc.stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_text_logs_show_the_address_and_each_call(
    text_serve: tuple[subprocess.Popen[str], _Lines],
) -> None:
    proc, lines = text_serve
    listening = _fields(lines.until("switchboard listening"), "switchboard listening")
    address = listening["address"]
    assert address.startswith("127.0.0.1:")
    assert "switchboard.api.auth.v1.AuthService" in listening["services"].split(",")
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError):
        auth_pb2_grpc.AuthServiceStub(channel).GetPrincipal(
            auth_pb2.GetPrincipalRequest(), timeout=CALL_DEADLINE_S
        )
    access = _fields(lines.until("rpc finished"), "rpc finished")
    assert access["method"] == "/switchboard.api.auth.v1.AuthService/GetPrincipal"
    assert access["code"] == "UNAUTHENTICATED"
    assert float(access["duration_ms"]) >= 0
    assert access["peer"].startswith("ipv4:127.0.0.1:")
    assert access["request_id"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
