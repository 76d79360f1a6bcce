"""The one check of a ``MemoryPolicy`` (docs/memory.md, "Policy"), and what a policy
means once checked: the workspace's default (context) and an assistant's
(dispatcher) take the same rules, so they are written once, here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.platform.errors import Violations
from switchboard.platform.values import timefields

#: Bounds of a policy's numbers, as the contract states them.
MAX_IDLE_MINUTES: Final = 1440
MAX_CANDIDATES: Final = 20
DEFAULT_CANDIDATES: Final = 5
DEFAULT_MAX_ITEMS: Final = 200
MIN_TTL_S: Final = 60.0
MAX_TTL_S: Final = 10 * 366 * 86400.0
MAX_NAME_CHARS: Final = 200

#: Which scope and memory kind each category is kept under.
USER_CATEGORIES: Final = frozenset(
    {
        pb.MEMORY_CATEGORY_PREFERENCES,
        pb.MEMORY_CATEGORY_PERSON_FACTS,
        pb.MEMORY_CATEGORY_PLANS,
    }
)
CATEGORY_KINDS: Final[dict[int, int]] = {
    pb.MEMORY_CATEGORY_PREFERENCES: pb.MEMORY_KIND_PREFERENCE,
    pb.MEMORY_CATEGORY_PERSON_FACTS: pb.MEMORY_KIND_FACT,
    pb.MEMORY_CATEGORY_PLANS: pb.MEMORY_KIND_PLAN,
    pb.MEMORY_CATEGORY_WORKSPACE_FACTS: pb.MEMORY_KIND_FACT,
}
#: The categories' names as a model reads them (the forming schema's enum).
CATEGORY_WORDS: Final[dict[int, str]] = {
    pb.MEMORY_CATEGORY_PREFERENCES: "preference",
    pb.MEMORY_CATEGORY_PERSON_FACTS: "person_fact",
    pb.MEMORY_CATEGORY_PLANS: "plan",
    pb.MEMORY_CATEGORY_WORKSPACE_FACTS: "workspace_fact",
}
_USER_MODES: Final = frozenset(
    {pb.MEMORY_FORMING_MODE_USER, pb.MEMORY_FORMING_MODE_USER_AND_WORKSPACE}
)
_WORKSPACE_MODES: Final = frozenset(
    {pb.MEMORY_FORMING_MODE_WORKSPACE, pb.MEMORY_FORMING_MODE_USER_AND_WORKSPACE}
)


def check_policy(
    policy: pb.MemoryPolicy, field: str, violations: Violations, *, max_items: int
) -> None:
    """Adds a violation under ``field`` for each rule ``policy`` breaks; ``max_items``:
    the server's limit on items per scope."""
    if policy.mode not in pb.MemoryFormingMode.values():
        violations.add(f"{field}.mode", "is not a memory forming mode")
    for name in ("provider", "model"):
        if len(getattr(policy, name)) > MAX_NAME_CHARS:
            violations.add(f"{field}.{name}", f"must be at most {MAX_NAME_CHARS} characters")
    if not 0 <= policy.idle_minutes <= MAX_IDLE_MINUTES:
        violations.add(f"{field}.idle_minutes", f"must be 0 to {MAX_IDLE_MINUTES}")
    if not 0 <= policy.max_candidates <= MAX_CANDIDATES:
        violations.add(f"{field}.max_candidates", f"must be 0 to {MAX_CANDIDATES}")
    if not 0 <= policy.max_items <= max_items:
        violations.add(f"{field}.max_items", f"must be 0 to {max_items}")
    _check_categories(policy, field, violations)


def _check_categories(policy: pb.MemoryPolicy, field: str, violations: Violations) -> None:
    if len(policy.categories) > len(CATEGORY_KINDS):
        violations.add(f"{field}.categories", f"has more than {len(CATEGORY_KINDS)} entries")
    seen: set[int] = set()
    for index, rule in enumerate(policy.categories):
        where = f"{field}.categories[{index}]"
        if rule.category not in CATEGORY_KINDS:
            violations.add(f"{where}.category", "is not a memory category")
        elif rule.category in seen:
            violations.add(f"{where}.category", "is listed twice")
        seen.add(rule.category)
        if rule.HasField("ttl"):
            try:
                ttl = timefields.seconds(rule.ttl, f"{where}.ttl")
            except Exception:  # noqa: BLE001 - reported as the field's violation
                violations.add(f"{where}.ttl", "is out of range")
                continue
            if not MIN_TTL_S <= ttl <= MAX_TTL_S:
                violations.add(f"{where}.ttl", "must be a minute to ten years")


@dataclass(frozen=True)
class Effective:
    """A policy as forming applies it."""

    user: bool
    workspace: bool
    #: Category to its time to live in seconds (None: for ever), only those allowed.
    categories: dict[int, float | None]
    max_candidates: int
    max_items: int
    idle_minutes: int
    provider: str
    model: str

    @property
    def on(self) -> bool:
        return bool(self.categories)


def effective(policy: pb.MemoryPolicy) -> Effective:
    """What ``policy`` (checked) keeps: the categories its mode's scopes allow."""
    user = policy.mode in _USER_MODES
    workspace = policy.mode in _WORKSPACE_MODES
    allowed = {
        category
        for category in CATEGORY_KINDS
        if (user if category in USER_CATEGORIES else workspace)
    }
    chosen: dict[int, float | None] = {}
    if policy.categories:
        for rule in policy.categories:
            if rule.category in allowed:
                chosen[rule.category] = (
                    rule.ttl.ToTimedelta().total_seconds() if rule.HasField("ttl") else None
                )
    else:
        chosen = dict.fromkeys(sorted(allowed))
    return Effective(
        user=user,
        workspace=workspace,
        categories=chosen,
        max_candidates=policy.max_candidates or DEFAULT_CANDIDATES,
        max_items=policy.max_items or DEFAULT_MAX_ITEMS,
        idle_minutes=policy.idle_minutes,
        provider=policy.provider,
        model=policy.model,
    )


def applies(
    assistant: pb.MemoryPolicy | None, workspace: pb.MemoryPolicy | None
) -> tuple[pb.MemoryPolicy, str]:
    """The policy that applies to a run, and whose it is (``assistant`` or
    ``workspace``): the assistant's unless its mode is UNSPECIFIED."""
    if assistant is not None and assistant.mode != pb.MEMORY_FORMING_MODE_UNSPECIFIED:
        return assistant, "assistant"
    return (workspace or pb.MemoryPolicy()), "workspace"


def expiry(created: dt.datetime, ttl_s: float | None) -> dt.datetime | None:
    """When an item of a category with ``ttl_s`` created at ``created`` expires."""
    return None if ttl_s is None else created + dt.timedelta(seconds=ttl_s)


__all__ = [
    "CATEGORY_KINDS",
    "CATEGORY_WORDS",
    "USER_CATEGORIES",
    "Effective",
    "applies",
    "check_policy",
    "effective",
    "expiry",
]
