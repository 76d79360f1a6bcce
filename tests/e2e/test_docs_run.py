"""The documentation, run as written.

A fenced ``sh`` or ``python`` block of README.md or docs/*.md may carry a marker on the
line before it:

- ``<!-- doc-test: run -->``: runs against a server started as ``make run`` starts it
  (``switchboard serve --dev``), with the local model server (docs/local-model.md) as its
  provider and the MCP reference server started as that page says. Every such block runs in
  document order (README.md, then docs/ by name) in one bash shell, so one block's variables
  are the next one's; a python block runs as a program in that shell's environment.
- ``<!-- doc-test: mesh -->``: the same, against ``make mesh`` (``switchboard mesh``).
- ``<!-- doc-test: syntax -->``: cannot run here (a server in the foreground, Docker,
  Kubernetes, placeholder hosts): parsed only (``bash -n``, Python's compiler).
- ``<!-- doc-test: output -->``: what a command prints; not checked.

The shell stops at the first command that fails (``set -euo pipefail``): grpcurl exits
non-zero on any error status. The servers listen on free ports, given to the blocks as the
variables the docs name (``$SB``, ``$EDGE``, ``$MCP_URL``, ``$HOOK_URL``). The walkthrough
pages (``MARKED``) have a marker on every block, so an example added there cannot skip this.
"""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from tests.e2e.procs import ROOT, ServeProcess, tool
from tests.e2e.test_mesh import READY_TIMEOUT_S, MeshProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PAGES: Final = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Pages a new user follows step by step: every sh or python block there is marked.
MARKED: Final = [
    ROOT / "README.md",
    *(ROOT / "docs" / name for name in ("local-model.md", "python-client.md", "integration.md")),
    ROOT / "docs" / "console.md",
]
KINDS: Final = frozenset({"run", "mesh", "syntax", "output"})
_MARKER: Final = re.compile(r"\s*<!-- doc-test: (\w+) -->")
_FENCE: Final = re.compile(r"(\s*)```(\w*)\s*")
#: The whole walkthrough, servers started included, stays well inside CI's budget.
RUN_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    kind: str  # "" when unmarked
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> Iterator[Block]:
    lines = page.read_text().split("\n")
    marker = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        found = _MARKER.fullmatch(line)
        if found:
            marker = found.group(1)
            index += 1
            continue
        fence = _FENCE.fullmatch(line)
        if fence is None:
            marker = "" if line.strip() else marker
            index += 1
            continue
        indent, lang = fence.group(1), fence.group(2)
        start = index + 1
        index = start
        while index < len(lines) and lines[index].strip() != "```":
            index += 1
        body = [text.removeprefix(indent) for text in lines[start:index]]
        yield Block(page, start, lang, marker, "\n".join(body) + "\n")
        marker = ""
        index += 1


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page)]


# -- without servers ----------------------------------------------------------------------


def test_every_block_of_the_walkthrough_pages_is_marked() -> None:
    unmarked = [
        b.where
        for page in MARKED
        for b in blocks(page)
        if b.lang in ("sh", "python", "json") and b.kind not in KINDS
    ]
    assert unmarked == []
    unknown = [f"{b.where}: {b.kind}" for b in all_blocks() if b.kind and b.kind not in KINDS]
    assert unknown == []


def test_the_address_defaults_to_make_run_s() -> None:
    # The test sets $SB; a reader's shell gets the default, which must be make run's.
    makefile = (ROOT / "Makefile").read_text()
    host = re.search(r"^HOST\s*\?=\s*(\S+)", makefile, re.MULTILINE)
    port = re.search(r"^PORT\s*\?=\s*(\S+)", makefile, re.MULTILINE)
    assert host is not None
    assert port is not None
    first = next(b for b in all_blocks() if b.kind == "run")
    assert f"SB=${{SB:-{host[1]}:{port[1]}}}" in first.text


def test_blocks_that_cannot_run_here_parse() -> None:
    problems: list[str] = []
    for block in all_blocks():
        if block.kind != "syntax":
            continue
        if block.lang == "sh":
            checked = subprocess.run(
                ["bash", "-n"], input=block.text, capture_output=True, text=True, check=False
            )
            if checked.returncode != 0:
                problems.append(f"{block.where}: {checked.stderr.strip()}")
        elif block.lang == "python":
            try:
                compile(block.text, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            except SyntaxError as exc:
                problems.append(f"{block.where}: {exc}")
    assert problems == []


# -- against servers ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def script(kind: str, directory: Path) -> str:
    """One bash program of every ``kind`` block, each named in a failure."""
    parts = [
        "set -euo pipefail",
        "trap 'echo \"doc-test: failed in $BLOCK: $BASH_COMMAND\" >&2' ERR",
    ]
    count = 0
    for block in all_blocks():
        if block.kind != kind:
            continue
        count += 1
        parts.append(f"BLOCK={block.where}")
        parts.append(f'echo "doc-test: {block.where}" >&2')
        if block.lang == "python":
            program = directory / f"block{count}.py"
            program.write_text(block.text)
            parts.append(f'"$DOCS_PYTHON" {program}')
        else:
            parts.append(block.text)
    assert count, f"no {kind} blocks"
    return "\n".join(parts) + "\necho 'doc-test: done' >&2\n"


def run_script(text: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Its own session: whatever a block leaves running is stopped with it.
    with subprocess.Popen(
        ["bash", "-c", text],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, err = proc.communicate()
            pytest.fail(
                f"the docs did not finish in {RUN_TIMEOUT_S:g} s:\n{out[-3000:]}\n{err[-3000:]}"
            )
        with_code = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return with_code


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env["PATH"] = f"{Path(tool('grpcurl')).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DOCS_PYTHON"] = sys.executable
    env.update(extra)
    return env


class Background:
    """A process the docs say to start in a terminal of its own, started here the same way."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> None:
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def first_line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            pytest.fail(f"{self.proc.args!r} ended: {self.log()}")
        return line

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


def _mcp_server() -> tuple[Background, str]:
    """The reference MCP server as docs/local-model.md starts it (its port: a free one)."""
    main = "node_modules/@modelcontextprotocol/server-everything/dist/index.js"
    for _ in range(3):
        port = _free_port()
        server = Background(
            ["node", "--import", "./loopback.mjs", main, "streamableHttp"],
            cwd=ROOT / "tests" / "mcp",
            env={"PORT": str(port)},
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and server.proc.poll() is None:
            if f"listening on port {port}" in server.log():
                return server, f"http://127.0.0.1:{port}/mcp"
            time.sleep(0.05)  # polling its log: it says nothing on stdout
        server.stop()
    pytest.fail("the MCP reference server did not start")


def test_the_docs_run_as_written() -> None:
    model = Background(
        [sys.executable, "-m", "tests.fakes.openai_server", "--port", "0", "--quiet"], cwd=ROOT
    )
    mcp, mcp_url = _mcp_server()
    try:
        base_url = model.first_line()  # the model server says where it listens
        # docs/local-model.md step 3: make run with the model server as its provider.
        serve = ServeProcess(
            "--dev",
            env={
                "SWITCHBOARD_LLM_BASE_URL": base_url,
                "SWITCHBOARD_LLM_MODEL": "echo",
                "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
            },
        )
        with serve, tempfile.TemporaryDirectory() as tmp:
            env = _environment(
                SB=serve.address,
                MCP_URL=mcp_url,
                HOOK_URL=f"http://127.0.0.1:{_free_port()}/hook",
            )
            done = run_script(script("run", Path(tmp)), env)
        assert done.returncode == 0, done.stderr[-6000:]
        assert "doc-test: done" in done.stderr
        # The Python client's quick start printed names, not numbers, and ended.
        assert "RUN_STATE_SUCCEEDED" in done.stdout
        assert "EVENT_TYPE_MESSAGE_CREATED" in done.stdout
    finally:
        mcp.stop()
        model.stop()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: under root PostgreSQL runs as the postgres user, who
    # cannot enter pytest's owner-only base directory (as in test_mesh.py).
    path = Path(tempfile.mkdtemp(prefix="switchboard-docs-mesh-"))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False, timeout=60)


def test_the_mesh_blocks_run_against_make_mesh(data_dir: Path, tmp_path: Path) -> None:
    with MeshProcess(data_dir) as mesh:
        mesh.wait_line(
            lambda line: line.startswith("mesh ") and "| ready:" in line, READY_TIMEOUT_S
        )
        edge = mesh.state()["edge"]["grpc"]
        done = run_script(script("mesh", tmp_path), _environment(EDGE=edge))
    assert done.returncode == 0, done.stderr[-6000:]
    assert "doc-test: done" in done.stderr
