"""Which text deltas of a run merge into one update: the one rule WatchRun and Subscribe share.

A stretch starts at a text delta and takes the deltas after it while they are the same
run's, their sequences follow each other (a gap is a token lost on its way from another
replica, which a merge must not hide: ``first_sequence`` or ``sequence`` is the last
plus one), and the joined text and the count stay within bounds, so one frame never
stands for an unbounded range (decisions 52, "Fewer frames").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb

#: A merged delta stops growing at this many characters (as the run's own merge of the
#: deltas a handler yields together: ``dispatcher/runs/execution/relay.py``) ...
MAX_MERGED_CHARS: Final = 16 * 1024
#: ... and at this many updates.
MAX_MERGED_UPDATES: Final = 256


def delta_stretch(updates: Sequence[pb.RunUpdate | None], start: int) -> int:
    """The index after the stretch of deltas that merge with the update at ``start``
    (``start + 1`` when it merges with nothing). ``None`` is something that is not a
    run's update (another event in a batch): it ends a stretch as a non-delta does."""
    first = updates[start]
    end = start + 1
    if first is None or not first.HasField("delta"):
        return end
    run, follows, chars = first.run, first.sequence + 1, len(first.delta.text)
    stop = min(len(updates), start + MAX_MERGED_UPDATES)
    while end < stop:
        after = updates[end]
        if (
            after is None
            or not after.HasField("delta")
            or after.run != run
            or (after.first_sequence or after.sequence) != follows
        ):
            break
        chars += len(after.delta.text)
        if chars > MAX_MERGED_CHARS:
            break
        follows = after.sequence + 1
        end += 1
    return end


def merge_into(merged: pb.RunUpdate, stretch: Sequence[pb.RunUpdate]) -> None:
    """Make ``merged`` (the stretch's last update, or a copy of its fields) stand for the
    whole ``stretch``: the first sequence it covers and the text theirs joined in order."""
    first = stretch[0]
    merged.first_sequence = first.first_sequence or first.sequence
    merged.delta.text = "".join(update.delta.text for update in stretch)
