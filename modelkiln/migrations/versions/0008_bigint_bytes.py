"""Byte counts in 64 bits: a 2.2 GB checkpoint or a GPU measurement above 2 GiB.

SQLite's INTEGER is already 64-bit, so only PostgreSQL's 32-bit ``integer`` columns change
(a copy of every SQLite table for nothing is what batch mode would do there).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

COLUMNS = (("checkpoints", "size_bytes", False), ("variants", "size_bytes", True),
           ("measurements", "peak_memory_bytes", False))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer(),
                        existing_nullable=nullable)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger(),
                        existing_nullable=nullable)
