"""The model's answers nested too deep (dispatcher/llm/stream.py, tools.py): a malformed
stream (another attempt may answer properly) or invalid arguments, never a RecursionError."""

from __future__ import annotations

import pytest

from switchboard.dispatcher.llm.conversation.tools import _arguments
from switchboard.dispatcher.llm.stream import (
    AttemptFailed,
    Outcome,
    error_detail,
    parse_chunk,
    parse_completion,
)

pytestmark = pytest.mark.unit

DEEP = "[" * 5000 + "]" * 5000
LIMIT = 1 << 22


def test_a_chunk_nested_too_deep_is_a_retryable_malformed_stream() -> None:
    chunk = '{"choices": [{"index": 0, "delta": {"content": "x", "extra": ' + DEEP + "}}]}"
    with pytest.raises(AttemptFailed) as failed:
        parse_chunk(chunk, Outcome(), LIMIT, ())
    assert failed.value.summary == "malformed stream (a chunk nested deeper than 24 levels)"
    assert failed.value.retryable


def test_a_whole_answer_nested_too_deep_is_a_malformed_stream() -> None:
    body = '{"choices": [{"message": {"content": "x"}, "extra": ' + DEEP + "}]}"
    with pytest.raises(AttemptFailed, match="the answer nested deeper than 24 levels"):
        parse_completion(body.encode(), Outcome(), LIMIT)
    with pytest.raises(AttemptFailed, match="not a chat completion"):
        parse_completion(b'{"choices": [', Outcome(), LIMIT)


def test_an_error_body_nested_too_deep_is_shown_as_text() -> None:
    body = ('{"error": {"message": ' + DEEP + "}}").encode()
    message, code = error_detail(body)
    assert (message, code) == (body.decode(), "")


def test_tool_call_arguments_nested_too_deep_are_invalid() -> None:
    assert _arguments('{"a": ' + DEEP + "}") is None
    shallow = _arguments('{"a": [[1]]}')
    assert shallow is not None
    assert shallow.fields["a"].list_value.values[0].list_value.values[0].number_value == 1
