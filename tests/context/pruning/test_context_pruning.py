"""Pruning plans (properties and hysteresis) and the extractive summarizer."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchboard.context.pruning.pruner import (
    PruneLimits,
    auto_prune_limits,
    needs_auto_prune,
    plan_prune,
)
from switchboard.context.text.summarizer import ExtractiveSummarizer, SummaryInput
from switchboard.context.text.tokencount import ApproxTokenCounter, TokenCounter

pytestmark = pytest.mark.unit

message_tokens = st.lists(st.integers(min_value=0, max_value=100), max_size=40)
limits = st.builds(
    PruneLimits,
    keep_last_messages=st.integers(min_value=0, max_value=45),
    max_tokens=st.integers(min_value=0, max_value=600),
)


def within(kept: list[int], limits: PruneLimits) -> bool:
    return (not limits.keep_last_messages or len(kept) <= limits.keep_last_messages) and (
        not limits.max_tokens or sum(kept) <= limits.max_tokens
    )


@settings(max_examples=500, deadline=None)
@given(message_tokens, limits)
def test_pruning_keeps_the_longest_suffix_within_the_limits(
    tokens: list[int], limits: PruneLimits
) -> None:
    archived = plan_prune(tokens, limits)
    assert 0 <= archived <= len(tokens)
    kept = tokens[archived:]
    # Nothing is lost: what is archived is the oldest prefix, the rest is kept.
    assert tokens[:archived] + kept == tokens
    if tokens:
        # The newest message is never archived...
        assert kept, "the newest message was archived"
        # ...and beyond it, what is kept is within the limits...
        assert len(kept) == 1 or within(kept, limits)
        # ...and as long as it can be: one more message would break a limit.
        if archived:
            assert not within(tokens[archived - 1 :], limits)


@settings(max_examples=500, deadline=None)
@given(message_tokens, limits)
def test_pruning_is_idempotent(tokens: list[int], limits: PruneLimits) -> None:
    archived = plan_prune(tokens, limits)
    assert plan_prune(tokens[archived:], limits) == 0


@settings(max_examples=100, deadline=None)
@given(message_tokens)
def test_no_limits_prune_nothing(tokens: list[int]) -> None:
    assert plan_prune(tokens, PruneLimits()) == 0


@pytest.mark.parametrize(
    ("tokens", "limits", "archived"),
    [
        ([5, 5, 5, 5], PruneLimits(keep_last_messages=2), 2),
        ([5, 5, 5, 5], PruneLimits(max_tokens=12), 2),
        ([5, 5, 5, 5], PruneLimits(keep_last_messages=3, max_tokens=12), 2),
        ([5, 5, 5, 5], PruneLimits(keep_last_messages=10, max_tokens=100), 0),
        # The newest alone is over the token limit: it is kept all the same.
        ([1, 1, 50], PruneLimits(max_tokens=10), 2),
        # A large old message ends the kept run even if older ones are small.
        ([1, 1, 50, 1, 1], PruneLimits(max_tokens=10), 3),
        ([], PruneLimits(keep_last_messages=1, max_tokens=1), 0),
    ],
)
def test_pruning_examples(tokens: list[int], limits: PruneLimits, archived: int) -> None:
    assert plan_prune(tokens, limits) == archived


def test_negative_limits_and_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        PruneLimits(keep_last_messages=-1)
    with pytest.raises(ValueError, match="negative"):
        plan_prune([1, -1], PruneLimits(max_tokens=5))
    with pytest.raises(ValueError, match="negative"):
        auto_prune_limits(-1, 0)


@pytest.mark.parametrize(
    ("count", "tokens", "max_messages", "max_tokens", "needed"),
    [
        (10, 10, 0, 0, False),
        (10, 10, 10, 10, False),
        (11, 10, 10, 10, True),
        (10, 11, 10, 10, True),
        (1000, 10, 0, 10, False),
        (10, 10_000, 10, 0, False),
    ],
)
def test_auto_prune_triggers_only_over_a_set_maximum(
    count: int, tokens: int, max_messages: int, max_tokens: int, needed: bool
) -> None:
    assert needs_auto_prune(count, tokens, max_messages, max_tokens) is needed


def test_auto_prune_limits_aim_below_the_maximum() -> None:
    assert auto_prune_limits(100, 8000) == PruneLimits(keep_last_messages=75, max_tokens=6000)
    assert auto_prune_limits(100, 0) == PruneLimits(keep_last_messages=75, max_tokens=0)
    # A tiny maximum still gives a limit (0 would mean "no limit").
    assert auto_prune_limits(1, 1) == PruneLimits(keep_last_messages=1, max_tokens=1)
    assert auto_prune_limits(10, 10, target=0.5) == PruneLimits(5, 5)
    for target in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="target"):
            auto_prune_limits(10, 10, target=target)


@settings(max_examples=200, deadline=None)
@given(
    max_messages=st.integers(min_value=4, max_value=40),
    appended=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=300),
)
def test_auto_pruning_has_hysteresis(max_messages: int, appended: list[int]) -> None:
    """After an automatic prune, the next one is at least a quarter of the
    maximum of appends away, instead of on every append."""
    conversation: list[int] = []
    prunes_at: list[int] = []
    limits = auto_prune_limits(max_messages, 0)
    for step, tokens in enumerate(appended):
        conversation.append(tokens)
        if needs_auto_prune(len(conversation), sum(conversation), max_messages, 0):
            del conversation[: plan_prune(conversation, limits)]
            prunes_at.append(step)
            assert not needs_auto_prune(len(conversation), sum(conversation), max_messages, 0)
        assert len(conversation) <= max_messages
    gap = max_messages + 1 - math.floor(max_messages * 0.75)
    assert all(b - a >= gap for a, b in itertools.pairwise(prunes_at))


@settings(max_examples=200, deadline=None)
@given(
    max_tokens=st.integers(min_value=1, max_value=500),
    appended=st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=100),
)
def test_auto_pruning_by_tokens_ends_under_the_maximum(
    max_tokens: int, appended: list[int]
) -> None:
    conversation: list[int] = []
    limits = auto_prune_limits(0, max_tokens)
    for tokens in appended:
        conversation.append(tokens)
        if needs_auto_prune(len(conversation), sum(conversation), 0, max_tokens):
            del conversation[: plan_prune(conversation, limits)]
        # Only a single message over the maximum on its own stays over it.
        assert sum(conversation) <= max_tokens or len(conversation) == 1


# --- the extractive summarizer ---------------------------------------------


class CharCounter:
    """A counter that is not the default, and not additive over newlines."""

    name = "chars"

    def count(self, text: str) -> int:
        return len(text)


class QuadraticCounter:
    """A counter for which a joined text costs more than its parts together, so
    per-sentence counts underestimate the summary's cost."""

    name = "quadratic"

    def count(self, text: str) -> int:
        return len(text.split()) ** 2


COUNTERS: list[TokenCounter] = [ApproxTokenCounter(), CharCounter(), QuadraticCounter()]

summary_inputs = st.lists(
    st.builds(
        SummaryInput,
        role=st.sampled_from(["user", "assistant", ""]),
        author=st.sampled_from(["users/ada", ""]),
        text=st.text(max_size=200),
    ),
    max_size=12,
)


async def summarize(
    previous: str | None,
    messages: list[SummaryInput],
    max_tokens: int,
    counter: TokenCounter | None = None,
) -> str:
    return await ExtractiveSummarizer().summarize(
        previous, messages, max_tokens=max_tokens, counter=counter or ApproxTokenCounter()
    )


@settings(max_examples=150, deadline=None)
@given(
    previous=st.none() | st.text(max_size=200),
    messages=summary_inputs,
    max_tokens=st.integers(min_value=0, max_value=120),
    counter=st.sampled_from(COUNTERS),
)
async def test_a_summary_never_exceeds_its_budget(
    previous: str | None, messages: list[SummaryInput], max_tokens: int, counter: TokenCounter
) -> None:
    summary = await summarize(previous, messages, max_tokens, counter)
    assert counter.count(summary) <= max_tokens
    # Deterministic: the same input gives the same summary.
    assert await summarize(previous, messages, max_tokens, counter) == summary


@settings(max_examples=100, deadline=None)
@given(previous=st.none() | st.text(max_size=200), messages=summary_inputs)
async def test_a_summary_with_room_to_spare_is_stable(
    previous: str | None, messages: list[SummaryInput]
) -> None:
    """Summarizing a summary (no new messages, enough room) changes nothing:
    the previous summary is carried over whole."""
    counter = ApproxTokenCounter()
    summary = await summarize(previous, messages, 100_000)
    assert await summarize(summary, [], counter.count(summary)) == summary


async def test_nothing_to_summarize_is_empty() -> None:
    assert await summarize(None, [], 100) == ""
    assert await summarize("", [SummaryInput("user", "users/ada", "  \n ")], 100) == ""
    assert await summarize("Something happened.", [], 0) == ""


async def test_the_most_topical_sentences_are_kept_in_order() -> None:
    messages = [
        SummaryInput("user", "users/ada", "The database migration failed twice. Lunch was nice."),
        SummaryInput("assistant", "handlers/ops", "Retry the database migration with a lock."),
        SummaryInput("user", "users/ada", "The database migration worked after the lock."),
    ]
    summary = await summarize(None, messages, 40)
    assert summary.splitlines() == [
        "user: The database migration failed twice.",
        "assistant: Retry the database migration with a lock.",
        "user: The database migration worked after the lock.",
    ]
    assert "Lunch" not in summary


async def test_the_previous_summary_is_carried_into_the_next() -> None:
    previous = "user: We deploy the billing service with blue-green rollouts."
    messages = [SummaryInput("assistant", "handlers/ops", "The billing service rollout is done.")]
    summary = await summarize(previous, messages, 100)
    assert summary.splitlines() == [
        previous,
        "assistant: The billing service rollout is done.",
    ]


async def test_a_sentence_too_long_for_the_budget_is_cut_by_words() -> None:
    text = " ".join(f"word{i}" for i in range(200))
    summary = await summarize(None, [SummaryInput("user", "users/ada", text)], 20)
    counter = ApproxTokenCounter()
    assert summary.startswith("user: word0 word1 ")
    assert text.startswith(summary.removeprefix("user: "))
    assert 15 < counter.count(summary) <= 20


async def test_the_author_labels_a_message_without_a_role() -> None:
    summary = await summarize(None, [SummaryInput("", "users/ada", "Hello there.")], 100)
    assert summary == "users/ada: Hello there."
