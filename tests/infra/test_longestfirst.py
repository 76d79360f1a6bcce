"""The suite's file order: longest expected first, whole files kept together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from tests.infra.longestfirst import TABLE, expected_s, load_table, longest_first

pytestmark = pytest.mark.unit


@dataclass
class _Item:
    nodeid: str
    tier: str = ""

    def iter_markers(self) -> list[pytest.Mark]:
        return [getattr(pytest.mark, self.tier).mark] if self.tier else []


def _order(
    nodeids: list[str], table: dict[str, float], tiers: dict[str, str] | None = None
) -> list[str]:
    tier = tiers or {}
    items = cast(list[pytest.Item], [_Item(nodeid, tier.get(nodeid, "")) for nodeid in nodeids])
    return [item.nodeid for item in longest_first(items, table)]


def test_files_go_longest_first_and_keep_their_tests_together_in_order() -> None:
    nodeids = [
        "tests/unit/test_a.py::one",
        "tests/unit/test_a.py::two",
        "tests/e2e/test_b.py::one",
        "tests/unit/test_a.py::three",
        "tests/service/test_c.py::one",
    ]
    table = {"tests/unit/test_a.py": 30.0, "tests/e2e/test_b.py": 2.0, "tests/service/test_c.py": 7}
    assert _order(nodeids, table) == [
        "tests/unit/test_a.py::one",
        "tests/unit/test_a.py::two",
        "tests/unit/test_a.py::three",
        "tests/service/test_c.py::one",
        "tests/e2e/test_b.py::one",
    ]


def test_files_that_start_processes_never_follow_each_other_while_others_remain() -> None:
    nodeids = [f"tests/x/test_{name}.py::t" for name in "abcdefg"]
    table = {f"tests/x/test_{name}.py": 100.0 - i for i, name in enumerate("abcdefg")}
    tiers = dict.fromkeys(nodeids, "e2e")
    for name in "ef":
        tiers[f"tests/x/test_{name}.py::t"] = "unit"
    # Longest first would be a..g; e and f go between the e2e files, the rest at the end.
    assert [n[len("tests/x/test_")] for n in _order(nodeids, table, tiers)] == list("aebfcdg")


def test_an_unknown_file_gets_its_tiers_time_and_ties_keep_collection_order() -> None:
    assert expected_s("tests/e2e/test_new.py", {}) == 10.0
    assert expected_s("tests/service/test_new.py", {}) == 5.0
    assert expected_s("tests/unit/test_new.py", {}) == 1.0
    nodeids = ["tests/unit/test_z.py::t", "tests/unit/test_y.py::t", "tests/e2e/test_x.py::t"]
    assert _order(nodeids, {}) == [
        "tests/e2e/test_x.py::t",
        "tests/unit/test_z.py::t",
        "tests/unit/test_y.py::t",
    ]


def test_a_files_tier_comes_from_its_marker_wherever_it_lives() -> None:
    assert expected_s("tests/dispatcher/test_new.py", {}, "service") == 5.0
    assert expected_s("tests/dispatcher/test_new.py", {}) == 1.0
    nodeids = ["tests/context/test_u.py::t", "tests/context/test_s.py::t"]
    tiers = {"tests/context/test_u.py::t": "unit", "tests/context/test_s.py::t": "service"}
    expected = ["tests/context/test_s.py::t", "tests/context/test_u.py::t"]
    assert _order(nodeids, {}, tiers) == expected


def test_the_table_is_read_from_its_file_and_a_missing_file_is_an_empty_table(
    tmp_path: Path,
) -> None:
    assert load_table(tmp_path / "absent.json") == {}
    written = tmp_path / "durations.json"
    written.write_text(json.dumps({"tests/unit/test_a.py": 3}))
    assert load_table(written) == {"tests/unit/test_a.py": 3.0}


def test_the_checked_in_table_names_only_files_that_exist() -> None:
    root = TABLE.parents[1]
    missing = [name for name in load_table() if not (root / name).is_file()]
    assert missing == [], "rerun scripts/test-durations.py: the table names files gone"


def test_make_keeps_the_order_xdist_is_given() -> None:
    """xdist's loadfile reorders files by their number of tests unless told not to: a
    one-test file of 40 s then starts last, and the run waits on it alone."""
    makefile = (TABLE.parents[1] / "Makefile").read_text()
    recipe = makefile.split("\npytest:", 1)[1].split("\n\n", 1)[0]
    assert "--dist loadfile" in recipe
    assert "--no-loadscope-reorder" in recipe
