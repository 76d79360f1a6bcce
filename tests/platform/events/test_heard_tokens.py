"""Tokens heard from another process (Redis pub/sub) may arrive before the logged event
their sender filed them after (the Redis stream): they wait for it, briefly, so that this
process's ring holds them after it, and a subscriber resuming here from that event's
cursor is sent them (docs/events.md, "Tokens")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.events.bus import EARLY_TOKEN_WAIT_S, EventBus
from switchboard.platform.events.eventlog import (
    Carry,
    Deliver,
    Logged,
    LogState,
    Position,
    Redactor,
    Ring,
    format_cursor,
)
from tests.conftest import CALL_DEADLINE_S

pytestmark = pytest.mark.unit


class ThisProcessesLog:
    """The log as this process reads it: the test decides when each logged event arrives."""

    def __init__(self) -> None:
        self.deliver: Deliver | None = None
        self.heard: Carry | None = None
        #: What this process sent the others: (the token, its cursor when sent).
        self.relayed: list[tuple[str, str]] = []
        self.bus = EventBus(self, memory=100)

    @property
    def state(self) -> LogState:
        raise NotImplementedError

    async def start(self, deliver: Deliver, ring: Ring) -> Position:
        self.deliver = deliver
        return ring.head()

    async def append(self, event: events_pb2.Event) -> events_pb2.Event:
        raise NotImplementedError

    async def append_many(self, events: Sequence[events_pb2.Event]) -> None:
        raise NotImplementedError

    async def read(self, after: Position, upto: Position, limit: int) -> list[Logged]:
        raise NotImplementedError

    async def horizon(self) -> Position:
        raise NotImplementedError

    async def redact(self, redaction: Redactor) -> int:
        raise NotImplementedError

    async def last_position(self) -> Position:
        raise NotImplementedError

    def on_state_change(self, callback: Callable[[LogState], None]) -> None:
        return None

    def carry_tokens(self, heard: Carry | None) -> Carry | None:
        self.heard = heard
        return self._relay

    async def follow_tokens(self, conversation: str) -> list[events_pb2.Event]:
        return []

    def unfollow_tokens(self, conversation: str) -> None:
        return None

    @property
    def tailing(self) -> bool:
        return True

    async def tail(self) -> None:
        return None

    def untail(self) -> None:
        return None

    def _relay(self, events: Sequence[events_pb2.Event]) -> None:
        self.relayed += [(event.actor.name, event.cursor) for event in events]

    @property
    def held(self) -> int:
        return 0

    async def close(self) -> None:
        return None

    def logged(self, *positions: Position) -> None:
        assert self.deliver is not None
        self.deliver([Logged(position, _event(f"logged {position}")) for position in positions])

    def tokens(self, after: Position, *texts: str) -> None:
        """Tokens another process filed after its logged event ``after``."""
        assert self.heard is not None
        events = [_event(text) for text in texts]
        for number, event in enumerate(events, start=1):
            event.cursor = format_cursor((*after, 7 << 40 | number))
        self.heard(events)


def _event(note: str) -> events_pb2.Event:
    event = events_pb2.Event(
        id=f"id-{note}", type=events_pb2.EVENT_TYPE_RUN_UPDATED, workspace="workspaces/w"
    )
    event.actor.name = note
    return event


@pytest.fixture
async def log() -> AsyncIterator[ThisProcessesLog]:
    backend = ThisProcessesLog()
    await backend.bus.start()
    try:
        yield backend
    finally:
        await backend.bus.close()


def _ring(log: ThisProcessesLog) -> list[str]:
    return [item.event.actor.name for item in log.bus.ring.items()]


async def test_a_token_heard_before_its_logged_event_is_filed_after_it(
    log: ThisProcessesLog,
) -> None:
    log.logged((1, 0))
    log.tokens((2, 0), "one", "two")
    assert _ring(log) == ["logged (1, 0)"]
    log.tokens((2, 0), "three")
    log.logged((2, 0), (3, 0))
    assert _ring(log) == ["logged (1, 0)", "logged (2, 0)", "one", "two", "three", "logged (3, 0)"]
    resumed = [item.event.actor.name for item in log.bus.ring.items() if item.position > (2, 0)]
    assert resumed[:3] == ["one", "two", "three"]


async def test_tokens_whose_event_is_here_go_at_once_and_later_ones_keep_their_order(
    log: ThisProcessesLog,
) -> None:
    log.logged((1, 0), (2, 0))
    log.tokens((1, 0), "one")
    assert _ring(log)[-1] == "one"
    log.tokens((4, 0), "early")
    # Behind a waiting token, even one whose event is here waits: order is kept.
    log.tokens((2, 0), "later")
    assert _ring(log)[-1] == "one"
    log.logged((3, 0))
    assert _ring(log)[-1] == "logged (3, 0)"
    # The event waited for never arrived here, but a later one did: they go before it.
    log.logged((5, 0))
    assert _ring(log)[-3:] == ["early", "later", "logged (5, 0)"]


async def test_a_token_waits_for_its_event_only_briefly(log: ThisProcessesLog) -> None:
    arrived = asyncio.Event()
    log.bus.listen(lambda event: arrived.set())
    loop = asyncio.get_running_loop()
    heard_at = loop.time()
    log.tokens((9, 0), "lonely")
    async with asyncio.timeout(CALL_DEADLINE_S):
        await arrived.wait()
    assert loop.time() - heard_at >= EARLY_TOKEN_WAIT_S * 0.9
    assert _ring(log) == ["lonely"]


async def test_this_processes_tokens_wait_for_their_runs_logged_event_before_going_out(
    log: ThisProcessesLog,
) -> None:
    """On Redis a process reads its own appends back: the run's update it just logged at
    (2, 0) may not be in its ring yet when the tokens after it are announced."""
    log.logged((1, 0))
    log.bus.announce([_event("one"), _event("two")], after=(2, 0))
    assert _ring(log) == ["logged (1, 0)"]
    assert log.relayed == []
    log.logged((2, 0))
    assert _ring(log) == ["logged (1, 0)", "logged (2, 0)", "one", "two"]
    # Sent on only once filed, so the others' copies name the event they follow.
    assert [name for name, _ in log.relayed] == ["one", "two"]
    assert all(cursor.startswith("2-0-") for _, cursor in log.relayed)
    # With its event here, the next token goes at once.
    log.bus.announce([_event("three")], after=(2, 0))
    assert _ring(log)[-1] == "three"
