"""Files: a workspace's stored files (metadata; the bytes are in the blob
store, named by their SHA-256) and its resumable uploads in progress.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=False),
        sa.Column("media_type", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("text_state", sa.String(length=16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("text_tokens", sa.Integer(), nullable=False),
        sa.Column("text_error", sa.String(length=512), nullable=False),
        sa.Column("meta", sa.LargeBinary(), nullable=False),
        sa.Column("creator", sa.String(length=128), nullable=False),
        sa.Column("source_uri", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_files_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
    )
    op.create_index("ix_files_listing", "files", ["workspace_id", "created_at", "id"])
    op.create_index("ix_files_usage", "files", ["workspace_id", "deleted_at", "size_bytes"])
    op.create_index("ix_files_sha256", "files", ["sha256"])
    op.create_index("ix_files_text_state", "files", ["text_state"])
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=False),
        sa.Column("media_type", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("meta", sa.LargeBinary(), nullable=False),
        sa.Column("committed_size", sa.BigInteger(), nullable=False),
        sa.Column("creator", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("file_id", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_uploads_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
    )
    op.create_index("ix_uploads_workspace", "uploads", ["workspace_id", "expires_at"])
    op.create_index("ix_uploads_expiry", "uploads", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_uploads_expiry", table_name="uploads")
    op.drop_index("ix_uploads_workspace", table_name="uploads")
    op.drop_table("uploads")
    op.drop_index("ix_files_text_state", table_name="files")
    op.drop_index("ix_files_sha256", table_name="files")
    op.drop_index("ix_files_usage", table_name="files")
    op.drop_index("ix_files_listing", table_name="files")
    op.drop_table("files")
