"""studies.flags and studies.severity_lower_bound: the current scoring's quality flags on the
worklist row (severity band and priority floored at CT-3 when the severity is a lower bound)

Revision ID: 0007
Revises: 0006
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Studies scored before flags existed have none: an empty list and not a lower bound.
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("flags", sa.JSON(), server_default=sa.text("'[]'"), nullable=False))
        batch.add_column(sa.Column("severity_lower_bound", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("severity_lower_bound")
        batch.drop_column("flags")
