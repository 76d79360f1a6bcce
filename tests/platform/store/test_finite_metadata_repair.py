"""Migration 0018's repair of passages' metadata written with NaN (platform/store/migrations):
only what is not JSON is rewritten, with null in place of each NaN and infinity, as the
index writes metadata now; a string that spells one is JSON and left alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from switchboard.platform.store.db import alembic_config

pytestmark = pytest.mark.unit


def _migration() -> ModuleType:
    versions = Path(alembic_config().get_main_option("script_location") or "") / "versions"
    (path,) = versions.glob("0018_*.py")
    spec = importlib.util.spec_from_file_location("finite_metadata", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("stored", "written"),
    [
        ('{"big":Infinity,"n":NaN,"topic":"x"}', '{"big":null,"n":null,"topic":"x"}'),
        ('{"a":[1,-Infinity,{"b":NaN}],"é":"ü"}', '{"a":[1,null,{"b":null}],"é":"ü"}'),
        # JSON already: a string that spells one, and what the index writes now.
        ('{"topic":"NaN bread","n":"Infinity"}', None),
        ('{"n":null}', None),
        # Not JSON for another reason: not the repair's to guess at.
        ('{"n":NaN', None),
    ],
)
def test_the_repair_rewrites_only_what_json_cannot_hold(stored: str, written: str | None) -> None:
    assert _migration().repaired(stored) == written
