"""Semantic memory (docs/semantic.md): each workspace's index settings, the indexer's
cursor over the event log, its queue, and the indexed chunks with their full-text
index. The vector tables (one per dimension count) are made by the store on first
use, since a deployment's dimensions are not known here.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-26
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _owner_keys(table: str) -> list[sa.Column[object] | sa.ForeignKeyConstraint]:
    return [
        sa.Column("owner", sa.String(length=160), nullable=False),
        sa.Column("workspace_id", sa.String(length=63), nullable=True),
        sa.Column("user_id", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f(f"fk_{table}_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f(f"fk_{table}_user_id_users"),
            ondelete="CASCADE",
        ),
    ]


def upgrade() -> None:
    op.create_table(
        "semantic_indexes",
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("dimensions", sa.Integer(), nullable=False),
        sa.Column("index_messages", sa.Boolean(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_semantic_indexes_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workspace_id", name=op.f("pk_semantic_indexes")),
    )
    op.create_table(
        "semantic_cursor",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("cursor", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_semantic_cursor")),
    )
    op.create_table(
        "semantic_jobs",
        sa.Column("source_kind", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=False),
        *_owner_keys("semantic_jobs"),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=512), nullable=False),
        sa.PrimaryKeyConstraint("source_kind", "source", name=op.f("pk_semantic_jobs")),
    )
    op.create_index("ix_semantic_jobs_due", "semantic_jobs", ["not_before"], unique=False)
    op.create_table(
        "semantic_chunks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        *_owner_keys("semantic_chunks"),
        sa.Column("source_kind", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=False),
        sa.Column("chunk_index", sa.Integer(), nullable=False),
        sa.Column("start_offset", sa.Integer(), nullable=False),
        sa.Column("end_offset", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.String(length=32), nullable=True),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("meta", sa.Text(), nullable=False),
        sa.Column("embedding", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_semantic_chunks")),
        sa.UniqueConstraint(
            "source_kind",
            "source",
            "chunk_index",
            name=op.f("uq_semantic_chunks_source_kind"),
        ),
    )
    op.create_index(
        "ix_semantic_chunks_embedding", "semantic_chunks", ["owner", "embedding"], unique=False
    )
    op.create_index(
        "ix_semantic_chunks_conversation", "semantic_chunks", ["conversation_id"], unique=False
    )
    if op.get_bind().dialect.name == "sqlite":
        # Keyed by the chunk's id (rowid); kept in step by the store, as memory_fts is.
        op.execute(
            "CREATE VIRTUAL TABLE semantic_chunks_fts USING fts5(text, tokenize='porter unicode61')"
        )
    else:
        op.execute(
            "ALTER TABLE semantic_chunks ADD COLUMN search tsvector "
            "GENERATED ALWAYS AS (to_tsvector('english', text)) STORED"
        )
        op.execute("CREATE INDEX ix_semantic_chunks_search ON semantic_chunks USING gin (search)")


def downgrade() -> None:
    bind = op.get_bind()
    # The chunk store's vector tables (``semantic_vec_<dims>``); on PostgreSQL they
    # reference semantic_chunks, which could not be dropped before them.
    for table in sa.inspect(bind).get_table_names():
        if re.fullmatch(r"semantic_vec_\d+", table):
            op.execute(f"DROP TABLE {table}")
    if bind.dialect.name == "sqlite":
        op.execute("DROP TABLE semantic_chunks_fts")
    op.drop_index("ix_semantic_chunks_conversation", table_name="semantic_chunks")
    op.drop_index("ix_semantic_chunks_embedding", table_name="semantic_chunks")
    op.drop_table("semantic_chunks")
    op.drop_index("ix_semantic_jobs_due", table_name="semantic_jobs")
    op.drop_table("semantic_jobs")
    op.drop_table("semantic_cursor")
    op.drop_table("semantic_indexes")
