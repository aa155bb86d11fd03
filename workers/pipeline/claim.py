"""Claim the job for a study's current instances (or say why there is nothing to do).

Takes the study UID and the pipeline version; gives a `JobTicket`. The job is keyed by (study,
pipeline version, hash of the input instances): the same key twice yields one result. A job
starts only for a study that is STABLE, QUEUED or PROCESSING (db/lifecycle.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import select

from db import Instance, Job, Series, Study, StudyState, lifecycle
from db.own_results import is_own_result
from db.audit_actions import AuditAction
from db.models import utcnow
from db.session import Database

PIPELINE = "chest-ct-lung-lesions"
ACTOR = "worker"
RUNNING = "RUNNING"


@dataclass(frozen=True)
class JobTicket:
    job_id: int
    study_id: int
    study_uid: str
    input_hash: str
    attempt: int


def input_hash(pairs: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for sop_uid, sha in sorted(pairs):
        digest.update(f"{sop_uid}:{sha}\n".encode())
    return digest.hexdigest()


def claim(db: Database, study_uid: str, version: str) -> JobTicket | str:
    """Claim the job for the study's current instances, or say why there is nothing to do."""
    with db.session() as s:
        study = s.execute(
            select(Study).where(Study.study_uid == study_uid).with_for_update()
        ).scalar_one_or_none()
        if study is None:
            return "unknown study"
        if study.state == StudyState.RECEIVING:
            return "study reopened by new instances; it will be queued again"
        if study.state == StudyState.HELD:
            return "study is held for a person's review (radai release); not analysed"
        rows = s.execute(
            select(
                Instance.sop_instance_uid,
                Instance.sha256,
                Instance.sop_class_uid,
                Series.series_description,
            )
            .join(Series, Series.id == Instance.series_id)
            .where(Instance.study_id == study.id)
        ).all()
        # Our own SEG/SR stored back into the study are not input (db/own_results.py).
        key = input_hash([(a, b) for a, b, cls, desc in rows if not is_own_result(cls, desc)])
        job = s.execute(
            select(Job).where(
                Job.study_id == study.id,
                Job.pipeline_version == version,
                Job.input_hash == key,
            )
        ).scalar_one_or_none()
        if job is not None and job.state in (StudyState.DONE, StudyState.NOT_APPLICABLE):
            event = lifecycle.JOB_EVENTS[StudyState(job.state)]
            if study.state in lifecycle.TRANSITIONS[event].sources:
                lifecycle.transition(
                    s, study, event, actor=ACTOR, detail={"job": job.id, "reused": True}
                )
            return f"already {job.state} for these instances (job {job.id})"
        if study.state not in lifecycle.TRANSITIONS[AuditAction.JOB_STARTED].sources:
            return f"study is {study.state}; nothing to start"
        if job is None:
            job = Job(
                study_id=study.id,
                pipeline=PIPELINE,
                pipeline_version=version,
                input_hash=key,
                state=RUNNING,
                attempts=0,
            )
            s.add(job)
        job.state = RUNNING
        job.attempts += 1
        job.started_at = utcnow()
        job.error = None
        study.attempts += 1
        s.flush()
        lifecycle.transition(
            s,
            study,
            AuditAction.JOB_STARTED,
            actor=ACTOR,
            detail={"job": job.id, "attempt": job.attempts},
        )
        return JobTicket(job.id, study.id, study_uid, key, job.attempts)
