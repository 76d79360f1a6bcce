"""The ``llm`` handler's parts through their own interfaces, without HTTP.

The handler's behaviour end to end (retries, fallback, tools, usage on the
result) is in ``test_llm.py`` and ``test_llm_tools.py``; these check that the
stream parser and the usage tally stand on their own, as the split promises.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchboard.dispatcher.llm.stream import (
    AttemptFailed,
    Outcome,
    events,
    parse_chunk,
    parse_completion,
)
from switchboard.dispatcher.llm.usage import MESSAGE_OVERHEAD, Price, Tally, estimate_tokens

pytestmark = pytest.mark.unit

LIMIT = 1024 * 1024


def reader(pieces: Sequence[bytes]) -> Callable[[], Awaitable[bytes | None]]:
    """A body read piece by piece, as the client hands it to the parser."""
    remaining = list(pieces)

    async def read() -> bytes | None:
        return remaining.pop(0) if remaining else None

    return read


async def datas(pieces: Sequence[bytes], limit: int = LIMIT) -> list[bytes]:
    return [data async for data in events(reader(pieces), limit)]


async def test_events_join_lines_split_across_reads_and_skip_comments() -> None:
    pieces = [
        b": keep-alive\n\nda",
        b"ta: one\r\n",
        b"data: two\r\n\r\nevent: x\n",
        b"data: [DONE]",
    ]
    # The last event lacks its blank line: lenient servers end this way.
    assert await datas(pieces) == [b"one\ntwo", b"[DONE]"]


async def test_events_whole_in_one_read_are_each_given() -> None:
    # One read, many events (a fast model): one-line events, a comment, several lines.
    body = b"data: a\n\n: ping\n\ndata:b\n\n\n\ndata: c\ndata: d\n\ndata:\n\nid: 7\ndata: e\n\n"
    assert await datas([body]) == [b"a", b"b", b"c\nd", b"", b"e"]
    assert await datas([body.replace(b"\n", b"\r\n")]) == [b"a", b"b", b"c\nd", b"", b"e"]


async def test_events_cut_anywhere_read_as_one_body() -> None:
    body = b'data: {"a": 1}\n\ndata: {"b": 2}\n\n: keep-alive\n\ndata: [DONE]\n\n'
    for cut in range(1, len(body)):
        assert await datas([body[:cut], body[cut:]]) == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]
    assert await datas([bytes([byte]) for byte in body]) == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]


async def test_events_refuse_a_body_over_the_limit() -> None:
    with pytest.raises(AttemptFailed, match="larger than 10 bytes") as caught:
        await datas([b"data: 0123456789\n\n"], limit=10)
    assert caught.value.retryable


@pytest.mark.parametrize(
    "pieces",
    [[b"data: \xff\n\n"], [b"data: \xff\n", b"\n"], [b"data: a\ndata: \xc3\n\n"]],
)
async def test_events_refuse_text_that_is_not_utf8(pieces: list[bytes]) -> None:
    with pytest.raises(AttemptFailed, match="not UTF-8"):
        await datas(pieces)


async def test_events_take_utf8_text_and_a_last_event_as_it_comes() -> None:
    assert await datas(["data: é\n\n".encode()]) == ["é".encode()]
    # A last event without its blank line is read leniently, as it was.
    assert await datas([b"data: \xff"]) == ["\N{REPLACEMENT CHARACTER}".encode()]


def sse_rules(body: bytes) -> list[bytes] | str:
    """The events of ``body`` line by line, as the SSE rules read them (and as the parser
    read them before it cut whole events from a read): the reference."""
    found: list[bytes] = []
    data: list[bytes] = []
    *lines, tail = body.split(b"\n")
    for raw in lines:
        line = raw.rstrip(b"\r")
        if not line:
            if data:
                found.append(b"\n".join(data))
                data = []
            continue
        name, _, value = line.partition(b":")
        if name == b"data":
            value = value.removeprefix(b" ")
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return "not UTF-8"
            data.append(value)
    tail = tail.rstrip(b"\r")
    if tail.startswith(b"data:"):
        data.append(tail[5:].removeprefix(b" ").decode("utf-8", "replace").encode())
    if data:
        found.append(b"\n".join(data))
    return found


_LINES = st.lists(
    st.sampled_from(
        [
            *(b"data: x", b"data:{}", b"data:", b"data: \xc3\xa9", b"data: \xff", b": ping"),
            *(b"id: 1", b"event: e", b"", b"\r", b"data: a\r", b"dat", b"a: y"),
        ]
    ),
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(_LINES, st.booleans(), st.lists(st.integers(0, 200), max_size=6))
async def test_events_read_every_body_as_the_sse_rules_do_however_it_is_cut(
    lines: list[bytes], ended: bool, cuts: list[int]
) -> None:
    body = b"\n".join(lines) + (b"\n\n" if ended else b"")
    marks = sorted({0, len(body), *(cut % (len(body) + 1) for cut in cuts)})
    pieces = [body[a:b] for a, b in itertools.pairwise(marks) if b > a]
    try:
        read: list[bytes] | str = await datas(pieces)
    except AttemptFailed as failed:
        read = "not UTF-8" if "not UTF-8" in failed.summary else failed.summary
    assert read == sse_rules(body)


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
