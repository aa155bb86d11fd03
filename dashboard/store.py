"""The dashboard's reads and writes, in `db` terms: login with auditing and throttling, the
worklist, one study with its flags, jobs, outputs and reviews, recording a review, retrying a
study, releasing a HELD one, the audit trail and account management.

Each of these takes the acting `SessionUser` and refuses (`Forbidden`) what its role may not do
(`PERMISSIONS`, the table the pages also read): the UI hiding a page or button is not the guard.

Every function takes a session (the caller's transaction) or a `Database`, returns plain data
(dicts and dataclasses, no ORM objects that would outlive their session) and never logs patient
names or IDs. Reviews are append-only: a re-review adds a row, the latest per lesion is shown.
A job's findings are read through `db.findings` (any schema version) and handed out as
`Findings`; every audit entry names its `AuditAction`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import and_, exists, func, select
from sqlalchemy.orm import Session

from db import (
    AuditEntry,
    Instance,
    Job,
    Output,
    Review,
    ReviewDecision,
    Series,
    Study,
    StudyState,
    User,
    UserRole,
    audit,
    login_throttle,
    users,
)
from db.audit_actions import AuditAction
from db.findings import Findings, FindingsError, Lesion
from db.flags import flags_of
from db.own_results import result_file
from db.requeue import release, request_retry
from db.session import Database

log = logging.getLogger("radai.dashboard")

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class SessionUser:
    id: int
    name: str
    role: str
    # Which password the session logged in with (a digest of its stored hash): a reset ends it.
    credential: str = ""


def credential_stamp(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


class Forbidden(PermissionError):
    """An action the user's role does not allow (the page should not have offered it)."""


# What each role may do: the one table both the store (which refuses) and the pages (which
# offer) read. Auditors see no patient data; admins read studies but do not review them.
PERMISSIONS: dict[str, frozenset[str]] = {
    "read_studies": frozenset({UserRole.RADIOLOGIST, UserRole.ADMIN}),
    "review": frozenset({UserRole.RADIOLOGIST}),
    "retry": frozenset({UserRole.ADMIN}),
    # Letting a HELD study (e.g. instances of two patients) be analysed is a clinical call.
    "release": frozenset({UserRole.RADIOLOGIST, UserRole.ADMIN}),
    "read_audit": frozenset({UserRole.ADMIN, UserRole.AUDITOR}),
    "read_monitoring": frozenset({UserRole.RADIOLOGIST, UserRole.ADMIN, UserRole.AUDITOR}),
    "manage_users": frozenset({UserRole.ADMIN}),
}


def allowed(user: SessionUser, action: str) -> bool:
    """Whether `user`'s role may do `action` (a key of PERMISSIONS)."""
    return user.role in PERMISSIONS[action]


def require(user: SessionUser, action: str) -> None:
    """Forbidden unless `user`'s role may do `action`."""
    if not allowed(user, action):
        raise Forbidden(f"a {user.role} may not {action.replace('_', ' ')}")


class LoginResult(NamedTuple):
    """The session's user (None unless the login succeeded), the outcome ("ok", "wrong
    password", "unknown user", "disabled" or "throttled") and, when throttled, the seconds to
    wait. Only "throttled" may be told apart on the page: the other refusals look alike."""

    user: SessionUser | None
    outcome: str
    retry_after_s: float = 0.0


def login(
    db: Database,
    name: str,
    password: str,
    *,
    source: str | None = None,
    device: str | None = None,
    now: datetime | None = None,
) -> LoginResult:
    """Check a login under `db.login_throttle` and audit it ("user.login" or
    "user.login_failed" with the reason and source address, never the password).

    A failed login for an unknown name is audited under "anonymous" so that a password typed
    into the name field does not land in the audit trail. Repeated failures delay further
    attempts (per account and per source address); they never lock the account.
    """
    name = name.strip()
    with db.session() as s:
        result = login_throttle.attempt(s, name, password, source=source, device=device, now=now)
        user = result.user
        if user is None:
            detail: dict[str, Any] = {"reason": result.outcome}
            if source:
                detail["source"] = source
            if result.retry_after_s:
                detail["retry_after_s"] = round(result.retry_after_s, 1)
            audit.append(
                s,
                name if result.known else ANONYMOUS,
                AuditAction.USER_LOGIN_FAILED,
                None,
                detail,
            )
            return LoginResult(None, result.outcome, result.retry_after_s)
        detail = {"role": user.role} | ({"source": source} if source else {})
        audit.append(s, user.name, AuditAction.USER_LOGIN, None, detail)
        stamp = credential_stamp(user.password_hash)
        return LoginResult(SessionUser(user.id, user.name, user.role, stamp), result.outcome)


def log_event(
    db: Database,
    actor: str,
    action: AuditAction,
    study_uid: str | None = None,
    detail: dict | None = None,
) -> None:
    """One audit entry in its own transaction (logout, expiry, study opened, chain checked).

    TypeError for an action that is not an `AuditAction` (a spelled-out string would let a
    typo into the append-only trail)."""
    if not isinstance(action, AuditAction):
        raise TypeError(f"audit action must be an AuditAction, not {action!r}")
    with db.session() as s:
        audit.append(s, actor, action, study_uid, detail or {})


def _current_job_id():  # noqa: ANN202 - a correlated scalar subquery
    # The same notion of "current" as db.queries.study_summaries: the newest job not superseded.
    return (
        select(func.max(Job.id))
        .where(Job.study_id == Study.id, Job.superseded.is_(False))
        .correlate(Study)
        .scalar_subquery()
    )


def read_findings(job_id: int, data: dict[str, Any] | None) -> tuple[Findings | None, str | None]:
    """A job's stored findings as `Findings` (None if it has none) and, when no schema version
    can read them, None with the reason: one unreadable row must not take a page down."""
    try:
        return Findings.from_json(data), None
    except FindingsError as exc:
        log.warning("job %s: findings unreadable: %s", job_id, exc)
        return None, f"the findings of job {job_id} cannot be read: {exc}"


@dataclass(frozen=True)
class WorklistPage:
    rows: list[dict[str, Any]]
    total: int
    page: int
    pages: int


def worklist(
    session: Session,
    *,
    user: SessionUser,
    states: list[str] | None = None,
    flagged: bool | None = None,
    reviewed: bool | None = None,
    page: int = 1,
    page_size: int = 50,
) -> WorklistPage:
    """Studies by AI priority (1 most urgent, none last), then arrival; filtered and paged.

    "Reviewed" means some review exists for the study's current job: after reprocessing, the new
    result needs a new review (the old reviews stay, attached to the old job).
    """
    require(user, "read_studies")
    current = _current_job_id()
    is_reviewed = exists().where(Review.job_id == current)
    query = select(Study, current.label("job_id"), is_reviewed.label("reviewed"))
    if states:
        query = query.where(Study.state.in_(states))
    if flagged is not None:
        query = query.where(Study.flagged.is_(flagged))
    if reviewed is not None:
        query = query.where(is_reviewed if reviewed else ~is_reviewed)
    total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    pages = max(1, -(-total // page_size))
    page = min(max(1, page), pages)
    query = query.order_by(
        Study.priority.is_(None), Study.priority, Study.first_received_at, Study.id
    )
    result = session.execute(query.offset((page - 1) * page_size).limit(page_size)).all()
    job_ids = [job_id for _, job_id, _ in result if job_id is not None]
    findings: dict[int, Any] = dict(
        session.execute(select(Job.id, Job.findings).where(Job.id.in_(job_ids))).all()
        if job_ids
        else []
    )
    rows = []
    for study, job_id, was_reviewed in result:
        f = read_findings(job_id, findings.get(job_id))[0] if job_id is not None else None
        rows.append(
            {
                "study_uid": study.study_uid,
                "priority": study.priority,
                "state": study.state,
                "patient_name": display_name(study.patient_name),
                "patient_id": study.patient_id or "",
                "study_date": display_date(study.study_date),
                "description": study.study_description or "",
                "instances": study.instance_count,
                "probability": f.screening_probability if f else None,
                "lesions": len(f.lesions) if f else None,
                "flagged": study.flagged,
                # Every flag's reason, oldest first: a later flag never hides an earlier one.
                "flags": [flag["reason"] for flag in flags_of(study)],
                "hold_reason": study.hold_reason,
                "reviewed": bool(was_reviewed),
                "error": study.error
                if study.state in (StudyState.FAILED, StudyState.NOT_APPLICABLE)
                else None,
                "job_id": job_id,
            }
        )
    return WorklistPage(rows=rows, total=total, page=page, pages=pages)


def display_name(pn: str | None) -> str:
    """A DICOM person name (FAMILY^GIVEN^...) as people write it."""
    if not pn:
        return ""
    parts = [p for p in str(pn).split("=")[0].split("^") if p]
    return f"{parts[0]}, {' '.join(parts[1:])}" if len(parts) > 1 else (parts[0] if parts else "")


def display_date(da: str | None) -> str:
    if da and len(da) == 8 and da.isdigit():
        return f"{da[:4]}-{da[4:6]}-{da[6:]}"
    return da or ""


def model_of(job: Job) -> tuple[str, str]:
    """The model name and version a job's findings came from (its recorded model versions)."""
    versions = job.model_versions or {}
    if not versions:
        return job.pipeline, job.pipeline_version
    return "+".join(versions), "+".join(str(v) for v in versions.values())


def study_detail(session: Session, study_uid: str, *, user: SessionUser) -> dict[str, Any] | None:
    """A study with its jobs (newest first), their outputs, and every review of any of its jobs."""
    require(user, "read_studies")
    study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
    if study is None:
        return None
    jobs = list(
        session.execute(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc()))
        .scalars()
        .all()
    )
    outputs = session.execute(
        select(Output).where(Output.study_id == study.id).order_by(Output.id)
    ).scalars()
    by_job: dict[int, list[dict[str, Any]]] = {}
    for o in outputs:
        by_job.setdefault(o.job_id, []).append(
            {
                "modality": o.modality,
                "path": result_file(session, o.path, o.sop_instance_uid),
                "sop_instance_uid": o.sop_instance_uid,
            }
        )
    current = next((j.id for j in jobs if not j.superseded), None)
    findings = {j.id: read_findings(j.id, j.findings) for j in jobs}
    return {
        "id": study.id,
        "study_uid": study.study_uid,
        "state": study.state,
        "priority": study.priority,
        "patient_name": display_name(study.patient_name),
        "patient_id": study.patient_id or "",
        "accession_number": study.accession_number or "",
        "study_date": display_date(study.study_date),
        "description": study.study_description or "",
        "instances": study.instance_count,
        "flagged": study.flagged,
        "flag_reason": study.flag_reason,
        # {"kind", "reason", "at"} each, oldest first (db/flags.py); hold_reason while HELD.
        "flags": flags_of(study),
        "hold_reason": study.hold_reason,
        "error": study.error,
        "current_job_id": current,
        "jobs": [
            {
                "id": j.id,
                "state": j.state,
                "pipeline": j.pipeline,
                "pipeline_version": j.pipeline_version,
                "model": model_of(j),
                "model_versions": j.model_versions or {},
                "findings": findings[j.id][0],
                "findings_error": findings[j.id][1],
                "finished_at": j.finished_at,
                "superseded": j.superseded,
                "outputs": by_job.get(j.id, []),
            }
            for j in jobs
        ],
        "reviews": reviews_of(session, study.id),
    }


def reviews_of(session: Session, study_id: int) -> list[dict[str, Any]]:
    """All reviews of a study, oldest first (so that later entries win when folded by lesion)."""
    rows = session.execute(
        select(Review, User.name)
        .join(User, User.id == Review.user_id)
        .where(Review.study_id == study_id)
        .order_by(Review.created_at, Review.id)
    ).all()
    return [
        {
            "id": r.id,
            "job_id": r.job_id,
            "lesion_label": r.lesion_label,
            "decision": r.decision,
            "reason": r.reason,
            "note": r.note,
            "user": user_name,
            "created_at": r.created_at,
            "model": f"{r.model_name} {r.model_version}",
            "corrections": r.corrections,
        }
        for r, user_name in rows
    ]


def latest_reviews(reviews: list[dict[str, Any]], job_id: int) -> dict[int | None, dict]:
    """The newest review per lesion label (None: the whole study) of one job."""
    latest: dict[int | None, dict] = {}
    for r in reviews:
        if r["job_id"] == job_id:
            latest[r["lesion_label"]] = r
    return latest


def series_paths(
    session: Session, study_id: int, series_uid: str, *, user: SessionUser
) -> list[str]:
    """Archive paths of a series' instances (order does not matter: the viewer sorts)."""
    require(user, "read_studies")
    return list(
        session.execute(
            select(Instance.archive_path)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_uid == series_uid, Instance.study_id == study_id)
            .order_by(Instance.id)
        ).scalars()
    )


def prior_for_comparison(
    session: Session, prior_uid: str, *, patient_id: str, user: SessionUser
) -> dict[str, Any] | None:
    """The prior study a result was compared with, for viewing beside it: its date, its latest
    finished result's findings (or why they cannot be read), that result's SEG and its analysed
    series' archive paths. None when the study is not in the database (a prior fetched from a
    PACS for the comparison is not stored).

    The same permission as viewing a study. ValueError when the prior names another patient
    than `patient_id` (the current study's): a mismatched prior is refused, never shown.
    """
    require(user, "read_studies")
    study = session.execute(select(Study).where(Study.study_uid == prior_uid)).scalar_one_or_none()
    if study is None:
        return None
    if (study.patient_id or "") != (patient_id or ""):
        raise ValueError("the prior study recorded for this result is of another patient")
    # The result the worker compares with (workers/pipeline/prior.py): the newest finished one
    # not superseded, whose SEG's "Lesion N" is the prior lesion N that `prior_label` names.
    job = session.execute(
        select(Job)
        .where(
            Job.study_id == study.id,
            Job.superseded.is_(False),
            Job.state == StudyState.DONE,
        )
        .order_by(Job.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    findings, error = (None, None) if job is None else read_findings(job.id, job.findings)
    seg_path = None
    if job is not None:
        seg = session.execute(
            select(Output.path, Output.sop_instance_uid)
            .where(Output.job_id == job.id, Output.modality == "SEG")
            .order_by(Output.id.desc())
            .limit(1)
        ).first()
        seg_path = None if seg is None else result_file(session, *seg)
    paths = (
        series_paths(session, study.id, findings.series_uid, user=user)
        if findings is not None and findings.series_uid
        else []
    )
    return {
        "study_uid": study.study_uid,
        "study_date": display_date(study.study_date),
        "job_id": None if job is None else job.id,
        "findings": findings,
        "findings_error": error,
        "seg_path": seg_path,
        "series_paths": paths,
    }


@dataclass(frozen=True)
class Correctable:
    """A lesion measurement a reader may correct when amending: its findings key, its name for
    people, the unit people type, the factor from that unit to the stored one, and the range
    (in the typed unit) outside which a value is a typing mistake rather than a lesion."""

    key: str
    name: str
    unit: str
    to_stored: float
    low: float
    high: float


# Ranges: a lung nodule or mass is at most about 30 cm across (a hemithorax); below 0.5 mm a
# value is below the CT's own resolution. Volumes follow (about 1/6 pi d^3 at 30 cm is 14 l, but
# a lesion filling a lung is under 3 l).
CORRECTABLE = {
    c.key: c
    for c in (
        Correctable("max_2d_axial_diameter_mm", "long-axis diameter", "mm", 1.0, 0.5, 300.0),
        Correctable("max_3d_diameter_mm", "maximum 3D diameter", "mm", 1.0, 0.5, 300.0),
        Correctable("volume_mm3", "volume", "ml", 1000.0, 0.001, 3000.0),
    )
}
LOCATION = "location"
LOCATIONS = [
    f"{side} lung, {zone} zone"
    for side in ("right", "left")
    for zone in ("upper", "middle", "lower")
]
MAX_LOCATION_LENGTH = 64


def _number(c: Correctable, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"corrected {c.name} must be a number of {c.unit}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"corrected {c.name} must be a positive number of {c.unit}")
    if not c.low <= number <= c.high:
        raise ValueError(
            f"corrected {c.name} must be between {c.low:g} and {c.high:g} {c.unit} (got {number:g})"
        )
    return number


def validate_corrections(
    lesion: Lesion, corrections: dict[str, Any] | None
) -> dict[str, dict[str, Any]] | None:
    """The corrections to store, {key: {"model": value, "corrected": value}} in stored units.

    `corrections` maps a CORRECTABLE key to a value in its typed unit (mm, ml) or LOCATION to a
    text; empty values (None, "") mean "unchanged" and are dropped, as are values equal to the
    model's. ValueError (message for the reader) for a value that is not a positive number in
    its range, a diameter pair or volume no lesion can have, or an unknown field.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, value in (corrections or {}).items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if key == LOCATION:
            text = " ".join(str(value).split())
            if len(text) > MAX_LOCATION_LENGTH or not text.isprintable():
                raise ValueError(
                    f"corrected location must be printable text of at most "
                    f"{MAX_LOCATION_LENGTH} characters"
                )
            if text != lesion.location:
                out[LOCATION] = {"model": lesion.location, "corrected": text}
            continue
        c = CORRECTABLE.get(key)
        if c is None:
            raise ValueError(f"{key!r} cannot be corrected")
        stored = round(_number(c, value) * c.to_stored, 3)
        if stored != getattr(lesion, key):
            out[key] = {"model": getattr(lesion, key), "corrected": stored}

    def effective(key: str) -> float | None:
        v = out[key]["corrected"] if key in out else getattr(lesion, key)
        return float(v) if v is not None else None

    axial, d3, volume = (
        effective("max_2d_axial_diameter_mm"),
        effective("max_3d_diameter_mm"),
        effective("volume_mm3"),
    )
    touched = out.keys() & CORRECTABLE.keys()
    # Geometry, checked only when a correction is involved: an axial diameter is one of the 3D
    # diameters, and no body is larger than the sphere of its largest diameter.
    if touched & {"max_2d_axial_diameter_mm", "max_3d_diameter_mm"} and axial and d3:
        if axial > d3 * 1.01:
            raise ValueError(
                f"the long-axis diameter ({axial:g} mm) cannot exceed the maximum 3D "
                f"diameter ({d3:g} mm): correct that one too"
            )
    if touched & {"volume_mm3", "max_3d_diameter_mm"} and volume and d3:
        sphere = math.pi * d3**3 / 6
        if volume > sphere * 1.01:
            raise ValueError(
                f"a volume of {volume / 1000:g} ml does not fit in a lesion whose largest "
                f"diameter is {d3:g} mm (at most {sphere / 1000:.3g} ml): correct the "
                "maximum 3D diameter too"
            )
    return out or None


def add_review(
    session: Session,
    *,
    study_uid: str,
    job_id: int,
    lesion_label: int | None,
    decision: str | None,
    reason: str | None,
    note: str | None,
    user: SessionUser,
    corrections: dict[str, Any] | None = None,
) -> Review:
    """Store a review and its audit entry ("review.<decision>") in the caller's transaction.

    ValueError (message for the reader) when the decision is unknown, a reject or amend has no
    reason, the job is not this study's or has no findings, the lesion is not in them, or
    corrections come with anything but an amend of one lesion or fail `validate_corrections`.
    Forbidden unless the user's role reviews.
    """
    require(user, "review")
    if decision not in set(ReviewDecision):  # also None: the reader chose nothing
        raise ValueError(f"decision must be one of {', '.join(ReviewDecision)}")
    reason = (reason or "").strip() or None
    note = (note or "").strip() or None
    if decision != ReviewDecision.ACCEPT and not reason:
        raise ValueError(f"a reason is required to {decision}")
    job = session.execute(
        select(Job)
        .join(Study, Study.id == Job.study_id)
        .where(and_(Job.id == job_id, Study.study_uid == study_uid))
    ).scalar_one_or_none()
    findings, unreadable = (None, None) if job is None else read_findings(job.id, job.findings)
    if unreadable:
        raise ValueError(unreadable)
    if job is None or findings is None:
        raise ValueError("this result has no findings to review")
    lesions = {les.label: les for les in findings.lesions}
    if lesion_label is not None and lesion_label not in lesions:
        raise ValueError(f"lesion {lesion_label} is not in this result")
    has_values = any(
        v is not None and not (isinstance(v, str) and not v.strip())
        for v in (corrections or {}).values()
    )
    stored_corrections = None
    if has_values:
        if decision != ReviewDecision.AMEND or lesion_label is None:
            raise ValueError("corrected values go with an amend of one lesion")
        stored_corrections = validate_corrections(lesions[lesion_label], corrections)
    name, version = model_of(job)
    review = Review(
        study_id=job.study_id,
        job_id=job.id,
        lesion_label=lesion_label,
        decision=decision,
        reason=reason,
        note=note,
        user_id=user.id,
        model_name=name,
        model_version=version,
        corrections=stored_corrections,
    )
    session.add(review)
    session.flush()
    audit.append(
        session,
        user.name,
        AuditAction.for_review(decision),
        study_uid,
        {
            "review": review.id,
            "job": job.id,
            "lesion": lesion_label,
            "reason": reason,
            "note": note,
            "model": {"name": name, "version": version},
            "corrections": stored_corrections,
        },
    )
    return review


def describe_corrections(corrections: dict[str, dict[str, Any]] | None) -> str:
    """Corrections as people read them: "long-axis diameter 9.5 mm (model 12.3)"."""
    parts = []
    for key, pair in (corrections or {}).items():
        c = CORRECTABLE.get(key)
        if c is None:
            parts.append(f"{key} {pair.get('corrected')} (model {pair.get('model')})")
            continue
        new, old = pair.get("corrected"), pair.get("model")
        shown_old = "-" if old is None else f"{old / c.to_stored:g}"
        shown_new = "-" if new is None else f"{new / c.to_stored:g}"
        parts.append(f"{c.name} {shown_new} {c.unit} (model {shown_old})")
    return "; ".join(parts)


def audit_actors(session: Session, *, user: SessionUser) -> list[str]:
    require(user, "read_audit")
    query = select(AuditEntry.actor).distinct().order_by(AuditEntry.actor)
    return list(session.execute(query).scalars())


def audit_entries(
    session: Session,
    *,
    user: SessionUser,
    study_uid: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 500,
) -> list[dict[str, Any]]:
    """Audit entries, newest first, filtered by study, actor and time range [since, until)."""
    require(user, "read_audit")
    query = select(AuditEntry)
    if study_uid:
        query = query.where(AuditEntry.study_uid == study_uid)
    if actor:
        query = query.where(AuditEntry.actor == actor)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    if until is not None:
        query = query.where(AuditEntry.at < until)
    rows = session.execute(query.order_by(AuditEntry.seq.desc()).limit(limit)).scalars()
    return [
        {
            "seq": r.seq,
            "at": r.at,
            "actor": r.actor,
            "action": r.action,
            "study_uid": r.study_uid or "",
            "detail": r.detail,
            "entry_hash": r.entry_hash[:16],
        }
        for r in rows
    ]


def retry_study(session: Session, study_uid: str, *, user: SessionUser) -> None:
    """Send a study through the pipeline again (`db.requeue.request_retry`, audited)."""
    require(user, "retry")
    request_retry(session, study_uid, actor=user.name)


def release_study(session: Session, study_uid: str, reason: str, *, user: SessionUser) -> None:
    """Let a HELD study be analysed (`db.requeue.release`: audited "study.released" with the
    reason, then queued). ValueError if it is not HELD or the reason is empty."""
    require(user, "release")
    release(session, study_uid, actor=user.name, reason=reason)


# --- accounts (admins only) ------------------------------------------------------------------


def list_accounts(session: Session, *, user: SessionUser) -> list[dict]:
    require(user, "manage_users")
    return users.list_users(session)


def add_account(
    session: Session, name: str, role: str, password: str, *, user: SessionUser
) -> None:
    require(user, "manage_users")
    users.add_user(session, name, role, password, actor=user.name)


def set_account_disabled(session: Session, name: str, disabled: bool, *, user: SessionUser) -> None:
    require(user, "manage_users")
    users.set_disabled(session, name, disabled, actor=user.name)


def reset_account_password(
    session: Session, name: str, password: str, *, user: SessionUser
) -> None:
    require(user, "manage_users")
    users.reset_password(session, name, password, actor=user.name)


def failed_logins(
    session: Session, *, user: SessionUser
) -> tuple[list[login_throttle.FailureSummary], list[login_throttle.FailureSummary]]:
    """Recent refused logins per account and per source address (`db.login_throttle`)."""
    require(user, "manage_users")
    return login_throttle.recent_failures(session)
