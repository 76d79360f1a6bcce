"""Retry-safe integrations and tools (docs/integration.md, "Idempotency keys and
retry-safe tools"): whether a call in flight at a crash may be sent again, as
columns of the integration's row.

Integrations made before this revision are not retry-safe (the contract's
default): a call of theirs left in flight waits for a person.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("integrations") as batch:
        batch.add_column(
            sa.Column("retry_safe", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(
            sa.Column("retry_safe_tools", sa.Text(), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("integrations") as batch:
        batch.drop_column("retry_safe_tools")
        batch.drop_column("retry_safe")
