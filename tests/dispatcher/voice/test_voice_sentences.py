"""Cutting an answer into sentences as it streams (dispatcher/voice/sentences.py)."""

from __future__ import annotations

import pytest

from switchboard.dispatcher.voice.sentences import MAX_CHARS, Piece, SentenceCutter

pytestmark = pytest.mark.unit


def cut(*deltas: str, **limits: int) -> list[Piece]:
    cutter = SentenceCutter(**limits)
    pieces: list[Piece] = []
    for delta in deltas:
        pieces += cutter.feed(delta)
    return pieces + cutter.finish()


def texts(pieces: list[Piece]) -> list[str]:
    return [p.text for p in pieces]


def test_sentences_are_cut_as_soon_as_their_end_is_certain() -> None:
    cutter = SentenceCutter()
    assert cutter.feed("The sky is blue") == []
    # "blue." could still become "blue.ish": not certain until the space.
    assert cutter.feed(".") == []
    first = cutter.feed(" Grass")
    assert texts(first) == ["The sky is blue."]
    assert cutter.feed(" is green! And") == [Piece("Grass is green!", 17, 32)]
    assert texts(cutter.finish()) == ["And"]


def test_positions_are_characters_of_the_whole_answer() -> None:
    answer = "  Héllo wörld, this is one. And here is the second one?\nThird line"
    pieces = cut(*answer)  # one character at a time
    assert texts(pieces) == [
        "Héllo wörld, this is one.",
        "And here is the second one?",
        "Third line",
    ]
    for piece in pieces:
        assert answer[piece.start : piece.end] == piece.text


def test_short_pieces_wait_for_the_next_boundary() -> None:
    assert texts(cut("Hi. I am the assistant. Ok.")) == ["Hi. I am the assistant.", "Ok."]
    assert texts(cut("1. Apples\n2. Pears and more\n")) == ["1. Apples\n2. Pears and more"]


def test_numbers_and_abbreviations_inside_words_are_not_boundaries() -> None:
    assert texts(cut("Pi is about 3.14159 in value, roughly. Next")) == [
        "Pi is about 3.14159 in value, roughly.",
        "Next",
    ]


def test_closing_quotes_stay_with_their_sentence() -> None:
    assert texts(cut('He said "stop right there." Then left')) == [
        'He said "stop right there."',
        "Then left",
    ]


def test_newline_is_a_boundary() -> None:
    assert texts(cut("A heading without a stop\nThe body follows here")) == [
        "A heading without a stop",
        "The body follows here",
    ]


def test_a_run_on_is_cut_at_a_comma_then_at_a_space() -> None:
    clause = "word " * 30 + "and so on, "
    pieces = cut(clause * 4)
    assert all(len(p.text) <= MAX_CHARS for p in pieces)
    assert all(p.text.endswith(",") for p in pieces[:-1])
    no_commas = cut("word " * 200)
    assert len(no_commas) > 1
    assert all(len(p.text) <= MAX_CHARS and p.text.endswith("word") for p in no_commas)
    solid = cut("x" * (MAX_CHARS * 2 + 5))
    assert [len(p.text) for p in solid] == [MAX_CHARS, MAX_CHARS, 5]


def test_blank_answers_give_nothing() -> None:
    assert cut("   \n\n  ") == []
    assert cut("") == []


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="min_chars"):
        SentenceCutter(min_chars=10, max_chars=5)


def test_a_stop_after_space_or_a_year_is_still_an_end() -> None:
    assert texts(cut("It ended in 1990. Then more came")) == ["It ended in 1990.", "Then more came"]
    assert texts(cut("Spaces before the stop  . And then")) == [
        "Spaces before the stop  .",
        "And then",
    ]
