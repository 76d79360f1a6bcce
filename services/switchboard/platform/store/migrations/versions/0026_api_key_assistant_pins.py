"""API keys that pin assistants at a revision (docs/assistants.md, "Revisions").

* ``api_keys.assistant_pins``: space-separated ``workspaces/{w}/assistants/{a}@{n}``, as
  ``scopes`` is space-separated; empty for a key that pins nothing (every existing key).

Revision ID: 0026
Revises: 0025
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0026"
down_revision: str | Sequence[str] | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("assistant_pins", sa.Text(), server_default="", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("assistant_pins")
