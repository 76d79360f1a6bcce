"""Test files in the order that ends a parallel run soonest: the longest first.

``make pytest`` hands whole files to xdist workers (``--dist loadfile``) in collection
order, each worker taking the next file when it is free. A long file that happens to
come last keeps one worker busy while the others idle, so the run takes as long as
its most unlucky worker. Ordering the files longest first (the "longest processing
time" rule) bounds that tail by the shortest files instead.

One exception to the rule: two files that start processes (the ``e2e`` tier) never
follow each other while other files remain. The longest files are mostly those, and
all of them at once on a two-core host (servers, Chromium, Go builds, each starting
and waiting at the same moments) slowed each other past what their tests allowed:
interleaved with in-process files, at most about half the workers start processes.

The expected time of each file comes from ``tests/durations.json``, which
``scripts/test-durations.py`` writes from a run's JUnit report. A file it does not
know (new, or renamed) gets its tier's typical time (its marker, ``tests/infra/tiers.py``),
so a stale table only costs some balance, never a test. The order within a file is left as written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.infra.tiers import tier_of

TABLE = Path(__file__).resolve().parents[1] / "durations.json"

#: Seconds assumed for a file the table does not name, by its tier (its tests' marker,
#: or for a path alone the tier folder it lived in before the tree mirrored the package).
TIER_DEFAULT_S = {"e2e": 10.0, "service": 5.0, "unit": 1.0}
OTHER_DEFAULT_S = 1.0


def load_table(path: Path = TABLE) -> dict[str, float]:
    """File path (relative to the repository, as pytest names it) to seconds."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {str(name): float(seconds) for name, seconds in raw.items()}


def expected_s(file: str, table: dict[str, float], tier: str | None = None) -> float:
    if file in table:
        return table[file]
    if tier is None:
        parts = file.split("/")
        tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else ""
    return TIER_DEFAULT_S.get(tier, OTHER_DEFAULT_S)


def longest_first(items: list[pytest.Item], table: dict[str, float]) -> list[pytest.Item]:
    """``items`` with whole files moved, longest expected first (ties keep their order),
    but no ``e2e`` file right after another while other files remain.

    Every xdist worker collects and sorts the same files with the same table, so the
    collections they report stay identical, as xdist requires.
    """
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    tiers = {file: tier_of(found[0]) for file, found in files.items()}
    longest = sorted(files, key=lambda file: -expected_s(file, table, tiers[file]))
    e2e = [file for file in longest if tiers[file] == "e2e"]
    other = [file for file in longest if tiers[file] != "e2e"]
    order: list[str] = []
    while e2e or other:
        e2e_next = bool(e2e) and (
            not other
            or (
                (not order or tiers[order[-1]] != "e2e")
                and expected_s(e2e[0], table, "e2e") >= expected_s(other[0], table, tiers[other[0]])
            )
        )
        order.append((e2e if e2e_next else other).pop(0))
    return [item for file in order for item in files[file]]


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    items[:] = longest_first(items, load_table())
