"""Voice sessions: a session's settings and resume window, and its stored turns
(the user message and the run of each), so a dropped session resumes on any
replica.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "voice_sessions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("conversation_id", sa.String(length=32), nullable=False),
        sa.Column("creator", sa.String(length=128), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("turn_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expire_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_voice_sessions_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_voice_sessions_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_voice_sessions")),
    )
    op.create_index(
        "ix_voice_sessions_conversation",
        "voice_sessions",
        ["conversation_id", "created_at", "id"],
    )
    op.create_index("ix_voice_sessions_expiry", "voice_sessions", ["expire_at"])
    op.create_table(
        "voice_turns",
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("message", sa.String(length=255), nullable=False),
        sa.Column("run", sa.String(length=255), nullable=False),
        sa.Column("recording", sa.String(length=255), nullable=False),
        sa.Column("transcript", sa.Text(), nullable=False),
        sa.Column("audio_ms", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["voice_sessions.id"],
            name=op.f("fk_voice_turns_session_id_voice_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_id", "turn", name=op.f("pk_voice_turns")),
    )


def downgrade() -> None:
    op.drop_table("voice_turns")
    op.drop_index("ix_voice_sessions_expiry", table_name="voice_sessions")
    op.drop_index("ix_voice_sessions_conversation", table_name="voice_sessions")
    op.drop_table("voice_sessions")
