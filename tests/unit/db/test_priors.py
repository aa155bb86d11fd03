"""db.priors: a study's priors are earlier finished CT studies of the same Patient ID, newest
first; nothing is ever matched on an empty Patient ID or across patients."""

from __future__ import annotations

from datetime import timedelta

import pytest

from db import Study, StudyState
from db.models import utcnow
from db.priors import local_priors


def _study(s, uid, patient, date, *, state=StudyState.DONE, modalities="CT", age_h=0):
    row = Study(
        study_uid=uid,
        state=state,
        patient_id=patient,
        study_date=date,
        modalities=modalities,
        first_received_at=utcnow() - timedelta(hours=age_h),
    )
    s.add(row)
    s.flush()
    return row


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_priors_are_earlier_done_ct_studies_of_the_same_patient(database):
    with database.session() as s:
        current = _study(s, "1.9", "P1", "20250301")
        older = _study(s, "1.1", "P1", "20230101", age_h=5)
        newer_prior = _study(s, "1.2", "P1", "20240101", age_h=4)
        _study(s, "1.3", "P2", "20240101")  # another patient
        _study(s, "1.4", "P1", "20240601", state=StudyState.FAILED)  # not finished
        _study(s, "1.5", "P1", "20240701", modalities="MR")  # not CT
        _study(s, "1.6", "P1", "20260101")  # later than the current study
        _study(s, "1.7", "P1", None, age_h=1)  # undated: placed by receipt (after 1.2)
        got = [p.study_uid for p in local_priors(s, current)]
        # dated priors newest first, the undated one (placed before by receipt time) last
        assert got == [newer_prior.study_uid, older.study_uid, "1.7"]


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("patient", [None, "", "   "])
def test_no_patient_id_means_no_priors(database, patient):
    with database.session() as s:
        _study(s, "1.1", patient, "20230101", age_h=5)
        current = _study(s, "1.9", patient, "20250301")
        assert local_priors(s, current) == []
