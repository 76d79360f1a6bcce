"""The Python client as a team that only calls Switchboard gets it: its own wheel, in a fresh
virtualenv, running docs/python-client.md's quick start against ``switchboard serve --dev``
(what ``make run`` runs).

- ``pip wheel clients/python`` builds ``switchboard-client``, which holds ``switchboard.client``
  and the generated ``switchboard.api`` and nothing else of the server, and requires grpcio,
  protobuf and googleapis-common-protos only;
- the server's wheel leaves both out and requires ``switchboard-client`` at the same version;
- installed into a new virtualenv (its dependencies from the package index, as a user's
  ``pip install`` gets them), none of the server's dependencies come along, and the quick
  start, copied from the guide with only the address changed, runs to its end in that
  virtualenv's interpreter, isolated from this checkout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests.e2e.procs import ROOT, ServeProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

GUIDE = ROOT / "docs" / "python-client.md"
PIP_TIMEOUT_S = 240.0
RUN_TIMEOUT_S = 90.0
CLIENT_REQUIRES = {"grpcio", "protobuf", "googleapis-common-protos"}
#: The server's dependencies a client must never pull in.
SERVER_ONLY = {
    "sqlalchemy",
    "redis",
    "argon2-cffi",
    "opentelemetry-sdk",
    "opentelemetry-api",
    "envoy-data-plane",
    "alembic",
    "pydantic",
    "a2a-sdk",
    "grpcio-health-checking",
    "switchboard-mesh",
}


def run(argv: list[str], *, timeout: float, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, check=False
    )
    assert done.returncode == 0, f"{argv}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wheel(source: Path, into: Path) -> Path:
    into.mkdir()
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(into), str(source)],
        timeout=PIP_TIMEOUT_S,
        cwd=into,
    )
    (built,) = into.glob("*.whl")
    return built


def metadata(path: Path) -> tuple[str, str, set[str], list[str]]:
    """Name, version, required distributions (names only) and the files of a wheel."""
    with zipfile.ZipFile(path) as archive:
        files = archive.namelist()
        (meta,) = [name for name in files if name.endswith(".dist-info/METADATA")]
        parsed = Parser().parsestr(archive.read(meta).decode())
    requires = {
        re.split(r"[\s<>=!~;\[(]", line, maxsplit=1)[0].lower()
        for line in parsed.get_all("Requires-Dist") or []
    }
    return parsed["Name"], parsed["Version"], requires, files


def quick_start(address: str) -> str:
    """The guide's first Python block, pointed at ``address``."""
    text = GUIDE.read_text()
    section = text[text.index("## Quick start") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no Python block under Quick start"
    code = match[1]
    assert '"127.0.0.1:50051"' in code
    return code.replace('"127.0.0.1:50051"', f'"{address}"')


def test_the_client_wheel_runs_the_quick_start_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    client = wheel(ROOT / "clients" / "python", tmp_path / "client")
    name, version, requires, files = metadata(client)
    assert name == "switchboard-client"
    assert requires == CLIENT_REQUIRES
    assert "switchboard/client/__init__.py" in files
    assert "switchboard/api/auth/v1/auth_pb2.py" in files
    packed = {f for f in files if not f.startswith("switchboard_client-")}
    assert all(f.startswith(("switchboard/client/", "switchboard/api/")) for f in packed), packed

    server = wheel(ROOT, tmp_path / "server")
    server_name, server_version, server_requires, server_files = metadata(server)
    assert server_name == "switchboard-mesh"
    assert "switchboard-client" in server_requires
    assert not [
        f for f in server_files if f.startswith(("switchboard/client/", "switchboard/api/"))
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"switchboard-client=={version}" in project["dependencies"]
    assert version == server_version

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=PIP_TIMEOUT_S, cwd=tmp_path)
    python = venv / "bin" / "python"
    # Nothing of this checkout may leak in: no PYTHONPATH, no user site, not the cwd.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    run(
        [str(python), "-m", "pip", "install", "-q", str(client)],
        timeout=PIP_TIMEOUT_S,
        cwd=tmp_path,
        env=env,
    )
    listed = run(
        [str(python), "-m", "pip", "list", "--format=freeze"], timeout=60, cwd=tmp_path, env=env
    )
    installed = {line.split("==")[0].lower() for line in listed.split()}
    assert CLIENT_REQUIRES | {"switchboard-client"} <= installed
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY

    script = tmp_path / "quick_start.py"
    with ServeProcess("--dev") as served:
        script.write_text(quick_start(served.address))
        output = run([str(python), "-I", str(script)], timeout=RUN_TIMEOUT_S, cwd=tmp_path, env=env)
    lines = output.splitlines()
    # ask(): the echo handler's answer, then the run's state.
    assert lines[0] == "hello there", output
    asked = output.split("slowly now")[0].strip()
    assert asked.endswith(") RUN_STATE_SUCCEEDED"), output
    # watch(): the streamed deltas, then the follower's MESSAGE_CREATED event with its cursor.
    assert "slowly now" in output, output
    assert re.search(
        r"^EVENT_TYPE_MESSAGE_CREATED workspaces/[^/]+/conversations/[^/]+/messages/\S+ \S+$",
        lines[-1],
    ), output
