"""The README's configuration table is the settings' sections, and nothing else."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from switchboard.settings import OWNERS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RENDER = ROOT / "scripts" / "render-settings.py"


def test_readme_configuration_table_matches_settings() -> None:
    text = README.read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `SWITCHBOARD_([A-Z0-9_]+)` \|", table, re.MULTILINE))
    expected = {name.upper() for name in OWNERS}
    assert documented == expected


def test_the_readme_configuration_table_is_current() -> None:
    # Written by `make docs` from the sections' fields: a field changed without it fails here.
    result = subprocess.run(
        [sys.executable, str(RENDER), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _servicer_classes() -> dict[str, type]:
    """Each served service's full name and the servicer class the mesh registers for it."""
    from switchboard.auth import servicer as auth
    from switchboard.context import servicer as context
    from switchboard.dispatcher import servicer as dispatcher
    from switchboard.events import servicer as events
    from switchboard.integration import servicer as integration

    classes: dict[str, type] = {}
    for module in (auth, context, dispatcher, integration, events):
        service = module.SERVICE
        classes[service.full_name] = getattr(module, f"{service.name}Servicer")
    return classes


def _built_status(service_name: str, cls: type) -> str:
    from switchboard import mesh

    descriptor = mesh.SERVICES[service_name.split(".")[2]][0]
    built = []
    for method in descriptor.methods:
        rpc = getattr(cls, method.name, None)
        # The generated base class answers UNIMPLEMENTED; only our own code counts.
        built.append(rpc is not None and not getattr(rpc, "__module__", "").endswith("_pb2_grpc"))
    if all(built):
        return "built"
    return "partly built" if any(built) else "contract only"


def test_readme_service_status_matches_the_servicers() -> None:
    text = README.read_text()
    rows = dict(
        re.findall(
            r"^\| `(switchboard\.api\.\w+\.v1\.\w+Service)` \|[^|]*\| ([^|]*)\|$",
            text,
            re.MULTILINE,
        )
    )
    classes = _servicer_classes()
    assert set(rows) == set(classes), "the README's service table must list every served service"
    for name, cls in classes.items():
        status = rows[name].strip()
        expected = _built_status(name, cls)
        assert status.split(" (")[0] == expected, (
            f"{name}: README says {status!r}, code is {expected}"
        )
