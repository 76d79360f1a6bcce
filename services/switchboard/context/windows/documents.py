"""A message's files as a window counts and shows them: their text, cut to fit.

A file part reads ``[file <display_name> <mime_type>]`` (``shared/parttext.py``), and
for a document or a transcribed recording the file's text follows it. That
text can be far larger than a window, so:

- ``measure`` counts a message with its files' text: the message without the
  text (images at their fixed cost) plus each text's token count (counted once,
  when the file was stored) and ``SEAM_TOKENS`` for where it joins the rest, an
  upper bound for a counter like the default (concatenation costs at most one
  token per seam); and its ``floor``: the same with every text cut to its note;
- ``cut`` fills the text in within a number of tokens (at least the floor):
  texts whole in order while they fit, then one cut at a word with a visible
  note (``[... document truncated: 1,234 of 9,876 tokens shown]``), and each
  later one only its note. It recounts what it shows and never returns more
  than it was given.

Pure: no I/O, so the window (``builder.py``) and the append (``messages/catalog.py``)
count alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.text.tokencount import TokenCounter, message_tokens

#: Tokens allowed for the seams around one file's text (the newline after the
#: file's head, and the joins on each side).
SEAM_TOKENS: Final = 5
#: How far back from a cut a word boundary is looked for.
_WORD_BACKOFF: Final = 200

Texts = Mapping[str, tuple[str, int]]


def note(shown: int, total: int) -> str:
    """What a cut document says where its text stops."""
    return f"[... document truncated: {shown:,} of {total:,} tokens shown]"


@dataclass(frozen=True)
class Measured:
    """A message's tokens with its files' text, and the fewest it can be cut to
    (``None``: it has no text to cut)."""

    tokens: int
    floor: int | None


def _documents(parts: Sequence[pb.ContentPart], texts: Texts) -> list[int]:
    """Indexes of the file parts with text."""
    return [
        index
        for index, part in enumerate(parts)
        if part.HasField("file") and part.file.file in texts and texts[part.file.file][0]
    ]


def _bare(parts: Sequence[pb.ContentPart]) -> list[pb.ContentPart]:
    """``parts`` without any file text."""
    bare: list[pb.ContentPart] = []
    for part in parts:
        if part.HasField("file") and part.file.text:
            copy = pb.ContentPart()
            copy.CopyFrom(part)
            copy.file.text = ""
            bare.append(copy)
        else:
            bare.append(part)
    return bare


def measure(
    counter: TokenCounter, parts: Sequence[pb.ContentPart], texts: Texts, image_tokens: int
) -> Measured:
    base = message_tokens(counter, _bare(parts), image_tokens)
    documents = _documents(parts, texts)
    if not documents:
        return Measured(base, None)
    whole = base
    floor = base
    for index in documents:
        total = texts[parts[index].file.file][1]
        whole += total + SEAM_TOKENS
        # The note with the most digits it can show is the dearest.
        floor += counter.count(note(total, total)) + SEAM_TOKENS
    return Measured(whole, min(floor, whole))


def fill(parts: Sequence[pb.ContentPart], texts: Texts) -> list[pb.ContentPart]:
    """``parts`` with each file's whole text filled in (copies where changed)."""
    filled: list[pb.ContentPart] = []
    for part in parts:
        if part.HasField("file") and part.file.file in texts:
            copy = pb.ContentPart()
            copy.CopyFrom(part)
            copy.file.text = texts[part.file.file][0]
            filled.append(copy)
        else:
            filled.append(part)
    return filled


def _prefix(counter: TokenCounter, text: str, total: int, budget: int) -> str:
    """A long prefix of ``text`` (ending at a word where one is near) that costs at
    most ``budget`` tokens; ``total`` is what all of ``text`` costs."""
    if budget <= 0 or not text:
        return ""
    # Start from the text's own density, then shrink in proportion to the excess.
    end = min(len(text), max(1, len(text) * budget // max(total, 1)))
    for _ in range(8):
        cost = counter.count(text[:end])
        if cost <= budget:
            break
        end = min(end - 1, end * budget // cost)
        if end <= 0:
            return ""
    else:
        return ""
    if end < len(text):
        space = text.rfind(" ", max(0, end - _WORD_BACKOFF), end)
        newline = text.rfind("\n", max(0, end - _WORD_BACKOFF), end)
        boundary = max(space, newline)
        if boundary > 0:
            end = boundary
    return text[:end].rstrip()


def cut(
    counter: TokenCounter,
    parts: Sequence[pb.ContentPart],
    texts: Texts,
    allowed: int,
    image_tokens: int,
) -> tuple[list[pb.ContentPart], int]:
    """``parts`` with their files' text filled in within ``allowed`` tokens (at
    least the message's floor), and the tokens they then take."""
    whole = measure(counter, parts, texts, image_tokens).tokens
    if whole <= allowed:
        return fill(parts, texts), whole
    base = message_tokens(counter, _bare(parts), image_tokens)
    documents = _documents(parts, texts)
    totals = {index: texts[parts[index].file.file][1] for index in documents}
    notes = {index: counter.count(note(totals[index], totals[index])) for index in documents}
    # What the texts may take beyond the message and every document's note.
    spare = allowed - base - sum(notes[i] + SEAM_TOKENS for i in documents)
    shaved = 0
    for _ in range(4):
        shown = _shown(counter, parts, texts, documents, totals, notes, spare - shaved)
        tokens = base + sum(cost + SEAM_TOKENS for _, cost in shown.values())
        if tokens <= allowed:
            return _with(parts, shown), tokens
        # A counter that costs a cut text more than its pieces: cut further.
        shaved += tokens - allowed
    shown = {
        index: (note(0, totals[index]), counter.count(note(0, totals[index])))
        for index in documents
    }
    return _with(parts, shown), base + sum(cost + SEAM_TOKENS for _, cost in shown.values())


def _shown(
    counter: TokenCounter,
    parts: Sequence[pb.ContentPart],
    texts: Texts,
    documents: list[int],
    totals: dict[int, int],
    notes: dict[int, int],
    spare: int,
) -> dict[int, tuple[str, int]]:
    """Each document's text as shown and its cost: whole while they fit, then
    one cut, then notes."""
    shown: dict[int, tuple[str, int]] = {}
    cutting = False
    for index in documents:
        text, total = texts[parts[index].file.file][0], totals[index]
        if cutting:
            empty = note(0, total)
            shown[index] = (empty, counter.count(empty))
            continue
        if total <= spare + notes[index]:
            shown[index] = (text, total)
            spare -= total - notes[index]
            continue
        cutting = True
        # The note's tokens are reserved already; the newline before it is not.
        prefix = _prefix(counter, text, total, spare - 1)
        kept = counter.count(prefix)
        shown_text = f"{prefix}\n{note(kept, total)}" if prefix else note(0, total)
        shown[index] = (shown_text, counter.count(shown_text))
    return shown


def _with(
    parts: Sequence[pb.ContentPart], shown: dict[int, tuple[str, int]]
) -> list[pb.ContentPart]:
    result: list[pb.ContentPart] = []
    for index, part in enumerate(parts):
        if index in shown:
            copy = pb.ContentPart()
            copy.CopyFrom(part)
            copy.file.text = shown[index][0]
            result.append(copy)
        else:
            result.append(part)
    return result
