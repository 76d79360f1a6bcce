"""The house's size rules that hold today, checked so they keep holding (issue 81): no
settings section grows past what one reader holds in mind; a room's settings live beside
its code, composed in ``switchboard/settings.py``; no module of the dispatcher's rooms and
no package grows past what one reader takes in (scripts/housestats.py measures both)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from switchboard.settings import SECTIONS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _housestats() -> ModuleType:
    # A script, not a package module: loaded from its path.
    spec = importlib.util.spec_from_file_location("housestats", ROOT / "scripts" / "housestats.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


housestats = _housestats()

#: The most fields one settings section may have.
MOST_FIELDS = 60


def test_no_settings_section_has_more_than_sixty_fields() -> None:
    counts = {kind.__name__: len(kind.model_fields) for kind in SECTIONS}
    assert {name: n for name, n in counts.items() if n > MOST_FIELDS} == {}


def test_every_section_is_composed_once() -> None:
    names = [kind.__name__ for kind in SECTIONS]
    assert len(names) == len(set(names)), names


#: The most lines a module of the dispatcher's rooms may have (issue 81).
MOST_ROOM_LINES = 700
#: The most top-level modules a package may have ("about eight", issue 81: two rooms,
#: platform/store/ and dispatcher/talk/, hold nine).
MOST_MODULES = 9


def test_no_module_of_the_dispatchers_rooms_has_more_than_seven_hundred_lines() -> None:
    over = {
        str(path.relative_to(ROOT)): lines
        for lines, path in housestats.dispatcher_rooms(ROOT)
        if lines > MOST_ROOM_LINES
    }
    assert over == {}


def test_no_package_has_more_than_nine_top_level_modules() -> None:
    crowded = {
        str(package.relative_to(ROOT)): count
        for count, package in housestats.modules_per_package(ROOT)
        if count > MOST_MODULES
    }
    assert crowded == {}
