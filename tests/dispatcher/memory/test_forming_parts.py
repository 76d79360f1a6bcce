"""The pure parts of memory forming: the answers' schemas and checks, the plan (ids
derived, scope room, targets), the job's JSON, and near-duplicates."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.dispatcher.memory.plans import plan as plans
from switchboard.dispatcher.memory.plans.plan import Exchange, Plan, Turn, decide, item_id, plan_key
from switchboard.dispatcher.memory.plans.schema import (
    Candidate,
    Choice,
    Unusable,
    candidates_schema,
    parse_candidates,
    parse_choices,
    response_format,
)
from switchboard.dispatcher.memory.plans.similarity import Item, jaccard, merges, near_duplicates
from switchboard.platform.values import names

pytestmark = pytest.mark.unit

KEPT = [cpb.MEMORY_CATEGORY_PERSON_FACTS, cpb.MEMORY_CATEGORY_PREFERENCES]


def _fact(content: str, category: str = "person_fact", **extra: object) -> dict[str, object]:
    return {
        "category": category,
        "content": content,
        "confidence": 0.9,
        "valid_from": None,
        **extra,
    }


def test_candidates_are_read_from_an_answer_that_keeps_to_the_schema() -> None:
    text = json.dumps(
        {
            "facts": [
                _fact("Lives  in Berlin."),
                _fact("Likes tea.", "preference", valid_from="2026-03-01T00:00:00Z"),
            ]
        }
    )
    found = parse_candidates(text, KEPT, 5)
    assert found[0] == Candidate(cpb.MEMORY_CATEGORY_PERSON_FACTS, "Lives in Berlin.", 0.9, None)
    assert found[1].category == cpb.MEMORY_CATEGORY_PREFERENCES
    assert found[1].valid_from == dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def test_at_most_the_policys_candidates_are_kept() -> None:
    text = json.dumps({"facts": [_fact(f"Fact {n}.") for n in range(7)]})
    assert [c.content for c in parse_candidates(text, KEPT, 3)] == ["Fact 0.", "Fact 1.", "Fact 2."]


@pytest.mark.parametrize(
    "answer",
    [
        "not json",
        json.dumps({"facts": [_fact("Plans a trip.", "plan")]}),  # a category not kept
        json.dumps({"facts": [{"category": "person_fact", "content": "x"}]}),  # fields missing
        json.dumps({"facts": [_fact("x", extra=1)]}),  # a field the schema has not
        json.dumps({"facts": [_fact("   ")]}),
        json.dumps({"facts": [{**_fact("x"), "confidence": 1.5}]}),
        json.dumps({"facts": [{**_fact("x"), "valid_from": "last spring"}]}),
        json.dumps({"facts": [_fact("x" * 1001)]}),
    ],
)
def test_an_answer_that_breaks_the_schema_is_unusable_and_quotes_nothing(answer: str) -> None:
    with pytest.raises(Unusable) as raised:
        parse_candidates(answer, KEPT, 5)
    assert "Plans a trip" not in str(raised.value)


def test_the_request_asks_for_strict_structured_output() -> None:
    schema = candidates_schema(KEPT)
    asked = response_format("memory_candidates", schema)
    assert asked == {
        "type": "json_schema",
        "json_schema": {"name": "memory_candidates", "strict": True, "schema": schema},
    }
    fact = schema["properties"]["facts"]["items"]
    assert fact["additionalProperties"] is False
    assert set(fact["required"]) == set(fact["properties"])
    assert fact["properties"]["category"]["enum"] == ["preference", "person_fact"]


def _choices(*decisions: dict[str, object]) -> str:
    return json.dumps({"decisions": list(decisions)})


def test_one_decision_per_candidate_with_targets_among_those_shown() -> None:
    text = _choices(
        {"candidate": 1, "action": "update", "target": "E2", "reason": "moved"},
        {"candidate": 0, "action": "add", "target": "E1", "reason": "new"},
    )
    choices = parse_choices(text, [["E1"], ["E2", "E3"]])
    assert choices == [Choice(0, "add", "", "new"), Choice(1, "update", "E2", "moved")]


@pytest.mark.parametrize(
    "decisions",
    [
        [{"candidate": 0, "action": "add", "target": None, "reason": ""}],  # candidate 1 missing
        [
            {"candidate": 0, "action": "add", "target": None, "reason": ""},
            {"candidate": 0, "action": "none", "target": None, "reason": ""},
            {"candidate": 1, "action": "none", "target": None, "reason": ""},
        ],
        [
            {"candidate": 0, "action": "invalidate", "target": "E9", "reason": ""},
            {"candidate": 1, "action": "none", "target": None, "reason": ""},
        ],
        [
            {"candidate": 0, "action": "delete", "target": None, "reason": ""},
            {"candidate": 1, "action": "none", "target": None, "reason": ""},
        ],
        [
            {"candidate": 5, "action": "add", "target": None, "reason": ""},
            {"candidate": 1, "action": "none", "target": None, "reason": ""},
        ],
    ],
)
def test_decisions_that_break_the_rules_are_unusable(decisions: list[dict[str, object]]) -> None:
    with pytest.raises(Unusable):
        parse_choices(_choices(*decisions), [["E1"], []])


def test_item_ids_are_derived_and_valid_memory_ids() -> None:
    first, again, other = item_id("key", 0), item_id("key", 0), item_id("key", 1)
    assert first == again != other
    assert names.MEMORY_ITEM.fullmatch(f"users/u1234/memories/{first}") is not None
    assert len(first) == 32
    assert first.startswith("m")
    # A round's key is its job and exactly the exchanges it formed.
    assert plan_key("run:a", b"x") != plan_key("run:a", b"y") != plan_key("run:b", b"y")


def _candidate(content: str, category: int = cpb.MEMORY_CATEGORY_PERSON_FACTS) -> Candidate:
    return Candidate(category, content, 0.8, None)


def test_the_plan_maps_handles_and_makes_additions_past_a_scopes_room_none() -> None:
    candidates = [_candidate("A."), _candidate("B."), _candidate("C."), _candidate("D.")]
    choices = [
        Choice(0, "add", "", "new"),
        Choice(1, "add", "", "new"),
        Choice(2, "update", "E1", "changed"),
        Choice(3, "invalidate", "E1", "retracted"),
    ]
    shown = [{}, {}, {"E1": "users/u1/memories/old"}, {"E1": "users/u1/memories/old"}]
    scope = "users/u1"
    planned = decide("k", "p/m", candidates, choices, shown, [scope] * 4, {scope: 1})
    actions = [(d.action, d.target, d.reason) for d in planned.decisions]
    assert actions == [
        ("add", "", "new"),
        ("none", "", "scope full"),
        ("update", "users/u1/memories/old", "changed"),
        # The same item cannot be retired twice by one exchange.
        ("none", "", "retracted"),
    ]
    assert [d.item for d in planned.decisions] == [item_id("k", 0), "", item_id("k", 2), ""]


def test_plans_and_exchanges_round_trip_through_json() -> None:
    when = dt.datetime(2026, 11, 29, 12, tzinfo=dt.UTC)
    planned = decide(
        "k",
        "p/m",
        [_candidate("A.")],
        [Choice(0, "add", "", "r")],
        [{}],
        ["workspaces/w"],
        {"workspaces/w": 5},
    )
    planned.done = 1
    assert Plan.loads(planned.dumps()) == planned
    exchange = Exchange((Turn("r1", "in", "out", when),), "a", "u", "assistant", b"\x08\x01", b"")
    assert Exchange.loads(exchange.dumps()) == exchange
    joined = exchange.adding(Turn("r2", "in2", "out2", when)).adding(Turn("r1", "x", "y", when))
    assert [t.run for t in joined.turns] == ["r1", "r2"]
    assert [t.run for t in joined.without(["r1"]).turns] == ["r2"]


def test_job_ids() -> None:
    assert plans.form_job_id("runs/x", "c", "u", 0) == "run:runs/x"
    assert plans.form_job_id("runs/x", "c", "u", 5) == "idle:c:u"
    assert plans.scope_of(cpb.MEMORY_CATEGORY_PLANS, "w", "u") == "users/u"
    assert plans.scope_of(cpb.MEMORY_CATEGORY_WORKSPACE_FACTS, "w", "u") == "workspaces/w"


def test_near_duplicates() -> None:
    assert near_duplicates("Lives in Berlin.", "lives in  berlin")
    assert jaccard("a b c d e f g", "a b c d e f g h") == pytest.approx(7 / 8)
    assert near_duplicates("a b c d e f g", "a b c d e f g h")
    assert not near_duplicates("Lives in Berlin.", "Lives in Paris.")
    assert not near_duplicates("", "")


def test_merges_retire_newer_formed_twins_into_the_oldest() -> None:
    items = [
        Item("n3", 1, "Likes tea.", (3.0, "n3"), formed=True),
        Item("n1", 1, "likes tea", (1.0, "n1"), formed=False),
        Item("n2", 1, "Likes tea!", (2.0, "n2"), formed=True),
        Item("n4", 2, "Likes tea.", (0.5, "n4"), formed=True),  # another kind
        Item("n5", 1, "Likes coffee.", (4.0, "n5"), formed=True),
    ]
    assert [(k.name, r.name) for k, r in merges(items)] == [("n1", "n2"), ("n1", "n3")]
    # A person's item is never retired by a merge, even when it is the newer.
    people = [Item("a", 1, "x y", (1.0, "a"), True), Item("b", 1, "x y", (2.0, "b"), False)]
    assert merges(people) == []
