"""worklist index in the worklist's order; retention bookkeeping

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch_op:
        batch_op.add_column(sa.Column("files_purged_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.drop_index("ix_studies_worklist")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE INDEX ix_studies_worklist_pg ON studies (priority DESC NULLS LAST, first_received_at, id)")
    else:
        op.execute("CREATE INDEX ix_studies_worklist_sqlite ON studies (priority DESC, first_received_at, id)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_studies_worklist_pg", table_name="studies")
    else:
        op.drop_index("ix_studies_worklist_sqlite", table_name="studies")
    with op.batch_alter_table("studies") as batch_op:
        batch_op.create_index("ix_studies_worklist", ["priority", "last_received_at"], unique=False)
        batch_op.drop_column("files_purged_at")
