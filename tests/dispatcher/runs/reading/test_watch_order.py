"""WatchRun of another replica's run (``queries._InOrder``): its tokens arrive over
their own channel and may overtake the logged update before them, or come after the
logged update that follows them."""

from __future__ import annotations

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.runs.reading import queries
from switchboard.dispatcher.runs.reading.queries import _InOrder

pytestmark = pytest.mark.unit


def _token(sequence: int) -> pb.RunUpdate:
    update = pb.RunUpdate(sequence=sequence)
    update.delta.text = f"t{sequence}"
    return update


def _logged(sequence: int) -> pb.RunUpdate:
    update = pb.RunUpdate(sequence=sequence)
    update.state_change.run.state = pb.RUN_STATE_RUNNING
    return update


def _sequences(updates: list[pb.RunUpdate]) -> list[int]:
    return [u.sequence for u in updates]


def test_a_token_that_overtook_waits_for_the_update_before_it() -> None:
    order = _InOrder(1)
    assert order.take(_token(3)) == []
    assert order.take(_token(4)) == []
    assert _sequences(order.take(_logged(2))) == [2, 3, 4]
    assert _sequences(order.take(_token(5))) == [5]
    assert order.take(_token(5)) == []  # heard twice: once is enough
    assert not order.early


def test_a_logged_update_waits_for_a_token_ahead_of_it_then_leaves_the_gap() -> None:
    # Issue 67: the token before a logged update came after it (two channels); it
    # waits a moment for that token, and a lost one leaves a gap, never a stall.
    order = _InOrder(2)
    assert order.take(_token(4)) == []
    assert order.take(_logged(6)) == []
    assert _sequences(order.take(_token(3))) == [3, 4]
    assert _sequences(order.flush()) == [6]
    assert order.position == 6


def test_tokens_whose_predecessor_never_comes_go_out_in_order() -> None:
    order = _InOrder(2)
    order.take(_token(7))
    order.take(_token(6))
    assert _sequences(order.flush()) == [6, 7]
    assert _sequences(order.take(_token(8))) == [8]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_token_ahead_of_the_log_waits_for_the_logged_updates_before_it() -> None:
    # On a busy host the log's reader lags pub/sub by seconds: a token that came before
    # a tool call's update waits for it well past the moment a logged update waits for a
    # token, so the tool call is not passed over (the durable-runs e2e beside busy loops
    # lost them).
    assert queries._BEHIND_LOG_S >= 4 * queries._OVERTAKEN_S
    clock = _Clock()
    order = _InOrder(1, clock=clock)
    assert order.take(_token(7)) == []
    clock.now += queries._OVERTAKEN_S * 2
    assert order.left() > 0
    assert _sequences(order.take(_logged(2))) == [2]
    # The logged update after the gap: the log is read in order, so only tokens can be
    # missing below it, and they are waited for only a moment.
    assert order.take(_logged(6)) == []
    assert 0 < order.left() <= queries._OVERTAKEN_S
    clock.now += queries._OVERTAKEN_S
    assert _sequences(order.flush()) == [6, 7]


def test_a_token_whose_logged_predecessor_never_comes_waits_a_bounded_time() -> None:
    clock = _Clock()
    order = _InOrder(1, clock=clock)
    order.take(_token(3))
    assert order.left() == pytest.approx(queries._BEHIND_LOG_S)
    clock.now += queries._BEHIND_LOG_S
    assert order.left() <= 0
    assert _sequences(order.flush()) == [3]
