"""The layers contract's exceptions are the shared parts ``shared.py`` names, and no more.

Services are independent layers: one imports another's module only to build or
run a part they share in one process (``shared.SHARED_PARTS``). pyproject.toml's
``ignore_imports`` must list only such imports, so a new cross-service import
is a visible decision in ``shared.py``, not a line slipped into the contract.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp
import pytest

from switchboard.shared import SHARED_PARTS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("auth", "context", "dispatcher", "integration", "events")


def _service(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SERVICES else None


def _ignored() -> list[tuple[str, str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    layered = next(c for c in contracts if "switchboard.shared" in c.get("layers", []))
    pairs = [line.split(" -> ") for line in layered.get("ignore_imports", [])]
    return [(importer, imported) for importer, imported in pairs]


def test_every_cross_service_exception_is_a_named_shared_part() -> None:
    crossing = [(a, b) for a, b in _ignored() if _service(a) and _service(b) != _service(a)]
    assert crossing, "the contract allows no cross-service import: SHARED_PARTS can go"
    assert sorted({b for _, b in crossing if b not in SHARED_PARTS}) == []


def test_every_cross_service_import_in_the_code_is_allowed_by_name() -> None:
    graph = grimp.build_graph("switchboard")
    allowed = set(_ignored())
    found = set()
    for module in graph.modules:
        home = _service(module)
        if home is None:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            other = _service(imported)
            if other is not None and other != home:
                found.add((module, imported))
    assert sorted(found - allowed) == []
    assert {b for _, b in found} <= set(SHARED_PARTS)


def test_every_named_shared_part_is_used() -> None:
    graph = grimp.build_graph("switchboard")
    for part in SHARED_PARTS:
        importers = graph.find_modules_that_directly_import(part)
        assert any(_service(m) not in (None, _service(part)) for m in importers), part
