"""Schedules (docs/schedules.md): a workspace's schedules, and each tick claimed once
(``schedule_firings``, its primary key the claim).

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column("uid", sa.String(length=32), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("next_fire_us", sa.BigInteger(), nullable=True),
        sa.Column("last_fire_us", sa.BigInteger(), nullable=True),
        sa.Column("last_run", sa.String(length=255), nullable=False, server_default=""),
        sa.Column("conversation_id", sa.String(length=63), nullable=False, server_default=""),
        sa.Column("creator", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_schedules_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workspace_id", "id", name=op.f("pk_schedules")),
    )
    op.create_index("ix_schedules_due", "schedules", ["state", "next_fire_us"], unique=False)
    op.create_table(
        "schedule_firings",
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("schedule_id", sa.String(length=63), nullable=False),
        sa.Column("fire_us", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("claim_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimer", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.Integer(), nullable=False),
        sa.Column("catch_up", sa.Boolean(), nullable=False),
        sa.Column("run", sa.String(length=255), nullable=False),
        sa.Column("error", sa.LargeBinary(), nullable=False),
        sa.Column("request", sa.LargeBinary(), nullable=False),
        sa.Column("title", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id", "schedule_id"],
            ["schedules.workspace_id", "schedules.id"],
            name=op.f("fk_schedule_firings_workspace_id_schedules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "workspace_id", "schedule_id", "fire_us", name=op.f("pk_schedule_firings")
        ),
    )
    op.create_index(
        "ix_schedule_firings_claimed", "schedule_firings", ["outcome", "claimer"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_schedule_firings_claimed", table_name="schedule_firings")
    op.drop_table("schedule_firings")
    op.drop_index("ix_schedules_due", table_name="schedules")
    op.drop_table("schedules")
