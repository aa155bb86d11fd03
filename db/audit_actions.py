"""Every action the audit trail knows, in one enum: the `action` column of `audit_log`.

A `StrEnum`, so `audit.append(session, actor, AuditAction.STUDY_STABLE, ...)` stores the same
text as before and entries written before this enum read the same. New actions are added here,
never spelled out at a call site; the names follow "<subject>.<what happened>".
"""

from __future__ import annotations

import enum


class AuditAction(enum.StrEnum):
    # A study's life (each state change of db/lifecycle.py writes exactly one of these).
    STUDY_RECEIVED = "study.received"
    STUDY_REOPENED = "study.reopened"
    STUDY_STABLE = "study.stable"
    STUDY_HELD = "study.held"
    STUDY_RELEASED = "study.released"
    STUDY_QUEUED = "study.queued"
    STUDY_RETRY = "study.retry"
    JOB_STARTED = "job.started"
    JOB_DONE = "job.done"
    JOB_NOT_APPLICABLE = "job.not_applicable"
    JOB_FAILED = "job.failed"
    # A running job's lease lapsed (its worker died or its host vanished): queued again.
    JOB_LEASE_EXPIRED = "job.lease_expired"
    # A study queued long ago that no worker started: its message is presumed lost (a broker that
    # restarted without persistence) and the study is queued again through the outbox.
    STUDY_QUEUE_LOST = "study.queue_lost"
    # A worker found its lease gone (it was reaped or taken over): its result was not recorded.
    JOB_LEASE_LOST = "job.lease_lost"
    # What the node noticed about received objects.
    STUDY_PATIENTS_MIXED = "study.patients_mixed"
    INSTANCE_CONFLICT = "instance.conflict"
    INSTANCE_VALUES_ALTERED = "instance.values_altered"
    INSTANCE_REFUSED = "instance.refused"
    ASSOCIATION_REFUSED = "association.refused"
    # Results leaving radai.
    EXPORT_SENT = "export.sent"
    EXPORT_FAILED = "export.failed"
    # People and the dashboard.
    USER_ADDED = "user.added"
    USER_DISABLED = "user.disabled"
    USER_ENABLED = "user.enabled"
    USER_PASSWORD_RESET = "user.password_reset"
    USER_LOGIN = "user.login"
    USER_LOGIN_FAILED = "user.login_failed"
    USER_LOGOUT = "user.logout"
    USER_SESSION_EXPIRED = "user.session_expired"
    USER_SESSION_ENDED = "user.session_ended"
    TOKEN_CREATED = "token.created"
    TOKEN_REVOKED = "token.revoked"
    # DICOMweb (dicomweb/): refused requests, what a STOW-RS request stored, who retrieved what
    # (instances, metadata, frames, bulk data, renderings), who searched and which studies the
    # answer named (parameter names only: a query's values can hold a patient's name or ID).
    DICOMWEB_REFUSED = "dicomweb.refused"
    DICOMWEB_STORED = "dicomweb.stored"
    DICOMWEB_RETRIEVED = "dicomweb.retrieved"
    DICOMWEB_SEARCHED = "dicomweb.searched"
    STUDY_OPENED = "study.opened"
    STUDY_OUTPUT_DOWNLOADED = "study.output_downloaded"
    AUDIT_VERIFIED = "audit.verified"
    REVIEW_ACCEPT = "review.accept"
    REVIEW_REJECT = "review.reject"
    REVIEW_AMEND = "review.amend"

    @classmethod
    def for_review(cls, decision: str) -> AuditAction:
        """The action of a review decision ("accept", "reject", "amend")."""
        return cls(f"review.{decision}")
