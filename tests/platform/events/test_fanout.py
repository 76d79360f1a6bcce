"""The fan-out's turns: when a subscriber's writer is woken (``platform/events/bus.py``).

A name few follow wakes its subscribers while the events are pushed; the
subscribers of a large fan-out are woken a chunk per loop callback, in the
order their events came, and only while few of them are still sending, so
other work on the loop (a write, a small conversation's event) waits behind at
most one chunk, never the whole fan-out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.events import bus
from switchboard.platform.events.bus import IN_FLIGHT, PROMPT_FANOUT, WAKE_CHUNK, Fanout
from switchboard.platform.events.eventlog import Logged
from switchboard.platform.resilience.inflight import CALLS
from tests.conftest import CALL_DEADLINE_S

pytestmark = pytest.mark.unit

BIG = "workspaces/w/conversations/big"
SMALL = "workspaces/w/conversations/small"


class Sink:
    """Follows one conversation; records what it was given and when it was woken."""

    def __init__(self, fanout: Fanout, key: str, woken: list[Sink], *, sends: bool = True) -> None:
        self.fanout = fanout
        self.sends = sends
        #: Called when it is woken.
        self.then: Callable[[], None] = lambda: None
        self.keys: tuple[str, ...] = (key,)
        self.watches: tuple[str, ...] = ()
        self.owner = "users/u"
        self.items: list[Logged] = []
        self._woken = woken
        fanout.attach(self)

    def push(self, item: Logged) -> bool:
        self.items.append(item)
        return True

    def wake(self) -> None:
        self._woken.append(self)
        self.then()
        if self.sends:  # its writer sends in a later step of the loop, then says so
            asyncio.get_running_loop().call_soon(self.fanout.sent, self)

    def recheck(self) -> None:
        return None


def logged(position: int, conversation: str) -> Logged:
    event = events_pb2.Event(
        id=f"e{position}",
        type=events_pb2.EVENT_TYPE_MESSAGE_CREATED,
        workspace="workspaces/w",
        conversation=conversation,
    )
    return Logged((position, 0), event)


def woken_list() -> list[Sink]:
    return []


async def turns() -> None:
    """Let every callback queued so far run (and those they queue, a few rounds)."""
    for _ in range(4 * (PROMPT_FANOUT + WAKE_CHUNK)):
        await asyncio.sleep(0)  # one loop turn: the fan-out's own unit of work


async def test_a_small_fan_out_wakes_its_subscribers_as_it_pushes() -> None:
    fanout, woken = Fanout(), woken_list()
    sinks = [Sink(fanout, SMALL, woken) for _ in range(PROMPT_FANOUT)]
    fanout.deliver([logged(1, SMALL)])
    assert woken == sinks
    assert all(len(sink.items) == 1 for sink in sinks)


async def test_a_large_fan_out_pushes_at_once_and_wakes_a_chunk_per_turn() -> None:
    fanout, woken = Fanout(), woken_list()
    sinks = [Sink(fanout, BIG, woken) for _ in range(PROMPT_FANOUT + 3 * WAKE_CHUNK + 5)]
    fanout.deliver([logged(1, BIG)])
    # Every subscriber has its event queued; none was woken yet.
    assert all(len(sink.items) == 1 for sink in sinks)
    assert woken == []
    seen_between: list[int] = []

    def other_work() -> None:
        seen_between.append(len(woken))

    # Work that became ready after the event waits behind one chunk, not the fan-out.
    asyncio.get_running_loop().call_soon(other_work)
    await turns()
    assert seen_between == [WAKE_CHUNK]
    assert woken == sinks  # each once, in the order they were pushed to


async def test_a_small_conversation_goes_before_a_large_fan_out_still_waking() -> None:
    fanout, woken = Fanout(), woken_list()
    big = [Sink(fanout, BIG, woken) for _ in range(10 * WAKE_CHUNK)]
    small = [Sink(fanout, SMALL, woken) for _ in range(10)]
    fanout.deliver([logged(1, BIG)])
    await asyncio.sleep(0)  # the first chunk
    fanout.deliver([logged(2, SMALL)])
    assert woken == [*big[:WAKE_CHUNK], *small]
    await turns()
    assert woken == [*big[:WAKE_CHUNK], *small, *big[WAKE_CHUNK:]]


async def test_events_that_arrive_before_a_turn_share_one_wake() -> None:
    fanout, woken = Fanout(), woken_list()
    sinks = [Sink(fanout, BIG, woken) for _ in range(PROMPT_FANOUT + 1)]
    fanout.deliver([logged(1, BIG)])
    fanout.deliver([logged(2, BIG)])
    fanout.deliver([logged(3, BIG)])
    await turns()
    assert woken == sinks
    assert all([item.position for item in sink.items] == [(1, 0), (2, 0), (3, 0)] for sink in sinks)


async def test_a_subscriber_with_more_left_is_woken_in_its_turn_not_at_once() -> None:
    fanout, woken = Fanout(), woken_list()
    sinks = [Sink(fanout, BIG, woken) for _ in range(PROMPT_FANOUT + 1)]
    fanout.wake_later(sinks[0])
    assert woken == []
    await turns()
    assert woken == [sinks[0]]
    woken.clear()
    fanout.deliver([logged(1, BIG)])
    fanout.wake_later(sinks[0])  # already waiting: keeps its place, woken once
    await turns()
    assert woken == sinks


async def test_a_subscriber_that_left_is_not_woken() -> None:
    fanout, woken = Fanout(), woken_list()
    sinks = [Sink(fanout, BIG, woken) for _ in range(PROMPT_FANOUT + 1)]
    fanout.deliver([logged(1, BIG)])
    fanout.detach(sinks[3])
    await turns()
    assert woken == [sink for i, sink in enumerate(sinks) if i != 3]
    assert fanout.count == len(sinks) - 1


async def test_at_most_in_flight_subscribers_of_a_large_fan_out_are_sending() -> None:
    fanout, woken = Fanout(), woken_list()
    stuck = [Sink(fanout, BIG, woken, sends=False) for _ in range(IN_FLIGHT + 10)]
    fanout.deliver([logged(1, BIG)])
    await turns()
    # None of them has handed its frame to gRPC yet: the rest wait.
    assert woken == stuck[:IN_FLIGHT]
    fanout.sent(stuck[0])
    fanout.detach(stuck[1])  # a stream that ended gives its place up too
    await turns()
    # Two places free: the refill waits for a chunk's worth (a loop step per chunk, not per frame).
    assert woken == stuck[:IN_FLIGHT]
    for sink in stuck[2:WAKE_CHUNK]:
        fanout.sent(sink)
    await turns()
    assert woken == stuck[: IN_FLIGHT + WAKE_CHUNK]


def spin(seconds: float) -> None:
    """Keep this thread on the CPU (the loop's busy share is what the fan-out reads)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_a_busy_loop_serves_unary_callers_before_a_large_fan_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fanout, woken = Fanout(), woken_list()
    sinks = [Sink(fanout, BIG, woken) for _ in range(PROMPT_FANOUT + 1)]
    monkeypatch.setattr(CALLS, "unary", 1)  # a caller is being served
    # and the loop has been busy: a low bar, so other jobs on a loaded machine
    # (which slow this thread's CPU time against the wall clock) cannot lower it.
    monkeypatch.setattr(bus, "BUSY_SHARE", 0.05)
    spin(2 * bus.SHARE_WINDOW_S)
    fanout.deliver([logged(1, BIG)])
    await turns()
    assert woken == []  # the fan-out waits for room
    everyone = asyncio.Event()
    sinks[-1].then = everyone.set
    monkeypatch.setattr(CALLS, "unary", 0)  # the caller has its answer
    async with asyncio.timeout(CALL_DEADLINE_S):
        await everyone.wait()
    assert woken == sinks


async def test_with_no_caller_a_busy_loop_still_fans_out_at_once() -> None:
    fanout, woken = Fanout(), woken_list()
    sinks = [Sink(fanout, BIG, woken) for _ in range(PROMPT_FANOUT + 1)]
    spin(2 * bus.SHARE_WINDOW_S)
    fanout.deliver([logged(1, BIG)])
    await turns()
    assert woken == sinks
