"""Every service's servicer converts and nothing else (docs/architecture.md, "One
boundary rule"): it takes the request, calls one domain method and returns its
answer. It does not validate, authorize, touch SQL or build a name.

Read from each ``servicer.py``'s source, so a rule broken by a new line fails
here rather than in review. A servicer that may not yet keep a rule is listed in
``EXCEPTIONS`` with the reason; nothing else is excused.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services" / "switchboard"
SERVICERS = ("auth", "context", "dispatcher", "integration", "events", "a2a")

#: Calls that decide access: the domain's (or the guard's, before the servicer).
AUTHORIZING = frozenset({"authorize", "hold", "verify", "require_scope", "role_of", "open"})
#: Modules a servicer has no business importing.
FORBIDDEN_MODULES = {
    "switchboard.platform.errors": "raises or inspects domain errors (validation is the domain's)",
    "switchboard.platform.values.names": "matches, builds or picks names, ids or time",
    "switchboard.platform.security.policy": "decides access (Permission, Policy)",
    "switchboard.platform.security.accesswatch": "keeps access on a stream (the domain holds it)",
    "switchboard.platform.store": "touches storage",
    "sqlalchemy": "writes SQL",
}

#: servicer -> rule -> why it may break that rule for now.
EXCEPTIONS: dict[str, dict[str, str]] = {
    "a2a": {
        "raise": "the A2A front door translates every error into A2A's terms at its "
        "transport edge (errors.tagged) and refuses a malformed resume header, which "
        "is transport metadata, not a request field",
        "switchboard.platform.errors": "the same translation catches SwitchboardError",
    },
    "integration": {
        "switchboard.platform.security.accesswatch": "it hands the process's access watch "
        "to the hub, which opens and holds the grant (IntegrationHub.watch_held)",
    },
}


def _tree(service: str) -> ast.Module:
    path = SERVICES / service / "servicer.py"
    return ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _broken(service: str) -> dict[str, list[str]]:
    """rule -> where the servicer breaks it."""
    tree = _tree(service)
    broken: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            broken.setdefault("raise", []).append(f"line {node.lineno}")
        elif isinstance(node, ast.Call):
            called = node.func
            name = called.attr if isinstance(called, ast.Attribute) else None
            if name in AUTHORIZING:
                broken.setdefault("authorize", []).append(f"line {node.lineno}: .{name}(...)")
    for module in _imports(tree):
        for forbidden in FORBIDDEN_MODULES:
            if module == forbidden or module.startswith(forbidden + "."):
                broken.setdefault(forbidden, []).append(module)
        # A service's own stores (``context/conversations/store.py``,
        # ``dispatcher/runs/core/store.py``).
        parts = module.split(".")
        in_service = len(parts) > 2 and parts[0] == "switchboard" and parts[1] in SERVICERS
        if in_service and any(part.endswith("store") for part in parts[2:]):
            broken.setdefault("a service's store", []).append(module)
    return broken


@pytest.mark.parametrize("service", SERVICERS)
def test_the_servicer_converts_only(service: str) -> None:
    excused = EXCEPTIONS.get(service, {})
    broken = {rule: where for rule, where in _broken(service).items() if rule not in excused}
    # Each rule broken, with where: move that work into the service's domain.
    assert broken == {}, f"{service}/servicer.py does a domain's work: {FORBIDDEN_MODULES}"


@pytest.mark.parametrize("service", sorted(EXCEPTIONS))
def test_every_exception_is_still_needed(service: str) -> None:
    # An exception the servicer no longer needs goes, so the list only shrinks.
    assert sorted(set(EXCEPTIONS[service]) - set(_broken(service))) == []


def test_the_rules_see_a_servicer_that_authorizes() -> None:
    source = (
        "from switchboard.platform.errors import InvalidArgument\n"
        "async def Get(self, request, context):\n"
        "    await self._grant.authorize(request.name, 1, 'name')\n"
        "    raise InvalidArgument('no')\n"
    )
    tree = ast.parse(source)
    assert any(isinstance(node, ast.Raise) for node in ast.walk(tree))
    assert "switchboard.platform.errors" in set(_imports(tree))
    calls = [
        n.func.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    ]
    assert "authorize" in calls
