"""Whether a run's usage was priced (docs/budgets.md, "Usage"): how many of a run's
model calls were of a model the price table has no price for, stored with its end
beside its usage, so QueryUsage counts the runs whose cost leaves some out and a
model priced at 0 reads as free, not as unpriced.

Runs ended before this revision count none: what they used was not recorded.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | Sequence[str] | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("unpriced_calls", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("unpriced_calls")
