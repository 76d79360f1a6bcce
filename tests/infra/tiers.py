"""Every test names its tier: ``unit``, ``service`` or ``e2e`` (a pytest marker).

The test tree mirrors the package tree (``tests/dispatcher/budgets/`` tests
``switchboard.dispatcher.budgets``), so a test's folder says what it tests and its
marker says what it needs: ``unit`` runs in process without a server, ``service``
starts an in-process server on a free port (real databases where it says so),
``e2e`` starts real processes and external tools. ``pytest -m unit`` runs the fast
ones. The closest marker is the tier (a test of a ``service`` file marked ``e2e`` itself
starts processes). A test with no tier stops the collection: its cost would be unknown.
"""

from __future__ import annotations

import pytest

TIERS = ("unit", "service", "e2e")


def tier_of(item: pytest.Item) -> str | None:
    """The tier of ``item``'s closest tier marker (its own, its class's, its module's)."""
    for mark in item.iter_markers():
        if mark.name in TIERS:
            return mark.name
    return None


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    untiered = sorted({item.nodeid.split("::", 1)[0] for item in items if tier_of(item) is None})
    if untiered:
        raise pytest.UsageError(
            "every test is marked with a tier (pytestmark = pytest.mark.unit, "
            ".service or .e2e; tests/infra/tiers.py); not: " + ", ".join(untiered)
        )
