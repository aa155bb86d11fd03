"""db.monitoring on SQLite and PostgreSQL over a database whose rows are known: two model
versions, finished, failed, not-applicable and superseded jobs, re-reviews and whole-study
reviews, studies over three days; every figure is derived by hand from those rows."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from db import Job, Review, Study, StudyState, User
from db.monitoring import Spread, monitoring, percentile

T0 = datetime(2026, 1, 10, 8, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
DAY = timedelta(days=1)
A = ("chest-ct", "1.0", {"radai-classical-baseline": "0.1.0"})
B = ("chest-ct", "2.0", {"unet": "0.3", "cnn": "1.2"})


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([7.0], 90) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([180.0, 600.0, 1800.0], 90) == pytest.approx(1560.0)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert Spread.of([10.0, 20.0]) == Spread(2, 15.0, 19.0)


def _fill(db) -> None:  # noqa: ANN001
    with db.session() as s:
        doc = User(name="doc", role="radiologist", password_hash="x")
        s.add(doc)
        s.flush()
        uid = iter(range(1, 100))

        def study(received: datetime, state: str, error: str | None = None) -> Study:
            st = Study(
                study_uid=f"1.2.3.{next(uid)}",
                state=state,
                error=error,
                first_received_at=received,
                instance_count=1,
            )
            s.add(st)
            s.flush()
            return st

        def job(st: Study, model, state: str, finished=None, lesions=0, error=None, **kw) -> Job:  # noqa: ANN001
            pipeline, version, models = model
            j = Job(
                study_id=st.id,
                pipeline=pipeline,
                pipeline_version=version,
                input_hash=f"h{next(uid)}",
                state=state,
                error=error,
                model_versions=models,
                findings={"lesions": [{"label": n} for n in range(1, lesions + 1)]}
                if state == StudyState.DONE
                else None,
                finished_at=finished,
                **kw,
            )
            s.add(j)
            s.flush()
            return j

        def review(j: Job, label, decision: str, at: datetime) -> None:  # noqa: ANN001
            s.add(
                Review(
                    study_id=j.study_id,
                    job_id=j.id,
                    lesion_label=label,
                    decision=decision,
                    reason=None if decision == "accept" else "because",
                    user_id=doc.id,
                    created_at=at,
                    model_name="m",
                    model_version="v",
                )
            )

        s1 = study(T0, StudyState.DONE)
        j1 = job(s1, A, StudyState.DONE, T0 + 10 * MIN, lesions=3)
        review(j1, 1, "accept", T0 + 20 * MIN)
        review(j1, 2, "reject", T0 + 21 * MIN)
        review(j1, 3, "amend", T0 + 22 * MIN)
        review(j1, 3, "accept", T0 + 40 * MIN)  # the re-review wins

        s2 = study(T0 + DAY, StudyState.DONE)
        j2 = job(s2, A, StudyState.DONE, T0 + DAY + 30 * MIN, lesions=2)
        review(j2, 1, "amend", T0 + DAY + 90 * MIN)
        review(j2, None, "accept", T0 + DAY + 95 * MIN)

        s3 = study(T0 + DAY + MIN, StudyState.FAILED, "pixel data undecodable")
        job(s3, A, StudyState.FAILED, T0 + DAY + 2 * MIN, error="pixel data undecodable")
        s4 = study(T0 + DAY + 2 * MIN, StudyState.NOT_APPLICABLE, "modality MR is not CT")
        job(s4, A, StudyState.NOT_APPLICABLE, T0 + DAY + 3 * MIN, error="modality MR is not CT")
        s5 = study(T0 + 2 * DAY, StudyState.NOT_APPLICABLE)
        job(s5, A, StudyState.NOT_APPLICABLE, T0 + 2 * DAY + MIN, error="modality MR is not CT")

        s6 = study(T0 + 2 * DAY + MIN, StudyState.DONE)
        job(s6, A, StudyState.DONE, T0 + 2 * DAY + 4 * MIN, lesions=1, superseded=True)
        j6 = job(s6, B, StudyState.DONE, T0 + 2 * DAY + 6 * MIN, lesions=1)
        review(j6, 1, "accept", T0 + 2 * DAY + 66 * MIN)

        s7 = study(T0 + 2 * DAY + 5 * MIN, StudyState.RECEIVING)
        job(s7, ("chest-ct", "2.0", None), "RUNNING")  # not finished: no model versions yet


def test_figures_per_model_version(database):
    _fill(database)
    with database.session() as s:
        m = monitoring(s)
    assert m.studies == 7
    assert m.study_states == {"DONE": 3, "FAILED": 1, "NOT_APPLICABLE": 2, "RECEIVING": 1}
    assert [(d.day, d.received, d.states) for d in m.per_day] == [
        (date(2026, 1, 10), 1, {"DONE": 1}),
        (date(2026, 1, 11), 3, {"DONE": 1, "FAILED": 1, "NOT_APPLICABLE": 1}),
        (date(2026, 1, 12), 3, {"NOT_APPLICABLE": 1, "DONE": 1, "RECEIVING": 1}),
    ]
    a, running, b = m.models  # most jobs first; ties by label
    assert a.label == "chest-ct 1.0 · radai-classical-baseline 0.1.0"
    assert b.label == "chest-ct 2.0 · cnn 1.2, unet 0.3"
    assert running.label == "chest-ct 2.0" and running.states == {"RUNNING": 1}

    assert a.jobs == 6 and a.states == {"DONE": 3, "FAILED": 1, "NOT_APPLICABLE": 2}
    assert (a.failed, a.not_applicable) == (1, 2)
    assert a.findings == 6  # 3 + 2 + 1 (the superseded job's lesion)
    # S1: accept, reject, amend->accept; S2: amend. Whole-study reviews apart.
    assert (a.reviewed, a.accepted, a.rejected, a.amended) == (4, 2, 1, 1)
    assert a.acceptance_rate == 0.5 and a.study_reviews == {"accept": 1}
    # Received -> result: 10, 30 and 3 min; result -> first review: 10 and 60 min.
    assert a.received_to_result == Spread(3, 600.0, pytest.approx(1560.0))
    assert a.result_to_review == Spread(2, 2100.0, pytest.approx(3300.0))
    assert a.received_to_review == Spread(2, 3300.0, pytest.approx(4980.0))
    assert a.failure_reasons == [
        ("NOT_APPLICABLE", "modality MR is not CT", 2),
        ("FAILED", "pixel data undecodable", 1),
    ]

    # Studies by their own recorded reason (S5's is missing here).
    assert m.study_failures == [
        ("FAILED", "pixel data undecodable", 1),
        ("NOT_APPLICABLE", "(no reason recorded)", 1),
        ("NOT_APPLICABLE", "modality MR is not CT", 1),
    ]
    assert b.jobs == 1 and b.model_versions == {"cnn": "1.2", "unet": "0.3"}
    assert (b.reviewed, b.accepted, b.acceptance_rate) == (1, 1, 1.0)
    assert b.received_to_result == Spread(1, 300.0, 300.0)
    assert b.result_to_review == Spread(1, 3600.0, 3600.0)
    assert b.failure_reasons == []


def test_period_counts_studies_received_since(database):
    _fill(database)
    with database.session() as s:
        m = monitoring(s, since=T0 + DAY)
        empty = monitoring(s, since=T0 + 10 * DAY)
    assert m.studies == 6 and [d.day for d in m.per_day][0] == date(2026, 1, 11)
    a = m.models[0]
    assert a.jobs == 5 and (a.reviewed, a.accepted, a.amended) == (1, 0, 1)
    assert a.acceptance_rate == 0.0
    assert a.received_to_result.n == 2
    assert empty.studies == 0 and empty.models == [] and empty.per_day == []
