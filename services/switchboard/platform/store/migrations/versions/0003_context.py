"""The context service: conversations, messages, memory items with full-text search.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

Full-text search is backend-specific and lives only here (the models leave it
out; ``models.SEARCH_*`` tells the drift check to ignore it):

* SQLite: an FTS5 table ``memory_fts`` (porter stemming, like PostgreSQL's
  ``english`` configuration), maintained by the store in the same transaction
  as the row, keyed by ``memory_items.fts_rowid``.
* PostgreSQL: a stored generated ``tsvector`` column with a GIN index, so the
  database keeps it in step with ``content`` by itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch copy): recreating ``workspaces`` on SQLite
    # would cascade-delete every membership through the foreign keys.
    op.add_column(
        "workspaces", sa.Column("description", sa.Text(), nullable=False, server_default="")
    )
    op.create_index(op.f("ix_workspaces_deleted_at"), "workspaces", ["deleted_at"], unique=False)
    op.add_column(
        "workspace_members", sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("meta", sa.LargeBinary(), nullable=False),
        sa.Column("archived", sa.Boolean(), nullable=False),
        sa.Column("creator", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("message_count", sa.BigInteger(), nullable=False),
        sa.Column("token_count", sa.BigInteger(), nullable=False),
        sa.Column("summary_id", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_conversations_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
    )
    op.create_index(
        "ix_conversations_listing", "conversations", ["workspace_id", "updated_at", "id"]
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("conversation_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("archived", sa.Boolean(), nullable=False),
        sa.Column("summary_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_messages_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("conversation_id", "seq", name="uq_messages_conversation_seq"),
    )
    op.create_index("ix_messages_live", "messages", ["conversation_id", "archived", "seq"])
    op.create_table(
        "memory_items",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("scope", sa.String(length=160), nullable=False),
        sa.Column("workspace_id", sa.String(length=63), nullable=True),
        sa.Column("conversation_id", sa.String(length=32), nullable=True),
        sa.Column("user_id", sa.String(length=32), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("pinned", sa.Boolean(), nullable=False),
        sa.Column("meta", sa.LargeBinary(), nullable=False),
        sa.Column("sources", sa.Text(), nullable=False),
        sa.Column("creator", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("fts_rowid", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_memory_items_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_memory_items_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_memory_items_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_memory_items")),
        sa.UniqueConstraint("fts_rowid", name=op.f("uq_memory_items_fts_rowid")),
    )
    op.create_index("ix_memory_items_listing", "memory_items", ["scope", "created_at", "id"])
    op.create_index("ix_memory_items_pinned", "memory_items", ["scope", "pinned"])
    op.create_index(
        op.f("ix_memory_items_conversation_id"), "memory_items", ["conversation_id"], unique=False
    )
    op.create_table(
        "memory_scopes",
        sa.Column("scope", sa.String(length=160), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope", name=op.f("pk_memory_scopes")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("resource", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index(
        op.f("ix_idempotency_keys_created_at"), "idempotency_keys", ["created_at"], unique=False
    )
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE VIRTUAL TABLE memory_fts USING fts5(content, tokenize='porter unicode61')"
        )
    else:
        op.execute(
            "ALTER TABLE memory_items ADD COLUMN search tsvector "
            "GENERATED ALWAYS AS (to_tsvector('english', content)) STORED"
        )
        op.execute("CREATE INDEX ix_memory_items_search ON memory_items USING gin (search)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TABLE memory_fts")
    op.drop_index(op.f("ix_idempotency_keys_created_at"), table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_table("memory_scopes")
    op.drop_index(op.f("ix_memory_items_conversation_id"), table_name="memory_items")
    op.drop_index("ix_memory_items_pinned", table_name="memory_items")
    op.drop_index("ix_memory_items_listing", table_name="memory_items")
    op.drop_table("memory_items")
    op.drop_index("ix_messages_live", table_name="messages")
    op.drop_table("messages")
    op.drop_index("ix_conversations_listing", table_name="conversations")
    op.drop_table("conversations")
    op.drop_index(op.f("ix_workspaces_deleted_at"), table_name="workspaces")
    # Native DROP COLUMN (SQLite 3.35+), for the same reason as in upgrade().
    op.execute("ALTER TABLE workspace_members DROP COLUMN updated_at")
    op.execute("ALTER TABLE workspaces DROP COLUMN description")
