"""Conversation branches (docs/conversations.md, "Branches"): an edited message or a
regenerated answer starts a branch beside the old one, and both are kept.

* ``messages.branch``: the branch a message was appended on (1, the first, for every
  existing message); ``messages.parent_seq``: the sequence of the message it follows
  (0 for a conversation's first): messages following the same one are versions of each
  other (siblings). Existing messages follow the one before them.
* ``conversations.active_branch`` and ``branch_count``: the branch reads and appends
  follow, and how many there are (1 and 1 for every existing conversation).
* ``conversations.base_*``: a fork's shared history (ForkConversation): the conversation
  it was forked from, the message it ends at, that message's branch and sequence.
* ``message_files``: the files an append stored for its message (inline bytes, a fetched
  URL, a Talk turn's recording), which go when the message is deleted; a file the
  message only names is not its own.
* ``conversation_branches``: one row per branch once a conversation has more than one:
  the branch it forked from and the last of that branch's messages it shares
  (``fork_seq``), and the sequence of its own newest message (``head_seq``).

Revision ID: 0027
Revises: 0026
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0027"
down_revision: str | Sequence[str] | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN, not a batch: on SQLite a batch copies ``messages`` into a new
    # table, and the copy would lose migration 0023's trigger on it.
    op.add_column("messages", sa.Column("branch", sa.Integer(), server_default="1", nullable=False))
    op.add_column(
        "messages", sa.Column("parent_seq", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.execute(
        "UPDATE messages SET parent_seq = COALESCE((SELECT MAX(earlier.seq) FROM messages "
        "earlier WHERE earlier.conversation_id = messages.conversation_id "
        "AND earlier.seq < messages.seq), 0)"
    )
    op.create_index(
        "ix_messages_parent", "messages", ["conversation_id", "parent_seq", "seq"], unique=False
    )
    # Plain ADD COLUMN here too: a batch would copy ``conversations``, which the rows
    # of several tables cascade from.
    for name in ("active_branch", "branch_count"):
        op.add_column(
            "conversations", sa.Column(name, sa.Integer(), server_default="1", nullable=False)
        )
    op.add_column(
        "conversations", sa.Column("base_conversation_id", sa.String(length=32), nullable=True)
    )
    op.add_column(
        "conversations",
        sa.Column("base_message_id", sa.String(length=32), server_default="", nullable=False),
    )
    op.add_column(
        "conversations", sa.Column("base_branch", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column(
        "conversations", sa.Column("base_seq", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.create_index("ix_conversations_base", "conversations", ["base_conversation_id"])
    op.create_table(
        "conversation_branches",
        sa.Column("conversation_id", sa.String(length=32), nullable=False),
        sa.Column("number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("parent", sa.Integer(), nullable=False),
        sa.Column("fork_seq", sa.BigInteger(), nullable=False),
        sa.Column("head_seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_conversation_branches_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", "number", name=op.f("pk_conversation_branches")),
    )

    op.create_table(
        "message_files",
        sa.Column("message_id", sa.String(length=32), nullable=False),
        sa.Column("file_id", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_message_files_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("message_id", "file_id", name=op.f("pk_message_files")),
    )


def downgrade() -> None:
    op.drop_table("message_files")
    op.drop_table("conversation_branches")
    op.drop_index("ix_conversations_base", table_name="conversations")
    for column in ("base_seq", "base_branch", "base_message_id", "base_conversation_id"):
        op.drop_column("conversations", column)
    op.drop_column("conversations", "branch_count")
    op.drop_column("conversations", "active_branch")
    op.drop_index("ix_messages_parent", table_name="messages")
    op.drop_column("messages", "parent_seq")
    op.drop_column("messages", "branch")
