"""A search by meaning counts the index's waiting jobs while it embeds the query
(``search._settle`` ends the count when it is no longer wanted): a cancel of the
search that comes while the count is ending is the search's, never swallowed."""

from __future__ import annotations

import asyncio

import pytest

from switchboard.context.semantic.retrieval import search
from tests.conftest import CALL_DEADLINE_S

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]


async def test_a_cancel_while_the_count_ends_cancels_the_search() -> None:
    release = asyncio.Event()
    began = asyncio.Event()
    ending = asyncio.Event()

    async def count() -> int:
        try:
            began.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # A database call finishing under the cancel: the count ends a moment later.
            ending.set()
            await release.wait()
            raise
        return 0

    counting = asyncio.create_task(count())
    await began.wait()
    settling = asyncio.create_task(search._settle(counting))
    async with asyncio.timeout(CALL_DEADLINE_S):  # the settle has cancelled the count
        await ending.wait()
    settling.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await settling
    assert counting.cancelled()


async def test_a_failed_count_no_longer_wanted_is_read_and_dropped() -> None:
    async def count() -> int:
        raise ConnectionError("the database went away")

    counting = asyncio.create_task(count())
    await asyncio.wait([counting])
    await search._settle(counting)  # no error: the search had fallen back already
    assert isinstance(counting.exception(), ConnectionError)
