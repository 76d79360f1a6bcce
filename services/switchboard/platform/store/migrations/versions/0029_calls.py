"""Phone calls (docs/telephony.md): ``calls``, one row per call in or out, its
serialized ``Call`` beside the columns a list, a take-over and QueryUsage read.

Revision ID: 0029
Revises: 0028
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0029"
down_revision: str | Sequence[str] | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("assistant_id", sa.String(length=63), nullable=False),
        sa.Column("usage_day", sa.String(length=10), nullable=False),
        sa.Column("seconds", sa.Integer(), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_calls_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workspace_id", "id", name=op.f("pk_calls")),
    )
    op.create_index("ix_calls_listed", "calls", ["workspace_id", "created_at", "id"], unique=False)
    op.create_index("ix_calls_holder", "calls", ["holder", "state"], unique=False)
    op.create_index("ix_calls_usage", "calls", ["workspace_id", "usage_day"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_calls_usage", table_name="calls")
    op.drop_index("ix_calls_holder", table_name="calls")
    op.drop_index("ix_calls_listed", table_name="calls")
    op.drop_table("calls")
