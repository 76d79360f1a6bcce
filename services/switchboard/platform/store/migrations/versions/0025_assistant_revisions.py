"""Assistant revisions (docs/assistants.md, "Revisions"): every change of an assistant's
configuration is kept whole, numbered, with its time and author.

* ``assistants.revision``: the current revision's number (the etag's ``version`` also
  moves when only the workspace's default changes; this one does not).
* ``assistant_revisions``: one row per revision, the serialized ``Assistant`` settings
  as the change left them, deleted with the assistant. Each existing assistant gets its
  revision 1 from what it holds now (its author: its creator).

Revision ID: 0025
Revises: 0024
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0025"
down_revision: str | Sequence[str] | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("assistants") as batch:
        batch.add_column(sa.Column("revision", sa.Integer(), server_default="1", nullable=False))
    op.create_table(
        "assistant_revisions",
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("assistant_id", sa.String(length=63), nullable=False),
        sa.Column("revision", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("author", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("restored", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id", "assistant_id"],
            ["assistants.workspace_id", "assistants.id"],
            name=op.f("fk_assistant_revisions_workspace_id_assistants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "workspace_id", "assistant_id", "revision", name=op.f("pk_assistant_revisions")
        ),
    )
    op.execute(
        "INSERT INTO assistant_revisions "
        "(workspace_id, assistant_id, revision, data, author, created_at, origin, restored) "
        "SELECT workspace_id, id, 1, data, creator, updated_at, 'created', 0 FROM assistants"
    )


def downgrade() -> None:
    op.drop_table("assistant_revisions")
    with op.batch_alter_table("assistants") as batch:
        batch.drop_column("revision")
