"""A branch's history as ranges of sequences, and the SQL condition that reads it.

A conversation with one branch reads every message (the plain path: no condition,
nothing here runs). Once a message is edited or an answer regenerated, each branch is
a row (``models.BranchRow``): its own messages after its parent's first ``fork_seq``
sequences' worth of history, the parent's the same way up to branch 1. Sequences only
grow, so a branch's history is contiguous ranges, root first: the root branch's
messages up to its child's ``fork_seq``, the child's above that up to its own child's
``fork_seq``, and so on to the branch's own messages. Reading a branch is one
condition per ancestor; their number is bounded by the branches a conversation may
have (``SWITCHBOARD_CONTEXT_MAX_BRANCHES``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, false, or_

from switchboard.platform.store.models import MessageRow


@dataclass(frozen=True, slots=True)
class Branch:
    """One row of ``conversation_branches``."""

    number: int
    parent: int
    fork_seq: int
    head_seq: int


@dataclass(frozen=True, slots=True)
class Segment:
    """The messages of ``branch`` with a sequence in ``(after, upto]`` (``upto`` None:
    no end), of ``conversation`` ("" : the one read)."""

    branch: int
    after: int
    upto: int | None
    conversation: str = ""

    def holds(self, branch: int, seq: int) -> bool:
        return (
            branch == self.branch and seq > self.after and (self.upto is None or seq <= self.upto)
        )

    def clipped(self, bound: int) -> Segment | None:
        """The part at or below sequence ``bound`` (None: nothing)."""
        if self.after >= bound:
            return None
        upto = bound if self.upto is None else min(self.upto, bound)
        return Segment(self.branch, self.after, upto, self.conversation)

    def where(self, conversation: str) -> ColumnElement[bool]:
        return and_(
            MessageRow.conversation_id == (self.conversation or conversation),
            MessageRow.branch == self.branch,
            MessageRow.seq > self.after,
            *((MessageRow.seq <= self.upto,) if self.upto is not None else ()),
        )


@dataclass(frozen=True, slots=True)
class Path:
    """A branch's history: its segments of the conversation read, root first, after
    ``base``: a fork's shared history, segments of the conversations it was forked
    from (each names its conversation). ``every`` (one branch, not a fork): every
    message of the conversation, no condition at all."""

    branch: int
    segments: tuple[Segment, ...]
    every: bool = False
    base: tuple[Segment, ...] = ()

    def holds(self, branch: int, seq: int) -> bool:
        """Whether the message appended on ``branch`` with sequence ``seq`` is in it."""
        return self.every or any(s.holds(branch, seq) for s in self.segments)

    def owner(self, seq: int) -> int:
        """The branch whose message at ``seq`` the history holds (0 for seq 0)."""
        if seq <= 0:
            return 0
        if self.every:
            return self.branch
        for segment in self.segments:
            if segment.upto is None or seq <= segment.upto:
                return segment.branch
        return self.branch

    def condition(self, conversation: str) -> ColumnElement[bool]:
        """The messages of the history of ``conversation`` (the one read), as the whole
        WHERE condition on ``messages``: a fork's reads its shared history's rows in the
        conversations they belong to."""
        if self.every:
            return MessageRow.conversation_id == conversation
        parts = [s.where(conversation) for s in (*self.base, *self.segments)]
        return or_(*parts) if parts else false()

    def with_base(self, base: tuple[Segment, ...]) -> Path:
        """This history on top of a fork's shared one, which it holds up to where its
        root branch forked from it (the whole of it for branch 1's own history)."""
        bound = self.segments[0].upto if self.segments else None
        if self.segments and self.segments[0].branch != 1:
            return self  # a branch started with no history holds none of the base
        kept = tuple(c for c in (s.clipped(bound) if bound is not None else s for s in base) if c)
        return Path(self.branch, self.segments, self.every, kept)


def plain(branch: int = 1) -> Path:
    """The history of a conversation with one branch, not a fork: every message."""
    return Path(branch, (), every=True)


def path_of(branches: Mapping[int, Branch], number: int) -> Path:
    """``number``'s history from the conversation's branch rows."""
    chain: list[Branch] = []
    current = branches.get(number)
    while current is not None and len(chain) <= len(branches):
        chain.append(current)
        current = branches.get(current.parent) if current.parent else None
    segments: list[Segment] = []
    upto: int | None = None
    # Leaf first: each branch holds its own messages above its fork, up to where its
    # child (the one before it in the chain) forked.
    for branch in chain:
        segments.append(Segment(branch.number, branch.fork_seq, upto))
        upto = branch.fork_seq
    segments.reverse()
    # A branch forked at a sequence its parent's own messages start after holds none
    # of them: drop the empty ranges.
    kept = tuple(s for s in segments if s.upto is None or s.upto > s.after)
    return Path(number, kept)


def through(branches: Mapping[int, Branch], branch: int, seq: int) -> list[Branch]:
    """The branches whose history holds the message of ``branch`` at ``seq``."""
    return [b for b in branches.values() if path_of(branches, b.number).holds(branch, seq)]


def latest(candidates: Iterable[Branch]) -> Branch | None:
    """The branch that changed last (its newest message), the newer one on a tie."""
    return max(candidates, key=lambda b: (b.head_seq, b.number), default=None)
