"""docs/decisions.md opens with an index of its decisions, kept current by
scripts/decisions-index.py, whose links reach the headings they name."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "decisions_index", ROOT / "scripts" / "decisions-index.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_index_lists_every_decision_as_written() -> None:
    script = _script()
    text = script.PATH.read_text(encoding="utf-8")
    assert script.rewritten(text) == text, "run python scripts/decisions-index.py"
    numbers = [int(n) for n, _ in script._HEADING.findall(text.split(script.END, 1)[1])]
    assert numbers == list(range(1, len(numbers) + 1))


def test_anchors_follow_githubs_rule() -> None:
    script = _script()
    seen: Counter[str] = Counter()
    heading = "74. What's left: the `outbox` rows (issue 80)"
    assert script.anchor(heading, seen) == "74-whats-left-the-outbox-rows-issue-80"
    # A heading repeated gets a number, as GitHub gives it.
    assert script.anchor(heading, seen) == "74-whats-left-the-outbox-rows-issue-80-1"


def test_a_stale_index_is_rewritten_not_duplicated() -> None:
    script = _script()
    text = "# Decisions\n\nIntro.\n\n## 1. One\n\nA.\n\n## 2. Two: `b`\n\nB.\n"
    once = script.rewritten(text)
    assert "1. [One](#1-one)\n2. [Two: `b`](#2-two-b)" in once
    grown = once + "\n## 3. Three\n\nC.\n"
    again = script.rewritten(grown)
    assert again.count(script.BEGIN) == 1
    assert "3. [Three](#3-three)" in again
    assert script.rewritten(again) == again
