"""Retry requests from the dashboard, in database terms only.

A retry sets the study back to STABLE and writes the `radai.process_study` outbox message and a
"study.retry" audit entry, all in the caller's transaction; the node's dispatcher publishes the
message like any other, so the retry survives a broker outage. Only finished studies can be
retried: one still receiving, waiting or in the pipeline will be (re)processed by itself.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import audit
from db.models import OutboxMessage, Study, StudyState, utcnow

PROCESS_STUDY_TASK = "radai.process_study"  # the name the node publishes and the workers serve
RETRYABLE = frozenset({StudyState.FAILED, StudyState.NOT_APPLICABLE, StudyState.DONE})


def request_retry(session: Session, study_uid: str, actor: str) -> OutboxMessage:
    """Queue a finished study (typically FAILED) again; ValueError if unknown or not finished."""
    study = session.execute(
        select(Study).where(Study.study_uid == study_uid).with_for_update()
    ).scalar_one_or_none()
    if study is None:
        raise ValueError(f"no study {study_uid}")
    if study.state not in RETRYABLE:
        raise ValueError(f"study {study_uid} is {study.state}; it will be processed by itself")
    now = utcnow()
    previous = study.state
    study.state = StudyState.STABLE
    study.state_changed_at = now
    study.error = None
    message = OutboxMessage(
        task=PROCESS_STUDY_TASK,
        payload={"study_uid": study_uid, "instances": study.instance_count},
        study_uid=study_uid,
        next_attempt_at=now,
    )
    session.add(message)
    session.flush()
    audit.append(
        session, actor, "study.retry", study_uid, {"from_state": previous, "outbox_id": message.id}
    )
    return message
