"""job leases: who runs a job and until when, renewed while it runs

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 05:00:00.000000
"""

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Jobs running when this migration runs were claimed without a lease; they get the broker's
# default visibility timeout, the time their redelivery would have taken before leases.
_LEGACY_GRACE = timedelta(seconds=900)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("lease_expiries", sa.Integer(), nullable=False, server_default="0")
        )
        batch.create_index("ix_jobs_lease_expires_at", ["lease_expires_at"])
    jobs = sa.table(
        "jobs",
        sa.column("state", sa.String),
        sa.column("lease_expires_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        jobs.update()
        .where(jobs.c.state == "RUNNING")
        .values(lease_expires_at=datetime.now(UTC) + _LEGACY_GRACE)
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_lease_expires_at")
        batch.drop_column("lease_expiries")
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
