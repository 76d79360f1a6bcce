"""Size figures of the hand-written code, for a before/after comparison of a restructuring.

    python scripts/housestats.py [ROOT]

Prints the largest hand-written files under services/, the functions longer than 80 lines
(by their first and last line, decorators excluded), the line counts of services/,
tests/ and bench/, and each settings section's field count (read from the source: a
field is a line ``    <name>: <type> = Field(``). Generated code (gen/, clients/*/gen) is
not counted.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

LONG = 80


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def _long_functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > LONG:
                found.append((node.name, length))
    return found


_SECTION = re.compile(r"^class (\w+)\(Section\):", re.MULTILINE)
_FIELD = re.compile(r"^    \w+: [^=]+= Field\(", re.MULTILINE)


def _sections(root: Path) -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted((root / "services").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        heads = list(_SECTION.finditer(text))
        for i, head in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            found.append((len(_FIELD.findall(text, head.end(), end)), head[1], path))
    return sorted(found, reverse=True)


def main(root: Path) -> None:
    services = sorted((root / "services").rglob("*.py"))
    sized = sorted(((_lines(p), p) for p in services), reverse=True)
    print("largest hand-written files (services/):")
    for count, path in sized[:8]:
        print(f"  {count:5d}  {path.relative_to(root)}")
    print(f"functions over {LONG} lines:")
    for folder in ("services", "tests", "bench"):
        long = [
            (path.relative_to(root), name, length)
            for path in sorted((root / folder).rglob("*.py"))
            for name, length in _long_functions(path)
        ]
        print(f"  {folder}/: {len(long)}")
        for rel, name, length in sorted(long, key=lambda item: -item[2])[:5]:
            print(f"    {length:4d}  {rel}:{name}")
    print("settings sections by fields:")
    for count, name, path in _sections(root):
        print(f"  {count:5d}  {name} ({path.relative_to(root)})")
    print("lines:")
    for folder in ("services", "tests", "bench"):
        files = sorted((root / folder).rglob("*.py"))
        print(f"  {folder}/: {sum(_lines(p) for p in files)} in {len(files)} files")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
