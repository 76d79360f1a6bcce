"""Packs switchboard-client's wheel from the repository's trees (clients/python/pyproject.toml).

Only the standard wheel gets the files: an editable install must not copy them into
site-packages, where they would shadow the trees it points at (dev-mode-dirs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: Repository path -> where it lands in the wheel.
FILES = {
    "clients/python/switchboard/client": "switchboard/client",
    "gen/switchboard/api": "switchboard/api",
}


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version != "standard":
            return
        repository = Path(self.root).resolve().parents[1]
        for source, target in FILES.items():
            path = repository / source
            if not path.is_dir():
                raise FileNotFoundError(
                    f"{path} is missing: build switchboard-client from a checkout of the "
                    "repository (`pip wheel --no-deps clients/python`)"
                )
            build_data["force_include"][str(path)] = target
