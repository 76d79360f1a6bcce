"""The ``llm`` handler's parts through their own interfaces, without HTTP.

The handler's behaviour end to end (retries, fallback, tools, usage on the
result) is in ``test_llm.py`` and ``test_llm_tools.py``; these check that the
stream parser and the usage tally stand on their own, as the split promises.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence

import pytest

from switchboard.dispatcher.llm.stream import (
    AttemptFailed,
    Outcome,
    events,
    parse_chunk,
    parse_completion,
)
from switchboard.dispatcher.llm.usage import MESSAGE_OVERHEAD, Price, Tally, estimate_tokens

LIMIT = 1024 * 1024


def reader(pieces: Sequence[bytes]) -> Callable[[], Awaitable[bytes | None]]:
    """A body read piece by piece, as the client hands it to the parser."""
    remaining = list(pieces)

    async def read() -> bytes | None:
        return remaining.pop(0) if remaining else None

    return read


async def datas(pieces: Sequence[bytes], limit: int = LIMIT) -> list[str]:
    return [data async for data in events(reader(pieces), limit)]


async def test_events_join_lines_split_across_reads_and_skip_comments() -> None:
    pieces = [
        b": keep-alive\n\nda",
        b"ta: one\r\n",
        b"data: two\r\n\r\nevent: x\n",
        b"data: [DONE]",
    ]
    # The last event lacks its blank line: lenient servers end this way.
    assert await datas(pieces) == ["one\ntwo", "[DONE]"]


async def test_events_refuse_a_body_over_the_limit() -> None:
    with pytest.raises(AttemptFailed, match="larger than 10 bytes") as caught:
        await datas([b"data: 0123456789\n\n"], limit=10)
    assert caught.value.retryable


async def test_events_refuse_text_that_is_not_utf8() -> None:
    with pytest.raises(AttemptFailed, match="not UTF-8"):
        await datas([b"data: \xff\n\n"])


def test_chunks_give_text_finish_usage_and_call_fragments() -> None:
    outcome = Outcome()
    first = {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "content": "Hi",
                    "tool_calls": [
                        {"index": 0, "id": "c1", "function": {"name": "add", "arguments": '{"a"'}}
                    ],
                },
            }
        ]
    }
    second = {
        "choices": [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }
    assert parse_chunk(json.dumps(first), outcome, LIMIT, ()) == ["Hi"]
    assert parse_chunk(json.dumps(second), outcome, LIMIT, ()) == []
    assert outcome.finish_reason == "tool_calls"
    assert outcome.usage == (7, 3)
    [made] = outcome.tool_calls()
    assert (made.id, made.name, made.arguments) == ("c1", "add", '{"a": 1}')


def test_an_error_in_the_stream_is_retryable_and_scrubbed() -> None:
    data = json.dumps({"error": {"message": "bad key sk-secret-123"}})
    with pytest.raises(AttemptFailed) as caught:
        parse_chunk(data, Outcome(), LIMIT, ("sk-secret-123",))
    assert caught.value.retryable
    assert "sk-secret-123" not in caught.value.summary
    assert "[redacted]" in caught.value.summary


def test_a_whole_completion_is_read_as_one_answer() -> None:
    body = {
        "choices": [{"message": {"content": "Done."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2},
    }
    outcome = Outcome()
    assert parse_completion(json.dumps(body).encode(), outcome, LIMIT) == "Done."
    assert (outcome.finish_reason, outcome.usage, outcome.done) == ("stop", (5, 2), True)


def test_a_body_that_is_not_a_completion_is_malformed() -> None:
    with pytest.raises(AttemptFailed, match="malformed stream"):
        parse_completion(b'{"choices": []}', Outcome(), LIMIT)


def test_the_tally_sums_reported_usage_and_prices_it() -> None:
    tally = Tally(estimate_tokens)
    price = Price(input_per_mtok=1.0, output_per_mtok=2.0)
    for _ in range(2):
        tally.add(reported=(1000, 500), price=price, messages=(), tools=None, text="", calls=())
    usage = tally.usage("p/m")
    assert (usage.input_tokens, usage.output_tokens) == (2000, 1000)
    assert usage.estimated_cost_usd == pytest.approx(0.004)
    assert usage.cost_micros == 4000
    assert (usage.model, usage.estimated) == ("p/m", False)


def test_a_cost_in_micro_dollars_is_rounded_up() -> None:
    price = Price(input_per_mtok=0.15, output_per_mtok=0.6)
    # 0.15 * 7 + 0.6 * 3 = 2.85 micro-dollars: a budget counts 3.
    assert price.cost_micros(7, 3) == 3
    assert price.cost_micros(0, 0) == 0
    assert Price(input_per_mtok=0.7, output_per_mtok=0.0).cost_micros(10, 0) == 7
    assert Price(input_per_mtok=2.0, output_per_mtok=8.0).cost_micros(1_000_000, 0) == 2_000_000


def test_the_tally_estimates_what_was_not_reported() -> None:
    tally = Tally(estimate_tokens)
    tally.add(
        reported=None,
        price=None,
        messages=[{"role": "user", "content": "12345678"}],
        tools=None,
        text="abcd",
        calls=[("add", "{}")],
    )
    usage = tally.usage("p/m")
    assert usage.input_tokens == 2 + MESSAGE_OVERHEAD
    assert usage.output_tokens == 1 + 1 + 1
    assert usage.estimated
    assert usage.estimated_cost_usd == 0.0
