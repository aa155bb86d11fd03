"""study flags kept one by one, and holds

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 02:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN on both databases (as 0004): SQLite's batch mode would copy tables and
    # drop the append-only triggers of other tables' migrations with them.
    op.add_column(
        "studies", sa.Column("flags", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
    )
    op.add_column("studies", sa.Column("hold_reason", sa.Text(), nullable=True))
    # An old flag_reason becomes one flag of unknown time; flag_reason stays readable as is.
    studies = sa.table(
        "studies",
        sa.column("id", sa.Integer),
        sa.column("flag_reason", sa.Text),
        sa.column("flags", sa.JSON),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(studies.c.id, studies.c.flag_reason).where(studies.c.flag_reason.is_not(None))
    ).all()
    for study_id, reason in rows:
        conn.execute(
            sa.update(studies)
            .where(studies.c.id == study_id)
            .values(flags=[{"kind": "legacy", "reason": reason, "at": None}])
        )


def downgrade() -> None:
    # SQLite (3.35 and later) drops a column in place: no table copy, no trigger lost.
    op.drop_column("studies", "hold_reason")
    op.drop_column("studies", "flags")
