"""Size figures of the hand-written code, for a before/after comparison of a restructuring.

    python scripts/housestats.py [ROOT]

Prints the largest hand-written files (services/ and the Python client,
clients/python/switchboard/), the packages with the most top-level modules, the largest
modules of the dispatcher's rooms, the functions longer than 80 lines (by their first and
last line, decorators excluded), the line counts of services/, tests/ and bench/, and each
settings section's field count (read from the source: a field is a line
``    <name>: <type> = Field(``). Generated code (gen/, clients/*/gen) is not counted.
tests/repo/test_house.py holds the limits these figures are read against.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

LONG = 80
#: Where the hand-written Python of the `switchboard` namespace package lives.
HAND_WRITTEN = ("services", "clients/python/switchboard")


def hand_written(root: Path) -> list[Path]:
    return sorted(p for folder in HAND_WRITTEN for p in (root / folder).rglob("*.py"))


def modules_per_package(root: Path) -> list[tuple[int, Path]]:
    """Each package's top-level modules (``__init__`` and migrations' versions not counted)."""
    packages = {p.parent for p in hand_written(root) if p.name == "__init__.py"}
    counted = [
        (len([m for m in package.glob("*.py") if m.name != "__init__.py"]), package)
        for package in packages
        if package.name != "versions"
    ]
    return sorted(counted, key=lambda item: (-item[0], item[1]))


def dispatcher_rooms(root: Path) -> list[tuple[int, Path]]:
    """The modules of the dispatcher's rooms (its subpackages), largest first."""
    dispatcher = root / "services" / "switchboard" / "dispatcher"
    rooms = [p for p in dispatcher.rglob("*.py") if p.parent != dispatcher]
    return sorted(((_lines(p), p) for p in rooms), key=lambda item: (-item[0], item[1]))


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
    for path in hand_written(root):
        text = path.read_text(encoding="utf-8")
        heads = list(_SECTION.finditer(text))
        for i, head in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            found.append((len(_FIELD.findall(text, head.end(), end)), head[1], path))
    return sorted(found, reverse=True)


def main(root: Path) -> None:
    sized = sorted(((_lines(p), p) for p in hand_written(root)), reverse=True)
    print("largest hand-written files (services/, clients/python/switchboard/):")
    for count, path in sized[:8]:
        print(f"  {count:5d}  {path.relative_to(root)}")
    print("packages with the most top-level modules:")
    for count, package in modules_per_package(root)[:6]:
        print(f"  {count:5d}  {package.relative_to(root)}/")
    print("largest modules of the dispatcher's rooms:")
    for count, path in dispatcher_rooms(root)[:6]:
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
