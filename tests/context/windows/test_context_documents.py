"""A message's files as a window counts and shows them (context/windows/documents.py): the
text filled in, counted as a bound on what the handler reads, and cut to fit with
a visible note."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.text.tokencount import ApproxTokenCounter, message_tokens
from switchboard.context.windows.documents import Texts, cut, fill, measure, note

pytestmark = pytest.mark.unit

COUNTER = ApproxTokenCounter()
IMAGE_TOKENS = 765


def file_part(name: str, mime: str = "application/pdf") -> pb.ContentPart:
    return pb.ContentPart(
        file=pb.FileReference(
            file=f"workspaces/w/files/{name}", display_name=f"{name}.pdf", mime_type=mime
        )
    )


def texts_of(**documents: str) -> Texts:
    return {
        f"workspaces/w/files/{name}": (text, COUNTER.count(text))
        for name, text in documents.items()
    }


def test_a_message_without_file_text_counts_as_before() -> None:
    parts = [pb.ContentPart(text="What does it say?"), file_part("a")]
    measured = measure(COUNTER, parts, {}, IMAGE_TOKENS)
    assert measured.tokens == message_tokens(COUNTER, parts, IMAGE_TOKENS)
    assert measured.floor is None


def test_images_cost_the_fixed_estimate() -> None:
    parts = [pb.ContentPart(text="Look"), file_part("cat", "image/png")]
    with_images = measure(COUNTER, parts, {}, IMAGE_TOKENS).tokens
    assert with_images == measure(COUNTER, parts, {}, 0).tokens + IMAGE_TOKENS


def test_the_text_is_filled_in_and_rendered_after_the_files_head() -> None:
    parts = [pb.ContentPart(text="Summarize"), file_part("a")]
    texts = texts_of(a="Revenue grew by 12 percent.")
    filled = fill(parts, texts)
    assert filled[1].file.text == "Revenue grew by 12 percent."
    assert parts[1].file.text == ""  # the caller's parts are left alone
    measured = measure(COUNTER, parts, texts, IMAGE_TOKENS)
    assert measured.tokens >= message_tokens(COUNTER, filled, IMAGE_TOKENS)


def test_a_cut_document_shows_a_prefix_and_says_so() -> None:
    words = " ".join(f"word{n}" for n in range(2000))
    parts = [pb.ContentPart(text="Summarize"), file_part("a")]
    texts = texts_of(a=words)
    total = texts["workspaces/w/files/a"][1]
    shown, tokens = cut(COUNTER, parts, texts, 300, IMAGE_TOKENS)
    text = shown[1].file.text
    prefix, _, last = text.rpartition("\n")
    assert words.startswith(prefix)
    assert prefix.endswith(tuple(f"word{n}" for n in range(2000)))  # cut at a word
    assert last == note(COUNTER.count(prefix), total)
    assert "of " + f"{total:,}" + " tokens shown]" in last
    assert message_tokens(COUNTER, shown, IMAGE_TOKENS) <= tokens <= 300


@st.composite
def messages(draw: st.DrawFn) -> tuple[list[pb.ContentPart], Texts]:
    alphabet = st.sampled_from(list("abcdefgh 0123456789\n.,é中"))
    names = [f"d{i}" for i in range(draw(st.integers(min_value=1, max_value=3)))]
    parts = [pb.ContentPart(text=draw(st.text(alphabet, max_size=40)))]
    documents = {}
    for name in names:
        parts.append(file_part(name))
        documents[name] = draw(st.text(alphabet, max_size=600))
        if draw(st.booleans()):
            parts.append(pb.ContentPart(text=draw(st.text(alphabet, max_size=20))))
    return parts, texts_of(**documents)


@settings(max_examples=300, deadline=None)
@given(messages(), st.floats(min_value=0.0, max_value=1.0))
def test_cutting_stays_within_what_it_is_given(
    message: tuple[list[pb.ContentPart], Texts], share: float
) -> None:
    parts, texts = message
    measured = measure(COUNTER, parts, texts, IMAGE_TOKENS)
    # What the handler reads never costs more than what the window counted.
    whole = fill(parts, texts)
    assert message_tokens(COUNTER, whole, IMAGE_TOKENS) <= measured.tokens
    if measured.floor is None:
        return
    assert measured.floor <= measured.tokens
    allowed = measured.floor + int((measured.tokens - measured.floor) * share)
    shown, tokens = cut(COUNTER, parts, texts, allowed, IMAGE_TOKENS)
    assert message_tokens(COUNTER, shown, IMAGE_TOKENS) <= tokens <= allowed
    for before, after in zip(whole, shown, strict=True):
        if not before.HasField("file") or before.file.text == after.file.text:
            assert before == after
            continue
        # A cut text is a prefix of the whole, then the note.
        kept, _, last = after.file.text.rpartition("\n")
        assert last.startswith("[... document truncated: ")
        assert before.file.text.startswith(kept)
