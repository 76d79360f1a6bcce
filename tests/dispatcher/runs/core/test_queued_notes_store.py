"""A queued run's note of what it waits behind (``Run.queued_behind``, issue 79) is stored
only while the run is stored QUEUED and its writer's: one written late never takes a run
that started back, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.runs.core.records import NewRun
from switchboard.dispatcher.runs.core.store import RunStore
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import ConversationRow, WorkspaceRow
from tests.conftest import TEST_DATABASE_TIMEOUT_S

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
NAME = "workspaces/acme/conversations/c1/runs/r2"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[RunStore]:
    database = Database(database_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    try:
        async with database.sessions() as session, session.begin():
            session.add(WorkspaceRow(id="acme", created_at=NOW, updated_at=NOW))
            await session.flush()
            session.add(
                ConversationRow(id="c1", workspace_id="acme", created_at=NOW, updated_at=NOW)
            )
        yield RunStore(database)
    finally:
        await database.close()


async def test_a_note_is_stored_while_queued_and_never_over_a_started_run(
    store: RunStore,
) -> None:
    run = pb.Run(name=NAME, state=pb.RUN_STATE_QUEUED)
    run.create_time.FromDatetime(NOW)
    await store.create(NewRun("r2", "acme", "c1", "users/u", "me", run, b""))
    run.queued_behind.CopyFrom(
        pb.QueuedBehind(
            run="workspaces/acme/conversations/c1/runs/r1",
            state=pb.RUN_STATE_REQUIRES_ACTION,
            reason="waiting for a person's approval of 1 tool call",
            ahead=1,
        )
    )
    assert await store.save_queued("r2", run, owner="me")
    assert (await store.get("acme", "c1", "r2")).run.queued_behind == run.queued_behind
    # Another instance's write is not this one's to make.
    assert not await store.save_queued("r2", run, owner="someone else")

    started = pb.Run()
    started.CopyFrom(run)
    started.state = pb.RUN_STATE_RUNNING
    started.ClearField("queued_behind")
    assert await store.save("r2", started, owner="me")
    # A note written late (it was made while the run was queued) changes nothing.
    assert not await store.save_queued("r2", run, owner="me")
    stored = (await store.get("acme", "c1", "r2")).run
    assert stored.state == pb.RUN_STATE_RUNNING
    assert not stored.HasField("queued_behind")
