"""The two structured answers forming asks a model for, and their checks.

A model's answer is untrusted text: it is parsed as JSON and checked against the
schema the request sent (``response_format: json_schema``, strict) with
``jsonschema``, then against what a schema cannot say (each candidate decided once,
a target among the memories shown for that candidate, a stated time that parses).
Anything else is ``Unusable``: forming asks once more, then records the exchange
FAILED and applies nothing of it. The schemas keep to the subset strict structured
outputs accept (every property required, ``null`` for "none", no bounds keywords):
bounds are checked here instead, so any OpenAI-compatible endpoint can answer.

This module is pure: no I/O, no model, no grpc.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from switchboard.platform.schemas import Compiled, SchemaUnusable, compile_schema
from switchboard.platform.values.memorypolicy import CATEGORY_WORDS

#: The names the two schemas go by (``json_schema.name``).
CANDIDATES: Final = "memory_candidates"
DECISIONS: Final = "memory_decisions"
#: The decisions a model may take for one candidate.
ACTIONS: Final = ("add", "update", "invalidate", "none")
#: Longest fact, and longest reason, kept from an answer.
MAX_FACT_CHARS: Final = 1000
MAX_REASON_CHARS: Final = 200
_WORD_CATEGORY: Final = {word: category for category, word in CATEGORY_WORDS.items()}


class Unusable(Exception):
    """The answer breaks its schema; the message says where (never the model's text)."""


@dataclass(frozen=True)
class Candidate:
    """A fact the model found in an exchange."""

    category: int
    content: str
    confidence: float
    #: When it became true, as the conversation stated it (None: the message's time).
    valid_from: dt.datetime | None


@dataclass(frozen=True)
class Choice:
    """The model's decision for one candidate: ``target`` is the handle of one of the
    memories shown with it (``update``, ``invalidate``), else empty."""

    candidate: int
    action: str
    target: str
    reason: str


def candidates_schema(categories: Sequence[int]) -> dict[str, Any]:
    """The schema of the first answer: facts, each of a category the policy keeps."""
    words = [CATEGORY_WORDS[category] for category in sorted(categories)]
    fact = {
        "type": "object",
        "additionalProperties": False,
        "required": ["category", "content", "confidence", "valid_from"],
        "properties": {
            "category": {"type": "string", "enum": words},
            "content": {"type": "string"},
            "confidence": {"type": "number"},
            "valid_from": {"type": ["string", "null"]},
        },
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["facts"],
        "properties": {"facts": {"type": "array", "items": fact}},
    }


def decisions_schema() -> dict[str, Any]:
    """The schema of the second answer: one decision per candidate."""
    decision = {
        "type": "object",
        "additionalProperties": False,
        "required": ["candidate", "action", "target", "reason"],
        "properties": {
            "candidate": {"type": "integer"},
            "action": {"type": "string", "enum": list(ACTIONS)},
            "target": {"type": ["string", "null"]},
            "reason": {"type": "string"},
        },
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["decisions"],
        "properties": {"decisions": {"type": "array", "items": decision}},
    }


def response_format(name: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    """The request's ``response_format`` for ``schema``."""
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "strict": True, "schema": dict(schema)},
    }


@functools.lru_cache(maxsize=32)
def _compiled(schema: str) -> Compiled:
    return compile_schema(json.loads(schema))


def _checked(text: str, schema: Mapping[str, Any]) -> Any:
    try:
        data = json.loads(text)
    except ValueError:
        raise Unusable("the answer is not JSON") from None
    try:
        problems = _compiled(json.dumps(schema, sort_keys=True)).violations(data)
    except SchemaUnusable as exc:
        raise Unusable(exc.reason) from None
    if problems:
        path, _ = problems[0]
        # The validator's message may quote the answer: only the place is kept.
        raise Unusable(f"the answer breaks the schema at {path or 'its root'}") from None
    return data


def _stated(value: str | None, index: int) -> dt.datetime | None:
    if value is None or not value.strip():
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise Unusable(f"facts[{index}].valid_from is not an ISO 8601 time") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def parse_candidates(text: str, categories: Sequence[int], limit: int) -> list[Candidate]:
    """The candidates of an answer (the first ``limit``, each of a kept category)."""
    data = _checked(text, candidates_schema(categories))
    found: list[Candidate] = []
    for index, fact in enumerate(data["facts"]):
        content = " ".join(str(fact["content"]).split())
        confidence = float(fact["confidence"])
        if not content:
            raise Unusable(f"facts[{index}].content is empty")
        if len(content) > MAX_FACT_CHARS:
            raise Unusable(f"facts[{index}].content is longer than {MAX_FACT_CHARS}")
        if not 0.0 <= confidence <= 1.0:
            raise Unusable(f"facts[{index}].confidence is not between 0 and 1")
        found.append(
            Candidate(
                category=_WORD_CATEGORY[fact["category"]],
                content=content,
                confidence=confidence,
                valid_from=_stated(fact["valid_from"], index),
            )
        )
    return found[:limit]


def parse_choices(text: str, shown: Sequence[Sequence[str]]) -> list[Choice]:
    """One decision per candidate, in the candidates' order; ``shown[i]``: the handles
    of the memories shown with candidate ``i``."""
    data = _checked(text, decisions_schema())
    choices: dict[int, Choice] = {}
    for index, item in enumerate(data["decisions"]):
        candidate, action = int(item["candidate"]), str(item["action"])
        target = item["target"] or ""
        if not 0 <= candidate < len(shown):
            raise Unusable(f"decisions[{index}].candidate names no candidate")
        if candidate in choices:
            raise Unusable(f"decisions[{index}] decides candidate {candidate} again")
        if action in ("update", "invalidate"):
            if target not in shown[candidate]:
                raise Unusable(f"decisions[{index}].target is not a memory shown with it")
        else:
            target = ""
        reason = " ".join(str(item["reason"]).split())[:MAX_REASON_CHARS]
        choices[candidate] = Choice(candidate, action, target, reason)
    missing = [index for index in range(len(shown)) if index not in choices]
    if missing:
        raise Unusable(f"candidate {missing[0]} has no decision")
    return [choices[index] for index in range(len(shown))]


__all__ = [
    "ACTIONS",
    "CANDIDATES",
    "DECISIONS",
    "Candidate",
    "Choice",
    "Unusable",
    "candidates_schema",
    "decisions_schema",
    "parse_candidates",
    "parse_choices",
    "response_format",
]
