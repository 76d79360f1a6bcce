"""bench/memory.py's set, scoring and report, and bench/memory_model.py's scripted model:
the set is the same for a seed, its statements are what the rules read, the scripted
answers pass the forming worker's own schema checks, and the report reads its figures."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from bench.memory import FORMING, PLAIN, QUICK, Question, Read, people, render, score, tally
from bench.memory_model import (
    CANDIDATES,
    CHAT,
    CHAT_ANSWER,
    DECISIONS,
    Counts,
    answer_forming,
    decide,
    fact_of,
    facts_said,
    kind_of_call,
    scripted,
)
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.dispatcher.memory.plans.schema import (
    CANDIDATES as CANDIDATES_NAME,
)
from switchboard.dispatcher.memory.plans.schema import (
    DECISIONS as DECISIONS_NAME,
)
from switchboard.dispatcher.memory.plans.schema import (
    candidates_schema,
    decisions_schema,
    parse_candidates,
    parse_choices,
    response_format,
)
from tests.conftest import CALL_DEADLINE_S

pytestmark = pytest.mark.unit

USER_CATEGORIES = [
    cpb.MEMORY_CATEGORY_PREFERENCES,
    cpb.MEMORY_CATEGORY_PERSON_FACTS,
    cpb.MEMORY_CATEGORY_PLANS,
]


def candidates_body(exchange: str, recent: str = "") -> dict[str, Any]:
    """A candidates request as the forming worker writes it."""
    content = {
        "now": "2026-11-29T12:00:00+00:00",
        "summary": "",
        "recent": [{"role": "user", "text": recent}] if recent else [],
        "exchange": [
            {"role": "user", "time": "2026-11-29T12:00:00+00:00", "text": exchange},
            {"role": "assistant", "time": "2026-11-29T12:00:00+00:00", "text": CHAT_ANSWER},
        ],
    }
    return {
        "model": "bench-model",
        "messages": [
            {"role": "system", "content": "Pick facts, e.g. 'Lives in Berlin.'"},
            {"role": "user", "content": json.dumps(content)},
        ],
        "response_format": response_format(CANDIDATES_NAME, candidates_schema(USER_CATEGORIES)),
    }


def decisions_body(candidates: list[tuple[str, list[tuple[str, str]]]]) -> dict[str, Any]:
    content = {
        "candidates": [
            {
                "candidate": index,
                "category": "person_fact",
                "content": fact,
                "existing": [
                    {"handle": handle, "content": known, "valid_from": "2026-11-28T00:00:00Z"}
                    for handle, known in shown
                ],
            }
            for index, (fact, shown) in enumerate(candidates)
        ]
    }
    return {
        "model": "bench-model",
        "messages": [
            {"role": "system", "content": "Decide."},
            {"role": "user", "content": json.dumps(content)},
        ],
        "response_format": response_format(DECISIONS_NAME, decisions_schema()),
    }


def test_the_set_is_the_same_for_a_seed_and_differs_between_seeds() -> None:
    assert people(82, 4) == people(82, 4)
    assert people(82, 4) != people(83, 4)


def test_every_statement_of_the_set_is_read_by_the_rules_and_nothing_else_is() -> None:
    for one in people(82, QUICK.people):
        said = [text for session in one.sessions for text in session]
        facts = [fact for text in said for fact in facts_said(text)]
        for question in one.questions:
            if question.fate == "retracted":
                assert any(f.retracts for f in facts)
                continue
            # The current value was stated, and so was each value it replaced.
            for value in (question.current, *question.stale):
                assert any(f.value == value for f in facts), (question, value)
        # Small talk and distractors (a sister, a friend, a wish) give no fact.
        for text in said:
            if text.startswith(("My sister", "My friend", "I would love", "My neighbour")):
                assert facts_said(text) == []
            if text.startswith("My colleague"):
                assert facts_said(text) == []


def test_the_set_changes_and_retracts_facts_across_sessions() -> None:
    fates = {q.fate for one in people(82, 24) for q in one.questions}
    assert fates == {"stated", "changed", "retracted"}


def test_a_candidates_answer_passes_the_workers_checks_and_reads_only_the_exchange() -> None:
    body = candidates_body(
        "I moved to Lyon last month, I love it here. I no longer have a dog; Rex is "
        "with my parents. My sister lives in Porto.",
        recent="I work at Acme.",
    )
    assert kind_of_call(body) == CANDIDATES
    found = parse_candidates(answer_forming(body), USER_CATEGORIES, 5)
    assert [c.content for c in found] == ["Lives in Lyon", "No longer has a dog"]
    assert all(c.category == cpb.MEMORY_CATEGORY_PERSON_FACTS for c in found)


def test_decisions_follow_the_subjects_of_the_memories_shown_with_each_candidate() -> None:
    body = decisions_body(
        [
            ("Lives in Lyon", [("E1", "Lives in Paris")]),
            ("No longer has a dog", [("E1", "Lives in Paris"), ("E2", "Has a dog called Rex")]),
            ("Favourite food is sushi", [("E3", "Favourite food is sushi")]),
            ("Favourite colour is green", [("E3", "Favourite food is sushi")]),
            ("No longer works at Acme", []),
        ]
    )
    assert kind_of_call(body) == DECISIONS
    shown = [["E1"], ["E1", "E2"], ["E3"], ["E3"], []]
    choices = parse_choices(answer_forming(body), shown)
    assert [(c.action, c.target) for c in choices] == [
        ("update", "E1"),
        ("invalidate", "E2"),
        ("none", ""),
        ("add", ""),
        ("none", ""),
    ]


def test_facts_are_read_back_from_the_form_they_are_written_in() -> None:
    for text in ("I live in Paris.", "My trip to Oslo is on 3 May.", "I am learning Korean."):
        (fact,) = facts_said(text)
        assert fact_of(fact.content) == fact
    assert fact_of("Likes long walks") is None
    retracted = fact_of("Trip to Oslo is cancelled")
    assert retracted is not None
    assert decide(retracted, [("E1", "Trip to Oslo is on 3 May")])[:2] == ("invalidate", "E1")


async def test_the_scripted_server_answers_runs_and_forming_and_counts_their_tokens() -> None:
    counts = Counts()
    fake = scripted(counts)
    async with fake, httpx.AsyncClient(base_url=fake.url, timeout=CALL_DEADLINE_S) as http:
        chat = await http.post(
            "/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "I live in Paris."}]},
        )
        assert chat.json()["choices"][0]["message"]["content"] == CHAT_ANSWER
        body = {
            **candidates_body("I live in Paris."),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        text, usage = "", dict[str, int]()
        async with http.stream("POST", "/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk["choices"]:
                        text += choice["delta"].get("content") or ""
    assert [c.content for c in parse_candidates(text, USER_CATEGORIES, 5)] == ["Lives in Paris"]
    assert counts.requests == {CHAT: 1, CANDIDATES: 1}
    assert usage["prompt_tokens"] == counts.prompt_tokens[CANDIDATES] > 0
    assert usage["completion_tokens"] == counts.completion_tokens[CANDIDATES] > 0


def test_scoring_counts_the_current_value_and_a_retraction_shown_with_what_it_retracts() -> None:
    changed = Question("Where do I live?", "changed", "Lyon", ("Paris",))
    assert score(changed, Read(("Lives in Lyon",), ())) == {"right": True, "stale": False}
    assert score(changed, Read((), ("I live in Paris.", "I moved to Lyon."))) == {
        "right": True,
        "stale": True,
    }
    assert score(changed, Read((), ("I live in Paris.",)))["right"] is False
    gone = Question("Do I have a dog?", "retracted", "", ("Rex",), "I no longer have a dog")
    assert score(gone, Read((), ()))["right"] is True
    assert score(gone, Read(("Has a dog called Rex",), ()))["right"] is False
    assert score(gone, Read((), ("I have a dog called Rex.",)))["right"] is False
    both = ("I have a dog called Rex.", "I no longer have a dog; Rex is with my parents.")
    assert score(gone, Read((), both))["right"] is True


def _lag(role: str, cpu: float) -> dict[str, Any]:
    return {
        "conversations": 100,
        "exchanges": 100,
        "runs_wall_s": 4.0,
        "wall_s": 9.0,
        "server_cpu_ms_per_exchange": cpu,
        "model": {
            "requests": {"candidates": 100, "decisions": 100},
            "prompt_tokens": {"candidates": 30000, "decisions": 12000},
            "completion_tokens": {"candidates": 2000, "decisions": 1500},
        },
        "errors": {},
        **(
            {
                "decided": 100,
                "lag_p50_ms": 900.0,
                "lag_p95_ms": 2500.0,
                "lag_max_ms": 3000.0,
                "actions": {"ADD": 100},
            }
            if role == FORMING
            else {}
        ),
    }


def test_the_report_reads_its_figures_and_its_goals() -> None:
    current = Question("q", "changed", "Lyon", ("Paris",))
    gone = Question("q", "retracted", "", ("Rex",), "I no longer have a dog")
    marks = {"right": True, "stale": False}
    results: dict[str, Any] = {
        "host": [{"loop_ms": 30.0, "hop_us": 60.0}] * 2,
        "seconds": 120,
        "model": {"upstream": "", "name": "bench-model"},
        "quality": {
            "people": 8,
            "messages": 70,
            "decisions": {"ADD": 40, "UPDATE": 10, "INVALIDATE": 3},
            "errors": {},
            "unsettled_sessions": 0,
            "by_way": {
                "forming": tally([(current, marks), (gone, marks)]),
                "window retrieval": tally([(current, {"right": False, "stale": False})]),
                "workspace search": tally([(current, {"right": True, "stale": True})]),
            },
        },
        "lag": {
            "one": {
                "exchanges": 10,
                "decided": 10,
                "lag_p50_ms": 400.0,
                "lag_p95_ms": 700.0,
                "lag_max_ms": 800.0,
                "actions": {"ADD": 10},
                "errors": {},
            },
            PLAIN: _lag(PLAIN, 20.0),
            FORMING: _lag(FORMING, 31.5),
            "forming_cpu_ms_per_exchange": 11.5,
            "tokens_per_exchange": {"prompt": 420.0, "completion": 35.0},
        },
        "first-token": {
            "loops": 4,
            "errors": {},
            FORMING: {"runs": 36, "p50_ms": 21.0, "p95_ms": 40.0},
            PLAIN: {"runs": 36, "p50_ms": 20.0, "p95_ms": 41.0},
            "ratio_p50": 1.15,
            "ratio_p95": 0.98,
            "ratio_p50_interval": [0.97, 1.3],
        },
    }
    text = render(results, "python bench/memory.py --quick", QUICK)
    assert text.startswith("## Memory forming\n")
    assert "SCRIPTED model: rules over the text, not a language model" in text
    assert "`--model-url`" in text
    assert "| 1 of 1 (100%) | 0 of 1 (0%) |" in text
    assert "100% / 100%: met" in text
    assert "**11.5 ms**" in text
    assert "420.0 prompt + 35.0 completion" in text
    assert "p50 1.15 (0.97 to 1.3; p95 0.98): met" in text
    slower = {**results["first-token"], "ratio_p50_interval": [1.12, 1.3]}
    assert "p95 0.98): **missed**" in render({**results, "first-token": slower}, "x", QUICK)
    upstream = render(
        {**results, "model": {"upstream": "http://models:8000/v1", "name": "qwen"}}, "x", QUICK
    )
    assert "`http://models:8000/v1` (model `qwen`)" in upstream
