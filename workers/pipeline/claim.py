"""Claim the job for a study's current instances (or say why there is nothing to do).

Takes the study UID and the pipeline version; gives a `JobTicket`. The job is keyed by (study,
pipeline version, hash of the input instances): the same key twice yields one result. A job
starts only for a study that is STABLE, QUEUED or PROCESSING (db/lifecycle.py), and not while
another worker holds a live lease on it (db/leases.py): a message the broker delivers again to a
second worker while the first still runs the study does nothing. The claim takes the lease.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import select

from db import Instance, Job, Series, Study, StudyState, leases, lifecycle
from db.audit_actions import AuditAction
from db.models import utcnow
from db.own_results import is_own_result
from db.session import Database

PIPELINE = "chest-ct-lung-lesions"
ACTOR = "worker"
RUNNING = leases.RUNNING


@dataclass(frozen=True)
class JobTicket:
    job_id: int
    study_id: int
    study_uid: str
    input_hash: str
    attempt: int
    # Who holds the job's lease; None for a ticket that only records a failure (`record.fail`).
    owner: str | None = None

    @property
    def lease(self) -> leases.Lease | None:
        return None if self.owner is None else leases.Lease(self.job_id, self.owner, self.attempt)


def input_hash(pairs: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for sop_uid, sha in sorted(pairs):
        digest.update(f"{sop_uid}:{sha}\n".encode())
    return digest.hexdigest()


def claim(
    db: Database,
    study_uid: str,
    version: str,
    *,
    owner: str | None = None,
    lease_seconds: float = leases.DEFAULT_SECONDS,
) -> JobTicket | str:
    """Claim the job for the study's current instances, or say why there is nothing to do.

    `owner` (default: this host and process) takes the job's lease for `lease_seconds`."""
    owner = owner or leases.owner_name()
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
        now = utcnow()
        # Only a PROCESSING study is in the holder's hands: one queued again meanwhile (reopened
        # by a duplicate instance, same key) is taken over, and the old holder's end refused.
        if (
            study.state == StudyState.PROCESSING
            and job is not None
            and leases.held_elsewhere(job, owner, now)
        ):
            return f"job {job.id} is running under {job.lease_owner}'s lease"
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
        job.started_at = now
        job.error = None
        leases.take(job, owner, lease_seconds, now)
        study.attempts += 1
        s.flush()
        lifecycle.transition(
            s,
            study,
            AuditAction.JOB_STARTED,
            actor=ACTOR,
            detail={"job": job.id, "attempt": job.attempts, "lease_owner": owner},
            now=now,
        )
        return JobTicket(job.id, study.id, study_uid, key, job.attempts, owner)
