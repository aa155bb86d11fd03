"""A study's priors in radai's own database: earlier finished CT studies of the same patient.

The patient is matched on Patient ID only (names are spelled differently across sites and
visits); a study without a Patient ID has no priors, since matching on nothing would compare two
patients. Dates come from StudyDate; studies without one sort by when they were received.
Imports only `db`.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Study, StudyState


def local_priors(session: Session, study: Study) -> list[Study]:
    """Earlier DONE studies with CT of ``study``'s patient, the most recent first (undated last)."""
    if not study.patient_id or not study.patient_id.strip():
        return []
    rows = session.execute(
        select(Study).where(
            Study.patient_id == study.patient_id,
            Study.id != study.id,
            Study.state == StudyState.DONE,
        )
    ).scalars()
    earlier = [s for s in rows if "CT" in (s.modalities or "").split("\\") and _before(s, study)]
    return sorted(earlier, key=lambda s: (s.study_date or "", s.first_received_at), reverse=True)


def _before(a: Study, b: Study) -> bool:
    """Whether ``a`` was acquired before ``b``: by StudyDate when both have different dates, else
    by when radai received them (a study without a date cannot be placed by date)."""
    if a.study_date and b.study_date and a.study_date != b.study_date:
        return a.study_date < b.study_date
    return a.first_received_at < b.first_received_at
