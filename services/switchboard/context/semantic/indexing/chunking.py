"""Cutting a source's text into passages for the index (docs/semantic.md, Indexing).

A passage is at most ``size`` characters; a cut falls at the last paragraph
break, else sentence end, else space in the passage's second half, and only a
word longer than half a passage is cut inside. Neighbours share about
``overlap`` characters (the next passage starts at a word boundary within the
overlap), so a sentence across a cut is whole in one of them. Positions are in
characters of the source's text (Python string indices), end exclusive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

_PARAGRAPH: Final = re.compile(r"\n\s*\n")
_SENTENCE: Final = re.compile("[.!?;:\u3002\uff01\uff1f](?=\\s)|\n")
_SPACE: Final = re.compile(r"\s")


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int
    end: int
    text: str


def _cut(text: str, start: int, limit: int) -> int:
    """Where the passage starting at ``start`` ends, at most ``limit``."""
    if limit >= len(text):
        return len(text)
    floor = start + (limit - start) // 2
    window = text[floor:limit]
    for pattern in (_PARAGRAPH, _SENTENCE, _SPACE):
        ends = [m.end() for m in pattern.finditer(window)]
        if ends:
            return floor + ends[-1]
    return limit


def _next_start(text: str, cut: int, start: int, overlap: int) -> int:
    """The next passage's start: ``overlap`` characters back from ``cut``, moved
    forward to the start of a word, never at or before ``start``."""
    if overlap <= 0:
        return cut
    back = max(start + 1, cut - overlap)
    if back >= cut:
        return cut
    if back > 0 and not text[back - 1].isspace():
        found = _SPACE.search(text, back, cut)
        back = found.end() if found else cut
    return back


def chunk_text(text: str, *, size: int, overlap: int, max_chunks: int) -> list[Chunk]:
    """The passages of ``text`` (none for blank text), at most ``max_chunks``.

    Leading and trailing whitespace of a passage is left out of it (its
    offsets say where its text is).
    """
    if size <= 0 or max_chunks <= 0:
        raise ValueError("size and max_chunks must be positive")
    overlap = max(0, min(overlap, size // 2))
    chunks: list[Chunk] = []
    start = 0
    length = len(text)
    while start < length and len(chunks) < max_chunks:
        cut = _cut(text, start, min(start + size, length))
        left, right = start, cut
        while left < right and text[left].isspace():
            left += 1
        while right > left and text[right - 1].isspace():
            right -= 1
        if right > left:
            chunks.append(Chunk(len(chunks), left, right, text[left:right]))
        if cut >= length:
            break
        start = _next_start(text, cut, start, overlap)
    return chunks
