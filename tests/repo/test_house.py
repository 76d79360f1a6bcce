"""The house's size rules that hold today, checked so they keep holding (issue 81): no
settings section grows past what one reader holds in mind; a room's settings live beside
its code, composed in ``switchboard/settings.py``."""

from __future__ import annotations

import pytest

from switchboard.settings import SECTIONS

pytestmark = pytest.mark.unit

#: The most fields one settings section may have.
MOST_FIELDS = 60


def test_no_settings_section_has_more_than_sixty_fields() -> None:
    counts = {kind.__name__: len(kind.model_fields) for kind in SECTIONS}
    assert {name: n for name, n in counts.items() if n > MOST_FIELDS} == {}


def test_every_section_is_composed_once() -> None:
    names = [kind.__name__ for kind in SECTIONS]
    assert len(names) == len(set(names)), names
