"""What a forming job carries: the exchanges waiting (``Exchange``, the job's
``exchange`` column) and, once the model has decided, the plan (``Plan``, its
``plan`` column), both JSON.

The plan is stored before anything of it is applied, and every item it creates
has an id derived from the plan's key and the decision's place in it
(``item_id``): applying a stored plan again after a crash creates nothing twice
(the context service answers ALREADY_EXISTS for an id taken), and ``done`` says
how far it got, so the decisions applied before the crash are not announced
again either.

This module is pure: no I/O, no grpc.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from switchboard.dispatcher.memory.plans.schema import Candidate, Choice
from switchboard.platform.values.memorypolicy import USER_CATEGORIES

#: Job kinds.
FORM: Final = "exchange"
CONSOLIDATE: Final = "consolidate"
#: Job states: waiting (or being formed), plan stored, waiting for a budget's room.
PENDING: Final = "pending"
DECIDED: Final = "decided"
PAUSED: Final = "paused"
#: An id the context service takes (``[a-z][a-z0-9-]{2,31}``).
_ID_CHARS: Final = 31


def item_id(key: str, index: int) -> str:
    """The id of the item the ``index``-th decision of the plan ``key`` creates."""
    return "m" + hashlib.sha256(f"{key}:{index}".encode()).hexdigest()[:_ID_CHARS]


def form_job_id(run: str, conversation: str, user_id: str, idle_minutes: int) -> str:
    """After each run its own job; after idle minutes one per conversation and user
    (each person's exchanges are formed as that person, into their own scope)."""
    return f"run:{run}" if idle_minutes == 0 else f"idle:{conversation}:{user_id}"


def consolidate_job_id(workspace_id: str) -> str:
    return f"consolidate:{workspace_id}"


def _iso(when: dt.datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _time(text: str | None) -> dt.datetime | None:
    return None if not text else dt.datetime.fromisoformat(text)


@dataclass(frozen=True)
class Turn:
    """One finished run's exchange."""

    run: str
    input_message: str
    output_message: str
    time: dt.datetime


@dataclass(frozen=True)
class Exchange:
    """A forming job's exchanges and what forms them: the policy that applied (as it
    was when the run ended) and the assistant's model settings, serialized."""

    turns: tuple[Turn, ...]
    assistant: str
    user_id: str
    #: ``assistant`` or ``workspace``.
    source: str
    policy: bytes
    model: bytes

    def dumps(self) -> bytes:
        return json.dumps(
            {
                "turns": [
                    {**dataclasses.asdict(turn), "time": turn.time.isoformat()}
                    for turn in self.turns
                ],
                "assistant": self.assistant,
                "user": self.user_id,
                "source": self.source,
                "policy": base64.b64encode(self.policy).decode(),
                "model": base64.b64encode(self.model).decode(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def loads(cls, data: bytes) -> Exchange:
        raw = json.loads(data)
        return cls(
            turns=tuple(
                Turn(
                    t["run"], t["input_message"], t["output_message"], _time(t["time"]) or _epoch()
                )
                for t in raw["turns"]
            ),
            assistant=raw["assistant"],
            user_id=raw["user"],
            source=raw["source"],
            policy=base64.b64decode(raw["policy"]),
            model=base64.b64decode(raw["model"]),
        )

    def adding(self, turn: Turn) -> Exchange:
        """With ``turn`` too (once), as the latest exchange's policy says."""
        if any(t.run == turn.run for t in self.turns):
            return self
        return dataclasses.replace(self, turns=(*self.turns, turn))

    def without(self, runs: Sequence[str]) -> Exchange:
        return dataclasses.replace(self, turns=tuple(t for t in self.turns if t.run not in runs))

    def only(self, runs: Sequence[str]) -> Exchange:
        return dataclasses.replace(self, turns=tuple(t for t in self.turns if t.run in runs))


def _epoch() -> dt.datetime:
    return dt.datetime.fromtimestamp(0, dt.UTC)


@dataclass(frozen=True)
class Decision:
    """One decision, as stored and applied. ``scope``: the parent its item lives in;
    ``target``: the item it replaces or retires; ``item``: the id it creates."""

    action: str
    scope: str
    content: str
    category: int
    confidence: float
    valid_from: dt.datetime | None
    target: str = ""
    reason: str = ""
    item: str = ""


@dataclass
class Plan:
    """The decisions of one round of forming, and how many were applied."""

    key: str
    #: ``provider/model`` that decided.
    model: str
    decisions: list[Decision] = field(default_factory=list)
    done: int = 0
    #: The runs whose exchanges it formed (an idle conversation's job may have
    #: gained others since; they are formed by a round of their own).
    runs: list[str] = field(default_factory=list)

    def dumps(self) -> bytes:
        return json.dumps(
            {
                "key": self.key,
                "model": self.model,
                "done": self.done,
                "runs": self.runs,
                "decisions": [
                    {**dataclasses.asdict(d), "valid_from": _iso(d.valid_from)}
                    for d in self.decisions
                ],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def loads(cls, data: bytes) -> Plan:
        raw: dict[str, Any] = json.loads(data)
        return cls(
            key=raw["key"],
            model=raw["model"],
            done=int(raw["done"]),
            runs=list(raw.get("runs", [])),
            decisions=[
                Decision(**{**d, "valid_from": _time(d["valid_from"])}) for d in raw["decisions"]
            ],
        )


def scope_of(category: int, workspace_id: str, user_id: str) -> str:
    """Where a fact of ``category`` is kept: the user's scope or the workspace's."""
    return f"users/{user_id}" if category in USER_CATEGORIES else f"workspaces/{workspace_id}"


def plan_key(job_id: str, exchange: bytes) -> str:
    """A round's key: its job and exactly the exchanges it formed."""
    return hashlib.sha256(job_id.encode() + b"\0" + exchange).hexdigest()


def decide(
    key: str,
    model: str,
    candidates: Sequence[Candidate],
    choices: Sequence[Choice],
    shown: Sequence[Mapping[str, str]],
    scopes: Sequence[str],
    room: Mapping[str, int],
) -> Plan:
    """The plan of the model's ``choices``: ``shown[i]`` maps the handles shown with
    candidate ``i`` to item names, ``scopes[i]`` is its scope, ``room`` how many
    more formed items each scope may hold (an addition past it is NONE, "scope
    full"; an update takes no room: one comes, one goes)."""
    left = dict(room)
    decisions: list[Decision] = []
    retired: set[str] = set()
    for index, (candidate, choice) in enumerate(zip(candidates, choices, strict=True)):
        scope = scopes[index]
        target = shown[index].get(choice.target, "") if choice.target else ""
        action, reason = choice.action, choice.reason
        if target and target in retired:
            # Two candidates of one exchange replacing one item: the second adds.
            action, target = ("add", "") if action == "update" else ("none", "")
            reason = reason or "already retired by this exchange"
        if action == "add" and left.get(scope, 0) <= 0:
            action, reason = "none", "scope full"
        if action == "add":
            left[scope] = left.get(scope, 0) - 1
        if target:
            retired.add(target)
        decisions.append(
            Decision(
                action=action,
                scope=scope,
                content=candidate.content,
                category=candidate.category,
                confidence=candidate.confidence,
                valid_from=candidate.valid_from,
                target=target,
                reason=reason,
                item=item_id(key, index) if action in ("add", "update") else "",
            )
        )
    return Plan(key=key, model=model, decisions=decisions)


__all__ = [
    "CONSOLIDATE",
    "DECIDED",
    "FORM",
    "PAUSED",
    "PENDING",
    "Decision",
    "Exchange",
    "Plan",
    "Turn",
    "consolidate_job_id",
    "decide",
    "form_job_id",
    "item_id",
    "plan_key",
    "scope_of",
]
