"""The context-window planner: its rules as properties, plus worked examples."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchboard.context.windows.planner import (
    Candidate,
    Choice,
    PinnedOverBudget,
    Plan,
    Reason,
    plan_window,
)

pytestmark = pytest.mark.unit

# The order a handler reads a window in.
READING_ORDER = [Reason.PINNED, Reason.RELEVANT, Reason.SUMMARY, Reason.RECENT]


@dataclass(frozen=True)
class Inputs:
    budget: int
    pinned: list[Candidate]
    relevant: list[Candidate]
    summary: Candidate | None
    recent: list[Candidate]  # newest first
    older_messages: int
    relevant_share: float

    def plan(self) -> Plan:
        return plan_window(
            budget=self.budget,
            pinned=self.pinned,
            relevant=self.relevant,
            summary=self.summary,
            recent=self.recent,
            older_messages=self.older_messages,
            relevant_share=self.relevant_share,
        )


tokens = st.integers(min_value=0, max_value=60)
# Mostly live, sometimes expired.
expired = st.sampled_from([False, False, False, True])


@st.composite
def window_inputs(draw: st.DrawFn) -> Inputs:
    memory_keys = [f"memory-{i}" for i in range(8)]
    pinned_keys = draw(st.lists(st.sampled_from(memory_keys), max_size=4, unique=True))
    # Relevant memories may repeat pinned ones, as retrieval does not know what is pinned.
    relevant_keys = draw(st.lists(st.sampled_from(memory_keys), max_size=6, unique=True))
    message_count = draw(st.integers(min_value=0, max_value=12))
    return Inputs(
        budget=draw(st.integers(min_value=0, max_value=400)),
        pinned=[Candidate(k, draw(tokens), draw(expired)) for k in pinned_keys],
        relevant=[Candidate(k, draw(tokens), draw(expired)) for k in relevant_keys],
        summary=draw(st.none() | st.builds(Candidate, st.just("summary"), tokens, expired)),
        # Key "message-N": N is the position in the conversation, so newest first
        # means descending N.
        recent=[
            Candidate(f"message-{n}", draw(tokens), draw(expired))
            for n in range(message_count + 100, 100, -1)
        ],
        older_messages=draw(st.integers(min_value=0, max_value=5)),
        relevant_share=draw(st.floats(min_value=0.0, max_value=1.0)),
    )


def keys(choices: tuple[Choice, ...], reason: Reason | None = None) -> list[str]:
    return [c.candidate.key for c in choices if reason is None or c.reason == reason]


@settings(max_examples=400, deadline=None)
@given(window_inputs())
def test_the_plan_keeps_every_rule(inputs: Inputs) -> None:
    live_pinned = [c for c in inputs.pinned if not c.expired]
    needed = sum(c.tokens for c in live_pinned)
    if needed > inputs.budget:
        with pytest.raises(PinnedOverBudget) as raised:
            inputs.plan()
        assert (raised.value.needed, raised.value.budget) == (needed, inputs.budget)
        return

    plan = inputs.plan()

    # The budget holds, and the total is what is included.
    assert plan.total_tokens == sum(c.candidate.tokens for c in plan.included)
    assert plan.total_tokens <= inputs.budget

    # Expired candidates are never included, and are excluded as EXPIRED.
    assert not [c for c in plan.included if c.candidate.expired]
    assert all((c.reason == Reason.EXPIRED) == c.candidate.expired for c in plan.excluded)

    # Every live pinned memory is included, in the given order, first.
    assert keys(plan.included, Reason.PINNED) == [c.key for c in live_pinned]

    # Reading order: pinned, relevant, summary, then messages.
    ranks = [READING_ORDER.index(c.reason) for c in plan.included]
    assert ranks == sorted(ranks)

    # Relevant memories stay within their share and keep their rank order.
    relevant_included = [c.candidate for c in plan.included if c.reason == Reason.RELEVANT]
    assert sum(c.tokens for c in relevant_included) <= math.floor(
        inputs.budget * inputs.relevant_share
    )
    rank = {c.key: i for i, c in enumerate(inputs.relevant)}
    assert [rank[c.key] for c in relevant_included] == sorted(
        rank[c.key] for c in relevant_included
    )

    # Messages: the newest live ones, contiguous, shown oldest first.
    live_recent = [c for c in inputs.recent if not c.expired]
    shown = [c.candidate for c in plan.included if c.reason == Reason.RECENT]
    assert shown == list(reversed(live_recent[: len(shown)]))
    cut_off = [
        c
        for c in plan.excluded
        if c.reason == Reason.OVER_BUDGET and c.candidate.key in {m.key for m in live_recent}
    ]
    if len(shown) < len(live_recent):
        # The first that did not fit is listed; everything older only counted.
        assert [c.candidate for c in cut_off] == [live_recent[len(shown)]]
        assert plan.total_tokens + live_recent[len(shown)].tokens > inputs.budget
        assert plan.omitted_messages == len(live_recent) - len(shown) - 1 + inputs.older_messages
    else:
        assert not cut_off
        assert plan.omitted_messages == inputs.older_messages

    # Every candidate is accounted for exactly once: included, excluded, or
    # (live messages older than the cut) counted in omitted_messages.
    pinned_keys = {c.key for c in inputs.pinned}
    expected = Counter(
        [c.key for c in inputs.pinned]
        + [c.key for c in inputs.relevant if c.key not in pinned_keys]
        + ([inputs.summary.key] if inputs.summary else [])
        + [c.key for c in inputs.recent]
    )
    listed = Counter(keys(plan.included) + keys(plan.excluded))
    omitted_keys = expected - listed
    assert not listed - expected, "something is listed twice or was never a candidate"
    assert all(k.startswith("message-") for k in omitted_keys)
    assert sum(omitted_keys.values()) + inputs.older_messages == plan.omitted_messages


@settings(max_examples=300, deadline=None)
@given(window_inputs())
def test_what_is_left_out_did_not_fit(inputs: Inputs) -> None:
    """Replays the greedy decisions: each OVER_BUDGET one really did not fit when
    its turn came, and each included one did."""
    try:
        plan = inputs.plan()
    except PinnedOverBudget:
        return
    decided = {c.candidate.key: c.reason for c in plan.included + plan.excluded}
    used = sum(c.tokens for c in inputs.pinned if not c.expired)
    relevant_cap = math.floor(inputs.budget * inputs.relevant_share)
    relevant_used = 0
    pinned_keys = {c.key for c in inputs.pinned}
    for candidate in inputs.relevant:
        if candidate.key in pinned_keys or candidate.expired:
            continue
        fits = (
            used + candidate.tokens <= inputs.budget
            and relevant_used + candidate.tokens <= relevant_cap
        )
        assert decided[candidate.key] == (Reason.RELEVANT if fits else Reason.OVER_BUDGET)
        if fits:
            used += candidate.tokens
            relevant_used += candidate.tokens
    if inputs.summary is not None and not inputs.summary.expired:
        fits = used + inputs.summary.tokens <= inputs.budget
        assert decided["summary"] == (Reason.SUMMARY if fits else Reason.OVER_BUDGET)
        used += inputs.summary.tokens if fits else 0
    for candidate in inputs.recent:
        if candidate.expired:
            continue
        if used + candidate.tokens > inputs.budget:
            assert decided[candidate.key] == Reason.OVER_BUDGET
            break
        assert decided[candidate.key] == Reason.RECENT
        used += candidate.tokens
    assert used == plan.total_tokens


@settings(max_examples=100, deadline=None)
@given(window_inputs())
def test_the_plan_is_deterministic(inputs: Inputs) -> None:
    try:
        first = inputs.plan()
    except PinnedOverBudget:
        with pytest.raises(PinnedOverBudget):
            inputs.plan()
        return
    assert inputs.plan() == first


def test_a_worked_example() -> None:
    plan = plan_window(
        budget=100,
        pinned=[Candidate("p", 10)],
        # Cap: int(100 * 0.25) = 25 tokens of relevant memories.
        relevant=[Candidate("r1", 20), Candidate("r2", 10), Candidate("r3", 5)],
        summary=Candidate("s", 15),
        recent=[Candidate("m5", 20), Candidate("m4", 20), Candidate("m3", 20), Candidate("m2", 1)],
        older_messages=3,
    )
    assert [(c.candidate.key, c.reason) for c in plan.included] == [
        ("p", Reason.PINNED),
        ("r1", Reason.RELEVANT),
        ("r3", Reason.RELEVANT),
        ("s", Reason.SUMMARY),
        ("m4", Reason.RECENT),
        ("m5", Reason.RECENT),
    ]
    # r2 would break the relevant cap; r3 after it still fits. m3 is the first
    # message that does not fit; m2 (which would) and the 3 unloaded are omitted.
    assert [(c.candidate.key, c.reason) for c in plan.excluded] == [
        ("r2", Reason.OVER_BUDGET),
        ("m3", Reason.OVER_BUDGET),
    ]
    assert plan.total_tokens == 90
    assert plan.omitted_messages == 4


def test_pinned_over_budget_counts_only_live_pinned() -> None:
    with pytest.raises(PinnedOverBudget) as raised:
        plan_window(
            budget=10,
            pinned=[Candidate("a", 8), Candidate("old", 100, expired=True), Candidate("b", 5)],
            relevant=[],
            summary=None,
            recent=[],
        )
    assert (raised.value.needed, raised.value.budget) == (13, 10)


def test_pinned_exactly_at_budget_fits_and_leaves_nothing_else() -> None:
    plan = plan_window(
        budget=10,
        pinned=[Candidate("a", 10)],
        relevant=[Candidate("r", 0)],
        summary=Candidate("s", 1),
        recent=[Candidate("m", 1)],
    )
    assert keys(plan.included) == ["a", "r"]
    assert keys(plan.excluded, Reason.OVER_BUDGET) == ["s", "m"]


def test_a_zero_budget_excludes_everything() -> None:
    plan = plan_window(
        budget=0,
        pinned=[],
        relevant=[Candidate("r", 1)],
        summary=Candidate("s", 1),
        recent=[Candidate("m2", 1), Candidate("m1", 1)],
        older_messages=2,
    )
    assert plan.included == ()
    assert plan.total_tokens == 0
    assert keys(plan.excluded, Reason.OVER_BUDGET) == ["r", "s", "m2"]
    assert plan.omitted_messages == 3


def test_a_pinned_memory_found_again_by_retrieval_is_listed_once() -> None:
    plan = plan_window(
        budget=100,
        pinned=[Candidate("m", 5)],
        relevant=[Candidate("m", 5), Candidate("n", 5)],
        summary=None,
        recent=[],
    )
    assert keys(plan.included) == ["m", "n"]
    assert plan.excluded == ()
    assert plan.total_tokens == 10


def test_an_expired_message_is_skipped_without_cutting_the_conversation() -> None:
    plan = plan_window(
        budget=100,
        pinned=[],
        relevant=[],
        summary=None,
        recent=[Candidate("m3", 5), Candidate("m2", 5, expired=True), Candidate("m1", 5)],
    )
    assert keys(plan.included) == ["m1", "m3"]
    assert [(c.candidate.key, c.reason) for c in plan.excluded] == [("m2", Reason.EXPIRED)]
    assert plan.omitted_messages == 0


@pytest.mark.parametrize(
    "change",
    [
        {"budget": -1},
        {"older_messages": -1},
        {"relevant_share": 1.5},
        {"relevant_share": -0.1},
        {"relevant_share": math.nan},
        {"recent": [Candidate("m", -1)]},
        {"pinned": [Candidate("p", -1)]},
        {"summary": Candidate("s", -1)},
    ],
)
def test_invalid_arguments_are_refused(change: dict[str, object]) -> None:
    arguments: dict[str, object] = {
        "budget": 10,
        "pinned": [],
        "relevant": [],
        "summary": None,
        "recent": [],
        **change,
    }
    with pytest.raises(ValueError, match=r"negative|within"):
        plan_window(**arguments)  # type: ignore[arg-type]


# -- rule 6: a tool result is never shown without its call --------------------------------

OVER = Reason.OVER_BUDGET


def message(key: str, tokens: int, *, calls: str = "", answers: str = "") -> Candidate:
    """A message candidate; ``calls`` and ``answers`` are space-separated call ids."""
    return Candidate(
        key, tokens, calls=frozenset(calls.split()), answers=frozenset(answers.split())
    )


def messages_only(budget: int, recent: list[Candidate]) -> Plan:
    return plan_window(budget=budget, pinned=[], relevant=[], summary=None, recent=recent)


def decisions(plan: Plan) -> tuple[list[str], list[tuple[str, Reason]]]:
    return keys(plan.included), [(c.candidate.key, c.reason) for c in plan.excluded]


def test_results_whose_call_does_not_fit_are_left_out_with_it() -> None:
    # Oldest first: u, a (calls c1, c2), t1, t2, z; newest first to the planner.
    recent = [
        message("z", 5),
        message("t2", 5, answers="c2"),
        message("t1", 5, answers="c1"),
        message("a", 10, calls="c1 c2"),
        message("u", 5),
    ]
    assert decisions(messages_only(25, recent)) == (["a", "t1", "t2", "z"], [("u", OVER)])
    plan = messages_only(24, recent)
    assert decisions(plan) == (["z"], [("t2", OVER), ("t1", OVER), ("a", OVER)])
    assert (plan.total_tokens, plan.omitted_messages) == (5, 1)
    # Only one result fits: it goes too.
    plan = messages_only(10, recent)
    assert decisions(plan) == (["z"], [("t2", OVER), ("t1", OVER)])
    assert plan.omitted_messages == 2


def test_a_message_between_a_call_and_its_result_goes_with_the_call() -> None:
    recent = [
        message("z", 5),
        message("t1", 5, answers="c1"),
        message("aside", 5),
        message("a", 10, calls="c1"),
    ]
    assert decisions(messages_only(15, recent)) == (
        ["z"],
        [("t1", OVER), ("aside", OVER), ("a", OVER)],
    )
    # A call left out that nothing shown answers cuts nothing more.
    recent = [message("z", 5), message("aside", 5), message("a", 10, calls="c1")]
    assert decisions(messages_only(10, recent)) == (["aside", "z"], [("a", OVER)])


def test_a_result_whose_call_is_gone_never_opens_the_window() -> None:
    # The call was pruned away (or never stored): everything fits, but a result
    # with no call before it would open the window.
    recent = [message("z", 5), message("t2", 5, answers="c2"), message("t1", 5, answers="c1")]
    plan = messages_only(100, recent)
    assert decisions(plan) == (["z"], [("t2", OVER), ("t1", OVER)])
    assert plan.omitted_messages == 0


def test_a_result_with_an_unknown_call_inside_the_window_stays() -> None:
    recent = [message("z", 5), message("t", 5, answers="never-made"), message("u", 5)]
    assert decisions(messages_only(100, recent)) == (["u", "t", "z"], [])


def test_cutting_a_call_cuts_the_results_answering_it_later() -> None:
    # Oldest first: a1 (c1), t1 (c1), a2 (c2), t2 (c1 again, and c2). Cutting
    # at a1 drops t1; a2 then opens the window, and t2's c1 is now left out
    # by what was cut, so a2 and t2 go too.
    recent = [
        message("z", 1),
        message("t2", 1, answers="c1 c2"),
        message("a2", 1, calls="c2"),
        message("t1", 1, answers="c1"),
        message("a1", 10, calls="c1"),
    ]
    assert decisions(messages_only(5, recent)) == (
        ["z"],
        [("t2", OVER), ("a2", OVER), ("t1", OVER), ("a1", OVER)],
    )


@st.composite
def tool_conversations(draw: st.DrawFn) -> tuple[int, list[Candidate]]:
    """A budget and messages (newest first) with assistant calls and tool results
    answering them, sometimes answering calls that are unknown or far away."""
    ids = [f"c{i}" for i in range(6)]
    made: list[str] = []
    oldest_first: list[Candidate] = []
    for n in range(draw(st.integers(min_value=0, max_value=14))):
        kind = draw(st.sampled_from(["plain", "call", "result", "result"]))
        tokens = draw(st.integers(min_value=0, max_value=30))
        if kind == "call":
            calls = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3, unique=True))
            made.extend(calls)
            candidate = message(f"m{n}", tokens, calls=" ".join(calls))
        elif kind == "result":
            pool = made or ids
            answers = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2, unique=True))
            candidate = message(f"m{n}", tokens, answers=" ".join(answers))
        else:
            candidate = message(f"m{n}", tokens)
        oldest_first.append(candidate)
    return draw(st.integers(min_value=0, max_value=200)), list(reversed(oldest_first))


def _valid_run(run: list[Candidate], outside: list[Candidate]) -> bool:
    """Rule 6 for a run (oldest first) of the candidates, ``outside`` being the rest."""
    made_outside = {call for c in outside for call in c.calls}
    made: set[str] = set()
    for index, candidate in enumerate(run):
        missing = candidate.answers - made
        if missing and (index == 0 or missing & made_outside):
            return False
        made |= candidate.calls
    return True


@settings(max_examples=500, deadline=None)
@given(tool_conversations())
def test_tool_results_are_never_separated_from_calls_that_are_left_out(
    conversation: tuple[int, list[Candidate]],
) -> None:
    budget, recent = conversation
    plan = messages_only(budget, recent)
    shown = [c.candidate for c in plan.included]
    # Still the newest messages, contiguous, oldest first, within the budget.
    assert shown == list(reversed(recent[: len(shown)]))
    assert plan.total_tokens == sum(c.tokens for c in shown) <= budget
    # Rule 5 alone would have shown the newest `fitting`; rule 6 only takes
    # away from the old end of that, and lists what it took as OVER_BUDGET.
    fitting = 0
    used = 0
    for candidate in recent:
        if used + candidate.tokens > budget:
            break
        fitting += 1
        used += candidate.tokens
    assert len(shown) <= fitting
    cut = recent[len(shown) : fitting + 1]
    assert plan.excluded == tuple(Choice(c, OVER) for c in cut)
    assert plan.omitted_messages == len(recent) - len(shown) - len(cut)
    # The run shown keeps rule 6 and is the longest that does.
    assert _valid_run(list(reversed(recent[: len(shown)])), recent[len(shown) :])
    for longer in range(len(shown) + 1, fitting + 1):
        assert not _valid_run(list(reversed(recent[:longer])), recent[longer:]), longer


# -- documents cut to fit (rule 5) ----------------------------------------------------------


def document(key: str, tokens: int, floor: int, **links: str) -> Candidate:
    """A message holding documents: ``floor`` is its cost with each cut to its note."""
    plain = message(key, tokens, **links)
    return Candidate(key, tokens, calls=plain.calls, answers=plain.answers, floor=floor)


def test_a_message_with_a_document_too_big_is_cut_to_the_budget_left() -> None:
    recent = [message("question", 10), document("pdf", 500, 30), message("older", 5)]
    plan = messages_only(100, recent)
    assert keys(plan.included) == ["pdf", "question"]
    cut = plan.included[0]
    assert (cut.truncated, cut.tokens, cut.candidate.tokens) == (True, 90, 500)
    assert plan.total_tokens == 100
    # The next one does not fit what is left: listed, and nothing older.
    assert decisions(plan)[1] == [("older", OVER)]


def test_a_document_whose_note_does_not_fit_is_left_out_whole() -> None:
    plan = messages_only(100, [message("question", 80), document("pdf", 500, 30)])
    assert keys(plan.included) == ["question"]
    assert decisions(plan)[1] == [("pdf", OVER)]
    assert not any(c.truncated for c in plan.included)


def test_only_one_message_is_cut() -> None:
    plan = messages_only(100, [document("a", 200, 0), document("b", 200, 0)])
    assert [(c.candidate.key, c.tokens) for c in plan.included] == [("a", 100)]
    assert decisions(plan)[1] == [("b", OVER)]


def test_a_floor_outside_the_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match="floor"):
        messages_only(10, [document("a", 5, 6)])


@st.composite
def documents_conversations(draw: st.DrawFn) -> tuple[int, list[Candidate]]:
    """``tool_conversations`` where some messages hold documents (a floor)."""
    budget, recent = draw(tool_conversations())
    with_floors = []
    for candidate in recent:
        floor = None
        if draw(st.booleans()):
            floor = draw(st.integers(min_value=0, max_value=candidate.tokens))
        with_floors.append(replace(candidate, floor=floor))
    return budget, with_floors


@settings(max_examples=500, deadline=None)
@given(documents_conversations())
def test_cutting_documents_keeps_the_budget_and_the_rules(
    conversation: tuple[int, list[Candidate]],
) -> None:
    budget, recent = conversation
    plan = messages_only(budget, recent)
    shown = [c.candidate for c in plan.included]
    # The budget holds, counted with what each message takes once cut.
    assert plan.total_tokens == sum(c.tokens for c in plan.included) <= budget
    # Still the newest messages, contiguous, oldest first; rule 6 still holds.
    assert shown == list(reversed(recent[: len(shown)]))
    assert _valid_run(list(reversed(recent[: len(shown)])), recent[len(shown) :])
    # At most one message is cut, to no less than its floor and less than its whole.
    cut = [c for c in plan.included if c.truncated]
    assert len(cut) <= 1
    for choice in cut:
        floor = choice.candidate.floor
        assert floor is not None
        assert floor <= choice.tokens < choice.candidate.tokens
        # It took every token left: nothing whole would have fitted in its place.
        assert plan.total_tokens == budget or choice not in plan.included
    # Replays rule 5: whole while they fit, then one cut if its floor fits.
    used, fitting, cutting = 0, 0, None
    for candidate in recent:
        if used + candidate.tokens > budget:
            floor = candidate.floor
            if cutting is None and floor is not None and used + floor <= budget:
                cutting = candidate.key
                used = budget
                fitting += 1
                continue
            break
        fitting += 1
        used += candidate.tokens
    assert len(shown) <= fitting
    if len(shown) == fitting:
        assert [c.candidate.key for c in cut] == ([cutting] if cutting else [])
    # Without floors nothing is cut, and a plan that cut nothing is the plan without floors.
    plain = messages_only(budget, [replace(c, floor=None) for c in recent])
    assert not any(c.truncated for c in plain.included)
    if not cut and cutting is None:
        assert decisions(plan) == decisions(plain)


# -- retrieved results (rule 3b) ----------------------------------------------------------------


def test_retrieved_results_fit_their_own_cap_and_are_never_repeated() -> None:
    plan = plan_window(
        budget=100,
        pinned=[Candidate("memory-a", 10)],
        relevant=[Candidate("memory-b", 10)],
        summary=Candidate("summary", 5),
        recent=[Candidate("message-2", 10), Candidate("message-1", 10)],
        retrieved=[
            Candidate("memory-a", 10),  # pinned already: dropped without a trace
            Candidate("passage-1", 20),
            Candidate("passage-2", 15),  # over the cap of 30 once passage-1 is in
            Candidate("memory-b", 10),  # relevant already: dropped
            Candidate("passage-3", 10),  # still fits the cap
        ],
        retrieved_budget=30,
    )
    assert [(c.candidate.key, c.reason) for c in plan.included] == [
        ("memory-a", Reason.PINNED),
        ("memory-b", Reason.RELEVANT),
        ("passage-1", Reason.RETRIEVED),
        ("passage-3", Reason.RETRIEVED),
        ("summary", Reason.SUMMARY),
        ("message-1", Reason.RECENT),
        ("message-2", Reason.RECENT),
    ]
    assert [(c.candidate.key, c.reason) for c in plan.excluded] == [
        ("passage-2", Reason.OVER_BUDGET)
    ]
    assert plan.total_tokens == 75


def test_retrieved_results_never_take_more_than_the_window_has() -> None:
    plan = plan_window(
        budget=25,
        pinned=[Candidate("memory-a", 10)],
        relevant=[],
        summary=None,
        recent=[Candidate("message-1", 10)],
        retrieved=[Candidate("passage-1", 20), Candidate("passage-2", 10)],
        retrieved_budget=25,
    )
    assert [c.candidate.key for c in plan.included] == ["memory-a", "passage-2"]
    assert [c.candidate.key for c in plan.excluded] == ["passage-1", "message-1"]
    assert plan.total_tokens == 20


@given(
    st.integers(0, 200),
    st.integers(0, 200),
    st.lists(st.integers(0, 60), max_size=8),
)
def test_retrieved_stay_within_both_budgets(budget: int, cap: int, sizes: list[int]) -> None:
    plan = plan_window(
        budget=budget,
        pinned=[],
        relevant=[],
        summary=None,
        recent=[],
        retrieved=[Candidate(f"passage-{i}", size) for i, size in enumerate(sizes)],
        retrieved_budget=cap,
    )
    taken = sum(c.tokens for c in plan.included if c.reason == Reason.RETRIEVED)
    assert taken <= min(budget, cap)
    assert len(plan.included) + len(plan.excluded) == len(sizes)


def test_a_negative_retrieved_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="retrieved_budget"):
        plan_window(
            budget=10,
            pinned=[],
            relevant=[],
            summary=None,
            recent=[],
            retrieved=[Candidate("passage-1", 1)],
            retrieved_budget=-1,
        )
