"""keyed audit entries: hash scheme and key id per entry

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-30 02:00:00.000000

Rows written before this revision keep NULL in both columns: db.audit checks them by their
unkeyed SHA-256, and the first keyed entry and the first checkpoint seal them. A downgrade drops
the columns, after which the code of revision 0004 reads keyed entries as altered unkeyed ones.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases (as 0004): SQLite's batch mode would copy the table
    # and drop the append-only triggers of 0001 with it. Nullable with no default, so neither
    # database rewrites a row (an UPDATE the triggers would refuse).
    op.add_column("audit_log", sa.Column("scheme", sa.String(16), nullable=True))
    op.add_column("audit_log", sa.Column("key_id", sa.String(16), nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_column("audit_log", "key_id")
        op.drop_column("audit_log", "scheme")
        return
    # SQLite drops a column by rebuilding the table, which drops the triggers: put them back.
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_column("key_id")
        batch_op.drop_column("scheme")
    for verb in ("UPDATE", "DELETE"):
        op.execute(f"DROP TRIGGER IF EXISTS audit_log_no_{verb.lower()}")
        op.execute(
            f"CREATE TRIGGER audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
            "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
        )
