"""Dispatcher leases carry the address other replicas reach the instance at.

A replica that gets CancelRun or SubmitToolApprovals for a run another one
runs forwards the call to the owner's address (``SWITCHBOARD_ADVERTISE_ADDRESS``).
Empty for a lease written by a version that did not store one (a rolling
upgrade): its runs cannot be reached from other replicas until it renews.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("dispatcher_leases") as batch:
        batch.add_column(
            sa.Column("address", sa.String(length=300), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("dispatcher_leases") as batch:
        batch.drop_column("address")
