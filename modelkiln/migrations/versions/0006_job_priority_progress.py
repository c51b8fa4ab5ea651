"""Jobs in cheap-first order, with what they are doing: priority, estimate, progress.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("estimate_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("progress", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("progress")
        batch_op.drop_column("estimate_seconds")
        batch_op.drop_column("priority")
