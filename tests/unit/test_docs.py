"""The README's configuration table documents every setting, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from switchboard.platform.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_table_matches_settings() -> None:
    text = README.read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `SWITCHBOARD_([A-Z0-9_]+)` \|", table, re.MULTILINE))
    expected = {name.upper() for name in Settings.model_fields}
    assert documented == expected
