"""Entities found in message text: mentions, links, email addresses and dates.

Extraction runs on every stored message and its input is untrusted, so every
pattern here is linear-time on any input. Each one:

- starts with a negative lookbehind of its own first character class, so a
  match can only start at the beginning of a run (a failed attempt inside a
  long run costs O(1), not a rescan of the rest of the run), and
- uses possessive quantifiers (Python 3.11+) with no nested or overlapping
  repetition, so nothing is ever backtracked into.

Overlaps are settled by priority: a link claims its text first, then an email
address, then a date; a mention or date inside a link or an address (the
``@example`` of ``bob@example.com``, the ``/@alice`` of a profile URL) is not
an entity of its own.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol

MAX_ENTITIES_PER_MESSAGE: Final = 32
# Longer "links" are blobs, not something a person refers to again.
MAX_LINK_LENGTH: Final = 2048
# RFC 5321 limits a path (address) to 254 characters.
MAX_EMAIL_LENGTH: Final = 254
MAX_HANDLE_LENGTH: Final = 64


@dataclass(frozen=True)
class Entity:
    """One entity: ``kind`` (``mention``, ``link``, ``email`` or ``date``), its
    normalized ``value`` and the ``text`` it was found as."""

    kind: str
    value: str
    text: str


class EntityExtractor(Protocol):
    """Finds the entities of a text."""

    name: str

    def extract(self, text: str) -> list[Entity]:
        """Entities in order of first occurrence, unique by ``(kind, value)``."""
        ...


_LINK: Final = re.compile(r"(?<![\w.+-])(?i:https?)://[^\s<>\"'`]++")
# A domain is labels joined by single dots; the dot is consumed only together
# with the next label, so "bob@example.com." stops before the final period.
_EMAIL: Final = re.compile(r"(?<![\w.%+-])[A-Za-z0-9_.%+-]++@[A-Za-z0-9-]++(?:\.[A-Za-z0-9-]++)*+")
# "@" not preceded by an address character, so an email's "@" never starts one.
_MENTION: Final = re.compile(r"(?<![\w.%+@-])@([A-Za-z0-9_]++(?:[.-][A-Za-z0-9_]++)*+)")

_MONTH_NAMES: Final = (
    "jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    "|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?"
)
_MONTHS: Final = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}
_ISO_DATE: Final = re.compile(r"(?<![0-9-])([0-9]{4})-([0-9]{2})-([0-9]{2})(?![0-9])")
# "22 Nov 2026", "22nd November, 2026"
_DAY_MONTH_YEAR: Final = re.compile(
    rf"(?<![0-9])([0-9]{{1,2}}+)(?:st|nd|rd|th)?[ \t]++({_MONTH_NAMES})(?![a-z])\.?,?"
    r"[ \t]++([0-9]{4})(?![0-9])",
    re.IGNORECASE,
)
# "Nov 22, 2026", "November 22 2026"
_MONTH_DAY_YEAR: Final = re.compile(
    rf"(?<![a-z])({_MONTH_NAMES})(?![a-z])\.?[ \t]++([0-9]{{1,2}}+)(?:st|nd|rd|th)?,?"
    r"[ \t]++([0-9]{4})(?![0-9])",
    re.IGNORECASE,
)

_LINK_TRAILERS: Final = ".,;:!?'\"*"
_CLOSERS: Final = {")": "(", "]": "[", "}": "{"}


def _trim_link(link: str) -> str:
    """Strip the punctuation that ends the sentence around a link, not the link.

    A closing bracket is kept while the link opens one more than it closes, so
    ``https://en.wikipedia.org/wiki/Foo_(bar)`` keeps its ")" but
    ``(see https://example.com)`` loses it.
    """
    open_count = {opener: link.count(opener) for opener in _CLOSERS.values()}
    close_count = {closer: link.count(closer) for closer in _CLOSERS}
    end = len(link)
    while end:
        last = link[end - 1]
        if last in _LINK_TRAILERS:
            end -= 1
        elif last in _CLOSERS and close_count[last] > open_count[_CLOSERS[last]]:
            close_count[last] -= 1
            end -= 1
        else:
            break
    return link[:end]


def _normalize_link(link: str) -> str | None:
    scheme, _, rest = link.partition("://")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    host, path = rest[:cut], rest[cut:]
    if not host:
        return None
    # Scheme and host are case-insensitive; the path is not.
    return f"{scheme.lower()}://{host.lower()}{path}"


def _valid_date(year: str, month: int, day: str) -> str | None:
    try:
        return datetime.date(int(year), month, int(day)).isoformat()
    except ValueError:
        return None


def _month(name: str) -> int:
    return _MONTHS[name[:3].lower()]


def _found(text: str) -> Iterator[tuple[int, int, Entity]]:
    """Every candidate entity as ``(start, end, entity)``, in priority order."""
    for match in _LINK.finditer(text):
        link = _trim_link(match[0])
        value = _normalize_link(link) if len(link) <= MAX_LINK_LENGTH else None
        if value is not None:
            yield match.start(), match.start() + len(link), Entity("link", value, link)
    for match in _EMAIL.finditer(text):
        address = match[0]
        domain = address.rpartition("@")[2]
        top_level = domain.rpartition(".")[2]
        if (
            len(address) <= MAX_EMAIL_LENGTH
            and "." in domain
            and top_level.isalpha()
            and len(top_level) >= 2
            and not address.startswith(".")
        ):
            yield match.start(), match.end(), Entity("email", address.lower(), address)
    for match in _ISO_DATE.finditer(text):
        iso = _valid_date(match[1], int(match[2]), match[3])
        if iso is not None:
            yield match.start(), match.end(), Entity("date", iso, match[0])
    for match in _DAY_MONTH_YEAR.finditer(text):
        iso = _valid_date(match[3], _month(match[2]), match[1])
        if iso is not None:
            yield match.start(), match.end(), Entity("date", iso, match[0])
    for match in _MONTH_DAY_YEAR.finditer(text):
        iso = _valid_date(match[3], _month(match[1]), match[2])
        if iso is not None:
            yield match.start(), match.end(), Entity("date", iso, match[0])
    for match in _MENTION.finditer(text):
        handle = match[1]
        if len(handle) <= MAX_HANDLE_LENGTH:
            # Handles are case-insensitive on every common platform.
            yield match.start(), match.end(), Entity("mention", handle.lower(), match[0])


class BuiltinEntityExtractor:
    """Regex-based extraction of mentions, http(s) links, email addresses and dates.

    Values are normalized: a mention is its lower-cased handle without the
    ``@``; a link has its scheme and host lower-cased and sentence punctuation
    trimmed; an email address is lower-cased; a date (``2026-11-22``,
    ``22 Nov 2026``, ``Nov 22, 2026``, ``November 22 2026``) is ISO
    ``2026-11-22``, and impossible dates (``2026-02-30``) are ignored. The result
    is in order of appearance, unique by ``(kind, value)`` and at most
    ``MAX_ENTITIES_PER_MESSAGE`` long.
    """

    name = "builtin-v1"

    def extract(self, text: str) -> list[Entity]:
        # One flag per character; a candidate overlapping claimed text is part
        # of an entity already found. Checking and claiming a span costs its
        # length, and accepted spans never overlap, so this stays linear.
        claimed = bytearray(len(text))
        accepted: list[tuple[int, Entity]] = []
        for start, end, entity in _found(text):
            if claimed.find(1, start, end) != -1:
                continue
            claimed[start:end] = b"\x01" * (end - start)
            accepted.append((start, entity))
        accepted.sort(key=lambda item: item[0])
        seen: set[tuple[str, str]] = set()
        entities: list[Entity] = []
        for _, entity in accepted:
            key = (entity.kind, entity.value)
            if key not in seen:
                seen.add(key)
                entities.append(entity)
                if len(entities) == MAX_ENTITIES_PER_MESSAGE:
                    break
        return entities
