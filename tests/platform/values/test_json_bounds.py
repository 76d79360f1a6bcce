"""The bounded JSON parser (platform/values/jsonbounds.py): limits checked before anything recurses.

The verdicts are held against a reference: the standard library's pure-Python
scanner with its object and array parsers wrapped to count how deep a strict
parser actually gets into a text before it ends or fails. Whatever the scan
accepts, the parser never goes deeper than the limit (soundness, on arbitrary
texts and streams of server-sent events); on valid documents the verdict is
exact.
"""

from __future__ import annotations

import contextlib
import json
import json.scanner
import math
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
from google.protobuf import json_format, struct_pb2, wrappers_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from switchboard.api.context.v1 import context_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.platform.values import jsonbounds
from switchboard.platform.values.jsonbounds import MAX_DEPTH, JsonRejected, StreamGauge

pytestmark = pytest.mark.unit

MIB = 1 << 20


def nested_objects(depth: int, key: str = "params") -> str:
    return f'{{"{key}":' * depth + "1" + "}" * depth


def nested_lists(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def depth_of(value: Any) -> int:
    """Levels of arrays and objects in a parsed value (iteratively)."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth) for child in children)
    return deepest


def reached_depth(text: str) -> int:
    """How deep a strict parser gets into ``text`` before it ends or fails."""
    deepest = depth = 0
    decoder = json.JSONDecoder()

    def counted(parse: Callable[..., Any]) -> Callable[..., Any]:
        def parse_counted(*args: Any) -> Any:
            nonlocal deepest, depth
            depth += 1
            deepest = max(deepest, depth)
            try:
                return parse(*args)
            finally:
                depth -= 1

        return parse_counted

    decoder.parse_object = counted(decoder.parse_object)  # type: ignore[attr-defined]
    decoder.parse_array = counted(decoder.parse_array)  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    with contextlib.suppress(ValueError):
        decoder.decode(text)
    return deepest


def verdict(check: Callable[[], None]) -> str | None:
    try:
        check()
    except JsonRejected as rejected:
        return rejected.problem
    return None


# -- the cases of the issue ------------------------------------------------------------------


def test_a_mebibyte_of_brackets_is_too_deep_not_a_recursion_error() -> None:
    with pytest.raises(JsonRejected) as found:
        jsonbounds.loads(b"[" * MIB, max_bytes=MIB)
    assert found.value.problem == "depth"
    assert str(found.value) == f"nested deeper than {MAX_DEPTH} levels"
    # The same text one byte longer is refused for its size first.
    with pytest.raises(JsonRejected, match=f"larger than {MIB} bytes"):
        jsonbounds.loads(b"[" * MIB + b"]", max_bytes=MIB)


def test_params_nested_five_thousand_objects_deep_are_refused() -> None:
    card = '{"name": "agent", "capabilities": {"extensions": [{"params": %s}]}}'
    with pytest.raises(JsonRejected, match="nested deeper than 24 levels"):
        jsonbounds.loads(card % nested_objects(5000), max_bytes=MIB)
    # The standard parser recurses into the same text and fails with no answer at all.
    with pytest.raises(RecursionError):
        json.loads(card % nested_objects(5000))


def test_the_limit_is_exact() -> None:
    assert jsonbounds.loads(json.dumps(nested_lists(MAX_DEPTH)), max_bytes=MIB) == nested_lists(
        MAX_DEPTH
    )
    with pytest.raises(JsonRejected):
        jsonbounds.loads(json.dumps(nested_lists(MAX_DEPTH + 1)), max_bytes=MIB)
    assert jsonbounds.loads(nested_objects(3), max_bytes=100, max_depth=3) == {
        "params": {"params": {"params": 1}}
    }
    with pytest.raises(JsonRejected):
        jsonbounds.loads(nested_objects(4), max_bytes=100, max_depth=3)


def test_brackets_in_strings_do_not_count() -> None:
    text = json.dumps({"a": "[" * 5000, "b": ['"\\[' * 100, "{}}}" * 50]})
    assert jsonbounds.loads(text, max_bytes=MIB) == json.loads(text)
    # An escaped backslash ends before the quote that closes the string.
    assert jsonbounds.loads('["\\\\", "[[["]', max_bytes=100, max_depth=1) == ["\\", "[[["]


def test_size_counts_utf8_bytes_of_text() -> None:
    assert jsonbounds.loads('"' + "é" * 10 + '"', max_bytes=22) == "é" * 10
    with pytest.raises(JsonRejected, match="larger than 21 bytes"):
        jsonbounds.loads('"' + "é" * 10 + '"', max_bytes=21)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"a":', "not valid JSON (line 1 column 6)"),
        ('{"key": "secret-value"', "not valid JSON (line 1 column 23)"),
        (b"\xff\xfe\x00", "not valid JSON"),
        ("9" * 5000, "not valid JSON (a value out of range)"),
    ],
)
def test_syntax_errors_name_a_position_never_the_text(text: str | bytes, reason: str) -> None:
    with pytest.raises(JsonRejected) as found:
        jsonbounds.loads(text, max_bytes=MIB)
    assert found.value.problem == "syntax"
    assert str(found.value).startswith(reason)
    assert "secret" not in str(found.value)


@pytest.mark.parametrize(
    "text",
    [
        '{"a":',
        '{"key": "secret-value"',
        b"\xff\xfe\x00",
        "9" * 5000,
        "[" * 30 + "]" * 30,
        b'{"a": 1} x',
        b"x" * (MIB + 1),
        # Not JSON to either: NaN and the infinities, and a number past a double's range.
        "[NaN]",
        '{"a": Infinity}',
        "[-Infinity]",
        b"[1e400]",
        "-1e999",
        "[1" + "0" * 400 + ".5]",
    ],
)
def test_loads_fast_rejects_what_loads_rejects_for_the_same_reason(text: str | bytes) -> None:
    with pytest.raises(JsonRejected) as slow:
        jsonbounds.loads(text, max_bytes=MIB)
    with pytest.raises(JsonRejected) as fast:
        jsonbounds.loads_fast(text, max_bytes=MIB)
    assert (fast.value.problem, str(fast.value)) == (slow.value.problem, str(slow.value))


@pytest.mark.parametrize(
    "text",
    [
        b'{"id": "c", "choices": [{"index": 0, "delta": {"content": "\xc3\xa9"}}], "usage": null}',
        '{"a": 1, "a": [0.1, -0.0, 1e308, true, null, "\\u00e9\\n"]}',
        # What orjson refuses and json reads: read as json reads them.
        '"\\ud800"',
        b'"\xed\xa0\x80"',
        b"\xef\xbb\xbf{}",
        '{"a": 1}'.encode("utf-16"),
        bytearray(b"[1]"),
    ],
)
def test_loads_fast_reads_what_loads_reads(text: str | bytes | bytearray) -> None:
    assert repr(jsonbounds.loads_fast(text, max_bytes=MIB)) == repr(
        jsonbounds.loads(text, max_bytes=MIB)
    )


_ANY_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=30,
)


def _read(load: Callable[[], Any]) -> str:
    try:
        return repr(load())
    except JsonRejected as rejected:
        return f"{rejected.problem}: {rejected}"


@settings(max_examples=300, deadline=None)
@given(_ANY_VALUES, st.booleans())
def test_loads_fast_gives_the_values_loads_gives(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert _read(lambda: jsonbounds.loads_fast(text, max_bytes=MIB)) == _read(
        lambda: jsonbounds.loads(text, max_bytes=MIB)
    )


def test_a_rejection_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="nested deeper"):
        jsonbounds.loads("[[[", max_bytes=10, max_depth=2)


def test_what_is_accepted_survives_every_recursive_walker() -> None:
    """At the limit, a value can be validated, made a Struct and read back inside the
    deepest envelope the API has (a tool call's arguments in an event stream)."""
    value = jsonbounds.loads(nested_objects(MAX_DEPTH), max_bytes=MIB)
    jsonbounds.check_value(value)
    jsonschema.validate(value, {"type": "object", "properties": {"params": {"type": "object"}}})
    struct = struct_pb2.Struct()
    struct.update(value)
    jsonbounds.check_message(struct)
    assert json_format.MessageToDict(struct) == value
    event = events_pb2.Event()
    call = event.run_updated.update.state_change.run.required_action.tool_calls.add().call
    call.arguments.CopyFrom(struct)
    response = events_pb2.StreamResponse()
    response.events.batch.events.append(event)
    assert events_pb2.StreamResponse.FromString(response.SerializeToString()) == response


# -- parsed values and messages --------------------------------------------------------------


def test_check_value_walks_without_recursion() -> None:
    deep = nested_lists(sys.getrecursionlimit() * 5)
    with pytest.raises(JsonRejected, match="nested deeper than 24 levels"):
        jsonbounds.check_value(deep)
    jsonbounds.check_value({"a": nested_lists(MAX_DEPTH - 1), "b": "x" * 10})
    jsonbounds.check_value(None)
    jsonbounds.check_value("[[[[")


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def test_check_message_counts_json_levels_of_structs_in_any_field() -> None:
    ok = _struct({"a": nested_lists(MAX_DEPTH - 1)})
    deep = _struct({"a": nested_lists(MAX_DEPTH)})
    jsonbounds.check_message(ok)
    with pytest.raises(JsonRejected, match="nested deeper"):
        jsonbounds.check_message(deep)
    # Inside a message, in a repeated field, in a oneof: only JSON levels count.
    frame = handler_pb2.HandleResponse(
        result=handler_pb2.HandleResult(
            parts=[context_pb2.ContentPart(text="hi"), context_pb2.ContentPart(data=ok)]
        )
    )
    jsonbounds.check_message(frame)
    frame.result.parts.add().data.CopyFrom(deep)
    with pytest.raises(JsonRejected):
        jsonbounds.check_message(frame)
    call = handler_pb2.HandleResponse(tool_call=handler_pb2.ToolCall(id="c"))
    call.tool_call.arguments.CopyFrom(deep)
    with pytest.raises(JsonRejected):
        jsonbounds.check_message(call)


# -- numbers that are not finite -------------------------------------------------------------

NOT_FINITE = (math.nan, math.inf, -math.inf)


@pytest.mark.parametrize("number", NOT_FINITE)
def test_check_value_refuses_a_float_that_is_not_finite(number: float) -> None:
    jsonbounds.check_value({"a": [1, 1e308, -0.0, "NaN", None, True]})
    for value in (number, [number], {"a": {"b": [0, number]}}):
        with pytest.raises(JsonRejected) as found:
            jsonbounds.check_value(value)
        assert found.value.problem == "number"
        assert str(found.value) == jsonbounds.NOT_FINITE


@pytest.mark.parametrize("number", NOT_FINITE)
def test_check_message_refuses_it_in_a_value_and_in_a_double_field(number: float) -> None:
    jsonbounds.check_message(_struct({"a": [1.5, {"b": 1e308}], "c": "NaN"}))
    with pytest.raises(JsonRejected, match="not finite"):
        jsonbounds.check_message(_struct({"a": [1.5, {"b": number}]}))
    bare = struct_pb2.Value(number_value=number)
    with pytest.raises(JsonRejected, match="not finite"):
        jsonbounds.check_message(bare)
    # A double field of a plain message, any depth down.
    request = handler_pb2.HandleRequest()
    request.model.temperature = number
    with pytest.raises(JsonRejected, match="not finite"):
        jsonbounds.check_message(request)
    # Well-known wrappers are double fields too.
    with pytest.raises(JsonRejected, match="not finite"):
        jsonbounds.check_message(wrappers_pb2.DoubleValue(value=number))
    with pytest.raises(JsonRejected, match="not finite"):
        jsonbounds.check_message(wrappers_pb2.FloatValue(value=number))


def _path(message: Any) -> str:
    found = jsonbounds.locate(message)
    assert found is not None
    assert found[1].problem == "number"
    return found[0]


def test_locate_names_the_path_to_the_first_number_in_field_order() -> None:
    message = context_pb2.Message(
        parts=[context_pb2.ContentPart(text="hi"), context_pb2.ContentPart(data=_struct({}))]
    )
    assert jsonbounds.locate(message) is None
    message.parts[1].data.update({"z": 1, "big": math.inf, "n": math.nan})
    # Keys in order: "big" before "n".
    assert _path(message) == "parts[1].data.big"
    message.metadata.update({"a": [0, {"b c": [1, -math.inf]}], "é": math.nan})
    # Fields in declaration order: parts before metadata.
    assert _path(message) == "parts[1].data.big"
    message.parts[1].data.Clear()
    assert _path(message) == 'metadata.a[1]["b c"][1]'
    message.metadata["a"] = 1
    assert _path(message) == 'metadata["é"]'
    # A key as long as a request is cut where the path repeats it.
    message.metadata.Clear()
    message.metadata.update({"x" * 1000 + " ": math.nan})
    assert _path(message) == 'metadata["' + "x" * 64 + '"]'
    request = handler_pb2.HandleRequest()
    request.model.top_p = math.nan
    assert _path(request) == "model.top_p"


def test_locate_names_a_value_too_deep_and_agrees_with_check_message() -> None:
    deep = _struct({"a": nested_lists(MAX_DEPTH)})
    found = jsonbounds.locate(deep)
    assert found is not None
    assert found[1].problem == "depth"
    assert found[0].startswith("a[0][0]")


@settings(max_examples=200, deadline=None)
@given(_ANY_VALUES.filter(lambda value: isinstance(value, dict)))
def test_locate_finds_a_problem_exactly_when_check_message_refuses(value: dict[str, Any]) -> None:
    struct = struct_pb2.Struct()
    try:
        struct.update(value)
    except (OverflowError, ValueError):
        return  # an integer past a double: protobuf's own refusal
    refused = verdict(lambda: jsonbounds.check_message(struct))
    found = jsonbounds.locate(struct)
    if refused is None:
        assert found is None
    else:
        assert found is not None
        # Either problem may come first; the one found is one the check refuses for.
        assert found[1].problem in ("number", refused)


def test_checks_says_which_messages_the_walk_looks_into() -> None:
    assert jsonbounds.checks(context_pb2.Message.DESCRIPTOR)
    assert jsonbounds.checks(handler_pb2.ModelSettings.DESCRIPTOR)
    assert not jsonbounds.checks(context_pb2.GetMessageRequest.DESCRIPTOR)


def test_nonfinite_values_are_the_values_themselves() -> None:
    event = events_pb2.Event()
    data = event.message_created.message.parts.add().data
    data.update({"n": math.nan, "l": [1, math.inf, {"x": -math.inf}], "ok": 2})
    found = jsonbounds.nonfinite_values(event)
    assert len(found) == 3
    for value in found:
        value.null_value = struct_pb2.NULL_VALUE  # type: ignore[attr-defined]
    assert jsonbounds.nonfinite_values(event) == []
    assert json_format.MessageToDict(data) == {"n": None, "l": [1.0, None, {"x": None}], "ok": 2.0}


# -- streams ---------------------------------------------------------------------------------


def _pieces(data: bytes, rng: random.Random) -> Iterator[bytes]:
    start = 0
    while start < len(data):
        end = start + rng.randint(1, 40)
        yield data[start:end]
        start = end


def _fed(data: bytes, seed: int = 0, max_line_bytes: int = MIB, max_depth: int = MAX_DEPTH) -> None:
    gauge = StreamGauge(max_line_bytes=max_line_bytes, max_depth=max_depth)
    for piece in _pieces(data, random.Random(seed)):  # noqa: S311 - where to cut, no secret
        gauge.feed(piece)
    gauge.close()


def test_a_stream_of_events_each_within_the_limit_passes() -> None:
    event = b"data: " + json.dumps({"result": nested_lists(MAX_DEPTH - 1)}).encode() + b"\n\n"
    _fed(b"event: message\nid: 1\n" + event * 50)


def test_a_deep_event_is_refused_however_the_stream_is_cut() -> None:
    event = b"data: " + json.dumps({"result": nested_lists(MAX_DEPTH)}).encode() + b"\n\n"
    for seed in range(10):
        with pytest.raises(JsonRejected, match="nested deeper"):
            _fed(b"data: {}\n\n" + event, seed)


def test_a_whole_body_on_one_line_is_measured_when_it_ends() -> None:
    gauge = StreamGauge(max_line_bytes=MIB)
    gauge.feed(b"[" * (MAX_DEPTH + 1))
    with pytest.raises(JsonRejected):
        gauge.close()


def test_a_line_longer_than_the_limit_is_refused_before_it_ends() -> None:
    gauge = StreamGauge(max_line_bytes=100)
    gauge.feed(b"data: " + b"1" * 90)
    with pytest.raises(JsonRejected, match="larger than 100 bytes"):
        gauge.feed(b"1" * 10)
    with pytest.raises(JsonRejected, match="larger than 100 bytes"):
        StreamGauge(max_line_bytes=100).feed(b"x" * 200 + b"\n")


def test_a_broken_event_does_not_hide_the_next_one() -> None:
    """Closes with nothing open, an unclosed string: the next event is measured from zero."""
    deep = b"data: " + b"[" * (MAX_DEPTH + 1) + b"\n\n"
    for broken in (b"data: ]]]]]]]]\n\n", b'data: "abc\n\n', b'data: ]]]] "x\n\n'):
        with pytest.raises(JsonRejected):
            _fed(broken + deep)


# -- soundness and exactness against the reference parser -----------------------------------

_TRICKY = st.text(alphabet='ab[]{}"\\/: \t', max_size=12)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | _TRICKY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY, inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.sampled_from([None, 1]), st.booleans(), st.integers(0, 8))
def test_on_valid_documents_the_verdict_is_exact(
    value: Any, indent: int | None, ascii_only: bool, limit: int
) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    deep = depth_of(value) > limit
    assert (verdict(lambda: jsonbounds.check_text(text, max_bytes=MIB, max_depth=limit))) == (
        "depth" if deep else None
    )
    events = b"".join(b"data: " + line.encode() + b"\n" for line in text.split("\n")) + b"\n"
    assert verdict(lambda: _fed(events * 2, limit, max_depth=limit)) == ("depth" if deep else None)


_SOUP = st.text(alphabet='[]{}",:\\ 1a\n', max_size=120)


@settings(max_examples=1500, deadline=None)
@given(_SOUP, st.integers(0, 4))
def test_whatever_the_scan_accepts_no_parser_goes_deeper(text: str, limit: int) -> None:
    if verdict(lambda: jsonbounds.check_text(text, max_bytes=MIB, max_depth=limit)) is None:
        assert reached_depth(text) <= limit


@settings(max_examples=800, deadline=None)
@given(
    st.lists(st.lists(st.text(alphabet='[]{}",:\\ 1a', max_size=30), min_size=1, max_size=3)),
    st.integers(0, 4),
    st.integers(0, 1000),
)
def test_whatever_the_gauge_accepts_no_event_goes_deeper(
    events: list[list[str]], limit: int, seed: int
) -> None:
    """A consumer that goes on after a bad event (MCP's SDK does) parses each event
    on its own: none of them may get deeper than the limit."""
    stream = b"".join(
        b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n" for lines in events
    )
    if verdict(lambda: _fed(stream, seed, max_depth=limit)) is None:
        for lines in events:
            assert reached_depth("\n".join(lines)) <= limit
