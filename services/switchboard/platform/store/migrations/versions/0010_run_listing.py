"""Runs carry their assistant and the time their state last changed, as columns.

ListRuns lists a workspace's runs across its conversations, filtered by assistant
and by when their state last changed, with the total over every page (A2A's
ListTasks needs all three: docs/a2a.md). Both values are in the serialized run;
as columns they can be filtered, counted and indexed. Existing rows are filled in
from the run they hold.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-25
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 500


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("assistant_id", sa.String(length=63), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("state_time", sa.DateTime(timezone=True), nullable=True))
    _fill_in()
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("state_time", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch.create_index(
            "ix_runs_workspace", ["workspace_id", "assistant_id", "created_at", "id"]
        )


def _fill_in() -> None:
    if op.get_context().as_sql:
        # Rendered as SQL for review (alembic --sql): there are no rows to read, and
        # the exact values are in the serialized runs, which only Python can read.
        # SQL fills what it can, and the rendered script says so.
        op.execute(
            "-- 0010: switchboard migrate fills runs.assistant_id and runs.state_time in "
            "from each stored run; applied as this SQL, older runs keep assistant_id '' "
            "and state_time = created_at"
        )
        op.execute("UPDATE runs SET state_time = created_at WHERE state_time IS NULL")
        return
    # The contract's generated code reads the stored runs: its fields only ever get
    # added (buf breaking), so today's code reads every run an older version stored.
    from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb

    runs = sa.table(
        "runs",
        sa.column("id", sa.String),
        sa.column("data", sa.LargeBinary),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("assistant_id", sa.String),
        sa.column("state_time", sa.DateTime(timezone=True)),
    )
    connection = op.get_bind()
    after = ""
    while True:
        rows = connection.execute(
            sa.select(runs.c.id, runs.c.data, runs.c.created_at)
            .where(runs.c.id > after)
            .order_by(runs.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            return
        for run_id, data, created_at in rows:
            run = pb.Run.FromString(data)
            stamp = _state_time(run) or created_at
            if stamp.tzinfo is None:  # SQLite keeps no zone; every stored time is UTC
                stamp = stamp.replace(tzinfo=dt.UTC)
            connection.execute(
                sa.update(runs)
                .where(runs.c.id == run_id)
                .values(assistant_id=run.assistant.rsplit("/", 1)[-1], state_time=stamp)
            )
        after = rows[-1][0]


def _state_time(run: object) -> dt.datetime | None:
    for field in ("end_time", "start_time", "create_time"):
        if run.HasField(field):  # type: ignore[attr-defined]
            stamp: dt.datetime = getattr(run, field).ToDatetime(dt.UTC)
            return stamp
    return None


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_workspace")
        batch.drop_column("state_time")
        batch.drop_column("assistant_id")
