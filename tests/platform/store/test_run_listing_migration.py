"""Migration 0010: runs get their assistant and the time their state last changed as
columns (ListRuns filters and counts on them); the runs stored before it get them from the
run they hold, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.store.db import Database
from tests.conftest import TEST_DATABASE_TIMEOUT_S

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
async def db(empty_database_url: str) -> AsyncIterator[Database]:
    database = Database(empty_database_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    try:
        yield database
    finally:
        await database.close()


def _run(assistant: str, *, ended: bool) -> pb.Run:
    run = pb.Run(name="workspaces/acme/conversations/c1/runs/r1", assistant=assistant)
    run.create_time.FromDatetime(NOW)
    run.start_time.FromDatetime(NOW + dt.timedelta(seconds=1))
    if ended:
        run.end_time.FromDatetime(NOW + dt.timedelta(seconds=5))
    return run


async def test_runs_stored_before_get_their_assistant_and_state_time(db: Database) -> None:
    await db.migrate()
    await db.downgrade("0009")
    rows = [
        ("r1", _run("workspaces/acme/assistants/helper", ended=True)),
        ("r2", _run("", ended=False)),
    ]
    # Conversations are as they were at 0009: the model writes them.
    async with db.sessions() as session, session.begin():
        # In SQL: the models have columns later revisions add (``memory_policy``).
        await session.execute(
            text(
                "INSERT INTO workspaces (id, display_name, description, created_at, updated_at,"
                " version) VALUES ('acme', '', '', :at, :at, 1)"
            ),
            {"at": NOW},
        )
        # Conversations too (``active_branch`` and the rest of 0027).
        await session.execute(
            text(
                "INSERT INTO conversations (id, workspace_id, title, meta, archived, creator,"
                " created_at, updated_at, version, last_seq, message_count, token_count)"
                " VALUES ('c1', 'acme', '', :meta, false, '', :at, :at, 1, 0, 0, 0)"
            ),
            {"at": NOW, "meta": b""},
        )
    async with db.engine.begin() as connection:
        for run_id, run in rows:
            await connection.execute(
                text(
                    "INSERT INTO runs (id, workspace_id, conversation_id, state, worker, creator,"
                    " created_at, updated_at, data, job) VALUES (:id, 'acme', 'c1', 3, 'w', 'u',"
                    " :at, :at, :data, :job)"
                ),
                {"id": run_id, "at": NOW, "data": run.SerializeToString(), "job": b""},
            )

    await db.migrate()

    async with db.engine.connect() as connection:
        found = (
            await connection.execute(
                text("SELECT id, assistant_id, state_time FROM runs ORDER BY id")
            )
        ).all()
    stamps = {run_id: stamp for run_id, _, stamp in found}
    assert [(run_id, assistant) for run_id, assistant, _ in found] == [("r1", "helper"), ("r2", "")]
    # The end time of an ended run, the start time of one that had not ended.
    for run_id, expected in (
        ("r1", NOW + dt.timedelta(seconds=5)),
        ("r2", NOW + dt.timedelta(seconds=1)),
    ):
        stamp = stamps[run_id]
        stamp = stamp if isinstance(stamp, dt.datetime) else dt.datetime.fromisoformat(stamp)
        aware = stamp.astimezone(dt.UTC) if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)
        assert aware == expected
