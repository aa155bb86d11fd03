"""Study assembly: a study with no new instance for the stable window is declared STABLE, or
HELD when something needs a person first (its `hold_reason`, e.g. instances of two patients).

The state change and the outbox message that will queue the study are one transaction, so a
study can never be stable without its message, whatever crashes in between; a held study gets
no message (it is queued when a person releases it, `db.requeue.release`). Each change is a
compare-and-set through `db.lifecycle.transition_where`: an instance that arrives meanwhile moves
`last_instance_at` past the cutoff and keeps the study open.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select

from db import Study, StudyState, lifecycle
from db.audit_actions import AuditAction
from db.models import utcnow
from db.outbox_tasks import ProcessStudy
from db.session import Database

log = logging.getLogger("radai.assembly")


def mark_stable(
    db: Database, stable_seconds: float, now: datetime | None = None, actor: str = "node"
) -> list[str]:
    """Declare each quiet RECEIVING study STABLE (with its outbox message) or HELD.

    Returns the UIDs of the studies declared STABLE."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stable_seconds)
    with db.session() as s:
        candidates = s.execute(
            select(Study.id, Study.study_uid).where(
                Study.state == StudyState.RECEIVING, Study.last_instance_at <= cutoff
            )
        ).all()
    declared = []
    for study_id, study_uid in candidates:
        with db.session() as s:
            count, hold = s.execute(
                select(Study.instance_count, Study.hold_reason)
                .where(Study.id == study_id)
                .with_for_update()
            ).one()
            quiet = Study.last_instance_at <= cutoff
            if hold is None:
                changed = lifecycle.transition_where(
                    s,
                    study_id,
                    study_uid,
                    AuditAction.STUDY_STABLE,
                    StudyState.RECEIVING,
                    actor=actor,
                    where=[quiet, Study.hold_reason.is_(None)],
                    detail={"instances": count},
                    now=now,
                )
                if changed:
                    s.add(ProcessStudy(study_uid, count).message(now))
            else:
                changed = lifecycle.transition_where(
                    s,
                    study_id,
                    study_uid,
                    AuditAction.STUDY_HELD,
                    StudyState.RECEIVING,
                    actor=actor,
                    where=[quiet, Study.hold_reason.is_not(None)],
                    detail={"instances": count, "reason": hold},
                    now=now,
                )
        if not changed:
            continue
        if hold is None:
            declared.append(study_uid)
            log.info("study %s stable with %d instances", study_uid, count)
        else:
            log.warning("study %s held for a person with %d instances: %s", study_uid, count, hold)
    return declared
