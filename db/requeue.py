"""Retry and release requests from people (CLI, dashboard), in database terms only.

A retry sends a finished study (FAILED, NOT_APPLICABLE, DONE) through the pipeline again; a
release lets a HELD study (e.g. instances of more than one patient) go on to be analysed after a
person looked at it. Each sets the study to STABLE through `db.lifecycle` (audited as
"study.retry" / "study.released") and writes the `radai.process_study` outbox message, all in
the caller's transaction; the node's dispatcher publishes the message like any other, so the
request survives a broker outage. A study still receiving, waiting or in the pipeline will be
(re)processed by itself.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import lifecycle
from db.audit_actions import AuditAction
from db.models import OutboxMessage, Study, StudyState, utcnow
from db.outbox_tasks import ProcessStudy

RETRYABLE = lifecycle.TRANSITIONS[AuditAction.STUDY_RETRY].sources


def _locked(session: Session, study_uid: str) -> Study:
    study = session.execute(
        select(Study).where(Study.study_uid == study_uid).with_for_update()
    ).scalar_one_or_none()
    if study is None:
        raise ValueError(f"no study {study_uid}")
    return study


def _queue(
    session: Session, study: Study, event: AuditAction, actor: str, detail: dict
) -> OutboxMessage:
    now = utcnow()
    message = ProcessStudy(study.study_uid, study.instance_count).message(now)
    session.add(message)
    session.flush()
    lifecycle.transition(
        session, study, event, actor=actor, detail={**detail, "outbox_id": message.id}, now=now
    )
    return message


def request_retry(session: Session, study_uid: str, actor: str) -> OutboxMessage:
    """Queue a finished study (typically FAILED) again; ValueError if unknown or not finished."""
    study = _locked(session, study_uid)
    if study.state not in RETRYABLE:
        hint = "it will be processed by itself"
        if study.state == StudyState.HELD:
            hint = "release it instead (radai release)"
        raise ValueError(f"study {study_uid} is {study.state}; {hint}")
    study.error = None
    return _queue(session, study, AuditAction.STUDY_RETRY, actor, {})


def release(session: Session, study_uid: str, *, actor: str, reason: str) -> OutboxMessage:
    """A person lets a HELD study be analysed: audited with their reason, then queued.

    ValueError if the study is unknown, not HELD, or the reason is empty. The study's flags stay
    (they are its history); a later instance of another patient holds it again."""
    reason = (reason or "").strip()
    if not reason:
        raise ValueError("a release needs a reason")
    study = _locked(session, study_uid)
    if study.state != StudyState.HELD:
        raise ValueError(f"study {study_uid} is {study.state}, not HELD; nothing to release")
    held_for = study.hold_reason
    study.hold_reason = None
    return _queue(
        session, study, AuditAction.STUDY_RELEASED, actor, {"reason": reason, "held_for": held_for}
    )
