"""Runs as trees (docs/delegation.md): a run started by another run's delegate tool
call keeps its parent (``runs.parent_id``, ListRuns' ``parent_run``) and its tree's root
(``runs.root_id``, counted against the tree's bound on children).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | Sequence[str] | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(32), server_default="", nullable=False))
        batch.add_column(sa.Column("root_id", sa.String(32), server_default="", nullable=False))
    op.create_index("ix_runs_parent", "runs", ["parent_id"], unique=False)
    op.create_index("ix_runs_root", "runs", ["root_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_runs_root", table_name="runs")
    op.drop_index("ix_runs_parent", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("root_id")
        batch.drop_column("parent_id")
