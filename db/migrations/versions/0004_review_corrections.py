"""corrected measurements on amend reviews

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 17:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases: SQLite's batch mode would copy the table and drop
    # 0003's append-only triggers with it. The triggers guard whole rows (any UPDATE or DELETE
    # on reviews), so the new column is append-only like the rest without a trigger of its own.
    op.add_column("reviews", sa.Column("corrections", sa.JSON(), nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_column("reviews", "corrections")
        return
    # SQLite drops a column by rebuilding the table, which drops the triggers: put them back.
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.drop_column("corrections")
    for verb in ("UPDATE", "DELETE"):
        op.execute(f"DROP TRIGGER IF EXISTS reviews_no_{verb.lower()}")
        op.execute(
            f"CREATE TRIGGER reviews_no_{verb.lower()} BEFORE {verb} ON reviews "
            "BEGIN SELECT RAISE(ABORT, 'reviews are append-only'); END"
        )
