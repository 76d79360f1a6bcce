"""A2A push notification configs: per-task webhooks delivered by the webhook engine.

``push_configs`` holds them; their deliveries are ``webhook_deliveries`` rows
whose endpoint is a push config, so the deliveries' foreign key to
``integrations`` goes (each endpoint's store deletes its deliveries with it,
and the engine's maintenance deletes any a pruned workspace left behind).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "push_configs",
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("endpoint_id", sa.String(length=63), nullable=False),
        sa.Column("conversation_id", sa.String(length=63), nullable=False),
        sa.Column("run_id", sa.String(length=63), nullable=False),
        sa.Column("config_id", sa.String(length=64), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("token", sa.LargeBinary(), nullable=True),
        sa.Column("auth_scheme", sa.String(length=64), nullable=False),
        sa.Column("credentials", sa.LargeBinary(), nullable=True),
        sa.Column("creator", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready", sa.Boolean(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_push_configs_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workspace_id", "endpoint_id", name=op.f("pk_push_configs")),
        sa.UniqueConstraint(
            "workspace_id", "conversation_id", "run_id", "config_id", name="uq_push_configs_task"
        ),
    )
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_constraint("fk_webhook_deliveries_workspace_id_integrations", type_="foreignkey")


def downgrade() -> None:
    op.execute(
        "DELETE FROM webhook_deliveries WHERE NOT EXISTS (SELECT 1 FROM integrations i "
        "WHERE i.workspace_id = webhook_deliveries.workspace_id "
        "AND i.id = webhook_deliveries.integration_id)"
    )
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.create_foreign_key(
            "fk_webhook_deliveries_workspace_id_integrations",
            "integrations",
            ["workspace_id", "integration_id"],
            ["workspace_id", "id"],
            ondelete="CASCADE",
        )
    op.drop_table("push_configs")
