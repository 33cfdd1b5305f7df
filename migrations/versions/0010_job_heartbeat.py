"""jobs.heartbeat_at and jobs.sends: a worker's liveness per running job (a job whose worker is
gone goes back within a minute, not the processing timeout) and how often a job was handed to the
broker (a lost message is re-sent with backoff); listeners: each DICOM listener's liveness, so
settling does not count a listener or database outage as silence

Revision ID: 0010
Revises: 0009
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Jobs running at the upgrade have no heartbeat: they are judged by started_at.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("sends", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "listeners",
        sa.Column("name", sa.String(length=200), primary_key=True),
        sa.Column("up_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("listeners")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("sends")
        batch.drop_column("heartbeat_at")
