"""Pruning plans: how many of a conversation's oldest live messages to archive.

Pure: the store passes token counts of the live messages, oldest first, and
archives the prefix this module returns. Archived messages leave the live
history (and so every future context window); they are not deleted.

Automatic pruning has hysteresis: it triggers when a conversation goes over
its maximum and then prunes down to a fraction (by default 75%) of it, so it
runs once per many appends instead of on every append at the limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

DEFAULT_AUTO_PRUNE_TARGET: Final = 0.75


@dataclass(frozen=True)
class PruneLimits:
    """What to keep: at most this many newest messages and tokens; 0 means no limit."""

    keep_last_messages: int = 0
    max_tokens: int = 0

    def __post_init__(self) -> None:
        if self.keep_last_messages < 0 or self.max_tokens < 0:
            raise ValueError(f"prune limits must not be negative: {self}")


def plan_prune(tokens_oldest_first: Sequence[int], limits: PruneLimits) -> int:
    """Return how many of the oldest messages to archive.

    What is kept is the longest run of newest messages within both limits,
    except that the newest message is never archived, even when it alone is
    over ``max_tokens``: a conversation must keep the turn being answered.
    The plan is idempotent: pruning what is kept again archives nothing.
    """
    if any(tokens < 0 for tokens in tokens_oldest_first):
        raise ValueError("message token counts must not be negative")
    count = len(tokens_oldest_first)
    if count == 0:
        return 0
    max_messages = limits.keep_last_messages or count
    max_tokens = limits.max_tokens or math.inf
    kept = 1
    kept_tokens = tokens_oldest_first[-1]
    # Walk back from the newest; stop at the first message that breaks a limit,
    # since what is kept must be a suffix (no holes in a conversation).
    while kept < min(count, max_messages):
        tokens = tokens_oldest_first[count - 1 - kept]
        if kept_tokens + tokens > max_tokens:
            break
        kept += 1
        kept_tokens += tokens
    return count - kept


def needs_auto_prune(count: int, tokens: int, max_messages: int, max_tokens: int) -> bool:
    """Whether a conversation of ``count`` live messages and ``tokens`` is over a
    configured maximum (0 means that axis has no maximum)."""
    return (0 < max_messages < count) or (0 < max_tokens < tokens)


def auto_prune_limits(
    max_messages: int, max_tokens: int, target: float = DEFAULT_AUTO_PRUNE_TARGET
) -> PruneLimits:
    """Limits that prune a conversation to ``target`` of each configured maximum.

    Pruning down to exactly the maximum would trigger again on the next append;
    the gap between ``target`` and the maximum is how many appends (or tokens)
    pass before the next automatic prune. Each non-zero maximum gives a limit of
    at least 1, because a limit of 0 would mean "no limit".
    """
    if max_messages < 0 or max_tokens < 0:
        raise ValueError("maximums must not be negative")
    # `not (0 < x <= 1)` also refuses NaN.
    if not (0.0 < target <= 1.0):
        raise ValueError(f"target must be within (0, 1], got {target}")
    return PruneLimits(
        keep_last_messages=max(1, math.floor(max_messages * target)) if max_messages else 0,
        max_tokens=max(1, math.floor(max_tokens * target)) if max_tokens else 0,
    )
