"""The embedded log after a write whose answer was lost: nothing twice, nothing lost.

A write can commit and still fail for its caller (the answer lost: a timeout while
the commit went through). The log then did not know its new head: the next write
reused the committed rows' positions, failed on them, and so did every write after it
(the cascade of "event log write failed" behind one CI failure). Now the next write
reads back what was committed past the head it knew: it delivers those events (no
one had heard of them), skips the ones it is asked to log again, and goes on after.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.errors import DependencyUnavailable
from switchboard.platform.events.eventlog import ORIGIN, LocalLog, Logged, Ring
from switchboard.platform.store.db import Database, open_database
from switchboard.platform.store.outbox import stamp
from switchboard.platform.values.names import new_id
from tests.conftest import TEST_DATABASE_TIMEOUT_S

pytestmark = pytest.mark.unit


class AnswerLost:
    """A group commit whose next write commits and then fails as a timeout would
    (the thread committed after the loop stopped waiting: no after-commit callbacks)."""

    def __init__(self, database: Database) -> None:
        self.real = database._commit_group
        self.lose_next = False

    def commit_group(self, works: Any, group: Any) -> Any:
        outcomes = self.real(works, group)
        if self.lose_next:
            self.lose_next = False
            raise TimeoutError("committed, but the answer did not arrive in time")
        return outcomes


@pytest.fixture
async def log(tmp_path: pathlib.Path) -> AsyncIterator[tuple[LocalLog, AnswerLost, list[Logged]]]:
    database = await open_database(
        f"sqlite+aiosqlite:///{tmp_path / 'log.db'}",
        timeout_s=TEST_DATABASE_TIMEOUT_S,
        migrate=True,
    )
    lost = AnswerLost(database)
    database._commit_group = lost.commit_group  # type: ignore[method-assign]
    local = LocalLog(database, retention=10_000, retention_s=3600, memory=1000)
    delivered: list[Logged] = []
    await local.start(delivered.extend, Ring(1000))
    try:
        yield local, lost, delivered
    finally:
        await local.close()
        await database.close()


def _events(*notes: str) -> list[events_pb2.Event]:
    made = []
    for note in notes:
        event = events_pb2.Event(id=new_id(), type=events_pb2.EVENT_TYPE_CONVERSATION_CHANGED)
        event.actor.name = note
        stamp(event)
        made.append(event)
    return made


def _notes(items: Sequence[Logged]) -> list[str]:
    return [item.event.actor.name for item in items]


async def test_a_batch_retried_after_its_answer_was_lost_is_logged_once_in_order(
    log: tuple[LocalLog, AnswerLost, list[Logged]],
) -> None:
    local, lost, delivered = log
    await local.append_many(_events("a"))
    retried = _events("b", "c")
    lost.lose_next = True
    with pytest.raises(DependencyUnavailable):
        await local.append_many(retried)
    assert _notes(delivered) == ["a"]  # b and c are stored, but nobody heard of them
    # The publisher retries the same events with the run's next ones.
    await local.append_many([*retried, *_events("d")])
    await local.append_many(_events("e"))
    stored = await local.read(ORIGIN, await local.last_position(), 100)
    assert _notes(stored) == ["a", "b", "c", "d", "e"]
    assert [item.position[0] for item in stored] == [1, 2, 3, 4, 5]
    assert _notes(delivered) == ["a", "b", "c", "d", "e"]
    # The retried events' publisher learns where they were logged.
    assert [event.cursor for event in retried] == [item.cursor for item in stored[1:3]]


async def test_after_a_lost_answer_other_events_continue_after_what_was_committed(
    log: tuple[LocalLog, AnswerLost, list[Logged]],
) -> None:
    local, lost, delivered = log
    lost.lose_next = True
    with pytest.raises(DependencyUnavailable):
        await local.append_many(_events("a", "b"))
    # Not retried (another publisher's events come next): still no position reused.
    await local.append_many(_events("c"))
    stored = await local.read(ORIGIN, await local.last_position(), 100)
    assert _notes(stored) == ["a", "b", "c"]
    assert _notes(delivered) == ["a", "b", "c"]
