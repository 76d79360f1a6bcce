"""The layers contract's exceptions are the shared parts ``shared`` names, each said why.

Services are independent layers: one imports nothing of another; what one uses
of another's in one process reaches it through a port the composition root
fills (``mesh.connect``). The few imports that still cross are the modules
``shared.SHARED_PARTS`` names; pyproject.toml's ``ignore_imports`` must list only
such imports, each under a comment saying why, so a new cross-service import
is a visible decision in ``shared``, not a line slipped into the contract.
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


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return contracts


def _ignored() -> list[tuple[str, str]]:
    layered = next(c for c in _contracts() if "switchboard.shared" in str(c.get("layers", [])))
    lines = layered.get("ignore_imports", [])
    assert isinstance(lines, list)
    pairs = [str(line).split(" -> ") for line in lines]
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


def test_only_the_services_contract_has_exceptions_and_each_says_why() -> None:
    excepting = [c for c in _contracts() if c.get("ignore_imports")]
    assert [str(c.get("layers")) for c in excepting if "switchboard.shared" not in str(c)] == []
    # Each exception stands in a run of them under a comment (tomllib drops comments).
    text = (ROOT / "pyproject.toml").read_text().splitlines()
    for importer, imported in _ignored():
        at = text.index(f'  "{importer} -> {imported}",')
        while text[at - 1].strip().startswith('"'):
            at -= 1
        assert text[at - 1].strip().startswith("#"), f"{importer} -> {imported} says no why"


def test_the_exceptions_are_exactly_the_imports_of_the_named_shared_parts() -> None:
    graph = grimp.build_graph("switchboard")
    named = {
        (importer, part)
        for part in SHARED_PARTS
        for importer in graph.find_modules_that_directly_import(part)
        if _service(importer) not in (None, _service(part))
    }
    assert sorted(set(_ignored())) == sorted(named)
