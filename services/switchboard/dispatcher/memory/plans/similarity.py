"""Near-duplicate memories, as consolidation finds them without a model.

Two items of one scope and kind say the same when their normalized texts are
equal (case, punctuation and spacing aside) or their word sets overlap by a
Jaccard index of at least ``THRESHOLD``. A merge keeps the older item (what was
learned first, and what people may have linked to) and retires the newer; only
formed items are ever retired by a merge, never one a person wrote.

This module is pure: no I/O, no grpc.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

#: The least word overlap at which two items are one.
THRESHOLD: Final = 0.85
_WORD: Final = re.compile(r"\w+")


def normalized(text: str) -> str:
    """``text`` compared as words: case folded, accents kept, punctuation dropped."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def jaccard(first: str, second: str) -> float:
    """The share of words the two texts have in common (0 when either has none)."""
    a, b = set(normalized(first).split()), set(normalized(second).split())
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def near_duplicates(first: str, second: str, threshold: float = THRESHOLD) -> bool:
    one, two = normalized(first), normalized(second)
    return bool(one) and (one == two or jaccard(one, two) >= threshold)


@dataclass(frozen=True)
class Item:
    """A current item as consolidation sees it; ``order``: when it was learned (older
    first), ``formed``: whether forming made it (only those are merged away)."""

    name: str
    kind: int
    content: str
    order: tuple[float, str]
    formed: bool


def merges(items: Sequence[Item], threshold: float = THRESHOLD) -> list[tuple[Item, Item]]:
    """``(kept, retired)`` pairs: each formed item that repeats an older one of its kind
    is retired into the oldest it repeats; each item is retired at most once, and an
    item retired is never what another is kept as."""
    ordered = sorted(items, key=lambda item: item.order)
    kept: list[Item] = []
    pairs: list[tuple[Item, Item]] = []
    for item in ordered:
        twin = next(
            (
                older
                for older in kept
                if older.kind == item.kind
                and near_duplicates(older.content, item.content, threshold)
            ),
            None,
        )
        if twin is not None and item.formed:
            pairs.append((twin, item))
        else:
            kept.append(item)
    return pairs


__all__ = ["THRESHOLD", "Item", "jaccard", "merges", "near_duplicates", "normalized"]
