"""studies.settle_due_at: set when an association that delivered a complete series is released,
so the study settles after a short quiet period instead of the full settle time; instances.received_by:
the listener process (host:pid) that received each instance, now that several share one port

Revision ID: 0011
Revises: 0010
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("settle_due_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("received_by", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("received_by")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("settle_due_at")
