"""QIDO-RS attributes of studies and series, so DICOMweb searches match in the database

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 09:00:00.000000

The rows are filled by DICOMweb from each study's and series' first archived instance (on the
first search after an instance arrives, and for the archive as it stands on the first search
after this migration): nothing is copied here.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qido_studies",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("header_path", sa.Text(), nullable=False),
        sa.Column("patient_id", sa.Text(), nullable=True),
        sa.Column("patient_name", sa.Text(), nullable=True),
        sa.Column("study_date", sa.Text(), nullable=True),
        sa.Column("study_time", sa.Text(), nullable=True),
        sa.Column("accession_number", sa.Text(), nullable=True),
        sa.Column("referring_physician_name", sa.Text(), nullable=True),
        sa.Column("study_identifier", sa.Text(), nullable=True),
        sa.Column("study_description", sa.Text(), nullable=True),
        sa.Column("multivalued", sa.Boolean(), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.PrimaryKeyConstraint("study_id"),
    )
    for column in ("patient_id", "patient_name", "study_date", "accession_number"):
        op.create_index(f"ix_qido_studies_{column}", "qido_studies", [column])
    op.create_table(
        "qido_series",
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("header_path", sa.Text(), nullable=False),
        sa.Column("modality", sa.Text(), nullable=True),
        sa.Column("series_number", sa.Text(), nullable=True),
        sa.Column("series_description", sa.Text(), nullable=True),
        sa.Column("body_part_examined", sa.Text(), nullable=True),
        sa.Column("pps_start_date", sa.Text(), nullable=True),
        sa.Column("pps_start_time", sa.Text(), nullable=True),
        sa.Column("multivalued", sa.Boolean(), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"]),
        sa.PrimaryKeyConstraint("series_id"),
    )
    op.create_index("ix_qido_series_modality", "qido_series", ["modality"])


def downgrade() -> None:
    op.drop_table("qido_series")
    op.drop_table("qido_studies")
