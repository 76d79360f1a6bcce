"""Budgets and quotas: budgets, their periods' counters and reservations in
flight, a workspace's quotas, what each run spent as columns of its row, and the
prices of an integration's tool calls as columns of its row.

Runs ended before this revision keep zero usage columns: their usage stays in
the serialized run, and QueryUsage counts runs from this revision on.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("api_key_id", sa.String(length=64), nullable=False, server_default="")
        )
        batch.add_column(
            sa.Column("model", sa.String(length=256), nullable=False, server_default="")
        )
        for column in ("input_tokens", "output_tokens", "cost_micros"):
            batch.add_column(sa.Column(column, sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("usage_day", sa.String(length=10), nullable=False, server_default="")
        )
        batch.create_index("ix_runs_usage", ["workspace_id", "usage_day"])
        batch.create_index("ix_runs_quota", ["workspace_id", "state", "api_key_id"])
    with op.batch_alter_table("integrations") as batch:
        batch.add_column(
            sa.Column("call_price_micros", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("tool_call_prices", sa.Text(), nullable=False, server_default="")
        )
    op.create_table(
        "budgets",
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column("scope_kind", sa.String(length=16), nullable=False),
        sa.Column("scope_id", sa.String(length=128), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("creator", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_budgets_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workspace_id", "id", name=op.f("pk_budgets")),
    )
    op.create_index(
        "ix_budgets_scope", "budgets", ["workspace_id", "scope_kind", "scope_id"], unique=False
    )
    op.create_table(
        "budget_windows",
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("budget_id", sa.String(length=63), nullable=False),
        sa.Column("window", sa.String(length=48), nullable=False),
        *(
            sa.Column(column, sa.BigInteger(), nullable=False)
            for column in (
                "cost_used",
                "cost_held",
                "input_used",
                "input_held",
                "output_used",
                "output_held",
            )
        ),
        sa.Column("alerted", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id", "budget_id"],
            ["budgets.workspace_id", "budgets.id"],
            name=op.f("fk_budget_windows_workspace_id_budgets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "workspace_id", "budget_id", "window", name=op.f("pk_budget_windows")
        ),
    )
    op.create_table(
        "budget_holds",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("budget_id", sa.String(length=63), nullable=False),
        sa.Column("window", sa.String(length=48), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", "workspace_id", "budget_id", name=op.f("pk_budget_holds")),
    )
    op.create_index("ix_budget_holds_run", "budget_holds", ["run_id"], unique=False)
    op.create_table(
        "workspace_quotas",
        sa.Column("workspace_id", sa.String(length=63), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_workspace_quotas_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workspace_id", name=op.f("pk_workspace_quotas")),
    )


def downgrade() -> None:
    op.drop_table("workspace_quotas")
    op.drop_index("ix_budget_holds_run", table_name="budget_holds")
    op.drop_table("budget_holds")
    op.drop_table("budget_windows")
    op.drop_index("ix_budgets_scope", table_name="budgets")
    op.drop_table("budgets")
    with op.batch_alter_table("integrations") as batch:
        batch.drop_column("tool_call_prices")
        batch.drop_column("call_price_micros")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_quota")
        batch.drop_index("ix_runs_usage")
        for column in (
            "usage_day",
            "cost_micros",
            "output_tokens",
            "input_tokens",
            "model",
            "api_key_id",
        ):
            batch.drop_column(column)
