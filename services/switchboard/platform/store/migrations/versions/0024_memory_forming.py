"""Memory that forms itself (docs/memory.md): facts with time, their versions, the
workspace's default policy, and the forming worker's cursor and jobs.

* ``memory_items`` gains when a fact became true (``valid_from``; NULL reads as its
  creation) and stopped (``valid_until``), the items it replaced and was replaced by,
  why it was retired, the model's confidence (in thousandths: an integer reads the same on
  every driver), how it was formed (a serialized
  ``MemoryFormation``), and for a user's item formed in a workspace, that workspace
  (deleted with it).
* ``memory_versions``: each version of an item (created, edited, retired), deleted with
  the item, so forgetting an item forgets its history.
* ``workspaces.memory_policy``: the serialized default ``MemoryPolicy``.
* ``memory_cursor`` and ``memory_jobs``: the leased feeder's cursor (as
  ``semantic_cursor``) and the exchanges waiting to be formed and the consolidations
  waiting to run, each with the decisions the model made once they are stored.

Revision ID: 0024
Revises: 0023
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0024"
down_revision: str | Sequence[str] | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("memory_items") as batch:
        batch.add_column(sa.Column("valid_from", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("supersedes", sa.String(length=32), server_default="", nullable=False)
        )
        batch.add_column(
            sa.Column("superseded_by", sa.String(length=32), server_default="", nullable=False)
        )
        batch.add_column(
            sa.Column("invalid_reason", sa.String(length=200), server_default="", nullable=False)
        )
        batch.add_column(
            sa.Column("confidence_milli", sa.Integer(), server_default="0", nullable=False)
        )
        batch.add_column(
            sa.Column("formation", sa.LargeBinary(), server_default=sa.text("''"), nullable=False)
        )
        batch.add_column(sa.Column("origin_workspace_id", sa.String(length=63), nullable=True))
        batch.create_foreign_key(
            op.f("fk_memory_items_origin_workspace_id_workspaces"),
            "workspaces",
            ["origin_workspace_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch.create_index("ix_memory_items_valid", ["scope", "valid_until"])
    op.create_table(
        "memory_versions",
        sa.Column("memory_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("change", sa.String(length=16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("editor", sa.String(length=160), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("invalid_reason", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["memory_id"],
            ["memory_items.id"],
            name=op.f("fk_memory_versions_memory_id_memory_items"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("memory_id", "version", name=op.f("pk_memory_versions")),
    )
    with op.batch_alter_table("workspaces") as batch:
        batch.add_column(
            sa.Column(
                "memory_policy", sa.LargeBinary(), server_default=sa.text("''"), nullable=False
            )
        )
    op.create_table(
        "memory_cursor",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("cursor", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_memory_cursor")),
    )
    op.create_table(
        "memory_jobs",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("conversation", sa.String(length=160), nullable=False),
        sa.Column("run", sa.String(length=255), nullable=False),
        sa.Column("assistant", sa.String(length=160), nullable=False),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("exchange", sa.LargeBinary(), nullable=False),
        sa.Column("plan", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimer", sa.String(length=64), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=512), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_memory_jobs_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_memory_jobs")),
    )
    op.create_index("ix_memory_jobs_due", "memory_jobs", ["state", "not_before"])


def downgrade() -> None:
    op.drop_index("ix_memory_jobs_due", table_name="memory_jobs")
    op.drop_table("memory_jobs")
    op.drop_table("memory_cursor")
    with op.batch_alter_table("workspaces") as batch:
        batch.drop_column("memory_policy")
    op.drop_table("memory_versions")
    with op.batch_alter_table("memory_items") as batch:
        batch.drop_index("ix_memory_items_valid")
        batch.drop_constraint(
            op.f("fk_memory_items_origin_workspace_id_workspaces"), type_="foreignkey"
        )
        for column in (
            "origin_workspace_id",
            "formation",
            "confidence_milli",
            "invalid_reason",
            "superseded_by",
            "supersedes",
            "valid_until",
            "valid_from",
        ):
            batch.drop_column(column)
