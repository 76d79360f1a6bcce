"""Budgets a person can use (docs/budgets.md, "Near the cap"): how many of a run's
model calls were made with ``max_tokens`` lowered to fit a budget, stored with its
end beside its usage, so QueryUsage counts the runs a budget cut short.

Runs ended before this revision count none.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("budget_lowered_calls", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("budget_lowered_calls")
