"""Write the index at the top of docs/decisions.md from its decisions' headings.

    python scripts/decisions-index.py          # rewrite the index
    python scripts/decisions-index.py --check  # exit 1 if it is not current

The index sits between two HTML comments, so the decisions below stay as written; each
line links to its decision by the anchor GitHub gives its heading.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Final

PATH: Final = Path(__file__).resolve().parents[1] / "docs" / "decisions.md"
BEGIN: Final = "<!-- index: written by scripts/decisions-index.py -->"
END: Final = "<!-- end of index -->"
_HEADING: Final = re.compile(r"^## (\d+)\. (.+)$", re.MULTILINE)


def anchor(heading: str, seen: Counter[str]) -> str:
    """GitHub's anchor for a heading: lowercased, punctuation dropped, spaces to hyphens,
    and a repeated one numbered."""
    slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
    count = seen[slug]
    seen[slug] += 1
    return slug if count == 0 else f"{slug}-{count}"


def index(text: str) -> str:
    body = text.split(END, 1)[1] if END in text else text
    seen: Counter[str] = Counter()
    lines = [BEGIN, ""]
    for number, title in _HEADING.findall(body):
        link = anchor(f"{number}. {title}", seen)
        lines.append(f"{number}. [{title}](#{link})")
    lines += ["", END]
    return "\n".join(lines)


def rewritten(text: str) -> str:
    block = index(text)
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    # First time: after the title's paragraph, before the first decision.
    first = _HEADING.search(text)
    at = first.start() if first else len(text)
    return text[:at] + block + "\n\n" + text[at:]


def main(argv: list[str]) -> int:
    text = PATH.read_text(encoding="utf-8")
    new = rewritten(text)
    if "--check" in argv:
        if new != text:
            print("docs/decisions.md: the index is stale; run python scripts/decisions-index.py")
            return 1
        return 0
    PATH.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
