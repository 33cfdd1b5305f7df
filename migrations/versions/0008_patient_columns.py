"""studies.patient_name and studies.patient_id: shown to radiologists on the worklist and the
study page, and the worklist filters by patient ID (never logged, counted or in error bodies)

Revision ID: 0008
Revises: 0007
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Studies received before stay without them (filled only at ingest, from the instances' headers).
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("patient_name", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("patient_id", sa.String(length=64), nullable=True))
        batch.create_index("ix_studies_patient_id", ["patient_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_patient_id")
        batch.drop_column("patient_id")
        batch.drop_column("patient_name")
