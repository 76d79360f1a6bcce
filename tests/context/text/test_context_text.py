"""Text utilities of the context service: token counting, rendering, entities,
full-text query building and plugin loading."""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from switchboard.api.context.v1 import context_pb2
from switchboard.context.text.entities import (
    MAX_ENTITIES_PER_MESSAGE,
    BuiltinEntityExtractor,
    Entity,
)
from switchboard.context.text.fulltext import (
    MAX_QUERY_TERMS,
    fts5_match,
    pg_tsquery,
    query_terms,
)
from switchboard.context.text.plugins import (
    BUILTIN_ENTITY_EXTRACTORS,
    BUILTIN_SUMMARIZERS,
    BUILTIN_TOKENIZERS,
    ENTITY_EXTRACTORS,
    SUMMARIZERS,
    TOKENIZERS,
    load_entity_extractor,
    load_summarizer,
    load_token_counter,
)
from switchboard.context.text.summarizer import ExtractiveSummarizer
from switchboard.context.text.tokencount import (
    MESSAGE_OVERHEAD,
    ApproxTokenCounter,
    TokenCounter,
    message_tokens,
)
from switchboard.platform.plugins import load_plugin
from switchboard.shared.parttext import render_parts, render_parts_briefly

pytestmark = pytest.mark.unit

COUNTER = ApproxTokenCounter()

# --- token counting ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        (" ", 0),
        ("hello", 1),
        ("hello world", 2),
        # Long words cost a token per 5 letters; digits go in groups of 3.
        ("internationalization", 4),
        ("12345", 2),
        ("create_server", 3),
        # Each punctuation character costs one.
        ("a, b.", 4),
        ("\n", 1),
        # A newline and its indentation merge: 9 whitespace characters cost 2.
        ("def f():\n        return 1", 10),
        # Non-ASCII: a token per character.
        ("日本語", 3),
        ("The quick brown fox jumps over the lazy dog.", 10),
    ],
)
def test_token_counts(text: str, tokens: int) -> None:
    assert COUNTER.count(text) == tokens


def test_the_counter_is_named_for_cache_keys() -> None:
    assert COUNTER.name == "approx-v1"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.text(max_size=200))
def test_token_counts_are_monotone_and_nearly_additive(a: str, b: str) -> None:
    together = COUNTER.count(a + b)
    # Adding text never lowers the count, and joining two texts merges at most
    # one run across the seam (costing at most one extra token).
    assert max(COUNTER.count(a), COUNTER.count(b)) <= together
    assert together <= COUNTER.count(a) + COUNTER.count(b) + 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_token_counts_are_bounded_by_length(text: str) -> None:
    tokens = COUNTER.count(text)
    assert tokens <= len(text)
    # At most 5 characters per token, whitespace aside.
    assert 5 * tokens >= len(re.sub(r"[ \t\n\r\f\v]", "", text))


def text_part(text: str) -> context_pb2.ContentPart:
    return context_pb2.ContentPart(text=text)


def test_render_parts_renders_each_kind() -> None:
    data = struct_pb2.Struct()
    data.update({"zeta": 3, "alpha": {"b": [1.5, "é", None, True]}, "count": -2})
    parts = [
        text_part("Here is the result:"),
        context_pb2.ContentPart(data=data),
        context_pb2.ContentPart(
            file=context_pb2.FileReference(uri="https://files.example/a.png", mime_type="image/png")
        ),
        # A part with nothing set carries nothing.
        context_pb2.ContentPart(),
    ]
    assert render_parts(parts) == (
        "Here is the result:\n"
        '{"alpha":{"b":[1.5,"é",null,true]},"count":-2,"zeta":3}\n'
        "[file image/png https://files.example/a.png]"
    )


def test_render_parts_writes_a_number_json_cannot_hold_as_null() -> None:
    # Refused in requests now (docs/contracts.md); a Struct stored before may hold one.
    data = struct_pb2.Struct()
    data.update({"x": math.nan, "big": 1e300})
    assert render_parts([context_pb2.ContentPart(data=data)]) == '{"big":1e+300,"x":null}'


TOOL = "workspaces/w1/integrations/weather/tools/forecast"


def tool_call(
    call_id: str, function_name: str = "", tool: str = "", **arguments: Any
) -> context_pb2.ContentPart:
    args = struct_pb2.Struct()
    args.update(arguments)
    return context_pb2.ContentPart(
        tool_call=context_pb2.ToolCallContent(
            id=call_id, tool=tool, function_name=function_name, arguments=args
        )
    )


def tool_result(
    call_id: str, outcome: str, text: str = "", tool: str = ""
) -> context_pb2.ContentPart:
    return context_pb2.ContentPart(
        tool_result=context_pb2.ToolResultContent(id=call_id, tool=tool, outcome=outcome, text=text)
    )


def test_render_parts_renders_tool_calls_and_results() -> None:
    parts = [
        text_part("Checking."),
        tool_call("call_1", "forecast", TOOL, days=3, city="Zürich"),
        # Named by its tool when the model gave no function name; no arguments.
        tool_call("call_2", tool=TOOL),
    ]
    assert render_parts(parts) == (
        f'Checking.\n[tool call forecast({{"city":"Zürich","days":3}})]\n[tool call {TOOL}({{}})]'
    )
    assert render_parts([tool_result("call_1", "succeeded", "Sunny.\nWarm.", TOOL)]) == (
        f"[tool result {TOOL}: succeeded]\nSunny.\nWarm."
    )
    # No tool, no text: just the outcome line.
    assert render_parts([tool_result("call_1", "denied")]) == "[tool result: denied]"


def test_render_parts_briefly_keeps_what_happened_without_payloads() -> None:
    parts = [
        text_part("Checking."),
        tool_call("call_1", "forecast", TOOL, city="Zürich"),
        tool_result("call_1", "failed", "a long traceback", TOOL),
        context_pb2.ContentPart(),
    ]
    assert render_parts_briefly(parts) == (
        f"Checking.\n[tool call forecast]\n[tool result {TOOL}: failed]"
    )
    # Everything else renders as render_parts does.
    others = [text_part("a"), context_pb2.ContentPart(data=struct_pb2.Struct())]
    assert render_parts_briefly(others) == render_parts(others) == "a\n{}"


def test_tool_text_and_arguments_cost_tokens() -> None:
    short = [tool_result("c", "succeeded", "ok")]
    long = [tool_result("c", "succeeded", "ok " * 50)]
    assert message_tokens(COUNTER, long) > message_tokens(COUNTER, short) + 40
    assert message_tokens(COUNTER, [tool_call("c", "f", city="Oslo")]) > message_tokens(
        COUNTER, [tool_call("c", "f")]
    )


def test_message_tokens_adds_the_framing() -> None:
    parts = [text_part("hello"), text_part("world")]
    assert message_tokens(COUNTER, parts) == COUNTER.count("hello\nworld") + MESSAGE_OVERHEAD
    assert message_tokens(COUNTER, []) == MESSAGE_OVERHEAD


# --- entities ---------------------------------------------------------------

EXTRACTOR = BuiltinEntityExtractor()


def found(text: str) -> list[tuple[str, str]]:
    return [(e.kind, e.value) for e in EXTRACTOR.extract(text)]


@pytest.mark.parametrize(
    ("text", "entities"),
    [
        ("ask @Ada_L, then @grace.hopper.", [("mention", "ada_l"), ("mention", "grace.hopper")]),
        (
            "see https://Example.COM/Docs/Page_(x)), or (https://x.org/a?b=1#c).",
            [("link", "https://example.com/Docs/Page_(x)"), ("link", "https://x.org/a?b=1#c")],
        ),
        ("HTTP://Example.com; ftp://not.this", [("link", "http://example.com")]),
        ("mail Ada.Lovelace+x@Example.co.UK.", [("email", "ada.lovelace+x@example.co.uk")]),
        ("not emails: a@localhost, a@b.c1, @b.com", [("mention", "b.com")]),
        ("due 2026-11-22!", [("date", "2026-11-22")]),
        ("on 2 Nov 2026 and 3rd December, 2026", [("date", "2026-11-02"), ("date", "2026-12-03")]),
        ("by Nov 22, 2026 or Sept. 1 2027", [("date", "2026-11-22"), ("date", "2027-09-01")]),
        ("November 22 2026", [("date", "2026-11-22")]),
        # Impossible dates are not dates.
        ("2026-02-30, 31 Apr 2026, Feb 29 2027, 2026-13-01", []),
        ("Feb 29 2028", [("date", "2028-02-29")]),
        # Not dates: too many digits, or a month inside a word.
        ("12026-11-22, 2026-11-223, 22 Novel 2026, 1 Marching 2026", []),
    ],
)
def test_entities_of_each_kind(text: str, entities: list[tuple[str, str]]) -> None:
    assert found(text) == entities


def test_an_email_address_does_not_yield_a_mention() -> None:
    assert found("write to bob@example.com or @bob@example.org") == [
        ("email", "bob@example.com"),
        ("email", "bob@example.org"),
    ]


def test_text_inside_a_link_is_not_an_entity_of_its_own() -> None:
    assert found("https://social.example/@ada/2026-11-22?to=bob@example.com") == [
        ("link", "https://social.example/@ada/2026-11-22?to=bob@example.com")
    ]


def test_entities_are_deduplicated_in_order_of_first_occurrence() -> None:
    entities = EXTRACTOR.extract("@Ada met @bob on 22 Nov 2026; @ada confirmed 2026-11-22.")
    assert entities == [
        Entity("mention", "ada", "@Ada"),
        Entity("mention", "bob", "@bob"),
        Entity("date", "2026-11-22", "22 Nov 2026"),
    ]


def test_entities_are_capped_per_message() -> None:
    text = " ".join(f"@user{i}" for i in range(MAX_ENTITIES_PER_MESSAGE + 10))
    assert found(text) == [("mention", f"user{i}") for i in range(MAX_ENTITIES_PER_MESSAGE)]


ADVERSARIAL = {
    "letters": "a" * 100_000,
    "at signs": "a@" * 50_000,
    "domain labels": "a@" + "b." * 50_000,
    "mentions": "@a" * 50_000,
    "handle separators": "@" + "a-" * 50_000,
    "schemes": "http://" * 15_000,
    "closing brackets": "https://x/" + ")" * 100_000,
    "dots then at": "." * 100_000 + "@",
    "days": "1 " * 50_000,
    "day and month": "22 Nov " * 15_000,
    "month and day": "Nov 22, " * 12_000,
    "iso prefix": "2026-11-" * 12_000,
    "spaces after a day": "22" + " " * 100_000,
}


@pytest.mark.parametrize("text", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_input_is_handled_in_linear_time(text: str) -> None:
    # No timing assertion: a catastrophic backtrack on 100 KB would take hours
    # and trip the suite's timeout.
    assert len(EXTRACTOR.extract(text)) <= 1


# Fragments that make near-misses of every kind likely.
FRAGMENTS = [*"aZ09@.:/-_ ,)(\né", "https://", "Nov ", "2026", "-11-", "22", "bob", ".com"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join))
def test_entities_of_any_text_are_well_formed(text: str) -> None:
    entities = EXTRACTOR.extract(text)
    assert len(entities) <= MAX_ENTITIES_PER_MESSAGE
    assert len({(e.kind, e.value) for e in entities}) == len(entities)
    for entity in entities:
        assert entity.kind in {"mention", "link", "email", "date"}
        assert entity.text in text


# --- full-text queries ------------------------------------------------------


def test_query_terms() -> None:
    assert query_terms('Deploy NEAR(the "Billing" svc) -x a* col:val deploy 7') == [
        "deploy",
        "near",
        "billing",
        "svc",
        "col",
        "val",
        "7",
    ]
    assert query_terms("") == []
    # Stop words are searched only when nothing else is left.
    assert query_terms("what is the plan for it") == ["plan"]
    assert query_terms("to be or not to be") == ["to", "be", "or", "not"]
    assert query_terms(" ".join(f"t{i}" for i in range(100))) == [
        f"t{i}" for i in range(MAX_QUERY_TERMS)
    ]
    # Blobs are not words.
    assert query_terms("x" * 65 + " ok") == ["ok"]


def test_fts5_match_quotes_every_term() -> None:
    assert fts5_match(["a", 'say "hi"', "NEAR"]) == '"a" OR "say ""hi""" OR "NEAR"'
    assert fts5_match([]) == ""
    assert fts5_match(["\x00"]) == ""


def test_pg_tsquery_keeps_only_word_characters() -> None:
    terms = ["a&b", "c|d", "e:*", "it's", "(x)", "!y", "<->", "snake_case", "ab"]
    assert pg_tsquery(terms) == "ab | cd | e | its | x | y | snake_case"
    assert pg_tsquery([]) == ""


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=10))
def test_pg_tsquery_is_only_words_and_ors(terms: list[str]) -> None:
    assert re.fullmatch(r"(\w+( \| \w+)*)?", pg_tsquery(terms))


@pytest.fixture(scope="module")
def fts() -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE VIRTUAL TABLE docs USING fts5(body, tokenize='porter unicode61')")
    connection.execute("INSERT INTO docs (body) VALUES ('alpha beta'), ('gamma near delta')")
    yield connection
    connection.close()


def fts_count(connection: sqlite3.Connection, match: str) -> int:
    row = connection.execute("SELECT count(*) FROM docs WHERE docs MATCH ?", (match,)).fetchone()
    return int(row[0])


@pytest.mark.parametrize(
    "text",
    [
        "NEAR(alpha beta, 1)",
        "alpha*",
        "-alpha",
        "^alpha",
        "body:alpha",
        "nosuchcolumn:alpha",
        '"alpha',
        "alpha AND OR NOT",
        "{body}: alpha",
        "alpha + beta",
        "((( alpha",
    ],
)
def test_fts_syntax_in_user_text_is_searched_as_words(fts: sqlite3.Connection, text: str) -> None:
    match = fts5_match(query_terms(text))
    assert match
    # "alpha" matches the first document whatever the operators around it.
    assert fts_count(fts, match) >= 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_any_text_gives_a_query_fts5_accepts(fts: sqlite3.Connection, text: str) -> None:
    match = fts5_match(query_terms(text))
    if match:
        fts_count(fts, match)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=8))
def test_any_terms_give_a_query_fts5_accepts(fts: sqlite3.Connection, terms: list[str]) -> None:
    match = fts5_match(terms)
    if match:
        fts_count(fts, match)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from("abcXYZ019 .,:*-\"'()^"), min_size=1, max_size=60))
def test_a_document_is_found_by_its_own_words(text: str) -> None:
    connection = sqlite3.connect(":memory:")
    try:
        connection.execute(
            "CREATE VIRTUAL TABLE docs USING fts5(body, tokenize='porter unicode61')"
        )
        connection.execute("INSERT INTO docs (body) VALUES (?)", (text,))
        match = fts5_match(query_terms(text))
        assert not match or fts_count(connection, match) == 1
    finally:
        connection.close()


# --- plugins ----------------------------------------------------------------


class Chars:
    """A third-party style token counter."""

    name = "chars"

    def count(self, text: str) -> int:
        return len(text)


SHARED_CHARS = Chars()


def test_builtins_load_by_name() -> None:
    assert isinstance(load_plugin(TOKENIZERS, "approx-v1", BUILTIN_TOKENIZERS), ApproxTokenCounter)
    assert isinstance(load_token_counter("approx-v1"), ApproxTokenCounter)
    assert isinstance(load_summarizer("extractive-v1"), ExtractiveSummarizer)
    assert isinstance(load_entity_extractor("builtin-v1"), BuiltinEntityExtractor)
    assert set(BUILTIN_SUMMARIZERS) == {"extractive-v1"}
    assert set(BUILTIN_ENTITY_EXTRACTORS) == {"builtin-v1"}


def test_an_import_path_loads_a_class_or_an_instance() -> None:
    counter: TokenCounter = load_token_counter("tests.context.text.test_context_text:Chars")
    assert counter.count("abc") == 3
    assert load_token_counter("tests.context.text.test_context_text:SHARED_CHARS") is SHARED_CHARS


def test_an_installed_entry_point_loads_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = importlib.metadata.EntryPoints(
        [
            importlib.metadata.EntryPoint(
                name="chars", value="tests.context.text.test_context_text:Chars", group=TOKENIZERS
            )
        ]
    )

    def entry_points(*, group: str) -> importlib.metadata.EntryPoints:
        return installed if group == TOKENIZERS else importlib.metadata.EntryPoints([])

    # plugins looks entry points up through the module at call time.
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert isinstance(load_token_counter("chars"), Chars)
    with pytest.raises(ValueError, match="approx-v1, chars"):
        load_token_counter("nope")
    with pytest.raises(ValueError, match="unknown"):
        load_summarizer("chars")


@pytest.mark.parametrize("name", ["nope", "", "no.such.module:Thing", "switchboard.context:Nope"])
def test_an_unknown_plugin_is_a_value_error(name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        load_plugin(SUMMARIZERS, name, BUILTIN_SUMMARIZERS)


def test_unknown_names_list_what_is_available() -> None:
    with pytest.raises(ValueError, match="available: builtin-v1"):
        load_plugin(ENTITY_EXTRACTORS, "regex", BUILTIN_ENTITY_EXTRACTORS)


def test_a_plugin_without_the_api_is_refused() -> None:
    with pytest.raises(TypeError, match="count"):
        load_token_counter("builtins:object")


def test_the_builtin_registries_are_read_only() -> None:
    with pytest.raises(TypeError):
        BUILTIN_TOKENIZERS["mine"] = Chars  # type: ignore[index]


def test_rendered_data_is_valid_json_for_finite_numbers() -> None:
    data = struct_pb2.Struct()
    data.update({"k": [1, 2.5, {"n": None}]})
    assert json.loads(render_parts([context_pb2.ContentPart(data=data)])) == {
        "k": [1, 2.5, {"n": None}]
    }
