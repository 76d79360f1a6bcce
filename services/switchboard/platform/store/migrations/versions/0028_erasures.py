"""A person's account deleted and their data erased (docs/privacy.md).

* ``users.erased_at``: when the account was deleted; the row stays as a tombstone with
  no email or name, so its id names no one else.
* ``erasures``: one per deleted account (with what becomes of the workspaces it owned
  alone), per member whose words an owner erased from a workspace (``workspaces``: the
  ones it keeps to), or per deleted message whose events are redacted;
  ``erasure_parts``: each service's part (context, dispatcher, integration, events),
  claimed by one of its processes and done once; ``erasure_names``: the messages and
  runs removed, whose events the last part redacts.
* ``messages.author``: ``Message.author`` as a column, written by every append, so an
  erasure finds a person's messages in any workspace without reading every message (NULL
  for the messages appended before: the first erasure or export fills them).
* ``data_exports``: archives of a person's data (ExportMyData), written by the context
  service; their bytes live in the blob store until they expire.

Revision ID: 0028
Revises: 0027
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0028"
down_revision: str | Sequence[str] | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN: a batch on SQLite would copy ``users``, which many tables
    # cascade from.
    op.add_column("users", sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
    # Plain ADD COLUMN too: a batch would copy ``messages`` and lose 0023's trigger.
    op.add_column("messages", sa.Column("author", sa.String(length=200), nullable=True))
    op.create_table(
        "erasures",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("plan", sa.LargeBinary(), nullable=False),
        sa.Column("workspaces", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_erasures_user_id", "erasures", ["user_id"], unique=False)
    op.create_table(
        "erasure_parts",
        sa.Column(
            "erasure_id",
            sa.String(length=32),
            sa.ForeignKey("erasures.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("part", sa.String(length=16), primary_key=True),
        sa.Column("claimer", sa.String(length=64), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "erasure_names",
        sa.Column(
            "erasure_id",
            sa.String(length=32),
            sa.ForeignKey("erasures.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(length=300), primary_key=True),
    )

    op.create_table(
        "data_exports",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("error", sa.LargeBinary(), nullable=False),
        sa.Column("claimer", sa.String(length=64), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_data_exports_user", "data_exports", ["user_id", "created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_data_exports_user", table_name="data_exports")
    op.drop_table("data_exports")
    op.drop_table("erasure_names")
    op.drop_table("erasure_parts")
    op.drop_index("ix_erasures_user_id", table_name="erasures")
    op.drop_table("erasures")
    op.drop_column("messages", "author")
    op.drop_column("users", "erased_at")
