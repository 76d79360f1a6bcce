"""Cutting an answer's text into sentences as it arrives, to speak each one early.

A model streams its answer a few characters at a time; speech must start long
before the answer ends, yet a synthesizer given half a sentence says it with
the wrong melody. So the text is cut at sentence boundaries as soon as one is
certain: after ``.``, ``!`` or ``?`` followed by white space (``3.14`` and
``e.g.`` inside a word are not boundaries; the space after them is what makes
them one) and at a newline. A piece shorter than ``min_chars`` is not cut
(``Hi.`` goes with what follows; ``2.`` numbering a list is no end at all); a run-on longer than
``max_chars`` is cut at its last comma, semicolon or colon within the limit,
else its last space, else at the limit. Whatever remains is the last piece,
once the answer is complete (``finish``).

Positions are characters of the whole answer (Python string indices), so a
piece says exactly which part of the answer it speaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: A piece shorter than this (without its surrounding space) waits for the next boundary.
MIN_CHARS: Final = 12
#: A piece never grows longer than this: a run-on sentence is cut before it.
MAX_CHARS: Final = 240
_ENDS: Final = frozenset(".!?")
_SOFT: Final = ",;:"
#: Closing quotes and brackets that stay with the sentence they end.
_CLOSERS: Final = frozenset("\"')]}\u00bb\u201d\u2019")


@dataclass(frozen=True)
class Piece:
    """A sentence to speak: its text (without surrounding space) and where it lies
    in the answer, ``answer[start:end] == text``."""

    text: str
    start: int
    end: int


class SentenceCutter:
    """Fed the answer's text in order; hands back the pieces that became certain."""

    def __init__(self, *, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> None:
        if not 0 < min_chars < max_chars:
            raise ValueError("need 0 < min_chars < max_chars")
        self._min = min_chars
        self._max = max_chars
        #: The whole answer so far.
        self.text = ""
        #: Where the text not yet cut begins.
        self._cut = 0
        #: Where to look for the next boundary (everything before it was looked at).
        self._scan = 0

    def feed(self, text: str) -> list[Piece]:
        """Add ``text``; the pieces it completed, in order."""
        self.text += text
        pieces: list[Piece] = []
        while (piece := self._next()) is not None:
            if piece.text:
                pieces.append(piece)
        return pieces

    def finish(self) -> list[Piece]:
        """The answer is complete: the rest, as at most a few last pieces."""
        pieces = self.feed("")
        while len(self.text) - self._cut > self._max:
            piece = self._take(self._soft_cut())
            if piece.text:
                pieces.append(piece)
        rest = self._take(len(self.text))
        if rest.text:
            pieces.append(rest)
        return pieces

    def _next(self) -> Piece | None:
        text = self.text
        index = max(self._scan, self._cut)
        while index < len(text):
            char = text[index]
            boundary = 0
            if char == "\n":
                boundary = index + 1
            elif char in _ENDS:
                after = index + 1
                while after < len(text) and (text[after] in _ENDS or text[after] in _CLOSERS):
                    after += 1
                if after == len(text):
                    # Not certain yet: "3." may become "3.14", "Hi" may become "Hi!".
                    self._scan = index
                    return None
                if text[after].isspace() and not _numbering(text, index):
                    boundary = after
                index = after - 1
            if boundary and self._long_enough(boundary):
                self._scan = boundary
                return self._take(boundary)
            if index + 1 - self._cut >= self._max:
                self._scan = index + 1
                return self._take(self._soft_cut())
            index += 1
        self._scan = len(text)
        return None

    def _long_enough(self, end: int) -> bool:
        return len(self.text[self._cut : end].strip()) >= self._min

    def _soft_cut(self) -> int:
        """Where to cut a run-on: after its last soft stop within the limit, else at
        its last space, else at the limit."""
        limit = self._cut + self._max
        window = self.text[self._cut : limit]
        for marks in (_SOFT, " \t"):
            best = max(window.rfind(mark) for mark in marks)
            if best >= self._min:
                return self._cut + best + 1
        return limit

    def _take(self, end: int) -> Piece:
        raw = self.text[self._cut : end]
        stripped = raw.strip()
        start = self._cut + (len(raw) - len(raw.lstrip()))
        self._cut = end
        self._scan = max(self._scan, end)
        return Piece(stripped, start, start + len(stripped))


def _numbering(text: str, stop: int) -> bool:
    """Whether the ``.`` at ``stop`` ends a list's number ("2. Pears"), not a sentence."""
    if text[stop] != ".":
        return False
    start = stop
    while start > 0 and stop - start <= 3 and text[start - 1].isdigit():
        start -= 1
    return 0 < stop - start <= 3 and (start == 0 or text[start - 1].isspace())
