"""Rolling conversation summaries: a pluggable summarizer and an extractive default.

A summary replaces messages that no longer fit a window (or were archived), so
it folds the previous summary and the newer messages into a new one within a
token budget. ``summarize`` is async so that an LLM-backed summarizer can plug
in; the built-in one is deterministic, offline and pure CPU.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from switchboard.context.text.tokencount import TokenCounter


@dataclass(frozen=True)
class SummaryInput:
    """One message to summarize: its role (``user``, ``assistant``...), author and text."""

    role: str
    author: str
    text: str


class Summarizer(Protocol):
    """Folds a previous summary and newer messages into a summary of at most ``max_tokens``."""

    name: str

    async def summarize(
        self,
        previous: str | None,
        messages: Sequence[SummaryInput],
        *,
        max_tokens: int,
        counter: TokenCounter,
    ) -> str:
        """Return the new summary; ``""`` when there is nothing to summarize."""
        ...


# A sentence ends after ., ! or ? followed by whitespace, or at a line break.
# No nested quantifiers: splitting is linear in the text.
_SENTENCE_BREAK: Final = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
_TERM: Final = re.compile(r"\w+")
_WORD_BREAK: Final = re.compile(r"\s+")
# "user: text" as written by this summarizer; the label is bounded so this is
# linear however long the line.
_LABEL: Final = re.compile(r"([\w-]{1,32}: )(\S.*)", re.DOTALL)

# Function words carry no topic; counting them would make every long sentence
# look important.
_STOPWORD_LIST: Final = """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just let me more most my myself no nor not now of off on
    once only or other our ours ourselves out over own same she should so some such than
    that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves ok okay yes yeah thanks thank please
"""
STOPWORDS: Final = frozenset(_STOPWORD_LIST.split())


@dataclass(frozen=True)
class _Sentence:
    position: int
    prefix: str
    text: str
    terms: tuple[str, ...]
    words: int

    def render(self, text: str | None = None) -> str:
        return f"{self.prefix}{self.text if text is None else text}"


def _split(text: str) -> Iterator[str]:
    for piece in _SENTENCE_BREAK.split(text):
        stripped = piece.strip()
        if stripped:
            yield stripped


def _sentences(previous: str | None, messages: Sequence[SummaryInput]) -> list[_Sentence]:
    sentences: list[_Sentence] = []

    def add(prefix: str, text: str) -> None:
        lowered = _TERM.findall(text.lower())
        terms = tuple(t for t in lowered if t not in STOPWORDS and not t.isdigit())
        sentences.append(_Sentence(len(sentences), prefix, text, terms, len(lowered)))

    if previous:
        # A previous summary written by this summarizer is one sentence per
        # line, prefixed like the messages below; splitting the label off again
        # keeps it out of the term counts and keeps it when a line is cut.
        for sentence in _split(previous):
            labelled = _LABEL.fullmatch(sentence)
            if labelled:
                add(labelled[1], labelled[2])
            else:
                add("", sentence)
    for message in messages:
        label = message.role or message.author
        prefix = f"{label}: " if label else ""
        for sentence in _split(message.text):
            add(prefix, sentence)
    return sentences


def _truncate(sentence: _Sentence, max_tokens: int, counter: TokenCounter) -> str:
    """The longest prefix of ``sentence``'s words that fits, or ``""``."""
    words = _WORD_BREAK.split(sentence.text)
    # Token counts only grow with more words, so binary search finds the
    # longest fit in O(log n) counts instead of one count per word.
    low, high = 0, len(words)
    while low < high:
        middle = (low + high + 1) // 2
        if counter.count(sentence.render(" ".join(words[:middle]))) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return sentence.render(" ".join(words[:low])) if low else ""


class ExtractiveSummarizer:
    """Keeps the most informative sentences, verbatim, in their original order.

    Each sentence of the previous summary and of the messages is scored by the
    frequency (across all the input) of its non-stopword terms, divided by its
    length in words so long sentences do not win by size alone. The best are
    taken (ties: the earlier first) while they fit ``max_tokens``; a sentence
    that does not fit is skipped and smaller ones are still tried. Message
    sentences are prefixed with their role (``user: ...``). If not even one
    sentence fits, the best one is cut to the words that fit. The result never
    exceeds ``max_tokens`` as counted by ``counter``. O(n log n) in the input.
    """

    name = "extractive-v1"

    async def summarize(
        self,
        previous: str | None,
        messages: Sequence[SummaryInput],
        *,
        max_tokens: int,
        counter: TokenCounter,
    ) -> str:
        # Pruning thousands of messages is tenths of a second of pure CPU: off the loop.
        return await asyncio.to_thread(
            self.summarize_now, previous, messages, max_tokens=max_tokens, counter=counter
        )

    def summarize_now(
        self,
        previous: str | None,
        messages: Sequence[SummaryInput],
        *,
        max_tokens: int,
        counter: TokenCounter,
    ) -> str:
        """``summarize`` without the coroutine, for callers that run it in a thread."""
        if max_tokens <= 0:
            return ""
        sentences = _sentences(previous, messages)
        if not sentences:
            return ""
        frequency = Counter(term for sentence in sentences for term in sentence.terms)

        def score(sentence: _Sentence) -> float:
            if not sentence.words:
                return 0.0
            return sum(frequency[term] for term in sentence.terms) / sentence.words

        ranked = sorted(sentences, key=lambda s: (-score(s), s.position))
        separator = counter.count("\n")
        chosen: list[_Sentence] = []
        used = 0
        for sentence in ranked:
            cost = counter.count(sentence.render()) + (separator if chosen else 0)
            if used + cost <= max_tokens:
                chosen.append(sentence)
                used = used + cost
                if used >= max_tokens:
                    break
        # Per-sentence counts are an estimate of the joined text's count (a
        # counter need not be additive); drop the weakest until the real count fits.
        while chosen:
            summary = "\n".join(s.render() for s in sorted(chosen, key=lambda s: s.position))
            if counter.count(summary) <= max_tokens:
                return summary
            chosen.pop()
        return _truncate(ranked[0], max_tokens, counter)
