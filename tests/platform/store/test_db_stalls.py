"""A SQLite write is given up on for the database's own slowness, never for waiting.

A write that queued behind others, or finished while the event loop was busy (a long
garbage collection late in a test run, a saturated host), used to fail as an outage:
its loop timer, not the database, decided. In one CI run that was 171 "event log
write failed", each dropping a run's updates, and then every later write of the log
colliding with the rows it had not heard of. A write that the database itself spends
too long on still fails, and the next one is not held up by it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from switchboard.platform.store.db import Database
from tests.conftest import CALL_DEADLINE_S

pytestmark = pytest.mark.unit

#: Short, so a stall of the loop is several times the database's bound; not shorter:
#: beside the suite's load on two cores a group commit of the 200 inserts below ran past
#: 0.3 s (the bound at 0.1 s) in its own thread, which is the database being slow.
TIMEOUT_S = 0.25


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'stall.db'}", timeout_s=TIMEOUT_S)
    await db.run(lambda s: s.execute(text("CREATE TABLE t (x INTEGER)")), write=True)
    try:
        yield db
    finally:
        await db.close()


def _insert(value: int) -> Callable[[Session], int]:
    def work(session: Session) -> int:
        session.execute(text("INSERT INTO t (x) VALUES (:x)"), {"x": value})
        return value

    return work


def _count(session: Session) -> int:
    return int(session.execute(text("SELECT count(*) FROM t")).scalar_one())


async def _stall_loop(seconds: float) -> None:
    """Hold the event loop (and, for a while, the interpreter) as a long collection does."""
    await asyncio.sleep(0)  # let the writes be queued and the group start
    time.sleep(seconds)  # noqa: ASYNC251 - blocks the loop on purpose: the condition under test


async def test_writes_queued_while_the_loop_stalls_past_the_bound_all_commit(
    database: Database,
) -> None:
    writes = [asyncio.ensure_future(database.run(_insert(i), write=True)) for i in range(200)]
    # Ten times the loop's old bound on a write (3 x the timeout), and again when the
    # first group has landed: later groups wait for the loop, not for the database.
    await _stall_loop(TIMEOUT_S * 10)
    await asyncio.sleep(0)
    await _stall_loop(TIMEOUT_S * 10)
    assert sorted(await asyncio.gather(*writes)) == list(range(200))
    assert await database.run(_count, write=False) == 200


async def test_reads_queued_behind_busy_threads_while_the_loop_stalls_all_answer(
    database: Database,
) -> None:
    reads = [asyncio.ensure_future(database.run(_count, write=False)) for _ in range(50)]
    fetches = [asyncio.ensure_future(database.fetch("SELECT 1", {})) for _ in range(50)]
    await _stall_loop(TIMEOUT_S * 10)
    assert await asyncio.gather(*reads) == [0] * 50
    assert await asyncio.gather(*fetches) == [[(1,)]] * 50


async def test_a_write_the_database_itself_is_too_slow_with_fails_and_the_next_is_not_held(
    database: Database,
) -> None:
    release = threading.Event()

    def stuck(session: Session) -> None:
        session.execute(text("INSERT INTO t (x) VALUES (-1)"))
        release.wait(TIMEOUT_S * 30)  # a disk that stopped answering, in the thread

    try:
        with pytest.raises(TimeoutError):
            await database.run(stuck, write=True)
        # The loop gave up on it; the stuck thread still holds SQLite's write lock, so
        # the next write fails by the busy timeout (an outage, in the thread), not a hang.
        started = time.monotonic()
        with pytest.raises(Exception, match="locked"):
            await database.run(_insert(1), write=True)
        assert time.monotonic() - started < TIMEOUT_S * 30
    finally:
        release.set()
    # Once the disk answers again, so does the database.
    async with asyncio.timeout(CALL_DEADLINE_S):
        while True:
            try:
                assert await database.run(_insert(2), write=True) == 2
                break
            except Exception:  # noqa: BLE001 - the stuck transaction may still be finishing
                await asyncio.sleep(TIMEOUT_S)  # polling for the lock to clear, with a deadline
