"""Every module the docs name exists where they say, and the layouts they draw match the tree.

A newcomer finds the code through README.md's layout, docs/architecture.md's services and
platform wings, and docs/dispatcher.md's rooms; a module moved or renamed without its docs
sends them to a file that is not there (as `auth/tokens.py` did after the credential kernel
moved to `platform/security/`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "services" / "switchboard"
DOCS = (
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "clients").glob("*/README.md")),
)
#: Files named on purpose that are not this tree's: ones a reader is asked to write, and the
#: A2A TCK's (another project's).
NOT_OURS = frozenset(
    {
        "hello.py",
        "hello_a2a.py",
        "quickstart.py",
        "voice_turn.py",
        "ada.py",
        "a2a_follow.py",
        "run_tck.py",
        "quality/test_error_validation_enhanced.py",
    }
)
#: A module named as gone: the doc says it was removed or replaced.
GONE = frozenset(
    {
        ("docs/events.md", "platform/workers.py"),
        ("docs/decisions.md", "deploy/envoy/render.py"),
    }
)
_SKIPPED = frozenset({".git", ".venv", "node_modules", "__pycache__", ".tools"})
# A path to a Python file, not inside a URL or a longer path (nothing path-like before it).
_MODULE = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[A-Za-z][\w-]*\.py)\b")


def _tree() -> list[str]:
    found = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if not _SKIPPED.intersection(relative.parts):
            found.append(relative.as_posix())
    return found


TREE = _tree()


def _exists(name: str, under: str = "") -> bool:
    """Whether ``name`` (a file name, or a path's tail) is a file of the tree, under ``under``."""
    return any(
        path.startswith(under) and (path == name or path.endswith("/" + name)) for path in TREE
    )


def _mentions(doc: Path) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for match in _MODULE.finditer(line):
            yield number, match.group(1)


def test_every_module_a_doc_names_exists() -> None:
    missing = []
    for doc in DOCS:
        where = doc.relative_to(ROOT).as_posix()
        for number, name in _mentions(doc):
            if name in NOT_OURS or (where, name) in GONE:
                continue
            if name.startswith("../"):
                if not (doc.parent / name).resolve().is_file():
                    missing.append(f"{where}:{number}: {name}")
            elif not _exists(name):
                missing.append(f"{where}:{number}: {name}")
    assert not missing, "modules the docs name that the tree does not have:\n" + "\n".join(missing)


def _section(doc: Path, heading: str) -> list[str]:
    lines = doc.read_text().splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_the_architecture_names_each_services_modules_in_that_service() -> None:
    """A module named in a service's bullet is that service's, unless named by its path."""
    wrong = []
    service = ""
    for line in _section(ROOT / "docs" / "architecture.md", "## Services"):
        bullet = re.match(r"- \*\*(\w+)\*\*", line)
        if bullet:
            service = bullet.group(1)
        elif not line.strip():
            service = ""
        if not service or not (PACKAGE / service).is_dir():
            continue
        for match in _MODULE.finditer(line):
            name = match.group(1)
            under = "services/switchboard/" + ("" if "/" in name else f"{service}/")
            if not _exists(name, under):
                wrong.append(f"{service}: {name}")
    assert not wrong, "named under a service that does not have them:\n" + "\n".join(wrong)


def test_the_architecture_names_each_platform_modules_in_its_wing() -> None:
    """The platform's drawing: each wing's line names modules of that wing, the kernel's of
    platform/ itself."""
    lines = _section(ROOT / "docs" / "architecture.md", "## The platform: a kernel and six wings")
    block = lines[lines.index("```") + 1 :]
    block = block[: block.index("```")]
    wings: dict[str, list[str]] = {}
    wing = ""
    for line in block:
        head = re.match(r"(platform/[\w*]+(?:/|\.py))\s", line)
        if head:
            wing = head.group(1)
            wings[wing] = []
        wings[wing].extend(m.group(1) for m in _MODULE.finditer(line[len(wing) :]))
    drawn = {wing.removeprefix("platform/").rstrip("/") for wing in wings} - {"*.py"}
    actual = {
        p.name for p in (PACKAGE / "platform").iterdir() if p.is_dir() and p.name not in _SKIPPED
    }
    assert drawn == actual
    wrong = []
    for wing, names in wings.items():
        folder = PACKAGE / wing if wing.endswith("/") else PACKAGE / "platform"
        for name in names:
            if not (folder / name).is_file():
                wrong.append(f"{wing}: {name}")
    assert not wrong, "named in a wing that does not have them:\n" + "\n".join(wrong)


def test_the_readme_layout_names_what_the_tree_has() -> None:
    lines = _section(ROOT / "README.md", "## Layout")
    block = lines[lines.index("```") + 1 :]
    block = block[: block.index("```")]
    missing = []
    for line in block:
        if not line or line.startswith(" "):
            continue
        left = re.split(r"\s{2,}", line, maxsplit=1)[0]
        for entry in (part.strip() for part in left.split(",")):
            pattern = entry.replace("<service>", "*")
            if not list(ROOT.glob(pattern.rstrip("/"))):
                missing.append(entry)
    assert not missing, "README's layout names what is not there: " + ", ".join(missing)


def test_the_dispatcher_doc_draws_its_rooms_and_names_every_module() -> None:
    """docs/dispatcher.md's tables: the rooms are the top of dispatcher/, and every module in
    a room is described."""
    doc = (ROOT / "docs" / "dispatcher.md").read_text()
    folder = PACKAGE / "dispatcher"
    top = {
        p.name + ("/" if p.is_dir() else "")
        for p in folder.iterdir()
        if p.name not in _SKIPPED and p.name != "__init__.py"
    }
    rooms_table = doc[
        doc.index("| room | what it holds |") : doc.index("| module | what it holds |")
    ]
    drawn = set(re.findall(r"`([\w]+(?:/|\.py))`", rooms_table))
    assert drawn == top
    modules = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*.py")
        if p.name != "__init__.py" and p.parent != folder
    }
    undescribed = sorted(m for m in modules if f"`{m}`" not in doc)
    assert not undescribed, "modules docs/dispatcher.md does not describe: " + ", ".join(
        undescribed
    )


def test_every_module_the_code_names_in_its_comments_exists() -> None:
    """Docstrings and comments point a reader to other modules by path; a move must take
    them along (as the dispatcher's rooms did)."""
    missing = []
    for source in sorted(PACKAGE.rglob("*.py")):
        # A migration names the code as it was when it was written.
        if _SKIPPED.intersection(source.parts) or "migrations" in source.parts:
            continue
        where = source.relative_to(ROOT).as_posix()
        for number, line in enumerate(source.read_text().splitlines(), 1):
            for match in _MODULE.finditer(line):
                name = match.group(1)
                if name not in NOT_OURS and not _exists(name):
                    missing.append(f"{where}:{number}: {name}")
    assert not missing, "modules the code's comments name that the tree does not have:\n" + (
        "\n".join(missing)
    )
