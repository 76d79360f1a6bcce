"""WatchRun's two sources, driven with the sequences issue 67 saw.

Another replica's run (``queries._InOrder``): its tokens come over Redis pub/sub and its
logged updates over the stream, two connections read by two tasks, so a token can reach
this process after the logged update that follows it (a delta right before a progress
update: the echo handler yields both in one go). The relay waits a moment for it instead
of passing over it.

This process's feed (``feed.Feed``): a watcher behind what the feed holds starts from a
state change that stands where the feed begins, never from the run as it stands now
(an ended run's SUCCEEDED followed by its whole attempt again).
"""

from __future__ import annotations

import asyncio

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.runs.core.active import feed as feeds
from switchboard.dispatcher.runs.core.active.live import SEQUENCE_BLOCK
from switchboard.dispatcher.runs.reading.queries import _InOrder, _overdue, _ready

pytestmark = pytest.mark.unit

RUN = "workspaces/w/conversations/c/runs/r"
#: Where issue 67's second attempt was when it lost "w13": its first sequences.
BLOCK: int = SEQUENCE_BLOCK


def _delta(sequence: int, text: str = "") -> pb.RunUpdate:
    update = pb.RunUpdate(run=RUN, sequence=sequence)
    update.delta.text = text or f" t{sequence}"
    return update


def _progress(sequence: int) -> pb.RunUpdate:
    update = pb.RunUpdate(run=RUN, sequence=sequence)
    update.progress.stage = "echoing"
    return update


def _state(sequence: int, state: int = pb.RUN_STATE_RUNNING) -> pb.RunUpdate:
    update = pb.RunUpdate(run=RUN, sequence=sequence)
    update.state_change.run.name = RUN
    update.state_change.run.state = state  # type: ignore[assignment]
    update.state_change.run.last_sequence = sequence
    update.time.FromNanoseconds(sequence)
    return update


def _sequences(updates: list[pb.RunUpdate]) -> list[int]:
    return [u.sequence for u in updates]


def test_a_token_heard_after_the_logged_update_that_follows_it_is_relayed() -> None:
    # Issue 67: ...13 delta went out, the progress update 15 came over the stream before
    # the delta 14 came over pub/sub; 14 was passed over and the stream ended "OK".
    order = _InOrder(BLOCK + 13)
    assert order.take(_progress(BLOCK + 15)) == []
    assert _sequences(order.take(_delta(BLOCK + 14, " w13"))) == [BLOCK + 14, BLOCK + 15]
    assert order.position == BLOCK + 15
    assert not order.early


def test_with_merged_deltas_the_late_token_is_in_the_merge_and_nothing_is_skipped() -> None:
    order = _InOrder(12)
    queue: asyncio.Queue[pb.RunUpdate] = asyncio.Queue()
    assert _ready(order, _delta(13), queue, merge=True)[0].sequence == 13
    queue.put_nowait(_delta(15))
    assert _ready(order, _progress(16), queue, merge=True) == []
    ready = _ready(order, _delta(14), queue, merge=True)
    assert [(u.first_sequence or u.sequence, u.sequence) for u in ready] == [(14, 15), (16, 16)]
    assert ready[0].delta.text == " t14 t15"


def test_what_never_comes_leaves_a_gap_after_a_bounded_wait_that_more_tokens_do_not_extend() -> (
    None
):
    now = [100.0]
    order = _InOrder(2, clock=lambda: now[0])
    assert order.take(_delta(4)) == []
    due = order.due
    assert due > now[0]
    now[0] += 0.01
    for sequence in (5, 6, 7):
        assert order.take(_delta(sequence)) == []
    assert order.due == due  # a stream going on does not hold the others back for ever
    assert order.take(_progress(8)) == []
    # 3 is not coming: what waited goes out in order, the gap showing where it was.
    assert _sequences(order.flush()) == [4, 5, 6, 7, 8]
    assert _sequences(order.take(_delta(9))) == [9]
    assert order.take(_delta(3)) == []  # too late: its place has gone by


@pytest.mark.parametrize("merge", [False, True])
def test_a_token_that_came_while_the_watcher_was_slow_to_read_is_not_passed_over(
    merge: bool,
) -> None:
    # The progress update 4 came before the delta 3 ahead of it and waited; 3 came too,
    # but the time ran out while the watcher was still reading what went before (the
    # relay was writing, not waiting on its queue): 3 was in the queue, and went by.
    now = [100.0]
    order = _InOrder(2, clock=lambda: now[0])
    queue: asyncio.Queue[pb.RunUpdate] = asyncio.Queue()
    assert order.take(_progress(4)) == []
    queue.put_nowait(_delta(3))
    queue.put_nowait(_delta(5))
    now[0] = order.due + 1
    ready = _overdue(order, queue, merge)
    assert [(u.first_sequence or u.sequence, u.sequence) for u in ready] == [(3, 3), (4, 4), (5, 5)]
    assert not order.early
    assert order.position == 5


def test_when_it_is_not_in_the_queue_what_waited_goes_out_with_the_gap() -> None:
    now = [100.0]
    order = _InOrder(2, clock=lambda: now[0])
    queue: asyncio.Queue[pb.RunUpdate] = asyncio.Queue()
    assert order.take(_progress(4)) == []
    queue.put_nowait(_delta(6))
    now[0] = order.due + 1
    assert _sequences(_overdue(order, queue, merge=False)) == [4, 6]
    assert order.take(_delta(3)) == []  # too late: its place has gone by


def test_a_new_attempt_does_not_wait_for_the_rest_of_the_old_one() -> None:
    # The dead owner's last deltas never come; the new block opens at its first sequence.
    order = _InOrder(17)
    queued = _state(BLOCK + 1, pb.RUN_STATE_QUEUED)
    assert _sequences(order.take(queued)) == [BLOCK + 1]
    assert order.take(_delta(18)) == []  # the old attempt's, heard late
    assert _sequences(order.take(_state(BLOCK + 2))) == [BLOCK + 2]


def test_what_waited_of_the_old_attempt_goes_out_before_the_new_attempt_opens() -> None:
    # A late delta of the old attempt waits for the one before it; then the new block
    # opens. Sequences only go up: the waiting delta goes out first (never after the new
    # attempt's first update, which moved the position back and made the next one wait).
    order = _InOrder(17)
    assert order.take(_delta(19)) == []
    queued = _state(BLOCK + 1, pb.RUN_STATE_QUEUED)
    assert _sequences(order.take(queued)) == [19, BLOCK + 1]
    assert not order.early
    assert order.due == 0.0
    assert order.flush() == []
    assert _sequences(order.take(_state(BLOCK + 2))) == [BLOCK + 2]


def _recovered_feed() -> feeds.Feed:
    """A run recovered with ``requeue``, its second attempt ended: QUEUED, RUNNING, a
    pause for a person, RUNNING, the result and SUCCEEDED, in block 1."""
    feed = feeds.Feed(RUN, max_updates=100, first=BLOCK + 1)
    for state in (
        pb.RUN_STATE_QUEUED,
        pb.RUN_STATE_RUNNING,
        pb.RUN_STATE_REQUIRES_ACTION,
        pb.RUN_STATE_RUNNING,
    ):
        feed.append(_state(0, state))
    feed.append(_delta(0, "the answer"))
    feed.append(_state(0, pb.RUN_STATE_SUCCEEDED))
    feed.finish()
    return feed


def test_a_recovered_runs_feed_opens_with_the_state_change_that_began_its_attempt() -> None:
    feed = _recovered_feed()
    # Nothing to add before it: its first update carries the whole run as it stood.
    assert feed.opening() is None
    assert feed.updates[0].sequence == BLOCK + 1


def test_a_trimmed_feed_opens_with_the_run_as_it_stood_where_it_was_cut() -> None:
    feed = feeds.Feed(RUN, max_updates=8)
    feed.append(_state(0, pb.RUN_STATE_QUEUED))
    running = feed.append(_state(0, pb.RUN_STATE_RUNNING))
    for _ in range(20):
        feed.append(_delta(0))
    feed.append(_state(0, pb.RUN_STATE_SUCCEEDED))
    assert feed.first > 2
    opening = feed.opening()
    assert opening is not None
    assert opening.sequence == feed.first - 1
    assert opening.state_change.run.state == pb.RUN_STATE_RUNNING  # not SUCCEEDED
    assert opening.state_change.run.last_sequence == feed.first - 1
    assert opening.time == running.time
    assert running.sequence == 2  # the kept update itself is not changed
