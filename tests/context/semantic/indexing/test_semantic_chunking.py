"""Cutting text into passages: sizes, boundaries, overlap, positions, the cap."""

from __future__ import annotations

import itertools
import random

import pytest

from switchboard.context.semantic.indexing.chunking import chunk_text

pytestmark = pytest.mark.unit


def test_short_text_is_one_passage_without_its_surrounding_space() -> None:
    chunks = chunk_text("  hello world \n", size=200, overlap=50, max_chunks=10)
    assert [(c.index, c.start, c.end, c.text) for c in chunks] == [(0, 2, 13, "hello world")]


def test_blank_text_has_no_passage() -> None:
    assert chunk_text(" \n\t ", size=200, overlap=0, max_chunks=10) == []
    assert chunk_text("", size=200, overlap=0, max_chunks=10) == []


def test_cuts_prefer_paragraphs_then_sentences_then_words() -> None:
    first = "A" * 10 + " " + "b" * 120 + "."
    text = f"{first}\n\nSecond paragraph, long enough to need its own passage. " * 2
    chunks = chunk_text(text, size=200, overlap=0, max_chunks=10)
    assert chunks[0].text == first
    sentences = "One sentence here. " * 20
    chunks = chunk_text(sentences, size=100, overlap=0, max_chunks=50)
    assert all(c.text.endswith(".") for c in chunks)
    words = " ".join(["word"] * 100)
    chunks = chunk_text(words, size=50, overlap=0, max_chunks=50)
    assert all(set(c.text.split()) == {"word"} for c in chunks)


def test_a_word_longer_than_half_a_passage_is_cut_inside() -> None:
    chunks = chunk_text("x" * 450, size=200, overlap=0, max_chunks=10)
    assert [len(c.text) for c in chunks] == [200, 200, 50]


@pytest.mark.parametrize("seed", range(20))
def test_positions_cover_the_text_with_overlap_and_within_the_size(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - a reproducible text, not a secret
    vocabulary = [
        "alpha",
        "beta.",
        "gamma,",
        "delta\n",
        "\n\n",
        "epsilon!",
        "zeta?",
        "ü",
        "日本語。",
    ]
    text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(50, 800)))
    size, overlap = rng.choice([(200, 0), (200, 50), (300, 120), (1000, 200)])
    chunks = chunk_text(text, size=size, overlap=overlap, max_chunks=10_000)
    assert chunks
    for index, chunk in enumerate(chunks):
        assert chunk.index == index
        assert text[chunk.start : chunk.end] == chunk.text
        assert 0 < len(chunk.text) <= size
        assert chunk.text == chunk.text.strip()
    assert text[: chunks[0].start].strip() == ""
    assert text[chunks[-1].end :].strip() == ""
    for left, right in itertools.pairwise(chunks):
        assert left.start < right.start
        # Nothing between two passages is left out (only whitespace may be).
        assert right.start <= left.end or text[left.end : right.start].strip() == ""
        if overlap:
            assert right.start < left.end or text[left.end : right.start].strip() == ""


def test_the_number_of_passages_is_capped() -> None:
    text = " ".join(["word"] * 10_000)
    chunks = chunk_text(text, size=200, overlap=50, max_chunks=7)
    assert len(chunks) == 7
    assert chunks[-1].end < len(text)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        chunk_text("text", size=0, overlap=0, max_chunks=1)
