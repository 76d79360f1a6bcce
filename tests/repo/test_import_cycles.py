"""No import cycle among Switchboard's modules (issue 37), nor between its packages (issue 70).

``lint-imports`` (pyproject.toml) holds the packages to their layers, but a cycle
inside one package (``platform.config`` -> ``platform.db`` -> ``platform.telemetry``
-> ``platform.config`` was one) passes a layers contract. This walks the whole
import graph, TYPE_CHECKING imports included, and names every cycle it finds.

Two packages can import each other with no module cycle (``context.build`` ->
``dispatcher.budgets.ledger`` while ``dispatcher.llm.messages`` ->
``context.text.parttext`` was one): every pair of siblings is checked too, each
as a whole, at every level: no two rooms of one folder lean on each other, so every
folder reads as floors.
"""

from __future__ import annotations

import itertools

import grimp
import pytest

pytestmark = pytest.mark.unit


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    modules = sorted(graph.modules)
    edges = {module: sorted(graph.find_modules_directly_imported_by(module)) for module in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            module, position = work.pop()
            if position == 0:
                index[module] = low[module] = len(index)
                stack.append(module)
                on_stack.add(module)
            targets = edges[module]
            if position < len(targets):
                work.append((module, position + 1))
                target = targets[position]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[module] = min(low[module], index[target])
                continue
            if low[module] == index[module]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == module:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[module])
    return found


def _sibling_cycles(graph: grimp.ImportGraph, package: str) -> set[tuple[str, str]]:
    """Pairs of ``package``'s children (packages or modules) that import each other,
    each child taken whole; then the same below every child that is a package."""
    found: set[tuple[str, str]] = set()
    children = sorted(graph.find_children(package))
    for a, b in itertools.combinations(children, 2):
        if graph.chain_exists(a, b, as_packages=True) and graph.chain_exists(
            b, a, as_packages=True
        ):
            found.add((a, b))
    for child in children:
        found |= _sibling_cycles(graph, child)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("p.a", "p.b", "p.c", "p.d"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    graph.add_import(importer="p.c", imported="p.d")
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph("switchboard", include_external_packages=False, cache_dir=None)
    assert _cycles(graph) == []


def test_the_sibling_finder_finds_two_packages_that_import_each_other() -> None:
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.a.x", "p.b", "p.b.y", "p.c"):
        graph.add_module(module)
    # p.a.x -> p.b.y and p.b -> p.a: the packages import each other, no module is on a cycle.
    graph.add_import(importer="p.a.x", imported="p.b.y")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a.x")
    assert _cycles(graph) == []
    assert _sibling_cycles(graph, "p") == {("p.a", "p.b")}


def test_no_two_packages_import_each_other() -> None:
    graph = grimp.build_graph("switchboard", include_external_packages=False, cache_dir=None)
    assert sorted(_sibling_cycles(graph, "switchboard")) == []
