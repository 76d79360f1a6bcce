"""Token counting for context windows: a pluggable counter and an offline default.

Budgets are expressed in model tokens, but the mesh must not depend on any one
model's tokenizer (or download its vocabulary) just to store a message. The
default ``ApproxTokenCounter`` is a deterministic heuristic tuned to land near
BPE tokenizers (cl100k-style) for English and code, erring slightly high: an
over-estimate wastes a little of the window, an under-estimate overflows it.

A counter's ``name`` is part of every cache key built from its counts, so a
changed heuristic must get a new name rather than silently reuse old counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, Protocol

from switchboard.api.context.v1 import context_pb2
from switchboard.shared.parttext import is_vision_image, render_parts

# Chat formats wrap each message in a role marker and separators; counting them
# keeps a window of many short messages from overflowing.
MESSAGE_OVERHEAD: Final = 4


class TokenCounter(Protocol):
    """Counts the tokens a text costs in a model's context."""

    name: str

    def count(self, text: str) -> int:
        """Return the number of tokens of ``text``; ``0`` for the empty string."""
        ...


# One pass, one group per class of run. ASCII letters (with "_", which BPE
# vocabularies merge into identifiers), ASCII digits, ASCII whitespace,
# non-ASCII, then any single remaining ASCII character (punctuation, control).
# Every alternative is a plain character class, so matching is linear.
_RUNS: Final = re.compile(r"([A-Za-z_]+)|([0-9]+)|([ \t\n\r\f\v]+)|([^\x00-\x7f]+)|([\x00-\x7f])")

# BPE vocabularies hold most English words of up to ~5 letters whole and split
# longer or rarer ones into pieces; one token per 5 letters tracks that.
_LETTERS_PER_TOKEN: Final = 5
# cl100k-style tokenizers split digit runs into groups of at most 3.
_DIGITS_PER_TOKEN: Final = 3
# Runs of whitespace (newline plus indentation) merge into about one token.
_SPACES_PER_TOKEN: Final = 8


class ApproxTokenCounter:
    """A fast, offline approximation of a BPE tokenizer.

    Each run of letters costs ``ceil(len / 5)``, digits ``ceil(len / 3)``, a
    single space nothing (BPE folds it into the next word), other whitespace
    runs ``ceil(len / 8)``, every non-ASCII character 1 (CJK is about one token
    per character; accented Latin a little less) and every other ASCII
    character 1. Each run's cost only grows with its length and concatenation
    can merge at most one run across the seam, so for any ``a`` and ``b``:
    ``max(count(a), count(b)) <= count(a + b) <= count(a) + count(b) + 1``.
    """

    name = "approx-v1"

    def count(self, text: str) -> int:
        total = 0
        # One iteration per run, not per character: runs are what cost tokens.
        for letters, digits, spaces, other_script, _single in _RUNS.findall(text):
            if letters:
                total += -(-len(letters) // _LETTERS_PER_TOKEN)
            elif digits:
                total += -(-len(digits) // _DIGITS_PER_TOKEN)
            elif spaces:
                if spaces != " ":
                    total += -(-len(spaces) // _SPACES_PER_TOKEN)
            elif other_script:
                total += len(other_script)
            else:
                total += 1
        return total


def message_tokens(
    counter: TokenCounter, parts: Iterable[context_pb2.ContentPart], image_tokens: int = 0
) -> int:
    """The tokens a message costs in a window: its rendered content (with the
    text of its files, where filled in) plus framing, plus ``image_tokens`` for
    each image a vision model would be sent (``parttext.VISION_IMAGE_TYPES``):
    what an image costs depends on the model and its size, so it is a fixed
    estimate (the setting ``SWITCHBOARD_CONTEXT_IMAGE_TOKENS``)."""
    parts = list(parts)
    images = sum(1 for part in parts if part.HasField("file") and is_vision_image(part.file))
    return counter.count(render_parts(parts)) + MESSAGE_OVERHEAD + images * image_tokens
