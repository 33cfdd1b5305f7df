"""Comparison with the patient's prior study (app.priors): studies.issuer_of_patient_id and
studies.patient_birth_date (who the patient is), and the comparison on results (every scoring's)
and on studies (the current scoring's, for the worklist); prior_lookups: looks for a study's prior
on the PACS, with their state and reason

Revision ID: 0012
Revises: 0011
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

#: Columns both tables carry: the prior study and the change since it.
COMPARISON = (
    ("prior_study_uid", sa.String(length=64)),
    ("prior_study_date", sa.String(length=8)),
    ("prior_days", sa.Integer()),
    ("severity_change", sa.Float()),
    ("prior_reason", sa.Text()),
)
RESULT_ONLY = (
    ("prior_result_id", sa.Integer()),
    ("severity_left_change", sa.Float()),
    ("severity_right_change", sa.Float()),
    ("lesion_volume_change_ml", sa.Float()),
)


def upgrade() -> None:
    # Studies received before stay without issuer and birth date (filled only at ingest); they
    # still match priors by patient ID, with nothing to contradict it.
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("patient_birth_date", sa.String(length=8), nullable=True))
        for name, kind in COMPARISON:
            batch.add_column(sa.Column(name, kind, nullable=True))
    with op.batch_alter_table("results") as batch:
        for name, kind in (*RESULT_ONLY, *COMPARISON):
            batch.add_column(sa.Column(name, kind, nullable=True))
    op.create_table(
        "prior_lookups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("prior_study_uid", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id"),
    )
    op.create_index("ix_prior_lookups_state", "prior_lookups", ["state"])
    op.create_index("ix_prior_lookups_prior_study_uid", "prior_lookups", ["prior_study_uid"])


def downgrade() -> None:
    op.drop_index("ix_prior_lookups_prior_study_uid", table_name="prior_lookups")
    op.drop_index("ix_prior_lookups_state", table_name="prior_lookups")
    op.drop_table("prior_lookups")
    with op.batch_alter_table("results") as batch:
        for name, _ in (*RESULT_ONLY, *COMPARISON):
            batch.drop_column(name)
    with op.batch_alter_table("studies") as batch:
        for name, _ in COMPARISON:
            batch.drop_column(name)
        batch.drop_column("patient_birth_date")
        batch.drop_column("issuer_of_patient_id")
