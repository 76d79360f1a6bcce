#!/usr/bin/env python3
"""Write the README's configuration table from the settings' sections (``make docs``).

    scripts/render-settings.py           write it
    scripts/render-settings.py --check   write nothing; exit 1 with a diff when it is stale

The table is ``switchboard.settings.settings_table()``: a row per field of every
section (the kernel's in platform/config.py, each service's in <service>/settings.py),
its description the meaning. A new setting is a field in its section, then this
script; tests/repo/test_docs.py runs ``--check``.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from switchboard.settings import settings_table

ROOT: Final = Path(__file__).resolve().parents[1]
README: Final = ROOT / "README.md"
#: The lines around the table in the README; what is between them is this script's.
BEGIN: Final = (
    "<!-- settings table: written by scripts/render-settings.py (make docs) from the "
    "settings' sections; edit their fields, not this table -->\n"
)
END: Final = "<!-- end of settings table -->\n"


class RenderError(Exception):
    """The README has no place for the table."""


def rendered(readme: str) -> str:
    """``readme`` with the table between the markers as the sections say."""
    before, begin, rest = readme.partition(BEGIN)
    _, end, after = rest.partition(END)
    if not begin or not end:
        raise RenderError(f"{README.name} needs the lines {BEGIN.strip()} and {END.strip()}")
    # Blank lines around the table: no Markdown reader takes a marker for a row.
    return before + BEGIN + "\n" + settings_table() + "\n" + END + after


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the table is not current"
    )
    args = parser.parse_args(argv)
    current = README.read_text()
    try:
        text = rendered(current)
    except RenderError as exc:
        print(f"render-settings: {exc}", file=sys.stderr)
        return 2
    if current == text:
        return 0
    if args.check:
        diff = difflib.unified_diff(
            current.splitlines(True), text.splitlines(True), "README.md", "README.md (rendered)"
        )
        sys.stdout.writelines(list(diff)[:200])
        print("render-settings: the README's settings table is not current; run `make docs`")
        return 1
    README.write_text(text)
    print("wrote README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
