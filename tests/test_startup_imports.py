"""A process starts without the heavy libraries of features it may never use.

Every ``switchboard serve`` (each mesh process, each e2e test's server) imports
``switchboard.mesh`` and ``switchboard.cli``. The MCP SDK, boto3, aiortc with PyAV,
pypdf, aiohttp, jsonschema and numpy were once imported with them: about 800 modules
and seconds of CPU per start under load, for features a process reaches only when a
call needs them (an MCP server, the S3 blob store, a browser's voice, a PDF, a model
call, a tool's schema, the end-of-turn model). Each is imported where it is first used,
as onnxruntime already was; this keeps it so. Some libraries a process needs in part: the
a2a SDK's types and errors serve the front door, while its client (over a hundred modules
of transports) is for calling a remote A2A agent, so names here are modules, each with its
submodules, and a part of a package is held off too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

#: Modules (each with its submodules) no start may import (each is loaded where its
#: feature is used).
DEFERRED = (
    "a2a.client",
    # Reached only through a2a.client.
    "jsonrpc",
    "culsans",
    "aiologic",
    "pocketsphinx",
    "pipecat",
    "mcp",
    "mcp_types",
    "boto3",
    "botocore",
    "s3transfer",
    "aiortc",
    "aioice",
    "av",
    "pypdf",
    "numpy",
    "onnxruntime",
    "aiohttp",
    "jsonschema",
)

_IMPORTS = """
import json, sys
import switchboard.cli, switchboard.mesh, switchboard.platform.rpc.server, switchboard.settings
print(json.dumps(sorted(sys.modules)))
"""

#: A whole process started as ``serve --dev`` starts one (every service, SQLite), then
#: stopped: the database's opening and every service's build import what they need.
_START = """
import asyncio, json, sys
from switchboard.mesh import create_server
from switchboard.settings import Settings

async def main() -> None:
    settings = Settings.from_values(
        host="127.0.0.1", port=0, dev_mode=True, database_url=sys.argv[1],
        context_files_dir=sys.argv[2],
    )
    server, _ = await create_server(settings)
    await server.start()
    loaded = sorted(sys.modules)
    await server.shutdown(grace=0)
    print(json.dumps(loaded))

asyncio.run(main())
"""


def _loaded(*args: str, timeout_s: float) -> set[str]:
    # A fresh interpreter: this one has loaded whatever other tests needed.
    done = subprocess.run(
        [sys.executable, "-c", *args], capture_output=True, text=True, timeout=timeout_s, check=True
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def _deferred(loaded: set[str], deferred: tuple[str, ...] = DEFERRED) -> list[str]:
    return sorted(
        module
        for module in loaded
        if any(module == name or module.startswith(f"{name}.") for name in deferred)
    )


def test_importing_the_server_loads_no_deferred_library() -> None:
    assert _deferred(_loaded(_IMPORTS, timeout_s=120)) == []


@pytest.mark.service
def test_a_started_server_has_loaded_no_deferred_library(tmp_path: Path) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'switchboard.db'}"
    loaded = _loaded(_START, database, str(tmp_path / "files"), timeout_s=300)
    # sqlite-vec too: its package imports numpy, and the extension is found without it.
    assert _deferred(loaded, (*DEFERRED, "sqlite_vec")) == []
