"""switchboard.client is a client of the contracts, not of this server's code.

It must work against any deployment, so it may import only the generated code
(``switchboard.api``), grpc, protobuf, googleapis-common-protos (``google.rpc``)
and the standard library: checked in its source, and in a fresh interpreter
(where nothing else of the server may end up imported, even indirectly).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "clients" / "python" / "switchboard" / "client"
ALLOWED = ("grpc", "google.protobuf", "google.rpc", "switchboard.api.", "switchboard.client")
PROBE = """
import json, sys
before = set(sys.modules)
import switchboard.client
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_the_source_imports_only_the_contracts_grpc_and_the_standard_library() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) >= 10
    for source in sources:
        for module in _imports(source):
            top = module.split(".")[0]
            assert top in sys.stdlib_module_names or module.startswith(ALLOWED), (
                f"{source.name} imports {module}"
            )


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    loaded: list[str] = json.loads(done.stdout)
    ours = {m for m in loaded if m.startswith("switchboard.")}
    assert "switchboard.client" in ours
    server = {m for m in ours if not m.startswith(("switchboard.api", "switchboard.client"))}
    assert server == set(), f"server modules imported with the client: {sorted(server)}"
