"""Counts in messages, in their number: "1 budget", "2 budgets", never "budget(s)"."""

from __future__ import annotations


def noun(count: int, singular: str, plural: str = "") -> str:
    """``singular`` for one, else ``plural`` (``singular`` + "s" when not given); a verb
    that agrees with a count too: ``noun(n, "waits", "wait")``."""
    return singular if count == 1 else plural or f"{singular}s"


def counted(count: int, singular: str, plural: str = "") -> str:
    """``count`` and its noun: "1 tool call", "3 tool calls", "0 files"."""
    return f"{count:,} {noun(count, singular, plural)}"
