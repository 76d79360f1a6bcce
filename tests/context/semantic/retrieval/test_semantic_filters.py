"""The search filter parser (AIP-160 subset) and reciprocal rank fusion."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchboard.context.semantic.ports import Comparison
from switchboard.context.semantic.retrieval.filters import (
    MAX_COMPARISONS,
    parse_filter,
    restrict_sources,
)
from switchboard.context.semantic.retrieval.fusion import K, fuse, single
from switchboard.platform.errors import InvalidArgument

pytestmark = pytest.mark.unit

W = "acme"


def refusal(text: str, workspace: str | None = W) -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text, workspace_id=workspace)
    [violation] = caught.value.violations
    assert violation.field == "filter"
    return violation.description


def test_empty_filter_is_no_condition() -> None:
    parsed = parse_filter("  ", workspace_id=W)
    assert not parsed.impossible
    assert parsed.filter.sources is None
    assert parsed.filter.labels is None


def test_every_field() -> None:
    parsed = parse_filter(
        'source = memory AND kind = "fact" AND conversation = workspaces/acme/conversations/c1 '
        "AND file != 'workspaces/acme/files/f1' AND create_time >= 2026-01-02T03:04:05.5Z "
        "AND create_time < 2026-02-01T00:00:00+01:00 AND metadata.topic = travel "
        'AND metadata.stars != 3 AND metadata.done = true AND metadata.label = "true"',
        workspace_id=W,
    )
    f = parsed.filter
    assert not parsed.impossible
    assert f.sources == frozenset({"memory"})
    assert f.labels == frozenset({"fact"})
    assert f.conversation_ids == frozenset({"c1"})
    assert f.exclude_files == {"workspaces/acme/files/f1"}
    assert f.created_after == dt.datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=dt.UTC)
    assert f.created_after_inclusive
    assert f.created_before == dt.datetime(2026, 1, 31, 23, 0, tzinfo=dt.UTC)
    assert not f.created_before_inclusive
    assert f.metadata == (
        Comparison("topic", "=", "travel"),
        Comparison("stars", "!=", 3.0),
        Comparison("done", "=", True),
        Comparison("label", "=", "true"),
    )
    assert parsed.fields == {"source", "kind", "conversation", "file", "create_time", "metadata"}


def test_role_and_escapes() -> None:
    parsed = parse_filter(r'role = user AND metadata.q = "say \"hi\" \\ bye"', workspace_id=W)
    assert parsed.filter.labels == frozenset({"user"})
    assert parsed.filter.metadata == (Comparison("q", "=", 'say "hi" \\ bye'),)


def test_contradictions_match_nothing_without_an_error() -> None:
    assert parse_filter("source = memory AND source = message", workspace_id=W).impossible
    assert parse_filter("kind = fact AND role = user", workspace_id=W).impossible
    assert parse_filter("kind = fact AND kind != fact", workspace_id=W).impossible
    assert parse_filter(
        "create_time > 2026-01-02T00:00:00Z AND create_time < 2026-01-01T00:00:00Z",
        workspace_id=W,
    ).impossible
    assert not parse_filter("kind = fact AND kind = fact", workspace_id=W).impossible


def test_tightest_time_bounds_win() -> None:
    f = parse_filter(
        "create_time > 2026-01-01T00:00:00Z AND create_time >= 2026-01-05T00:00:00Z "
        "AND create_time <= 2026-02-01T00:00:00Z AND create_time < 2026-03-01T00:00:00Z",
        workspace_id=W,
    ).filter
    assert f.created_after == dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    assert f.created_after_inclusive
    assert f.created_before == dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    assert f.created_before_inclusive


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("foo = 1", "unknown field `foo`"),
        ("kind < fact", "operator `<` is not allowed on `kind`"),
        ("create_time = 2026-01-01T00:00:00Z", "operator `=` is not allowed on `create_time`"),
        ("create_time > yesterday", "`yesterday` is not an RFC 3339 time"),
        ("create_time > 2026-01-01", "is not an RFC 3339 time"),
        ("create_time > 2026-13-01T00:00:00Z", "is not a valid time"),
        ("kind = thought", "unknown memory kind `thought`"),
        ("role = robot", "unknown message role `robot`"),
        ("source = email", "unknown source `email`"),
        (
            "conversation = workspaces/other/conversations/c1",
            "the conversation named is not in the workspace searched",
        ),
        ("file = workspaces/other/files/f1", "the file named is not in the workspace searched"),
        ("conversation = c1", "is not a conversation name"),
        ("kind = fact OR kind = note", "only comparisons joined by `AND`"),
        ("kind = fact and kind = note", "only comparisons joined by `AND`"),
        ("(kind = fact)", "parentheses are not supported"),
        ('kind = "fact', "is not closed"),
        ("kind =", "expected a value after `kind =`"),
        ("kind = fact AND", "expected a comparison"),
        ("kind fact", "expected an operator after `kind`"),
        ("kind = = fact", "expected a value after `kind =`"),
        ("kind ! fact", "is not an operator"),
        ("metadata.a.b = 1", "a metadata key is"),
        ("metadata.x < 1", "operator `<` is not allowed on `metadata.x`"),
        ("kind = fact kind = note", "expected `AND` at position 13"),
        ("x" * 1001, "is longer than 1000 characters"),
        (" AND ".join(["kind = fact"] * (MAX_COMPARISONS + 1)), "more than 16 comparisons"),
    ],
)
def test_refusals_say_what_is_wrong(text: str, expected: str) -> None:
    assert expected in refusal(text)


def test_a_users_memory_names_no_conversation() -> None:
    assert "not in the workspace searched" in refusal(
        "conversation = workspaces/acme/conversations/c1", workspace=None
    )


def test_sixteen_comparisons_are_fine() -> None:
    parse_filter(" AND ".join(["kind = fact"] * MAX_COMPARISONS), workspace_id=W)


def test_restrict_sources() -> None:
    parsed = parse_filter("source != document", workspace_id=W)
    assert restrict_sources(parsed, ["memory"]).filter.sources == frozenset({"memory"})
    assert restrict_sources(parse_filter("source = message", workspace_id=W), ["memory"]).impossible


def _parses_or_refuses_on_filter(text: str) -> bool:
    try:
        parse_filter(text, workspace_id=W)
    except InvalidArgument as exc:
        return [v.field for v in exc.violations] == ["filter"]
    return True


_PIECES = st.sampled_from(
    [
        "source", "kind", "role", "conversation", "file", "create_time", "metadata.k",
        "metadata.", "=", "!=", "<", "<=", ">", ">=", "!", "AND", "and", "OR", "(", ")",
        '"', "'", "\\", "fact", "user", "memory", "2026-01-01T00:00:00Z", "1e999", "-0.5",
        "workspaces/acme/conversations/c", "workspaces/acme/files/f", " ", "\x00", "é",
    ]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=30).map(" ".join))
def test_fuzz_pieces_parse_or_refuse_precisely(text: str) -> None:
    assert _parses_or_refuses_on_filter(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=1100))
def test_fuzz_any_text_parses_or_refuses_precisely(text: str) -> None:
    assert _parses_or_refuses_on_filter(text)


# -- fusion -----------------------------------------------------------------------------


def test_fusion_adds_reciprocal_ranks() -> None:
    fused = fuse(["a", "b", "c"], [("c", 0.9), ("d", 0.8), ("a", 0.1)])
    by_key = {f.key: f for f in fused}
    assert by_key["a"].score == pytest.approx(1 / (K + 1) + 1 / (K + 3))
    assert by_key["c"].score == pytest.approx(1 / (K + 3) + 1 / (K + 1))
    assert by_key["b"].score == pytest.approx(1 / (K + 2))
    assert by_key["d"].score == pytest.approx(1 / (K + 2))
    assert (by_key["a"].full_text_rank, by_key["a"].semantic_rank) == (1, 3)
    assert by_key["a"].similarity == 0.1
    assert by_key["b"].semantic_rank is None
    assert by_key["b"].similarity is None
    assert by_key["d"].full_text_rank is None
    # Ties keep the full-text list's order first, then the semantic list's.
    assert [f.key for f in fused] == ["a", "c", "b", "d"]


def test_fusion_counts_a_repeat_at_its_best_rank() -> None:
    fused = fuse(["a", "a", "b"], [("b", 0.5), ("b", 0.4)])
    assert {f.key: f.full_text_rank for f in fused} == {"a": 1, "b": 2}
    assert [f.key for f in fused] == ["b", "a"]


@given(
    st.lists(st.integers(0, 20), max_size=15),
    st.lists(st.tuples(st.integers(0, 20), st.floats(-1, 1)), max_size=15),
)
def test_fusion_is_deterministic_and_ordered(
    text: list[int], meaning: list[tuple[int, float]]
) -> None:
    first = fuse(text, meaning)
    assert first == fuse(list(text), list(meaning))
    assert [f.score for f in first] == sorted((f.score for f in first), reverse=True)
    assert {f.key for f in first} == set(text) | {k for k, _ in meaning}


def test_single_list_keeps_its_scores() -> None:
    results = single([("a", 0.9), ("b", 0.5), ("a", 0.1)], semantic=True)
    assert [(r.key, r.semantic_rank, r.similarity, r.score) for r in results] == [
        ("a", 1, 0.9, 0.9),
        ("b", 2, 0.5, 0.5),
    ]
