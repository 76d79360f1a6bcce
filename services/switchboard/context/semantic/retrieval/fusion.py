"""Reciprocal rank fusion of a full-text and a semantic list (docs/semantic.md).

A result at 1-based rank ``r`` in a list gets ``1 / (K + r)`` from it; its score
is the sum over the lists it is in. Ties (same score) keep the full-text list's
order first, then the semantic list's, then the key: the same inputs always
give the same order, so paging by position is stable.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

#: The constant of reciprocal rank fusion (Cormack et al.), as the contract says.
K: Final = 60

_Key = TypeVar("_Key", bound=Hashable)


@dataclass(frozen=True)
class Fused(Generic[_Key]):
    """One fused result: its key, score, and where it ranked in each list."""

    key: _Key
    score: float
    full_text_rank: int | None = None
    semantic_rank: int | None = None
    #: Cosine similarity from the semantic list, if it was in it.
    similarity: float | None = None


def fuse(
    full_text: Sequence[_Key],
    semantic: Sequence[tuple[_Key, float]],
    *,
    k: int = K,
) -> list[Fused[_Key]]:
    """The keys of both lists by fused score, best first.

    ``full_text``: keys best first; ``semantic``: (key, similarity) best first.
    A key repeated in one list counts at its first (best) rank only.
    """
    text_rank: dict[_Key, int] = {}
    for key in full_text:
        text_rank.setdefault(key, len(text_rank) + 1)
    meaning: dict[_Key, tuple[int, float]] = {}
    for key, similarity in semantic:
        if key not in meaning:
            meaning[key] = (len(meaning) + 1, similarity)
    order: dict[_Key, int] = {}
    for key in (*text_rank, *meaning):
        order.setdefault(key, len(order))
    results = []
    for key in order:
        t = text_rank.get(key)
        s = meaning.get(key)
        score = (1.0 / (k + t) if t is not None else 0.0) + (1.0 / (k + s[0]) if s else 0.0)
        results.append(
            Fused(
                key=key,
                score=score,
                full_text_rank=t,
                semantic_rank=s[0] if s else None,
                similarity=s[1] if s else None,
            )
        )
    # sorted() is stable: equal scores stay in first-seen order (full-text, then semantic).
    return sorted(results, key=lambda fused: -fused.score)


def single(keys: Sequence[tuple[_Key, float]], *, semantic: bool) -> list[Fused[_Key]]:
    """One list's (key, score) results as ``Fused``, in its own order with its own
    scores (full-text relevance, or cosine similarity)."""
    seen: set[_Key] = set()
    results = []
    for key, value in keys:
        if key in seen:
            continue
        seen.add(key)
        rank = len(seen)
        results.append(
            Fused(
                key=key,
                score=value,
                full_text_rank=None if semantic else rank,
                semantic_rank=rank if semantic else None,
                similarity=value if semantic else None,
            )
        )
    return results
