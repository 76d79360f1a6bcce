"""The context-window planner: which memories and messages a handler gets.

Pure: it sees only keys, token counts, expiry and the tool call ids a message
makes or answers, so every rule below can be checked by property tests
without a database.

Inputs:

- ``pinned``: memories that must always be shown, in the order to show them.
- ``relevant``: memories retrieved for this turn, in rank order (best first).
- ``retrieved``: search results retrieved for this turn (memory items, messages,
  document passages; ``GetContextWindowRequest.retrieval``), in rank order, with
  their own cap ``retrieved_budget``.
- ``summary``: the conversation's rolling summary, if any.
- ``recent``: messages, **newest first**, as loaded from the store.
- ``older_messages``: live messages older than the last ``recent`` candidate
  that were not loaded (the store loads a bounded page, not the whole history).

Rules, applied in this order:

1. Expired candidates (in any slot) are never included; each goes to
   ``excluded`` with ``Reason.EXPIRED``. An expired message is not a live
   message, so it is never counted in ``omitted_messages``.
2. Every non-expired pinned candidate is included, in the given order. If
   together they exceed the budget, ``PinnedOverBudget`` is raised: silently
   dropping something the user pinned would be worse than failing loudly.
3. Relevant memories, in rank order, each included if it fits both the
   remaining budget and a cap of ``int(budget * relevant_share)`` tokens for all
   relevant items together (so retrieval cannot crowd out the conversation).
   One that does not fit goes to ``excluded`` with ``OVER_BUDGET`` and the next
   ones are still tried: memories are independent of each other. A relevant
   candidate whose key is also pinned is dropped without a trace, as the pinned
   slot already decided it. (Generally, the first candidate with a given key
   among ``pinned`` then ``relevant`` decides that memory; later repeats are
   dropped, so no memory is ever listed twice.)
3b. Retrieved results, in rank order, like relevant memories but under their own
   cap ``retrieved_budget`` (and the remaining budget): each included if it fits,
   else ``excluded`` with ``OVER_BUDGET``. A key already decided (a memory
   pinned or relevant) is dropped without a trace, so nothing is shown twice.
4. The summary, if it fits; otherwise ``excluded`` with ``OVER_BUDGET``.
5. Recent messages, newest first, while they fit. The first one that does not
   fit whole is included cut down to the budget left (``Choice.truncated``,
   ``Choice.tokens`` the budget left) if it has documents to cut and its
   ``floor`` (its tokens with every document cut to its note) fits; at most
   one message is cut. Otherwise, and for the next one that does not fit
   after a cut, it goes to ``excluded`` with ``OVER_BUDGET``; every live
   message older than it (the rest of ``recent`` and ``older_messages``) is
   counted in ``omitted_messages`` and not listed. Included messages are
   therefore always a contiguous run of the newest live messages: a
   conversation with a hole in the middle would mislead the model.
6. A tool result is never shown without its call. An assistant message's tool
   calls (``calls``) and the tool messages answering them (``answers``) are a
   unit, so the run of messages from rule 5 loses its oldest messages, up to
   and including the newest tool message that answers a call not made before
   it in the run, if that call is known to be left out (a candidate outside
   the run made it) or the tool message would be the first of the run. The
   run stays contiguous, and a handler never reads a result whose call it
   cannot see (chat APIs reject that, and it misleads a model). What is taken
   away goes to ``excluded`` with ``OVER_BUDGET`` (its calls did not fit, or
   were pruned away), newest first, ahead of the message that did not fit.
   A tool message further in whose call is unknown (never stored) stays:
   cutting all the history before it would cost more than it saves.

``included`` is in reading order for a handler: pinned, relevant (rank order),
retrieved (rank order), the summary, then messages oldest first (chronological).
``excluded`` is in the order the decisions were made (pinned, relevant,
retrieved, summary, messages newest first). ``total_tokens`` is the sum of
``Choice.tokens`` over ``included`` and never exceeds the budget. A budget of 0
with nothing pinned is valid: everything is excluded or omitted. A negative
budget, token count, ``older_messages``, ``retrieved_budget`` or a
``relevant_share`` outside ``[0, 1]`` raises ``ValueError``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass


class Reason(enum.Enum):
    """Why a candidate is in ``Plan.included`` or ``Plan.excluded``."""

    PINNED = "pinned"
    RELEVANT = "relevant"
    SUMMARY = "summary"
    RECENT = "recent"
    RETRIEVED = "retrieved"
    OVER_BUDGET = "over_budget"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Candidate:
    """Something that could go into a window: its key, its cost, and whether it expired.

    For messages, ``calls`` are the ids of the tool calls it makes (an assistant
    message) and ``answers`` the ids of the calls it answers (a tool message);
    ``floor`` is the fewest tokens it can be cut to when it holds documents
    (each cut to a note saying so), ``None`` when it cannot be cut.
    """

    key: str
    tokens: int
    expired: bool = False
    calls: frozenset[str] = frozenset()
    answers: frozenset[str] = frozenset()
    floor: int | None = None


@dataclass(frozen=True)
class Choice:
    """One decision of the planner about one candidate; ``shown`` is what a
    message cut to fit may take (``None``: all of it)."""

    candidate: Candidate
    reason: Reason
    shown: int | None = None

    @property
    def tokens(self) -> int:
        """The tokens it takes in the window."""
        return self.candidate.tokens if self.shown is None else self.shown

    @property
    def truncated(self) -> bool:
        return self.shown is not None


@dataclass(frozen=True)
class Plan:
    """A planned window; see the module docstring for the order of each tuple."""

    included: tuple[Choice, ...]
    excluded: tuple[Choice, ...]
    total_tokens: int
    omitted_messages: int


class PinnedOverBudget(Exception):
    """The live pinned memories alone need more tokens than the window's budget."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(
            f"pinned memories need {needed} tokens but the window's budget is {budget}"
        )
        self.needed = needed
        self.budget = budget


def _validate(
    budget: int,
    older_messages: int,
    relevant_share: float,
    slots: Sequence[tuple[str, Sequence[Candidate]]],
) -> None:
    if budget < 0:
        raise ValueError(f"budget must not be negative, got {budget}")
    if older_messages < 0:
        raise ValueError(f"older_messages must not be negative, got {older_messages}")
    # `not (0 <= x <= 1)` rather than `x < 0 or x > 1` so NaN is refused too.
    if not (0.0 <= relevant_share <= 1.0):
        raise ValueError(f"relevant_share must be within [0, 1], got {relevant_share}")
    for slot, candidates in slots:
        for candidate in candidates:
            if candidate.tokens < 0:
                raise ValueError(
                    f"{slot} candidate {candidate.key!r} has negative tokens ({candidate.tokens})"
                )
            floor = candidate.floor
            if floor is not None and not (0 <= floor <= candidate.tokens):
                raise ValueError(
                    f"{slot} candidate {candidate.key!r} has a floor ({floor}) outside "
                    f"[0, {candidate.tokens}]"
                )


class _Planner:
    """The running state of one plan: what is decided so far and the tokens used."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.included: list[Choice] = []
        self.excluded: list[Choice] = []
        # A memory is shown at most once: the first candidate with a key decides it.
        self.seen_keys: set[str] = set()

    def fits(self, candidate: Candidate) -> bool:
        return self.used + candidate.tokens <= self.budget

    def include(self, candidate: Candidate, reason: Reason, shown: int | None = None) -> None:
        choice = Choice(candidate, reason, shown)
        self.included.append(choice)
        self.used += choice.tokens

    def exclude(self, candidate: Candidate, reason: Reason) -> None:
        self.excluded.append(Choice(candidate, reason))

    def first_time(self, candidate: Candidate) -> bool:
        if candidate.key in self.seen_keys:
            return False
        self.seen_keys.add(candidate.key)
        return True

    def pinned(self, pinned: Sequence[Candidate]) -> None:
        unique = [c for c in pinned if self.first_time(c)]
        needed = sum(c.tokens for c in unique if not c.expired)
        if needed > self.budget:
            raise PinnedOverBudget(needed, self.budget)
        for candidate in unique:
            if candidate.expired:
                self.exclude(candidate, Reason.EXPIRED)
            else:
                self.include(candidate, Reason.PINNED)

    def relevant(
        self, relevant: Sequence[Candidate], cap: int, reason: Reason = Reason.RELEVANT
    ) -> None:
        used = 0
        for candidate in relevant:
            if not self.first_time(candidate):
                continue
            if candidate.expired:
                self.exclude(candidate, Reason.EXPIRED)
            elif self.fits(candidate) and used + candidate.tokens <= cap:
                self.include(candidate, reason)
                used += candidate.tokens
            else:
                self.exclude(candidate, Reason.OVER_BUDGET)

    def summary(self, summary: Candidate) -> None:
        if summary.expired:
            self.exclude(summary, Reason.EXPIRED)
        elif self.fits(summary):
            self.include(summary, Reason.SUMMARY)
        else:
            self.exclude(summary, Reason.OVER_BUDGET)

    def recent(self, recent: Sequence[Candidate]) -> int:
        """Decide the messages (newest first); return how many live ones were cut off."""
        # The newest live messages that fit (rule 5), as indexes, newest first.
        fitting: list[int] = []
        cut = len(recent)
        used = self.used
        # The one message cut to fit, and what it may take.
        shrunk: tuple[int, int] | None = None
        for index, candidate in enumerate(recent):
            if candidate.expired:
                continue
            if used + candidate.tokens > self.budget:
                floor = candidate.floor
                if shrunk is None and floor is not None and used + floor <= self.budget:
                    shrunk = (index, self.budget - used)
                    fitting.append(index)
                    used = self.budget
                    continue
                cut = index
                break
            fitting.append(index)
            used += candidate.tokens
        chosen = set(fitting)
        left_out = {
            call
            for index, candidate in enumerate(recent)
            if index not in chosen
            for call in candidate.calls
        }
        run = [recent[index] for index in reversed(fitting)]
        separated = set(fitting[len(fitting) - _separated(run, left_out) :])
        first_included = len(self.included)
        omitted = 0
        for index, candidate in enumerate(recent):
            if candidate.expired:
                self.exclude(candidate, Reason.EXPIRED)
            elif index > cut:
                omitted += 1
            elif index == cut or index in separated:
                self.exclude(candidate, Reason.OVER_BUDGET)
            elif shrunk is not None and index == shrunk[0]:
                self.include(candidate, Reason.RECENT, shrunk[1])
            else:
                self.include(candidate, Reason.RECENT)
        # Decided newest first; a handler reads the conversation in order.
        self.included[first_included:] = reversed(self.included[first_included:])
        return omitted


def _separated(run: Sequence[Candidate], left_out: set[str]) -> int:
    """How many of the oldest messages of ``run`` (oldest first) rule 6 leaves out.

    ``left_out`` holds the call ids made by candidates outside ``run``.
    """
    start = 0
    made: set[str] = set()
    left_out = set(left_out)  # grows with what is cut; the caller's set stays as it was
    for index, candidate in enumerate(run):
        missing = candidate.answers - made
        if missing and (index == start or not missing.isdisjoint(left_out)):
            # Cut after it: calls made by what is cut are now left out too.
            for dropped in run[start : index + 1]:
                left_out |= dropped.calls
            start = index + 1
            made = set()
        else:
            made |= candidate.calls
    return start


def plan_window(
    *,
    budget: int,
    pinned: Sequence[Candidate],
    relevant: Sequence[Candidate],
    summary: Candidate | None,
    recent: Sequence[Candidate],
    older_messages: int = 0,
    relevant_share: float = 0.25,
    retrieved: Sequence[Candidate] = (),
    retrieved_budget: int = 0,
) -> Plan:
    """Plan a context window of at most ``budget`` tokens (rules in the module docstring)."""
    _validate(
        budget,
        older_messages,
        relevant_share,
        [
            ("pinned", pinned),
            ("relevant", relevant),
            ("retrieved", retrieved),
            ("summary", [summary] if summary is not None else []),
            ("recent", recent),
        ],
    )
    planner = _Planner(budget)
    planner.pinned(pinned)
    # floor() rather than int(): identical for the non-negative values allowed,
    # and it says that the cap rounds down (never over the share).
    planner.relevant(relevant, math.floor(budget * relevant_share))
    if retrieved:
        if retrieved_budget < 0:
            raise ValueError(f"retrieved_budget must not be negative, got {retrieved_budget}")
        planner.relevant(retrieved, retrieved_budget, Reason.RETRIEVED)
    if summary is not None:
        planner.summary(summary)
    omitted = planner.recent(recent)
    return Plan(
        included=tuple(planner.included),
        excluded=tuple(planner.excluded),
        total_tokens=planner.used,
        omitted_messages=omitted + older_messages,
    )
