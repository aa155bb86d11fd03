"""Record how a job ended: the job row, its outputs, exports queued through the outbox, earlier
results superseded, the study's state changed through the lifecycle (and audited).

Takes the `JobTicket`, the end state and, for a result, `Written`; says whether it recorded. Only
the holder of the job's lease records (db/leases.py): a worker whose lease lapsed (it was frozen,
or cut off from the database, and the study was queued again) has its late end refused and
audited as "job.lease_lost", so the job key keeps a single result.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from db import Export, Job, Output, Study, StudyState, audit, leases, lifecycle
from db.audit_actions import AuditAction
from db.models import utcnow
from db.outbox_tasks import ExportOutput
from db.session import Database
from workers.pipeline.claim import ACTOR, RUNNING, JobTicket
from workers.pipeline.write import Written


def record_end(
    db: Database,
    ticket: JobTicket,
    state: StudyState,
    *,
    reason: str | None = None,
    written: Written | None = None,
    timings: dict[str, float] | None = None,
    destinations: Sequence[str] = (),
    model_versions: dict[str, str] | None = None,
) -> bool:
    now = utcnow()
    with db.session() as s:
        job = s.get_one(Job, ticket.job_id, with_for_update=True)
        study = s.get_one(Study, ticket.study_id, with_for_update=True)
        if not _holds(job, ticket):
            _audit_lost(s, ticket)
            return False
        job.lease_owner = None
        job.lease_expires_at = None
        job.state = state
        job.error = reason
        job.finished_at = now
        if model_versions is not None:
            job.model_versions = model_versions
        if timings is not None:
            job.timings = timings
        if written:
            job.findings = written.findings.to_json()
            existing = {o.sop_instance_uid for o in job.outputs}
            for out in written.outputs:
                if out["sop_instance_uid"] not in existing:
                    s.add(Output(job_id=job.id, study_id=study.id, **out))
            s.flush()
            # Exports go through the outbox: written with the result, published by the node.
            for name in destinations:
                export = Export(job_id=job.id, study_id=study.id, destination=name)
                s.add(export)
                s.flush()
                s.add(ExportOutput(export.id).message(now, ticket.study_uid))
        if state in (StudyState.DONE, StudyState.NOT_APPLICABLE):
            s.execute(
                update(Job)
                .where(Job.study_id == study.id, Job.id != job.id, Job.superseded.is_(False))
                .values(superseded=True)
            )
        detail = {"job": job.id, "state": str(state)}
        if reason:
            detail["reason"] = reason
        if written:
            detail.update(
                probability=written.findings.screening_probability,
                lesions=len(written.findings.lesions),
                outputs=[o["sop_instance_uid"] for o in written.outputs],
                model=model_versions,
            )
        event = lifecycle.JOB_EVENTS[state]
        # A study reopened meanwhile stays RECEIVING (this result will itself be superseded):
        # the job's end is audited all the same, without a state change.
        if study.state == StudyState.PROCESSING:
            study.error = reason
            if written:
                study.priority = written.findings.priority
            lifecycle.transition(s, study, event, actor=ACTOR, detail=detail, now=now)
        else:
            audit.append(s, ACTOR, event, ticket.study_uid, detail)
    return True


def lease_lost(db: Database, ticket: JobTicket) -> None:
    """Audit that this run lost its lease and records nothing (the study was queued again)."""
    with db.session() as s:
        _audit_lost(s, ticket)


def _audit_lost(s: Session, ticket: JobTicket) -> None:
    lost = {"job": ticket.job_id, "attempt": ticket.attempt, "lease_owner": ticket.owner}
    audit.append(s, ACTOR, AuditAction.JOB_LEASE_LOST, ticket.study_uid, lost)


def _holds(job: Job, ticket: JobTicket) -> bool:
    # The lease is the ticket's: same attempt, still running, same owner (a failure-only
    # ticket, owner None, records only a job released to its retry and not claimed since).
    return (
        job.state == RUNNING and job.attempts == ticket.attempt and job.lease_owner == ticket.owner
    )


def fail(db: Database, study_uid: str, reason: str, owner: str | None = None) -> bool:
    """Record a permanent failure of the running job of a study (e.g. retries exhausted), unless
    another worker than `owner` (default: this process) holds it now."""
    owner = owner or leases.owner_name()
    with db.session() as s:
        row = s.execute(
            select(Job.id, Job.study_id, Job.input_hash, Job.attempts, Job.lease_owner)
            .join(Study, Study.id == Job.study_id)
            .where(
                Study.study_uid == study_uid,
                Job.state == RUNNING,
                or_(Job.lease_owner.is_(None), Job.lease_owner == owner),
            )
            .order_by(Job.id.desc())
        ).first()
    if row is None:
        return False
    ticket = JobTicket(row[0], row[1], study_uid, row[2], row[3], row[4])
    return record_end(db, ticket, StudyState.FAILED, reason=reason)
