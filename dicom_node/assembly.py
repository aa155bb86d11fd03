"""Study assembly: a study with no new instance for the stable window is declared STABLE.

The state change and the outbox message that will queue the study are one transaction, so a
study can never be stable without its message, whatever crashes in between.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select, update

from db import OutboxMessage, Study, StudyState, audit
from db.models import utcnow
from db.requeue import PROCESS_STUDY_TASK
from db.session import Database

log = logging.getLogger("radai.assembly")


def mark_stable(
    db: Database, stable_seconds: float, now: datetime | None = None, actor: str = "node"
) -> list[str]:
    """Declare each quiet RECEIVING study STABLE, with its outbox message; return their UIDs."""
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
            # Conditional: an instance that arrived since the select keeps the study open.
            changed = s.execute(
                update(Study)
                .where(
                    Study.id == study_id,
                    Study.state == StudyState.RECEIVING,
                    Study.last_instance_at <= cutoff,
                )
                .values(state=StudyState.STABLE, state_changed_at=now)
            ).rowcount
            if changed != 1:
                continue
            count = s.execute(select(Study.instance_count).where(Study.id == study_id)).scalar()
            s.add(
                OutboxMessage(
                    task=PROCESS_STUDY_TASK,
                    payload={"study_uid": study_uid, "instances": count},
                    study_uid=study_uid,
                    next_attempt_at=now,
                )
            )
            audit.append(s, actor, "study.stable", study_uid, {"instances": count})
        declared.append(study_uid)
        log.info("study %s stable with %d instances", study_uid, count)
    return declared
