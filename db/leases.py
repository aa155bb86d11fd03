"""Job leases: the database, not the broker, knows which studies are in a worker's hands.

A worker that claims a job takes its lease (`Job.lease_owner`, `Job.lease_expires_at`) and renews
it while the study runs. When a worker dies, or its host vanishes, the lease lapses and `reap`
(run by the node's loop and by each worker when it starts) queues the study again through the
outbox in one transaction: the job is released, the study goes PROCESSING -> STABLE through
`db.lifecycle` (audited as "job.lease_expired") and a `radai.process_study` message is written.
This holds even when the broker lost its queue (Redis restarted without persistence).

A study that was published but that no worker ever started has no lease to lapse: when it has
been QUEUED for longer than `queued_timeout` (`republish_stale`, run by `reap`), its message is
presumed lost and it is published again the same way (audited as "study.queue_lost"). A
duplicate of a message that was only slow costs a claim that finds nothing to do.

A lease is identified by its owner and the job's attempt number. Only the holder may renew it or
record the job's end (`holds`); the holder of a lapsed lease learns so at its next renewal and its
late result is refused, so the job key keeps a single result. A job whose lease lapsed
`MAX_EXPIRIES` times (a study that kills its workers) ends FAILED instead of looping.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import ColumnElement, CursorResult, and_, exists, select, update
from sqlalchemy.orm import Session, aliased

from db import lifecycle
from db.audit_actions import AuditAction
from db.models import Job, Study, StudyState, utcnow
from db.outbox_tasks import ProcessStudy
from db.session import Database

RUNNING = "RUNNING"
DEFAULT_SECONDS = 60.0
DEFAULT_QUEUED_TIMEOUT = 900.0  # as Celery's visibility timeout: a message not taken by then
MAX_EXPIRIES = 3
ACTOR = "reaper"


def owner_name() -> str:
    """This process as a lease owner: host and pid (a pool's processes differ by pid)."""
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


def renew_every(lease_seconds: float) -> float:
    """How often the holder renews: three tries before the lease lapses."""
    return lease_seconds / 3


@dataclass(frozen=True)
class Lease:
    job_id: int
    owner: str
    attempt: int


def take(job: Job, owner: str, lease_seconds: float, now: datetime) -> None:
    """Give the lease of `job` (loaded and locked by the caller, attempt already counted)."""
    job.lease_owner = owner
    job.lease_expires_at = now + timedelta(seconds=lease_seconds)


def held_elsewhere(job: Job, owner: str, now: datetime) -> bool:
    """True if another owner holds a live lease on `job`: a second run must not start."""
    return (
        job.state == RUNNING
        and job.lease_owner is not None
        and job.lease_owner != owner
        and job.lease_expires_at is not None
        and job.lease_expires_at > now
    )


def holds(lease: Lease) -> list[ColumnElement[bool]]:
    """The conditions under which `lease` is still its owner's (for a WHERE clause)."""
    return [
        Job.id == lease.job_id,
        Job.state == RUNNING,
        Job.attempts == lease.attempt,
        Job.lease_owner == lease.owner,
    ]


def still_held(session: Session, lease: Lease) -> bool:
    return session.execute(select(Job.id).where(*holds(lease))).first() is not None


def renew(
    session: Session, lease: Lease, lease_seconds: float, now: datetime | None = None
) -> bool:
    """Extend the lease; False if the owner lost it (it lapsed and was reaped, or re-claimed)."""
    now = now or utcnow()
    result = session.execute(
        update(Job)
        .where(*holds(lease))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult, result).rowcount == 1


def release(
    session: Session, lease: Lease, grace_seconds: float, now: datetime | None = None
) -> bool:
    """The owner gives the job up to a retry: any worker may claim it now, and if none does
    within `grace_seconds` (the retry message was lost) the reaper queues the study again."""
    now = now or utcnow()
    result = session.execute(
        update(Job)
        .where(*holds(lease))
        .values(lease_owner=None, lease_expires_at=now + timedelta(seconds=grace_seconds))
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult, result).rowcount == 1


def _expired(now: datetime) -> ColumnElement[bool]:
    return and_(Job.state == RUNNING, Job.lease_expires_at < now)


def lapsed(session: Session, now: datetime | None = None) -> list[str]:
    """UIDs of PROCESSING studies whose running job's lease lapsed and none is live."""
    now = now or utcnow()
    live = aliased(Job)
    rows = session.execute(
        select(Study.study_uid)
        .join(Job, Job.study_id == Study.id)
        .where(
            Study.state == StudyState.PROCESSING,
            _expired(now),
            ~exists().where(
                live.study_id == Study.id, live.state == RUNNING, live.lease_expires_at >= now
            ),
        )
        .distinct()
        .order_by(Study.study_uid)
    ).all()
    return [uid for (uid,) in rows]


def reap_one(
    session: Session,
    study_uid: str,
    *,
    actor: str = ACTOR,
    max_expiries: int = MAX_EXPIRIES,
    now: datetime | None = None,
) -> StudyState | None:
    """Queue one study whose lease lapsed again (or fail it after `max_expiries`), in the
    caller's transaction; None if, once locked, it no longer qualifies (a worker renewed or
    took it meanwhile)."""
    now = now or utcnow()
    study = session.execute(
        select(Study).where(Study.study_uid == study_uid).with_for_update()
    ).scalar_one_or_none()
    if study is None or study.state != StudyState.PROCESSING:
        return None
    jobs = list(
        session.execute(
            select(Job)
            .where(Job.study_id == study.id, Job.state == RUNNING)
            .order_by(Job.id)
            .with_for_update()
        ).scalars()
    )
    if any(j.lease_expires_at is not None and j.lease_expires_at >= now for j in jobs):
        return None
    expired = [j for j in jobs if j.lease_expires_at is not None]
    if not expired:
        return None
    job = expired[-1]
    detail = {
        "job": job.id,
        "attempt": job.attempts,
        "lease_owner": job.lease_owner,
        "lease_expired_at": job.lease_expires_at.isoformat() if job.lease_expires_at else None,
    }
    for j in expired:
        j.lease_owner = None
        j.lease_expires_at = None
    job.lease_expiries += 1
    detail["lease_expiries"] = job.lease_expiries
    if job.lease_expiries >= max_expiries:
        reason = (
            f"its worker was lost {job.lease_expiries} times (lease expired); "
            "not queued again (radai retry to try once more)"
        )
        job.state = StudyState.FAILED
        job.error = reason
        job.finished_at = now
        study.error = reason
        return lifecycle.transition(
            session,
            study,
            AuditAction.JOB_FAILED,
            actor=actor,
            detail={**detail, "state": str(StudyState.FAILED), "reason": reason},
            now=now,
        )
    message = ProcessStudy(study.study_uid, study.instance_count).message(now)
    session.add(message)
    session.flush()
    return lifecycle.transition(
        session,
        study,
        AuditAction.JOB_LEASE_EXPIRED,
        actor=actor,
        detail={**detail, "outbox_id": message.id},
        now=now,
    )


def stale_queued(session: Session, queued_timeout: float, now: datetime | None = None) -> list[str]:
    """UIDs of studies QUEUED for more than `queued_timeout` seconds (never started since)."""
    before = (now or utcnow()) - timedelta(seconds=queued_timeout)
    rows = session.execute(
        select(Study.study_uid)
        .where(Study.state == StudyState.QUEUED, Study.state_changed_at < before)
        .order_by(Study.study_uid)
    ).all()
    return [uid for (uid,) in rows]


def republish_one(
    session: Session,
    study_uid: str,
    queued_timeout: float,
    *,
    actor: str = ACTOR,
    now: datetime | None = None,
) -> StudyState | None:
    """Queue one long-QUEUED study again through the outbox, in the caller's transaction; None
    if, once locked, it no longer qualifies (a worker started it meanwhile)."""
    now = now or utcnow()
    study = session.execute(
        select(Study).where(Study.study_uid == study_uid).with_for_update()
    ).scalar_one_or_none()
    before = now - timedelta(seconds=queued_timeout)
    if study is None or study.state != StudyState.QUEUED or study.state_changed_at >= before:
        return None
    message = ProcessStudy(study.study_uid, study.instance_count).message(now)
    session.add(message)
    session.flush()
    return lifecycle.transition(
        session,
        study,
        AuditAction.STUDY_QUEUE_LOST,
        actor=actor,
        detail={
            "queued_at": study.state_changed_at.isoformat(),
            "queued_timeout_s": queued_timeout,
            "outbox_id": message.id,
        },
        now=now,
    )


def reap(
    db: Database,
    *,
    actor: str = ACTOR,
    max_expiries: int = MAX_EXPIRIES,
    queued_timeout: float | None = DEFAULT_QUEUED_TIMEOUT,
    now: datetime | None = None,
) -> dict[str, StudyState]:
    """Queue again every study whose lease lapsed and, unless `queued_timeout` is None, every
    study QUEUED for longer than it (one transaction each); what became of each."""
    with db.session() as s:
        candidates = lapsed(s, now)
        stale = [] if queued_timeout is None else stale_queued(s, queued_timeout, now)
    done: dict[str, StudyState] = {}
    for uid in candidates:
        with db.session() as s:
            state = reap_one(s, uid, actor=actor, max_expiries=max_expiries, now=now)
        if state is not None:
            done[uid] = state
    for uid in stale:
        assert queued_timeout is not None
        with db.session() as s:
            state = republish_one(s, uid, queued_timeout, actor=actor, now=now)
        if state is not None:
            done[uid] = state
    return done
