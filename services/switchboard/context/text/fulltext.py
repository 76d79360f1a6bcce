"""Full-text query builders: user text in, a query that can only match words out.

Both SQLite FTS5 and PostgreSQL ``to_tsquery`` have a query language (``NEAR``,
``*``, ``:``, ``-``, ``!``, ``&``, parentheses...). User text reaching it
unescaped could change what is searched or make the query fail, so text is
first reduced to plain terms and each builder then quotes or filters them so
that every term can only ever be a word to match. Terms are ORed: retrieval
ranks by relevance, so one matching word is enough to be a candidate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from switchboard.context.text.summarizer import STOPWORDS

MAX_QUERY_TERMS: Final = 32
# No real word is longer; longer "terms" are blobs, and PostgreSQL refuses
# tsquery words beyond 2047 bytes.
MAX_TERM_LENGTH: Final = 64

_WORD: Final = re.compile(r"\w+")
_NOT_WORD: Final = re.compile(r"\W+")


def query_terms(text: str) -> list[str]:
    """The unique lower-cased words of ``text``, in order, at most ``MAX_QUERY_TERMS``.

    A term is a run of word characters of at least two characters (single
    letters match too much to be worth searching), or a number of any length.
    Stop words ("the", "for"...) are left out unless the text has nothing else.
    Terms longer than ``MAX_TERM_LENGTH`` are left out.
    """
    terms: list[str] = []
    common: list[str] = []
    seen: set[str] = set()
    # finditer, not findall: a long text stops costing once enough terms are found.
    for match in _WORD.finditer(text):
        term = match[0].lower()
        if (len(term) >= 2 or term.isdigit()) and len(term) <= MAX_TERM_LENGTH and term not in seen:
            seen.add(term)
            # Stop words match nearly every item: ORed in, they make the
            # engine score the whole scope and rank on noise. PostgreSQL's
            # english configuration drops them too; kept only if nothing else is left.
            (common if term in STOPWORDS else terms).append(term)
            if len(terms) == MAX_QUERY_TERMS:
                break
    return terms or common[:MAX_QUERY_TERMS]


def fts5_match(terms: Sequence[str]) -> str:
    """An FTS5 ``MATCH`` expression that matches any of ``terms``.

    Each term becomes an FTS5 string (double-quoted, embedded quotes doubled),
    inside which no character is an operator. NUL is dropped because SQLite
    ends the query text at it, which would leave a string unterminated. The
    result is ``""`` when there is nothing to search for; do not run it, as
    ``MATCH ''`` is a syntax error in FTS5.
    """
    quoted = []
    for term in terms:
        cleaned = term.replace("\x00", "")
        if cleaned:
            quoted.append('"' + cleaned.replace('"', '""') + '"')
    return " OR ".join(quoted)


def pg_tsquery(terms: Sequence[str]) -> str:
    """A ``to_tsquery`` expression that matches any of ``terms``.

    tsquery has no quoting, so only word characters (letters, digits, ``_``)
    are kept; everything else, operators included, is removed from a term.
    ``""`` when nothing is left (``to_tsquery`` accepts it and matches nothing).
    """
    kept: list[str] = []
    seen: set[str] = set()
    for term in terms:
        cleaned = _NOT_WORD.sub("", term)
        if cleaned and cleaned not in seen:
            seen.add(cleaned)
            kept.append(cleaned)
    return " | ".join(kept)
