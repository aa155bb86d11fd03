"""Tables of radai. Times are timezone-aware UTC; UIDs are stored as DICOM writes them."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def _no_flags() -> list:
    return []


class StudyState(enum.StrEnum):
    """A study's states; which event leads from one to another is `db.lifecycle.TRANSITIONS`."""

    RECEIVING = "RECEIVING"
    STABLE = "STABLE"
    HELD = "HELD"
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    DONE = "DONE"
    NOT_APPLICABLE = "NOT_APPLICABLE"
    FAILED = "FAILED"


class UTCDateTime(TypeDecorator):
    """Aware UTC times in and out, on SQLite (which drops the zone) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):  # noqa: ANN001, ANN201
        if value is not None:
            if value.tzinfo is None:
                raise ValueError("naive datetime given; radai stores UTC-aware times")
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value, dialect):  # noqa: ANN001, ANN201
        if value is not None:
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict: JSON}


UID = String(64)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, index=True)
    # Patient identifiers are kept for logged-in dashboard users; they never go to logs.
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    modalities: Mapped[str] = mapped_column(String(64), default="")
    priority: Mapped[int | None] = mapped_column(Integer)
    # Safety flags accumulate (db/flags.py): `flags` keeps each one with its time; `flag_reason`
    # is all their reasons joined, for readers that show one line.
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    flag_reason: Mapped[str | None] = mapped_column(Text)
    flags: Mapped[list] = mapped_column(JSON, default=_no_flags, server_default=text("'[]'"))
    # Set while the study must wait for a person (HELD instead of STABLE); cleared by release.
    hold_reason: Mapped[str | None] = mapped_column(Text)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_instance_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(16))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    archive_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    transfer_syntax: Mapped[str] = mapped_column(UID)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class QidoStudy(Base):
    """A study's QIDO-RS attributes as its first instance's header has them (DICOMweb's index).

    Text columns hold each attribute's values as DICOM text, stripped and joined by backslashes,
    exactly as the header gives them (never truncated); `multivalued` is set when one of them
    holds more than one value. `attributes` is the DICOM JSON of the study's answer fields, so a
    search answers without reading a file. Filled by `dicomweb` from the archive, not by the
    node: a study without a row here is indexed on the next search.
    """

    __tablename__ = "qido_studies"

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    header_path: Mapped[str] = mapped_column(Text)
    patient_id: Mapped[str | None] = mapped_column(Text, index=True)
    patient_name: Mapped[str | None] = mapped_column(Text, index=True)
    study_date: Mapped[str | None] = mapped_column(Text, index=True)
    study_time: Mapped[str | None] = mapped_column(Text)
    accession_number: Mapped[str | None] = mapped_column(Text, index=True)
    referring_physician_name: Mapped[str | None] = mapped_column(Text)
    study_identifier: Mapped[str | None] = mapped_column(Text)  # StudyID (0020,0010)
    study_description: Mapped[str | None] = mapped_column(Text)
    multivalued: Mapped[bool] = mapped_column(Boolean, default=False)
    attributes: Mapped[dict] = mapped_column(JSON, default=dict)


class QidoSeries(Base):
    """A series' QIDO-RS attributes as its first instance's header has them; as `QidoStudy`."""

    __tablename__ = "qido_series"

    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), primary_key=True)
    header_path: Mapped[str] = mapped_column(Text)
    modality: Mapped[str | None] = mapped_column(Text, index=True)
    series_number: Mapped[str | None] = mapped_column(Text)
    series_description: Mapped[str | None] = mapped_column(Text)
    body_part_examined: Mapped[str | None] = mapped_column(Text)
    pps_start_date: Mapped[str | None] = mapped_column(Text)  # PerformedProcedureStepStartDate
    pps_start_time: Mapped[str | None] = mapped_column(Text)  # PerformedProcedureStepStartTime
    multivalued: Mapped[bool] = mapped_column(Boolean, default=False)
    attributes: Mapped[dict] = mapped_column(JSON, default=dict)


class InstanceConflict(Base):
    """A second, different object sent under a SOP Instance UID we already hold: both are kept."""

    __tablename__ = "instance_conflicts"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    archive_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("sop_instance_uid", "sha256"),)


class IngestFailure(Base):
    """An object the node refused, with the status it answered and where its bytes were kept."""

    __tablename__ = "ingest_failures"

    id: Mapped[int] = mapped_column(primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    peer: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    sop_class_uid: Mapped[str | None] = mapped_column(String(128))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128))
    study_uid: Mapped[str | None] = mapped_column(String(128))
    quarantine_path: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int | None] = mapped_column(BigInteger)


class Job(Base):
    """One run of a pipeline over one exact set of input instances."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    pipeline_version: Mapped[str] = mapped_column(String(32))
    input_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    findings: Mapped[dict | None] = mapped_column(JSON)
    model_versions: Mapped[dict | None] = mapped_column(JSON)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    timings: Mapped[dict | None] = mapped_column(JSON)
    # The lease of a RUNNING job (db/leases.py): its worker renews it; when it lapses the study
    # is queued again, and a result of the worker that lost it is refused.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    lease_expiries: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    study: Mapped[Study] = relationship(back_populates="jobs")
    outputs: Mapped[list[Output]] = relationship(back_populates="job")

    __table_args__ = (UniqueConstraint("study_id", "pipeline_version", "input_hash"),)


class Output(Base):
    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_uid: Mapped[str] = mapped_column(UID)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="outputs")


class Export(Base):
    """One job's outputs to one destination: PENDING until SENT, or FAILED with the reason."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), default="PENDING", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship()

    __table_args__ = (UniqueConstraint("job_id", "destination"),)


class OutboxMessage(Base):
    """An event written in the same transaction as the state change it announces."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    task: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict] = mapped_column(JSON)
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    published_at: Mapped[datetime | None] = mapped_column()
    dropped_reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_outbox_pending", "published_at", "next_attempt_at"),)


class AuditEntry(Base):
    """Append-only: `seq` is gapless and `entry_hash` (keyed) chains each row to the one before."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64), index=True)
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # How entry_hash was made (db.audit): "hmac-sha256" under the audit key named by key_id, or
    # "sha256"/NULL (unkeyed; NULL for rows written before migration 0006).
    scheme: Mapped[str | None] = mapped_column(String(16), nullable=True)
    key_id: Mapped[str | None] = mapped_column(String(16), nullable=True)


class UserRole(enum.StrEnum):
    RADIOLOGIST = "radiologist"
    ADMIN = "admin"
    AUDITOR = "auditor"


class User(Base):
    """A dashboard account: never deleted (reviews and the audit name it), disabled instead."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    # "scrypt$n$r$p$salt$hash" (base64): the parameters travel with the hash so they can grow.
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        CheckConstraint("role IN ('radiologist', 'admin', 'auditor')", name="ck_users_role"),
    )


class ApiToken(Base):
    """A bearer token for DICOMweb (scripts and workers): only its SHA-256 is stored.

    `role` is what the token may do: the owner's role, or "worker" (read and store). A token of a
    disabled user, a revoked token and an expired one are refused.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class LoginAttempt(Base):
    """One login attempt, for throttling (`db.login_throttle`) and the admins' view of failures.

    Not the audit trail: rows are purged after a day. `account` is a digest of the name as typed,
    so that a password typed into the name field is not stored in clear; `user_id` is set only
    when the name is an account's.
    """

    __tablename__ = "login_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    account: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    source: Mapped[str] = mapped_column(String(64))
    # A digest of the browser's device token (its Streamlit XSRF cookie), when it sent one.
    device: Mapped[str | None] = mapped_column(String(64))
    # "ok", "wrong password", "unknown user", "disabled" or "throttled"
    outcome: Mapped[str] = mapped_column(String(16))

    __table_args__ = (
        Index("ix_login_attempts_account_at", "account", "at"),
        Index("ix_login_attempts_source_at", "source", "at"),
    )


class ReviewDecision(enum.StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"
    AMEND = "amend"


class Review(Base):
    """A reader's decision on one lesion of one job's findings (or, label None, the whole study).

    Append-only (database triggers refuse UPDATE and DELETE): a re-review is a new row and the
    latest one per (job, lesion) is what the dashboard shows. It references the job, and jobs are
    never deleted, so a later reprocessing of the study leaves it in place.
    """

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    lesion_label: Mapped[int | None] = mapped_column(Integer)
    decision: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str | None] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    # An amend's corrected values beside the model's: {field: {"model": x, "corrected": y}}.
    corrections: Mapped[dict | None] = mapped_column(JSON)

    user: Mapped[User] = relationship()
    job: Mapped[Job] = relationship()

    __table_args__ = (
        CheckConstraint("decision IN ('accept', 'reject', 'amend')", name="ck_reviews_decision"),
        CheckConstraint(
            "decision = 'accept' OR (reason IS NOT NULL AND length(trim(reason)) > 0)",
            name="ck_reviews_reason",
        ),
    )
