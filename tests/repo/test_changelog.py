"""CHANGELOG.md names the version every shipped part carries, and the README points to it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _released() -> list[str]:
    text = (ROOT / "CHANGELOG.md").read_text()
    return re.findall(r"^## (\d+\.\d+\.\d+) - \d{4}-\d{2}-\d{2}$", text, re.MULTILINE)


def test_the_newest_release_in_the_changelog_is_the_version_everything_carries() -> None:
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]
    released = _released()
    assert released, "no release heading (## X.Y.Z - YYYY-MM-DD)"
    assert released[0] == server["version"] == client["version"]
    assert f"switchboard-client=={server['version']}" in server["dependencies"]
    assert f"switchboard.dev/go@v{server['version']}" in (ROOT / "clients/go/README.md").read_text()


def test_releases_are_listed_newest_first_once_each() -> None:
    released = _released()
    keys = [tuple(int(part) for part in version.split(".")) for version in released]
    assert keys == sorted(set(keys), reverse=True)


def test_the_readme_points_client_authors_to_it() -> None:
    assert "(CHANGELOG.md)" in (ROOT / "README.md").read_text()
